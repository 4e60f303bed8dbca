//! Model downloads through the hive API, from a local server in the hub's URL layout (the
//! hub itself is outside the project; the real download code runs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use rbee_test_harness::hub::{HubDouble, HubFile, sha256_hex};
use rbee_test_harness::{
    Daemon, HiveOptions, MODEL_FILE, SseData, SseReader, end_event, joined_text, temp_dir,
    test_model,
};
use serde_json::{Value, json};

const TOKEN: &str = "hive-test-token-0123456789";

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn random_bytes(n: usize) -> Vec<u8> {
    // Deterministic, incompressible enough for a transfer test.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn hive_for(hub: &HubDouble, extra_env: &[(&str, &str)]) -> Daemon {
    let mut opts = HiveOptions {
        model_dirs: vec![temp_dir("dl-models")],
        ..HiveOptions::default().token(TOKEN)
    }
    .env("HUB__ENDPOINT", hub.endpoint())
    .env("HUB__RETRIES", 3);
    for (k, v) in extra_env {
        opts.env.push(((*k).to_owned(), (*v).to_owned()));
    }
    Daemon::hive(opts).await.unwrap()
}

/// Starts a download and follows its events to the end; returns (status, events).
async fn download(hive: &Daemon, model: &str) -> (u16, Vec<Value>) {
    let c = client();
    let resp = hive
        .post(&c, "/v1/models/downloads", &json!({ "model": model }))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    let Some(id) = body["id"].as_str() else {
        return (status, vec![body]);
    };
    let events = hive
        .get(&c, &format!("/v1/models/downloads/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut out = Vec::new();
    for e in SseReader::new(events).collect().await.unwrap() {
        if let SseData::Event(v) = e {
            out.push(v);
        }
    }
    (status, out)
}

#[tokio::test]
async fn download_with_progress_resumes_after_a_cut_connection() {
    let bytes = random_bytes(3_000_000);
    let sha = sha256_hex(&bytes);
    let hub = HubDouble::start(vec![HubFile::new(
        "acme/tiny-GGUF",
        "tiny.Q4_1.gguf",
        bytes,
    )])
    .await
    .unwrap();
    hub.cut_after(1_000_000);
    let hive = hive_for(&hub, &[]).await;
    let (status, events) = download(&hive, "hf:acme/tiny-GGUF").await;
    assert_eq!(status, 202);
    let last = events.last().unwrap();
    assert_eq!(last["state"], "done", "{events:?}");
    assert_eq!(last["bytes_done"], 3_000_000);
    assert_eq!(last["bytes_total"], 3_000_000);
    assert_eq!(last["file"], "tiny.Q4_1.gguf");
    assert!(events.iter().any(|e| e["state"] == "downloading"));
    // The second GET resumed where the cut left off.
    let ranges = hub.ranges();
    assert!(
        ranges
            .iter()
            .any(|r| r.as_deref() == Some("bytes=1000000-")),
        "{ranges:?}"
    );
    let path = std::path::PathBuf::from(last["path"].as_str().unwrap());
    assert_eq!(sha256_hex(&std::fs::read(&path).unwrap()), sha);

    // Listed with its hub reference; a late subscriber still learns the outcome.
    let c = client();
    let list: Value = hive
        .get(&c, "/v1/models")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        list["models"][0]["reference"],
        "hf:acme/tiny-GGUF:tiny.Q4_1.gguf"
    );
    let downloads: Value = hive
        .get(&c, "/v1/models/downloads")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = downloads["downloads"][0]["id"].as_str().unwrap();
    let late = hive
        .get(&c, &format!("/v1/models/downloads/{id}/events"))
        .send()
        .await
        .unwrap();
    let late = SseReader::new(late).collect().await.unwrap();
    assert_eq!(late.len(), 1);
    assert!(matches!(&late[0], SseData::Event(v) if v["state"] == "done"));
    hive.audit_with(&["model.download"]).await;
    assert_eq!(
        hive.metric(&c, "rbee_hive_model_downloads_total{outcome=\"ok\"}")
            .await
            .unwrap(),
        1.0
    );
}

#[tokio::test]
async fn hub_failures_become_clear_errors() {
    let bytes = random_bytes(200_000);
    let hub = HubDouble::start(vec![
        HubFile::new("acme/tiny-GGUF", "tiny.Q4_1.gguf", bytes.clone()),
        HubFile::new("acme/two-GGUF", "a.Q4_1.gguf", bytes.clone()),
        HubFile::new("acme/two-GGUF", "b.Q8_0.gguf", bytes),
    ])
    .await
    .unwrap();
    let hive = hive_for(&hub, &[]).await;
    let failed = |events: &[Value]| events.last().unwrap()["error"].clone();

    let (_, events) = download(&hive, "hf:acme/missing-GGUF:x.gguf").await;
    assert_eq!(failed(&events)["code"], "MODEL_NOT_FOUND");

    let (_, events) = download(&hive, "hf:acme/two-GGUF").await;
    let err = failed(&events);
    assert_eq!(err["code"], "AMBIGUOUS_MODEL_FILE");
    assert!(err["message"].as_str().unwrap().contains("b.Q8_0.gguf"));

    hub.wrong_checksum(true);
    let (_, events) = download(&hive, "hf:acme/tiny-GGUF:tiny.Q4_1.gguf").await;
    assert_eq!(failed(&events)["code"], "CHECKSUM_MISMATCH");
    let dir = hive.dir.clone();
    let leftovers: Vec<_> = walk(&dir);
    assert!(
        !leftovers
            .iter()
            .any(|p| p.ends_with(".part") || p.ends_with("tiny.Q4_1.gguf")),
        "{leftovers:?}"
    );
    hub.wrong_checksum(false);

    hub.forbid(true);
    let (_, events) = download(&hive, "hf:acme/tiny-GGUF:tiny.Q4_1.gguf").await;
    let err = failed(&events);
    assert_eq!(err["code"], "HUB_UNAUTHORIZED");
    assert!(err["message"].as_str().unwrap().contains("HF_TOKEN"));
    hub.forbid(false);

    // Only hub references download; bad ones are refused before anything starts.
    let c = client();
    for (model, code) in [
        ("file:x.gguf", "INVALID_MODEL_REF"),
        ("hf:../etc", "INVALID_MODEL_REF"),
    ] {
        let r = hive
            .post(&c, "/v1/models/downloads", &json!({ "model": model }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{model}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{model}");
    }
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn the_hub_token_is_sent_when_configured() {
    let hub = HubDouble::start(vec![HubFile::new(
        "acme/gated-GGUF",
        "gated.Q4_1.gguf",
        random_bytes(100_000),
    )])
    .await
    .unwrap();
    hub.require_token(Some("hf_test_token_abcdefghijklmnop"));
    let hive = hive_for(&hub, &[("HF_TOKEN", "hf_test_token_abcdefghijklmnop")]).await;
    let (_, events) = download(&hive, "hf:acme/gated-GGUF:gated.Q4_1.gguf").await;
    assert_eq!(events.last().unwrap()["state"], "done", "{events:?}");
    assert!(!hive.stderr().contains("hf_test_token_abcdefghijklmnop"));
}

#[tokio::test]
async fn a_downloaded_model_serves_through_a_worker() {
    let model = std::fs::read(test_model()).unwrap();
    let hub = HubDouble::start(vec![HubFile::new(
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        MODEL_FILE,
        model,
    )])
    .await
    .unwrap();
    let hive = hive_for(&hub, &[]).await;
    let reference = "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";
    let (_, events) = download(&hive, reference).await;
    assert_eq!(events.last().unwrap()["state"], "done");
    let c = client();
    let id = hive.spawn_worker(&c, reference).await.unwrap();
    hive.wait_worker(&c, &id, Duration::from_secs(120), |v| v["state"] == "ready")
        .await
        .unwrap();
    let resp = hive
        .post(
            &c,
            &format!("/v1/workers/{id}/inference"),
            &json!({"prompt": "1, 2, 3, 4,", "max_tokens": 4, "temperature": 0}),
        )
        .send()
        .await
        .unwrap();
    let events = SseReader::new(resp).collect().await.unwrap();
    assert!(end_event(&events).is_some());
    assert!(
        joined_text(&events).contains('5'),
        "{}",
        joined_text(&events)
    );
}
