//! GGUF metadata and the memory estimate of the default model, and non-GGUF files refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rbee_models::{GgufSummary, MemoryEstimate, estimate_memory};

#[test]
fn summary_of_the_default_model() {
    let path = rbee_test_harness::test_model();
    let s = GgufSummary::read(&path).unwrap();
    assert_eq!(s.architecture, "llama");
    assert_eq!(s.name.as_deref(), Some("Smollm2 135M 8k Lc100K Mix1 Ep2"));
    assert_eq!(s.file_bytes, 98_362_432);
    assert_eq!(s.block_count, 30);
    assert_eq!(s.head_count, 9);
    assert_eq!(s.head_count_kv, 3);
    assert_eq!(s.embedding_length, 576);
    assert_eq!(s.context_length, 8192);
    assert_eq!(s.head_dim(), 64);
    assert_eq!((s.key_length, s.value_length), (64, 64));
}

#[test]
fn memory_estimate_of_the_default_model() {
    let s = GgufSummary::read(&rbee_test_harness::test_model()).unwrap();
    // KV: 2 × 30 layers × 3 kv heads × 64 × 8192 tokens × 4 bytes.
    let kv = 2 * 30 * 3 * 64 * 8192 * 4;
    assert_eq!(kv, 377_487_360);
    // Overhead: 64 MiB + 10 % of 98,362,432.
    let overhead = 67_108_864 + 9_836_240;
    assert_eq!(
        estimate_memory(&s, None),
        MemoryEstimate {
            weights_bytes: 98_362_432,
            kv_cache_bytes: kv,
            overhead_bytes: overhead,
            total_bytes: 98_362_432 + kv + overhead,
            context: 8192,
        }
    );
    let small = estimate_memory(&s, Some(2048));
    assert_eq!(small.kv_cache_bytes, 94_371_840);
    assert_eq!(small.total_bytes, 98_362_432 + 94_371_840 + overhead);
    assert_eq!(small.context, 2048);
}

#[test]
fn a_file_that_is_not_gguf_is_refused() {
    let dir = rbee_test_harness::temp_dir("gguf-bad");
    let path = dir.join("bad.gguf");
    std::fs::write(&path, b"not a gguf file at all").unwrap();
    let err = GgufSummary::read(&path).unwrap_err();
    assert_eq!(err.code().as_str(), "INVALID_GGUF");
    assert!(
        err.to_string()
            .starts_with(&format!("invalid GGUF file {}", path.display()))
    );
    let err = GgufSummary::read(&dir.join("missing.gguf")).unwrap_err();
    assert_eq!(err.code().as_str(), "IO");
}
