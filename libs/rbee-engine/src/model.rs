//! A llama-family transformer over GGUF weights, written against candle's tensor ops.
//!
//! Our own forward pass rather than candle-transformers' `quantized_llama`, so that the KV cache
//! is sized per request, the context limit is the model's own, prefill can be chunked (to check
//! for cancellation), and weights can be repacked at load. Q and K in GGUF are permuted for
//! interleaved rotary embeddings, hence `rope_i`.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::kv_cache::KvCache;

use crate::EngineError;
use crate::qmatmul::Q41Matrix;

/// Quantized types that candle has no fast CPU dot-product kernel for; on CPU they are
/// repacked to Q8_0 at load (more bytes, much faster, numerically at least as precise).
const SLOW_ON_CPU: &[GgmlDType] = &[GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1];

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub name: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    /// What the model was trained for (`<arch>.context_length`).
    pub context_length: usize,
    /// Weight type of the attention matrices as stored in the file.
    pub file_type: String,
    /// Weight type used for inference after any repacking.
    pub compute_type: String,
}

/// Linear layers that read the same input, run as one matmul when the kernel allows (Q/K/V,
/// gate/up): one activation quantization and one parallel region instead of several.
enum Projections {
    /// Rows of every projection stacked into one Q4_1 matrix; `splits` are the row counts.
    FusedQ41 {
        w: Q41Matrix,
        splits: Vec<usize>,
    },
    Separate(Vec<QMatMul>),
}

impl Projections {
    fn new(
        tensors: Vec<QTensor>,
        cpu: bool,
        repack: &mut dyn FnMut(QTensor) -> Result<QMatMul, EngineError>,
    ) -> Result<Self, EngineError> {
        let fusable = cpu
            && tensors.iter().all(|t| t.dtype() == GgmlDType::Q4_1)
            && tensors
                .windows(2)
                .all(|w| w[0].shape().dims().get(1) == w[1].shape().dims().get(1));
        if fusable {
            let mut bytes = Vec::new();
            let mut splits = Vec::with_capacity(tensors.len());
            let mut cols = 0;
            for t in &tensors {
                let (rows, c) = t.shape().dims2()?;
                cols = c;
                splits.push(rows);
                bytes.extend_from_slice(&t.data()?);
            }
            let rows = splits.iter().sum();
            return Ok(Self::FusedQ41 {
                w: Q41Matrix::from_raw(&bytes, rows, cols)?,
                splits,
            });
        }
        Ok(Self::Separate(
            tensors.into_iter().map(repack).collect::<Result<_, _>>()?,
        ))
    }

    /// One output per projection, each shaped like `x` with the last dim replaced.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>, EngineError> {
        match self {
            Self::Separate(ms) => Ok(ms.iter().map(|m| m.forward(x)).collect::<Result<_, _>>()?),
            Self::FusedQ41 { w, splits } => {
                let dims = x.dims().to_vec();
                let cols = w.cols();
                let m = x.elem_count() / cols.max(1);
                let xv = x.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; m * w.rows()];
                w.matmul(&xv, m, &mut out)?;
                let mut parts: Vec<Vec<f32>> =
                    splits.iter().map(|n| Vec::with_capacity(n * m)).collect();
                for row in out.chunks_exact(w.rows()) {
                    let mut at = 0;
                    for (part, n) in parts.iter_mut().zip(splits) {
                        part.extend_from_slice(&row[at..at + n]);
                        at += n;
                    }
                }
                parts
                    .into_iter()
                    .zip(splits)
                    .map(|(p, &n)| {
                        let mut shape = dims.clone();
                        if let Some(last) = shape.last_mut() {
                            *last = n;
                        }
                        Ok(Tensor::from_vec(p, shape, x.device())?)
                    })
                    .collect()
            }
        }
    }

    fn forward_one(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        self.forward(x)?
            .pop()
            .ok_or_else(|| EngineError::Model("projection with no output".into()))
    }
}

struct Layer {
    attn_norm: Tensor,
    /// Q, K, V.
    qkv: Projections,
    wo: Projections,
    ffn_norm: Tensor,
    /// Gate, up.
    gate_up: Projections,
    down: Projections,
}

pub struct LlamaModel {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Projections,
    cos: Tensor,
    sin: Tensor,
    cfg: ModelConfig,
    device: Device,
}

/// Per-request attention state; a fresh one for every generation.
pub struct KvState {
    caches: Vec<KvCache>,
    pos: usize,
}

impl KvState {
    pub fn position(&self) -> usize {
        self.pos
    }
}

fn md<'a>(c: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, EngineError> {
    c.metadata
        .get(key)
        .ok_or_else(|| EngineError::Model(format!("GGUF metadata `{key}` missing")))
}

fn md_usize(c: &gguf_file::Content, key: &str) -> Result<usize, EngineError> {
    let v = md(c, key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .map_err(|e| EngineError::Model(format!("GGUF metadata `{key}`: {e}")))
}

fn md_f32(c: &gguf_file::Content, key: &str) -> Option<f32> {
    c.metadata.get(key).and_then(|v| v.to_f32().ok())
}

impl LlamaModel {
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
        let arch = md(&content, "general.architecture")?
            .to_string()
            .map_err(|e| EngineError::Model(e.to_string()))?
            .clone();
        if !matches!(arch.as_str(), "llama" | "mistral" | "granite" | "smollm") {
            return Err(EngineError::Model(format!(
                "architecture `{arch}` is not supported (llama-family only)"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let n_head = md_usize(&content, &key("attention.head_count"))?;
        let n_kv_head = md_usize(&content, &key("attention.head_count_kv")).unwrap_or(n_head);
        let hidden = md_usize(&content, &key("embedding_length"))?;
        let n_layer = md_usize(&content, &key("block_count"))?;
        let context_length = md_usize(&content, &key("context_length"))?;
        let rms_eps = md_f32(&content, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5);
        let rope_base = md_f32(&content, &key("rope.freq_base")).unwrap_or(10_000.0);
        if n_head == 0 || n_kv_head == 0 || hidden % n_head != 0 || n_head % n_kv_head != 0 {
            return Err(EngineError::Model(format!(
                "inconsistent attention shape: {n_head} heads, {n_kv_head} kv heads, width {hidden}"
            )));
        }
        let head_dim = hidden / n_head;
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

        let cpu = device.is_cpu();
        let mut qt = |name: &str| -> Result<QTensor, EngineError> {
            content
                .tensor(&mut file, name, device)
                .map_err(|e| EngineError::Model(format!("tensor `{name}`: {e}")))
        };
        let file_type = format!("{:?}", qt("blk.0.attn_q.weight")?.dtype());
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
        let tok_embd = qt("token_embd.weight")?;
        let embed = tok_embd.dequantize(device)?;
        let vocab = embed.dim(0)?;
        let output = match qt("output.weight") {
            Ok(t) => Projections::new(vec![t], cpu_q41, &mut linear)?,
            // Tied embeddings (SmolLM2): the output head is the embedding matrix.
            Err(_) => Projections::new(vec![tok_embd], cpu_q41, &mut linear)?,
        };
        let norm = qt("output_norm.weight")?.dequantize(device)?;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let qkv = vec![qt(&p("attn_q"))?, qt(&p("attn_k"))?, qt(&p("attn_v"))?];
            let gate_up = vec![qt(&p("ffn_gate"))?, qt(&p("ffn_up"))?];
            layers.push(Layer {
                attn_norm: qt(&p("attn_norm"))?.dequantize(device)?,
                qkv: Projections::new(qkv, cpu_q41, &mut linear)?,
                wo: Projections::new(vec![qt(&p("attn_output"))?], cpu_q41, &mut linear)?,
                ffn_norm: qt(&p("ffn_norm"))?.dequantize(device)?,
                gate_up: Projections::new(gate_up, cpu_q41, &mut linear)?,
                down: Projections::new(vec![qt(&p("ffn_down"))?], cpu_q41, &mut linear)?,
            });
        }
        let rope_dim = md_usize(&content, &key("rope.dimension_count")).unwrap_or(head_dim);
        let (cos, sin) = rope_tables(rope_dim, context_length, rope_base, device)?;
        let cfg = ModelConfig {
            architecture: arch,
            name,
            n_layer,
            n_head,
            n_kv_head,
            head_dim,
            hidden,
            vocab,
            rms_eps: rms_eps as f64,
            rope_base,
            context_length,
            file_type,
            compute_type,
        };
        Ok((
            Self {
                embed,
                layers,
                norm,
                output,
                cos,
                sin,
                cfg,
                device: device.clone(),
            },
            content,
        ))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// A fresh KV state with room for `capacity` positions (it grows if exceeded).
    pub fn new_state(&self, capacity: usize) -> KvState {
        KvState {
            caches: (0..self.cfg.n_layer)
                .map(|_| KvCache::new(2, capacity.max(1)))
                .collect(),
            pos: 0,
        }
    }

    /// Runs `tokens` at the state's position. Returns the last position's logits when asked.
    pub fn forward(
        &self,
        tokens: &[u32],
        state: &mut KvState,
        want_logits: bool,
    ) -> Result<Option<Vec<f32>>, EngineError> {
        let seq = tokens.len();
        let pos = state.pos;
        if seq == 0 {
            return Err(EngineError::Model("forward with no tokens".into()));
        }
        if pos + seq > self.cfg.context_length {
            return Err(EngineError::ContextOverflow {
                needed: pos + seq,
                limit: self.cfg.context_length,
            });
        }
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        let rep = nh / nkv;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(0)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        let mask = if seq > 1 {
            Some(causal_mask(seq, pos, &self.device)?)
        } else {
            None
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let eps = self.cfg.rms_eps as f32;
        for (layer, cache) in self.layers.iter().zip(state.caches.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let mut qkv = layer.qkv.forward(&h)?.into_iter();
            let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
                return Err(EngineError::Model(
                    "attention projections incomplete".into(),
                ));
            };
            let q = q.reshape((1, seq, nh, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k
                .reshape((1, seq, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = v
                .reshape((1, seq, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
            let (k, v) = cache.append(&k, &v)?;
            let total = k.dim(2)?;
            // Grouped-query attention without copying K/V: the query heads that share a KV
            // head are stacked along the sequence axis.
            let q = q.reshape((1, nkv, rep * seq, hd))?;
            let att = (q.matmul(&k.t()?)? * scale)?;
            let att = match &mask {
                Some(m) => att
                    .reshape((1, nkv, rep, seq, total))?
                    .broadcast_add(m)?
                    .reshape((1, nkv, rep * seq, total))?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v)?;
            let y = y
                .reshape((1, nh, seq, hd))?
                .transpose(1, 2)?
                .reshape((1, seq, nh * hd))?;
            x = (x + layer.wo.forward_one(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let mut gu = layer.gate_up.forward(&h)?.into_iter();
            let (Some(g), Some(u)) = (gu.next(), gu.next()) else {
                return Err(EngineError::Model(
                    "feed-forward projections incomplete".into(),
                ));
            };
            x = (x + layer.down.forward_one(&(g.silu()? * u)?)?)?;
        }
        state.pos += seq;
        if !want_logits {
            return Ok(None);
        }
        let last = x.narrow(1, seq - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, eps)?;
        let logits = self.output.forward_one(&last)?;
        let logits = logits
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        Ok(Some(logits))
    }
}

fn rope_tables(
    dim: usize,
    positions: usize,
    base: f32,
    device: &Device,
) -> Result<(Tensor, Tensor), EngineError> {
    let inv_freq: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    let n = inv_freq.len();
    let inv_freq = Tensor::from_vec(inv_freq, (1, n), device)?;
    let t = Tensor::arange(0u32, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?;
    let freqs = t.matmul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Additive mask for `seq` new positions after `pos` cached ones: row i sees columns ≤ pos + i.
fn causal_mask(seq: usize, pos: usize, device: &Device) -> Result<Tensor, EngineError> {
    let total = pos + seq;
    let data: Vec<f32> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| if j <= pos + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(data, (seq, total), device)?)
}
