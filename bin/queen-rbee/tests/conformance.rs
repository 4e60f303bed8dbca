//! Checkers nobody here wrote, against the whole chain with the real model: `llm-comply`
//! (OpenAI chat and Open Responses conformance) and `schemathesis` (requests generated from the
//! queen's own `/openapi.json`), both from PyPI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rbee_test_harness::{Daemon, HiveOptions, QueenOptions};
use serde_json::{Value, json};

const CLIENT: &str = "client-token-0123456789abcdef";
const JOIN: &str = "join-token-0123456789abcdef";
const HIVE: &str = "hive-token-0123456789abcdef";

/// Tests a text model cannot pass, and why: each must fail only with rbee's clear 400.
const NEEDS_IMAGES: &[&str] = &["chat-image-input", "image-input"];

async fn stack() -> (Daemon, Daemon) {
    let mut opts = QueenOptions::cluster(("alice", CLIENT), false, JOIN, HIVE);
    // The checkers send no temperature: the model's configured default (greedy) makes their
    // answers the same every run (at temperature 1 this small model sometimes counts past 5).
    opts.config_tail = opts.config_tail.replace(
        "reference = \"file:SmolLM2-135M-Instruct.Q4_1.gguf\"\n",
        "reference = \"file:SmolLM2-135M-Instruct.Q4_1.gguf\"\ntemperature = 0.0\n",
    );
    assert!(opts.config_tail.contains("temperature"));
    let queen = Daemon::queen(opts, "127.0.0.1:0").await.unwrap();
    let hive = Daemon::hive(HiveOptions::joined(&queen.base_url, "hive-a", HIVE, JOIN))
        .await
        .unwrap();
    queen
        .wait_hives_up(&reqwest::Client::new(), 1)
        .await
        .unwrap();
    (queen, hive)
}

/// Runs llm-comply's suite for `format` and returns its JSON report.
async fn llm_comply(queen: &Daemon, format: &str) -> Value {
    let out = tokio::process::Command::new("python3")
        .args([
            "-c",
            "import sys; from llm_comply.cli import main; sys.exit(main())",
        ])
        .args([
            "--format",
            format,
            "--json",
            "--timeout",
            "120",
            "-m",
            "smollm2",
        ])
        .args(["-u", &format!("{}/v1", queen.base_url), "-k", CLIENT])
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "llm-comply printed no report ({e}; pip install llm-comply; `cargo xtask test` does):\n{}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// One stack, the checkers one after the other: run side by side on a small machine they would
/// measure each other's load.
#[tokio::test]
async fn third_party_checkers_find_nothing() {
    let (queen, _hive) = stack().await;
    // The `[[models]]` default applies where a request gives no temperature: greedy answers.
    let c = reqwest::Client::new();
    let ask = || async {
        let body = json!({"model": "smollm2", "max_tokens": 12,
                          "messages": [{"role": "user", "content": "Name a bird."}]});
        let r = c
            .post(queen.url("/v1/chat/completions"))
            .bearer_auth(CLIENT)
            .json(&body);
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (a, b, c3) = (ask().await, ask().await, ask().await);
    assert!(a == b && b == c3, "{a:?} {b:?} {c3:?}");
    llm_comply_passes_for_openai_chat_and_open_responses(&queen).await;
    schemathesis_finds_nothing_on_the_client_api(&queen).await;
}

async fn llm_comply_passes_for_openai_chat_and_open_responses(queen: &Daemon) {
    for format in ["openai-chat", "open-responses"] {
        let report = llm_comply(queen, format).await;
        println!("{format}: {}", report["summary"]);
        let results = report["results"].as_array().unwrap();
        assert!(results.len() >= 8, "{report}");
        for r in results {
            let id = r["id"].as_str().unwrap();
            match r["status"].as_str().unwrap() {
                "passed" => {}
                // Reasoning tests need a reasoning model; llm-comply skips them itself.
                "skipped" => assert!(id.contains("reasoning"), "{format} skipped {id}: {r}"),
                _ if NEEDS_IMAGES.contains(&id) => {
                    let errors = r["errors"].to_string();
                    assert!(errors.contains("HTTP 400"), "{format} {id}: {r}");
                }
                other => panic!("{format} {id} {other}: {r}"),
            }
        }
    }
    // What those image requests get: a 400 that says why.
    let c = reqwest::Client::new();
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]});
    let resp = c
        .post(queen.url("/v1/chat/completions"))
        .bearer_auth(CLIENT)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "messages[0].content[1]");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("text only"),
        "{v}"
    );
    let body = json!({"model": "smollm2", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]});
    let resp = c
        .post(queen.url("/v1/responses"))
        .bearer_auth(CLIENT)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("text only"),
        "{v}"
    );
}

/// Every client route of the queen under schemathesis, all checks, positive and negative
/// inputs: no 5xx, every status and body as `/openapi.json` documents it, schema-valid bodies
/// served and invalid ones refused. `tests/schemathesis_hooks.py` keeps generations short and
/// applies the rules across fields a schema cannot state. The admin and heartbeat routes (other
/// credentials; they spawn, download and forget hives) have tests of their own.
async fn schemathesis_finds_nothing_on_the_client_api(queen: &Daemon) {
    let hooks = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis_hooks.py");
    let report = rbee_test_harness::temp_dir("schemathesis");
    let out = tokio::process::Command::new("python3")
        .args(["-m", "schemathesis.cli", "run", &queen.url("/openapi.json")])
        // The coverage phase sends the schema's boundary values as they are, without the hooks'
        // rules across fields, so it would report those rules; fuzzing covers the same fields.
        .args(["--checks", "all", "--phases", "examples,fuzzing"])
        .args(["--max-examples", "25", "--seed", "7"])
        // A debug build reads a long generated prompt slowly; speed is `cargo xtask bench`'s.
        .args(["--request-timeout", "120", "--max-response-time", "120"])
        .args(["--exclude-path-regex", "^/v1/(admin|hives)/"])
        .args(["-H", &format!("Authorization: Bearer {CLIENT}")])
        .args(["--no-color", "--report", "junit", "--report-dir"])
        .arg(&report)
        // Its cache goes beside the report, not into the source tree.
        .current_dir(&report)
        .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks")
        .env("PYTHONPATH", std::path::Path::new(hooks).parent().unwrap())
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .rsplit("SUMMARY")
        .next()
        .unwrap_or_default()
        .to_owned();
    println!("{summary}");
    assert!(
        out.status.success(),
        "schemathesis found problems (pip install schemathesis; `cargo xtask test` does):\n{stdout}\n{}\nqueen:\n{}",
        String::from_utf8_lossy(&out.stderr),
        queen.stderr()
    );
    assert!(summary.contains("Tested:"), "{stdout}");
}
