//! The Transformer++ block (docs/DESIGN.md §15.1), written once for every
//! way of running it, as [`super::block`] is for Mamba: training forward
//! and backward, prefill continuing a KV cache, and the decoding step of a
//! batch of sequences (a chunk of length 1), over weights in any storage.
//!
//! ```text
//! r  = h                                                 (BL, D)    the residual stream
//! u  = rmsnorm(r) · w_input                              (BL, D)
//! q, k, v = u W_qᵀ, u W_kᵀ, u W_vᵀ                       (BL, H·Dh) each
//! q, k = rope(q), rope(k)                                 rotary positions (optional)
//! a  = causal_attention(q, k, v)                         (BL, H·Dh) src/kernels/attention.rs
//! h' = r + a W_oᵀ                                        (BL, D)
//! u' = rmsnorm(h') · w_post                              (BL, D)
//! m  = silu(u' W_gateᵀ) ⊙ (u' W_upᵀ)                     (BL, F)    SwiGLU
//! h  = h' + m W_downᵀ                                    (BL, D)
//! ```
//! No biases anywhere (Llama). BL = batch · len rows, token-major.
//!
//! With KV caches (one per sequence), a chunk's keys and values are
//! appended to its sequence's cache and its queries attend over the whole
//! cache: prefill is a chunk of one sequence, a decoding step is a chunk of
//! length 1 of every sequence of the batch (the projections one product
//! for all of them, the attention per sequence).

use super::block::{norm_backward, norm_forward, Dense, Linear};
use crate::error::{invalid, Result};
use crate::kernels::{
    causal_attention_backward, causal_attention_forward, matmul_xtw, matmul_xw, swiglu_backward,
    swiglu_forward, AttentionShape, MatmulScalar, Rotary,
};

/// The sizes of a Transformer block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionBlockShape {
    pub d_model: usize,
    pub n_head: usize,
    pub head_dim: usize,
    /// F, the SwiGLU hidden width (intermediate_size)
    pub d_ff: usize,
    pub norm_eps: f64,
}

impl AttentionBlockShape {
    /// H · Dh, the width of q, k, v and the attention output.
    pub fn width(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Values per token that [`AttentionBlockCache`] keeps: 4D + 4·H·Dh + H + 2F.
    pub fn cached_values_per_token(&self) -> u128 {
        let w = |v: usize| v as u128;
        4 * w(self.d_model) + 4 * w(self.width()) + w(self.n_head) + 2 * w(self.d_ff)
    }
}

/// The keys and values one sequence has seen in one layer, rows of H·Dh
/// values each: it grows by a row per token (the memory a Transformer's
/// decoding needs, and a recurrent model does not).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KvCache<T> {
    /// (positions, H·Dh), rotated by their positions
    pub keys: Vec<T>,
    /// (positions, H·Dh)
    pub values: Vec<T>,
}

impl<T> KvCache<T> {
    /// Positions held, for rows of `width` values.
    pub fn positions(&self, width: usize) -> usize {
        self.keys.len() / width.max(1)
    }
}

/// A view of one layer's parameters (names as Hugging Face Llama's).
pub struct AttentionBlock<'a, T, W> {
    pub shape: AttentionBlockShape,
    /// input_layernorm (D)
    pub input_norm: &'a [T],
    /// (H·Dh, D) each
    pub q_proj: W,
    pub k_proj: W,
    pub v_proj: W,
    /// (D, H·Dh)
    pub o_proj: W,
    /// post_attention_layernorm (D)
    pub post_norm: &'a [T],
    /// (F, D) each
    pub gate_proj: W,
    pub up_proj: W,
    /// (D, F)
    pub down_proj: W,
    /// Rotary positions; None when the model adds learned positions to
    /// its embedding instead.
    pub rotary: Option<&'a Rotary>,
}

/// What the training forward keeps for the backward, per layer.
pub struct AttentionBlockCache<T> {
    /// the block's input (BL, D)
    h_in: Vec<T>,
    /// rmsnorm(h_in) (BL, D)
    u: Vec<T>,
    /// rotated queries and keys, values (BL, H·Dh)
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    /// attention output (BL, H·Dh) and its log-sum-exp (B, H, L)
    a: Vec<T>,
    lse: Vec<T>,
    /// h after the attention residual (BL, D)
    h_mid: Vec<T>,
    /// rmsnorm(h_mid) (BL, D)
    u2: Vec<T>,
    /// (BL, F)
    gate: Vec<T>,
    up: Vec<T>,
}

/// Gradients of one layer's parameters, shaped as the parameters.
pub struct AttentionBlockGradients<T> {
    pub input_norm: Vec<T>,
    pub q_proj: Vec<T>,
    pub k_proj: Vec<T>,
    pub v_proj: Vec<T>,
    pub o_proj: Vec<T>,
    pub post_norm: Vec<T>,
    pub gate_proj: Vec<T>,
    pub up_proj: Vec<T>,
    pub down_proj: Vec<T>,
}

impl<T: MatmulScalar, W: Linear<T>> AttentionBlock<'_, T, W> {
    /// Checks every weight against the shape.
    pub fn validate(&self) -> Result<()> {
        let s = &self.shape;
        let (d, w, f) = (s.d_model, s.width(), s.d_ff);
        let check = |name: &str, l: &W, rows: usize, cols: usize| {
            if l.rows() != rows || l.cols() != cols {
                return Err(invalid(
                    "AttentionBlock",
                    format!(
                        "{name} is ({}, {}), expected ({rows}, {cols})",
                        l.rows(),
                        l.cols()
                    ),
                ));
            }
            Ok(())
        };
        check("q_proj", &self.q_proj, w, d)?;
        check("k_proj", &self.k_proj, w, d)?;
        check("v_proj", &self.v_proj, w, d)?;
        check("o_proj", &self.o_proj, d, w)?;
        check("gate_proj", &self.gate_proj, f, d)?;
        check("up_proj", &self.up_proj, f, d)?;
        check("down_proj", &self.down_proj, d, f)?;
        for (name, n) in [
            ("input_layernorm", self.input_norm),
            ("post_attention_layernorm", self.post_norm),
        ] {
            if n.len() != d {
                return Err(invalid(
                    "AttentionBlock",
                    format!("{name} has {} values, expected {d}", n.len()),
                ));
            }
        }
        if let Some(r) = self.rotary {
            if r.head_dim != s.head_dim {
                return Err(invalid(
                    "AttentionBlock",
                    format!(
                        "rotary head_dim {} is not head_dim {}",
                        r.head_dim, s.head_dim
                    ),
                ));
            }
        }
        Ok(())
    }

    fn norm(&self, x: &[T], w: &[T]) -> Result<Vec<T>> {
        let mut y = vec![T::ZERO; x.len()];
        norm_forward(x, w, None, self.shape.norm_eps, &mut y)?;
        Ok(y)
    }

    /// Runs the block over `h` (batch, len, D) in place. Without caches the
    /// sequences start at position 0; with them (one per sequence) each
    /// chunk continues its cache, which it extends.
    pub fn forward(
        &self,
        h: &mut [T],
        batch: usize,
        len: usize,
        caches: Option<&mut [&mut KvCache<T>]>,
    ) -> Result<()> {
        self.forward_inner(h, batch, len, caches, false).map(|_| ())
    }

    /// The training forward (from position 0), keeping what
    /// [`Self::backward`] needs.
    pub fn forward_train(
        &self,
        h: &mut [T],
        batch: usize,
        len: usize,
    ) -> Result<AttentionBlockCache<T>> {
        self.forward_inner(h, batch, len, None, true)?
            .ok_or_else(|| invalid("AttentionBlock::forward_train", "no cache kept"))
    }

    fn forward_inner(
        &self,
        h: &mut [T],
        batch: usize,
        len: usize,
        caches: Option<&mut [&mut KvCache<T>]>,
        keep: bool,
    ) -> Result<Option<AttentionBlockCache<T>>> {
        const OP: &str = "AttentionBlock::forward";
        let s = self.shape;
        let (d, w, f, heads, dh) = (s.d_model, s.width(), s.d_ff, s.n_head, s.head_dim);
        let rows = batch * len;
        if batch == 0 || len == 0 || h.len() != rows * d {
            return Err(invalid(
                OP,
                format!(
                    "h has {} values for batch {batch} x len {len} x d_model {d}",
                    h.len()
                ),
            ));
        }
        // u = rmsnorm(h)                          (BL, D)
        let u = self.norm(h, self.input_norm)?;
        // q, k, v = u W_qᵀ, u W_kᵀ, u W_vᵀ          (BL, H·Dh)
        let mut q = vec![T::ZERO; rows * w];
        let mut k = vec![T::ZERO; rows * w];
        let mut v = vec![T::ZERO; rows * w];
        self.q_proj.forward(&u, rows, &mut q, false)?;
        self.k_proj.forward(&u, rows, &mut k, false)?;
        self.v_proj.forward(&u, rows, &mut v, false)?;
        let mut a = vec![T::ZERO; rows * w];
        let mut lse = Vec::new();
        match caches {
            None => {
                if let Some(r) = self.rotary {
                    r.apply(&mut q, batch, len, heads, 0, false)?;
                    r.apply(&mut k, batch, len, heads, 0, false)?;
                }
                let shape = AttentionShape::square(batch, len, heads, dh);
                if keep {
                    lse = vec![T::ZERO; batch * heads * len];
                }
                causal_attention_forward(
                    &shape,
                    &q,
                    &k,
                    &v,
                    &mut a,
                    keep.then_some(lse.as_mut_slice()),
                )?;
            }
            Some(caches) => {
                if caches.len() != batch {
                    return Err(invalid(
                        OP,
                        format!("{} KV caches for {batch} sequences", caches.len()),
                    ));
                }
                for (b, cache) in caches.iter_mut().enumerate() {
                    let start = cache.positions(w);
                    let rows_b = b * len * w..(b + 1) * len * w;
                    if let Some(r) = self.rotary {
                        r.apply(&mut q[rows_b.clone()], 1, len, heads, start, false)?;
                        r.apply(&mut k[rows_b.clone()], 1, len, heads, start, false)?;
                    }
                    cache.keys.extend_from_slice(&k[rows_b.clone()]);
                    cache.values.extend_from_slice(&v[rows_b.clone()]);
                    let shape = AttentionShape {
                        batch: 1,
                        q_len: len,
                        kv_len: start + len,
                        heads,
                        head_dim: dh,
                    };
                    causal_attention_forward(
                        &shape,
                        &q[rows_b.clone()],
                        &cache.keys,
                        &cache.values,
                        &mut a[rows_b],
                        None,
                    )?;
                }
            }
        }
        // h' = h + a W_oᵀ
        let h_in = keep.then(|| h.to_vec());
        self.o_proj.forward(&a, rows, h, true)?;
        // m = silu(u' W_gateᵀ) ⊙ (u' W_upᵀ);  h = h' + m W_downᵀ
        let h_mid = keep.then(|| h.to_vec());
        let u2 = self.norm(h, self.post_norm)?;
        let mut gate = vec![T::ZERO; rows * f];
        let mut up = vec![T::ZERO; rows * f];
        self.gate_proj.forward(&u2, rows, &mut gate, false)?;
        self.up_proj.forward(&u2, rows, &mut up, false)?;
        let mut m = vec![T::ZERO; rows * f];
        swiglu_forward(&gate, &up, &mut m)?;
        self.down_proj.forward(&m, rows, h, true)?;
        Ok(match (h_in, h_mid) {
            (Some(h_in), Some(h_mid)) => Some(AttentionBlockCache {
                h_in,
                u,
                q,
                k,
                v,
                a,
                lse,
                h_mid,
                u2,
                gate,
                up,
            }),
            _ => None,
        })
    }
}

impl<T: MatmulScalar> AttentionBlock<'_, T, Dense<'_, T>> {
    /// The backward of [`Self::forward_train`]: `dh` (BL, D) holds dL/dh
    /// after the block and becomes dL/dh before it; returns the parameters'
    /// gradients.
    pub fn backward(
        &self,
        cache: &AttentionBlockCache<T>,
        batch: usize,
        len: usize,
        dh: &mut [T],
    ) -> Result<AttentionBlockGradients<T>> {
        const OP: &str = "AttentionBlock::backward";
        let s = self.shape;
        let (d, w, f, heads, dh_size) = (s.d_model, s.width(), s.d_ff, s.n_head, s.head_dim);
        let rows = batch * len;
        if dh.len() != rows * d || cache.h_in.len() != rows * d {
            return Err(invalid(
                OP,
                format!(
                    "dh has {} values and the cache {} for batch {batch} x len {len} x d_model {d}",
                    dh.len(),
                    cache.h_in.len()
                ),
            ));
        }
        let eps = s.norm_eps;
        // h = h' + m W_downᵀ,  m = swiglu(gate, up)
        let mut m = vec![T::ZERO; rows * f];
        swiglu_forward(&cache.gate, &cache.up, &mut m)?;
        let mut down_proj = vec![T::ZERO; d * f];
        matmul_xtw(dh, &m, rows, d, f, &mut down_proj, false)?;
        let mut dm = m; // reused: dL/dm (BL, F)
        matmul_xw(dh, self.down_proj.weight, rows, d, f, &mut dm, false)?;
        let mut d_gate = vec![T::ZERO; rows * f];
        let mut d_up = vec![T::ZERO; rows * f];
        swiglu_backward(&cache.gate, &cache.up, &dm, &mut d_gate, &mut d_up)?;
        drop(dm);
        let mut gate_proj = vec![T::ZERO; f * d];
        let mut up_proj = vec![T::ZERO; f * d];
        matmul_xtw(&d_gate, &cache.u2, rows, f, d, &mut gate_proj, false)?;
        matmul_xtw(&d_up, &cache.u2, rows, f, d, &mut up_proj, false)?;
        let mut du2 = vec![T::ZERO; rows * d];
        matmul_xw(&d_gate, self.gate_proj.weight, rows, f, d, &mut du2, false)?;
        matmul_xw(&d_up, self.up_proj.weight, rows, f, d, &mut du2, true)?;
        // u' = rmsnorm(h')
        let ng = norm_backward(&cache.h_mid, self.post_norm, false, eps, &du2)?;
        dh.iter_mut().zip(&ng.x).for_each(|(g, x)| *g += *x);
        let post_norm = ng.weight;
        // h' = h + a W_oᵀ
        let mut o_proj = vec![T::ZERO; d * w];
        matmul_xtw(dh, &cache.a, rows, d, w, &mut o_proj, false)?;
        let mut da = vec![T::ZERO; rows * w];
        matmul_xw(dh, self.o_proj.weight, rows, d, w, &mut da, false)?;
        // a = attention(q, k, v)
        let shape = AttentionShape::square(batch, len, heads, dh_size);
        let g = causal_attention_backward(
            &shape, &cache.q, &cache.k, &cache.v, &cache.a, &cache.lse, &da,
        )?;
        drop(da);
        let (mut dq, mut dk, dv) = (g.q, g.k, g.v);
        // q, k = rope(q), rope(k): the gradient rotates back
        if let Some(r) = self.rotary {
            r.apply(&mut dq, batch, len, heads, 0, true)?;
            r.apply(&mut dk, batch, len, heads, 0, true)?;
        }
        let mut q_proj = vec![T::ZERO; w * d];
        let mut k_proj = vec![T::ZERO; w * d];
        let mut v_proj = vec![T::ZERO; w * d];
        matmul_xtw(&dq, &cache.u, rows, w, d, &mut q_proj, false)?;
        matmul_xtw(&dk, &cache.u, rows, w, d, &mut k_proj, false)?;
        matmul_xtw(&dv, &cache.u, rows, w, d, &mut v_proj, false)?;
        let mut du = vec![T::ZERO; rows * d];
        matmul_xw(&dq, self.q_proj.weight, rows, w, d, &mut du, false)?;
        matmul_xw(&dk, self.k_proj.weight, rows, w, d, &mut du, true)?;
        matmul_xw(&dv, self.v_proj.weight, rows, w, d, &mut du, true)?;
        // u = rmsnorm(h)
        let ng = norm_backward(&cache.h_in, self.input_norm, false, eps, &du)?;
        dh.iter_mut().zip(&ng.x).for_each(|(g, x)| *g += *x);
        Ok(AttentionBlockGradients {
            input_norm: ng.weight,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            post_norm,
            gate_proj,
            up_proj,
            down_proj,
        })
    }
}
