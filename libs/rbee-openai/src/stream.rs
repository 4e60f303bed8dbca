//! Worker events → OpenAI responses: [`ChunkStream`] for `stream: true`, [`Aggregator`] for the
//! one-shot response.

use rbee_api::{SSE_DONE, StopReason, StreamEvent, codes};
use serde::Serialize;

use crate::error::{OpenAiError, error_body};
use crate::response::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, Chunk, Completion,
    CompletionChoice, Delta, EndpointKind, OBJECT_CHAT_COMPLETION, OBJECT_CHAT_COMPLETION_CHUNK,
    OBJECT_TEXT_COMPLETION, Usage, finish_reason,
};

/// The message of the error reported when a worker's stream stops without `end` or `error`.
pub const TRUNCATED_STREAM_MESSAGE: &str =
    "the worker's stream ended before its `end` event; the output is incomplete";

/// One SSE frame for a `data:` payload: `data: <payload>\n\n`.
pub fn sse_data(payload: &str) -> String {
    format!("data: {payload}\n\n")
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Plain structs of strings and integers always serialize; should that ever change, the
    // client gets an error line rather than a panic.
    serde_json::to_string(value).unwrap_or_else(|e| {
        error_body(
            500,
            codes::INTERNAL.as_str(),
            &format!("cannot serialize a chunk: {e}"),
            None,
            "",
        )
        .to_string()
    })
}

/// Turns a worker's event stream into the `data:` payloads of an OpenAI stream.
///
/// Chat: `{"delta":{"role":"assistant","content":""}}` on `started`, one
/// `{"delta":{"content":…}}` per token, `{"delta":{}}` with `finish_reason` on `end`, then
/// (with `include_usage`) a chunk with `choices: []` and `usage`, then `[DONE]`.
/// Completions: one `choices[0].text` per token, `text: ""` with `finish_reason` on `end`, the
/// usage chunk, `[DONE]`. An `error` event (or [`ChunkStream::on_failure`]) yields an OpenAI
/// error object (`{"error":{…}}`, which makes the SDKs raise) and `[DONE]`. Tokens with empty
/// text are skipped. Nothing is produced after the stream is finished.
///
/// The strings are payloads, not frames: wrap each with [`sse_data`] (or an SSE library).
#[derive(Debug, Clone)]
pub struct ChunkStream {
    id: String,
    created: u64,
    model: String,
    kind: EndpointKind,
    include_usage: bool,
    request_id: String,
    opened: bool,
    finished: bool,
}

impl ChunkStream {
    /// `id` is the completion id (see [`crate::chat_completion_id`]), `created` unix seconds,
    /// `model` the name the client asked for. The request id in error chunks is `id` until
    /// [`ChunkStream::with_request_id`] sets it.
    pub fn new(
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
        kind: EndpointKind,
        include_usage: bool,
    ) -> Self {
        let id = id.into();
        Self {
            request_id: id.clone(),
            id,
            created,
            model: model.into(),
            kind,
            include_usage,
            opened: false,
            finished: false,
        }
    }

    /// The request id error chunks carry.
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = request_id.into();
        self
    }

    pub fn kind(&self) -> EndpointKind {
        self.kind
    }

    /// True once `end`, `error` or a failure has produced `[DONE]`.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn chunk<C: Serialize>(&self, object: &str, choices: Vec<C>, usage: Option<Usage>) -> String {
        to_json(&Chunk {
            id: self.id.clone(),
            object: object.to_owned(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn chat(&self, delta: Delta, stop: Option<StopReason>) -> String {
        let choice = ChatChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: stop.map(|s| finish_reason(s).to_owned()),
            rbee_stop_reason: stop.map(|s| s.as_str().to_owned()),
        };
        self.chunk(OBJECT_CHAT_COMPLETION_CHUNK, vec![choice], None)
    }

    fn text(&self, text: &str, stop: Option<StopReason>) -> String {
        let choice = CompletionChoice {
            text: text.to_owned(),
            index: 0,
            logprobs: None,
            finish_reason: stop.map(|s| finish_reason(s).to_owned()),
            rbee_stop_reason: stop.map(|s| s.as_str().to_owned()),
        };
        self.chunk(OBJECT_TEXT_COMPLETION, vec![choice], None)
    }

    /// The chat stream's first chunk, `delta: {"role":"assistant","content":""}`; `None` for
    /// completions, which have no such chunk.
    pub fn role_chunk(&self) -> Option<String> {
        match self.kind {
            EndpointKind::Chat => Some(self.chat(
                Delta {
                    role: Some("assistant".to_owned()),
                    content: Some(String::new()),
                },
                None,
            )),
            EndpointKind::Completion => None,
        }
    }

    /// One piece of generated text.
    pub fn token_chunk(&self, text: &str) -> String {
        match self.kind {
            EndpointKind::Chat => self.chat(
                Delta {
                    role: None,
                    content: Some(text.to_owned()),
                },
                None,
            ),
            EndpointKind::Completion => self.text(text, None),
        }
    }

    /// The last choice chunk: empty delta (or text) with `finish_reason` and `rbee_stop_reason`.
    pub fn finish_chunk(&self, stop: StopReason) -> String {
        match self.kind {
            EndpointKind::Chat => self.chat(Delta::default(), Some(stop)),
            EndpointKind::Completion => self.text("", Some(stop)),
        }
    }

    /// The `include_usage` chunk: `choices: []` and `usage`.
    pub fn usage_chunk(&self, prompt_tokens: u32, completion_tokens: u32, cached: u32) -> String {
        let usage = Some(Usage::new(prompt_tokens, completion_tokens, cached));
        let object = match self.kind {
            EndpointKind::Chat => OBJECT_CHAT_COMPLETION_CHUNK,
            EndpointKind::Completion => OBJECT_TEXT_COMPLETION,
        };
        self.chunk::<ChatChunkChoice>(object, Vec::new(), usage)
    }

    /// An error as a stream line: the OpenAI error object (see [`crate::error_body`]) with this
    /// stream's request id.
    pub fn error_chunk(&self, err: &OpenAiError) -> String {
        err.to_body(&self.request_id).to_string()
    }

    /// The `[DONE]` terminator.
    pub fn done(&self) -> &'static str {
        SSE_DONE
    }

    fn open(&mut self, out: &mut Vec<String>) {
        if !self.opened {
            self.opened = true;
            out.extend(self.role_chunk());
        }
    }

    /// The payloads one worker event turns into, in order (see the type's docs).
    pub fn on_event(&mut self, ev: &StreamEvent) -> Vec<String> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        match ev {
            StreamEvent::Started { .. } => self.open(&mut out),
            StreamEvent::Token { text, .. } => {
                self.open(&mut out);
                if !text.is_empty() {
                    out.push(self.token_chunk(text));
                }
            }
            StreamEvent::End {
                stop_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                self.open(&mut out);
                out.push(self.finish_chunk(*stop_reason));
                if self.include_usage {
                    out.push(self.usage_chunk(*prompt_tokens, *completion_tokens, *cached_tokens));
                }
                out.push(SSE_DONE.to_owned());
                self.finished = true;
            }
            StreamEvent::Error { code, message } => {
                return self.on_failure(&OpenAiError::upstream(*code, message.clone()));
            }
        }
        out
    }

    /// A failure outside the event stream (the hive or worker connection broke, a retry was
    /// refused after the stream began): an error chunk and `[DONE]`, unless already finished.
    pub fn on_failure(&mut self, err: &OpenAiError) -> Vec<String> {
        if self.finished {
            return Vec::new();
        }
        self.finished = true;
        vec![self.error_chunk(err), SSE_DONE.to_owned()]
    }

    /// The worker's stream ended: nothing if it had finished, else a `WORKER_UNAVAILABLE` error
    /// chunk and `[DONE]`, so a cut stream is never mistaken for a complete answer.
    pub fn on_upstream_eof(&mut self) -> Vec<String> {
        self.on_failure(&OpenAiError::upstream(
            codes::WORKER_UNAVAILABLE,
            TRUNCATED_STREAM_MESSAGE,
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ended {
    stop: StopReason,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_tokens: u32,
}

/// Collects a worker's events into one non-streaming response. The first `end` or `error`
/// settles it; later events are ignored. An `error` event, a [`Aggregator::fail`], or a stream
/// that never ended make the `into_*` methods return the error.
#[derive(Debug, Clone, Default)]
pub struct Aggregator {
    text: String,
    outcome: Option<Result<Ended, OpenAiError>>,
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, ev: &StreamEvent) {
        if self.outcome.is_some() {
            return;
        }
        match ev {
            StreamEvent::Started { .. } => {}
            StreamEvent::Token { text, .. } => self.text.push_str(text),
            StreamEvent::End {
                stop_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                self.outcome = Some(Ok(Ended {
                    stop: *stop_reason,
                    prompt_tokens: *prompt_tokens,
                    completion_tokens: *completion_tokens,
                    cached_tokens: *cached_tokens,
                }));
            }
            StreamEvent::Error { code, message } => {
                self.outcome = Some(Err(OpenAiError::upstream(*code, message.clone())));
            }
        }
    }

    /// A failure outside the event stream; ignored once `end` or `error` arrived.
    pub fn fail(&mut self, err: OpenAiError) {
        if self.outcome.is_none() {
            self.outcome = Some(Err(err));
        }
    }

    /// True once `end`, `error` or a failure arrived.
    pub fn is_done(&self) -> bool {
        self.outcome.is_some()
    }

    /// The text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn settle(self) -> Result<(String, Ended), OpenAiError> {
        match self.outcome {
            Some(Ok(end)) => Ok((self.text, end)),
            Some(Err(e)) => Err(e),
            None => Err(OpenAiError::upstream(
                codes::WORKER_UNAVAILABLE,
                TRUNCATED_STREAM_MESSAGE,
            )),
        }
    }

    /// The `chat.completion`, or the error that ended the stream.
    pub fn into_chat_completion(
        self,
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
    ) -> Result<ChatCompletion, OpenAiError> {
        let (content, end) = self.settle()?;
        Ok(ChatCompletion {
            id: id.into(),
            object: OBJECT_CHAT_COMPLETION.to_owned(),
            created,
            model: model.into(),
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant".to_owned(),
                    content,
                    refusal: None,
                },
                logprobs: None,
                finish_reason: finish_reason(end.stop).to_owned(),
                rbee_stop_reason: end.stop.as_str().to_owned(),
            }],
            usage: Usage::new(end.prompt_tokens, end.completion_tokens, end.cached_tokens),
        })
    }

    /// The `text_completion`, or the error that ended the stream.
    pub fn into_completion(
        self,
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
    ) -> Result<Completion, OpenAiError> {
        let (text, end) = self.settle()?;
        Ok(Completion {
            id: id.into(),
            object: OBJECT_TEXT_COMPLETION.to_owned(),
            created,
            model: model.into(),
            choices: vec![CompletionChoice {
                text,
                index: 0,
                logprobs: None,
                finish_reason: Some(finish_reason(end.stop).to_owned()),
                rbee_stop_reason: Some(end.stop.as_str().to_owned()),
            }],
            usage: Usage::new(end.prompt_tokens, end.completion_tokens, end.cached_tokens),
        })
    }
}
