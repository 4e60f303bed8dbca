//! The whole chain on this machine: client → queen → hive → worker, with the real model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use rbee_test_harness::{
    Daemon, HiveOptions, QueenOptions, SseData, SseReader, end_event, eventually, joined_text,
    reference,
};
use serde_json::{Value, json};

const CLIENT: &str = "client-token-0123456789abcdef";
const JOIN: &str = "join-token-0123456789abcdef";
const HIVE: &str = "hive-token-0123456789abcdef";
/// How long a reload or a drain may take to show.
const TEN_S: Duration = Duration::from_secs(10);

struct Stack {
    queen: Daemon,
    hive: Daemon,
}

async fn stack() -> Stack {
    let logs = rbee_test_harness::temp_dir("queen-logs");
    let queen = Daemon::queen(
        QueenOptions {
            env: vec![
                (
                    "RBEE_QUEEN_USAGE_LOG".into(),
                    logs.join("usage.jsonl").display().to_string(),
                ),
                (
                    "RBEE_QUEEN_AUDIT_LOG".into(),
                    logs.join("audit.jsonl").display().to_string(),
                ),
            ],
            ..QueenOptions::cluster(("alice", CLIENT), true, JOIN, HIVE)
        },
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let hive = hive_for(&queen.base_url, "hive-a", &[]).await;
    queen
        .wait_hives_up(&reqwest::Client::new(), 1)
        .await
        .unwrap();
    Stack { queen, hive }
}

#[tokio::test]
async fn the_openai_sdk_works_through_queen_hive_and_worker() {
    let s = stack().await;
    let case = &reference().greedy_chat[0];
    let case_json = json!({"messages": case.messages, "max_tokens": case.max_tokens});
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .env("RBEE_URL", &s.queen.base_url)
        .env("RBEE_TOKEN", CLIENT)
        .env("REF_CASE", case_json.to_string())
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai client failed (pip install openai; `cargo xtask test` does):\n{}\n{stdout}\nqueen:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.queen.stderr()
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    println!(
        "cold start {:.3} s, warm {:.3} s",
        v["cold_s"].as_f64().unwrap(),
        v["warm_s"].as_f64().unwrap()
    );
    // Greedy answers equal llama.cpp's, streaming or not.
    assert_eq!(v["chat"]["text"], case.text.as_str());
    assert_eq!(v["chat"]["object"], "chat.completion");
    assert_eq!(v["chat"]["has_refusal"], true, "{}", v["chat"]);
    assert_eq!(v["model"], "smollm2");
    assert_eq!(v["unknown_model_card"], 404);
    assert_eq!(v["chat"]["finish_reason"], case.finish_reason.as_str());
    assert_eq!(
        v["chat"]["usage"]["completion_tokens"],
        case.usage.completion_tokens
    );
    assert_eq!(
        v["chat"]["usage"]["prompt_tokens"],
        case.usage.prompt_tokens
    );
    assert_eq!(v["stream"]["text"], case.text.as_str());
    assert_eq!(v["stream"]["finish_reason"], case.finish_reason.as_str());
    assert_eq!(
        v["stream"]["usage"]["completion_tokens"],
        case.usage.completion_tokens
    );
    assert!(
        v["completion"]["text"].as_str().unwrap().contains('5'),
        "{}",
        v["completion"]
    );
    assert_eq!(v["unknown_model"]["status"], 404);
    assert_eq!(v["unknown_model"]["code"], "MODEL_NOT_SERVED");
    assert_eq!(v["bad_temperature"]["status"], 400);
    assert_eq!(v["bad_temperature"]["code"], "INVALID_PARAMETER");
    assert!(
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "smollm2")
    );
    assert_eq!(v["wrong_token"], 401);
    // Cold start spawned the worker, the warm request reused it.
    let warm = v["warm_s"].as_f64().unwrap();
    let cold = v["cold_s"].as_f64().unwrap();
    assert!(warm < cold, "warm {warm} s vs cold {cold} s");
    let metrics = reqwest::get(s.queen.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("rbee_queen_scheduling_decisions_total{decision=\"spawn\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("rbee_queen_scheduling_decisions_total{decision=\"reuse\"}"));
    rbee_test_harness::promtool_check_metrics(&metrics);
    // Where the time went, per hop.
    for stage in [
        "validation",
        "schedule",
        "spawn",
        "load",
        "worker_queue",
        "prefill",
        "decode",
    ] {
        assert!(
            metrics.contains(&format!(
                "rbee_queen_stage_seconds_count{{stage=\"{stage}\"}}"
            )),
            "stage {stage} missing"
        );
    }
    // One usage record per served request, naming client, model, hive and worker.
    let usage_path = std::path::Path::new(&s.queen.env_value("RBEE_QUEEN_USAGE_LOG")).to_path_buf();
    let usage_lines = || {
        let text = std::fs::read_to_string(&usage_path).unwrap_or_default();
        text.lines().map(str::to_owned).collect::<Vec<String>>()
    };
    let records: Vec<Value> = eventually(Duration::from_secs(5), "3 usage records", || async {
        let r: Vec<Value> = usage_lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if r.len() >= 3 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await
    .unwrap();
    let ok: Vec<&Value> = records.iter().filter(|r| r["outcome"] == "ok").collect();
    assert!(ok.len() >= 3, "{records:?}");
    assert_eq!(ok[0]["client"], "alice");
    assert_eq!(ok[0]["user"], "end-user-7");
    assert_eq!(ok[1]["user"], Value::Null);
    assert_eq!(ok[0]["hive"], "hive-a");
    assert_eq!(ok[0]["spawned_worker"], true);
    assert_eq!(ok[1]["spawned_worker"], false);
    assert_eq!(ok[0]["completion_tokens"], case.usage.completion_tokens);
    assert!(
        !std::fs::read_to_string(&usage_path)
            .unwrap()
            .contains(CLIENT)
    );
    // The file's hash, once the hive has hashed it, names the exact model in later records.
    let what = "a new usage record with the model's hash";
    eventually(Duration::from_secs(20), what, || async {
        let before = usage_lines().len();
        let c = reqwest::Client::new();
        assert_eq!(chat(&c, &s.queen, CLIENT, 1).await.status(), 200);
        // The usage thread writes the request's record after the response ends.
        let lines = eventually(Duration::from_secs(5), "its usage record", || async {
            let lines = usage_lines();
            (lines.len() > before).then_some(lines)
        })
        .await
        .unwrap();
        let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
        if last["model_sha256"] == rbee_test_harness::MODEL_SHA256 {
            Ok(())
        } else {
            Err(format!("no hash in {last}"))
        }
    })
    .await
    .unwrap();
    // logrotate moves the file away and reloads: the next records go to a new file.
    let rotated = usage_path.with_extension("jsonl.1");
    std::fs::rename(&usage_path, &rotated).unwrap();
    s.queen.signal(libc::SIGHUP);
    let what = "a record in a new usage file after SIGHUP";
    eventually(Duration::from_secs(10), what, || async {
        if !usage_lines().is_empty() {
            return Some(());
        }
        let c = reqwest::Client::new();
        assert_eq!(chat(&c, &s.queen, CLIENT, 1).await.status(), 200);
        None
    })
    .await
    .unwrap();
    assert!(std::fs::read_to_string(&rotated).unwrap().lines().count() >= 3);
    drop(s.hive);
}

#[tokio::test]
async fn native_stream_cancel_and_auth_through_the_queen() {
    let s = stack().await;
    let c = reqwest::Client::new();
    // Every protected route refuses without a token.
    for (method, path, public) in rbee_queen_core::api::router_routes() {
        let concrete = path
            .replace("{id}", "h1")
            .replace("{hive}", "h1")
            .replace("{request_id}", "r1");
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = c.request(m, s.queen.url(&concrete)).send().await.unwrap();
        if public {
            assert_ne!(resp.status(), 401, "{method} {path}");
        } else {
            assert_eq!(resp.status(), 401, "{method} {path}");
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "UNAUTHORIZED");
        }
    }
    // A heartbeat needs the join token, not a client token.
    let hb = c
        .post(s.queen.url("/v1/hives/heartbeat"))
        .bearer_auth(CLIENT)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(hb.status(), 401);

    let long = json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 300, "temperature": 0});
    let resp = c
        .post(s.queen.url("/v1/inference"))
        .bearer_auth(CLIENT)
        .header("x-request-id", "queen-cancel-1")
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "queen-cancel-1");
    let mut reader = SseReader::new(resp);
    let first = reader.next().await.unwrap();
    assert!(matches!(first, Some(SseData::Event(ref v)) if v["type"] == "started"));
    reader.next().await.unwrap();
    let del = c
        .delete(s.queen.url("/v1/inference/queen-cancel-1"))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    assert!(del.status().is_success(), "{}", del.text().await.unwrap());
    let rest = reader.collect().await.unwrap();
    assert_eq!(
        end_event(&rest).unwrap_or_else(|| panic!("{rest:?}"))["stop_reason"],
        "cancelled"
    );

    // A deadline from X-Request-Timeout reaches the worker.
    let resp = c
        .post(s.queen.url("/v1/inference"))
        .bearer_auth(CLIENT)
        .header("x-request-timeout", "0.5")
        .json(&long)
        .send()
        .await
        .unwrap();
    let events = SseReader::new(resp).collect().await.unwrap();
    assert_eq!(end_event(&events).unwrap()["stop_reason"], "deadline");
    assert!(!joined_text(&events).is_empty());

    // A client that leaves: the worker is free again at once.
    let resp = c
        .post(s.queen.url("/v1/inference"))
        .bearer_auth(CLIENT)
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(resp);
    reader.next().await.unwrap();
    reader.next().await.unwrap();
    drop(reader);
    let t0 = std::time::Instant::now();
    let resp = c
        .post(s.queen.url("/v1/inference"))
        .bearer_auth(CLIENT)
        .json(&json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    let events = SseReader::new(resp).collect().await.unwrap();
    assert!(end_event(&events).is_some(), "{events:?}");
    println!(
        "next request served {:?} after the client left",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    drop(s.hive);
}

async fn chat(
    c: &reqwest::Client,
    queen: &Daemon,
    token: &str,
    max_tokens: u32,
) -> reqwest::Response {
    c.post(queen.url("/v1/chat/completions"))
        .bearer_auth(token)
        .json(&json!({"model": "smollm2", "max_tokens": max_tokens, "temperature": 0,
                      "messages": [{"role": "user", "content": "Count from one to fifty in words."}]}))
        .send()
        .await
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn queen_options(registry: Option<std::path::PathBuf>, tail: &str) -> QueenOptions {
    let mut opts = QueenOptions::cluster(("alice", CLIENT), true, JOIN, HIVE);
    opts.config_tail.push_str(tail);
    opts.registry_path = registry;
    opts
}

async fn hive_for(queen_url: &str, id: &str, extra: &[(&str, &str)]) -> Daemon {
    let mut opts = HiveOptions::joined(queen_url, id, HIVE, JOIN);
    for (k, v) in extra {
        opts = opts.env(k, v);
    }
    Daemon::hive(opts).await.unwrap()
}

#[tokio::test]
async fn a_dead_hive_leaves_routing_and_requests_go_to_the_other() {
    let queen = Daemon::queen(queen_options(None, ""), "127.0.0.1:0")
        .await
        .unwrap();
    let a = hive_for(&queen.base_url, "hive-a", &[]).await;
    let b = hive_for(&queen.base_url, "hive-b", &[]).await;
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 2).await.unwrap();
    let first = chat(&c, &queen, CLIENT, 4).await;
    assert_eq!(first.status(), 200);
    // The queen's worker list is what the hives' heartbeats last said: wait for the beat
    // that reports the worker the first request started.
    let with_worker = eventually(Duration::from_secs(10), "a worker in the list", || async {
        let workers = admin_get(&c, &queen, "/v1/admin/workers").await;
        let hive = workers["workers"][0]["hive"].as_str().map(str::to_owned);
        hive.ok_or(workers)
    })
    .await
    .unwrap();
    let (mut dead, alive, dead_id) = if with_worker == "hive-a" {
        (a, b, "hive-a")
    } else {
        (b, a, "hive-b")
    };
    // Kill the hive that has the worker (its worker dies with it), without a goodbye.
    dead.signal(libc::SIGKILL);
    dead.wait_exit(Duration::from_secs(5)).await.unwrap();
    let t0 = std::time::Instant::now();
    let resp = chat(&c, &queen, CLIENT, 4).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    println!("served after losing a hive in {:?}", t0.elapsed());
    assert_eq!(status, 200, "{body}");
    assert!(
        !body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    // After three missed heartbeats the dead hive is down.
    let what = format!("{dead_id} to be down");
    eventually(Duration::from_secs(15), &what, || async {
        let h = admin_get(&c, &queen, &format!("/v1/admin/hives/{dead_id}")).await;
        (h["state"] == "down").then_some(()).ok_or(h)
    })
    .await
    .unwrap();
    drop(alive);
}

#[tokio::test]
async fn a_restarted_queen_keeps_its_registry_and_routes_again() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let registry = rbee_test_harness::temp_dir("queen-registry").join("registry.sqlite");
    let mut queen = Daemon::queen(queen_options(Some(registry.clone()), ""), &listen)
        .await
        .unwrap();
    let hive = hive_for(&queen.base_url, "hive-r", &[]).await;
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    assert_eq!(chat(&c, &queen, CLIENT, 2).await.status(), 200);
    queen.signal(libc::SIGTERM);
    assert!(
        queen
            .wait_exit(Duration::from_secs(15))
            .await
            .unwrap()
            .success()
    );
    let queen = Daemon::queen(queen_options(Some(registry), ""), &listen)
        .await
        .unwrap();
    // Known at once from the registry (down until it beats), then up again.
    let h: Value = c
        .get(queen.url("/v1/admin/hives/hive-r"))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["id"], "hive-r", "{h}");
    queen.wait_hives_up(&c, 1).await.unwrap();
    let resp = chat(&c, &queen, CLIENT, 2).await;
    assert_eq!(resp.status(), 200);
    drop(hive);
}

#[tokio::test]
async fn overflow_is_refused_with_retry_after_and_nothing_is_lost() {
    let queen = Daemon::queen(
        queen_options(None, "queue_length = 1\nqueue_wait_seconds = 60\n"),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let hive = hive_for(
        &queen.base_url,
        "hive-q",
        &[("WORKERS__MAX_WORKERS", "1"), ("WORKERS__PARALLEL", "1")],
    )
    .await;
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    // Warm the one worker up.
    assert_eq!(chat(&c, &queen, CLIENT, 1).await.status(), 200);
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let (c, url) = (c.clone(), queen.url("/v1/completions"));
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(url)
                .bearer_auth(CLIENT)
                .json(
                    &json!({"model": "smollm2", "max_tokens": 40, "temperature": 0,
                              "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"}),
                )
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: Value = r.json().await.unwrap();
            (status, retry, body)
        }));
    }
    let (mut served, mut refused) = (0, 0);
    for t in tasks {
        let (status, retry, body) = t.await.unwrap();
        match status {
            200 => {
                assert_eq!(body["usage"]["completion_tokens"], 40, "{body}");
                served += 1;
            }
            429 | 503 => {
                let secs: u32 = retry.expect("Retry-After").parse().unwrap();
                assert!(secs >= 1);
                assert!(body["error"]["code"].is_string());
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    println!("served {served}, refused {refused}");
    assert_eq!(served + refused, 5);
    assert!(served >= 2, "the running one and the queued one are served");
    assert!(refused >= 1, "the queue holds one");
    drop(hive);
}

#[tokio::test]
async fn sighup_rotates_client_tokens_without_dropping_a_request() {
    let queen = Daemon::queen(queen_options(None, ""), "127.0.0.1:0")
        .await
        .unwrap();
    let hive = hive_for(&queen.base_url, "hive-t", &[]).await;
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    assert_eq!(chat(&c, &queen, CLIENT, 1).await.status(), 200);
    // A long stream in flight while the token changes.
    let resp = c
        .post(queen.url("/v1/inference"))
        .bearer_auth(CLIENT)
        .json(&json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 150, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(resp);
    reader.next().await.unwrap();
    let new = "rotated-client-token-0123456789";
    std::fs::write(queen.dir.join("secrets/client-alice"), new).unwrap();
    queen.signal(libc::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "the new token to be accepted",
        || async {
            let r = c.get(queen.url("/v1/models")).bearer_auth(new).send();
            let status = r.await.unwrap().status();
            (status == 200).then_some(()).ok_or(status)
        },
    )
    .await
    .unwrap();
    let old = c
        .get(queen.url("/v1/models"))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 401);
    let rest = reader.collect().await.unwrap();
    let end = end_event(&rest).expect("the in-flight stream finished");
    assert_eq!(end["completion_tokens"], 150);
    drop(hive);
}

#[tokio::test]
async fn admins_spawn_list_and_stop_workers_through_the_queen() {
    let s = stack().await;
    let c = reqwest::Client::new();
    let resp = c
        .post(s.queen.url("/v1/admin/workers"))
        .bearer_auth(CLIENT)
        .json(&json!({"model": "smollm2", "hive": "hive-a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let spawned: Value = resp.json().await.unwrap();
    let id = spawned["id"].as_str().unwrap().to_owned();
    let what = format!("worker {id} listed as loaded");
    let models = eventually(Duration::from_secs(60), &what, || async {
        let models = admin_get(&c, &s.queen, "/v1/admin/models").await;
        let loaded = &models["models"]["file:SmolLM2-135M-Instruct.Q4_1.gguf"]["loaded"];
        let listed = loaded
            .as_array()
            .is_some_and(|a| a.iter().any(|w| w["worker"] == id.as_str()));
        listed.then_some(models.clone()).ok_or(models)
    })
    .await
    .unwrap();
    assert!(
        models["models"]["file:SmolLM2-135M-Instruct.Q4_1.gguf"]["on_disk"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == "hive-a")
    );
    let stopped = c
        .delete(s.queen.url(&format!("/v1/admin/workers/hive-a/{id}")))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    assert_eq!(stopped.status(), 200);
    let v: Value = stopped.json().await.unwrap();
    assert_eq!(v["state"], "stopped");
    let unknown = c
        .delete(s.queen.url("/v1/admin/workers/no-such-hive/w-1"))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    // The hive's refusal keeps its status and code, in the queen's (OpenAI) error shape.
    let refused = c
        .post(s.queen.url("/v1/admin/workers"))
        .bearer_auth(CLIENT)
        .json(&json!({"model": "file:no-such-model.gguf", "hive": "hive-a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "MODEL_NOT_FOUND", "{body}");
    assert_eq!(body["error"]["type"], "not_found_error", "{body}");
    assert!(body["error"]["request_id"].is_string(), "{body}");
    drop(s.hive);
}

#[tokio::test]
async fn a_client_over_its_concurrency_limit_gets_429() {
    let dir = rbee_test_harness::temp_dir("bob");
    let bob_file = rbee_test_harness::write_token_file(&dir, "bob-token-0123456789abcdef");
    let queen = Daemon::queen(
        queen_options(
            None,
            &format!(
                "\n[[client_tokens]]\nname = \"bob\"\nfile = {:?}\nmax_concurrent = 1\n",
                bob_file.display().to_string()
            ),
        ),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let hive = hive_for(&queen.base_url, "hive-l", &[]).await;
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    let bob = "bob-token-0123456789abcdef";
    let resp = c
        .post(queen.url("/v1/inference"))
        .bearer_auth(bob)
        .json(&json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 100, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut reader = SseReader::new(resp);
    reader.next().await.unwrap();
    // bob's token is not an admin token: the admin routes answer 403, alice's 200.
    let forbidden = c
        .get(queen.url("/v1/admin/hives"))
        .bearer_auth(bob)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let body: Value = forbidden.json().await.unwrap();
    assert_eq!(body["error"]["code"], "FORBIDDEN", "{body}");
    let allowed = c
        .get(queen.url("/v1/admin/hives"))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    let second = chat(&c, &queen, bob, 2).await;
    assert_eq!(second.status(), 429);
    assert!(second.headers().get("retry-after").is_some());
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["code"], "CLIENT_LIMIT");
    // Other clients are not limited by bob's limit.
    assert_eq!(chat(&c, &queen, CLIENT, 2).await.status(), 200);
    let rest = reader.collect().await.unwrap();
    assert!(end_event(&rest).is_some());
    assert_eq!(chat(&c, &queen, bob, 2).await.status(), 200);
    drop(hive);
}

#[test]
fn the_example_config_checks_and_bad_ones_exit_64() {
    let bin = rbee_test_harness::workspace_binary("queen-rbee");
    let dir = rbee_test_harness::temp_dir("queen-config");
    let token = rbee_test_harness::write_token_file(&dir, CLIENT);
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/examples/queen.toml"
    ))
    .unwrap()
    .replace("/etc/rbee/tokens/default", &token.display().to_string());
    let file = dir.join("queen.toml");
    std::fs::write(&file, example).unwrap();
    let out = std::process::Command::new(&bin)
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[scheduling]\nqueue_lenght = 3\n").unwrap();
    let out = std::process::Command::new(&bin)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("scheduling.queue_lenght"));
    // Names that mean something else are reserved.
    let reserved = dir.join("reserved.toml");
    std::fs::write(
        &reserved,
        format!(
            "[[client_tokens]]\nname = \"dev\"\nfile = {:?}\n",
            token.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(&bin)
        .arg("check-config")
        .arg(&reserved)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reserved"));
    // check-config makes the start-up checks too: beyond loopback a join token is needed.
    let out = std::process::Command::new(&bin)
        .args(["--listen", "0.0.0.0:7833", "check-config"])
        .arg(&file)
        .env_remove("RBEE_QUEEN_JOIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("without a join token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not loopback and no client token: refused before binding.
    let out = std::process::Command::new(&bin)
        .args(["--listen", "0.0.0.0:0"])
        .env_remove("RBEE_QUEEN_CLIENT_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without client tokens"));
}

#[tokio::test]
async fn sigterm_lets_requests_finish_and_leaves_hives_running() {
    let mut queen = Daemon::queen(queen_options(None, ""), "127.0.0.1:0")
        .await
        .unwrap();
    let hive = hive_for(&queen.base_url, "hive-s", &[]).await;
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    let resp = c
        .post(queen.url("/v1/inference"))
        .bearer_auth(CLIENT)
        .json(&json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 300, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(resp);
    reader.next().await.unwrap();
    queen.signal(libc::SIGTERM);
    // While the running request finishes, /health says so and new work is refused.
    eventually(TEN_S, "/health reports the drain", || async {
        (c.get(queen.url("/health")).send().await.unwrap().status() == 503).then_some(())
    })
    .await
    .unwrap();
    let health: Value = c
        .get(queen.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "draining");
    let refused = chat(&c, &queen, CLIENT, 2).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().get("retry-after").is_some());
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "SHUTTING_DOWN", "{body}");
    // Cancelling still works while draining (no such request here: 404, not 503).
    let cancel = c
        .delete(queen.url("/v1/inference/no-such-request"))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 404);
    let rest = reader.collect().await.unwrap();
    assert_eq!(
        end_event(&rest).expect("finished")["completion_tokens"],
        300
    );
    let status = queen
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("queen exits");
    assert!(status.success(), "{status}");
    // The hive (and its worker) keep running without the queen.
    let workers: Value = reqwest::Client::new()
        .get(hive.url("/v1/workers"))
        .bearer_auth(HIVE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(workers["workers"][0]["state"], "ready", "{workers}");
}

#[tokio::test]
async fn a_hive_with_its_own_token_is_reached_with_it() {
    let port = free_port();
    let queen_url = format!("http://127.0.0.1:{port}");
    let own = "hive-b-own-token-0123456789";
    let hive = Daemon::hive(HiveOptions::joined(&queen_url, "hive-own", own, JOIN))
        .await
        .unwrap();
    let dir = rbee_test_harness::temp_dir("hive-own-token");
    let token_file = rbee_test_harness::write_token_file(&dir, own);
    let queen = Daemon::queen(
        queen_options(
            None,
            &format!(
                "\n[[hives]]\nid = \"hive-own\"\nurl = {:?}\ntoken_file = {:?}\n",
                hive.base_url,
                token_file.display().to_string()
            ),
        ),
        &format!("127.0.0.1:{port}"),
    )
    .await
    .unwrap();
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    // The shared hive token (HIVE) would be refused by this hive; its own one works.
    let resp = chat(&c, &queen, CLIENT, 2).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    // A wrong token for the hive is the operator's problem: 502 naming it, not a 401.
    std::fs::write(&token_file, "not-the-hive-token-0123456789").unwrap();
    queen.signal(libc::SIGHUP);
    let resp = eventually(
        Duration::from_secs(15),
        "the reload to take effect",
        || async {
            let resp = chat(&c, &queen, CLIENT, 2).await;
            (resp.status() != 200).then_some(resp)
        },
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "INTERNAL", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("refused the queen's credentials"),
        "{body}"
    );
}

#[tokio::test]
async fn a_worker_lost_before_the_first_token_is_retried_elsewhere() {
    let s = stack().await;
    let c = reqwest::Client::new();
    assert_eq!(chat(&c, &s.queen, CLIENT, 1).await.status(), 200);
    let workers: Value = c
        .get(s.hive.url("/v1/workers"))
        .bearer_auth(HIVE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pid = workers["workers"][0]["pid"].as_i64().unwrap() as i32;
    // A long prompt keeps the worker in prefill for a while; kill it there.
    let prompt: String = (0..400).map(|i| format!("w{} ", i % 97)).collect();
    let req = c
        .post(s.queen.url("/v1/completions"))
        .bearer_auth(CLIENT)
        .json(&json!({"model": "smollm2", "prompt": prompt, "max_tokens": 3, "temperature": 0}))
        .send();
    // Kill it as soon as the hive has the request in flight (the worker is in prefill).
    let hive_url = s.hive.url(&format!(
        "/v1/workers/{}",
        workers["workers"][0]["id"].as_str().unwrap()
    ));
    let killer = async {
        eventually(Duration::from_secs(10), "the worker to be busy", || async {
            let r = c.get(&hive_url).bearer_auth(HIVE).send();
            let v: Value = r.await.unwrap().json().await.unwrap();
            (v["slots_busy"].as_u64() >= Some(1)).then_some(()).ok_or(v)
        })
        .await
        .unwrap();
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    };
    let (resp, ()) = tokio::join!(req, killer);
    let resp = resp.unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");
    let metrics = reqwest::get(s.queen.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("rbee_queen_upstream_errors_total{stage=\"before_first_token\"} 1")
            || metrics.contains("rbee_queen_upstream_errors_total{stage=\"hive_unreachable\"}")
            || metrics.contains("rbee_queen_retries_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_request_waiting_for_a_worker_can_be_cancelled() {
    let queen = Daemon::queen(queen_options(None, ""), "127.0.0.1:0")
        .await
        .unwrap();
    let hive = hive_for(
        &queen.base_url,
        "hive-c",
        &[("WORKERS__MAX_WORKERS", "1"), ("WORKERS__PARALLEL", "1")],
    )
    .await;
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    assert_eq!(chat(&c, &queen, CLIENT, 1).await.status(), 200);
    let long = json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 200, "temperature": 0});
    let resp = c
        .post(queen.url("/v1/inference"))
        .bearer_auth(CLIENT)
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut busy = SseReader::new(resp);
    busy.next().await.unwrap();
    let waiting = {
        let (c, url) = (c.clone(), queen.url("/v1/completions"));
        tokio::spawn(async move {
            c.post(url)
                .bearer_auth(CLIENT)
                .header("x-request-id", "queued-1")
                .json(&json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 2}))
                .send()
                .await
                .unwrap()
        })
    };
    // Cancel it once it waits in the queue.
    queen.wait_queue_depth(&c, 1).await.unwrap();
    let del = c
        .delete(queen.url("/v1/inference/queued-1"))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    let body: Value = del.json().await.unwrap();
    assert_eq!(body["queued"], true);
    let resp = waiting.await.unwrap();
    assert_eq!(resp.status().as_u16(), 499);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "CANCELLED");
    // The running request was not disturbed.
    let rest = busy.collect().await.unwrap();
    assert_eq!(end_event(&rest).unwrap()["completion_tokens"], 200);
    drop(hive);
}

#[tokio::test]
async fn waiting_requests_are_served_in_arrival_order() {
    let queen = Daemon::queen(queen_options(None, ""), "127.0.0.1:0")
        .await
        .unwrap();
    // One worker at most, so every request after the first waits for it.
    let hive = hive_for(
        &queen.base_url,
        "hive-f",
        &[("WORKERS__MAX_WORKERS", "1"), ("WORKERS__PARALLEL", "1")],
    )
    .await;
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    assert_eq!(chat(&c, &queen, CLIENT, 1).await.status(), 200);
    let resp = c
        .post(queen.url("/v1/inference"))
        .bearer_auth(CLIENT)
        .json(&json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 250, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let mut holder = SseReader::new(resp);
    holder.next().await.unwrap();
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (c2, order, url) = (c.clone(), order.clone(), queen.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            let r = c2
                .post(url)
                .bearer_auth(CLIENT)
                .json(
                    &json!({"model": "smollm2", "max_tokens": 3, "temperature": 0,
                              "messages": [{"role": "user", "content": "Say hi."}]}),
                )
                .send()
                .await
                .unwrap();
            let status = r.status();
            let _ = r.bytes().await;
            order.lock().unwrap().push(i);
            status
        }));
        // The next arrives only once this one waits in the queue, all while the worker is
        // still held.
        queen.wait_queue_depth(&c, i + 1).await.unwrap();
    }
    let rest = holder.collect().await.unwrap();
    assert!(end_event(&rest).is_some(), "{rest:?}");
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    drop(hive);
}

/// An admin GET through the queen, as JSON.
async fn admin_get(c: &reqwest::Client, queen: &Daemon, path: &str) -> Value {
    let r = c.get(queen.url(path)).bearer_auth(CLIENT).send();
    r.await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn sighup_applies_join_token_rotation_configured_hives_and_metrics_auth() {
    let queen = Daemon::queen(queen_options(None, ""), "127.0.0.1:0")
        .await
        .unwrap();
    let config = queen.dir.join("queen.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let old_join = "old-join-token-0123456789abcdef";
    let old_file = rbee_test_harness::write_token_file(&queen.dir.join("old-join"), old_join);
    // Rotation step 1: the old join token stays accepted next to the new one; a configured
    // hive appears; /metrics needs a client token.
    std::fs::write(
        &config,
        format!(
            "join_token_previous_files = [{:?}]\nmetrics_require_token = true\n{original}\n[[hives]]\nid = \"hive-static\"\nurl = \"http://127.0.0.1:9\"\n",
            old_file.display().to_string()
        ),
    )
    .unwrap();
    queen.signal(libc::SIGHUP);
    let c = reqwest::Client::new();
    eventually(TEN_S, "/metrics needs a token after the reload", || async {
        (c.get(queen.url("/metrics")).send().await.unwrap().status() == 401).then_some(())
    })
    .await
    .unwrap();
    let scraped = c
        .get(queen.url("/metrics"))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status(), 200);
    let h: Value = c
        .get(queen.url("/v1/admin/hives/hive-static"))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["state"], "down", "{h}");
    // A hive still holding the old join token joins.
    let hive = Daemon::hive(HiveOptions::joined(
        &queen.base_url,
        "hive-old-join",
        HIVE,
        old_join,
    ))
    .await
    .unwrap();
    queen.wait_hives_up(&c, 1).await.unwrap();
    // Step 2: the old token is retired and the configured hive dropped.
    std::fs::write(&config, &original).unwrap();
    queen.signal(libc::SIGHUP);
    eventually(TEN_S, "the configured hive is removed", || async {
        let r = c.get(queen.url("/v1/admin/hives/hive-static"));
        let status = r.bearer_auth(CLIENT).send().await.unwrap().status();
        (status == 404).then_some(()).ok_or(status)
    })
    .await
    .unwrap();
    assert_eq!(
        c.get(queen.url("/metrics")).send().await.unwrap().status(),
        200
    );
    // The joined hive beats with the credential it was issued, not the join token: retiring
    // the old join token leaves it in routing...
    tokio::time::sleep(Duration::from_secs(4)).await;
    let v: Value = c
        .get(queen.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["hives_up"], 1, "{v}");
    // ...while a new hive holding only the retired token cannot join.
    let late = Daemon::hive(HiveOptions::joined(
        &queen.base_url,
        "hive-late",
        HIVE,
        old_join,
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = c.get(queen.url("/v1/admin/hives/hive-late"));
    assert_eq!(r.bearer_auth(CLIENT).send().await.unwrap().status(), 404);
    drop(late);
    drop(hive);
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_validates() {
    let queen = Daemon::queen(queen_options(None, ""), "127.0.0.1:0")
        .await
        .unwrap();
    let resp = reqwest::get(queen.url("/openapi.json")).await.unwrap();
    assert_eq!(resp.status(), 200, "public, like /health");
    let doc: Value = resp.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for (method, path, public) in rbee_queen_core::api::router_routes() {
        let op = &doc["paths"][path][method.to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {path} is missing");
        assert_eq!(op["security"] == json!([]), public, "{method} {path}");
    }
    let file = queen.dir.join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("python3 with openapi-spec-validator (cargo xtask test installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_worker_that_cannot_start_is_reported_once_and_another_hive_is_used() {
    let queen = Daemon::queen(queen_options(None, ""), "127.0.0.1:0")
        .await
        .unwrap();
    // Its worker binary exits at once and the hive does not restart it.
    let broken = hive_for(
        &queen.base_url,
        "hive-broken",
        &[
            ("WORKERS__BINARY", "/bin/false"),
            ("RESTART__ENABLED", "false"),
        ],
    )
    .await;
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    let t0 = std::time::Instant::now();
    let resp = chat(&c, &queen, CLIENT, 2).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "NO_CAPACITY", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("hive-broken"), "{message}");
    println!("failed start reported after {:?}: {message}", t0.elapsed());
    let metrics = c
        .get(queen.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rbee_queen_requests_total{")
                && l.contains(r#"status="503""#)
                && l.contains(r#"code="NO_CAPACITY""#)),
        "{metrics}"
    );
    assert!(metrics.contains(r#"rbee_queen_queue_rejections_total{reason="spawn_failed"} 1"#));
    // One attempt, not a worker per retry.
    let workers: Value = broken
        .get(&c, "/v1/workers")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(workers["workers"].as_array().unwrap().len(), 1, "{workers}");
    // A hive that joins now is tried at once, without waiting out the failed one's cooldown.
    let good = hive_for(&queen.base_url, "hive-good", &[]).await;
    queen.wait_hives_up(&c, 2).await.unwrap();
    let resp = chat(&c, &queen, CLIENT, 2).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    drop((broken, good));
}

#[tokio::test]
async fn only_the_sender_or_an_admin_can_cancel_a_request() {
    let dir = rbee_test_harness::temp_dir("owners");
    let (bob, carol) = ("bob-token-0123456789abcdef", "carol-token-0123456789abcd");
    let bob_file = rbee_test_harness::write_token_file(&dir.join("bob"), bob);
    let carol_file = rbee_test_harness::write_token_file(&dir.join("carol"), carol);
    let queen = Daemon::queen(
        queen_options(
            None,
            &format!(
                "\n[[client_tokens]]\nname = \"bob\"\nfile = {:?}\n\n[[client_tokens]]\nname = \"carol\"\nfile = {:?}\n",
                bob_file.display().to_string(),
                carol_file.display().to_string()
            ),
        ),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let hive = hive_for(&queen.base_url, "hive-o", &[]).await;
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    let resp = c
        .post(queen.url("/v1/inference"))
        .bearer_auth(bob)
        .header("X-Request-Id", "bob-req-1")
        .json(&json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 150, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut reader = SseReader::new(resp);
    reader.next().await.unwrap();
    // Carol neither sees nor cancels Bob's request, nor borrows its id.
    let foreign = c
        .delete(queen.url("/v1/inference/bob-req-1"))
        .bearer_auth(carol)
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 404);
    let reused = c
        .post(queen.url("/v1/inference"))
        .bearer_auth(carol)
        .header("X-Request-Id", "bob-req-1")
        .json(&json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(reused.status(), 409);
    let own = c
        .delete(queen.url("/v1/inference/bob-req-1"))
        .bearer_auth(bob)
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200, "{}", own.text().await.unwrap());
    let rest = reader.collect().await.unwrap();
    let end = end_event(&rest).expect("the cancelled stream ends");
    assert_eq!(end["stop_reason"], "cancelled", "{end}");
    drop(hive);
}
