//! The Mamba-2 block: the same residual block as Mamba's (docs/DESIGN.md
//! §17), with the SSD layer of `kernels::ssd` as its mixer and a gated
//! RMSNorm before out_proj (mamba_ssm `modules/mamba2.py`).
//!
//! ```text
//! u          = norm(h)                                     (BL, D)
//! z, xBC, dt = u W_inᵀ (+ b_in)  split [E, E + 2GN, H]     (BL, ·)
//! x, B, C    = silu(conv1d(xBC) + b_conv)  split [E, GN, GN]
//! y          = ssd(x, dt, A, B, C, D; dt_bias, dt_limit)   (BL, E)   kernels/ssd.rs
//! g          = y ⊙ silu(z)                                 (BL, E)
//! v          = g / rms_group(g) ⊙ w_norm                   (BL, E)   RMS over each of G groups of E/G
//! h          = h + v W_outᵀ (+ b_out)                      (BL, D)
//! ```
//!
//! The carried state of a sequence is the convolution's last K inputs
//! (E + 2GN, K) and the SSD state (H, P, N) = E·N values, as many as
//! Mamba-1's. The training forward keeps the block's input, xBC before the
//! convolution, z, dt, y, v and the SSD's chunk states; the backward
//! recomputes the convolution, the gate and the norm.

use super::{
    add_row_bias, sized, split_columns, sum_rows_into, Block, BlockCache, BlockGradients,
    BlockScalar, BlockStateMut, ChunkBuffers, Linear, MixerGradients, Ssd, StepBuffers,
};
use crate::error::{check_len, invalid, Result};
use crate::float::Float;
use crate::kernels::{
    causal_conv1d_backward, causal_conv1d_forward, causal_conv1d_forward_continuing, matmul_xtw,
    matmul_xw, rms_norm_backward, ssd_backward, ssd_forward, ssd_step, ConvShape, SsdInputs,
    SsdOptions, SsdShape, SsdStepInputs,
};
use crate::nn::block::Dense;
use rayon::prelude::*;

/// The longest SSD chunk this crate computes with. The chunked form's work
/// per position grows with Q (the (Q, Q) products inside a chunk) while its
/// sequential part shrinks; on a CPU Q = 64 ran the forward of a
/// mamba2-130m layer (L 2048, H 24, P 64, N 128) in 24 ms against 54 ms at
/// the checkpoints' 256 (one core, f32).
const SSD_CHUNK_CAP: usize = 64;

/// The gated norm's forward on one row of E in place: g ← g / sqrt(mean
/// over its group(g²) + ε) ⊙ w, groups of E/G adjacent channels.
fn gated_norm_row<T: Float>(row: &mut [T], weight: &[T], groups: usize, eps: f64) {
    let width = weight.len() / groups;
    let eps = T::from_f64(eps);
    for (part, w) in row.chunks_mut(width).zip(weight.chunks(width)) {
        let ms = part.iter().map(|&v| v * v).sum::<T>() / T::from_usize(width);
        let scale = T::ONE / (ms + eps).sqrt();
        for (v, &wv) in part.iter_mut().zip(w) {
            *v = *v * scale * wv;
        }
    }
}

/// Rows of (rows, E) per parallel task of the elementwise passes.
const ROWS_PER_TASK: usize = 32;

/// v = gated_norm(y ⊙ silu(z)) on rows of (rows, E), in blocks of rows on
/// the pool's threads.
fn gate_and_norm<T: Float>(y: &[T], z: &[T], weight: &[T], groups: usize, eps: f64, v: &mut [T]) {
    let e = weight.len();
    let width = e * ROWS_PER_TASK;
    v.par_chunks_mut(width)
        .zip(y.par_chunks(width))
        .zip(z.par_chunks(width))
        .for_each(|((vb, yb), zb)| {
            for ((vr, yr), zr) in vb.chunks_mut(e).zip(yb.chunks(e)).zip(zb.chunks(e)) {
                for ((vv, &yv), &zv) in vr.iter_mut().zip(yr).zip(zr) {
                    *vv = yv * zv.silu();
                }
                gated_norm_row(vr, weight, groups, eps);
            }
        });
}

impl<T: BlockScalar, W: Linear<T>> Block<'_, T, W> {
    fn ssd_shape(&self, batch: usize, len: usize) -> SsdShape {
        let ssd = self.shape.ssd.expect("an SSD block has its sizes");
        SsdShape {
            batch,
            len,
            heads: self.shape.heads(),
            head_dim: ssd.head_dim,
            groups: ssd.n_groups,
            state: self.shape.d_state,
        }
    }

    fn ssd_options(&self) -> SsdOptions {
        let ssd = self.shape.ssd.expect("an SSD block has its sizes");
        SsdOptions {
            // the chunk is a choice of arithmetic, not of the model: every
            // Q gives the same values up to rounding (DESIGN §17.3)
            chunk_len: ssd.chunk_size.min(SSD_CHUNK_CAP),
            dt_limit: ssd.dt_limit,
        }
    }

    fn ssd_conv_shape(&self, batch: usize, len: usize) -> ConvShape {
        ConvShape {
            batch,
            len,
            channels: self.shape.conv_channels(),
            kernel: self.shape.d_conv,
        }
    }

    /// (E, GN, H): the widths of x, of B (and C) and of dt.
    fn ssd_widths(&self) -> (usize, usize, usize) {
        let groups = self.shape.ssd.map_or(1, |s| s.n_groups);
        (
            self.shape.d_inner,
            groups * self.shape.d_state,
            self.shape.heads(),
        )
    }

    /// [`Block::forward`] of the Mamba-2 block.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_ssd(
        &self,
        ssd: &Ssd<'_, T>,
        h: &mut [T],
        batch: usize,
        len: usize,
        state: Option<BlockStateMut<'_, T>>,
        bufs: &mut ChunkBuffers<T>,
    ) -> Result<()> {
        const OP: &str = "Block::forward";
        let d = self.shape.d_model;
        let (e, gn, nh) = self.ssd_widths();
        let (rows, in_rows, channels) = (batch * len, self.in_rows(), self.shape.conv_channels());
        check_len(
            OP,
            "h",
            h,
            &[("batch", batch), ("len", len), ("d_model", d)],
        )?;
        let conv = self.conv.as_ref().ok_or_else(|| invalid(OP, "no conv"))?;
        // z, xBC, dt = norm(h) W_inᵀ (+ b_in)
        self.norm(h, sized(&mut bufs.normed, rows * d))?;
        let zxbcdt = sized(&mut bufs.xz, rows * in_rows);
        self.in_proj.forward(&bufs.normed, rows, zxbcdt, false)?;
        if let Some(bias) = self.in_proj_bias {
            add_row_bias(zxbcdt, bias);
        }
        let (z, xbc, dt) = (
            sized(&mut bufs.z, rows * e),
            sized(&mut bufs.x, rows * channels),
            sized(&mut bufs.delta, rows * nh),
        );
        split_columns(&bufs.xz, &mut [(z, e), (xbc, channels), (dt, nh)]);
        // x, B, C = silu(conv1d(xBC) + b_conv)
        let shape = self.ssd_conv_shape(batch, len);
        let act = sized(&mut bufs.v, rows * channels);
        let (state_conv, state_ssm) = match state {
            Some(st) => (Some(st.conv), Some(st.ssm)),
            None => (None, None),
        };
        match state_conv {
            Some(cs) => {
                causal_conv1d_forward_continuing(&shape, &bufs.x, conv.weight, conv.bias, cs, act)?
            }
            None => causal_conv1d_forward(&shape, &bufs.x, conv.weight, conv.bias, act)?,
        }
        act.par_chunks_mut(channels * ROWS_PER_TASK)
            .for_each(|block| block.iter_mut().for_each(|a| *a = a.silu()));
        let (x, bm, cm) = (
            sized(&mut bufs.ssd_x, rows * e),
            sized(&mut bufs.b, rows * gn),
            sized(&mut bufs.c, rows * gn),
        );
        split_columns(&bufs.v, &mut [(x, e), (bm, gn), (cm, gn)]);
        // y = ssd(x, dt, A, B, C, D)
        let shape = self.ssd_shape(batch, len);
        let options = self.ssd_options();
        let initial = match &state_ssm {
            Some(st) => {
                let copy = sized(&mut bufs.initial_state, st.len());
                copy.copy_from_slice(st);
                Some(copy.as_slice())
            }
            None => None,
        };
        let inputs = SsdInputs {
            x: &bufs.ssd_x,
            dt: &bufs.delta,
            dt_bias: ssd.dt_bias,
            a: &ssd.a,
            b: &bufs.b,
            c: &bufs.c,
            d: ssd.d,
            initial_state: initial,
        };
        // Kept for the backward when the caller keeps a cache; otherwise the kernel's
        // working space for the chunk states, reused by every layer rather
        // than a fresh (and freshly zeroed) allocation per call.
        let chunk_states = Some(
            sized(
                &mut bufs.checkpoints,
                shape.chunk_states_len(options.chunk_len),
            )
            .as_mut_slice(),
        );
        let y = sized(&mut bufs.ssd_y, rows * e);
        ssd_forward(&shape, &inputs, &options, y, state_ssm, chunk_states)?;
        // v = gated_norm(y ⊙ silu(z))
        let v = sized(&mut bufs.y, rows * e);
        gate_and_norm(
            &bufs.ssd_y,
            &bufs.z,
            ssd.norm_weight,
            shape.groups,
            self.shape.norm_eps,
            v,
        );
        // h += v W_outᵀ (+ b_out)
        self.out_proj.forward(&bufs.y, rows, h, true)?;
        if let Some(bias) = self.out_proj_bias {
            add_row_bias(h, bias);
        }
        let _ = nh;
        Ok(())
    }

    /// [`Block::step`] of the Mamba-2 block: one token of each sequence.
    pub(super) fn step_ssd(
        &self,
        ssd: &Ssd<'_, T>,
        h: &mut [T],
        states: &mut [BlockStateMut<'_, T>],
        bufs: &mut StepBuffers<T>,
    ) -> Result<()> {
        const OP: &str = "Block::step";
        let (e, _, nh) = self.ssd_widths();
        let (in_rows, channels) = (self.in_rows(), self.shape.conv_channels());
        let b = states.len();
        self.step_in_proj(OP, h, b, bufs)?;
        if bufs.v.len() < b * channels || bufs.y.len() < b * e {
            return Err(invalid(OP, format!("{b} sequences but buffers for fewer")));
        }
        let zxbcdt = &bufs.xz[..b * in_rows];
        let act = &mut bufs.v[..b * channels];
        let v = &mut bufs.y[..b * e];
        for (i, st) in states.iter_mut().enumerate() {
            let row = &zxbcdt[i * in_rows..(i + 1) * in_rows];
            let a_i = &mut act[i * channels..(i + 1) * channels];
            // conv_state ← shift(conv_state, xBC); x, B, C = silu(W_conv · conv_state + b)
            self.step_conv(0, &row[e..e + channels], st.conv, a_i)?;
            let v_i = &mut v[i * e..(i + 1) * e];
            self.step_ssd_heads(ssd, 0..nh, row, a_i, st.ssm, v_i)?;
            self.step_gated_norm(ssd, v_i)?;
        }
        self.step_out_proj(v, b, h)
    }

    /// Step phase 2 of the Mamba-2 block for heads h0..h1 of one sequence
    /// (a decoding team splits the heads): the SSD step S_h ← exp(Δ_h A_h)
    /// S_h + Δ_h x_h ⊗ B_g, y_h = S_h C_g + D_h x_h, then the gate g_h =
    /// y_h ⊙ silu(z_h). `zxbcdt` is the sequence's whole in_proj row (2E +
    /// 2GN + H), `act` its whole x, B, C after the convolution (E + 2GN),
    /// `ssm_state` the heads' (h1 - h0, P, N) and `g` their (h1 - h0)·P.
    pub fn step_ssd_heads(
        &self,
        ssd: &Ssd<'_, T>,
        heads: std::ops::Range<usize>,
        zxbcdt: &[T],
        act: &[T],
        ssm_state: &mut [T],
        g: &mut [T],
    ) -> Result<()> {
        const OP: &str = "Block::step_ssd_heads";
        let (e, gn, nh) = self.ssd_widths();
        let p = self.shape.ssd.map_or(1, |s| s.head_dim);
        check_len(OP, "zxbcdt", zxbcdt, &[("in_proj rows", self.in_rows())])?;
        check_len(OP, "act", act, &[("channels", e + 2 * gn)])?;
        if heads.start >= heads.end || heads.end > nh {
            return Err(invalid(OP, format!("heads {heads:?} of {nh}")));
        }
        let (x0, x1) = (heads.start * p, heads.end * p);
        let dt_at = 2 * e + 2 * gn;
        let inputs = SsdStepInputs {
            x: &act[x0..x1],
            dt: &zxbcdt[dt_at + heads.start..dt_at + heads.end],
            b: &act[e..e + gn],
            c: &act[e + gn..],
            dt_bias: ssd.dt_bias,
            a: &ssd.a,
            d: ssd.d,
        };
        let step_shape = self.ssd_shape(1, 1).step_shape();
        ssd_step(
            &step_shape,
            heads,
            &inputs,
            &self.ssd_options(),
            ssm_state,
            g,
        )?;
        // z is the row's first E values, so heads h0..h1 read z[x0..x1]
        for (gv, &zv) in g.iter_mut().zip(&zxbcdt[x0..x1]) {
            *gv *= zv.silu();
        }
        Ok(())
    }

    /// Step phase 3 of the Mamba-2 block: the gated RMSNorm of one
    /// sequence's whole gated row g (E), in place (every group of E/G
    /// channels scaled by 1/rms of its own values, times the norm weight).
    pub fn step_gated_norm(&self, ssd: &Ssd<'_, T>, g: &mut [T]) -> Result<()> {
        check_len(
            "Block::step_gated_norm",
            "g",
            g,
            &[("d_inner", self.shape.d_inner)],
        )?;
        let groups = self.shape.ssd.map_or(1, |s| s.n_groups);
        gated_norm_row(g, ssd.norm_weight, groups, self.shape.norm_eps);
        Ok(())
    }
}

/// What the training forward of a Mamba-2 block keeps (see [`BlockCache`]'s
/// fields for the Mamba-1 meaning of each): `x` holds xBC before the
/// convolution (BL, E + 2GN), `dt_low` the raw dt (BL, H), `s` the SSD
/// output y (BL, E), `y` what out_proj read, `checkpoints` the SSD's chunk
/// states.
pub(super) fn ssd_cache<T>(resid: Vec<T>, bufs: &mut ChunkBuffers<T>) -> BlockCache<T> {
    let take = std::mem::take;
    BlockCache {
        resid,
        x: take(&mut bufs.x),
        z: take(&mut bufs.z),
        dt_low: take(&mut bufs.delta),
        b: Vec::new(),
        c: Vec::new(),
        s: take(&mut bufs.ssd_y),
        y: take(&mut bufs.y),
        checkpoints: take(&mut bufs.checkpoints),
    }
}

impl<T: BlockScalar> Block<'_, T, Dense<'_, T>> {
    /// [`Block::backward`] of the Mamba-2 block.
    pub(super) fn backward_ssd(
        &self,
        ssd: &Ssd<'_, T>,
        cache: &BlockCache<T>,
        batch: usize,
        len: usize,
        dh: &mut [T],
    ) -> Result<BlockGradients<T>> {
        const OP: &str = "Block::backward";
        let d = self.shape.d_model;
        let (e, gn, nh) = self.ssd_widths();
        let (rows, in_rows, channels) = (batch * len, self.in_rows(), self.shape.conv_channels());
        check_len(
            OP,
            "dh",
            dh,
            &[("batch", batch), ("len", len), ("d_model", d)],
        )?;
        check_len(OP, "cached y", &cache.y, &[("rows", rows), ("d_inner", e)])?;
        let conv = self.conv.as_ref().ok_or_else(|| invalid(OP, "no conv"))?;
        let shape = self.ssd_shape(batch, len);
        // h_out = h_in + v W_outᵀ (+ b_out)
        let (out_proj_weight, out_proj_bias, dv) = self.out_proj_backward(cache, rows, dh)?;
        // v = n(g) ⊙ w, n(g) = g / rms over each group, g = y ⊙ silu(z)
        let gate: Vec<T> = cache.z.iter().map(|&z| z.silu()).collect();
        let g: Vec<T> = cache.s.iter().zip(&gate).map(|(&y, &s)| y * s).collect();
        let ones = vec![T::ONE; e];
        let mut normalised = g.clone();
        for row in normalised.chunks_mut(e) {
            gated_norm_row(row, &ones, shape.groups, self.shape.norm_eps);
        }
        let mut norm_weight = vec![T::ZERO; e];
        let weighted: Vec<T> = dv.iter().zip(&normalised).map(|(&a, &b)| a * b).collect();
        sum_rows_into(&weighted, &mut norm_weight);
        drop((weighted, normalised));
        let dn: Vec<T> = dv
            .chunks(e)
            .flat_map(|row| row.iter().zip(ssd.norm_weight).map(|(&a, &w)| a * w))
            .collect();
        let width = e / shape.groups;
        let eps = <T as Float>::from_f64(self.shape.norm_eps);
        // the groups of every row are rows of (BL·G, E/G)
        let dg = rms_norm_backward(&g, &ones[..width], width, eps, &dn)?.x;
        drop((g, dn, dv));
        let dy: Vec<T> = dg.iter().zip(&gate).map(|(&a, &s)| a * s).collect();
        let dz: Vec<T> = dg
            .iter()
            .zip(&cache.s)
            .zip(&cache.z)
            .map(|((&a, &y), &z)| a * y * z.silu_grad())
            .collect();
        drop((dg, gate));
        // recomputed: xc = conv1d(xBC) + b, x, B, C = silu(xc)
        let conv_shape = self.ssd_conv_shape(batch, len);
        let mut xc = vec![T::ZERO; rows * channels];
        causal_conv1d_forward(&conv_shape, &cache.x, conv.weight, conv.bias, &mut xc)?;
        let act: Vec<T> = xc.iter().map(|&a| a.silu()).collect();
        let (mut x, mut bm, mut cm) = (
            vec![T::ZERO; rows * e],
            vec![T::ZERO; rows * gn],
            vec![T::ZERO; rows * gn],
        );
        split_columns(&act, &mut [(&mut x, e), (&mut bm, gn), (&mut cm, gn)]);
        drop(act);
        let inputs = SsdInputs {
            x: &x,
            dt: &cache.dt_low,
            dt_bias: ssd.dt_bias,
            a: &ssd.a,
            b: &bm,
            c: &cm,
            d: ssd.d,
            initial_state: None,
        };
        let sg = ssd_backward(
            &shape,
            &inputs,
            &self.ssd_options(),
            &cache.checkpoints,
            &dy,
            None,
        )?;
        drop((x, bm, cm, dy));
        let a_log =
            sg.a.iter()
                .zip(ssd.a.iter())
                .map(|(&da, &a)| da * a)
                .collect();
        // d xc = [dx, dB, dC] ⊙ silu'(xc)
        let mut dxc = vec![T::ZERO; rows * channels];
        for (i, row) in dxc.chunks_mut(channels).enumerate() {
            row[..e].copy_from_slice(&sg.x[i * e..(i + 1) * e]);
            row[e..e + gn].copy_from_slice(&sg.b[i * gn..(i + 1) * gn]);
            row[e + gn..].copy_from_slice(&sg.c[i * gn..(i + 1) * gn]);
        }
        for (g, &x) in dxc.iter_mut().zip(&xc) {
            *g *= x.silu_grad();
        }
        drop(xc);
        let cg = causal_conv1d_backward(
            &conv_shape,
            &cache.x,
            conv.weight,
            conv.bias.is_some(),
            &dxc,
        )?;
        drop(dxc);
        // [z, xBC, dt] = u W_inᵀ (+ b_in)
        let mut d_in = vec![T::ZERO; rows * in_rows];
        for (i, row) in d_in.chunks_mut(in_rows).enumerate() {
            row[..e].copy_from_slice(&dz[i * e..(i + 1) * e]);
            row[e..e + channels].copy_from_slice(&cg.x[i * channels..(i + 1) * channels]);
            row[e + channels..].copy_from_slice(&sg.dt[i * nh..(i + 1) * nh]);
        }
        drop(dz);
        let mut normed = vec![T::ZERO; rows * d];
        self.norm(&cache.resid, &mut normed)?;
        let mut d_normed = vec![T::ZERO; rows * d];
        matmul_xw(
            &d_in,
            self.in_proj.weight,
            rows,
            in_rows,
            d,
            &mut d_normed,
            false,
        )?;
        let mut in_proj_weight = vec![T::ZERO; in_rows * d];
        matmul_xtw(&d_in, &normed, rows, in_rows, d, &mut in_proj_weight, false)?;
        let in_proj_bias = self.in_proj_bias.map(|b| {
            let mut g = vec![T::ZERO; b.len()];
            sum_rows_into(&d_in, &mut g);
            g
        });
        let ng = self.input_norm_backward(cache, &d_normed, dh)?;
        Ok(BlockGradients {
            norm_weight: ng.weight,
            norm_bias: ng.bias,
            in_proj_weight,
            in_proj_bias,
            conv_weight: cg.weight,
            conv_bias: cg.bias,
            mixer: MixerGradients::Ssd {
                dt_bias: sg.dt_bias,
                a_log,
                d: sg.d,
                norm_weight,
            },
            out_proj_weight,
            out_proj_bias,
        })
    }
}
