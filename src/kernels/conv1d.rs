//! Causal depthwise 1-D convolution with bias, the Mamba block's local mixing
//! before the scan (docs/DESIGN.md §4):
//!
//! ```text
//! y[b, t, c] = bias[c] + Σ_{j=0}^{K-1} W[c, j] · x[b, t - (K-1) + j, c]    (x = 0 before t = 0)
//! ```
//!
//! Layout: x, y (batch, len, channels); W (channels, K), the official
//! `conv1d.weight` (channels, 1, K) without its middle axis; bias (channels).
//! The kernel works row by row (one position, all channels), so its inner
//! loop runs over contiguous channels and vectorises.
//!
//! Recurrent form: `state` (batch, channels, K) holds the last K inputs
//! (oldest first, zero padded when fewer were seen), as the official
//! `conv_state`. A step shifts it left, appends x_t and applies W.

use rayon::prelude::*;

use crate::error::{check_len, invalid, Result};
use crate::float::Float;

/// Sizes of a causal depthwise convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub len: usize,
    pub channels: usize,
    /// K, the kernel width (`d_conv`).
    pub kernel: usize,
}

impl ConvShape {
    fn check(
        &self,
        op: &'static str,
        weight: &[impl Sized],
        bias: Option<&[impl Sized]>,
    ) -> Result<()> {
        if self.kernel == 0 || self.channels == 0 {
            return Err(invalid(op, "channels and kernel width must be at least 1"));
        }
        check_len(
            op,
            "weight",
            weight,
            &[("channels", self.channels), ("kernel", self.kernel)],
        )?;
        if let Some(bias) = bias {
            check_len(op, "bias", bias, &[("channels", self.channels)])?;
        }
        Ok(())
    }

    fn act_dims(&self) -> [(&'static str, usize); 3] {
        [
            ("batch", self.batch),
            ("len", self.len),
            ("channels", self.channels),
        ]
    }

    /// W transposed to (K, channels), so that tap j of every channel is contiguous.
    fn taps<T: Float>(&self, weight: &[T]) -> Vec<T> {
        let (c, k) = (self.channels, self.kernel);
        let mut taps = vec![T::ZERO; k * c];
        for ch in 0..c {
            for j in 0..k {
                taps[j * c + ch] = weight[ch * k + j];
            }
        }
        taps
    }
}

/// Forward over whole sequences. `y`: (batch, len, channels).
pub fn causal_conv1d_forward<T: Float>(
    shape: &ConvShape,
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    y: &mut [T],
) -> Result<()> {
    const OP: &str = "causal_conv1d_forward";
    shape.check(OP, weight, bias)?;
    check_len(OP, "x", x, &shape.act_dims())?;
    check_len(OP, "y", y, &shape.act_dims())?;
    let (l, c, k) = (shape.len, shape.channels, shape.kernel);
    let taps = shape.taps(weight);
    y.par_chunks_mut(c).enumerate().for_each(|(row, y_row)| {
        let (b, t) = (row / l.max(1), row % l.max(1));
        match bias {
            Some(bias) => y_row.copy_from_slice(bias),
            None => y_row.fill(T::ZERO),
        }
        // tap j reads position t - (K-1) + j
        for j in (k - 1).saturating_sub(t)..k {
            let src = (b * l + t + j + 1 - k) * c;
            let x_row = &x[src..src + c];
            let w = &taps[j * c..(j + 1) * c];
            for ((yv, &xv), &wv) in y_row.iter_mut().zip(x_row).zip(w) {
                *yv += wv * xv;
            }
        }
    });
    Ok(())
}

/// Gradients of the convolution.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvGrads<T> {
    /// (batch, len, channels)
    pub x: Vec<T>,
    /// (channels, K)
    pub weight: Vec<T>,
    /// (channels), present when the forward had a bias
    pub bias: Option<Vec<T>>,
}

/// Backward over whole sequences, given dy (batch, len, channels):
/// dx[s] = Σ_j W[j] dy[s + (K-1) - j];  dW[c, j] = Σ_{b,t} dy[t] x[t - (K-1) + j];
/// dbias = Σ_{b,t} dy.
pub fn causal_conv1d_backward<T: Float>(
    shape: &ConvShape,
    x: &[T],
    weight: &[T],
    has_bias: bool,
    dy: &[T],
) -> Result<ConvGrads<T>> {
    const OP: &str = "causal_conv1d_backward";
    shape.check(OP, weight, None::<&[T]>)?;
    check_len(OP, "x", x, &shape.act_dims())?;
    check_len(OP, "dy", dy, &shape.act_dims())?;
    let (l, c, k) = (shape.len, shape.channels, shape.kernel);
    let taps = shape.taps(weight);
    let mut dx = vec![T::ZERO; x.len()];
    dx.par_chunks_mut(c).enumerate().for_each(|(row, dx_row)| {
        let (b, s) = (row / l.max(1), row % l.max(1));
        // position s feeds output s + (K-1) - j through tap j
        for j in 0..k {
            let t = s + k - 1 - j;
            if t >= l {
                continue;
            }
            let dy_row = &dy[(b * l + t) * c..(b * l + t + 1) * c];
            let w = &taps[j * c..(j + 1) * c];
            for ((d, &g), &wv) in dx_row.iter_mut().zip(dy_row).zip(w) {
                *d += wv * g;
            }
        }
    });
    // dW and dbias sum over every row: partial sums over fixed row ranges,
    // added in order (the same bits whatever the threads).
    let rows = shape.batch * l;
    let chunk = rows.div_ceil(crate::kernels::REDUCTION_PARTS).max(1);
    let partials: Vec<(Vec<T>, Vec<T>)> = (0..rows)
        .into_par_iter()
        .fold_chunks(
            chunk,
            || (vec![T::ZERO; k * c], vec![T::ZERO; c]),
            |(mut dt, mut db), row| {
                let (b, t) = (row / l, row % l);
                let dy_row = &dy[row * c..(row + 1) * c];
                for (acc, &g) in db.iter_mut().zip(dy_row) {
                    *acc += g;
                }
                for j in (k - 1).saturating_sub(t)..k {
                    let src = (b * l + t + j + 1 - k) * c;
                    let x_row = &x[src..src + c];
                    for ((acc, &g), &xv) in dt[j * c..(j + 1) * c].iter_mut().zip(dy_row).zip(x_row)
                    {
                        *acc += g * xv;
                    }
                }
                (dt, db)
            },
        )
        .collect();
    let (mut dtaps, mut dbias) = (vec![T::ZERO; k * c], vec![T::ZERO; c]);
    for (a2, b2) in &partials {
        dtaps.iter_mut().zip(a2).for_each(|(x, y)| *x += *y);
        dbias.iter_mut().zip(b2).for_each(|(x, y)| *x += *y);
    }
    let mut dweight = vec![T::ZERO; c * k];
    for ch in 0..c {
        for j in 0..k {
            dweight[ch * k + j] = dtaps[j * c + ch];
        }
    }
    Ok(ConvGrads {
        x: dx,
        weight: dweight,
        bias: has_bias.then_some(dbias),
    })
}

/// The recurrent state after a whole sequence: the last K inputs of each
/// channel, zero padded when len < K. Returns (batch, channels, K).
pub fn causal_conv1d_state<T: Float>(shape: &ConvShape, x: &[T]) -> Result<Vec<T>> {
    const OP: &str = "causal_conv1d_state";
    check_len(OP, "x", x, &shape.act_dims())?;
    let (l, c, k) = (shape.len, shape.channels, shape.kernel);
    let mut state = vec![T::ZERO; shape.batch * c * k];
    for b in 0..shape.batch {
        for j in 0..k {
            // slot j holds position l - K + j
            if l + j < k {
                continue;
            }
            let t = l + j - k;
            for ch in 0..c {
                state[(b * c + ch) * k + j] = x[(b * l + t) * c + ch];
            }
        }
    }
    Ok(state)
}

/// Forward that continues from a recurrent `state` (batch, channels, K)
/// instead of zeros, and leaves in it the state after the sequence: what
/// prefill does when it resumes a saved sequence. Positions before t = 0
/// are read from the state (slot j holds position j - K).
pub fn causal_conv1d_forward_continuing<T: Float>(
    shape: &ConvShape,
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    state: &mut [T],
    y: &mut [T],
) -> Result<()> {
    const OP: &str = "causal_conv1d_forward_continuing";
    shape.check(OP, weight, bias)?;
    check_len(OP, "x", x, &shape.act_dims())?;
    check_len(OP, "y", y, &shape.act_dims())?;
    let (l, c, k) = (shape.len, shape.channels, shape.kernel);
    check_len(
        OP,
        "state",
        state,
        &[("batch", shape.batch), ("channels", c), ("kernel", k)],
    )?;
    // The first K-1 outputs see the state; the rest are the plain forward.
    causal_conv1d_forward(shape, x, weight, bias, y)?;
    for b in 0..shape.batch {
        for t in 0..l.min(k - 1) {
            for ch in 0..c {
                let mut acc = T::ZERO;
                // taps reading positions p = t - (K-1) + j < 0
                for j in 0..k - 1 - t {
                    acc += weight[ch * k + j] * state[(b * c + ch) * k + j + t + 1];
                }
                y[(b * l + t) * c + ch] += acc;
            }
        }
        // new slot j holds position l - K + j of [old state ++ x]
        for ch in 0..c {
            let window = &mut state[(b * c + ch) * k..(b * c + ch + 1) * k];
            if l >= k {
                for (j, slot) in window.iter_mut().enumerate() {
                    *slot = x[(b * l + l - k + j) * c + ch];
                }
            } else {
                window.copy_within(l.., 0);
                for j in 0..l {
                    window[k - l + j] = x[(b * l + j) * c + ch];
                }
            }
        }
    }
    Ok(())
}

/// One decoding step: shifts `state` (batch, channels, K) left, appends
/// x_t (batch, channels) and writes y_t (batch, channels).
#[allow(clippy::too_many_arguments)]
pub fn causal_conv1d_step<T: Float>(
    batch: usize,
    channels: usize,
    kernel: usize,
    state: &mut [T],
    x_t: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    y_t: &mut [T],
) -> Result<()> {
    const OP: &str = "causal_conv1d_step";
    let shape = ConvShape {
        batch,
        len: 1,
        channels,
        kernel,
    };
    shape.check(OP, weight, bias)?;
    check_len(
        OP,
        "state",
        state,
        &[("batch", batch), ("channels", channels), ("kernel", kernel)],
    )?;
    check_len(OP, "x_t", x_t, &[("batch", batch), ("channels", channels)])?;
    check_len(OP, "y_t", y_t, &[("batch", batch), ("channels", channels)])?;
    for (i, window) in state.chunks_exact_mut(kernel).enumerate() {
        window.copy_within(1.., 0);
        window[kernel - 1] = x_t[i];
        let ch = i % channels;
        let w = &weight[ch * kernel..(ch + 1) * kernel];
        let mut acc = bias.map_or(T::ZERO, |b| b[ch]);
        for (&wv, &xv) in w.iter().zip(window.iter()) {
            acc += wv * xv;
        }
        y_t[i] = acc;
    }
    Ok(())
}

/// The convolution written literally from its equation, for the tests.
pub fn causal_conv1d_reference<T: Float>(
    shape: &ConvShape,
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
) -> Result<Vec<T>> {
    const OP: &str = "causal_conv1d_reference";
    shape.check(OP, weight, bias)?;
    check_len(OP, "x", x, &shape.act_dims())?;
    let (l, c, k) = (shape.len, shape.channels, shape.kernel);
    let mut y = vec![T::ZERO; x.len()];
    for b in 0..shape.batch {
        for t in 0..l {
            for ch in 0..c {
                let mut acc = bias.map_or(T::ZERO, |v| v[ch]);
                for j in 0..k {
                    let pos = t as isize - (k as isize - 1) + j as isize;
                    if pos >= 0 {
                        acc += weight[ch * k + j] * x[(b * l + pos as usize) * c + ch];
                    }
                }
                y[(b * l + t) * c + ch] = acc;
            }
        }
    }
    Ok(y)
}
