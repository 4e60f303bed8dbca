//! The queen's shared state and the shell around its scheduler: requests wait on a channel
//! until [`crate::sched`] grants them a worker or refuses them; spawns and spawn watches run
//! as tasks that report back as events. Nothing here polls for a free worker.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use rbee_api::{InferenceRequest, codes};
use rbee_auth::{Token, TokenSet};
use rbee_http::ApiError;
use rbee_registry::{HiveRecord, Registry};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tracing::warn;

use crate::config::QueenConfig;
use crate::hive_client::HiveClient;
use crate::metrics::QueenMetrics;
use crate::sched::{Action, Avoid, Requester, Scheduler, Ticket, WorkerKey};

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

/// A worker chosen for one request; dropping it frees the worker's slot for the next.
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

    pub fn key(&self) -> WorkerKey {
        WorkerKey::new(&self.hive_id, &self.worker_id)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let key = self.key();
        self.queen.event(|s, now| s.release(&key, now));
    }
}

pub struct Queen {
    /// This queen, for the tasks its scheduler starts.
    this: std::sync::Weak<Queen>,
    cfg: RwLock<QueenConfig>,
    pub tokens: RwLock<Tokens>,
    pub registry: Registry,
    pub metrics: QueenMetrics,
    pub http: reqwest::Client,
    /// The certificate served when `[tls]` is set (re-read on SIGHUP).
    pub tls: Option<rbee_http::tls::ServerTls>,
    /// `server.stream_stall_seconds`, read at start like the rest of `[server]`.
    pub stream_stall: Duration,
    /// The one owner of scheduling state.
    sched: Mutex<Scheduler>,
    /// Requests waiting for a worker: where their answer goes.
    waiters: Mutex<HashMap<Ticket, Waiting>>,
    /// Waiting requests by request id (for cancels).
    queued: Mutex<HashMap<String, Vec<Ticket>>>,
    /// (state, model) series of `rbee_queen_workers` set so far, to zero the ones that vanish.
    worker_series: Mutex<std::collections::BTreeSet<(String, String)>>,
    /// Requests in flight by request id: the client that sent them, and how many share it.
    owners: Mutex<HashMap<String, (String, u32)>>,
    pub started: Instant,
    audit: Option<rbee_audit::AuditWriter>,
    /// Unauthenticated failures, aggregated, in their own chain beside `audit_log`.
    audit_failures: Option<rbee_audit::FailureLog>,
    usage: Option<crate::usage::UsageLog>,
    /// Set when the shutdown drain window is over: open streams end with an error event.
    cut: tokio::sync::watch::Sender<bool>,
    /// Set at SIGTERM: new client work gets 503 while running requests finish.
    draining: std::sync::atomic::AtomicBool,
    /// Client requests holding a slot (from validation to the end of their response).
    active: std::sync::atomic::AtomicUsize,
    /// Held URL changes already audited, by hive id.
    held_urls: Mutex<HashMap<String, String>>,
    /// Per-client rate limits and budgets.
    limiter: Mutex<crate::limits::Limiter>,
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
        let audit_failures = if cfg.audit_log.is_empty() {
            None
        } else {
            let max = (cfg.audit_max_bytes > 0).then_some(cfg.audit_max_bytes);
            let main = std::path::Path::new(&cfg.audit_log);
            Some(rbee_audit::FailureLog::open(main, max).map_err(|e| format!("audit_log: {e}"))?)
        };
        let usage = if cfg.usage_log.is_empty() {
            None
        } else {
            Some(
                crate::usage::UsageLog::open(std::path::Path::new(&cfg.usage_log))
                    .map_err(|e| format!("usage_log: {e}"))?,
            )
        };
        // Hives are reached directly: an HTTP(S)_PROXY in the environment must not see the
        // prompts and tokens the queen sends them.
        let mut http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(rbee_http::server::CLIENT_POOL_IDLE);
        if !cfg.tls.ca_file.is_empty() {
            let certs = rbee_http::tls::certificates(std::path::Path::new(&cfg.tls.ca_file))
                .map_err(|e| format!("tls.ca_file: {e}"))?;
            for c in certs {
                let c =
                    reqwest::Certificate::from_der(&c).map_err(|e| format!("tls.ca_file: {e}"))?;
                http = http.add_root_certificate(c);
            }
        }
        if let Some(pem) = cfg
            .tls
            .client_identity_pem()
            .map_err(|e| format!("tls.client_cert_file: {e}"))?
        {
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| format!("tls.client_cert_file: {e}"))?;
            http = http.identity(id);
        }
        let http = http.build().map_err(|e| e.to_string())?;
        let tls = if cfg.tls.serves() {
            // Clients of the API have no certificates; heartbeats must show one when
            // `client_ca_file` is set (checked in `auth.rs`).
            let auth = rbee_http::tls::ClientAuth::Optional;
            Some(rbee_http::tls::ServerTls::load(&cfg.tls, auth).map_err(|e| format!("tls: {e}"))?)
        } else {
            None
        };
        let limits = crate::sched::Limits::from_config(&cfg.scheduling);
        let stream_stall = Duration::from_secs(cfg.server.stream_stall_seconds);
        let queen = Arc::new_cyclic(|this| Self {
            this: this.clone(),
            cfg: RwLock::new(cfg),
            tokens: RwLock::new(tokens),
            registry,
            metrics: QueenMetrics::new(),
            http,
            tls,
            stream_stall,
            sched: Mutex::new(Scheduler::new(limits)),
            waiters: Mutex::new(HashMap::new()),
            queued: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            worker_series: Mutex::new(Default::default()),
            started: Instant::now(),
            audit,
            audit_failures,
            usage,
            cut: tokio::sync::watch::channel(false).0,
            draining: std::sync::atomic::AtomicBool::new(false),
            active: std::sync::atomic::AtomicUsize::new(0),
            held_urls: Mutex::new(HashMap::new()),
            limiter: Mutex::new(Default::default()),
        });
        // Hives the registry already holds (static ones, a restart's records) are routable as
        // soon as they are up; every later change comes through `hives_changed`.
        queen.hives_changed();
        Ok(queen)
    }

    /// Queues an audit record (never a token: names and fingerprints only).
    pub fn audit(&self, event: &str, actor: &str, details: Value) {
        if let Some(a) = &self.audit
            && !a.record(event, actor, details)
        {
            self.metrics.audit_dropped.inc(&[]);
            warn!(event, "audit queue full; record dropped");
        }
    }

    /// An unauthenticated request refused (401) from `peer` for `reason`: counted, and
    /// audited in the failures log, aggregated per source and reason a minute (the first at
    /// once with `details`, the rest as one `auth.failures` summary).
    pub fn auth_failure(&self, peer: Option<std::net::IpAddr>, reason: &str, details: Value) {
        self.metrics.auth_failures.inc(&[]);
        if let Some(log) = &self.audit_failures {
            let dropped = log.failure(peer, reason, details);
            self.metrics.audit_dropped.inc_by(&[], f64::from(dropped));
        }
    }

    /// Writes pending audit and usage records (at shutdown).
    pub fn flush(&self) {
        if let Some(a) = &self.audit {
            a.flush(Duration::from_secs(2));
        }
        if let Some(f) = &self.audit_failures {
            f.finish(Duration::from_secs(2));
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
        let tickets = lock(&self.queued)
            .get(request_id)
            .cloned()
            .unwrap_or_default();
        for t in &tickets {
            self.event(|s, now| s.cancel(*t, now));
        }
        !tickets.is_empty()
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
    /// Whether the drain window is over, as a receiver (streams end when it turns true).
    pub fn cut_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.cut.subscribe()
    }

    pub fn cut_streams(&self) {
        self.cut.send_replace(true);
        self.event(|s, _| s.cut());
    }

    pub fn config(&self) -> QueenConfig {
        self.cfg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_config(&self, cfg: QueenConfig) {
        lock(&self.sched).set_limits(crate::sched::Limits::from_config(&cfg.scheduling));
        *self.cfg.write().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    pub fn tokens(&self) -> Tokens {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A request with the sampling defaults of the `[[models]]` entry it names filled in where
    /// it gives none.
    pub fn with_model_defaults(&self, name: &str, req: &InferenceRequest) -> InferenceRequest {
        let mut req = req.clone();
        if let Some(a) = self.config().models.iter().find(|m| m.name == name) {
            req.temperature = req.temperature.or(a.temperature);
            req.top_p = req.top_p.or(a.top_p);
        }
        req
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
        self.hives_changed();
        (added, removed)
    }

    /// The registry's hives changed (a beat, the sweep, an admin removal, a reload): the
    /// scheduler routes by the new view.
    pub fn hives_changed(&self) {
        let up = self.registry.up().unwrap_or_default();
        self.event(|s, now| s.set_hives(up, now));
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

    /// Records how long a request held its worker (for `Retry-After`).
    pub fn record_duration(&self, secs: f64) {
        lock(&self.sched).record_duration(secs);
    }

    /// Seconds until a place frees up for `ahead + 1` requests over `workers` workers.
    pub fn retry_after(&self, workers: usize, ahead: u32) -> u32 {
        lock(&self.sched).retry_after(workers, ahead)
    }

    /// The hive a new worker for `model_ref` would go to.
    pub fn best_hive(&self, model_ref: &str) -> Option<String> {
        lock(&self.sched).best_hive(model_ref, Instant::now())
    }

    /// Runs one scheduler step and carries out what it decides.
    pub(crate) fn event(&self, step: impl FnOnce(&mut Scheduler, Instant) -> Vec<Action>) {
        let actions = step(&mut lock(&self.sched), Instant::now());
        self.apply(actions);
    }

    fn apply(&self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Grant { ticket, grant } => {
                    self.metrics
                        .queue_wait
                        .observe(&[], grant.waited.as_secs_f64());
                    self.metrics
                        .stage
                        .observe(&["schedule"], grant.waited.as_secs_f64());
                    if let Some(t) = grant.spawn_took {
                        self.metrics.stage.observe(&["spawn"], t.as_secs_f64());
                    }
                    self.metrics
                        .decisions
                        .inc(&[if grant.spawned { "spawn" } else { "reuse" }]);
                    let Some(queen) = self.me() else { continue };
                    let lease = Lease {
                        queen,
                        hive_id: grant.key.hive,
                        hive_url: grant.hive_url,
                        worker_id: grant.key.worker,
                        spawned: grant.spawned,
                    };
                    // A request that left meanwhile drops the lease, which frees the worker:
                    // that re-enters the scheduler, so no lock may be held here.
                    let waiting = lock(&self.waiters).remove(&ticket);
                    if let Some(w) = waiting {
                        let _ = w.answer.send(Ok(lease));
                    }
                }
                Action::Reject { ticket, why, error } => {
                    if let Some(label) = why.label() {
                        self.metrics.queue_rejections.inc(&[label]);
                    }
                    let waiting = lock(&self.waiters).remove(&ticket);
                    if let Some(w) = waiting {
                        let _ = w.answer.send(Err(error));
                    }
                }
                Action::Spawn { model, hives } => {
                    if let Some(queen) = self.me() {
                        spawn_task(queen.spawn_worker(model, hives));
                    }
                }
                Action::Watch { model, key } => {
                    if let Some(queen) = self.me() {
                        spawn_task(queen.watch_spawned(model, key));
                    }
                }
                Action::QueueDepth { model, depth } => {
                    self.metrics.queue_depth.set(&[&model], depth as f64);
                }
                Action::Rearm { tickets } => {
                    let waiters = lock(&self.waiters);
                    for t in tickets {
                        if let Some(w) = waiters.get(&t) {
                            w.rearm.notify_one();
                        }
                    }
                }
            }
        }
    }

    /// This queen as an `Arc` (every queen is made by [`Queen::new`]).
    fn me(&self) -> Option<Arc<Queen>> {
        self.this.upgrade()
    }

    /// Finds (or makes) a worker for `model_ref` and leases it: waits until the scheduler
    /// grants one or refuses the request.
    pub async fn lease(
        self: &Arc<Self>,
        model_ref: &str,
        request_id: &str,
        who: Requester,
        deadline: Instant,
        avoid: Option<Avoid>,
    ) -> Result<Lease, ApiError> {
        let (tx, mut rx) = oneshot::channel();
        let rearm = Arc::new(tokio::sync::Notify::new());
        // The scheduler's view of the hives follows every registry change (`hives_changed`).
        let arrived = {
            let mut s = lock(&self.sched);
            let arrived = s.arrive(model_ref, who, avoid, deadline, Instant::now());
            if let Ok((ticket, _)) = &arrived {
                // Registered before any action runs: the grant may be for this request.
                lock(&self.waiters).insert(
                    *ticket,
                    Waiting {
                        answer: tx,
                        rearm: rearm.clone(),
                    },
                );
            }
            arrived
        };
        let ticket = match arrived {
            Ok((ticket, actions)) => {
                self.apply(actions);
                ticket
            }
            Err(e) => {
                if e.code == codes::QUEUE_FULL {
                    self.metrics.queue_rejections.inc(&["full"]);
                }
                return Err(e);
            }
        };
        lock(&self.queued)
            .entry(request_id.to_owned())
            .or_default()
            .push(ticket);
        let _waiting = WaitGuard {
            queen: self.clone(),
            request_id: request_id.to_owned(),
            ticket,
        };
        loop {
            let wake = lock(&self.sched).wake_at(ticket, Instant::now());
            let Some(wake) = wake else {
                // Answered: the grant or refusal is in the channel.
                return rx.await.unwrap_or_else(|_| {
                    Err(ApiError::internal("the scheduler dropped a request"))
                });
            };
            tokio::select! {
                answer = &mut rx => {
                    return answer
                        .unwrap_or_else(|_| Err(ApiError::internal("the scheduler dropped a request")));
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    self.event(|s, now| s.tick(ticket, now));
                }
                // Its limits changed: look at them again.
                _ = rearm.notified() => {}
            }
        }
    }

    pub(crate) fn hive_client(&self) -> HiveClient {
        let tokens = self
            .registry
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|h| self.hive_token(&h.id).map(|t| (h.id, t)))
            .collect();
        HiveClient::new(self.http.clone(), tokens)
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
            self.hives_changed();
            self.refresh_gauges();
            if let Some(f) = &self.audit_failures {
                let dropped = f.flush_due();
                self.metrics.audit_dropped.inc_by(&[], f64::from(dropped));
            }
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

/// Runs `fut` on the runtime, if there is one (a lease dropped at exit has none to run on).
fn spawn_task(fut: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(fut);
    }
}

/// Where a waiting request's answer goes, and how it is told to look at its timer again.
struct Waiting {
    answer: oneshot::Sender<Result<Lease, ApiError>>,
    rearm: Arc<tokio::sync::Notify>,
}

/// A request's place in the queue until it is answered or its client leaves.
struct WaitGuard {
    queen: Arc<Queen>,
    request_id: String,
    ticket: Ticket,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        {
            let mut queued = lock(&self.queen.queued);
            if let Some(t) = queued.get_mut(&self.request_id) {
                t.retain(|t| *t != self.ticket);
                if t.is_empty() {
                    queued.remove(&self.request_id);
                }
            }
        }
        lock(&self.queen.waiters).remove(&self.ticket);
        // What this request leaves may go to the next in line.
        let ticket = self.ticket;
        self.queen.event(|s, now| s.leave(ticket, now));
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

mod clients;
mod hives;
pub use clients::ClientSlot;

#[cfg(test)]
mod tests;
