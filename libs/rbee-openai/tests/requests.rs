//! Request parsing and translation, with bodies shaped as the stock `openai` SDKs send them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rbee_api::{ChatMessage, InferenceRequest};
use rbee_openai::{
    COMPLETION_DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, OpenAiError,
};
use serde_json::{Value, json};

fn chat(v: Value) -> ChatCompletionRequest {
    ChatCompletionRequest::from_json(v.to_string().as_bytes()).unwrap()
}

fn completion(v: Value) -> CompletionRequest {
    CompletionRequest::from_json(v.to_string().as_bytes()).unwrap()
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
        ..ChatMessage::default()
    }
}

/// Asserts a refusal: 400, code, the param named, and a message mentioning `needle`.
fn assert_refused(err: OpenAiError, param: &str, needle: &str) {
    assert_eq!(err.status(), 400, "{err:?}");
    assert_eq!(err.code().as_str(), "INVALID_PARAMETER", "{err:?}");
    assert_eq!(err.param(), Some(param), "{err:?}");
    assert!(
        err.message().contains(needle),
        "message {:?} should contain {needle:?}",
        err.message()
    );
}

fn chat_err(v: Value) -> OpenAiError {
    chat(v).to_inference().unwrap_err()
}

fn completion_err(v: Value) -> OpenAiError {
    completion(v).to_inference().unwrap_err()
}

fn base_chat() -> Value {
    json!({"messages":[{"role":"user","content":"hi"}],"model":"m"})
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

#[test]
fn python_sdk_streaming_chat_payload() {
    // client.chat.completions.create(model="x", messages=[...], stream=True,
    //     stream_options={"include_usage": True}, max_tokens=32, temperature=0.2)
    let body = r#"{"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hi"}],"model":"smollm2","max_tokens":32,"stream":true,"stream_options":{"include_usage":true},"temperature":0.2}"#;
    let req = ChatCompletionRequest::from_json(body.as_bytes()).unwrap();
    assert!(req.is_stream());
    assert!(req.include_usage());
    assert_eq!(req.model, "smollm2");
    let inf = req.to_inference().unwrap();
    assert_eq!(
        inf,
        InferenceRequest {
            messages: Some(vec![msg("system", "You are terse."), msg("user", "Say hi")]),
            max_tokens: Some(32),
            temperature: Some(0.2),
            ..Default::default()
        }
    );
    // What goes to the worker is exactly what its strict parser accepts.
    assert_eq!(
        serde_json::to_value(&inf).unwrap(),
        json!({"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hi"}],
               "max_tokens":32,"temperature":0.2})
    );
}

#[test]
fn langchain_style_payload_with_neutral_values_is_accepted() {
    // Clients that send every parameter with its default value must work.
    let req = chat(json!({
        "messages":[{"role":"user","content":"hi","name":"alice"}],
        "model":"m","stream":false,"n":1,"temperature":0.7,"top_p":1,
        "presence_penalty":0,"frequency_penalty":0.0,"logit_bias":{},"logprobs":false,
        "top_logprobs":0,"response_format":{"type":"text"},"tools":[],"tool_choice":"none",
        "functions":null,"function_call":"auto","modalities":["text"],"audio":null,
        "user":"u-1","seed":7,"parallel_tool_calls":true,"store":false,"metadata":{"a":"b"},
        "service_tier":"auto","some_future_field":{"x":1}
    }));
    assert!(!req.is_stream());
    assert!(!req.include_usage());
    let inf = req.to_inference().unwrap();
    assert_eq!(inf.messages, Some(vec![msg("user", "hi")]));
    assert_eq!(inf.temperature, Some(0.7));
    assert_eq!(inf.top_p, Some(1.0));
    assert_eq!(inf.seed, Some(7));
    assert_eq!(inf.max_tokens, None);
}

#[test]
fn include_usage_only_counts_when_streaming() {
    let req = chat(with(
        base_chat(),
        "stream_options",
        json!({"include_usage":true}),
    ));
    assert!(!req.include_usage());
    let req = chat(with(
        with(base_chat(), "stream", json!(true)),
        "stream_options",
        json!({"include_usage":false}),
    ));
    assert!(req.is_stream());
    assert!(!req.include_usage());
}

#[test]
fn roles_map_and_developer_becomes_system() {
    let req = chat(json!({"model":"m","messages":[
        {"role":"developer","content":"rules"},
        {"role":"user","content":"q"},
        {"role":"assistant","content":"a"},
        {"role":"assistant","content":null},
        {"role":"user","content":"q2"}
    ]}));
    assert_eq!(
        req.to_inference().unwrap().messages.unwrap(),
        vec![
            msg("system", "rules"),
            msg("user", "q"),
            msg("assistant", "a"),
            msg("assistant", ""),
            msg("user", "q2"),
        ]
    );
}

#[test]
fn content_part_arrays_are_joined() {
    let req = chat(json!({"model":"m","messages":[
        {"role":"system","content":[{"type":"text","text":"be brief"}]},
        {"role":"user","content":[{"type":"text","text":"line one"},{"type":"text","text":"line two"}]},
        {"role":"user","content":[]}
    ]}));
    assert_eq!(
        req.to_inference().unwrap().messages.unwrap(),
        vec![
            msg("system", "be brief"),
            msg("user", "line one\nline two"),
            msg("user", ""),
        ]
    );
}

#[test]
fn image_and_audio_parts_are_refused_by_position() {
    let err = chat_err(json!({"model":"m","messages":[
        {"role":"user","content":"x"},
        {"role":"user","content":[
            {"type":"text","text":"what is this?"},
            {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}
        ]}
    ]}));
    assert_refused(err.clone(), "messages[1].content[1]", "image");
    assert!(matches!(err, OpenAiError::Unsupported { .. }));
    assert!(err.message().contains("text only"), "{}", err.message());

    let err = chat_err(json!({"model":"m","messages":[{"role":"user","content":[
        {"type":"input_audio","input_audio":{"data":"AAAA","format":"wav"}}
    ]}]}));
    assert_refused(err, "messages[0].content[0]", "audio");

    let err =
        chat_err(json!({"model":"m","messages":[{"role":"user","content":[{"type":"hologram"}]}]}));
    assert_refused(err, "messages[0].content[0].type", "hologram");

    let err =
        chat_err(json!({"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}]}));
    assert_refused(err, "messages[0].content[0].text", "required");
}

#[test]
fn tool_messages_and_calls_go_to_the_worker_and_unknown_roles_are_refused() {
    let inf = chat(json!({"model":"m","messages":[
        {"role":"user","content":"x"},
        {"role":"assistant","content":null,
         "tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},
        {"role":"tool","content":"42","tool_call_id":"c1"}
    ],
    "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],
    "tool_choice":{"type":"function","function":{"name":"f"}},"parallel_tool_calls":false}))
    .to_inference()
    .unwrap();
    let msgs = inf.messages.unwrap();
    let call = &msgs[1].tool_calls.as_ref().unwrap()[0];
    assert_eq!(
        (call.id.as_str(), call.function.arguments.as_str()),
        ("c1", r#"{"a":1}"#)
    );
    assert_eq!(msgs[2].tool_call_id.as_deref(), Some("c1"));
    assert_eq!(inf.tools.unwrap()[0].function.name, "f");
    assert_eq!(
        inf.tool_choice,
        Some(rbee_api::ToolChoice::Function("f".into()))
    );
    assert_eq!(inf.parallel_tool_calls, Some(false));
    let err =
        chat_err(json!({"model":"m","messages":[{"role":"function","content":"42","name":"f"}]}));
    assert_refused(err, "messages[0].role", "function");

    let err = chat_err(json!({"model":"m","messages":[{"role":"robot","content":"x"}]}));
    assert_refused(err.clone(), "messages[0].role", "robot");
    assert!(matches!(err, OpenAiError::InvalidParameter { .. }));

    let err = chat_err(json!({"model":"m","messages":[{"role":"user","content":"x",
        "tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]}]}));
    assert_refused(err, "messages[0].tool_calls", "assistant");

    let err = chat_err(json!({"model":"m","messages":[{"role":"user"}]}));
    assert_refused(err, "messages[0].content", "required");
}

#[test]
fn max_completion_tokens_wins_over_max_tokens() {
    let both = with(
        with(base_chat(), "max_tokens", json!(10)),
        "max_completion_tokens",
        json!(20),
    );
    assert_eq!(chat(both).to_inference().unwrap().max_tokens, Some(20));
    let old = with(base_chat(), "max_tokens", json!(10));
    assert_eq!(chat(old).to_inference().unwrap().max_tokens, Some(10));
    let new = with(base_chat(), "max_completion_tokens", json!(5));
    assert_eq!(chat(new).to_inference().unwrap().max_tokens, Some(5));
}

#[test]
fn stop_as_string_or_array_and_extensions_pass_through() {
    let inf = chat(
        json!({"model":"m","messages":[{"role":"user","content":"x"}],
        "stop":"\n\n","top_k":40,"min_p":0.05,"repetition_penalty":1.1,"repetition_window":64}),
    )
    .to_inference()
    .unwrap();
    assert_eq!(inf.stop, Some(vec!["\n\n".to_owned()]));
    assert_eq!(inf.top_k, Some(40));
    assert_eq!(inf.min_p, Some(0.05));
    assert_eq!(inf.repetition_penalty, Some(1.1));
    assert_eq!(inf.repetition_window, Some(64));

    let inf = chat(with(base_chat(), "stop", json!(["a", "b"])))
        .to_inference()
        .unwrap();
    assert_eq!(inf.stop, Some(vec!["a".to_owned(), "b".to_owned()]));
    let inf = chat(with(base_chat(), "stop", json!([])))
        .to_inference()
        .unwrap();
    assert_eq!(inf.stop, None);
    let inf = chat(with(base_chat(), "stop", Value::Null))
        .to_inference()
        .unwrap();
    assert_eq!(inf.stop, None);
}

#[test]
fn seeds_are_any_integer() {
    let s = |v: Value| chat(with(base_chat(), "seed", v)).to_inference();
    assert_eq!(s(json!(0)).unwrap().seed, Some(0));
    assert_eq!(s(json!(u64::MAX)).unwrap().seed, Some(u64::MAX));
    assert_eq!(s(json!(-1)).unwrap().seed, Some(u64::MAX));
    assert_eq!(s(json!(-1.0)).unwrap().seed, Some(u64::MAX));
    assert_eq!(s(json!(7.0)).unwrap().seed, Some(7));
    assert_refused(s(json!(1.5)).unwrap_err(), "seed", "integer");
}

#[test]
fn presence_and_frequency_penalties_go_to_the_worker() {
    let inf = chat(
        json!({"model":"m","messages":[{"role":"user","content":"hi"}],
        "presence_penalty":0.5,"frequency_penalty":-1}),
    )
    .to_inference()
    .unwrap();
    assert_eq!(
        (inf.presence_penalty, inf.frequency_penalty),
        (Some(0.5), Some(-1.0))
    );
    let inf = completion(json!({"model":"m","prompt":"p","frequency_penalty":0.1}))
        .to_inference()
        .unwrap();
    assert_eq!(inf.frequency_penalty, Some(0.1));
}

#[test]
fn logit_bias_goes_to_the_worker_and_an_empty_one_is_none() {
    let inf = chat(
        json!({"model":"m","messages":[{"role":"user","content":"hi"}],
        "logit_bias":{"50256":-100,"7":2.5}}),
    )
    .to_inference()
    .unwrap();
    let bias = inf.logit_bias.unwrap();
    assert_eq!(
        bias.into_iter().collect::<Vec<_>>(),
        [("50256".to_owned(), -100.0), ("7".to_owned(), 2.5)]
    );
    let inf = completion(json!({"model":"m","prompt":"p","logit_bias":{}}))
        .to_inference()
        .unwrap();
    assert_eq!(inf.logit_bias, None);
}

#[test]
fn every_chat_rejection_names_its_param() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("logit_bias", json!({"50256": "ban"}), "logit_bias"),
        ("logit_bias", json!([50256]), "logit_bias"),
        ("top_logprobs", json!(3), "logprobs: true"),
        ("response_format", json!({"type":"yaml"}), "json_schema"),
        ("tools", json!({"f": 1}), "array"),
        ("tool_choice", json!("always"), "required"),
        ("tool_choice", json!({"type":"function"}), "function"),
        (
            "functions",
            json!([{"name":"f","parameters":{}}]),
            "functions",
        ),
        ("function_call", json!({"name":"f"}), "function_call"),
        ("modalities", json!(["text", "audio"]), "audio"),
        ("audio", json!({"voice":"alloy","format":"wav"}), "audio"),
        ("model", json!(""), "model"),
    ];
    for (param, value, needle) in cases {
        let err = chat_err(with(base_chat(), param, value.clone()));
        assert_refused(err, param, needle);
    }
    // Nested parameters are named by their path.
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "response_format",
            json!({"type":"json_schema"}),
            "response_format.json_schema",
            "required",
        ),
        (
            "tools",
            json!([{"type":"custom","custom":{}}]),
            "tools[0].type",
            "function",
        ),
        (
            "tools",
            json!([{"type":"function","function":{}}]),
            "tools[0]",
            "name",
        ),
    ];
    for (key, value, param, needle) in cases {
        let err = chat_err(with(base_chat(), key, value));
        assert_refused(err, param, needle);
    }
}

#[test]
fn json_errors_name_the_field() {
    let err = ChatCompletionRequest::from_json(b"{not json").unwrap_err();
    assert_eq!(err.status(), 400);
    assert_eq!(err.code().as_str(), "INVALID_JSON");
    assert_eq!(err.param(), None);

    let err = ChatCompletionRequest::from_json(
        br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
    )
    .unwrap_err();
    assert_eq!(err.code().as_str(), "INVALID_JSON");
    assert_eq!(err.param(), Some("temperature"));
    assert!(err.message().contains("`temperature`"), "{}", err.message());

    let err = ChatCompletionRequest::from_json(br#"{"messages":[]}"#).unwrap_err();
    assert_eq!(err.param(), Some("model"));

    let err = ChatCompletionRequest::from_json(br#"{"model":"m","messages":[{"content":"x"}]}"#)
        .unwrap_err();
    assert_eq!(err.param(), Some("messages[0].role"));

    let err = ChatCompletionRequest::from_json(
        br#"{"model":"m","messages":[{"role":"user","content":42}]}"#,
    )
    .unwrap_err();
    assert_eq!(err.param(), Some("messages[0].content"));
    assert!(
        err.message()
            .contains("a string or an array of content parts"),
        "{}",
        err.message()
    );

    let err = ChatCompletionRequest::from_json(
        br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":7}"#,
    )
    .unwrap_err();
    assert_eq!(err.param(), Some("stop"));
}

#[test]
fn python_sdk_completion_payload() {
    // client.completions.create(model="x", prompt="Once upon a time", max_tokens=8, stream=True)
    let req = completion(
        json!({"model":"smollm2","prompt":"Once upon a time","max_tokens":8,"stream":true}),
    );
    assert!(req.is_stream());
    assert!(!req.include_usage());
    assert_eq!(
        serde_json::to_value(req.to_inference().unwrap()).unwrap(),
        json!({"prompt":"Once upon a time","max_tokens":8})
    );
}

#[test]
fn completion_prompt_forms_and_default_max_tokens() {
    let inf = completion(json!({"model":"m","prompt":"abc"}))
        .to_inference()
        .unwrap();
    assert_eq!(inf.prompt.as_deref(), Some("abc"));
    assert_eq!(inf.messages, None);
    assert_eq!(inf.max_tokens, Some(COMPLETION_DEFAULT_MAX_TOKENS));
    assert_eq!(COMPLETION_DEFAULT_MAX_TOKENS, 16);

    let inf = completion(json!({"model":"m","prompt":["only one"],"max_tokens":null}))
        .to_inference()
        .unwrap();
    assert_eq!(inf.prompt.as_deref(), Some("only one"));
    assert_eq!(inf.max_tokens, Some(16));

    let inf = completion(
        json!({"model":"m","prompt":"p","max_tokens":100,"stop":["."],
        "seed":3,"temperature":0,"top_p":0.9,"n":1,"best_of":1,"echo":false,"logprobs":null,
        "suffix":null,"presence_penalty":0,"frequency_penalty":0,"logit_bias":{},"user":"u",
        "top_k":5}),
    )
    .to_inference()
    .unwrap();
    assert_eq!(
        serde_json::to_value(inf).unwrap(),
        json!({"prompt":"p","max_tokens":100,"temperature":0.0,"top_p":0.9,"top_k":5,"seed":3,"stop":["."],
               "presence_penalty":0.0,"frequency_penalty":0.0,"n":1})
    );

    assert_refused(
        completion_err(json!({"model":"m","prompt":["a","b"]})),
        "prompt",
        "2 prompts",
    );
    assert_refused(
        completion_err(json!({"model":"m","prompt":[]})),
        "prompt",
        "empty",
    );
    assert_refused(
        completion_err(json!({"model":"m","prompt":[1,2,3]})),
        "prompt",
        "token-id",
    );
    assert_refused(
        completion_err(json!({"model":"m","prompt":[[1,2],[3]]})),
        "prompt",
        "token-id",
    );
    assert_refused(completion_err(json!({"model":"m"})), "prompt", "required");
    let err = CompletionRequest::from_json(br#"{"model":"m","prompt":{"a":1}}"#).unwrap_err();
    assert_eq!(err.code().as_str(), "INVALID_JSON");
    assert_eq!(err.param(), Some("prompt"));
}

#[test]
fn every_completion_rejection_names_its_param() {
    let base = json!({"model":"m","prompt":"p"});
    let cases: Vec<(&str, Value, &str)> = vec![
        ("echo", json!(true), "echo"),
        ("logprobs", json!(6), "[0, 5]"),
        ("logprobs", json!(true), "integer"),
        ("suffix", json!("tail"), "suffix"),
        ("best_of", json!(3), "must be 1"),
        ("logit_bias", json!({"1": null}), "logit_bias"),
        ("model", json!(" "), "model"),
    ];
    for (param, value, needle) in cases {
        let err = completion_err(with(base.clone(), param, value));
        assert_refused(err, param, needle);
    }
}

#[test]
fn structured_output_logprobs_and_n_go_to_the_worker() {
    let inf = chat(
        json!({"model":"m","messages":[{"role":"user","content":"x"}],
        "response_format":{"type":"json_schema","json_schema":{"name":"p","strict":true,
            "schema":{"type":"object","properties":{"a":{"type":"integer"}}}}},
        "logprobs":true,"top_logprobs":3,"n":3}),
    )
    .to_inference()
    .unwrap();
    assert_eq!(
        inf.grammar,
        Some(rbee_api::Grammar::JsonSchema {
            schema: json!({"type":"object","properties":{"a":{"type":"integer"}}})
        })
    );
    assert_eq!((inf.logprobs, inf.n), (Some(3), Some(3)));
    let inf = chat(with(
        base_chat(),
        "response_format",
        json!({"type":"json_object"}),
    ))
    .to_inference()
    .unwrap();
    assert_eq!(inf.grammar, Some(rbee_api::Grammar::JsonObject));
    let inf = chat(with(base_chat(), "logprobs", json!(true)))
        .to_inference()
        .unwrap();
    assert_eq!(inf.logprobs, Some(0));
    let inf = completion(
        json!({"model":"m","prompt":"p","logprobs":2,"n":2,"best_of":1,
        "response_format":{"type":"json_object"}}),
    )
    .to_inference()
    .unwrap();
    assert_eq!((inf.logprobs, inf.n), (Some(2), Some(2)));
    assert_eq!(inf.grammar, Some(rbee_api::Grammar::JsonObject));
}

#[test]
fn completion_stream_options() {
    let req = completion(json!({"model":"m","prompt":"p","stream":true,
        "stream_options":{"include_usage":true}}));
    assert!(req.include_usage());
}

#[test]
fn refusals_render_as_openai_error_bodies() {
    let err = chat_err(with(base_chat(), "top_logprobs", json!(3)));
    assert_eq!(
        err.to_body("req-9"),
        json!({"error":{
            "message":"`top_logprobs` needs `logprobs: true`; given: 3",
            "type":"invalid_request_error",
            "param":"top_logprobs",
            "code":"INVALID_PARAMETER",
            "request_id":"req-9"
        }})
    );
}
