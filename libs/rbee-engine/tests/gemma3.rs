//! A real Gemma 3 file (270M, Q4_K_M, SentencePiece vocabulary of 262k) against llama.cpp's
//! greedy continuations on the same file (`../shared/testdata/gemma3-270m-reference.json`,
//! copied to `test-harness/testdata/`): prompt token counts, and the text token by token,
//! where a difference is accepted only at a step where llama.cpp's own top two were a near-tie.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rbee_engine::{Engine, GenerationParams, LoadOptions, Prompt, SamplingParams, StopReason};
use rbee_test_harness::gemma3_model;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    sha256: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    max_tokens: usize,
    text: String,
    finish_reason: String,
    usage: Usage,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
}

#[derive(Deserialize)]
struct Step {
    token: String,
    /// llama.cpp's three most likely tokens and their probabilities.
    top: Vec<(String, f64)>,
}

/// Top-two log-probability gap under which llama.cpp's choice counts as a tie (its KV cache is
/// f16; two llama.cpp builds disagree there too).
const NEAR_TIE: f64 = 0.2;

#[test]
fn greedy_continuations_match_llama_cpp() {
    let reference: Reference = serde_json::from_str(include_str!(
        "../../../test-harness/testdata/gemma3-270m-reference.json"
    ))
    .unwrap();
    assert_eq!(reference.sha256, rbee_test_harness::GEMMA3_270M.sha256);
    let engine = Engine::load(&gemma3_model(), &LoadOptions::default()).expect("Gemma 3 loads");
    assert_eq!(engine.info().architecture, "gemma3");
    let mut exact = 0;
    for case in &reference.cases {
        let prompt = Prompt::Text(case.prompt.clone());
        let ids = engine.prepare(&prompt).unwrap();
        assert_eq!(
            ids.len(),
            case.usage.prompt_tokens,
            "prompt tokens of {:?}",
            case.prompt
        );
        let params = GenerationParams {
            max_tokens: case.max_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: vec![],
            logprobs: None,
        };
        let (text, summary) = engine.generate(&prompt, params).unwrap();
        println!("{:?} -> {text:?}", case.prompt);
        if text == case.text {
            exact += 1;
            assert_eq!(summary.completion_tokens, case.usage.completion_tokens);
            let expected = if case.finish_reason == "stop" {
                StopReason::Eos
            } else {
                StopReason::MaxTokens
            };
            assert_eq!(summary.stop_reason, expected);
            continue;
        }
        // Where the texts part: the first step whose token no longer follows our text.
        let mut at = 0;
        let step = case
            .steps
            .iter()
            .position(|s| {
                let follows = text[at..].starts_with(&s.token);
                at += s.token.len();
                !follows || at > text.len()
            })
            .unwrap_or_else(|| {
                panic!(
                    "{:?}: {text:?} is not llama.cpp's {:?}",
                    case.prompt, case.text
                )
            });
        let top = &case.steps[step].top;
        let gap = (top[0].1 / top[1].1).ln();
        println!(
            "  parts from llama.cpp at step {step}, where its top two are {gap:.3} apart: {top:?}"
        );
        assert!(
            gap < NEAR_TIE,
            "{:?}: ours {text:?}, llama.cpp {:?}; step {step} was not a near-tie ({top:?})",
            case.prompt,
            case.text
        );
    }
    assert!(
        exact * 2 >= reference.cases.len(),
        "only {exact} of the answers were exact"
    );
}
