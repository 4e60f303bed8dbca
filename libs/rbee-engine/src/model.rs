//! A llama-family transformer over GGUF weights, written against candle's tensor ops.
//!
//! Our own forward pass rather than candle-transformers' `quantized_llama`, so that the KV cache
//! is sized per request, the context limit is the model's own, prefill can be chunked (to check
//! for cancellation), and weights can be repacked at load. Q and K in GGUF are permuted for
//! interleaved rotary embeddings, hence `rope_i`.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};

use crate::EngineError;
use crate::kv::{self, Dims, HostRope, KV_DTYPE, SeqKv};
use crate::qmatmul::{Q41Matrix, Q80Matrix};

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
    /// Q8_0 on the CPU: candle's dot product on our threads (see [`Q80Matrix`]).
    Q80(Vec<Q80Matrix>),
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
        if cpu && tensors.iter().all(|t| t.dtype() == GgmlDType::Q8_0) {
            return Ok(Self::Q80(
                tensors
                    .into_iter()
                    .map(|t| Q80Matrix::new(Arc::new(t)))
                    .collect::<Result<_, _>>()?,
            ));
        }
        Ok(Self::Separate(
            tensors.into_iter().map(repack).collect::<Result<_, _>>()?,
        ))
    }

    /// One output per projection, each shaped like `x` with the last dim replaced.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>, EngineError> {
        match self {
            Self::Separate(ms) => Ok(ms.iter().map(|m| m.forward(x)).collect::<Result<_, _>>()?),
            Self::Q80(ms) => {
                let mut dims = x.dims().to_vec();
                let xv = x.flatten_all()?.to_vec1::<f32>()?;
                ms.iter()
                    .map(|w| {
                        let m = xv.len() / w.cols().max(1);
                        let mut out = vec![0f32; m * w.rows()];
                        w.matmul(&xv, m, &mut out)?;
                        if let Some(last) = dims.last_mut() {
                            *last = w.rows();
                        }
                        Ok(Tensor::from_vec(out, dims.clone(), x.device())?)
                    })
                    .collect()
            }
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

/// The token embedding kept in its file encoding; rows are dequantized when looked up (a
/// dequantized table of a 49k vocabulary would be the largest thing in memory).
struct Embedding {
    rows: EmbedRows,
    dtype: GgmlDType,
    row_bytes: usize,
    cols: usize,
    vocab: usize,
}

enum EmbedRows {
    /// On the CPU: the tensor itself, shared with a tied output head.
    Shared(Arc<QTensor>),
    /// On other devices: a host copy of its bytes (reading device memory per lookup would copy
    /// the whole table).
    Host(Vec<u8>),
}

impl Embedding {
    fn new(t: Arc<QTensor>, cpu: bool) -> Result<Self, EngineError> {
        let (vocab, cols) = t.shape().dims2()?;
        let dtype = t.dtype();
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let rows = if cpu {
            EmbedRows::Shared(t)
        } else {
            EmbedRows::Host(t.data()?.into_owned())
        };
        Ok(Self {
            rows,
            dtype,
            row_bytes,
            cols,
            vocab,
        })
    }

    /// `[ids.len(), cols]` on `device`.
    fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor, EngineError> {
        let table = match &self.rows {
            EmbedRows::Shared(t) => t.data()?,
            EmbedRows::Host(b) => std::borrow::Cow::Borrowed(b.as_slice()),
        };
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let at = id as usize * self.row_bytes;
            let bytes = table.get(at..at + self.row_bytes).ok_or_else(|| {
                EngineError::Model(format!("token id {id} is outside the vocabulary"))
            })?;
            let row = gguf_row(self.dtype, bytes, self.cols)?;
            out.extend_from_slice(&row);
        }
        Ok(Tensor::from_vec(out, (ids.len(), self.cols), device)?)
    }
}

fn gguf_row(dtype: GgmlDType, bytes: &[u8], cols: usize) -> Result<Vec<f32>, EngineError> {
    let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype,
        bytes,
        vec![cols],
        &Device::Cpu,
    )?;
    Ok(q.dequantize(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

pub struct LlamaModel {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Projections,
    cos: Tensor,
    sin: Tensor,
    /// Set on the CPU, where attention runs over raw slices (`kv.rs`).
    host_rope: Option<HostRope>,
    cfg: ModelConfig,
    device: Device,
}

/// One sequence's share of a batched forward pass.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub kv: &'a mut SeqKv,
    /// Return the logits after the item's last token.
    pub want_logits: bool,
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
        let tok_embd = Arc::new(qt("token_embd.weight")?);
        let embed = Embedding::new(tok_embd.clone(), cpu)?;
        let vocab = embed.vocab;
        let dtype = tok_embd.dtype();
        // Checked, not tried: a failed tensor lookup formats candle's backtrace, and the
        // symbolizer's tables then stay in memory for good (tens of MiB).
        let head_repacked = cpu_q41 && dtype == GgmlDType::Q4_1
            || cpu && repack_on_cpu && SLOW_ON_CPU.contains(&dtype);
        let output = if content.tensor_infos.contains_key("output.weight") {
            Projections::new(vec![qt("output.weight")?], cpu_q41, &mut linear)?
        } else if cpu && dtype == GgmlDType::Q8_0 && !head_repacked {
            // Tied embeddings (SmolLM2): the output head is the embedding matrix, shared.
            Projections::Q80(vec![Q80Matrix::new(tok_embd)?])
        } else if !head_repacked {
            Projections::Separate(vec![QMatMul::from_arc(tok_embd)?])
        } else {
            // Tied, but the head is repacked for a faster kernel: its own copy.
            Projections::new(vec![qt("token_embd.weight")?], cpu_q41, &mut linear)?
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
                host_rope: if cpu {
                    Some(HostRope::new(&cos, &sin)?)
                } else {
                    None
                },
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

    /// An empty sequence that may grow to `limit` positions.
    pub fn new_seq(&self, limit: usize) -> SeqKv {
        SeqKv::new(limit, self.host_rope.is_some())
    }

    pub(crate) fn dims(&self) -> Dims {
        Dims {
            n_layer: self.cfg.n_layer,
            n_head: self.cfg.n_head,
            n_kv_head: self.cfg.n_kv_head,
            head_dim: self.cfg.head_dim,
        }
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of attention state per position (keys and values, every layer).
    pub fn kv_bytes_per_position(&self) -> usize {
        self.cfg.n_layer * 2 * self.cfg.n_kv_head * self.cfg.head_dim * KV_DTYPE.size_in_bytes()
    }

    /// Runs one step for several sequences at once: every linear layer sees all their tokens
    /// as one matrix (the weights are read once per step), attention runs per sequence over
    /// its own positions. Returns, per item, the logits after its last token when asked.
    ///
    /// Each row's arithmetic does not depend on the other rows, so a sequence's results are the
    /// same alone or in company.
    pub fn forward_batch(
        &self,
        items: &mut [BatchItem<'_>],
    ) -> Result<Vec<Option<Vec<f32>>>, EngineError> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for item in items.iter_mut() {
            let (n, pos) = (item.tokens.len(), item.kv.len());
            if n == 0 {
                return Err(EngineError::Model("forward with no tokens".into()));
            }
            if pos + n > self.cfg.context_length {
                return Err(EngineError::ContextOverflow {
                    needed: pos + n,
                    limit: self.cfg.context_length,
                });
            }
            item.kv.reserve(n, self.dims(), &self.device)?;
            ids.extend_from_slice(item.tokens);
            positions.extend((pos..pos + n).map(|p| p as u32));
        }
        let total = ids.len();
        if total == 0 {
            return Ok(Vec::new());
        }
        let (nh, hd) = (self.cfg.n_head, self.cfg.head_dim);
        let mut x = self.embed.lookup(&ids, &self.device)?.unsqueeze(0)?;
        let (cos, sin) = if self.host_rope.is_some() {
            (self.cos.clone(), self.sin.clone())
        } else {
            let pos_t = Tensor::new(positions.as_slice(), &self.device)?;
            (
                self.cos.index_select(&pos_t, 0)?,
                self.sin.index_select(&pos_t, 0)?,
            )
        };
        let eps = self.cfg.rms_eps as f32;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let mut qkv = layer.qkv.forward(&h)?.into_iter();
            let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
                return Err(EngineError::Model(
                    "attention projections incomplete".into(),
                ));
            };
            let y = match &self.host_rope {
                Some(rope) => {
                    let host = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
                    let (mut q, mut k, v) = (host(q)?, host(k)?, host(v)?);
                    let mut seqs: Vec<(&mut SeqKv, usize)> = items
                        .iter_mut()
                        .map(|it| (&mut *it.kv, it.tokens.len()))
                        .collect();
                    let y =
                        kv::host_attention(li, &mut seqs, &mut q, &mut k, &v, rope, self.dims())?;
                    Tensor::from_vec(y, (1, total, nh * hd), &self.device)?
                }
                None => self.device_attention(li, items, (q, k, v), (&cos, &sin))?,
            };
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
        let mut last_rows = Vec::new();
        let mut at = 0;
        for item in items.iter_mut() {
            let n = item.tokens.len();
            item.kv.advance(n);
            at += n;
            if item.want_logits {
                last_rows.push((at - 1) as u32);
            }
        }
        let mut out = Vec::with_capacity(items.len());
        if last_rows.is_empty() {
            out.resize_with(items.len(), || None);
            return Ok(out);
        }
        let rows = Tensor::new(last_rows.as_slice(), &self.device)?;
        let last = x.index_select(&rows, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, eps)?;
        let logits = self
            .output
            .forward_one(&last)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let mut chunks = logits.chunks_exact(self.cfg.vocab);
        for item in items.iter() {
            out.push(if item.want_logits {
                chunks.next().map(<[f32]>::to_vec)
            } else {
                None
            });
        }
        Ok(out)
    }

    /// One layer's attention with candle ops (GPU devices): rotary embedding, the KV append,
    /// then per sequence, one query row at a time over exactly the positions it may see (no
    /// mask; the same matmul shapes however the prompt was cut or reused).
    fn device_attention(
        &self,
        li: usize,
        items: &mut [BatchItem<'_>],
        (q, k, v): (Tensor, Tensor, Tensor),
        (cos, sin): (&Tensor, &Tensor),
    ) -> Result<Tensor, EngineError> {
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        let rep = nh / nkv;
        let total: usize = items.iter().map(|it| it.tokens.len()).sum();
        let scale = 1.0 / (hd as f64).sqrt();
        let heads = |t: Tensor, n: usize| -> Result<Tensor, EngineError> {
            Ok(t.reshape((1, total, n, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = candle_nn::rotary_emb::rope_i(&heads(q, nh)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&heads(k, nkv)?, cos, sin)?;
        let v = heads(v, nkv)?;
        let mut ys = Vec::with_capacity(total);
        let mut at = 0;
        for item in items.iter_mut() {
            let n = item.tokens.len();
            let pos = item.kv.len();
            let (kc, vc) = item
                .kv
                .device_layer(li)
                .ok_or_else(|| EngineError::Model("KV buffers missing".into()))?;
            kc.slice_set(&k.narrow(2, at, n)?.contiguous()?, 2, pos)?;
            vc.slice_set(&v.narrow(2, at, n)?.contiguous()?, 2, pos)?;
            for r in 0..n {
                let seen = pos + r + 1;
                let kk = kc.narrow(2, 0, seen)?;
                let vv = vc.narrow(2, 0, seen)?;
                let qr = q
                    .narrow(2, at + r, 1)?
                    .contiguous()?
                    .reshape((1, nkv, rep, hd))?;
                let att = (qr.matmul(&kk.t()?)? * scale)?;
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                ys.push(att.matmul(&vv)?.reshape((1, 1, nh * hd))?);
            }
            at += n;
        }
        Ok(Tensor::cat(&ys, 1)?)
    }

    /// Runs `tokens` for one sequence (a batch of one).
    pub fn forward(
        &self,
        tokens: &[u32],
        kv: &mut SeqKv,
        want_logits: bool,
    ) -> Result<Option<Vec<f32>>, EngineError> {
        let mut items = [BatchItem {
            tokens,
            kv,
            want_logits,
        }];
        Ok(self.forward_batch(&mut items)?.pop().flatten())
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
