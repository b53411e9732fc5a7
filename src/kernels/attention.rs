//! Causal multi-head softmax attention (docs/DESIGN.md §15.2), computed
//! blockwise with an online softmax so that memory is linear in the length
//! (FlashAttention, Dao et al. 2022; the backward as in FlashAttention-2).
//!
//! For each sequence b and head h, with the queries the last `q_len` of
//! `kv_len` positions (q_len = kv_len in training; fewer when a prompt
//! continues a KV cache, one in a decoding step), query i at absolute
//! position p_i = kv_len − q_len + i:
//!
//! ```text
//! s_ij  = q_i · k_j / sqrt(Dh)           for j ≤ p_i (causal), else masked
//! lse_i = log Σ_{j ≤ p_i} exp(s_ij)
//! P_ij  = exp(s_ij − lse_i)
//! o_i   = Σ_j P_ij v_j
//! ```
//! Forward, key block by key block, keeping per query the running maximum
//! m, the running sum l and the unnormalised output acc:
//! ```text
//! m' = max(m, max_j s_ij);  c = exp(m − m')
//! l  = c l + Σ_j exp(s_ij − m');   acc = c acc + Σ_j exp(s_ij − m') v_j;   m = m'
//! o_i = acc / l;  lse_i = m + log l
//! ```
//! Backward (dO given), recomputing P from lse, with D_i = dO_i · o_i:
//! ```text
//! dP_ij = dO_i · v_j;   dS_ij = P_ij (dP_ij − D_i)
//! dv_j += P_ij dO_i;    dq_i += dS_ij k_j / sqrt(Dh);   dk_j += dS_ij q_i / sqrt(Dh)
//! ```
//! (D_i = Σ_j P_ij dP_ij, the softmax's Jacobian, without a row of P.)
//!
//! Layout: q, o, dq `(batch, q_len, heads, head_dim)`; k, v, dk, dv
//! `(batch, kv_len, heads, head_dim)`: rows are tokens, the rows of the
//! q/k/v projections, so no transposes. lse `(batch, heads, q_len)`.
//!
//! Threading: the forward runs (sequence, head, block of [`QUERY_BLOCK`]
//! queries) tasks in parallel, each writing its own rows of o; the backward
//! runs (sequence, head) tasks, each summing its dk, dv over every query
//! in a fixed order, so the result does not depend on the thread count.
//! Per task the memory is a block of queries (forward) or one head's
//! gradients (backward): linear in the length.

use rayon::prelude::*;

use crate::error::{check_len, invalid, Result};
use crate::float::Float;
use crate::kernels::shared::SharedMut;

/// Queries per forward task.
pub const QUERY_BLOCK: usize = 64;
/// Keys per step of the online softmax.
pub const KEY_BLOCK: usize = 64;

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    /// Queries per sequence: the last `q_len` of the `kv_len` positions.
    pub q_len: usize,
    /// Keys and values per sequence.
    pub kv_len: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Self-attention over whole sequences (training): q_len = kv_len = len.
    pub fn square(batch: usize, len: usize, heads: usize, head_dim: usize) -> Self {
        Self {
            batch,
            q_len: len,
            kv_len: len,
            heads,
            head_dim,
        }
    }

    /// Values per token row: heads · head_dim.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Absolute position of the first query.
    fn offset(&self) -> usize {
        self.kv_len - self.q_len
    }

    fn scale<T: Float>(&self) -> T {
        T::ONE / T::from_usize(self.head_dim).sqrt()
    }

    fn check(&self, op: &'static str) -> Result<()> {
        if self.batch == 0 || self.q_len == 0 || self.heads == 0 || self.head_dim == 0 {
            return Err(invalid(
                op,
                format!("batch, q_len, heads and head_dim must be at least 1: {self:?}"),
            ));
        }
        if self.q_len > self.kv_len {
            return Err(invalid(
                op,
                format!(
                    "{} queries but only {} keys: the queries are the last positions of the keys",
                    self.q_len, self.kv_len
                ),
            ));
        }
        Ok(())
    }

    fn check_inputs<T>(&self, op: &'static str, q: &[T], k: &[T], v: &[T]) -> Result<()> {
        self.check(op)?;
        let (b, w) = (self.batch, self.width());
        check_len(
            op,
            "q",
            q,
            &[("batch", b), ("q_len", self.q_len), ("width", w)],
        )?;
        check_len(
            op,
            "k",
            k,
            &[("batch", b), ("kv_len", self.kv_len), ("width", w)],
        )?;
        check_len(
            op,
            "v",
            v,
            &[("batch", b), ("kv_len", self.kv_len), ("width", w)],
        )
    }
}

/// x · y, in eight lanes so that the compiler vectorises it.
#[inline(always)]
fn dot<T: Float>(x: &[T], y: &[T]) -> T {
    let mut lanes = [T::ZERO; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            lanes[l] = a[l].mul_add(b[l], lanes[l]);
        }
    }
    let mut sum = (lanes[0] + lanes[4])
        + (lanes[1] + lanes[5])
        + (lanes[2] + lanes[6])
        + (lanes[3] + lanes[7]);
    for (&a, &b) in xr.iter().zip(yr) {
        sum += a * b;
    }
    sum
}

/// y += a x
#[inline(always)]
fn axpy<T: Float>(a: T, x: &[T], y: &mut [T]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv = a.mul_add(xv, *yv);
    }
}

/// The forward: o `(batch, q_len, heads, head_dim)` and, when asked for,
/// lse `(batch, heads, q_len)` (what the backward needs).
pub fn causal_attention_forward<T: Float>(
    shape: &AttentionShape,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &mut [T],
    lse: Option<&mut [T]>,
) -> Result<()> {
    const OP: &str = "causal_attention_forward";
    shape.check_inputs(OP, q, k, v)?;
    let s = *shape;
    let (w, dh) = (s.width(), s.head_dim);
    check_len(
        OP,
        "o",
        o,
        &[("batch", s.batch), ("q_len", s.q_len), ("width", w)],
    )?;
    let mut lse_store = Vec::new();
    let lse: &mut [T] = match lse {
        Some(l) => {
            check_len(
                OP,
                "lse",
                l,
                &[("batch", s.batch), ("heads", s.heads), ("q_len", s.q_len)],
            )?;
            l
        }
        None => {
            lse_store.resize(s.batch * s.heads * s.q_len, T::ZERO);
            &mut lse_store
        }
    };
    let scale: T = s.scale();
    let q_blocks = s.q_len.div_ceil(QUERY_BLOCK);
    let out = SharedMut::new(o);
    let lse_out = SharedMut::new(lse);
    (0..s.batch * s.heads * q_blocks)
        .into_par_iter()
        .for_each(|task| {
            let (bh, qb) = (task / q_blocks, task % q_blocks);
            let (b, h) = (bh / s.heads, bh % s.heads);
            let i0 = qb * QUERY_BLOCK;
            let nq = QUERY_BLOCK.min(s.q_len - i0);
            let q_row = |i: usize| &q[(b * s.q_len + i) * w + h * dh..][..dh];
            let k_row = |j: usize| &k[(b * s.kv_len + j) * w + h * dh..][..dh];
            let v_row = |j: usize| &v[(b * s.kv_len + j) * w + h * dh..][..dh];
            let mut acc = vec![T::ZERO; nq * dh];
            let mut m = vec![T::ZERO; nq];
            let mut l = vec![T::ZERO; nq];
            let mut scores = [T::ZERO; KEY_BLOCK];
            // keys 0 ..= the last query's position
            let keys = s.offset() + i0 + nq;
            for j0 in (0..keys).step_by(KEY_BLOCK) {
                for r in 0..nq {
                    let p = s.offset() + i0 + r;
                    if j0 > p {
                        continue;
                    }
                    let nk = KEY_BLOCK.min(p + 1 - j0);
                    let qi = q_row(i0 + r);
                    let mut block_max = T::from_f64(f64::NEG_INFINITY);
                    for (jj, sv) in scores[..nk].iter_mut().enumerate() {
                        *sv = dot(qi, k_row(j0 + jj)) * scale;
                        block_max = block_max.max_nan(*sv);
                    }
                    let a = &mut acc[r * dh..(r + 1) * dh];
                    let new_max = if j0 == 0 {
                        block_max
                    } else {
                        m[r].max_nan(block_max)
                    };
                    if j0 > 0 {
                        let c = (m[r] - new_max).exp();
                        l[r] *= c;
                        a.iter_mut().for_each(|x| *x *= c);
                    }
                    let mut sum = T::ZERO;
                    for (jj, sv) in scores[..nk].iter().enumerate() {
                        let e = (*sv - new_max).exp();
                        sum += e;
                        axpy(e, v_row(j0 + jj), a);
                    }
                    l[r] += sum;
                    m[r] = new_max;
                }
            }
            for r in 0..nq {
                // SAFETY: task (b, h, qb) alone writes rows i0..i0+nq of
                // head h of sequence b, in o and in lse.
                let o_row = unsafe { out.slice((b * s.q_len + i0 + r) * w + h * dh, dh) };
                let inv = T::ONE / l[r];
                for (ov, &av) in o_row.iter_mut().zip(&acc[r * dh..(r + 1) * dh]) {
                    *ov = av * inv;
                }
                let lse_v = unsafe { lse_out.slice((b * s.heads + h) * s.q_len + i0 + r, 1) };
                lse_v[0] = m[r] + l[r].ln();
            }
        });
    Ok(())
}

/// Gradients of the attention inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionGrads<T> {
    /// (batch, q_len, heads, head_dim)
    pub q: Vec<T>,
    /// (batch, kv_len, heads, head_dim)
    pub k: Vec<T>,
    /// (batch, kv_len, heads, head_dim)
    pub v: Vec<T>,
}

/// The backward given dO, from the forward's inputs, its output o and lse
/// (P is recomputed block by block; nothing of size len² is kept).
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward<T: Float>(
    shape: &AttentionShape,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    d_o: &[T],
) -> Result<AttentionGrads<T>> {
    const OP: &str = "causal_attention_backward";
    shape.check_inputs(OP, q, k, v)?;
    let s = *shape;
    let (w, dh) = (s.width(), s.head_dim);
    check_len(
        OP,
        "o",
        o,
        &[("batch", s.batch), ("q_len", s.q_len), ("width", w)],
    )?;
    check_len(
        OP,
        "d_o",
        d_o,
        &[("batch", s.batch), ("q_len", s.q_len), ("width", w)],
    )?;
    check_len(
        OP,
        "lse",
        lse,
        &[("batch", s.batch), ("heads", s.heads), ("q_len", s.q_len)],
    )?;
    let scale: T = s.scale();
    let mut grads = AttentionGrads {
        q: vec![T::ZERO; q.len()],
        k: vec![T::ZERO; k.len()],
        v: vec![T::ZERO; v.len()],
    };
    let (dq_out, dk_out, dv_out) = (
        SharedMut::new(&mut grads.q),
        SharedMut::new(&mut grads.k),
        SharedMut::new(&mut grads.v),
    );
    (0..s.batch * s.heads).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let q_at = |i: usize| (b * s.q_len + i) * w + h * dh;
        let kv_at = |j: usize| (b * s.kv_len + j) * w + h * dh;
        // SAFETY: task (b, h) alone writes head h of sequence b's rows in
        // dq, dk and dv; it accumulates into them in a fixed order.
        let dq_row = |i: usize| unsafe { dq_out.slice(q_at(i), dh) };
        let dk_row = |j: usize| unsafe { dk_out.slice(kv_at(j), dh) };
        let dv_row = |j: usize| unsafe { dv_out.slice(kv_at(j), dh) };
        let mut p = [T::ZERO; KEY_BLOCK];
        let mut ds = [T::ZERO; KEY_BLOCK];
        for i in 0..s.q_len {
            let pos = s.offset() + i;
            let qi = &q[q_at(i)..][..dh];
            let doi = &d_o[q_at(i)..][..dh];
            let lse_i = lse[(b * s.heads + h) * s.q_len + i];
            let d_i = dot(doi, &o[q_at(i)..][..dh]);
            let dqi = dq_row(i);
            for j0 in (0..=pos).step_by(KEY_BLOCK) {
                let nk = KEY_BLOCK.min(pos + 1 - j0);
                for jj in 0..nk {
                    let j = j0 + jj;
                    p[jj] = (dot(qi, &k[kv_at(j)..][..dh]) * scale - lse_i).exp();
                    let dp = dot(doi, &v[kv_at(j)..][..dh]);
                    ds[jj] = p[jj] * (dp - d_i) * scale;
                }
                for jj in 0..nk {
                    let j = j0 + jj;
                    axpy(p[jj], doi, dv_row(j));
                    axpy(ds[jj], qi, dk_row(j));
                    axpy(ds[jj], &k[kv_at(j)..][..dh], dqi);
                }
            }
        }
    });
    Ok(grads)
}

/// The equations above written out plainly, for the tests: the whole score
/// matrix of each head, a two-pass softmax. Returns (o, lse).
pub fn causal_attention_reference<T: Float>(
    shape: &AttentionShape,
    q: &[T],
    k: &[T],
    v: &[T],
) -> Result<(Vec<T>, Vec<T>)> {
    shape.check_inputs("causal_attention_reference", q, k, v)?;
    let s = *shape;
    let (w, dh) = (s.width(), s.head_dim);
    let mut o = vec![T::ZERO; q.len()];
    let mut lse = vec![T::ZERO; s.batch * s.heads * s.q_len];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.q_len {
                let p = reference_probabilities(&s, q, k, b, h, i);
                let qi = (b * s.q_len + i) * w + h * dh;
                for (j, &pj) in p.iter().enumerate() {
                    for d in 0..dh {
                        o[qi + d] += pj * v[(b * s.kv_len + j) * w + h * dh + d];
                    }
                }
                let scores = reference_scores(&s, q, k, b, h, i);
                let max = scores.iter().fold(scores[0], |m, &x| m.max_nan(x));
                let sum: T = scores.iter().map(|&x| (x - max).exp()).sum();
                lse[(b * s.heads + h) * s.q_len + i] = max + sum.ln();
            }
        }
    }
    Ok((o, lse))
}

/// s_ij for j ≤ p_i (reference).
fn reference_scores<T: Float>(
    s: &AttentionShape,
    q: &[T],
    k: &[T],
    b: usize,
    h: usize,
    i: usize,
) -> Vec<T> {
    let (w, dh) = (s.width(), s.head_dim);
    let scale: T = s.scale();
    (0..=s.offset() + i)
        .map(|j| {
            let mut acc = T::ZERO;
            for d in 0..dh {
                acc +=
                    q[(b * s.q_len + i) * w + h * dh + d] * k[(b * s.kv_len + j) * w + h * dh + d];
            }
            acc * scale
        })
        .collect()
}

/// P_ij for j ≤ p_i (reference): a two-pass softmax of the scores.
fn reference_probabilities<T: Float>(
    s: &AttentionShape,
    q: &[T],
    k: &[T],
    b: usize,
    h: usize,
    i: usize,
) -> Vec<T> {
    let scores = reference_scores(s, q, k, b, h, i);
    let max = scores.iter().fold(scores[0], |m, &x| m.max_nan(x));
    let e: Vec<T> = scores.iter().map(|&x| (x - max).exp()).collect();
    let sum: T = e.iter().copied().sum();
    e.into_iter().map(|x| x / sum).collect()
}

/// The backward written from the matrix form, for the tests:
/// dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − rowsum(P ∘ dP)), dQ = dS K / √Dh,
/// dK = dSᵀ Q / √Dh.
pub fn causal_attention_backward_reference<T: Float>(
    shape: &AttentionShape,
    q: &[T],
    k: &[T],
    v: &[T],
    d_o: &[T],
) -> Result<AttentionGrads<T>> {
    shape.check_inputs("causal_attention_backward_reference", q, k, v)?;
    let s = *shape;
    let (w, dh) = (s.width(), s.head_dim);
    let scale: T = s.scale();
    let mut g = AttentionGrads {
        q: vec![T::ZERO; q.len()],
        k: vec![T::ZERO; k.len()],
        v: vec![T::ZERO; v.len()],
    };
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.q_len {
                let p = reference_probabilities(&s, q, k, b, h, i);
                let qi = (b * s.q_len + i) * w + h * dh;
                let dp: Vec<T> = (0..p.len())
                    .map(|j| {
                        let kj = (b * s.kv_len + j) * w + h * dh;
                        (0..dh).map(|d| d_o[qi + d] * v[kj + d]).sum()
                    })
                    .collect();
                let row_sum: T = p.iter().zip(&dp).map(|(&a, &c)| a * c).sum();
                for j in 0..p.len() {
                    let kj = (b * s.kv_len + j) * w + h * dh;
                    let ds = p[j] * (dp[j] - row_sum);
                    for d in 0..dh {
                        g.v[kj + d] += p[j] * d_o[qi + d];
                        g.q[qi + d] += ds * k[kj + d] * scale;
                        g.k[kj + d] += ds * q[qi + d] * scale;
                    }
                }
            }
        }
    }
    Ok(g)
}
