//! The queen's audit history against an anonymous flood and against someone who cuts its tail
//! or deletes it: failures are aggregated into their own chain, and `audit verify` catches a cut
//! or deleted log through the checkpoint of its head.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rbee_test_harness::{Daemon, QueenOptions, eventually, workspace_binary};
use serde_json::{Value, json};

const CLIENT: &str = "client-token-0123456789abcdef";
const JOIN: &str = "join-token-0123456789abcdef";
const HIVE: &str = "hive-token-0123456789abcdef";

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `rbee-hive audit verify FILE`: exit code and what it printed.
fn verify(path: &Path) -> (i32, String) {
    let out = Command::new(workspace_binary("rbee-hive"))
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn queen_options(audit: &Path) -> QueenOptions {
    let mut opts = QueenOptions::cluster(("alice", CLIENT), true, JOIN, HIVE);
    opts.env = vec![
        ("RBEE_QUEEN_AUDIT_LOG".into(), audit.display().to_string()),
        // Small files: a flood would rotate history out quickly if it reached this log.
        ("RBEE_QUEEN_AUDIT_MAX_BYTES".into(), "8192".into()),
    ];
    opts
}

/// `n` requests that fail authentication, sent 16 at a time from `from`.
async fn flood(queen: &Daemon, from: &str, path: &str, token: Option<&str>, n: usize) {
    let c = reqwest::Client::builder()
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let url = queen.url(path);
    for _ in 0..n / 16 {
        let mut batch = Vec::new();
        for _ in 0..16 {
            let mut req = c
                .post(&url)
                .json(&json!({"model": "smollm2", "prompt": "x"}));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            batch.push(tokio::spawn(req.send()));
        }
        for r in batch {
            assert_eq!(r.await.unwrap().unwrap().status(), 401);
        }
    }
}

#[tokio::test]
async fn a_401_flood_neither_rotates_history_out_nor_writes_a_record_per_request() {
    let dir = rbee_test_harness::temp_dir("audit-flood");
    let audit = dir.join("queen-audit.jsonl");
    let failures = dir.join("queen-audit.auth-failures.jsonl");
    let mut queen = Daemon::queen(queen_options(&audit), "127.0.0.1:0")
        .await
        .unwrap();
    let c = reqwest::Client::new();
    // An authenticated action worth keeping.
    let r = c
        .delete(queen.url("/v1/admin/hives/nobody"))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    flood(
        &queen,
        "127.0.0.1",
        "/v1/completions",
        Some("wrong-token-0123456789"),
        800,
    )
    .await;
    flood(&queen, "127.0.0.1", "/v1/completions", None, 400).await;
    flood(
        &queen,
        "127.0.0.2",
        "/v1/hives/heartbeat",
        Some("not-the-join-token"),
        400,
    )
    .await;
    let total = queen
        .metric(&c, "rbee_queen_auth_failures_total")
        .await
        .unwrap();
    assert_eq!(total, 1600.0);
    queen.signal(libc::SIGTERM);
    assert!(
        queen
            .wait_exit(Duration::from_secs(15))
            .await
            .unwrap()
            .success()
    );

    // The main log: whole from seq 0, no failure records, never rotated.
    let main = records(&audit);
    assert_eq!(main[0]["seq"], 0);
    assert_eq!(main[0]["event"], "queen.start");
    assert!(
        main.iter()
            .all(|r| !r["event"].as_str().unwrap().starts_with("auth.failure"))
    );
    assert!(!PathBuf::from(format!("{}.1", audit.display())).exists());
    // The failures log: per source and reason, the first failure and one summary.
    let fails = records(&failures);
    let summary = |source: &str, reason: &str| {
        fails
            .iter()
            .find(|r| {
                r["event"] == "auth.failures"
                    && r["details"]["source"] == source
                    && r["details"]["reason"] == reason
            })
            .map(|r| r["details"]["count"].as_u64().unwrap())
    };
    assert_eq!(summary("127.0.0.1", "wrong_token"), Some(799), "{fails:?}");
    assert_eq!(summary("127.0.0.1", "no_token"), Some(399), "{fails:?}");
    assert_eq!(summary("127.0.0.2", "join_token"), Some(399), "{fails:?}");
    let firsts = fails
        .iter()
        .filter(|r| r["event"] == "auth.failure")
        .count();
    assert_eq!(firsts, 3, "{fails:?}");
    assert!(
        fails.len() <= 8,
        "{} records for 1600 failures",
        fails.len()
    );
    for log in [&audit, &failures] {
        let (code, text) = verify(log);
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("up to its checkpoint"), "{text}");
    }
}

#[tokio::test]
async fn audit_verify_catches_a_cut_tail_and_a_deleted_log() {
    let dir = rbee_test_harness::temp_dir("audit-cut");
    let audit = dir.join("queen-audit.jsonl");
    let mut queen = Daemon::queen(queen_options(&audit), "127.0.0.1:0")
        .await
        .unwrap();
    // A few records: each reload is one.
    for n in 1..=3 {
        queen.signal(libc::SIGHUP);
        eventually(
            Duration::from_secs(10),
            "a config.reload record",
            || async {
                let reloads = records(&audit)
                    .iter()
                    .filter(|r| r["event"] == "config.reload")
                    .count();
                (reloads == n).then_some(())
            },
        )
        .await
        .unwrap();
    }
    queen.signal(libc::SIGTERM);
    assert!(
        queen
            .wait_exit(Duration::from_secs(15))
            .await
            .unwrap()
            .success()
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(verify(&audit).0, 0);

    // Someone removes the last two records: each line still chains to the one before.
    let lines: Vec<&str> = text.lines().collect();
    let cut = format!("{}\n", lines[..lines.len() - 2].join("\n"));
    std::fs::write(&audit, &cut).unwrap();
    let (code, report) = verify(&audit);
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("cut from the end"), "{report}");

    // Or deletes the file.
    std::fs::remove_file(&audit).unwrap();
    let (code, report) = verify(&audit);
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("deleted"), "{report}");

    // A queen started on the cut log says so in the chain, and goes on.
    std::fs::write(&audit, &cut).unwrap();
    let queen = Daemon::queen(queen_options(&audit), "127.0.0.1:0")
        .await
        .unwrap();
    let note = eventually(Duration::from_secs(10), "audit.tail_missing", || async {
        records(&audit)
            .into_iter()
            .find(|r| r["event"] == "audit.tail_missing")
    })
    .await
    .unwrap();
    assert_eq!(
        note["details"]["checkpoint_seq"].as_u64().unwrap() as usize,
        lines.len() - 1
    );
    drop(queen);
}
