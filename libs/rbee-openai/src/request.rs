//! Client requests as the stock OpenAI SDKs send them, and their translation into the worker's
//! [`InferenceRequest`].
//!
//! Unknown fields are ignored, not refused: the SDKs add parameters over time (`store`,
//! `metadata`, `service_tier`, `reasoning_effort`, …) and a client upgrading its SDK must not
//! start failing. Known parameters that would change the output but that rbee does not
//! implement are refused with a 400 naming the parameter ([`OpenAiError::Unsupported`]), so a
//! client never gets a silently different answer. Ranges of sampling values (temperature in
//! [0, 2], …) are the worker's to check; only OpenAI-specific rules are checked here.

use rbee_api::{ChatMessage, InferenceRequest};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Number, Value};

use crate::error::OpenAiError;
use crate::structured::{history_calls, response_format, tool_choice, tools};

/// `max_tokens` of a legacy completion that gives none, as OpenAI defines it.
pub const COMPLETION_DEFAULT_MAX_TOKENS: u32 = 16;

/// Most alternatives per token a legacy completion may ask for (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: u64 = 5;

/// Separator put between the text parts of one message's content array.
pub const CONTENT_PART_SEPARATOR: &str = "\n";

/// Parses a request body; a wrong JSON type or a missing field names its path in `param`
/// (`messages[0].role`, `temperature`).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, OpenAiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let text = inner.to_string();
        // `?` stands for a segment serde could not name (a syntax error inside a key).
        let mut known = path.as_str();
        while let Some(parent) = known.strip_suffix(".?") {
            known = parent;
        }
        let at = (!matches!(known, "" | "." | "?")).then(|| known.to_owned());
        // serde reports a missing field at its parent's path; name the field itself.
        let missing = text
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned);
        let param = match (at, missing) {
            (Some(at), Some(field)) => Some(format!("{at}.{field}")),
            (None, Some(field)) => Some(field),
            (at, None) => at,
        };
        let message = match &param {
            Some(p) => format!("invalid request body: `{p}`: {text}"),
            None => format!("invalid request body: {text}"),
        };
        OpenAiError::InvalidJson { param, message }
    })
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum Stop {
    One(#[schemars(length(min = 1, max = 128))] String),
    Many(
        #[schemars(
            length(max = 8),
            extend("items" = {"type": "string", "minLength": 1, "maxLength": 128})
        )]
        Vec<String>,
    ),
}

impl Stop {
    fn to_vec(&self) -> Option<Vec<String>> {
        let v = match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        };
        (!v.is_empty()).then_some(v)
    }
}

/// A message's `content`: a string, or an array of content parts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(untagged, expecting = "a string or an array of content parts")]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One content part, `{"type":"text","text":"…"}`. Other types (`image_url`, `input_audio`,
/// `file`, …) parse, so that [`ChatCompletionRequest::to_inference`] can refuse them by name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[schemars(extend("required" = ["type", "text"]))]
pub struct ContentPart {
    #[serde(rename = "type")]
    #[schemars(extend("const" = "text"))]
    pub kind: String,
    // No `serde(default)`: a missing Option is None anyway, and the schema (a string) must not
    // advertise a null default.
    #[schemars(with = "String")]
    pub text: Option<String>,
}

/// One entry of `messages`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[schemars(extend(
    "if" = {"properties": {"role": {"const": "assistant"}}},
    "else" = {"required": ["content"], "properties": {
        "content": {"type": ["string", "array"]},
        "tool_calls": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}}}
))]
pub struct RequestMessage {
    /// `system`, `user`, `assistant`, `tool`, or `developer` (served as `system`); `function`
    /// (the deprecated form of `tool`) is refused.
    #[schemars(extend("enum" = ["system", "user", "assistant", "tool", "developer"]))]
    pub role: String,
    /// Optional only for `assistant` messages (OpenAI allows `null` there).
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Kept on `tool` messages (the function that answered); ignored on others.
    #[serde(default)]
    pub name: Option<String>,
    /// An assistant's earlier calls: `[{"id","type":"function","function":{"name","arguments"}}]`.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::history_calls")]
    pub tool_calls: Option<Value>,
    /// On a `tool` message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// Refused when non-null.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::null_only")]
    pub function_call: Option<Value>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
pub struct ChatCompletionRequest {
    #[schemars(length(min = 1), pattern(r"\S"))]
    pub model: String,
    #[schemars(length(min = 1, max = 1024))]
    pub messages: Vec<RequestMessage>,
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub max_tokens: Option<u32>,
    /// Wins over `max_tokens` when both are given.
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    #[serde(default)]
    #[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0))]
    pub top_p: Option<f64>,
    /// Answers to generate, 1–16 (checked by the worker).
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(min = 1, max = 16))]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// Read only when streaming.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Any JSON integer; negative seeds map to their two's-complement `u64`.
    #[serde(default)]
    #[schemars(with = "Option<i64>", range(min = -9223372036854775808i64, max = 18446744073709551615u64))]
    pub seed: Option<Number>,
    /// [-2, 2]: lowers every token generated so far, once (checked by the worker).
    #[serde(default)]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub presence_penalty: Option<f64>,
    /// [-2, 2]: lowers a token once per time it was generated (checked by the worker).
    #[serde(default)]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub frequency_penalty: Option<f64>,
    /// Token id (this model's, as a string) → bias in [-100, 100] (checked by the worker).
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::logit_bias")]
    pub logit_bias: Option<Value>,
    /// Each token's log-probability in `choices[].logprobs.content`.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// 0–20 alternatives per token; needs `logprobs: true`.
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(max = 20))]
    pub top_logprobs: Option<u32>,
    /// `{"type":"text"}`, `{"type":"json_object"}` or
    /// `{"type":"json_schema","json_schema":{"name","schema","strict"}}`: the answer follows it.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::response_format")]
    pub response_format: Option<Value>,
    /// Function tools: `[{"type":"function","function":{"name","description","parameters"}}]`.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::chat_tools")]
    pub tools: Option<Value>,
    /// `"auto"` (default with tools), `"none"`, `"required"`, or
    /// `{"type":"function","function":{"name"}}`; the last two constrain the arguments to the
    /// function's schema.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::tool_choice")]
    pub tool_choice: Option<Value>,
    /// Whether an answer may hold several calls (default true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Only empty (the deprecated form of `tools`).
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::empty_list")]
    pub functions: Option<Value>,
    /// Only `"none"` or `"auto"` (the deprecated form of `tool_choice`).
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::neutral_mode")]
    pub function_call: Option<Value>,
    /// Only `["text"]`.
    #[serde(default)]
    #[schemars(extend("items" = {"const": "text"}))]
    pub modalities: Option<Vec<String>>,
    /// Only null (audio output).
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::null_only")]
    pub audio: Option<Value>,
    /// The client's own end user: kept in the queen's usage record (first 256 characters).
    #[serde(default)]
    pub user: Option<String>,
    /// rbee extension.
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(max = 4294967295u32))]
    pub top_k: Option<u32>,
    /// rbee extension.
    #[serde(default)]
    #[schemars(range(min = 0.0), extend("exclusiveMaximum" = 1))]
    pub min_p: Option<f64>,
    /// rbee extension.
    #[serde(default)]
    #[schemars(range(max = 10.0), extend("exclusiveMinimum" = 0))]
    pub repetition_penalty: Option<f64>,
    /// rbee extension.
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(max = 4294967295u32))]
    pub repetition_window: Option<u32>,
}

/// The prompt of a legacy completion: OpenAI allows a string, strings, token ids, or batches of
/// token ids; rbee serves one string (alone or as a one-element array).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(
    untagged,
    expecting = "a string, an array of strings, an array of token ids, or an array of arrays of token ids"
)]
pub enum CompletionPrompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenBatches(Vec<Vec<i64>>),
}

/// `POST /v1/completions` (legacy).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[schemars(extend("required" = ["model", "prompt"]))]
pub struct CompletionRequest {
    #[schemars(length(min = 1), pattern(r"\S"))]
    pub model: String,
    /// Required by rbee (OpenAI would default to an end-of-text token).
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::completion_prompt")]
    pub prompt: Option<CompletionPrompt>,
    /// [`COMPLETION_DEFAULT_MAX_TOKENS`] when absent.
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    #[serde(default)]
    #[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0))]
    pub top_p: Option<f64>,
    /// Answers to generate, 1–16 (checked by the worker).
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(min = 1, max = 16))]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    #[schemars(with = "Option<i64>", range(min = -9223372036854775808i64, max = 18446744073709551615u64))]
    pub seed: Option<Number>,
    /// Only `false`.
    #[serde(default)]
    #[schemars(extend("enum" = [false, null]))]
    pub echo: Option<bool>,
    /// 0–5: each token's log-probability with this many alternatives.
    #[serde(default)]
    #[schemars(with = "Option<u8>", range(max = 5))]
    pub logprobs: Option<Value>,
    /// Only null or empty.
    #[serde(default)]
    #[schemars(length(max = 0))]
    pub suffix: Option<String>,
    /// Only 1 (rbee returns every answer it generates; ask for several with `n`).
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(min = 1, max = 1))]
    pub best_of: Option<u32>,
    /// As on chat (an extension other servers share): the text follows it.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::response_format")]
    pub response_format: Option<Value>,
    /// [-2, 2]: lowers every token generated so far, once (checked by the worker).
    #[serde(default)]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub presence_penalty: Option<f64>,
    /// [-2, 2]: lowers a token once per time it was generated (checked by the worker).
    #[serde(default)]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub frequency_penalty: Option<f64>,
    /// Token id (this model's, as a string) → bias in [-100, 100] (checked by the worker).
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::logit_bias")]
    pub logit_bias: Option<Value>,
    /// The client's own end user: kept in the queen's usage record (first 256 characters).
    #[serde(default)]
    pub user: Option<String>,
    /// rbee extension.
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(max = 4294967295u32))]
    pub top_k: Option<u32>,
    /// rbee extension.
    #[serde(default)]
    #[schemars(range(min = 0.0), extend("exclusiveMaximum" = 1))]
    pub min_p: Option<f64>,
    /// rbee extension.
    #[serde(default)]
    #[schemars(range(max = 10.0), extend("exclusiveMinimum" = 0))]
    pub repetition_penalty: Option<f64>,
    /// rbee extension.
    #[serde(default, deserialize_with = "rbee_api::lenient::opt_u32")]
    #[schemars(range(max = 4294967295u32))]
    pub repetition_window: Option<u32>,
}

impl ChatCompletionRequest {
    /// Parses a body; see [`parse_json`].
    pub fn from_json(body: &[u8]) -> Result<Self, OpenAiError> {
        parse_json(body)
    }

    /// `stream: true`.
    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// Streaming with `stream_options.include_usage: true`.
    pub fn include_usage(&self) -> bool {
        self.is_stream() && include_usage(self.stream_options.as_ref())
    }

    /// The worker request, or the first parameter rbee refuses.
    pub fn to_inference(&self) -> Result<InferenceRequest, OpenAiError> {
        check_model(&self.model)?;
        let messages = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| convert_message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        let logprobs = match (self.logprobs, self.top_logprobs) {
            (Some(true), k) => Some(k.unwrap_or(0)),
            (_, Some(k)) if k > 0 => {
                return Err(OpenAiError::invalid(
                    "top_logprobs",
                    format!("`top_logprobs` needs `logprobs: true`; given: {k}"),
                ));
            }
            _ => None,
        };
        let grammar = response_format(self.response_format.as_ref())?;
        let tools = tools(self.tools.as_ref())?;
        let tool_choice = tool_choice(self.tool_choice.as_ref())?;
        empty_only("functions", self.functions.as_ref())?;
        no_tool_choice("function_call", self.function_call.as_ref())?;
        if let Some(m) = &self.modalities
            && let Some(other) = m.iter().find(|m| m.as_str() != "text")
        {
            return Err(OpenAiError::unsupported(
                "modalities",
                format!(
                    "only the \"text\" modality is supported by rbee; given: {:?}",
                    truncate(other)
                ),
            ));
        }
        if self.audio.as_ref().is_some_and(|a| !a.is_null()) {
            return Err(OpenAiError::unsupported(
                "audio",
                "audio output is not supported by rbee",
            ));
        }
        Ok(InferenceRequest {
            prompt: None,
            messages: Some(messages),
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            repetition_window: self.repetition_window,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: logit_bias(self.logit_bias.as_ref())?,
            seed: seed(self.seed.as_ref())?,
            stop: self.stop.as_ref().and_then(Stop::to_vec),
            logprobs,
            n: self.n,
            grammar,
            tools,
            tool_choice,
            parallel_tool_calls: self.parallel_tool_calls,
        })
    }
}

impl CompletionRequest {
    /// Parses a body; see [`parse_json`].
    pub fn from_json(body: &[u8]) -> Result<Self, OpenAiError> {
        parse_json(body)
    }

    /// `stream: true`.
    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// Streaming with `stream_options.include_usage: true`.
    pub fn include_usage(&self) -> bool {
        self.is_stream() && include_usage(self.stream_options.as_ref())
    }

    /// The worker request (a raw prompt, no chat template), or the first parameter rbee
    /// refuses. `max_tokens` defaults to [`COMPLETION_DEFAULT_MAX_TOKENS`].
    pub fn to_inference(&self) -> Result<InferenceRequest, OpenAiError> {
        check_model(&self.model)?;
        let prompt = match &self.prompt {
            None => {
                return Err(OpenAiError::invalid("prompt", "`prompt` is required"));
            }
            Some(CompletionPrompt::Text(s)) => s.clone(),
            Some(CompletionPrompt::Texts(v)) => match v.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(OpenAiError::invalid(
                        "prompt",
                        "`prompt` must not be an empty array",
                    ));
                }
                many => {
                    return Err(OpenAiError::unsupported(
                        "prompt",
                        format!(
                            "batched prompts are not supported by rbee: give one prompt per \
                             request; given: {} prompts",
                            many.len()
                        ),
                    ));
                }
            },
            Some(CompletionPrompt::Tokens(_) | CompletionPrompt::TokenBatches(_)) => {
                return Err(OpenAiError::unsupported(
                    "prompt",
                    "token-id prompts are not supported by rbee; send the prompt as a string",
                ));
            }
        };
        if let Some(b) = self.best_of.filter(|b| *b != 1) {
            return Err(OpenAiError::unsupported(
                "best_of",
                format!(
                    "`best_of` must be 1 (rbee ranks no candidates; ask for several answers with `n`); given: {b}"
                ),
            ));
        }
        if self.echo == Some(true) {
            return Err(OpenAiError::unsupported(
                "echo",
                "`echo` is not supported by rbee; leave it out or set it to false",
            ));
        }
        let logprobs = match self.logprobs.as_ref().filter(|v| !v.is_null()) {
            None => None,
            Some(v) => match v.as_number().and_then(rbee_api::lenient::integer) {
                Some(k) if k <= MAX_COMPLETION_LOGPROBS => Some(k as u32),
                _ => {
                    return Err(OpenAiError::invalid(
                        "logprobs",
                        format!(
                            "`logprobs` must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]; given: {}",
                            truncate(&v.to_string())
                        ),
                    ));
                }
            },
        };
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(OpenAiError::unsupported(
                "suffix",
                "`suffix` (insertion) is not supported by rbee",
            ));
        }
        Ok(InferenceRequest {
            prompt: Some(prompt),
            messages: None,
            max_tokens: Some(self.max_tokens.unwrap_or(COMPLETION_DEFAULT_MAX_TOKENS)),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            repetition_window: self.repetition_window,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: logit_bias(self.logit_bias.as_ref())?,
            seed: seed(self.seed.as_ref())?,
            stop: self.stop.as_ref().and_then(Stop::to_vec),
            logprobs,
            n: self.n,
            grammar: response_format(self.response_format.as_ref())?,
            tools: None,
            tool_choice: None,
            parallel_tool_calls: None,
        })
    }
}

fn include_usage(o: Option<&StreamOptions>) -> bool {
    o.and_then(|o| o.include_usage) == Some(true)
}

fn check_model(model: &str) -> Result<(), OpenAiError> {
    if model.trim().is_empty() {
        return Err(OpenAiError::invalid("model", "`model` must not be empty"));
    }
    Ok(())
}

fn convert_message(i: usize, m: &RequestMessage) -> Result<ChatMessage, OpenAiError> {
    let role = match m.role.as_str() {
        "system" | "user" | "assistant" | "tool" => m.role.clone(),
        "developer" => "system".to_owned(),
        "function" => {
            return Err(OpenAiError::unsupported(
                format!("messages[{i}].role"),
                format!(
                    "`messages[{i}].role` \"function\" (deprecated) is not supported: send \
                     tool results as \"tool\" messages"
                ),
            ));
        }
        other => {
            return Err(OpenAiError::invalid(
                format!("messages[{i}].role"),
                format!(
                    "`messages[{i}].role` must be one of system, user, assistant, tool, \
                     developer; given: {:?}",
                    truncate(other)
                ),
            ));
        }
    };
    let tool_calls = match m.tool_calls.as_ref().filter(|v| non_empty(v)) {
        None => None,
        Some(_) if role != "assistant" => {
            return Err(OpenAiError::invalid(
                format!("messages[{i}].tool_calls"),
                format!("`messages[{i}].tool_calls` belongs on assistant messages"),
            ));
        }
        Some(v) => Some(history_calls(i, v)?),
    };
    if m.function_call.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(OpenAiError::unsupported(
            format!("messages[{i}].function_call"),
            format!(
                "`messages[{i}].function_call` (deprecated) is not supported: send `tool_calls`"
            ),
        ));
    }
    let content = match &m.content {
        None if role == "assistant" => String::new(),
        None => {
            return Err(OpenAiError::invalid(
                format!("messages[{i}].content"),
                format!("`messages[{i}].content` is required for a {role} message"),
            ));
        }
        Some(MessageContent::Text(s)) => s.clone(),
        Some(MessageContent::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                texts.push(part_text(i, j, p)?);
            }
            texts.join(CONTENT_PART_SEPARATOR)
        }
    };
    let tool_call_id = m.tool_call_id.clone().filter(|_| role == "tool");
    let name = m.name.clone().filter(|_| role == "tool");
    Ok(ChatMessage {
        role,
        content,
        tool_calls,
        tool_call_id,
        name,
    })
}

fn part_text(i: usize, j: usize, p: &ContentPart) -> Result<&str, OpenAiError> {
    let param = format!("messages[{i}].content[{j}]");
    let what = match p.kind.as_str() {
        "text" => {
            return p.text.as_deref().ok_or_else(|| {
                OpenAiError::invalid(
                    format!("{param}.text"),
                    format!("`{param}.text` is required for a text part"),
                )
            });
        }
        "image_url" | "image" | "input_image" => "image",
        "input_audio" | "audio" => "audio",
        "file" | "input_file" => "file",
        other => {
            return Err(OpenAiError::invalid(
                format!("{param}.type"),
                format!(
                    "`{param}.type` {:?} is not a known content part type; rbee accepts \"text\"",
                    truncate(other)
                ),
            ));
        }
    };
    Err(OpenAiError::unsupported(
        param.clone(),
        format!(
            "`{param}` is {what} content ({:?}), which rbee does not support: its models read \
             text only; send \"text\" parts",
            p.kind
        ),
    ))
}

/// True for anything but `null`, `[]` and `{}`.
pub(crate) fn non_empty(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

/// `logit_bias` as the worker takes it: an object of numbers (an empty one is none).
fn logit_bias(
    v: Option<&Value>,
) -> Result<Option<std::collections::BTreeMap<String, f64>>, OpenAiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = || {
        OpenAiError::unsupported(
            "logit_bias",
            "`logit_bias` must be an object of token ids to numbers, e.g. {\"1234\": -100}",
        )
    };
    let map = v.as_object().ok_or_else(bad)?;
    if map.is_empty() {
        return Ok(None);
    }
    map.iter()
        .map(|(k, v)| v.as_f64().map(|b| (k.clone(), b)).ok_or_else(bad))
        .collect::<Result<_, _>>()
        .map(Some)
}

fn empty_only(param: &str, v: Option<&Value>) -> Result<(), OpenAiError> {
    if v.is_some_and(non_empty) {
        return Err(OpenAiError::unsupported(
            param,
            format!("`{param}` is not supported by rbee; leave it out or empty"),
        ));
    }
    Ok(())
}

fn no_tool_choice(param: &str, v: Option<&Value>) -> Result<(), OpenAiError> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if s == "none" || s == "auto" => Ok(()),
        Some(_) => Err(OpenAiError::unsupported(
            param,
            format!(
                "`{param}` (deprecated) is not supported by rbee; use `tools` and `tool_choice`"
            ),
        )),
    }
}

fn seed(v: Option<&Number>) -> Result<Option<u64>, OpenAiError> {
    let Some(n) = v else {
        return Ok(None);
    };
    if let Some(u) = rbee_api::lenient::integer(n) {
        return Ok(Some(u));
    }
    // Negative seeds, `-3` or `-3.0`, as their two's-complement `u64`.
    let negative = n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f > i64::MIN as f64 && *f < 0.0)
            .map(|f| f as i64)
    });
    if let Some(i) = negative {
        return Ok(Some(u64::from_ne_bytes(i.to_ne_bytes())));
    }
    Err(OpenAiError::invalid(
        "seed",
        format!("`seed` must be an integer; given: {n}"),
    ))
}

/// Echoes a client's value in a message without letting it grow the message unboundedly.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(MAX).collect();
    t.push('…');
    t
}
