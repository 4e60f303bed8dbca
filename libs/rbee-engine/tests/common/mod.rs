//! Submitting a job to an engine and reading its events, for the engine's tests.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::Instant;

use rbee_engine::{Engine, GenEvent, GenerationJob, GenerationParams, GenerationSummary, Prompt};

/// Renders and submits `prompt`; the events arrive on the returned channel.
pub fn submit(
    engine: &Engine,
    prompt: &Prompt,
    params: GenerationParams,
    cancel: bool,
    deadline: Option<Instant>,
) -> mpsc::Receiver<GenEvent> {
    let tokens = engine.prepare(prompt).unwrap();
    let (tx, rx) = mpsc::channel();
    engine
        .submit(GenerationJob {
            prompt_tokens: tokens,
            params,
            constraint: None,
            prompt_group: None,
            cancel: Arc::new(AtomicBool::new(cancel)),
            deadline,
            accepted_at: Instant::now(),
            sink: Box::new(move |e| tx.send(e).is_ok()),
            on_done: None,
        })
        .unwrap();
    rx
}

/// The text and summary of a job; a failed job fails the test.
pub fn collect(rx: mpsc::Receiver<GenEvent>) -> (String, GenerationSummary) {
    let mut text = String::new();
    loop {
        match rx.recv().unwrap() {
            GenEvent::Text { text: t, .. } => text.push_str(&t),
            GenEvent::FirstToken => {}
            GenEvent::Finished(s) => return (text, s),
            GenEvent::Failed(e) => panic!("generation failed: {e}"),
        }
    }
}
