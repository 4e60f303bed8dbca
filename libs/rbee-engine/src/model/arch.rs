//! What differs between the transformer families we run, read from a GGUF header.
//!
//! One forward pass serves them all (`mod.rs`); a family only decides which optional pieces a
//! layer has (Q/K/V biases, per-head Q/K norms, norms after attention and feed-forward, fused
//! projections), how rotary embeddings pair dimensions, which layers see a sliding window, and
//! a few scales. The values follow llama.cpp's `llama-model.cpp`, the reference our tests
//! compare against.

use candle_core::quantized::gguf_file;

use crate::EngineError;

/// `general.architecture` values this engine runs.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama", "mistral", "granite", "smollm", "qwen2", "qwen3", "gemma3", "phi3",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// llama, mistral, granite, smollm.
    Llama,
    /// Biases on Q, K and V.
    Qwen2,
    /// RMS norm on each head of Q and K before the rotation.
    Qwen3,
    /// Q/K norms, norms after attention and feed-forward, GELU, sliding-window layers.
    Gemma3,
    /// Q, K, V in one matrix; gate and up in one matrix.
    Phi3,
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeStyle {
    /// `(2i, 2i+1)`: llama's GGUF permutes Q and K for it (llama.cpp's `LLAMA_ROPE_TYPE_NORM`).
    Interleaved,
    /// `(i, i + n_rot/2)` (llama.cpp's `LLAMA_ROPE_TYPE_NEOX`).
    Halves,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    Silu,
    /// GELU with the tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// One set of rotary frequencies.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RopeParams {
    pub base: f32,
    /// Linear position scaling (`rope.scaling.factor` of type `linear`); 1 for none.
    pub linear_factor: f32,
}

/// Everything the forward pass needs to know about a model besides its tensors.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Hyper {
    pub family: Family,
    pub architecture: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub context_length: usize,
    pub rms_eps: f32,
    /// Dimensions of each head that are rotated (the first `n_rot`).
    pub n_rot: usize,
    pub rope_style: RopeStyle,
    /// Rotary frequencies of full-attention layers.
    pub rope_global: RopeParams,
    /// Rotary frequencies of sliding-window layers, when they differ.
    pub rope_local: Option<RopeParams>,
    /// Per layer: how many positions back (the query's own included) it sees; `None` is all.
    pub windows: Vec<Option<usize>>,
    /// Multiplies Q·K.
    pub attn_scale: f32,
    /// Multiplies the token embeddings (Gemma: √hidden; Granite: its `embedding_scale`).
    pub embed_scale: Option<f32>,
    /// Multiplies each block's output before it joins the residual stream (Granite).
    pub residual_scale: Option<f32>,
    /// Divides the logits (Granite's `logit_scale`).
    pub logit_scale: Option<f32>,
    /// Logits become `c × tanh(logit / c)` (Gemma's `final_logit_softcapping`).
    pub final_softcap: Option<f32>,
    pub activation: Activation,
}

fn md<'a>(c: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, EngineError> {
    c.metadata
        .get(key)
        .ok_or_else(|| EngineError::Model(format!("GGUF metadata `{key}` missing")))
}

pub(crate) fn md_usize(c: &gguf_file::Content, key: &str) -> Result<usize, EngineError> {
    let v = md(c, key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x.max(0) as usize))
        .map_err(|e| EngineError::Model(format!("GGUF metadata `{key}`: {e}")))
}

fn md_f32(c: &gguf_file::Content, key: &str) -> Option<f32> {
    let v = c.metadata.get(key)?;
    v.to_f32()
        .ok()
        .or_else(|| v.to_f64().ok().map(|x| x as f32))
}

fn md_str(c: &gguf_file::Content, key: &str) -> Option<String> {
    c.metadata.get(key)?.to_string().ok().cloned()
}

/// The architecture named in a GGUF header.
pub(crate) fn architecture(c: &gguf_file::Content) -> Result<String, EngineError> {
    md(c, "general.architecture")?
        .to_string()
        .cloned()
        .map_err(|e| EngineError::Model(format!("general.architecture: {e}")))
}

impl Family {
    fn of(arch: &str) -> Option<Self> {
        Some(match arch {
            "llama" | "mistral" | "granite" | "smollm" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma3" => Self::Gemma3,
            "phi3" => Self::Phi3,
            _ => return None,
        })
    }
}

/// Which layers use a sliding window, as llama.cpp reads it: per-layer flags, or every layer
/// but each `n`-th (default 6: five local layers, then a global one).
fn swa_pattern(c: &gguf_file::Content, key: &str, n_layer: usize) -> Vec<bool> {
    if let Some(gguf_file::Value::Array(flags)) = c.metadata.get(key) {
        return (0..n_layer)
            .map(|i| flags.get(i).and_then(|f| f.to_bool().ok()).unwrap_or(false))
            .collect();
    }
    let n = md_usize(c, key).unwrap_or(6);
    (0..n_layer).map(|i| n == 0 || i % n < n - 1).collect()
}

impl Hyper {
    pub(crate) fn read(c: &gguf_file::Content) -> Result<Self, EngineError> {
        let arch = architecture(c)?;
        let family = Family::of(&arch).ok_or_else(|| {
            EngineError::Model(format!(
                "architecture `{arch}` is not supported (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            ))
        })?;
        let key = |k: &str| format!("{arch}.{k}");
        let n_head = md_usize(c, &key("attention.head_count"))?;
        let n_kv_head = md_usize(c, &key("attention.head_count_kv")).unwrap_or(n_head);
        let hidden = md_usize(c, &key("embedding_length"))?;
        let n_layer = md_usize(c, &key("block_count"))?;
        let context_length = md_usize(c, &key("context_length"))?;
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 || n_layer == 0 {
            return Err(EngineError::Model(format!(
                "inconsistent attention shape: {n_layer} layers, {n_head} heads, {n_kv_head} kv heads"
            )));
        }
        let head_dim = match md_usize(c, &key("attention.key_length")) {
            Ok(k) if k > 0 => k,
            _ if hidden % n_head == 0 => hidden / n_head,
            _ => {
                return Err(EngineError::Model(format!(
                    "width {hidden} is not a multiple of {n_head} heads and no key_length is given"
                )));
            }
        };
        let value_length = md_usize(c, &key("attention.value_length")).unwrap_or(head_dim);
        if value_length != head_dim {
            return Err(EngineError::Model(format!(
                "key width {head_dim} and value width {value_length} differ (not supported)"
            )));
        }
        let n_rot = md_usize(c, &key("rope.dimension_count")).unwrap_or(head_dim);
        if n_rot == 0 || n_rot > head_dim || !n_rot.is_multiple_of(2) {
            return Err(EngineError::Model(format!(
                "rotary dimension {n_rot} does not fit heads of {head_dim}"
            )));
        }
        let rms_eps = md_f32(c, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5);
        let linear_factor = match md_str(c, &key("rope.scaling.type")).as_deref() {
            None | Some("none") => 1.0,
            Some("linear") => md_f32(c, &key("rope.scaling.factor"))
                .filter(|f| *f > 0.0)
                .unwrap_or(1.0),
            Some(other) => {
                return Err(EngineError::Model(format!(
                    "rotary scaling `{other}` is not supported (linear is)"
                )));
            }
        };
        let rope_global = RopeParams {
            base: md_f32(c, &key("rope.freq_base")).unwrap_or(10_000.0),
            linear_factor,
        };
        let default_scale = 1.0 / (head_dim as f32).sqrt();
        let mut h = Self {
            family,
            architecture: arch.clone(),
            n_layer,
            n_head,
            n_kv_head,
            head_dim,
            hidden,
            context_length,
            rms_eps,
            n_rot,
            rope_style: RopeStyle::Halves,
            rope_global,
            rope_local: None,
            windows: vec![None; n_layer],
            attn_scale: default_scale,
            embed_scale: None,
            residual_scale: None,
            logit_scale: None,
            final_softcap: None,
            activation: Activation::Silu,
        };
        match family {
            Family::Llama => {
                h.rope_style = RopeStyle::Interleaved;
                if arch == "granite" {
                    h.embed_scale = md_f32(c, &key("embedding_scale"));
                    h.residual_scale = md_f32(c, &key("residual_scale"));
                    h.logit_scale = md_f32(c, &key("logit_scale"));
                    if let Some(s) = md_f32(c, &key("attention.scale")) {
                        h.attn_scale = s;
                    }
                }
            }
            Family::Qwen2 | Family::Qwen3 | Family::Phi3 => {}
            Family::Gemma3 => {
                h.activation = Activation::GeluTanh;
                h.embed_scale = Some((hidden as f32).sqrt());
                // llama.cpp: Gemma 3 27B (62 layers) scales by its query_pre_attn_scalar,
                // width / heads; the others by the head width.
                if n_layer == 62 {
                    h.attn_scale = 1.0 / ((hidden / n_head) as f32).sqrt();
                }
                h.final_softcap = md_f32(c, &key("final_logit_softcapping")).filter(|c| *c > 0.0);
                let window = md_usize(c, &key("attention.sliding_window")).unwrap_or(0);
                if window > 0 {
                    let pattern = swa_pattern(c, &key("attention.sliding_window_pattern"), n_layer);
                    for (w, local) in h.windows.iter_mut().zip(pattern) {
                        if local {
                            *w = Some(window);
                        }
                    }
                    // Sliding-window layers rotate with their own base and no scaling.
                    h.rope_local = Some(RopeParams {
                        base: md_f32(c, &key("rope.freq_base_swa")).unwrap_or(10_000.0),
                        linear_factor: 1.0,
                    });
                }
            }
        }
        Ok(h)
    }
}
