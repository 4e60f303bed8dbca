//! Hive identity against the real queen, staged as an attacker holding the join token would
//! try it: take over a joined hive's id, beat with a made-up or another hive's credential, join
//! a fake hive and wait for prompts, and receive the shared hive token. A test double stands in
//! for the fake hive (it is the attacker's machine, outside the project).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rbee_test_harness::{Daemon, HiveOptions, QueenOptions, eventually};
use serde_json::{Value, json};

const CLIENT: &str = "client-token-0123456789abcdef";
const JOIN: &str = "join-token-0123456789abcdef";
const HIVE: &str = "hive-token-0123456789abcdef";
const MODEL: &str = "file:SmolLM2-135M-Instruct.Q4_1.gguf";

/// What reached the fake hive: method, path and `Authorization` header.
type Calls = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// A fake hive: records every call and answers 500.
async fn fake_hive() -> (String, Calls) {
    let calls: Calls = Arc::default();
    let sink = calls.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let sink = sink.clone();
        async move {
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            sink.lock().unwrap().push((
                req.method().to_string(),
                req.uri().path().to_owned(),
                auth,
            ));
            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "fake hive")
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, calls)
}

/// A heartbeat claiming a ready worker for the test model with many slots and lots of memory.
fn beat(id: &str, url: &str) -> Value {
    json!({
        "hive_id": id, "url": url, "version": "0.1.0",
        "resources": {"cpu_cores": 64, "memory_total_bytes": 1u64 << 40,
                      "memory_available_bytes": 1u64 << 40, "gpus": [],
                      "model_disk_free_bytes": 1u64 << 40},
        "workers": [{"id": "w-1", "model": MODEL, "device": "cpu", "state": "ready",
                     "busy": false, "slots": 64}],
        "models": [MODEL]
    })
}

async fn post_beat(c: &reqwest::Client, queen: &Daemon, token: &str, body: &Value) -> (u16, Value) {
    let r = c
        .post(queen.url("/v1/hives/heartbeat"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn admin(c: &reqwest::Client, queen: &Daemon, method: &str, path: &str) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let r = c
        .request(m, queen.url(path))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn chat(c: &reqwest::Client, queen: &Daemon) -> reqwest::Response {
    c.post(queen.url("/v1/chat/completions"))
        .bearer_auth(CLIENT)
        .json(
            &json!({"model": "smollm2", "max_tokens": 2, "temperature": 0,
                      "messages": [{"role": "user", "content": "a secret prompt"}]}),
        )
        .send()
        .await
        .unwrap()
}

fn queen_options(tail: &str, audit: &std::path::Path) -> QueenOptions {
    let mut opts = QueenOptions::cluster(("alice", CLIENT), true, JOIN, HIVE);
    opts.config_tail.push_str(tail);
    opts.env
        .push(("RBEE_QUEEN_AUDIT_LOG".into(), audit.display().to_string()));
    opts
}

#[tokio::test]
async fn the_join_token_can_neither_take_over_a_hive_nor_route_prompts_to_a_held_one() {
    let logs = rbee_test_harness::temp_dir("identity-audit");
    let audit = logs.join("audit.jsonl");
    let queen = Daemon::queen(
        queen_options("\n[join]\nrequire_approval = true\n", &audit),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let c = reqwest::Client::new();
    let hive = Daemon::hive(HiveOptions::joined(&queen.base_url, "hive-a", HIVE, JOIN))
        .await
        .unwrap();
    // The real hive joins, held for approval: not routed until an admin says so.
    let what = "hive-a to join and wait for approval";
    let rec = eventually(Duration::from_secs(20), what, || async {
        let (s, v) = admin(&c, &queen, "GET", "/v1/admin/hives/hive-a").await;
        (s == 200 && v["bound"] == true).then_some(v)
    })
    .await
    .unwrap();
    assert_eq!(rec["approved"], false, "{rec}");
    let health: Value = c
        .get(queen.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["hives_up"], 0, "{health}");
    let (s, v) = admin(&c, &queen, "POST", "/v1/admin/hives/hive-a/approve").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["approved"], true);
    queen.wait_hives_up(&c, 1).await.unwrap();

    let (evil_url, evil_calls) = fake_hive().await;
    // 1. Take over hive-a's id with the join token: refused, and hive-a keeps its URL.
    let (s, v) = post_beat(&c, &queen, JOIN, &beat("hive-a", &evil_url)).await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"]["code"], "HIVE_ID_TAKEN", "{v}");
    // 2. Made-up credentials: refused.
    let fake = "rbh_0000000000000000000000000000000000000000000000000000000000000000";
    let (s, v) = post_beat(&c, &queen, fake, &beat("hive-a", &evil_url)).await;
    assert_eq!(s, 401, "{v}");
    // 3. A fake hive of its own: it joins (the join token is for that), but it is held.
    let (s, grant) = post_beat(&c, &queen, JOIN, &beat("0-evil", &evil_url)).await;
    assert_eq!(s, 200, "{grant}");
    assert_eq!(grant["approved"], false);
    let credential = grant["credential"].as_str().unwrap().to_owned();
    assert!(credential.starts_with("rbh_"));
    // Its own credential does not open hive-a either.
    let (s, _) = post_beat(&c, &queen, &credential, &beat("hive-a", &evil_url)).await;
    assert_eq!(s, 401);
    for _ in 0..3 {
        let (s, v) = post_beat(&c, &queen, &credential, &beat("0-evil", &evil_url)).await;
        assert_eq!((s, &v["approved"]), (200, &json!(false)), "{v}");
        let resp = chat(&c, &queen).await;
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
    assert!(
        evil_calls.lock().unwrap().is_empty(),
        "the held fake hive was called: {:?}",
        evil_calls.lock().unwrap()
    );
    let (_, hive_a) = admin(&c, &queen, "GET", "/v1/admin/hives/hive-a").await;
    assert_eq!(hive_a["url"], hive.base_url.to_lowercase(), "{hive_a}");
    // 4. Removing it revokes the credential: later beats are refused and nothing comes back.
    let (s, _) = admin(&c, &queen, "DELETE", "/v1/admin/hives/0-evil").await;
    assert_eq!(s, 200);
    let (s, _) = post_beat(&c, &queen, &credential, &beat("0-evil", &evil_url)).await;
    assert_eq!(s, 401);
    let (s, _) = admin(&c, &queen, "GET", "/v1/admin/hives/0-evil").await;
    assert_eq!(s, 404);
    // Every refusal is on the record.
    let failures = logs.join("audit.auth-failures.jsonl");
    let text = eventually(Duration::from_secs(10), "the audit records", || async {
        // Unauthenticated failures are audited in their own chain beside the main log.
        let text = std::fs::read_to_string(&audit).unwrap_or_default()
            + &std::fs::read_to_string(&failures).unwrap_or_default();
        [
            "hive.takeover_refused",
            "\"hive_credential\"",
            "admin.hive_approve",
            "admin.hive_remove",
        ]
        .iter()
        .all(|e| text.contains(e))
        .then_some(text)
    })
    .await
    .unwrap();
    assert!(
        !text.contains(&credential),
        "a credential reached the audit log"
    );
    // The real hive still beats (with its own credential) and serves.
    let resp = chat(&c, &queen).await;
    assert_eq!(resp.status(), 200);
    drop(hive);
}

#[tokio::test]
async fn a_joined_hive_is_called_with_its_own_token_and_moves_only_when_approved() {
    let logs = rbee_test_harness::temp_dir("identity-token");
    let queen = Daemon::queen(
        queen_options("\n[join]\nmax_hives = 2\n", &logs.join("audit.jsonl")),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let c = reqwest::Client::new();
    let (url, calls) = fake_hive().await;
    let (s, grant) = post_beat(&c, &queen, JOIN, &beat("lab-1", &url)).await;
    assert_eq!(s, 200, "{grant}");
    assert_eq!(grant["approved"], true);
    let credential = grant["credential"].as_str().unwrap().to_owned();
    let queen_token = grant["queen_token"].as_str().unwrap().to_owned();
    assert!(queen_token.starts_with("rbq_"));
    // Routed once it beats with its credential.
    let (s, v) = post_beat(&c, &queen, &credential, &beat("lab-1", &url)).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v.get("credential").is_none(),
        "secrets are issued once: {v}"
    );
    queen.wait_hives_up(&c, 1).await.unwrap();
    let _ = chat(&c, &queen).await;
    let seen = calls.lock().unwrap().clone();
    let inference: Vec<_> = seen
        .iter()
        .filter(|(m, p, _)| m == "POST" && p == "/v1/workers/w-1/inference")
        .collect();
    assert!(
        !inference.is_empty(),
        "the queen never called the hive: {seen:?}"
    );
    for (_, _, auth) in &seen {
        assert_eq!(
            auth.as_deref(),
            Some(format!("Bearer {queen_token}").as_str())
        );
        assert!(
            !auth.as_deref().unwrap_or("").contains(HIVE),
            "the shared hive token was sent"
        );
    }
    // A new URL is held: the queen keeps calling the old one until an admin approves.
    let (url2, calls2) = fake_hive().await;
    let (s, v) = post_beat(&c, &queen, &credential, &beat("lab-1", &url2)).await;
    assert_eq!(s, 200);
    assert_eq!(v["pending_url"], url2, "{v}");
    calls.lock().unwrap().clear();
    let (s, _) = post_beat(&c, &queen, &credential, &beat("lab-1", &url2)).await;
    assert_eq!(s, 200);
    let _ = chat(&c, &queen).await;
    assert!(calls2.lock().unwrap().is_empty(), "a held URL was used");
    assert!(!calls.lock().unwrap().is_empty());
    let (s, rec) = admin(&c, &queen, "POST", "/v1/admin/hives/lab-1/approve").await;
    assert_eq!(s, 200, "{rec}");
    assert_eq!(rec["url"], url2);
    // Its next beat (a real hive beats every few seconds) lists the worker again.
    let (s, v) = post_beat(&c, &queen, &credential, &beat("lab-1", &url2)).await;
    assert_eq!(s, 200);
    assert!(v.get("pending_url").is_none(), "{v}");
    let resp = chat(&c, &queen).await;
    let answer = format!("{} {}", resp.status(), resp.text().await.unwrap());
    assert!(
        !calls2.lock().unwrap().is_empty(),
        "the approved URL is used: {answer} {:?}",
        calls.lock().unwrap()
    );
    // The number of hives is capped.
    let (s, _) = post_beat(&c, &queen, JOIN, &beat("lab-2", &url)).await;
    assert_eq!(s, 200);
    let (s, v) = post_beat(&c, &queen, JOIN, &beat("lab-3", &url)).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "HIVE_LIMIT");
    // Every field of a beat is checked: worker ids go into URL paths.
    let mut bad = beat("lab-2", &url);
    bad["workers"][0]["id"] = json!("../../v1/admin");
    let token = "rbh_not-checked-before-the-fields";
    let (s, v) = post_beat(&c, &queen, token, &bad).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "INVALID_PARAMETER");
}
