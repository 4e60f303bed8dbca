//! The queen's one error response (OpenAI's shape carrying rbee's code, message and request
//! id), the request counter for refusals, and the SSE response head.

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rbee_http::ApiError;
use rbee_openai::OpenAiError;

use crate::queen::Queen;

/// The code of an error response, for the request counter.
#[derive(Clone)]
pub(crate) struct ResponseCode(rbee_api::ErrorCode);

/// The queen's one error response: OpenAI's shape, which also carries rbee's `code`, `message`
/// and `request_id`; `param` names the request field at fault when there is one.
pub(crate) fn error(e: ApiError, param: Option<&str>, rid: &str) -> Response {
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

pub(crate) fn api_error(e: ApiError, rid: &str) -> Response {
    error(e, None, rid)
}

pub(crate) fn openai_error(e: &OpenAiError, rid: &str) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    error(
        ApiError::new(e.code(), e.message()).with_status(status),
        e.param(),
        rid,
    )
}

/// Counts a request refused before it reached scheduling (bad body, parameters, limits).
pub(crate) fn early(
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

pub(crate) fn count_refusal(q: &Queen, route: &str, model: &str, client: &str, resp: &Response) {
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

pub(crate) fn sse_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
