//! The admin routes: hives (list, look at, approve, remove), workers (list, spawn, stop) and models
//! (where each is, pull one onto a hive) — mostly a hive's answer passed through.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use rbee_api::codes;
use rbee_http::{ApiError, RequestId};
use serde_json::{Value, json};

use crate::queen::Queen;

type Shared = Arc<Queen>;
use crate::auth::ClientName;
use crate::respond::{api_error, error, sse_response};

pub(crate) async fn list_hives(State(q): State<Shared>) -> Response {
    Json(json!({"hives": q.registry.list().unwrap_or_default()})).into_response()
}

pub(crate) async fn get_hive(
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

pub(crate) async fn remove_hive(
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

pub(crate) async fn approve_hive(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    Path(id): Path<String>,
) -> Response {
    match q.approve_hive(&id, &client.0, &rid.0) {
        Ok(true) => match q.registry.get(&id) {
            Ok(Some(h)) => Json(h).into_response(),
            _ => error(
                ApiError::new(codes::NOT_FOUND, format!("no hive `{id}`")),
                None,
                &rid.0,
            ),
        },
        Ok(false) => error(
            ApiError::new(codes::NOT_FOUND, format!("no hive `{id}`")),
            None,
            &rid.0,
        ),
        Err(e) => error(e, None, &rid.0),
    }
}

pub(crate) async fn list_workers(State(q): State<Shared>) -> Response {
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
pub(crate) async fn passthrough(
    sent: reqwest::Result<reqwest::Response>,
    hive: &str,
    rid: &str,
) -> Response {
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

pub(crate) fn hive_url(q: &Queen, id: &str, rid: &str) -> Result<String, Box<Response>> {
    match q.registry.get(id) {
        Ok(Some(h)) => Ok(h.url.trim_end_matches('/').to_owned()),
        _ => Err(Box::new(error(
            ApiError::new(codes::NOT_FOUND, format!("no hive `{id}`")),
            Some("hive"),
            rid,
        ))),
    }
}

pub(crate) async fn admin_spawn(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match rbee_http::read_json_body(&headers, body) {
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

pub(crate) async fn admin_stop(
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
pub(crate) async fn admin_models(State(q): State<Shared>) -> Response {
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

pub(crate) async fn admin_pull(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match rbee_http::read_json_body(&headers, body) {
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
pub(crate) async fn admin_pull_events(
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

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminPull {
    /// `hf:org/repo[:file]`.
    model: String,
    hive: String,
}
