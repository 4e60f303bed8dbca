//! JSON schemas of the request fields serde reads as free JSON (`tools`, `response_format`,
//! Responses `input` items, …), so that `/openapi.json` states what the code accepts: a body
//! valid under the document is served, one that is not is refused.

use schemars::{Schema, SchemaGenerator, json_schema};
use serde_json::{Value, json};

/// `schema`, or null.
fn nullable(schema: Value) -> Schema {
    json_schema!({"anyOf": [schema, {"type": "null"}]})
}

fn function_name() -> Value {
    json!({"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"})
}

fn object() -> Value {
    json!({"type": "object"})
}

/// Chat's `tools`: function tools, at most 128.
pub fn chat_tools(_: &mut SchemaGenerator) -> Schema {
    nullable(json!({
        "type": "array", "maxItems": 128,
        "items": {
            "type": "object", "required": ["type", "function"],
            "properties": {
                "type": {"const": "function"},
                "function": {
                    "type": "object", "required": ["name"],
                    "properties": {
                        "name": function_name(),
                        "description": {"type": ["string", "null"]},
                        "parameters": {"type": ["object", "null"]},
                        "strict": {"type": ["boolean", "null"]},
                    },
                },
            },
        },
    }))
}

/// Responses' `tools`: flat function tools, at most 128.
pub fn flat_tools(_: &mut SchemaGenerator) -> Schema {
    nullable(json!({
        "type": "array", "maxItems": 128,
        "items": {
            "type": "object", "required": ["type", "name"],
            "properties": {
                "type": {"const": "function"},
                "name": function_name(),
                "description": {"type": ["string", "null"]},
                "parameters": {"type": ["object", "null"]},
                "strict": {"type": ["boolean", "null"]},
            },
        },
    }))
}

/// `tool_choice`: a mode, or one function (chat nests its name under `function`).
pub fn tool_choice(_: &mut SchemaGenerator) -> Schema {
    nullable(json!({"anyOf": [
        {"enum": ["auto", "none", "required"]},
        {"type": "object", "required": ["type", "function"],
         "properties": {"type": {"const": "function"},
                        "function": {"type": "object", "required": ["name"],
                                     "properties": {"name": {"type": "string"}}}}},
        {"type": "object", "required": ["type", "name"], "not": {"required": ["function"]},
         "properties": {"type": {"const": "function"}, "name": {"type": "string"}}},
    ]}))
}

fn json_formats(schema_inline: bool) -> Value {
    let json_schema = if schema_inline {
        json!({"type": "object", "required": ["type"],
               "properties": {"type": {"const": "json_schema"}, "name": {"type": "string"},
                              "schema": {"type": ["object", "boolean", "null"]},
                              "strict": {"type": ["boolean", "null"]}}})
    } else {
        json!({"type": "object", "required": ["type", "json_schema"],
               "properties": {"type": {"const": "json_schema"},
                              "json_schema": {"type": "object",
                                  "properties": {"name": {"type": "string"},
                                                 "schema": {"type": ["object", "boolean", "null"]},
                                                 "strict": {"type": ["boolean", "null"]}}}}})
    };
    json!({"oneOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}},
        {"type": "object", "required": ["type"], "properties": {"type": {"const": "json_object"}}},
        json_schema,
    ]})
}

/// Chat's and completions' `response_format`.
pub fn response_format(_: &mut SchemaGenerator) -> Schema {
    nullable(json_formats(false))
}

/// Responses' `text`: `{"format": …}`.
pub fn text_field(_: &mut SchemaGenerator) -> Schema {
    nullable(json!({"type": "object", "properties": {"format": json_formats(true)}}))
}

/// `logit_bias`: token id → bias in [-100, 100], at most 300 entries.
pub fn logit_bias(_: &mut SchemaGenerator) -> Schema {
    nullable(json!({
        "type": "object", "maxProperties": 300,
        "propertyNames": {"pattern": "^[0-9]{1,9}$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
    }))
}

/// An assistant's earlier calls.
pub fn history_calls(_: &mut SchemaGenerator) -> Schema {
    nullable(json!({
        "type": "array",
        "items": {"type": "object", "required": ["function"],
                  "properties": {"id": {"type": "string"}, "type": {"const": "function"},
                                 "function": {"type": "object", "required": ["name"],
                                              "properties": {"name": {"type": "string"},
                                                             "arguments": {"type": ["string", "object"]}}}}},
    }))
}

/// Parameters only their neutral value passes: an empty list, null.
pub fn empty_list(_: &mut SchemaGenerator) -> Schema {
    nullable(json!({"type": "array", "maxItems": 0}))
}

/// The deprecated `function_call`: only the neutral modes.
pub fn neutral_mode(_: &mut SchemaGenerator) -> Schema {
    nullable(json!({"enum": ["none", "auto"]}))
}

/// Only null (audio output, stored conversations).
pub fn null_only(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "null"})
}

/// Responses' `input`: text, or message / function_call / function_call_output items.
pub fn responses_input(_: &mut SchemaGenerator) -> Schema {
    let part = json!({"type": "object", "required": ["type", "text"],
                      "properties": {"type": {"enum": ["input_text", "output_text"]},
                                     "text": {"type": "string"}}});
    json_schema!({"anyOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "required": ["role", "content"],
             "properties": {"type": {"const": "message"},
                            "role": {"enum": ["user", "assistant", "system", "developer"]},
                            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}}},
            {"type": "object", "required": ["type", "call_id", "name", "arguments"],
             "properties": {"type": {"const": "function_call"}, "call_id": {"type": "string"},
                            "name": {"type": "string"}, "arguments": {"type": "string"}}},
            {"type": "object", "required": ["type", "call_id", "output"],
             "properties": {"type": {"const": "function_call_output"},
                            "call_id": {"type": "string"},
                            "output": {"description": "text, or any JSON (sent as its text)"}}},
        ]}},
    ]})
}

/// Any JSON object (echoed metadata).
pub fn any_object(_: &mut SchemaGenerator) -> Schema {
    nullable(object())
}

/// A completion's `prompt`: one non-empty string, alone or as a one-element array.
pub fn completion_prompt(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string", "minLength": 1}},
    ]})
}
