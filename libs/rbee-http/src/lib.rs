//! Server plumbing every rbee daemon shares, so the error shape, request ids, authentication
//! and route tables behave the same on the worker, the hive and the queen.
//!
//! - [`ApiError`]: the one JSON error (`{"error":{code,message,request_id}}`) as a response,
//!   with `WWW-Authenticate` on 401 and `Retry-After` when given.
//! - [`request_id`]: middleware that accepts a well-formed `X-Request-Id` or makes one, puts
//!   [`RequestId`] in the request extensions and a tracing span around the handler, and echoes
//!   the id on the response.
//! - [`not_found`] / [`method_not_allowed`]: fallbacks in the same JSON shape.
//! - [`Route`] + [`build_router`]: a daemon lists its routes once, marks the public ones, and
//!   tests walk the same list so no route skips authentication unnoticed.
//! - [`drain::hold_drain`]: every exchange holds a drain guard until its body is dropped.

pub mod drain;
pub mod server;
pub mod tls;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use rbee_api::{
    ErrorBody, ErrorCode, HEADER_DEADLINE_MS, HEADER_REQUEST_ID, MAX_BODY_BYTES, codes,
};
use tracing::Instrument;

/// An error response in the one JSON shape. The status comes from the code's one entry in
/// [`ErrorCode::status`]; the few call sites that answer otherwise say so with
/// [`ApiError::with_status`].
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub request_id: String,
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: status_of(code),
            code,
            message: message.into(),
            request_id: String::new(),
            retry_after: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(codes::NOT_FOUND, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(codes::INTERNAL, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            codes::UNAUTHORIZED,
            "a valid `Authorization: Bearer <token>` header is required",
        )
    }

    /// Answers with `status` instead of the code's usual one.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Adds `Retry-After: secs`.
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn with_request_id(mut self, id: &str) -> Self {
        self.request_id = id.to_owned();
        self
    }
}

/// The HTTP status of an error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The error type of a core crate, as HTTP sees it: one code (hence one status), a message
/// and maybe a `Retry-After`. Every such type becomes an [`ApiError`] the same way.
pub trait HttpError: std::fmt::Display {
    fn code(&self) -> ErrorCode;
    fn retry_after(&self) -> Option<u32> {
        None
    }
    fn to_api_error(&self) -> ApiError {
        ApiError {
            retry_after: self.retry_after(),
            ..ApiError::new(self.code(), self.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unstamped = self.request_id.is_empty().then(|| Unstamped(self.clone()));
        let body = ErrorBody::new(self.code, self.message, self.request_id);
        let mut resp = (self.status, axum::Json(body)).into_response();
        let headers = resp.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(u) = unstamped {
            resp.extensions_mut().insert(u);
        }
        resp
    }
}

/// An error rendered before its request id was known; [`request_id`] renders it again with
/// the id, so handlers may return `Err(e)` without passing the id around.
#[derive(Clone)]
struct Unstamped(ApiError);

/// The request's id, set by [`request_id`].
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// A fresh 128-bit request id in hex.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Accepts a client's id when it is short and plain (it is logged and forwarded), else makes one.
pub fn valid_request_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Middleware: request id in, span around, id echoed out.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(HEADER_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| valid_request_id(s))
        .map(str::to_owned);
    let id = given.unwrap_or_else(new_request_id);
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let mut resp = next.run(req).instrument(span).await;
    if let Some(Unstamped(e)) = resp.extensions_mut().remove::<Unstamped>() {
        resp = e.with_request_id(&id).into_response();
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(HEADER_REQUEST_ID, v);
    }
    resp
}

pub async fn not_found(req: Request) -> Response {
    let message = format!("no route for {} {}", req.method(), req.uri().path());
    drain(req).await;
    ApiError::not_found(message).into_response()
}

pub async fn method_not_allowed(req: Request) -> Response {
    let message = format!("{} is not allowed on {}", req.method(), req.uri().path());
    drain(req).await;
    ApiError::new(codes::METHOD_NOT_ALLOWED, message).into_response()
}

/// Reads a request body nobody wants (up to [`MAX_BODY_BYTES`], for at most a second), so the
/// connection stays usable: answered before its body was read, hyper would close it, and a
/// client that sent the body after the head and reuses the connection at once gets a broken
/// pipe. A body that trickles in slower is not waited for: the connection closes instead.
async fn drain(req: Request) {
    let read = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), read).await;
}

/// The bearer token a request presents, if any.
pub fn presented_bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(rbee_auth::bearer_from_header)
}

pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// Parses a JSON body; the error names the offending field.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = if path.is_empty() || path == "." {
            format!("invalid request body: {inner}")
        } else {
            format!("invalid request body: `{path}`: {inner}")
        };
        ApiError::new(codes::INVALID_JSON, msg)
    })
}

/// A request body as axum read it: 413 over [`MAX_BODY_BYTES`], 400 when it could not be read.
pub fn read_body(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                codes::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(
                codes::INVALID_JSON,
                format!("cannot read the body: {}", e.body_text()),
            )
        }
    })
}

/// The one JSON-body reader of every daemon: 413 over the limit, 415 without the JSON content
/// type, 400 naming the field that does not parse.
pub fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let body = read_body(body)?;
    parse_json_request(headers, &body)
}

/// Checks the content type, then parses.
pub fn parse_json_request<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    require_json(headers)?;
    parse_json(body)
}

/// A JSON request's body as axum read it ([`read_body`]), refused with 415 without the JSON
/// content type (a browser's cross-site form post cannot send that type without a preflight).
pub fn read_json_body(
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    let body = read_body(body)?;
    require_json(headers)?;
    Ok(body)
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    if is_json(headers) {
        Ok(())
    } else {
        Err(ApiError::new(
            codes::INVALID_CONTENT_TYPE,
            "expected `Content-Type: application/json`",
        ))
    }
}

/// `X-Deadline-Ms` as an instant and the milliseconds left (negative when already past).
/// A deadline too far away to represent is no deadline at all.
pub fn parse_deadline(headers: &HeaderMap) -> Result<Option<(Instant, i64)>, String> {
    let Some(v) = headers.get(HEADER_DEADLINE_MS) else {
        return Ok(None);
    };
    let ms: i64 = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| "`X-Deadline-Ms` must be unix time in milliseconds".to_owned())?;
    let left = ms.saturating_sub(unix_ms());
    Ok(Instant::now()
        .checked_add(Duration::from_millis(left.max(0) as u64))
        .map(|at| (at, left)))
}

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One route of a daemon's API.
pub struct Route<S> {
    pub method: &'static str,
    pub path: &'static str,
    /// Served without a token (`/health`, usually `/metrics`).
    pub public: bool,
    pub handler: MethodRouter<S>,
}

/// Builds the router from a route table: public routes as they are, the rest wrapped by
/// `protect` (which adds the auth `route_layer`, so unknown paths still get the JSON 404),
/// JSON fallbacks, request ids.
pub fn build_router<S>(
    routes: Vec<Route<S>>,
    protect: impl FnOnce(Router<S>) -> Router<S>,
) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let mut public = Router::new();
    let mut protected = Router::new();
    for r in routes {
        if r.public {
            public = public.route(r.path, r.handler);
        } else {
            protected = protected.route(r.path, r.handler);
        }
    }
    public
        .merge(protect(protected))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(request_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_get_the_request_id_stamped_by_the_layer() {
        use tower::ServiceExt;
        let app: Router = build_router(
            vec![Route {
                method: "GET",
                path: "/fail",
                public: true,
                handler: axum::routing::get(|| async {
                    Err::<(), _>(ApiError::new(codes::QUEUE_FULL, "full").retry_after(3))
                }),
            }],
            |r| r,
        );
        for path in ["/fail", "/nowhere"] {
            let req = Request::builder()
                .uri(path)
                .header(HEADER_REQUEST_ID, "rid-1")
                .body(axum::body::Body::empty())
                .unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            let retry = resp.headers().get(header::RETRY_AFTER).cloned();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .unwrap();
            let body: ErrorBody = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body.error.request_id, "rid-1", "{path}");
            if path == "/fail" {
                assert_eq!(body.error.code, codes::QUEUE_FULL);
                assert_eq!(retry.unwrap(), "3");
            }
        }
    }

    #[test]
    fn request_ids_are_plain_and_short() {
        assert!(valid_request_id("abc-123_x.y:z"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id(&"x".repeat(129)));
    }
}
