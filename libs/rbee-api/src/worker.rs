//! The hive's view of its workers, as its API and the queen read it: states, the worker record,
//! the spawn request and answer, and a worker's ready call.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Process started, model loading, ready call not yet received.
    Starting,
    Ready,
    /// Being stopped (ask, SIGTERM, SIGKILL).
    Stopping,
    /// Crashed; waiting out the backoff before the next restart.
    Backoff,
    /// Crashed and not restarted: the breaker is open, restarts are off, or spawning fails.
    Failed,
    /// Gone; the record is removed right after this state is announced.
    Stopped,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
            WorkerState::Backoff => "backoff",
            WorkerState::Failed => "failed",
            WorkerState::Stopped => "stopped",
        }
    }

    pub const ALL: [WorkerState; 6] = [
        WorkerState::Starting,
        WorkerState::Ready,
        WorkerState::Stopping,
        WorkerState::Backoff,
        WorkerState::Failed,
        WorkerState::Stopped,
    ];
}

/// Why a worker is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopCause {
    /// `DELETE /v1/workers/{id}`.
    Api,
    /// Unused for the keep-alive.
    Idle,
    /// The hive is shutting down.
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    /// Exited after the ask or SIGTERM.
    Graceful,
    /// Needed SIGKILL.
    ForceKilled,
    /// Was not running (failed or waiting to restart).
    NotRunning,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub at_unix_ms: i64,
    /// Why the hive counts this as a crash.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BackoffInfo {
    /// Crashes inside the breaker window.
    pub recent_crashes: u32,
    pub next_restart_unix_ms: i64,
    pub delay_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StopInfo {
    pub cause: StopCause,
    pub outcome: StopOutcome,
    pub seconds: f64,
}

/// A worker as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkerView {
    pub id: String,
    pub model: String,
    pub model_path: PathBuf,
    pub device: String,
    pub state: WorkerState,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    /// Every slot is taken.
    pub busy: bool,
    /// Sequences the worker generates together (1 until it reports otherwise).
    #[serde(default = "one_slot")]
    pub slots: u32,
    /// Requests the hive is streaming from it now.
    #[serde(default)]
    pub slots_busy: u32,
    pub context_length: Option<u64>,
    pub restart_count: u32,
    pub breaker_open: bool,
    pub last_exit: Option<ExitInfo>,
    pub stderr_tail: Vec<String>,
    pub backoff: Option<BackoffInfo>,
    pub failure: Option<String>,
    pub spawned_at_unix_ms: Option<i64>,
    pub ready_at_unix_ms: Option<i64>,
    pub spawn_to_ready_seconds: Option<f64>,
    pub memory_estimate_bytes: u64,
    /// Resident memory (cpu, metal) or VRAM (cuda) as last sampled.
    pub memory_used_bytes: Option<u64>,
    pub requests_total: u64,
    pub last_used_unix_ms: Option<i64>,
    pub stop: Option<StopInfo>,
}

/// The body of a worker's ready call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ReadyReport {
    pub worker_id: String,
    pub address: String,
    pub pid: u32,
    pub context_length: u64,
    #[serde(default)]
    pub load_seconds: f64,
    /// Sequences the worker generates together.
    #[serde(default = "one_slot")]
    pub slots: u32,
    /// The worker's KV pool, in positions.
    #[serde(default)]
    pub kv_tokens: u64,
}

fn one_slot() -> u32 {
    1
}

impl WorkerState {
    /// Whether requests may be routed to a worker in this state.
    pub fn is_ready(self) -> bool {
        self == WorkerState::Ready
    }

    /// Whether a worker in this state may still come up without anyone asking (starting, or
    /// waiting out a crash backoff).
    pub fn may_come_up(self) -> bool {
        matches!(self, WorkerState::Starting | WorkerState::Backoff)
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/workers` on a hive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    /// `hf:org/repo[:file]` or `file:path`.
    pub model: String,
    #[serde(default = "default_device")]
    pub device: String,
    /// Lower the context below what the model declares (smaller KV cache, smaller estimate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_context: Option<u64>,
}

impl SpawnRequest {
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            device: default_device(),
            max_context: None,
        }
    }
}

fn default_device() -> String {
    "cpu".into()
}
