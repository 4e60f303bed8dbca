//! The hive with real worker processes and the real model: supervision, the API, shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use rbee_test_harness::{
    Daemon, HiveOptions, MODEL_FILE, SseData, SseReader, end_event, eventually, joined_text,
    process_alive, reference, temp_dir, workspace_binary, write_token_file,
};
use serde_json::{Value, json};

const TOKEN: &str = "hive-test-token-0123456789";
const MODEL_REF: &str = "file:SmolLM2-135M-Instruct.Q4_1.gguf";

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn worker_pid(v: &Value) -> i32 {
    v["pid"].as_i64().expect("pid") as i32
}

/// The status of `GET /v1/workers` with `token`.
async fn workers_status(c: &reqwest::Client, hive: &Daemon, token: &str) -> reqwest::StatusCode {
    let r = c.get(hive.url("/v1/workers")).bearer_auth(token).send();
    r.await.unwrap().status()
}

/// Waits (10 s at most) until `GET /v1/workers` with `token` answers `want`.
async fn wait_workers_status(hive: &Daemon, token: &str, want: u16, what: &str) {
    let c = client();
    eventually(Duration::from_secs(10), what, || async {
        let status = workers_status(&c, hive, token).await;
        (status == want).then_some(()).ok_or(status)
    })
    .await
    .unwrap();
}

fn kill(pid: i32, sig: i32) {
    unsafe {
        libc::kill(pid, sig);
    }
}

#[tokio::test]
async fn spawn_ready_infer_through_the_hive_and_stop() {
    let hive = Daemon::hive(HiveOptions::default().token(TOKEN))
        .await
        .unwrap();
    let c = client();
    let t0 = Instant::now();
    let id = hive.spawn_worker(&c, MODEL_REF).await.unwrap();
    let returned_in = t0.elapsed();
    let ready = hive
        .wait_worker(&c, &id, Duration::from_secs(120), |v| v["state"] == "ready")
        .await
        .unwrap();
    println!(
        "spawn returned in {:?}; spawn-to-ready {} s (observed {:?})",
        returned_in,
        ready["spawn_to_ready_seconds"],
        t0.elapsed()
    );
    assert!(
        returned_in < Duration::from_secs(2),
        "spawn must return at once"
    );
    assert_eq!(ready["context_length"], 8192);
    assert!(ready["memory_used_bytes"].as_u64().unwrap() > 50 << 20);
    let pid = worker_pid(&ready);
    assert!(process_alive(pid));
    // The worker's token is not on its command line.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("TOKEN"));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&environ).contains("RBEE_HIVE_"),
        "the hive's environment is not inherited"
    );

    // The greedy chat reference answer, through the hive, with our request id.
    let case = &reference().greedy_chat[0];
    let resp = hive
        .post(
            &c,
            &format!("/v1/workers/{id}/inference"),
            &json!({"messages": case.messages, "max_tokens": case.max_tokens, "temperature": 0}),
        )
        .header("x-request-id", "through-the-hive-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "through-the-hive-1");
    let events = SseReader::new(resp).collect().await.unwrap();
    assert_eq!(joined_text(&events), case.text);
    let end = end_event(&events).unwrap();
    assert_eq!(end["completion_tokens"], case.usage.completion_tokens);
    assert!(matches!(events.last(), Some(SseData::Done)));
    let started = match &events[0] {
        SseData::Event(v) => v.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(started["request_id"], "through-the-hive-1");

    // Worker errors pass through in the one JSON shape.
    let bad = hive
        .post(
            &c,
            &format!("/v1/workers/{id}/inference"),
            &json!({"prompt": "x", "temperature": 9}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["code"], "INVALID_PARAMETER");

    let view: Value = hive
        .get(&c, &format!("/v1/workers/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["requests_total"], 2);

    let t1 = Instant::now();
    let stopped = hive
        .delete(&c, &format!("/v1/workers/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(stopped.status(), 200);
    let stopped: Value = stopped.json().await.unwrap();
    println!("API stop took {:?}: {}", t1.elapsed(), stopped["stop"]);
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["stop"]["outcome"], "graceful");
    assert!(!process_alive(pid), "worker process gone after DELETE");
    let gone = hive
        .get(&c, &format!("/v1/workers/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    assert_eq!(
        hive.metric(&c, "rbee_hive_workers_graceful_shutdown_total")
            .await
            .unwrap(),
        1.0
    );
}

#[tokio::test]
async fn every_protected_route_needs_the_token() {
    let hive = Daemon::hive(HiveOptions::default().token(TOKEN))
        .await
        .unwrap();
    let c = client();
    let routes = rbee_hive_core::server::router_routes();
    assert!(routes.len() >= 15);
    for (method, path, public) in routes {
        let concrete = path
            .replace("{id}", "w-00000000")
            .replace("{request_id}", "r1");
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        for auth in [
            None,
            Some("Bearer wrong-token-0123456789"),
            Some("Basic abc"),
        ] {
            let mut req = c.request(m.clone(), hive.url(&concrete));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.unwrap();
            if public {
                assert_ne!(resp.status(), 401, "{method} {path} is public");
            } else {
                assert_eq!(resp.status(), 401, "{method} {path} with {auth:?}");
                assert_eq!(resp.headers()["www-authenticate"], "Bearer");
                let body: Value = resp.json().await.unwrap();
                assert_eq!(body["error"]["code"], "UNAUTHORIZED");
                assert!(!body.to_string().contains("wrong-token"));
            }
        }
    }
    // With the token: 404 in the JSON shape for an unknown worker.
    let resp = hive.get(&c, "/v1/workers/w-00000000").send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "NOT_FOUND");
    assert!(body["error"]["request_id"].as_str().unwrap().len() >= 16);
    assert!(
        hive.metric(&c, "rbee_hive_auth_failures_total")
            .await
            .unwrap()
            >= 30.0,
        "auth failures are counted"
    );
    // Auth failures are audited, without the token, in the failures log: one record per
    // source and reason, not one per request (the rest are counted when the minute ends).
    let audit = hive.audit_with(&["auth.failure"]).await;
    assert!(!audit.contains("wrong-token"));
    let failures = std::fs::read_to_string(hive.failures_log()).unwrap();
    let records = failures.lines().count();
    assert!((1..=2).contains(&records), "{failures}");
    assert!(failures.contains("\"source\":\"127.0.0.1\""), "{failures}");
}

#[tokio::test]
async fn configuration_errors_exit_64_and_name_the_field() {
    let hive_bin = workspace_binary("rbee-hive");
    let dir = temp_dir("hive-config");
    // Token file readable by others.
    let tf = write_token_file(&dir, TOKEN);
    std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(&hive_bin)
        .args(["--listen", "127.0.0.1:0", "--token-file"])
        .arg(&tf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));

    // Non-loopback without a token.
    let out = Command::new(&hive_bin)
        .args(["--listen", "0.0.0.0:0"])
        .env_remove("RBEE_HIVE_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without a token"));

    // check-config: a bad field is named with its line; a typo'd env var by name.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:7835\"\n[workers]\nkeep_alive = 5\n",
    )
    .unwrap();
    let out = Command::new(&hive_bin)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("workers.keep_alive") && err.contains(":3"),
        "{err}"
    );

    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "listen = \"127.0.0.1:7835\"\n[workers]\nkeep_alive_seconds = 60\nport_min = 9000\nport_max = 9010\n",
    )
    .unwrap();
    let out = Command::new(&hive_bin)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("workers.keep_alive_seconds <- file"));

    let out = Command::new(&hive_bin)
        .arg("check-config")
        .arg(&good)
        .env("RBEE_HIVE_WORKERS__MAX_WORKRES", "3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RBEE_HIVE_WORKERS__MAX_WORKRES"));

    // Validation collects every problem.
    let invalid = dir.join("invalid.toml");
    std::fs::write(
        &invalid,
        "[workers]\nport_min = 9100\nport_max = 9000\nmax_workers = 0\n[shutdown]\ndrain_seconds = 60\n",
    )
    .unwrap();
    let out = Command::new(&hive_bin)
        .arg("check-config")
        .arg(&invalid)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for field in ["workers.port_min", "workers.max_workers", "shutdown"] {
        assert!(err.contains(field), "{field} missing in: {err}");
    }
    // The example configuration in the docs is valid.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/examples/hive.toml");
    let out = Command::new(&hive_bin)
        .arg("check-config")
        .arg(example)
        .env("RBEE_HIVE_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn sighup_rotates_the_token_without_a_restart() {
    let hive = Daemon::hive(HiveOptions::default().token(TOKEN))
        .await
        .unwrap();
    let c = client();
    let token_file = hive.dir.join("secrets/token");
    let new = "rotated-hive-token-9876543210";
    // Zero-downtime rotation: the new token in token_file, the old one still accepted from
    // token_previous_files until the next reload drops it.
    let old_file = rbee_test_harness::write_token_file(&hive.dir.join("old"), TOKEN);
    let original = std::fs::read_to_string(hive.config_path()).unwrap();
    std::fs::write(
        hive.config_path(),
        format!(
            "token_previous_files = [{:?}]\n{original}",
            old_file.display().to_string()
        ),
    )
    .unwrap();
    std::fs::write(&token_file, new).unwrap();
    hive.signal(libc::SIGHUP);
    wait_workers_status(&hive, new, 200, "the new token to be accepted").await;
    let both = c
        .get(hive.url("/v1/workers"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        both.status(),
        200,
        "the old token works during the rotation"
    );
    std::fs::write(hive.config_path(), &original).unwrap();
    hive.signal(libc::SIGHUP);
    wait_workers_status(&hive, TOKEN, 401, "the retired token to be refused").await;
    let current = c
        .get(hive.url("/v1/workers"))
        .bearer_auth(new)
        .send()
        .await
        .unwrap();
    assert_eq!(current.status(), 200);
    assert!(process_alive(hive.pid()), "no restart");
    let log = hive.stderr();
    assert!(
        log.contains("SIGHUP: configuration and tokens reloaded"),
        "{log}"
    );
    assert!(
        !log.contains(new) && !log.contains(TOKEN),
        "tokens never logged"
    );
    hive.audit_with(&["config.reload"]).await;

    // Settings: a limit applies at once, the listen address is reported as needing a restart.
    let mut toml = std::fs::read_to_string(hive.config_path()).unwrap();
    toml = toml.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    toml.push_str("max_workers = 1\n"); // the harness writes [workers] last
    std::fs::write(hive.config_path(), toml).unwrap();
    hive.signal(libc::SIGHUP);
    hive.wait_log("these settings change only after a restart")
        .await
        .unwrap();
    let log = hive.stderr();
    assert!(log.contains("needs_restart=[\"listen\"]"), "{log}");
    assert!(log.contains("\"workers.max_workers\""), "{log}");
    let c2 = reqwest::Client::new();
    let spawn = |c: &reqwest::Client| {
        c.post(hive.url("/v1/workers"))
            .bearer_auth(new)
            .json(&json!({"model": MODEL_REF}))
            .send()
    };
    assert_eq!(spawn(&c2).await.unwrap().status(), 202);
    let second = spawn(&c2).await.unwrap();
    assert_eq!(second.status(), 507);
    // A broken file changes nothing.
    std::fs::write(hive.config_path(), "listen = [").unwrap();
    hive.signal(libc::SIGHUP);
    hive.wait_log("reload failed").await.unwrap();
    let still = c
        .get(hive.url("/v1/workers"))
        .bearer_auth(new)
        .send()
        .await
        .unwrap();
    assert_eq!(still.status(), 200);
    // A file without the token does not turn authentication off.
    std::fs::write(hive.config_path(), "listen = \"127.0.0.1:0\"\n").unwrap();
    hive.signal(libc::SIGHUP);
    hive.wait_log("has no hive token").await.unwrap();
    let anonymous = c.get(hive.url("/v1/workers")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn systemd_hears_ready_reloading_and_stopping() {
    let dir = temp_dir("notify");
    let sock_path = dir.join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let mut hive = Daemon::hive(HiveOptions {
        env: vec![("NOTIFY_SOCKET".into(), sock_path.display().to_string())],
        ..HiveOptions::default()
    })
    .await
    .unwrap();
    let mut buf = vec![0u8; 512];
    let mut next = async || {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
            .await
            .expect("a notification")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(next().await.starts_with("READY=1"));
    hive.signal(libc::SIGHUP);
    let reloading = next().await;
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert!(next().await.starts_with("READY=1"));
    hive.signal(libc::SIGTERM);
    assert!(next().await.starts_with("STOPPING=1"));
    assert!(
        hive.wait_exit(Duration::from_secs(10))
            .await
            .unwrap()
            .success()
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_streams_and_refuses_new_work() {
    let mut hive = Daemon::hive(HiveOptions::default()).await.unwrap();
    let c = client();
    let w = hive.ready_worker(&c).await.unwrap();
    let id = w["id"].as_str().unwrap();
    let resp = hive
        .post(
            &c,
            &format!("/v1/workers/{id}/inference"),
            &json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 150, "temperature": 0}),
        )
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(resp);
    reader.next().await.unwrap();
    hive.signal(libc::SIGTERM);
    let spawn = json!({"model": MODEL_REF});
    let what = "new work to be refused";
    let refusal: Value = eventually(Duration::from_secs(2), what, || async {
        let r = hive.post(&c, "/v1/workers", &spawn).send().await.unwrap();
        let status = r.status();
        match status.as_u16() {
            503 => Ok(r.json::<Value>().await.unwrap()),
            _ => Err(status),
        }
    })
    .await
    .unwrap();
    assert_eq!(refusal["error"]["code"], "SHUTTING_DOWN");
    let health = c.get(hive.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    let mut rest = Vec::new();
    while let Some(ev) = reader.next().await.unwrap() {
        rest.push(ev);
    }
    let end = end_event(&rest).expect("the in-flight stream finished");
    assert_eq!(end["stop_reason"], "max_tokens");
    assert_eq!(end["completion_tokens"], 150);
    assert!(
        hive.wait_exit(Duration::from_secs(30))
            .await
            .unwrap()
            .success()
    );
    assert!(!process_alive(worker_pid(&w)));
}

#[tokio::test]
async fn crashed_workers_restart_with_backoff_until_the_breaker_opens() {
    let hive = Daemon::hive(
        HiveOptions::default()
            .token(TOKEN)
            .env("RESTART__MAX_ATTEMPTS", 2)
            .env("RESTART__BACKOFF_INITIAL_MS", 200)
            .env("RESTART__BACKOFF_MAX_MS", 1000),
    )
    .await
    .unwrap();
    let c = client();
    let first = hive.ready_worker(&c).await.unwrap();
    let id = first["id"].as_str().unwrap().to_owned();
    let pid1 = worker_pid(&first);
    kill(pid1, libc::SIGKILL);
    let t0 = Instant::now();
    let second = hive
        .wait_worker(&c, &id, Duration::from_secs(120), |v| {
            v["state"] == "ready" && v["restart_count"] == 1
        })
        .await
        .unwrap();
    println!("restarted after kill -9 in {:?}", t0.elapsed());
    assert_ne!(worker_pid(&second), pid1);
    assert_eq!(second["last_exit"]["signal"], 9);
    assert!(
        second["last_exit"]["reason"]
            .as_str()
            .unwrap()
            .contains("exited unexpectedly")
    );
    assert!(!second["stderr_tail"].as_array().unwrap().is_empty());
    assert_eq!(
        hive.metric(&c, "rbee_hive_worker_restarts_total")
            .await
            .unwrap(),
        1.0
    );
    assert_eq!(
        hive.metric(
            &c,
            &format!("rbee_hive_worker_lifetime_restarts{{worker_id=\"{id}\"}}")
        )
        .await
        .unwrap(),
        1.0
    );
    // It still answers.
    let r = hive
        .post(
            &c,
            &format!("/v1/workers/{id}/inference"),
            &json!({"prompt": "1, 2, 3,", "max_tokens": 2}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = SseReader::new(r).collect().await.unwrap();
    assert!(end_event(&events).is_some());

    // Second crash inside the window: the breaker opens (max_attempts = 2).
    kill(worker_pid(&second), libc::SIGKILL);
    let failed = hive
        .wait_worker(&c, &id, Duration::from_secs(30), |v| v["state"] == "failed")
        .await
        .unwrap();
    assert_eq!(failed["breaker_open"], true);
    assert!(
        failed["failure"]
            .as_str()
            .unwrap()
            .contains("circuit breaker open")
    );
    assert_eq!(
        hive.metric(&c, "rbee_hive_worker_breaker_open_total")
            .await
            .unwrap(),
        1.0
    );
    assert_eq!(
        hive.metric(&c, "rbee_hive_worker_crashes_total")
            .await
            .unwrap(),
        2.0
    );
    // A failed worker is removed by DELETE.
    let del = hive
        .delete(&c, &format!("/v1/workers/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    hive.audit_with(&["worker.crash", "worker.restart", "worker.breaker_open"])
        .await;
}

#[tokio::test]
async fn sigterm_stops_three_workers_one_of_them_frozen_within_30s() {
    let textfile = temp_dir("textfile").join("hive.prom");
    let mut hive = Daemon::hive(
        HiveOptions {
            extra_args: vec!["--metrics-textfile".into(), textfile.display().to_string()],
            ..HiveOptions::default()
        }
        .token(TOKEN)
        // One worker per request, so the same model runs in three processes.
        .env("WORKERS__PARALLEL", 1),
    )
    .await
    .unwrap();
    let c = client();
    let mut pids = Vec::new();
    for _ in 0..3 {
        pids.push(worker_pid(&hive.ready_worker(&c).await.unwrap()));
    }
    // One worker will not answer the stop request or SIGTERM.
    kill(pids[2], libc::SIGSTOP);
    let t0 = Instant::now();
    hive.signal(libc::SIGTERM);
    let status = hive
        .wait_exit(Duration::from_secs(35))
        .await
        .expect("hive exits");
    let took = t0.elapsed();
    println!("shutdown with one frozen worker: {took:?}");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    for pid in &pids {
        assert!(!process_alive(*pid), "worker {pid} is gone");
    }
    let prom = std::fs::read_to_string(&textfile).unwrap();
    let value = |name: &str| -> f64 {
        prom.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("rbee_hive_workers_graceful_shutdown_total"), 2.0);
    assert_eq!(value("rbee_hive_workers_force_killed_total"), 1.0);
    let d = value("rbee_hive_shutdown_duration_seconds");
    assert!(d > 9.0 && d < 30.0, "duration {d}");
}

#[tokio::test]
async fn sigterm_with_cooperative_workers_is_quick() {
    let mut hive = Daemon::hive(HiveOptions::default().env("WORKERS__PARALLEL", 1))
        .await
        .unwrap();
    let c = client();
    let mut pids = Vec::new();
    for _ in 0..2 {
        pids.push(worker_pid(&hive.ready_worker(&c).await.unwrap()));
    }
    let t0 = Instant::now();
    hive.signal(libc::SIGTERM);
    let status = hive
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("hive exits");
    println!("cooperative shutdown of 2 workers: {:?}", t0.elapsed());
    assert!(status.success());
    assert!(t0.elapsed() < Duration::from_secs(10));
    for pid in pids {
        assert!(!process_alive(pid));
    }
}

#[tokio::test]
async fn sigkill_of_the_hive_leaves_no_worker_behind() {
    let mut hive = Daemon::hive(HiveOptions::default()).await.unwrap();
    let c = client();
    let pid = worker_pid(&hive.ready_worker(&c).await.unwrap());
    hive.signal(libc::SIGKILL);
    hive.wait_exit(Duration::from_secs(5))
        .await
        .expect("hive died");
    let what = format!("worker {pid} to die with its hive (not be orphaned)");
    eventually(Duration::from_secs(5), &what, || async {
        (!process_alive(pid)).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn admission_refuses_what_does_not_fit_with_figures() {
    let hive = Daemon::hive(
        HiveOptions::default()
            .token(TOKEN)
            .env("RESOURCES__MAX_MEMORY_MB", 300),
    )
    .await
    .unwrap();
    let c = client();
    let resp = hive
        .post(&c, "/v1/workers", &json!({"model": MODEL_REF}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 507);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "INSUFFICIENT_RESOURCES");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("needs 527 MiB") && msg.contains("300 MiB is available"),
        "{msg}"
    );
    // A smaller context fits: 2048 tokens of KV cache instead of 8192.
    let resp = hive
        .post(
            &c,
            "/v1/workers",
            &json!({"model": MODEL_REF, "max_context": 2048}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    assert_eq!(
        hive.metric(
            &c,
            "rbee_hive_admission_refusals_total{reason=\"memory_limit\"}"
        )
        .await
        .unwrap(),
        1.0
    );
}

#[tokio::test]
async fn max_workers_and_bad_model_refs_are_refused() {
    // A GGUF of an architecture the worker does not run, in a second model directory.
    let mut gguf = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../test-harness/testdata/arch/llama-tiny-f32.gguf"),
    )
    .unwrap();
    let at = gguf.windows(5).position(|w| w == b"llama").unwrap();
    gguf[at..at + 5].copy_from_slice(b"mamba");
    let other_models = rbee_test_harness::temp_dir("mamba");
    std::fs::write(other_models.join("mamba.gguf"), &gguf).unwrap();
    let mut opts = HiveOptions::default()
        .token(TOKEN)
        .env("WORKERS__MAX_WORKERS", 1);
    opts.model_dirs.push(other_models);
    let hive = Daemon::hive(opts).await.unwrap();
    let c = client();
    for (model, status, code) in [
        ("file:../etc/passwd.gguf", 400, ""),
        ("file:/etc/passwd", 400, ""),
        ("file:../../../../../../etc/hostname", 400, ""),
        ("hf:../../x", 400, "INVALID_MODEL_REF"),
        ("hf:org/repo:../../x.gguf", 400, "INVALID_MODEL_REF"),
        ("nonsense", 400, "INVALID_MODEL_REF"),
        ("file:missing.gguf", 404, "MODEL_NOT_FOUND"),
        ("hf:HuggingFaceTB/not-downloaded", 404, "MODEL_NOT_FOUND"),
    ] {
        let resp = hive
            .post(&c, "/v1/workers", &json!({"model": model}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{model}");
        let body: Value = resp.json().await.unwrap();
        if !code.is_empty() {
            assert_eq!(body["error"]["code"], code, "{model}: {body}");
        }
    }
    for (body, field) in [
        (json!({"model": MODEL_REF, "device": "tpu"}), "device"),
        (json!({"model": MODEL_REF, "gpu": 1}), "gpu"),
        (json!({"model": MODEL_REF, "max_context": 0}), "max_context"),
    ] {
        let resp = hive.post(&c, "/v1/workers", &body).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert!(
            err["error"]["message"].as_str().unwrap().contains(field),
            "{err}"
        );
    }
    // Refused by name at spawn, and no worker started.
    let resp = hive
        .post(&c, "/v1/workers", &json!({"model": "file:mamba.gguf"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "INVALID_GGUF", "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`mamba`") && message.contains("gemma3"),
        "{err}"
    );
    let workers: Value = hive
        .get(&c, "/v1/workers")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        workers["workers"].as_array().map(Vec::len),
        Some(0),
        "{workers}"
    );
    let no_cuda = hive
        .post(
            &c,
            "/v1/workers",
            &json!({"model": MODEL_REF, "device": "cuda:0"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(no_cuda.status(), 400);
    let err: Value = no_cuda.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("workers.binary_cuda")
    );

    hive.spawn_worker(&c, MODEL_REF).await.unwrap();
    let second = hive
        .post(&c, "/v1/workers", &json!({"model": MODEL_REF}))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 507);
    let err: Value = second.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_workers (1)")
    );
}

#[tokio::test]
async fn a_worker_gets_and_is_admitted_for_the_kv_pool_the_hive_sets() {
    let c = client();
    let default = Daemon::hive(HiveOptions::default().token(TOKEN))
        .await
        .unwrap();
    let w = default.ready_worker(&c).await.unwrap();
    let (full_estimate, full_context) = (
        w["memory_estimate_bytes"].as_u64().unwrap(),
        w["context_length"].as_u64().unwrap(),
    );
    let small = Daemon::hive(
        HiveOptions::default()
            .token(TOKEN)
            .env("WORKERS__KV_TOKENS", 2048),
    )
    .await
    .unwrap();
    let w = small.ready_worker(&c).await.unwrap();
    // The worker's context never exceeds its pool; the estimate counts the pool, not the
    // model's whole context.
    assert_eq!(full_context, 8192);
    assert_eq!(w["context_length"], 2048, "{w}");
    let kv_per_position = 30 * 2 * 3 * 64 * 4;
    assert_eq!(
        full_estimate - w["memory_estimate_bytes"].as_u64().unwrap(),
        (8192 - 2048) * kv_per_position,
        "{w}"
    );
}

#[tokio::test]
async fn a_second_copy_of_a_model_on_the_same_device_is_refused() {
    let hive = Daemon::hive(HiveOptions::default().token(TOKEN))
        .await
        .unwrap();
    let c = client();
    let first = hive.spawn_worker(&c, MODEL_REF).await.unwrap();
    let second = hive
        .post(&c, "/v1/workers", &json!({"model": MODEL_REF}))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 507);
    let err: Value = second.json().await.unwrap();
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains("already runs on cpu"), "{err}");
    assert!(
        message.contains(&first),
        "names the worker that batches: {err}"
    );
    let refusals = hive
        .metric(
            &c,
            "rbee_hive_admission_refusals_total{reason=\"same_model\"}",
        )
        .await
        .unwrap();
    assert_eq!(refusals, 1.0);
}

#[tokio::test]
async fn a_client_that_goes_away_frees_the_worker_at_once() {
    // One slot, so a second request is refused while the first streams.
    let hive = Daemon::hive(
        HiveOptions::default()
            .token(TOKEN)
            .env("WORKERS__PARALLEL", 1),
    )
    .await
    .unwrap();
    let c = client();
    let w = hive.ready_worker(&c).await.unwrap();
    let id = w["id"].as_str().unwrap();
    let path = format!("/v1/workers/{id}/inference");
    let long = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 400, "temperature": 0});
    let resp = hive.post(&c, &path, &long).send().await.unwrap();
    let mut reader = SseReader::new(resp);
    for _ in 0..3 {
        reader.next().await.unwrap();
    }
    // Busy: a second request is refused with Retry-After.
    let busy = hive.post(&c, &path, &long).send().await.unwrap();
    assert_eq!(busy.status(), 503);
    assert_eq!(busy.headers()["retry-after"], "1");
    drop(reader);
    let t0 = Instant::now();
    let hi = json!({"prompt": "Hi", "max_tokens": 1});
    let events = eventually(Duration::from_secs(1), "the worker to be free", || async {
        let r = hive.post(&c, &path, &hi).send().await.unwrap();
        match r.status().as_u16() {
            200 => Ok(SseReader::new(r).collect().await.unwrap()),
            _ => Err(r.status()),
        }
    })
    .await
    .unwrap();
    assert!(end_event(&events).is_some());
    let freed = t0.elapsed();
    println!("worker served the next request {freed:?} after the client left");
    assert!(freed < Duration::from_secs(1), "{freed:?}");

    // Cancel by request id through the hive.
    let resp = hive
        .post(&c, &path, &long)
        .header("x-request-id", "cancel-me-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut reader = SseReader::new(resp);
    let first = reader.next().await.unwrap();
    assert!(
        matches!(first, Some(SseData::Event(ref v)) if v["type"] == "started"),
        "{first:?}"
    );
    let del = hive
        .delete(&c, "/v1/inference/cancel-me-1")
        .send()
        .await
        .unwrap();
    assert!(del.status().is_success(), "{}", del.text().await.unwrap());
    let mut rest = Vec::new();
    while let Some(ev) = reader.next().await.unwrap() {
        rest.push(ev);
    }
    assert_eq!(end_event(&rest).unwrap()["stop_reason"], "cancelled");
    let unknown = hive
        .delete(&c, "/v1/inference/never-was")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // A deadline passes through.
    let resp = hive
        .post(&c, &path, &long)
        .header("x-deadline-ms", (rbee_unix_ms() + 300).to_string())
        .send()
        .await
        .unwrap();
    let events = SseReader::new(resp).collect().await.unwrap();
    assert_eq!(end_event(&events).unwrap()["stop_reason"], "deadline");
}

fn rbee_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn a_worker_crash_mid_stream_ends_the_stream_with_an_error_event() {
    let hive = Daemon::hive(HiveOptions::default().env("RESTART__ENABLED", false))
        .await
        .unwrap();
    let c = client();
    let w = hive.ready_worker(&c).await.unwrap();
    let id = w["id"].as_str().unwrap();
    let resp = hive
        .post(
            &c,
            &format!("/v1/workers/{id}/inference"),
            &json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 400, "temperature": 0}),
        )
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(resp);
    reader.next().await.unwrap();
    kill(worker_pid(&w), libc::SIGKILL);
    let mut rest = Vec::new();
    while let Some(ev) = reader.next().await.unwrap() {
        rest.push(ev);
    }
    let err = rest
        .iter()
        .find_map(|e| match e {
            SseData::Event(v) if v["type"] == "error" => Some(v.clone()),
            _ => None,
        })
        .expect("an error event");
    assert_eq!(err["code"], "WORKER_UNAVAILABLE");
    assert!(matches!(rest.last(), Some(SseData::Done)));
    let failed = hive
        .wait_worker(&c, id, Duration::from_secs(10), |v| v["state"] == "failed")
        .await
        .unwrap();
    assert!(
        failed["failure"]
            .as_str()
            .unwrap()
            .contains("restarts are disabled")
    );
}

#[tokio::test]
async fn idle_workers_stop_after_the_keep_alive_and_probes_do_not_count() {
    let hive = Daemon::hive(
        HiveOptions::default()
            .env("WORKERS__KEEP_ALIVE_SECONDS", 4)
            .env("WORKERS__HEALTH_INTERVAL_SECONDS", 1)
            .env("WORKERS__HEALTH_PROBE_IDLE_SECONDS", 0),
    )
    .await
    .unwrap();
    let c = client();
    let w = hive.ready_worker(&c).await.unwrap();
    let id = w["id"].as_str().unwrap().to_owned();
    let used_at = w["last_used_unix_ms"].clone();
    let t0 = Instant::now();
    let saw_generation_probe = std::cell::Cell::new(false);
    let what = "the keep-alive to stop the unused worker";
    eventually(Duration::from_secs(20), what, || async {
        // Scrapes and reads are not use.
        let _ = hive.get(&c, "/metrics").send().await.unwrap();
        let r = hive
            .get(&c, &format!("/v1/workers/{id}"))
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            return Ok(());
        }
        let v: Value = r.json().await.unwrap();
        if v["state"] == "ready" {
            assert_eq!(
                v["last_used_unix_ms"], used_at,
                "probes must not count as use"
            );
        }
        let probes = hive
            .metric(
                &c,
                "rbee_hive_health_probes_total{kind=\"generate\",outcome=\"ok\"}",
            )
            .await
            .unwrap();
        if probes >= 1.0 {
            saw_generation_probe.set(true);
        }
        Err(format!("not stopped: {v}"))
    })
    .await
    .unwrap();
    let saw_generation_probe = saw_generation_probe.get();
    let idle_for = t0.elapsed();
    println!("keep-alive stop after {idle_for:?}");
    assert!(idle_for >= Duration::from_secs(2));
    assert!(saw_generation_probe, "a 1-token generation probe ran");
    assert_eq!(
        hive.metric(&c, "rbee_hive_keep_alive_stops_total")
            .await
            .unwrap(),
        1.0
    );
    assert!(!process_alive(worker_pid(&w)));
}

#[tokio::test]
async fn a_worker_that_never_reports_ready_is_killed_with_a_reason() {
    // A stand-in worker that starts and then hangs (test double for a misbehaving worker).
    let dir = temp_dir("hang-worker");
    let script = dir.join("hang-worker");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'pretending to load' >&2\nexec sleep 300\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hive = Daemon::hive(HiveOptions {
        worker_binary: Some(script),
        ..HiveOptions::default()
            .env("WORKERS__LOAD_TIMEOUT_SECONDS", 1)
            .env("RESTART__MAX_ATTEMPTS", 1)
    })
    .await
    .unwrap();
    let c = client();
    let id = hive.spawn_worker(&c, MODEL_REF).await.unwrap();
    let failed = hive
        .wait_worker(&c, &id, Duration::from_secs(15), |v| v["state"] == "failed")
        .await
        .unwrap();
    let reason = failed["last_exit"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("did not report ready within 1 s"),
        "{reason}"
    );
    assert_eq!(failed["last_exit"]["signal"], 9);
    assert_eq!(failed["stderr_tail"][0], "pretending to load");
}

#[tokio::test]
async fn worker_events_stream_shows_readiness() {
    let hive = Daemon::hive(HiveOptions::default().token(TOKEN))
        .await
        .unwrap();
    let c = client();
    let resp = hive.get(&c, "/v1/workers/events").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = SseReader::new(resp);
    let id = hive.spawn_worker(&c, MODEL_REF).await.unwrap();
    let mut states = Vec::new();
    // Read until the worker is ready; a stream that goes quiet fails at the timeout.
    let _ = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let Some(SseData::Event(ev)) = events.next().await.unwrap() else {
                panic!("stream ended");
            };
            if ev["worker"]["id"] == id.as_str() {
                states.push(ev["worker"]["state"].as_str().unwrap().to_owned());
                if ev["worker"]["state"] == "ready" {
                    break;
                }
            }
        }
    })
    .await;
    assert_eq!(states.first().map(String::as_str), Some("starting"));
    assert_eq!(states.last().map(String::as_str), Some("ready"));
    // A late subscriber gets a snapshot first.
    let late = hive.get(&c, "/v1/workers/events").send().await.unwrap();
    let mut late = SseReader::new(late);
    let Some(SseData::Event(first)) = late.next().await.unwrap() else {
        panic!("no snapshot");
    };
    assert_eq!(first["kind"], "snapshot");
    assert_eq!(first["worker"]["state"], "ready");
}

#[tokio::test]
async fn models_are_listed_and_deletion_waits_for_workers() {
    // A model directory of its own, so deleting does not touch the shared test model.
    let dir = temp_dir("models");
    let src = rbee_test_harness::test_model();
    let copy = dir.join(MODEL_FILE);
    if std::fs::hard_link(&src, &copy).is_err() {
        std::fs::copy(&src, &copy).unwrap();
    }
    let hive = Daemon::hive(HiveOptions {
        model_dirs: vec![dir.clone()],
        ..HiveOptions::default().token(TOKEN)
    })
    .await
    .unwrap();
    let c = client();
    let list: Value = hive
        .get(&c, "/v1/models")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let models = list["models"].as_array().unwrap();
    assert_eq!(models.len(), 1);
    assert_eq!(models[0]["reference"], MODEL_REF);
    assert_eq!(models[0]["bytes"], rbee_test_harness::MODEL_BYTES);
    let model_id = models[0]["id"].as_str().unwrap().to_owned();
    let w = hive.ready_worker(&c).await.unwrap();
    let refused = hive
        .delete(&c, &format!("/v1/models/{model_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "MODEL_IN_USE");
    hive.delete(&c, &format!("/v1/workers/{}", w["id"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    let ok = hive
        .delete(&c, &format!("/v1/models/{model_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(!copy.exists());
    let again = hive
        .delete(&c, &format!("/v1/models/{model_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    hive.audit_with(&["model.delete"]).await;

    // Node resources.
    let res: Value = hive
        .get(&c, "/v1/resources")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(res["resources"]["cpu_cores"].as_u64().unwrap() >= 1);
    assert!(res["resources"]["memory_total_bytes"].as_u64().unwrap() > 1 << 30);
    assert!(res["resources"]["gpus"].is_array());
}

#[tokio::test]
async fn audit_log_verifies_and_tampering_is_found() {
    let hive = Daemon::hive(HiveOptions::default().token(TOKEN))
        .await
        .unwrap();
    let c = client();
    // A few events: auth failure, spawn, ready.
    let _ = c.get(hive.url("/v1/workers")).send().await.unwrap();
    hive.ready_worker(&c).await.unwrap();
    hive.audit_with(&["auth.failure", "worker.spawn", "worker.ready"])
        .await;
    let log = hive.audit_log();
    let bin = workspace_binary("rbee-hive");
    let out = Command::new(&bin)
        .args(["audit", "verify"])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact"));
    let tampered = temp_dir("audit").join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let edited = text.replacen("\"actor\":\"hive\"", "\"actor\":\"mallory\"", 1);
    assert_ne!(edited, text);
    std::fs::write(&tampered, edited).unwrap();
    let out = Command::new(&bin)
        .args(["audit", "verify"])
        .arg(&tampered)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("BROKEN at line"), "{report}");
}

#[tokio::test]
async fn metrics_pass_promtool() {
    let hive = Daemon::hive(HiveOptions::default()).await.unwrap();
    let c = client();
    hive.ready_worker(&c).await.unwrap();
    let text = c
        .get(hive.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "rbee_hive_workers{state=\"ready\"} 1",
        "rbee_hive_worker_spawn_to_ready_seconds_count 1",
        "rbee_hive_worker_memory_estimate_ratio{worker_id=",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    rbee_test_harness::promtool_check_metrics(&text);
}

/// A stand-in queen that records heartbeats (the queen's side of the wire as the hive sees
/// it). With `binds = Some(join)` it binds the hive's id on a beat with that join token, as
/// the real queen does: the answer carries a credential and the token it will call the hive
/// with.
async fn queen_double(
    binds: Option<&'static str>,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(Option<String>, Value)>>>,
    tokio::task::JoinHandle<()>,
) {
    use axum::routing::post;
    let beats = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = beats.clone();
    let app = axum::Router::new().route(
        "/v1/hives/heartbeat",
        post(
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                let sink = sink.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let mut answer = json!({"hive_id": body["hive_id"], "approved": true});
                    if binds.is_some_and(|j| auth.as_deref() == Some(&format!("Bearer {j}"))) {
                        answer["credential"] = json!(ISSUED_CREDENTIAL);
                        answer["queen_token"] = json!(ISSUED_QUEEN_TOKEN);
                    }
                    sink.lock().unwrap().push((auth, body));
                    axum::Json(answer)
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, beats, task)
}

const ISSUED_CREDENTIAL: &str = "rbh_issued-credential-0123456789abcdef";
const ISSUED_QUEEN_TOKEN: &str = "rbq_issued-queen-token-0123456789abcdef";

#[tokio::test]
async fn a_joined_hive_beats_with_its_issued_credential_and_keeps_it_across_a_restart() {
    let join = "join-token-abcdefghijklmnop";
    let (url, beats, _queen) = queen_double(Some(join)).await;
    let opts = || {
        HiveOptions::default()
            .token(TOKEN)
            .env("QUEEN__URL", &url)
            .env("QUEEN__HEARTBEAT_SECONDS", 1)
            .env("HIVE_ID", "hive-id-1")
            .env("JOIN_TOKEN", join)
    };
    let mut hive = Daemon::hive(opts()).await.unwrap();
    let issued = format!("Bearer {ISSUED_CREDENTIAL}");
    eventually(
        Duration::from_secs(15),
        "a beat with the issued credential",
        || async {
            beats
                .lock()
                .unwrap()
                .iter()
                .any(|(a, _)| a.as_deref() == Some(issued.as_str()))
                .then_some(())
        },
    )
    .await
    .unwrap();
    assert_eq!(
        beats.lock().unwrap()[0].0.as_deref(),
        Some(format!("Bearer {join}").as_str()),
        "the first beat asks with the join token"
    );
    let file = hive.dir.join("queen-credential.json");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // The queen's token opens this hive's API; anything else does not.
    let c = client();
    let ok = c
        .get(hive.url("/v1/workers"))
        .bearer_auth(ISSUED_QUEEN_TOKEN);
    assert_eq!(ok.send().await.unwrap().status(), 200);
    let no = c
        .get(hive.url("/v1/workers"))
        .bearer_auth(ISSUED_CREDENTIAL);
    assert_eq!(no.send().await.unwrap().status(), 401);
    // A restarted hive beats as itself from its first beat on.
    hive.stop(Duration::from_secs(10)).await.unwrap();
    beats.lock().unwrap().clear();
    let restarted = Daemon::hive(opts().env("QUEEN__CREDENTIAL_FILE", file.display().to_string()))
        .await
        .unwrap();
    let first = eventually(
        Duration::from_secs(15),
        "a beat after the restart",
        || async { beats.lock().unwrap().first().map(|(a, _)| a.clone()) },
    )
    .await
    .unwrap();
    assert_eq!(first.as_deref(), Some(issued.as_str()));
    let ok = c
        .get(restarted.url("/v1/workers"))
        .bearer_auth(ISSUED_QUEEN_TOKEN);
    assert_eq!(ok.send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn heartbeats_reach_the_queen_and_the_hive_serves_on_without_it() {
    let (url, beats, queen) = queen_double(None).await;
    let join = "join-token-abcdefghijklmnop";
    let hive = Daemon::hive(
        HiveOptions::default()
            .token(TOKEN)
            .env("QUEEN__URL", &url)
            .env("QUEEN__HEARTBEAT_SECONDS", 1)
            .env("HIVE_ID", "test-hive-1")
            .env("JOIN_TOKEN", join),
    )
    .await
    .unwrap();
    let c = client();
    let w = hive.ready_worker(&c).await.unwrap();
    let what = "a heartbeat with a ready worker";
    let beat = eventually(Duration::from_secs(20), what, || async {
        beats
            .lock()
            .unwrap()
            .iter()
            .find(|(_, b)| {
                b["workers"]
                    .as_array()
                    .is_some_and(|ws| ws.iter().any(|x| x["state"] == "ready"))
            })
            .cloned()
    })
    .await
    .unwrap();
    assert_eq!(beat.0.as_deref(), Some(format!("Bearer {join}").as_str()));
    let body = beat.1;
    assert_eq!(body["hive_id"], "test-hive-1");
    assert_eq!(body["url"], hive.base_url);
    assert_eq!(body["workers"][0]["id"], w["id"]);
    assert_eq!(body["workers"][0]["busy"], false);
    assert!(
        body["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == MODEL_REF)
    );
    assert!(
        body["resources"]["memory_available_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    // The join token is not inherited by the worker.
    let environ = std::fs::read(format!("/proc/{}/environ", worker_pid(&w))).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&environ).contains(join));

    // Queen gone: the hive keeps serving and counts the failures.
    queen.abort();
    let _ = queen.await;
    let failed = "rbee_hive_heartbeats_total{outcome=\"failed\"}";
    eventually(
        Duration::from_secs(20),
        "a failed heartbeat counted",
        || async {
            let n = hive.metric(&c, failed).await.unwrap();
            (n >= 1.0).then_some(())
        },
    )
    .await
    .unwrap();
    let health = c.get(hive.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let r = hive
        .post(
            &c,
            &format!("/v1/workers/{}/inference", w["id"].as_str().unwrap()),
            &json!({"prompt": "Hi", "max_tokens": 2}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_half_sent_request_head_is_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hive = Daemon::hive(HiveOptions::default().token(TOKEN))
        .await
        .unwrap();
    let addr = hive.base_url.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /v1/workers HTTP/1.1\r\nHost: hive\r\nX-Slow: ")
        .await
        .unwrap();
    let t0 = Instant::now();
    // Meanwhile the hive serves others.
    let resp = hive.get(&client(), "/v1/workers").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection stayed open");
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(9), "closed after {took:?}");
}

#[tokio::test]
async fn a_worker_cannot_read_the_hives_token_file() {
    let hive = Daemon::hive(HiveOptions::default().token(TOKEN))
        .await
        .unwrap();
    let c = client();
    let worker = hive.ready_worker(&c).await.unwrap();
    // The worker the hive spawned can gain no privileges, and it still serves.
    let status = std::fs::read_to_string(format!("/proc/{}/status", worker_pid(&worker))).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    // No core dumps (its memory holds tokens and prompts).
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", worker_pid(&worker))).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    let id = worker["id"].as_str().unwrap();
    let resp = hive
        .post(
            &c,
            &format!("/v1/workers/{id}/inference"),
            &json!({"prompt": "1, 2, 3,", "max_tokens": 2}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The same confinement, asked to read the hive's token file (the worker binary the hive
    // runs, with the model it was given): refused.
    let token_file = hive.dir.join("secrets/token");
    assert!(
        std::fs::read_to_string(&token_file)
            .unwrap()
            .contains(TOKEN)
    );
    let out = Command::new(workspace_binary("llm-worker-rbee"))
        .arg("--model")
        .arg(rbee_test_harness::test_model())
        .arg("--check-confinement")
        .arg(&token_file)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let logged = String::from_utf8_lossy(&out.stderr);
    if landlock_abi() < 1 {
        // A kernel without Landlock: the worker must say its file access is open, not
        // pretend.
        assert!(logged.contains("file access not confined"), "{logged}");
        eprintln!("this kernel has no Landlock: checked that the worker says so");
        return;
    }
    assert_eq!(out.status.code(), Some(0), "{said}{logged}");
    assert!(said.contains("refused"), "{said}");
}

/// The Landlock ABI version this kernel offers (0 or less: none).
fn landlock_abi() -> i64 {
    const CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns a number.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    }
}

#[tokio::test]
async fn a_failed_workers_record_is_dropped_after_failed_keep_seconds() {
    let dir = temp_dir("gc-worker");
    let script = dir.join("fails.sh");
    std::fs::write(&script, "#!/bin/sh\necho 'cannot load' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hive = Daemon::hive(HiveOptions {
        worker_binary: Some(script),
        ..HiveOptions::default()
            .env("RESTART__MAX_ATTEMPTS", 1)
            .env("WORKERS__FAILED_KEEP_SECONDS", 2)
    })
    .await
    .unwrap();
    let c = client();
    let id = hive.spawn_worker(&c, MODEL_REF).await.unwrap();
    let failed = hive
        .wait_worker(&c, &id, Duration::from_secs(15), |v| v["state"] == "failed")
        .await
        .unwrap();
    assert_eq!(failed["stderr_tail"][0], "cannot load");
    // Kept for its report a while, then gone from the registry.
    let path = format!("/v1/workers/{id}");
    eventually(
        Duration::from_secs(15),
        "the failed record dropped",
        || async {
            let status = hive.get(&c, &path).send().await.unwrap().status();
            (status == 404).then_some(()).ok_or(status)
        },
    )
    .await
    .unwrap();
    assert!(hive.stderr().contains("dropped the failed worker's record"));
}
