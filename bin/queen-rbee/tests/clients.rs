//! Per-client limits against the real queen and hive with the real model: requests and tokens
//! per minute, a daily budget that survives a restart, the models a token may use, SIGHUP
//! raising a limit, one audit record per refusal window; and fair queueing (one client's burst
//! does not hold back another client's request; a client's own priorities).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rbee_test_harness::{
    Daemon, HiveOptions, MODEL_FILE, QueenOptions, SseReader, end_event, eventually,
};
use serde_json::{Value, json};

const ALICE: &str = "client-token-alice-0123456789";
const BOB: &str = "client-token-bob-0123456789ab";
const CAROL: &str = "client-token-carol-0123456789";
const DAVE: &str = "client-token-dave-01234567890";
const JOIN: &str = "join-token-0123456789abcdef";
const HIVE: &str = "hive-token-0123456789abcdef";

fn options(audit: &std::path::Path, registry: &std::path::Path) -> QueenOptions {
    let mut opts = QueenOptions::cluster(("alice", ALICE), true, JOIN, HIVE);
    for (name, token) in [("bob", BOB), ("carol", CAROL), ("dave", DAVE)] {
        opts.clients.push((name.into(), token.into()));
    }
    opts.client_config = vec![
        ("bob".into(), "requests_per_minute = 2".into()),
        ("carol".into(), "tokens_per_day = 30".into()),
        ("dave".into(), "models = [\"other\"]".into()),
    ];
    // An alias dave may use, to a model no hive has: only the refusal of smollm2 matters.
    opts.config_tail
        .push_str("\n[[models]]\nname = \"other\"\nreference = \"file:other.gguf\"\n");
    opts.env
        .push(("RBEE_QUEEN_AUDIT_LOG".into(), audit.display().to_string()));
    opts.registry_path = Some(registry.to_path_buf());
    opts
}

async fn chat(c: &reqwest::Client, queen: &Daemon, token: &str, model: &str) -> reqwest::Response {
    c.post(queen.url("/v1/chat/completions"))
        .bearer_auth(token)
        .json(&json!({"model": model, "max_tokens": 2, "temperature": 0,
                      "messages": [{"role": "user", "content": "Say hi."}]}))
        .send()
        .await
        .unwrap()
}

/// Status, `Retry-After` and the error's code and message.
async fn refusal(resp: reqwest::Response) -> (u16, Option<u64>, String, String) {
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body: Value = resp.json().await.unwrap();
    (
        status,
        retry,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
        body["error"]["message"].as_str().unwrap_or("").to_owned(),
    )
}

fn audit_records(path: &std::path::Path, event: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == event)
        .collect()
}

#[tokio::test]
async fn a_clients_own_limits_refuse_it_with_retry_after_and_are_audited_once_per_window() {
    let dir = rbee_test_harness::temp_dir("client-limits");
    let (audit, registry) = (dir.join("audit.jsonl"), dir.join("registry.sqlite"));
    let mut queen = Daemon::queen(options(&audit, &registry), "127.0.0.1:0")
        .await
        .unwrap();
    let hive = Daemon::hive(HiveOptions::joined(&queen.base_url, "hive-l", HIVE, JOIN))
        .await
        .unwrap();
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();

    // bob: 2 requests per minute; the third and fourth are refused with a Retry-After
    // inside the window, counted twice, audited once.
    for _ in 0..2 {
        assert_eq!(chat(&c, &queen, BOB, "smollm2").await.status(), 200);
    }
    for _ in 0..2 {
        let (status, retry, code, message) = refusal(chat(&c, &queen, BOB, "smollm2").await).await;
        assert_eq!((status, code.as_str()), (429, "CLIENT_LIMIT"), "{message}");
        let retry = retry.expect("Retry-After");
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
        assert!(message.contains("requests_per_minute"), "{message}");
    }
    // Other clients are not affected.
    assert_eq!(chat(&c, &queen, ALICE, "smollm2").await.status(), 200);
    let series = "rbee_queen_client_refusals_total{client=\"bob\",reason=\"requests_per_minute\"}";
    assert_eq!(queen.metric(&c, series).await.unwrap(), 2.0);

    // dave may use `other` only: smollm2 is refused by name and by its reference.
    for model in ["smollm2", &format!("file:{MODEL_FILE}")] {
        let (status, retry, code, message) = refusal(chat(&c, &queen, DAVE, model).await).await;
        assert_eq!(
            (status, code.as_str()),
            (403, "MODEL_NOT_ALLOWED"),
            "{message}"
        );
        assert_eq!(retry, None);
    }

    // carol: 30 tokens a day. The first request uses more than that (prompt + completion),
    // so the next is refused until midnight UTC.
    let first: Value = chat(&c, &queen, CAROL, "smollm2")
        .await
        .json()
        .await
        .unwrap();
    let used = first["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used > 30, "{first}");
    let (status, retry, code, message) = refusal(chat(&c, &queen, CAROL, "smollm2").await).await;
    assert_eq!(
        (status, code.as_str()),
        (429, "BUDGET_EXHAUSTED"),
        "{message}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    assert!(
        retry.unwrap().abs_diff(to_midnight) <= 5,
        "{retry:?} vs {to_midnight}"
    );

    // SIGHUP raises bob's limit: admitted again at once.
    let cfg = std::fs::read_to_string(queen.config_path()).unwrap();
    let raised = cfg.replace("requests_per_minute = 2", "requests_per_minute = 100");
    assert_ne!(cfg, raised);
    std::fs::write(queen.config_path(), raised).unwrap();
    queen.signal(libc::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "bob admitted after SIGHUP",
        || async {
            let status = chat(&c, &queen, BOB, "smollm2").await.status();
            (status == 200).then_some(()).ok_or(status)
        },
    )
    .await
    .unwrap();

    // One record per client and reason in the window, however many refusals.
    let limited = audit_records(&audit, "client.limited");
    let bob: Vec<&Value> = limited.iter().filter(|r| r["actor"] == "bob").collect();
    assert_eq!(bob.len(), 1, "{limited:?}");
    assert_eq!(bob[0]["details"]["reason"], "requests_per_minute");
    let dave = limited.iter().filter(|r| r["actor"] == "dave").count();
    assert_eq!(dave, 1, "{limited:?}");
    let text = std::fs::read_to_string(&audit).unwrap();
    for secret in [ALICE, BOB, CAROL, DAVE] {
        assert!(!text.contains(secret));
    }

    // carol's budget survives a restart of the queen (it is in the registry).
    drop(hive);
    queen.signal(libc::SIGTERM);
    assert!(
        queen
            .wait_exit(Duration::from_secs(15))
            .await
            .unwrap()
            .success()
    );
    let queen = Daemon::queen(options(&audit, &registry), "127.0.0.1:0")
        .await
        .unwrap();
    let (status, _, code, message) = refusal(chat(&c, &queen, CAROL, "smollm2").await).await;
    assert_eq!(
        (status, code.as_str()),
        (429, "BUDGET_EXHAUSTED"),
        "{message}"
    );
    assert!(
        message.contains(&format!("used {used} of its 30")),
        "{message}"
    );
}

#[tokio::test]
async fn one_clients_burst_does_not_hold_back_another_clients_request() {
    let dir = rbee_test_harness::temp_dir("client-fair");
    let opts = options(&dir.join("audit.jsonl"), &dir.join("registry.sqlite"));
    let queen = Daemon::queen(opts, "127.0.0.1:0").await.unwrap();
    // One worker with one slot, so every request after the first waits for it.
    let hive = Daemon::hive(
        HiveOptions::joined(&queen.base_url, "hive-f", HIVE, JOIN)
            .env("WORKERS__MAX_WORKERS", "1")
            .env("WORKERS__PARALLEL", "1"),
    )
    .await
    .unwrap();
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    assert_eq!(chat(&c, &queen, ALICE, "smollm2").await.status(), 200);
    // alice holds the worker with a long request...
    let resp = c
        .post(queen.url("/v1/inference"))
        .bearer_auth(ALICE)
        .json(
            &json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
                      "max_tokens": 250, "temperature": 0}),
        )
        .send()
        .await
        .unwrap();
    let mut holder = SseReader::new(resp);
    holder.next().await.unwrap();
    // ...and queues four more (the last one with a lower priority number: it goes first
    // among hers); then bob sends one.
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let senders = [
        ("alice-0", ALICE, 0),
        ("alice-1", ALICE, 0),
        ("alice-2", ALICE, 0),
        ("alice-3", ALICE, -5),
        ("bob", BOB, 0),
    ];
    for (i, (name, token, priority)) in senders.into_iter().enumerate() {
        let (c2, order, url) = (c.clone(), order.clone(), queen.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            let r = c2
                .post(url)
                .bearer_auth(token)
                .header("X-Request-Priority", priority.to_string())
                .json(
                    &json!({"model": "smollm2", "max_tokens": 3, "temperature": 0,
                              "messages": [{"role": "user", "content": "Say hi."}]}),
                )
                .send()
                .await
                .unwrap();
            let status = r.status();
            let _ = r.bytes().await;
            order.lock().unwrap().push(name);
            (status, t0.elapsed())
        }));
        queen.wait_queue_depth(&c, i as u32 + 1).await.unwrap();
    }
    let rest = holder.collect().await.unwrap();
    assert!(end_event(&rest).is_some(), "{rest:?}");
    let mut waited = Vec::new();
    for t in tasks {
        let (status, took) = t.await.unwrap();
        assert_eq!(status, 200);
        waited.push(took);
    }
    println!("time to answer (alice-0..3, bob): {waited:?}");
    assert_eq!(
        *order.lock().unwrap(),
        vec!["bob", "alice-3", "alice-0", "alice-1", "alice-2"]
    );
    // A priority outside -100..=100 is refused.
    let bad = c
        .post(queen.url("/v1/chat/completions"))
        .bearer_auth(BOB)
        .header("X-Request-Priority", "high")
        .json(&json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let (status, _, code, _) = refusal(bad).await;
    assert_eq!((status, code.as_str()), (400, "INVALID_PARAMETER"));
    drop(hive);
}
