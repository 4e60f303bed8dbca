//! Grammar-constrained decoding and log-probabilities on the default model.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::Instant;

use rbee_engine::{
    Engine, GenEvent, GenerationJob, GenerationParams, GenerationSummary, Grammar, LoadOptions,
    Prompt, SamplingParams, StopReason, TokenLogprob,
};
use rbee_test_harness::test_model;
use serde_json::{Value, json};

fn engine() -> Engine {
    let opts = LoadOptions {
        parallel: Some(4),
        ..LoadOptions::default()
    };
    Engine::load(&test_model(), &opts).expect("model loads")
}

fn params(max_tokens: usize, temperature: f32, seed: u64) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            seed,
            ..SamplingParams::default()
        },
        stop: vec![],
        logprobs: None,
    }
}

fn chat(text: &str) -> Prompt {
    Prompt::Chat(vec![("user".into(), text.into())])
}

/// Runs one job; its text, log-probabilities and summary.
fn run(
    engine: &Engine,
    prompt: &Prompt,
    params: GenerationParams,
    grammar: Option<&Grammar>,
) -> (String, Vec<TokenLogprob>, GenerationSummary) {
    let constraint = grammar.map(|g| engine.compile_grammar(g).expect("grammar compiles"));
    let (tx, rx) = mpsc::channel();
    engine
        .submit(GenerationJob {
            prompt_tokens: engine.prepare(prompt).unwrap(),
            params,
            constraint,
            prompt_group: None,
            cancel: Arc::new(AtomicBool::new(false)),
            deadline: None,
            accepted_at: Instant::now(),
            sink: Box::new(move |e| tx.send(e).is_ok()),
            on_done: None,
        })
        .unwrap();
    let (mut text, mut probs) = (String::new(), Vec::new());
    loop {
        match rx.recv().unwrap() {
            GenEvent::Text {
                text: t, logprobs, ..
            } => {
                text.push_str(&t);
                probs.extend(logprobs);
            }
            GenEvent::FirstToken => {}
            GenEvent::Finished(s) => return (text, probs, s),
            GenEvent::Failed(e) => panic!("generation failed: {e}"),
        }
    }
}

#[test]
fn schema_constrained_answers_parse_and_follow_the_schema() {
    let engine = engine();
    let person = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
                    "lat": {"type": "number", "minimum": -90, "maximum": 90, "multipleOf": 0.25}
                },
                "required": ["city", "zip", "lat"],
                "additionalProperties": false
            }
        },
        "required": ["name", "age", "role", "tags", "address"],
        "additionalProperties": false
    });
    for (seed, temperature) in [(0, 0.0), (1, 1.0), (2, 1.0)] {
        let (text, _, s) = run(
            &engine,
            &chat("Describe a person as JSON."),
            params(200, temperature, seed),
            Some(&Grammar::JsonSchema(person.clone())),
        );
        assert_eq!(s.stop_reason, StopReason::Eos, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 5, "{text}");
        assert!(v["name"].as_str().unwrap().chars().count() <= 20, "{text}");
        assert!((0..=120).contains(&v["age"].as_i64().unwrap()), "{text}");
        assert!(["admin", "user", "guest"].contains(&v["role"].as_str().unwrap()));
        let tags = v["tags"].as_array().unwrap();
        assert!((1..=3).contains(&tags.len()), "{text}");
        assert!(
            (10000..=99999).contains(&v["address"]["zip"].as_i64().unwrap()),
            "{text}"
        );
        assert!(
            v["address"]["lat"].as_f64().unwrap().abs() <= 90.0,
            "{text}"
        );
        assert!(v["address"]["city"].is_string(), "{text}");
    }
    // Any object, and a regular expression.
    let (text, _, _) = run(
        &engine,
        &chat("Reply with a JSON object with a field `colour` naming a colour."),
        params(200, 0.0, 0),
        Some(&Grammar::JsonObject),
    );
    let v = serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(v.is_object(), "{text}");
    let (text, _, s) = run(
        &engine,
        &chat("What is 2+2?"),
        params(20, 0.0, 0),
        Some(&Grammar::Regex("(yes|no|[0-9]{1,3})".into())),
    );
    assert_eq!(s.stop_reason, StopReason::Eos);
    assert!(
        text == "yes" || text == "no" || text.parse::<u32>().is_ok(),
        "{text}"
    );
}

#[test]
fn a_bad_grammar_is_refused_before_generation() {
    let engine = engine();
    let err = engine
        .compile_grammar(&Grammar::Lark("start: missing_rule".into()))
        .unwrap_err();
    assert!(err.to_string().contains("grammar"), "{err}");
    let err = engine
        .compile_grammar(&Grammar::JsonSchema(json!({"type": "no-such-type"})))
        .unwrap_err();
    assert!(err.to_string().contains("grammar"), "{err}");
}

#[test]
fn logprobs_are_the_models_own_and_greedy_picks_the_top_one() {
    let engine = engine();
    let mut p = params(12, 0.0, 0);
    p.logprobs = Some(3);
    let (text, probs, s) = run(&engine, &chat("Name a colour."), p, None);
    assert_eq!(
        probs.len(),
        s.completion_tokens - usize::from(s.stop_reason == StopReason::Eos)
    );
    let joined: Vec<u8> = probs.iter().flat_map(|t| t.chosen.bytes.clone()).collect();
    assert_eq!(String::from_utf8_lossy(&joined), text);
    for t in &probs {
        assert_eq!(t.top.len(), 3);
        assert_eq!(
            t.top[0].id, t.chosen.id,
            "greedy picks the most likely token"
        );
        assert!((t.top[0].logprob - t.chosen.logprob).abs() < 1e-6);
        assert!(t.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        let mass: f32 = t.top.iter().map(|a| a.logprob.exp()).sum();
        assert!(t.chosen.logprob <= 0.0 && mass <= 1.0 + 1e-4, "{t:?}");
    }
    // Sampling at temperature 1 reports the same distribution, whatever token it drew.
    let mut p = params(12, 1.0, 7);
    p.logprobs = Some(0);
    let (_, probs, _) = run(&engine, &chat("Name a colour."), p, None);
    assert!(
        probs
            .iter()
            .all(|t| t.top.is_empty() && t.chosen.logprob <= 0.0)
    );
}
