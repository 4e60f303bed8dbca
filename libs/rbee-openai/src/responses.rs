//! OpenAI's Responses API (`POST /v1/responses`), stateless: a request becomes the worker's
//! [`InferenceRequest`], and worker events become a `response` object or its stream of
//! `response.*` events.
//!
//! Nothing is stored: `previous_response_id` and `conversation` are refused (send the history
//! as `input` items), `store` is accepted and ignored. `input` is a string or items: messages
//! (`input_text` / `output_text` parts), `function_call` and `function_call_output`.

use rbee_api::{ChatMessage, FunctionCall, InferenceRequest, StopReason, TokenLogprob, ToolCall};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::OpenAiError;
use crate::stream::Aggregator;
use crate::structured::{flat_tools, text_format, tool_choice};

mod events;

pub use events::ResponsesStream;

pub const OBJECT_RESPONSE: &str = "response";
/// `include` entry that asks for the output text's log-probabilities.
pub const INCLUDE_LOGPROBS: &str = "message.output_text.logprobs";

/// The `id` of a response for a request id: `resp_<request id>`.
pub fn response_id(request_id: &str) -> String {
    format!("resp_{request_id}")
}

/// `input`: a string (one user message) or an array of items.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(untagged, expecting = "a string or an array of input items")]
pub enum ResponsesInput {
    Text(String),
    Items(Vec<Value>),
}

/// `POST /v1/responses`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[schemars(extend("required" = ["model", "input"]))]
pub struct ResponsesRequest {
    #[schemars(length(min = 1), pattern(r"\S"))]
    pub model: String,
    /// Required.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::responses_input")]
    pub input: Option<ResponsesInput>,
    /// A system message put before `input`.
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub max_output_tokens: Option<u32>,
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    #[serde(default)]
    #[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0))]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// Function tools `{"type":"function","name","description","parameters","strict"}`.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::flat_tools")]
    pub tools: Option<Value>,
    /// `auto`, `none`, `required` or `{"type":"function","name"}`.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::tool_choice")]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"format":{"type":"text"|"json_object"|"json_schema","name","schema","strict"}}`.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::text_field")]
    pub text: Option<Value>,
    /// 0–20 alternatives per token, with `include: ["message.output_text.logprobs"]`.
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(max = 20))]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub include: Option<Vec<String>>,
    /// Refused: rbee stores no responses.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::null_only")]
    pub previous_response_id: Option<String>,
    /// Refused: rbee stores no conversations.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::null_only")]
    pub conversation: Option<Value>,
    /// Only false.
    #[serde(default)]
    #[schemars(extend("enum" = [false, null]))]
    pub background: Option<bool>,
    /// Accepted and ignored (nothing is stored).
    #[serde(default)]
    pub store: Option<bool>,
    /// Echoed in the response.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::any_object")]
    pub metadata: Option<Value>,
    /// Only `"disabled"` (a prompt over the context is refused, not cut).
    #[serde(default)]
    #[schemars(extend("enum" = ["disabled", null]))]
    pub truncation: Option<String>,
    /// The client's own end user: kept in the usage record.
    #[serde(default)]
    pub user: Option<String>,
    /// [-2, 2], as on chat.
    #[serde(default)]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub presence_penalty: Option<f64>,
    /// [-2, 2], as on chat.
    #[serde(default)]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub frequency_penalty: Option<f64>,
    /// rbee extension, as on chat.
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u64")]
    #[schemars(range(min = 0, max = 18446744073709551615u64))]
    pub seed: Option<u64>,
}

impl ResponsesRequest {
    pub fn from_json(body: &[u8]) -> Result<Self, OpenAiError> {
        crate::request::parse_json(body)
    }

    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }

    fn wants_logprobs(&self) -> bool {
        self.include
            .as_ref()
            .is_some_and(|i| i.iter().any(|s| s == INCLUDE_LOGPROBS))
    }

    /// The worker request, or the first parameter rbee refuses.
    pub fn to_inference(&self) -> Result<InferenceRequest, OpenAiError> {
        if self.model.trim().is_empty() {
            return Err(OpenAiError::invalid("model", "`model` must not be empty"));
        }
        if self.previous_response_id.is_some() || self.conversation.is_some() {
            let param = if self.previous_response_id.is_some() {
                "previous_response_id"
            } else {
                "conversation"
            };
            return Err(OpenAiError::unsupported(
                param,
                format!(
                    "`{param}` is not supported: rbee stores no responses; send the history as `input` items"
                ),
            ));
        }
        if self.background == Some(true) {
            return Err(OpenAiError::unsupported(
                "background",
                "`background` responses are not supported by rbee",
            ));
        }
        if self
            .metadata
            .as_ref()
            .is_some_and(|m| !m.is_null() && !m.is_object())
        {
            return Err(OpenAiError::invalid(
                "metadata",
                "`metadata` must be an object of strings",
            ));
        }
        if let Some(t) = self.truncation.as_deref().filter(|t| *t != "disabled") {
            return Err(OpenAiError::unsupported(
                "truncation",
                format!(
                    "`truncation` {t:?} is not supported: rbee refuses a prompt over the context (\"disabled\")"
                ),
            ));
        }
        let mut messages = Vec::new();
        if let Some(i) = self.instructions.as_ref().filter(|i| !i.is_empty()) {
            messages.push(ChatMessage {
                role: "system".into(),
                content: i.clone(),
                ..ChatMessage::default()
            });
        }
        match &self.input {
            None => return Err(OpenAiError::invalid("input", "`input` is required")),
            Some(ResponsesInput::Text(t)) => messages.push(ChatMessage {
                role: "user".into(),
                content: t.clone(),
                ..ChatMessage::default()
            }),
            Some(ResponsesInput::Items(items)) => {
                for (i, item) in items.iter().enumerate() {
                    input_item(i, item, &mut messages)?;
                }
                if !messages.iter().any(|m| m.role != "system") {
                    return Err(OpenAiError::invalid(
                        "input",
                        "`input` must hold at least one message or function call item",
                    ));
                }
            }
        }
        let logprobs = match (self.wants_logprobs(), self.top_logprobs) {
            // As OpenAI: only `include` asks for them; `top_logprobs` says how many.
            (true, k) => Some(k.unwrap_or(0)),
            (false, _) => None,
        };
        Ok(InferenceRequest {
            messages: Some(messages),
            max_tokens: self.max_output_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            logprobs,
            grammar: text_format(self.text.as_ref())?,
            tools: flat_tools(self.tools.as_ref())?,
            tool_choice: tool_choice(self.tool_choice.as_ref())?,
            parallel_tool_calls: self.parallel_tool_calls,
            ..InferenceRequest::default()
        })
    }
}

/// One `input` item appended as chat messages (consecutive calls join one assistant turn).
fn input_item(i: usize, item: &Value, out: &mut Vec<ChatMessage>) -> Result<(), OpenAiError> {
    let param = format!("input[{i}]");
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    let str_field = |name: &str| -> Result<String, OpenAiError> {
        item.get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                OpenAiError::invalid(
                    format!("{param}.{name}"),
                    format!("`{param}.{name}` is required (a string)"),
                )
            })
    };
    match kind {
        "message" => {
            let role = str_field("role")?;
            let role = match role.as_str() {
                "user" | "assistant" | "system" => role,
                "developer" => "system".into(),
                other => {
                    return Err(OpenAiError::invalid(
                        format!("{param}.role"),
                        format!(
                            "`{param}.role` must be user, assistant, system or developer; given: {other:?}"
                        ),
                    ));
                }
            };
            let content = match item.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut texts = Vec::new();
                    for (j, p) in parts.iter().enumerate() {
                        let pk = p.get("type").and_then(Value::as_str).unwrap_or_default();
                        match pk {
                            "input_text" | "output_text" | "text" => texts.push(
                                p.get("text")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_owned(),
                            ),
                            "refusal" => {}
                            other => {
                                return Err(OpenAiError::unsupported(
                                    format!("{param}.content[{j}]"),
                                    format!(
                                        "`{param}.content[{j}]` is {other:?} content, which rbee does not support: its models read text only"
                                    ),
                                ));
                            }
                        }
                    }
                    texts.join(crate::CONTENT_PART_SEPARATOR)
                }
                _ => {
                    return Err(OpenAiError::invalid(
                        format!("{param}.content"),
                        format!("`{param}.content` must be a string or an array of parts"),
                    ));
                }
            };
            out.push(ChatMessage {
                role,
                content,
                ..ChatMessage::default()
            });
        }
        "function_call" => {
            let call = ToolCall {
                id: str_field("call_id")?,
                kind: "function".into(),
                function: FunctionCall {
                    name: str_field("name")?,
                    arguments: str_field("arguments")?,
                },
            };
            match out.last_mut() {
                Some(m) if m.role == "assistant" => {
                    m.tool_calls.get_or_insert_with(Vec::new).push(call)
                }
                _ => out.push(ChatMessage {
                    role: "assistant".into(),
                    tool_calls: Some(vec![call]),
                    ..ChatMessage::default()
                }),
            }
        }
        "function_call_output" => {
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => {
                    return Err(OpenAiError::invalid(
                        format!("{param}.output"),
                        format!("`{param}.output` is required"),
                    ));
                }
            };
            out.push(ChatMessage {
                role: "tool".into(),
                content: output,
                tool_call_id: Some(str_field("call_id")?),
                ..ChatMessage::default()
            });
        }
        // Reasoning items of other servers' models carry nothing this model can read.
        "reasoning" => {}
        other => {
            return Err(OpenAiError::unsupported(
                format!("{param}.type"),
                format!(
                    "`{param}.type` {other:?} is not supported by rbee; items may be message, function_call or function_call_output"
                ),
            ));
        }
    }
    Ok(())
}

/// What a response repeats of its request.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseEcho {
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub temperature: f64,
    pub top_p: f64,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub parallel_tool_calls: bool,
    pub tool_choice: Value,
    pub tools: Value,
    pub text: Value,
    pub metadata: Value,
    pub store: bool,
    pub user: Option<String>,
    pub top_logprobs: u32,
}

/// A request's tool as a response lists it: every field present, null when not given.
fn echo_tool(t: &Value) -> Value {
    let field = |k: &str| t.get(k).cloned().unwrap_or(Value::Null);
    json!({
        "type": "function",
        "name": field("name"),
        "description": field("description"),
        "parameters": field("parameters"),
        "strict": field("strict"),
    })
}

impl ResponseEcho {
    pub fn of(r: &ResponsesRequest) -> Self {
        Self {
            instructions: r.instructions.clone(),
            max_output_tokens: r.max_output_tokens,
            temperature: r.temperature.unwrap_or(1.0),
            top_p: r.top_p.unwrap_or(1.0),
            presence_penalty: r.presence_penalty.unwrap_or(0.0),
            frequency_penalty: r.frequency_penalty.unwrap_or(0.0),
            parallel_tool_calls: r.parallel_tool_calls.unwrap_or(true),
            tool_choice: r.tool_choice.clone().unwrap_or_else(|| json!("auto")),
            tools: Value::Array(
                r.tools
                    .as_ref()
                    .and_then(Value::as_array)
                    .map(|ts| ts.iter().map(echo_tool).collect())
                    .unwrap_or_default(),
            ),
            text: r
                .text
                .clone()
                .filter(|t| t.get("format").is_some())
                .unwrap_or_else(|| json!({"format": {"type": "text"}})),
            metadata: r
                .metadata
                .clone()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({})),
            store: r.store.unwrap_or(false),
            user: r.user.clone(),
            top_logprobs: r.top_logprobs.unwrap_or(0),
        }
    }
}

/// `output_text` content of a message item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OutputText {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
    pub annotations: Vec<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
}

/// One item of `output`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    Message {
        id: String,
        status: String,
        role: String,
        content: Vec<OutputText>,
    },
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        status: String,
    },
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct InputTokensDetails {
    pub cached_tokens: u32,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: u32,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct ResponseUsage {
    pub input_tokens: u32,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u32,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u32,
}

/// `incomplete_details`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct IncompleteDetails {
    pub reason: String,
}

/// Token counts: prompt, completion, cached.
pub(crate) type Counts = (u32, u32, u32);

/// The `id` of a response's message item.
pub(crate) fn message_id(response_id: &str) -> String {
    format!("msg_{}", response_id.trim_start_matches("resp_"))
}

/// The `id` of a function-call item.
pub(crate) fn call_item_id(call_id: &str) -> String {
    format!("fc_{}", call_id.trim_start_matches("call_"))
}

/// A `response` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ResponseObject {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    /// When the answer was complete (null until then, and when it was cut or failed).
    pub completed_at: Option<u64>,
    /// `in_progress`, `completed`, `incomplete` or `failed`.
    pub status: String,
    pub error: Option<Value>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub model: String,
    pub output: Vec<OutputItem>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub reasoning: Value,
    pub store: bool,
    pub temperature: f64,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub text: Value,
    pub tool_choice: Value,
    pub tools: Value,
    pub top_logprobs: u32,
    pub top_p: f64,
    pub truncation: String,
    pub max_tool_calls: Option<u32>,
    pub background: bool,
    pub service_tier: String,
    pub safety_identifier: Option<String>,
    pub prompt_cache_key: Option<String>,
    pub usage: Option<ResponseUsage>,
    pub user: Option<String>,
    pub metadata: Value,
}

impl ResponseObject {
    pub(crate) fn new(id: &str, created_at: u64, model: &str, echo: &ResponseEcho) -> Self {
        Self {
            id: id.to_owned(),
            object: OBJECT_RESPONSE.to_owned(),
            created_at,
            completed_at: None,
            status: "in_progress".to_owned(),
            error: None,
            incomplete_details: None,
            instructions: echo.instructions.clone(),
            max_output_tokens: echo.max_output_tokens,
            model: model.to_owned(),
            output: Vec::new(),
            parallel_tool_calls: echo.parallel_tool_calls,
            previous_response_id: None,
            reasoning: json!({"effort": null, "summary": null}),
            store: echo.store,
            temperature: echo.temperature,
            presence_penalty: echo.presence_penalty,
            frequency_penalty: echo.frequency_penalty,
            max_tool_calls: None,
            background: false,
            service_tier: "default".to_owned(),
            safety_identifier: None,
            prompt_cache_key: None,
            text: echo.text.clone(),
            tool_choice: echo.tool_choice.clone(),
            tools: echo.tools.clone(),
            top_logprobs: echo.top_logprobs,
            top_p: echo.top_p,
            truncation: "disabled".to_owned(),
            usage: None,
            user: echo.user.clone(),
            metadata: echo.metadata.clone(),
        }
    }

    /// Status and usage once the worker's `end` arrived, `total_ms` after the request came.
    pub(crate) fn settle(&mut self, stop: StopReason, counts: Counts, total_ms: f64) {
        let (prompt, completion, cached) = counts;
        let incomplete = |reason: &str| {
            Some(IncompleteDetails {
                reason: reason.to_owned(),
            })
        };
        match stop {
            StopReason::MaxTokens => {
                self.status = "incomplete".to_owned();
                self.incomplete_details = incomplete("max_output_tokens");
            }
            StopReason::Deadline => {
                self.status = "incomplete".to_owned();
                self.incomplete_details = incomplete("deadline");
            }
            StopReason::Cancelled => self.status = "cancelled".to_owned(),
            StopReason::Eos | StopReason::StopSequence => {
                self.status = "completed".to_owned();
                self.completed_at = Some(self.created_at + (total_ms / 1e3).round() as u64);
            }
        }
        self.usage = Some(ResponseUsage {
            input_tokens: prompt,
            input_tokens_details: InputTokensDetails {
                cached_tokens: cached,
            },
            output_tokens: completion,
            output_tokens_details: OutputTokensDetails::default(),
            total_tokens: prompt.saturating_add(completion),
        });
    }
}

pub(crate) fn message_item(id: &str, status: &str, text: Option<OutputText>) -> OutputItem {
    OutputItem::Message {
        id: id.to_owned(),
        status: status.to_owned(),
        role: "assistant".to_owned(),
        content: text.into_iter().collect(),
    }
}

pub(crate) fn output_text(text: String, logprobs: Vec<TokenLogprob>) -> OutputText {
    OutputText {
        kind: "output_text".to_owned(),
        text,
        annotations: Vec::new(),
        logprobs,
    }
}

pub(crate) fn call_item(c: &ToolCall, status: &str, arguments: &str) -> OutputItem {
    OutputItem::FunctionCall {
        id: call_item_id(&c.id),
        call_id: c.id.clone(),
        name: c.function.name.clone(),
        arguments: arguments.to_owned(),
        status: status.to_owned(),
    }
}

impl Aggregator {
    /// The `response` object, or the error that ended the stream.
    pub fn into_response(
        self,
        id: &str,
        created_at: u64,
        model: &str,
        echo: &ResponseEcho,
    ) -> Result<ResponseObject, OpenAiError> {
        let (answer, counts, total_ms) = self.into_first_answer()?;
        let mut r = ResponseObject::new(id, created_at, model, echo);
        // Only calls (and at most whitespace around them): no message, as chat's null content.
        if !answer.text.trim().is_empty() || answer.calls.is_empty() {
            r.output.push(message_item(
                &message_id(id),
                "completed",
                Some(output_text(answer.text, answer.logprobs)),
            ));
        }
        for c in &answer.calls {
            r.output
                .push(call_item(c, "completed", &c.function.arguments));
        }
        r.settle(answer.stop, counts, total_ms);
        Ok(r)
    }
}
