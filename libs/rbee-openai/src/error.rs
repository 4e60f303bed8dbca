//! Errors in the shape the OpenAI SDKs parse, carrying rbee's code and request id.
//!
//! OpenAI's SDKs read `error.message`, `error.type`, `error.param` and `error.code` from any
//! non-2xx body (and from a streamed `data:` line holding an `error` object). rbee's one error
//! shape is `{"error":{"code","message","request_id"}}`; the queen's OpenAI routes answer with the
//! union of both, so a client of either kind finds what it looks for:
//!
//! ```json
//! {"error":{"message":"…","type":"invalid_request_error","param":"n","code":"INVALID_PARAMETER","request_id":"…"}}
//! ```

use rbee_api::{ErrorBody, ErrorCode, codes};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The crate's one error type: a request the OpenAI layer refuses, or an upstream (worker or
/// hive) failure that a non-streaming response has to report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenAiError {
    /// The body is not JSON, or a field has the wrong JSON type. `param` is the path of the
    /// offending field when serde could tell (`"messages[0].content"`).
    #[error("{message}")]
    InvalidJson {
        param: Option<String>,
        message: String,
    },
    /// A parameter has a value the OpenAI API would refuse (`n: 2` where only 1 is served, a
    /// `tool` role, an image content part, a token-id prompt, …).
    #[error("{message}")]
    InvalidParameter { param: String, message: String },
    /// A parameter OpenAI defines but rbee does not implement was given a value that would
    /// change the output (`presence_penalty: 0.5`, `logprobs: true`, `tools: [...]`, …).
    #[error("{message}")]
    Unsupported { param: String, message: String },
    /// The worker (or the hive in front of it) failed: an `error` event, a refused request, or
    /// a stream that ended without its `end` event.
    #[error("{message}")]
    Upstream {
        status: u16,
        code: ErrorCode,
        message: String,
    },
}

impl OpenAiError {
    pub(crate) fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidParameter {
            param: param.into(),
            message: message.into(),
        }
    }

    pub(crate) fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Unsupported {
            param: param.into(),
            message: message.into(),
        }
    }

    /// An upstream failure known only by its rbee code (a worker `error` event); the HTTP status
    /// is the code's own ([`ErrorCode::status`]).
    pub fn upstream(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Upstream {
            status: code.status(),
            code,
            message: message.into(),
        }
    }

    /// A worker's or hive's error response, passed up with the status it came with.
    pub fn from_rbee(status: u16, body: &ErrorBody) -> Self {
        Self::Upstream {
            status,
            code: body.error.code,
            message: body.error.message.clone(),
        }
    }

    /// The HTTP status to answer with: 400 for everything the request got wrong.
    pub fn status(&self) -> u16 {
        match self {
            Self::InvalidJson { .. } | Self::InvalidParameter { .. } | Self::Unsupported { .. } => {
                400
            }
            Self::Upstream { status, .. } => *status,
        }
    }

    /// rbee's error code (`INVALID_JSON`, `INVALID_PARAMETER`, or the upstream's code).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidJson { .. } => codes::INVALID_JSON,
            Self::InvalidParameter { .. } | Self::Unsupported { .. } => codes::INVALID_PARAMETER,
            Self::Upstream { code, .. } => *code,
        }
    }

    /// The request parameter at fault, if any.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidJson { param, .. } => param.as_deref(),
            Self::InvalidParameter { param, .. } | Self::Unsupported { param, .. } => Some(param),
            Self::Upstream { .. } => None,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::InvalidJson { message, .. }
            | Self::InvalidParameter { message, .. }
            | Self::Unsupported { message, .. }
            | Self::Upstream { message, .. } => message,
        }
    }

    /// The response body: see [`error_body`].
    pub fn to_body(&self, request_id: &str) -> Value {
        error_body(
            self.status(),
            self.code().as_str(),
            self.message(),
            self.param(),
            request_id,
        )
    }
}

/// OpenAI's `error.type` for an HTTP status.
///
/// 400/405/413/415/422 and other 4xx → `invalid_request_error`, 401 → `authentication_error`,
/// 403 → `permission_error`, 404 → `not_found_error`, 409 → `conflict_error`,
/// 429 → `rate_limit_error`, 504 → `timeout_error`, other 5xx → `server_error`.
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        504 => "timeout_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

/// The error body of every OpenAI route:
/// `{"error":{"message","type","param","code","request_id"}}`. `param` is `null` when not given,
/// as OpenAI sends it; `type` comes from [`error_type`].
pub fn error_body(
    status: u16,
    code: &str,
    message: &str,
    param: Option<&str>,
    request_id: &str,
) -> Value {
    json!({
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": code,
            "request_id": request_id,
        }
    })
}

/// A worker's or hive's error body (rbee shape), answered to an OpenAI client with the status
/// it came with. Code, message and request id are kept as they are.
pub fn error_body_from_rbee(status: u16, body: &ErrorBody) -> Value {
    error_body(
        status,
        body.error.code.as_str(),
        &body.error.message,
        None,
        &body.error.request_id,
    )
}

/// The OpenAI error body as a type, for clients and tests that parse one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ApiErrorBody {
    pub error: ApiErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ApiErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
}
