//! Structured output, tools, log-probabilities and `n` through the stock `openai` SDK, against
//! the whole chain (queen → hive → worker) with the real model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rbee_test_harness::{Daemon, HiveOptions, QueenOptions};
use serde_json::Value;

const CLIENT: &str = "client-token-0123456789abcdef";
const JOIN: &str = "join-token-0123456789abcdef";
const HIVE: &str = "hive-token-0123456789abcdef";

struct Stack {
    queen: Daemon,
    _hive: Daemon,
}

async fn stack() -> Stack {
    let queen = Daemon::queen(
        QueenOptions::cluster(("alice", CLIENT), true, JOIN, HIVE),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let hive = Daemon::hive(HiveOptions::joined(&queen.base_url, "hive-a", HIVE, JOIN))
        .await
        .unwrap();
    queen
        .wait_hives_up(&reqwest::Client::new(), 1)
        .await
        .unwrap();
    Stack { queen, _hive: hive }
}

/// Runs a Python script against the stack and returns the JSON object it prints.
async fn run_python(s: &Stack, script: &str) -> Value {
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .env("RBEE_URL", &s.queen.base_url)
        .env("RBEE_TOKEN", CLIENT)
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed (pip install openai jsonschema; `cargo xtask test` does):\n{}\n{stdout}\nqueen:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.queen.stderr()
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

#[tokio::test]
async fn structured_output_tools_logprobs_and_n_through_the_openai_sdk() {
    let s = stack().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_features.py");
    let v = run_python(&s, script).await;
    println!("{v:#}");
    // Every schema answer validated inside the script (jsonschema), streaming or not.
    assert_eq!(
        v["schemas"].as_array().unwrap().len(),
        6,
        "{}",
        v["schemas"]
    );
    assert_eq!(v["json_object"], true);
    assert_eq!(v["completion_schema"], true);
    // The forced call names the function, ends as a tool call and carries no text.
    assert_eq!(v["forced"]["name"], "get_weather");
    assert_eq!(v["forced"]["finish_reason"], "tool_calls");
    assert_eq!(v["forced"]["content"], Value::Null);
    assert!(v["forced"]["id"].as_str().unwrap().starts_with("call_"));
    // The second turn carries the call and its result in the prompt and answers in text.
    let second = &v["second_turn"];
    assert!(
        second["content"].as_str().is_some_and(|c| !c.is_empty()),
        "{second}"
    );
    assert!(second["prompt_tokens"].as_u64() > second["first_prompt_tokens"].as_u64());
    assert!(["stop", "length"].contains(&second["finish_reason"].as_str().unwrap()));
    // `required` makes at least one call, streamed as tool_calls deltas.
    let req = &v["required_stream"];
    assert!(req["calls"].as_u64().unwrap() >= 1, "{req}");
    assert_eq!(req["finish_reason"], "tool_calls");
    // Log-probabilities: one per generated token, greedy picks the most likely.
    assert_eq!(v["logprobs"]["ok"], true, "{}", v["logprobs"]);
    assert_eq!(v["logprobs"]["text_matches"], true);
    assert!(v["logprobs"]["tokens"].as_u64().unwrap() >= 1);
    let cl = &v["completion_logprobs"];
    assert_eq!(cl["tokens"], 5, "{cl}");
    assert_eq!(cl["top"], serde_json::json!([2, 2, 2, 2, 2]));
    assert_eq!(cl["joined"], true);
    // n: three answers, counted together in usage.
    assert_eq!(v["n"]["choices"], serde_json::json!([0, 1, 2]));
    assert!(v["n"]["completion_tokens"].as_u64().unwrap() >= 3);
    assert_eq!(v["n_stream"]["finished"], serde_json::json!([0, 1]));
    // /v1/responses: the object, its events, structured output and a tool round trip.
    let r = &v["responses"];
    assert_eq!(r["object"], "response");
    assert!(
        ["completed", "incomplete"].contains(&r["status"].as_str().unwrap()),
        "{r}"
    );
    assert!(!r["text"].as_str().unwrap().is_empty(), "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("resp_"));
    let rs = &v["responses_stream"];
    assert_eq!(
        rs["first"],
        serde_json::json!(["response.created", "response.in_progress"])
    );
    assert!(["response.completed", "response.incomplete"].contains(&rs["last"].as_str().unwrap()));
    assert_eq!(rs["text"], rs["final_text"]);
    assert_eq!(rs["text"], r["text"], "greedy: streamed and whole agree");
    let rt = &v["responses_tools"];
    assert_eq!(rt["name"], "get_weather");
    assert!(
        rt["second_input_tokens"].as_u64() > rt["first_input_tokens"].as_u64(),
        "{rt}"
    );
    assert!(!rt["second_text"].as_str().unwrap().is_empty(), "{rt}");
}
