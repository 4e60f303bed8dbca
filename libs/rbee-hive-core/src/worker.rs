//! One supervised worker: its record (what the API shows) and its lifecycle task, which owns
//! the child process from spawn to the last exit, through readiness, crashes, restarts with
//! backoff, the circuit breaker and the stop sequence.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rbee_auth::Token;
use rbee_http::unix_ms;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, oneshot, watch};
use tracing::{Instrument, error, info, warn};

use crate::hive::Hive;
use crate::restart::{CrashHistory, Decision};
pub use rbee_api::worker::{
    BackoffInfo, ExitInfo, ReadyReport, StopCause, StopInfo, StopOutcome, WorkerState, WorkerView,
};

/// Lines of a worker's stderr kept for its crash report.
const STDERR_TAIL_LINES: usize = 20;
const STDERR_LINE_MAX: usize = 512;

/// Variables a worker inherits from the hive; everything else is cleared.
const ENV_ALLOW: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "RUST_BACKTRACE",
    "RBEE_LOG",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_PATH",
    "NVIDIA_VISIBLE_DEVICES",
];

/// What a spawn asks for, after validation and admission.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub id: String,
    pub model_ref: String,
    pub model_path: PathBuf,
    pub device: String,
    pub binary: PathBuf,
    pub max_context: Option<u64>,
    pub memory_estimate_bytes: u64,
}

struct Status {
    state: WorkerState,
    pid: Option<u32>,
    port: Option<u16>,
    token: Option<Token>,
    context_length: Option<u64>,
    restart_count: u32,
    breaker_open: bool,
    last_exit: Option<ExitInfo>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    backoff: Option<BackoffInfo>,
    failure: Option<String>,
    spawned_at: Option<(Instant, i64)>,
    ready_at_unix_ms: Option<i64>,
    spawn_to_ready_seconds: Option<f64>,
    memory_rss_bytes: Option<u64>,
    requests_total: u64,
    last_used: Option<(Instant, i64)>,
    last_success: Option<Instant>,
    stop: Option<StopInfo>,
}

pub struct Worker {
    pub spec: WorkerSpec,
    status: Mutex<Status>,
    stop_tx: watch::Sender<Option<StopCause>>,
    ready_tx: Mutex<Option<oneshot::Sender<ReadyReport>>>,
    done_tx: watch::Sender<bool>,
    /// The worker serves one generation at a time; the hive holds this while it streams one.
    pub slot: Arc<Semaphore>,
    /// Set while a health probe (not a client) holds the slot.
    pub probe_holds: AtomicBool,
    pub inflight: AtomicU32,
    pub health_failures: AtomicU32,
    probing: AtomicBool,
    /// The pid a failed health check killed, so its exit is reported as that (not a stop).
    unhealthy_pid: Mutex<Option<u32>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Worker {
    pub fn new(spec: WorkerSpec) -> Arc<Self> {
        Arc::new(Self {
            spec,
            status: Mutex::new(Status {
                state: WorkerState::Starting,
                pid: None,
                port: None,
                token: None,
                context_length: None,
                restart_count: 0,
                breaker_open: false,
                last_exit: None,
                stderr_tail: Arc::new(Mutex::new(VecDeque::new())),
                backoff: None,
                failure: None,
                spawned_at: None,
                ready_at_unix_ms: None,
                spawn_to_ready_seconds: None,
                memory_rss_bytes: None,
                requests_total: 0,
                last_used: None,
                last_success: None,
                stop: None,
            }),
            stop_tx: watch::channel(None).0,
            ready_tx: Mutex::new(None),
            done_tx: watch::channel(false).0,
            slot: Arc::new(Semaphore::new(1)),
            probe_holds: AtomicBool::new(false),
            inflight: AtomicU32::new(0),
            health_failures: AtomicU32::new(0),
            probing: AtomicBool::new(false),
            unhealthy_pid: Mutex::new(None),
        })
    }

    pub fn id(&self) -> &str {
        &self.spec.id
    }

    pub fn view(&self) -> WorkerView {
        let s = lock(&self.status);
        let tail = lock(&s.stderr_tail).iter().cloned().collect();
        WorkerView {
            id: self.spec.id.clone(),
            model: self.spec.model_ref.clone(),
            model_path: self.spec.model_path.clone(),
            device: self.spec.device.clone(),
            state: s.state,
            pid: s.pid,
            port: s.port,
            busy: self.inflight.load(Ordering::SeqCst) > 0,
            context_length: s.context_length,
            restart_count: s.restart_count,
            breaker_open: s.breaker_open,
            last_exit: s.last_exit.clone(),
            stderr_tail: tail,
            backoff: s.backoff.clone(),
            failure: s.failure.clone(),
            spawned_at_unix_ms: s.spawned_at.map(|(_, ms)| ms),
            ready_at_unix_ms: s.ready_at_unix_ms,
            spawn_to_ready_seconds: s.spawn_to_ready_seconds,
            memory_estimate_bytes: self.spec.memory_estimate_bytes,
            memory_used_bytes: s.memory_rss_bytes,
            requests_total: s.requests_total,
            last_used_unix_ms: s.last_used.map(|(_, ms)| ms),
            stop: s.stop.clone(),
        }
    }

    pub fn state(&self) -> WorkerState {
        lock(&self.status).state
    }

    /// Counts against resources: anything but a finished worker.
    pub fn holds_resources(&self) -> bool {
        !matches!(self.state(), WorkerState::Failed | WorkerState::Stopped)
    }

    /// Where the hive reaches a ready worker, and with which token.
    pub fn endpoint(&self) -> Option<(u16, Token)> {
        let s = lock(&self.status);
        match (s.state, s.port, &s.token) {
            (WorkerState::Ready, Some(p), Some(t)) => Some((p, t.clone())),
            _ => None,
        }
    }

    /// Whether `presented` is this worker's current token (its ready call).
    pub fn token_matches(&self, presented: &str) -> bool {
        lock(&self.status)
            .token
            .as_ref()
            .is_some_and(|t| t.matches(presented))
    }

    pub fn pid(&self) -> Option<u32> {
        lock(&self.status).pid
    }

    /// Delivers the ready call to the lifecycle task; false when none is awaited or the pid
    /// is not this worker's current process.
    pub fn deliver_ready(&self, report: ReadyReport) -> bool {
        if report.worker_id != self.spec.id || self.pid() != Some(report.pid) {
            return false;
        }
        match lock(&self.ready_tx).take() {
            Some(tx) => tx.send(report).is_ok(),
            None => false,
        }
    }

    /// Asks the lifecycle task to stop the worker. The first cause wins.
    pub fn request_stop(&self, cause: StopCause) {
        self.stop_tx.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(cause);
                true
            } else {
                false
            }
        });
    }

    /// Kills the process that failed its health checks, if it is still the current, ready
    /// one; its exit then goes through the crash path (restart policy).
    pub fn kill_unhealthy(&self, pid: u32) -> bool {
        let s = lock(&self.status);
        if s.state != WorkerState::Ready || s.pid != Some(pid) {
            return false;
        }
        *lock(&self.unhealthy_pid) = Some(pid);
        signal_group(pid, libc::SIGKILL);
        true
    }

    pub fn stop_requested(&self) -> bool {
        self.stop_tx.borrow().is_some()
    }

    pub fn is_done(&self) -> bool {
        *self.done_tx.borrow()
    }

    /// Waits until the lifecycle task has ended (the process is gone for good).
    pub async fn wait_done(&self) {
        let mut rx = self.done_tx.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Marks a client request done: the worker was used (keep-alive) and, when `ok`, is healthy.
    pub fn record_use(&self, ok: bool) {
        let mut s = lock(&self.status);
        s.requests_total += 1;
        s.last_used = Some((Instant::now(), unix_ms()));
        if ok {
            s.last_success = Some(Instant::now());
        }
    }

    /// Unused for longer than `keep_alive` (ready, nothing in flight).
    pub fn idle_for(&self, keep_alive: Duration) -> bool {
        if self.inflight.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let s = lock(&self.status);
        s.state == WorkerState::Ready && s.last_used.is_some_and(|(t, _)| t.elapsed() >= keep_alive)
    }

    pub fn needs_generation_probe(&self, idle: Duration) -> bool {
        lock(&self.status)
            .last_success
            .is_none_or(|t| t.elapsed() >= idle)
    }

    pub fn mark_probe_success(&self) {
        lock(&self.status).last_success = Some(Instant::now());
    }

    pub fn set_rss(&self, rss: u64) {
        lock(&self.status).memory_rss_bytes = Some(rss);
    }

    /// Claims the right to run one health check; false when one is running.
    pub fn begin_probe(&self) -> bool {
        !self.probing.swap(true, Ordering::SeqCst)
    }

    pub fn end_probe(&self) {
        self.probing.store(false, Ordering::SeqCst);
    }

    fn set_state(&self, hive: &Hive, state: WorkerState) {
        lock(&self.status).state = state;
        hive.announce(self);
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut lock(&self.status));
    }
}

/// How a start ended: the ready call, or one of the [`Outcome`]s.
enum Phase {
    Ready(ReadyReport),
    Over(Outcome),
}

/// How a worker process's supervision ended.
enum Outcome {
    Exited(std::io::Result<ExitStatus>),
    LoadTimeout,
    Stop(StopCause),
}

async fn wait_stop(rx: &mut watch::Receiver<Option<StopCause>>) -> StopCause {
    loop {
        if let Some(c) = *rx.borrow_and_update() {
            return c;
        }
        if rx.changed().await.is_err() {
            // The worker record (and with it the sender) is gone: nothing will ask again.
            std::future::pending::<()>().await;
        }
    }
}

fn exit_fields(st: &std::io::Result<ExitStatus>) -> (Option<i32>, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match st {
        Ok(s) => (s.code(), s.signal()),
        Err(_) => (None, None),
    }
}

fn describe_exit(st: &std::io::Result<ExitStatus>) -> String {
    match st {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}

/// Sends `sig` to the worker's process group (it leads its own group).
fn signal_group(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; a stale pid group fails with ESRCH.
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

/// The lifecycle task: spawn, wait for ready, supervise, restart or stop. Ends when the
/// worker is stopped for good or given up on; then the record is done.
pub async fn run(hive: Arc<Hive>, worker: Arc<Worker>) {
    let span = tracing::info_span!("worker", worker_id = %worker.spec.id);
    lifecycle(&hive, &worker).instrument(span).await;
    hive.release_port_of(&worker);
    worker.done_tx.send_replace(true);
    hive.worker_finished(&worker);
}

async fn lifecycle(hive: &Arc<Hive>, worker: &Arc<Worker>) {
    let mut stop_rx = worker.stop_tx.subscribe();
    let mut crashes = CrashHistory::default();
    loop {
        let cause = *stop_rx.borrow();
        if let Some(cause) = cause {
            finish_stopped(hive, worker, cause, StopOutcome::NotRunning, 0.0);
            return;
        }
        if hive.draining.load(Ordering::SeqCst) {
            finish_stopped(
                hive,
                worker,
                StopCause::Shutdown,
                StopOutcome::NotRunning,
                0.0,
            );
            return;
        }
        let (mut child, pid, port, token) = match spawn(hive, worker).await {
            Ok(c) => c,
            Err(why) => {
                error!(error = %why, "cannot start the worker process");
                worker.update(|s| s.failure = Some(why.clone()));
                worker.set_state(hive, WorkerState::Failed);
                hive.audit(
                    "worker.spawn_failed",
                    json!({"worker_id": worker.spec.id, "error": why}),
                );
                return;
            }
        };
        let (ready_tx, mut ready_rx) = oneshot::channel();
        *lock(&worker.ready_tx) = Some(ready_tx);
        let spawned = Instant::now();
        worker.update(|s| {
            s.pid = Some(pid);
            s.port = Some(port);
            s.token = Some(token.clone());
            s.spawned_at = Some((spawned, unix_ms()));
            s.ready_at_unix_ms = None;
            s.backoff = None;
            s.failure = None;
        });
        worker.set_state(hive, WorkerState::Starting);
        hive.metrics.spawns.inc(&[]);
        info!(pid, port, model = %worker.spec.model_ref, device = %worker.spec.device, "worker process started");

        let load_timeout = Duration::from_secs(hive.config().workers.load_timeout_seconds);
        let ready = async {
            match (&mut ready_rx).await {
                Ok(r) => r,
                Err(_) => std::future::pending().await,
            }
        };
        let phase = tokio::select! {
            st = child.wait() => Phase::Over(Outcome::Exited(st)),
            r = ready => Phase::Ready(r),
            _ = tokio::time::sleep(load_timeout) => Phase::Over(Outcome::LoadTimeout),
            c = wait_stop(&mut stop_rx) => Phase::Over(Outcome::Stop(c)),
        };
        lock(&worker.ready_tx).take();
        let outcome = match phase {
            Phase::Ready(report) => {
                let secs = spawned.elapsed().as_secs_f64();
                hive.metrics.spawn_to_ready.observe(&[], secs);
                worker.update(|s| {
                    s.context_length = Some(report.context_length);
                    s.ready_at_unix_ms = Some(unix_ms());
                    s.spawn_to_ready_seconds = Some(secs);
                    // Readiness counts as use, so a fresh worker gets a full keep-alive.
                    s.last_used = Some((Instant::now(), unix_ms()));
                    s.last_success = Some(Instant::now());
                });
                worker.health_failures.store(0, Ordering::SeqCst);
                worker.set_state(hive, WorkerState::Ready);
                {
                    // nvidia-smi can take seconds; never hold supervision up for it.
                    let (h, w) = (hive.clone(), worker.clone());
                    tokio::spawn(async move { h.sample_memory(&w, pid).await });
                }
                info!(
                    spawn_to_ready_s = secs,
                    load_s = report.load_seconds,
                    address = %report.address,
                    "worker ready"
                );
                hive.audit(
                    "worker.ready",
                    json!({"worker_id": worker.spec.id, "pid": pid, "spawn_to_ready_seconds": secs}),
                );
                tokio::select! {
                    st = child.wait() => Outcome::Exited(st),
                    c = wait_stop(&mut stop_rx) => Outcome::Stop(c),
                }
            }
            Phase::Over(outcome) => outcome,
        };

        let (status, reason) = match outcome {
            Outcome::Stop(cause) => {
                worker.set_state(hive, WorkerState::Stopping);
                let t0 = Instant::now();
                let outcome = stop_sequence(hive, &mut child, pid, port, &token).await;
                finish_stopped(hive, worker, cause, outcome, t0.elapsed().as_secs_f64());
                return;
            }
            Outcome::LoadTimeout => {
                warn!(
                    timeout_s = load_timeout.as_secs(),
                    "no ready call in time; killing it"
                );
                signal_group(pid, libc::SIGKILL);
                hive.metrics.force_kills.inc(&[]);
                let st = child.wait().await;
                (
                    st,
                    format!(
                        "did not report ready within {} s (workers.load_timeout_seconds)",
                        load_timeout.as_secs()
                    ),
                )
            }
            Outcome::Exited(st) => {
                let was_ready = worker.view().ready_at_unix_ms.is_some();
                let killed_unhealthy = lock(&worker.unhealthy_pid).take() == Some(pid);
                let why = if killed_unhealthy {
                    hive.metrics.force_kills.inc(&[]);
                    "failed three health checks in a row and was killed".to_owned()
                } else if was_ready {
                    format!("exited unexpectedly ({})", describe_exit(&st))
                } else {
                    format!("exited before it was ready ({})", describe_exit(&st))
                };
                (st, why)
            }
        };
        let (code, signal) = exit_fields(&status);
        hive.metrics
            .worker_exit_code
            .set(&[&worker.spec.id], code.map_or(-1.0, f64::from));
        hive.metrics
            .worker_exit_signal
            .set(&[&worker.spec.id], signal.map_or(0.0, f64::from));
        // Reap any helper processes the worker left in its group.
        signal_group(pid, libc::SIGKILL);
        hive.release_port(port);

        let tail: Vec<String> = worker.view().stderr_tail;
        worker.update(|s| {
            s.pid = None;
            s.port = None;
            s.token = None;
            s.last_exit = Some(ExitInfo {
                code,
                signal,
                at_unix_ms: unix_ms(),
                reason: reason.clone(),
            });
        });
        hive.metrics.crashes.inc(&[]);
        warn!(?code, ?signal, %reason, "worker crashed");
        hive.audit(
            "worker.crash",
            json!({
                "worker_id": worker.spec.id, "model": worker.spec.model_ref, "exit_code": code,
                "signal": signal, "reason": reason,
                "stderr_tail": tail.iter().rev().take(5).rev().collect::<Vec<_>>(),
            }),
        );
        let policy = hive.config().restart;
        let (delay, recent) = match crashes.crashed(&policy, Instant::now(), rand::random::<f64>())
        {
            Decision::Disabled => {
                worker.update(|s| s.failure = Some(format!("{reason}; restarts are disabled")));
                worker.set_state(hive, WorkerState::Failed);
                return;
            }
            Decision::BreakerOpen {
                recent_crashes: recent,
            } => {
                worker.update(|s| {
                    s.breaker_open = true;
                    s.failure = Some(format!(
                        "circuit breaker open: {recent} crashes within {} s (restart.max_attempts = {}); last: {reason}",
                        policy.window_seconds, policy.max_attempts
                    ));
                });
                hive.metrics.breaker_open.inc(&[]);
                hive.metrics.worker_breaker.set(&[&worker.spec.id], 1.0);
                error!(recent, "circuit breaker open; not restarting");
                hive.audit(
                    "worker.breaker_open",
                    json!({"worker_id": worker.spec.id, "recent_crashes": recent}),
                );
                worker.set_state(hive, WorkerState::Failed);
                return;
            }
            Decision::Restart {
                delay,
                recent_crashes,
            } => (delay, recent_crashes),
        };
        worker.update(|s| {
            s.backoff = Some(BackoffInfo {
                recent_crashes: recent,
                next_restart_unix_ms: unix_ms() + delay.as_millis() as i64,
                delay_ms: delay.as_millis() as u64,
            });
        });
        hive.metrics
            .worker_backoff
            .set(&[&worker.spec.id], delay.as_secs_f64());
        worker.set_state(hive, WorkerState::Backoff);
        info!(
            delay_ms = delay.as_millis() as u64,
            recent, "restarting after backoff"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            cause = wait_stop(&mut stop_rx) => {
                finish_stopped(hive, worker, cause, StopOutcome::NotRunning, 0.0);
                return;
            }
        }
        hive.metrics.worker_backoff.set(&[&worker.spec.id], 0.0);
        worker.update(|s| s.restart_count += 1);
        let count = worker.view().restart_count;
        hive.metrics.restarts.inc(&[]);
        hive.metrics
            .worker_restart_count
            .set(&[&worker.spec.id], f64::from(count));
        hive.audit(
            "worker.restart",
            json!({"worker_id": worker.spec.id, "restart_count": count}),
        );
    }
}

fn finish_stopped(
    hive: &Hive,
    worker: &Worker,
    cause: StopCause,
    outcome: StopOutcome,
    seconds: f64,
) {
    match outcome {
        StopOutcome::Graceful => hive.metrics.graceful_stops.inc(&[]),
        StopOutcome::ForceKilled => hive.metrics.force_kills.inc(&[]),
        StopOutcome::NotRunning => {}
    }
    worker.update(|s| {
        s.pid = None;
        s.token = None;
        s.backoff = None;
        s.stop = Some(StopInfo {
            cause,
            outcome,
            seconds,
        });
    });
    let event = if outcome == StopOutcome::ForceKilled {
        "worker.kill"
    } else {
        "worker.stop"
    };
    info!(?cause, ?outcome, seconds, "worker stopped");
    hive.audit(
        event,
        json!({"worker_id": worker.spec.id, "cause": cause, "outcome": outcome, "seconds": seconds}),
    );
    worker.set_state(hive, WorkerState::Stopped);
}

/// Ask (`POST /v1/shutdown`), then SIGTERM, then SIGKILL, each after its wait.
async fn stop_sequence(
    hive: &Hive,
    child: &mut Child,
    pid: u32,
    port: u16,
    token: &Token,
) -> StopOutcome {
    let cfg = hive.config().shutdown;
    let ask_for = Duration::from_secs(cfg.ask_seconds);
    let ask = async {
        let url = format!("http://127.0.0.1:{port}/v1/shutdown");
        let sent = hive
            .http
            .post(&url)
            .bearer_auth(token.expose())
            .timeout(ask_for)
            .send()
            .await;
        if let Err(e) = sent {
            info!(error = %e, "the stop request did not get through; will signal");
        }
        tokio::time::sleep(ask_for).await;
    };
    tokio::select! {
        _ = child.wait() => return StopOutcome::Graceful,
        _ = tokio::time::timeout(ask_for, ask) => {}
    }
    info!("sending SIGTERM");
    signal_group(pid, libc::SIGTERM);
    let term_for = Duration::from_secs(cfg.term_seconds);
    if tokio::time::timeout(term_for, child.wait()).await.is_ok() {
        signal_group(pid, libc::SIGKILL);
        return StopOutcome::Graceful;
    }
    warn!(
        waited_s = term_for.as_secs(),
        "still running after SIGTERM; sending SIGKILL"
    );
    signal_group(pid, libc::SIGKILL);
    let _ = child.wait().await;
    StopOutcome::ForceKilled
}

/// Starts the worker process: cleared environment plus an allow-list, token by environment,
/// its own process group, and death with the hive (`PR_SET_PDEATHSIG`).
async fn spawn(hive: &Hive, worker: &Worker) -> Result<(Child, u32, u16, Token), String> {
    let port = hive.reserve_port()?;
    let secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let token = Token::new(secret, "generated worker token").map_err(|e| e.to_string())?;
    let cfg = hive.config();
    let spec = &worker.spec;
    let mut cmd = Command::new(&spec.binary);
    cmd.env_clear();
    for key in ENV_ALLOW {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    cmd.env("RBEE_LOG_FORMAT", &cfg.log_format)
        .env("RBEE_WORKER_TOKEN", token.expose())
        .env("RBEE_WORKER_READY_URL", hive.ready_url(&spec.id))
        .arg("--model")
        .arg(&spec.model_path)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--device")
        .arg(&spec.device)
        .arg("--worker-id")
        .arg(&spec.id)
        .arg("--grace-seconds")
        .arg(cfg.workers.grace_seconds.to_string());
    if cfg.workers.threads > 0 {
        cmd.arg("--threads").arg(cfg.workers.threads.to_string());
    }
    if let Some(c) = spec.max_context {
        cmd.arg("--max-context").arg(c.to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    set_parent_death_signal(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            hive.release_port(port);
            return Err(format!("{}: {e}", spec.binary.display()));
        }
    };
    let Some(pid) = child.id() else {
        hive.release_port(port);
        return Err("the worker exited at once".into());
    };
    let tail = lock(&worker.status).stderr_tail.clone();
    lock(&tail).clear();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward_lines(out, spec.id.clone(), "stdout", None));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward_lines(err, spec.id.clone(), "stderr", Some(tail)));
    }
    Ok((child, pid, port, token))
}

#[cfg(target_os = "linux")]
fn set_parent_death_signal(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only the
    // async-signal-safe prctl and getppid.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The hive may have died between fork and prctl; then nobody would kill us.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("the hive exited during spawn"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_cmd: &mut Command) {
    // No PR_SET_PDEATHSIG outside Linux; the hive stops its workers on every orderly exit.
}

/// Forwards a worker's output into our log, tagged with its id; keeps the stderr tail.
async fn forward_lines(
    stream: impl AsyncRead + Unpin,
    worker_id: String,
    which: &'static str,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        info!(target: "rbee_hive::worker_output", worker_id = %worker_id, stream = which, "{line}");
        if let Some(tail) = &tail {
            let mut t = lock(tail);
            if t.len() == STDERR_TAIL_LINES {
                t.pop_front();
            }
            let mut l = line.to_owned();
            if l.len() > STDERR_LINE_MAX {
                let mut cut = STDERR_LINE_MAX;
                while !l.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.truncate(cut);
            }
            t.push_back(l);
        }
    }
}
