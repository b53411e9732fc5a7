//! Normalisation over the last axis of a (rows, dim) tensor. Each row is a
//! token, so the same functions serve a whole sequence and a single
//! decoding step (rows = batch).
//!
//! ```text
//! RMSNorm:   y = x · r · w,              r = 1 / sqrt(mean(x²) + eps)
//! LayerNorm: y = (x - μ) · r · w + b,    r = 1 / sqrt(var(x) + eps)
//! ```
//!
//! Both backwards use x̂ (the normalised input) and g = dy · w:
//! RMSNorm dx = r (g - x̂ mean(g x̂)); LayerNorm dx = r (g - mean(g) - x̂ mean(g x̂)).

use rayon::prelude::*;

use crate::error::{check_len, invalid, Result};
use crate::float::Float;

fn check(op: &'static str, x: &[impl Sized], dim: usize, weight: &[impl Sized]) -> Result<usize> {
    if dim == 0 {
        return Err(invalid(op, "dim must be at least 1"));
    }
    if x.len() % dim != 0 {
        return Err(invalid(
            op,
            format!(
                "tensor `x` has {} elements, not a multiple of dim={dim}",
                x.len()
            ),
        ));
    }
    check_len(op, "weight", weight, &[("dim", dim)])?;
    Ok(x.len() / dim)
}

/// 1 / sqrt(mean(x²) + eps)
#[inline]
fn rms_scale<T: Float>(x: &[T], eps: T) -> T {
    let ms = x.iter().map(|&v| v * v).sum::<T>() / T::from_usize(x.len());
    T::ONE / (ms + eps).sqrt()
}

/// (μ, 1 / sqrt(var + eps)) with the biased variance, as PyTorch.
#[inline]
fn mean_and_scale<T: Float>(x: &[T], eps: T) -> (T, T) {
    let n = T::from_usize(x.len());
    let mean = x.iter().copied().sum::<T>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / n;
    (mean, T::ONE / (var + eps).sqrt())
}

/// Rows normalised per task: a decoding step's few rows stay on the
/// caller's thread instead of paying for waking another.
const ROWS_PER_TASK: usize = 16;

/// RMSNorm forward. x, y: (rows, dim); weight: (dim).
pub fn rms_norm_forward<T: Float>(
    x: &[T],
    weight: &[T],
    dim: usize,
    eps: T,
    y: &mut [T],
) -> Result<()> {
    const OP: &str = "rms_norm_forward";
    let rows = check(OP, x, dim, weight)?;
    check_len(OP, "y", y, &[("rows", rows), ("dim", dim)])?;
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(y_row, x_row)| {
            let r = rms_scale(x_row, eps);
            for ((yv, &xv), &wv) in y_row.iter_mut().zip(x_row).zip(weight) {
                *yv = xv * r * wv;
            }
        });
    Ok(())
}

/// Gradients of a normalisation layer.
#[derive(Clone, Debug, PartialEq)]
pub struct NormGrads<T> {
    /// (rows, dim)
    pub x: Vec<T>,
    /// (dim)
    pub weight: Vec<T>,
    /// (dim), LayerNorm only
    pub bias: Option<Vec<T>>,
}

/// Sums per-row weight (and bias) gradients over rows in parallel: rows are
/// cut into at most [`crate::kernels::REDUCTION_PARTS`] fixed ranges whose
/// partial sums are added in order, so the result does not depend on the
/// thread count or scheduling (training resumes bit for bit).
fn reduce_rows<T: Float>(
    dim: usize,
    rows: usize,
    with_bias: bool,
    per_row: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) -> (Vec<T>, Vec<T>) {
    let b_len = if with_bias { dim } else { 0 };
    let chunk = rows.div_ceil(crate::kernels::REDUCTION_PARTS).max(1);
    let partials: Vec<(Vec<T>, Vec<T>)> = (0..rows)
        .into_par_iter()
        .fold_chunks(
            chunk,
            || (vec![T::ZERO; dim], vec![T::ZERO; b_len]),
            |(mut dw, mut db), row| {
                per_row(row, &mut dw, &mut db);
                (dw, db)
            },
        )
        .collect();
    let mut total = (vec![T::ZERO; dim], vec![T::ZERO; b_len]);
    for (a2, b2) in &partials {
        total.0.iter_mut().zip(a2).for_each(|(x, y)| *x += *y);
        total.1.iter_mut().zip(b2).for_each(|(x, y)| *x += *y);
    }
    total
}

/// RMSNorm backward given dy (rows, dim).
pub fn rms_norm_backward<T: Float>(
    x: &[T],
    weight: &[T],
    dim: usize,
    eps: T,
    dy: &[T],
) -> Result<NormGrads<T>> {
    const OP: &str = "rms_norm_backward";
    let rows = check(OP, x, dim, weight)?;
    check_len(OP, "dy", dy, &[("rows", rows), ("dim", dim)])?;
    let mut dx = vec![T::ZERO; x.len()];
    dx.par_chunks_mut(dim)
        .zip(x.par_chunks(dim).zip(dy.par_chunks(dim)))
        .for_each(|(dx_row, (x_row, dy_row))| {
            let r = rms_scale(x_row, eps);
            // mean(g x̂) with g = dy w, x̂ = x r
            let mean_gx = x_row
                .iter()
                .zip(dy_row)
                .zip(weight)
                .map(|((&xv, &g), &wv)| g * wv * xv * r)
                .sum::<T>()
                / T::from_usize(dim);
            for (((d, &xv), &g), &wv) in dx_row.iter_mut().zip(x_row).zip(dy_row).zip(weight) {
                *d = r * (g * wv - xv * r * mean_gx);
            }
        });
    let (dw, _) = reduce_rows(dim, rows, false, |row, dw, _| {
        let x_row = &x[row * dim..(row + 1) * dim];
        let dy_row = &dy[row * dim..(row + 1) * dim];
        let r = rms_scale(x_row, eps);
        for ((acc, &xv), &g) in dw.iter_mut().zip(x_row).zip(dy_row) {
            *acc += g * xv * r;
        }
    });
    Ok(NormGrads {
        x: dx,
        weight: dw,
        bias: None,
    })
}

/// LayerNorm forward. x, y: (rows, dim); weight, bias: (dim).
pub fn layer_norm_forward<T: Float>(
    x: &[T],
    weight: &[T],
    bias: &[T],
    dim: usize,
    eps: T,
    y: &mut [T],
) -> Result<()> {
    const OP: &str = "layer_norm_forward";
    let rows = check(OP, x, dim, weight)?;
    check_len(OP, "bias", bias, &[("dim", dim)])?;
    check_len(OP, "y", y, &[("rows", rows), ("dim", dim)])?;
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(y_row, x_row)| {
            let (mean, r) = mean_and_scale(x_row, eps);
            for (((yv, &xv), &wv), &bv) in y_row.iter_mut().zip(x_row).zip(weight).zip(bias) {
                *yv = (xv - mean) * r * wv + bv;
            }
        });
    Ok(())
}

/// LayerNorm backward given dy (rows, dim).
pub fn layer_norm_backward<T: Float>(
    x: &[T],
    weight: &[T],
    dim: usize,
    eps: T,
    dy: &[T],
) -> Result<NormGrads<T>> {
    const OP: &str = "layer_norm_backward";
    let rows = check(OP, x, dim, weight)?;
    check_len(OP, "dy", dy, &[("rows", rows), ("dim", dim)])?;
    let n = T::from_usize(dim);
    let mut dx = vec![T::ZERO; x.len()];
    dx.par_chunks_mut(dim)
        .zip(x.par_chunks(dim).zip(dy.par_chunks(dim)))
        .for_each(|(dx_row, (x_row, dy_row))| {
            let (mean, r) = mean_and_scale(x_row, eps);
            let (mut mean_g, mut mean_gx) = (T::ZERO, T::ZERO);
            for ((&xv, &g), &wv) in x_row.iter().zip(dy_row).zip(weight) {
                mean_g += g * wv;
                mean_gx += g * wv * (xv - mean) * r;
            }
            mean_g /= n;
            mean_gx /= n;
            for (((d, &xv), &g), &wv) in dx_row.iter_mut().zip(x_row).zip(dy_row).zip(weight) {
                *d = r * (g * wv - mean_g - (xv - mean) * r * mean_gx);
            }
        });
    let (dw, db) = reduce_rows(dim, rows, true, |row, dw, db| {
        let x_row = &x[row * dim..(row + 1) * dim];
        let dy_row = &dy[row * dim..(row + 1) * dim];
        let (mean, r) = mean_and_scale(x_row, eps);
        for (((aw, ab), &xv), &g) in dw.iter_mut().zip(db.iter_mut()).zip(x_row).zip(dy_row) {
            *aw += g * (xv - mean) * r;
            *ab += g;
        }
    });
    Ok(NormGrads {
        x: dx,
        weight: dw,
        bias: Some(db),
    })
}
