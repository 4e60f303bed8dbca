//! The request parts both OpenAI shapes share: function tools (nested on chat, flat on
//! Responses), `tool_choice` (either shape), an assistant's earlier calls, and JSON output
//! formats (`response_format` on chat, `text.format` on Responses) as the worker's grammar.

use rbee_api::{FunctionCall, FunctionDef, Grammar, Tool, ToolCall, ToolChoice};
use serde_json::Value;

use crate::error::OpenAiError;
use crate::request::{non_empty, truncate};

/// An assistant's earlier calls; `arguments` may be a JSON text (OpenAI's form) or an object.
pub(crate) fn history_calls(i: usize, v: &Value) -> Result<Vec<ToolCall>, OpenAiError> {
    let param = format!("messages[{i}].tool_calls");
    let bad = |what: &str| {
        OpenAiError::invalid(
            param.clone(),
            format!(
                "`{param}` must be an array of {{\"id\",\"type\":\"function\",\"function\":{{\"name\",\"arguments\"}}}}: {what}"
            ),
        )
    };
    let calls = v.as_array().ok_or_else(|| bad("not an array"))?;
    calls
        .iter()
        .map(|c| {
            let f = c
                .get("function")
                .ok_or_else(|| bad("a call lacks `function`"))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("a call lacks `function.name`"))?;
            let arguments = match f.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                Some(o @ Value::Object(_)) => o.to_string(),
                None => "{}".to_owned(),
                Some(_) => return Err(bad("`function.arguments` is a JSON text (or an object)")),
            };
            Ok(ToolCall {
                id: c
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                kind: "function".to_owned(),
                function: FunctionCall {
                    name: name.to_owned(),
                    arguments,
                },
            })
        })
        .collect()
}

/// Chat's `tools`: `{"type":"function","function":{"name","description","parameters"}}`.
pub(crate) fn tools(v: Option<&Value>) -> Result<Option<Vec<Tool>>, OpenAiError> {
    each_tool(v, |i, t| {
        serde_json::from_value(t.clone())
            .map_err(|e| OpenAiError::invalid(format!("tools[{i}]"), format!("`tools[{i}]`: {e}")))
    })
}

/// Responses' `tools`: `{"type":"function","name","description","parameters","strict"}`.
pub(crate) fn flat_tools(v: Option<&Value>) -> Result<Option<Vec<Tool>>, OpenAiError> {
    each_tool(v, |i, t| {
        let name = t.get("name").and_then(Value::as_str).ok_or_else(|| {
            OpenAiError::invalid(
                format!("tools[{i}].name"),
                format!("`tools[{i}].name` is required"),
            )
        })?;
        Ok(Tool {
            kind: "function".into(),
            function: FunctionDef {
                name: name.to_owned(),
                description: t
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                parameters: t.get("parameters").filter(|p| !p.is_null()).cloned(),
                strict: t.get("strict").and_then(Value::as_bool),
            },
        })
    })
}

/// Function tools only; an empty list is none.
fn each_tool(
    v: Option<&Value>,
    read: impl Fn(usize, &Value) -> Result<Tool, OpenAiError>,
) -> Result<Option<Vec<Tool>>, OpenAiError> {
    let Some(v) = v.filter(|v| non_empty(v)) else {
        return Ok(None);
    };
    let list = v
        .as_array()
        .ok_or_else(|| OpenAiError::invalid("tools", "`tools` must be an array of tools"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let kind = t.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind != "function" {
            return Err(OpenAiError::unsupported(
                format!("tools[{i}].type"),
                format!(
                    "`tools[{i}].type` {:?} is not supported by rbee; only \"function\" tools are",
                    truncate(kind)
                ),
            ));
        }
        out.push(read(i, t)?);
    }
    Ok(Some(out))
}

/// `auto`, `none`, `required`, or a function: `{"type":"function","function":{"name"}}` (chat)
/// or `{"type":"function","name"}` (Responses).
pub(crate) fn tool_choice(v: Option<&Value>) -> Result<Option<ToolChoice>, OpenAiError> {
    let bad = || {
        OpenAiError::invalid(
            "tool_choice",
            "`tool_choice` must be \"auto\", \"none\", \"required\" or \
             {\"type\":\"function\",\"function\":{\"name\":…}}",
        )
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Ok(Some(ToolChoice::Auto)),
            "none" => Ok(Some(ToolChoice::None)),
            "required" => Ok(Some(ToolChoice::Required)),
            _ => Err(bad()),
        },
        Some(o) => {
            // Chat's shape names it under `function`; Responses' beside `type`.
            let name = match o.get("function") {
                Some(f) => f.get("name"),
                None => o.get("name"),
            }
            .and_then(Value::as_str)
            .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
            .ok_or_else(bad)?;
            Ok(Some(ToolChoice::Function(name.to_owned())))
        }
    }
}

/// Chat's `response_format` as a grammar: `json_object` any object, `json_schema` its
/// `json_schema.schema`.
pub(crate) fn response_format(v: Option<&Value>) -> Result<Option<Grammar>, OpenAiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    if v.get("type").and_then(Value::as_str) == Some("json_schema")
        && v.get("json_schema").is_none()
    {
        return Err(OpenAiError::invalid(
            "response_format.json_schema",
            "`response_format.json_schema` is required with type \"json_schema\"",
        ));
    }
    let schema = v.get("json_schema").and_then(|j| j.get("schema"));
    json_format("response_format", v, schema)
}

/// Responses' `text.format` as a grammar: as `response_format`, the schema beside the type.
pub(crate) fn text_format(v: Option<&Value>) -> Result<Option<Grammar>, OpenAiError> {
    let Some(format) = v.and_then(|t| t.get("format")).filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    json_format("text.format", format, format.get("schema"))
}

fn json_format(
    param: &str,
    format: &Value,
    schema: Option<&Value>,
) -> Result<Option<Grammar>, OpenAiError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => match schema {
            // No schema: any JSON value.
            None | Some(Value::Null) => Ok(Some(Grammar::JsonSchema {
                schema: Value::Object(serde_json::Map::new()),
            })),
            Some(s) if s.is_object() || s.is_boolean() => {
                Ok(Some(Grammar::JsonSchema { schema: s.clone() }))
            }
            Some(_) => Err(OpenAiError::invalid(
                format!("{param}.schema"),
                format!("`{param}` schema must be a JSON schema object"),
            )),
        },
        other => Err(OpenAiError::invalid(
            param,
            format!(
                "`{param}.type` must be \"text\", \"json_object\" or \"json_schema\"; given: {}",
                other.map_or_else(|| "none".to_owned(), |k| format!("{:?}", truncate(k)))
            ),
        )),
    }
}
