//! Rotary position embeddings: the frequencies, and the rotation on the host (CPU path) or as
//! candle tables (other devices).
//!
//! Angles are `position × inv_freq[i]` in f32, then `cos`/`sin` in f32, whether computed per
//! call (host) or into a table (device): the same numbers either way.

use candle_core::{DType, Device, Tensor};

use super::arch::{RopeParams, RopeStyle};
use crate::EngineError;

/// `1 / (base^(2i/n_rot) × linear factor × per-frequency factor)` for each rotated pair.
/// `factors` are llama 3's `rope_freqs.weight`, when the file has them.
pub(crate) fn inv_freq(p: &RopeParams, n_rot: usize, factors: Option<&[f32]>) -> Vec<f32> {
    (0..n_rot)
        .step_by(2)
        .enumerate()
        .map(|(k, i)| {
            // Dividing by a factor of 1 is exact: unscaled models get the plain frequencies.
            let f = 1.0 / p.base.powf(i as f32 / n_rot as f32) / p.linear_factor;
            match factors.and_then(|ff| ff.get(k)) {
                Some(ff) => f / ff,
                None => f,
            }
        })
        .collect()
}

/// Rotates heads on the host, computing each row's angles as it goes (no table the size of
/// the context).
#[derive(Debug, Clone)]
pub(crate) struct HostRope {
    inv_freq: Vec<f32>,
    style: RopeStyle,
}

impl HostRope {
    pub(crate) fn new(inv_freq: Vec<f32>, style: RopeStyle) -> Self {
        Self { inv_freq, style }
    }

    /// Rotates the first `2 × inv_freq.len()` dimensions of every head of every row, each row
    /// at its position.
    pub(crate) fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize, positions: &[usize]) {
        let half = self.inv_freq.len();
        let mut cos = vec![0f32; half];
        let mut sin = vec![0f32; half];
        for (row, &pos) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
            for ((f, c), s) in self.inv_freq.iter().zip(&mut cos).zip(&mut sin) {
                let t = pos as f32 * f;
                (*s, *c) = (t.sin(), t.cos());
            }
            for head in row.chunks_exact_mut(head_dim) {
                match self.style {
                    RopeStyle::Interleaved => {
                        for ((pair, c), s) in head.chunks_exact_mut(2).zip(&cos).zip(&sin) {
                            let (a, b) = (pair[0], pair[1]);
                            pair[0] = a * c - b * s;
                            pair[1] = a * s + b * c;
                        }
                    }
                    RopeStyle::Halves => {
                        let (lo, hi) = head.split_at_mut(half);
                        for (((a, b), c), s) in lo.iter_mut().zip(hi.iter_mut()).zip(&cos).zip(&sin)
                        {
                            let (x0, x1) = (*a, *b);
                            *a = x0 * c - x1 * s;
                            *b = x0 * s + x1 * c;
                        }
                    }
                }
            }
        }
    }
}

/// Cos and sin tables, `[positions, n_rot / 2]`, for candle's rotary ops.
pub(crate) struct DeviceRope {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
    n_rot: usize,
}

impl DeviceRope {
    pub(crate) fn new(
        inv_freq: &[f32],
        style: RopeStyle,
        positions: usize,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let n = inv_freq.len();
        let inv = Tensor::from_vec(inv_freq.to_vec(), (1, n), device)?;
        let t = Tensor::arange(0u32, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?;
        let freqs = t.matmul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            style,
            n_rot: 2 * n,
        })
    }

    /// Rotates `x` (`[1, heads, rows, head_dim]`, contiguous) at `positions` (`[rows]`, u32).
    pub(crate) fn apply(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor, EngineError> {
        let cos = self.cos.index_select(positions, 0)?;
        let sin = self.sin.index_select(positions, 0)?;
        let head_dim = x.dim(3)?;
        let (rot, pass) = if self.n_rot < head_dim {
            (
                x.narrow(3, 0, self.n_rot)?.contiguous()?,
                Some(x.narrow(3, self.n_rot, head_dim - self.n_rot)?),
            )
        } else {
            (x.clone(), None)
        };
        let rot = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&rot, &cos, &sin)?,
            RopeStyle::Halves => candle_nn::rotary_emb::rope(&rot, &cos, &sin)?,
        };
        Ok(match pass {
            Some(pass) => Tensor::cat(&[&rot, &pass], 3)?.contiguous()?,
            None => rot,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotate_both_ways(style: RopeStyle, n_rot: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
        let p = RopeParams {
            base: 10_000.0,
            linear_factor: 1.0,
        };
        let f = inv_freq(&p, n_rot, None);
        let (heads, rows) = (2, 3);
        let positions = [0usize, 5, 17];
        let x: Vec<f32> = (0..rows * heads * head_dim)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let mut host = x.clone();
        HostRope::new(f.clone(), style).apply(&mut host, heads, head_dim, &positions);
        let dev = Device::Cpu;
        let rope = DeviceRope::new(&f, style, 32, &dev).unwrap();
        let t = Tensor::from_vec(x, (1, rows, heads, head_dim), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let pos = Tensor::new(&[0u32, 5, 17], &dev).unwrap();
        let y = rope
            .apply(&t, &pos)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (host, y)
    }

    #[test]
    fn host_and_device_rotations_agree() {
        for style in [RopeStyle::Interleaved, RopeStyle::Halves] {
            for (n_rot, hd) in [(8, 8), (4, 8)] {
                let (host, dev) = rotate_both_ways(style, n_rot, hd);
                for (a, b) in host.iter().zip(&dev) {
                    assert!((a - b).abs() < 1e-5, "{style:?} {n_rot}/{hd}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn position_zero_is_the_identity_and_others_are_not() {
        let (host, _) = rotate_both_ways(RopeStyle::Halves, 8, 8);
        let x: Vec<f32> = (0..48).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
        assert_eq!(&host[..16], &x[..16]);
        assert_ne!(&host[16..32], &x[16..32]);
    }
}
