//! The scheduler's vocabulary: who a request may not use, the settings it reads, and the
//! actions its steps return.

use std::time::Duration;

use rbee_http::ApiError;

/// Arrival order of a waiting request.
pub type Ticket = u64;

/// One worker of one hive.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerKey {
    pub hive: String,
    pub worker: String,
}

impl WorkerKey {
    pub fn new(hive: &str, worker: &str) -> Self {
        Self {
            hive: hive.to_owned(),
            worker: worker.to_owned(),
        }
    }
}

/// Who a waiting request is for. Queues are fair between clients (the one served least
/// recently goes first); within one client's requests, lower `priority` first, then arrival.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub client: String,
    pub priority: i32,
}

impl Requester {
    pub fn new(client: &str, priority: i32) -> Self {
        Self {
            client: client.to_owned(),
            priority,
        }
    }
}

/// What a retry must not use: the worker that just failed it, or a whole hive that could not be
/// reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Avoid {
    Worker(WorkerKey),
    Hive(String),
}

impl Avoid {
    fn covers(&self, key: &WorkerKey) -> bool {
        match self {
            Avoid::Worker(k) => k == key,
            Avoid::Hive(h) => *h == key.hive,
        }
    }
}

pub(super) fn avoided(avoid: &Option<Avoid>, key: &WorkerKey) -> bool {
    avoid.as_ref().is_some_and(|a| a.covers(key))
}

/// The settings scheduling reads (from `[scheduling]`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub queue_length: u32,
    pub queue_wait: Duration,
    pub spawn_wait: Duration,
    pub heartbeat: Duration,
}

impl Limits {
    pub fn from_config(s: &crate::config::SchedulingConfig) -> Self {
        Self {
            queue_length: s.queue_length,
            queue_wait: Duration::from_secs(s.queue_wait_seconds),
            spawn_wait: Duration::from_secs(s.spawn_wait_seconds),
            heartbeat: Duration::from_secs(s.heartbeat_seconds),
        }
    }
}

/// How long the queen waits before asking hives again for a worker they all just refused.
pub const SPAWN_RETRY_AFTER_REFUSAL: Duration = Duration::from_secs(5);

/// How long a hive that failed to start a worker for a model ranks last for that model.
pub const HIVE_SPAWN_COOLDOWN: Duration = Duration::from_secs(60);

/// A lease granted to a waiting request.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub key: WorkerKey,
    pub hive_url: String,
    /// The request had to spawn a worker (cold start).
    pub spawned: bool,
    /// How long the request waited.
    pub waited: Duration,
    /// How long since the spawn it started was asked for, when it started one.
    pub spawn_took: Option<Duration>,
}

/// Why a waiting request was refused, for `rbee_queen_queue_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Cancelled,
    Deadline,
    Timeout,
    SpawnFailed,
    NoHive,
    ShuttingDown,
}

impl Rejection {
    /// The metric label, or none for refusals that are not queue rejections.
    pub fn label(self) -> Option<&'static str> {
        match self {
            Rejection::Cancelled => Some("cancelled"),
            Rejection::Deadline => Some("deadline"),
            Rejection::Timeout => Some("timeout"),
            Rejection::SpawnFailed => Some("spawn_failed"),
            Rejection::NoHive | Rejection::ShuttingDown => None,
        }
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Hand a worker to a waiting request.
    Grant { ticket: Ticket, grant: Grant },
    /// Answer a waiting request with an error.
    Reject {
        ticket: Ticket,
        why: Rejection,
        error: ApiError,
    },
    /// Ask these hives, in order, to start a worker for `model`; report back with
    /// [`Scheduler::spawn_accepted`], [`Scheduler::spawn_refused`] or
    /// [`Scheduler::spawn_exhausted`].
    Spawn {
        model: String,
        hives: Vec<(String, String)>,
    },
    /// Watch a spawned worker until it is ready or failed ([`Scheduler::worker_ready`],
    /// [`Scheduler::worker_failed`]).
    Watch { model: String, key: WorkerKey },
    /// The number of requests waiting for `model` changed.
    QueueDepth { model: String, depth: usize },
    /// These requests' timers changed (a spawn they waited for ended): wake them to look again.
    Rearm { tickets: Vec<Ticket> },
}
