//! BDD features for the daemons, run by `cargo test` (harness = false). Undefined or skipped
//! steps fail the run, so a feature can never pass by not running.

// Test code: a failed unwrap is a failed scenario.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cucumber::{World, given, then, when};
use rbee_test_harness::{
    SseData, SseReader, WorkerOptions, WorkerProcess, end_event, joined_text, test_model,
    workspace_binary,
};
use serde_json::{Value, json};

const TOKEN: &str = "bdd-token-0123456789abcdef";

#[derive(Default, World)]
struct RbeeWorld {
    worker: Option<WorkerProcess>,
    events: Vec<SseData>,
    status: u16,
    headers: Vec<(String, String)>,
    error: Value,
    /// Keeps a long generation's stream open while a step runs.
    open_stream: Option<SseReader>,
}

impl std::fmt::Debug for RbeeWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbeeWorld")
            .field("status", &self.status)
            .field("events", &self.events.len())
            .finish()
    }
}

impl RbeeWorld {
    fn worker(&self) -> &WorkerProcess {
        self.worker.as_ref().expect("a worker is running")
    }

    async fn stream(&mut self, body: Value) {
        let resp = self
            .worker()
            .post(&reqwest::Client::new(), "/v1/inference", &body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        self.events = SseReader::new(resp).collect().await.unwrap();
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) {
        let resp = req.send().await.unwrap();
        self.status = resp.status().as_u16();
        self.headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        self.error = body["error"].clone();
    }
}

#[given("a running worker with the default model and a token")]
async fn running_worker(w: &mut RbeeWorld) {
    let opts = WorkerOptions::new(workspace_binary("llm-worker-rbee"), test_model()).token(TOKEN);
    w.worker = Some(WorkerProcess::start(opts).await.unwrap());
}

#[when(expr = "I ask {string} greedily with max_tokens {int}")]
async fn ask_greedy(w: &mut RbeeWorld, question: String, max_tokens: u32) {
    w.stream(json!({"messages": [{"role": "user", "content": question}],
                    "max_tokens": max_tokens, "temperature": 0}))
        .await;
}

#[when(expr = "I ask {string} greedily with stop sequence {string}")]
async fn ask_with_stop(w: &mut RbeeWorld, question: String, stop: String) {
    w.stream(json!({"messages": [{"role": "user", "content": question}],
                    "max_tokens": 24, "temperature": 0, "stop": [stop]}))
        .await;
}

#[when("I send an inference request without a token")]
async fn without_token(w: &mut RbeeWorld) {
    let req = reqwest::Client::new()
        .post(w.worker().url("/v1/inference"))
        .json(&json!({"prompt": "Hi"}));
    w.send(req).await;
}

#[when(regex = r"^I send the body (\{.*\})$")]
async fn send_body(w: &mut RbeeWorld, body: String) {
    let body: Value = serde_json::from_str(&body).unwrap();
    let req = w
        .worker()
        .post(&reqwest::Client::new(), "/v1/inference", &body);
    w.send(req).await;
}

#[when("a long generation is running")]
async fn long_generation(w: &mut RbeeWorld) {
    let resp = w
        .worker()
        .post(
            &reqwest::Client::new(),
            "/v1/inference",
            &json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "temperature": 0, "max_tokens": 1000}),
        )
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(resp);
    let first = reader.next().await.unwrap();
    assert!(matches!(first, Some(SseData::Event(ref v)) if v["type"] == "started"));
    w.open_stream = Some(reader);
}

#[then("the stream is started, tokens, end, then [DONE]")]
async fn stream_order(w: &mut RbeeWorld) {
    let kinds: Vec<String> = w
        .events
        .iter()
        .map(|e| match e {
            SseData::Event(v) => v["type"].as_str().unwrap_or("?").to_owned(),
            SseData::Done => "[DONE]".to_owned(),
        })
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("started"));
    assert_eq!(&kinds[kinds.len() - 2..], ["end", "[DONE]"]);
    assert!(
        kinds[1..kinds.len() - 2].iter().all(|k| k == "token"),
        "{kinds:?}"
    );
    assert!(kinds.len() > 3, "{kinds:?}");
}

#[then(expr = "the answer is {string}")]
async fn answer_is(w: &mut RbeeWorld, expected: String) {
    assert_eq!(joined_text(&w.events), expected);
}

#[then(expr = "the stop reason is {string}")]
async fn stop_reason_is(w: &mut RbeeWorld, expected: String) {
    assert_eq!(
        end_event(&w.events).unwrap()["stop_reason"],
        expected.as_str()
    );
}

#[then(expr = "{int} tokens were generated")]
async fn tokens_generated(w: &mut RbeeWorld, n: u64) {
    assert_eq!(end_event(&w.events).unwrap()["completion_tokens"], n);
}

#[then(expr = "the response status is {int}")]
async fn status_is(w: &mut RbeeWorld, status: u16) {
    assert_eq!(w.status, status);
}

#[then(expr = "the error code is {string}")]
async fn error_code_is(w: &mut RbeeWorld, code: String) {
    assert_eq!(w.error["code"], code.as_str(), "{}", w.error);
    assert!(w.error["request_id"].is_string(), "{}", w.error);
}

#[then(expr = "the error message mentions {string}")]
async fn error_mentions(w: &mut RbeeWorld, needle: String) {
    let msg = w.error["message"].as_str().unwrap_or_default();
    assert!(msg.contains(&needle), "{msg}");
}

#[then(regex = r"^the response carries .(\S+): (.+).$")]
async fn header_is(w: &mut RbeeWorld, name: String, value: String) {
    let name = name.to_ascii_lowercase();
    assert!(
        w.headers.iter().any(|(k, v)| *k == name && *v == value),
        "{name}: {value} not in {:?}",
        w.headers
    );
}

#[tokio::main]
async fn main() {
    let features = concat!(env!("CARGO_MANIFEST_DIR"), "/features");
    RbeeWorld::cucumber()
        .fail_on_skipped()
        .max_concurrent_scenarios(1)
        .run_and_exit(features)
        .await;
}
