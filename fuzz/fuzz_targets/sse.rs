//! The SSE decoder every hop uses on a peer's stream, fed arbitrary bytes in arbitrary chunks,
//! and the observer that watches streams pass: no panic, and the decoder's buffer stays
//! bounded by what it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut decoder = rbee_api::sse::SseDecoder::default();
    let mut observer = rbee_api::sse::StreamObserver::default();
    let step = usize::from(split).max(1);
    for chunk in rest.chunks(step) {
        for payload in decoder.push(chunk) {
            let _ = serde_json::from_str::<rbee_api::StreamEvent>(&payload);
        }
        observer.observe(chunk);
    }
    let _ = (observer.started(), observer.terminal(), observer.done());
});
