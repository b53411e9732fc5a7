//! Weight matrices for inference in four storage formats, and the linear
//! layer y = x Wᵀ over them: f32 arithmetic, except that the q8 GEMV
//! (decoding) multiplies 8-bit weights by 8-bit activations as llama.cpp's
//! q8_0 does (see [`QuantizedRows`]).
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
use rayon::prelude::*;

use crate::error::{check_len, invalid, Result};
use crate::kernels::huge_pages::HugePageBuffer;
use crate::kernels::matmul::matmul_xwt;

/// Weights per scale in the Q8 format.
pub const Q8_BLOCK: usize = 32;

/// With more rows of x than this, expand W to f32 and use the GEMM.
/// Measured on mamba-130m's in_proj (3072 x 768) and out_proj (768 x 1536)
/// on 2 threads (docs/LINEAR.md): the GEMV, one pass over W per 8 rows of
/// x, is faster up to m = 24 for every format and up to 32 for the 16-bit
/// and q8 ones; at 64 the two are even.
pub const GEMM_ROWS: usize = 32;

/// Rows of x that one pass of the GEMV over W serves (accumulators in
/// registers); more rows take more passes.
const GEMV_MAX_M: usize = 8;

/// Below this many weights one thread does the whole GEMV or expansion:
/// waking the other threads costs more than their share of the work.
const PARALLEL_WEIGHTS: usize = 64 * 1024;

/// GEMV tasks per thread, and the least weights in one task.
const TASKS_PER_THREAD: usize = 4;
const MIN_TASK_WEIGHTS: usize = 32 * 1024;

/// Weights per f32 panel of the prefill path (4 MiB of f32).
const PANEL_WEIGHTS: usize = 1 << 20;

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

impl std::str::FromStr for WeightFormat {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        WeightFormat::parse(s)
    }
}

#[derive(Clone, Debug)]
enum Storage {
    F32(HugePageBuffer<f32>),
    /// bf16 bit patterns
    Bf16(HugePageBuffer<u16>),
    /// f16 bit patterns
    F16(HugePageBuffer<u16>),
    Q8 {
        /// (rows, cols)
        quants: HugePageBuffer<i8>,
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

/// `values` converted one by one into a weight buffer.
fn convert(values: &[f32], f: impl Fn(f32) -> u16) -> HugePageBuffer<u16> {
    let mut out = HugePageBuffer::zeroed(values.len());
    for (o, &v) in out.iter_mut().zip(values) {
        *o = f(v);
    }
    out
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
            WeightFormat::F32 => Storage::F32(HugePageBuffer::from_slice(values)),
            WeightFormat::Bf16 => Storage::Bf16(convert(values, f32_to_bf16_bits)),
            WeightFormat::F16 => Storage::F16(convert(values, |v| f16::from_f32(v).to_bits())),
            WeightFormat::Q8 => {
                let blocks = cols.div_ceil(Q8_BLOCK);
                let mut quants = HugePageBuffer::<i8>::zeroed(rows * cols);
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
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows || out.len() != self.cols {
            return Err(invalid(
                "Weights::row_to_f32",
                format!(
                    "row {r} into {} values, of a {}x{} matrix",
                    out.len(),
                    self.rows,
                    self.cols
                ),
            ));
        }
        self.row_to_f32_checked(r, out);
        Ok(())
    }

    /// [`Self::row_to_f32`] once r < rows and out.len() == cols are known.
    fn row_to_f32_checked(&self, r: usize, out: &mut [f32]) {
        debug_assert!(r < self.rows && out.len() == self.cols);
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            let (fmt, raw) = self.raw();
            // SAFETY: r < rows and out has cols elements (checked by callers);
            // the features were detected at run time.
            unsafe { avx512::decode_row(fmt, raw, r, out) };
            return;
        }
        self.decode_range(r, 0, out);
    }

    /// Weights c0..c0 + out.len() of row r in f32, in plain Rust (the
    /// portable path). For Q8, c0 is a multiple of Q8_BLOCK.
    fn decode_range(&self, r: usize, c0: usize, out: &mut [f32]) {
        let start = r * self.cols + c0;
        let end = start + out.len();
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
                debug_assert_eq!(c0 % Q8_BLOCK, 0);
                let blocks = self.cols.div_ceil(Q8_BLOCK);
                let first = r * blocks + c0 / Q8_BLOCK;
                for (blk, (chunk, q)) in out
                    .chunks_mut(Q8_BLOCK)
                    .zip(quants[start..end].chunks(Q8_BLOCK))
                    .enumerate()
                {
                    let s = f16::from_bits(scales[first + blk]).to_f32();
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
        self.rows_to_f32(0, &mut out);
        out
    }

    /// Rows r0.. (as many as `out` holds) in f32, on rayon's pool.
    fn rows_to_f32(&self, r0: usize, out: &mut [f32]) {
        if self.cols == 0 {
            return;
        }
        let k = self.cols;
        // ~64K weights per task: enough work to hide the dispatch.
        let chunk_rows = (PARALLEL_WEIGHTS / k).max(1);
        if out.len() <= chunk_rows * k || rayon::current_num_threads() == 1 {
            for (r, row) in out.chunks_mut(k).enumerate() {
                self.row_to_f32_checked(r0 + r, row);
            }
            return;
        }
        out.par_chunks_mut(chunk_rows * k)
            .enumerate()
            .for_each(|(t, panel)| {
                for (r, row) in panel.chunks_mut(k).enumerate() {
                    self.row_to_f32_checked(r0 + t * chunk_rows + r, row);
                }
            });
    }

    /// The storage as raw parts for the kernels, with its format code.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn raw(&self) -> (u8, Raw) {
        let (fmt, data, scales) = match &self.storage {
            Storage::F32(v) => (FMT_F32, v.as_ptr() as *const u8, std::ptr::null()),
            Storage::Bf16(v) => (FMT_BF16, v.as_ptr() as *const u8, std::ptr::null()),
            Storage::F16(v) => (FMT_F16, v.as_ptr() as *const u8, std::ptr::null()),
            Storage::Q8 { quants, scales } => {
                (FMT_Q8, quants.as_ptr() as *const u8, scales.as_ptr())
            }
        };
        let raw = Raw {
            data,
            scales,
            cols: self.cols,
            blocks: self.cols.div_ceil(Q8_BLOCK),
        };
        (fmt, raw)
    }

    /// y (m, rows) [+]= x (m, cols) · Wᵀ in f32 arithmetic.
    ///
    /// Up to [`GEMM_ROWS`] rows of x: a GEMV that streams W once per 8 rows
    /// of x in its stored format (decoding). More: W expanded to f32 in
    /// panels and the GEMM (prefill).
    pub fn matmul_xwt(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) -> Result<()> {
        self.matmul_xwt_with(x, m, y, accumulate, Kernel::Auto)
    }

    /// [`Weights::matmul_xwt`] with a chosen kernel, for tests and benchmarks.
    #[doc(hidden)]
    pub fn matmul_xwt_with(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        accumulate: bool,
        kernel: Kernel,
    ) -> Result<()> {
        const OP: &str = "Weights::matmul_xwt";
        let (n, k) = (self.rows, self.cols);
        check_len(OP, "x", x, &[("m", m), ("cols", k)])?;
        check_len(OP, "y", y, &[("m", m), ("rows", n)])?;
        let gemm = match kernel {
            Kernel::Auto => m > GEMM_ROWS,
            Kernel::Gemm => true,
            Kernel::Gemv | Kernel::GemvNoPrefetch | Kernel::Portable => false,
        };
        if gemm {
            return self.expand_gemm(x, m, y, accumulate);
        }
        let portable = kernel == Kernel::Portable;
        let prefetch = kernel != Kernel::GemvNoPrefetch;
        for i0 in (0..m).step_by(GEMV_MAX_M) {
            let mg = (m - i0).min(GEMV_MAX_M);
            let xg = &x[i0 * k..(i0 + mg) * k];
            if mg == 1 {
                // (1, n) is already the kernel's (n, 1) layout.
                self.gemv(
                    xg,
                    1,
                    &mut y[i0 * n..(i0 + 1) * n],
                    accumulate,
                    portable,
                    prefetch,
                );
            } else {
                let mut t = vec![0.0f32; n * mg];
                self.gemv(xg, mg, &mut t, false, portable, prefetch);
                for i in 0..mg {
                    let yi = &mut y[(i0 + i) * n..(i0 + i + 1) * n];
                    for (j, o) in yi.iter_mut().enumerate() {
                        let d = t[j * mg + i];
                        *o = if accumulate { *o + d } else { d };
                    }
                }
            }
        }
        Ok(())
    }

    /// out (n) [+]= W[j0 .. j0 + n] · x (cols) on the calling thread: one
    /// thread's share of a matrix-vector product whose rows the caller
    /// splits (the decoding step's thread team). Callers outside the crate
    /// use `Linear::forward_rows` (src/nn/block.rs), which checks the
    /// shapes first and returns an error instead of reaching this assert.
    pub(crate) fn matvec_rows(&self, x: &[f32], j0: usize, out: &mut [f32], accumulate: bool) {
        assert!(
            x.len() == self.cols && j0 + out.len() <= self.rows,
            "matvec_rows: x has {} values for {} columns; rows {j0}..{} of {}",
            x.len(),
            self.cols,
            j0 + out.len(),
            self.rows
        );
        if out.is_empty() {
            return;
        }
        let xq = self.quantize_for_q8(x, 1);
        self.gemv_rows(x, xq.as_ref(), 1, j0, out, accumulate, false, true);
    }

    /// Q8: the rows of x quantised for the integer GEMV; other formats: None.
    fn quantize_for_q8(&self, x: &[f32], m: usize) -> Option<QuantizedRows> {
        match self.storage {
            Storage::Q8 { .. } => Some(QuantizedRows::of_checked(x, m, self.cols)),
            _ => None,
        }
    }

    /// out (rows, m) [+]= rows j0.. of W times x (m, cols)ᵀ on the calling
    /// thread; `xq` is x quantised when W is Q8.
    #[allow(clippy::too_many_arguments)]
    fn gemv_rows(
        &self,
        x: &[f32],
        xq: Option<&QuantizedRows>,
        m: usize,
        j0: usize,
        out: &mut [f32],
        accumulate: bool,
        portable: bool,
        prefetch: bool,
    ) {
        let rows = out.len() / m;
        #[cfg(target_arch = "x86_64")]
        if !portable && avx512::available() {
            let (fmt, raw) = self.raw();
            // SAFETY: rows j0..j0 + rows exist (the callers split 0..self.rows),
            // x holds m rows of cols and xq their quantisation, out holds
            // (rows, m); the features were detected at run time.
            unsafe {
                match xq {
                    Some(xq) => avx512::gemv_q8(prefetch, raw, xq, m, j0, rows, out, accumulate),
                    None => avx512::gemv(fmt, prefetch, raw, x, m, j0, rows, out, accumulate),
                }
            }
            return;
        }
        let _ = (portable, prefetch);
        match xq {
            Some(xq) => self.gemv_q8_portable(xq, m, j0, rows, out, accumulate),
            None => self.gemv_portable(x, m, j0, rows, out, accumulate),
        }
    }

    /// out (rows, m) [+]= W · x (m ≤ GEMV_MAX_M rows of cols)ᵀ, each weight
    /// read once, rows split over rayon's pool.
    fn gemv(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        accumulate: bool,
        portable: bool,
        prefetch: bool,
    ) {
        let (n, k) = (self.rows, self.cols);
        let threads = rayon::current_num_threads();
        let chunk_rows = if threads <= 1 || n * k < PARALLEL_WEIGHTS {
            n
        } else {
            // A few tasks per thread so that a thread slowed by others on
            // the machine hands work over; each at least MIN_TASK_WEIGHTS.
            n.div_ceil(threads * TASKS_PER_THREAD)
                .max(MIN_TASK_WEIGHTS.div_ceil(k.max(1)))
                .next_multiple_of(4)
        }
        .max(1);
        // once per call, shared by the tasks
        let xq = self.quantize_for_q8(x, m);
        let run = |j0: usize, o: &mut [f32]| {
            self.gemv_rows(x, xq.as_ref(), m, j0, o, accumulate, portable, prefetch)
        };
        if chunk_rows >= n {
            run(0, out);
        } else {
            out.par_chunks_mut(chunk_rows * m)
                .enumerate()
                .for_each(|(t, o)| run(t * chunk_rows, o));
        }
    }

    /// The GEMV in plain Rust: each row decoded into a stack buffer once
    /// and dotted with every row of x, on 16 lanes that the compiler
    /// vectorises.
    fn gemv_portable(
        &self,
        x: &[f32],
        m: usize,
        j0: usize,
        rows: usize,
        out: &mut [f32],
        accumulate: bool,
    ) {
        const LANES: usize = 16;
        // a multiple of Q8_BLOCK and LANES; 2 KiB stays in L1
        const PIECE: usize = 512;
        let k = self.cols;
        let mut buf = [0.0f32; PIECE];
        for r in 0..rows {
            let mut acc = [[0.0f32; LANES]; GEMV_MAX_M];
            for c0 in (0..k).step_by(PIECE) {
                let len = PIECE.min(k - c0);
                let w = &mut buf[..len];
                self.decode_range(j0 + r, c0, w);
                for (i, a) in acc.iter_mut().enumerate().take(m) {
                    let xi = &x[i * k + c0..i * k + c0 + len];
                    let mut wc = w.chunks_exact(LANES);
                    let mut xc = xi.chunks_exact(LANES);
                    for (wv, xv) in (&mut wc).zip(&mut xc) {
                        for l in 0..LANES {
                            a[l] += wv[l] * xv[l];
                        }
                    }
                    for (l, (wv, xv)) in wc.remainder().iter().zip(xc.remainder()).enumerate() {
                        a[l] += wv * xv;
                    }
                }
            }
            for (i, a) in acc.iter().enumerate().take(m) {
                let d: f32 = a.iter().sum();
                let o = &mut out[r * m + i];
                *o = if accumulate { *o + d } else { d };
            }
        }
    }

    /// The q8 GEMV in plain Rust: per block, the exact integer dot of the
    /// weights' and x's 8-bit values, scaled by s_w · s_x.
    fn gemv_q8_portable(
        &self,
        xq: &QuantizedRows,
        m: usize,
        j0: usize,
        rows: usize,
        out: &mut [f32],
        accumulate: bool,
    ) {
        let Storage::Q8 { quants, scales } = &self.storage else {
            unreachable!("gemv_q8_portable on {:?} weights", self.format());
        };
        let k = self.cols;
        let blocks = k.div_ceil(Q8_BLOCK);
        for r in 0..rows {
            let j = j0 + r;
            for i in 0..m {
                let mut acc = 0.0f32;
                for b in 0..blocks {
                    let (c0, c1) = (b * Q8_BLOCK, ((b + 1) * Q8_BLOCK).min(k));
                    let dot: i32 = quants[j * k + c0..j * k + c1]
                        .iter()
                        .zip(&xq.q_row(i)[c0..c1])
                        .map(|(&w, &v)| w as i32 * v as i32)
                        .sum();
                    let s = f16::from_bits(scales[j * blocks + b]).to_f32() * xq.scale_row(i)[b];
                    acc += s * dot as f32;
                }
                let o = &mut out[r * m + i];
                *o = if accumulate { *o + acc } else { acc };
            }
        }
    }

    /// The prefill path: W expanded to f32 in panels of rows (in parallel)
    /// and each panel multiplied by the GEMM into its columns of y.
    fn expand_gemm(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) -> Result<()> {
        let (n, k) = (self.rows, self.cols);
        if let Storage::F32(w) = &self.storage {
            return matmul_xwt(x, w, m, k, n, y, accumulate);
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            if !accumulate {
                y.fill(0.0);
            }
            return Ok(());
        }
        let panel_rows = (PANEL_WEIGHTS / k).clamp(16, n.max(16)).min(n);
        let mut panel = vec![0.0f32; panel_rows * k];
        let threads = rayon::current_num_threads();
        for j0 in (0..n).step_by(panel_rows) {
            let p = panel_rows.min(n - j0);
            let wp = &mut panel[..p * k];
            self.rows_to_f32(j0, wp);
            let parallelism = if threads > 1 && m * p * k >= 48 * 48 * 48 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: y is (m, n) and columns j0..j0 + p of it are written
            // with row stride n; x is (m, k) and the panel (p, k) is read
            // as its transpose (k, p); y does not alias either.
            unsafe {
                gemm::gemm(
                    m,
                    p,
                    k,
                    y.as_mut_ptr().add(j0),
                    1,
                    n as isize,
                    accumulate,
                    x.as_ptr(),
                    1,
                    k as isize,
                    wp.as_ptr(),
                    k as isize,
                    1,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
        Ok(())
    }
}

/// Rows of x quantised for the q8 GEMV, as llama.cpp quantises the
/// activations for its q8_0 dot: per row, blocks of [`Q8_BLOCK`] values
/// x ≈ s_x · q with s_x = max|x| / 127 (f32) and q (i8) = x · 127 / max|x|
/// rounded to the nearest integer, ties to even. A weight block then costs
/// one exact integer dot Σ q_w q_x, scaled once by s_w · s_x, instead of
/// converting every weight to f32: converting took more time than reading
/// the weights (docs/LINEAR.md).
/// The error is at most s_x / 2 per value of x, i.e. 0.4 % of the block's
/// largest |x|. A block holding a NaN or an infinity gets a NaN scale, so
/// that it poisons the result as in f32 instead of vanishing.
pub struct QuantizedRows {
    /// (m, padded_cols): cols rounded up to 64 with zeros, so that the
    /// SIMD kernel reads 64 values at a time without masks
    q: Vec<i8>,
    /// (m, padded_blocks): blocks rounded up to 16 with zeros
    scales: Vec<f32>,
    padded_cols: usize,
    padded_blocks: usize,
}

impl QuantizedRows {
    /// x (m, cols) quantised row by row.
    pub fn new(x: &[f32], m: usize, cols: usize) -> Result<Self> {
        check_len("QuantizedRows::new", "x", x, &[("m", m), ("cols", cols)])?;
        Ok(Self::of_checked(x, m, cols))
    }

    /// [`Self::new`] once x.len() == m * cols is known.
    fn of_checked(x: &[f32], m: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), m * cols);
        let padded_cols = cols.next_multiple_of(64);
        let padded_blocks = cols.div_ceil(Q8_BLOCK).next_multiple_of(16);
        let mut q = vec![0i8; m * padded_cols];
        let mut scales = vec![0.0f32; m * padded_blocks];
        #[cfg(target_arch = "x86_64")]
        let simd = avx512::available();
        for i in 0..m {
            let row = &x[i * cols..(i + 1) * cols];
            let qr = &mut q[i * padded_cols..i * padded_cols + cols];
            let sr = &mut scales[i * padded_blocks..(i + 1) * padded_blocks];
            for ((xb, qb), s) in row
                .chunks(Q8_BLOCK)
                .zip(qr.chunks_mut(Q8_BLOCK))
                .zip(sr.iter_mut())
            {
                // max |x| on the bit patterns without the sign: an integer
                // max, which vectorises; a NaN or an infinity has the largest
                // patterns, at or above the infinity's
                let amax_bits = xb
                    .iter()
                    .fold(0u32, |a, v| a.max(v.to_bits() & 0x7fff_ffff));
                let finite = amax_bits < f32::INFINITY.to_bits();
                let amax = f32::from_bits(amax_bits);
                *s = if finite { amax / 127.0 } else { f32::NAN };
                let inv = if finite && amax > 0.0 {
                    127.0 / amax
                } else {
                    0.0
                };
                #[cfg(target_arch = "x86_64")]
                if simd && finite && xb.len() == Q8_BLOCK {
                    // SAFETY: the features were detected; both blocks hold 32.
                    unsafe { avx512::quantize_block(xb, inv, qb) };
                    continue;
                }
                // a non-finite block stays 0 (its scale is NaN)
                for (o, &v) in qb.iter_mut().zip(xb) {
                    *o = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
                }
            }
        }
        Self {
            q,
            scales,
            padded_cols,
            padded_blocks,
        }
    }

    /// Row i < m's 8-bit values, for the kernels (which know i < m).
    fn q_row(&self, i: usize) -> &[i8] {
        &self.q[i * self.padded_cols..(i + 1) * self.padded_cols]
    }

    /// Row i < m's block scales, for the kernels.
    fn scale_row(&self, i: usize) -> &[f32] {
        &self.scales[i * self.padded_blocks..(i + 1) * self.padded_blocks]
    }

    /// Row i's 8-bit values (padded_cols, zeros past cols); None past the
    /// last row.
    pub fn row(&self, i: usize) -> Option<&[i8]> {
        self.q.get(i * self.padded_cols..(i + 1) * self.padded_cols)
    }

    /// Row i's block scales (padded_blocks, zeros past the last block);
    /// None past the last row.
    pub fn scales(&self, i: usize) -> Option<&[f32]> {
        self.scales
            .get(i * self.padded_blocks..(i + 1) * self.padded_blocks)
    }
}

/// Which path [`Weights::matmul_xwt_with`] takes (tests and benchmarks).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// GEMV up to GEMM_ROWS rows of x, expand + GEMM above
    Auto,
    /// the GEMV (AVX-512 where available) for any m
    Gemv,
    /// the same without software prefetch, to measure it
    GemvNoPrefetch,
    /// the plain-Rust GEMV for any m
    Portable,
    /// expand + GEMM for any m
    Gemm,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const FMT_F32: u8 = 0;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const FMT_BF16: u8 = 1;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const FMT_F16: u8 = 2;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const FMT_Q8: u8 = 3;

/// A read-only view of a matrix's storage for the SIMD kernels.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Raw {
    /// row 0's first weight: f32, u16 or i8 by format
    data: *const u8,
    /// Q8: (rows, blocks) f16 scale bits; null otherwise
    scales: *const u16,
    cols: usize,
    blocks: usize,
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The GEMV and row decoding with AVX-512: 32 weights (two vectors) per
    //! step, converted to f32 in registers; R rows of W at once against M
    //! rows of x, R·M accumulators.

    use super::{QuantizedRows, Raw, FMT_BF16, FMT_F16, FMT_F32, FMT_Q8, Q8_BLOCK};
    use std::arch::x86_64::*;

    /// Software prefetch distance in blocks of R rows: each of a block's R
    /// row streams prefetches its row this many blocks on (its next row),
    /// at the column being read. 1, 2 and 4 measured the same on
    /// mamba-130m's token with the earlier neighbouring-row blocks
    /// (docs/LINEAR.md); 1 keeps the prefetched lines closest to their use.
    /// The last block's streams prefetch the next stream's first row, which
    /// was already read: one row per stream, left as it is.
    const PF_BLOCKS: usize = 1;

    /// The blocks of R rows that n rows of W are read in: block g takes
    /// rows g, g + G, g + 2G, ... (G = n / R blocks, the stride), so that
    /// the R rows read side by side are R streams, each running on into
    /// the next block's row: the hardware prefetcher follows R long
    /// streams instead of R rows of 12-48 cache lines that restart every
    /// block (docs/LINEAR.md, round 4). Rows G·R.. are read one at a time.
    #[inline(always)]
    fn row_blocks<const R: usize>(n: usize) -> usize {
        n / R
    }

    /// `$f::<pre.. M, R, post..>(args)` for m = M rows of x, with the rows
    /// of W per block R that the register file allows: M = 1, 2: R = 4;
    /// M = 3, 4: R = 2; M = 5..8: R = 1. One table for every GEMV kernel.
    macro_rules! by_rows_of_x {
        ($m:expr, $f:ident, [$($pre:tt)*], [$($post:tt)*], ($($arg:expr),*)) => {
            match $m {
                1 => $f::<$($pre)* 1, 4, $($post)*>($($arg),*),
                2 => $f::<$($pre)* 2, 4, $($post)*>($($arg),*),
                3 => $f::<$($pre)* 3, 2, $($post)*>($($arg),*),
                4 => $f::<$($pre)* 4, 2, $($post)*>($($arg),*),
                5 => $f::<$($pre)* 5, 1, $($post)*>($($arg),*),
                6 => $f::<$($pre)* 6, 1, $($post)*>($($arg),*),
                7 => $f::<$($pre)* 7, 1, $($post)*>($($arg),*),
                8 => $f::<$($pre)* 8, 1, $($post)*>($($arg),*),
                _ => unreachable!("the GEMV takes 1..=8 rows of x"),
            }
        };
    }

    /// q = round_ties_even(x · inv) for a whole block of 32 finite x, as
    /// the scalar loop in [`QuantizedRows::new`] (the conversion rounds to
    /// nearest even, the MXCSR default; |x · inv| <= 127 by construction,
    /// so the saturation never acts). The scalar loop's float-to-i8 casts
    /// were 4 % of a q8 decoding profile.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub(super) unsafe fn quantize_block(x: &[f32], inv: f32, q: &mut [i8]) {
        debug_assert!(x.len() == 32 && q.len() == 32);
        let s = _mm512_set1_ps(inv);
        for h in 0..2 {
            let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(16 * h)), s);
            let i = _mm512_cvtps_epi32(v);
            let p = q.as_mut_ptr().add(16 * h) as *mut __m128i;
            _mm_storeu_si128(p, _mm512_cvtsepi32_epi8(i));
        }
    }

    /// `vpdpbusd` for the q8 GEMV (AVX-512 VNNI).
    fn vnni_available() -> bool {
        is_x86_feature_detected!("avx512vnni")
    }

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("f16c")
    }

    /// Weights c..c + 32 of row j as two vectors of f32. TAIL: masked
    /// loads (lo, hi select the valid ones, the rest read as 0). Q8: `s` is
    /// the block's scale in every lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load32<const FMT: u8, const TAIL: bool, const SCALED: bool>(
        raw: Raw,
        j: usize,
        c: usize,
        lo: __mmask16,
        hi: __mmask16,
        s: __m512,
    ) -> (__m512, __m512) {
        let idx = j * raw.cols + c;
        match FMT {
            FMT_F32 => {
                let p = (raw.data as *const f32).add(idx);
                if TAIL {
                    (
                        _mm512_maskz_loadu_ps(lo, p),
                        _mm512_maskz_loadu_ps(hi, p.add(16)),
                    )
                } else {
                    (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
                }
            }
            FMT_BF16 | FMT_F16 => {
                let p = (raw.data as *const i16).add(idx);
                let (a, b) = if TAIL {
                    (
                        _mm256_maskz_loadu_epi16(lo, p),
                        _mm256_maskz_loadu_epi16(hi, p.add(16)),
                    )
                } else {
                    (
                        _mm256_loadu_si256(p as *const __m256i),
                        _mm256_loadu_si256(p.add(16) as *const __m256i),
                    )
                };
                if FMT == FMT_F16 {
                    (_mm512_cvtph_ps(a), _mm512_cvtph_ps(b))
                } else {
                    // bf16 is the high half of the f32
                    let f =
                        |v| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)));
                    (f(a), f(b))
                }
            }
            _ => {
                let p = (raw.data as *const i8).add(idx);
                let (a, b) = if TAIL {
                    (
                        _mm_maskz_loadu_epi8(lo, p),
                        _mm_maskz_loadu_epi8(hi, p.add(16)),
                    )
                } else {
                    (
                        _mm_loadu_si128(p as *const __m128i),
                        _mm_loadu_si128(p.add(16) as *const __m128i),
                    )
                };
                let f = |v| {
                    let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
                    if SCALED {
                        _mm512_mul_ps(q, s)
                    } else {
                        q
                    }
                };
                (f(a), f(b))
            }
        }
    }

    /// Q8: the scales of blocks b0..b0 + 16 of row j in f32 (0 past the
    /// row's end), converted 16 at a time.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn scales16(raw: Raw, j: usize, b0: usize) -> __m512 {
        let nb = (raw.blocks - b0).min(16);
        let h = _mm256_maskz_loadu_epi16(
            ((1u32 << nb) - 1) as u16,
            raw.scales.add(j * raw.blocks + b0) as *const i16,
        );
        _mm512_cvtph_ps(h)
    }

    /// acc[i] += (w0, w1) · x[i] for each row i of x.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn dot32<const M: usize>(
        acc: &mut [__m512; M],
        w0: __m512,
        w1: __m512,
        xv: &[[__m512; 2]; M],
    ) {
        for (ai, xi) in acc.iter_mut().zip(xv) {
            *ai = _mm512_fmadd_ps(w0, xi[0], *ai);
            *ai = _mm512_fmadd_ps(w1, xi[1], *ai);
        }
    }

    fn tail_masks(rem: usize) -> (__mmask16, __mmask16) {
        let mask = ((1u64 << rem) - 1) as u32;
        (mask as u16, (mask >> 16) as u16)
    }

    /// out[r·stride·M + i] [+]= row j + r·stride of W · row i of x, for
    /// r < R, i < M (f32, bf16, f16; q8 has [`block_q8`]); the rows are
    /// strided as [`row_blocks`] says.
    ///
    /// PF: prefetch the next block's rows at the column being read in
    /// these: on rows of a few cache lines the hardware prefetcher alone
    /// falls behind (measured in docs/LINEAR.md).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn block<const FMT: u8, const M: usize, const R: usize, const PF: bool>(
        raw: Raw,
        x: *const f32,
        j: usize,
        stride: usize,
        out: *mut f32,
        accumulate: bool,
    ) {
        let k = raw.cols;
        let esize = if FMT == FMT_F32 { 4 } else { 2 };
        let mut acc = [[_mm512_setzero_ps(); M]; R];
        let s0 = _mm512_setzero_ps();
        let mut c = 0;
        while c + 32 <= k {
            if PF {
                let ahead = j + PF_BLOCKS;
                // one prefetch per 64-byte line of the 32 · esize bytes;
                // past the last row the address leaves the matrix (a
                // prefetch never faults, and wrapping_add makes no claim)
                for r in 0..R {
                    let p = raw
                        .data
                        .wrapping_add(((ahead + r * stride) * k + c) * esize);
                    for line in 0..(32 * esize).div_ceil(64) {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line * 64) as *const i8);
                    }
                }
            }
            let mut xv = [[_mm512_setzero_ps(); 2]; M];
            for (i, v) in xv.iter_mut().enumerate() {
                let p = x.add(i * k + c);
                *v = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let (w0, w1) = load32::<FMT, false, false>(raw, j + r * stride, c, !0, !0, s0);
                dot32::<M>(a, w0, w1, &xv);
            }
            c += 32;
        }
        if c < k {
            let (lo, hi) = tail_masks(k - c);
            let mut xv = [[_mm512_setzero_ps(); 2]; M];
            for (i, v) in xv.iter_mut().enumerate() {
                let p = x.add(i * k + c);
                *v = [
                    _mm512_maskz_loadu_ps(lo, p),
                    _mm512_maskz_loadu_ps(hi, p.add(16)),
                ];
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let (w0, w1) = load32::<FMT, true, false>(raw, j + r * stride, c, lo, hi, s0);
                dot32::<M>(a, w0, w1, &xv);
            }
        }
        store(&acc, stride, out, accumulate);
    }

    /// out[r·stride·M + i] [+]= the horizontal sum of acc[r][i].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn store<const M: usize, const R: usize>(
        acc: &[[__m512; M]; R],
        stride: usize,
        out: *mut f32,
        accumulate: bool,
    ) {
        for (r, a) in acc.iter().enumerate() {
            for (i, ai) in a.iter().enumerate() {
                let d = _mm512_reduce_add_ps(*ai);
                let o = out.add((r * stride) * M + i);
                *o = if accumulate { *o + d } else { d };
            }
        }
    }

    /// The q8 GEMV's block of R rows against M quantised rows of x: 64
    /// columns (two q8 blocks) per step. Σ q_w q_x is exact in 32-bit
    /// lanes, each over 4 columns (`vpdpbusd` with AVX-512 VNNI; without it
    /// `vpmaddubsw` + `vpmaddwd`, which cannot saturate here since
    /// |q| <= 127). Both take an unsigned and a signed operand, so x's sign
    /// moves onto the weight: |q_x| · (sign(q_x) q_w). Lanes 0-7 belong to
    /// the first block and 8-15 to the second, so the lanes' sums are
    /// scaled by s_w · s_x of their block (a permute of the 16 blocks'
    /// products, formed once per 512 columns) into f32 accumulators.
    ///
    /// Rows and PF as in [`block`]: the next block's rows at this column
    /// (one line each), and their scales when the rows start.
    #[inline(always)]
    unsafe fn block_q8<const M: usize, const R: usize, const PF: bool, const VNNI: bool>(
        raw: Raw,
        xq: &QuantizedRows,
        j: usize,
        stride: usize,
        out: *mut f32,
        accumulate: bool,
    ) {
        let k = raw.cols;
        let w = raw.data as *const i8;
        let ahead = j + PF_BLOCKS;
        let mut acc = [[_mm512_setzero_ps(); M]; R];
        // s_w · s_x of the 16 blocks (512 columns) under way
        let mut sws = [[_mm512_setzero_ps(); M]; R];
        // lanes 0-7 take the pair's first block, 8-15 its second
        let pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let zero = _mm512_setzero_si512();
        let ones = _mm512_set1_epi16(1);
        if PF {
            for r in 0..R {
                let p = raw.scales.wrapping_add((ahead + r * stride) * raw.blocks) as *const u8;
                let mut off = 0;
                while off < raw.blocks * 2 + 64 {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8);
                    off += 64;
                }
            }
        }
        let xrow: [*const i8; M] = std::array::from_fn(|i| xq.q_row(i).as_ptr());
        let xscale: [*const f32; M] = std::array::from_fn(|i| xq.scale_row(i).as_ptr());
        let mut c = 0;
        while c < k {
            let b = c / Q8_BLOCK;
            if b % 16 == 0 {
                for (r, sr) in sws.iter_mut().enumerate() {
                    let sw = scales16(raw, j + r * stride, b);
                    for (i, si) in sr.iter_mut().enumerate() {
                        *si = _mm512_mul_ps(sw, _mm512_loadu_ps(xscale[i].add(b)));
                    }
                }
            }
            if PF {
                for r in 0..R {
                    let p = w.wrapping_add((ahead + r * stride) * k + c);
                    _mm_prefetch::<_MM_HINT_T0>(p);
                }
            }
            let lanes = _mm512_add_epi32(pair, _mm512_set1_epi32((b % 16) as i32));
            let mut xa = [zero; M];
            let mut xneg = [0u64; M];
            for i in 0..M {
                let xv = _mm512_loadu_si512(xrow[i].add(c) as *const _);
                xa[i] = _mm512_abs_epi8(xv);
                xneg[i] = _mm512_movepi8_mask(xv);
            }
            let tail = k - c < 64;
            let wmask = if tail { (1u64 << (k - c)) - 1 } else { !0 };
            for r in 0..R {
                let p = w.add((j + r * stride) * k + c);
                let wv = if tail {
                    _mm512_maskz_loadu_epi8(wmask, p)
                } else {
                    _mm512_loadu_si512(p as *const _)
                };
                for i in 0..M {
                    let ws = _mm512_mask_sub_epi8(wv, xneg[i], zero, wv);
                    let d = if VNNI {
                        _mm512_dpbusd_epi32(zero, xa[i], ws)
                    } else {
                        _mm512_madd_epi16(_mm512_maddubs_epi16(xa[i], ws), ones)
                    };
                    let s = _mm512_permutexvar_ps(lanes, sws[r][i]);
                    acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r][i]);
                }
            }
            c += 64;
        }
        store(&acc, stride, out, accumulate);
    }

    #[inline(always)]
    unsafe fn rows_q8<const M: usize, const R: usize, const PF: bool, const VNNI: bool>(
        raw: Raw,
        xq: &QuantizedRows,
        j0: usize,
        n: usize,
        out: *mut f32,
        accumulate: bool,
    ) {
        let blocks = row_blocks::<R>(n);
        for g in 0..blocks {
            block_q8::<M, R, PF, VNNI>(raw, xq, j0 + g, blocks, out.add(g * M), accumulate);
        }
        for r in blocks * R..n {
            block_q8::<M, 1, false, VNNI>(raw, xq, j0 + r, 1, out.add(r * M), accumulate);
        }
    }

    #[inline(always)]
    unsafe fn gemv_q8_m<const PF: bool, const VNNI: bool>(
        raw: Raw,
        xq: &QuantizedRows,
        m: usize,
        j0: usize,
        n: usize,
        out: *mut f32,
        accumulate: bool,
    ) {
        // R·M accumulators and as many scale vectors, M of x
        by_rows_of_x!(
            m,
            rows_q8,
            [],
            [PF, VNNI],
            (raw, xq, j0, n, out, accumulate)
        )
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,avx512vnni")]
    unsafe fn gemv_q8_vnni<const PF: bool>(
        raw: Raw,
        xq: &QuantizedRows,
        m: usize,
        j0: usize,
        n: usize,
        out: *mut f32,
        accumulate: bool,
    ) {
        gemv_q8_m::<PF, true>(raw, xq, m, j0, n, out, accumulate)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn gemv_q8_bw<const PF: bool>(
        raw: Raw,
        xq: &QuantizedRows,
        m: usize,
        j0: usize,
        n: usize,
        out: *mut f32,
        accumulate: bool,
    ) {
        gemv_q8_m::<PF, false>(raw, xq, m, j0, n, out, accumulate)
    }

    /// out (n, m) [+]= rows j0..j0 + n of the q8 matrix W times the
    /// quantised x (m rows)ᵀ.
    ///
    /// # Safety
    /// The CPU has the features of [`available`]; W is Q8; rows j0..j0 + n
    /// exist; xq holds m rows of W's cols and out n · m values; 1 <= m <= 8.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemv_q8(
        prefetch: bool,
        raw: Raw,
        xq: &QuantizedRows,
        m: usize,
        j0: usize,
        n: usize,
        out: &mut [f32],
        accumulate: bool,
    ) {
        debug_assert!(out.len() == n * m && xq.q_row(m - 1).len() >= raw.cols);
        let out = out.as_mut_ptr();
        match (vnni_available(), prefetch) {
            (true, true) => gemv_q8_vnni::<true>(raw, xq, m, j0, n, out, accumulate),
            (true, false) => gemv_q8_vnni::<false>(raw, xq, m, j0, n, out, accumulate),
            (false, true) => gemv_q8_bw::<true>(raw, xq, m, j0, n, out, accumulate),
            (false, false) => gemv_q8_bw::<false>(raw, xq, m, j0, n, out, accumulate),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn rows<const FMT: u8, const M: usize, const R: usize, const PF: bool>(
        raw: Raw,
        x: *const f32,
        j0: usize,
        n: usize,
        out: *mut f32,
        accumulate: bool,
    ) {
        let blocks = row_blocks::<R>(n);
        for g in 0..blocks {
            block::<FMT, M, R, PF>(raw, x, j0 + g, blocks, out.add(g * M), accumulate);
        }
        for r in blocks * R..n {
            block::<FMT, M, 1, false>(raw, x, j0 + r, 1, out.add(r * M), accumulate);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn gemv_fmt<const FMT: u8, const PF: bool>(
        raw: Raw,
        x: *const f32,
        m: usize,
        j0: usize,
        n: usize,
        out: *mut f32,
        accumulate: bool,
    ) {
        // R·M accumulators + 2·M vectors of x + 2 of W stay within the 32
        // registers; R > 1 shares each load of x between rows of W.
        by_rows_of_x!(m, rows, [FMT,], [PF], (raw, x, j0, n, out, accumulate))
    }

    /// out (n, m) [+]= rows j0..j0 + n of W times x (m, cols)ᵀ.
    ///
    /// # Safety
    /// The CPU has the features of [`available`]; rows j0..j0 + n exist;
    /// x has m · cols elements and out n · m; 1 <= m <= 8.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemv(
        fmt: u8,
        prefetch: bool,
        raw: Raw,
        x: &[f32],
        m: usize,
        j0: usize,
        n: usize,
        out: &mut [f32],
        accumulate: bool,
    ) {
        debug_assert!(x.len() == m * raw.cols && out.len() == n * m);
        let (x, out) = (x.as_ptr(), out.as_mut_ptr());
        match (fmt, prefetch) {
            (FMT_F32, true) => gemv_fmt::<FMT_F32, true>(raw, x, m, j0, n, out, accumulate),
            (FMT_BF16, true) => gemv_fmt::<FMT_BF16, true>(raw, x, m, j0, n, out, accumulate),
            (FMT_F16, true) => gemv_fmt::<FMT_F16, true>(raw, x, m, j0, n, out, accumulate),
            (FMT_Q8, _) => unreachable!("q8 multiplies quantised x: gemv_q8"),
            (FMT_F32, false) => gemv_fmt::<FMT_F32, false>(raw, x, m, j0, n, out, accumulate),
            (FMT_BF16, false) => gemv_fmt::<FMT_BF16, false>(raw, x, m, j0, n, out, accumulate),
            (FMT_F16, false) => gemv_fmt::<FMT_F16, false>(raw, x, m, j0, n, out, accumulate),
            _ => unreachable!("unknown weight format code {fmt}"),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn decode_fmt<const FMT: u8>(raw: Raw, j: usize, out: &mut [f32]) {
        let k = raw.cols;
        let o = out.as_mut_ptr();
        let mut sbuf = [0.0f32; 16];
        let scale = |sbuf: &mut [f32; 16], c: usize| {
            if FMT == FMT_Q8 {
                if c % (16 * Q8_BLOCK) == 0 {
                    _mm512_storeu_ps(sbuf.as_mut_ptr(), scales16(raw, j, c / Q8_BLOCK));
                }
                _mm512_set1_ps(sbuf[(c / Q8_BLOCK) % 16])
            } else {
                _mm512_setzero_ps()
            }
        };
        let mut c = 0;
        while c + 32 <= k {
            let s = scale(&mut sbuf, c);
            let (a, b) = load32::<FMT, false, true>(raw, j, c, !0, !0, s);
            _mm512_storeu_ps(o.add(c), a);
            _mm512_storeu_ps(o.add(c + 16), b);
            c += 32;
        }
        if c < k {
            let (lo, hi) = tail_masks(k - c);
            let s = scale(&mut sbuf, c);
            let (a, b) = load32::<FMT, true, true>(raw, j, c, lo, hi, s);
            _mm512_mask_storeu_ps(o.add(c), lo, a);
            _mm512_mask_storeu_ps(o.add(c + 16), hi, b);
        }
    }

    /// Row j in f32 into out (cols).
    ///
    /// # Safety
    /// The CPU has the features of [`available`]; row j exists.
    pub(super) unsafe fn decode_row(fmt: u8, raw: Raw, j: usize, out: &mut [f32]) {
        debug_assert_eq!(out.len(), raw.cols);
        match fmt {
            FMT_F32 => decode_fmt::<FMT_F32>(raw, j, out),
            FMT_BF16 => decode_fmt::<FMT_BF16>(raw, j, out),
            FMT_F16 => decode_fmt::<FMT_F16>(raw, j, out),
            _ => decode_fmt::<FMT_Q8>(raw, j, out),
        }
    }
}

/// y (m, n) = x (m, k) · Wᵀ written as plain loops over the f32 values of
/// W, for the tests.
pub fn linear_reference(w: &Weights, x: &[f32], m: usize) -> Result<Vec<f32>> {
    check_len("linear_reference", "x", x, &[("m", m), ("cols", w.cols)])?;
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
    Ok(y)
}
