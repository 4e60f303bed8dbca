//! The hive's HTTP API: one route table, authentication, handlers.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use futures_util::{Stream, StreamExt};
use rbee_api::{MAX_BODY_BYTES, codes};
use rbee_http::{ApiError, RequestId, Route, build_router, presented_bearer};
use serde::Deserialize;
use serde_json::json;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::WatchStream;
use tracing::warn;

use crate::HiveError;
use crate::downloads::is_finished;
use crate::hive::{Hive, SpawnRequest, WorkerEvent};
use crate::worker::{ReadyReport, StopCause};

type Shared = Arc<Hive>;

fn routes() -> Vec<Route<Shared>> {
    let r = |method, path, public, handler| Route {
        method,
        path,
        public,
        handler,
    };
    vec![
        r("GET", "/health", true, get(health)),
        // Public unless `metrics_require_token` (checked in the handler).
        r("GET", "/metrics", true, get(metrics)),
        r("GET", "/v1/resources", false, get(node_resources)),
        r("GET", "/v1/workers", false, get(list_workers)),
        r("POST", "/v1/workers", false, post(spawn_worker)),
        r("GET", "/v1/workers/events", false, get(worker_events)),
        r("GET", "/v1/workers/{id}", false, get(get_worker)),
        r("DELETE", "/v1/workers/{id}", false, delete(stop_worker)),
        // Authenticated with the worker's own token (see `require_token`).
        r("POST", "/v1/workers/{id}/ready", false, post(worker_ready)),
        r("POST", "/v1/workers/{id}/inference", false, post(inference)),
        r(
            "DELETE",
            "/v1/inference/{request_id}",
            false,
            delete(cancel_inference),
        ),
        r("GET", "/v1/models", false, get(list_models)),
        r("DELETE", "/v1/models/{id}", false, delete(delete_model)),
        r("POST", "/v1/models/downloads", false, post(start_download)),
        r("GET", "/v1/models/downloads", false, get(list_downloads)),
        r("GET", "/v1/models/downloads/{id}", false, get(get_download)),
        r(
            "GET",
            "/v1/models/downloads/{id}/events",
            false,
            get(download_events),
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

pub fn router(hive: Shared) -> Router {
    let auth_state = hive.clone();
    build_router(routes(), move |protected| {
        protected.route_layer(middleware::from_fn_with_state(auth_state, require_token))
    })
    .layer(middleware::from_fn_with_state(hive.clone(), count_requests))
    .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
    .with_state(hive)
}

async fn count_requests(State(hive): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    // Only known methods become label values, so clients cannot create series at will.
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        _ => "OTHER",
    };
    let resp = next.run(req).await;
    hive.metrics
        .http_requests
        .inc(&[&format!("{method} {route}"), resp.status().as_str()]);
    resp
}

fn ready_route_worker(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/workers/")?.strip_suffix("/ready")
}

/// The hive token on every protected route; a worker's ready call may use that worker's own
/// token instead. While draining, new work (POST) is refused with 503.
async fn require_token(
    State(hive): State<Shared>,
    Extension(rid): Extension<RequestId>,
    req: Request,
    next: Next,
) -> Response {
    let presented = presented_bearer(req.headers()).map(str::to_owned);
    let path = req.uri().path().to_owned();
    let api_ok = hive.accepts(presented.as_deref());
    let worker_ok = || {
        ready_route_worker(&path)
            .and_then(|id| hive.get(id))
            .zip(presented.as_deref())
            .is_some_and(|(w, p)| w.token_matches(p))
    };
    if !(api_ok || worker_ok()) {
        let reason = if presented.is_some() {
            "wrong_token"
        } else {
            "no_token"
        };
        warn!(%path, reason, "authentication failed");
        let peer = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        hive.auth_failure(
            peer,
            reason,
            json!({"path": path, "method": req.method().as_str(), "request_id": rid.0}),
        );
        return ApiError::unauthorized()
            .with_request_id(&rid.0)
            .into_response();
    }
    if hive.draining.load(Ordering::SeqCst)
        && req.method() == Method::POST
        && ready_route_worker(&path).is_none()
    {
        return ApiError::new(
            codes::SHUTTING_DOWN,
            "the hive is shutting down and takes no new work",
        )
        .retry_after(5)
        .with_request_id(&rid.0)
        .into_response();
    }
    next.run(req).await
}

/// An error response; the request-id layer stamps the id.
fn err(e: impl Into<ApiError>) -> Response {
    e.into().into_response()
}

async fn health(State(hive): State<Shared>) -> Response {
    let draining = hive.draining.load(Ordering::SeqCst);
    let workers = hive.list();
    let body = json!({
        "status": if draining { "draining" } else { "ok" },
        "hive_id": hive.hive_id(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": hive.started.elapsed().as_secs(),
        "workers": workers.len(),
        "workers_ready": workers.iter().filter(|w| w.state == crate::worker::WorkerState::Ready).count(),
    });
    let code = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(hive): State<Shared>, headers: HeaderMap) -> Response {
    if hive.config().metrics_require_token && !hive.accepts(presented_bearer(&headers)) {
        hive.metrics.auth_failures.inc(&[]);
        return err(ApiError::unauthorized());
    }
    (
        [(header::CONTENT_TYPE, rbee_metrics::CONTENT_TYPE)],
        hive.metrics.registry.render(),
    )
        .into_response()
}

async fn node_resources(State(hive): State<Shared>) -> Response {
    let res = hive.resources().await;
    let workers = hive.list();
    let committed: u64 = workers
        .iter()
        .filter(|w| !matches!(w.state, crate::worker::WorkerState::Failed))
        .map(|w| w.memory_estimate_bytes)
        .sum();
    Json(json!({
        "hive_id": hive.hive_id(),
        "resources": res,
        "memory_committed_bytes": committed,
        "workers": workers,
        "models": hive.models().await,
    }))
    .into_response()
}

async fn list_workers(State(hive): State<Shared>) -> Response {
    Json(json!({ "workers": hive.list() })).into_response()
}

async fn spawn_worker(
    State(hive): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: rbee_api::worker::SpawnRequest = match rbee_http::json_body(&headers, body) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    if req.max_context == Some(0) {
        return err(HiveError::BadRequest(
            "`max_context` must be at least 1".into(),
        ));
    }
    let spawn = SpawnRequest {
        model_ref: req.model,
        device: req.device,
        max_context: req.max_context,
    };
    if spawn.device.trim().starts_with("cuda") {
        // Admission compares with free VRAM as of now.
        hive.resources().await;
    }
    // Reading GGUF metadata and the catalog touches the disk: keep it off the async threads.
    let h = hive.clone();
    match tokio::task::spawn_blocking(move || h.spawn_worker(spawn)).await {
        Ok(Ok(view)) => (StatusCode::ACCEPTED, Json(view)).into_response(),
        Ok(Err(e)) => err(e),
        Err(e) => err(ApiError::internal(format!("spawn task failed: {e}"))),
    }
}

async fn get_worker(State(hive): State<Shared>, Path(id): Path<String>) -> Response {
    match hive.get(&id) {
        Some(w) => Json(w.view()).into_response(),
        None => err(HiveError::WorkerNotFound(id)),
    }
}

async fn stop_worker(
    State(hive): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Path(id): Path<String>,
) -> Response {
    hive.audit_as(
        "worker.stop_requested",
        "api",
        json!({"worker_id": id, "request_id": rid.0}),
    );
    match hive.stop_worker(&id, StopCause::Api).await {
        Some(view) => Json(view).into_response(),
        None => err(HiveError::WorkerNotFound(id)),
    }
}

async fn worker_ready(
    State(hive): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let report: ReadyReport = match rbee_http::json_body(&headers, body) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    let Some(worker) = hive.get(&id) else {
        return err(HiveError::WorkerNotFound(id));
    };
    if worker.deliver_ready(report) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        err(ApiError::new(
            codes::INVALID_PARAMETER,
            "no ready call is expected from this process",
        )
        .with_status(StatusCode::CONFLICT))
    }
}

/// SSE: a snapshot of every worker, then each change as it happens.
async fn worker_events(State(hive): State<Shared>) -> Response {
    let rx = hive.subscribe();
    let snapshot = |hive: &Hive| -> Vec<WorkerEvent> {
        hive.list()
            .into_iter()
            .map(|worker| WorkerEvent {
                kind: "snapshot",
                worker,
            })
            .collect()
    };
    let first = futures_util::stream::iter(snapshot(&hive));
    // A subscriber too slow for the channel gets a fresh snapshot instead of a silent gap.
    let rest = BroadcastStream::new(rx).flat_map(move |r| {
        futures_util::stream::iter(match r {
            Ok(ev) => vec![ev],
            Err(_) => snapshot(&hive),
        })
    });
    let events = first
        .chain(rest)
        .map(|ev| Ok::<_, Infallible>(json_event(&ev)));
    sse(events)
}

fn json_event<T: serde::Serialize>(v: &T) -> Event {
    Event::default().data(serde_json::to_string(v).unwrap_or_default())
}

fn sse(events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

async fn inference(
    State(hive): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match rbee_http::read_body(body) {
        Ok(b) => b,
        Err(e) => return err(e),
    };
    let Some(worker) = hive.get(&id) else {
        return err(HiveError::WorkerNotFound(id));
    };
    match crate::proxy::forward(hive, worker, rid.0.clone(), headers, body).await {
        Ok(resp) => resp,
        Err(e) => err(e),
    }
}

async fn cancel_inference(State(hive): State<Shared>, Path(request_id): Path<String>) -> Response {
    let Some(worker_id) = hive.inflight_worker(&request_id) else {
        return err(ApiError::not_found(format!(
            "no request `{request_id}` is in flight on this hive"
        )));
    };
    let Some((port, token)) = hive.get(&worker_id).and_then(|w| w.endpoint()) else {
        return err(HiveError::WorkerNotFound(worker_id));
    };
    let sent = hive
        .http
        .delete(format!("http://127.0.0.1:{port}/v1/inference/{request_id}"))
        .bearer_auth(token.expose())
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    match sent {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let bytes = r.bytes().await.unwrap_or_default();
            (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
        }
        Err(e) => err(ApiError::new(
            codes::WORKER_UNAVAILABLE,
            format!("worker {worker_id} did not answer: {e}"),
        )),
    }
}

async fn list_models(State(hive): State<Shared>) -> Response {
    Json(json!({ "models": hive.models().await })).into_response()
}

async fn delete_model(
    State(hive): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Path(id): Path<String>,
) -> Response {
    let h = hive.clone();
    let lookup = id.clone();
    let found = tokio::task::spawn_blocking(move || h.catalog.find(&lookup))
        .await
        .ok()
        .flatten();
    let Some(entry) = found else {
        return err(HiveError::ModelNotFound(id));
    };
    if let Some(worker) = hive.model_in_use(&entry.path) {
        return err(ApiError::new(
            codes::MODEL_IN_USE,
            format!("model `{id}` is in use by worker {worker}; stop it first"),
        ));
    }
    let h = hive.clone();
    let target = id.clone();
    let deleted = tokio::task::spawn_blocking(move || h.catalog.delete(&target))
        .await
        .map_err(|e| HiveError::Io(std::io::Error::other(e.to_string())));
    match deleted.and_then(|r| r.map_err(HiveError::Model)) {
        Ok(_) => {
            hive.audit_as(
                "model.delete",
                "api",
                json!({"model_id": id, "path": entry.path, "request_id": rid.0}),
            );
            Json(json!({"deleted": entry})).into_response()
        }
        Err(e) => err(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DownloadBody {
    /// `hf:org/repo[:file]`.
    model: String,
}

async fn start_download(
    State(hive): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: DownloadBody = match rbee_http::json_body(&headers, body) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    let model: rbee_models::ModelRef = match req.model.parse() {
        Ok(m) => m,
        Err(e) => return err(HiveError::Model(e)),
    };
    if !matches!(model, rbee_models::ModelRef::Hf(_)) {
        return err(ApiError::new(
            codes::INVALID_MODEL_REF,
            "only `hf:org/repo[:file]` references can be downloaded",
        ));
    }
    let (dl, started) = hive.start_download(model);
    let status = if started {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let body = json!({
        "id": dl.id,
        "model": dl.model,
        "progress": *dl.progress.borrow(),
        "events": format!("/v1/models/downloads/{}/events", dl.id),
    });
    (status, Json(body)).into_response()
}

async fn list_downloads(State(hive): State<Shared>) -> Response {
    let list: Vec<_> = hive
        .downloads
        .list()
        .into_iter()
        .map(|(id, model, progress)| json!({"id": id, "model": model, "progress": progress}))
        .collect();
    Json(json!({ "downloads": list })).into_response()
}

async fn get_download(State(hive): State<Shared>, Path(id): Path<String>) -> Response {
    match hive.downloads.get(&id) {
        Some(d) => Json(json!({"id": d.id, "model": d.model, "progress": *d.progress.borrow()}))
            .into_response(),
        None => err(ApiError::not_found(format!("no download `{id}`"))),
    }
}

/// SSE of a download's progress: the current state first, then every change, ending after
/// `done` or `failed`.
async fn download_events(State(hive): State<Shared>, Path(id): Path<String>) -> Response {
    let Some(d) = hive.downloads.get(&id) else {
        return err(ApiError::not_found(format!("no download `{id}`")));
    };
    // The stream ends right after the first finished state (no further change would come).
    let events = futures_util::stream::unfold(
        (WatchStream::new(d.progress.clone()), false),
        |(mut updates, done)| async move {
            if done {
                return None;
            }
            let p = updates.next().await?;
            let finished = is_finished(&p);
            Some((Ok::<_, Infallible>(json_event(&p)), (updates, finished)))
        },
    );
    sse(events)
}

impl rbee_http::HttpError for HiveError {
    fn code(&self) -> rbee_api::ErrorCode {
        match self {
            HiveError::BadRequest(_) => codes::INVALID_PARAMETER,
            HiveError::WorkerNotFound(_) => codes::NOT_FOUND,
            HiveError::ModelNotFound(_) => codes::MODEL_NOT_FOUND,
            HiveError::Insufficient(_) => codes::INSUFFICIENT_RESOURCES,
            HiveError::ShuttingDown => codes::SHUTTING_DOWN,
            HiveError::Model(m) => m.code(),
            HiveError::Audit(_) | HiveError::Http(_) | HiveError::Io(_) | HiveError::Config(_) => {
                codes::INTERNAL
            }
        }
    }

    fn retry_after(&self) -> Option<u32> {
        matches!(self, HiveError::ShuttingDown).then_some(5)
    }
}

impl From<HiveError> for ApiError {
    fn from(e: HiveError) -> Self {
        rbee_http::HttpError::to_api_error(&e)
    }
}
