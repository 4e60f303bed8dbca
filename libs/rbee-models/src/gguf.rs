//! GGUF metadata and a memory estimate for running a model on CPU.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use serde::Serialize;

use crate::ModelError;

/// Fixed part of [`MemoryEstimate::overhead_bytes`]: runtime, tokenizer, thread stacks.
pub const OVERHEAD_FIXED_BYTES: u64 = 64 * 1024 * 1024;
/// Proportional part of the overhead, in percent of the weights: activations and scratch.
pub const OVERHEAD_WEIGHTS_PERCENT: u64 = 10;
/// Bytes per cached K or V element (the CPU cache is f32).
pub const KV_ELEMENT_BYTES: u64 = 4;

/// `general.architecture` values the worker runs (the engine's own list, which a test keeps
/// equal): the hive refuses others at spawn, before any memory is spent.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama", "mistral", "granite", "smollm", "qwen2", "qwen3", "gemma3", "phi3",
];

/// What a GGUF file says about its model (metadata only; no tensor is loaded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GgufSummary {
    /// `general.architecture`, e.g. `llama`.
    pub architecture: String,
    /// `general.name`, when present.
    pub name: Option<String>,
    /// File size in bytes.
    pub file_bytes: u64,
    /// `<arch>.block_count` (layers).
    pub block_count: u64,
    /// `<arch>.attention.head_count`.
    pub head_count: u64,
    /// `<arch>.attention.head_count_kv` (defaults to `head_count`).
    pub head_count_kv: u64,
    /// `<arch>.embedding_length`.
    pub embedding_length: u64,
    /// `<arch>.context_length` (the model's declared context).
    pub context_length: u64,
    /// Per-head K width: `<arch>.attention.key_length`, else `embedding_length / head_count`.
    pub key_length: u64,
    /// Per-head V width: `<arch>.attention.value_length`, else `key_length`.
    pub value_length: u64,
}

/// Bytes a loaded model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// The whole file (weights, plus the metadata that is also loaded).
    pub weights_bytes: u64,
    /// `layers × kv_heads × (key_length + value_length) × context × 4` (f32 K and V).
    pub kv_cache_bytes: u64,
    /// [`OVERHEAD_FIXED_BYTES`] + [`OVERHEAD_WEIGHTS_PERCENT`] % of the weights.
    pub overhead_bytes: u64,
    /// The sum of the above.
    pub total_bytes: u64,
    /// The context the estimate is for.
    pub context: u64,
}

impl GgufSummary {
    /// Reads the header and metadata of `path` (blocking; the tensors are not read). A model
    /// whose architecture the worker does not run is an error naming it.
    pub fn read(path: &Path) -> Result<GgufSummary, ModelError> {
        let mut file =
            std::fs::File::open(path).map_err(|e| ModelError::io("cannot open", path, e))?;
        let file_bytes = file
            .metadata()
            .map_err(|e| ModelError::io("cannot inspect", path, e))?
            .len();
        Self::read_from(&mut file, file_bytes, path)
    }

    /// Reads the header and metadata from `reader` (a file of `file_bytes` bytes; `path`
    /// names it in errors). Any bytes may come in: errors, never a panic.
    pub fn read_from<R: std::io::Read + std::io::Seek>(
        reader: &mut R,
        file_bytes: u64,
        path: &Path,
    ) -> Result<GgufSummary, ModelError> {
        let content = Content::read(reader).map_err(|e| ModelError::InvalidGguf {
            path: path.to_path_buf(),
            // candle appends a backtrace when RUST_BACKTRACE is set: keep the message only.
            reason: e.to_string().lines().next().unwrap_or_default().to_owned(),
        })?;
        let bad = |reason: String| ModelError::InvalidGguf {
            path: path.to_path_buf(),
            reason,
        };
        let architecture = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(bad("no general.architecture string".into())),
        };
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(bad(format!(
                "architecture `{architecture}` is not one the worker runs (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        let name = match content.metadata.get("general.name") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let get = |key: &str| meta_u64(content.metadata.get(&format!("{architecture}.{key}")));
        let need = |key: &str| {
            get(key)
                .filter(|v| *v > 0)
                .ok_or_else(|| bad(format!("missing or zero {architecture}.{key}")))
        };
        let block_count = need("block_count")?;
        let head_count = need("attention.head_count")?;
        let embedding_length = need("embedding_length")?;
        let context_length = need("context_length")?;
        let head_count_kv = get("attention.head_count_kv")
            .filter(|v| *v > 0)
            .unwrap_or(head_count);
        let key_length = get("attention.key_length")
            .filter(|v| *v > 0)
            .unwrap_or(embedding_length / head_count);
        let value_length = get("attention.value_length")
            .filter(|v| *v > 0)
            .unwrap_or(key_length);
        Ok(GgufSummary {
            architecture,
            name,
            file_bytes,
            block_count,
            head_count,
            head_count_kv,
            embedding_length,
            context_length,
            key_length,
            value_length,
        })
    }

    /// `embedding_length / head_count`.
    pub fn head_dim(&self) -> u64 {
        self.embedding_length / self.head_count.max(1)
    }
}

/// Memory to run the model with a KV cache of `context` positions (the model's declared context
/// when `None`; for a batching worker, its whole pool), on CPU with an f32 cache.
pub fn estimate_memory(summary: &GgufSummary, context: Option<usize>) -> MemoryEstimate {
    let context = context.map_or(summary.context_length, |c| c as u64);
    let weights_bytes = summary.file_bytes;
    let kv_cache_bytes = summary
        .block_count
        .saturating_mul(summary.head_count_kv)
        .saturating_mul(summary.key_length + summary.value_length)
        .saturating_mul(context)
        .saturating_mul(KV_ELEMENT_BYTES);
    let overhead_bytes = OVERHEAD_FIXED_BYTES + weights_bytes / 100 * OVERHEAD_WEIGHTS_PERCENT;
    MemoryEstimate {
        weights_bytes,
        kv_cache_bytes,
        overhead_bytes,
        total_bytes: weights_bytes
            .saturating_add(kv_cache_bytes)
            .saturating_add(overhead_bytes),
        context,
    }
}

/// An unsigned metadata value; for per-layer arrays, the largest element.
fn meta_u64(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::U8(x) => Some(u64::from(*x)),
        Value::U16(x) => Some(u64::from(*x)),
        Value::U32(x) => Some(u64::from(*x)),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        Value::Array(items) => items.iter().filter_map(|i| meta_u64(Some(i))).max(),
        _ => None,
    }
}
