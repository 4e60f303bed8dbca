//! The kernels against candle's own quantized matmuls (bit for bit) and a dequantized
//! reference, on random weights shaped like the default model's.

use candle_core::quantized::{GgmlDType, QTensor};

use super::*;

/// splitmix64: a tiny deterministic PRNG.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Random GGUF Q4_1 bytes: f16 scales in (0, 0.02], mins in [-0.16, 0.16), random nibbles.
fn random_q4_1(rng: &mut Rng, rows: usize, cols: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(rows * cols / QK * BLOCK_BYTES);
    for _ in 0..rows * cols / QK {
        let d = f16::from_f32((rng.f32().abs() + 1e-3) * 0.02);
        let m = f16::from_f32(rng.f32() * 0.16);
        data.extend_from_slice(&d.to_bits().to_le_bytes());
        data.extend_from_slice(&m.to_bits().to_le_bytes());
        for _ in 0..QK / 2 {
            data.push(rng.next_u64() as u8);
        }
    }
    data
}

/// Activations in [-1, 1) with an occasional large outlier, like real hidden states.
fn random_x(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let v = rng.f32();
            if i % 97 == 13 { v * 40.0 } else { v }
        })
        .collect()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |acc, v| acc.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / scale.max(y.abs()))
        .fold(0f32, f32::max)
}

#[test]
fn qmatmul_from_raw_rejects_bad_sizes() {
    let data = vec![0u8; 4 * 2 * BLOCK_BYTES];
    let m = Q41Matrix::from_raw(&data, 4, 64).expect("valid sizes");
    assert_eq!((m.rows(), m.cols()), (4, 64));
    for (rows, cols) in [(4, 63), (4, 48), (4, 0), (5, 64), (3, 64), (4, 32)] {
        let err = Q41Matrix::from_raw(&data, rows, cols);
        assert!(
            matches!(err, Err(EngineError::Model(_))),
            "{rows}x{cols} accepted"
        );
    }
    assert!(Q41Matrix::from_raw(&data[1..], 4, 64).is_err());
    assert!(Q41Matrix::from_raw(&[], usize::MAX, 64).is_err());
}

#[test]
fn qmatmul_rejects_bad_lengths() {
    let mut rng = Rng(7);
    let w = Q41Matrix::from_raw(&random_q4_1(&mut rng, 16, 64), 16, 64).expect("matrix");
    let x = vec![0.5f32; 2 * 64];
    let mut out = vec![0f32; 2 * 16];
    assert!(w.matmul(&x, 2, &mut out).is_ok());
    assert!(w.matmul(&x[1..], 2, &mut out).is_err());
    assert!(w.matmul(&x, 2, &mut out[1..]).is_err());
    assert!(w.matmul(&x, 3, &mut out).is_err());
    assert!(w.matmul(&x, usize::MAX, &mut out).is_err());
    assert!(w.matmul(&[], 0, &mut []).is_ok());
}

#[test]
fn qmatmul_dequantized_reference_is_close() {
    // Sanity check of the tile layout against plain f32 math on dequantized weights.
    let (rows, cols) = (13, 96);
    let mut rng = Rng(3);
    let data = random_q4_1(&mut rng, rows, cols);
    let w = Q41Matrix::from_raw(&data, rows, cols).expect("matrix");
    let x = random_x(&mut rng, cols);
    let mut out = vec![0f32; rows];
    w.matmul(&x, 1, &mut out).expect("matmul");
    for (r, &got) in out.iter().enumerate() {
        let mut want = 0f32;
        let mut norm = 0f32;
        for b in 0..cols / QK {
            let blk = &data[(r * cols / QK + b) * BLOCK_BYTES..][..BLOCK_BYTES];
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let mn = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
            for j in 0..16 {
                let (w0, w1) = (blk[4 + j] & 0x0F, blk[4 + j] >> 4);
                let (x0, x1) = (x[b * QK + j], x[b * QK + j + 16]);
                want += (d * w0 as f32 + mn) * x0 + (d * w1 as f32 + mn) * x1;
                norm += ((d * w0 as f32 + mn) * x0).abs() + ((d * w1 as f32 + mn) * x1).abs();
            }
        }
        assert!(
            (got - want).abs() <= 0.02 * norm,
            "row {r}: {got} vs {want}"
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn qmatmul_avx2_quantize_rounds_like_f32_round() {
    if best_kernel() != Kernel::Avx2 {
        return;
    }
    // amax 127 gives d = 1 and id = 1, so these values hit the rounding ties directly.
    let mut x = vec![
        127.0,
        0.5,
        1.5,
        2.5,
        -0.5,
        -1.5,
        -2.5,
        0.499_999_97,
        -0.499_999_97,
        126.5,
        -126.5,
        3.499_999_8,
        1e-8,
        -1e-8,
        0.0,
        -0.0,
    ];
    x.resize(QK, 0.25);
    let mut rng = Rng(11);
    x.extend(random_x(&mut rng, 5 * QK));
    let mut fast = vec![ActBlock::ZERO; x.len() / QK];
    let mut slow = fast.clone();
    // SAFETY: avx2, fma and f16c were detected (best_kernel).
    unsafe { avx2::quantize(&x, &mut fast) };
    quantize_generic(&x, &mut slow);
    for (a, b) in fast.iter().zip(&slow) {
        assert_eq!(a.qs, b.qs);
        assert_eq!(
            (a.d.to_bits(), a.s.to_bits()),
            (b.d.to_bits(), b.s.to_bits())
        );
    }
    assert_eq!(
        &slow[0].qs[..12],
        &[127, 1, 2, 3, -1, -2, -3, 0, 0, 127, -127, 3]
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn qmatmul_avx2_matches_scalar() {
    if best_kernel() != Kernel::Avx2 {
        eprintln!("no avx2/fma/f16c on this CPU, skipping");
        return;
    }
    let mut rng = Rng(0x5eed);
    for (rows, cols) in [(576, 576), (1536, 576), (576, 1536), (1000, 576), (37, 64)] {
        let w =
            Q41Matrix::from_raw(&random_q4_1(&mut rng, rows, cols), rows, cols).expect("matrix");
        for m in [1, 3, 17] {
            let x = random_x(&mut rng, m * cols);
            let mut fast = vec![0f32; m * rows];
            let mut slow = vec![0f32; m * rows];
            w.matmul_with(Kernel::Avx2, &x, m, &mut fast).expect("avx2");
            w.matmul_with(Kernel::Scalar, &x, m, &mut slow)
                .expect("scalar");
            let rel = max_rel_diff(&fast, &slow);
            assert!(rel < 1e-5, "{rows}x{cols} m={m}: rel diff {rel}");
            // Same operations in the same order: the results are identical.
            for (k, (a, b)) in fast.iter().zip(&slow).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{rows}x{cols} m={m} [{k}]");
            }
        }
    }
}

#[test]
fn qmatmul_nested_in_rayon_matches_sequential() {
    // Calls from inside rayon workers (scratch busy, scope spawned on a worker) give the
    // same result as a plain call.
    let (rows, cols, m) = (1536, 576, 5);
    let mut rng = Rng(99);
    let w = Q41Matrix::from_raw(&random_q4_1(&mut rng, rows, cols), rows, cols).expect("matrix");
    let x = random_x(&mut rng, m * cols);
    let mut want = vec![0f32; m * rows];
    w.matmul(&x, m, &mut want).expect("matmul");
    let outs: Vec<Vec<f32>> = (0..8)
        .into_par_iter()
        .map(|_| {
            let mut out = vec![0f32; m * rows];
            w.matmul(&x, m, &mut out).expect("nested matmul");
            out
        })
        .collect();
    for out in outs {
        assert_eq!(out, want);
    }
}

#[test]
fn qmatmul_matches_candle() {
    use candle_core::Device;
    use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
    use std::borrow::Cow;

    let mut rng = Rng(42);
    for (rows, cols) in [(576, 576), (1536, 576), (576, 1536), (37, 64)] {
        let data = random_q4_1(&mut rng, rows, cols);
        let ours = Q41Matrix::from_raw(&data, rows, cols).expect("matrix");
        let storage = QStorage::from_data(Cow::Borrowed(&data), &Device::Cpu, GgmlDType::Q4_1)
            .expect("storage");
        let qt = QTensor::new(storage, (rows, cols)).expect("qtensor");
        let mm = QMatMul::from_qtensor(qt).expect("qmatmul");
        for m in [1, 3, 17] {
            let x = random_x(&mut rng, m * cols);
            let want = candle_forward(&mm, &x, m, cols);
            let mut got = vec![0f32; m * rows];
            ours.matmul(&x, m, &mut got).expect("matmul");
            let rel = max_rel_diff(&got, &want);
            assert!(rel < 1e-4, "{rows}x{cols} m={m}: rel diff {rel}");
            // The point of this kernel: bit-identical to candle's generic Q4_1 path.
            for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{rows}x{cols} m={m} [{k}]: {a} vs {b}"
                );
            }
            let mut scalar = vec![0f32; m * rows];
            ours.matmul_with(Kernel::Scalar, &x, m, &mut scalar)
                .expect("scalar");
            assert_eq!(scalar, want, "{rows}x{cols} m={m}: scalar path");
        }
    }
}

/// candle's own quantized matmul of `m` rows of `x`: the reference the kernels must equal.
fn candle_forward(
    mm: &candle_core::quantized::QMatMul,
    x: &[f32],
    m: usize,
    cols: usize,
) -> Vec<f32> {
    use candle_core::{Device, Module, Tensor};
    let xt = Tensor::from_slice(x, (m, cols), &Device::Cpu).expect("x");
    mm.forward(&xt)
        .expect("candle forward")
        .flatten_all()
        .expect("flatten")
        .to_vec1()
        .expect("to_vec1")
}

#[test]
fn q8_0_matmul_equals_candle_bit_for_bit() {
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Tensor};
    use std::sync::Arc;

    let mut rng = Rng(5);
    for (rows, cols) in [(576, 576), (1000, 64), (37, 96), (3, 32)] {
        let w = random_x(&mut rng, rows * cols);
        let wt = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).expect("w");
        let qt = Arc::new(QTensor::quantize(&wt, GgmlDType::Q8_0).expect("quantize"));
        let ours = Q80Matrix::new(qt.clone()).expect("matrix");
        let mm = QMatMul::from_arc(qt).expect("qmatmul");
        for m in [1, 3, 17] {
            let x = random_x(&mut rng, m * cols);
            let want = candle_forward(&mm, &x, m, cols);
            let mut got = vec![0f32; m * rows];
            ours.matmul(&x, m, &mut got).expect("matmul");
            assert_eq!(got, want, "{rows}x{cols} m={m}");
            let mut fallback = vec![0f32; m * rows];
            ours.matmul_with(Kernel::Scalar, &x, m, &mut fallback)
                .expect("fallback");
            assert_eq!(fallback, want, "{rows}x{cols} m={m}: fallback path");
        }
    }
    let q41 = QTensor::quantize(
        &Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).expect("zeros"),
        GgmlDType::Q4_1,
    )
    .expect("quantize");
    assert!(Q80Matrix::new(Arc::new(q41)).is_err());
    let m = Q80Matrix::new(Arc::new(
        QTensor::quantize(
            &Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).expect("zeros"),
            GgmlDType::Q8_0,
        )
        .expect("quantize"),
    ))
    .expect("matrix");
    assert!(m.matmul(&[0.0; 31], 1, &mut [0.0; 4]).is_err());
}
