//! Reading a GGUF file into a [`Transformer`]: the family's tensors, repacked where our CPU
//! kernels are faster, and its rotary tables.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{Device, Tensor};

use super::arch::Hyper;
use super::rope::{DeviceRope, HostRope, inv_freq};
use super::weights::{Embedding, Projections};
use super::{Layer, ModelConfig, Rotary, Transformer};
use crate::EngineError;
use crate::qmatmul::Q80Matrix;

/// Quantized types that candle has no fast CPU dot-product kernel for; on CPU they are
/// repacked to Q8_0 at load (more bytes, much faster, numerically at least as precise).
const SLOW_ON_CPU: &[GgmlDType] = &[GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1];

impl Transformer {
    /// Reads the GGUF at `path` onto `device`. Returns the parsed header too (the tokenizer and
    /// chat template live in its metadata).
    pub fn load(
        path: &Path,
        device: &Device,
        repack_on_cpu: bool,
    ) -> Result<(Self, gguf_file::Content), EngineError> {
        let mut file =
            File::open(path).map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::Model(format!("{}: not a GGUF file: {e}", path.display())))?;
        let hp = Hyper::read(&content)?;
        let name = content
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        let has = |name: &str| content.tensor_infos.contains_key(name);
        if has("rope_factors_long.weight") {
            return Err(EngineError::Model(
                "long-context rotary scaling (rope_factors_long) is not supported yet".into(),
            ));
        }

        let cpu = device.is_cpu();
        let mut rd = Reader {
            content: &content,
            file,
            device,
        };
        let first_attn = if has("blk.0.attn_qkv.weight") {
            "blk.0.attn_qkv.weight"
        } else {
            "blk.0.attn_q.weight"
        };
        let file_type = format!("{:?}", rd.q(first_attn)?.dtype());
        let mut compute_type = file_type.clone();
        let mut linear = |t: QTensor| -> Result<QMatMul, EngineError> {
            let t = if cpu && repack_on_cpu && SLOW_ON_CPU.contains(&t.dtype()) {
                let f = t.dequantize(device)?;
                let q = QTensor::quantize(&f, GgmlDType::Q8_0)?;
                compute_type = format!("{:?}", q.dtype());
                q
            } else {
                t
            };
            Ok(QMatMul::from_qtensor(t)?)
        };
        // Q4_1 on CPU takes our kernel, unless asked to repack to Q8_0.
        let cpu_q41 = cpu && !repack_on_cpu;
        let tok_embd = Arc::new(rd.q("token_embd.weight")?);
        let embed = Embedding::new(tok_embd.clone(), cpu)?;
        let vocab = embed.vocab;
        let dtype = tok_embd.dtype();
        let head_repacked = cpu_q41 && dtype == GgmlDType::Q4_1
            || cpu && repack_on_cpu && SLOW_ON_CPU.contains(&dtype);
        let output = if has("output.weight") {
            Projections::new(vec![rd.q("output.weight")?], cpu_q41, &mut linear)?
        } else if cpu && dtype == GgmlDType::Q8_0 && !head_repacked {
            // Tied embeddings (SmolLM2): the output head is the embedding matrix, shared.
            Projections::Q80(vec![Q80Matrix::new(tok_embd)?])
        } else if !head_repacked {
            Projections::Separate(vec![QMatMul::from_arc(tok_embd)?])
        } else {
            // Tied, but the head is repacked for a faster kernel: its own copy.
            Projections::new(vec![rd.q("token_embd.weight")?], cpu_q41, &mut linear)?
        };
        let norm = rd.vector("output_norm.weight")?;
        let freq_factors = if has("rope_freqs.weight") {
            Some(rd.vector("rope_freqs.weight")?.to_vec1::<f32>()?)
        } else {
            None
        };

        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let w = |s: &str| format!("blk.{i}.{s}.weight");
            let b = |s: &str| format!("blk.{i}.{s}.bias");
            let attn_norm = rd.vector(&w("attn_norm"))?;
            let ffn_norm = rd.vector(&w("ffn_norm"))?;
            let qkv_bias = match (
                rd.optional(&b("attn_q"))?,
                rd.optional(&b("attn_k"))?,
                rd.optional(&b("attn_v"))?,
            ) {
                (Some(q), Some(k), Some(v)) => Some([q, k, v]),
                _ => None,
            };
            let q_norm = rd.optional(&w("attn_q_norm"))?;
            let k_norm = rd.optional(&w("attn_k_norm"))?;
            let post_attn_norm = rd.optional(&w("post_attention_norm"))?;
            let post_ffn_norm = rd.optional(&w("post_ffw_norm"))?;
            let (qkv, qkv_fused) = if has(&w("attn_qkv")) {
                let t = vec![rd.q(&w("attn_qkv"))?];
                (Projections::new(t, cpu_q41, &mut linear)?, true)
            } else {
                let t = vec![
                    rd.q(&w("attn_q"))?,
                    rd.q(&w("attn_k"))?,
                    rd.q(&w("attn_v"))?,
                ];
                (Projections::new(t, cpu_q41, &mut linear)?, false)
            };
            let (gate_up, gate_up_fused) = if has(&w("ffn_gate")) {
                let t = vec![rd.q(&w("ffn_gate"))?, rd.q(&w("ffn_up"))?];
                (Projections::new(t, cpu_q41, &mut linear)?, false)
            } else {
                let t = vec![rd.q(&w("ffn_up"))?];
                (Projections::new(t, cpu_q41, &mut linear)?, true)
            };
            layers.push(Layer {
                attn_norm,
                qkv,
                qkv_fused,
                qkv_bias,
                q_norm,
                k_norm,
                wo: Projections::new(vec![rd.q(&w("attn_output"))?], cpu_q41, &mut linear)?,
                post_attn_norm,
                ffn_norm,
                gate_up,
                gate_up_fused,
                down: Projections::new(vec![rd.q(&w("ffn_down"))?], cpu_q41, &mut linear)?,
                post_ffn_norm,
                rotary: usize::from(hp.rope_local.is_some() && hp.windows[i].is_some()),
                window: hp.windows[i],
            });
        }

        let mut rotary = Vec::new();
        for params in std::iter::once(&hp.rope_global).chain(hp.rope_local.as_ref()) {
            let freqs = inv_freq(params, hp.n_rot, freq_factors.as_deref());
            rotary.push(if cpu {
                Rotary::Host(HostRope::new(freqs, hp.rope_style))
            } else {
                Rotary::Device(DeviceRope::new(
                    &freqs,
                    hp.rope_style,
                    hp.context_length,
                    device,
                )?)
            });
        }
        let cfg = ModelConfig {
            architecture: hp.architecture.clone(),
            name,
            n_layer: hp.n_layer,
            n_head: hp.n_head,
            n_kv_head: hp.n_kv_head,
            head_dim: hp.head_dim,
            hidden: hp.hidden,
            vocab,
            context_length: hp.context_length,
            sliding_window: hp.windows.iter().flatten().copied().max(),
            file_type,
            compute_type,
        };
        Ok((
            Self {
                embed,
                layers,
                norm,
                output,
                rotary,
                hp,
                cfg,
                device: device.clone(),
            },
            content,
        ))
    }
}

/// Tensors by name from one open GGUF file.
struct Reader<'a> {
    content: &'a gguf_file::Content,
    file: File,
    device: &'a Device,
}

impl Reader<'_> {
    fn q(&mut self, name: &str) -> Result<QTensor, EngineError> {
        self.content
            .tensor(&mut self.file, name, self.device)
            .map_err(|e| EngineError::Model(format!("tensor `{name}`: {e}")))
    }

    /// A norm weight or a bias, as f32 on the device.
    fn vector(&mut self, name: &str) -> Result<Tensor, EngineError> {
        Ok(self.q(name)?.dequantize(self.device)?)
    }

    /// Checked, not tried: a failed tensor lookup formats candle's backtrace, and the
    /// symbolizer's tables then stay in memory for good (tens of MiB).
    fn optional(&mut self, name: &str) -> Result<Option<Tensor>, EngineError> {
        if self.content.tensor_infos.contains_key(name) {
            self.vector(name).map(Some)
        } else {
            Ok(None)
        }
    }
}
