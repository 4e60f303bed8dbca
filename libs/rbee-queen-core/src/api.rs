//! The queen's HTTP API: OpenAI-compatible client routes, the native SSE route, heartbeats
//! from hives and the admin routes, from one route table.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use rbee_api::{HiveHeartbeat, MAX_BODY_BYTES};
use rbee_http::{ApiError, RequestId, Route, build_router, presented_bearer};
use rbee_openai::{ModelCard, ModelList};
use serde_json::{Value, json};

use crate::queen::Queen;

type Shared = Arc<Queen>;
use crate::admin::{
    admin_models, admin_pull, admin_pull_events, admin_spawn, admin_stop, approve_hive, get_hive,
    list_hives, list_workers, remove_hive,
};
pub use crate::auth::ClientName;
use crate::auth::require_token;
use crate::inference::{
    cancel, chat_completions, completions, native_inference, responses, unix_secs,
};
use crate::respond::api_error;

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
        r("POST", "/v1/responses", false, post(responses)),
        r("GET", "/v1/models", false, get(models)),
        r("GET", "/v1/models/{id}", false, get(model)),
        r("POST", "/v1/inference", false, post(native_inference)),
        r(
            "DELETE",
            "/v1/inference/{request_id}",
            false,
            delete(cancel),
        ),
        // Authenticated with the join token or a hive's credential, not a client token.
        r("POST", "/v1/hives/heartbeat", false, post(heartbeat)),
        r("GET", "/v1/admin/hives", false, get(list_hives)),
        r("GET", "/v1/admin/hives/{id}", false, get(get_hive)),
        r(
            "POST",
            "/v1/admin/hives/{id}/approve",
            false,
            post(approve_hive),
        ),
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

async fn health(State(q): State<Shared>) -> Response {
    let hives = q.registry.list().unwrap_or_default();
    // Routable ones: up, approved, and past their first beat with their credential.
    let up = q.registry.up().unwrap_or_default().len();
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

/// One model card, by the id `GET /v1/models` lists (OpenAI's retrieve-model route).
async fn model(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let created = unix_secs();
    match q.model_cards().into_iter().find(|(name, _, _)| *name == id) {
        Some((id, state, hives)) => {
            Json(ModelCard::new(id, created).with_rbee(json!({"state": state, "hives": hives})))
                .into_response()
        }
        None => crate::respond::error(
            ApiError::new(
                rbee_api::codes::MODEL_NOT_SERVED,
                "no such model here; GET /v1/models lists what is",
            ),
            Some("model"),
            &rid.0,
        ),
    }
}

async fn heartbeat(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match rbee_http::read_json_body(&headers, body) {
        Ok(b) => b,
        Err(e) => return api_error(e, &rid.0),
    };
    let hb: HiveHeartbeat = match rbee_http::parse_json(&body) {
        Ok(h) => h,
        Err(e) => return api_error(e, &rid.0),
    };
    let auth = rbee_registry::BeatAuth::from_presented(presented_bearer(&headers));
    let peer = peer.map(|Extension(ConnectInfo(a))| a.ip());
    match q.heartbeat(&hb, auth, peer, &rid.0) {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => api_error(e, &rid.0),
    }
}
