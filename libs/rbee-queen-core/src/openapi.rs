//! `GET /openapi.json`: an OpenAPI 3.1 document of the queen's API, built from the route table
//! the router is built from and the JSON schemas of the wire types, so it cannot list a route
//! the queen does not serve or miss one it does.

use rbee_api::{ErrorBody, HiveHeartbeat, InferenceRequest, StreamEvent};
use rbee_openai::{
    ApiErrorBody, ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ModelList,
    ResponseObject, ResponsesRequest,
};
use schemars::JsonSchema;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value, json};

/// What one operation takes and answers.
struct Operation {
    summary: &'static str,
    tag: &'static str,
    request: Option<Value>,
    /// The 200 (or 202) answer's content.
    response: Content,
    /// Errors in OpenAI's shape (the OpenAI routes) or rbee's.
    openai_errors: bool,
}

enum Content {
    Json(Value),
    /// JSON, or an SSE stream of the given items when the request asks for `stream`.
    JsonOrSse(Value, Value),
    Sse(Value),
    Prometheus,
}

/// The whole document for `routes` (method, path, public), as `api::router_routes` gives them.
pub fn document(routes: &[(&str, &str, bool)]) -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "#/components/schemas".into())
        .into_generator();
    let mut paths = Map::new();
    for (method, path, public) in routes {
        let op = operation(&mut generator, method, path);
        let rbee_error = schema::<ErrorBody>(&mut generator);
        let openai_error = schema::<ApiErrorBody>(&mut generator);
        let error = if op.openai_errors {
            openai_error
        } else {
            rbee_error
        };
        let mut responses = Map::new();
        let ok = if *method == "POST" && path.starts_with("/v1/admin/") {
            "202"
        } else {
            "200"
        };
        responses.insert(
            ok.into(),
            json!({"description": "Success", "content": content(op.response)}),
        );
        if path.starts_with("/v1/admin/") {
            responses.insert(
                "403".into(),
                json!({"description": "A client token without `admin = true`",
                       "content": {"application/json": {"schema": error}}}),
            );
        }
        if !public {
            responses.insert(
                "401".into(),
                json!({"description": "Missing or wrong bearer token",
                       "content": {"application/json": {"schema": error}}}),
            );
        }
        responses.insert(
            "default".into(),
            json!({"description": "An error: the `code` says which (see docs/TROUBLESHOOTING.md)",
                   "content": {"application/json": {"schema": error}}}),
        );
        let mut o = json!({
            "summary": op.summary,
            "tags": [op.tag],
            "operationId": operation_id(method, path),
            "responses": responses,
            "security": if *public { json!([]) } else { json!([{"bearer": []}]) },
        });
        let params = path_parameters(path);
        if !params.is_empty() {
            o["parameters"] = Value::Array(params);
        }
        if let Some(body) = op.request {
            o["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": body}}});
        }
        let entry = paths
            .entry((*path).to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[method.to_ascii_lowercase()] = o;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "queen-rbee",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "rbee's cluster API: OpenAI-compatible and native inference, models, \
                            hive heartbeats and administration.",
        },
        "paths": paths,
        "components": {
            "schemas": generator.take_definitions(true),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "A client token; the heartbeat route takes the join token"},
            },
        },
    })
}

/// The queen's native request: the worker's fields and the model to route to, in one object.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [
    {"required": ["prompt"], "properties": {"prompt": {"type": "string"},
        "messages": {"type": "null"},
        "tools": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}}},
    {"required": ["messages"], "properties": {"messages": {"type": "array"},
        "prompt": {"type": "null"}}},
]))]
#[allow(dead_code)]
struct NativeInference {
    /// A configured model name or a model reference a hive has.
    #[schemars(length(min = 1))]
    model: String,
    #[serde(flatten)]
    request: InferenceRequest,
}

fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Value {
    generator.subschema_for::<T>().to_value()
}

fn object(description: &str) -> Value {
    json!({"type": "object", "description": description})
}

/// One server-sent event (the schema of `text/event-stream` describes each event, as OpenAPI
/// 3.2's `itemSchema` does): `data` is JSON of `item`, or `[DONE]` at the end.
fn sse_event(item: Value) -> Value {
    json!({"schema": {
        "type": "object", "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "data": {"anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": "application/json", "contentSchema": item},
            ]},
        },
    }})
}

fn content(c: Content) -> Value {
    match c {
        Content::Json(s) => json!({"application/json": {"schema": s}}),
        Content::JsonOrSse(j, item) => json!({
            "application/json": {"schema": j},
            "text/event-stream": sse_event(item),
        }),
        Content::Sse(item) => json!({"text/event-stream": sse_event(item)}),
        Content::Prometheus => json!({"text/plain": {"schema": {"type": "string",
            "description": "Prometheus text exposition format 0.0.4"}}}),
    }
}

fn operation(g: &mut SchemaGenerator, method: &str, path: &str) -> Operation {
    let op = |summary, tag, request, response| Operation {
        summary,
        tag,
        request,
        response,
        openai_errors: false,
    };
    match (method, path) {
        ("GET", "/health") => op(
            "Liveness, version, uptime and how many hives are up",
            "operations",
            None,
            Content::Json(object("{status, version, uptime_seconds, hives, hives_up}")),
        ),
        ("GET", "/metrics") => op(
            "Prometheus metrics (`rbee_queen_*`)",
            "operations",
            None,
            Content::Prometheus,
        ),
        ("GET", "/openapi.json") => op(
            "This document",
            "operations",
            None,
            Content::Json(object("OpenAPI 3.1")),
        ),
        ("POST", "/v1/chat/completions") => Operation {
            openai_errors: true,
            ..op(
                "OpenAI chat completion, streamed (`stream: true`) or whole",
                "openai",
                Some(schema::<ChatCompletionRequest>(g)),
                Content::JsonOrSse(schema::<ChatCompletion>(g), object("chat.completion.chunk")),
            )
        },
        ("POST", "/v1/completions") => Operation {
            openai_errors: true,
            ..op(
                "OpenAI text completion, streamed (`stream: true`) or whole",
                "openai",
                Some(schema::<CompletionRequest>(g)),
                Content::JsonOrSse(schema::<Completion>(g), object("text_completion chunk")),
            )
        },
        ("POST", "/v1/responses") => Operation {
            openai_errors: true,
            ..op(
                "OpenAI Responses API, stateless: a response, or its `response.*` events (`stream: true`)",
                "openai",
                Some(schema::<ResponsesRequest>(g)),
                Content::JsonOrSse(schema::<ResponseObject>(g), object("response.* event")),
            )
        },
        ("GET", "/v1/models") => Operation {
            openai_errors: true,
            ..op(
                "Models the cluster can serve: loaded, on a hive's disk, or configured",
                "openai",
                None,
                Content::Json(schema::<ModelList>(g)),
            )
        },
        ("GET", "/v1/models/{id}") => Operation {
            openai_errors: true,
            ..op(
                "One model card by its id (as `GET /v1/models` lists it); 404 MODEL_NOT_SERVED",
                "openai",
                None,
                Content::Json(schema::<rbee_openai::ModelCard>(g)),
            )
        },
        ("POST", "/v1/inference") => op(
            "Native inference: the worker's own event stream",
            "inference",
            Some(schema::<NativeInference>(g)),
            Content::Sse(schema::<StreamEvent>(g)),
        ),
        ("DELETE", "/v1/inference/{request_id}") => op(
            "Cancel a request, running or still waiting for a worker",
            "inference",
            None,
            Content::Json(object("{request_id, cancelled}")),
        ),
        ("POST", "/v1/hives/heartbeat") => op(
            "A hive's heartbeat (the join token binds a new hive id; its credential after that)",
            "hives",
            Some(schema::<HiveHeartbeat>(g)),
            Content::Json(schema::<rbee_api::HeartbeatAnswer>(g)),
        ),
        ("GET", "/v1/admin/hives") => op(
            "Every hive with its state and last heartbeat",
            "admin",
            None,
            Content::Json(object("{hives: [...]}")),
        ),
        ("GET", "/v1/admin/hives/{id}") => op(
            "One hive",
            "admin",
            None,
            Content::Json(object("A hive record")),
        ),
        ("POST", "/v1/admin/hives/{id}/approve") => op(
            "Route to a hive held for approval, or apply the new URL it reported",
            "admin",
            None,
            Content::Json(object("A hive record")),
        ),
        ("DELETE", "/v1/admin/hives/{id}") => op(
            "Forget a hive and revoke its credential",
            "admin",
            None,
            Content::Json(object("{removed}")),
        ),
        ("GET", "/v1/admin/workers") => op(
            "Every hive's workers, from the last heartbeats",
            "admin",
            None,
            Content::Json(object("{workers: [...]}")),
        ),
        ("POST", "/v1/admin/workers") => op(
            "Spawn a worker on the named or the best hive",
            "admin",
            Some(schema::<crate::admin::AdminSpawn>(g)),
            Content::Json(object("The hive's worker record plus `hive`")),
        ),
        ("DELETE", "/v1/admin/workers/{hive}/{id}") => op(
            "Stop a worker",
            "admin",
            None,
            Content::Json(object("The hive's answer")),
        ),
        ("GET", "/v1/admin/models") => op(
            "Where each model is loaded or on disk",
            "admin",
            None,
            Content::Json(object("{models: [...]}")),
        ),
        ("POST", "/v1/admin/models/pull") => op(
            "Download a model to a hive",
            "admin",
            Some(schema::<crate::admin::AdminPull>(g)),
            Content::Json(object("The hive's download record plus `hive`")),
        ),
        ("GET", "/v1/admin/models/pull/{hive}/{id}/events") => op(
            "A download's progress as server-sent events",
            "admin",
            None,
            Content::Sse(object("A download record")),
        ),
        _ => op("", "", None, Content::Json(object(""))),
    }
}

/// `post_v1_admin_workers_hive_id` for `POST /v1/admin/workers/{hive}/{id}`.
fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_ascii_lowercase();
    for part in path.split(['/', '.']).filter(|p| !p.is_empty()) {
        id.push('_');
        id.push_str(part.trim_matches(['{', '}']));
    }
    id
}

fn path_parameters(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| {
            // Request ids are what `X-Request-Id` accepts.
            let schema = if name == "request_id" {
                json!({"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"})
            } else {
                json!({"type": "string"})
            };
            json!({"name": name, "in": "path", "required": true, "schema": schema})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_route_is_described_with_its_method_and_parameters() {
        let routes = crate::api::router_routes();
        let doc = document(&routes);
        if let Ok(path) = std::env::var("RBEE_DUMP_OPENAPI") {
            std::fs::write(path, doc.to_string()).unwrap();
        }
        for (method, path, public) in &routes {
            let op = &doc["paths"][*path][method.to_ascii_lowercase()];
            assert!(
                op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                "{method} {path} has no summary"
            );
            assert_eq!(op["security"].as_array().unwrap().is_empty(), *public);
            for name in path_parameters(path) {
                assert!(op["parameters"].as_array().unwrap().contains(&name));
            }
        }
        let listed: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(listed, routes.len());
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        assert!(schemas.contains_key("ChatCompletionRequest"));
        assert!(schemas.contains_key("StreamEvent"));
    }
}
