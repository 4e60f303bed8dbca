//! Response bodies with OpenAI's field names: non-streaming completions, streamed chunks, the
//! model list, and the stop-reason mapping they share.
//!
//! Every choice carries one extra field, `rbee_stop_reason` (`eos`, `max_tokens`,
//! `stop_sequence`, `cancelled`, `deadline`), next to OpenAI's coarser `finish_reason`; the SDKs
//! keep unknown fields.

use rbee_api::{StopReason, TokenLogprob, ToolCall};
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

/// OpenAI's `finish_reason` for an answer: `"tool_calls"` when it made calls, else
/// [`finish_reason`].
pub fn choice_finish_reason(stop: StopReason, called_tools: bool) -> &'static str {
    if called_tools && stop == StopReason::Eos {
        "tool_calls"
    } else {
        finish_reason(stop)
    }
}

/// `choices[].message` of a chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AssistantMessage {
    pub role: String,
    /// Null when the answer is only tool calls.
    pub content: Option<String>,
    /// Always null (OpenAI's schema requires the field): rbee's models do not refuse in a
    /// separate channel.
    pub refusal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Always empty (OpenAI's field for citations).
    #[serde(default)]
    pub annotations: Vec<Value>,
}

/// `choices[].logprobs` of a chat completion or chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
    /// Always null (see [`AssistantMessage::refusal`]).
    pub refusal: Option<Vec<TokenLogprob>>,
}

/// `choices[].logprobs` of a legacy completion: parallel arrays, one entry per token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Token → log-probability of the most likely tokens at each position.
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
    /// Offset in characters of each token in the text (of this chunk, when streaming).
    pub text_offset: Vec<u32>,
}

impl CompletionLogprobs {
    /// Appends tokens whose text starts `offset` characters into the choice's text.
    pub fn extend(&mut self, tokens: &[TokenLogprob], mut offset: u32) {
        for t in tokens {
            self.tokens.push(t.token.clone());
            self.token_logprobs.push(t.logprob);
            self.top_logprobs.push(
                t.top_logprobs
                    .iter()
                    .map(|a| (a.token.clone(), a.logprob))
                    .collect(),
            );
            self.text_offset.push(offset);
            offset = offset.saturating_add(t.token.chars().count() as u32);
        }
    }
}

/// `choices[]` of a non-streaming chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// Null unless `logprobs: true`.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: String,
    pub rbee_stop_reason: String,
}

/// A non-streaming chat completion, `object: "chat.completion"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    /// Null unless `logprobs` was asked for.
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbee_stop_reason: Option<String>,
}

/// A non-streaming legacy completion, `object: "text_completion"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One tool call in a chunk: rbee sends each call whole, in one delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ToolCallDelta {
    /// The call's position among the answer's calls.
    pub index: u32,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: rbee_api::FunctionCall,
}

/// `choices[]` of a chat chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: Delta,
    /// Null unless `logprobs: true`.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbee_stop_reason: Option<String>,
}

/// One streamed chunk: `object` is `"chat.completion.chunk"` with [`ChatChunkChoice`]s or
/// `"text_completion"` with [`CompletionChoice`]s. `usage` is present only on the usage chunk
/// (whose `choices` is empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
