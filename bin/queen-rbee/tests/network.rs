//! The queen's network edge: one address opening many connections that send half a request head
//! and then nothing (slowloris) neither exhausts the queen nor stops the hives' heartbeats, and
//! its connections are closed after the header timeout; dev mode answers only loopback `Host`s
//! (DNS rebinding) and JSON bodies must say so (no plain form posts).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use rbee_test_harness::{Daemon, HiveOptions, QueenOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT: &str = "client-token-0123456789abcdef";
const JOIN: &str = "join-token-0123456789abcdef";
const HIVE: &str = "hive-token-0123456789abcdef";

/// A connection from `source` (another loopback address than the hive's) that sends half a
/// request head.
async fn slow_connection(source: &str, port: u16) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    // Writing may fail once the queen has closed a refused connection; that is fine.
    let _ = stream
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: queen\r\nX-Slow: ")
        .await;
    stream
}

/// Whether the server closed `stream` (EOF or reset) within `wait`.
async fn closed_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(wait, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        // The server answered something (a 408, say) and may close next: read on.
        Ok(Ok(_)) => matches!(
            tokio::time::timeout(wait, stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        ),
        Err(_) => false,
    }
}

#[tokio::test]
async fn slow_clients_are_capped_and_timed_out_and_heartbeats_go_on() {
    let mut opts = QueenOptions::cluster(("alice", CLIENT), true, JOIN, HIVE);
    opts.config_tail.push_str(
        "\n[server]\nheader_read_timeout_seconds = 3\nmax_connections = 200\nmax_connections_per_peer = 40\n",
    );
    let queen = Daemon::queen(opts, "127.0.0.1:0").await.unwrap();
    let port: u16 = queen.base_url.rsplit(':').next().unwrap().parse().unwrap();
    let hive = Daemon::hive(HiveOptions::joined(&queen.base_url, "hive-a", HIVE, JOIN))
        .await
        .unwrap();
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();

    // 60 half-open requests from 127.0.0.2: 40 are held, the rest are closed at once.
    let mut conns = Vec::new();
    for _ in 0..60 {
        conns.push(slow_connection("127.0.0.2", port).await);
    }
    let mut refused = 0;
    for s in conns.iter_mut().skip(40) {
        if closed_within(s, Duration::from_millis(500)).await {
            refused += 1;
        }
    }
    assert_eq!(
        refused, 20,
        "connections beyond the per-peer cap are closed on arrival"
    );
    // Others are served meanwhile: clients, and the hive's heartbeats.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let models = c
            .get(queen.url("/v1/models"))
            .bearer_auth(CLIENT)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .unwrap();
        assert_eq!(models.status(), 200);
        let health: Value = c
            .get(queen.url("/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health["hives_up"], 1, "{health}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The held ones were closed by the header timeout (3 s), long before now.
    let mut still_open = 0;
    for s in conns.iter_mut().take(40) {
        if !closed_within(s, Duration::from_millis(200)).await {
            still_open += 1;
        }
    }
    assert_eq!(
        still_open, 0,
        "half-sent request heads outlived the header timeout"
    );
    // With them gone, that address is served again.
    let mut fresh = slow_connection("127.0.0.2", port).await;
    fresh
        .write_all(b"1\r\nAuthorization: Bearer client-token-0123456789abcdef\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    fresh.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // A kept-alive connection that goes idle after its answer is closed after the same time.
    let mut rest = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(Duration::from_millis(500), fresh.read(&mut rest)).await;
    assert!(
        closed_within(&mut fresh, Duration::from_secs(5)).await,
        "an idle keep-alive connection outlived the header timeout"
    );
    drop(hive);
}

#[tokio::test]
async fn dev_mode_serves_only_loopback_hosts_and_bodies_must_be_json() {
    // Dev mode: no tokens, so a page that rebinds its DNS name to 127.0.0.1 would be served.
    let dev = Daemon::queen(QueenOptions::default(), "127.0.0.1:0")
        .await
        .unwrap();
    let c = reqwest::Client::new();
    let rebound = c
        .get(dev.url("/v1/models"))
        .header("host", "rebind.attacker.example:7833")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    let body: Value = rebound.json().await.unwrap();
    assert_eq!(body["error"]["code"], "FORBIDDEN");
    for host in ["localhost:7833", "127.0.0.1"] {
        let ok = c.get(dev.url("/v1/models")).header("host", host).send();
        assert_eq!(ok.await.unwrap().status(), 200, "{host}");
    }
    // A form post (text/plain needs no preflight in a browser) is refused before parsing.
    let queen = Daemon::queen(
        QueenOptions::cluster(("alice", CLIENT), true, JOIN, HIVE),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/inference",
        "/v1/admin/workers",
    ] {
        let resp = c
            .post(queen.url(path))
            .bearer_auth(CLIENT)
            .header("content-type", "text/plain")
            .body(r#"{"model":"smollm2","prompt":"hi","messages":[]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 415, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "INVALID_CONTENT_TYPE", "{path}");
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_its_stream_is_cut_and_frees_the_worker() {
    let mut opts = QueenOptions::cluster(("alice", CLIENT), true, JOIN, HIVE);
    opts.config_tail
        .push_str("\n[server]\nstream_stall_seconds = 2\n");
    let queen = Daemon::queen(opts, "127.0.0.1:0").await.unwrap();
    // One worker with one slot: a stream that held it would hold up the next request.
    let hive = Daemon::hive(
        HiveOptions::joined(&queen.base_url, "hive-s", HIVE, JOIN)
            .env("WORKERS__MAX_WORKERS", "1")
            .env("WORKERS__PARALLEL", "1"),
    )
    .await
    .unwrap();
    let c = reqwest::Client::new();
    queen.wait_hives_up(&c, 1).await.unwrap();
    // A long stream asked for on a connection that reads nothing (a small receive window, so
    // the queen's side fills up soon).
    let port = queen
        .base_url
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    let body = r#"{"model":"smollm2","prompt":"1, 2, 3, 4, 5, 6, 7, 8, 9, 10,","max_tokens":3000,"temperature":0,"stream":true}"#;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {CLIENT}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let t0 = Instant::now();
    let series = "rbee_queen_streams_cut_total{reason=\"stalled_reader\"}";
    rbee_test_harness::eventually(
        Duration::from_secs(60),
        "the stalled stream to be cut",
        || async {
            let cut = queen.metric(&c, series).await.unwrap();
            (cut == 1.0).then_some(()).ok_or(cut)
        },
    )
    .await
    .unwrap();
    println!("cut {:?} after the request", t0.elapsed());
    // The worker is free again: the next request is served at once.
    let resp = c
        .post(queen.url("/v1/chat/completions"))
        .bearer_auth(CLIENT)
        .json(&serde_json::json!({"model": "smollm2", "max_tokens": 2,
                                  "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let inflight = queen
        .metric(&c, "rbee_queen_inflight_requests")
        .await
        .unwrap();
    assert_eq!(inflight, 0.0);
    drop((stalled, hive));
}

/// Reads one HTTP response (head and a `Content-Length` body) from `stream`.
async fn read_response(stream: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len: usize = text[..head_end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= head_end + 4 + len {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn a_body_sent_after_its_head_to_an_unknown_route_leaves_the_connection_usable() {
    // Python's http.client sends the head, then the body; a 404 answered before the body was
    // read would make hyper close the connection under a client that reuses it at once.
    let queen = Daemon::queen(
        QueenOptions::cluster(("alice", CLIENT), true, JOIN, HIVE),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let mut s = tokio::net::TcpStream::connect(queen.base_url.trim_start_matches("http://"))
        .await
        .unwrap();
    let body = format!(r#"{{"model":"smollm2","input":"{}"}}"#, "x".repeat(3000));
    let head = format!(
        "POST /v1/responses/compact HTTP/1.1\r\nHost: q\r\nAuthorization: Bearer {CLIENT}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(body.as_bytes()).await.unwrap();
    let first = read_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 404"), "{first}");
    // The same connection serves the next request.
    s.write_all(
        format!("GET /v1/models HTTP/1.1\r\nHost: q\r\nAuthorization: Bearer {CLIENT}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let second = read_response(&mut s).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
}
