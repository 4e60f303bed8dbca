//! Fast CPU matmuls for GGUF weights that reproduce candle's numbers bit for bit: Q4_1 here,
//! Q8_0 in [`q8_0`].
//!
//! Why: candle 0.11 has no SIMD kernel for Q4_1, so its CPU path runs the generic
//! `vec_dot_unopt` for every output and decodes several times slower than llama.cpp. Converting
//! the weights to Q8_0 (which candle does accelerate) changes the numbers and broke greedy parity
//! with llama.cpp, so this module computes exactly what candle's generic Q4_1 × Q8_1 path
//! computes, only faster:
//!
//! * Each activation row is quantized once per call to Q8_1 blocks exactly as candle's
//!   `BlockQ8_1::from_float` does (`d = amax / 127` stored as f16, `qs = round(x / d)`,
//!   `s = f16(f16(sum(qs)) * d)`).
//! * Per 32-weight block the integer dot product of the 4-bit weights with the 8-bit activations
//!   is exact in any order, and the float part is accumulated per output in block order as
//!   `sum += (sumi as f32 * d_w) * d_x + m_w * s_x`, without fused multiply-adds, which is the
//!   same sequence of roundings candle performs. The SIMD path therefore equals the scalar path
//!   and candle bit for bit.
//!
//! Layout: at load time the weights are regrouped into tiles of 8 output rows × one 32-weight
//! block (160 bytes: 8 f16 scales, 8 f16 mins, 128 nibble bytes). Inside a tile the nibble bytes
//! are interleaved in 4-byte runs, row by row, so one 32-byte load holds four weights of each of
//! the 8 rows. With the matching 4 activation bytes broadcast to every 32-bit lane,
//! `_mm256_maddubs_epi16` + `_mm256_madd_epi16` leave row r's partial dot product in lane r,
//! with no horizontal reductions; the per-block scale step is then one 8-wide vector op per
//! tile.
//!
//! Threads: output rows are split into chunks of up to 64 rows shared by the calling thread and
//! rayon tasks (the caller works too, so small matmuls don't wait on a pool wake-up); a chunk
//! runs all `m` activation rows over its tiles, so a weight tile is read from memory once per
//! call. Small calls stay on the calling thread.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::f16;
use rayon::prelude::*;

use crate::EngineError;

/// Weights per quantization block (Q4_1 and Q8_1 alike).
const QK: usize = 32;
/// Bytes of one GGUF Q4_1 block: `d: f16, m: f16, qs: [u8; 16]`.
const BLOCK_BYTES: usize = 20;
/// Output rows interleaved in one tile.
const TILE_ROWS: usize = 8;
/// At most this many tiles' worth of rows (8 × 8 = 64 rows) go to one rayon task.
const MAX_CHUNK_GROUPS: usize = 8;
/// Below this many multiply-adds a call runs on the calling thread: waking the pool costs more.
const PARALLEL_MIN_MACS: usize = 1 << 17;
/// At most this many threads share one call.
const MAX_PARTS: usize = 32;

/// Eight output rows × one 32-weight block.
///
/// `qs[p * 32 + r * 4 + j]` is the GGUF byte `qs[4 * p + j]` of row `r`: its low nibble is
/// weight `4p + j`, its high nibble weight `16 + 4p + j`.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Tile {
    /// f16 bits of the per-row scales.
    d: [u16; TILE_ROWS],
    /// f16 bits of the per-row minimums.
    m: [u16; TILE_ROWS],
    qs: [u8; QK / 2 * TILE_ROWS],
}

const _: () = assert!(std::mem::size_of::<Tile>() == 160);

impl Tile {
    const ZERO: Self = Self {
        d: [0; TILE_ROWS],
        m: [0; TILE_ROWS],
        qs: [0; QK / 2 * TILE_ROWS],
    };
}

/// One activation block quantized to Q8_1, with `d` and `s` already widened from f16
/// (exactly; the f16 rounding happened first, as in candle).
#[derive(Clone, Copy)]
#[repr(C)]
struct ActBlock {
    qs: [i8; QK],
    d: f32,
    s: f32,
}

impl ActBlock {
    const ZERO: Self = Self {
        qs: [0; QK],
        d: 0.0,
        s: 0.0,
    };
}

/// Which inner kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// The fastest kernel this CPU supports, detected once.
fn best_kernel() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Scalar
    })
}

/// A GGUF Q4_1 weight matrix (`rows` outputs × `cols` inputs) repacked for fast `x · Wᵀ`.
#[derive(Clone)]
pub struct Q41Matrix {
    rows: usize,
    cols: usize,
    /// `rows.div_ceil(8)` groups of `cols / 32` tiles, group-major; rows past `rows` are zero.
    tiles: Vec<Tile>,
}

impl std::fmt::Debug for Q41Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q41Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl Q41Matrix {
    /// `data` = raw GGUF Q4_1 bytes, row-major, `rows` rows of `cols` weights (cols % 32 == 0).
    pub fn from_raw(data: &[u8], rows: usize, cols: usize) -> Result<Self, EngineError> {
        if cols == 0 || !cols.is_multiple_of(QK) {
            return Err(EngineError::Model(format!(
                "Q4_1 matrix: {cols} columns is not a positive multiple of {QK}"
            )));
        }
        let kb = cols / QK;
        let expected = rows
            .checked_mul(kb)
            .and_then(|blocks| blocks.checked_mul(BLOCK_BYTES))
            .ok_or_else(|| EngineError::Model(format!("Q4_1 matrix: {rows}x{cols} overflows")))?;
        if data.len() != expected {
            return Err(EngineError::Model(format!(
                "Q4_1 matrix: {rows}x{cols} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        let groups = rows.div_ceil(TILE_ROWS);
        let mut tiles = vec![Tile::ZERO; groups * kb];
        for (g, group) in tiles.chunks_exact_mut(kb).enumerate() {
            let first = g * TILE_ROWS;
            let last = rows.min(first + TILE_ROWS);
            for (r, row_bytes) in data
                .chunks_exact(kb * BLOCK_BYTES)
                .skip(first)
                .take(last - first)
                .enumerate()
            {
                for (tile, block) in group.iter_mut().zip(row_bytes.chunks_exact(BLOCK_BYTES)) {
                    tile.d[r] = u16::from_le_bytes([block[0], block[1]]);
                    tile.m[r] = u16::from_le_bytes([block[2], block[3]]);
                    for p in 0..4 {
                        let dst = p * 32 + r * 4;
                        let src = 4 + p * 4;
                        tile.qs[dst..dst + 4].copy_from_slice(&block[src..src + 4]);
                    }
                }
            }
        }
        Ok(Self { rows, cols, tiles })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `out[i*rows + r] = sum_c x[i*cols + c] * W[r][c]` for `i in 0..m` (y = x · Wᵀ, like a
    /// Linear layer), with the activations quantized to Q8_1 first exactly as candle does.
    ///
    /// `x` must hold `m * cols` values and `out` exactly `m * rows`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), EngineError> {
        self.matmul_with(best_kernel(), x, m, out)
    }

    fn matmul_with(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), EngineError> {
        let x_len = m.checked_mul(self.cols);
        let out_len = m.checked_mul(self.rows);
        if x_len != Some(x.len()) || out_len != Some(out.len()) {
            return Err(EngineError::Model(format!(
                "Q4_1 matmul: {m} rows against a {}x{} matrix need {} inputs and {} outputs, \
                 got {} and {}",
                self.rows,
                self.cols,
                m.saturating_mul(self.cols),
                m.saturating_mul(self.rows),
                x.len(),
                out.len()
            )));
        }
        if m == 0 || self.rows == 0 {
            return Ok(());
        }
        let blocks = m * (self.cols / QK);
        with_act_scratch(blocks, |act| {
            quantize_rows(kernel, x, act);
            self.run(kernel, act, m, out);
        });
        Ok(())
    }

    /// Computes every output from the quantized activations, splitting the rows across rayon.
    fn run(&self, kernel: Kernel, act: &[ActBlock], m: usize, out: &mut [f32]) {
        let groups = self.rows.div_ceil(TILE_ROWS);
        let macs = self.rows.saturating_mul(self.cols).saturating_mul(m);
        let out = OutPtr(out.as_mut_ptr());
        // SAFETY: `out` holds `m * rows` floats (checked by the caller) and outlives the call;
        // `share_groups` hands out disjoint group ranges and a group only writes its own rows.
        share_groups(groups, macs, &|range| unsafe {
            self.run_groups(kernel, act, m, range, out)
        });
    }

    /// Writes `out[i*rows + r]` for all `i < m` and every row `r` of the groups in `range`.
    ///
    /// # Safety
    /// `out` must point to `m * self.rows` writable floats that no one else accesses for the
    /// rows of `range` during the call.
    unsafe fn run_groups(
        &self,
        kernel: Kernel,
        act: &[ActBlock],
        m: usize,
        range: std::ops::Range<usize>,
        out: OutPtr,
    ) {
        let kb = self.cols / QK;
        for g in range {
            let tiles = &self.tiles[g * kb..(g + 1) * kb];
            let row0 = g * TILE_ROWS;
            let valid = TILE_ROWS.min(self.rows - row0);
            let mut i = 0;
            while i < m {
                let step = match m - i {
                    1 => 1,
                    2 | 3 => 2,
                    _ => 4,
                };
                let rows_act = &act[i * kb..(i + step) * kb];
                let mut sums = [[0f32; TILE_ROWS]; 4];
                match (kernel, step) {
                    #[cfg(target_arch = "x86_64")]
                    (Kernel::Avx2, 1) => {
                        // SAFETY: `Kernel::Avx2` is only chosen when avx2, fma and f16c were
                        // detected at runtime.
                        sums[0] = unsafe { avx2::dot_tiles::<1>(tiles, rows_act) }[0];
                    }
                    #[cfg(target_arch = "x86_64")]
                    (Kernel::Avx2, 2) => {
                        // SAFETY: as above.
                        let s = unsafe { avx2::dot_tiles::<2>(tiles, rows_act) };
                        sums[..2].copy_from_slice(&s);
                    }
                    #[cfg(target_arch = "x86_64")]
                    (Kernel::Avx2, _) => {
                        // SAFETY: as above.
                        sums = unsafe { avx2::dot_tiles::<4>(tiles, rows_act) };
                    }
                    (Kernel::Scalar, _) => {
                        for (s, a) in sums.iter_mut().zip(rows_act.chunks_exact(kb)) {
                            *s = dot_tiles_scalar(tiles, a);
                        }
                    }
                }
                for (di, s) in sums.iter().take(step).enumerate() {
                    let base = (i + di) * self.rows + row0;
                    for (r, &v) in s.iter().take(valid).enumerate() {
                        // SAFETY: `i + di < m` and `row0 + r < rows`, so the index is below
                        // `m * rows`; the caller guarantees exclusive access to these rows.
                        unsafe { *out.get().add(base + r) = v };
                    }
                }
                i += step;
            }
        }
    }
}

/// Runs `work` over `0..groups` split across the calling thread and rayon.
///
/// The groups are cut into chunks (about four per thread so uneven progress still balances, at
/// most [`MAX_CHUNK_GROUPS`] each), and the chunks into one contiguous share per participant:
/// the calling thread works on the first share itself while `threads - 1` rayon tasks take the
/// others, each walking its share front to back (long sequential streams suit the prefetchers)
/// and then helping with the rest. Working on the caller avoids waiting on a pool wake-up round
/// trip, which costs more than a small matmul; calls under [`PARALLEL_MIN_MACS`] stay on it.
/// Every group is passed to `work` exactly once.
fn share_groups(groups: usize, macs: usize, work: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    let threads = rayon::current_num_threads();
    if threads <= 1 || groups <= 1 || macs < PARALLEL_MIN_MACS {
        work(0..groups);
        return;
    }
    let chunk = (groups / (threads * 4)).clamp(1, MAX_CHUNK_GROUPS);
    let n_chunks = groups.div_ceil(chunk);
    let parts = threads.min(n_chunks).min(MAX_PARTS);
    let end = |p: usize| (p + 1) * n_chunks / parts;
    // `next[p]` is the next unclaimed chunk of share `p`, which ends at `end(p)`.
    let next: [Counter; MAX_PARTS] =
        std::array::from_fn(|p| Counter(AtomicUsize::new(p * n_chunks / parts)));
    let participate = |me: usize| {
        for p in (me..parts).chain(0..me) {
            loop {
                // Each chunk index is claimed exactly once (atomic fetch_add).
                let c = next[p].0.fetch_add(1, Ordering::Relaxed);
                if c >= end(p) {
                    break;
                }
                work(c * chunk..groups.min((c + 1) * chunk));
            }
        }
    };
    let participate = &participate;
    rayon::in_place_scope(|scope| {
        for p in 1..parts {
            scope.spawn(move |_| participate(p));
        }
        participate(0);
    });
}

/// A claim counter on its own cache line, so the participants' counters don't false-share.
#[repr(align(64))]
struct Counter(AtomicUsize);

/// The output pointer shared by the rayon tasks, which write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: the tasks holding copies write disjoint elements (see `Q41Matrix::run`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method rather than a field access, so closures capture the whole `Send` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs `f` with a buffer of `len` activation blocks, reused across calls on this thread.
fn with_act_scratch<R>(len: usize, f: impl FnOnce(&mut [ActBlock]) -> R) -> R {
    thread_local! {
        static SCRATCH: RefCell<Vec<ActBlock>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, ActBlock::ZERO);
            }
            f(&mut buf[..len])
        }
        // A rayon worker waiting inside a parallel loop may run another matmul on this thread;
        // then the buffer is taken and that call allocates its own.
        Err(_) => f(&mut vec![ActBlock::ZERO; len]),
    })
}

/// Quantizes all activation rows (`act.len()` blocks) to Q8_1.
fn quantize_rows(kernel: Kernel, x: &[f32], act: &mut [ActBlock]) {
    const PAR_MIN_BLOCKS: usize = 512;
    let quantize = |x: &[f32], act: &mut [ActBlock]| match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::Avx2` is only chosen when avx2, fma and f16c were detected.
        Kernel::Avx2 => unsafe { avx2::quantize(x, act) },
        Kernel::Scalar => quantize_generic(x, act),
    };
    if act.len() >= PAR_MIN_BLOCKS && rayon::current_num_threads() > 1 {
        let per_task = 128;
        act.par_chunks_mut(per_task)
            .zip(x.par_chunks(per_task * QK))
            .for_each(|(a, x)| quantize(x, a));
    } else {
        quantize(x, act);
    }
}

/// candle's `BlockQ8_1::from_float`, block by block, with `d` and `s` widened to f32.
#[inline(always)]
fn quantize_generic(x: &[f32], act: &mut [ActBlock]) {
    for (xs, y) in x.chunks_exact(QK).zip(act.iter_mut()) {
        let mut amax = 0f32;
        for &v in xs {
            amax = amax.max(v.abs());
        }
        let d = amax / ((1 << 7) - 1) as f32;
        let id = if d != 0f32 { 1. / d } else { 0. };
        let d16 = f16::from_f32(d);
        let mut sum = 0i32;
        for j in 0..QK / 2 {
            let q0 = f32::round(xs[j] * id) as i8;
            let q1 = f32::round(xs[j + QK / 2] * id) as i8;
            y.qs[j] = q0;
            y.qs[j + QK / 2] = q1;
            sum += q0 as i32 + q1 as i32;
        }
        // candle: `ys.s = f16::from_f32(sum as f32) * ys.d`, an f16 product rounded through f32.
        let s16 = f16::from_f32(f16::from_f32(sum as f32).to_f32() * d16.to_f32());
        y.d = d16.to_f32();
        y.s = s16.to_f32();
    }
}

/// The eight outputs of one tile group against one activation row, candle's generic way.
fn dot_tiles_scalar(tiles: &[Tile], act: &[ActBlock]) -> [f32; TILE_ROWS] {
    let mut sums = [0f32; TILE_ROWS];
    for (t, a) in tiles.iter().zip(act) {
        for (r, sum) in sums.iter_mut().enumerate() {
            let mut sumi = 0i32;
            for p in 0..4 {
                for j in 0..4 {
                    let q = t.qs[p * 32 + r * 4 + j];
                    sumi += (q & 0x0F) as i32 * a.qs[4 * p + j] as i32
                        + (q >> 4) as i32 * a.qs[16 + 4 * p + j] as i32;
                }
            }
            let dw = f16::from_bits(t.d[r]).to_f32();
            let mw = f16::from_bits(t.m[r]).to_f32();
            *sum += sumi as f32 * dw * a.d + mw * a.s;
        }
    }
    sums
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ActBlock, QK, TILE_ROWS, Tile};

    /// [`super::quantize_generic`] compiled with AVX2 enabled, so `round` is inlined (LLVM's
    /// exact `trunc(x + copysign(pred(0.5), x))`) instead of a libm call per element.
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize(x: &[f32], act: &mut [ActBlock]) {
        super::quantize_generic(x, act);
    }

    /// The eight outputs of one tile group against `M` activation rows (`act` holds `M` rows of
    /// `tiles.len()` blocks each).
    ///
    /// Per tile and activation row: four 32-byte loads give the 8 rows × 4 weights of the low
    /// nibbles (weights 0..16) and, shifted, of the high nibbles (16..32); the matching four
    /// activation bytes are broadcast to every lane, so `maddubs` leaves two i16 partial sums of
    /// row r in lane r. Eight of them stay below 2^15 (16 products of at most 15 × 128), then
    /// `madd` with ones gives the exact i32 block sum per row. The float step mirrors candle
    /// operation for operation: `acc += (sumi * d_w) * d_x + m_w * s_x`, no FMA.
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_tiles<const M: usize>(
        tiles: &[Tile],
        act: &[ActBlock],
    ) -> [[f32; TILE_ROWS]; M] {
        let kb = tiles.len();
        debug_assert_eq!(act.len(), M * kb);
        let acts: [&[ActBlock]; M] = std::array::from_fn(|i| &act[i * kb..(i + 1) * kb]);
        let nibble = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); M];
        for (b, t) in tiles.iter().enumerate() {
            let mut s16 = [_mm256_setzero_si256(); M];
            for p in 0..4 {
                // SAFETY: `Tile` is 32-byte aligned and `qs` starts at offset 32, so
                // `qs[p * 32..p * 32 + 32]` is an aligned, in-bounds 32-byte read.
                let raw = unsafe { _mm256_load_si256(t.qs.as_ptr().add(p * 32).cast()) };
                let lo = _mm256_and_si256(raw, nibble);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nibble);
                for i in 0..M {
                    let qs = &acts[i][b].qs;
                    let xlo = i32::from_le_bytes([
                        qs[4 * p] as u8,
                        qs[4 * p + 1] as u8,
                        qs[4 * p + 2] as u8,
                        qs[4 * p + 3] as u8,
                    ]);
                    let xhi = i32::from_le_bytes([
                        qs[16 + 4 * p] as u8,
                        qs[16 + 4 * p + 1] as u8,
                        qs[16 + 4 * p + 2] as u8,
                        qs[16 + 4 * p + 3] as u8,
                    ]);
                    let plo = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xlo));
                    let phi = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xhi));
                    s16[i] = _mm256_add_epi16(s16[i], _mm256_add_epi16(plo, phi));
                }
            }
            // SAFETY: `d` and `m` are `[u16; 8]`, 16 readable bytes each.
            let (dw, mw) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(t.m.as_ptr().cast())),
                )
            };
            for i in 0..M {
                let a = &acts[i][b];
                let sumi = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[i], ones));
                let scaled = _mm256_mul_ps(_mm256_mul_ps(sumi, dw), _mm256_set1_ps(a.d));
                let min = _mm256_mul_ps(mw, _mm256_set1_ps(a.s));
                acc[i] = _mm256_add_ps(acc[i], _mm256_add_ps(scaled, min));
            }
        }
        let mut out = [[0f32; TILE_ROWS]; M];
        for (o, a) in out.iter_mut().zip(acc) {
            // SAFETY: `o` is 8 writable floats.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
        }
        out
    }

    const _: () = assert!(QK == 32);
}

mod q8_0;
pub use q8_0::Q80Matrix;

#[cfg(test)]
mod tests;
