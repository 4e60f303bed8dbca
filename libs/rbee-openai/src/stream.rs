//! Worker events → OpenAI responses: [`ChunkStream`] for `stream: true`, [`Aggregator`] for the
//! one-shot response.

use rbee_api::{SSE_DONE, StopReason, StreamEvent, TokenLogprob, ToolCall, codes};
use serde::Serialize;

use crate::error::{OpenAiError, error_body};
use crate::response::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatLogprobs, Chunk, Completion,
    CompletionChoice, CompletionLogprobs, Delta, EndpointKind, OBJECT_CHAT_COMPLETION,
    OBJECT_CHAT_COMPLETION_CHUNK, OBJECT_TEXT_COMPLETION, ToolCallDelta, Usage,
    choice_finish_reason,
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
/// Chat: `{"delta":{"role":"assistant","content":""}}` per choice on `started`, one
/// `{"delta":{"content":…}}` per token (with `logprobs` when asked for), one
/// `{"delta":{"tool_calls":[…]}}` with an answer's calls (each call whole), `{"delta":{}}` with
/// `finish_reason` when an answer ends, then (with `include_usage`) a chunk with `choices: []`
/// and `usage`, then `[DONE]`. Completions: one `choices[i].text` per token, `text: ""` with
/// `finish_reason` at each answer's end, the usage chunk, `[DONE]`. An `error` event (or
/// [`ChunkStream::on_failure`]) yields an OpenAI error object (`{"error":{…}}`, which makes the
/// SDKs raise) and `[DONE]`. Nothing is produced after the stream is finished.
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
    choices: Vec<ChoiceState>,
    finished: bool,
}

/// Where one answer of a stream stands.
#[derive(Debug, Clone, Copy, Default)]
struct ChoiceState {
    opened: bool,
    ended: bool,
    /// Tool calls sent so far.
    calls: u32,
    /// Characters of text sent so far (completion log-probability offsets).
    chars: u32,
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
            choices: vec![ChoiceState::default()],
            finished: false,
        }
    }

    /// The request id error chunks carry.
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = request_id.into();
        self
    }

    /// How many answers the request asked for (`n`, default 1).
    pub fn with_choices(mut self, n: usize) -> Self {
        self.choices = vec![ChoiceState::default(); n.max(1)];
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

    fn chat(
        &self,
        index: u32,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        stop: Option<(StopReason, bool)>,
    ) -> String {
        let choice = ChatChunkChoice {
            index,
            delta,
            logprobs,
            finish_reason: stop.map(|(s, called)| choice_finish_reason(s, called).to_owned()),
            rbee_stop_reason: stop.map(|(s, _)| s.as_str().to_owned()),
        };
        self.chunk(OBJECT_CHAT_COMPLETION_CHUNK, vec![choice], None)
    }

    fn text(
        &self,
        index: u32,
        text: &str,
        logprobs: Option<CompletionLogprobs>,
        stop: Option<StopReason>,
    ) -> String {
        let choice = CompletionChoice {
            text: text.to_owned(),
            index,
            logprobs,
            finish_reason: stop.map(|s| choice_finish_reason(s, false).to_owned()),
            rbee_stop_reason: stop.map(|s| s.as_str().to_owned()),
        };
        self.chunk(OBJECT_TEXT_COMPLETION, vec![choice], None)
    }

    /// The chat stream's first chunk of an answer, `delta: {"role":"assistant","content":""}`;
    /// `None` for completions, which have no such chunk.
    pub fn role_chunk(&self, index: u32) -> Option<String> {
        match self.kind {
            EndpointKind::Chat => Some(self.chat(
                index,
                Delta {
                    role: Some("assistant".to_owned()),
                    content: Some(String::new()),
                    tool_calls: None,
                },
                None,
                None,
            )),
            EndpointKind::Completion => None,
        }
    }

    /// One piece of generated text of answer `index`, with its tokens' log-probabilities.
    pub fn token_chunk(&mut self, index: u32, text: &str, logprobs: &[TokenLogprob]) -> String {
        let state = self.state(index);
        let offset = state.chars;
        state.chars = state.chars.saturating_add(text.chars().count() as u32);
        match self.kind {
            EndpointKind::Chat => {
                let lp = (!logprobs.is_empty()).then(|| ChatLogprobs {
                    content: logprobs.to_vec(),
                    refusal: None,
                });
                let delta = Delta {
                    content: Some(text.to_owned()),
                    ..Delta::default()
                };
                self.chat(index, delta, lp, None)
            }
            EndpointKind::Completion => {
                let lp = (!logprobs.is_empty()).then(|| {
                    let mut l = CompletionLogprobs::default();
                    l.extend(logprobs, offset);
                    l
                });
                self.text(index, text, lp, None)
            }
        }
    }

    /// An answer's tool calls, whole, in one delta.
    pub fn tool_calls_chunk(&mut self, index: u32, calls: &[ToolCall]) -> String {
        let state = self.state(index);
        let first = state.calls;
        state.calls = state.calls.saturating_add(calls.len() as u32);
        let deltas = calls
            .iter()
            .enumerate()
            .map(|(i, c)| ToolCallDelta {
                index: first + i as u32,
                id: c.id.clone(),
                kind: c.kind.clone(),
                function: c.function.clone(),
            })
            .collect();
        let delta = Delta {
            tool_calls: Some(deltas),
            ..Delta::default()
        };
        self.chat(index, delta, None, None)
    }

    /// The last chunk of an answer: empty delta (or text) with `finish_reason` and
    /// `rbee_stop_reason`.
    pub fn finish_chunk(&mut self, index: u32, stop: StopReason) -> String {
        let state = self.state(index);
        state.ended = true;
        let called = state.calls > 0;
        match self.kind {
            EndpointKind::Chat => self.chat(index, Delta::default(), None, Some((stop, called))),
            EndpointKind::Completion => self.text(index, "", None, Some(stop)),
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

    fn state(&mut self, index: u32) -> &mut ChoiceState {
        let i = index as usize;
        if i >= self.choices.len() {
            self.choices.resize(i + 1, ChoiceState::default());
        }
        &mut self.choices[i]
    }

    fn open(&mut self, index: u32, out: &mut Vec<String>) {
        if !self.state(index).opened {
            self.state(index).opened = true;
            out.extend(self.role_chunk(index));
        }
    }

    /// The payloads one worker event turns into, in order (see the type's docs).
    pub fn on_event(&mut self, ev: &StreamEvent) -> Vec<String> {
        let mut out = Vec::new();
        if self.finished || beyond_choices(ev) {
            return out;
        }
        match ev {
            StreamEvent::Started { .. } => {
                for i in 0..self.choices.len() {
                    self.open(i as u32, &mut out);
                }
            }
            StreamEvent::Token {
                text,
                choice,
                logprobs,
                ..
            } => {
                self.open(*choice, &mut out);
                if !text.is_empty() || !logprobs.is_empty() {
                    out.push(self.token_chunk(*choice, text, logprobs));
                }
            }
            StreamEvent::ToolCalls { choice, calls } => {
                self.open(*choice, &mut out);
                if self.kind == EndpointKind::Chat && !calls.is_empty() {
                    out.push(self.tool_calls_chunk(*choice, calls));
                }
            }
            StreamEvent::ChoiceEnd {
                choice,
                stop_reason,
                ..
            } => {
                self.open(*choice, &mut out);
                out.push(self.finish_chunk(*choice, *stop_reason));
            }
            StreamEvent::End {
                stop_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                for i in 0..self.choices.len() as u32 {
                    if !self.choices[i as usize].ended {
                        self.open(i, &mut out);
                        out.push(self.finish_chunk(i, *stop_reason));
                    }
                }
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

/// An event for an answer no request can ask for (a worker gone wrong): ignored.
fn beyond_choices(ev: &StreamEvent) -> bool {
    let choice = match ev {
        StreamEvent::Token { choice, .. }
        | StreamEvent::ToolCalls { choice, .. }
        | StreamEvent::ChoiceEnd { choice, .. } => *choice,
        _ => 0,
    };
    choice >= rbee_api::MAX_CHOICES
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Ended {
    stop: StopReason,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_tokens: u32,
    total_ms: f64,
}

/// One answer as it is collected.
#[derive(Debug, Clone, Default)]
struct Collected {
    text: String,
    logprobs: Vec<TokenLogprob>,
    calls: Vec<ToolCall>,
    stop: Option<StopReason>,
}

/// One finished answer.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub calls: Vec<ToolCall>,
    pub stop: StopReason,
}

/// Collects a worker's events into one non-streaming response. The first `end` or `error`
/// settles it; later events are ignored. An `error` event, a [`Aggregator::fail`], or a stream
/// that never ended make the `into_*` methods return the error.
#[derive(Debug, Clone)]
pub struct Aggregator {
    choices: Vec<Collected>,
    logprobs: bool,
    outcome: Option<Result<Ended, OpenAiError>>,
}

impl Default for Aggregator {
    fn default() -> Self {
        Self::new()
    }
}

impl Aggregator {
    pub fn new() -> Self {
        Self {
            choices: vec![Collected::default()],
            logprobs: false,
            outcome: None,
        }
    }

    /// Whether the client asked for log-probabilities (the response then carries them, even
    /// for an empty answer).
    pub fn with_logprobs(mut self, on: bool) -> Self {
        self.logprobs = on;
        self
    }

    fn choice(&mut self, index: u32) -> &mut Collected {
        let i = index as usize;
        if i >= self.choices.len() {
            self.choices.resize(i + 1, Collected::default());
        }
        &mut self.choices[i]
    }

    pub fn push(&mut self, ev: &StreamEvent) {
        if self.outcome.is_some() || beyond_choices(ev) {
            return;
        }
        match ev {
            StreamEvent::Started { .. } => {}
            StreamEvent::Token {
                text,
                choice,
                logprobs,
                ..
            } => {
                let c = self.choice(*choice);
                c.text.push_str(text);
                c.logprobs.extend(logprobs.iter().cloned());
            }
            StreamEvent::ToolCalls { choice, calls } => {
                self.choice(*choice).calls.extend(calls.iter().cloned());
            }
            StreamEvent::ChoiceEnd {
                choice,
                stop_reason,
                ..
            } => self.choice(*choice).stop = Some(*stop_reason),
            StreamEvent::End {
                stop_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                timings,
            } => {
                self.outcome = Some(Ok(Ended {
                    stop: *stop_reason,
                    prompt_tokens: *prompt_tokens,
                    completion_tokens: *completion_tokens,
                    cached_tokens: *cached_tokens,
                    total_ms: timings.total_ms,
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

    /// The first answer's text so far.
    pub fn text(&self) -> &str {
        self.choices.first().map_or("", |c| c.text.as_str())
    }

    fn settle(self) -> Result<(Vec<Collected>, Ended, bool), OpenAiError> {
        match self.outcome {
            Some(Ok(end)) => Ok((self.choices, end, self.logprobs)),
            Some(Err(e)) => Err(e),
            None => Err(OpenAiError::upstream(
                codes::WORKER_UNAVAILABLE,
                TRUNCATED_STREAM_MESSAGE,
            )),
        }
    }

    /// The first answer, the token counts and the request's time in milliseconds, or the error
    /// that ended the stream.
    pub(crate) fn into_first_answer(
        self,
    ) -> Result<(Answer, crate::responses::Counts, f64), OpenAiError> {
        let (choices, end, _) = self.settle()?;
        let first = choices.into_iter().next().unwrap_or_default();
        let answer = Answer {
            stop: first.stop.unwrap_or(end.stop),
            text: first.text,
            logprobs: first.logprobs,
            calls: first.calls,
        };
        Ok((
            answer,
            (end.prompt_tokens, end.completion_tokens, end.cached_tokens),
            end.total_ms,
        ))
    }

    /// The `chat.completion`, or the error that ended the stream.
    pub fn into_chat_completion(
        self,
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
    ) -> Result<ChatCompletion, OpenAiError> {
        let (choices, end, logprobs) = self.settle()?;
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let stop = c.stop.unwrap_or(end.stop);
                let called = !c.calls.is_empty();
                // Only calls: the content is null, as OpenAI sends it.
                let content = (!called || !c.text.trim().is_empty()).then_some(c.text);
                ChatChoice {
                    index: i as u32,
                    message: AssistantMessage {
                        role: "assistant".to_owned(),
                        content,
                        refusal: None,
                        tool_calls: called.then_some(c.calls),
                        annotations: Vec::new(),
                    },
                    logprobs: logprobs.then_some(ChatLogprobs {
                        content: c.logprobs,
                        refusal: None,
                    }),
                    finish_reason: choice_finish_reason(stop, called).to_owned(),
                    rbee_stop_reason: stop.as_str().to_owned(),
                }
            })
            .collect();
        Ok(ChatCompletion {
            id: id.into(),
            object: OBJECT_CHAT_COMPLETION.to_owned(),
            created,
            model: model.into(),
            choices,
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
        let (choices, end, logprobs) = self.settle()?;
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let stop = c.stop.unwrap_or(end.stop);
                let lp = logprobs.then(|| {
                    let mut l = CompletionLogprobs::default();
                    l.extend(&c.logprobs, 0);
                    l
                });
                CompletionChoice {
                    text: c.text,
                    index: i as u32,
                    logprobs: lp,
                    finish_reason: Some(choice_finish_reason(stop, false).to_owned()),
                    rbee_stop_reason: Some(stop.as_str().to_owned()),
                }
            })
            .collect();
        Ok(Completion {
            id: id.into(),
            object: OBJECT_TEXT_COMPLETION.to_owned(),
            created,
            model: model.into(),
            choices,
            usage: Usage::new(end.prompt_tokens, end.completion_tokens, end.cached_tokens),
        })
    }
}
