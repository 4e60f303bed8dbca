//! The worker's native API for constrained decoding, tool calls, log-probabilities and `n`,
//! against the real model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rbee_api::{Tool, ToolChoice};
use rbee_engine::{Engine, LoadOptions, ToolFormat};
use rbee_test_harness::{Daemon, SseData, SseReader, WorkerOptions, test_model};
use rbee_worker::tools::forced_call_grammar;
use serde_json::{Value, json};

const TOKEN: &str = "test-token-0123456789abcdef";
const WORKER: &str = env!("CARGO_BIN_EXE_llm-worker-rbee");

async fn worker() -> Daemon {
    let mut o = WorkerOptions::new(WORKER.into(), test_model()).token(TOKEN);
    o.extra_args = vec!["--parallel".into(), "4".into()];
    Daemon::worker(o).await.unwrap()
}

async fn post(w: &Daemon, body: Value) -> reqwest::Response {
    w.post(&reqwest::Client::new(), "/v1/inference", &body)
        .send()
        .await
        .unwrap()
}

async fn events(w: &Daemon, body: Value) -> Vec<Value> {
    let resp = post(w, body).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    SseReader::new(resp)
        .collect()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|d| match d {
            SseData::Event(v) => Some(v),
            SseData::Done => None,
        })
        .collect()
}

fn text_of(events: &[Value], choice: u64) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "token" && e["choice"].as_u64().unwrap_or(0) == choice)
        .map(|e| e["text"].as_str().unwrap())
        .collect()
}

#[test]
fn forced_call_grammars_compile_for_every_format() {
    let engine = Engine::load(&test_model(), &LoadOptions::default()).unwrap();
    let tools: Vec<Tool> = serde_json::from_value(json!([
        {"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
        {"type": "function", "function": {"name": "b"}}
    ]))
    .unwrap();
    for format in [ToolFormat::Hermes, ToolFormat::Llama3, ToolFormat::Mistral] {
        for parallel in [true, false] {
            for choice in [ToolChoice::Required, ToolChoice::Function("b".into())] {
                let g = forced_call_grammar(format, &tools, &choice, parallel).unwrap();
                engine
                    .compile_grammar(&g)
                    .unwrap_or_else(|e| panic!("{format:?} {parallel} {choice:?}: {e}: {g:?}"));
            }
        }
    }
    assert!(forced_call_grammar(ToolFormat::Hermes, &tools, &ToolChoice::Auto, true).is_none());
}

#[tokio::test]
async fn grammars_logprobs_and_several_answers_on_the_native_api() {
    let w = worker().await;
    // A Lark grammar and a regular expression hold the answer to their language.
    let evs = events(
        &w,
        json!({"messages": [{"role": "user", "content": "Pick a fruit."}], "max_tokens": 20,
               "temperature": 0, "grammar": {"type": "lark", "grammar": "start: \"I pick \" (\"apple\" | \"pear\")"}}),
    )
    .await;
    let t = text_of(&evs, 0);
    assert!(t == "I pick apple" || t == "I pick pear", "{t:?}");
    assert_eq!(evs.last().unwrap()["stop_reason"], "eos");
    let evs = events(
        &w,
        json!({"prompt": "The year is", "max_tokens": 20, "temperature": 0,
               "grammar": {"type": "regex", "pattern": " [0-9]{4}"}}),
    )
    .await;
    let t = text_of(&evs, 0);
    assert!(t.len() == 5 && t[1..].parse::<u32>().is_ok(), "{t:?}");

    // A grammar that does not compile is a 400 naming it.
    let resp = post(
        &w,
        json!({"prompt": "x", "grammar": {"type": "lark", "grammar": "start: nowhere"}}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("grammar"),
        "{body}"
    );

    // n = 3: three answers, each ended by its choice_end, then one end counting them all.
    let evs = events(
        &w,
        json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1, "seed": 5, "n": 3}),
    )
    .await;
    let ends: Vec<&Value> = evs.iter().filter(|e| e["type"] == "choice_end").collect();
    let mut choices: Vec<u64> = ends.iter().map(|e| e["choice"].as_u64().unwrap()).collect();
    choices.sort_unstable();
    assert_eq!(choices, vec![0, 1, 2], "{evs:?}");
    let total: u64 = ends
        .iter()
        .map(|e| e["completion_tokens"].as_u64().unwrap())
        .sum();
    let end = evs.last().unwrap();
    assert_eq!(end["type"], "end");
    assert_eq!(end["completion_tokens"].as_u64().unwrap(), total);
    assert!((0..3).all(|c| !text_of(&evs, c).is_empty()));

    // logprobs: every token event carries its tokens' log-probabilities.
    let evs = events(
        &w,
        json!({"prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0, "logprobs": 2}),
    )
    .await;
    let lps: Vec<&Value> = evs
        .iter()
        .filter(|e| e["type"] == "token")
        .flat_map(|e| e["logprobs"].as_array().unwrap())
        .collect();
    assert_eq!(lps.len(), 4, "{evs:?}");
    for lp in lps {
        assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(lp["top_logprobs"][0]["token"], lp["token"]);
        assert!(lp["logprob"].as_f64().unwrap() <= 0.0);
    }
    // Out of range: 400 naming the field.
    for (field, value) in [("logprobs", json!(21)), ("n", json!(0)), ("n", json!(17))] {
        let resp = post(&w, json!({"prompt": "x", field: value})).await;
        assert_eq!(resp.status(), 400, "{field}");
        let body: Value = resp.json().await.unwrap();
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{body}"
        );
    }
}

#[tokio::test]
async fn a_forced_call_comes_back_as_a_tool_calls_event() {
    let w = worker().await;
    let evs = events(
        &w,
        json!({"messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 60,
               "temperature": 0,
               "tools": [{"type": "function", "function": {"name": "weather", "parameters":
                   {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                    "required": ["city"], "additionalProperties": false}}}],
               "tool_choice": {"function": "weather"}, "parallel_tool_calls": false}),
    )
    .await;
    let calls = evs.iter().find(|e| e["type"] == "tool_calls").unwrap();
    let call = &calls["calls"][0];
    assert_eq!(call["function"]["name"], "weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");
    assert_eq!(
        text_of(&evs, 0),
        "",
        "the call's text is not also sent as text"
    );
    // Tools need a chat, and a forced call needs the function to exist.
    for body in [
        json!({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}),
        json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"function": "g"},
               "tools": [{"type": "function", "function": {"name": "f"}}]}),
        json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}),
    ] {
        assert_eq!(post(&w, body).await.status(), 400);
    }
}
