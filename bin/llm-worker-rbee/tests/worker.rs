//! The real `llm-worker-rbee` binary with the real model on an ephemeral loopback port, checked
//! the way a client (or the hive) sees it.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rbee_engine::{Engine, GenerationParams, LoadOptions, Prompt, SamplingParams, StopReason};
use rbee_test_harness::{
    Daemon, SseData, SseReader, WorkerOptions, end_event, eventually, joined_text, reference,
    test_model,
};
use serde_json::{Value, json};

const TOKEN: &str = "test-token-0123456789abcdef";
const WORKER: &str = env!("CARGO_BIN_EXE_llm-worker-rbee");
/// A raw prompt the model keeps continuing (counting) rather than ending: generations from it
/// outlast any step of a test.
const ENDLESS: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,";

fn opts() -> WorkerOptions {
    WorkerOptions::new(WORKER.into(), test_model())
}

async fn worker() -> Daemon {
    Daemon::worker(opts().token(TOKEN)).await.unwrap()
}

async fn worker_with(args: &[&str]) -> Daemon {
    let mut o = opts().token(TOKEN);
    o.extra_args = args.iter().map(|s| s.to_string()).collect();
    Daemon::worker(o).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn infer(w: &Daemon, body: Value) -> Vec<SseData> {
    let resp = w
        .post(&client(), "/v1/inference", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    SseReader::new(resp).collect().await.unwrap()
}

/// `started` → `token`… (indices increasing) → exactly one `end` → `[DONE]`, nothing after.
fn assert_event_order(events: &[SseData]) {
    assert!(events.len() >= 3, "{events:?}");
    let SseData::Event(first) = &events[0] else {
        panic!("first is not an event: {events:?}")
    };
    assert_eq!(first["type"], "started");
    assert_eq!(events.last(), Some(&SseData::Done));
    let middle = &events[1..events.len() - 1];
    let (last, tokens) = middle.split_last().unwrap();
    let SseData::Event(last) = last else {
        panic!("{events:?}")
    };
    assert!(last["type"] == "end" || last["type"] == "error", "{last}");
    let mut prev = -1i64;
    for t in tokens {
        let SseData::Event(t) = t else {
            panic!("{events:?}")
        };
        assert_eq!(t["type"], "token", "{t}");
        let idx = t["index"].as_i64().unwrap();
        assert!(idx > prev, "token indices must increase: {events:?}");
        prev = idx;
    }
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    let e = &body["error"];
    assert!(
        e["code"].is_string() && e["message"].is_string() && e["request_id"].is_string(),
        "not the one error shape: {body}"
    );
    (status, body["error"].clone())
}

#[tokio::test]
async fn greedy_chat_answers_equal_the_engines_over_http() {
    let w = worker().await;
    let engine = Engine::load(&test_model(), &LoadOptions::default()).unwrap();
    assert_eq!(w.ready["worker_id"], "test-worker");
    assert!(w.ready["context_length"].as_u64().unwrap() > 0);
    for case in reference().greedy_chat {
        let events = infer(
            &w,
            json!({"messages": case.messages, "max_tokens": case.max_tokens, "temperature": 0}),
        )
        .await;
        assert_event_order(&events);
        // Exactly what the engine answers in-process; how that compares with llama.cpp (equal,
        // or leaving it only where the top two tokens nearly tie) is rbee-engine's reference
        // test.
        let messages = case
            .messages
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_owned(),
                    m["content"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let params = GenerationParams {
            max_tokens: case.max_tokens as usize,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: vec![],
            logprobs: None,
        };
        let (expected, summary) = engine.generate(&Prompt::Chat(messages), params).unwrap();
        assert_eq!(
            joined_text(&events),
            expected,
            "answer to {:?}",
            case.messages
        );
        let end = end_event(&events).unwrap();
        let want = match summary.stop_reason {
            StopReason::Eos => "eos",
            StopReason::MaxTokens => "max_tokens",
            other => panic!("a greedy answer ended with {other:?}"),
        };
        assert_eq!(end["stop_reason"], want);
        assert_eq!(
            end["prompt_tokens"], case.usage.prompt_tokens,
            "llama.cpp's prompt length"
        );
        assert_eq!(end["completion_tokens"], summary.completion_tokens);
    }
    let health: Value = client()
        .get(w.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ready");
    assert_eq!(health["context_length"], 8192);
    assert_eq!(health["device"], "cpu");
}

#[tokio::test]
async fn fixed_seed_sampling_repeats_and_seeds_differ() {
    let w = worker().await;
    let body = |seed: u64| {
        json!({"prompt": "Once upon a time", "max_tokens": 32, "temperature": 1.0,
               "top_p": 0.95, "top_k": 40, "seed": seed})
    };
    let a = joined_text(&infer(&w, body(7)).await);
    let b = joined_text(&infer(&w, body(7)).await);
    let c = joined_text(&infer(&w, body(8)).await);
    assert!(!a.is_empty());
    assert_eq!(a, b, "same seed, same text");
    assert_ne!(a, c, "another seed, another text");
}

#[tokio::test]
async fn a_frequency_penalty_stops_the_model_repeating_itself() {
    let w = worker().await;
    // Greedy counting repeats ", " after every number; a strong penalty on what was generated
    // makes the model leave the pattern.
    let body = |penalty: f64| {
        json!({"prompt": "1, 2, 3, 4, 5,", "max_tokens": 24, "temperature": 0,
               "frequency_penalty": penalty})
    };
    let plain = joined_text(&infer(&w, body(0.0)).await);
    let penalized = joined_text(&infer(&w, body(2.0)).await);
    println!("plain: {plain:?}\npenalized: {penalized:?}");
    let commas = |t: &str| t.matches(',').count();
    assert!(commas(&plain) >= 6, "{plain:?}");
    assert!(
        commas(&penalized) < commas(&plain),
        "{penalized:?} vs {plain:?}"
    );
}

#[tokio::test]
async fn logit_bias_moves_the_greedy_choice() {
    let w = worker().await;
    let body = |bias: Value| json!({"prompt": "1, 2, 3, 4, 5,", "max_tokens": 8, "temperature": 0, "logit_bias": bias});
    let plain = infer(&w, body(json!({}))).await;
    assert_eq!(end_event(&plain).unwrap()["stop_reason"], "max_tokens");
    // Token 0 is SmolLM2's end-of-text: favoured by 100, the first step ends the answer.
    let ended = infer(&w, body(json!({"0": 100}))).await;
    let end = end_event(&ended).unwrap();
    assert_eq!(end["stop_reason"], "eos", "{ended:?}");
    assert_eq!(joined_text(&ended), "");
}

#[tokio::test]
async fn max_tokens_and_stop_sequences() {
    let w = worker().await;
    let q = json!([{"role": "user", "content": "What is 2+2?"}]);
    let events = infer(
        &w,
        json!({"messages": q, "max_tokens": 3, "temperature": 0}),
    )
    .await;
    let end = end_event(&events).unwrap();
    assert_eq!(end["stop_reason"], "max_tokens");
    assert_eq!(end["completion_tokens"], 3);
    assert_eq!(joined_text(&events), "The answer to");

    // " math" spans no token boundary issue here; "s clas" spans two tokens.
    let events = infer(
        &w,
        json!({"messages": q, "max_tokens": 24, "temperature": 0, "stop": ["s clas", "zzz"]}),
    )
    .await;
    assert_event_order(&events);
    assert_eq!(joined_text(&events), "The answer to thi");
    assert_eq!(end_event(&events).unwrap()["stop_reason"], "stop_sequence");
}

#[tokio::test]
async fn authentication_is_required_on_every_protected_route() {
    let w = worker().await;
    let c = client();
    for (method, path, public) in rbee_worker::router_routes() {
        let path = path.replace("{request_id}", "some-id");
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = c.request(m.clone(), w.url(&path)).send().await.unwrap();
        if public {
            assert_ne!(resp.status(), 401, "{method} {path} is public");
            continue;
        }
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer"),
            "{method} {path}"
        );
        let (status, e) = error_of(resp).await;
        assert_eq!(
            (status, e["code"].as_str().unwrap()),
            (401, "UNAUTHORIZED"),
            "{method} {path}"
        );
        let wrong = c
            .request(m, w.url(&path))
            .bearer_auth("wrong-token-0123456789abcdef")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{method} {path} with a wrong token");
    }
    let ok = w
        .post(
            &c,
            "/v1/inference",
            &json!({"prompt": "Hi", "max_tokens": 1}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let log = w.stderr();
    assert!(!log.contains(TOKEN), "the token must never be logged");
    assert!(
        !log.contains("wrong-token"),
        "presented tokens must never be logged"
    );
}

#[tokio::test]
async fn every_invalid_input_is_a_400_naming_the_field() {
    let w = worker().await;
    let c = client();
    let cases = [
        (json!({"prompt": ""}), "INVALID_PARAMETER", "prompt"),
        (json!({}), "INVALID_PARAMETER", "prompt"),
        (
            json!({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}),
            "INVALID_PARAMETER",
            "mutually exclusive",
        ),
        (json!({"messages": []}), "INVALID_PARAMETER", "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "INVALID_PARAMETER",
            "messages[0].role",
        ),
        (
            json!({"prompt": "x", "max_tokens": 0}),
            "INVALID_PARAMETER",
            "max_tokens",
        ),
        (
            json!({"prompt": "x", "logit_bias": {"99999999": 1}}),
            "INVALID_PARAMETER",
            "logit_bias",
        ),
        (
            json!({"prompt": "x", "logit_bias": {"5": 101}}),
            "INVALID_PARAMETER",
            "logit_bias",
        ),
        (
            json!({"prompt": "x", "presence_penalty": 2.5}),
            "INVALID_PARAMETER",
            "presence_penalty",
        ),
        (
            json!({"prompt": "x", "frequency_penalty": -3}),
            "INVALID_PARAMETER",
            "frequency_penalty",
        ),
        (
            json!({"prompt": "x", "max_tokens": 100000}),
            "INVALID_PARAMETER",
            "8192",
        ),
        (
            json!({"prompt": "x", "max_tokens": 8192}),
            "CONTEXT_LENGTH_EXCEEDED",
            "8192",
        ),
        (
            json!({"prompt": "x", "max_tokens": -1}),
            "INVALID_JSON",
            "max_tokens",
        ),
        (
            json!({"prompt": "x", "temperature": 3.0}),
            "INVALID_PARAMETER",
            "temperature",
        ),
        (
            json!({"prompt": "x", "temperature": "hot"}),
            "INVALID_JSON",
            "temperature",
        ),
        (
            json!({"prompt": "x", "top_p": 0}),
            "INVALID_PARAMETER",
            "top_p",
        ),
        (
            json!({"prompt": "x", "top_p": 1.5}),
            "INVALID_PARAMETER",
            "top_p",
        ),
        (
            json!({"prompt": "x", "stop": ["a","b","c","d","e","f","g","h","i"]}),
            "INVALID_PARAMETER",
            "stop",
        ),
        (
            json!({"prompt": "x", "stop": ["x".repeat(500)]}),
            "INVALID_PARAMETER",
            "stop[0]",
        ),
        (
            json!({"prompt": "x", "max_token": 5}),
            "INVALID_JSON",
            "max_token",
        ),
        (json!({"prompt": 5}), "INVALID_JSON", "prompt"),
    ];
    for (body, code, needle) in cases {
        let resp = w.post(&c, "/v1/inference", &body).send().await.unwrap();
        let (status, e) = error_of(resp).await;
        assert_eq!(status, 400, "{body} -> {e}");
        assert_eq!(e["code"], code, "{body} -> {e}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{body} -> {e}"
        );
    }
    let raw = |body: &'static str, ctype: &'static str| {
        c.post(w.url("/v1/inference"))
            .bearer_auth(TOKEN)
            .header("content-type", ctype)
            .body(body)
    };
    let (status, e) = error_of(
        raw("{\"prompt\": ", "application/json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, e["code"].as_str().unwrap()), (400, "INVALID_JSON"));
    let (status, e) = error_of(
        raw("{\"prompt\":\"x\"}", "text/plain")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str().unwrap()),
        (415, "INVALID_CONTENT_TYPE")
    );
    let (status, e) = error_of(raw("[1,2,NaN]", "application/json").send().await.unwrap()).await;
    assert_eq!((status, e["code"].as_str().unwrap()), (400, "INVALID_JSON"));
    let huge = json!({"prompt": "a".repeat(1024 * 1024 + 10)});
    let (status, e) = error_of(w.post(&c, "/v1/inference", &huge).send().await.unwrap()).await;
    assert_eq!(
        (status, e["code"].as_str().unwrap()),
        (413, "PAYLOAD_TOO_LARGE")
    );
    let (status, e) = error_of(c.get(w.url("/nope")).send().await.unwrap()).await;
    assert_eq!((status, e["code"].as_str().unwrap()), (404, "NOT_FOUND"));
    let (status, e) = error_of(
        c.get(w.url("/v1/inference"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str().unwrap()),
        (405, "METHOD_NOT_ALLOWED")
    );
    // Still alive and serving after all of that.
    let events = infer(&w, json!({"prompt": "Hi", "max_tokens": 2})).await;
    assert_event_order(&events);
}

#[tokio::test]
async fn a_request_beyond_the_slots_gets_503_with_retry_after() {
    let w = worker_with(&["--parallel", "2"]).await;
    let c = client();
    let long = json!({"prompt": ENDLESS, "temperature": 0, "max_tokens": 400});
    let mut readers = Vec::new();
    for _ in 0..2 {
        let resp = w.post(&c, "/v1/inference", &long).send().await.unwrap();
        let mut reader = SseReader::new(resp);
        let started = reader.next().await.unwrap().unwrap();
        assert!(matches!(started, SseData::Event(ref v) if v["type"] == "started"));
        readers.push(reader);
    }
    let third = w.post(&c, "/v1/inference", &long).send().await.unwrap();
    assert_eq!(third.headers().get("retry-after").unwrap(), "1");
    let (status, e) = error_of(third).await;
    assert_eq!(
        (status, e["code"].as_str().unwrap()),
        (503, "ALL_SLOTS_BUSY")
    );
    assert!(e["message"].as_str().unwrap().contains("all 2"), "{e}");
    let health: Value = c
        .get(w.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["busy"], true);
    assert_eq!(
        (health["slots"].as_u64(), health["slots_busy"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(
        health["kv_pool"]["reserved_tokens"].as_u64().unwrap() > 0,
        "{health}"
    );
}

#[tokio::test]
async fn concurrent_requests_share_steps_and_get_their_own_answers() {
    let w = worker().await;
    let c = client();
    let prompts = [
        "The capital of France is",
        "1, 2, 3, 4, 5,",
        "Once upon a time",
        "def add(a, b):",
        "The color of the sky is",
        "Bees make honey from",
        "The largest planet is",
        "My favourite food is",
    ];
    let body = |p: &str| json!({"prompt": p, "temperature": 0, "max_tokens": 24});
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(joined_text(&infer(&w, body(p)).await));
    }
    let together = futures_util::future::join_all(prompts.iter().map(|p| infer(&w, body(p)))).await;
    for ((p, a), events) in prompts.iter().zip(&alone).zip(&together) {
        assert_eq!(
            &joined_text(events),
            a,
            "{p:?}: the same answer alone and in company"
        );
    }
    let batched = w
        .metric(&c, "rbee_worker_batch_size_bucket{le=\"4\"}")
        .await
        .unwrap();
    let steps = w.metric(&c, "rbee_worker_batch_size_count").await.unwrap();
    assert!(
        steps > batched,
        "some steps ran more than 4 sequences at once: {batched} of {steps} ran at most 4"
    );
    assert_eq!(w.metric(&c, "rbee_worker_slots").await.unwrap(), 8.0);
}

/// Polls `/health` until no slot is taken; returns how long it took.
async fn wait_until_free(w: &Daemon, limit: Duration) -> Duration {
    let c = client();
    let t0 = Instant::now();
    eventually(limit, "every slot to be free", || async {
        let h: Value = c
            .get(w.url("/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (h["slots_busy"] == 0).then_some(()).ok_or(h)
    })
    .await
    .unwrap();
    t0.elapsed()
}

/// Polls until a 1-token request with the worker's token answers 200; returns how long it took.
async fn wait_accepted(w: &Daemon, limit: Duration, what: &str) -> Duration {
    let c = client();
    let t0 = Instant::now();
    let hi = json!({"prompt": "Hi", "max_tokens": 1});
    eventually(limit, what, || async {
        let r = w.post(&c, "/v1/inference", &hi).send().await.unwrap();
        let status = r.status();
        let _ = r.bytes().await;
        (status == 200).then_some(()).ok_or(status)
    })
    .await
    .unwrap();
    t0.elapsed()
}

#[tokio::test]
async fn client_disconnect_stops_generation_within_a_second() {
    let w = worker().await;
    let c = client();
    let long = json!({"prompt": ENDLESS, "temperature": 0, "max_tokens": 1000});
    let resp = w.post(&c, "/v1/inference", &long).send().await.unwrap();
    let mut reader = SseReader::new(resp);
    let _started = reader.next().await.unwrap();
    let token = reader.next().await.unwrap().unwrap();
    assert!(matches!(token, SseData::Event(ref v) if v["type"] == "token"));
    drop(reader);
    let took = wait_until_free(&w, Duration::from_secs(1)).await;
    println!("slot free {took:?} after the disconnect");
    let metrics = c
        .get(w.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("rbee_worker_cancellations_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rbee_worker_requests_total{outcome=\"cancelled\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn cancel_by_request_id() {
    let w = worker().await;
    let c = client();
    let long = json!({"prompt": ENDLESS, "temperature": 0, "max_tokens": 1000});
    let resp = w
        .post(&c, "/v1/inference", &long)
        .header("x-request-id", "cancel-me-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers().get("x-request-id").unwrap(), "cancel-me-1");
    let mut reader = SseReader::new(resp);
    let started = reader.next().await.unwrap().unwrap();
    assert!(matches!(started, SseData::Event(ref v) if v["request_id"] == "cancel-me-1"));
    let del = c
        .delete(w.url("/v1/inference/cancel-me-1"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    let mut rest = Vec::new();
    while let Some(e) = reader.next().await.unwrap() {
        rest.push(e);
    }
    assert_eq!(end_event(&rest).unwrap()["stop_reason"], "cancelled");
    assert_eq!(rest.last(), Some(&SseData::Done));
    let (status, _) = error_of(
        c.delete(w.url("/v1/inference/cancel-me-1"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[tokio::test]
async fn deadlines_stop_generation() {
    let w = worker().await;
    let c = client();
    let long = json!({"prompt": ENDLESS, "temperature": 0, "max_tokens": 1000});
    let resp = w
        .post(&c, "/v1/inference", &long)
        .header("x-deadline-ms", (unix_ms() + 1500).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = SseReader::new(resp).collect().await.unwrap();
    assert_event_order(&events);
    let end = end_event(&events).unwrap();
    assert_eq!(end["stop_reason"], "deadline");
    assert!(end["completion_tokens"].as_u64().unwrap() < 1000);

    let late = w
        .post(&c, "/v1/inference", &long)
        .header("x-deadline-ms", (unix_ms() - 10).to_string())
        .send()
        .await
        .unwrap();
    let (status, e) = error_of(late).await;
    assert_eq!(
        (status, e["code"].as_str().unwrap()),
        (504, "DEADLINE_EXCEEDED")
    );
    let bad = w
        .post(&c, "/v1/inference", &long)
        .header("x-deadline-ms", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad).await.0, 400);
    for extreme in [i64::MAX.to_string(), i64::MIN.to_string()] {
        let resp = w
            .post(
                &c,
                "/v1/inference",
                &json!({"prompt": "Hi", "max_tokens": 1}),
            )
            .header("x-deadline-ms", extreme.as_str())
            .send()
            .await
            .unwrap();
        assert!(
            resp.status() == 200 || resp.status() == 504,
            "{extreme}: {}",
            resp.status()
        );
        let _ = resp.bytes().await;
    }
    let alive = w.post(
        &c,
        "/v1/inference",
        &json!({"prompt": "Hi", "max_tokens": 1}),
    );
    assert_eq!(alive.send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn sigterm_mid_stream_ends_the_stream_and_exits_zero() {
    let mut w = worker_with(&["--grace-seconds", "1"]).await;
    let c = client();
    let long = json!({"prompt": ENDLESS, "temperature": 0, "max_tokens": 1000});
    let resp = w.post(&c, "/v1/inference", &long).send().await.unwrap();
    let mut reader = SseReader::new(resp);
    let _started = reader.next().await.unwrap();
    let _token = reader.next().await.unwrap();
    w.signal(libc::SIGTERM);
    let mut rest = Vec::new();
    while let Some(e) = reader.next().await.unwrap() {
        rest.push(e);
    }
    let end = end_event(&rest).expect("the in-flight stream ends with an end event");
    assert_eq!(end["stop_reason"], "cancelled");
    assert_eq!(rest.last(), Some(&SseData::Done));
    let status = w.wait_exit(Duration::from_secs(10)).await.expect("exits");
    assert_eq!(status.code(), Some(0), "{}", w.stderr());
}

#[tokio::test]
async fn shutdown_endpoint_drains_and_exits_zero() {
    let mut w = worker().await;
    let c = client();
    let resp = c
        .post(w.url("/v1/shutdown"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let status = w.wait_exit(Duration::from_secs(10)).await.expect("exits");
    assert_eq!(status.code(), Some(0), "{}", w.stderr());
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text() {
    let w = worker().await;
    let _ = infer(
        &w,
        json!({"prompt": "Hi", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    let text = client()
        .get(w.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "rbee_worker_requests_total{outcome=",
        "rbee_worker_prompt_tokens_total",
        "rbee_worker_generated_tokens_total 4",
        "rbee_worker_time_to_first_token_seconds_bucket",
        "rbee_worker_inter_token_seconds_bucket",
        "rbee_worker_cancellations_total",
        "rbee_worker_model_load_seconds",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    rbee_test_harness::promtool_check_metrics(&text);
}

fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(WORKER)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RBEE_WORKER_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn non_loopback_without_a_token_exits_64_before_binding() {
    let model = test_model();
    let (code, log) = run_to_exit(
        &["--model", model.to_str().unwrap(), "--listen", "0.0.0.0:0"],
        &[],
    );
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("without a token"), "{log}");
    assert!(!log.contains("listening"), "{log}");
}

#[test]
fn token_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = rbee_test_harness::temp_dir("mode");
    let path = rbee_test_harness::write_token_file(&dir, TOKEN);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let model = test_model();
    let (code, log) = run_to_exit(
        &[
            "--model",
            model.to_str().unwrap(),
            "--token-file",
            path.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("chmod 600"), "{log}");
}

#[test]
fn bad_flags_exit_64() {
    let model = test_model();
    let m = model.to_str().unwrap();
    for args in [
        vec!["--model", "/nonexistent.gguf"],
        vec!["--model", m, "--threads", "0"],
        vec!["--model", m, "--ready-url", "ftp://x"],
    ] {
        let (code, log) = run_to_exit(&args, &[]);
        assert_eq!(code, Some(64), "{args:?}: {log}");
    }
    let (code, _) = run_to_exit(&["--model", m, "--device", "tpu"], &[]);
    assert_eq!(code, Some(2), "clap rejects an unknown device");
}

#[tokio::test]
async fn token_from_the_hive_environment_works_and_dev_mode_is_loud() {
    let mut o = opts();
    o.env = vec![("RBEE_WORKER_TOKEN".into(), TOKEN.into())];
    let mut w = Daemon::worker(o).await.unwrap();
    w.token = None;
    let resp = w
        .post(
            &client(),
            "/v1/inference",
            &json!({"prompt": "Hi", "max_tokens": 1}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    w.token = Some(TOKEN.into());
    let resp = w
        .post(
            &client(),
            "/v1/inference",
            &json!({"prompt": "Hi", "max_tokens": 1}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let dev = Daemon::worker(opts()).await.unwrap();
    assert!(dev.stderr().contains("DEV MODE"), "{}", dev.stderr());
    let resp = dev
        .post(
            &client(),
            "/v1/inference",
            &json!({"prompt": "Hi", "max_tokens": 1}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn sighup_rotates_the_token_without_a_restart() {
    let dir = rbee_test_harness::temp_dir("rotate");
    let path = rbee_test_harness::write_token_file(&dir, TOKEN);
    let mut o = opts();
    o.extra_args = vec!["--token-file".into(), path.to_str().unwrap().into()];
    let mut w = Daemon::worker(o).await.unwrap();
    let pid = w.pid();
    let new_token = "rotated-token-0123456789abcdef";
    rbee_test_harness::write_token_file(&dir, new_token);
    w.signal(libc::SIGHUP);
    let c = client();
    let hi = json!({"prompt": "Hi", "max_tokens": 1});
    w.token = Some(new_token.into());
    wait_accepted(&w, Duration::from_secs(5), "the new token to be accepted").await;
    w.token = Some(TOKEN.into());
    let old = w.post(&c, "/v1/inference", &hi).send().await.unwrap();
    assert_eq!(old.status(), 401, "the old token is retired");
    assert_eq!(w.pid(), pid);
    assert!(
        w.wait_exit(Duration::from_millis(10)).await.is_none(),
        "no restart"
    );
    assert!(w.stderr().contains("token reloaded"), "{}", w.stderr());
}

#[test]
fn an_unreachable_ready_url_makes_the_worker_exit_1() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let model = test_model();
    let url = format!("http://127.0.0.1:{port}/ready");
    let (code, log) = run_to_exit(
        &["--model", model.to_str().unwrap(), "--ready-url", &url],
        &[],
    );
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("ready call"), "{log}");
}
