//! Wire types shared by every rbee daemon.
//!
//! One error body for every HTTP error (`{"error":{"code","message","request_id"}}`), the
//! worker's inference request, and the SSE events a worker streams (`started` → `token`… →
//! `end` | `error`, then `[DONE]`). Only serde lives here: no HTTP framework, no engine.

use serde::{Deserialize, Serialize};

/// Header carrying the request id on every hop.
pub const HEADER_REQUEST_ID: &str = "x-request-id";
/// Absolute deadline in unix milliseconds, set by the queen, honoured by every hop.
pub const HEADER_DEADLINE_MS: &str = "x-deadline-ms";
/// Relative timeout in seconds a client may send to the queen.
pub const HEADER_REQUEST_TIMEOUT: &str = "x-request-timeout";
/// The SSE data line that closes every stream.
pub const SSE_DONE: &str = "[DONE]";
/// Largest request body any rbee daemon accepts.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Stable error codes; the HTTP status is chosen by the daemon that raises them.
/// `docs/TROUBLESHOOTING.md` explains each one (a test keeps the two in step).
pub mod codes {
    macro_rules! codes {
        ($($name:ident),* $(,)?) => {
            $(pub const $name: &str = stringify!($name);)*
            /// Every code a daemon may answer with.
            pub const ALL: &[&str] = &[$($name),*];
        };
    }
    codes!(
        INVALID_JSON,
        INVALID_CONTENT_TYPE,
        INVALID_PARAMETER,
        CONTEXT_LENGTH_EXCEEDED,
        PAYLOAD_TOO_LARGE,
        UNAUTHORIZED,
        FORBIDDEN,
        NOT_FOUND,
        METHOD_NOT_ALLOWED,
        ALL_SLOTS_BUSY,
        MODEL_LOADING,
        SHUTTING_DOWN,
        DEADLINE_EXCEEDED,
        INFERENCE_FAILED,
        INTERNAL,
        INSUFFICIENT_RESOURCES,
        MODEL_NOT_FOUND,
        MODEL_IN_USE,
        INVALID_MODEL_REF,
        WORKER_NOT_READY,
        WORKER_UNAVAILABLE,
        QUEUE_FULL,
        CLIENT_LIMIT,
        CANCELLED,
        NO_CAPACITY,
        MODEL_NOT_SERVED,
        OUTSIDE_MODEL_DIRS,
        AMBIGUOUS_MODEL_FILE,
        HUB_UNAUTHORIZED,
        HUB_UNAVAILABLE,
        CHECKSUM_MISMATCH,
        INSUFFICIENT_DISK,
        DOWNLOAD_IN_PROGRESS,
        INVALID_GGUF,
        INVALID_CONFIG,
        IO,
    );
}

/// The one error body every daemon returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    pub request_id: String,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>, request_id: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                request_id: request_id.into(),
            },
        }
    }
}

/// One chat message. Content is plain text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// `POST /v1/inference` on a worker. Exactly one of `prompt` and `messages` is given; every
/// sampling field is optional and validated by the worker against its model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_window: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxTokens,
    StopSequence,
    Cancelled,
    Deadline,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::MaxTokens => "max_tokens",
            StopReason::StopSequence => "stop_sequence",
            StopReason::Cancelled => "cancelled",
            StopReason::Deadline => "deadline",
        }
    }
}

/// Where the time of one generation went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Timings {
    /// Waiting for the engine thread.
    pub queue_ms: f64,
    /// Reading the prompt (prefill) up to the first sampled token.
    pub prefill_ms: f64,
    /// Generating every token after the first.
    pub decode_ms: f64,
    /// From request accepted to first token produced.
    pub ttft_ms: f64,
    pub total_ms: f64,
}

/// One event of a worker's token stream, one per SSE `data:` line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    Started {
        request_id: String,
        model: String,
        prompt_tokens: u32,
    },
    Token {
        /// Index of the generated token that completed this text (0-based).
        index: u32,
        text: String,
    },
    End {
        stop_reason: StopReason,
        prompt_tokens: u32,
        completion_tokens: u32,
        timings: Timings,
    },
    Error {
        code: String,
        message: String,
    },
}

/// A GPU as a hive reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GpuInfo {
    /// `cuda:N` or `metal:0`: the device string a spawn request names.
    pub device: String,
    pub name: String,
    pub vram_total_bytes: u64,
    pub vram_free_bytes: u64,
}

/// A node's capacity, as `GET /v1/resources` and heartbeats carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NodeResources {
    pub cpu_cores: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub gpus: Vec<GpuInfo>,
    /// Free space where downloads land.
    pub model_disk_free_bytes: u64,
}

/// One worker in a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HeartbeatWorker {
    pub id: String,
    /// The model reference the worker was spawned with.
    pub model: String,
    pub device: String,
    /// `starting`, `ready`, `stopping`, `backoff` or `failed`.
    pub state: String,
    pub busy: bool,
}

/// What a hive POSTs to the queen's `/v1/hives/heartbeat` every few seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HiveHeartbeat {
    pub hive_id: String,
    /// Where the queen reaches this hive.
    pub url: String,
    pub version: String,
    pub resources: NodeResources,
    pub workers: Vec<HeartbeatWorker>,
    /// Model references on disk (`hf:org/repo:file` or `file:path`).
    pub models: Vec<String>,
    /// SHA-256 of each model file, by reference, once the hive has hashed it.
    #[serde(default)]
    pub model_sha256: std::collections::BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_the_one_shape() {
        let body = ErrorBody::new(codes::ALL_SLOTS_BUSY, "busy", "r1");
        let v = serde_json::to_value(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error":{"code":"ALL_SLOTS_BUSY","message":"busy","request_id":"r1"}})
        );
    }

    #[test]
    fn events_are_tagged_by_type() {
        let e = StreamEvent::Token {
            index: 3,
            text: "hi".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"token","index":3,"text":"hi"}"#
        );
        let end: StreamEvent = serde_json::from_str(
            r#"{"type":"end","stop_reason":"max_tokens","prompt_tokens":1,"completion_tokens":2,
               "timings":{"queue_ms":0,"prefill_ms":1,"decode_ms":2,"ttft_ms":1,"total_ms":3}}"#,
        )
        .unwrap();
        assert!(matches!(
            end,
            StreamEvent::End {
                stop_reason: StopReason::MaxTokens,
                ..
            }
        ));
    }

    #[test]
    fn unknown_request_fields_are_rejected() {
        let r: Result<InferenceRequest, _> =
            serde_json::from_str(r#"{"prompt":"x","max_token":3}"#);
        assert!(r.unwrap_err().to_string().contains("max_token"));
    }
}
