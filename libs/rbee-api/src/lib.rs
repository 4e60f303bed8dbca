//! Wire types shared by every rbee daemon.
//!
//! One error body for every HTTP error (`{"error":{"code","message","request_id"}}`), the
//! worker's inference request, and the SSE events a worker streams (`started` → `token`… →
//! `end` | `error`, then `[DONE]`). Only serde lives here: no HTTP framework, no engine.

use serde::{Deserialize, Serialize};

pub mod lenient;
pub mod sse;
pub mod worker;

pub use worker::WorkerState;

/// Header carrying the request id on every hop.
pub const HEADER_REQUEST_ID: &str = "x-request-id";
/// Absolute deadline in unix milliseconds, set by the queen, honoured by every hop.
pub const HEADER_DEADLINE_MS: &str = "x-deadline-ms";
/// Relative timeout in seconds a client may send to the queen.
pub const HEADER_REQUEST_TIMEOUT: &str = "x-request-timeout";
/// A request's priority among its own client's waiting requests (lower first; -100..=100).
pub const HEADER_REQUEST_PRIORITY: &str = "x-request-priority";
/// The SSE data line that closes every stream.
pub const SSE_DONE: &str = "[DONE]";
/// Most answers one request may ask for (`n`).
pub const MAX_CHOICES: u32 = 16;
/// Largest request body any rbee daemon accepts.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Stable error codes, each with the one HTTP status it is answered with (a handful of
/// documented call sites answer otherwise with `rbee_http::ApiError::with_status`).
/// `docs/TROUBLESHOOTING.md` explains each one (a test keeps the two in step).
macro_rules! error_codes {
    ($($variant:ident = $name:ident => $status:literal),* $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum ErrorCode {
            $($variant,)*
        }

        impl ErrorCode {
            /// Every code a daemon may answer with.
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The code as it appears on the wire (`NO_CAPACITY`).
            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => stringify!($name),)* }
            }

            /// The HTTP status this code is answered with.
            pub const fn status(self) -> u16 {
                match self { $(ErrorCode::$variant => $status,)* }
            }

            /// The code a wire string names, if any.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $(stringify!($name) => Some(ErrorCode::$variant),)* _ => None }
            }
        }

        /// The codes under their wire names, for call sites that read like the docs.
        pub mod codes {
            use super::ErrorCode;
            $(pub const $name: ErrorCode = ErrorCode::$variant;)*
            /// Every code a daemon may answer with.
            pub const ALL: &[ErrorCode] = ErrorCode::ALL;
        }
    };
}

error_codes!(
    InvalidJson = INVALID_JSON => 400,
    InvalidContentType = INVALID_CONTENT_TYPE => 415,
    InvalidParameter = INVALID_PARAMETER => 400,
    ContextLengthExceeded = CONTEXT_LENGTH_EXCEEDED => 400,
    PayloadTooLarge = PAYLOAD_TOO_LARGE => 413,
    Unauthorized = UNAUTHORIZED => 401,
    Forbidden = FORBIDDEN => 403,
    NotFound = NOT_FOUND => 404,
    MethodNotAllowed = METHOD_NOT_ALLOWED => 405,
    AllSlotsBusy = ALL_SLOTS_BUSY => 503,
    ModelLoading = MODEL_LOADING => 503,
    ShuttingDown = SHUTTING_DOWN => 503,
    DeadlineExceeded = DEADLINE_EXCEEDED => 504,
    InferenceFailed = INFERENCE_FAILED => 500,
    Internal = INTERNAL => 500,
    InsufficientResources = INSUFFICIENT_RESOURCES => 507,
    ModelNotFound = MODEL_NOT_FOUND => 404,
    ModelInUse = MODEL_IN_USE => 409,
    InvalidModelRef = INVALID_MODEL_REF => 400,
    WorkerNotReady = WORKER_NOT_READY => 503,
    WorkerUnavailable = WORKER_UNAVAILABLE => 502,
    QueueFull = QUEUE_FULL => 429,
    ClientLimit = CLIENT_LIMIT => 429,
    BudgetExhausted = BUDGET_EXHAUSTED => 429,
    ModelNotAllowed = MODEL_NOT_ALLOWED => 403,
    Cancelled = CANCELLED => 499,
    NoCapacity = NO_CAPACITY => 503,
    ModelNotServed = MODEL_NOT_SERVED => 404,
    OutsideModelDirs = OUTSIDE_MODEL_DIRS => 400,
    AmbiguousModelFile = AMBIGUOUS_MODEL_FILE => 400,
    HubUnauthorized = HUB_UNAUTHORIZED => 502,
    HubUnavailable = HUB_UNAVAILABLE => 502,
    ChecksumMismatch = CHECKSUM_MISMATCH => 502,
    InsufficientDisk = INSUFFICIENT_DISK => 507,
    DownloadInProgress = DOWNLOAD_IN_PROGRESS => 409,
    InvalidGguf = INVALID_GGUF => 422,
    InvalidConfig = INVALID_CONFIG => 500,
    Io = IO => 500,
    HiveIdTaken = HIVE_ID_TAKEN => 409,
    HiveLimit = HIVE_LIMIT => 503,
);

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<ErrorCode> for String {
    fn from(c: ErrorCode) -> String {
        c.as_str().to_owned()
    }
}

/// The one error body every daemon returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    pub request_id: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>, request_id: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
                request_id: request_id.into(),
            },
        }
    }
}

/// One chat message. Content is plain text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    #[schemars(extend("enum" = ["system", "user", "assistant", "tool"]))]
    pub role: String,
    pub content: String,
    /// An assistant's earlier tool calls, in OpenAI's shape
    /// (`{"id","type":"function","function":{"name","arguments"}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// On a `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// On a `tool` message: the function that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A function the model may call (OpenAI's `{"type":"function","function":{…}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Tool {
    #[serde(rename = "type")]
    #[schemars(extend("const" = "function"))]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FunctionDef {
    #[schemars(pattern(r"^[A-Za-z0-9_.-]{1,64}$"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of the arguments object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    /// Accepted for OpenAI compatibility; arguments are always constrained when a call is
    /// forced (`tool_choice` `required` or a named function).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON text.
    pub arguments: String,
}

/// Whether and which tools the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides (text or calls).
    Auto,
    /// No calls: tools are not shown to the model.
    None,
    /// At least one call, arguments constrained by each function's schema.
    Required,
    /// Exactly this function, arguments constrained by its schema.
    Function(String),
}

/// A grammar the answer must follow (constrained decoding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Grammar {
    /// Any JSON object.
    JsonObject,
    /// JSON valid under `schema`.
    JsonSchema { schema: serde_json::Value },
    /// A grammar in llguidance's Lark syntax (it may embed `%json { … }`).
    Lark { grammar: String },
    /// A regular expression the whole answer matches.
    Regex { pattern: String },
}

/// One generated token's log-probability, in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position, best first (as many as asked for).
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// `POST /v1/inference` on a worker. Exactly one of `prompt` and `messages` is given; every
/// sampling field is optional and validated by the worker against its model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::lenient::opt_u32"
    )]
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0))]
    pub top_p: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::lenient::opt_u32"
    )]
    #[schemars(range(max = 4294967295u32))]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0), extend("exclusiveMaximum" = 1))]
    pub min_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10.0), extend("exclusiveMinimum" = 0))]
    pub repetition_penalty: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::lenient::opt_u32"
    )]
    #[schemars(range(max = 4294967295u32))]
    pub repetition_window: Option<u32>,
    /// OpenAI's presence penalty over the generated tokens, [-2, 2].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub presence_penalty: Option<f64>,
    /// OpenAI's frequency penalty over the generated tokens, [-2, 2].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub frequency_penalty: Option<f64>,
    /// Added to token logits before sampling: token id (as a string, OpenAI's form) → bias in
    /// [-100, 100]; at most 300 entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 300, "propertyNames" = {"pattern": "^[0-9]{1,9}$"}, "additionalProperties" = {"type": "number", "minimum": -100, "maximum": 100}))]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::lenient::opt_u64"
    )]
    #[schemars(range(min = 0, max = 18446744073709551615u64))]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8), extend("items" = {"type": "string", "minLength": 1, "maxLength": 128}))]
    pub stop: Option<Vec<String>>,
    /// Report each token's log-probability with this many alternatives (0–20).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::lenient::opt_u32"
    )]
    #[schemars(range(max = 20))]
    pub logprobs: Option<u32>,
    /// Answers generated from the one prompt (1–16), as parallel sequences while slots are
    /// free; their events carry `choice`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::lenient::opt_u32"
    )]
    #[schemars(range(min = 1, max = 16))]
    pub n: Option<u32>,
    /// The answer must follow this grammar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar: Option<Grammar>,
    /// Functions the model may call (chat only); calls come back as a `tool_calls` event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub tools: Option<Vec<Tool>>,
    /// `auto` when tools are given and this is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Whether several calls may come in one answer (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
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
        /// Which answer (with `n` > 1).
        #[serde(default, skip_serializing_if = "is_zero")]
        choice: u32,
        /// The log-probabilities of the tokens this text comes from (when asked for).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        logprobs: Vec<TokenLogprob>,
    },
    /// The tool calls of one answer, parsed from its output (sent before its end).
    ToolCalls {
        #[serde(default, skip_serializing_if = "is_zero")]
        choice: u32,
        calls: Vec<ToolCall>,
    },
    /// One answer of several (`n` > 1) is over; `end` follows the last.
    ChoiceEnd {
        choice: u32,
        stop_reason: StopReason,
        completion_tokens: u32,
    },
    End {
        /// The first answer's (with `n` > 1, `choice_end` has each one's).
        stop_reason: StopReason,
        prompt_tokens: u32,
        /// All answers together.
        completion_tokens: u32,
        /// Prompt tokens whose attention state was reused from an earlier request.
        #[serde(default)]
        cached_tokens: u32,
        timings: Timings,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
    pub state: WorkerState,
    pub busy: bool,
    /// Requests the worker serves at once.
    #[serde(default = "one_slot")]
    pub slots: u32,
}

fn one_slot() -> u32 {
    1
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

/// The queen's answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HeartbeatAnswer {
    pub hive_id: String,
    /// Routed to; false while a new hive waits for an admin's approval.
    pub approved: bool,
    /// A URL this hive reported that waits for an admin; the queen still calls the old one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_url: Option<String>,
    /// Sent once, when the queen binds the hive's id: the hive presents it instead of the
    /// join token in every later heartbeat (keep it like a password; the queen stores only its
    /// hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// Sent with `credential`: the token the queen presents to this hive from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queen_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_the_one_shape() {
        let body = ErrorBody::new(codes::ALL_SLOTS_BUSY, "busy", "r1");
        assert_eq!(
            ErrorCode::parse("ALL_SLOTS_BUSY"),
            Some(codes::ALL_SLOTS_BUSY)
        );
        assert_eq!(codes::ALL_SLOTS_BUSY.status(), 503);
        for c in ErrorCode::ALL {
            // serde's spelling and the documented one are the same string.
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
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
            choice: 0,
            logprobs: vec![],
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
