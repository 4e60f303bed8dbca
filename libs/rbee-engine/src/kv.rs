//! Per-sequence attention state, and attention over it for a whole batch step.
//!
//! On the CPU, keys and values live in plain `Vec<f32>` per layer (position-major: a position's
//! heads side by side), and the rotary embedding, the append and grouped-query attention run
//! over raw slices, every (row, head) of the step in one parallel pass. With candle ops that was
//! a dozen small ops per sequence per layer, whose fixed costs grew with the batch and ate what
//! batching saves. Other devices keep candle tensors and candle ops (see `model.rs`).
//!
//! Each (row, head) is computed by one task, front to back, over exactly the positions it may
//! see, so its result does not depend on the other rows, on how a prompt was cut into pieces, or
//! on whether its prefix came from the cache.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::EngineError;
use crate::model::HostRope;

/// Buffers grow to at least this many positions, then double (amortised copies).
const KV_MIN_ALLOC: usize = 64;

/// Keys and values are kept in f32.
pub(crate) const KV_DTYPE: DType = DType::F32;

/// The attention shape of a model.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl Dims {
    /// Floats per position per layer, for keys (and as many for values).
    fn row(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

struct HostLayer {
    k: Vec<f32>,
    v: Vec<f32>,
}

enum Store {
    /// CPU: `[position][kv head][head dim]` per layer.
    Host(Vec<HostLayer>),
    /// Other devices: `[1, kv heads, positions, head dim]` per layer.
    Device(Vec<(Tensor, Tensor)>),
}

/// One sequence's keys and values for every layer, grown on demand up to a reserved limit.
pub struct SeqKv {
    store: Store,
    len: usize,
    allocated: usize,
    limit: usize,
}

impl SeqKv {
    pub(crate) fn new(limit: usize, host: bool) -> Self {
        Self {
            store: if host {
                Store::Host(Vec::new())
            } else {
                Store::Device(Vec::new())
            },
            len: 0,
            allocated: 0,
            limit,
        }
    }

    /// Positions whose attention state is computed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions this sequence may hold at most (its reservation in the pool).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Positions currently backed by memory.
    pub fn allocated(&self) -> usize {
        self.allocated
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Makes room for `extra` more positions, reallocating (and copying) if needed.
    pub(crate) fn reserve(
        &mut self,
        extra: usize,
        dims: Dims,
        device: &Device,
    ) -> Result<(), EngineError> {
        let need = self.len + extra;
        if need > self.limit {
            return Err(EngineError::ContextOverflow {
                needed: need,
                limit: self.limit,
            });
        }
        if need <= self.allocated {
            return Ok(());
        }
        let size = need
            .max(self.allocated * 2)
            .max(KV_MIN_ALLOC)
            .min(self.limit);
        self.resize(size, dims, device)
    }

    /// Backs exactly `size` (≥ len) positions with memory.
    fn resize(&mut self, size: usize, dims: Dims, device: &Device) -> Result<(), EngineError> {
        let row = dims.row();
        let len = self.len;
        match &mut self.store {
            Store::Host(layers) => {
                layers.resize_with(dims.n_layer, || HostLayer {
                    k: Vec::new(),
                    v: Vec::new(),
                });
                for l in layers.iter_mut() {
                    for buf in [&mut l.k, &mut l.v] {
                        buf.truncate(len * row);
                        if size * row > buf.capacity() {
                            buf.reserve_exact(size * row - buf.len());
                        } else {
                            buf.shrink_to(size * row);
                        }
                        buf.resize(size * row, 0.0);
                    }
                }
            }
            Store::Device(layers) => {
                let mut grown = Vec::with_capacity(dims.n_layer);
                for i in 0..dims.n_layer {
                    let shape = (1, dims.n_kv_head, size, dims.head_dim);
                    let k = Tensor::zeros(shape, KV_DTYPE, device)?;
                    let v = Tensor::zeros(shape, KV_DTYPE, device)?;
                    if let Some((ok, ov)) = layers.get(i)
                        && len > 0
                    {
                        k.slice_set(&ok.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                        v.slice_set(&ov.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    }
                    grown.push((k, v));
                }
                *layers = grown;
            }
        }
        self.allocated = size;
        Ok(())
    }

    /// Gives back the memory past the computed positions (before the prefix cache keeps it).
    pub(crate) fn shrink(&mut self, dims: Dims, device: &Device) -> Result<(), EngineError> {
        if matches!(self.store, Store::Host(_)) && self.allocated > self.len {
            self.resize(self.len, dims, device)?;
        }
        Ok(())
    }

    /// Copies the first `len` positions of `other` into this (empty) sequence.
    pub(crate) fn copy_prefix(
        &mut self,
        other: &SeqKv,
        len: usize,
        dims: Dims,
        device: &Device,
    ) -> Result<(), EngineError> {
        let len = len.min(other.len);
        self.len = 0;
        self.reserve(len, dims, device)?;
        let n = len * dims.row();
        match (&mut self.store, &other.store) {
            (Store::Host(mine), Store::Host(theirs)) => {
                for (m, t) in mine.iter_mut().zip(theirs) {
                    m.k[..n].copy_from_slice(&t.k[..n]);
                    m.v[..n].copy_from_slice(&t.v[..n]);
                }
            }
            (Store::Device(mine), Store::Device(theirs)) => {
                for ((k, v), (ok, ov)) in mine.iter().zip(theirs) {
                    k.slice_set(&ok.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    v.slice_set(&ov.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
            }
            _ => return Err(EngineError::Model("KV stores of different kinds".into())),
        }
        self.len = len;
        Ok(())
    }

    /// A device layer's key and value tensors.
    pub(crate) fn device_layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        match &self.store {
            Store::Device(layers) => layers.get(layer),
            Store::Host(_) => None,
        }
    }
}

/// What one layer's attention needs besides the activations.
#[derive(Clone, Copy)]
pub(crate) struct LayerAttention<'a> {
    /// The layer's index (its KV buffers).
    pub index: usize,
    pub rope: &'a HostRope,
    /// Positions back a query sees, itself included; `None` for all.
    pub window: Option<usize>,
    /// Multiplies Q·K.
    pub scale: f32,
}

/// One layer's attention for a whole step on the host. `q`, `k`, `v` are the step's rows
/// (`[row][heads][head dim]`, rows of the sequences one after another, `rows[i]` rows for
/// sequence `i` at positions from its `len()`); returns `[row][heads][head dim]`.
pub(crate) fn host_attention(
    layer: &LayerAttention<'_>,
    seqs: &mut [(&mut SeqKv, usize)],
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    dims: Dims,
) -> Result<Vec<f32>, EngineError> {
    let LayerAttention {
        index: layer,
        rope,
        window,
        scale,
    } = *layer;
    let (nh, hd, row) = (dims.n_head, dims.head_dim, dims.row());
    let rep = nh / dims.n_kv_head;
    let positions: Vec<usize> = seqs.iter().flat_map(|(kv, n)| kv.len..kv.len + n).collect();
    rope.apply(q, nh, hd, &positions);
    rope.apply(k, dims.n_kv_head, hd, &positions);
    let mut at = 0;
    for (kv, n) in seqs.iter_mut() {
        let Store::Host(layers) = &mut kv.store else {
            return Err(EngineError::Model(
                "a device KV store on the host path".into(),
            ));
        };
        let l = layers
            .get_mut(layer)
            .ok_or_else(|| EngineError::Model("KV buffers missing".into()))?;
        let dst = kv.len * row..(kv.len + *n) * row;
        l.k[dst.clone()].copy_from_slice(&k[at * row..(at + *n) * row]);
        l.v[dst].copy_from_slice(&v[at * row..(at + *n) * row]);
        at += *n;
    }
    // (the sequence's layer, the row's position) for every row of the step.
    let mut rows: Vec<(&HostLayer, usize)> = Vec::with_capacity(positions.len());
    for (kv, n) in seqs.iter() {
        if let Store::Host(layers) = &kv.store
            && let Some(l) = layers.get(layer)
        {
            rows.extend((kv.len..kv.len + n).map(|p| (l, p)));
        }
    }
    let q: &[f32] = q;
    let mut out = vec![0f32; positions.len() * nh * hd];
    out.par_chunks_mut(hd)
        .enumerate()
        .for_each_init(Vec::new, |scores, (i, y)| {
            let (r, h) = (i / nh, i % nh);
            let (l, pos) = rows[r];
            let kvh = h / rep;
            let qh = &q[i * hd..(i + 1) * hd];
            let seen = pos + 1;
            let first = window.map_or(0, |w| seen.saturating_sub(w));
            scores.clear();
            scores.extend((first..seen).map(|j| {
                let at = j * row + kvh * hd;
                dot(qh, &l.k[at..at + hd]) * scale
            }));
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (j, p) in (first..seen).zip(scores.iter()) {
                let at = j * row + kvh * hd;
                let w = p / sum;
                for (o, x) in y.iter_mut().zip(&l.v[at..at + hd]) {
                    *o += w * x;
                }
            }
        });
    Ok(out)
}

/// A dot product with eight independent sums (vectorizes; the same order every time).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_a_plain_sum() {
        let a: Vec<f32> = (0..67).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..67).map(|i| 1.0 - i as f32 * 0.01).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-2 * plain.abs());
    }
}
