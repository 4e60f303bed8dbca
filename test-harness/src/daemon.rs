//! `Daemon`: one running rbee process (worker, hive or queen), for the tests, the BDD features
//! and xtask. Started from a prepared `Command`, awaited until it reports its bound address,
//! killed and reaped when dropped.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use crate::{config_command, eventually, workspace_binary};

/// Where a daemon's stderr goes.
pub enum Log {
    /// Into memory, for `stderr()` (each line echoed when `RBEE_TEST_ECHO` is set).
    Memory,
    /// Into this file (xtask's demo: the user reads it, and it outlives the process).
    File(PathBuf),
}

/// How a daemon says it is up, and where.
pub enum Ready {
    /// A `<marker> address=HOST:PORT` line on stderr (queen, hive).
    LogLine(String),
    /// A JSON POST carrying `address` to a ready URL (a worker's `--ready-url`), received by
    /// [`ready_receiver`].
    Call(tokio::sync::mpsc::Receiver<Value>),
}

/// How to start a daemon, besides its command line.
pub struct Start {
    /// For messages: `llm-worker-rbee`, `rbee-hive`, `queen-rbee`.
    pub name: &'static str,
    /// Its own directory (configs, secrets, audit log); it stays after the process ends.
    pub dir: PathBuf,
    pub log: Log,
    pub ready: Ready,
    /// How long it may take to report its address.
    pub timeout: Duration,
}

enum Sink {
    Memory(Arc<Mutex<String>>),
    File(PathBuf),
}

/// The child itself: killed and reaped when dropped, also when start-up fails half-way.
struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running daemon; killed (and reaped) when dropped. A hive's workers die with it
/// (`PR_SET_PDEATHSIG`), as every daemon started here dies with the thread that started it.
pub struct Daemon {
    name: &'static str,
    process: Process,
    sink: Sink,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub addr: SocketAddr,
    /// `http://ADDR`.
    pub base_url: String,
    /// The bearer token `get`, `post` and `delete` send (a worker's or hive's API token).
    pub token: Option<String>,
    pub dir: PathBuf,
    /// The JSON body of the ready call (a worker), else null.
    pub ready: Value,
}

impl Daemon {
    /// Spawns `cmd` (stdin and stdout closed, stderr to `start.log`, killed when this thread
    /// ends) and waits until it reports its address. Fails with its log when it exits first or
    /// takes longer than `start.timeout`.
    pub async fn start(mut cmd: Command, start: Start) -> anyhow::Result<Self> {
        let Start {
            name,
            dir,
            log,
            mut ready,
            timeout,
        } = start;
        let args = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let env = cmd
            .get_envs()
            .filter_map(|(k, v)| Some((k, v?)))
            .map(|(k, v): (&OsStr, &OsStr)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        let stderr = match &log {
            Log::Memory => Stdio::piped(),
            Log::File(path) => std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?
                .into(),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
        let sink = match log {
            Log::Memory => Sink::Memory(capture_stderr(&mut child)),
            Log::File(path) => Sink::File(path),
        };
        let mut daemon = Self {
            name,
            process: Process { child },
            sink,
            args,
            env,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            base_url: String::new(),
            token: None,
            dir,
            ready: Value::Null,
        };
        let what = format!("{name} to report its address");
        let found = eventually(timeout, &what, || {
            let seen = daemon.poll_ready(&mut ready);
            async move { seen }
        })
        .await
        .map_err(|e| anyhow!("{e:#}\n{}", daemon.log_excerpt()))?;
        let (addr, body) = found?;
        daemon.addr = addr;
        daemon.base_url = format!("http://{addr}");
        daemon.ready = body;
        Ok(daemon)
    }

    /// Starts `binary` (default: this workspace's `name`) on `toml`, written to
    /// `<dir>/<role>.toml`, its stderr in memory, and waits (up to 20 s) for its
    /// `<role> listening` line; `prepare` adds arguments and environment.
    pub(crate) async fn start_configured(
        name: &'static str,
        role: &str,
        binary: Option<&Path>,
        dir: PathBuf,
        toml: &str,
        prepare: impl FnOnce(&mut Command),
    ) -> anyhow::Result<Self> {
        let binary = binary.map_or_else(|| workspace_binary(name), Path::to_path_buf);
        let mut cmd = config_command(&binary, &dir, &format!("{role}.toml"), toml)?;
        prepare(&mut cmd);
        let start = Start {
            name,
            dir,
            log: Log::Memory,
            ready: Ready::LogLine(format!("{role} listening")),
            timeout: Duration::from_secs(20),
        };
        Self::start(cmd, start).await
    }

    /// `Some(Ok)`: the address (and the ready call's body). `Some(Err)`: it exited. `None`: not yet.
    fn poll_ready(&mut self, ready: &mut Ready) -> Option<anyhow::Result<(SocketAddr, Value)>> {
        let found = match ready {
            Ready::LogLine(marker) => {
                listening_address(&self.stderr(), marker).map(|a| Ok((a, Value::Null)))
            }
            Ready::Call(rx) => rx.try_recv().ok().map(|body| {
                let addr = body["address"]
                    .as_str()
                    .context("ready call without address")?
                    .parse()
                    .context("ready call with a bad address")?;
                Ok((addr, body))
            }),
        };
        if found.is_some() {
            return found;
        }
        let status = self.exited()?;
        Some(Err(anyhow!(
            "{} exited before it was ready ({status}):\n{}",
            self.name,
            self.log_excerpt()
        )))
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn pid(&self) -> i32 {
        self.process.child.id() as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Its exit status once it has exited (reaping it), else None.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let what = format!("{} to exit", self.name);
        eventually(timeout, &what, || {
            let status = self.exited();
            async move { status }
        })
        .await
        .ok()
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL. Err when it had already
    /// exited, exited with a failure or had to be killed.
    pub async fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        if let Some(status) = self.exited() {
            bail!(
                "{} had already exited ({status}); {}",
                self.name,
                self.log_excerpt()
            );
        }
        self.signal(libc::SIGTERM);
        match self.wait_exit(grace).await {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!("{} exited with {status}; {}", self.name, self.log_excerpt()),
            None => {
                let _ = self.process.child.kill();
                let _ = self.process.child.wait();
                bail!("{} did not stop within {grace:?}; killed it", self.name)
            }
        }
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        match &self.sink {
            Sink::Memory(log) => log.lock().unwrap().clone(),
            Sink::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
        }
    }

    /// Waits (up to 10 s) until its stderr contains `needle`.
    pub async fn wait_log(&self, needle: &str) -> anyhow::Result<()> {
        let what = format!("{} to log {needle:?}", self.name);
        eventually(Duration::from_secs(10), &what, || async {
            self.stderr().contains(needle).then_some(())
        })
        .await
        .map_err(|e| anyhow!("{e:#}; its log:\n{}", self.stderr()))
    }

    /// Its stderr for an error message: all of it when kept in memory, else the log file's
    /// last 25 lines and its path.
    pub fn log_excerpt(&self) -> String {
        let text = self.stderr();
        match &self.sink {
            Sink::Memory(_) => text,
            Sink::File(path) => {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(25)..].join("\n    ");
                format!("last lines of {}:\n    {tail}", path.display())
            }
        }
    }

    /// The value of `--config` on its command line.
    pub fn config_path(&self) -> PathBuf {
        let i = self.args.iter().position(|a| a == "--config");
        let path = i.and_then(|i| self.args.get(i + 1));
        PathBuf::from(path.expect("started with --config"))
    }

    /// A value it was started with in its environment ("" when not set).
    pub fn env_value(&self, key: &str) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// A GET with its token.
    pub fn get(&self, client: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        self.auth(client.get(self.url(path)))
    }

    /// A DELETE with its token.
    pub fn delete(&self, client: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        self.auth(client.delete(self.url(path)))
    }

    /// A POST of JSON with its token.
    pub fn post(
        &self,
        client: &reqwest::Client,
        path: &str,
        body: &Value,
    ) -> reqwest::RequestBuilder {
        self.auth(client.post(self.url(path)).json(body))
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

/// The address in a `<marker> address=HOST:PORT` log line.
pub fn listening_address(log: &str, marker: &str) -> Option<SocketAddr> {
    log.lines()
        .find(|l| l.contains(marker))
        .and_then(|l| l.split("address=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
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

/// A test or xtask killed hard (timeout, SIGKILL) must not leave its daemons running.
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

/// A one-shot HTTP endpoint that receives a daemon's ready call: its URL and the bodies.
pub async fn ready_receiver() -> anyhow::Result<(String, tokio::sync::mpsc::Receiver<Value>)> {
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

#[cfg(test)]
mod tests {
    use super::listening_address;

    #[test]
    fn listening_address_is_read_from_the_log_line() {
        let log = "2025-01-01T00:00:00Z  INFO rbee_queen_core: client token loaded\n\
                   2025-01-01T00:00:00Z  INFO rbee_queen_core: queen listening address=127.0.0.1:40123\n";
        assert_eq!(
            listening_address(log, "queen listening"),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        assert_eq!(listening_address(log, "hive listening"), None);
        assert_eq!(
            listening_address("queen listening address=", "queen listening"),
            None
        );
    }
}
