//! Rotary position embedding (RoPE; Su et al. 2021), in the convention of
//! Hugging Face Llama (`rotate_half`: dimension i of a head pairs with
//! dimension i + Dh/2, not with its neighbour), docs/DESIGN.md §15.3:
//!
//! ```text
//! θ_i = base^(−2i / Dh)                       i < Dh/2  (inv_freq, in f64)
//! φ   = p θ_i                                 p the token's absolute position
//! x'_i        = x_i cos φ − x_{i+Dh/2} sin φ
//! x'_{i+Dh/2} = x_{i+Dh/2} cos φ + x_i sin φ
//! ```
//! A rotation of each pair: the backward is the rotation by −φ (its
//! transpose), the same function with `inverse`.
//!
//! Layout: x `(batch, len, heads, head_dim)`, rotated in place; the rows of
//! sequence b are the positions `start .. start + len`. Threads: over rows.

use rayon::prelude::*;

use crate::error::{check_len, invalid, Result};
use crate::float::Float;

/// The frequencies of one head's rotary embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct Rotary {
    pub head_dim: usize,
    /// θ_i (Dh/2) in f64: the equation's value. transformers builds its
    /// `inv_freq` buffer in f32, so its angles differ from these by at most
    /// p·θ_i·2^-24 (1e-4 rad at p = 2048); the f64 fixtures recompute it in
    /// f64 (scripts/make_transformer_reference.py, `exact_rope`).
    pub inv_freq: Vec<f64>,
}

impl Rotary {
    /// θ_i = base^(−2i/Dh), as `1 / base ** (arange(0, Dh, 2) / Dh)`.
    pub fn new(head_dim: usize, base: f64) -> Result<Self> {
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(invalid(
                "Rotary::new",
                format!("head_dim must be even and at least 2, got {head_dim}"),
            ));
        }
        if !(base.is_finite() && base > 1.0) {
            return Err(invalid(
                "Rotary::new",
                format!("rope_theta must be a finite number above 1, got {base}"),
            ));
        }
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        Ok(Self { head_dim, inv_freq })
    }

    /// (cos φ_i, sin φ_i) of position `p`, for i < Dh/2, in f64.
    fn angles(&self, p: usize, out: &mut Vec<(f64, f64)>) {
        out.clear();
        out.extend(self.inv_freq.iter().map(|&f| {
            let phi = p as f64 * f;
            (phi.cos(), phi.sin())
        }));
    }

    /// Rotates every head of x `(batch, len, heads, head_dim)` by its
    /// position `start + t`; `inverse` rotates by −φ (the backward).
    pub fn apply<T: Float>(
        &self,
        x: &mut [T],
        batch: usize,
        len: usize,
        heads: usize,
        start: usize,
        inverse: bool,
    ) -> Result<()> {
        let dh = self.head_dim;
        check_len(
            "Rotary::apply",
            "x",
            x,
            &[
                ("batch", batch),
                ("len", len),
                ("heads", heads),
                ("head_dim", dh),
            ],
        )?;
        let half = dh / 2;
        x.par_chunks_mut(heads * dh)
            .enumerate()
            .with_min_len(16)
            .for_each_init(Vec::new, |angles, (row, x_row)| {
                self.angles(start + row % len, angles);
                for head in x_row.chunks_mut(dh) {
                    let (lo, hi) = head.split_at_mut(half);
                    for ((a, b), &(cos, sin)) in lo.iter_mut().zip(hi.iter_mut()).zip(angles.iter())
                    {
                        let (cos, sin) = (T::from_f64(cos), T::from_f64(sin));
                        let sin = if inverse { -sin } else { sin };
                        let (x1, x2) = (*a, *b);
                        *a = x1 * cos - x2 * sin;
                        *b = x2 * cos + x1 * sin;
                    }
                }
            });
        Ok(())
    }
}
