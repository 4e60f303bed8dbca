//! The queen's shared state and scheduling: which worker serves a request, spawning one on
//! the best hive when none can, and the per-model wait when all are busy.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use rbee_api::{HeartbeatWorker, HiveHeartbeat, codes};
use rbee_auth::{Token, TokenSet};
use rbee_http::ApiError;
use rbee_registry::{HiveRecord, Registry};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::QueenConfig;
use crate::metrics::QueenMetrics;

/// Tokens the queen holds; reloaded on SIGHUP.
#[derive(Default, Clone)]
pub struct Tokens {
    /// Client tokens by name (empty: dev mode).
    pub clients: TokenSet,
    /// What hives present in heartbeats.
    pub join: Option<Token>,
    /// Older join tokens still accepted during a rotation.
    pub join_previous: Vec<Token>,
    /// What the queen presents to hives.
    pub hive: Option<Token>,
    /// Hive-specific tokens (`[[hives]] token_file`), by hive id.
    pub per_hive: HashMap<String, Token>,
}

/// A worker chosen for one request; dropping it frees the worker for the next.
pub struct Lease {
    queen: Arc<Queen>,
    pub hive_id: String,
    pub hive_url: String,
    pub worker_id: String,
    /// Whether this request had to spawn the worker (cold start).
    pub spawned: bool,
}

impl Lease {
    pub fn queen(&self) -> &Arc<Queen> {
        &self.queen
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        lock(&self.queen.busy).remove(&(self.hive_id.clone(), self.worker_id.clone()));
        self.queen.freed.notify_waiters();
    }
}

pub struct Queen {
    cfg: RwLock<QueenConfig>,
    pub tokens: RwLock<Tokens>,
    pub registry: Registry,
    pub metrics: QueenMetrics,
    pub http: reqwest::Client,
    /// Workers serving a request through this queen now: (hive, worker).
    busy: Mutex<std::collections::HashSet<(String, String)>>,
    /// Workers this queen spawned that are not ready yet: model reference → (hive, worker).
    pending: Mutex<HashMap<String, (String, String)>>,
    /// (state, model) series of `rbee_queen_workers` set so far, to zero the ones that vanish.
    worker_series: Mutex<std::collections::BTreeSet<(String, String)>>,
    /// Workers this queen spawned and saw ready, until a heartbeat lists them.
    spawned_ready: Mutex<Vec<(String, HeartbeatWorker, Instant)>>,
    /// Requests waiting for a worker, by request id, with their cancel flag.
    queued: Mutex<HashMap<String, Arc<std::sync::atomic::AtomicBool>>>,
    /// Requests in flight per client token name.
    per_client: Mutex<HashMap<String, u32>>,
    /// Requests in flight by request id: the client that sent them, and how many share it.
    owners: Mutex<HashMap<String, (String, u32)>>,
    /// Requests waiting per model reference, oldest first: a freed worker goes to the first
    /// one that can take it.
    waiting: Mutex<HashMap<String, Vec<Waiter>>>,
    /// After every hive refused a spawn for a model, no new try before this instant.
    spawn_refused_until: Mutex<HashMap<String, Instant>>,
    /// Why the last worker spawned for a model did not come up (for the client's error).
    spawn_failure: Mutex<HashMap<String, String>>,
    /// A hive that refused or failed a spawn for a model ranks last for it until this instant.
    hive_spawn_failed: Mutex<HashMap<(String, String), Instant>>,
    /// Arrival order of waiting requests.
    next_ticket: std::sync::atomic::AtomicU64,
    freed: Notify,
    /// Recent request durations, for `Retry-After`.
    recent: Mutex<Vec<f64>>,
    pub started: Instant,
    audit: Option<rbee_audit::AuditWriter>,
    usage: Option<crate::usage::UsageLog>,
    /// Set when the shutdown drain window is over: open streams end with an error event.
    cut: tokio::sync::watch::Sender<bool>,
    /// Set at SIGTERM: new client work gets 503 while running requests finish.
    draining: std::sync::atomic::AtomicBool,
    /// Client requests holding a slot (from validation to the end of their response).
    active: std::sync::atomic::AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queen {
    pub fn new(cfg: QueenConfig, tokens: Tokens, registry: Registry) -> Result<Arc<Self>, String> {
        let audit = if cfg.audit_log.is_empty() {
            None
        } else {
            let max = (cfg.audit_max_bytes > 0).then_some(cfg.audit_max_bytes);
            let log = rbee_audit::AuditLog::open(std::path::Path::new(&cfg.audit_log), max)
                .map_err(|e| format!("audit_log: {e}"))?;
            Some(rbee_audit::AuditWriter::spawn(log, 4096).map_err(|e| format!("audit_log: {e}"))?)
        };
        let usage = if cfg.usage_log.is_empty() {
            None
        } else {
            Some(
                crate::usage::UsageLog::open(std::path::Path::new(&cfg.usage_log))
                    .map_err(|e| format!("usage_log: {e}"))?,
            )
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(Self {
            cfg: RwLock::new(cfg),
            tokens: RwLock::new(tokens),
            registry,
            metrics: QueenMetrics::new(),
            http,
            busy: Mutex::new(Default::default()),
            pending: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            per_client: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            queued: Mutex::new(HashMap::new()),
            spawned_ready: Mutex::new(Vec::new()),
            worker_series: Mutex::new(Default::default()),
            spawn_refused_until: Mutex::new(HashMap::new()),
            hive_spawn_failed: Mutex::new(HashMap::new()),
            spawn_failure: Mutex::new(HashMap::new()),
            next_ticket: std::sync::atomic::AtomicU64::new(0),
            freed: Notify::new(),
            recent: Mutex::new(Vec::new()),
            started: Instant::now(),
            audit,
            usage,
            cut: tokio::sync::watch::channel(false).0,
            draining: std::sync::atomic::AtomicBool::new(false),
            active: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    /// Queues an audit record (never a token: names and fingerprints only).
    pub fn audit(&self, event: &str, actor: &str, details: Value) {
        if let Some(a) = &self.audit
            && !a.record(event, actor, details)
        {
            warn!(event, "audit queue full; record dropped");
        }
    }

    /// Writes pending audit and usage records (at shutdown).
    pub fn flush(&self) {
        if let Some(a) = &self.audit {
            a.flush(Duration::from_secs(2));
        }
        if let Some(u) = &self.usage {
            u.flush(Duration::from_secs(2));
        }
    }

    /// Continues the usage log in a fresh file at its path (SIGHUP, after logrotate).
    pub fn reopen_usage(&self) {
        if let Some(u) = &self.usage {
            u.reopen();
        }
    }

    pub fn usage(&self, record: Value) {
        if let Some(u) = &self.usage {
            u.write(record);
        }
    }

    /// Cancels a request still waiting for a worker; false when none waits with that id.
    pub fn cancel_queued(&self, request_id: &str) -> bool {
        match lock(&self.queued).get(request_id) {
            Some(flag) => {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                self.freed.notify_waiters();
                true
            }
            None => false,
        }
    }

    /// From now on new client work is refused with 503 `SHUTTING_DOWN`.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Client requests not finished yet (waiting, running or streaming).
    pub fn active_requests(&self) -> usize {
        self.active.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ends every open stream (with an `error` event) after the shutdown drain window.
    pub fn cut_streams(&self) {
        self.cut.send_replace(true);
    }

    /// `events` until the stream ends or the queen cuts it, then an `error` event.
    pub fn cuttable(&self, events: crate::relay::EventStream) -> crate::relay::EventStream {
        use futures_util::StreamExt;
        let mut rx = self.cut.subscribe();
        let cut = Box::pin(async move {
            let _ = rx.wait_for(|c| *c).await;
        });
        let tail = futures_util::stream::once(async {
            rbee_api::StreamEvent::Error {
                code: codes::SHUTTING_DOWN,
                message: "the queen is shutting down; the stream was cut after the drain window"
                    .into(),
            }
        });
        // A stream that ends by itself ends there; only a cut one gets the error.
        let cut_flag = self.cut.subscribe();
        Box::pin(events.take_until(cut).chain(tail.filter(move |_| {
            let was_cut = *cut_flag.borrow();
            async move { was_cut }
        })))
    }

    pub fn config(&self) -> QueenConfig {
        self.cfg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_config(&self, cfg: QueenConfig) {
        *self.cfg.write().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    pub fn tokens(&self) -> Tokens {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The model reference a client's `model` names: a configured alias, else the reference
    /// itself when some hive has it (on disk or loaded).
    pub fn resolve_model(&self, name: &str) -> Option<String> {
        let cfg = self.config();
        if let Some(a) = cfg.models.iter().find(|m| m.name == name) {
            return Some(a.reference.clone());
        }
        let hives = self.registry.up().unwrap_or_default();
        let known = hives.iter().filter_map(|h| h.heartbeat.as_ref()).any(|hb| {
            hb.models.iter().any(|m| m == name) || hb.workers.iter().any(|w| w.model == name)
        });
        known.then(|| name.to_owned())
    }

    /// Every model the cluster can serve: configured aliases and what the hives have.
    pub fn model_cards(&self) -> Vec<(String, &'static str, Vec<String>)> {
        let cfg = self.config();
        let hives = self.registry.up().unwrap_or_default();
        let mut out: BTreeMap<String, (&'static str, Vec<String>)> = BTreeMap::new();
        for a in &cfg.models {
            let (state, where_) = model_state(&hives, &a.reference);
            out.insert(a.name.clone(), (state, where_));
        }
        for h in &hives {
            let Some(hb) = &h.heartbeat else { continue };
            for m in hb.models.iter().chain(hb.workers.iter().map(|w| &w.model)) {
                if cfg.models.iter().any(|a| &a.reference == m) {
                    continue;
                }
                let (state, where_) = model_state(&hives, m);
                out.insert(m.clone(), (state, where_));
            }
        }
        out.into_iter().map(|(k, (s, w))| (k, s, w)).collect()
    }

    /// Whether a heartbeat may present `presented`: the join token or one being retired.
    /// Without a join token heartbeats are open only in dev mode (no client tokens either);
    /// otherwise anyone could join a hive and receive prompts.
    pub fn join_allowed(&self, presented: Option<&str>) -> bool {
        let t = self.tokens();
        match &t.join {
            None => t.clients.is_empty(),
            Some(join) => presented.is_some_and(|p| {
                join.matches(p) || t.join_previous.iter().any(|old| old.matches(p))
            }),
        }
    }

    /// Whether the client token `name` may use the admin routes: tokens marked `admin`, the
    /// single operator's `RBEE_QUEEN_CLIENT_TOKEN` (`env`) and dev mode (`dev`).
    pub fn is_admin(&self, name: &str) -> bool {
        (name == "dev" && self.tokens().clients.is_empty())
            || name == "env"
            || self
                .config()
                .client_tokens
                .iter()
                .any(|t| t.name == name && t.admin)
    }

    /// Brings the registry in line with `[[hives]]` after a reload: new entries are added,
    /// changed URLs applied, and configured hives no longer listed removed. Returns the ids
    /// added and removed.
    pub fn apply_static_hives(&self, now_ms: i64) -> (Vec<String>, Vec<String>) {
        let cfg = self.config();
        let before = self.registry.list().unwrap_or_default();
        let mut added = Vec::new();
        for h in &cfg.hives {
            if !before.iter().any(|r| r.id == h.id) {
                added.push(h.id.clone());
            }
            if let Err(e) = self.registry.add_static(&h.id, &h.url, now_ms) {
                warn!(hive = %h.id, error = %e, "hives: entry not applied");
            }
        }
        let mut removed = Vec::new();
        for r in before {
            if r.source == rbee_registry::HiveSource::Config
                && !cfg.hives.iter().any(|h| h.id == r.id)
                && self.registry.remove(&r.id).unwrap_or(false)
            {
                removed.push(r.id);
            }
        }
        (added, removed)
    }

    /// The token for `hive_id`: its own from the config, else the shared hive token.
    fn hive_token(&self, hive_id: &str) -> Option<Token> {
        let t = self.tokens();
        t.per_hive.get(hive_id).cloned().or(t.hive)
    }

    fn hive_request(&self, hive_id: &str, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.hive_token(hive_id) {
            Some(t) => req.bearer_auth(t.expose()),
            None => req,
        }
    }

    pub fn hive_get(&self, hive_id: &str, url: &str) -> reqwest::RequestBuilder {
        self.hive_request(hive_id, self.http.get(url))
    }

    pub fn hive_post(&self, hive_id: &str, url: &str) -> reqwest::RequestBuilder {
        self.hive_request(hive_id, self.http.post(url))
    }

    pub fn hive_delete(&self, hive_id: &str, url: &str) -> reqwest::RequestBuilder {
        self.hive_request(hive_id, self.http.delete(url))
    }

    /// The client that sent the request in flight under `request_id`, if any.
    pub fn owner_of(&self, request_id: &str) -> Option<String> {
        lock(&self.owners).get(request_id).map(|(c, _)| c.clone())
    }

    /// Counts a request against its client's `max_concurrent` (429 when over) and records
    /// who sent it, so only that client (or an admin) can cancel it. A request id another
    /// client has in flight is refused (409): cancelling by id must not reach someone else's.
    pub fn client_slot(
        self: &Arc<Self>,
        client: &str,
        request_id: &str,
    ) -> Result<ClientSlot, ApiError> {
        {
            let mut owners = lock(&self.owners);
            match owners.get_mut(request_id) {
                Some((owner, _)) if owner != client => {
                    return Err(ApiError::new(
                        codes::INVALID_PARAMETER,
                        format!(
                            "request id `{request_id}` is in use by another client; send another X-Request-Id"
                        ),
                    )
                    .with_status(StatusCode::CONFLICT));
                }
                Some((_, n)) => *n += 1,
                None => {
                    owners.insert(request_id.to_owned(), (client.to_owned(), 1));
                }
            }
        }
        let owned = OwnedId {
            queen: self.clone(),
            request_id: request_id.to_owned(),
        };
        let limit = self
            .config()
            .client_tokens
            .iter()
            .find(|t| t.name == client)
            .and_then(|t| t.max_concurrent);
        let mut map = lock(&self.per_client);
        let n = map.entry(client.to_owned()).or_insert(0);
        if let Some(limit) = limit
            && *n >= limit
        {
            return Err(ApiError {
                retry_after: Some(self.retry_after(1, 0)),
                ..ApiError::new(
                    codes::CLIENT_LIMIT,
                    format!(
                        "client `{client}` already has {limit} requests in flight (its max_concurrent)"
                    ),
                )
            });
        }
        *n += 1;
        self.active
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(ClientSlot {
            queen: self.clone(),
            client: client.to_owned(),
            _owned: owned,
        })
    }

    /// Records how long a request held its worker (for `Retry-After`).
    pub fn record_duration(&self, secs: f64) {
        let mut r = lock(&self.recent);
        if r.len() == 64 {
            r.remove(0);
        }
        r.push(secs);
    }

    /// Seconds until a place frees up, from the recent request durations and the number of
    /// ready workers for the model: at least 1.
    pub fn retry_after(&self, workers: usize, ahead: u32) -> u32 {
        let r = lock(&self.recent);
        let mean = if r.is_empty() {
            5.0
        } else {
            r.iter().sum::<f64>() / r.len() as f64
        };
        let per_worker = (f64::from(ahead) + 1.0) / workers.max(1) as f64;
        (mean * per_worker).ceil().clamp(1.0, 3600.0) as u32
    }

    /// Finds (or makes) a worker for `model_ref` and leases it.
    pub async fn lease(
        self: &Arc<Self>,
        model_ref: &str,
        request_id: &str,
        deadline: Instant,
        avoid: Option<(&str, &str)>,
    ) -> Result<Lease, ApiError> {
        let cfg = self.config().scheduling;
        let now = Instant::now();
        // Waiting for a busy worker is bounded by queue_wait_seconds; waiting for a worker
        // being spawned by spawn_wait_seconds; both by the request's deadline.
        let queue_deadline = add_secs(now, cfg.queue_wait_seconds);
        let spawn_deadline = add_secs(now, cfg.spawn_wait_seconds);
        let in_io = IoFlag::default();
        // Request ids come from clients and may repeat; the queue keeps its own order.
        let ticket = self
            .next_ticket
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ahead = {
            let mut w = lock(&self.waiting);
            let queue = w.entry(model_ref.to_owned()).or_default();
            let n = queue.len() as u32;
            if n >= cfg.queue_length {
                let ready = self.ready_workers(model_ref).len();
                let retry = self.retry_after(ready, n);
                self.metrics.queue_rejections.inc(&["full"]);
                return Err(ApiError {
                    retry_after: Some(retry),
                    ..ApiError::new(
                        codes::QUEUE_FULL,
                        format!(
                            "{n} requests are already waiting for `{model_ref}`; retry in {retry} s",
                        ),
                    )
                });
            }
            queue.push(Waiter {
                ticket,
                in_io: in_io.0.clone(),
                avoid: avoid.map(|(h, w)| (h.to_owned(), w.to_owned())),
            });
            self.metrics.queue_depth.set(&[model_ref], f64::from(n + 1));
            n
        };
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        lock(&self.queued).insert(request_id.to_owned(), cancelled.clone());
        let _waiting = WaitGuard {
            queen: self.clone(),
            model: model_ref.to_owned(),
            request_id: request_id.to_owned(),
            ticket,
        };
        let t0 = Instant::now();
        let mut spawned = false;
        let mut spawn_started: Option<Instant> = None;
        loop {
            let freed = self.freed.notified();
            if cancelled.load(std::sync::atomic::Ordering::SeqCst) {
                self.metrics.queue_rejections.inc(&["cancelled"]);
                return Err(ApiError::new(
                    codes::CANCELLED,
                    "the request was cancelled while waiting for a worker",
                ));
            }
            if *self.cut.borrow() {
                return Err(ApiError::new(
                    codes::SHUTTING_DOWN,
                    "the queen shut down before a worker was free for this request",
                )
                .retry_after(5));
            }
            if let Some((hive, worker)) = self.pick(model_ref, avoid, ticket) {
                self.picked_pending(model_ref, &hive.id, &worker);
                let waited = t0.elapsed().as_secs_f64();
                self.metrics.queue_wait.observe(&[], waited);
                self.metrics.stage.observe(&["schedule"], waited);
                if let Some(t) = spawn_started {
                    self.metrics
                        .stage
                        .observe(&["spawn"], t.elapsed().as_secs_f64());
                }
                self.metrics
                    .decisions
                    .inc(&[if spawned { "spawn" } else { "reuse" }]);
                return Ok(Lease {
                    queen: self.clone(),
                    hive_id: hive.id.clone(),
                    hive_url: hive.url.clone(),
                    worker_id: worker,
                    spawned,
                });
            }
            let pending = lock(&self.pending).get(model_ref).cloned();
            let spawning = pending.is_some();
            match pending {
                // Another request is between asking a hive and its answer: wait for it.
                Some((hive_id, _)) if hive_id.is_empty() => {}
                Some((hive_id, worker_id)) => {
                    let _io = in_io.set();
                    self.check_pending(model_ref, &hive_id, &worker_id).await;
                }
                // The worker a retry avoids does not count: it just failed this request.
                // Every hive just failed to start one and nothing else can serve: say why now
                // rather than starting the same failure again.
                None if self.usable_workers(model_ref, avoid) == 0
                    && self.spawn_blocked(model_ref)
                    && lock(&self.spawn_failure).contains_key(model_ref) =>
                {
                    let reason = lock(&self.spawn_failure)
                        .get(model_ref)
                        .cloned()
                        .unwrap_or_default();
                    let retry = lock(&self.spawn_refused_until)
                        .get(model_ref)
                        .map_or(1, |t| {
                            t.saturating_duration_since(Instant::now()).as_secs() as u32 + 1
                        });
                    self.metrics.queue_rejections.inc(&["spawn_failed"]);
                    return Err(ApiError::new(
                        codes::NO_CAPACITY,
                        format!("no worker for `{model_ref}` could be started: {reason}"),
                    )
                    .retry_after(retry));
                }
                None if (self.usable_workers(model_ref, avoid) == 0 || ahead > 0)
                    && !self.spawn_blocked(model_ref)
                    && self.claim_spawn(model_ref) =>
                {
                    let spawn = {
                        let _io = in_io.set();
                        self.spawn(model_ref).await
                    };
                    match spawn {
                        Ok(()) => {
                            spawned = true;
                            spawn_started = Some(Instant::now());
                        }
                        Err(e) => {
                            lock(&self.pending).remove(model_ref);
                            if self.usable_workers(model_ref, avoid) == 0 {
                                return Err(e);
                            }
                            info!(error = %e.message, "could not add a worker; waiting for a busy one");
                            lock(&self.spawn_refused_until).insert(
                                model_ref.to_owned(),
                                Instant::now() + SPAWN_RETRY_AFTER_REFUSAL,
                            );
                        }
                    }
                }
                None => {}
            }
            let now = Instant::now();
            if now >= deadline {
                self.metrics.queue_rejections.inc(&["deadline"]);
                return Err(ApiError::new(
                    codes::DEADLINE_EXCEEDED,
                    format!(
                        "the request's deadline passed while waiting for a worker for `{model_ref}`"
                    ),
                ));
            }
            let limit = if spawned || spawning {
                spawn_deadline
            } else {
                queue_deadline
            };
            if now >= limit {
                let ready = self.ready_workers(model_ref).len();
                let retry = self.retry_after(ready, ahead);
                self.metrics.queue_rejections.inc(&["timeout"]);
                return Err(ApiError::new(
                    codes::NO_CAPACITY,
                    format!("no worker for `{model_ref}` became free in time; retry in {retry} s"),
                )
                .retry_after(retry));
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), freed).await;
        }
    }

    /// Marks a spawn for `model_ref` as under way (before asking any hive), so concurrent
    /// cold requests wait for one worker instead of each starting their own.
    fn claim_spawn(&self, model_ref: &str) -> bool {
        let mut p = lock(&self.pending);
        if p.contains_key(model_ref) {
            return false;
        }
        p.insert(model_ref.to_owned(), (String::new(), String::new()));
        true
    }

    fn usable_workers(&self, model_ref: &str, avoid: Option<(&str, &str)>) -> usize {
        self.ready_workers(model_ref)
            .iter()
            .filter(|(h, w)| !avoided(avoid, &h.id, &w.id))
            .count()
    }

    /// No spawn for `model_ref` now: every hive refused or failed one moments ago (a hive
    /// that joined since, or one that has not failed, is still tried).
    fn spawn_blocked(&self, model_ref: &str) -> bool {
        let refused = lock(&self.spawn_refused_until)
            .get(model_ref)
            .is_some_and(|t| Instant::now() < *t);
        refused
            && self
                .ranked_hives(model_ref)
                .iter()
                .all(|h| self.spawn_failed_recently(&h.id, model_ref))
    }

    /// Ready workers for a model on hives that are up, as the last heartbeats (and our own
    /// spawns) tell.
    fn ready_workers(&self, model_ref: &str) -> Vec<(HiveRecord, HeartbeatWorker)> {
        let hives = self.registry.up().unwrap_or_default();
        let mut out = Vec::new();
        for h in &hives {
            let Some(hb) = h.heartbeat.clone() else {
                continue;
            };
            for w in hb.workers {
                if w.model == model_ref && w.state.is_ready() {
                    out.push((h.clone(), w));
                }
            }
        }
        // Workers we saw become ready that no heartbeat lists as ready yet (kept for up to 3
        // intervals; an older beat may still say `starting`).
        let keep = Duration::from_secs(self.config().scheduling.heartbeat_seconds * 3);
        let mut extra = lock(&self.spawned_ready);
        extra.retain(|(hive_id, w, at)| {
            let listed = hives.iter().any(|h| {
                h.id == *hive_id
                    && h.heartbeat.as_ref().is_some_and(|hb| {
                        hb.workers
                            .iter()
                            .any(|x| x.id == w.id && x.state.is_ready())
                    })
            });
            !listed && at.elapsed() < keep
        });
        for (hive_id, w, _) in extra.iter() {
            if w.model == model_ref
                && let Some(h) = hives.iter().find(|h| h.id == *hive_id)
            {
                out.push((h.clone(), w.clone()));
            }
        }
        out
    }

    /// The idle ready worker on the least-used hive (stable tie-break: hive id, worker id),
    /// marked busy. First come, first served: a worker that a request waiting longer could
    /// take is left to it.
    fn pick(
        &self,
        model_ref: &str,
        avoid: Option<(&str, &str)>,
        ticket: u64,
    ) -> Option<(HiveRecord, String)> {
        let waiting = lock(&self.waiting);
        let ahead: Vec<Waiter> = waiting
            .get(model_ref)
            .map(|q| {
                q.iter()
                    .take_while(|w| w.ticket != ticket)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        drop(waiting);
        let mut busy = lock(&self.busy);
        let mut candidates: Vec<(usize, HiveRecord, String)> = self
            .ready_workers(model_ref)
            .into_iter()
            .filter(|(h, w)| !busy.contains(&(h.id.clone(), w.id.clone())))
            .filter(|(h, w)| !avoided(avoid, &h.id, &w.id))
            .filter(|(h, w)| {
                // A waiter busy asking a hive (spawn, status poll) does not hold back a free
                // worker; it picks again when its call returns.
                ahead
                    .iter()
                    .filter(|earlier| !earlier.in_io.load(std::sync::atomic::Ordering::SeqCst))
                    .all(|earlier| {
                        let a = earlier
                            .avoid
                            .as_ref()
                            .map(|(h, w)| (h.as_str(), w.as_str()));
                        avoided(a, &h.id, &w.id)
                    })
            })
            .map(|(h, w)| {
                let load = busy.iter().filter(|(hid, _)| *hid == h.id).count();
                (load, h, w.id)
            })
            .collect();
        candidates.sort_by(|a, b| (a.0, &a.1.id, &a.2).cmp(&(b.0, &b.1.id, &b.2)));
        let (_, hive, worker) = candidates.into_iter().next()?;
        busy.insert((hive.id.clone(), worker.clone()));
        Some((hive, worker))
    }

    /// The hive a new worker for `model_ref` would go to (see [`Queen::spawn`]).
    pub fn best_hive(&self, model_ref: &str) -> Option<String> {
        self.ranked_hives(model_ref)
            .into_iter()
            .next()
            .map(|h| h.id)
    }

    fn ranked_hives(&self, model_ref: &str) -> Vec<HiveRecord> {
        let mut hives: Vec<HiveRecord> = self
            .registry
            .up()
            .unwrap_or_default()
            .into_iter()
            .filter(|h| h.heartbeat.is_some())
            .collect();
        hives.sort_by_key(|h| {
            let recently_failed = self.spawn_failed_recently(&h.id, model_ref);
            let hb = h.heartbeat.as_ref();
            let on_disk = hb.is_some_and(|b| b.models.iter().any(|m| m == model_ref));
            let free = hb.map_or(0, |b| b.resources.memory_available_bytes);
            let workers = hb.map_or(0, |b| b.workers.len());
            (
                recently_failed,
                !on_disk,
                std::cmp::Reverse(free),
                workers,
                h.id.clone(),
            )
        });
        hives
    }

    /// Spawns a worker for the model on the best hive: the model already on disk, then the
    /// most free memory, then the fewest workers. A hive that refuses (507) is skipped.
    async fn spawn(&self, model_ref: &str) -> Result<(), ApiError> {
        let hives = self.ranked_hives(model_ref);
        if hives.is_empty() {
            // Nothing drains here: the soonest change is a hive's next heartbeat.
            let retry = self.config().scheduling.heartbeat_seconds.clamp(1, 300) as u32;
            return Err(
                ApiError::new(codes::NO_CAPACITY, "no hive is up to run a worker")
                    .retry_after(retry),
            );
        }
        let mut last = String::new();
        for h in hives {
            let url = format!("{}/v1/workers", h.url.trim_end_matches('/'));
            let sent = self
                .hive_post(&h.id, &url)
                .json(&json!({"model": model_ref}))
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            match sent {
                Ok(r) if r.status().as_u16() == 202 => {
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    let Some(id) = body["id"].as_str() else {
                        last = format!("hive {} answered without a worker id", h.id);
                        continue;
                    };
                    info!(hive = %h.id, worker = id, model = model_ref, "spawned a worker");
                    self.metrics.spawns.inc(&[&h.id]);
                    lock(&self.pending).insert(model_ref.to_owned(), (h.id.clone(), id.to_owned()));
                    return Ok(());
                }
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    last = format!("hive {} answered {status}: {body}", h.id);
                }
                Err(e) => last = format!("hive {} unreachable: {e}", h.id),
            }
            warn!("{last}");
            self.spawn_failed_on(&h.id, model_ref);
        }
        // Room appears when a running request finishes somewhere.
        let retry = self.retry_after(self.ready_workers(model_ref).len(), 0);
        Err(ApiError::new(
            codes::NO_CAPACITY,
            format!("no hive could start a worker for `{model_ref}`: {last}"),
        )
        .retry_after(retry))
    }

    /// Polls a worker we spawned; once ready it is folded into the registry's view (so it can
    /// be picked before the next heartbeat), once failed it is forgotten.
    async fn check_pending(&self, model_ref: &str, hive_id: &str, worker_id: &str) {
        let Ok(Some(hive)) = self.registry.get(hive_id) else {
            lock(&self.pending).remove(model_ref);
            return;
        };
        // One failed poll (a timeout, a 5xx, a token mid-rotation) is not a failed worker: only
        // a hive that no longer knows it, a hive that went down, or a failed state is.
        let view: Value = match self.worker_view(&hive, worker_id).await {
            Ok(r) if r.status().is_success() => r.json().await.unwrap_or(Value::Null),
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                json!({"state": "gone", "failure": "the hive no longer has this worker"})
            }
            _ if hive.state == rbee_registry::HiveState::Down => {
                json!({"state": "unreachable", "failure": "the hive went down"})
            }
            Ok(_) | Err(_) => return,
        };
        match view["state"].as_str() {
            Some("ready") => {
                lock(&self.pending).remove(model_ref);
                lock(&self.spawn_failure).remove(model_ref);
                if let Some(secs) = view["spawn_to_ready_seconds"].as_f64() {
                    self.metrics.stage.observe(&["load"], secs);
                }
                // Routable now, before the hive's next heartbeat lists it; the registry is
                // left to real heartbeats.
                lock(&self.spawned_ready).push((
                    hive_id.to_owned(),
                    HeartbeatWorker {
                        id: worker_id.to_owned(),
                        model: model_ref.to_owned(),
                        device: view["device"].as_str().unwrap_or("cpu").to_owned(),
                        state: rbee_api::WorkerState::Ready,
                        busy: false,
                    },
                    Instant::now(),
                ));
            }
            Some("starting") | Some("backoff") | None => {}
            _ => {
                let reason = failure_reason(hive_id, worker_id, &view);
                warn!(
                    hive = hive_id,
                    worker = worker_id,
                    %reason,
                    "a spawned worker did not come up"
                );
                lock(&self.spawn_failure).insert(model_ref.to_owned(), reason);
                lock(&self.pending).remove(model_ref);
                self.spawn_failed_on(hive_id, model_ref);
                // The next try goes to another hive at once; once every hive failed, wait.
                if self
                    .ranked_hives(model_ref)
                    .iter()
                    .all(|h| self.spawn_failed_recently(&h.id, model_ref))
                {
                    lock(&self.spawn_refused_until).insert(
                        model_ref.to_owned(),
                        Instant::now() + SPAWN_RETRY_AFTER_REFUSAL,
                    );
                }
            }
        }
    }

    fn spawn_failed_recently(&self, hive_id: &str, model_ref: &str) -> bool {
        lock(&self.hive_spawn_failed)
            .get(&(hive_id.to_owned(), model_ref.to_owned()))
            .is_some_and(|until| Instant::now() < *until)
    }

    /// `GET /v1/workers/{id}` on the hive, with a 5 s limit.
    async fn worker_view(
        &self,
        hive: &HiveRecord,
        worker_id: &str,
    ) -> reqwest::Result<reqwest::Response> {
        let url = format!("{}/v1/workers/{worker_id}", hive.url.trim_end_matches('/'));
        self.hive_get(&hive.id, &url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
    }

    /// A heartbeat can list a spawned worker as ready before the poll does: the spawn is over
    /// then too, and its load time is fetched off the request's path.
    fn picked_pending(self: &Arc<Self>, model_ref: &str, hive_id: &str, worker_id: &str) {
        {
            let mut pending = lock(&self.pending);
            match pending.get(model_ref) {
                Some((h, w)) if h == hive_id && w == worker_id => {
                    pending.remove(model_ref);
                }
                _ => return,
            }
        }
        lock(&self.spawn_failure).remove(model_ref);
        let (queen, hive_id, worker_id) = (self.clone(), hive_id.to_owned(), worker_id.to_owned());
        tokio::spawn(async move {
            if let Ok(Some(hive)) = queen.registry.get(&hive_id)
                && let Ok(r) = queen.worker_view(&hive, &worker_id).await
                && let Ok(view) = r.json::<Value>().await
                && let Some(secs) = view["spawn_to_ready_seconds"].as_f64()
            {
                queen.metrics.stage.observe(&["load"], secs);
            }
        });
    }

    /// Ranks `hive_id` last for `model_ref` for a while, so the next spawn tries the others.
    fn spawn_failed_on(&self, hive_id: &str, model_ref: &str) {
        lock(&self.hive_spawn_failed).insert(
            (hive_id.to_owned(), model_ref.to_owned()),
            Instant::now() + HIVE_SPAWN_COOLDOWN,
        );
    }

    /// Applies a heartbeat (from the API handler, after the join token was checked).
    pub fn heartbeat(&self, hb: &HiveHeartbeat) -> Result<(), ApiError> {
        match self.registry.heartbeat(hb, rbee_http::unix_ms()) {
            Ok(outcome) => {
                self.metrics.heartbeats.inc(&[&hb.hive_id]);
                info_outcome(hb, &outcome);
                match outcome {
                    rbee_registry::BeatOutcome::Joined => self.audit(
                        "hive.join",
                        &hb.hive_id,
                        json!({"hive_id": hb.hive_id, "url": hb.url, "version": hb.version}),
                    ),
                    rbee_registry::BeatOutcome::CameBack => {
                        self.audit("hive.back", &hb.hive_id, json!({"hive_id": hb.hive_id}))
                    }
                    _ => {}
                }
                Ok(())
            }
            Err(e) => Err(ApiError::new(codes::INVALID_PARAMETER, e.to_string())),
        }
    }

    /// Marks silent hives down, forever (every heartbeat interval).
    pub async fn sweep_loop(self: Arc<Self>) {
        loop {
            let every = Duration::from_secs(self.config().scheduling.heartbeat_seconds);
            tokio::time::sleep(every).await;
            let stale = every.as_millis() as i64 * 3;
            match self.registry.sweep(rbee_http::unix_ms(), stale) {
                Ok(down) => {
                    for id in down {
                        warn!(hive = %id, "missed 3 heartbeats; out of routing until it beats again");
                        self.audit("hive.down", "queen", json!({"hive_id": id}));
                    }
                }
                Err(e) => warn!(error = %e, "registry sweep failed"),
            }
            self.refresh_gauges();
        }
    }

    fn refresh_gauges(&self) {
        let all = self.registry.list().unwrap_or_default();
        let up = all
            .iter()
            .filter(|h| h.state == rbee_registry::HiveState::Up)
            .count();
        self.metrics.hives.set(&["up"], up as f64);
        self.metrics.hives.set(&["down"], (all.len() - up) as f64);
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        for h in all
            .iter()
            .filter(|h| h.state == rbee_registry::HiveState::Up)
        {
            for w in h.heartbeat.iter().flat_map(|hb| hb.workers.iter()) {
                *counts
                    .entry((w.state.as_str().to_owned(), w.model.clone()))
                    .or_insert(0) += 1;
            }
        }
        let mut seen = lock(&self.worker_series);
        for key in seen.iter() {
            if !counts.contains_key(key) {
                self.metrics.workers.set(&[&key.0, &key.1], 0.0);
            }
        }
        for ((state, model), n) in &counts {
            self.metrics.workers.set(&[state, model], *n as f64);
            seen.insert((state.clone(), model.clone()));
        }
    }
}

/// Whether a waiter is in a call to a hive; `set()` marks it until the guard drops.
#[derive(Default)]
struct IoFlag(Arc<std::sync::atomic::AtomicBool>);

impl IoFlag {
    fn set(&self) -> IoGuard<'_> {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        IoGuard(self)
    }
}

struct IoGuard<'a>(&'a IoFlag);

impl Drop for IoGuard<'_> {
    fn drop(&mut self) {
        self.0.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What the hive says about a worker that failed to start: its failure, last exit and the
/// last line it wrote to stderr.
fn failure_reason(hive_id: &str, worker_id: &str, view: &Value) -> String {
    let mut reason = format!("worker {worker_id} on hive {hive_id}");
    match view["state"].as_str() {
        Some(state) => reason.push_str(&format!(" is {state}")),
        None => reason.push_str(" could not be inspected"),
    }
    if let Some(f) = view["failure"].as_str() {
        reason.push_str(&format!(": {f}"));
    }
    if let Some(exit) = view["last_exit"].as_object() {
        reason.push_str(&format!("; last exit {}", Value::Object(exit.clone())));
    }
    if let Some(line) = view["stderr_tail"]
        .as_array()
        .and_then(|t| t.last())
        .and_then(Value::as_str)
    {
        reason.push_str(&format!("; stderr: {line}"));
    }
    reason
}

/// Whether a retry avoids this worker: the one that failed, or every worker of a hive that
/// could not be reached (`worker` = `*`).
fn avoided(avoid: Option<(&str, &str)>, hive: &str, worker: &str) -> bool {
    avoid.is_some_and(|(h, w)| h == hive && (w == "*" || w == worker))
}

/// `now + secs`, saturating far in the future instead of overflowing.
fn add_secs(now: Instant, secs: u64) -> Instant {
    now.checked_add(Duration::from_secs(secs))
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

/// How long the queen waits before asking hives again for a worker they just refused.
const SPAWN_RETRY_AFTER_REFUSAL: Duration = Duration::from_secs(5);

/// How long a hive that failed to start a worker for a model ranks last for that model.
const HIVE_SPAWN_COOLDOWN: Duration = Duration::from_secs(60);

/// A request waiting for a worker, in arrival order.
#[derive(Clone)]
struct Waiter {
    ticket: u64,
    /// Set while this waiter awaits a hive (spawn or status poll).
    in_io: Arc<std::sync::atomic::AtomicBool>,
    /// The worker (or `*`: whole hive) a retry must not use.
    avoid: Option<(String, String)>,
}

fn info_outcome(hb: &HiveHeartbeat, outcome: &rbee_registry::BeatOutcome) {
    match outcome {
        rbee_registry::BeatOutcome::Joined => {
            info!(hive = %hb.hive_id, url = %hb.url, "hive joined")
        }
        rbee_registry::BeatOutcome::CameBack => info!(hive = %hb.hive_id, "hive is back"),
        _ => {}
    }
}

/// One request counted against its client's limit until dropped.
pub struct ClientSlot {
    queen: Arc<Queen>,
    client: String,
    _owned: OwnedId,
}

/// A request id recorded as in flight until dropped.
struct OwnedId {
    queen: Arc<Queen>,
    request_id: String,
}

impl Drop for OwnedId {
    fn drop(&mut self) {
        let mut owners = lock(&self.queen.owners);
        if let Some((_, n)) = owners.get_mut(&self.request_id) {
            *n -= 1;
            if *n == 0 {
                owners.remove(&self.request_id);
            }
        }
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.queen.per_client).get_mut(&self.client) {
            *n = n.saturating_sub(1);
        }
        self.queen
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

struct WaitGuard {
    queen: Arc<Queen>,
    model: String,
    request_id: String,
    ticket: u64,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        lock(&self.queen.queued).remove(&self.request_id);
        if let Some(q) = lock(&self.queen.waiting).get_mut(&self.model) {
            q.retain(|w| w.ticket != self.ticket);
            self.queen
                .metrics
                .queue_depth
                .set(&[&self.model], q.len() as f64);
        }
        // The next in line may take what this request leaves.
        self.queen.freed.notify_waiters();
    }
}

fn model_state(hives: &[HiveRecord], reference: &str) -> (&'static str, Vec<String>) {
    let mut loaded = Vec::new();
    let mut on_disk = Vec::new();
    for h in hives {
        let Some(hb) = &h.heartbeat else { continue };
        if hb
            .workers
            .iter()
            .any(|w| w.model == reference && w.state.is_ready())
        {
            loaded.push(h.id.clone());
        } else if hb.models.iter().any(|m| m == reference) {
            on_disk.push(h.id.clone());
        }
    }
    if !loaded.is_empty() {
        ("loaded", loaded)
    } else if !on_disk.is_empty() {
        ("on_disk", on_disk)
    } else {
        ("configured", Vec::new())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rbee_api::NodeResources;

    fn beat(id: &str, free: u64) -> HiveHeartbeat {
        HiveHeartbeat {
            hive_id: id.into(),
            url: format!("http://127.0.0.1:1/{id}"),
            version: "test".into(),
            resources: NodeResources {
                cpu_cores: 2,
                memory_total_bytes: 8 << 30,
                memory_available_bytes: free,
                gpus: Vec::new(),
                model_disk_free_bytes: 1 << 30,
            },
            workers: Vec::new(),
            models: vec!["file:m.gguf".into()],
            model_sha256: Default::default(),
        }
    }

    #[test]
    fn a_hive_that_failed_a_spawn_ranks_last_for_that_model_only() {
        let queen = Queen::new(
            QueenConfig::default(),
            Tokens::default(),
            Registry::open_in_memory().unwrap(),
        )
        .unwrap();
        queen.heartbeat(&beat("roomy", 6 << 30)).unwrap();
        queen.heartbeat(&beat("tight", 2 << 30)).unwrap();
        assert_eq!(queen.best_hive("file:m.gguf").as_deref(), Some("roomy"));
        queen.spawn_failed_on("roomy", "file:m.gguf");
        assert_eq!(queen.best_hive("file:m.gguf").as_deref(), Some("tight"));
        assert_eq!(queen.best_hive("file:other.gguf").as_deref(), Some("roomy"));
    }
}
