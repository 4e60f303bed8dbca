//! The SSE stream of one request: engine events of its answers (several with `n`) become
//! wire events, with tool calls held back and parsed, and the stream always ends with `end` or
//! `error`, then `[DONE]`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use futures_util::Stream;
use rbee_api::sse;
use rbee_api::{StopReason as WireStopReason, StreamEvent, Timings, codes};
use rbee_engine::{GenEvent, GenerationSummary, StopReason, ToolFormat};
use tokio::sync::mpsc;

use crate::server::InflightGuard;
use crate::tools::CallParser;

pub(crate) fn wire_reason(r: StopReason) -> WireStopReason {
    match r {
        StopReason::Eos => WireStopReason::Eos,
        StopReason::MaxTokens => WireStopReason::MaxTokens,
        StopReason::StopSequence => WireStopReason::StopSequence,
        StopReason::Cancelled => WireStopReason::Cancelled,
        StopReason::Deadline => WireStopReason::Deadline,
    }
}

fn sse_json(ev: &StreamEvent) -> Bytes {
    Bytes::from(sse::encode_event(ev))
}

/// A comment line while the engine is silent (a long prefill), so proxies keep the stream open.
const KEEP_ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

enum Phase {
    Start(StreamEvent),
    Running,
    Done,
    Closed,
}

/// Where each of a request's answers stands.
pub(crate) struct Choices {
    n: usize,
    left: usize,
    /// Tool calls held back and parsed, per answer.
    parsers: Vec<Option<CallParser>>,
    /// Log-probabilities of text a parser holds back: sent with that text, or dropped with it
    /// when it turns out to be calls.
    held_logprobs: Vec<Vec<rbee_api::TokenLogprob>>,
    first: Option<GenerationSummary>,
    completion_tokens: usize,
}

impl Choices {
    pub(crate) fn new(n: usize, calls: Option<(ToolFormat, Vec<String>)>) -> Self {
        Self {
            n,
            left: n,
            parsers: (0..n)
                .map(|_| calls.clone().map(|(f, names)| CallParser::new(f, names)))
                .collect(),
            held_logprobs: vec![Vec::new(); n],
            first: None,
            completion_tokens: 0,
        }
    }

    /// The wire events for one engine event; `true` once the request is over.
    fn on_event(&mut self, choice: u32, ev: GenEvent) -> (Vec<StreamEvent>, bool) {
        let c = choice as usize;
        let parser = self.parsers.get_mut(c).and_then(Option::as_mut);
        match ev {
            GenEvent::FirstToken => (vec![], false),
            GenEvent::Text {
                index,
                text,
                logprobs,
            } => {
                let logprobs: Vec<_> = logprobs.into_iter().map(wire_logprob).collect();
                let (text, logprobs) = match (parser, self.held_logprobs.get_mut(c)) {
                    (Some(p), Some(held)) => {
                        held.extend(logprobs);
                        let out = p.push(&text);
                        if out.is_empty() {
                            return (vec![], false);
                        }
                        (out, std::mem::take(held))
                    }
                    _ => (text, logprobs),
                };
                if text.is_empty() && logprobs.is_empty() {
                    return (vec![], false);
                }
                let token = StreamEvent::Token {
                    index: index as u32,
                    text,
                    choice,
                    logprobs,
                };
                (vec![token], false)
            }
            GenEvent::Finished(s) => {
                let mut out = Vec::new();
                if let Some(p) = self.parsers.get_mut(c).and_then(Option::take) {
                    let (tail, calls) = p.finish();
                    let held = self.held_logprobs.get_mut(c).map(std::mem::take);
                    if !tail.is_empty() {
                        out.push(StreamEvent::Token {
                            index: s.completion_tokens.saturating_sub(1) as u32,
                            text: tail,
                            choice,
                            // A call's tokens are not text: their log-probabilities go with them.
                            logprobs: held.filter(|_| calls.is_empty()).unwrap_or_default(),
                        });
                    }
                    if !calls.is_empty() {
                        out.push(StreamEvent::ToolCalls { choice, calls });
                    }
                }
                if self.n > 1 {
                    out.push(StreamEvent::ChoiceEnd {
                        choice,
                        stop_reason: wire_reason(s.stop_reason),
                        completion_tokens: s.completion_tokens as u32,
                    });
                }
                self.completion_tokens += s.completion_tokens;
                self.left = self.left.saturating_sub(1);
                if choice == 0 {
                    self.first = Some(s);
                }
                if self.left > 0 {
                    return (out, false);
                }
                if let Some(first) = &self.first {
                    let mut total = first.clone();
                    total.completion_tokens = self.completion_tokens;
                    out.push(end_event(&total));
                }
                (out, true)
            }
            GenEvent::Failed(e) => (
                vec![StreamEvent::Error {
                    code: codes::INFERENCE_FAILED,
                    message: e.to_string(),
                }],
                true,
            ),
        }
    }
}

fn wire_logprob(t: rbee_engine::TokenLogprob) -> rbee_api::TokenLogprob {
    rbee_api::TokenLogprob {
        token: t.chosen.text,
        logprob: t.chosen.logprob,
        bytes: t.chosen.bytes,
        top_logprobs: t
            .top
            .into_iter()
            .map(|a| rbee_api::TopLogprob {
                token: a.text,
                logprob: a.logprob,
                bytes: a.bytes,
            })
            .collect(),
    }
}

/// `started` → `token`… (and `tool_calls`, `choice_end`) → `end` | `error` → `[DONE]`. A
/// stream that loses its engine without a result ends with an `error` event, never a silent
/// truncation.
pub(crate) fn event_stream(
    started: StreamEvent,
    rx: mpsc::UnboundedReceiver<(u32, GenEvent)>,
    guard: InflightGuard,
    choices: Choices,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::unfold(
        (Phase::Start(started), rx, guard, choices),
        |(phase, mut rx, mut guard, mut choices)| async move {
            match phase {
                Phase::Start(ev) => Some((Ok(sse_json(&ev)), (Phase::Running, rx, guard, choices))),
                Phase::Running => loop {
                    let Ok(next) = tokio::time::timeout(KEEP_ALIVE_EVERY, rx.recv()).await else {
                        let ping = Bytes::from_static(sse::KEEP_ALIVE.as_bytes());
                        break Some((Ok(ping), (Phase::Running, rx, guard, choices)));
                    };
                    let (events, over) = match next {
                        Some((choice, ev)) => choices.on_event(choice, ev),
                        None => (
                            vec![StreamEvent::Error {
                                code: codes::INFERENCE_FAILED,
                                message: "the inference thread ended without a result".into(),
                            }],
                            true,
                        ),
                    };
                    if over {
                        // A failed answer stops its siblings too.
                        guard.cancel.store(true, Ordering::SeqCst);
                        guard.finished = true;
                    }
                    if events.is_empty() {
                        continue;
                    }
                    let mut bytes = Vec::new();
                    for ev in &events {
                        bytes.extend_from_slice(&sse_json(ev));
                    }
                    let next = if over { Phase::Done } else { Phase::Running };
                    break Some((Ok(Bytes::from(bytes)), (next, rx, guard, choices)));
                },
                Phase::Done => Some((
                    Ok(Bytes::from(sse::encode_done())),
                    (Phase::Closed, rx, guard, choices),
                )),
                Phase::Closed => None,
            }
        },
    )
}

fn end_event(s: &GenerationSummary) -> StreamEvent {
    let ms = |x: f64| (x * 1e6).round() / 1e3;
    StreamEvent::End {
        stop_reason: wire_reason(s.stop_reason),
        prompt_tokens: s.prompt_tokens as u32,
        completion_tokens: s.completion_tokens as u32,
        cached_tokens: s.cached_tokens as u32,
        timings: Timings {
            queue_ms: ms(s.queue_seconds),
            prefill_ms: ms(s.prefill_seconds),
            decode_ms: ms(s.decode_seconds),
            ttft_ms: ms(s.time_to_first_token.unwrap_or(0.0)),
            total_ms: ms(s.total_seconds),
        },
    }
}
