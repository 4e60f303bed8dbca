//! One supervised worker's record (what the API, events and heartbeats show) and the handle
//! the hive uses to reach its lifecycle task: stop and kill requests, the ready call, the end.
//!
//! The record knows no process: the lifecycle task ([`crate::lifecycle`]) owns the child and
//! writes what it does here.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rbee_auth::Token;
use rbee_http::unix_ms;
use tokio::sync::{Semaphore, oneshot, watch};

use crate::process::StderrTail;
pub use rbee_api::worker::{
    BackoffInfo, ExitInfo, ReadyReport, StopCause, StopInfo, StopOutcome, WorkerState, WorkerView,
};

/// What a spawn asks for, after validation and admission.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub id: String,
    pub model_ref: String,
    pub model_path: PathBuf,
    pub device: String,
    pub binary: PathBuf,
    pub max_context: Option<u64>,
    /// The KV pool the worker is given (its `--kv-tokens`) and admitted for.
    pub kv_tokens: u64,
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
    stderr_tail: StderrTail,
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

/// What the hive asks of a worker's lifecycle task. A request stays until the task acts on
/// it, so one made while the task is busy elsewhere is not lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Commands {
    /// Stop for good; the first cause wins.
    pub stop: Option<StopCause>,
    /// Kill this process: it failed its health checks (its exit then counts as a crash).
    pub kill_unhealthy: Option<u32>,
}

pub struct Worker {
    pub spec: WorkerSpec,
    status: Mutex<Status>,
    commands: watch::Sender<Commands>,
    ready_tx: Mutex<Option<oneshot::Sender<ReadyReport>>>,
    done_tx: watch::Sender<bool>,
    /// One permit per slot the worker reported; the hive holds one while it streams a request,
    /// so a full worker is refused here without a round trip.
    pub slots: Arc<Semaphore>,
    slot_count: AtomicU32,
    /// Set while a health probe (not a client) holds a slot.
    pub probe_holds: AtomicBool,
    pub inflight: AtomicU32,
    pub health_failures: AtomicU32,
    probing: AtomicBool,
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
                stderr_tail: StderrTail::default(),
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
            commands: watch::channel(Commands::default()).0,
            ready_tx: Mutex::new(None),
            done_tx: watch::channel(false).0,
            slots: Arc::new(Semaphore::new(1)),
            slot_count: AtomicU32::new(1),
            probe_holds: AtomicBool::new(false),
            inflight: AtomicU32::new(0),
            health_failures: AtomicU32::new(0),
            probing: AtomicBool::new(false),
        })
    }

    pub fn id(&self) -> &str {
        &self.spec.id
    }

    pub fn view(&self) -> WorkerView {
        let s = lock(&self.status);
        WorkerView {
            id: self.spec.id.clone(),
            model: self.spec.model_ref.clone(),
            model_path: self.spec.model_path.clone(),
            device: self.spec.device.clone(),
            state: s.state,
            pid: s.pid,
            port: s.port,
            busy: self.slots.available_permits() == 0,
            slots: self.slot_count.load(Ordering::SeqCst),
            slots_busy: self.inflight.load(Ordering::SeqCst),
            context_length: s.context_length,
            restart_count: s.restart_count,
            breaker_open: s.breaker_open,
            last_exit: s.last_exit.clone(),
            stderr_tail: s.stderr_tail.lines(),
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
        self.commands.send_if_modified(|c| {
            if c.stop.is_none() {
                c.stop = Some(cause);
                true
            } else {
                false
            }
        });
    }

    /// Asks the lifecycle task to kill the process that failed its health checks, if it is
    /// still the current, ready one; its exit then goes through the crash path (restart
    /// policy). False when it is not.
    pub fn request_kill_unhealthy(&self, pid: u32) -> bool {
        {
            let s = lock(&self.status);
            if s.state != WorkerState::Ready || s.pid != Some(pid) {
                return false;
            }
        }
        self.commands.send_modify(|c| c.kill_unhealthy = Some(pid));
        true
    }

    pub fn stop_requested(&self) -> bool {
        self.commands.borrow().stop.is_some()
    }

    pub fn is_done(&self) -> bool {
        *self.done_tx.borrow()
    }

    /// Waits until the lifecycle task has ended and the hive has taken in all it reported
    /// (the process is gone for good).
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

    // What the lifecycle task and the hive write.

    /// The requests for the lifecycle task.
    pub(crate) fn commands(&self) -> watch::Receiver<Commands> {
        self.commands.subscribe()
    }

    /// Opens the way for the ready call of the process just started.
    pub(crate) fn expect_ready(&self) -> oneshot::Receiver<ReadyReport> {
        let (tx, rx) = oneshot::channel();
        *lock(&self.ready_tx) = Some(tx);
        rx
    }

    pub(crate) fn stop_expecting_ready(&self) {
        lock(&self.ready_tx).take();
    }

    pub(crate) fn stderr_tail(&self) -> StderrTail {
        lock(&self.status).stderr_tail.clone()
    }

    /// Only the hive sets the state, as it takes in the lifecycle's reports.
    pub(crate) fn set_state(&self, state: WorkerState) {
        lock(&self.status).state = state;
    }

    /// The lifecycle task has ended and its reports are taken in.
    pub(crate) fn mark_done(&self) {
        self.done_tx.send_replace(true);
    }

    pub(crate) fn started(&self, pid: u32, port: u16, token: Token, at: Instant) {
        let mut s = lock(&self.status);
        s.pid = Some(pid);
        s.port = Some(port);
        s.token = Some(token);
        s.spawned_at = Some((at, unix_ms()));
        s.ready_at_unix_ms = None;
        s.backoff = None;
        s.failure = None;
    }

    pub(crate) fn became_ready(
        &self,
        context_length: u64,
        slots: u32,
        spawn_to_ready_seconds: f64,
    ) {
        // A restarted process may report another count: move the permits by the difference.
        let slots = slots.max(1);
        let old = self.slot_count.swap(slots, Ordering::SeqCst);
        if slots > old {
            self.slots.add_permits((slots - old) as usize);
        } else {
            self.slots.forget_permits((old - slots) as usize);
        }
        {
            let mut s = lock(&self.status);
            s.context_length = Some(context_length);
            s.ready_at_unix_ms = Some(unix_ms());
            s.spawn_to_ready_seconds = Some(spawn_to_ready_seconds);
            // Readiness counts as use, so a fresh worker gets a full keep-alive.
            s.last_used = Some((Instant::now(), unix_ms()));
            s.last_success = Some(Instant::now());
        }
        self.health_failures.store(0, Ordering::SeqCst);
    }

    /// The process exited without being asked to.
    pub(crate) fn exited(&self, exit: ExitInfo) {
        let mut s = lock(&self.status);
        s.pid = None;
        s.port = None;
        s.token = None;
        s.last_exit = Some(exit);
    }

    pub(crate) fn set_failure(&self, why: String) {
        lock(&self.status).failure = Some(why);
    }

    pub(crate) fn open_breaker(&self, why: String) {
        let mut s = lock(&self.status);
        s.breaker_open = true;
        s.failure = Some(why);
    }

    pub(crate) fn set_backoff(&self, backoff: BackoffInfo) {
        lock(&self.status).backoff = Some(backoff);
    }

    /// Counts a restart; returns the new count.
    pub(crate) fn count_restart(&self) -> u32 {
        let mut s = lock(&self.status);
        s.restart_count += 1;
        s.restart_count
    }

    /// Stopped for good (the port stays in the record, for the final view).
    pub(crate) fn stopped(&self, stop: StopInfo) {
        let mut s = lock(&self.status);
        s.pid = None;
        s.token = None;
        s.backoff = None;
        s.stop = Some(stop);
    }
}
