//! Chat prompts rendered with the model's own Jinja template (`tokenizer.chat_template`).
//!
//! minijinja with the Python-compatible methods templates use (`.strip()`, `.startswith()`),
//! plus `raise_exception`, which templates call to reject a conversation (the message becomes
//! a client error). Models without a template get ChatML.
//!
//! Templates come with any GGUF from any hub repository, so rendering has a budget: at most
//! [`TEMPLATE_FUEL`] instructions and [`TEMPLATE_MAX_OUTPUT`] bytes; a template that loops or
//! balloons fails with a clear error instead of holding the worker.

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde::Serialize;

use crate::EngineError;

/// Instructions one rendering may run (a few thousand per message is typical).
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// Bytes one rendering may produce (a prompt longer than any context is useless).
pub const TEMPLATE_MAX_OUTPUT: usize = 4 << 20;

/// Used when the GGUF carries no template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Debug, Clone, Serialize)]
pub struct Message<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// A chat message with what tool calling adds, as Hugging Face templates read it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Turn {
    pub role: String,
    pub content: String,
    /// An assistant's calls: `{"id","type":"function","function":{"name","arguments"}}`, the
    /// arguments as an object (what templates print with `tojson`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// How a model family writes tool calls, read from its chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name":…,"arguments":…}</tool_call>` (Hermes, Qwen 2.5/3, SmolLM3, and
    /// rbee's own prompt for templates that know no tools).
    Hermes,
    /// A bare `{"name":…,"parameters":…}` object (Llama 3.1+).
    Llama3,
    /// `[TOOL_CALLS][{"name":…,"arguments":…}]` (Mistral).
    Mistral,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// The template renders a `tools` variable itself.
    native_tools: bool,
    tool_format: ToolFormat,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

fn raise_exception(msg: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| EngineError::Template(format!("chat template does not parse: {e}")))?;
        let tool_format = if source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if source.contains("<|python_tag|>") || source.contains("ipython") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        };
        Ok(Self {
            env,
            bos: bos.to_owned(),
            eos: eos.to_owned(),
            native_tools: source.contains("tools"),
            tool_format,
        })
    }

    /// Whether the template shows tools to the model itself (else the caller describes them).
    pub fn native_tools(&self) -> bool {
        self.native_tools
    }

    pub fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    /// Renders the conversation with the assistant's turn opened.
    pub fn render(&self, messages: &[Message<'_>]) -> Result<String, EngineError> {
        self.render_with(messages, None)
    }

    /// Renders turns, with `tools` (OpenAI's tool objects) given to the template.
    pub fn render_turns(
        &self,
        turns: &[Turn],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, EngineError> {
        self.render_with(turns, tools)
    }

    fn render_with<M: Serialize>(
        &self,
        messages: &[M],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, EngineError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let mut out = Capped(Vec::new());
        let rendered = tmpl.render_captured_to(
            context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => true,
                bos_token => &self.bos,
                eos_token => &self.eos,
            },
            &mut out,
        );
        if let Err(e) = rendered {
            let detail = match e.kind() {
                ErrorKind::OutOfFuel => format!(
                    "the model's chat template ran past its budget of {TEMPLATE_FUEL} instructions (a loop?)"
                ),
                ErrorKind::WriteFailure => format!(
                    "the model's chat template produced more than {TEMPLATE_MAX_OUTPUT} bytes"
                ),
                // The template's own complaint (raise_exception) is the useful part.
                _ => e
                    .detail()
                    .map(str::to_owned)
                    .unwrap_or_else(|| e.to_string()),
            };
            return Err(EngineError::Template(detail));
        }
        String::from_utf8(out.0)
            .map_err(|_| EngineError::Template("the chat template produced invalid UTF-8".into()))
    }
}

/// A rendering's output, refused past [`TEMPLATE_MAX_OUTPUT`] bytes.
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > TEMPLATE_MAX_OUTPUT {
            return Err(std::io::Error::other("output budget exceeded"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let out = t
            .render(&[Message {
                role: "user",
                content: "Hi",
            }])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_a_template_error_with_its_message() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}",
            "",
            "",
        )
        .unwrap();
        let err = t
            .render(&[Message {
                role: "assistant",
                content: "x",
            }])
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn tools_reach_templates_that_read_them() {
        let t = ChatTemplate::new(
            "{% if tools %}{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}\
             {% for m in messages %}{{ m.role }}:{{ m.content }}\
             {% if m.tool_calls %}{{ m.tool_calls[0].function.arguments | tojson }}{% endif %};{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(t.native_tools());
        assert_eq!(t.tool_format(), ToolFormat::Hermes);
        let tools = [serde_json::json!({"type": "function", "function": {"name": "f"}})];
        let turns = [Turn {
            role: "assistant".into(),
            tool_calls: Some(vec![serde_json::json!(
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
            )]),
            ..Turn::default()
        }];
        let out = t.render_turns(&turns, Some(&tools)).unwrap();
        assert_eq!(out, r#"f;assistant:{"a":1};"#);
        assert!(!ChatTemplate::new(CHATML, "", "").unwrap().native_tools());
        let mistral = ChatTemplate::new("{{ '[TOOL_CALLS]' }}{{ tools }}", "", "").unwrap();
        assert_eq!(mistral.tool_format(), ToolFormat::Mistral);
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0]['content'].strip() }}", "", "").unwrap();
        let out = t
            .render(&[Message {
                role: "user",
                content: "  x  ",
            }])
            .unwrap();
        assert_eq!(out, "x");
    }

    #[test]
    fn a_template_that_loops_or_balloons_is_stopped_with_a_clear_error() {
        let hi = [Message {
            role: "user",
            content: "Hi",
        }];
        let looping = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        let err = looping.render(&hi).unwrap_err().to_string();
        assert!(err.contains("budget"), "{err}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(30));
        let ballooning = ChatTemplate::new(
            "{% for a in range(10000) %}{{ 'x' * 1000 }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let err = ballooning.render(&hi).unwrap_err().to_string();
        assert!(err.contains("more than"), "{err}");
    }
}
