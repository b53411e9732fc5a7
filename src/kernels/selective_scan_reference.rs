//! The selective scan written literally from the equations (docs/DESIGN.md
//! §2.2), one scalar at a time, for testing the fused kernel.
//!
//! The backward here is the textbook one: it keeps every state h_t, a
//! (batch, len, channels, state) tensor, which the fused kernel never
//! allocates. It also serves as the "store everything" side of the memory
//! comparison in the benchmarks.

use super::selective_scan::{
    validate_inputs, Discretization, ScanGrads, ScanInputs, ScanOptions, ScanOutput, ScanShape,
};
use crate::error::{check_len, Result};
use crate::float::Float;

/// Δ for (b, t, d).
fn delta_at<T: Float>(x: &ScanInputs<'_, T>, o: &ScanOptions, i: usize, d: usize) -> T {
    let v = x.delta[i] + x.delta_bias.map_or(T::ZERO, |bias| bias[d]);
    if o.delta_softplus {
        v.softplus()
    } else {
        v
    }
}

/// (Ā, B̄ u) for one element.
fn discretize<T: Float>(o: &ScanOptions, dt: T, a: T, b: T, u: T) -> (T, T) {
    let a_bar = (dt * a).exp();
    let bu = match o.discretization {
        Discretization::Official => dt * b * u,
        Discretization::ZeroOrderHold => dt * (dt * a).expm1_over_x() * b * u,
    };
    (a_bar, bu)
}

/// Forward, literally: h_t = Ā h_{t-1} + B̄ u_t; y_t = C h_t + D u_t; y·silu(z).
pub fn selective_scan_reference<T: Float>(
    shape: &ScanShape,
    x: &ScanInputs<'_, T>,
    o: &ScanOptions,
) -> Result<ScanOutput<T>> {
    validate_inputs("selective_scan_reference", shape, x, o)?;
    let (bs, l, dm, n) = (shape.batch, shape.len, shape.channels, shape.state);
    let mut out = vec![T::ZERO; bs * l * dm];
    let mut final_state = vec![T::ZERO; bs * dm * n];
    for b in 0..bs {
        for d in 0..dm {
            let mut h: Vec<T> = (0..n)
                .map(|s| {
                    x.initial_state
                        .map_or(T::ZERO, |h0| h0[(b * dm + d) * n + s])
                })
                .collect();
            for t in 0..l {
                let i = (b * l + t) * dm + d;
                let dt = delta_at(x, o, i, d);
                let mut y = T::ZERO;
                for s in 0..n {
                    let bt = x.b[(b * l + t) * n + s];
                    let ct = x.c[(b * l + t) * n + s];
                    let (a_bar, bu) = discretize(o, dt, x.a[d * n + s], bt, x.u[i]);
                    h[s] = a_bar * h[s] + bu;
                    y += ct * h[s];
                }
                y += x.d.map_or(T::ZERO, |dd| dd[d]) * x.u[i];
                if let Some(z) = x.z {
                    y *= z[i].silu();
                }
                out[i] = y;
            }
            for s in 0..n {
                final_state[(b * dm + d) * n + s] = h[s];
            }
        }
    }
    Ok(ScanOutput { out, final_state })
}

/// Backward that stores every state: hs[b, t, d, n] = h_t.
pub fn selective_scan_backward_reference<T: Float>(
    shape: &ScanShape,
    x: &ScanInputs<'_, T>,
    o: &ScanOptions,
    d_out: &[T],
    d_final_state: Option<&[T]>,
) -> Result<ScanGrads<T>> {
    const OP: &str = "selective_scan_backward_reference";
    validate_inputs(OP, shape, x, o)?;
    let (bs, l, dm, n) = (shape.batch, shape.len, shape.channels, shape.state);
    check_len(
        OP,
        "d_out",
        d_out,
        &[("batch", bs), ("len", l), ("channels", dm)],
    )?;
    // Forward, keeping every state.
    let mut hs = vec![T::ZERO; bs * l * dm * n];
    let h0 = |b: usize, d: usize, s: usize| {
        x.initial_state
            .map_or(T::ZERO, |h0| h0[(b * dm + d) * n + s])
    };
    for b in 0..bs {
        for d in 0..dm {
            for t in 0..l {
                let i = (b * l + t) * dm + d;
                let dt = delta_at(x, o, i, d);
                for s in 0..n {
                    let prev = if t == 0 {
                        h0(b, d, s)
                    } else {
                        hs[i * n + s - dm * n]
                    };
                    let (a_bar, bu) =
                        discretize(o, dt, x.a[d * n + s], x.b[(b * l + t) * n + s], x.u[i]);
                    hs[i * n + s] = a_bar * prev + bu;
                }
            }
        }
    }
    let mut g = ScanGrads {
        u: vec![T::ZERO; x.u.len()],
        delta: vec![T::ZERO; x.delta.len()],
        a: vec![T::ZERO; x.a.len()],
        b: vec![T::ZERO; x.b.len()],
        c: vec![T::ZERO; x.c.len()],
        d: x.d.map(|v| vec![T::ZERO; v.len()]),
        z: x.z.map(|v| vec![T::ZERO; v.len()]),
        delta_bias: x.delta_bias.map(|v| vec![T::ZERO; v.len()]),
        initial_state: x.initial_state.map(|v| vec![T::ZERO; v.len()]),
    };
    for b in 0..bs {
        for d in 0..dm {
            let dd = x.d.map_or(T::ZERO, |v| v[d]);
            // gh[s] = ∂L/∂h_t[s], running backwards in time.
            let mut gh: Vec<T> = (0..n)
                .map(|s| d_final_state.map_or(T::ZERO, |gf| gf[(b * dm + d) * n + s]))
                .collect();
            for t in (0..l).rev() {
                let i = (b * l + t) * dm + d;
                let raw = x.delta[i] + x.delta_bias.map_or(T::ZERO, |v| v[d]);
                let dt = delta_at(x, o, i, d);
                let u = x.u[i];
                // y_ssm = Σ_s C h_t + D u
                let mut y = dd * u;
                for s in 0..n {
                    y += x.c[(b * l + t) * n + s] * hs[i * n + s];
                }
                let dy = match x.z {
                    Some(z) => {
                        g.z.as_mut().unwrap()[i] = d_out[i] * y * z[i].silu_grad();
                        d_out[i] * z[i].silu()
                    }
                    None => d_out[i],
                };
                if let Some(gd) = g.d.as_mut() {
                    gd[d] += dy * u;
                }
                g.u[i] += dy * dd;
                let mut ddt = T::ZERO;
                for s in 0..n {
                    let bi = (b * l + t) * n + s;
                    let a = x.a[d * n + s];
                    let h_prev = if t == 0 {
                        h0(b, d, s)
                    } else {
                        hs[i * n + s - dm * n]
                    };
                    g.c[bi] += dy * hs[i * n + s];
                    let gt = gh[s] + dy * x.c[bi];
                    let a_bar = (dt * a).exp();
                    // ∂h_t/∂Ā = h_{t-1}; ∂Ā/∂Δ = A Ā; ∂Ā/∂A = Δ Ā
                    ddt += gt * h_prev * a_bar * a;
                    g.a[d * n + s] += gt * h_prev * a_bar * dt;
                    match o.discretization {
                        Discretization::Official => {
                            ddt += gt * x.b[bi] * u;
                            g.b[bi] += gt * dt * u;
                            g.u[i] += gt * dt * x.b[bi];
                        }
                        Discretization::ZeroOrderHold => {
                            let xa = dt * a;
                            let phi = dt * xa.expm1_over_x();
                            ddt += gt * x.b[bi] * u * a_bar;
                            g.a[d * n + s] += gt * x.b[bi] * u * dt * dt * xa.expm1_over_x_grad();
                            g.b[bi] += gt * phi * u;
                            g.u[i] += gt * phi * x.b[bi];
                        }
                    }
                    gh[s] = gt * a_bar;
                }
                let d_raw = if o.delta_softplus {
                    ddt * raw.softplus_grad()
                } else {
                    ddt
                };
                g.delta[i] = d_raw;
                if let Some(gb) = g.delta_bias.as_mut() {
                    gb[d] += d_raw;
                }
            }
            if let Some(gi) = g.initial_state.as_mut() {
                for s in 0..n {
                    gi[(b * dm + d) * n + s] = gh[s];
                }
            }
        }
    }
    Ok(g)
}
