//! Response bodies with OpenAI's field names: non-streaming completions, streamed chunks, the
//! model list, and the stop-reason mapping they share.
//!
//! Every choice carries one extra field, `rbee_stop_reason` (`eos`, `max_tokens`,
//! `stop_sequence`, `cancelled`, `deadline`), next to OpenAI's coarser `finish_reason`; the SDKs
//! keep unknown fields.

use rbee_api::StopReason;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const OBJECT_CHAT_COMPLETION: &str = "chat.completion";
pub const OBJECT_CHAT_COMPLETION_CHUNK: &str = "chat.completion.chunk";
pub const OBJECT_TEXT_COMPLETION: &str = "text_completion";
pub const OBJECT_LIST: &str = "list";
pub const OBJECT_MODEL: &str = "model";
pub const OWNED_BY: &str = "rbee";

/// OpenAI's `finish_reason` for a worker's stop reason: `eos`, `stop_sequence` and `cancelled`
/// → `"stop"`; `max_tokens` and `deadline` → `"length"` (the output was cut short by a limit).
pub fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Eos | StopReason::StopSequence | StopReason::Cancelled => "stop",
        StopReason::MaxTokens | StopReason::Deadline => "length",
    }
}

/// The `id` of a chat completion for a request id: `chatcmpl-<request id>`.
pub fn chat_completion_id(request_id: &str) -> String {
    format!("chatcmpl-{request_id}")
}

/// The `id` of a legacy completion for a request id: `cmpl-<request id>`.
pub fn completion_id(request_id: &str) -> String {
    format!("cmpl-{request_id}")
}

/// Which OpenAI endpoint a response answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointKind {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completion,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    #[serde(default)]
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`: how much of the prompt came from the prefix cache.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32, cached_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// `choices[].message` of a chat completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
    /// Always null (OpenAI's schema requires the field): rbee's models do not refuse in a
    /// separate channel.
    pub refusal: Option<String>,
}

/// `choices[]` of a non-streaming chat completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// Always null: rbee returns no log probabilities.
    pub logprobs: Option<Value>,
    pub finish_reason: String,
    pub rbee_stop_reason: String,
}

/// A non-streaming chat completion, `object: "chat.completion"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// `choices[]` of a legacy completion, streamed or not. `finish_reason` is null on every chunk
/// but the last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    /// Always null: rbee returns no log probabilities.
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbee_stop_reason: Option<String>,
}

/// A non-streaming legacy completion, `object: "text_completion"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

/// `choices[].delta` of a chat chunk; `{}` on the last one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `choices[]` of a chat chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: Delta,
    /// Always null: rbee returns no log probabilities.
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbee_stop_reason: Option<String>,
}

/// One streamed chunk: `object` is `"chat.completion.chunk"` with [`ChatChunkChoice`]s or
/// `"text_completion"` with [`CompletionChoice`]s. `usage` is present only on the usage chunk
/// (whose `choices` is empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Chunk<C> {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

pub type ChatCompletionChunk = Chunk<ChatChunkChoice>;
pub type CompletionChunk = Chunk<CompletionChoice>;

/// `GET /v1/models`: `{"object":"list","data":[…]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

impl ModelList {
    pub fn new(data: Vec<ModelCard>) -> Self {
        Self {
            object: OBJECT_LIST.to_owned(),
            data,
        }
    }
}

/// One model of `GET /v1/models`. `rbee` is free for the queen to fill, e.g.
/// `{"state":"loaded"|"on_disk"|"configured","hives":[…]}`; it is left out when `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub owned_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbee: Option<Value>,
}

impl ModelCard {
    /// A card owned by `"rbee"` without extension fields.
    pub fn new(id: impl Into<String>, created: u64) -> Self {
        Self {
            id: id.into(),
            object: OBJECT_MODEL.to_owned(),
            created,
            owned_by: OWNED_BY.to_owned(),
            rbee: None,
        }
    }

    pub fn with_rbee(mut self, rbee: Value) -> Self {
        self.rbee = Some(rbee);
        self
    }
}
