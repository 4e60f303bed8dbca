//! The release tarball (`cargo xtask dist`): complete, checksummed, and the single-node stack
//! runs from it. `cargo xtask test` builds it and passes its path in `RBEE_DIST_TARBALL`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

use rbee_test_harness::{Daemon, HiveOptions, QueenOptions, temp_dir};
use serde_json::{Value, json};

const CLIENT: &str = "dist-client-token-0123456789";
const JOIN: &str = "dist-join-token-0123456789ab";
const HIVE: &str = "dist-hive-token-0123456789ab";

fn tarball() -> PathBuf {
    let path = std::env::var_os("RBEE_DIST_TARBALL")
        .map(PathBuf::from)
        .expect(
            "RBEE_DIST_TARBALL is not set: run `cargo xtask test` (it builds the tarball), or \
         `cargo xtask dist` and set RBEE_DIST_TARBALL to the path it prints",
        );
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// Unpacks the tarball and returns the directory it holds.
fn unpack() -> PathBuf {
    let tarball = tarball();
    let dir = temp_dir("dist");
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    let name = tarball
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_end_matches(".tar.gz")
        .to_owned();
    assert!(
        name.starts_with(&format!("rbee-{}-", env!("CARGO_PKG_VERSION"))),
        "{name}"
    );
    dir.join(name)
}

#[test]
fn the_tarball_holds_binaries_docs_units_configs_and_checksums() {
    let root = unpack();
    for file in [
        "bin/queen-rbee",
        "bin/rbee-hive",
        "bin/llm-worker-rbee",
        "docs/DEPLOYMENT.md",
        "docs/SECRETS.md",
        "docs/MONITORING.md",
        "docs/TROUBLESHOOTING.md",
        "docs/API.md",
        "docs/systemd/queen-rbee.service",
        "docs/systemd/rbee-hive.service",
        "docs/examples/queen.toml",
        "docs/examples/hive.toml",
        "LICENSE",
        "README.md",
        "SHA256SUMS",
    ] {
        assert!(root.join(file).is_file(), "{file} missing from the tarball");
    }
    let check = Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let sums = std::fs::read_to_string(root.join("SHA256SUMS")).unwrap();
    assert!(sums.contains("  bin/queen-rbee\n"), "{sums}");
    for bin in ["queen-rbee", "rbee-hive", "llm-worker-rbee"] {
        let out = Command::new(root.join("bin").join(bin))
            .arg("--version")
            .output()
            .unwrap();
        assert!(out.status.success(), "{bin} --version");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(env!("CARGO_PKG_VERSION")), "{bin}: {text}");
    }
    // A quarter of a gigabyte unpacked: not left behind.
    let _ = std::fs::remove_dir_all(root.parent().unwrap());
}

#[tokio::test]
async fn the_single_node_stack_runs_from_the_tarball() {
    let root = unpack();
    let bin = root.join("bin");
    let queen = Daemon::queen(
        QueenOptions {
            binary: Some(bin.join("queen-rbee")),
            ..QueenOptions::cluster(("ops", CLIENT), false, JOIN, HIVE)
        },
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let hive = Daemon::hive(HiveOptions {
        binary: Some(bin.join("rbee-hive")),
        worker_binary: Some(bin.join("llm-worker-rbee")),
        ..HiveOptions::joined(&queen.base_url, "dist-hive", HIVE, JOIN)
    })
    .await
    .unwrap();
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    let resp = c
        .post(queen.url("/v1/chat/completions"))
        .bearer_auth(CLIENT)
        .json(
            &json!({"model": "smollm2", "max_tokens": 8, "temperature": 0,
                      "messages": [{"role": "user", "content": "Say hello."}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 8, "{body}");
    // The worker that answered is the tarball's binary.
    let workers: Value = hive
        .get(&c, "/v1/workers")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pid = workers["workers"][0]["pid"].as_i64().expect("a worker pid") as i32;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, bin.join("llm-worker-rbee").canonicalize().unwrap());
    drop(hive);
    drop(queen);
    let _ = std::fs::remove_dir_all(root.parent().unwrap());
}
