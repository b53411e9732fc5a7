//! The SSD layer (Mamba-2) written literally from its recurrence, one
//! scalar at a time, for testing the chunked kernels of [`super::ssd`]:
//!
//! ```text
//! Δ_t[h]   = clamp(softplus(dt_t[h] + dt_bias[h]), lo, hi)
//! S_t[h]   = exp(Δ_t[h] A[h]) S_{t-1}[h] + Δ_t[h] x_t[h,:] ⊗ B_t[g,:]      g = h / (H/G)
//! y_t[h,p] = Σ_n S_t[h][p,n] C_t[g,n] + D[h] x_t[h,p]
//! ```
//!
//! The backward is the plain reverse-time adjoint of that recurrence. It
//! keeps every state S_t, a (batch, len, heads, head_dim, state) tensor,
//! which the chunked backward never allocates.

use super::ssd::{validate_inputs, SsdGrads, SsdInputs, SsdOptions, SsdOutput, SsdShape};
use crate::error::{check_len, Result};
use crate::float::Float;

/// Δ and dΔ/d(dt + dt_bias) at (b, t, h): softplus, then the clamp, whose
/// gradient is 0 where it clamped.
fn delta_at<T: Float>(
    shape: &SsdShape,
    x: &SsdInputs<'_, T>,
    o: &SsdOptions,
    b: usize,
    t: usize,
    h: usize,
) -> (T, T) {
    let v = x.dt[(b * shape.len + t) * shape.heads + h] + x.dt_bias[h];
    let sp = v.softplus();
    let (lo, hi) = (T::from_f64(o.dt_limit.0), T::from_f64(o.dt_limit.1));
    if sp < lo {
        (lo, T::ZERO)
    } else if sp > hi {
        (hi, T::ZERO)
    } else {
        (sp, v.softplus_grad())
    }
}

/// Index helpers for the layouts of the module documentation of
/// [`super::ssd`].
struct Ix {
    l: usize,
    h: usize,
    p: usize,
    g: usize,
    n: usize,
}

impl Ix {
    fn new(s: &SsdShape) -> Self {
        Self {
            l: s.len,
            h: s.heads,
            p: s.head_dim,
            g: s.groups,
            n: s.state,
        }
    }
    /// x, y at (b, t, h, p)
    fn act(&self, b: usize, t: usize, h: usize, p: usize) -> usize {
        ((b * self.l + t) * self.h + h) * self.p + p
    }
    /// B, C at (b, t, g, n)
    fn tok(&self, b: usize, t: usize, g: usize, n: usize) -> usize {
        ((b * self.l + t) * self.g + g) * self.n + n
    }
    /// a state at (b, h, p, n)
    fn st(&self, b: usize, h: usize, p: usize, n: usize) -> usize {
        ((b * self.h + h) * self.p + p) * self.n + n
    }
}

/// Forward, literally: S_t = exp(Δ A) S_{t-1} + Δ x_t ⊗ B_t; y_t = S_t C_t + D x_t.
/// Of `options` only `dt_limit` applies.
pub fn ssd_reference<T: Float>(
    shape: &SsdShape,
    x: &SsdInputs<'_, T>,
    o: &SsdOptions,
) -> Result<SsdOutput<T>> {
    validate_inputs("ssd_reference", shape, x, o)?;
    let ix = Ix::new(shape);
    let (bs, l, nh, np, nn) = (
        shape.batch,
        shape.len,
        shape.heads,
        shape.head_dim,
        shape.state,
    );
    let hpg = nh / shape.groups;
    let mut y = vec![T::ZERO; x.x.len()];
    let mut final_state = vec![T::ZERO; bs * nh * np * nn];
    for b in 0..bs {
        for h in 0..nh {
            let g = h / hpg;
            // s[p][n]
            let mut s: Vec<Vec<T>> = (0..np)
                .map(|p| {
                    (0..nn)
                        .map(|n| x.initial_state.map_or(T::ZERO, |s0| s0[ix.st(b, h, p, n)]))
                        .collect()
                })
                .collect();
            for t in 0..l {
                let (delta, _) = delta_at(shape, x, o, b, t, h);
                let decay = (delta * x.a[h]).exp();
                for p in 0..np {
                    let xv = x.x[ix.act(b, t, h, p)];
                    let mut acc = T::ZERO;
                    for (n, sn) in s[p].iter_mut().enumerate() {
                        *sn = decay * *sn + delta * xv * x.b[ix.tok(b, t, g, n)];
                        acc += *sn * x.c[ix.tok(b, t, g, n)];
                    }
                    y[ix.act(b, t, h, p)] = acc + x.d[h] * xv;
                }
            }
            for p in 0..np {
                for n in 0..nn {
                    final_state[ix.st(b, h, p, n)] = s[p][n];
                }
            }
        }
    }
    Ok(SsdOutput { y, final_state })
}

/// Backward that stores every state, by the reverse-time adjoint:
/// with G_t = ∂L/∂S_t (through y_t and everything after t),
///
/// ```text
/// G_t      = exp(Δ_{t+1} A) G_{t+1} + dy_t ⊗ C_t,    G_{L-1} = d_final + dy_{L-1} ⊗ C_{L-1}
/// ∂L/∂C_t  = S_t dy_t                 ∂L/∂x_t  = D dy_t + Δ_t G_t B_t
/// ∂L/∂B_t  = Δ_t G_tᵀ x_t             ∂L/∂Δ_t  = A e^{Δ_t A} ⟨G_t, S_{t-1}⟩ + x_tᵀ G_t B_t
/// ∂L/∂A    = Σ_t Δ_t e^{Δ_t A} ⟨G_t, S_{t-1}⟩     ∂L/∂S_{-1} = e^{Δ_0 A} G_0
/// ```
pub fn ssd_backward_reference<T: Float>(
    shape: &SsdShape,
    x: &SsdInputs<'_, T>,
    o: &SsdOptions,
    dy: &[T],
    d_final_state: Option<&[T]>,
) -> Result<SsdGrads<T>> {
    const OP: &str = "ssd_backward_reference";
    validate_inputs(OP, shape, x, o)?;
    let (bs, l, nh, np, nn) = (
        shape.batch,
        shape.len,
        shape.heads,
        shape.head_dim,
        shape.state,
    );
    check_len(
        OP,
        "dy",
        dy,
        &[("batch", bs), ("len", l), ("heads", nh), ("head_dim", np)],
    )?;
    if let Some(gf) = d_final_state {
        check_len(
            OP,
            "d_final_state",
            gf,
            &[
                ("batch", bs),
                ("heads", nh),
                ("head_dim", np),
                ("state", nn),
            ],
        )?;
    }
    let ix = Ix::new(shape);
    let hpg = nh / shape.groups;
    // states[b, t, h, p, n] = S_t
    let st_at = |b: usize, t: usize, h: usize, p: usize, n: usize| {
        (((b * l + t) * nh + h) * np + p) * nn + n
    };
    let mut states = vec![T::ZERO; bs * l * nh * np * nn];
    let s0 = |b: usize, h: usize, p: usize, n: usize| {
        x.initial_state.map_or(T::ZERO, |s0| s0[ix.st(b, h, p, n)])
    };
    for b in 0..bs {
        for t in 0..l {
            for h in 0..nh {
                let g = h / hpg;
                let (delta, _) = delta_at(shape, x, o, b, t, h);
                let decay = (delta * x.a[h]).exp();
                for p in 0..np {
                    for n in 0..nn {
                        let prev = if t == 0 {
                            s0(b, h, p, n)
                        } else {
                            states[st_at(b, t - 1, h, p, n)]
                        };
                        states[st_at(b, t, h, p, n)] = decay * prev
                            + delta * x.x[ix.act(b, t, h, p)] * x.b[ix.tok(b, t, g, n)];
                    }
                }
            }
        }
    }
    let mut gr = SsdGrads::zeros(x);
    for b in 0..bs {
        for h in 0..nh {
            let g = h / hpg;
            let a = x.a[h];
            // gs[p][n] = ∂L/∂S_t from after t, running backwards.
            let mut gs: Vec<Vec<T>> = (0..np)
                .map(|p| {
                    (0..nn)
                        .map(|n| d_final_state.map_or(T::ZERO, |gf| gf[ix.st(b, h, p, n)]))
                        .collect()
                })
                .collect();
            for t in (0..l).rev() {
                let (delta, d_delta_d_v) = delta_at(shape, x, o, b, t, h);
                let decay = (delta * a).exp();
                let mut d_delta = T::ZERO;
                for p in 0..np {
                    let xi = ix.act(b, t, h, p);
                    let (xv, dyv) = (x.x[xi], dy[xi]);
                    gr.d[h] += dyv * xv;
                    gr.x[xi] += x.d[h] * dyv;
                    for n in 0..nn {
                        let bi = ix.tok(b, t, g, n);
                        let s_t = states[st_at(b, t, h, p, n)];
                        let s_prev = if t == 0 {
                            s0(b, h, p, n)
                        } else {
                            states[st_at(b, t - 1, h, p, n)]
                        };
                        gr.c[bi] += dyv * s_t;
                        let g_t = gs[p][n] + dyv * x.c[bi];
                        d_delta += g_t * s_prev * decay * a + g_t * xv * x.b[bi];
                        gr.a[h] += g_t * s_prev * decay * delta;
                        gr.x[xi] += g_t * delta * x.b[bi];
                        gr.b[bi] += g_t * delta * xv;
                        gs[p][n] = g_t * decay;
                    }
                }
                let d_raw = d_delta * d_delta_d_v;
                gr.dt[(b * l + t) * nh + h] = d_raw;
                gr.dt_bias[h] += d_raw;
            }
            if let Some(gi) = gr.initial_state.as_mut() {
                for p in 0..np {
                    for n in 0..nn {
                        gi[ix.st(b, h, p, n)] = gs[p][n];
                    }
                }
            }
        }
    }
    Ok(gr)
}
