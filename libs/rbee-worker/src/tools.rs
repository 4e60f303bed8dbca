//! Tool calling: tools shown to the model (through its own chat template, or a Hermes-style
//! system prompt when the template knows no tools), forced calls constrained by the functions'
//! JSON schemas, and calls parsed out of the answer in the model family's format.

use rbee_api::{ChatMessage, FunctionCall, Tool, ToolCall, ToolChoice};
use rbee_engine::{Grammar, Prompt, ToolFormat, Turn, compact_json_schema};
use serde_json::{Map, Value};

use crate::validate::truncate;

/// Most tools one request may carry.
pub const MAX_TOOLS: usize = 128;
/// Most calls one forced answer may hold (a small model may otherwise repeat calls until
/// `max_tokens`).
pub const MAX_FORCED_CALLS: usize = 8;

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";

/// A tool as the template (and the fallback prompt) sees it: OpenAI's object.
fn tool_value(t: &Tool) -> Value {
    let mut f = Map::new();
    f.insert("name".into(), Value::String(t.function.name.clone()));
    if let Some(d) = &t.function.description {
        f.insert("description".into(), Value::String(d.clone()));
    }
    f.insert("parameters".into(), parameters(t));
    let mut o = Map::new();
    o.insert("type".into(), Value::String("function".into()));
    o.insert("function".into(), Value::Object(f));
    Value::Object(o)
}

fn parameters(t: &Tool) -> Value {
    t.function
        .parameters
        .clone()
        .unwrap_or_else(|| Value::Object(Map::from_iter([("type".into(), "object".into())])))
}

/// Arguments as templates print them: the object when the text parses, else the text.
fn arguments_value(arguments: &str) -> Value {
    serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_owned()))
}

fn call_value(c: &ToolCall) -> Value {
    let mut f = Map::new();
    f.insert("name".into(), Value::String(c.function.name.clone()));
    f.insert("arguments".into(), arguments_value(&c.function.arguments));
    let mut o = Map::new();
    o.insert("id".into(), Value::String(c.id.clone()));
    o.insert("type".into(), Value::String("function".into()));
    o.insert("function".into(), Value::Object(f));
    Value::Object(o)
}

/// `{"name":…,"arguments":…}` on one line, as the fallback prompt asks calls to be written.
fn hermes_call_text(c: &ToolCall) -> String {
    let mut o = Map::new();
    o.insert("name".into(), Value::String(c.function.name.clone()));
    o.insert("arguments".into(), arguments_value(&c.function.arguments));
    Value::Object(o).to_string()
}

fn fallback_preamble(tools: &[Tool]) -> String {
    let listed: Vec<String> = tools.iter().map(|t| tool_value(t).to_string()).collect();
    format!(
        "You are a function calling AI model. You are provided with function signatures within \
         <tools></tools> XML tags. You may call one or more functions to assist with the user \
         query. Don't make assumptions about what values to plug into functions. Here are the \
         available tools: <tools>\n{}\n</tools>\nFor each function call return a json object \
         with function name and arguments within <tool_call></tool_call> XML tags:\n\
         <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
        listed.join("\n")
    )
}

/// The conversation the engine renders. `native`: the template shows tools itself.
pub fn conversation(messages: Vec<ChatMessage>, tools: &[Tool], native: bool) -> Prompt {
    if native {
        let turns = messages
            .into_iter()
            .map(|m| Turn {
                tool_calls: m
                    .tool_calls
                    .map(|calls| calls.iter().map(call_value).collect()),
                role: m.role,
                content: m.content,
                tool_call_id: m.tool_call_id,
                name: m.name,
            })
            .collect();
        let tools = (!tools.is_empty()).then(|| tools.iter().map(tool_value).collect());
        return Prompt::Conversation { turns, tools };
    }
    let mut turns: Vec<Turn> = messages
        .into_iter()
        .map(|m| match m.role.as_str() {
            "tool" => Turn {
                role: "user".into(),
                content: format!("<tool_response>\n{}\n</tool_response>", m.content),
                ..Turn::default()
            },
            _ => {
                let mut content = m.content;
                for c in m.tool_calls.iter().flatten() {
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&format!(
                        "{HERMES_OPEN}\n{}\n{HERMES_CLOSE}",
                        hermes_call_text(c)
                    ));
                }
                Turn {
                    role: m.role,
                    content,
                    ..Turn::default()
                }
            }
        })
        .collect();
    if !tools.is_empty() {
        let preamble = fallback_preamble(tools);
        match turns.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{preamble}", first.content);
            }
            _ => turns.insert(
                0,
                Turn {
                    role: "system".into(),
                    content: preamble,
                    ..Turn::default()
                },
            ),
        }
    }
    Prompt::Conversation { turns, tools: None }
}

/// The grammar of a forced call (`required` or a named function), in the model's format.
pub fn forced_call_grammar(
    format: ToolFormat,
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
) -> Option<Grammar> {
    let chosen: Vec<&Tool> = match choice {
        ToolChoice::Auto | ToolChoice::None => return None,
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Function(name) => tools.iter().filter(|t| &t.function.name == name).collect(),
    };
    let args_key = match format {
        ToolFormat::Llama3 => "parameters",
        ToolFormat::Hermes | ToolFormat::Mistral => "arguments",
    };
    let variants: Vec<Value> = chosen
        .iter()
        .map(|t| {
            let mut props = Map::new();
            props.insert(
                "name".into(),
                Value::Object(Map::from_iter([(
                    "const".into(),
                    Value::String(t.function.name.clone()),
                )])),
            );
            props.insert(args_key.into(), parameters(t));
            let mut o = Map::new();
            o.insert("type".into(), "object".into());
            o.insert("properties".into(), Value::Object(props));
            o.insert(
                "required".into(),
                Value::Array(vec!["name".into(), args_key.into()]),
            );
            o.insert("additionalProperties".into(), Value::Bool(false));
            compact_json_schema(Value::Object(o))
        })
        .collect();
    let schema = match variants.as_slice() {
        [one] => one.clone(),
        _ => Value::Object(Map::from_iter([("anyOf".into(), Value::Array(variants))])),
    };
    let call = format!("call: %json {schema}\n");
    let grammar = match (format, parallel) {
        (ToolFormat::Hermes, true) => format!(
            "start: tagged more{{0,{}}}\nmore: \"\\n\" tagged\ntagged: \"{HERMES_OPEN}\\n\" call \"\\n{HERMES_CLOSE}\"\n{call}",
            MAX_FORCED_CALLS - 1
        ),
        (ToolFormat::Hermes, false) => {
            format!("start: \"{HERMES_OPEN}\\n\" call \"\\n{HERMES_CLOSE}\"\n{call}")
        }
        (ToolFormat::Llama3, _) => format!("start: call\n{call}"),
        (ToolFormat::Mistral, true) => format!(
            "start: \"[\" call more{{0,{}}} \"]\"\nmore: \",\" call\n{call}",
            MAX_FORCED_CALLS - 1
        ),
        (ToolFormat::Mistral, false) => format!("start: \"[\" call \"]\"\n{call}"),
    };
    Some(Grammar::Lark(grammar))
}

/// Finds tool calls in an answer as it streams: text before a call passes through, a call is
/// held until the end and then parsed. Text that does not parse as calls is given back as text.
#[derive(Debug)]
pub struct CallParser {
    format: ToolFormat,
    /// The functions there are: a "call" to any other is text.
    names: Vec<String>,
    /// Text not passed on yet: a possible start of a call, or the calls themselves.
    held: String,
    holding: bool,
    /// For formats whose calls are the whole answer: whether the answer began as text.
    plain: bool,
}

impl CallParser {
    pub fn new(format: ToolFormat, names: Vec<String>) -> Self {
        Self {
            format,
            names,
            held: String::new(),
            holding: false,
            plain: false,
        }
    }

    /// What of `text` may be sent on now.
    pub fn push(&mut self, text: &str) -> String {
        if self.holding {
            self.held.push_str(text);
            return String::new();
        }
        if self.plain {
            return text.to_owned();
        }
        self.held.push_str(text);
        match self.format {
            ToolFormat::Hermes => {
                if let Some(at) = self.held.find(HERMES_OPEN) {
                    self.holding = true;
                    let before = self.held[..at].to_owned();
                    self.held.replace_range(..at, "");
                    return before;
                }
                // Keep a tail that may be the start of the tag.
                let keep = (1..HERMES_OPEN.len())
                    .rev()
                    .find(|&n| {
                        self.held.len() >= n
                            && self.held.is_char_boundary(self.held.len() - n)
                            && HERMES_OPEN.starts_with(&self.held[self.held.len() - n..])
                    })
                    .unwrap_or(0);
                let cut = self.held.len() - keep;
                let out = self.held[..cut].to_owned();
                self.held.replace_range(..cut, "");
                out
            }
            ToolFormat::Llama3 | ToolFormat::Mistral => {
                let open = if self.format == ToolFormat::Llama3 {
                    '{'
                } else {
                    '['
                };
                match self.held.trim_start().chars().next() {
                    None => String::new(),
                    Some(c) if c == open => {
                        self.holding = true;
                        String::new()
                    }
                    Some(_) => {
                        self.plain = true;
                        std::mem::take(&mut self.held)
                    }
                }
            }
        }
    }

    /// The text still to send and the calls found.
    pub fn finish(self) -> (String, Vec<ToolCall>) {
        if !self.holding {
            return (self.held, Vec::new());
        }
        let objects = match self.format {
            ToolFormat::Hermes => hermes_objects(&self.held),
            ToolFormat::Llama3 => json_sequence(&self.held),
            ToolFormat::Mistral => serde_json::from_str::<Vec<Value>>(self.held.trim()).ok(),
        };
        // Bare JSON (Llama 3, Mistral) is a call only with its arguments; a tagged call may
        // leave them out.
        let needs_arguments = self.format != ToolFormat::Hermes;
        let calls: Option<Vec<ToolCall>> = objects.filter(|o| !o.is_empty()).and_then(|objs| {
            objs.iter()
                .map(|o| to_call(o, &self.names, needs_arguments))
                .collect()
        });
        match calls {
            Some(calls) => (String::new(), calls),
            None => (self.held, Vec::new()),
        }
    }
}

/// The JSON inside each `<tool_call>…</tool_call>`. The last may lack its closing tag; when
/// `max_tokens` cut it mid-call, the complete calls before it still count.
fn hermes_objects(text: &str) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while let Some(after) = rest.strip_prefix(HERMES_OPEN) {
        let (body, tail, closed) = match after.find(HERMES_CLOSE) {
            Some(end) => (&after[..end], &after[end + HERMES_CLOSE.len()..], true),
            None => (after, "", false),
        };
        match serde_json::from_str(body.trim()) {
            Ok(v) => out.push(v),
            Err(_) if !closed && !out.is_empty() => return Some(out),
            Err(_) => return None,
        }
        rest = tail.trim_start();
    }
    rest.is_empty().then_some(out)
}

/// Objects one after another, separated by whitespace or `;` (Llama 3's parallel calls).
fn json_sequence(text: &str) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let mut it = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = it.next()?.ok()?;
        out.push(v);
        rest = rest[it.byte_offset()..].trim_start_matches(|c: char| c.is_whitespace() || c == ';');
    }
    Some(out)
}

fn to_call(v: &Value, names: &[String], needs_arguments: bool) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_owned();
    if !names.contains(&name) {
        return None;
    }
    let args = v.get("arguments").or_else(|| v.get("parameters"));
    if needs_arguments && args.is_none() {
        return None;
    }
    let arguments = match args {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "{}".to_owned(),
    };
    Some(ToolCall {
        id: format!(
            "call_{:016x}{:08x}",
            rand::random::<u64>(),
            rand::random::<u32>()
        ),
        kind: "function".into(),
        function: FunctionCall { name, arguments },
    })
}

/// Checks tools and the choice; the first problem as (field, message).
pub fn check(
    tools: &[Tool],
    choice: Option<&ToolChoice>,
    chat: bool,
) -> Result<(), (&'static str, String)> {
    if !tools.is_empty() && !chat {
        return Err((
            "tools",
            "`tools` needs `messages` (a chat), not `prompt`".into(),
        ));
    }
    if tools.len() > MAX_TOOLS {
        return Err((
            "tools",
            format!(
                "`tools` may hold at most {MAX_TOOLS} tools; given: {}",
                tools.len()
            ),
        ));
    }
    for (i, t) in tools.iter().enumerate() {
        if t.kind != "function" {
            return Err((
                "tools",
                format!(
                    "`tools[{i}].type` must be \"function\"; given: {:?}",
                    t.kind
                ),
            ));
        }
        let n = &t.function.name;
        if n.is_empty()
            || n.len() > 64
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err((
                "tools",
                format!(
                    "`tools[{i}].function.name` must be 1-64 letters, digits, `_`, `-` or `.`; given: {:?}",
                    truncate(n)
                ),
            ));
        }
        if t.function
            .parameters
            .as_ref()
            .is_some_and(|p| !p.is_object())
        {
            return Err((
                "tools",
                format!("`tools[{i}].function.parameters` must be a JSON schema object"),
            ));
        }
    }
    match choice {
        Some(ToolChoice::Required) if tools.is_empty() => Err((
            "tool_choice",
            "`tool_choice` \"required\" needs `tools`".into(),
        )),
        Some(ToolChoice::Function(name)) if !tools.iter().any(|t| &t.function.name == name) => {
            Err((
                "tool_choice",
                format!(
                    "`tool_choice` names the function {:?}, which is not in `tools`",
                    truncate(name)
                ),
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(format: ToolFormat, pieces: &[&str]) -> (String, Vec<ToolCall>) {
        let names = ["f", "g"].map(String::from).to_vec();
        let mut p = CallParser::new(format, names);
        let mut text: String = pieces.iter().map(|s| p.push(s)).collect();
        let (tail, calls) = p.finish();
        text.push_str(&tail);
        (text, calls)
    }

    #[test]
    fn hermes_calls_are_found_across_pieces() {
        let (text, calls) = feed(
            ToolFormat::Hermes,
            &[
                "Sure. <tool",
                "_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>",
                "\n<tool_call>{\"name\":\"g\",\"arguments\":{}}</tool_call>",
            ],
        );
        assert_eq!(text, "Sure. ");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.name, "f");
        assert_eq!(calls[0].function.arguments, r#"{"x":1}"#);
        assert_eq!(calls[1].function.name, "g");
        assert!(calls[0].id.starts_with("call_") && calls[0].id != calls[1].id);
    }

    #[test]
    fn text_that_only_looks_like_a_call_stays_text() {
        let (text, calls) = feed(ToolFormat::Hermes, &["a <tool_call> not json"]);
        assert_eq!((text.as_str(), calls.len()), ("a <tool_call> not json", 0));
        // Cut mid-call by max_tokens: the complete call before counts.
        let (text, calls) = feed(
            ToolFormat::Hermes,
            &["<tool_call>\n{\"name\":\"f\",\"arguments\":{}}\n</tool_call>\n<tool_call>\n{\"na"],
        );
        assert_eq!((text.as_str(), calls.len()), ("", 1));
        let (text, calls) = feed(ToolFormat::Hermes, &["just <tool"]);
        assert_eq!((text.as_str(), calls.len()), ("just <tool", 0));
        let (text, calls) = feed(ToolFormat::Llama3, &["  Hello {x}"]);
        assert_eq!((text.as_str(), calls.len()), ("  Hello {x}", 0));
    }

    #[test]
    fn only_declared_functions_with_arguments_are_calls() {
        // A JSON answer that merely has a `name` is text.
        let (text, calls) = feed(ToolFormat::Llama3, &[r#"{"name": "Alice", "age": 3}"#]);
        assert_eq!(
            (text.as_str(), calls.len()),
            (r#"{"name": "Alice", "age": 3}"#, 0)
        );
        let (_, calls) = feed(ToolFormat::Llama3, &[r#"{"name": "f"}"#]);
        assert!(calls.is_empty());
        let (_, calls) = feed(
            ToolFormat::Hermes,
            &["<tool_call>{\"name\":\"nope\"}</tool_call>"],
        );
        assert!(calls.is_empty());
    }

    #[test]
    fn llama3_and_mistral_calls_parse() {
        let (_, calls) = feed(
            ToolFormat::Llama3,
            &[
                "{\"name\": \"f\", \"parameters\": {\"a\": \"b\"}}; {\"name\": \"g\", \"parameters\": {}}",
            ],
        );
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.arguments, r#"{"a":"b"}"#);
        let (_, calls) = feed(
            ToolFormat::Mistral,
            &["[{\"name\":\"f\",\"arguments\":{}}]"],
        );
        assert_eq!(calls[0].function.name, "f");
    }

    #[test]
    fn templates_without_tools_get_a_system_prompt_and_tagged_history() {
        let tool: Tool = serde_json::from_value(serde_json::json!(
            {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
        ))
        .unwrap();
        let call = ToolCall {
            id: "c1".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
        };
        let msgs = vec![
            ChatMessage {
                role: "user".into(),
                content: "Weather?".into(),
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "assistant".into(),
                content: String::new(),
                tool_calls: Some(vec![call]),
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "sunny".into(),
                tool_call_id: Some("c1".into()),
                ..ChatMessage::default()
            },
        ];
        let Prompt::Conversation { turns, tools } = conversation(msgs, &[tool], false) else {
            panic!("a conversation");
        };
        assert!(tools.is_none());
        assert_eq!(turns[0].role, "system");
        assert!(turns[0].content.contains(r#""name":"weather""#));
        assert_eq!(
            turns[2].content,
            "<tool_call>\n{\"name\":\"weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>"
        );
        assert_eq!(turns[3].role, "user");
        assert_eq!(turns[3].content, "<tool_response>\nsunny\n</tool_response>");
    }
}
