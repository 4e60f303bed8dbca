//! The Responses API's event stream, built from worker events.

use rbee_api::{StreamEvent, TokenLogprob, codes};
use serde_json::{Map, Value, json};

use super::{
    OutputItem, ResponseEcho, ResponseObject, call_item, call_item_id, message_id, message_item,
    output_text,
};
use crate::error::OpenAiError;
use crate::stream::TRUNCATED_STREAM_MESSAGE;

/// Turns worker events into the Responses API's stream: `response.created`,
/// `response.in_progress`, the output items as they form (`response.output_item.added`,
/// `response.content_part.added`, `response.output_text.delta`…, the `.done` events; function
/// calls with their arguments), then `response.completed` (or `response.incomplete` when
/// `max_output_tokens` cut it); a failure is an `error` event then `response.failed`. Each frame
/// has an `event:` line and the event as `data:`; every event carries `sequence_number`.
#[derive(Debug, Clone)]
pub struct ResponsesStream {
    response: ResponseObject,
    sequence: u64,
    /// The message item being written: its output index and text so far.
    message: Option<(u32, String, Vec<TokenLogprob>)>,
    /// Whitespace (and its log-probabilities) before any text: a message opens only for text,
    /// so an answer of calls alone is calls alone, as the response object says.
    leading: (String, Vec<TokenLogprob>),
    finished: bool,
}

impl ResponsesStream {
    pub fn new(id: &str, created_at: u64, model: &str, echo: &ResponseEcho) -> Self {
        Self {
            response: ResponseObject::new(id, created_at, model, echo),
            sequence: 0,
            message: None,
            leading: (String::new(), Vec::new()),
            finished: false,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn message_id(&self) -> String {
        message_id(&self.response.id)
    }

    fn frame(&mut self, kind: &str, mut fields: Map<String, Value>) -> String {
        fields.insert("type".into(), Value::String(kind.to_owned()));
        fields.insert("sequence_number".into(), Value::from(self.sequence));
        self.sequence += 1;
        format!("event: {kind}\ndata: {}\n\n", Value::Object(fields))
    }

    fn with_response(&mut self, kind: &str) -> String {
        let response = serde_json::to_value(&self.response).unwrap_or(Value::Null);
        self.frame(kind, Map::from_iter([("response".to_owned(), response)]))
    }

    fn item_frame(&mut self, kind: &str, index: u32, item: &OutputItem) -> String {
        let item = serde_json::to_value(item).unwrap_or(Value::Null);
        self.frame(
            kind,
            Map::from_iter([
                ("output_index".to_owned(), Value::from(index)),
                ("item".to_owned(), item),
            ]),
        )
    }

    fn open_message(&mut self, out: &mut String) {
        if self.message.is_some() {
            return;
        }
        let index = self.response.output.len() as u32;
        let id = self.message_id();
        let item = message_item(&id, "in_progress", None);
        out.push_str(&self.item_frame("response.output_item.added", index, &item));
        let part =
            serde_json::to_value(output_text(String::new(), Vec::new())).unwrap_or(Value::Null);
        let f = self.part_fields(&id, index, Some(("part", part)));
        out.push_str(&self.frame("response.content_part.added", f));
        self.message = Some((index, String::new(), Vec::new()));
    }

    fn part_fields(
        &self,
        id: &str,
        index: u32,
        extra: Option<(&str, Value)>,
    ) -> Map<String, Value> {
        let mut m = Map::from_iter([
            ("item_id".to_owned(), Value::String(id.to_owned())),
            ("output_index".to_owned(), Value::from(index)),
            ("content_index".to_owned(), Value::from(0)),
        ]);
        if let Some((k, v)) = extra {
            m.insert(k.to_owned(), v);
        }
        m
    }

    /// Text added to the open message.
    fn delta(&mut self, out: &mut String, text: String, logprobs: Vec<TokenLogprob>) {
        let id = self.message_id();
        let index = self.message.as_ref().map_or(0, |m| m.0);
        if let Some(m) = &mut self.message {
            m.1.push_str(&text);
            m.2.extend(logprobs.iter().cloned());
        }
        let mut f = self.part_fields(&id, index, Some(("delta", Value::String(text))));
        f.insert(
            "logprobs".into(),
            serde_json::to_value(&logprobs).unwrap_or(Value::Null),
        );
        out.push_str(&self.frame("response.output_text.delta", f));
    }

    fn close_message(&mut self, out: &mut String) {
        let Some((index, text, logprobs)) = self.message.take() else {
            return;
        };
        let id = self.message_id();
        let mut f = self.part_fields(&id, index, Some(("text", Value::String(text.clone()))));
        f.insert(
            "logprobs".into(),
            serde_json::to_value(&logprobs).unwrap_or(Value::Null),
        );
        out.push_str(&self.frame("response.output_text.done", f));
        let done = output_text(text, logprobs);
        let part = serde_json::to_value(&done).unwrap_or(Value::Null);
        let f = self.part_fields(&id, index, Some(("part", part)));
        out.push_str(&self.frame("response.content_part.done", f));
        let item = message_item(&id, "completed", Some(done));
        out.push_str(&self.item_frame("response.output_item.done", index, &item));
        self.response.output.push(item);
    }

    /// The frames one worker event turns into.
    pub fn on_event(&mut self, ev: &StreamEvent) -> String {
        let mut out = String::new();
        if self.finished {
            return out;
        }
        match ev {
            StreamEvent::Started { .. } => {
                out.push_str(&self.with_response("response.created"));
                out.push_str(&self.with_response("response.in_progress"));
            }
            StreamEvent::Token {
                text,
                logprobs,
                choice: 0,
                ..
            } => {
                let (mut text, mut logprobs) = (text.clone(), logprobs.clone());
                if self.message.is_none() {
                    self.leading.0.push_str(&text);
                    self.leading.1.extend(logprobs);
                    if self.leading.0.trim().is_empty() {
                        return out;
                    }
                    (text, logprobs) = std::mem::take(&mut self.leading);
                    self.open_message(&mut out);
                }
                self.delta(&mut out, text, logprobs);
            }
            StreamEvent::ToolCalls { calls, choice: 0 } => {
                self.leading = (String::new(), Vec::new());
                self.close_message(&mut out);
                for c in calls {
                    let index = self.response.output.len() as u32;
                    let item = call_item(c, "in_progress", "");
                    out.push_str(&self.item_frame("response.output_item.added", index, &item));
                    let item_id = call_item_id(&c.id);
                    let base = |k: &str, v: &str| {
                        Map::from_iter([
                            ("item_id".to_owned(), Value::String(item_id.clone())),
                            ("output_index".to_owned(), Value::from(index)),
                            (k.to_owned(), Value::String(v.to_owned())),
                        ])
                    };
                    out.push_str(&self.frame(
                        "response.function_call_arguments.delta",
                        base("delta", &c.function.arguments),
                    ));
                    out.push_str(&self.frame(
                        "response.function_call_arguments.done",
                        base("arguments", &c.function.arguments),
                    ));
                    let done = call_item(c, "completed", &c.function.arguments);
                    out.push_str(&self.item_frame("response.output_item.done", index, &done));
                    self.response.output.push(done);
                }
            }
            StreamEvent::Token { .. }
            | StreamEvent::ToolCalls { .. }
            | StreamEvent::ChoiceEnd { .. } => {}
            StreamEvent::End {
                stop_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                timings,
            } => {
                // No text and no calls: one (empty or whitespace) message all the same.
                if self.response.output.is_empty() && self.message.is_none() {
                    let (text, logprobs) = std::mem::take(&mut self.leading);
                    self.open_message(&mut out);
                    if !text.is_empty() || !logprobs.is_empty() {
                        self.delta(&mut out, text, logprobs);
                    }
                }
                self.close_message(&mut out);
                self.response.settle(
                    *stop_reason,
                    (*prompt_tokens, *completion_tokens, *cached_tokens),
                    timings.total_ms,
                );
                let kind = if self.response.status == "completed" {
                    "response.completed"
                } else {
                    "response.incomplete"
                };
                out.push_str(&self.with_response(kind));
                self.finished = true;
            }
            StreamEvent::Error { code, message } => {
                return self.on_failure(&OpenAiError::upstream(*code, message.clone()));
            }
        }
        out
    }

    /// A failure outside the event stream: an `error` event, then `response.failed`.
    pub fn on_failure(&mut self, err: &OpenAiError) -> String {
        if self.finished {
            return String::new();
        }
        self.finished = true;
        let fields = Map::from_iter([
            (
                "code".to_owned(),
                Value::String(err.code().as_str().to_owned()),
            ),
            (
                "message".to_owned(),
                Value::String(err.message().to_owned()),
            ),
            (
                "param".to_owned(),
                err.param()
                    .map_or(Value::Null, |p| Value::String(p.to_owned())),
            ),
        ]);
        let mut out = self.frame("error", fields);
        self.response.status = "failed".to_owned();
        self.response.error = Some(json!({"code": err.code().as_str(), "message": err.message()}));
        out.push_str(&self.with_response("response.failed"));
        out
    }

    /// The worker's stream ended: nothing if it had finished, else a failure.
    pub fn on_upstream_eof(&mut self) -> String {
        self.on_failure(&OpenAiError::upstream(
            codes::WORKER_UNAVAILABLE,
            TRUNCATED_STREAM_MESSAGE,
        ))
    }
}
