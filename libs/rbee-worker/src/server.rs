//! Routes, handlers, the generation slot and graceful shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use rbee_api::{InferenceRequest, MAX_BODY_BYTES, StreamEvent, codes};
use rbee_auth::Token;
use rbee_engine::{
    Engine, GenEvent, GenerationJob, GenerationParams, GenerationSummary, LoadOptions, StopReason,
};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tracing::{error, info, warn};

use crate::WorkerError;
use crate::metrics::WorkerMetrics;
use crate::reload::SharedToken;
use crate::stream::{Choices, event_stream, wire_reason};
use crate::validate::{ModelFacts, fit_to_context, validate};
use rbee_http::{ApiError, RequestId, Route, build_router, parse_deadline, presented_bearer};
use rbee_lifecycle::Shutdown;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    pub model: PathBuf,
    pub load: LoadOptions,
    /// None is dev mode (loopback only; the binary enforces that). A SIGHUP may replace it
    /// ([`TokenReload`]).
    pub token: SharedToken,
    pub ready_url: Option<String>,
    /// How long in-flight streams may run on after shutdown starts.
    pub grace: Duration,
}

struct AppState {
    cfg: WorkerConfig,
    address: SocketAddr,
    engine: OnceLock<Engine>,
    /// One permit per engine slot: a request holds one from acceptance to its last event.
    slots: Arc<Semaphore>,
    slot_count: usize,
    draining: AtomicBool,
    /// Set when the shutdown grace window has run out: new generations are cancelled at once.
    grace_over: AtomicBool,
    started: Instant,
    metrics: WorkerMetrics,
    inflight: Mutex<HashMap<String, Arc<AtomicBool>>>,
    shutdown: Shutdown,
    fatal: Mutex<Option<WorkerError>>,
}

type Shared = Arc<AppState>;

fn routes() -> Vec<Route<Shared>> {
    vec![
        Route {
            method: "GET",
            path: "/health",
            public: true,
            handler: get(health),
        },
        Route {
            method: "GET",
            path: "/metrics",
            public: true,
            handler: get(metrics),
        },
        Route {
            method: "POST",
            path: "/v1/inference",
            public: false,
            handler: post(inference),
        },
        Route {
            method: "DELETE",
            path: "/v1/inference/{request_id}",
            public: false,
            handler: delete(cancel),
        },
        Route {
            method: "POST",
            path: "/v1/shutdown",
            public: false,
            handler: post(shutdown),
        },
    ]
}

/// Every route as (method, path, public), from the same list the router is built from, so
/// tests can walk it and a new route cannot skip authentication unnoticed.
pub fn router_routes() -> Vec<(&'static str, &'static str, bool)> {
    routes()
        .into_iter()
        .map(|r| (r.method, r.path, r.public))
        .collect()
}

fn router(state: Shared) -> Router {
    let auth_state = state.clone();
    build_router(routes(), move |protected| {
        protected.route_layer(middleware::from_fn_with_state(auth_state, require_token))
    })
    .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
    .with_state(state)
}

/// Serves until shutdown. Returns an error when the model cannot load or readiness cannot be
/// reported, so the binary exits non-zero and the hive sees why.
pub async fn serve(
    mut cfg: WorkerConfig,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> Result<(), WorkerError> {
    let address = listener.local_addr()?;
    let grace = cfg.grace;
    let slot_count = cfg
        .load
        .parallel
        .unwrap_or_else(|| rbee_engine::default_parallel(cfg.load.device))
        .max(1);
    cfg.load.parallel = Some(slot_count);
    let state: Shared = Arc::new(AppState {
        cfg,
        address,
        engine: OnceLock::new(),
        slots: Arc::new(Semaphore::new(slot_count)),
        slot_count,
        draining: AtomicBool::new(false),
        grace_over: AtomicBool::new(false),
        started: Instant::now(),
        metrics: WorkerMetrics::new(),
        inflight: Mutex::new(HashMap::new()),
        shutdown: shutdown.clone(),
        fatal: Mutex::new(None),
    });
    info!(%address, worker_id = %state.cfg.worker_id, "listening");
    tokio::spawn(load_and_report(state.clone()));

    let drain_state = state.clone();
    let drain = async move {
        drain_state.shutdown.cancelled().await;
        drain_state.draining.store(true, Ordering::SeqCst);
        let busy = !drain_state.inflight_is_empty();
        info!(
            busy,
            grace_s = grace.as_secs_f64(),
            "shutting down: refusing new work"
        );
        let st = drain_state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            st.grace_over.store(true, Ordering::SeqCst);
            st.cancel_all("grace window over");
        });
    };
    let app = router(state.clone());
    // The daemons' one server loop: header timeout and connection caps (only the hive calls a
    // worker, but nothing else on the host may hold it open either).
    let limits = rbee_http::server::ServerLimits::default();
    let server = rbee_http::server::serve(listener, app, limits, None, drain);
    let hard_stop = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace + Duration::from_secs(5)).await;
        }
    };
    tokio::select! {
        r = server => r?,
        _ = hard_stop => warn!("connections still open after the grace window; exiting anyway"),
    }
    let fatal = state.fatal.lock().unwrap_or_else(|e| e.into_inner()).take();
    match fatal {
        Some(e) => Err(e),
        None => {
            info!("stopped");
            Ok(())
        }
    }
}

impl AppState {
    fn inflight_is_empty(&self) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    fn cancel_all(&self, why: &str) {
        let map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for (id, flag) in map.iter() {
            info!(request_id = %id, why, "cancelling generation");
            flag.store(true, Ordering::SeqCst);
        }
    }

    fn fail(&self, err: WorkerError) {
        error!(error = %err, "fatal");
        *self.fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
        self.shutdown.trigger();
    }

    fn current_token(&self) -> Option<Token> {
        self.cfg.token.get()
    }
}

async fn load_and_report(state: Shared) {
    let path = state.cfg.model.clone();
    let opts = state.cfg.load.clone();
    info!(model = %path.display(), device = %opts.device, "loading model");
    let observer: Arc<dyn rbee_engine::StepObserver> = Arc::new(state.metrics.clone());
    let loaded =
        tokio::task::spawn_blocking(move || Engine::load_observed(&path, &opts, Some(observer)))
            .await;
    let engine = match loaded {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => return state.fail(WorkerError::Load(e)),
        Err(e) => {
            return state.fail(WorkerError::Load(rbee_engine::EngineError::Model(format!(
                "loader task failed: {e}"
            ))));
        }
    };
    let info = engine.info().clone();
    state.metrics.model_load_seconds.set(&[], info.load_seconds);
    state
        .metrics
        .context_length
        .set(&[], info.context_length as f64);
    state.metrics.slots.set(&[], info.slots as f64);
    state.metrics.kv_pool.set(&["total"], info.kv_tokens as f64);
    info!(
        model = %info.name,
        context_length = info.context_length,
        slots = info.slots,
        kv_tokens = info.kv_tokens,
        kv_mib = (info.kv_tokens * info.kv_bytes_per_token) as f64 / (1 << 20) as f64,
        weights = %info.file_type,
        compute = %info.compute_type,
        load_seconds = info.load_seconds,
        "model loaded"
    );
    let _ = state.engine.set(engine);
    if let Some(url) = state.cfg.ready_url.clone()
        && let Err(reason) = report_ready(&state, &url, &info).await
    {
        state.fail(WorkerError::Ready { url, reason });
    }
}

async fn report_ready(
    state: &AppState,
    url: &str,
    info: &rbee_engine::ModelInfo,
) -> Result<(), String> {
    let body = json!({
        "worker_id": state.cfg.worker_id,
        "address": state.address.to_string(),
        "pid": std::process::id(),
        "model": info.name,
        "model_path": info.path,
        "device": info.device,
        "context_length": info.context_length,
        "load_seconds": info.load_seconds,
        "slots": info.slots,
        "kv_tokens": info.kv_tokens,
    });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let mut last = String::new();
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
        }
        let mut req = client.post(url).json(&body);
        if let Some(t) = state.current_token() {
            req = req.bearer_auth(t.expose());
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => {
                info!(url, "reported ready");
                return Ok(());
            }
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        warn!(url, attempt, error = %last, "ready call failed");
    }
    Err(last)
}

async fn require_token(
    State(st): State<Shared>,
    Extension(rid): Extension<RequestId>,
    req: Request,
    next: Next,
) -> Response {
    let Some(token) = st.current_token() else {
        return next.run(req).await; // dev mode
    };
    let presented = presented_bearer(req.headers());
    if presented.is_some_and(|p| token.matches(p)) {
        return next.run(req).await;
    }
    st.metrics.auth_failures.inc(&[]);
    warn!(
        path = %req.uri().path(),
        presented = presented.is_some(),
        "authentication failed"
    );
    ApiError::unauthorized()
        .with_request_id(&rid.0)
        .into_response()
}

async fn health(State(st): State<Shared>) -> Response {
    let engine = st.engine.get();
    let draining = st.draining.load(Ordering::SeqCst);
    let ready = engine.is_some() && !draining;
    let status = if draining {
        "draining"
    } else if ready {
        "ready"
    } else {
        "loading"
    };
    let info = engine.map(|e| e.info());
    let load = engine.map(|e| e.load_state());
    let body = json!({
        "status": status,
        "worker_id": st.cfg.worker_id,
        "model": info.map(|i| i.name.clone()),
        "model_path": st.cfg.model,
        "device": st.cfg.load.device.to_string(),
        "context_length": info.map(|i| i.context_length),
        "trained_context_length": info.map(|i| i.trained_context_length),
        "architecture": info.map(|i| i.architecture.clone()),
        "weights": info.map(|i| i.file_type.clone()),
        "busy": st.slots.available_permits() == 0,
        "slots": st.slot_count,
        "slots_busy": st.slot_count - st.slots.available_permits(),
        "queued": load.map(|l| l.waiting),
        "kv_pool": load.map(|l| json!({
            "total_tokens": l.kv_total_tokens,
            "reserved_tokens": l.kv_reserved_tokens,
            "cached_tokens": l.kv_cached_tokens,
            "bytes_per_token": info.map(|i| i.kv_bytes_per_token),
        })),
        "uptime_seconds": st.started.elapsed().as_secs_f64(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(st): State<Shared>) -> Response {
    if let Some(e) = st.engine.get() {
        st.metrics.record_load(&e.load_state());
    }
    (
        [(header::CONTENT_TYPE, rbee_metrics::CONTENT_TYPE)],
        st.metrics.registry.render(),
    )
        .into_response()
}

async fn shutdown(State(st): State<Shared>, Extension(rid): Extension<RequestId>) -> Response {
    info!(request_id = %rid.0, "shutdown requested over the API");
    st.shutdown.trigger();
    (StatusCode::ACCEPTED, Json(json!({"status": "draining"}))).into_response()
}

async fn cancel(
    State(st): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Path(target): Path<String>,
) -> Response {
    let flag = st
        .inflight
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&target)
        .cloned();
    match flag {
        Some(f) => {
            f.store(true, Ordering::SeqCst);
            info!(target = %target, "generation cancelled over the API");
            Json(json!({"request_id": target, "cancelled": true})).into_response()
        }
        None => ApiError::new(
            codes::NOT_FOUND,
            format!("no generation in flight with request id {target:?}"),
        )
        .with_request_id(&rid.0)
        .into_response(),
    }
}

async fn inference(
    State(st): State<Shared>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let rid = rid.0;
    let accepted_at = Instant::now();
    match start_inference(&st, &rid, &headers, body, accepted_at).await {
        Ok(resp) => resp,
        Err(e) => {
            let outcome = if e.status == StatusCode::SERVICE_UNAVAILABLE {
                "rejected"
            } else if e.status == StatusCode::GATEWAY_TIMEOUT {
                "deadline"
            } else if e.status.is_client_error() {
                "invalid"
            } else {
                "error"
            };
            st.metrics.requests.inc(&[outcome]);
            info!(request_id = %rid, code = %e.code, status = e.status.as_u16(), "inference refused");
            e.with_request_id(&rid).into_response()
        }
    }
}

async fn start_inference(
    st: &Shared,
    rid: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    accepted_at: Instant,
) -> Result<Response, ApiError> {
    if st.draining.load(Ordering::SeqCst) {
        return Err(
            ApiError::new(codes::SHUTTING_DOWN, "the worker is shutting down").retry_after(5),
        );
    }
    let req: InferenceRequest = rbee_http::json_body(headers, body)?;
    let deadline =
        match parse_deadline(headers).map_err(|m| ApiError::new(codes::INVALID_PARAMETER, m))? {
            Some((_, left)) if left <= 0 => {
                return Err(ApiError::new(
                    codes::DEADLINE_EXCEEDED,
                    format!(
                        "the deadline passed {} ms before the worker got the request",
                        left.unsigned_abs()
                    ),
                ));
            }
            Some((at, _)) => Some(at),
            None => None,
        };
    let Some(engine) = st.engine.get().cloned() else {
        return Err(
            ApiError::new(codes::MODEL_LOADING, "the model is still loading").retry_after(2),
        );
    };
    let (native_tools, tool_format) = engine.tool_support();
    let facts = ModelFacts {
        context_length: engine.info().context_length,
        vocab_size: engine.info().vocab_size,
        native_tools,
        tool_format,
    };
    let ctx = facts.context_length;
    let valid = validate(req, facts, rand::random::<u64>())
        .map_err(|e| ApiError::new(codes::INVALID_PARAMETER, e.message))?;

    let permit = st.slots.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            codes::ALL_SLOTS_BUSY,
            format!(
                "all {} of the worker's generation slots are busy; retry shortly",
                st.slot_count
            ),
        )
        .retry_after(1)
    })?;
    if st.slots.available_permits() == 0 {
        st.metrics.busy.set(&[], 1.0);
    }
    // Owns the permit from here on, so every way out (errors, a client that leaves while the
    // prompt is tokenized) resets the busy gauge with it. Shared by a request's answers: the
    // slot is free when the last one is done.
    let release = Arc::new(SlotRelease {
        _permit: permit,
        metrics: st.metrics.clone(),
    });

    let prompt = valid.prompt.clone();
    let grammar = valid.grammar.clone();
    let n = valid.n;
    let preparing = engine.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        let tokens = preparing.prepare(&prompt)?;
        let constraints = match &grammar {
            Some(g) => (0..n)
                .map(|_| preparing.compile_grammar(g).map(Some))
                .collect::<Result<Vec<_>, _>>()?,
            None => (0..n).map(|_| None).collect(),
        };
        Ok::<_, rbee_engine::EngineError>((tokens, constraints))
    })
    .await
    .map_err(|e| ApiError::new(codes::INTERNAL, e.to_string()))?
    .map_err(|e| match e {
        rbee_engine::EngineError::Template(m) => ApiError::new(
            codes::INVALID_PARAMETER,
            format!("`messages` rejected by the model's chat template: {m}"),
        ),
        rbee_engine::EngineError::Grammar(m) => ApiError::new(
            codes::INVALID_PARAMETER,
            format!(
                "the grammar (`grammar`, `response_format` or a forced tool call's schema) is refused: {m}"
            ),
        ),
        other => ApiError::new(codes::INTERNAL, other.to_string()),
    })?;
    let (tokens, constraints) = prepared;
    let max_tokens = match fit_to_context(tokens.len(), valid.max_tokens, ctx) {
        Ok(n) => n,
        Err(e) => return Err(ApiError::new(codes::CONTEXT_LENGTH_EXCEEDED, e.message)),
    };

    let prompt_tokens = tokens.len();
    let cancel = Arc::new(AtomicBool::new(false));
    st.inflight
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(rid.to_owned(), cancel.clone());
    // Registered after the grace window's sweep: cancel it now rather than never.
    if st.grace_over.load(Ordering::SeqCst) {
        cancel.store(true, Ordering::SeqCst);
    }
    let (tx, rx) = mpsc::unbounded_channel::<(u32, GenEvent)>();
    let guard = InflightGuard {
        state: st.clone(),
        request_id: rid.to_owned(),
        cancel: cancel.clone(),
        finished: false,
    };
    // Several answers read the prompt once (see `GenerationJob::prompt_group`).
    let prompt_group = (n > 1).then(rand::random::<u64>);
    for (choice, constraint) in constraints.into_iter().enumerate() {
        let mut sampling = valid.sampling.clone();
        // Each answer draws on its own: seeds follow one another from the request's.
        sampling.seed = sampling.seed.wrapping_add(choice as u64);
        let sink = metered_sink(
            st.metrics.clone(),
            accepted_at,
            rid.to_owned(),
            choice as u32,
            tx.clone(),
        );
        let job = GenerationJob {
            prompt_tokens: tokens.clone(),
            params: GenerationParams {
                max_tokens,
                sampling,
                stop: valid.stop.clone(),
                logprobs: valid.logprobs,
            },
            constraint,
            prompt_group,
            cancel: cancel.clone(),
            deadline,
            accepted_at,
            sink,
            on_done: Some(Box::new(release.clone())),
        };
        if let Err(e) = engine.submit(job) {
            cancel.store(true, Ordering::SeqCst);
            return Err(ApiError::new(codes::INFERENCE_FAILED, e.to_string()));
        }
    }
    drop(release);
    info!(request_id = %rid, prompt_tokens, max_tokens, n, "generation queued");
    let started = StreamEvent::Started {
        request_id: rid.to_owned(),
        model: engine.info().name.clone(),
        prompt_tokens: prompt_tokens as u32,
    };
    let choices = Choices::new(n, valid.calls);
    let stream = event_stream(started, rx, guard, choices);
    let mut resp = Response::new(axum::body::Body::from_stream(stream));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// Releases the generation slot when the inference thread drops the finished job.
struct SlotRelease {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: WorkerMetrics,
}

impl Drop for SlotRelease {
    fn drop(&mut self) {
        self.metrics.busy.set(&[], 0.0);
    }
}

/// Cancels the generation when the client's stream goes away before the end.
pub(crate) struct InflightGuard {
    state: Shared,
    request_id: String,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) finished: bool,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if !self.finished {
            info!(request_id = %self.request_id, "client went away: cancelling generation");
            self.cancel.store(true, Ordering::SeqCst);
        }
        let mut map = self
            .state
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // A later request may have reused the id; only remove our own entry.
        if map
            .get(&self.request_id)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cancel))
        {
            map.remove(&self.request_id);
        }
    }
}

/// Records metrics on the inference thread (so they count even when the client is gone),
/// then forwards the event to the HTTP stream.
fn metered_sink(
    m: WorkerMetrics,
    accepted_at: Instant,
    request_id: String,
    choice: u32,
    tx: mpsc::UnboundedSender<(u32, GenEvent)>,
) -> Box<dyn FnMut(GenEvent) -> bool + Send> {
    // (when, token index) of the last event seen, for per-token latency.
    let mut last: Option<(Instant, usize)> = None;
    Box::new(move |ev| {
        match &ev {
            GenEvent::FirstToken => {
                let now = Instant::now();
                m.time_to_first_token
                    .observe(&[], now.duration_since(accepted_at).as_secs_f64());
                last = Some((now, 0));
            }
            GenEvent::Text { index, .. } => {
                let now = Instant::now();
                if let Some((prev, prev_index)) = last
                    && *index > prev_index
                {
                    // Text held back by stop matching arrives for several tokens at once:
                    // spread the gap over them so every token is counted once.
                    let tokens = *index - prev_index;
                    let each = now.duration_since(prev).as_secs_f64() / tokens as f64;
                    for _ in 0..tokens {
                        m.inter_token.observe(&[], each);
                    }
                }
                last = Some((now, *index));
            }
            GenEvent::Finished(s) => {
                let reason = wire_reason(s.stop_reason);
                m.requests.inc(&[reason.as_str()]);
                m.prompt_tokens.inc_by(&[], s.prompt_tokens as f64);
                m.cached_prompt_tokens.inc_by(&[], s.cached_tokens as f64);
                m.generated_tokens.inc_by(&[], s.completion_tokens as f64);
                m.request_duration.observe(&[], s.total_seconds);
                if s.stop_reason == StopReason::Cancelled {
                    m.cancellations.inc(&[]);
                }
                info!(
                    request_id = %request_id,
                    stop_reason = reason.as_str(),
                    prompt_tokens = s.prompt_tokens,
                    cached_tokens = s.cached_tokens,
                    completion_tokens = s.completion_tokens,
                    ttft_ms = s.time_to_first_token.unwrap_or(0.0) * 1e3,
                    decode_tps = tokens_per_second(s),
                    "generation finished"
                );
            }
            GenEvent::Failed(e) => {
                m.requests.inc(&["error"]);
                error!(request_id = %request_id, error = %e, "generation failed");
            }
        }
        tx.send((choice, ev)).is_ok()
    })
}

fn tokens_per_second(s: &GenerationSummary) -> f64 {
    if s.decode_seconds > 0.0 && s.completion_tokens > 1 {
        (s.completion_tokens - 1) as f64 / s.decode_seconds
    } else {
        0.0
    }
}
