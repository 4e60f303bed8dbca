//! Q8_0 weights on our threads: candle's AVX dot product reproduced four rows at a time.

use std::sync::Arc;

use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};

use super::{
    Kernel, OutPtr, QK, TILE_ROWS, best_kernel, quantize_rows, share_groups, with_act_scratch,
};
use crate::EngineError;

/// Bytes of one GGUF Q8_0 block: `d: f16, qs: [i8; 32]`.
const Q8_0_BYTES: usize = 34;

/// A GGUF Q8_0 weight matrix (`rows` outputs × `cols` inputs), multiplied with candle's own
/// Q8_0 × Q8_0 dot product, so the numbers are exactly candle's, but split across rayon like
/// the Q4_1 kernel. Why: candle runs its quantized matmuls on a second thread pool whose
/// workers spin for about a millisecond after each call; on a small machine they then compete
/// with the rayon threads running the next layers (a tied Q8_0 output head made every decode
/// step hand off to that pool and back).
#[derive(Clone)]
pub struct Q80Matrix {
    /// The tensor itself (shared with the embedding when the head is tied); CPU storage.
    tensor: Arc<QTensor>,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for Q80Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q80Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl Q80Matrix {
    /// `tensor` must be a 2-D Q8_0 tensor in CPU memory (`rows × cols`, cols % 32 == 0).
    pub fn new(tensor: Arc<QTensor>) -> Result<Self, EngineError> {
        let (rows, cols) = tensor.shape().dims2()?;
        if tensor.dtype() != GgmlDType::Q8_0 || !tensor.device().is_cpu() {
            return Err(EngineError::Model(format!(
                "Q8_0 matrix: got a {:?} tensor on {:?}",
                tensor.dtype(),
                tensor.device().location()
            )));
        }
        if cols == 0 || !cols.is_multiple_of(QK) {
            return Err(EngineError::Model(format!(
                "Q8_0 matrix: {cols} columns is not a positive multiple of {QK}"
            )));
        }
        let m = Self { tensor, rows, cols };
        m.with_blocks(|b| {
            if b.len() == rows * (cols / QK) {
                Ok(())
            } else {
                Err(EngineError::Model(format!(
                    "Q8_0 matrix: {rows}x{cols} holds {} blocks",
                    b.len()
                )))
            }
        })??;
        Ok(m)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Runs `f` on the tensor's bytes viewed as Q8_0 blocks.
    fn with_blocks<R>(&self, f: impl FnOnce(&[BlockQ8_0]) -> R) -> Result<R, EngineError> {
        let bytes = self.tensor.data()?;
        // SAFETY: `BlockQ8_0` is `repr(C)` plain data (an f16 and 32 i8, 34 bytes, align 2) for
        // which every bit pattern is valid; `align_to` only yields correctly aligned blocks, and
        // a non-empty prefix or suffix (misaligned or truncated storage) is refused below.
        let (pre, blocks, post) = unsafe { bytes.align_to::<BlockQ8_0>() };
        if !pre.is_empty() || !post.is_empty() {
            return Err(EngineError::Model(
                "Q8_0 matrix: storage is not a whole number of aligned blocks".into(),
            ));
        }
        Ok(f(blocks))
    }

    /// `out[i*rows + r] = sum_c x[i*cols + c] * W[r][c]` for `i in 0..m`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), EngineError> {
        let (rows, cols) = (self.rows, self.cols);
        if m.checked_mul(cols) != Some(x.len()) || m.checked_mul(rows) != Some(out.len()) {
            return Err(EngineError::Model(format!(
                "Q8_0 matmul: {m} rows against a {rows}x{cols} matrix need {} inputs and {} \
                 outputs, got {} and {}",
                m.saturating_mul(cols),
                m.saturating_mul(rows),
                x.len(),
                out.len()
            )));
        }
        if m == 0 || rows == 0 {
            return Ok(());
        }
        self.matmul_with(best_kernel(), x, m, out)
    }

    pub(super) fn matmul_with(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), EngineError> {
        let (rows, cols) = (self.rows, self.cols);
        let kb = cols / QK;
        let out = OutPtr(out.as_mut_ptr());
        let groups = rows.div_ceil(TILE_ROWS);
        let macs = rows.saturating_mul(cols).saturating_mul(m);
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                // candle's `BlockQ8_0::from_float` computes the same `d` and `qs` as the Q8_1
                // quantization the Q4_1 kernel uses (only `s` is extra), so that one is reused.
                let bytes = self.tensor.data()?;
                with_act_scratch(m * kb, |act| {
                    quantize_rows(kernel, x, act);
                    let work = |range: std::ops::Range<usize>| {
                        let first = range.start * TILE_ROWS;
                        let last = rows.min(range.end * TILE_ROWS);
                        let w = &bytes[first * kb * Q8_0_BYTES..last * kb * Q8_0_BYTES];
                        for (i, a) in act.chunks_exact(kb).enumerate() {
                            let mut r = first;
                            for quad in w.chunks(4 * kb * Q8_0_BYTES) {
                                // SAFETY: `Kernel::Avx2` is only chosen when avx2, fma and f16c
                                // were detected at runtime.
                                let dots = unsafe { avx2::dot_q8_0_rows(quad, a) };
                                let n = quad.len() / (kb * Q8_0_BYTES);
                                for (k, v) in dots.into_iter().take(n).enumerate() {
                                    // SAFETY: `i < m` and `r + k < rows`, so the index is below
                                    // `m * rows`, the length checked by `matmul`; each group goes
                                    // to one caller of `work`, so no two write the same element.
                                    unsafe { *out.get().add(i * rows + r + k) = v };
                                }
                                r += n;
                            }
                        }
                    };
                    share_groups(groups, macs, &work);
                });
                Ok(())
            }
            _ => {
                let mut act = vec![BlockQ8_0::zeros(); m * kb];
                for (xs, ys) in x.chunks_exact(cols).zip(act.chunks_exact_mut(kb)) {
                    BlockQ8_0::from_float(xs, ys);
                }
                self.with_blocks(|w| {
                    let work = |range: std::ops::Range<usize>| {
                        let first = range.start * TILE_ROWS;
                        let last = rows.min(range.end * TILE_ROWS);
                        for r in first..last {
                            let wr = &w[r * kb..(r + 1) * kb];
                            for (i, a) in act.chunks_exact(kb).enumerate() {
                                let v = BlockQ8_0::vec_dot(cols, wr, a);
                                // SAFETY: as above: `i < m`, `r < rows`, disjoint groups.
                                unsafe { *out.get().add(i * rows + r) = v };
                            }
                        }
                    };
                    share_groups(groups, macs, &work);
                })
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::{ActBlock, QK};

    /// Dot products of up to four Q8_0 weight rows (`w`: whole GGUF rows, `act.len()` blocks
    /// each) with one activation row, operation for operation as candle's AVX
    /// `vec_dot_q8_0_q8_0`, so the results are candle's bit for bit: per block, the i8 × i8
    /// products summed in i32 pairs of lanes (sign trick + `maddubs` + `madd`), converted to
    /// f32 and accumulated with `acc = fma(d_w * d_x, q, acc)`; then candle's horizontal sum.
    /// Four rows at once share the activation loads and overlap the four FMA chains, and
    /// the f16 scales are converted inline instead of through a call per block.
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0_rows(w: &[u8], act: &[ActBlock]) -> [f32; 4] {
        const B: usize = super::Q8_0_BYTES;
        let kb = act.len();
        let n = (w.len() / (kb * B)).min(4);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        for (b, a) in act.iter().enumerate() {
            // SAFETY: `qs` is 32 readable bytes.
            let y = unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) };
            for (r, acc) in acc.iter_mut().enumerate().take(n) {
                let at = (r * kb + b) * B;
                let blk = &w[at..at + B];
                let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                    u16::from_le_bytes([blk[0], blk[1]]),
                ))));
                // SAFETY: `blk[2..34]` is 32 readable bytes.
                let x = unsafe { _mm256_loadu_si256(blk[2..].as_ptr().cast()) };
                let ax = _mm256_sign_epi8(x, x);
                let sy = _mm256_sign_epi8(y, x);
                let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy)));
                *acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * a.d), q, *acc);
            }
        }
        let mut out = [0f32; 4];
        for (o, v) in out.iter_mut().zip(acc) {
            let hi = _mm256_extractf128_ps::<1>(v);
            let s = _mm_add_ps(hi, _mm256_castps256_ps128(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            *o = _mm_cvtss_f32(s);
        }
        out
    }

    const _: () = assert!(QK == 32);
}
