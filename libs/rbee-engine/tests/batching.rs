//! Continuous batching on the default model: answers do not depend on company, seeded sampling
//! is per sequence, and prefix reuse skips work without changing the answer.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use rbee_engine::{
    Engine, GenEvent, GenerationParams, GenerationSummary, LoadOptions, Prompt, SamplingParams,
    StepObserver, StepReport,
};
use rbee_test_harness::{reference, test_model};

mod common;

type Outcome = mpsc::Receiver<GenEvent>;

fn submit(engine: &Engine, prompt: &Prompt, params: GenerationParams) -> Outcome {
    common::submit(engine, prompt, params, false, None)
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

fn chat(messages: &[(&str, &str)]) -> Prompt {
    Prompt::Chat(
        messages
            .iter()
            .map(|(r, c)| ((*r).to_owned(), (*c).to_owned()))
            .collect(),
    )
}

/// Counts the tokens the engine actually ran and the widest step.
#[derive(Default)]
struct Steps {
    tokens: AtomicUsize,
    widest: AtomicUsize,
}

impl StepObserver for Steps {
    fn on_step(&self, r: &StepReport) {
        self.tokens.fetch_add(r.tokens, Ordering::SeqCst);
        self.widest.fetch_max(r.sequences, Ordering::SeqCst);
    }
}

fn load(parallel: usize) -> (Engine, Arc<Steps>) {
    let steps = Arc::new(Steps::default());
    let opts = LoadOptions {
        parallel: Some(parallel),
        ..LoadOptions::default()
    };
    let e = Engine::load_observed(&test_model(), &opts, Some(steps.clone())).expect("model loads");
    (e, steps)
}

#[test]
fn answers_do_not_depend_on_company() {
    let (engine, steps) = load(8);
    let reference = reference();
    // The llama.cpp reference cases, then plain prompts to make eight, then one seeded draw.
    let mut jobs: Vec<(Prompt, GenerationParams)> = reference
        .greedy_chat
        .iter()
        .take(5)
        .map(|c| {
            let msgs: Vec<(String, String)> = c
                .messages
                .iter()
                .map(|m| {
                    (
                        m["role"].as_str().unwrap().to_owned(),
                        m["content"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            (Prompt::Chat(msgs), params(c.max_tokens as usize, 0.0, 0))
        })
        .collect();
    for text in [
        "The capital of France is",
        "Once upon a time, in a small village,",
        "def fibonacci(n):",
    ] {
        if jobs.len() < 7 {
            jobs.push((Prompt::Text(text.into()), params(40, 0.0, 0)));
        }
    }
    jobs.push((
        chat(&[("user", "Write a short poem about bees.")]),
        params(40, 0.9, 1234),
    ));

    let alone: Vec<(String, GenerationSummary)> = jobs
        .iter()
        .map(|(p, gp)| common::collect(submit(&engine, p, gp.clone())))
        .collect();
    // (How these compare with llama.cpp's answers is `reference.rs`'s business.)
    assert_eq!(
        steps.widest.load(Ordering::SeqCst),
        1,
        "one at a time so far"
    );

    // All at once: they share steps, and every answer is the same as alone.
    let pending: Vec<Outcome> = jobs
        .iter()
        .map(|(p, gp)| submit(&engine, p, gp.clone()))
        .collect();
    let together: Vec<(String, GenerationSummary)> =
        pending.into_iter().map(common::collect).collect();
    let widest = steps.widest.load(Ordering::SeqCst);
    assert!(widest >= 4, "requests were batched: widest step {widest}");
    for (i, ((a, sa), (b, sb))) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a, b,
            "job {i}: the same text alone and in a batch of {widest}"
        );
        assert_eq!(sa.completion_tokens, sb.completion_tokens, "job {i}");
        assert_eq!(sa.stop_reason, sb.stop_reason, "job {i}");
    }
    // The counters are published after the step that finished the last sequence.
    let t0 = Instant::now();
    while engine.load_state().running > 0 && t0.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(engine.load_state().running, 0);
    assert_eq!(engine.load_state().slots, 8);
}

#[test]
fn a_follow_up_turn_reuses_the_conversation_so_far() {
    let system = "You are a patient assistant for a beekeeping club. Answer briefly, in plain \
                  words, and never invent facts about the club, its members or its hives. \
                  If a question is not about bees or beekeeping, say so politely.";
    let first = [("system", system), ("user", "What do bees make?")];
    let (engine, steps) = load(4);
    let (answer, s1) = common::collect(submit(&engine, &chat(&first), params(24, 0.0, 0)));
    assert_eq!(s1.cached_tokens, 0, "nothing cached on a fresh engine");
    let second = [
        ("system", system),
        ("user", "What do bees make?"),
        ("assistant", answer.as_str()),
        ("user", "And what do they eat?"),
    ];
    let second = chat(&second);
    let prompt_len = engine.prepare(&second).unwrap().len();

    let before = steps.tokens.load(Ordering::SeqCst);
    let (reused, s2) = common::collect(submit(&engine, &second, params(24, 0.0, 0)));
    let ran = steps.tokens.load(Ordering::SeqCst) - before;
    println!(
        "turn 2: {prompt_len} prompt tokens, {} cached, TTFT {:.1} ms (turn 1 {:.1} ms)",
        s2.cached_tokens,
        s2.time_to_first_token.unwrap() * 1e3,
        s1.time_to_first_token.unwrap() * 1e3
    );
    assert!(
        s2.cached_tokens >= s1.prompt_tokens,
        "the first turn's prompt is reused: {} of {prompt_len}",
        s2.cached_tokens
    );
    // Only the new part of the prompt and the generated tokens ran.
    assert_eq!(
        ran,
        prompt_len - s2.cached_tokens + s2.completion_tokens - 1
    );

    // The same answer as an engine that has never seen the conversation.
    let (fresh, _) = load(1);
    let (recomputed, s3) = common::collect(submit(&fresh, &second, params(24, 0.0, 0)));
    assert_eq!(s3.cached_tokens, 0);
    assert_eq!(
        reused, recomputed,
        "prefix reuse does not change the answer"
    );
}

#[test]
fn several_answers_to_one_prompt_read_it_once() {
    let (engine, steps) = load(4);
    let prompt = chat(&[(
        "user",
        "Tell me a long story about a lighthouse keeper and the sea.",
    )]);
    let tokens = engine.prepare(&prompt).unwrap();
    let before = steps.tokens.load(Ordering::SeqCst);
    let group = Some(7);
    let rxs: Vec<Outcome> = (0..3)
        .map(|i| {
            let (tx, rx) = mpsc::channel();
            engine
                .submit(rbee_engine::GenerationJob {
                    prompt_tokens: tokens.clone(),
                    params: params(6, 1.0, 42 + i),
                    constraint: None,
                    prompt_group: group,
                    cancel: Default::default(),
                    deadline: None,
                    accepted_at: Instant::now(),
                    sink: Box::new(move |e| tx.send(e).is_ok()),
                    on_done: None,
                })
                .unwrap();
            rx
        })
        .collect();
    let results: Vec<(String, GenerationSummary)> = rxs.into_iter().map(common::collect).collect();
    let ran = steps.tokens.load(Ordering::SeqCst) - before;
    // The first read the prompt, the others copied it: one prompt's worth of positions ran,
    // plus the decode steps (three prompts' worth without the sharing).
    let decode: usize = results.iter().map(|(_, s)| s.completion_tokens).sum();
    assert!(
        ran <= tokens.len() + decode,
        "ran {ran} positions for a {}-token prompt",
        tokens.len()
    );
    let copied = results
        .iter()
        .filter(|(_, s)| s.cached_tokens == tokens.len() - 1)
        .count();
    assert!(copied >= 2, "{results:?}");
    // Copied state gives the answer reading the prompt would: seed 43 alone, afterwards,
    // answers what the copying sibling did.
    let (alone, _) = common::collect(submit(&engine, &prompt, params(6, 1.0, 43)));
    assert_eq!(results[1].0, alone);
}
