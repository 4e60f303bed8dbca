//! Every supported family against llama.cpp: tiny random-weight GGUFs written with llama.cpp's
//! own `gguf` writer, and llama.cpp's log-probabilities at each position of a fixed prompt
//! (`test-harness/testdata/arch/`, with how they were made).
//!
//! The prompt goes in one token at a time, so every position also exercises the KV cache, the
//! rotation at that position and (Gemma 3) the sliding window, which is 8 positions there.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use candle_core::Device;
use rbee_engine::Transformer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    model_file: String,
    prompt_ids: Vec<u32>,
    positions: Vec<Position>,
}

#[derive(Deserialize)]
struct Position {
    /// llama.cpp's five most likely next tokens: `(id, log-probability)`.
    top: Vec<(u32, f64)>,
}

fn arch_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../test-harness/testdata/arch")
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

/// Runs the reference prompt through the model at `stem` and compares every position's top-5
/// log-probabilities with llama.cpp's, within `tol`. Returns the largest difference seen.
fn compare(stem: &str, tol: f64) -> f64 {
    let dir = arch_dir();
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{stem}.json"))).unwrap())
            .unwrap();
    let (model, _) = Transformer::load(&dir.join(&reference.model_file), &Device::Cpu, false)
        .unwrap_or_else(|e| panic!("{stem}: {e}"));
    let mut kv = model.new_seq(reference.prompt_ids.len());
    let mut worst = 0f64;
    for (pos, (&id, want)) in reference
        .prompt_ids
        .iter()
        .zip(&reference.positions)
        .enumerate()
    {
        let logits = model.forward(&[id], &mut kv, true).unwrap().unwrap();
        let got = log_softmax(&logits);
        for &(tok, lp) in &want.top {
            let diff = (got[tok as usize] - lp).abs();
            worst = worst.max(diff);
            assert!(
                diff <= tol,
                "{stem} position {pos}: token {tok} has log-probability {} here, {lp} in llama.cpp",
                got[tok as usize]
            );
        }
        // The most likely token agrees unless llama.cpp's own top two are within the tolerance.
        let best = (0..got.len())
            .max_by(|&a, &b| got[a].total_cmp(&got[b]))
            .unwrap();
        let (first, second) = (want.top[0], want.top[1]);
        assert!(
            best as u32 == first.0 || first.1 - second.1 <= tol,
            "{stem} position {pos}: argmax {best}, llama.cpp's {}",
            first.0
        );
    }
    worst
}

// F32 weights: the same arithmetic up to float order (Gemma's GELU is llama.cpp's f16 table
// there, exact tanh here: ~2e-3).
const F32_TOL: f64 = 1e-4;
const GEMMA_F32_TOL: f64 = 5e-3;
// Q8_0: both engines also round the activations to Q8_0 blocks; an input a hair different
// rounds one step apart (up to ~0.15 in the helper's float64 check).
const Q8_TOL: f64 = 0.2;

#[test]
fn llama_matches_llama_cpp() {
    eprintln!("f32 {:.2e}", compare("llama-tiny-f32", F32_TOL));
    eprintln!("q8_0 {:.2e}", compare("llama-tiny-q8_0", Q8_TOL));
}

#[test]
fn qwen2_with_qkv_biases_and_tied_output_matches_llama_cpp() {
    eprintln!("f32 {:.2e}", compare("qwen2-tiny-f32", F32_TOL));
    eprintln!("q8_0 {:.2e}", compare("qwen2-tiny-q8_0", Q8_TOL));
}

#[test]
fn qwen3_with_head_norms_and_wide_heads_matches_llama_cpp() {
    eprintln!("f32 {:.2e}", compare("qwen3-tiny-f32", F32_TOL));
    eprintln!("q8_0 {:.2e}", compare("qwen3-tiny-q8_0", Q8_TOL));
}

#[test]
fn phi3_with_fused_projections_matches_llama_cpp() {
    eprintln!("f32 {:.2e}", compare("phi3-tiny-f32", F32_TOL));
    eprintln!("q8_0 {:.2e}", compare("phi3-tiny-q8_0", Q8_TOL));
}

#[test]
fn gemma3_with_sliding_windows_matches_llama_cpp() {
    eprintln!("f32 {:.2e}", compare("gemma3-tiny-f32", GEMMA_F32_TOL));
    eprintln!("q8_0 {:.2e}", compare("gemma3-tiny-q8_0", Q8_TOL));
}

#[test]
fn an_unsupported_architecture_is_refused_by_name() {
    let dir = rbee_test_harness::temp_dir("arch");
    // The llama file with its architecture renamed: same length, so offsets stay valid.
    let mut bytes = std::fs::read(arch_dir().join("llama-tiny-f32.gguf")).unwrap();
    let at = bytes
        .windows(5)
        .position(|w| w == b"llama")
        .expect("architecture string");
    bytes[at..at + 5].copy_from_slice(b"mamba");
    let path = dir.join("mamba.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = Transformer::load(&path, &Device::Cpu, false)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("`mamba` is not supported"), "{err}");
    assert!(err.contains("gemma3"), "names what is supported: {err}");
}

#[test]
fn the_hive_and_the_engine_agree_on_what_runs() {
    assert_eq!(
        rbee_engine::SUPPORTED_ARCHITECTURES,
        rbee_models::SUPPORTED_ARCHITECTURES
    );
}
