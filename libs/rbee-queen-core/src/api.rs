//! The queen's HTTP API: OpenAI-compatible client routes, the native SSE route, heartbeats
//! from hives and the admin routes, from one route table.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use rbee_api::{
    HEADER_REQUEST_TIMEOUT, HiveHeartbeat, InferenceRequest, MAX_BODY_BYTES, StreamEvent, codes,
};
use rbee_http::{ApiError, RequestId, Route, build_router, presented_bearer};
use rbee_openai::{
    Aggregator, ChatCompletionRequest, ChunkStream, CompletionRequest, EndpointKind, ModelCard,
    ModelList, OpenAiError, sse_data,
};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::queen::Queen;
use crate::relay;

type Shared = Arc<Queen>;

/// The name of the client token a request presented (`dev` in dev mode).
#[derive(Clone, Debug)]
pub struct ClientName(pub String);

fn routes() -> Vec<Route<Shared>> {
    let r = |method, path, public, handler| Route {
        method,
        path,
        public,
        handler,
    };
    vec![
        r("GET", "/health", true, get(health)),
        r("GET", "/metrics", true, get(metrics)),
        r("GET", "/openapi.json", true, get(openapi)),
        r(
            "POST",
            "/v1/chat/completions",
            false,
            post(chat_completions),
        ),
        r("POST", "/v1/completions", false, post(completions)),
        r("GET", "/v1/models", false, get(models)),
        r("POST", "/v1/inference", false, post(native_inference)),
        r(
            "DELETE",
            "/v1/inference/{request_id}",
            false,
            delete(cancel),
        ),
        // Authenticated with the join token instead of a client token.
        r("POST", "/v1/hives/heartbeat", false, post(heartbeat)),
        r("GET", "/v1/admin/hives", false, get(list_hives)),
        r("GET", "/v1/admin/hives/{id}", false, get(get_hive)),
        r("DELETE", "/v1/admin/hives/{id}", false, delete(remove_hive)),
        r("GET", "/v1/admin/workers", false, get(list_workers)),
        r("POST", "/v1/admin/workers", false, post(admin_spawn)),
        r(
            "DELETE",
            "/v1/admin/workers/{hive}/{id}",
            false,
            delete(admin_stop),
        ),
        r("GET", "/v1/admin/models", false, get(admin_models)),
        r("POST", "/v1/admin/models/pull", false, post(admin_pull)),
        r(
            "GET",
            "/v1/admin/models/pull/{hive}/{id}/events",
            false,
            get(admin_pull_events),
        ),
    ]
}

/// Every route as (method, path, public), from the table the router is built from.
pub fn router_routes() -> Vec<(&'static str, &'static str, bool)> {
    routes()
        .into_iter()
        .map(|r| (r.method, r.path, r.public))
        .collect()
}

pub fn router(queen: Shared) -> Router {
    let auth = queen.clone();
    build_router(routes(), move |protected| {
        protected.route_layer(middleware::from_fn_with_state(auth, require_token))
    })
    .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
    .with_state(queen)
}

/// The code of an error response, for the request counter.
#[derive(Clone)]
struct ResponseCode(rbee_api::ErrorCode);

/// The queen's one error response: OpenAI's shape, which also carries rbee's `code`, `message`
/// and `request_id`; `param` names the request field at fault when there is one.
fn error(e: ApiError, param: Option<&str>, rid: &str) -> Response {
    let body = rbee_openai::error_body(e.status.as_u16(), e.code.as_str(), &e.message, param, rid);
    let mut resp = (e.status, Json(body)).into_response();
    resp.extensions_mut().insert(ResponseCode(e.code));
    if e.status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if let Some(s) = e.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

fn api_error(e: ApiError, rid: &str) -> Response {
    error(e, None, rid)
}

fn openai_error(e: &OpenAiError, rid: &str) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    error(
        ApiError::new(e.code(), e.message()).with_status(status),
        e.param(),
        rid,
    )
}

async fn require_token(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    // Hives keep beating and clients may cancel while the queen drains; everything else new
    // is refused.
    let cancelling =
        req.method() == axum::http::Method::DELETE && path.starts_with("/v1/inference/");
    if q.is_draining() && path != "/v1/hives/heartbeat" && !cancelling {
        return api_error(
            ApiError::new(
                codes::SHUTTING_DOWN,
                "the queen is shutting down; retry against another queen or after its restart",
            )
            .retry_after(5),
            &rid.0,
        );
    }
    let tokens = q.tokens();
    let presented = presented_bearer(req.headers()).map(str::to_owned);
    let name = if path == "/v1/hives/heartbeat" {
        q.join_allowed(presented.as_deref())
            .then(|| "hive".to_owned())
    } else if tokens.clients.is_empty() {
        Some("dev".to_owned())
    } else {
        presented
            .as_deref()
            .and_then(|p| tokens.clients.verify(p))
            .map(str::to_owned)
    };
    let Some(name) = name else {
        q.metrics.auth_failures.inc(&[]);
        warn!(%path, presented = presented.is_some(), "authentication failed");
        q.audit(
            "auth.failure",
            "anonymous",
            json!({"path": path, "request_id": rid.0, "token_presented": presented.is_some()}),
        );
        return api_error(ApiError::unauthorized(), &rid.0);
    };
    if path.starts_with("/v1/admin/") && !q.is_admin(&name) {
        q.metrics.auth_failures.inc(&[]);
        warn!(%path, client = %name, "a client token without `admin` asked for an admin route");
        q.audit(
            "auth.forbidden",
            &name,
            json!({"path": path, "request_id": rid.0}),
        );
        return api_error(
            ApiError::new(
                codes::FORBIDDEN,
                format!(
                    "client `{name}` may not use the admin routes (set `admin = true` on its token)"
                ),
            ),
            &rid.0,
        );
    }
    req.extensions_mut().insert(ClientName(name));
    next.run(req).await
}

async fn health(State(q): State<Shared>) -> Response {
    let hives = q.registry.list().unwrap_or_default();
    let up = hives
        .iter()
        .filter(|h| h.state == rbee_registry::HiveState::Up)
        .count();
    let draining = q.is_draining();
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        status,
        Json(json!({
            "status": if draining { "draining" } else { "ok" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": q.started.elapsed().as_secs(),
            "hives": hives.len(),
            "hives_up": up,
        })),
    )
        .into_response()
}

async fn openapi() -> Response {
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    Json(
        DOC.get_or_init(|| crate::openapi::document(&router_routes()))
            .clone(),
    )
    .into_response()
}

async fn metrics(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
) -> Response {
    // Public unless `metrics_require_token`; then any client token opens it.
    if q.config().metrics_require_token {
        let tokens = q.tokens();
        if !tokens.clients.is_empty()
            && presented_bearer(&headers)
                .and_then(|p| tokens.clients.verify(p))
                .is_none()
        {
            q.metrics.auth_failures.inc(&[]);
            return api_error(ApiError::unauthorized(), &rid.0);
        }
    }
    (
        [(header::CONTENT_TYPE, rbee_metrics::CONTENT_TYPE)],
        q.metrics.registry.render(),
    )
        .into_response()
}

/// The client's `X-Request-Timeout` (seconds) or the default, as an instant and unix ms.
fn deadline(q: &Queen, headers: &HeaderMap) -> Result<(Instant, i64), String> {
    let secs = match headers.get(HEADER_REQUEST_TIMEOUT) {
        None => q.config().scheduling.default_timeout_seconds as f64,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
            .ok_or("`X-Request-Timeout` must be seconds, more than 0 and at most 86400")?,
    };
    let d = Duration::from_secs_f64(secs);
    Ok((
        Instant::now() + d,
        rbee_http::unix_ms() + d.as_millis() as i64,
    ))
}

fn unix_secs() -> u64 {
    (rbee_http::unix_ms() / 1000).max(0) as u64
}

/// What every inference route shares: model resolution, the deadline, the trip down.
async fn begin(
    q: &Shared,
    rid: &str,
    headers: &HeaderMap,
    model: &str,
    req: &InferenceRequest,
    accepted: Instant,
) -> Result<relay::Upstream, Box<Response>> {
    // Parsing and checking the request, up to here.
    q.metrics
        .stage
        .observe(&["validation"], accepted.elapsed().as_secs_f64());
    let Some(model_ref) = q.resolve_model(model) else {
        return Err(Box::new(error(
            ApiError::new(
                codes::MODEL_NOT_SERVED,
                format!("model `{model}` is not served here; GET /v1/models lists what is"),
            ),
            Some("model"),
            rid,
        )));
    };
    let (at, at_ms) = deadline(q, headers)
        .map_err(|m| Box::new(api_error(ApiError::new(codes::INVALID_PARAMETER, m), rid)))?;
    relay::start(q, &model_ref, req, rid, at, at_ms, accepted)
        .await
        .map_err(|e| Box::new(api_error(e, rid)))
}

fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                codes::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(codes::INVALID_JSON, e.body_text())
        }
    })
}

/// Accounting when a stream ends, however it ends.
struct Finish {
    q: Shared,
    route: &'static str,
    model: String,
    client: String,
    accepted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    outcome: (u16, String),
    usage: Option<(u32, u32)>,
    /// request id, model reference, hive, worker, whether the worker was spawned for it.
    trip: (String, String, String, String, bool),
    _slot: crate::queen::ClientSlot,
}

impl Finish {
    fn new(
        q: &Shared,
        route: &'static str,
        model: &str,
        client: &str,
        rid: &str,
        up: &relay::Upstream,
        slot: crate::queen::ClientSlot,
    ) -> Self {
        let accepted = up.accepted;
        q.metrics.inflight.add(&[], 1.0);
        Self {
            _slot: slot,
            trip: (
                rid.to_owned(),
                up.model_ref.clone(),
                up.lease.hive_id.clone(),
                up.lease.worker_id.clone(),
                up.lease.spawned,
            ),
            q: q.clone(),
            route,
            model: model.to_owned(),
            client: client.to_owned(),
            accepted,
            first_token: None,
            last_token: None,
            outcome: (200, String::new()),
            usage: None,
        }
    }

    fn see(&mut self, ev: &StreamEvent) {
        match ev {
            StreamEvent::Token { .. } => {
                let now = Instant::now();
                match self.last_token {
                    None => {
                        self.first_token = Some(now);
                        self.q
                            .metrics
                            .ttft
                            .observe(&[&self.model], self.accepted.elapsed().as_secs_f64());
                    }
                    Some(prev) => self
                        .q
                        .metrics
                        .inter_token
                        .observe(&[&self.model], (now - prev).as_secs_f64()),
                }
                self.last_token = Some(now);
            }
            StreamEvent::End {
                prompt_tokens,
                completion_tokens,
                timings,
                ..
            } => {
                self.usage = Some((*prompt_tokens, *completion_tokens));
                let st = &self.q.metrics.stage;
                st.observe(&["worker_queue"], timings.queue_ms / 1000.0);
                st.observe(&["prefill"], timings.prefill_ms / 1000.0);
                st.observe(&["decode"], timings.decode_ms / 1000.0);
            }
            StreamEvent::Error { code, .. } => self.outcome = (200, code.as_str().to_owned()),
            _ => {}
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let m = &self.q.metrics;
        m.inflight.add(&[], -1.0);
        let secs = self.accepted.elapsed().as_secs_f64();
        m.duration.observe(&[&self.model], secs);
        self.q.record_duration(secs);
        if let Some((p, c)) = self.usage {
            m.tokens_in.inc_by(&[&self.model], f64::from(p));
            m.tokens_out.inc_by(&[&self.model], f64::from(c));
        } else if self.outcome.1.is_empty() {
            self.outcome.1 = "CLIENT_GONE".into();
        }
        m.requests.inc(&[
            self.route,
            &self.model,
            &self.client,
            &self.outcome.0.to_string(),
            &self.outcome.1,
        ]);
        let (rid, model_ref, hive, worker, spawned) = &self.trip;
        let (prompt, completion) = self.usage.unwrap_or((0, 0));
        let sha = self
            .q
            .registry
            .get(hive)
            .ok()
            .flatten()
            .and_then(|h| h.heartbeat)
            .and_then(|hb| hb.model_sha256.get(model_ref).cloned());
        self.q.usage(json!({
            "ts_unix_ms": rbee_http::unix_ms(),
            "request_id": rid,
            "client": self.client,
            "route": self.route,
            "model": self.model,
            "model_ref": model_ref,
            "model_sha256": sha,
            "hive": hive,
            "worker": worker,
            "spawned_worker": spawned,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "ttft_ms": self.first_token.map(|t| (t - self.accepted).as_secs_f64() * 1000.0),
            "total_ms": secs * 1000.0,
            "outcome": if self.outcome.1.is_empty() { "ok" } else { self.outcome.1.as_str() },
        }));
    }
}

/// Counts a request refused before it reached scheduling (bad body, parameters, limits).
fn early(
    q: &Queen,
    route: &str,
    client: &str,
    code: rbee_api::ErrorCode,
    resp: Response,
) -> Response {
    q.metrics.requests.inc(&[
        route,
        "unknown",
        client,
        resp.status().as_str(),
        code.as_str(),
    ]);
    resp
}

fn count_refusal(q: &Queen, route: &str, model: &str, client: &str, resp: &Response) {
    // `model` comes from the client: only names the queen serves become label values.
    let model = if q.resolve_model(model).is_some() {
        model
    } else {
        "unknown"
    };
    let code = resp
        .extensions()
        .get::<ResponseCode>()
        .map_or("refused", |c| c.0.as_str());
    q.metrics
        .requests
        .inc(&[route, model, client, resp.status().as_str(), code]);
}

async fn chat_completions(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    openai_route(q, rid, client, headers, body, EndpointKind::Chat).await
}

async fn completions(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    openai_route(q, rid, client, headers, body, EndpointKind::Completion).await
}

/// What both OpenAI request kinds come down to.
struct OpenAiCall {
    model: String,
    inference: InferenceRequest,
    stream: bool,
    include_usage: bool,
}

fn parse_openai(kind: EndpointKind, body: &[u8]) -> Result<OpenAiCall, OpenAiError> {
    match kind {
        EndpointKind::Chat => {
            let r = ChatCompletionRequest::from_json(body)?;
            Ok(OpenAiCall {
                inference: r.to_inference()?,
                stream: r.is_stream(),
                include_usage: r.include_usage(),
                model: r.model,
            })
        }
        EndpointKind::Completion => {
            let r = CompletionRequest::from_json(body)?;
            Ok(OpenAiCall {
                inference: r.to_inference()?,
                stream: r.is_stream(),
                include_usage: r.include_usage(),
                model: r.model,
            })
        }
    }
}

/// `/v1/chat/completions` and `/v1/completions`: parse, schedule, then stream chunks or
/// answer with the aggregated response.
async fn openai_route(
    q: Shared,
    rid: RequestId,
    client: ClientName,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: EndpointKind,
) -> Response {
    let accepted = Instant::now();
    let route = match kind {
        EndpointKind::Chat => "/v1/chat/completions",
        EndpointKind::Completion => "/v1/completions",
    };
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(e) => {
            let code = e.code;
            return early(&q, route, &client.0, code, api_error(e, &rid.0));
        }
    };
    let call = match parse_openai(kind, &body) {
        Ok(c) => c,
        Err(e) => return early(&q, route, &client.0, e.code(), openai_error(&e, &rid.0)),
    };
    let slot = match q.client_slot(&client.0, &rid.0) {
        Ok(s) => s,
        Err(e) => {
            let code = e.code;
            return early(&q, route, &client.0, code, api_error(e, &rid.0));
        }
    };
    let upstream = match begin(&q, &rid.0, &headers, &call.model, &call.inference, accepted).await {
        Ok(u) => u,
        Err(resp) => {
            count_refusal(&q, route, &call.model, &client.0, &resp);
            return *resp;
        }
    };
    let finish = Finish::new(&q, route, &call.model, &client.0, &rid.0, &upstream, slot);
    let id = match kind {
        EndpointKind::Chat => rbee_openai::chat_completion_id(&rid.0),
        EndpointKind::Completion => rbee_openai::completion_id(&rid.0),
    };
    if call.stream {
        let chunks = ChunkStream::new(id, unix_secs(), call.model, kind, call.include_usage)
            .with_request_id(rid.0.clone());
        return openai_stream(upstream, chunks, finish);
    }
    let model = call.model;
    aggregate(upstream, finish, &rid.0, move |agg| {
        let value = match kind {
            EndpointKind::Chat => {
                serde_json::to_value(agg.into_chat_completion(id, unix_secs(), model)?)
            }
            EndpointKind::Completion => {
                serde_json::to_value(agg.into_completion(id, unix_secs(), model)?)
            }
        };
        Ok(value.unwrap_or(Value::Null))
    })
    .await
}

fn sse_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Worker events as OpenAI chunks. The lease and the accounting live as long as the stream:
/// a client that leaves drops both, and the worker's generation is cancelled down the chain.
fn openai_stream(up: relay::Upstream, chunks: ChunkStream, finish: Finish) -> Response {
    let relay::Upstream { events, lease, .. } = up;
    let events = lease.queen().cuttable(events);
    let state = (events, chunks, finish, lease);
    let frames = futures_util::stream::unfold(
        state,
        |(mut events, mut chunks, mut finish, lease)| async move {
            if chunks.is_finished() {
                return None;
            }
            let payloads = match events.next().await {
                Some(ev) => {
                    finish.see(&ev);
                    chunks.on_event(&ev)
                }
                None => chunks.on_upstream_eof(),
            };
            let text: String = payloads.iter().map(|p| sse_data(p)).collect();
            Some((
                Ok::<_, Infallible>(Bytes::from(text)),
                (events, chunks, finish, lease),
            ))
        },
    );
    sse_response(Body::from_stream(frames))
}

async fn aggregate(
    up: relay::Upstream,
    mut finish: Finish,
    rid: &str,
    build: impl FnOnce(Aggregator) -> Result<Value, OpenAiError>,
) -> Response {
    let relay::Upstream { events, lease, .. } = up;
    let mut events = lease.queen().cuttable(events);
    let mut agg = Aggregator::new();
    while let Some(ev) = events.next().await {
        finish.see(&ev);
        agg.push(&ev);
        if agg.is_done() {
            break;
        }
    }
    drop(lease);
    match build(agg) {
        Ok(v) => Json(v).into_response(),
        Err(e) => {
            finish.outcome = (e.status(), e.code().as_str().to_owned());
            openai_error(&e, rid)
        }
    }
}

/// The native route: `{"model": ..., <worker inference fields>}` in, the worker's own event
/// stream out.
async fn native_inference(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let accepted = Instant::now();
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(e) => {
            let code = e.code;
            return early(&q, "/v1/inference", &client.0, code, api_error(e, &rid.0));
        }
    };
    let mut value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let resp = error(
                ApiError::new(codes::INVALID_JSON, format!("invalid request body: {e}")),
                None,
                &rid.0,
            );
            return early(&q, "/v1/inference", &client.0, codes::INVALID_JSON, resp);
        }
    };
    let model = match value.as_object_mut().and_then(|o| o.remove("model")) {
        Some(Value::String(m)) if !m.is_empty() => m,
        _ => {
            let resp = error(
                ApiError::new(codes::INVALID_PARAMETER, "`model` (a string) is required"),
                Some("model"),
                &rid.0,
            );
            return early(
                &q,
                "/v1/inference",
                &client.0,
                codes::INVALID_PARAMETER,
                resp,
            );
        }
    };
    let req: InferenceRequest = match rbee_http::parse_json(value.to_string().as_bytes()) {
        Ok(r) => r,
        Err(e) => {
            let code = e.code;
            return early(&q, "/v1/inference", &client.0, code, api_error(e, &rid.0));
        }
    };
    let route = "/v1/inference";
    let slot = match q.client_slot(&client.0, &rid.0) {
        Ok(s) => s,
        Err(e) => {
            let code = e.code;
            return early(&q, "/v1/inference", &client.0, code, api_error(e, &rid.0));
        }
    };
    let upstream = match begin(&q, &rid.0, &headers, &model, &req, accepted).await {
        Ok(u) => u,
        Err(resp) => {
            count_refusal(&q, route, &model, &client.0, &resp);
            return *resp;
        }
    };
    let finish = Finish::new(&q, route, &model, &client.0, &rid.0, &upstream, slot);
    let relay::Upstream { events, lease, .. } = upstream;
    let events = q.cuttable(events);
    let state = (events, finish, lease, false);
    let frames =
        futures_util::stream::unfold(state, |(mut events, mut finish, lease, done)| async move {
            if done {
                return None;
            }
            match events.next().await {
                Some(ev) => {
                    finish.see(&ev);
                    let terminal =
                        matches!(ev, StreamEvent::End { .. } | StreamEvent::Error { .. });
                    let mut text = sse_data(&serde_json::to_string(&ev).unwrap_or_default());
                    if terminal {
                        text.push_str(&sse_data(rbee_api::SSE_DONE));
                    }
                    Some((
                        Ok::<_, Infallible>(Bytes::from(text)),
                        (events, finish, lease, terminal),
                    ))
                }
                None => None,
            }
        });
    sse_response(Body::from_stream(frames))
}

async fn cancel(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    Path(request_id): Path<String>,
) -> Response {
    if !rbee_http::valid_request_id(&request_id) || request_id.contains("..") {
        return error(
            ApiError::new(
                codes::INVALID_PARAMETER,
                "a request id is 1-128 letters, digits, `-`, `_`, `.` or `:`",
            ),
            None,
            &rid.0,
        );
    }
    // Only the client that sent it (or an admin) may cancel a request; to anyone else it
    // does not exist.
    let mine = q
        .owner_of(&request_id)
        .is_some_and(|owner| owner == client.0 || q.is_admin(&client.0));
    if !mine {
        return error(
            ApiError::new(
                codes::NOT_FOUND,
                format!("no request `{request_id}` of yours is in flight"),
            ),
            None,
            &rid.0,
        );
    }
    if q.cancel_queued(&request_id) {
        info!(%request_id, "cancelled while waiting for a worker");
        return Json(json!({"request_id": request_id, "cancelled": true, "queued": true}))
            .into_response();
    }
    // The hives know which worker carries the request; ask each that is up.
    let hives = q.registry.up().unwrap_or_default();
    for h in hives {
        let url = format!("{}/v1/inference/{request_id}", h.url.trim_end_matches('/'));
        if let Ok(r) = q
            .hive_delete(&h.id, &url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            && r.status().is_success()
        {
            info!(%request_id, hive = %h.id, "cancelled");
            return Json(json!({"request_id": request_id, "cancelled": true, "hive": h.id}))
                .into_response();
        }
    }
    error(
        ApiError::new(
            codes::NOT_FOUND,
            format!("no request `{request_id}` is in flight"),
        ),
        None,
        &rid.0,
    )
}

async fn models(State(q): State<Shared>) -> Response {
    let created = unix_secs();
    let cards = q
        .model_cards()
        .into_iter()
        .map(|(id, state, hives)| {
            ModelCard::new(id, created).with_rbee(json!({"state": state, "hives": hives}))
        })
        .collect();
    Json(ModelList::new(cards)).into_response()
}

async fn heartbeat(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(e) => return api_error(e, &rid.0),
    };
    let hb: HiveHeartbeat = match rbee_http::parse_json(&body) {
        Ok(h) => h,
        Err(e) => return api_error(e, &rid.0),
    };
    match q.heartbeat(&hb) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => api_error(e, &rid.0),
    }
}

async fn list_hives(State(q): State<Shared>) -> Response {
    Json(json!({"hives": q.registry.list().unwrap_or_default()})).into_response()
}

async fn get_hive(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Path(id): Path<String>,
) -> Response {
    match q.registry.get(&id) {
        Ok(Some(h)) => Json(h).into_response(),
        _ => error(
            ApiError::new(codes::NOT_FOUND, format!("no hive `{id}`")),
            None,
            &rid.0,
        ),
    }
}

async fn remove_hive(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    Path(id): Path<String>,
) -> Response {
    match q.registry.remove(&id) {
        Ok(true) => {
            q.hives_changed();
            q.audit(
                "admin.hive_remove",
                &client.0,
                json!({"hive_id": id, "request_id": rid.0}),
            );
            Json(json!({"removed": id})).into_response()
        }
        _ => error(
            ApiError::new(codes::NOT_FOUND, format!("no hive `{id}`")),
            None,
            &rid.0,
        ),
    }
}

async fn list_workers(State(q): State<Shared>) -> Response {
    let mut out = Vec::new();
    for h in q.registry.list().unwrap_or_default() {
        if let Some(hb) = &h.heartbeat {
            for w in &hb.workers {
                out.push(
                    json!({"hive": h.id, "hive_state": h.state, "id": w.id, "model": w.model,
                                "device": w.device, "state": w.state, "busy": w.busy}),
                );
            }
        }
    }
    Json(json!({"workers": out})).into_response()
}

/// A hive's answer passed through as it is (status, JSON body).
async fn passthrough(sent: reqwest::Result<reqwest::Response>, hive: &str, rid: &str) -> Response {
    match sent {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = r.bytes().await.unwrap_or_default();
            // The hive refusing the queen's own token is the operator's problem, not the
            // client's: not a 401 that would blame the client's token.
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return error(ApiError::new(codes::INTERNAL, format!(
                        "hive {hive} refused the queen's credentials ({status}); the operator must fix the queen's hive token"
                    )).with_status(StatusCode::BAD_GATEWAY), None, rid);
            }
            // A hive's error is re-shaped like the queen's own (one error shape per daemon),
            // keeping its status, code and message.
            if !status.is_success()
                && let Ok(e) = serde_json::from_slice::<rbee_api::ErrorBody>(&body)
            {
                return error(
                    ApiError::new(e.error.code, e.error.message.clone()).with_status(status),
                    None,
                    rid,
                );
            }
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => error(
            ApiError::new(
                codes::WORKER_UNAVAILABLE,
                format!("hive {hive} did not answer: {e}"),
            ),
            None,
            rid,
        ),
    }
}

fn hive_url(q: &Queen, id: &str, rid: &str) -> Result<String, Box<Response>> {
    match q.registry.get(id) {
        Ok(Some(h)) => Ok(h.url.trim_end_matches('/').to_owned()),
        _ => Err(Box::new(error(
            ApiError::new(codes::NOT_FOUND, format!("no hive `{id}`")),
            Some("hive"),
            rid,
        ))),
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminSpawn {
    /// A model name clients use, or a hive model reference.
    model: String,
    /// The hive to run it on; default: the best hive, as for a request.
    hive: Option<String>,
    #[serde(default)]
    device: Option<String>,
}

async fn admin_spawn(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(e) => return api_error(e, &rid.0),
    };
    let req: AdminSpawn = match rbee_http::parse_json(&body) {
        Ok(r) => r,
        Err(e) => return api_error(e, &rid.0),
    };
    let model_ref = q
        .config()
        .models
        .iter()
        .find(|m| m.name == req.model)
        .map(|m| m.reference.clone())
        .unwrap_or_else(|| req.model.clone());
    let hive = match req.hive.clone().or_else(|| q.best_hive(&model_ref)) {
        Some(h) => h,
        None => {
            return error(
                ApiError::new(codes::NO_CAPACITY, "no hive is up"),
                None,
                &rid.0,
            );
        }
    };
    let url = match hive_url(&q, &hive, &rid.0) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let mut spawn = json!({"model": model_ref});
    if let Some(d) = req.device {
        spawn["device"] = json!(d);
    }
    q.audit(
        "admin.worker_spawn",
        &client.0,
        json!({"hive": hive, "model": model_ref, "request_id": rid.0}),
    );
    let sent = q
        .hive_post(&hive, &format!("{url}/v1/workers"))
        .json(&spawn)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    passthrough(sent, &hive, &rid.0).await
}

async fn admin_stop(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    Path((hive, id)): Path<(String, String)>,
) -> Response {
    if !rbee_http::valid_request_id(&id) || id.contains("..") {
        return error(
            ApiError::new(codes::INVALID_PARAMETER, "invalid worker id"),
            None,
            &rid.0,
        );
    }
    let url = match hive_url(&q, &hive, &rid.0) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    q.audit(
        "admin.worker_stop",
        &client.0,
        json!({"hive": hive, "worker": id, "request_id": rid.0}),
    );
    let sent = q
        .hive_delete(&hive, &format!("{url}/v1/workers/{id}"))
        .timeout(Duration::from_secs(30))
        .send()
        .await;
    passthrough(sent, &hive, &rid.0).await
}

/// Where each model is: loaded (a ready worker) or on disk, per hive.
async fn admin_models(State(q): State<Shared>) -> Response {
    let mut models: std::collections::BTreeMap<String, Value> = Default::default();
    for h in q.registry.list().unwrap_or_default() {
        let Some(hb) = &h.heartbeat else { continue };
        for m in &hb.models {
            let e = models
                .entry(m.clone())
                .or_insert_with(|| json!({"on_disk": [], "loaded": []}));
            if let Some(a) = e["on_disk"].as_array_mut() {
                a.push(json!(h.id));
            }
        }
        for w in hb.workers.iter().filter(|w| w.state.is_ready()) {
            let e = models
                .entry(w.model.clone())
                .or_insert_with(|| json!({"on_disk": [], "loaded": []}));
            if let Some(a) = e["loaded"].as_array_mut() {
                a.push(json!({"hive": h.id, "worker": w.id}));
            }
        }
    }
    Json(json!({"models": models})).into_response()
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminPull {
    /// `hf:org/repo[:file]`.
    model: String,
    hive: String,
}

async fn admin_pull(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(e) => return api_error(e, &rid.0),
    };
    let req: AdminPull = match rbee_http::parse_json(&body) {
        Ok(r) => r,
        Err(e) => return api_error(e, &rid.0),
    };
    let url = match hive_url(&q, &req.hive, &rid.0) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    q.audit(
        "admin.model_pull",
        &client.0,
        json!({"hive": req.hive, "model": req.model, "request_id": rid.0}),
    );
    let sent = q
        .hive_post(&req.hive, &format!("{url}/v1/models/downloads"))
        .json(&json!({"model": req.model}))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    let r = match sent {
        Ok(r) if r.status().is_success() => r,
        other => return passthrough(other, &req.hive, &rid.0).await,
    };
    let status = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::ACCEPTED);
    let mut download: Value = r.json().await.unwrap_or(Value::Null);
    // The client follows the progress here, not on the hive it may not reach.
    if let Some(id) = download["id"].as_str().map(str::to_owned) {
        download["events"] = json!(format!("/v1/admin/models/pull/{}/{id}/events", req.hive));
        download["hive"] = json!(req.hive);
    }
    (status, Json(download)).into_response()
}

/// The hive's download progress (SSE), passed through.
async fn admin_pull_events(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Path((hive, id)): Path<(String, String)>,
) -> Response {
    if !rbee_http::valid_request_id(&id) || id.contains("..") {
        return error(
            ApiError::new(codes::INVALID_PARAMETER, "invalid download id"),
            None,
            &rid.0,
        );
    }
    let url = match hive_url(&q, &hive, &rid.0) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    match q
        .hive_get(&hive, &format!("{url}/v1/models/downloads/{id}/events"))
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => sse_response(Body::from_stream(r.bytes_stream())),
        other => passthrough(other, &hive, &rid.0).await,
    }
}
