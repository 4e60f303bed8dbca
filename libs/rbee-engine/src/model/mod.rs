//! One transformer forward pass for every family we run (see [`arch`]), over GGUF weights,
//! written against candle's tensor ops.
//!
//! Our own forward pass rather than candle-transformers' per-model files, so that the KV cache
//! is sized per request, the context limit is the model's own, prefill can be chunked (to check
//! for cancellation), weights can be repacked at load, and a family is a few optional pieces of
//! one layer rather than a copy of the whole model.

mod arch;
mod load;
mod rope;
mod weights;

use candle_core::{DType, Device, Tensor};

pub use arch::SUPPORTED_ARCHITECTURES;
pub(crate) use rope::HostRope;

use crate::EngineError;
use crate::kv::{self, Dims, KV_DTYPE, LayerAttention, SeqKv};
use arch::{Activation, Hyper};
use rope::DeviceRope;
use weights::{Embedding, Projections};

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
    /// What the model was trained for (`<arch>.context_length`).
    pub context_length: usize,
    /// The widest sliding window of any layer, when some layers have one.
    pub sliding_window: Option<usize>,
    /// Weight type of the attention matrices as stored in the file.
    pub file_type: String,
    /// Weight type used for inference after any repacking.
    pub compute_type: String,
}

struct Layer {
    attn_norm: Tensor,
    /// Q, K, V: three outputs, or one to split (`qkv_fused`).
    qkv: Projections,
    qkv_fused: bool,
    qkv_bias: Option<[Tensor; 3]>,
    /// RMS norms over each head of Q and K, before the rotation.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    wo: Projections,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    /// Gate, up: two outputs, or one holding gate then up (`gate_up_fused`).
    gate_up: Projections,
    gate_up_fused: bool,
    down: Projections,
    post_ffn_norm: Option<Tensor>,
    /// Index into [`Transformer::rotary`].
    rotary: usize,
    window: Option<usize>,
}

/// Rotary embeddings for one set of frequencies.
enum Rotary {
    /// On the CPU, where attention runs over raw slices (`kv.rs`).
    Host(HostRope),
    Device(DeviceRope),
}

pub struct Transformer {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Projections,
    /// Global first; the sliding-window layers' own when they differ.
    rotary: Vec<Rotary>,
    hp: Hyper,
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

/// Splits the last dimension of `t` into parts of `sizes`.
fn split_last(t: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>, EngineError> {
    let last = t.rank().saturating_sub(1);
    let mut at = 0;
    let mut parts = Vec::with_capacity(sizes.len());
    for &n in sizes {
        parts.push(t.narrow(last, at, n)?.contiguous()?);
        at += n;
    }
    if at != t.dim(last)? {
        return Err(EngineError::Model(format!(
            "fused projection of width {} does not split into {sizes:?}",
            t.dim(last)?
        )));
    }
    Ok(parts)
}

impl Layer {
    /// Q, K and V of `h`, with biases and per-head norms applied (not yet rotated).
    fn qkv(&self, h: &Tensor, hp: &Hyper) -> Result<[Tensor; 3], EngineError> {
        let (nh, nkv, hd) = (hp.n_head, hp.n_kv_head, hp.head_dim);
        let mut parts = self.qkv.forward(h)?;
        if self.qkv_fused {
            let fused = parts
                .pop()
                .ok_or_else(|| EngineError::Model("fused QKV with no output".into()))?;
            parts = split_last(&fused, &[nh * hd, nkv * hd, nkv * hd])?;
        }
        let mut it = parts.into_iter();
        let (Some(mut q), Some(mut k), Some(mut v)) = (it.next(), it.next(), it.next()) else {
            return Err(EngineError::Model(
                "attention projections incomplete".into(),
            ));
        };
        if let Some([bq, bk, bv]) = &self.qkv_bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        let per_head = |t: Tensor, norm: &Tensor, heads: usize| -> Result<Tensor, EngineError> {
            let dims = t.dims().to_vec();
            let rows = t.elem_count() / (heads * hd).max(1);
            let t = t.reshape((rows, heads, hd))?;
            Ok(candle_nn::ops::rms_norm(&t, norm, hp.rms_eps)?.reshape(dims)?)
        };
        if let Some(n) = &self.q_norm {
            q = per_head(q, n, nh)?;
        }
        if let Some(n) = &self.k_norm {
            k = per_head(k, n, nkv)?;
        }
        Ok([q, k, v])
    }

    /// The feed-forward block's output for `h` (before any post-norm).
    fn feed_forward(&self, h: &Tensor, hp: &Hyper) -> Result<Tensor, EngineError> {
        let mut parts = self.gate_up.forward(h)?;
        if self.gate_up_fused {
            let fused = parts
                .pop()
                .ok_or_else(|| EngineError::Model("fused gate/up with no output".into()))?;
            let half = fused.dim(fused.rank().saturating_sub(1))? / 2;
            parts = split_last(&fused, &[half, half])?;
        }
        let mut it = parts.into_iter();
        let (Some(g), Some(u)) = (it.next(), it.next()) else {
            return Err(EngineError::Model(
                "feed-forward projections incomplete".into(),
            ));
        };
        let g = match hp.activation {
            Activation::Silu => g.silu()?,
            Activation::GeluTanh => g.gelu()?,
        };
        self.down.forward_one(&(g * u)?)
    }
}

/// `norm(x)` when the layer has that norm, then the family's residual scale.
fn finish_block(x: Tensor, norm: Option<&Tensor>, hp: &Hyper) -> Result<Tensor, EngineError> {
    let x = match norm {
        Some(n) => candle_nn::ops::rms_norm(&x, n, hp.rms_eps)?,
        None => x,
    };
    Ok(match hp.residual_scale {
        Some(s) => (x * f64::from(s))?,
        None => x,
    })
}

impl Transformer {
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// An empty sequence that may grow to `limit` positions.
    pub fn new_seq(&self, limit: usize) -> SeqKv {
        SeqKv::new(limit, matches!(self.rotary.first(), Some(Rotary::Host(_))))
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
        let hp = &self.hp;
        let (nh, hd) = (hp.n_head, hp.head_dim);
        let mut x = self.embed.lookup(&ids, &self.device)?.unsqueeze(0)?;
        if let Some(s) = hp.embed_scale {
            x = (x * f64::from(s))?;
        }
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, hp.rms_eps)?;
            let [q, k, v] = layer.qkv(&h, hp)?;
            let rotary = self
                .rotary
                .get(layer.rotary)
                .ok_or_else(|| EngineError::Model("rotary table missing".into()))?;
            let y = match rotary {
                Rotary::Host(rope) => {
                    let host = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
                    let (mut q, mut k, v) = (host(q)?, host(k)?, host(v)?);
                    let mut seqs: Vec<(&mut SeqKv, usize)> = items
                        .iter_mut()
                        .map(|it| (&mut *it.kv, it.tokens.len()))
                        .collect();
                    let at = LayerAttention {
                        index: li,
                        rope,
                        window: layer.window,
                        scale: hp.attn_scale,
                    };
                    let y = kv::host_attention(&at, &mut seqs, &mut q, &mut k, &v, self.dims())?;
                    Tensor::from_vec(y, (1, total, nh * hd), &self.device)?
                }
                Rotary::Device(rope) => {
                    self.device_attention(li, items, (q, k, v), rope, &positions)?
                }
            };
            let o = finish_block(layer.wo.forward_one(&y)?, layer.post_attn_norm.as_ref(), hp)?;
            x = (x + o)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, hp.rms_eps)?;
            let o = layer.feed_forward(&h, hp)?;
            x = (x + finish_block(o, layer.post_ffn_norm.as_ref(), hp)?)?;
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
        let last = candle_nn::ops::rms_norm(&last, &self.norm, hp.rms_eps)?;
        let mut logits = self.output.forward_one(&last)?;
        if let Some(s) = hp.logit_scale {
            logits = (logits / f64::from(s))?;
        }
        if let Some(c) = hp.final_softcap {
            logits = ((logits / f64::from(c))?.tanh()? * f64::from(c))?;
        }
        let logits = logits
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
        rope: &DeviceRope,
        positions: &Tensor,
    ) -> Result<Tensor, EngineError> {
        let (nh, nkv, hd) = (self.hp.n_head, self.hp.n_kv_head, self.hp.head_dim);
        let rep = nh / nkv;
        let total: usize = items.iter().map(|it| it.tokens.len()).sum();
        let scale = f64::from(self.hp.attn_scale);
        let window = self.layers.get(li).and_then(|l| l.window);
        let heads = |t: Tensor, n: usize| -> Result<Tensor, EngineError> {
            Ok(t.reshape((1, total, n, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rope.apply(&heads(q, nh)?, positions)?;
        let k = rope.apply(&heads(k, nkv)?, positions)?;
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
                let first = window.map_or(0, |w| seen.saturating_sub(w));
                let kk = kc.narrow(2, first, seen - first)?;
                let vv = vc.narrow(2, first, seen - first)?;
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
