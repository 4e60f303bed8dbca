//! Turns a client's `InferenceRequest` into engine parameters, or a 400 that names the field,
//! the limit and the value given.

use rbee_api::{InferenceRequest, ToolChoice};
use rbee_engine::{Grammar, MAX_TOP_LOGPROBS, Prompt, SamplingParams, ToolFormat};

use crate::tools;

/// Roles the chat endpoint accepts.
pub const ROLES: &[&str] = &["system", "user", "assistant", "tool"];
pub use rbee_api::MAX_CHOICES;
pub const MAX_STOP_SEQUENCES: usize = 8;
/// Characters of one stop sequence at most.
pub const MAX_STOP_CHARS: usize = 128;
pub const MAX_MESSAGES: usize = 1024;
/// `max_tokens` when the client gives none (capped by the room left in the context).
pub const DEFAULT_MAX_TOKENS: usize = 512;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: String) -> ValidationError {
    ValidationError {
        field: field.to_owned(),
        message,
    }
}

/// A request that passed validation; `max_tokens` is settled once the prompt is tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Alternatives per token, when log-probabilities were asked for.
    pub logprobs: Option<usize>,
    /// Answers to generate.
    pub n: usize,
    /// What every answer must follow (asked for, or a forced tool call's).
    pub grammar: Option<Grammar>,
    /// Parse tool calls out of the answers: how they are written, and the functions there are.
    pub calls: Option<(ToolFormat, Vec<String>)>,
}

/// What validation needs to know of the loaded model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelFacts {
    pub context_length: usize,
    pub vocab_size: usize,
    /// The chat template shows tools itself.
    pub native_tools: bool,
    pub tool_format: ToolFormat,
}

pub fn validate(
    req: InferenceRequest,
    model: ModelFacts,
    random_seed: u64,
) -> Result<ValidRequest, ValidationError> {
    let ModelFacts {
        context_length,
        vocab_size,
        ..
    } = model;
    let tool_list = req.tools.clone().unwrap_or_default();
    let choice = req.tool_choice.clone().unwrap_or(ToolChoice::Auto);
    tools::check(&tool_list, req.tool_choice.as_ref(), req.messages.is_some())
        .map_err(|(field, m)| invalid(field, m))?;
    let shown: &[rbee_api::Tool] = if choice == ToolChoice::None {
        &[]
    } else {
        &tool_list
    };
    let prompt = match (req.prompt, req.messages) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "prompt",
                "`prompt` and `messages` are mutually exclusive; give one".into(),
            ));
        }
        (None, None) => {
            return Err(invalid(
                "prompt",
                "one of `prompt` or `messages` is required".into(),
            ));
        }
        (Some(p), None) => {
            if p.is_empty() {
                return Err(invalid("prompt", "`prompt` must not be empty".into()));
            }
            Prompt::Text(p)
        }
        (None, Some(msgs)) => {
            if msgs.is_empty() {
                return Err(invalid(
                    "messages",
                    "`messages` must hold at least one message".into(),
                ));
            }
            if msgs.len() > MAX_MESSAGES {
                return Err(invalid(
                    "messages",
                    format!(
                        "`messages` must hold at most {MAX_MESSAGES} messages; given: {}",
                        msgs.len()
                    ),
                ));
            }
            for (i, m) in msgs.iter().enumerate() {
                if !ROLES.contains(&m.role.as_str()) {
                    return Err(invalid(
                        "messages",
                        format!(
                            "`messages[{i}].role` must be one of {}; given: {:?}",
                            ROLES.join(", "),
                            truncate(&m.role)
                        ),
                    ));
                }
            }
            let plain = msgs.iter().all(|m| {
                m.role != "tool"
                    && m.tool_calls.is_none()
                    && m.tool_call_id.is_none()
                    && m.name.is_none()
            });
            if plain && shown.is_empty() {
                Prompt::Chat(msgs.into_iter().map(|m| (m.role, m.content)).collect())
            } else {
                tools::conversation(msgs, shown, model.native_tools)
            }
        }
    };

    let max_tokens = match req.max_tokens {
        Some(0) => {
            return Err(invalid(
                "max_tokens",
                "`max_tokens` must be >= 1; given: 0".into(),
            ));
        }
        Some(n) if n as usize > context_length => {
            return Err(invalid(
                "max_tokens",
                format!(
                    "`max_tokens` must be <= {context_length} (the context length); given: {n}"
                ),
            ));
        }
        Some(n) => Some(n as usize),
        None => None,
    };

    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(
            "temperature",
            format!("`temperature` must be in [0, 2]; given: {temperature}"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(
            "top_p",
            format!("`top_p` must be in (0, 1]; given: {top_p}"),
        ));
    }
    let min_p = req.min_p.unwrap_or(0.0);
    if !(0.0..1.0).contains(&min_p) {
        return Err(invalid(
            "min_p",
            format!("`min_p` must be in [0, 1); given: {min_p}"),
        ));
    }
    let repetition_penalty = req.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(invalid(
            "repetition_penalty",
            format!("`repetition_penalty` must be in (0, 10]; given: {repetition_penalty}"),
        ));
    }
    let repetition_window = req.repetition_window.unwrap_or(64) as usize;
    if repetition_window > context_length {
        return Err(invalid(
            "repetition_window",
            format!(
                "`repetition_window` must be <= {context_length} (the context length); given: {repetition_window}"
            ),
        ));
    }
    let mut penalties = [0.0f32; 2];
    for (i, (field, v)) in [
        ("presence_penalty", req.presence_penalty),
        ("frequency_penalty", req.frequency_penalty),
    ]
    .into_iter()
    .enumerate()
    {
        let v = v.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&v) {
            return Err(invalid(
                field,
                format!("`{field}` must be in [-2, 2]; given: {v}"),
            ));
        }
        penalties[i] = v as f32;
    }
    let logit_bias = logit_bias(req.logit_bias.unwrap_or_default(), vocab_size)?;
    let stop = req.stop.unwrap_or_default();
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(invalid(
            "stop",
            format!(
                "`stop` may hold at most {MAX_STOP_SEQUENCES} sequences; given: {}",
                stop.len()
            ),
        ));
    }
    for (i, s) in stop.iter().enumerate() {
        if s.is_empty() {
            return Err(invalid("stop", format!("`stop[{i}]` must not be empty")));
        }
        let chars = s.chars().count();
        if chars > MAX_STOP_CHARS {
            return Err(invalid(
                "stop",
                format!("`stop[{i}]` must be at most {MAX_STOP_CHARS} characters; given: {chars}"),
            ));
        }
    }
    let logprobs = match req.logprobs {
        Some(k) if k as usize > MAX_TOP_LOGPROBS => {
            return Err(invalid(
                "logprobs",
                format!("`logprobs` must be in [0, {MAX_TOP_LOGPROBS}]; given: {k}"),
            ));
        }
        k => k.map(|k| k as usize),
    };
    let n = req.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(invalid(
            "n",
            format!("`n` must be in [1, {MAX_CHOICES}]; given: {n}"),
        ));
    }
    let forced = tools::forced_call_grammar(
        model.tool_format,
        &tool_list,
        &choice,
        req.parallel_tool_calls.unwrap_or(true),
    );
    // An answer held to the client's own grammar is that grammar's text, never calls.
    let parse_calls = !shown.is_empty() && (req.grammar.is_none() || forced.is_some());
    let grammar = match (req.grammar, forced) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "grammar",
                "`grammar` and a forced tool call (`tool_choice` \"required\" or a function) cannot be combined".into(),
            ));
        }
        (Some(g), None) => Some(match g {
            rbee_api::Grammar::JsonObject => Grammar::JsonObject,
            rbee_api::Grammar::JsonSchema { schema } => Grammar::JsonSchema(schema),
            rbee_api::Grammar::Lark { grammar } => Grammar::Lark(grammar),
            rbee_api::Grammar::Regex { pattern } => Grammar::Regex(pattern),
        }),
        (None, forced) => forced,
    };
    Ok(ValidRequest {
        logprobs,
        n: n as usize,
        grammar,
        calls: parse_calls.then(|| {
            let names = shown.iter().map(|t| t.function.name.clone()).collect();
            (model.tool_format, names)
        }),
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: req.top_k.unwrap_or(0) as usize,
            min_p: min_p as f32,
            repetition_penalty: repetition_penalty as f32,
            repetition_window,
            presence_penalty: penalties[0],
            frequency_penalty: penalties[1],
            logit_bias,
            seed: req.seed.unwrap_or(random_seed),
        },
        stop,
    })
}

/// Most `logit_bias` entries (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

/// `logit_bias`: token ids of this model's vocabulary → biases in [-100, 100].
fn logit_bias(
    bias: std::collections::BTreeMap<String, f64>,
    vocab_size: usize,
) -> Result<Vec<(u32, f32)>, ValidationError> {
    if bias.len() > MAX_LOGIT_BIAS {
        return Err(invalid(
            "logit_bias",
            format!(
                "`logit_bias` may hold at most {MAX_LOGIT_BIAS} tokens; given: {}",
                bias.len()
            ),
        ));
    }
    bias.into_iter()
        .map(|(k, v)| {
            let id = k
                .parse::<u32>()
                .ok()
                .filter(|id| (*id as usize) < vocab_size)
                .ok_or_else(|| {
                    invalid(
                        "logit_bias",
                        format!(
                            "`logit_bias` keys are token ids of this model, 0..{vocab_size}; given: {:?}",
                            k.chars().take(32).collect::<String>()
                        ),
                    )
                })?;
            if !(-100.0..=100.0).contains(&v) {
                return Err(invalid(
                    "logit_bias",
                    format!("`logit_bias` values must be in [-100, 100]; given: {v} for token {id}"),
                ));
            }
            Ok((id, v as f32))
        })
        .collect()
}

/// Settles `max_tokens` against the prompt: prompt + max_tokens must fit the context, never
/// silently trimmed.
pub fn fit_to_context(
    prompt_tokens: usize,
    max_tokens: Option<usize>,
    context_length: usize,
) -> Result<usize, ValidationError> {
    let room = context_length.saturating_sub(prompt_tokens);
    match max_tokens {
        Some(n) if prompt_tokens + n > context_length => Err(invalid(
            "max_tokens",
            format!(
                "prompt ({prompt_tokens} tokens) + `max_tokens` ({n}) must be <= {context_length} (the context length)"
            ),
        )),
        Some(n) => Ok(n),
        None if room == 0 => Err(invalid(
            "prompt",
            format!(
                "the prompt ({prompt_tokens} tokens) leaves no room in the context of {context_length} tokens"
            ),
        )),
        None => Ok(room.min(DEFAULT_MAX_TOKENS)),
    }
}

/// Client strings echoed in errors are cut short so an error never carries a huge payload.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rbee_api::ChatMessage;

    const CTX: usize = 8192;
    const VOCAB: usize = 49152;
    const MODEL: ModelFacts = ModelFacts {
        context_length: CTX,
        vocab_size: VOCAB,
        native_tools: false,
        tool_format: ToolFormat::Hermes,
    };

    fn prompt(p: &str) -> InferenceRequest {
        InferenceRequest {
            prompt: Some(p.into()),
            ..InferenceRequest::default()
        }
    }

    fn err(req: InferenceRequest) -> ValidationError {
        validate(req, MODEL, 1).unwrap_err()
    }

    #[test]
    fn a_plain_prompt_gets_defaults() {
        let v = validate(prompt("hi"), MODEL, 99).unwrap();
        assert_eq!(v.prompt, Prompt::Text("hi".into()));
        assert_eq!(v.sampling.temperature, 1.0);
        assert_eq!(v.sampling.seed, 99);
        assert_eq!(v.max_tokens, None);
    }

    #[test]
    fn prompt_and_messages_are_exclusive_and_one_is_required() {
        let mut both = prompt("x");
        both.messages = Some(vec![]);
        assert!(err(both).message.contains("mutually exclusive"));
        assert!(
            err(InferenceRequest::default())
                .message
                .contains("is required")
        );
    }

    #[test]
    fn empty_prompt_is_refused() {
        assert_eq!(err(prompt("")).field, "prompt");
    }

    #[test]
    fn bad_role_names_index_and_value() {
        let req = InferenceRequest {
            messages: Some(vec![
                ChatMessage {
                    role: "user".into(),
                    content: "a".into(),
                    ..ChatMessage::default()
                },
                ChatMessage {
                    role: "robot".into(),
                    content: "b".into(),
                    ..ChatMessage::default()
                },
            ]),
            ..InferenceRequest::default()
        };
        let e = err(req);
        assert!(
            e.message.contains("messages[1].role") && e.message.contains("robot"),
            "{e}"
        );
    }

    #[test]
    fn max_tokens_bounds() {
        let mut r = prompt("x");
        r.max_tokens = Some(0);
        assert!(err(r.clone()).message.contains(">= 1; given: 0"));
        r.max_tokens = Some(9000);
        let e = err(r);
        assert!(
            e.message.contains("<= 8192") && e.message.contains("9000"),
            "{e}"
        );
    }

    #[test]
    fn sampling_ranges() {
        type Setter = fn(&mut InferenceRequest);
        let cases: Vec<(Setter, &str)> = vec![
            (|r| r.temperature = Some(2.5), "temperature"),
            (|r| r.temperature = Some(-0.1), "temperature"),
            (|r| r.top_p = Some(0.0), "top_p"),
            (|r| r.top_p = Some(1.5), "top_p"),
            (|r| r.min_p = Some(1.0), "min_p"),
            (|r| r.repetition_penalty = Some(0.0), "repetition_penalty"),
            (|r| r.repetition_window = Some(100_000), "repetition_window"),
        ];
        for (set, field) in cases {
            let mut r = prompt("x");
            set(&mut r);
            let e = err(r);
            assert_eq!(e.field, field);
            assert!(e.message.contains("given"), "{e}");
        }
    }

    #[test]
    fn stop_sequence_limits() {
        let mut r = prompt("x");
        r.stop = Some(vec!["a".into(); 9]);
        assert!(err(r.clone()).message.contains("at most 8"));
        r.stop = Some(vec!["".into()]);
        assert!(err(r.clone()).message.contains("stop[0]"));
        r.stop = Some(vec!["x".repeat(200)]);
        assert!(err(r.clone()).message.contains("given: 200"));
        // Characters, not bytes: 128 three-byte characters pass.
        r.stop = Some(vec!["€".repeat(128)]);
        assert!(validate(r, MODEL, 1).is_ok());
    }

    #[test]
    fn context_fit_is_never_trimmed() {
        assert_eq!(fit_to_context(10, Some(5), 20), Ok(5));
        assert!(fit_to_context(10, Some(11), 20).is_err());
        assert_eq!(fit_to_context(10, None, 20), Ok(10));
        assert_eq!(fit_to_context(10, None, 10_000), Ok(DEFAULT_MAX_TOKENS));
        assert!(fit_to_context(20, None, 20).is_err());
    }

    #[test]
    fn long_values_are_truncated_in_messages() {
        assert!(truncate(&"é".repeat(100)).len() < 80);
    }
}
