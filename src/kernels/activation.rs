//! Elementwise activations of the Mamba block and the Transformer's MLP,
//! forward and backward. They apply to any shape, one token or a whole
//! sequence alike.
//!
//! ```text
//! silu(x)     = x σ(x)                 silu'(x)     = σ(x) (1 + x (1 - σ(x)))
//! softplus(x) = ln(1 + e^x), x if > 20 softplus'(x) = σ(x), 1 if > 20
//! swiglu(g, u) = silu(g) ⊙ u           ∂/∂g = u silu'(g),  ∂/∂u = silu(g)   (Shazeer 2020)
//! ```

use crate::error::{check_len, Result};
use crate::float::Float;

fn map_into<T: Float>(op: &'static str, x: &[T], y: &mut [T], f: impl Fn(T) -> T) -> Result<()> {
    check_len(op, "y", y, &[("len", x.len())])?;
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv = f(xv);
    }
    Ok(())
}

fn grad_into<T: Float>(
    op: &'static str,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    f: impl Fn(T) -> T,
) -> Result<()> {
    check_len(op, "dy", dy, &[("len", x.len())])?;
    check_len(op, "dx", dx, &[("len", x.len())])?;
    for ((d, &xv), &g) in dx.iter_mut().zip(x).zip(dy) {
        *d = g * f(xv);
    }
    Ok(())
}

pub fn silu_forward<T: Float>(x: &[T], y: &mut [T]) -> Result<()> {
    map_into("silu_forward", x, y, T::silu)
}

pub fn silu_backward<T: Float>(x: &[T], dy: &[T], dx: &mut [T]) -> Result<()> {
    grad_into("silu_backward", x, dy, dx, T::silu_grad)
}

pub fn softplus_forward<T: Float>(x: &[T], y: &mut [T]) -> Result<()> {
    map_into("softplus_forward", x, y, T::softplus)
}

pub fn softplus_backward<T: Float>(x: &[T], dy: &[T], dx: &mut [T]) -> Result<()> {
    grad_into("softplus_backward", x, dy, dx, T::softplus_grad)
}

/// y = silu(gate) ⊙ up (the SwiGLU MLP's hidden layer); all (rows, F).
pub fn swiglu_forward<T: Float>(gate: &[T], up: &[T], y: &mut [T]) -> Result<()> {
    const OP: &str = "swiglu_forward";
    check_len(OP, "up", up, &[("len", gate.len())])?;
    check_len(OP, "y", y, &[("len", gate.len())])?;
    for ((yv, &g), &u) in y.iter_mut().zip(gate).zip(up) {
        *yv = g.silu() * u;
    }
    Ok(())
}

/// (d_gate, d_up) of [`swiglu_forward`] given dy, written into the two
/// buffers.
pub fn swiglu_backward<T: Float>(
    gate: &[T],
    up: &[T],
    dy: &[T],
    d_gate: &mut [T],
    d_up: &mut [T],
) -> Result<()> {
    const OP: &str = "swiglu_backward";
    let n = gate.len();
    check_len(OP, "up", up, &[("len", n)])?;
    check_len(OP, "dy", dy, &[("len", n)])?;
    check_len(OP, "d_gate", d_gate, &[("len", n)])?;
    check_len(OP, "d_up", d_up, &[("len", n)])?;
    for i in 0..n {
        d_gate[i] = dy[i] * up[i] * gate[i].silu_grad();
        d_up[i] = dy[i] * gate[i].silu();
    }
    Ok(())
}
