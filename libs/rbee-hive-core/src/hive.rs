//! The hive's shared state: configuration, tokens, the worker registry, admission, the
//! background loops (health, keep-alive) and the shutdown sequence.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use rbee_audit::AuditLog;
use rbee_auth::Token;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};

use crate::HiveError;
use crate::config::HiveConfig;
use crate::downloads::Downloads;
use crate::lifecycle::Lifecycle;
use crate::metrics::HiveMetrics;
use crate::ports::Ports;
use crate::resources;
use crate::worker::{StopCause, Worker, WorkerSpec, WorkerState, WorkerView};

/// A change to a worker, as `GET /v1/workers/events` streams it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerEvent {
    /// `snapshot` (sent first, one per existing worker), `state` or `removed`.
    pub kind: &'static str,
    pub worker: WorkerView,
}

/// Tokens the hive holds; reloaded on SIGHUP.
#[derive(Default)]
pub struct Tokens {
    /// What callers of the hive API must present (None: dev mode).
    pub api: Option<Token>,
    /// Older API tokens still accepted during a rotation.
    pub api_previous: Vec<Token>,
    /// What the hive presents to the queen.
    pub join: Option<Token>,
    /// What the hive presents to the model hub.
    pub hub: Option<String>,
}

pub struct Hive {
    /// A watch channel, so each worker's lifecycle task reads the current configuration.
    cfg: watch::Sender<HiveConfig>,
    pub address: SocketAddr,
    pub tokens: RwLock<Tokens>,
    /// What the queen issued when this hive joined (see [`crate::credential`]).
    queen_credential: RwLock<Option<crate::credential::QueenCredential>>,
    pub metrics: HiveMetrics,
    /// The certificate served when `[tls]` is set (re-read on SIGHUP).
    pub tls: Option<rbee_http::tls::ServerTls>,
    /// With TLS, the plain loopback listener workers call back on (they hold no CA).
    pub worker_callback: std::sync::OnceLock<SocketAddr>,
    audit: Option<rbee_audit::AuditWriter>,
    /// Unauthenticated failures, aggregated, in their own chain beside `audit_log`.
    audit_failures: Option<rbee_audit::FailureLog>,
    pub catalog: rbee_models::Catalog,
    pub downloads: Downloads,
    workers: Mutex<BTreeMap<String, Arc<Worker>>>,
    events: broadcast::Sender<WorkerEvent>,
    ports: Arc<Ports>,
    /// Shared with the lifecycle tasks: nothing starts once it is set.
    pub draining: Arc<AtomicBool>,
    /// Requests passing through now: sequence number → (request id, worker id). Keyed by our
    /// own number, since clients may reuse request ids.
    inflight: Mutex<HashMap<u64, (String, String)>>,
    inflight_seq: std::sync::atomic::AtomicU64,
    /// Set when the drain window is over: proxied streams end with an error event.
    pub cut_streams: watch::Sender<bool>,
    /// Loopback client for workers (no proxy, no pooling surprises).
    pub http: reqwest::Client,
    pub started: Instant,
    worker_dir: PathBuf,
    /// SHA-256 per model file, keyed by path with the size and mtime it was computed for.
    hashes: Mutex<HashMap<PathBuf, FileHash>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A file's (size, mtime) when hashed, and its SHA-256.
type FileHash = (u64, Option<u64>, String);

/// A spawn request after parsing.
#[derive(Debug, Clone)]
pub struct SpawnRequest {
    pub model_ref: String,
    pub device: String,
    pub max_context: Option<u64>,
}

impl Hive {
    pub fn new(
        cfg: HiveConfig,
        address: SocketAddr,
        tokens: Tokens,
        catalog: rbee_models::Catalog,
    ) -> Result<Arc<Self>, HiveError> {
        let audit = if cfg.audit_log.is_empty() {
            None
        } else {
            let max = (cfg.audit_max_bytes > 0).then_some(cfg.audit_max_bytes);
            let log = AuditLog::open(Path::new(&cfg.audit_log), max)?;
            Some(rbee_audit::AuditWriter::spawn(log, 4096)?)
        };
        let audit_failures = if cfg.audit_log.is_empty() {
            None
        } else {
            let max = (cfg.audit_max_bytes > 0).then_some(cfg.audit_max_bytes);
            Some(rbee_audit::FailureLog::open(
                Path::new(&cfg.audit_log),
                max,
            )?)
        };
        let mut http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(rbee_http::server::CLIENT_POOL_IDLE);
        if !cfg.tls.ca_file.is_empty() {
            let certs = rbee_http::tls::certificates(Path::new(&cfg.tls.ca_file))
                .map_err(|e| HiveError::Config(format!("tls.ca_file: {e}")))?;
            for c in certs {
                let c = reqwest::Certificate::from_der(&c)
                    .map_err(|e| HiveError::Config(format!("tls.ca_file: {e}")))?;
                http = http.add_root_certificate(c);
            }
        }
        let identity = cfg
            .tls
            .client_identity_pem()
            .map_err(|e| HiveError::Config(format!("tls.client_cert_file: {e}")))?;
        if let Some(pem) = identity {
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| HiveError::Config(format!("tls.client_cert_file: {e}")))?;
            http = http.identity(id);
        }
        let http = http.build().map_err(|e| HiveError::Http(e.to_string()))?;
        let tls = if cfg.tls.serves() {
            Some(
                // Only the queen calls a hive: with `client_ca_file`, every caller shows a
                // certificate it signed (workers call back on the plain loopback listener).
                rbee_http::tls::ServerTls::load(&cfg.tls, rbee_http::tls::ClientAuth::Required)
                    .map_err(|e| HiveError::Config(format!("tls: {e}")))?,
            )
        } else {
            None
        };
        let worker_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        Ok(Arc::new(Self {
            cfg: watch::channel(cfg).0,
            address,
            tokens: RwLock::new(tokens),
            queen_credential: RwLock::new(None),
            metrics: HiveMetrics::new(),
            tls,
            worker_callback: std::sync::OnceLock::new(),
            audit,
            audit_failures,
            catalog,
            downloads: Downloads::default(),
            workers: Mutex::new(BTreeMap::new()),
            events: broadcast::channel(256).0,
            ports: Arc::default(),
            draining: Arc::default(),
            inflight: Mutex::new(HashMap::new()),
            inflight_seq: std::sync::atomic::AtomicU64::new(0),
            cut_streams: watch::channel(false).0,
            http,
            started: Instant::now(),
            worker_dir,
            hashes: Mutex::new(HashMap::new()),
        }))
    }

    /// A copy of the current configuration.
    pub fn config(&self) -> HiveConfig {
        self.cfg.borrow().clone()
    }

    pub fn set_config(&self, cfg: HiveConfig) {
        self.cfg.send_replace(cfg);
    }

    /// Whether a caller presenting `presented` may use the API: the hive token or one being
    /// retired, or the token the queen was issued for this hive; anyone in dev mode (no token).
    pub fn accepts(&self, presented: Option<&str>) -> bool {
        let t = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        let Some(api) = &t.api else {
            return true;
        };
        let Some(p) = presented else {
            return false;
        };
        api.matches(p)
            || t.api_previous.iter().any(|old| old.matches(p))
            || self
                .queen_credential()
                .is_some_and(|c| c.queen_token.matches(p))
    }

    /// The identity the queen issued to this hive, once it joined.
    pub fn queen_credential(&self) -> Option<crate::credential::QueenCredential> {
        self.queen_credential
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_queen_credential(&self, c: crate::credential::QueenCredential) {
        *self
            .queen_credential
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(c);
    }

    pub fn api_token(&self) -> Option<Token> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .api
            .clone()
    }

    pub fn hive_id(&self) -> String {
        self.config().hive_id
    }

    /// Queues a record for the audit log when one is configured. A dedicated thread writes
    /// (and fsyncs) it, so neither a slow disk nor a flood of failed logins stalls the async
    /// threads; when the queue is full the record is dropped and counted.
    pub fn audit(&self, event: &str, details: serde_json::Value) {
        self.audit_as(event, "hive", details);
    }

    pub fn audit_as(&self, event: &str, actor: &str, details: serde_json::Value) {
        if let Some(a) = &self.audit
            && !a.record(event, actor, details)
        {
            self.metrics.audit_dropped.inc(&[]);
        }
    }

    /// Waits (up to 2 s) until every queued audit record is on disk.
    pub fn flush_audit(&self) {
        if let Some(a) = &self.audit {
            a.flush(Duration::from_secs(2));
        }
        if let Some(f) = &self.audit_failures {
            f.finish(Duration::from_secs(2));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<WorkerEvent> {
        self.events.subscribe()
    }

    /// Publishes a worker's current view and refreshes the state gauge.
    pub fn announce(&self, worker: &Worker) {
        let view = worker.view();
        let kind = "state";
        let _ = self.events.send(WorkerEvent { kind, worker: view });
        self.refresh_state_gauge();
    }

    fn refresh_state_gauge(&self) {
        let workers = self.list();
        for st in WorkerState::ALL {
            let n = workers.iter().filter(|w| w.state == st).count();
            self.metrics.workers.set(&[st.as_str()], n as f64);
        }
    }

    pub fn list(&self) -> Vec<WorkerView> {
        let ws: Vec<Arc<Worker>> = lock(&self.workers).values().cloned().collect();
        ws.iter().map(|w| w.view()).collect()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Worker>> {
        lock(&self.workers).get(id).cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Worker>> {
        lock(&self.workers).values().cloned().collect()
    }

    /// At the end of a worker's lifecycle task: a stopped worker leaves the registry; a
    /// failed one stays (with its crash report) until it is deleted.
    pub(crate) fn worker_finished(&self, worker: &Worker) {
        let id = worker.id().to_owned();
        if worker.state() == WorkerState::Stopped {
            lock(&self.workers).remove(&id);
            self.forget_series(&id);
            let _ = self.events.send(WorkerEvent {
                kind: "removed",
                worker: worker.view(),
            });
        }
        self.refresh_state_gauge();
    }

    /// Drops a removed worker's per-worker metric series.
    fn forget_series(&self, id: &str) {
        let m = &self.metrics;
        for g in [
            &m.memory_estimate,
            &m.memory_rss,
            &m.memory_estimate_ratio,
            &m.worker_restart_count,
            &m.worker_exit_code,
            &m.worker_exit_signal,
            &m.worker_backoff,
            &m.worker_breaker,
        ] {
            g.remove(&[id]);
        }
    }

    /// Removes a failed worker's record (its process is already gone).
    pub fn remove_finished(&self, id: &str) -> Option<WorkerView> {
        let w = {
            let mut map = lock(&self.workers);
            match map.get(id) {
                Some(w) if w.is_done() => map.remove(id),
                _ => None,
            }
        }?;
        let view = w.view();
        self.forget_series(id);
        let _ = self.events.send(WorkerEvent {
            kind: "removed",
            worker: view.clone(),
        });
        self.refresh_state_gauge();
        Some(view)
    }

    /// Where a worker's ready call goes: this hive, over the address it listens on
    /// (loopback when it listens on every interface), or with TLS over its plain loopback
    /// listener for workers.
    pub fn ready_url(&self, worker_id: &str) -> String {
        if let Some(addr) = self.worker_callback.get() {
            return format!("http://{addr}/v1/workers/{worker_id}/ready");
        }
        let mut addr = self.address;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}/v1/workers/{worker_id}/ready")
    }

    /// Reads what a worker really uses (resident memory on the CPU, VRAM on CUDA) and
    /// compares it with the admission estimate.
    pub async fn sample_memory(&self, worker: &Worker, pid: u32) {
        let used = if worker.spec.device.starts_with("cuda") {
            resources::gpu_process_memory().await.get(&pid).copied()
        } else {
            resources::process_rss(pid)
        };
        let Some(used) = used else {
            return;
        };
        worker.set_rss(used);
        let id = worker.id();
        let est = worker.spec.memory_estimate_bytes;
        self.metrics.memory_estimate.set(&[id], est as f64);
        self.metrics.memory_rss.set(&[id], used as f64);
        if est > 0 {
            self.metrics
                .memory_estimate_ratio
                .set(&[id], used as f64 / est as f64);
        }
    }

    /// The worker binary for a device kind.
    pub fn worker_binary(&self, device: &str) -> Result<PathBuf, HiveError> {
        let w = self.config().workers;
        let (configured, key) = if device.starts_with("cuda") {
            (w.binary_cuda, "workers.binary_cuda")
        } else if device.starts_with("metal") {
            (w.binary_metal, "workers.binary_metal")
        } else {
            (w.binary, "workers.binary")
        };
        if !configured.is_empty() {
            return Ok(PathBuf::from(configured));
        }
        if device == "cpu" {
            return Ok(self.worker_dir.join("llm-worker-rbee"));
        }
        Err(HiveError::BadRequest(format!(
            "no worker binary for `{device}` devices: set {key} to an llm-worker-rbee built with that feature"
        )))
    }

    /// Validates, checks resources and starts a worker. Returns at once; the worker becomes
    /// ready (or fails) in the background.
    pub fn spawn_worker(self: &Arc<Self>, req: SpawnRequest) -> Result<WorkerView, HiveError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(HiveError::ShuttingDown);
        }
        let device = parse_device(&req.device)?;
        let model_ref: rbee_models::ModelRef = req
            .model_ref
            .parse()
            .map_err(|e: rbee_models::ModelError| HiveError::Model(e))?;
        let path = self.catalog.resolve(&model_ref)?;
        let summary = rbee_models::GgufSummary::read(&path)?;
        let declared = summary.context_length as usize;
        let context = req
            .max_context
            .map_or(declared, |c| (c as usize).min(declared));
        // The worker's KV pool: what admission counts and what the worker is told to keep to.
        let kv_tokens = match self.config().workers.kv_tokens {
            0 => context as u64,
            n => n,
        };
        let estimate = rbee_models::estimate_memory(&summary, Some(kv_tokens as usize));
        let binary = self.worker_binary(&device)?;
        if !binary.is_file() {
            return Err(HiveError::BadRequest(format!(
                "worker binary {} does not exist",
                binary.display()
            )));
        }
        let id = format!("w-{:08x}", rand::random::<u32>());
        let spec = WorkerSpec {
            id: id.clone(),
            model_ref: model_ref.to_string(),
            model_path: path,
            device: device.clone(),
            binary,
            max_context: req.max_context,
            kv_tokens,
            memory_estimate_bytes: estimate.total_bytes,
        };
        // Admission and registration under one lock, so two spawns cannot both take the
        // last room.
        let worker = {
            let mut map = lock(&self.workers);
            // Checked again under the lock: shutdown snapshots the registry under it too.
            if self.draining.load(Ordering::SeqCst) {
                return Err(HiveError::ShuttingDown);
            }
            self.admit(&map, &spec, &estimate)?;
            let worker = Worker::new(spec);
            map.insert(id.clone(), worker.clone());
            worker
        };
        self.audit(
            "worker.spawn",
            json!({"worker_id": id, "model": worker.spec.model_ref, "device": device,
                   "memory_estimate_bytes": estimate.total_bytes}),
        );
        info!(worker_id = %id, model = %worker.spec.model_ref, %device, estimate_mib = estimate.total_bytes >> 20, "spawning worker");
        let view = worker.view();
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let lifecycle = Lifecycle {
            worker: worker.clone(),
            config: self.cfg.subscribe(),
            ports: self.ports.clone(),
            draining: self.draining.clone(),
            http: self.http.clone(),
            ready_url: self.ready_url(&id),
            reports,
        };
        tokio::spawn(self.clone().follow(worker, reports_rx));
        tokio::spawn(lifecycle.run());
        Ok(view)
    }

    fn admit(
        &self,
        workers: &BTreeMap<String, Arc<Worker>>,
        spec: &WorkerSpec,
        estimate: &rbee_models::MemoryEstimate,
    ) -> Result<(), HiveError> {
        let (model_ref, device) = (spec.model_ref.as_str(), spec.device.as_str());
        let cfg = self.config();
        let active: Vec<&Arc<Worker>> = workers.values().filter(|w| w.holds_resources()).collect();
        let mib = |b: u64| b >> 20;
        if active.len() as u32 >= cfg.workers.max_workers {
            self.metrics.admission_refusals.inc(&["max_workers"]);
            return Err(HiveError::Insufficient(format!(
                "workers.max_workers ({}) reached: {} workers are running",
                cfg.workers.max_workers,
                active.len()
            )));
        }
        // One copy of a model's weights per device: a worker that batches serves more requests
        // from the copy it has, and a second one would only split the same compute. A crashed
        // one (backoff) does not count: requests need a worker now.
        if cfg.workers.parallel != 1
            && let Some(w) = active.iter().find(|w| {
                w.spec.device == device
                    && w.spec.model_ref == model_ref
                    && matches!(w.state(), WorkerState::Starting | WorkerState::Ready)
            })
        {
            self.metrics.admission_refusals.inc(&["same_model"]);
            return Err(HiveError::Insufficient(format!(
                "{model_ref} already runs on {device} in worker {}, which batches concurrent                  requests; a second copy of the weights on the same device is not started                  (workers.parallel = 1 allows one worker per request)",
                w.id()
            )));
        }
        let need = estimate.total_bytes;
        let what = format!(
            "needs {} MiB (weights {} MiB + KV cache {} MiB + overhead {} MiB)",
            mib(need),
            mib(estimate.weights_bytes),
            mib(estimate.kv_cache_bytes),
            mib(estimate.overhead_bytes)
        );
        let same_device: Vec<&&Arc<Worker>> =
            active.iter().filter(|w| w.spec.device == device).collect();
        // Workers still loading have not taken their memory yet; count their estimate.
        let pending: u64 = same_device
            .iter()
            .filter(|w| w.state() == WorkerState::Starting)
            .map(|w| w.spec.memory_estimate_bytes)
            .sum();
        // Metal shares system memory, so it is admitted against RAM like the CPU.
        if device == "cpu" || device.starts_with("metal") {
            let committed: u64 = same_device
                .iter()
                .map(|w| w.spec.memory_estimate_bytes)
                .sum();
            let (_, available) = resources::memory();
            let reserve = cfg.resources.reserve_memory_mb << 20;
            let free_ram = available.saturating_sub(reserve).saturating_sub(pending);
            if cfg.resources.max_memory_mb > 0 {
                let cap = cfg.resources.max_memory_mb << 20;
                let room = cap.saturating_sub(committed);
                if need > room {
                    self.metrics.admission_refusals.inc(&["memory_limit"]);
                    return Err(HiveError::Insufficient(format!(
                        "the model {what}; {} MiB is available under resources.max_memory_mb = {} ({} MiB committed to running workers)",
                        mib(room),
                        cfg.resources.max_memory_mb,
                        mib(committed)
                    )));
                }
            }
            if need > free_ram {
                self.metrics.admission_refusals.inc(&["memory"]);
                return Err(HiveError::Insufficient(format!(
                    "the model {what}; {} MiB of RAM is available (MemAvailable minus resources.reserve_memory_mb = {} and {} MiB for workers still loading)",
                    mib(free_ram),
                    cfg.resources.reserve_memory_mb,
                    mib(pending)
                )));
            }
        } else if device.starts_with("cuda") {
            // Free VRAM as sampled by the spawn handler just before (or the last heartbeat).
            let gpus = self.gpu_snapshot();
            let Some(gpu) = gpus.iter().find(|g| g.device == device) else {
                self.metrics.admission_refusals.inc(&["no_gpu"]);
                return Err(HiveError::Insufficient(format!(
                    "no GPU `{device}` on this node (found: {})",
                    gpus.iter()
                        .map(|g| g.device.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let reserve = cfg.resources.reserve_vram_mb << 20;
            let free = gpu
                .vram_free_bytes
                .saturating_sub(reserve)
                .saturating_sub(pending);
            if need > free {
                self.metrics.admission_refusals.inc(&["vram"]);
                return Err(HiveError::Insufficient(format!(
                    "the model {what}; {} MiB of VRAM is free on {device} (minus resources.reserve_vram_mb = {})",
                    mib(free),
                    cfg.resources.reserve_vram_mb
                )));
            }
        }
        Ok(())
    }

    fn gpu_snapshot(&self) -> Vec<rbee_api::GpuInfo> {
        lock(&GPU_CACHE).clone()
    }

    /// Node resources now (and refreshes the GPU figures admission uses).
    pub async fn resources(&self) -> rbee_api::NodeResources {
        let r = resources::snapshot(&self.download_dir()).await;
        *lock(&GPU_CACHE) = r.gpus.clone();
        r
    }

    /// Where downloads land (the first model directory).
    pub fn download_dir(&self) -> PathBuf {
        self.catalog.dirs().first().cloned().unwrap_or_default()
    }

    /// Stops a worker and waits until its process is gone; returns its final record.
    pub async fn stop_worker(&self, id: &str, cause: StopCause) -> Option<WorkerView> {
        let worker = self.get(id)?;
        if worker.is_done() {
            return self.remove_finished(id);
        }
        worker.request_stop(cause);
        worker.wait_done().await;
        Some(worker.view())
    }

    /// Graceful shutdown: refuse new work, let streams finish within the drain window, cut
    /// the rest, then stop every worker in parallel. Returns how long it took.
    pub async fn shutdown(&self, exchanges: &rbee_lifecycle::Drain) -> Duration {
        let t0 = Instant::now();
        self.draining.store(true, Ordering::SeqCst);
        let cfg = self.config();
        let drain = Duration::from_secs(cfg.shutdown.drain_seconds);
        let n = lock(&self.inflight).len();
        info!(
            inflight = n,
            drain_s = drain.as_secs(),
            "shutting down: refusing new work"
        );
        exchanges
            .drain_until(drain, || lock(&self.inflight).is_empty())
            .await;
        let left = lock(&self.inflight).len();
        if left > 0 {
            warn!(streams = left, "drain window over; cutting streams");
        }
        self.cut_streams.send_replace(true);
        self.downloads.cancel_all();
        let workers = self.all();
        let stops = workers.iter().map(|w| {
            let w = w.clone();
            async move {
                if w.is_done() {
                    return;
                }
                w.request_stop(StopCause::Shutdown);
                w.wait_done().await;
            }
        });
        futures_util::future::join_all(stops).await;
        let took = t0.elapsed();
        self.metrics.shutdown_duration.set(&[], took.as_secs_f64());
        info!(
            seconds = took.as_secs_f64(),
            graceful = self.metrics.graceful_stops.get(&[]),
            force_killed = self.metrics.force_kills.get(&[]),
            "all workers stopped"
        );
        self.audit(
            "hive.stop",
            json!({"seconds": took.as_secs_f64(), "workers": workers.len()}),
        );
        // The process exits next: the last records must be on disk first.
        tokio::task::block_in_place(|| self.flush_audit());
        took
    }

    /// Writes the metrics for node_exporter's textfile collector (atomically).
    pub fn write_metrics_textfile(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("prom.tmp");
        std::fs::write(&tmp, self.metrics.registry.render())?;
        std::fs::rename(&tmp, path)
    }

    /// Registers a request passing through; the key unregisters it.
    pub fn inflight_insert(&self, request_id: &str, worker_id: &str) -> u64 {
        let key = self
            .inflight_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.inflight).insert(key, (request_id.to_owned(), worker_id.to_owned()));
        key
    }

    pub fn inflight_remove(&self, key: u64) {
        lock(&self.inflight).remove(&key);
    }

    /// The worker serving a request id (the latest, should a client reuse ids).
    pub fn inflight_worker(&self, request_id: &str) -> Option<String> {
        lock(&self.inflight)
            .iter()
            .filter(|(_, (rid, _))| rid == request_id)
            .max_by_key(|(k, _)| **k)
            .map(|(_, (_, w))| w.clone())
    }

    /// The models on disk (the directory walk runs off the async threads).
    pub async fn models(&self) -> Vec<rbee_models::ModelEntry> {
        let catalog = self.catalog.clone();
        tokio::task::spawn_blocking(move || catalog.list())
            .await
            .unwrap_or_default()
    }

    /// SHA-256 of each model file by reference, for those hashed so far.
    pub fn model_hashes(
        &self,
        models: &[rbee_models::ModelEntry],
    ) -> std::collections::BTreeMap<String, String> {
        let cache = lock(&self.hashes);
        models
            .iter()
            .filter_map(|m| {
                let (bytes, modified, sha) = cache.get(&m.path)?;
                (*bytes == m.bytes && *modified == m.modified)
                    .then(|| (m.reference.clone(), sha.clone()))
            })
            .collect()
    }

    /// Hashes model files that are new or changed, one at a time, forever (every 30 s).
    pub async fn hash_loop(self: Arc<Self>) {
        loop {
            for m in self.models().await {
                let fresh = lock(&self.hashes)
                    .get(&m.path)
                    .is_some_and(|(b, t, _)| *b == m.bytes && *t == m.modified);
                if fresh || self.draining.load(Ordering::SeqCst) {
                    continue;
                }
                match rbee_models::file_sha256(&m.path).await {
                    Ok(sha) => {
                        debug!(model = %m.reference, %sha, "model hashed");
                        lock(&self.hashes).insert(m.path.clone(), (m.bytes, m.modified, sha));
                    }
                    Err(e) => warn!(model = %m.reference, error = %e, "cannot hash model"),
                }
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }

    /// Whether any live worker serves the model at `path`.
    pub fn model_in_use(&self, path: &Path) -> Option<String> {
        self.all()
            .into_iter()
            .find(|w| !w.is_done() && w.spec.model_path == path)
            .map(|w| w.id().to_owned())
    }
}

static GPU_CACHE: Mutex<Vec<rbee_api::GpuInfo>> = Mutex::new(Vec::new());

/// `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`, normalised to `kind` or `kind:N`.
pub fn parse_device(s: &str) -> Result<String, HiveError> {
    let s = s.trim();
    let bad =
        || HiveError::BadRequest(format!("`device`: `{s}` is not cpu, cuda[:N] or metal[:N]"));
    let (kind, index) = match s.split_once(':') {
        Some((k, i)) => (k, Some(i.parse::<u32>().map_err(|_| bad())?)),
        None => (s, None),
    };
    match (kind, index) {
        ("cpu", None) => Ok("cpu".into()),
        ("cuda" | "metal", i) => Ok(format!("{kind}:{}", i.unwrap_or(0))),
        _ => Err(bad()),
    }
}

mod upkeep;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_normalise() {
        assert_eq!(parse_device("cpu").unwrap(), "cpu");
        assert_eq!(parse_device("cuda").unwrap(), "cuda:0");
        assert_eq!(parse_device("cuda:1").unwrap(), "cuda:1");
        assert_eq!(parse_device("metal").unwrap(), "metal:0");
        for bad in ["", "gpu", "cpu:1", "cuda:x", "cuda:-1"] {
            assert!(parse_device(bad).is_err(), "{bad}");
        }
    }
}
