//! BDD features for the daemons, run by `cargo test` (harness = false). Undefined or skipped
//! steps fail the run, so a feature can never pass by not running.

// Test code: a failed unwrap is a failed scenario.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cucumber::{World, given, then, when};
use std::time::{Duration, Instant};

use rbee_test_harness::{
    Daemon, HiveOptions, QueenOptions, SseData, SseReader, WorkerOptions, end_event, joined_text,
    process_alive, test_model, workspace_binary,
};
use serde_json::{Value, json};

const TOKEN: &str = "bdd-token-0123456789abcdef";

#[derive(Default, World)]
struct RbeeWorld {
    worker: Option<Daemon>,
    events: Vec<SseData>,
    status: u16,
    headers: Vec<(String, String)>,
    error: Value,
    /// Keeps long generations' streams open while a step runs.
    open_streams: Vec<SseReader>,
    hive: Option<Daemon>,
    /// The last worker view the hive returned.
    hive_worker: Value,
    queen: Option<Daemon>,
    /// The last JSON body the queen answered.
    answer: Value,
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
    fn worker(&self) -> &Daemon {
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
    w.worker = Some(Daemon::worker(opts).await.unwrap());
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

#[when("every slot of the worker is generating")]
async fn every_slot_generating(w: &mut RbeeWorld) {
    let c = reqwest::Client::new();
    let health: Value = c
        .get(w.worker().url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let slots = health["slots"].as_u64().unwrap();
    assert!(slots >= 1, "{health}");
    for _ in 0..slots {
        let resp = w
            .worker()
            .post(
                &c,
                "/v1/inference",
                &json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "temperature": 0, "max_tokens": 1000}),
            )
            .send()
            .await
            .unwrap();
        let mut reader = SseReader::new(resp);
        let first = reader.next().await.unwrap();
        assert!(matches!(first, Some(SseData::Event(ref v)) if v["type"] == "started"));
        w.open_streams.push(reader);
    }
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

impl RbeeWorld {
    fn hive(&self) -> &Daemon {
        self.hive.as_ref().expect("a hive is running")
    }

    fn worker_id(&self) -> String {
        self.hive_worker["id"]
            .as_str()
            .expect("a worker was spawned")
            .to_owned()
    }

    fn worker_pid(&self) -> i32 {
        self.hive_worker["pid"]
            .as_i64()
            .expect("the worker has a pid") as i32
    }

    async fn start_hive(&mut self, opts: HiveOptions) {
        self.hive = Some(Daemon::hive(opts.token(TOKEN)).await.unwrap());
    }

    async fn wait_worker(&mut self, secs: u64, pred: impl Fn(&Value) -> bool) {
        let id = self.worker_id();
        self.hive_worker = self
            .hive()
            .wait_worker(
                &reqwest::Client::new(),
                &id,
                Duration::from_secs(secs),
                pred,
            )
            .await
            .unwrap();
    }
}

#[given("a running hive with a token")]
async fn running_hive(w: &mut RbeeWorld) {
    w.start_hive(HiveOptions::default()).await;
}

#[given(expr = "a running hive with a token and at most {int} crashes before the breaker opens")]
async fn hive_with_breaker(w: &mut RbeeWorld, crashes: u32) {
    let opts = HiveOptions::default()
        .env("RESTART__MAX_ATTEMPTS", crashes)
        .env("RESTART__BACKOFF_INITIAL_MS", 200);
    w.start_hive(opts).await;
}

#[given(expr = "a running hive with a token and a memory limit of {int} MiB")]
async fn hive_with_memory_limit(w: &mut RbeeWorld, mib: u64) {
    w.start_hive(HiveOptions::default().env("RESOURCES__MAX_MEMORY_MB", mib))
        .await;
}

#[given("a ready worker")]
async fn ready_worker(w: &mut RbeeWorld) {
    w.hive_worker = w
        .hive()
        .ready_worker(&reqwest::Client::new())
        .await
        .unwrap();
}

#[when(expr = "I spawn a worker for {string}")]
async fn spawn_for(w: &mut RbeeWorld, model: String) {
    let resp = w
        .hive()
        .post(
            &reqwest::Client::new(),
            "/v1/workers",
            &json!({ "model": model }),
        )
        .send()
        .await
        .unwrap();
    w.status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    w.error = body["error"].clone();
    w.hive_worker = body;
}

#[then(expr = "the worker becomes ready within {int} seconds")]
async fn becomes_ready(w: &mut RbeeWorld, secs: u64) {
    w.wait_worker(secs, |v| v["state"] == "ready").await;
}

#[when(expr = "I ask {string} through the hive greedily with max_tokens {int}")]
async fn ask_through_hive(w: &mut RbeeWorld, question: String, max_tokens: u32) {
    let path = format!("/v1/workers/{}/inference", w.worker_id());
    let body = json!({"messages": [{"role": "user", "content": question}],
                      "max_tokens": max_tokens, "temperature": 0});
    let resp = w
        .hive()
        .post(&reqwest::Client::new(), &path, &body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    w.events = SseReader::new(resp).collect().await.unwrap();
}

#[when("I stop the worker")]
async fn stop_the_worker(w: &mut RbeeWorld) {
    let pid = w.worker_pid();
    let path = format!("/v1/workers/{}", w.worker_id());
    let resp = w
        .hive()
        .delete(&reqwest::Client::new(), &path)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    w.hive_worker = resp.json().await.unwrap();
    w.hive_worker["pid"] = json!(pid);
}

#[then("the worker stopped gracefully and its process is gone")]
async fn stopped_gracefully(w: &mut RbeeWorld) {
    assert_eq!(w.hive_worker["state"], "stopped");
    assert_eq!(w.hive_worker["stop"]["outcome"], "graceful");
    assert!(!process_alive(w.worker_pid()));
}

#[when("the worker process is killed with SIGKILL")]
async fn kill_worker(w: &mut RbeeWorld) {
    unsafe {
        libc::kill(w.worker_pid(), libc::SIGKILL);
    }
}

#[then(expr = "the worker is ready again with restart count {int}")]
async fn ready_again(w: &mut RbeeWorld, count: u32) {
    let old = w.worker_pid();
    w.wait_worker(120, move |v| {
        v["state"] == "ready" && v["restart_count"] == count && v["pid"] != old
    })
    .await;
    assert_eq!(w.hive_worker["last_exit"]["signal"], 9);
}

#[then("the worker is failed with its circuit breaker open")]
async fn breaker_open(w: &mut RbeeWorld) {
    w.wait_worker(30, |v| v["state"] == "failed").await;
    assert_eq!(w.hive_worker["breaker_open"], true);
}

#[when("I list the workers without a token")]
async fn list_without_token(w: &mut RbeeWorld) {
    let req = reqwest::Client::new().get(w.hive().url("/v1/workers"));
    w.send(req).await;
}

#[when("the hive receives SIGTERM")]
async fn hive_sigterm(w: &mut RbeeWorld) {
    w.hive().signal(libc::SIGTERM);
}

#[then(expr = "the hive exits cleanly within {int} seconds")]
async fn hive_exits(w: &mut RbeeWorld, secs: u64) {
    let t0 = Instant::now();
    let status = w
        .hive
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(secs))
        .await
        .expect("the hive exited");
    assert!(status.success(), "{status}");
    assert!(t0.elapsed() < Duration::from_secs(secs));
}

#[then("no worker process is left")]
async fn no_worker_left(w: &mut RbeeWorld) {
    assert!(!process_alive(w.worker_pid()));
}

const JOIN: &str = "bdd-join-token-0123456789";

impl RbeeWorld {
    fn queen(&self) -> &Daemon {
        self.queen.as_ref().expect("a queen is running")
    }

    async fn ask_queen(&mut self, body: Value) {
        let resp = reqwest::Client::new()
            .post(self.queen().url("/v1/chat/completions"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        self.status = resp.status().as_u16();
        self.answer = resp.json().await.unwrap_or(Value::Null);
        self.error = self.answer["error"].clone();
    }
}

#[given("a queen with one hive joined")]
async fn queen_with_hive(w: &mut RbeeWorld) {
    let queen = Daemon::queen(
        QueenOptions::cluster(("bdd", TOKEN), false, JOIN, TOKEN),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let hive = Daemon::hive(HiveOptions::joined(
        &queen.base_url,
        "bdd-hive",
        TOKEN,
        JOIN,
    ))
    .await
    .unwrap();
    queen
        .wait_hives_up(&reqwest::Client::new(), 1)
        .await
        .unwrap();
    w.queen = Some(queen);
    w.hive = Some(hive);
}

#[when(expr = "I ask the queen {string} with max_tokens {int}")]
async fn ask_the_queen(w: &mut RbeeWorld, question: String, max_tokens: u32) {
    w.ask_queen(
        json!({"model": "smollm2", "max_tokens": max_tokens, "temperature": 0,
                       "messages": [{"role": "user", "content": question}]}),
    )
    .await;
    assert_eq!(w.status, 200, "{}", w.answer);
}

#[when(expr = "I ask the queen for model {string}")]
async fn ask_for_model(w: &mut RbeeWorld, model: String) {
    w.ask_queen(json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
}

#[then(expr = "the answer has {int} completion tokens and finish_reason {string}")]
async fn answer_has(w: &mut RbeeWorld, tokens: u64, finish: String) {
    assert_eq!(
        w.answer["usage"]["completion_tokens"], tokens,
        "{}",
        w.answer
    );
    assert_eq!(w.answer["choices"][0]["finish_reason"], finish.as_str());
    assert!(
        !w.answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
    );
}

#[then(expr = "the queen spawned {int} worker(s)")]
async fn queen_spawned(w: &mut RbeeWorld, n: u64) {
    let metrics = reqwest::get(w.queen().url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let spawned: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("rbee_queen_worker_spawns_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(spawned, n as f64, "{metrics}");
}

#[when("I list the queen's models without a token")]
async fn queen_models_without_token(w: &mut RbeeWorld) {
    let req = reqwest::Client::new().get(w.queen().url("/v1/models"));
    w.send(req).await;
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
