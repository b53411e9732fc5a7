//! One step of the selective scan's recurrence, for decoding (docs/DESIGN.md
//! §9.3, §2.7): the same equations as [`super::selective_scan`] at a single
//! position, updating the state in place and allocating nothing.
//!
//! ```text
//! u, delta, z, out    (batch, channels)
//! A                   (channels, state)
//! B, C                (batch, state)
//! D, delta_bias       (channels)
//! state               (batch, channels, state)     h_{t-1} in, h_t out
//!
//! Δ = softplus(delta + delta_bias)
//! h = exp(Δ A) ⊙ h + B̄ u        B̄ u = Δ B u (official) or (exp(ΔA) - 1)/A · B u (ZOH)
//! out = (C · h + D u) · silu(z)
//! ```
//! The work per step is batch × channels × state multiply-adds (25 K for
//! one sequence of mamba-130m): far below what is worth waking a second
//! thread for, so it runs on the caller's thread.

use super::selective_scan::{Discretization, ScanOptions};
use crate::error::{check_len, invalid, Result};
use crate::float::Float;

/// Inputs of one scan step, in the layout of the module documentation.
#[derive(Clone, Copy, Debug)]
pub struct ScanStepInputs<'a, T> {
    pub u: &'a [T],
    /// Raw Δ, before delta_bias and softplus.
    pub delta: &'a [T],
    pub a: &'a [T],
    pub b: &'a [T],
    pub c: &'a [T],
    pub d: Option<&'a [T]>,
    pub z: Option<&'a [T]>,
    pub delta_bias: Option<&'a [T]>,
}

/// Advances `state` (batch, channels, state_size) by one position and
/// writes out (batch, channels). Only `delta_softplus` and
/// `discretization` of `options` apply to a single step.
#[allow(clippy::too_many_arguments)]
pub fn selective_scan_step<T: Float>(
    batch: usize,
    channels: usize,
    state_size: usize,
    inputs: &ScanStepInputs<'_, T>,
    options: &ScanOptions,
    state: &mut [T],
    out: &mut [T],
) -> Result<()> {
    const OP: &str = "selective_scan_step";
    if batch == 0 || channels == 0 || state_size == 0 {
        return Err(invalid(OP, "batch, channels and state must be at least 1"));
    }
    let act = [("batch", batch), ("channels", channels)];
    let per_seq = [("batch", batch), ("state", state_size)];
    check_len(OP, "u", inputs.u, &act)?;
    check_len(OP, "delta", inputs.delta, &act)?;
    check_len(
        OP,
        "A",
        inputs.a,
        &[("channels", channels), ("state", state_size)],
    )?;
    check_len(OP, "B", inputs.b, &per_seq)?;
    check_len(OP, "C", inputs.c, &per_seq)?;
    if let Some(d) = inputs.d {
        check_len(OP, "D", d, &[("channels", channels)])?;
    }
    if let Some(z) = inputs.z {
        check_len(OP, "z", z, &act)?;
    }
    if let Some(bias) = inputs.delta_bias {
        check_len(OP, "delta_bias", bias, &[("channels", channels)])?;
    }
    check_len(
        OP,
        "state",
        state,
        &[
            ("batch", batch),
            ("channels", channels),
            ("state", state_size),
        ],
    )?;
    check_len(OP, "out", out, &act)?;

    let n = state_size;
    for bi in 0..batch {
        let b_t = &inputs.b[bi * n..(bi + 1) * n];
        let c_t = &inputs.c[bi * n..(bi + 1) * n];
        for ch0 in (0..channels).step_by(CHANNEL_BLOCK) {
            let nb = CHANNEL_BLOCK.min(channels - ch0);
            let first = bi * channels + ch0;
            // Δ and the gate silu(z) of the block's channels, computed
            // together so that their exp and ln vectorise over channels
            // (lanes past nb compute on zeros and are not used).
            let mut dt = [T::ZERO; CHANNEL_BLOCK];
            dt[..nb].copy_from_slice(&inputs.delta[first..first + nb]);
            if let Some(bias) = inputs.delta_bias {
                for (v, &b) in dt.iter_mut().zip(&bias[ch0..ch0 + nb]) {
                    *v += b;
                }
            }
            if options.delta_softplus {
                for v in dt.iter_mut() {
                    *v = v.softplus();
                }
            }
            let mut gate = [T::ONE; CHANNEL_BLOCK];
            if let Some(z) = inputs.z {
                let mut zb = [T::ZERO; CHANNEL_BLOCK];
                zb[..nb].copy_from_slice(&z[first..first + nb]);
                for (g, &zv) in gate.iter_mut().zip(&zb) {
                    *g = zv.silu();
                }
            }
            for j in 0..nb {
                let (ch, i) = (ch0 + j, first + j);
                let (u, dt) = (inputs.u[i], dt[j]);
                let a_row = &inputs.a[ch * n..(ch + 1) * n];
                let h = &mut state[i * n..(i + 1) * n];
                let disc = options.discretization;
                // The released models have 16 states: with the length known
                // at compile time the update and the dot product are whole
                // vectors, with no loop or remainder.
                let mut y = if n == STATE_16 {
                    update_state(
                        &mut h[..STATE_16],
                        &a_row[..STATE_16],
                        &b_t[..STATE_16],
                        &c_t[..STATE_16],
                        dt,
                        u,
                        disc,
                    )
                } else {
                    update_state(h, a_row, b_t, c_t, dt, u, disc)
                };
                if let Some(d) = inputs.d {
                    y = d[ch].mul_add(u, y);
                }
                // × 1 when there is no gate: exact
                out[i] = y * gate[j];
            }
        }
    }
    Ok(())
}

/// Channels whose Δ and gate are computed together.
const CHANNEL_BLOCK: usize = 16;

/// The state size of the released models (d_state = 16).
const STATE_16: usize = 16;

/// One channel: h = exp(Δ A) ⊙ h + B̄ u element-wise over the state index
/// (vectorises, exp included), then C · h.
#[inline(always)]
fn update_state<T: Float>(
    h: &mut [T],
    a_row: &[T],
    b: &[T],
    c: &[T],
    dt: T,
    u: T,
    discretization: Discretization,
) -> T {
    let dtu = dt * u;
    match discretization {
        Discretization::Official => {
            for ((hs, &an), &bn) in h.iter_mut().zip(a_row).zip(b) {
                *hs = (dt * an).exp().mul_add(*hs, dtu * bn);
            }
        }
        Discretization::ZeroOrderHold => {
            for ((hs, &an), &bn) in h.iter_mut().zip(a_row).zip(b) {
                let x = dt * an;
                *hs = x.exp().mul_add(*hs, dtu * x.expm1_over_x() * bn);
            }
        }
    }
    if h.len() == STATE_16 {
        // C · h from a copy held in registers: read back from `h` in
        // pieces just after its whole-vector store, the dot product
        // waited on store forwarding (8 % of q8 decoding samples through
        // `dot`, 5.6 % this way).
        let mut p = [T::ZERO; STATE_16];
        for ((pw, &cw), &hw) in p.iter_mut().zip(c).zip(h.iter()) {
            *pw = cw * hw;
        }
        return T::sum_16(p);
    }
    dot(c, h)
}

/// Σ a[i] b[i] with 16 independent partial sums, so that it vectorises.
#[inline(always)]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    const LANES: usize = 16;
    let mut lanes = [T::ZERO; LANES];
    let split = a.len() / LANES * LANES;
    for (ca, cb) in a[..split]
        .chunks_exact(LANES)
        .zip(b[..split].chunks_exact(LANES))
    {
        for w in 0..LANES {
            lanes[w] = ca[w].mul_add(cb[w], lanes[w]);
        }
    }
    let mut sum = T::ZERO;
    for (&x, &y) in a[split..].iter().zip(&b[split..]) {
        sum = x.mul_add(y, sum);
    }
    // Halving the lanes (16 → 8 → 4 → 2 → 1): four dependent adds instead
    // of a chain of sixteen, which the decoding step waited on per channel.
    sum + T::sum_16(lanes)
}
