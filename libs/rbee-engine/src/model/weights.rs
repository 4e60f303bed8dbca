//! Weights as the forward pass uses them: linear layers (repacked for our CPU kernels where
//! that pays) and the token embedding, looked up row by row.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::EngineError;
use crate::qmatmul::{Q41Matrix, Q80Matrix};

/// Linear layers that read the same input, run as one matmul when the kernel allows (Q/K/V,
/// gate/up): one activation quantization and one parallel region instead of several.
pub(crate) enum Projections {
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
    pub(crate) fn new(
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
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>, EngineError> {
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

    pub(crate) fn forward_one(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        self.forward(x)?
            .pop()
            .ok_or_else(|| EngineError::Model("projection with no output".into()))
    }
}

/// The token embedding kept in its file encoding; rows are dequantized when looked up (a
/// dequantized table of a 49k vocabulary would be the largest thing in memory).
pub(crate) struct Embedding {
    rows: EmbedRows,
    dtype: GgmlDType,
    row_bytes: usize,
    cols: usize,
    pub(crate) vocab: usize,
}

enum EmbedRows {
    /// On the CPU: the tensor itself, shared with a tied output head.
    Shared(Arc<QTensor>),
    /// On other devices: a host copy of its bytes (reading device memory per lookup would copy
    /// the whole table).
    Host(Vec<u8>),
}

impl Embedding {
    pub(crate) fn new(t: Arc<QTensor>, cpu: bool) -> Result<Self, EngineError> {
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
    pub(crate) fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor, EngineError> {
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
