//! Mamba-2's SSD (state space duality) layer: the scalar-decay selective
//! state space model of "Transformers are SSMs" (Dao & Gu, 2024), computed
//! in its chunked matrix form.
//!
//! Per batch element b, head h, head-dim index p and state index n, with G
//! groups of heads sharing B and C (head h reads group g = h / (H/G)):
//!
//! ```text
//! Δ_t[h]   = clamp(softplus(dt_t[h] + dt_bias[h]), lo, hi)      dt_limit = (lo, hi)
//! S_t[h]   = exp(Δ_t[h] A[h]) S_{t-1}[h] + Δ_t[h] x_t[h,:] ⊗ B_t[g,:]    S: (P, N)
//! y_t[h,p] = Σ_n S_t[h][p,n] C_t[g,n] + D[h] x_t[h,p],    S_{-1} = initial state (default 0)
//! ```
//!
//! A is one negative scalar per head (the caller computes A = -exp(A_log)),
//! so the decay exp(Δ A) is the same for every (p, n) of a head: that is
//! what makes the quadratic (attention-like) form below exact.
//!
//! # Chunked (matrix) form
//!
//! The sequence is cut into chunks of Q = `chunk_len` positions (the last
//! one shorter). Inside a chunk, with a_cum[t] = Σ_{τ≤t} Δ_τ A (local t)
//! and S_prev the state entering the chunk:
//!
//! ```text
//! L[t,s]   = exp(a_cum[t] - a_cum[s])  for s ≤ t, else 0            (Q, Q)
//! Y_intra  = (L ⊙ C Bᵀ) (Δ ⊙ X)                                     (Q, P)
//! Y_inter  = diag(exp(a_cum)) C S_prevᵀ                             (Q, P)
//! y        = Y_intra + Y_inter + D x
//! S_end    = Σ_s exp(a_cum[Q-1] - a_cum[s]) Δ_s x_s ⊗ B_s            (P, N)
//! S_next   = exp(a_cum[Q-1]) S_prev + S_end
//! ```
//!
//! C Bᵀ is the same for every head of a group and is computed once per
//! (chunk, group); the products go to the GEMM of [`super::matmul`]. Only
//! the cheap state recurrence S_prev → S_next runs sequentially over chunks.
//!
//! # Memory layout (row-major, last index fastest)
//!
//! ```text
//! x, y                   (batch, len, heads, head_dim)    token-major, as the projections give them
//! dt                     (batch, len, heads)              raw, before dt_bias and softplus
//! dt_bias, A, D          (heads)
//! B, C                   (batch, len, groups, state)
//! initial / final state  (batch, heads, head_dim, state)
//! chunk_states           (batch, n_chunks, heads, head_dim, state)
//! ```
//!
//! Entry k of `chunk_states` is the state entering chunk k (before position
//! k·Q; entry 0 is the initial state): what the backward recomputes each
//! chunk from. Nothing per position × state is ever stored.
//!
//! # Threads
//!
//! The forward runs in three phases: (1) every (batch, chunk, group) unit
//! in parallel: C Bᵀ once, then per head of the group Y_intra (written to y
//! with D x) and S_end; (2) per (batch, head) pair, the chunk-to-chunk
//! state recurrence; (3) every (batch, chunk, group) unit again: Y_inter added to
//! y. Units over chunks (rather than (batch, head) pairs) keep both cores
//! busy on one sequence with one group, and units over groups (rather than
//! heads) share C Bᵀ between a group's heads. The backward mirrors it: the
//! state gradient entering each chunk from the right, its reverse recurrence,
//! then every gradient of a chunk from the kept state entering it.
//!
//! Every output element is written by one unit, in an order fixed by the
//! shape; the per-head sums over the sequence (dA, dD, d dt_bias) are kept
//! per (batch, chunk, head) and added in order at the end; dB and dC sum a
//! group's heads inside the unit that owns the group's rows. So the bits of
//! every result do not depend on the number of threads.

use rayon::prelude::*;

use super::matmul::{matmul_xtw, matmul_xw, matmul_xwt, MatmulScalar};
use super::shared::SharedMut;
use crate::error::{check_len, invalid, Result};
use crate::float::Float;

/// Sizes of an SSD layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SsdShape {
    pub batch: usize,
    pub len: usize,
    /// H, the number of heads.
    pub heads: usize,
    /// P, the channels per head.
    pub head_dim: usize,
    /// G, the groups of heads sharing B and C (divides H).
    pub groups: usize,
    /// N, the state size.
    pub state: usize,
}

impl SsdShape {
    /// Heads per group, H / G.
    pub fn heads_per_group(&self) -> usize {
        self.heads / self.groups.max(1)
    }
    pub fn n_chunks(&self, chunk_len: usize) -> usize {
        self.len.div_ceil(chunk_len)
    }
    /// Elements of the `chunk_states` buffer for `chunk_len`.
    pub fn chunk_states_len(&self, chunk_len: usize) -> usize {
        self.batch * self.n_chunks(chunk_len) * self.state_len()
    }
    /// Elements of one sequence's state, H·P·N.
    pub fn state_len(&self) -> usize {
        self.heads * self.head_dim * self.state
    }
    /// The per-token sizes, for [`ssd_step`].
    pub fn step_shape(&self) -> SsdStepShape {
        SsdStepShape {
            heads: self.heads,
            head_dim: self.head_dim,
            groups: self.groups,
            state: self.state,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SsdOptions {
    /// Q, the positions of a chunk of the matrix form (and between the
    /// states kept for the backward). The default 256 is Mamba-2's. The
    /// intra-chunk work per token grows with Q and the state work with N:
    /// on one CPU core at L = 2048, H = 24, P = 64, N = 128 (f32) the
    /// forward took 24 ms with Q = 64, 30 ms with 128 and 54 ms with 256.
    pub chunk_len: usize,
    /// (lo, hi): Δ is clamped to [lo, hi] after softplus. The default
    /// (0, +inf) clamps nothing.
    pub dt_limit: (f64, f64),
}

impl Default for SsdOptions {
    fn default() -> Self {
        Self {
            chunk_len: 256,
            dt_limit: (0.0, f64::INFINITY),
        }
    }
}

/// Inputs of an SSD layer, in the layout of the module documentation.
#[derive(Clone, Copy, Debug)]
pub struct SsdInputs<'a, T> {
    pub x: &'a [T],
    /// Raw dt, before dt_bias, softplus and the clamp.
    pub dt: &'a [T],
    pub dt_bias: &'a [T],
    /// The negative per-head decay rate.
    pub a: &'a [T],
    pub b: &'a [T],
    pub c: &'a [T],
    pub d: &'a [T],
    pub initial_state: Option<&'a [T]>,
}

/// Output of [`ssd`] and [`super::ssd_reference`].
#[derive(Clone, Debug)]
pub struct SsdOutput<T> {
    /// (batch, len, heads, head_dim)
    pub y: Vec<T>,
    /// (batch, heads, head_dim, state)
    pub final_state: Vec<T>,
}

/// Gradients of an SSD layer, one per input, in the inputs' layouts.
/// `initial_state` is present exactly when the input was given.
#[derive(Clone, Debug, PartialEq)]
pub struct SsdGrads<T> {
    pub x: Vec<T>,
    /// With respect to the raw dt.
    pub dt: Vec<T>,
    pub dt_bias: Vec<T>,
    pub a: Vec<T>,
    pub b: Vec<T>,
    pub c: Vec<T>,
    pub d: Vec<T>,
    pub initial_state: Option<Vec<T>>,
}

impl<T: Float> SsdGrads<T> {
    pub(crate) fn zeros(inputs: &SsdInputs<'_, T>) -> Self {
        let z = |v: &[T]| vec![T::ZERO; v.len()];
        Self {
            x: z(inputs.x),
            dt: z(inputs.dt),
            dt_bias: z(inputs.dt_bias),
            a: z(inputs.a),
            b: z(inputs.b),
            c: z(inputs.c),
            d: z(inputs.d),
            initial_state: inputs.initial_state.map(z),
        }
    }
}

/// Checks the sizes and options, then every input against `shape`, naming
/// the first that does not fit.
pub fn validate_inputs<T>(
    op: &'static str,
    shape: &SsdShape,
    inputs: &SsdInputs<'_, T>,
    options: &SsdOptions,
) -> Result<()> {
    let SsdShape {
        batch,
        len,
        heads,
        head_dim,
        groups,
        state,
    } = *shape;
    for (name, v) in [
        ("batch", batch),
        ("len", len),
        ("heads", heads),
        ("head_dim", head_dim),
        ("groups", groups),
        ("state", state),
    ] {
        if v == 0 {
            return Err(invalid(op, format!("{name} must be at least 1")));
        }
    }
    if !heads.is_multiple_of(groups) {
        return Err(invalid(
            op,
            format!("heads ({heads}) must be a multiple of groups ({groups})"),
        ));
    }
    if options.chunk_len == 0 {
        return Err(invalid(op, "chunk_len must be at least 1"));
    }
    check_dt_limit(op, options.dt_limit)?;
    let per_head = [("heads", heads)];
    let act = [
        ("batch", batch),
        ("len", len),
        ("heads", heads),
        ("head_dim", head_dim),
    ];
    let per_token = [
        ("batch", batch),
        ("len", len),
        ("groups", groups),
        ("state", state),
    ];
    check_len(op, "x", inputs.x, &act)?;
    check_len(
        op,
        "dt",
        inputs.dt,
        &[("batch", batch), ("len", len), ("heads", heads)],
    )?;
    check_len(op, "dt_bias", inputs.dt_bias, &per_head)?;
    check_len(op, "A", inputs.a, &per_head)?;
    check_len(op, "B", inputs.b, &per_token)?;
    check_len(op, "C", inputs.c, &per_token)?;
    check_len(op, "D", inputs.d, &per_head)?;
    if let Some(s0) = inputs.initial_state {
        check_len(op, "initial_state", s0, &state_dims(shape))?;
    }
    Ok(())
}

fn check_dt_limit(op: &'static str, (lo, hi): (f64, f64)) -> Result<()> {
    if lo.is_nan() || hi.is_nan() || lo > hi {
        return Err(invalid(
            op,
            format!("dt_limit ({lo}, {hi}) must have lo <= hi"),
        ));
    }
    Ok(())
}

/// (batch, heads, head_dim, state), for error messages.
fn state_dims(shape: &SsdShape) -> [(&'static str, usize); 4] {
    [
        ("batch", shape.batch),
        ("heads", shape.heads),
        ("head_dim", shape.head_dim),
        ("state", shape.state),
    ]
}

fn chunk_state_dims(shape: &SsdShape, chunk_len: usize) -> [(&'static str, usize); 5] {
    [
        ("batch", shape.batch),
        ("n_chunks", shape.n_chunks(chunk_len)),
        ("heads", shape.heads),
        ("head_dim", shape.head_dim),
        ("state", shape.state),
    ]
}

/// Δ = clamp(softplus(v), lo, hi) for v = dt + dt_bias, and dΔ/dv: σ(v)
/// (softplus' derivative) where the clamp let Δ through, 0 where it
/// clamped (as `torch.clamp`, which passes the gradient at the bounds).
#[inline(always)]
pub(crate) fn delta_and_grad<T: Float>(v: T, lo: T, hi: T) -> (T, T) {
    let sp = v.softplus();
    if sp < lo {
        (lo, T::ZERO)
    } else if sp > hi {
        (hi, T::ZERO)
    } else {
        (sp, v.softplus_grad())
    }
}

/// SSD forward, allocating its outputs.
pub fn ssd<T: MatmulScalar>(
    shape: &SsdShape,
    inputs: &SsdInputs<'_, T>,
    options: &SsdOptions,
) -> Result<SsdOutput<T>> {
    validate_inputs("ssd", shape, inputs, options)?;
    let mut y = vec![T::ZERO; inputs.x.len()];
    let mut final_state = vec![T::ZERO; shape.batch * shape.state_len()];
    ssd_forward(shape, inputs, options, &mut y, Some(&mut final_state), None)?;
    Ok(SsdOutput { y, final_state })
}

/// SSD forward (the chunked form) into caller-owned buffers.
///
/// `y`: (batch, len, heads, head_dim). `final_state`: (batch, heads,
/// head_dim, state). `chunk_states`: (batch, n_chunks, heads, head_dim,
/// state) with n_chunks = ceil(len / chunk_len), entry k the state entering
/// chunk k; pass it to keep what [`ssd_backward`] needs.
pub fn ssd_forward<T: MatmulScalar>(
    shape: &SsdShape,
    inputs: &SsdInputs<'_, T>,
    options: &SsdOptions,
    y: &mut [T],
    final_state: Option<&mut [T]>,
    chunk_states: Option<&mut [T]>,
) -> Result<()> {
    const OP: &str = "ssd_forward";
    validate_inputs(OP, shape, inputs, options)?;
    check_len(
        OP,
        "y",
        y,
        &[
            ("batch", shape.batch),
            ("len", shape.len),
            ("heads", shape.heads),
            ("head_dim", shape.head_dim),
        ],
    )?;
    if let Some(fs) = &final_state {
        check_len(OP, "final_state", fs, &state_dims(shape))?;
    }
    if let Some(cs) = &chunk_states {
        check_len(
            OP,
            "chunk_states",
            cs,
            &chunk_state_dims(shape, options.chunk_len),
        )?;
    }
    let ctx = Ctx::new(shape, inputs, options);
    // Phase 1 writes each chunk's S_end where phase 2 then leaves the state
    // entering the chunk: the caller's buffer if it keeps them.
    let mut own_states = Vec::new();
    let states: &mut [T] = match chunk_states {
        Some(cs) => cs,
        None => {
            own_states.resize(shape.chunk_states_len(options.chunk_len), T::ZERO);
            &mut own_states
        }
    };
    // exp(a_cum[Q-1]) of every (batch, chunk, head): the decay over the chunk.
    let mut decay = vec![T::ZERO; shape.batch * ctx.n_chunks * shape.heads];
    forward_chunks(&ctx, y, states, &mut decay)?;
    let last = pass_states_forward(&ctx, states, &decay);
    if let Some(fs) = final_state {
        fs.copy_from_slice(&last);
    }
    add_inter_chunk_outputs(&ctx, y, states)?;
    Ok(())
}

/// Everything a worker needs, with the shape spelled out.
struct Ctx<'a, T> {
    batch: usize,
    len: usize,
    heads: usize,
    head_dim: usize,
    groups: usize,
    state: usize,
    /// H / G
    hpg: usize,
    chunk_len: usize,
    n_chunks: usize,
    lo: T,
    hi: T,
    inputs: SsdInputs<'a, T>,
}

impl<'a, T: Float> Ctx<'a, T> {
    fn new(shape: &SsdShape, inputs: &SsdInputs<'a, T>, options: &SsdOptions) -> Self {
        Self {
            batch: shape.batch,
            len: shape.len,
            heads: shape.heads,
            head_dim: shape.head_dim,
            groups: shape.groups,
            state: shape.state,
            hpg: shape.heads / shape.groups,
            chunk_len: options.chunk_len,
            n_chunks: shape.n_chunks(options.chunk_len),
            lo: T::from_f64(options.dt_limit.0),
            hi: T::from_f64(options.dt_limit.1),
            inputs: *inputs,
        }
    }

    /// Rows of the largest chunk.
    fn max_chunk(&self) -> usize {
        self.chunk_len.min(self.len)
    }

    /// The (batch, chunk, group) units of the parallel phases.
    fn units(&self) -> usize {
        self.batch * self.n_chunks * self.groups
    }

    /// (b, chunk, group) of a unit.
    fn unit(&self, u: usize) -> (usize, usize, usize) {
        let g = u % self.groups;
        let bc = u / self.groups;
        (bc / self.n_chunks, bc % self.n_chunks, g)
    }

    /// First position and length of chunk k.
    fn chunk_range(&self, k: usize) -> (usize, usize) {
        let t0 = k * self.chunk_len;
        (t0, self.chunk_len.min(self.len - t0))
    }

    /// Offset of (b, k, h, 0, 0) in a (batch, n_chunks, H, P, N) buffer.
    fn slot(&self, b: usize, k: usize, h: usize) -> usize {
        ((b * self.n_chunks + k) * self.heads + h) * self.head_dim * self.state
    }

    /// For head h over positions t0..t0+q of batch element b: Δ, the
    /// cumulative log-decay a_cum and (if asked) dΔ/d dt.
    #[allow(clippy::too_many_arguments)]
    fn head_chunk(
        &self,
        b: usize,
        t0: usize,
        q: usize,
        h: usize,
        dt: &mut [T],
        cum: &mut [T],
        grad: Option<&mut [T]>,
    ) {
        let (bias, a) = (self.inputs.dt_bias[h], self.inputs.a[h]);
        let mut acc = T::ZERO;
        let mut grad = grad;
        for j in 0..q {
            let raw = self.inputs.dt[(b * self.len + t0 + j) * self.heads + h];
            let (delta, g) = delta_and_grad(raw + bias, self.lo, self.hi);
            dt[j] = delta;
            acc += delta * a;
            cum[j] = acc;
            if let Some(gr) = grad.as_deref_mut() {
                gr[j] = g;
            }
        }
    }
}

/// Copies rows row0..row0+q, columns col0..col0+cols of a row-major
/// matrix `width` wide into `dst` (q, cols).
fn gather<T: Copy>(
    src: &[T],
    width: usize,
    row0: usize,
    q: usize,
    col0: usize,
    cols: usize,
    dst: &mut [T],
) {
    for (i, d) in dst[..q * cols].chunks_exact_mut(cols).enumerate() {
        let o = (row0 + i) * width + col0;
        d.copy_from_slice(&src[o..o + cols]);
    }
}

/// Per-worker buffers of the forward, sized for the largest chunk
/// (Q = rows, G·P stands for the H/G heads' P channels side by side).
struct ForwardScratch<T> {
    /// B and C of the group over the chunk: (Q, N) each
    bg: Vec<T>,
    cg: Vec<T>,
    /// C Bᵀ (Q, Q), then (L ⊙ C Bᵀ) diag(Δ) of one head
    cb: Vec<T>,
    w: Vec<T>,
    /// x of the group's heads (Q, hpg·P); the weighted rows for S_end (Q, hpg·P)
    xg: Vec<T>,
    xw: Vec<T>,
    /// x and Y_intra of one head (Q, P)
    xh: Vec<T>,
    yh: Vec<T>,
    /// Δ and a_cum of one head (Q)
    dt: Vec<T>,
    cum: Vec<T>,
}

impl<T: Float> ForwardScratch<T> {
    fn new(ctx: &Ctx<'_, T>) -> Self {
        let q = ctx.max_chunk();
        let gp = ctx.hpg * ctx.head_dim;
        let z = |n: usize| vec![T::ZERO; n];
        Self {
            bg: z(q * ctx.state),
            cg: z(q * ctx.state),
            cb: z(q * q),
            w: z(q * q),
            xg: z(q * gp),
            xw: z(q * gp),
            xh: z(q * ctx.head_dim),
            yh: z(q * ctx.head_dim),
            dt: z(q),
            cum: z(q),
        }
    }
}

/// Phase 1 of the forward: y = Y_intra + D x, S_end of every chunk into
/// `states` and the decay over every chunk into `decay` (batch, n_chunks, H).
fn forward_chunks<T: MatmulScalar>(
    ctx: &Ctx<'_, T>,
    y: &mut [T],
    states: &mut [T],
    decay: &mut [T],
) -> Result<()> {
    let (hp, gn, p, n, hpg) = (
        ctx.heads * ctx.head_dim,
        ctx.groups * ctx.state,
        ctx.head_dim,
        ctx.state,
        ctx.hpg,
    );
    let gp = hpg * p;
    let inp = &ctx.inputs;
    let y = SharedMut::new(y);
    let states = SharedMut::new(states);
    let decay = SharedMut::new(decay);
    (0..ctx.units()).into_par_iter().try_for_each_init(
        || ForwardScratch::new(ctx),
        |s, unit| -> Result<()> {
            let (b, k, g) = ctx.unit(unit);
            let (t0, q) = ctx.chunk_range(k);
            let row0 = b * ctx.len + t0;
            gather(inp.b, gn, row0, q, g * n, n, &mut s.bg);
            gather(inp.c, gn, row0, q, g * n, n, &mut s.cg);
            gather(inp.x, hp, row0, q, g * gp, gp, &mut s.xg);
            let (bg, cg) = (&s.bg[..q * n], &s.cg[..q * n]);
            // C Bᵀ: (Q, N) · (N, Q), shared by the group's heads
            matmul_xwt(cg, bg, q, n, q, &mut s.cb[..q * q], false)?;
            for j in 0..hpg {
                let h = g * hpg + j;
                ctx.head_chunk(b, t0, q, h, &mut s.dt, &mut s.cum, None);
                let (dt, cum) = (&s.dt[..q], &s.cum[..q]);
                // W[t, s] = exp(a_cum[t] - a_cum[s]) (C_t · B_s) Δ_s, s ≤ t
                for (t, wr) in s.w[..q * q].chunks_exact_mut(q).enumerate() {
                    let cbr = &s.cb[t * q..(t + 1) * q];
                    for si in 0..=t {
                        wr[si] = (cum[t] - cum[si]).exp() * cbr[si] * dt[si];
                    }
                    wr[t + 1..].fill(T::ZERO);
                }
                for t in 0..q {
                    s.xh[t * p..(t + 1) * p]
                        .copy_from_slice(&s.xg[t * gp + j * p..t * gp + (j + 1) * p]);
                }
                let xh = &s.xh[..q * p];
                // Y_intra = W X: (Q, Q) · (Q, P)
                matmul_xw(&s.w[..q * q], xh, q, q, p, &mut s.yh[..q * p], false)?;
                let dh = inp.d[h];
                let last = cum[q - 1];
                for t in 0..q {
                    // SAFETY: this unit owns head h of rows row0..row0+q.
                    let dst = unsafe { y.slice((row0 + t) * hp + h * p, p) };
                    let (xr, yr) = (&xh[t * p..(t + 1) * p], &s.yh[t * p..(t + 1) * p]);
                    for i in 0..p {
                        dst[i] = dh.mul_add(xr[i], yr[i]);
                    }
                    // The row's weight in S_end: exp(a_cum[Q-1] - a_cum[t]) Δ_t
                    let wt = (last - cum[t]).exp() * dt[t];
                    let xw = &mut s.xw[t * gp + j * p..t * gp + (j + 1) * p];
                    for i in 0..p {
                        xw[i] = wt * xr[i];
                    }
                }
                // SAFETY: entry (b, k, h) belongs to this unit.
                unsafe { decay.slice((b * ctx.n_chunks + k) * ctx.heads + h, 1)[0] = last.exp() };
            }
            // S_end of the group's heads, (hpg·P, N) = Xwᵀ B: contiguous in
            // the (H, P, N) layout.
            // SAFETY: heads g·hpg..(g+1)·hpg of entry (b, k) belong to this unit.
            let dst = unsafe { states.slice(ctx.slot(b, k, g * hpg), gp * n) };
            matmul_xtw(&s.xw[..q * gp], bg, q, gp, n, dst, false)
        },
    )
}

/// Phase 2 of the forward: turns S_end of every chunk in `states` into the
/// state entering that chunk; returns the final states (batch, H, P, N).
/// Every (batch, head) pair is its own chain over the chunks, so the pairs
/// run in parallel (one sequence still keeps every thread busy).
fn pass_states_forward<T: Float>(ctx: &Ctx<'_, T>, states: &mut [T], decay: &[T]) -> Vec<T> {
    let pn = ctx.head_dim * ctx.state;
    let mut last = vec![T::ZERO; ctx.batch * ctx.heads * pn];
    let chains = SharedMut::new(states);
    let finals = SharedMut::new(&mut last);
    (0..ctx.batch * ctx.heads).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / ctx.heads, bh % ctx.heads);
        // SAFETY: pair (b, h) owns its final state and its slot of every chunk.
        let cur = unsafe { finals.slice(bh * pn, pn) };
        if let Some(s0) = ctx.inputs.initial_state {
            cur.copy_from_slice(&s0[bh * pn..(bh + 1) * pn]);
        }
        for k in 0..ctx.n_chunks {
            let a = decay[(b * ctx.n_chunks + k) * ctx.heads + h];
            let slot = unsafe { chains.slice(ctx.slot(b, k, h), pn) };
            for (sv, cv) in slot.iter_mut().zip(cur.iter_mut()) {
                let end = *sv;
                *sv = *cv;
                *cv = a.mul_add(*cv, end);
            }
        }
    });
    last
}

/// Phase 3 of the forward: y += diag(exp(a_cum)) C S_prevᵀ per chunk.
fn add_inter_chunk_outputs<T: MatmulScalar>(
    ctx: &Ctx<'_, T>,
    y: &mut [T],
    states: &[T],
) -> Result<()> {
    let (hp, gn, p, n, hpg) = (
        ctx.heads * ctx.head_dim,
        ctx.groups * ctx.state,
        ctx.head_dim,
        ctx.state,
        ctx.hpg,
    );
    let gp = hpg * p;
    let q_max = ctx.max_chunk();
    let y = SharedMut::new(y);
    (0..ctx.units()).into_par_iter().try_for_each_init(
        || {
            (
                vec![T::ZERO; q_max * n],
                vec![T::ZERO; q_max * gp],
                vec![T::ZERO; q_max],
                vec![T::ZERO; q_max],
            )
        },
        |(cg, z, dt, cum), unit| -> Result<()> {
            let (b, k, g) = ctx.unit(unit);
            if k == 0 && ctx.inputs.initial_state.is_none() {
                return Ok(()); // S_prev = 0
            }
            let (t0, q) = ctx.chunk_range(k);
            let row0 = b * ctx.len + t0;
            gather(ctx.inputs.c, gn, row0, q, g * n, n, cg);
            let s_prev = &states[ctx.slot(b, k, g * hpg)..][..gp * n];
            // C S_prevᵀ for the group's heads: (Q, N) · (N, hpg·P)
            matmul_xwt(&cg[..q * n], s_prev, q, n, gp, &mut z[..q * gp], false)?;
            for j in 0..hpg {
                let h = g * hpg + j;
                ctx.head_chunk(b, t0, q, h, dt, cum, None);
                for t in 0..q {
                    let e = cum[t].exp();
                    // SAFETY: this unit owns head h of rows row0..row0+q.
                    let dst = unsafe { y.slice((row0 + t) * hp + h * p, p) };
                    let zr = &z[t * gp + j * p..t * gp + (j + 1) * p];
                    for i in 0..p {
                        dst[i] = e.mul_add(zr[i], dst[i]);
                    }
                }
            }
            Ok(())
        },
    )
}

/// SSD backward by recomputation inside each chunk.
///
/// `chunk_states` must come from [`ssd_forward`] with the same inputs and
/// options. `dy`: (batch, len, heads, head_dim), the gradient of the loss
/// with respect to y. `d_final_state`: (batch, heads, head_dim, state), if
/// the final state feeds the loss.
pub fn ssd_backward<T: MatmulScalar>(
    shape: &SsdShape,
    inputs: &SsdInputs<'_, T>,
    options: &SsdOptions,
    chunk_states: &[T],
    dy: &[T],
    d_final_state: Option<&[T]>,
) -> Result<SsdGrads<T>> {
    const OP: &str = "ssd_backward";
    validate_inputs(OP, shape, inputs, options)?;
    check_len(
        OP,
        "chunk_states",
        chunk_states,
        &chunk_state_dims(shape, options.chunk_len),
    )?;
    check_len(
        OP,
        "dy",
        dy,
        &[
            ("batch", shape.batch),
            ("len", shape.len),
            ("heads", shape.heads),
            ("head_dim", shape.head_dim),
        ],
    )?;
    if let Some(g) = d_final_state {
        check_len(OP, "d_final_state", g, &state_dims(shape))?;
    }
    let ctx = Ctx::new(shape, inputs, options);
    let mut grads = SsdGrads::zeros(inputs);
    // The gradient with respect to the state leaving every chunk, in the
    // chunk-states layout, and the decay over every chunk.
    let mut d_states = vec![T::ZERO; chunk_states.len()];
    let mut decay = vec![T::ZERO; shape.batch * ctx.n_chunks * shape.heads];
    state_grads_from_outputs(&ctx, dy, &mut d_states, &mut decay)?;
    let d_initial = pass_state_grads_backward(&ctx, &mut d_states, &decay, d_final_state);
    if let Some(gi) = grads.initial_state.as_mut() {
        gi.copy_from_slice(&d_initial);
    }
    // dA, dD and d dt_bias of every (batch, chunk, head), summed in order below.
    let parts = shape.batch * ctx.n_chunks * shape.heads;
    let mut partials = vec![[T::ZERO; 3]; parts];
    backward_chunks(&ctx, chunk_states, &d_states, dy, &mut grads, &mut partials)?;
    for h in 0..shape.heads {
        let mut sums = [T::ZERO; 3];
        for bk in 0..shape.batch * ctx.n_chunks {
            let part = &partials[bk * shape.heads + h];
            for (s, v) in sums.iter_mut().zip(part) {
                *s += *v;
            }
        }
        grads.a[h] = sums[0];
        grads.d[h] = sums[1];
        grads.dt_bias[h] = sums[2];
    }
    Ok(grads)
}

/// Backward phase 1: per chunk, the part of ∂L/∂S_prev that comes from the
/// chunk's own outputs, Σ_t exp(a_cum[t]) dy_t ⊗ C_t, into `d_states`, and
/// the decay over every chunk into `decay`.
fn state_grads_from_outputs<T: MatmulScalar>(
    ctx: &Ctx<'_, T>,
    dy: &[T],
    d_states: &mut [T],
    decay: &mut [T],
) -> Result<()> {
    let (hp, gn, p, n, hpg) = (
        ctx.heads * ctx.head_dim,
        ctx.groups * ctx.state,
        ctx.head_dim,
        ctx.state,
        ctx.hpg,
    );
    let gp = hpg * p;
    let q_max = ctx.max_chunk();
    let d_states = SharedMut::new(d_states);
    let decay = SharedMut::new(decay);
    (0..ctx.units()).into_par_iter().try_for_each_init(
        || {
            (
                vec![T::ZERO; q_max * n],
                vec![T::ZERO; q_max * gp],
                vec![T::ZERO; q_max],
                vec![T::ZERO; q_max],
            )
        },
        |(cg, dys, dt, cum), unit| -> Result<()> {
            let (b, k, g) = ctx.unit(unit);
            let (t0, q) = ctx.chunk_range(k);
            let row0 = b * ctx.len + t0;
            gather(ctx.inputs.c, gn, row0, q, g * n, n, cg);
            gather(dy, hp, row0, q, g * gp, gp, dys);
            for j in 0..hpg {
                let h = g * hpg + j;
                ctx.head_chunk(b, t0, q, h, dt, cum, None);
                for t in 0..q {
                    let e = cum[t].exp();
                    for v in &mut dys[t * gp + j * p..t * gp + (j + 1) * p] {
                        *v *= e;
                    }
                }
                // SAFETY: entry (b, k, h) belongs to this unit.
                unsafe {
                    decay.slice((b * ctx.n_chunks + k) * ctx.heads + h, 1)[0] = cum[q - 1].exp()
                };
            }
            // (hpg·P, N) = (exp(a_cum) ⊙ dy)ᵀ C
            // SAFETY: heads g·hpg..(g+1)·hpg of entry (b, k) belong to this unit.
            let dst = unsafe { d_states.slice(ctx.slot(b, k, g * hpg), gp * n) };
            matmul_xtw(&dys[..q * gp], &cg[..q * n], q, gp, n, dst, false)
        },
    )
}

/// Backward phase 2: the reverse state recurrence ∂L/∂S_prev(k) =
/// exp(a_cum[Q-1]) ∂L/∂S_next(k) + (phase 1's term). Leaves ∂L/∂S_next(k),
/// the gradient with respect to the state leaving chunk k, in slot k;
/// returns ∂L/∂(initial state).
fn pass_state_grads_backward<T: Float>(
    ctx: &Ctx<'_, T>,
    d_states: &mut [T],
    decay: &[T],
    d_final_state: Option<&[T]>,
) -> Vec<T> {
    let hpn = ctx.heads * ctx.head_dim * ctx.state;
    let pn = ctx.head_dim * ctx.state;
    let per_batch: Vec<Vec<T>> = d_states
        .par_chunks_mut(ctx.n_chunks * hpn)
        .enumerate()
        .map(|(b, st)| {
            let mut cur = match d_final_state {
                Some(g) => g[b * hpn..(b + 1) * hpn].to_vec(),
                None => vec![T::ZERO; hpn],
            };
            for (k, slot) in st.chunks_exact_mut(hpn).enumerate().rev() {
                for h in 0..ctx.heads {
                    let a = decay[(b * ctx.n_chunks + k) * ctx.heads + h];
                    let range = h * pn..(h + 1) * pn;
                    for (sv, cv) in slot[range.clone()].iter_mut().zip(&mut cur[range]) {
                        let own = *sv;
                        *sv = *cv;
                        *cv = a.mul_add(*cv, own);
                    }
                }
            }
            cur
        })
        .collect();
    per_batch.concat()
}

/// Per-worker buffers of the backward's last phase (Q rows; hpg·P columns
/// hold the group's heads side by side).
struct BackwardScratch<T> {
    /// B, C of the group and their gradients: (Q, N)
    bg: Vec<T>,
    cg: Vec<T>,
    dbg: Vec<T>,
    dcg: Vec<T>,
    /// (Q, Q): C Bᵀ; L; L ⊙ C Bᵀ; dY Xdᵀ; ∂L/∂(C Bᵀ) summed over the heads
    cb: Vec<T>,
    l: Vec<T>,
    m: Vec<T>,
    dm: Vec<T>,
    dcb: Vec<T>,
    /// (Q, hpg·P): x, dy, C S_prevᵀ, B dS_nextᵀ, exp(a_cum) ⊙ dy, the S_end weights ⊙ Δ x
    xg: Vec<T>,
    dyg: Vec<T>,
    zg: Vec<T>,
    bds: Vec<T>,
    lhs_inter: Vec<T>,
    lhs_state: Vec<T>,
    /// (Q, P) of one head: x, dy, Δ ⊙ x, ∂L/∂(Δ ⊙ x)
    xh: Vec<T>,
    dyh: Vec<T>,
    xdh: Vec<T>,
    dxd: Vec<T>,
    /// (Q) of one head: Δ, a_cum, dΔ/d dt, ∂L/∂a_cum
    dt: Vec<T>,
    cum: Vec<T>,
    gate: Vec<T>,
    dcum: Vec<T>,
}

impl<T: Float> BackwardScratch<T> {
    fn new(ctx: &Ctx<'_, T>) -> Self {
        let q = ctx.max_chunk();
        let (p, n) = (ctx.head_dim, ctx.state);
        let gp = ctx.hpg * p;
        let z = |len: usize| vec![T::ZERO; len];
        Self {
            bg: z(q * n),
            cg: z(q * n),
            dbg: z(q * n),
            dcg: z(q * n),
            cb: z(q * q),
            l: z(q * q),
            m: z(q * q),
            dm: z(q * q),
            dcb: z(q * q),
            xg: z(q * gp),
            dyg: z(q * gp),
            zg: z(q * gp),
            bds: z(q * gp),
            lhs_inter: z(q * gp),
            lhs_state: z(q * gp),
            xh: z(q * p),
            dyh: z(q * p),
            xdh: z(q * p),
            dxd: z(q * p),
            dt: z(q),
            cum: z(q),
            gate: z(q),
            dcum: z(q),
        }
    }
}

struct GradOuts<'a, T> {
    x: SharedMut<'a, T>,
    dt: SharedMut<'a, T>,
    b: SharedMut<'a, T>,
    c: SharedMut<'a, T>,
    /// [dA, dD, d dt_bias] per (batch, chunk, head)
    partials: SharedMut<'a, [T; 3]>,
}

/// Backward phase 3: every gradient of every chunk, from the state entering
/// it (`chunk_states`) and the gradient with respect to the state leaving it
/// (`d_states`).
///
/// With Xd = diag(Δ) X, M = L ⊙ C Bᵀ and w_s = exp(a_cum[Q-1] - a_cum[s]):
/// y = M Xd + diag(exp(a_cum)) C S_prevᵀ + D x and
/// S_next = exp(a_cum[Q-1]) S_prev + Xdᵀ diag(w) B, so
///
/// ```text
/// ∂L/∂Xd    = Mᵀ dY + diag(w) B dS_nextᵀ
/// ∂L/∂(CBᵀ) = L ⊙ (dY Xdᵀ)                 (lower triangle; summed over the group's heads)
/// ∂L/∂C     = ∂L/∂(CBᵀ) B + Σ_h diag(exp(a_cum)) dY S_prev
/// ∂L/∂B     = ∂L/∂(CBᵀ)ᵀ C + Σ_h diag(w) Xd dS_next
/// ∂L/∂a_cum : from L (rows +, columns -), exp(a_cum) in Y_inter, w and exp(a_cum[Q-1])
/// ∂L/∂a_s   = Σ_{t≥s} ∂L/∂a_cum[t]; a_s = Δ_s A
/// ```
fn backward_chunks<T: MatmulScalar>(
    ctx: &Ctx<'_, T>,
    chunk_states: &[T],
    d_states: &[T],
    dy: &[T],
    grads: &mut SsdGrads<T>,
    partials: &mut [[T; 3]],
) -> Result<()> {
    let outs = GradOuts {
        x: SharedMut::new(&mut grads.x),
        dt: SharedMut::new(&mut grads.dt),
        b: SharedMut::new(&mut grads.b),
        c: SharedMut::new(&mut grads.c),
        partials: SharedMut::new(partials),
    };
    (0..ctx.units()).into_par_iter().try_for_each_init(
        || BackwardScratch::new(ctx),
        |s, unit| backward_unit(ctx, unit, chunk_states, d_states, dy, &outs, s),
    )
}

fn backward_unit<T: MatmulScalar>(
    ctx: &Ctx<'_, T>,
    unit: usize,
    chunk_states: &[T],
    d_states: &[T],
    dy: &[T],
    outs: &GradOuts<'_, T>,
    s: &mut BackwardScratch<T>,
) -> Result<()> {
    let (hp, gn, p, n, hpg) = (
        ctx.heads * ctx.head_dim,
        ctx.groups * ctx.state,
        ctx.head_dim,
        ctx.state,
        ctx.hpg,
    );
    let gp = hpg * p;
    let inp = &ctx.inputs;
    let (b, k, g) = ctx.unit(unit);
    let (t0, q) = ctx.chunk_range(k);
    let row0 = b * ctx.len + t0;
    let (qq, qn, qg) = (q * q, q * n, q * gp);
    gather(inp.b, gn, row0, q, g * n, n, &mut s.bg);
    gather(inp.c, gn, row0, q, g * n, n, &mut s.cg);
    gather(inp.x, hp, row0, q, g * gp, gp, &mut s.xg);
    gather(dy, hp, row0, q, g * gp, gp, &mut s.dyg);
    let (bg, cg) = (&s.bg[..qn], &s.cg[..qn]);
    // The group's heads' state entering the chunk and gradient leaving it,
    // (hpg·P, N) each.
    let slot = ctx.slot(b, k, g * hpg);
    let s_prev = &chunk_states[slot..slot + gp * n];
    let ds_next = &d_states[slot..slot + gp * n];
    matmul_xwt(cg, bg, q, n, q, &mut s.cb[..qq], false)?;
    // C S_prevᵀ and B dS_nextᵀ: (Q, N) · (N, hpg·P)
    matmul_xwt(cg, s_prev, q, n, gp, &mut s.zg[..qg], false)?;
    matmul_xwt(bg, ds_next, q, n, gp, &mut s.bds[..qg], false)?;
    s.dcb[..qq].fill(T::ZERO);
    for j in 0..hpg {
        let h = g * hpg + j;
        let (a, dh) = (inp.a[h], inp.d[h]);
        ctx.head_chunk(b, t0, q, h, &mut s.dt, &mut s.cum, Some(&mut s.gate));
        let (dt, cum) = (&s.dt[..q], &s.cum[..q]);
        let cols = |t: usize| t * gp + j * p..t * gp + (j + 1) * p;
        for (t, &dt_t) in dt.iter().enumerate() {
            let (xr, dyr) = (&s.xg[cols(t)], &s.dyg[cols(t)]);
            s.xh[t * p..(t + 1) * p].copy_from_slice(xr);
            s.dyh[t * p..(t + 1) * p].copy_from_slice(dyr);
            for (xd, &xv) in s.xdh[t * p..(t + 1) * p].iter_mut().zip(xr) {
                *xd = dt_t * xv;
            }
        }
        // L and M = L ⊙ C Bᵀ, lower triangles
        for t in 0..q {
            let (lr, mr) = (&mut s.l[t * q..(t + 1) * q], &mut s.m[t * q..(t + 1) * q]);
            let cbr = &s.cb[t * q..(t + 1) * q];
            for si in 0..=t {
                lr[si] = (cum[t] - cum[si]).exp();
                mr[si] = lr[si] * cbr[si];
            }
            lr[t + 1..].fill(T::ZERO);
            mr[t + 1..].fill(T::ZERO);
        }
        let (xh, dyh, xdh) = (&s.xh[..q * p], &s.dyh[..q * p], &s.xdh[..q * p]);
        // ∂L/∂Xd = Mᵀ dY: (Q, Q)ᵀ · (Q, P); dY Xdᵀ: (Q, P) · (P, Q)
        matmul_xtw(&s.m[..qq], dyh, q, q, p, &mut s.dxd[..q * p], false)?;
        matmul_xwt(dyh, xdh, q, p, q, &mut s.dm[..qq], false)?;
        let dcum = &mut s.dcum[..q];
        dcum.fill(T::ZERO);
        // Through M[t, s] = exp(a_cum[t] - a_cum[s]) CB[t, s]: ∂/∂a_cum[t] is
        // +M, ∂/∂a_cum[s] is -M (they cancel on the diagonal).
        for t in 0..q {
            let (lr, dmr, cbr) = (
                &s.l[t * q..(t + 1) * q],
                &s.dm[t * q..(t + 1) * q],
                &s.cb[t * q..(t + 1) * q],
            );
            let dcbr = &mut s.dcb[t * q..(t + 1) * q];
            let mut row = T::ZERO;
            for si in 0..t {
                let g_cb = dmr[si] * lr[si];
                dcbr[si] += g_cb;
                let e = g_cb * cbr[si];
                row += e;
                dcum[si] -= e;
            }
            dcbr[t] += dmr[t];
            dcum[t] += row;
        }
        // Y_inter[t] = exp(a_cum[t]) (C S_prevᵀ)[t]
        for t in 0..q {
            let e = cum[t].exp();
            let (zr, dyr) = (&s.zg[cols(t)], &dyh[t * p..(t + 1) * p]);
            let mut acc = T::ZERO;
            for i in 0..p {
                acc = dyr[i].mul_add(zr[i], acc);
            }
            dcum[t] += e * acc;
            for (li, &dv) in s.lhs_inter[cols(t)].iter_mut().zip(dyr) {
                *li = e * dv;
            }
        }
        // S_next = exp(a_cum[Q-1]) S_prev + Σ_s w_s Xd_s ⊗ B_s
        let last = cum[q - 1];
        let head_state = j * p * n..(j + 1) * p * n;
        let carried: T = ds_next[head_state.clone()]
            .iter()
            .zip(&s_prev[head_state])
            .map(|(&gv, &sv)| gv * sv)
            .sum();
        dcum[q - 1] += last.exp() * carried;
        for si in 0..q {
            let ws = (last - cum[si]).exp();
            let bdr = &s.bds[cols(si)];
            let xdr = &xdh[si * p..(si + 1) * p];
            let dxr = &mut s.dxd[si * p..(si + 1) * p];
            let mut term = T::ZERO;
            for i in 0..p {
                term = xdr[i].mul_add(bdr[i], term);
                dxr[i] = ws.mul_add(bdr[i], dxr[i]);
            }
            for (ls, &xd) in s.lhs_state[cols(si)].iter_mut().zip(xdr) {
                *ls = ws * xd;
            }
            if si + 1 < q {
                // w_s = exp(a_cum[Q-1] - a_cum[s]); at s = Q-1 the two cancel.
                let term = ws * term;
                dcum[q - 1] += term;
                dcum[si] -= term;
            }
        }
        // a_cum[t] = Σ_{τ≤t} Δ_τ A: reverse cumulative sum, then Δ and A.
        let mut da_run = T::ZERO;
        let (mut d_a, mut d_d, mut d_bias) = (T::ZERO, T::ZERO, T::ZERO);
        for si in (0..q).rev() {
            da_run += dcum[si];
            d_a += dt[si] * da_run;
            let (xr, dyr, dxr) = (
                &xh[si * p..(si + 1) * p],
                &dyh[si * p..(si + 1) * p],
                &s.dxd[si * p..(si + 1) * p],
            );
            // SAFETY: this unit owns head h of rows row0..row0+q.
            let gx = unsafe { outs.x.slice((row0 + si) * hp + h * p, p) };
            let mut d_delta = a * da_run;
            for i in 0..p {
                d_delta = dxr[i].mul_add(xr[i], d_delta);
                gx[i] = dt[si].mul_add(dxr[i], dh * dyr[i]);
                d_d = dyr[i].mul_add(xr[i], d_d);
            }
            let d_raw = d_delta * s.gate[si];
            d_bias += d_raw;
            // SAFETY: as above, for dt (batch, len, H).
            unsafe { outs.dt.slice((row0 + si) * ctx.heads + h, 1)[0] = d_raw };
        }
        // SAFETY: entry (b, k, h) belongs to this unit.
        unsafe {
            outs.partials
                .slice((b * ctx.n_chunks + k) * ctx.heads + h, 1)[0] = [d_a, d_d, d_bias]
        };
    }
    // dC = ∂L/∂(CBᵀ) B + (exp(a_cum) ⊙ dY) S_prev; dB = ∂L/∂(CBᵀ)ᵀ C + (w ⊙ Xd) dS_next
    let (dcg, dbg) = (&mut s.dcg[..qn], &mut s.dbg[..qn]);
    matmul_xw(&s.dcb[..qq], bg, q, q, n, dcg, false)?;
    matmul_xw(&s.lhs_inter[..qg], s_prev, q, gp, n, dcg, true)?;
    matmul_xtw(&s.dcb[..qq], cg, q, q, n, dbg, false)?;
    matmul_xw(&s.lhs_state[..qg], ds_next, q, gp, n, dbg, true)?;
    for t in 0..q {
        let o = (row0 + t) * gn + g * n;
        // SAFETY: this unit owns group g of rows row0..row0+q.
        unsafe {
            outs.c.slice(o, n).copy_from_slice(&dcg[t * n..(t + 1) * n]);
            outs.b.slice(o, n).copy_from_slice(&dbg[t * n..(t + 1) * n]);
        }
    }
    Ok(())
}

/// Per-token sizes of [`ssd_step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SsdStepShape {
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub state: usize,
}

/// Inputs of one SSD step. For [`ssd_step`], `x` holds the P values of
/// each head of the range ((h1 - h0)·P) and `dt` its raw dt (h1 - h0); for
/// [`ssd_step_batch`] they are (batch, H·P) and (batch, H). `b` and `c` are
/// whole rows, (G·N) per sequence; `dt_bias`, `a`, `d` are (H), indexed by
/// the global head.
#[derive(Clone, Copy, Debug)]
pub struct SsdStepInputs<'a, T> {
    pub x: &'a [T],
    pub dt: &'a [T],
    pub b: &'a [T],
    pub c: &'a [T],
    pub dt_bias: &'a [T],
    pub a: &'a [T],
    pub d: &'a [T],
}

/// One token of one sequence for heads h0..h1 (so that a team of decoding
/// threads can split the heads): advances `state` ((h1 - h0), P, N), h_{t-1}
/// in and h_t out, and writes `y` ((h1 - h0)·P). Only `dt_limit` of
/// `options` applies to a step. Runs on the caller's thread: one token's
/// work (H·P·N multiply-adds) is too small to share out here.
pub fn ssd_step<T: Float>(
    shape: &SsdStepShape,
    heads: std::ops::Range<usize>,
    inputs: &SsdStepInputs<'_, T>,
    options: &SsdOptions,
    state: &mut [T],
    y: &mut [T],
) -> Result<()> {
    const OP: &str = "ssd_step";
    validate_step_shape(OP, shape, options)?;
    let (h0, h1) = (heads.start, heads.end);
    if !(h0 < h1 && h1 <= shape.heads) {
        return Err(invalid(
            OP,
            format!(
                "head range {h0}..{h1} must be non-empty and within 0..{}",
                shape.heads
            ),
        ));
    }
    let nh = h1 - h0;
    let (p, n) = (shape.head_dim, shape.state);
    check_len(OP, "x", inputs.x, &[("heads", nh), ("head_dim", p)])?;
    check_len(OP, "dt", inputs.dt, &[("heads", nh)])?;
    check_step_rows(OP, shape, inputs, 1)?;
    check_len(
        OP,
        "state",
        state,
        &[("heads", nh), ("head_dim", p), ("state", n)],
    )?;
    check_len(OP, "y", y, &[("heads", nh), ("head_dim", p)])?;
    step_heads(shape, h0, h1, inputs, options.dt_limit, state, y);
    Ok(())
}

/// [`ssd_step`] for every head of `batch` sequences: x (batch, H·P), dt
/// (batch, H), B and C (batch, G·N), state (batch, H, P, N), y (batch, H·P).
pub fn ssd_step_batch<T: Float>(
    shape: &SsdStepShape,
    batch: usize,
    inputs: &SsdStepInputs<'_, T>,
    options: &SsdOptions,
    state: &mut [T],
    y: &mut [T],
) -> Result<()> {
    const OP: &str = "ssd_step_batch";
    validate_step_shape(OP, shape, options)?;
    if batch == 0 {
        return Err(invalid(OP, "batch must be at least 1"));
    }
    let (h, p, n) = (shape.heads, shape.head_dim, shape.state);
    let act = [("batch", batch), ("heads", h), ("head_dim", p)];
    check_len(OP, "x", inputs.x, &act)?;
    check_len(OP, "dt", inputs.dt, &[("batch", batch), ("heads", h)])?;
    check_step_rows(OP, shape, inputs, batch)?;
    check_len(
        OP,
        "state",
        state,
        &[
            ("batch", batch),
            ("heads", h),
            ("head_dim", p),
            ("state", n),
        ],
    )?;
    check_len(OP, "y", y, &act)?;
    let gn = shape.groups * n;
    for bi in 0..batch {
        let one = SsdStepInputs {
            x: &inputs.x[bi * h * p..(bi + 1) * h * p],
            dt: &inputs.dt[bi * h..(bi + 1) * h],
            b: &inputs.b[bi * gn..(bi + 1) * gn],
            c: &inputs.c[bi * gn..(bi + 1) * gn],
            ..*inputs
        };
        step_heads(
            shape,
            0,
            h,
            &one,
            options.dt_limit,
            &mut state[bi * h * p * n..(bi + 1) * h * p * n],
            &mut y[bi * h * p..(bi + 1) * h * p],
        );
    }
    Ok(())
}

fn validate_step_shape(op: &'static str, shape: &SsdStepShape, options: &SsdOptions) -> Result<()> {
    for (name, v) in [
        ("heads", shape.heads),
        ("head_dim", shape.head_dim),
        ("groups", shape.groups),
        ("state", shape.state),
    ] {
        if v == 0 {
            return Err(invalid(op, format!("{name} must be at least 1")));
        }
    }
    if !shape.heads.is_multiple_of(shape.groups) {
        return Err(invalid(
            op,
            format!(
                "heads ({}) must be a multiple of groups ({})",
                shape.heads, shape.groups
            ),
        ));
    }
    check_dt_limit(op, options.dt_limit)
}

/// B, C (rows, G·N) and the per-head parameters (H).
fn check_step_rows<T>(
    op: &'static str,
    shape: &SsdStepShape,
    inputs: &SsdStepInputs<'_, T>,
    rows: usize,
) -> Result<()> {
    let per_token = [
        ("batch", rows),
        ("groups", shape.groups),
        ("state", shape.state),
    ];
    check_len(op, "B", inputs.b, &per_token)?;
    check_len(op, "C", inputs.c, &per_token)?;
    let per_head = [("heads", shape.heads)];
    check_len(op, "dt_bias", inputs.dt_bias, &per_head)?;
    check_len(op, "A", inputs.a, &per_head)?;
    check_len(op, "D", inputs.d, &per_head)
}

/// The step for heads h0..h1 of one sequence; x, dt, state and y hold just
/// those heads, b and c the whole row.
fn step_heads<T: Float>(
    shape: &SsdStepShape,
    h0: usize,
    h1: usize,
    inputs: &SsdStepInputs<'_, T>,
    dt_limit: (f64, f64),
    state: &mut [T],
    y: &mut [T],
) {
    let (p, n) = (shape.head_dim, shape.state);
    let hpg = shape.heads / shape.groups;
    let (lo, hi) = (T::from_f64(dt_limit.0), T::from_f64(dt_limit.1));
    for (j, h) in (h0..h1).enumerate() {
        // The global head picks the group.
        let g = h / hpg;
        let (b_t, c_t) = (&inputs.b[g * n..(g + 1) * n], &inputs.c[g * n..(g + 1) * n]);
        let (delta, _) = delta_and_grad(inputs.dt[j] + inputs.dt_bias[h], lo, hi);
        let decay = (delta * inputs.a[h]).exp();
        let dh = inputs.d[h];
        for i in 0..p {
            let xv = inputs.x[j * p + i];
            let dx = delta * xv;
            let s = &mut state[(j * p + i) * n..(j * p + i + 1) * n];
            y[j * p + i] = dh.mul_add(xv, update_and_read(s, decay, dx, b_t, c_t));
        }
    }
}

/// One row of a head's state: s ← decay·s + dx·B, then returns C · s, in
/// one pass over the row (it is read and written once, not twice). The
/// dot product sums in 16 lanes exactly as the scan step's `dot` does, so the result has
/// the same bits as the update followed by `dot(C, s)`.
#[inline(always)]
fn update_and_read<T: Float>(s: &mut [T], decay: T, dx: T, b: &[T], c: &[T]) -> T {
    const LANES: usize = 16;
    let mut lanes = [T::ZERO; LANES];
    let split = s.len() / LANES * LANES;
    for ((sc, bc), cc) in s[..split]
        .chunks_exact_mut(LANES)
        .zip(b[..split].chunks_exact(LANES))
        .zip(c[..split].chunks_exact(LANES))
    {
        for w in 0..LANES {
            let v = decay.mul_add(sc[w], dx * bc[w]);
            sc[w] = v;
            lanes[w] = cc[w].mul_add(v, lanes[w]);
        }
    }
    let mut sum = T::ZERO;
    for ((sv, &bv), &cv) in s[split..].iter_mut().zip(&b[split..]).zip(&c[split..]) {
        *sv = decay.mul_add(*sv, dx * bv);
        sum = cv.mul_add(*sv, sum);
    }
    sum + T::sum_16(lanes)
}
