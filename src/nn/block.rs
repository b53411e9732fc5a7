//! The Mamba block (docs/DESIGN.md §6), written once for every model and
//! every way of running it: the language model's training forward and
//! backward, the inference model's prefill and decoding step (with weights
//! in f32, bf16, f16 or q8), and the task models (S6 or S4D mixer, gated
//! or not).
//!
//! ```text
//! r  = h                                                  (BL, D)  the residual stream
//! u  = norm(r)                                            (BL, D)  RMSNorm, or LayerNorm with a bias
//! gated (the Mamba block):
//!      x, z = u W_inᵀ (+ b_in)   split [E, E]             (BL, E) each
//!      v    = silu(conv1d(x) + b_conv)                    (BL, E)
//! nogate (the S4 block shape, docs/DESIGN.md §6.4):
//!      v    = u W_inᵀ (+ b_in)                            (BL, E)
//! mixer:
//!   S6:  dt_low, B, C = v W_xᵀ  split [R, N, N]
//!        (Falcon-Mamba: each of the three RMS-normalised, no weight)
//!        delta = dt_low W_dtᵀ                              (BL, E)  bias and softplus inside the scan
//!        s = selective_scan(v, delta, A, B, C, D, b_dt)   (BL, E)
//!   S4D: s = K̄ * v + D v                                  (BL, E)  K̄ fixed per channel (§3)
//! y  = s ⊙ silu(z)   (gated; for S6 applied inside the scan, §6.3)
//!    | silu(s)       (nogate)
//! h  = r + y W_outᵀ (+ b_out)                             (BL, D)
//! ```
//!
//! BL = batch · len rows, token-major. A [`Block`] is a view of one layer's
//! parameters: the models keep their own parameter trees (named as their
//! checkpoints are) and lend them to a `Block` for each call. Its linear
//! layers are any [`Linear`]: [`Dense`] slices of `T` for training, the
//! inference formats' [`Weights`] for generation.
//!
//! Three ways to run it, side by side below: [`Block::forward`] over a
//! chunk of positions (from zeros, or continuing a carried state),
//! [`Block::forward_train`] + [`Block::backward`] (the gradient, by
//! recomputation, docs/DESIGN.md §6.5), and [`Block::step`] (one token of
//! every sequence of a batch), which is the phases [`Block::step_conv`] and
//! [`Block::step_scan`] between the projections; the inference model's
//! multi-thread decoding runs the same phases on each thread's share of
//! the channels.

use serde::{Deserialize, Serialize};

use super::config::SsdConfig;
use crate::error::{check_len, invalid, Result};
use crate::float::Float;
use crate::kernels::{
    causal_conv1d_backward, causal_conv1d_forward, causal_conv1d_forward_continuing,
    causal_conv1d_step, layer_norm_backward, layer_norm_forward, matmul_xtw, matmul_xw, matmul_xwt,
    rms_norm_backward, rms_norm_forward, s4d_backward_conv, s4d_forward_conv,
    selective_scan_backward, selective_scan_forward, selective_scan_step, ConvShape, FftFloat,
    MatmulScalar, NormGrads, S4dGrads, S4dParams, ScanInputs, ScanOptions, ScanShape,
    ScanStepInputs, Weights,
};

#[path = "block_ssd.rs"]
mod ssd;
use ssd::ssd_cache;

/// Scalar types a block computes in: those of the matmul and FFT kernels
/// (f32 and f64).
pub trait BlockScalar: MatmulScalar + FftFloat {}
impl<T: MatmulScalar + FftFloat> BlockScalar for T {}

/// Positions between the scan's kept states in training (docs/DESIGN.md §2.4).
pub const SCAN_CHUNK: usize = 256;

fn scan_options() -> ScanOptions {
    ScanOptions {
        delta_softplus: true,
        chunk_len: SCAN_CHUNK,
        ..ScanOptions::default()
    }
}

/// The sequence-mixing layer inside each block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SsmLayer {
    /// Selective: Δ, B, C computed from the input at every position.
    S6,
    /// Linear time-invariant diagonal SSM (S4D-Lin initialisation).
    S4d,
}

/// The block around the SSM layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockArch {
    /// The Mamba block: in_proj to (x, z), conv1d + silu, SSM, gate silu(z), out_proj.
    Mamba,
    /// A single SSM without gate or conv: in_proj, SSM, silu, out_proj.
    Nogate,
}

impl SsmLayer {
    pub fn name(self) -> &'static str {
        match self {
            SsmLayer::S6 => "s6",
            SsmLayer::S4d => "s4d",
        }
    }
}

impl BlockArch {
    pub fn name(self) -> &'static str {
        match self {
            BlockArch::Mamba => "mamba",
            BlockArch::Nogate => "nogate",
        }
    }
}

impl std::str::FromStr for SsmLayer {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "s6" => Ok(SsmLayer::S6),
            "s4d" => Ok(SsmLayer::S4d),
            _ => Err(invalid(
                "SsmLayer",
                format!("unknown layer {s:?} (expected s6 or s4d)"),
            )),
        }
    }
}

impl std::str::FromStr for BlockArch {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "mamba" => Ok(BlockArch::Mamba),
            "nogate" => Ok(BlockArch::Nogate),
            _ => Err(invalid(
                "BlockArch",
                format!("unknown block {s:?} (expected mamba or nogate)"),
            )),
        }
    }
}

/// The sizes of a block: D, E, N, K, R and the norm's ε.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockShape {
    pub d_model: usize,
    pub d_inner: usize,
    /// N; for S4D the state of a channel is N/2 complex modes (N values).
    pub d_state: usize,
    /// K (gated blocks only)
    pub d_conv: usize,
    /// R (S6 only)
    pub dt_rank: usize,
    pub norm_eps: f64,
    /// Mamba-2: the SSD mixer's heads and groups (src/nn/block_ssd.rs).
    pub ssd: Option<SsdConfig>,
}

impl BlockShape {
    /// (D, E, N, R): the sizes every buffer of the block is made of.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        (self.d_model, self.d_inner, self.d_state, self.dt_rank)
    }

    /// H, the SSD mixer's heads (0 without one).
    pub fn heads(&self) -> usize {
        self.ssd
            .map_or(0, |s| self.d_inner.checked_div(s.head_dim).unwrap_or(0))
    }

    /// Rows of in_proj in a gated block: 2E (x, z), or 2E + 2GN + H (z, x,
    /// B, C, Δ) with the SSD mixer.
    pub fn in_proj_rows(&self) -> usize {
        match self.ssd {
            None => 2 * self.d_inner,
            Some(s) => 2 * self.d_inner + 2 * s.n_groups * self.d_state + self.heads(),
        }
    }

    /// Channels of the causal convolution: E, or E + 2GN (x, B, C) with
    /// the SSD mixer.
    pub fn conv_channels(&self) -> usize {
        match self.ssd {
            None => self.d_inner,
            Some(s) => self.d_inner + 2 * s.n_groups * self.d_state,
        }
    }

    /// Values per token that the training forward keeps for the backward
    /// ([`BlockCache`]: D + 3E + R + 2N, at least), in u128 so that a
    /// memory estimate from a file's sizes cannot overflow.
    pub fn cached_values_per_token(&self) -> u128 {
        let w = |v: usize| v as u128;
        w(self.d_model) + 3 * w(self.d_inner) + w(self.dt_rank) + 2 * w(self.d_state)
    }
}

/// A weight W (rows, cols) in some storage, applied as y = x Wᵀ.
pub trait Linear<T> {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// y (m, rows) [+]= x (m, cols) · Wᵀ
    fn forward(&self, x: &[T], m: usize, y: &mut [T], accumulate: bool) -> Result<()>;
    /// y (n) [+]= W[first_row .. first_row + n] · x (cols) on the calling
    /// thread: one thread's share of a decoding step's output rows.
    fn forward_rows(&self, x: &[T], first_row: usize, y: &mut [T], accumulate: bool) -> Result<()>;
    /// The weight as row-major `T`, when it is stored so: the block then
    /// multiplies by row ranges of it (x and z, dt_low, B and C) straight
    /// into their own buffers instead of splitting one product.
    fn dense(&self) -> Option<Dense<'_, T>> {
        None
    }
}

impl<T, L: Linear<T> + ?Sized> Linear<T> for &L {
    fn rows(&self) -> usize {
        (**self).rows()
    }
    fn cols(&self) -> usize {
        (**self).cols()
    }
    fn forward(&self, x: &[T], m: usize, y: &mut [T], accumulate: bool) -> Result<()> {
        (**self).forward(x, m, y, accumulate)
    }
    fn forward_rows(&self, x: &[T], first_row: usize, y: &mut [T], accumulate: bool) -> Result<()> {
        (**self).forward_rows(x, first_row, y, accumulate)
    }
    fn dense(&self) -> Option<Dense<'_, T>> {
        (**self).dense()
    }
}

fn check_rows(
    op: &'static str,
    rows: usize,
    cols: usize,
    x: usize,
    j0: usize,
    n: usize,
) -> Result<()> {
    if x != cols || j0 + n > rows {
        return Err(invalid(
            op,
            format!(
                "x has {x} values for {cols} columns; rows {j0}..{} of {rows}",
                j0 + n
            ),
        ));
    }
    Ok(())
}

/// A weight (rows, cols) held as row-major `T`: what training reads and
/// differentiates.
#[derive(Clone, Copy, Debug)]
pub struct Dense<'a, T> {
    pub weight: &'a [T],
    pub rows: usize,
    pub cols: usize,
}

impl<'a, T> Dense<'a, T> {
    pub fn new(weight: &'a [T], rows: usize, cols: usize) -> Self {
        Self { weight, rows, cols }
    }
    /// Rows [r0, r1) of the weight.
    fn row_range(&self, r0: usize, r1: usize) -> &'a [T] {
        &self.weight[r0 * self.cols..r1 * self.cols]
    }

    /// Rows [r0, r1) as a weight of their own.
    fn rows_of(&self, r0: usize, r1: usize) -> Dense<'a, T> {
        Dense::new(self.row_range(r0, r1), r1 - r0, self.cols)
    }
}

impl<T: MatmulScalar> Linear<T> for Dense<'_, T> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn forward(&self, x: &[T], m: usize, y: &mut [T], accumulate: bool) -> Result<()> {
        matmul_xwt(x, self.weight, m, self.cols, self.rows, y, accumulate)
    }
    fn forward_rows(&self, x: &[T], first_row: usize, y: &mut [T], accumulate: bool) -> Result<()> {
        let n = y.len();
        check_rows(
            "Dense::forward_rows",
            self.rows,
            self.cols,
            x.len(),
            first_row,
            n,
        )?;
        let w = self.row_range(first_row, first_row + n);
        matmul_xwt(x, w, 1, self.cols, n, y, accumulate)
    }
    fn dense(&self) -> Option<Dense<'_, T>> {
        Some(*self)
    }
}

impl Linear<f32> for Weights {
    fn rows(&self) -> usize {
        Weights::rows(self)
    }
    fn cols(&self) -> usize {
        Weights::cols(self)
    }
    fn forward(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) -> Result<()> {
        self.matmul_xwt(x, m, y, accumulate)
    }
    fn forward_rows(
        &self,
        x: &[f32],
        first_row: usize,
        y: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        let (rows, cols) = (Weights::rows(self), Weights::cols(self));
        check_rows(
            "Weights::forward_rows",
            rows,
            cols,
            x.len(),
            first_row,
            y.len(),
        )?;
        self.matvec_rows(x, first_row, y, accumulate);
        Ok(())
    }
}

/// Values either borrowed from a parameter tree or computed from it
/// (A = -exp(A_log) in training; kept precomputed for inference).
#[derive(Clone, Debug)]
pub enum Values<'a, T> {
    Borrowed(&'a [T]),
    Owned(Vec<T>),
}

impl<T> std::ops::Deref for Values<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Values::Borrowed(v) => v,
            Values::Owned(v) => v,
        }
    }
}

/// The causal depthwise convolution of a gated block.
#[derive(Clone, Copy, Debug)]
pub struct Conv<'a, T> {
    /// (E, K)
    pub weight: &'a [T],
    /// (E)
    pub bias: Option<&'a [T]>,
}

/// The S6 layer's parameters.
#[derive(Clone, Debug)]
pub struct S6<'a, T, W> {
    /// (R + 2N, E): rows give dt_low, B, C in that order.
    pub x_proj: W,
    /// (E, R)
    pub dt_proj: W,
    /// (E), added inside the scan before softplus
    pub dt_bias: &'a [T],
    /// A = -exp(A_log) (E, N)
    pub a: Values<'a, T>,
    /// (E)
    pub d: &'a [T],
    /// Falcon-Mamba: dt_low, B and C are each RMS-normalised (without a
    /// weight, this ε) right after x_proj; None for Mamba.
    pub dt_bc_rms_eps: Option<f64>,
}

/// The sequence mixer of a block.
#[derive(Clone, Debug)]
pub enum Mixer<'a, T, W> {
    S6(S6<'a, T, W>),
    S4d(&'a S4dParams<T>),
    /// Mamba-2's SSD layer with its gated norm (src/nn/block_ssd.rs).
    Ssd(Ssd<'a, T>),
}

/// The Mamba-2 mixer's own parameters (its shape is [`BlockShape::ssd`]).
#[derive(Clone, Debug)]
pub struct Ssd<'a, T> {
    /// (H), added to Δ before the softplus
    pub dt_bias: &'a [T],
    /// A = -exp(A_log) (H)
    pub a: Values<'a, T>,
    /// (H)
    pub d: &'a [T],
    /// The gated RMSNorm's weight (E).
    pub norm_weight: &'a [T],
}

/// One layer's parameters, borrowed from a model's tree.
#[derive(Clone, Debug)]
pub struct Block<'a, T, W> {
    pub shape: BlockShape,
    /// (D)
    pub norm_weight: &'a [T],
    /// (D): LayerNorm when present, RMSNorm when not.
    pub norm_bias: Option<&'a [T]>,
    /// (2E, D) gated, rows 0..E → x and E..2E → z; (E, D) nogate.
    pub in_proj: W,
    pub in_proj_bias: Option<&'a [T]>,
    /// Present exactly for the gated block.
    pub conv: Option<Conv<'a, T>>,
    pub mixer: Mixer<'a, T, W>,
    /// (D, E)
    pub out_proj: W,
    pub out_proj_bias: Option<&'a [T]>,
}

/// The carried state of one block for a batch of sequences.
pub struct BlockStateMut<'s, T> {
    /// The last K pre-conv inputs (batch, E, K); empty for nogate.
    pub conv: &'s mut [T],
    /// S6: h (batch, E, N). S4D: (batch, E, N/2, 2).
    pub ssm: &'s mut [T],
}

/// Activations of one chunk, reused from layer to layer and chunk to chunk
/// so that prefill allocates once.
#[derive(Default)]
pub struct ChunkBuffers<T> {
    /// norm(h) (BL, D)
    normed: Vec<T>,
    /// in_proj's output (BL, 2E) gated, (BL, E) nogate
    xz: Vec<T>,
    /// pre-conv x (BL, E), gated only
    x: Vec<T>,
    /// (BL, E), gated only
    z: Vec<T>,
    /// the mixer's input v (BL, E)
    v: Vec<T>,
    /// (BL, R + 2N)
    x_dbl: Vec<T>,
    /// (BL, R)
    dt_low: Vec<T>,
    /// (BL, N) each
    b: Vec<T>,
    c: Vec<T>,
    /// Falcon-Mamba, training: dt_low, B, C before their RMSNorm
    raw_dt_low: Vec<T>,
    raw_b: Vec<T>,
    raw_c: Vec<T>,
    /// (BL, E)
    delta: Vec<T>,
    /// the mixer's output s (BL, E) where it is not already y
    s: Vec<T>,
    /// what out_proj reads (BL, E)
    y: Vec<T>,
    /// the scan's states every SCAN_CHUNK positions, training only
    checkpoints: Vec<T>,
    /// a copy of the carried scan state (B, E, N): the scan reads its
    /// initial state from here while it writes the final one in place
    initial_state: Vec<T>,
    /// SSD: the heads' input x (BL, E), cut out of the convolution's output
    ssd_x: Vec<T>,
    /// SSD: its output y (BL, E), before the gate and the norm
    ssd_y: Vec<T>,
}

fn sized<T: Float>(v: &mut Vec<T>, len: usize) -> &mut Vec<T> {
    v.resize(len, T::ZERO);
    v
}

/// What the training forward keeps of one block for its backward: per
/// token D + 3E + R + 2N values (and s for the S4D and nogate mixers), as
/// docs/DESIGN.md §6.5 lists; the backward recomputes norm(r), the conv
/// output and delta.
pub struct BlockCache<T> {
    /// the block's input, the residual stream (BL, D)
    resid: Vec<T>,
    /// in_proj's x rows (BL, E): pre-conv for gated, v for nogate
    x: Vec<T>,
    /// (BL, E), gated only
    z: Vec<T>,
    /// (BL, R), (BL, N), (BL, N): S6 only (Falcon-Mamba: before their
    /// RMSNorm, which the backward recomputes)
    dt_low: Vec<T>,
    b: Vec<T>,
    c: Vec<T>,
    /// the ungated mixer output (BL, E): S4D, and S6 in nogate
    s: Vec<T>,
    /// what out_proj read (BL, E)
    y: Vec<T>,
    checkpoints: Vec<T>,
}

/// Gradients of one block's parameters, in the layouts of [`Block`].
#[derive(Clone, Debug, PartialEq)]
pub struct BlockGradients<T> {
    pub norm_weight: Vec<T>,
    pub norm_bias: Option<Vec<T>>,
    pub in_proj_weight: Vec<T>,
    pub in_proj_bias: Option<Vec<T>>,
    /// Empty for nogate.
    pub conv_weight: Vec<T>,
    pub conv_bias: Option<Vec<T>>,
    pub mixer: MixerGradients<T>,
    pub out_proj_weight: Vec<T>,
    pub out_proj_bias: Option<Vec<T>>,
}

/// Gradients of the mixer's parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum MixerGradients<T> {
    S6 {
        x_proj_weight: Vec<T>,
        dt_proj_weight: Vec<T>,
        dt_proj_bias: Vec<T>,
        /// through A = -exp(A_log): dA_log = dA ⊙ A
        a_log: Vec<T>,
        d: Vec<T>,
    },
    /// The S4D gradients (their `u` is empty: it went into the block's input).
    S4d(S4dGrads<T>),
    Ssd {
        dt_bias: Vec<T>,
        /// through A = -exp(A_log): dA_log = dA ⊙ A
        a_log: Vec<T>,
        d: Vec<T>,
        norm_weight: Vec<T>,
    },
}

/// Buffers of one decoding step for up to `batch` sequences.
pub struct StepBuffers<T> {
    pub normed: Vec<T>,
    pub xz: Vec<T>,
    pub v: Vec<T>,
    pub x_dbl: Vec<T>,
    pub dt_low: Vec<T>,
    pub delta: Vec<T>,
    pub y: Vec<T>,
}

impl<T: Float> StepBuffers<T> {
    pub fn new(shape: &BlockShape, batch: usize) -> Self {
        let (d, e, n, r) = shape.dims();
        Self {
            normed: vec![T::ZERO; batch * d],
            xz: vec![T::ZERO; batch * shape.in_proj_rows()],
            v: vec![T::ZERO; batch * shape.conv_channels()],
            x_dbl: vec![T::ZERO; batch * (r + 2 * n)],
            dt_low: vec![T::ZERO; batch * r],
            delta: vec![T::ZERO; batch * e],
            y: vec![T::ZERO; batch * e],
        }
    }
}

/// y[i] += bias for every row of x.
pub(crate) fn add_row_bias<T: Float>(x: &mut [T], bias: &[T]) {
    for row in x.chunks_mut(bias.len()) {
        for (a, &b) in row.iter_mut().zip(bias) {
            *a += b;
        }
    }
}

/// out += Σ_rows x (the gradient of a bias added to every row)
fn sum_rows_into<T: Float>(x: &[T], out: &mut [T]) {
    for row in x.chunks(out.len()) {
        for (a, &b) in out.iter_mut().zip(row) {
            *a += b;
        }
    }
}

/// Splits rows of `src` (rows, Σ widths) into one buffer per width, in
/// blocks of rows on the pool's threads (a copy bound by memory that two
/// cores move faster than one).
fn split_columns<T: Copy + Send + Sync>(src: &[T], parts: &mut [(&mut [T], usize)]) {
    use crate::kernels::shared::SharedMut;
    use rayon::prelude::*;
    const ROWS_PER_TASK: usize = 64;
    let total: usize = parts.iter().map(|(_, w)| w).sum();
    let dsts: Vec<(SharedMut<'_, T>, usize)> = parts
        .iter_mut()
        .map(|(dst, w)| (SharedMut::new(&mut **dst), *w))
        .collect();
    src.par_chunks(total * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(block, rows)| {
            for (j, row) in rows.chunks(total).enumerate() {
                let i = block * ROWS_PER_TASK + j;
                let mut at = 0;
                for (dst, w) in &dsts {
                    // SAFETY: row i of every part is written by this task only.
                    unsafe { dst.slice(i * w, *w) }.copy_from_slice(&row[at..at + w]);
                    at += w;
                }
            }
        });
}

/// x ← x / sqrt(mean(x²) + ε) for every row of `x` (rows, dim): the
/// weightless RMSNorm of Falcon-Mamba's dt_low, B and C.
pub(crate) fn rms_normalize_rows<T: Float>(x: &mut [T], dim: usize, eps: f64) {
    let eps = T::from_f64(eps);
    for row in x.chunks_mut(dim) {
        let ms = row.iter().map(|&v| v * v).sum::<T>() / T::from_usize(dim);
        let scale = T::ONE / (ms + eps).sqrt();
        row.iter_mut().for_each(|v| *v *= scale);
    }
}

/// One (R + 2N) row of x_proj's output with each of dt_low, B and C
/// RMS-normalised (Falcon-Mamba).
pub(crate) fn normalize_dt_b_c<T: Float>(row: &mut [T], r: usize, n: usize, eps: f64) {
    rms_normalize_rows(&mut row[..r], r, eps);
    rms_normalize_rows(&mut row[r..r + n], n, eps);
    rms_normalize_rows(&mut row[r + n..], n, eps);
}

/// Normalises rows of `x` (rows, dim): RMSNorm, or LayerNorm when a bias is given.
pub fn norm_forward<T: Float>(
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    eps: f64,
    y: &mut [T],
) -> Result<()> {
    let (dim, eps) = (weight.len(), T::from_f64(eps));
    match bias {
        None => rms_norm_forward(x, weight, dim, eps, y),
        Some(b) => layer_norm_forward(x, weight, b, dim, eps, y),
    }
}

/// The backward of [`norm_forward`].
pub fn norm_backward<T: Float>(
    x: &[T],
    weight: &[T],
    has_bias: bool,
    eps: f64,
    dy: &[T],
) -> Result<NormGrads<T>> {
    let (dim, eps) = (weight.len(), T::from_f64(eps));
    if has_bias {
        layer_norm_backward(x, weight, dim, eps, dy)
    } else {
        rms_norm_backward(x, weight, dim, eps, dy)
    }
}

impl<T: BlockScalar, W: Linear<T>> Block<'_, T, W> {
    fn gated(&self) -> bool {
        self.conv.is_some()
    }

    fn in_rows(&self) -> usize {
        if self.gated() {
            self.shape.in_proj_rows()
        } else {
            self.shape.d_inner
        }
    }

    /// Checks every parameter's shape against [`BlockShape`], so that
    /// nothing later (the decoding team above all) meets a wrong size.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "Block";
        let BlockShape {
            d_model: d,
            d_inner: e,
            d_state: n,
            d_conv: k,
            dt_rank: r,
            ..
        } = self.shape;
        let linear = |name: &str, w: &W, rows: usize, cols: usize| -> Result<()> {
            if w.rows() != rows || w.cols() != cols {
                return Err(invalid(
                    OP,
                    format!(
                        "{name} is ({}, {}), expected ({rows}, {cols})",
                        w.rows(),
                        w.cols()
                    ),
                ));
            }
            Ok(())
        };
        let vector = |name: &str, v: Option<&[T]>, len: usize| -> Result<()> {
            match v {
                Some(v) if v.len() != len => Err(invalid(
                    OP,
                    format!("{name} has {} values, expected {len}", v.len()),
                )),
                _ => Ok(()),
            }
        };
        vector("norm.weight", Some(self.norm_weight), d)?;
        vector("norm.bias", self.norm_bias, d)?;
        linear("in_proj", &self.in_proj, self.in_rows(), d)?;
        vector("in_proj.bias", self.in_proj_bias, self.in_rows())?;
        if let Some(conv) = &self.conv {
            let channels = self.shape.conv_channels();
            vector("conv1d.weight", Some(conv.weight), channels * k)?;
            vector("conv1d.bias", conv.bias, channels)?;
        }
        if self.shape.ssd.is_some() != matches!(self.mixer, Mixer::Ssd(_))
            || (self.shape.ssd.is_some() && self.conv.is_none())
        {
            return Err(invalid(
                OP,
                "the SSD mixer comes with the shape's ssd sizes and a gated block, and only with them",
            ));
        }
        match &self.mixer {
            Mixer::Ssd(ssd) => {
                let h = self.shape.heads();
                vector("dt_bias", Some(ssd.dt_bias), h)?;
                vector("A", Some(&ssd.a[..]), h)?;
                vector("D", Some(ssd.d), h)?;
                vector("norm.weight (gated)", Some(ssd.norm_weight), e)?;
            }
            Mixer::S6(s6) => {
                linear("x_proj", &s6.x_proj, r + 2 * n, e)?;
                linear("dt_proj", &s6.dt_proj, e, r)?;
                vector("dt_proj.bias", Some(s6.dt_bias), e)?;
                vector("A", Some(&s6.a[..]), e * n)?;
                vector("D", Some(s6.d), e)?;
            }
            Mixer::S4d(p) => {
                p.validate(OP)?;
                if p.channels != e || 2 * p.modes != n {
                    return Err(invalid(
                        OP,
                        format!(
                            "the S4D layer has {} channels and {} modes, expected {e} and {}",
                            p.channels,
                            p.modes,
                            n / 2
                        ),
                    ));
                }
            }
        }
        linear("out_proj", &self.out_proj, d, e)?;
        vector("out_proj.bias", self.out_proj_bias, d)
    }

    /// u = norm(h)  (rows, D)
    pub fn norm(&self, h: &[T], u: &mut [T]) -> Result<()> {
        norm_forward(h, self.norm_weight, self.norm_bias, self.shape.norm_eps, u)
    }

    fn conv_shape(&self, batch: usize, len: usize) -> ConvShape {
        ConvShape {
            batch,
            len,
            channels: self.shape.d_inner,
            kernel: self.shape.d_conv,
        }
    }

    fn scan_shape(&self, batch: usize, len: usize) -> ScanShape {
        ScanShape {
            batch,
            len,
            channels: self.shape.d_inner,
            state: self.shape.d_state,
        }
    }

    /// h ← h + block(h) over `len` positions of `batch` sequences (BL, D).
    /// With `state`, continues from it and leaves the state after the chunk
    /// in it; without, starts from zeros. `keep` also fills the scan's
    /// checkpoints for [`Block::backward`].
    pub fn forward(
        &self,
        h: &mut [T],
        batch: usize,
        len: usize,
        mut state: Option<BlockStateMut<'_, T>>,
        bufs: &mut ChunkBuffers<T>,
        keep: bool,
    ) -> Result<()> {
        const OP: &str = "Block::forward";
        if let Mixer::Ssd(ssd) = &self.mixer {
            return self.forward_ssd(ssd, h, batch, len, state, bufs);
        }
        let (d, e, n, r) = self.shape.dims();
        let rows = batch * len;
        check_len(
            OP,
            "h",
            h,
            &[("batch", batch), ("len", len), ("d_model", d)],
        )?;
        let gated = self.gated();
        // u = norm(h)
        self.norm(h, sized(&mut bufs.normed, rows * d))?;
        // x, z = u W_inᵀ (gated) or v = u W_inᵀ
        let in_rows = self.in_rows();
        let split_in = self.conv.is_some() && self.in_proj.dense().is_some();
        if let (true, Some(w)) = (split_in, self.in_proj.dense()) {
            // straight into x and z: no (BL, 2E) product to split
            let (x, z) = (sized(&mut bufs.x, rows * e), sized(&mut bufs.z, rows * e));
            w.rows_of(0, e).forward(&bufs.normed, rows, x, false)?;
            w.rows_of(e, 2 * e).forward(&bufs.normed, rows, z, false)?;
            if let Some(bias) = self.in_proj_bias {
                add_row_bias(x, &bias[..e]);
                add_row_bias(z, &bias[e..]);
            }
        } else {
            let xz = sized(&mut bufs.xz, rows * in_rows);
            self.in_proj.forward(&bufs.normed, rows, xz, false)?;
            if let Some(bias) = self.in_proj_bias {
                add_row_bias(xz, bias);
            }
        }
        if let Some(conv) = &self.conv {
            if !split_in {
                sized(&mut bufs.x, rows * e);
                sized(&mut bufs.z, rows * e);
                split_columns(&bufs.xz, &mut [(&mut bufs.x, e), (&mut bufs.z, e)]);
            }
            // v = silu(conv1d(x) + b_conv)
            let shape = self.conv_shape(batch, len);
            let v = sized(&mut bufs.v, rows * e);
            match state.as_mut() {
                Some(st) => causal_conv1d_forward_continuing(
                    &shape,
                    &bufs.x,
                    conv.weight,
                    conv.bias,
                    st.conv,
                    v,
                )?,
                None => causal_conv1d_forward(&shape, &bufs.x, conv.weight, conv.bias, v)?,
            }
            for a in v.iter_mut() {
                *a = a.silu();
            }
        } else {
            std::mem::swap(&mut bufs.v, &mut bufs.xz);
        }
        let y = sized(&mut bufs.y, rows * e);
        match &self.mixer {
            Mixer::S6(s6) => {
                // dt_low, B, C = v W_xᵀ;  delta = dt_low W_dtᵀ
                let (dt_low, bm, cm) = (
                    sized(&mut bufs.dt_low, rows * r),
                    sized(&mut bufs.b, rows * n),
                    sized(&mut bufs.c, rows * n),
                );
                match s6.x_proj.dense() {
                    Some(w) => {
                        w.rows_of(0, r).forward(&bufs.v, rows, dt_low, false)?;
                        w.rows_of(r, r + n).forward(&bufs.v, rows, bm, false)?;
                        w.rows_of(r + n, r + 2 * n)
                            .forward(&bufs.v, rows, cm, false)?;
                    }
                    None => {
                        let x_dbl = sized(&mut bufs.x_dbl, rows * (r + 2 * n));
                        s6.x_proj.forward(&bufs.v, rows, x_dbl, false)?;
                        split_columns(x_dbl, &mut [(dt_low, r), (bm, n), (cm, n)]);
                    }
                }
                if let Some(eps) = s6.dt_bc_rms_eps {
                    if keep {
                        for (raw, done) in [
                            (&mut bufs.raw_dt_low, &bufs.dt_low),
                            (&mut bufs.raw_b, &bufs.b),
                            (&mut bufs.raw_c, &bufs.c),
                        ] {
                            raw.clear();
                            raw.extend_from_slice(done);
                        }
                    }
                    rms_normalize_rows(&mut bufs.dt_low, r, eps);
                    rms_normalize_rows(&mut bufs.b, n, eps);
                    rms_normalize_rows(&mut bufs.c, n, eps);
                }
                s6.dt_proj
                    .forward(&bufs.dt_low, rows, sized(&mut bufs.delta, rows * e), false)?;
                let shape = self.scan_shape(batch, len);
                let initial = match &state {
                    Some(st) => {
                        let copy = sized(&mut bufs.initial_state, st.ssm.len());
                        copy.copy_from_slice(st.ssm);
                        Some(copy.as_slice())
                    }
                    None => None,
                };
                let inputs = ScanInputs {
                    u: &bufs.v,
                    delta: &bufs.delta,
                    a: &s6.a,
                    b: &bufs.b,
                    c: &bufs.c,
                    d: Some(s6.d),
                    z: gated.then_some(bufs.z.as_slice()),
                    delta_bias: Some(s6.dt_bias),
                    initial_state: initial,
                };
                let checkpoints = if keep {
                    Some(
                        sized(&mut bufs.checkpoints, shape.checkpoints_len(SCAN_CHUNK))
                            .as_mut_slice(),
                    )
                } else {
                    None
                };
                // gated: the scan applies silu(z) itself and writes y
                let out = if gated {
                    &mut *y
                } else {
                    sized(&mut bufs.s, rows * e)
                };
                selective_scan_forward(
                    &shape,
                    &inputs,
                    &scan_options(),
                    out,
                    state.map(|st| st.ssm),
                    checkpoints,
                )?;
                if !gated {
                    for (yv, &sv) in y.iter_mut().zip(&bufs.s) {
                        *yv = sv.silu();
                    }
                }
            }
            Mixer::Ssd(_) => unreachable!("forward_ssd above"),
            Mixer::S4d(p) => {
                let s = match state {
                    None => s4d_forward_conv(p, &bufs.v, batch, len)?,
                    Some(st) => {
                        // the recurrence, one position at a time, from the carried state
                        let disc = p.discretize()?;
                        let mut s = vec![T::ZERO; rows * e];
                        let mut u_t = vec![T::ZERO; batch * e];
                        for t in 0..len {
                            for b in 0..batch {
                                let row = (b * len + t) * e;
                                u_t[b * e..(b + 1) * e].copy_from_slice(&bufs.v[row..row + e]);
                            }
                            let y_t = disc.step(st.ssm, &u_t, batch)?;
                            for b in 0..batch {
                                let row = (b * len + t) * e;
                                s[row..row + e].copy_from_slice(&y_t[b * e..(b + 1) * e]);
                            }
                        }
                        s
                    }
                };
                if gated {
                    for ((yv, &sv), &zv) in y.iter_mut().zip(&s).zip(&bufs.z) {
                        *yv = sv * zv.silu();
                    }
                } else {
                    for (yv, &sv) in y.iter_mut().zip(&s) {
                        *yv = sv.silu();
                    }
                }
                bufs.s = s;
            }
        }
        // h += y W_outᵀ (+ b_out)
        self.out_proj.forward(&bufs.y, rows, h, true)?;
        if let Some(bias) = self.out_proj_bias {
            add_row_bias(h, bias);
        }
        if !gated {
            std::mem::swap(&mut bufs.v, &mut bufs.xz);
        }
        Ok(())
    }

    /// [`Block::forward`] over whole sequences from zeros, keeping what
    /// [`Block::backward`] needs.
    pub fn forward_train(&self, h: &mut [T], batch: usize, len: usize) -> Result<BlockCache<T>> {
        let resid = h.to_vec();
        let mut bufs = ChunkBuffers::default();
        self.forward(h, batch, len, None, &mut bufs, true)?;
        let take = std::mem::take;
        if let Mixer::Ssd(_) = &self.mixer {
            return Ok(ssd_cache(resid, &mut bufs));
        }
        let s6 = matches!(self.mixer, Mixer::S6(_));
        let gated = self.gated();
        if matches!(&self.mixer, Mixer::S6(m) if m.dt_bc_rms_eps.is_some()) {
            // keep what went into the RMSNorm: its backward needs it
            std::mem::swap(&mut bufs.dt_low, &mut bufs.raw_dt_low);
            std::mem::swap(&mut bufs.b, &mut bufs.raw_b);
            std::mem::swap(&mut bufs.c, &mut bufs.raw_c);
        }
        Ok(BlockCache {
            resid,
            // nogate: in_proj's output is v, left in xz
            x: if gated {
                take(&mut bufs.x)
            } else {
                take(&mut bufs.xz)
            },
            z: take(&mut bufs.z),
            dt_low: take(&mut bufs.dt_low),
            b: take(&mut bufs.b),
            c: take(&mut bufs.c),
            s: if s6 && gated {
                Vec::new()
            } else {
                take(&mut bufs.s)
            },
            y: take(&mut bufs.y),
            checkpoints: take(&mut bufs.checkpoints),
        })
    }

    /// One token of each of `states.len()` sequences: h (b, D) ← h +
    /// block(h), each sequence's state advanced. The phases are those the
    /// multi-thread decoding runs on each thread's channels: the
    /// projections over the batch, [`Block::step_conv`] and
    /// [`Block::step_scan`] per sequence.
    pub fn step(
        &self,
        h: &mut [T],
        states: &mut [BlockStateMut<'_, T>],
        bufs: &mut StepBuffers<T>,
    ) -> Result<()> {
        const OP: &str = "Block::step";
        if let Mixer::Ssd(ssd) = &self.mixer {
            return self.step_ssd(ssd, h, states, bufs);
        }
        let (_, e, n, r) = self.shape.dims();
        let b = states.len();
        self.step_in_proj(OP, h, b, bufs)?;
        if bufs.v.len() < b * e || bufs.y.len() < b * e {
            return Err(invalid(OP, format!("{b} sequences but buffers for fewer")));
        }
        let in_rows = self.in_rows();
        let xz = &bufs.xz[..b * in_rows];
        let v = &mut bufs.v[..b * e];
        for (i, st) in states.iter_mut().enumerate() {
            let x = &xz[i * in_rows..i * in_rows + e];
            self.step_conv(0, x, st.conv, &mut v[i * e..(i + 1) * e])?;
        }
        let y = &mut bufs.y[..b * e];
        match &self.mixer {
            Mixer::S6(s6) => {
                let xd = r + 2 * n;
                let x_dbl = &mut bufs.x_dbl[..b * xd];
                s6.x_proj.forward(v, b, x_dbl, false)?;
                if let Some(eps) = s6.dt_bc_rms_eps {
                    for row in x_dbl.chunks_mut(xd) {
                        normalize_dt_b_c(row, r, n, eps);
                    }
                }
                let dt_low = &mut bufs.dt_low[..b * r];
                for (dt, row) in dt_low.chunks_mut(r).zip(x_dbl.chunks(xd)) {
                    dt.copy_from_slice(&row[..r]);
                }
                let delta = &mut bufs.delta[..b * e];
                s6.dt_proj.forward(dt_low, b, delta, false)?;
                for (i, st) in states.iter_mut().enumerate() {
                    let z = self
                        .gated()
                        .then(|| &xz[i * in_rows + e..(i + 1) * in_rows]);
                    self.step_scan(
                        0,
                        &x_dbl[i * xd..(i + 1) * xd],
                        &v[i * e..(i + 1) * e],
                        z,
                        &delta[i * e..(i + 1) * e],
                        st.ssm,
                        &mut y[i * e..(i + 1) * e],
                    )?;
                }
            }
            Mixer::Ssd(_) => unreachable!("step_ssd above"),
            Mixer::S4d(p) => {
                let disc = p.discretize()?;
                for (i, st) in states.iter_mut().enumerate() {
                    let s = disc.step(st.ssm, &v[i * e..(i + 1) * e], 1)?;
                    let yi = &mut y[i * e..(i + 1) * e];
                    if self.gated() {
                        let z = &xz[i * in_rows + e..(i + 1) * in_rows];
                        for ((yv, &sv), &zv) in yi.iter_mut().zip(&s).zip(z) {
                            *yv = sv * zv.silu();
                        }
                    } else {
                        for (yv, &sv) in yi.iter_mut().zip(&s) {
                            *yv = sv.silu();
                        }
                    }
                }
            }
        }
        self.step_out_proj(y, b, h)
    }

    /// The first phase of a decoding step, every mixer: normed = norm(h)
    /// (b, D), then in_proj(normed) + bias into `bufs.xz` (b, in_rows).
    pub(super) fn step_in_proj(
        &self,
        op: &'static str,
        h: &[T],
        b: usize,
        bufs: &mut StepBuffers<T>,
    ) -> Result<()> {
        let d = self.shape.d_model;
        check_len(op, "h", h, &[("sequences", b), ("d_model", d)])?;
        let in_rows = self.in_rows();
        if bufs.normed.len() < b * d || bufs.xz.len() < b * in_rows {
            return Err(invalid(op, format!("{b} sequences but buffers for fewer")));
        }
        let normed = &mut bufs.normed[..b * d];
        self.norm(h, normed)?;
        let xz = &mut bufs.xz[..b * in_rows];
        self.in_proj.forward(normed, b, xz, false)?;
        if let Some(bias) = self.in_proj_bias {
            add_row_bias(xz, bias);
        }
        Ok(())
    }

    /// The last phase of a decoding step: h ← h + out_proj(y) + bias, y
    /// (b, E), h (b, D).
    pub(super) fn step_out_proj(&self, y: &[T], b: usize, h: &mut [T]) -> Result<()> {
        self.out_proj.forward(y, b, h, true)?;
        if let Some(bias) = self.out_proj_bias {
            add_row_bias(h, bias);
        }
        Ok(())
    }

    /// Step phase 1 for channels [c0, c0 + x.len()) of one sequence:
    /// conv_state ← shift(conv_state, x); v = silu(W_conv · conv_state +
    /// b_conv) for a gated block, v = x for nogate. `conv_state` holds
    /// those channels' (c, K); the channels are E (Mamba) or E + 2GN (x,
    /// B and C of Mamba-2).
    pub fn step_conv(&self, c0: usize, x: &[T], conv_state: &mut [T], v: &mut [T]) -> Result<()> {
        let Some(conv) = &self.conv else {
            check_len("Block::step_conv", "v", v, &[("channels", x.len())])?;
            v.copy_from_slice(x);
            return Ok(());
        };
        let (c, k, channels) = (x.len(), self.shape.d_conv, self.shape.conv_channels());
        if c0 + c > channels {
            return Err(invalid(
                "Block::step_conv",
                format!("channels {c0}..{} of {channels}", c0 + c),
            ));
        }
        causal_conv1d_step(
            1,
            c,
            k,
            conv_state,
            x,
            &conv.weight[c0 * k..(c0 + c) * k],
            conv.bias.map(|b| &b[c0..c0 + c]),
            v,
        )?;
        for a in v.iter_mut() {
            *a = a.silu();
        }
        Ok(())
    }

    /// Step phase 3 for channels [c0, c0 + u.len()) of one sequence (S6):
    /// ssm_state ← exp(ΔA) ssm_state + ΔB u;  y = (C · ssm_state + D u) ·
    /// silu(z) (gated) or silu(C · ssm_state + D u) (nogate). `x_dbl` is
    /// the sequence's whole (R + 2N) row (for Falcon-Mamba after
    /// [`normalize_dt_b_c`]), `delta` the raw dt_low W_dtᵀ of these
    /// channels, `ssm_state` their (c, N).
    #[allow(clippy::too_many_arguments)]
    pub fn step_scan(
        &self,
        c0: usize,
        x_dbl: &[T],
        u: &[T],
        z: Option<&[T]>,
        delta: &[T],
        ssm_state: &mut [T],
        y: &mut [T],
    ) -> Result<()> {
        const OP: &str = "Block::step_scan";
        let Mixer::S6(s6) = &self.mixer else {
            return Err(invalid(OP, "the S4D mixer steps all channels at once"));
        };
        let (n, r) = (self.shape.d_state, self.shape.dt_rank);
        let c = u.len();
        check_len(OP, "x_dbl", x_dbl, &[("R + 2N", r + 2 * n)])?;

        if c0 + c > self.shape.d_inner {
            return Err(invalid(
                OP,
                format!("channels {c0}..{} of {}", c0 + c, self.shape.d_inner),
            ));
        }
        let inputs = ScanStepInputs {
            u,
            delta,
            a: &s6.a[c0 * n..(c0 + c) * n],
            b: &x_dbl[r..r + n],
            c: &x_dbl[r + n..],
            d: Some(&s6.d[c0..c0 + c]),
            z,
            delta_bias: Some(&s6.dt_bias[c0..c0 + c]),
        };
        selective_scan_step(1, c, n, &inputs, &scan_options(), ssm_state, y)?;
        if z.is_none() {
            for a in y.iter_mut() {
                *a = a.silu();
            }
        }
        Ok(())
    }
}

impl<T: BlockScalar> Block<'_, T, Dense<'_, T>> {
    /// The backward of h_out = h_in + y W_outᵀ (+ b_out), y what out_proj
    /// read: (dW_out, db_out, dy (BL, E)).
    fn out_proj_backward(
        &self,
        cache: &BlockCache<T>,
        rows: usize,
        dh: &[T],
    ) -> Result<(Vec<T>, Option<Vec<T>>, Vec<T>)> {
        let (d, e) = (self.shape.d_model, self.shape.d_inner);
        let mut weight = vec![T::ZERO; d * e];
        matmul_xtw(dh, &cache.y, rows, d, e, &mut weight, false)?;
        let bias = self.out_proj_bias.map(|b| {
            let mut g = vec![T::ZERO; b.len()];
            sum_rows_into(dh, &mut g);
            g
        });
        let mut dy = vec![T::ZERO; rows * e];
        matmul_xw(dh, self.out_proj.weight, rows, d, e, &mut dy, false)?;
        Ok((weight, bias, dy))
    }

    /// The backward of u = norm(h_in) given du: adds dL/dh_in through the
    /// norm to `dh` (the residual path is `dh` itself) and returns the
    /// norm's gradients.
    fn input_norm_backward(
        &self,
        cache: &BlockCache<T>,
        d_normed: &[T],
        dh: &mut [T],
    ) -> Result<NormGrads<T>> {
        let ng = norm_backward(
            &cache.resid,
            self.norm_weight,
            self.norm_bias.is_some(),
            self.shape.norm_eps,
            d_normed,
        )?;
        for (a, &b) in dh.iter_mut().zip(&ng.x) {
            *a += b;
        }
        Ok(ng)
    }

    /// The backward of [`Block::forward_train`]: `dh` holds dL/dh after the
    /// block on entry and dL/dh before it on return.
    pub fn backward(
        &self,
        cache: &BlockCache<T>,
        batch: usize,
        len: usize,
        dh: &mut [T],
    ) -> Result<BlockGradients<T>> {
        const OP: &str = "Block::backward";
        if let Mixer::Ssd(ssd) = &self.mixer {
            return self.backward_ssd(ssd, cache, batch, len, dh);
        }
        let (d, e, n, r) = self.shape.dims();
        let rows = batch * len;
        check_len(
            OP,
            "dh",
            dh,
            &[("batch", batch), ("len", len), ("d_model", d)],
        )?;
        check_len(OP, "cached y", &cache.y, &[("rows", rows), ("d_inner", e)])?;
        let gated = self.gated();
        let (out_proj_weight, out_proj_bias, dy) = self.out_proj_backward(cache, rows, dh)?;
        // recomputed (see BlockCache): xc = conv1d(x) + b, v = silu(xc)
        let (xc, v) = match &self.conv {
            Some(conv) => {
                let mut xc = vec![T::ZERO; rows * e];
                causal_conv1d_forward(
                    &self.conv_shape(batch, len),
                    &cache.x,
                    conv.weight,
                    conv.bias,
                    &mut xc,
                )?;
                let v = xc.iter().map(|&a| a.silu()).collect();
                (xc, Values::Owned(v))
            }
            None => (Vec::new(), Values::Borrowed(cache.x.as_slice())),
        };
        let mut dz = Vec::new();
        let (dv, mixer) = match &self.mixer {
            Mixer::S6(s6) => {
                // Falcon-Mamba: the normalised dt_low, B, C, recomputed
                let normed_owned;
                let (dt_low, b_in, c_in) = match s6.dt_bc_rms_eps {
                    None => (&cache.dt_low, &cache.b, &cache.c),
                    Some(eps) => {
                        normed_owned = [(&cache.dt_low, r), (&cache.b, n), (&cache.c, n)].map(
                            |(raw, dim): (&Vec<T>, usize)| {
                                let mut x = raw.clone();
                                rms_normalize_rows(&mut x, dim, eps);
                                x
                            },
                        );
                        (&normed_owned[0], &normed_owned[1], &normed_owned[2])
                    }
                };
                let mut delta = vec![T::ZERO; rows * e];
                s6.dt_proj.forward(dt_low, rows, &mut delta, false)?;
                // nogate: y = silu(s)
                let ds_owned: Vec<T>;
                let ds = if gated {
                    &dy
                } else {
                    ds_owned = dy
                        .iter()
                        .zip(&cache.s)
                        .map(|(&g, &s)| g * s.silu_grad())
                        .collect();
                    &ds_owned
                };
                let inputs = ScanInputs {
                    u: &v,
                    delta: &delta,
                    a: &s6.a,
                    b: b_in,
                    c: c_in,
                    d: Some(s6.d),
                    z: gated.then_some(cache.z.as_slice()),
                    delta_bias: Some(s6.dt_bias),
                    initial_state: None,
                };
                let mut sg = selective_scan_backward(
                    &self.scan_shape(batch, len),
                    &inputs,
                    &scan_options(),
                    &cache.checkpoints,
                    ds,
                    None,
                )?;
                drop(delta);
                let a_log =
                    sg.a.iter()
                        .zip(s6.a.iter())
                        .map(|(&da, &a)| da * a)
                        .collect();
                let missing = || invalid(OP, "the scan returned no gradient for a given input");
                let d_grad = sg.d.ok_or_else(missing)?;
                let dt_proj_bias = sg.delta_bias.ok_or_else(missing)?;
                if gated {
                    dz = sg.z.ok_or_else(missing)?;
                }
                // delta = dt_low W_dtᵀ
                let mut d_dt_low = vec![T::ZERO; rows * r];
                matmul_xw(
                    &sg.delta,
                    s6.dt_proj.weight,
                    rows,
                    e,
                    r,
                    &mut d_dt_low,
                    false,
                )?;
                let mut dt_proj_weight = vec![T::ZERO; e * r];
                matmul_xtw(&sg.delta, dt_low, rows, e, r, &mut dt_proj_weight, false)?;
                if let Some(eps) = s6.dt_bc_rms_eps {
                    // through x̂ = x / rms(x) of each of the three
                    let through = |raw: &[T], g: &[T], dim: usize| -> Result<Vec<T>> {
                        let ones = vec![T::ONE; dim];
                        Ok(rms_norm_backward(raw, &ones, dim, <T as Float>::from_f64(eps), g)?.x)
                    };
                    d_dt_low = through(&cache.dt_low, &d_dt_low, r)?;
                    sg.b = through(&cache.b, &sg.b, n)?;
                    sg.c = through(&cache.c, &sg.c, n)?;
                }
                // [dt_low, B, C] = v W_xᵀ
                let mut dv = sg.u;
                let wx = &s6.x_proj;
                let mut gx = vec![T::ZERO; (r + 2 * n) * e];
                let parts = [
                    (&d_dt_low, 0, r),
                    (&sg.b, r, r + n),
                    (&sg.c, r + n, r + 2 * n),
                ];
                for (g, r0, r1) in parts {
                    matmul_xw(g, wx.row_range(r0, r1), rows, r1 - r0, e, &mut dv, true)?;
                    matmul_xtw(g, &v, rows, r1 - r0, e, &mut gx[r0 * e..r1 * e], false)?;
                }
                let grads = MixerGradients::S6 {
                    x_proj_weight: gx,
                    dt_proj_weight,
                    dt_proj_bias,
                    a_log,
                    d: d_grad,
                };
                (dv, grads)
            }
            Mixer::S4d(p) => {
                // y = s ⊙ silu(z)  or  y = silu(s)
                let ds: Vec<T> = if gated {
                    dz = dy
                        .iter()
                        .zip(&cache.s)
                        .zip(&cache.z)
                        .map(|((&g, &s), &z)| g * s * z.silu_grad())
                        .collect();
                    dy.iter()
                        .zip(&cache.z)
                        .map(|(&g, &z)| g * z.silu())
                        .collect()
                } else {
                    dy.iter()
                        .zip(&cache.s)
                        .map(|(&g, &s)| g * s.silu_grad())
                        .collect()
                };
                let mut sg = s4d_backward_conv(p, &v, &ds, batch, len)?;
                let dv = std::mem::take(&mut sg.u);
                (dv, MixerGradients::S4d(sg))
            }
            Mixer::Ssd(_) => unreachable!("backward_ssd above"),
        };
        drop(dy);
        // v = silu(conv1d(x) + b)  or  v = x
        let (dx, conv_weight, conv_bias) = match &self.conv {
            Some(conv) => {
                let dxc: Vec<T> = dv
                    .iter()
                    .zip(&xc)
                    .map(|(&g, &x)| g * x.silu_grad())
                    .collect();
                let cg = causal_conv1d_backward(
                    &self.conv_shape(batch, len),
                    &cache.x,
                    conv.weight,
                    conv.bias.is_some(),
                    &dxc,
                )?;
                (cg.x, cg.weight, cg.bias)
            }
            None => (dv, Vec::new(), None),
        };
        drop((xc, v));
        // x = u W_inxᵀ, z = u W_inzᵀ (+ b_in)
        let mut normed = vec![T::ZERO; rows * d];
        self.norm(&cache.resid, &mut normed)?;
        let w_in = &self.in_proj;
        let mut d_normed = vec![T::ZERO; rows * d];
        let mut in_proj_weight = vec![T::ZERO; self.in_rows() * d];
        matmul_xw(&dx, w_in.row_range(0, e), rows, e, d, &mut d_normed, false)?;
        matmul_xtw(
            &dx,
            &normed,
            rows,
            e,
            d,
            &mut in_proj_weight[..e * d],
            false,
        )?;
        if gated {
            matmul_xw(
                &dz,
                w_in.row_range(e, 2 * e),
                rows,
                e,
                d,
                &mut d_normed,
                true,
            )?;
            matmul_xtw(
                &dz,
                &normed,
                rows,
                e,
                d,
                &mut in_proj_weight[e * d..],
                false,
            )?;
        }
        let in_proj_bias = self.in_proj_bias.map(|b| {
            let mut g = vec![T::ZERO; b.len()];
            sum_rows_into(&dx, &mut g[..e]);
            if gated {
                sum_rows_into(&dz, &mut g[e..]);
            }
            g
        });
        let ng = self.input_norm_backward(cache, &d_normed, dh)?;
        Ok(BlockGradients {
            norm_weight: ng.weight,
            norm_bias: ng.bias,
            in_proj_weight,
            in_proj_bias,
            conv_weight,
            conv_bias,
            mixer,
            out_proj_weight,
            out_proj_bias,
        })
    }
}
