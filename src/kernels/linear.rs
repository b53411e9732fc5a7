//! Weight matrices for inference in four storage formats, and the linear
//! layer y = x Wᵀ over them with f32 arithmetic.
//!
//! ```text
//! W: (rows = out_features, cols = in_features), row-major, as nn.Linear
//! F32   4 bytes per weight
//! Bf16  2 bytes: the high half of the f32 (truncating nothing on load from bf16 files)
//! F16   2 bytes: IEEE half
//! Q8    per row, blocks of Q8_BLOCK weights: one f16 scale s and Q8_BLOCK
//!       i8 values q, w = s · q (llama.cpp's q8_0: 34 bytes per 32 weights);
//!       a row's last block may be shorter when cols % Q8_BLOCK != 0
//! ```
//!
//! Decoding multiplies one (or a few) rows of activations by every weight
//! once per token, so it is bound by reading the weights: [`Weights::matmul_xwt`]
//! streams each weight once for all rows of x, in its stored format. Prefill
//! has many rows; there the weights are expanded to f32 and go to the GEMM.

use half::f16;

use crate::error::{check_len, invalid, Result};
use crate::kernels::matmul::matmul_xwt;

/// Weights per scale in the Q8 format.
pub const Q8_BLOCK: usize = 32;

/// With more rows of x than this, expand W to f32 and use the GEMM.
const GEMM_ROWS: usize = 8;

/// How a weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    Bf16,
    F16,
    Q8,
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::F16 => "f16",
            WeightFormat::Q8 => "q8",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(WeightFormat::F32),
            "bf16" | "bfloat16" => Ok(WeightFormat::Bf16),
            "f16" | "float16" => Ok(WeightFormat::F16),
            "q8" | "q8_0" => Ok(WeightFormat::Q8),
            _ => Err(invalid(
                "WeightFormat::parse",
                format!("unknown weight format {s:?} (expected f32, bf16, f16 or q8)"),
            )),
        }
    }
}

#[derive(Clone, Debug)]
enum Storage {
    F32(Vec<f32>),
    /// bf16 bit patterns
    Bf16(Vec<u16>),
    /// f16 bit patterns
    F16(Vec<u16>),
    Q8 {
        /// (rows, cols)
        quants: Vec<i8>,
        /// (rows, blocks_per_row) f16 bit patterns
        scales: Vec<u16>,
    },
}

/// A (rows, cols) weight matrix in one of the [`WeightFormat`]s.
#[derive(Clone, Debug)]
pub struct Weights {
    rows: usize,
    cols: usize,
    storage: Storage,
}

/// bf16 bits → f32: the bf16 is the high half of the f32.
#[inline(always)]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 → bf16 bits, rounding to nearest even (NaN kept a NaN).
#[inline]
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

impl Weights {
    /// Stores `values` (rows, cols) in `format`, rounding or quantising.
    pub fn from_f32(
        format: WeightFormat,
        rows: usize,
        cols: usize,
        values: &[f32],
    ) -> Result<Self> {
        check_len(
            "Weights::from_f32",
            "values",
            values,
            &[("rows", rows), ("cols", cols)],
        )?;
        let storage = match format {
            WeightFormat::F32 => Storage::F32(values.to_vec()),
            WeightFormat::Bf16 => {
                Storage::Bf16(values.iter().map(|&v| f32_to_bf16_bits(v)).collect())
            }
            WeightFormat::F16 => {
                Storage::F16(values.iter().map(|&v| f16::from_f32(v).to_bits()).collect())
            }
            WeightFormat::Q8 => {
                let blocks = cols.div_ceil(Q8_BLOCK);
                let mut quants = vec![0i8; rows * cols];
                let mut scales = vec![0u16; rows * blocks];
                for r in 0..rows {
                    for blk in 0..blocks {
                        let start = r * cols + blk * Q8_BLOCK;
                        let end = (r * cols + cols).min(start + Q8_BLOCK);
                        let amax = values[start..end]
                            .iter()
                            .fold(0.0f32, |m, v| m.max(v.abs()));
                        // The scale is stored in f16: quantise with the rounded one so
                        // that s · q is as close to w as the stored s allows.
                        let scale = f16::from_f32(amax / 127.0);
                        scales[r * blocks + blk] = scale.to_bits();
                        let s = scale.to_f32();
                        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                        for i in start..end {
                            quants[i] = (values[i] * inv).round().clamp(-127.0, 127.0) as i8;
                        }
                    }
                }
                Storage::Q8 { quants, scales }
            }
        };
        Ok(Self {
            rows,
            cols,
            storage,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> WeightFormat {
        match self.storage {
            Storage::F32(_) => WeightFormat::F32,
            Storage::Bf16(_) => WeightFormat::Bf16,
            Storage::F16(_) => WeightFormat::F16,
            Storage::Q8 { .. } => WeightFormat::Q8,
        }
    }

    /// Bytes of storage: what one pass over the matrix reads.
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(v) => v.len() * 4,
            Storage::Bf16(v) | Storage::F16(v) => v.len() * 2,
            Storage::Q8 { quants, scales } => quants.len() + scales.len() * 2,
        }
    }

    /// Row `r` expanded to f32 into `out` (cols): an embedding lookup.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() == self.cols,
            "row {r} of a {}x{} matrix",
            self.rows,
            self.cols
        );
        let (start, end) = (r * self.cols, (r + 1) * self.cols);
        match &self.storage {
            Storage::F32(v) => out.copy_from_slice(&v[start..end]),
            Storage::Bf16(v) => {
                for (o, &b) in out.iter_mut().zip(&v[start..end]) {
                    *o = bf16_bits_to_f32(b);
                }
            }
            Storage::F16(v) => {
                for (o, &b) in out.iter_mut().zip(&v[start..end]) {
                    *o = f16::from_bits(b).to_f32();
                }
            }
            Storage::Q8 { quants, scales } => {
                let blocks = self.cols.div_ceil(Q8_BLOCK);
                for (blk, chunk) in out.chunks_mut(Q8_BLOCK).enumerate() {
                    let s = f16::from_bits(scales[r * blocks + blk]).to_f32();
                    let q = &quants[start + blk * Q8_BLOCK..];
                    for (o, &qv) in chunk.iter_mut().zip(q) {
                        *o = s * qv as f32;
                    }
                }
            }
        }
    }

    /// The whole matrix in f32 (rows, cols).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.to_f32_into(&mut out);
        out
    }

    fn to_f32_into(&self, out: &mut [f32]) {
        if self.cols == 0 {
            return;
        }
        for (r, row) in out.chunks_mut(self.cols).enumerate() {
            self.row_to_f32(r, row);
        }
    }

    /// y (m, rows) [+]= x (m, cols) · Wᵀ in f32 arithmetic.
    pub fn matmul_xwt(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) -> Result<()> {
        const OP: &str = "Weights::matmul_xwt";
        let (n, k) = (self.rows, self.cols);
        check_len(OP, "x", x, &[("m", m), ("cols", k)])?;
        check_len(OP, "y", y, &[("m", m), ("rows", n)])?;
        if let Storage::F32(w) = &self.storage {
            return matmul_xwt(x, w, m, k, n, y, accumulate);
        }
        if m > GEMM_ROWS {
            let w = self.to_f32();
            return matmul_xwt(x, &w, m, k, n, y, accumulate);
        }
        let mut row = vec![0.0f32; k];
        for j in 0..n {
            self.row_to_f32(j, &mut row);
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k];
                let dot: f32 = xi.iter().zip(&row).map(|(a, b)| a * b).sum();
                let out = &mut y[i * n + j];
                *out = if accumulate { *out + dot } else { dot };
            }
        }
        Ok(())
    }
}

/// y (m, n) = x (m, k) · Wᵀ written as plain loops over the f32 values of
/// W, for the tests.
pub fn linear_reference(w: &Weights, x: &[f32], m: usize) -> Vec<f32> {
    let wf = w.to_f32();
    let (n, k) = (w.rows, w.cols);
    let mut y = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for l in 0..k {
                acc += x[i * k + l] as f64 * wf[j * k + l] as f64;
            }
            y[i * n + j] = acc as f32;
        }
    }
    y
}
