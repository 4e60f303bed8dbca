//! Worker events → OpenAI chunks and responses, error bodies, the model list.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rbee_api::{ErrorBody, StopReason, StreamEvent, Timings};
use rbee_openai::{
    Aggregator, ApiErrorBody, ChatCompletionChunk, ChunkStream, CompletionChunk, EndpointKind,
    ModelCard, ModelList, OpenAiError, TRUNCATED_STREAM_MESSAGE, chat_completion_id, completion_id,
    error_body, error_body_from_rbee, error_type, finish_reason, sse_data,
};
use serde_json::{Value, json};

fn started() -> StreamEvent {
    StreamEvent::Started {
        request_id: "r1".into(),
        model: "hf:org/repo:file.gguf".into(),
        prompt_tokens: 5,
    }
}

fn token(index: u32, text: &str) -> StreamEvent {
    StreamEvent::Token {
        index,
        text: text.into(),
        choice: 0,
        logprobs: vec![],
    }
}

fn end(stop_reason: StopReason) -> StreamEvent {
    StreamEvent::End {
        stop_reason,
        prompt_tokens: 5,
        completion_tokens: 2,
        cached_tokens: 0,
        timings: Timings::default(),
    }
}

fn error_ev(code: &str, message: &str) -> StreamEvent {
    StreamEvent::Error {
        code: rbee_api::ErrorCode::parse(code).unwrap(),
        message: message.into(),
    }
}

fn events() -> Vec<StreamEvent> {
    vec![
        started(),
        token(0, "Hel"),
        token(1, "lo"),
        end(StopReason::Eos),
    ]
}

/// Feeds events and returns every payload, parsed (except `[DONE]`, kept as a string).
fn run(stream: &mut ChunkStream, evs: &[StreamEvent]) -> Vec<Value> {
    evs.iter()
        .flat_map(|e| stream.on_event(e))
        .map(|s| {
            if s == "[DONE]" {
                Value::String(s)
            } else {
                serde_json::from_str(&s).unwrap()
            }
        })
        .collect()
}

fn chat_chunk(delta: Value, finish: Value) -> Value {
    json!({"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1700000000,"model":"smollm2",
           "choices":[{"index":0,"delta":delta,"logprobs":null,"finish_reason":finish}]})
}

#[test]
fn finish_reason_table() {
    let table = [
        (StopReason::Eos, "stop"),
        (StopReason::StopSequence, "stop"),
        (StopReason::Cancelled, "stop"),
        (StopReason::MaxTokens, "length"),
        (StopReason::Deadline, "length"),
    ];
    for (stop, want) in table {
        assert_eq!(finish_reason(stop), want, "{stop:?}");
    }
}

#[test]
fn chat_stream_without_usage() {
    let mut s = ChunkStream::new(
        chat_completion_id("r1"),
        1_700_000_000,
        "smollm2",
        EndpointKind::Chat,
        false,
    );
    let got = run(&mut s, &events());
    let mut last = chat_chunk(json!({}), json!("stop"));
    last["choices"][0]["rbee_stop_reason"] = json!("eos");
    assert_eq!(
        got,
        vec![
            chat_chunk(json!({"role":"assistant","content":""}), Value::Null),
            chat_chunk(json!({"content":"Hel"}), Value::Null),
            chat_chunk(json!({"content":"lo"}), Value::Null),
            last,
            json!("[DONE]"),
        ]
    );
    assert!(s.is_finished());
    // Nothing after the end, not even a second [DONE].
    assert!(s.on_event(&token(2, "x")).is_empty());
    assert!(s.on_upstream_eof().is_empty());
}

#[test]
fn chat_stream_exact_text() {
    let mut s = ChunkStream::new(
        "chatcmpl-r1",
        1_700_000_000,
        "smollm2",
        EndpointKind::Chat,
        false,
    );
    let out: Vec<String> = events().iter().flat_map(|e| s.on_event(e)).collect();
    assert_eq!(
        out,
        vec![
            r#"{"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1700000000,"model":"smollm2","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1700000000,"model":"smollm2","choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1700000000,"model":"smollm2","choices":[{"index":0,"delta":{"content":"lo"},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1700000000,"model":"smollm2","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop","rbee_stop_reason":"eos"}]}"#,
            "[DONE]",
        ]
    );
    assert_eq!(sse_data(&out[4]), "data: [DONE]\n\n");
}

#[test]
fn chat_stream_with_usage() {
    let mut s = ChunkStream::new(
        "chatcmpl-r1",
        1_700_000_000,
        "smollm2",
        EndpointKind::Chat,
        true,
    );
    let evs = vec![
        started(),
        token(0, "Hel"),
        token(1, ""),
        token(2, "lo"),
        end(StopReason::MaxTokens),
    ];
    let got = run(&mut s, &evs);
    let mut last = chat_chunk(json!({}), json!("length"));
    last["choices"][0]["rbee_stop_reason"] = json!("max_tokens");
    assert_eq!(
        got,
        vec![
            chat_chunk(json!({"role":"assistant","content":""}), Value::Null),
            chat_chunk(json!({"content":"Hel"}), Value::Null),
            // the empty token is skipped
            chat_chunk(json!({"content":"lo"}), Value::Null),
            last,
            json!({"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1700000000,
                   "model":"smollm2","choices":[],
                   "usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":0}}}),
            json!("[DONE]"),
        ]
    );
}

#[test]
fn chunks_parse_as_typed_chunks() {
    let mut s = ChunkStream::new("c", 1, "m", EndpointKind::Chat, true);
    for payload in events().iter().flat_map(|e| s.on_event(e)) {
        if payload != "[DONE]" {
            let c: ChatCompletionChunk = serde_json::from_str(&payload).unwrap();
            assert_eq!(c.object, "chat.completion.chunk");
        }
    }
}

#[test]
fn role_chunk_comes_first_even_without_started() {
    let mut s = ChunkStream::new("c", 1, "m", EndpointKind::Chat, false);
    let got = run(&mut s, &[token(0, "a"), end(StopReason::Eos)]);
    assert_eq!(got.len(), 4);
    assert_eq!(
        got[0]["choices"][0]["delta"],
        json!({"role":"assistant","content":""})
    );
    assert_eq!(got[1]["choices"][0]["delta"], json!({"content":"a"}));
}

#[test]
fn completion_stream() {
    let mut s = ChunkStream::new(
        completion_id("r1"),
        1_700_000_000,
        "smollm2",
        EndpointKind::Completion,
        true,
    );
    let got = run(
        &mut s,
        &[
            started(),
            token(0, "Hel"),
            token(1, "lo"),
            end(StopReason::StopSequence),
        ],
    );
    let chunk = |text: &str, finish: Value| {
        json!({"id":"cmpl-r1","object":"text_completion","created":1700000000,"model":"smollm2",
               "choices":[{"text":text,"index":0,"logprobs":null,"finish_reason":finish}]})
    };
    let mut last = chunk("", json!("stop"));
    last["choices"][0]["rbee_stop_reason"] = json!("stop_sequence");
    assert_eq!(
        got,
        vec![
            chunk("Hel", Value::Null),
            chunk("lo", Value::Null),
            last,
            json!({"id":"cmpl-r1","object":"text_completion","created":1700000000,"model":"smollm2",
                   "choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":0}}}),
            json!("[DONE]"),
        ]
    );
    let first = s.token_chunk(0, "x", &[]);
    let c: CompletionChunk = serde_json::from_str(&first).unwrap();
    assert_eq!(c.choices[0].text, "x");
}

#[test]
fn error_event_becomes_an_error_chunk_then_done() {
    let mut s =
        ChunkStream::new("chatcmpl-r1", 1, "m", EndpointKind::Chat, true).with_request_id("r1");
    let got = run(
        &mut s,
        &[
            started(),
            token(0, "Hel"),
            error_ev("INFERENCE_FAILED", "the engine failed"),
            end(StopReason::Eos),
        ],
    );
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(
        got[2],
        json!({"error":{"message":"the engine failed","type":"server_error","param":null,
                        "code":"INFERENCE_FAILED","request_id":"r1"}})
    );
    assert_eq!(got[3], json!("[DONE]"));
    assert!(s.is_finished());
    // The error chunk parses as the SDKs parse it.
    let body: ApiErrorBody = serde_json::from_value(got[2].clone()).unwrap();
    assert_eq!(body.error.code.as_deref(), Some("INFERENCE_FAILED"));
}

#[test]
fn deadline_error_event_is_a_timeout() {
    let mut s = ChunkStream::new("c", 1, "m", EndpointKind::Completion, false);
    let out = s.on_event(&error_ev("DEADLINE_EXCEEDED", "too late"));
    let v: Value = serde_json::from_str(&out[0]).unwrap();
    assert_eq!(v["error"]["type"], "timeout_error");
    assert_eq!(v["error"]["request_id"], "c");
    assert_eq!(out[1], "[DONE]");
}

#[test]
fn upstream_failure_after_first_token() {
    let mut s = ChunkStream::new("c", 1, "m", EndpointKind::Chat, false).with_request_id("rid");
    assert_eq!(s.on_event(&started()).len(), 1);
    assert_eq!(s.on_event(&token(0, "a")).len(), 1);
    let out = s.on_upstream_eof();
    assert_eq!(out.len(), 2);
    assert_eq!(
        serde_json::from_str::<Value>(&out[0]).unwrap(),
        json!({"error":{"message":TRUNCATED_STREAM_MESSAGE,"type":"server_error","param":null,
                        "code":"WORKER_UNAVAILABLE","request_id":"rid"}})
    );
    assert_eq!(out[1], "[DONE]");
    assert!(
        s.on_failure(&OpenAiError::upstream(rbee_api::codes::INTERNAL, "x"))
            .is_empty()
    );

    let mut s = ChunkStream::new("c", 1, "m", EndpointKind::Chat, false).with_request_id("rid");
    let hive = ErrorBody::new(rbee_api::codes::ALL_SLOTS_BUSY, "busy", "rid");
    let out = s.on_failure(&OpenAiError::from_rbee(503, &hive));
    assert_eq!(
        serde_json::from_str::<Value>(&out[0]).unwrap()["error"]["code"],
        "ALL_SLOTS_BUSY"
    );
}

#[test]
fn non_stream_chat_aggregation() {
    let mut a = Aggregator::new();
    for e in events() {
        assert!(!a.is_done());
        a.push(&e);
    }
    assert!(a.is_done());
    assert_eq!(a.text(), "Hello");
    a.push(&token(9, "ignored"));
    let c = a
        .into_chat_completion("chatcmpl-r1", 1_700_000_000, "smollm2")
        .unwrap();
    assert_eq!(
        serde_json::to_value(&c).unwrap(),
        json!({"id":"chatcmpl-r1","object":"chat.completion","created":1700000000,"model":"smollm2",
               "choices":[{"index":0,"message":{"role":"assistant","content":"Hello","refusal":null,"annotations":[]},
                           "logprobs":null,"finish_reason":"stop","rbee_stop_reason":"eos"}],
               "usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":0}}})
    );
}

#[test]
fn non_stream_completion_aggregation() {
    let mut a = Aggregator::new();
    for e in [
        started(),
        token(0, "Hel"),
        token(1, "lo"),
        end(StopReason::Deadline),
    ] {
        a.push(&e);
    }
    let c = a
        .into_completion("cmpl-r1", 1_700_000_000, "smollm2")
        .unwrap();
    assert_eq!(
        serde_json::to_value(&c).unwrap(),
        json!({"id":"cmpl-r1","object":"text_completion","created":1700000000,"model":"smollm2",
               "choices":[{"text":"Hello","index":0,"logprobs":null,"finish_reason":"length",
                           "rbee_stop_reason":"deadline"}],
               "usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":0}}})
    );
}

#[test]
fn non_stream_error_event_yields_the_error() {
    let mut a = Aggregator::new();
    a.push(&started());
    a.push(&token(0, "He"));
    a.push(&error_ev("CONTEXT_LENGTH_EXCEEDED", "prompt too long"));
    a.push(&end(StopReason::Eos));
    let err = a.clone().into_chat_completion("c", 1, "m").unwrap_err();
    assert_eq!(err.status(), 400);
    assert_eq!(err.code().as_str(), "CONTEXT_LENGTH_EXCEEDED");
    assert_eq!(
        err.to_body("r1"),
        json!({"error":{"message":"prompt too long","type":"invalid_request_error","param":null,
                        "code":"CONTEXT_LENGTH_EXCEEDED","request_id":"r1"}})
    );
    assert!(a.into_completion("c", 1, "m").is_err());

    // A stream that stops without end or error is an error, not a short answer.
    let mut a = Aggregator::new();
    a.push(&started());
    a.push(&token(0, "He"));
    let err = a.into_completion("c", 1, "m").unwrap_err();
    assert_eq!(err.code().as_str(), "WORKER_UNAVAILABLE");
    assert_eq!(err.status(), 502);

    // An explicit failure wins only while the stream is open.
    let mut a = Aggregator::new();
    a.fail(OpenAiError::upstream(
        rbee_api::codes::DEADLINE_EXCEEDED,
        "late",
    ));
    a.push(&end(StopReason::Eos));
    assert_eq!(
        a.into_chat_completion("c", 1, "m").unwrap_err().status(),
        504
    );
}

#[test]
fn error_body_shape() {
    let v = error_body(
        400,
        "INVALID_PARAMETER",
        "`n` must be 1",
        Some("n"),
        "req-1",
    );
    assert_eq!(
        v,
        json!({"error":{"message":"`n` must be 1","type":"invalid_request_error","param":"n",
                        "code":"INVALID_PARAMETER","request_id":"req-1"}})
    );
    let v = error_body(401, "UNAUTHORIZED", "no token", None, "req-2");
    assert_eq!(
        v,
        json!({"error":{"message":"no token","type":"authentication_error","param":null,
                        "code":"UNAUTHORIZED","request_id":"req-2"}})
    );
    // It is also rbee's one shape: code, message and request_id are all there.
    let rbee: ErrorBody = serde_json::from_value(v).unwrap();
    assert_eq!(
        rbee,
        ErrorBody::new(rbee_api::codes::UNAUTHORIZED, "no token", "req-2")
    );
}

#[test]
fn error_types_by_status() {
    let table = [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (409, "conflict_error"),
        (413, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "server_error"),
        (504, "timeout_error"),
        (507, "server_error"),
    ];
    for (status, want) in table {
        assert_eq!(error_type(status), want, "{status}");
    }
    assert_eq!(rbee_api::codes::ALL_SLOTS_BUSY.status(), 503);
    assert_eq!(rbee_api::codes::MODEL_NOT_FOUND.status(), 404);
    assert_eq!(rbee_api::codes::INSUFFICIENT_RESOURCES.status(), 507);
    assert_eq!(rbee_api::codes::QUEUE_FULL.status(), 429);
    assert_eq!(rbee_api::codes::NO_CAPACITY.status(), 503);
    assert_eq!(rbee_api::codes::DEADLINE_EXCEEDED.status(), 504);
    assert_eq!(rbee_api::codes::WORKER_UNAVAILABLE.status(), 502);
    assert_eq!(rbee_api::ErrorCode::parse("SOMETHING_NEW"), None);
}

#[test]
fn rbee_error_bodies_convert() {
    let hive = ErrorBody::new(rbee_api::codes::MODEL_NOT_FOUND, "no such model", "req-3");
    assert_eq!(
        error_body_from_rbee(404, &hive),
        json!({"error":{"message":"no such model","type":"not_found_error","param":null,
                        "code":"MODEL_NOT_FOUND","request_id":"req-3"}})
    );
    let err = OpenAiError::from_rbee(429, &hive);
    assert_eq!(err.status(), 429);
    assert_eq!(err.to_body("req-3")["error"]["type"], "rate_limit_error");
}

#[test]
fn model_list_shape() {
    let list = ModelList::new(vec![
        ModelCard::new("smollm2", 1_700_000_000)
            .with_rbee(json!({"state":"loaded","hives":["hive-a"]})),
        ModelCard::new("other", 0),
    ]);
    assert_eq!(
        serde_json::to_value(&list).unwrap(),
        json!({"object":"list","data":[
            {"id":"smollm2","object":"model","created":1700000000,"owned_by":"rbee",
             "rbee":{"state":"loaded","hives":["hive-a"]}},
            {"id":"other","object":"model","created":0,"owned_by":"rbee"}
        ]})
    );
}

fn call(name: &str) -> rbee_api::ToolCall {
    rbee_api::ToolCall {
        id: format!("call_{name}"),
        kind: "function".into(),
        function: rbee_api::FunctionCall {
            name: name.into(),
            arguments: r#"{"a":1}"#.into(),
        },
    }
}

/// The `data:` objects of a Responses stream.
fn responses_events(evs: &[StreamEvent]) -> Vec<Value> {
    let echo = rbee_openai::ResponseEcho::of(&rbee_openai::ResponsesRequest::default());
    let mut s = rbee_openai::ResponsesStream::new("resp_r1", 1_700_000_000, "m", &echo);
    let text: String = evs.iter().map(|e| s.on_event(e)).collect();
    assert!(s.is_finished());
    text.split("\n\n")
        .filter_map(|f| f.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[test]
fn responses_stream_calls_alone_are_calls_alone_and_every_item_is_closed() {
    // Whitespace before the calls opens no message: the items are the two calls, at 0 and 1.
    let evs = responses_events(&[
        started(),
        token(0, "\n"),
        StreamEvent::ToolCalls {
            choice: 0,
            calls: vec![call("f"), call("g")],
        },
        end(StopReason::Eos),
    ]);
    let added: Vec<&Value> = evs
        .iter()
        .filter(|e| e["type"] == "response.output_item.added")
        .collect();
    let done: Vec<&Value> = evs
        .iter()
        .filter(|e| e["type"] == "response.output_item.done")
        .collect();
    assert_eq!(added.len(), 2, "{evs:#?}");
    assert_eq!(done.len(), 2);
    assert_eq!(added[0]["item"]["type"], "function_call");
    assert_eq!(
        (
            added[0]["output_index"].clone(),
            added[1]["output_index"].clone()
        ),
        (json!(0), json!(1))
    );
    let last = evs.last().unwrap();
    assert_eq!(last["type"], "response.completed");
    assert_eq!(last["response"]["output"].as_array().unwrap().len(), 2);
    assert_eq!(last["response"]["completed_at"], 1_700_000_000);
    let seqs: Vec<u64> = evs
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    // Text then calls: a closed message first, then the calls.
    let evs = responses_events(&[
        started(),
        token(0, "Sure."),
        StreamEvent::ToolCalls {
            choice: 0,
            calls: vec![call("f")],
        },
        end(StopReason::Eos),
    ]);
    let kinds: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let msg_done = kinds
        .iter()
        .position(|k| *k == "response.output_text.done")
        .unwrap();
    let call_added = kinds
        .iter()
        .rposition(|k| *k == "response.output_item.added")
        .unwrap();
    assert!(msg_done < call_added, "{kinds:?}");
    // Only whitespace and no calls: one message holding it; a cut answer is incomplete.
    let evs = responses_events(&[started(), token(0, " "), end(StopReason::MaxTokens)]);
    let last = evs.last().unwrap();
    assert_eq!(last["type"], "response.incomplete");
    assert_eq!(last["response"]["output"][0]["content"][0]["text"], " ");
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
    assert_eq!(last["response"]["completed_at"], Value::Null);
}

#[test]
fn events_for_answers_no_request_can_have_are_ignored() {
    let mut agg = Aggregator::new();
    agg.push(&StreamEvent::Token {
        index: 0,
        text: "x".into(),
        choice: 4_000_000_000,
        logprobs: vec![],
    });
    agg.push(&end(StopReason::Eos));
    let c = agg.into_chat_completion("id", 1, "m").unwrap();
    assert_eq!(c.choices.len(), 1);
    assert_eq!(c.choices[0].message.content.as_deref(), Some(""));
}
