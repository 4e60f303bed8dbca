//! OpenAI-compatible wire types for the queen, as pure functions and types (no HTTP, no I/O).
//!
//! The queen's `/v1/chat/completions` and `/v1/completions` handlers (and `/v1/responses`, with
//! [`ResponsesRequest`] and [`ResponsesStream`] in place of the chat types):
//!
//! 1. parse the body with [`ChatCompletionRequest::from_json`] / [`CompletionRequest::from_json`]
//!    (or any serde JSON extractor) and turn it into the worker's request with `to_inference()`;
//!    every refusal is an [`OpenAiError`] naming the parameter, answered with
//!    [`OpenAiError::status`] and [`OpenAiError::to_body`];
//! 2. send the [`rbee_api::InferenceRequest`] down to a worker;
//! 3. feed the worker's [`rbee_api::StreamEvent`]s to a [`ChunkStream`] (streaming: each call
//!    returns the `data:` payloads to send, ending with `[DONE]`) or an [`Aggregator`]
//!    (non-streaming: a [`ChatCompletion`] / [`Completion`], or the error that ended the stream).
//!
//! Errors everywhere use [`error_body`]: OpenAI's `{"error":{"message","type","param","code"}}`
//! with rbee's code in `code` and the `request_id` rbee's one shape carries. `GET /v1/models`
//! answers a [`ModelList`].
//!
//! Unknown request fields are ignored (the SDKs add fields over time); known parameters rbee
//! does not implement are refused unless given their neutral value (see [`request`]).

pub mod error;
pub mod request;
pub mod response;
pub mod responses;
pub mod schema;
pub mod stream;
mod structured;

pub use error::{
    ApiErrorBody, ApiErrorDetail, OpenAiError, error_body, error_body_from_rbee, error_type,
};
pub use request::{
    COMPLETION_DEFAULT_MAX_TOKENS, CONTENT_PART_SEPARATOR, ChatCompletionRequest, CompletionPrompt,
    CompletionRequest, ContentPart, MessageContent, RequestMessage, Stop, StreamOptions,
    parse_json,
};
pub use response::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, Chunk,
    Completion, CompletionChoice, CompletionChunk, Delta, EndpointKind, ModelCard, ModelList,
    PromptTokensDetails, Usage, chat_completion_id, completion_id, finish_reason,
};
pub use responses::{ResponseEcho, ResponseObject, ResponsesRequest, ResponsesStream, response_id};
pub use stream::{Aggregator, ChunkStream, TRUNCATED_STREAM_MESSAGE, sse_data};
