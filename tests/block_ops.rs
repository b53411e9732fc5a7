//! The Mamba block's other operations: causal depthwise conv1d, RMSNorm,
//! LayerNorm, SiLU and softplus, against literal formulas and finite
//! differences in f64, plus their single-step forms.

mod common;

use common::*;
use selective::kernels::*;

/// Central finite differences of a scalar function of `x`.
fn fd_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let eps = 1e-6;
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = x[i];
            x[i] = orig + eps;
            let lp = f(&x);
            x[i] = orig - eps;
            let lm = f(&x);
            x[i] = orig;
            (lp - lm) / (2.0 * eps)
        })
        .collect()
}

const CONV_SHAPES: [(usize, usize, usize, usize); 6] = [
    (1, 1, 1, 4),
    (2, 2, 3, 4),
    (1, 3, 17, 4),
    (3, 11, 5, 3),
    (2, 40, 33, 1),
    (1, 9, 8, 2),
];

fn conv_shape(&(batch, len, channels, kernel): &(usize, usize, usize, usize)) -> ConvShape {
    ConvShape {
        batch,
        len,
        channels,
        kernel,
    }
}

#[test]
fn conv1d_matches_reference() {
    for (i, dims) in CONV_SHAPES.iter().enumerate() {
        let s = conv_shape(dims);
        let x = random_vec::<f32>(s.batch * s.len * s.channels, i as u64);
        let w = random_vec::<f32>(s.channels * s.kernel, 100 + i as u64);
        let bias = random_vec::<f32>(s.channels, 200 + i as u64);
        for b in [Some(bias.as_slice()), None] {
            let want = causal_conv1d_reference(&s, &x, &w, b).unwrap();
            let mut got = vec![0.0; x.len()];
            causal_conv1d_forward(&s, &x, &w, b, &mut got).unwrap();
            assert_close(&format!("conv {s:?}"), &got, &want, 1e-6, 1e-6);
        }
    }
}

#[test]
fn conv1d_is_causal_and_matches_a_hand_computed_case() {
    // One channel, K = 3, w = [1, 10, 100], bias 0.5: y_t = 0.5 + x_{t-2} + 10 x_{t-1} + 100 x_t.
    let s = ConvShape {
        batch: 1,
        len: 4,
        channels: 1,
        kernel: 3,
    };
    let x = [1.0f64, 2.0, 3.0, 4.0];
    let mut y = [0.0; 4];
    causal_conv1d_forward(&s, &x, &[1.0, 10.0, 100.0], Some(&[0.5]), &mut y).unwrap();
    assert_eq!(y, [100.5, 210.5, 321.5, 432.5]);
}

#[test]
fn conv1d_backward_matches_finite_differences() {
    for (i, dims) in CONV_SHAPES.iter().enumerate() {
        let s = conv_shape(dims);
        let x = random_vec::<f64>(s.batch * s.len * s.channels, i as u64);
        let w = random_vec::<f64>(s.channels * s.kernel, 100 + i as u64);
        let bias = random_vec::<f64>(s.channels, 200 + i as u64);
        let g = random_vec::<f64>(x.len(), 300 + i as u64);
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut y = vec![0.0; x.len()];
            causal_conv1d_forward(&s, x, w, Some(b), &mut y).unwrap();
            dot(&y, &g)
        };
        let grads = causal_conv1d_backward(&s, &x, &w, true, &g).unwrap();
        let tag = format!("{s:?}");
        assert_close(
            &format!("dx {tag}"),
            &grads.x,
            &fd_grad(&x, |x| loss(x, &w, &bias)),
            1e-7,
            1e-6,
        );
        assert_close(
            &format!("dw {tag}"),
            &grads.weight,
            &fd_grad(&w, |w| loss(&x, w, &bias)),
            1e-7,
            1e-6,
        );
        assert_close(
            &format!("dbias {tag}"),
            grads.bias.as_ref().unwrap(),
            &fd_grad(&bias, |b| loss(&x, &w, b)),
            1e-7,
            1e-6,
        );
        assert!(causal_conv1d_backward(&s, &x, &w, false, &g)
            .unwrap()
            .bias
            .is_none());
    }
}

#[test]
fn conv1d_steps_equal_the_sequence_and_hand_over_state() {
    for (i, dims) in CONV_SHAPES.iter().enumerate() {
        let s = conv_shape(dims);
        let (b, l, c, k) = (s.batch, s.len, s.channels, s.kernel);
        let x = random_vec::<f32>(b * l * c, 10 + i as u64);
        let w = random_vec::<f32>(c * k, 20 + i as u64);
        let bias = random_vec::<f32>(c, 30 + i as u64);
        let mut full = vec![0.0; x.len()];
        causal_conv1d_forward(&s, &x, &w, Some(&bias), &mut full).unwrap();
        // Prefill the first `split` positions, then step through the rest.
        let split = l / 2;
        let prefix_shape = ConvShape { len: split, ..s };
        let prefix: Vec<f32> = (0..b)
            .flat_map(|bb| x[bb * l * c..(bb * l + split) * c].to_vec())
            .collect();
        let mut state = causal_conv1d_state(&prefix_shape, &prefix).unwrap();
        for t in split..l {
            let x_t: Vec<f32> = (0..b)
                .flat_map(|bb| x[(bb * l + t) * c..(bb * l + t + 1) * c].to_vec())
                .collect();
            let mut y_t = vec![0.0; b * c];
            causal_conv1d_step(b, c, k, &mut state, &x_t, &w, Some(&bias), &mut y_t).unwrap();
            let want: Vec<f32> = (0..b)
                .flat_map(|bb| full[(bb * l + t) * c..(bb * l + t + 1) * c].to_vec())
                .collect();
            assert_close(&format!("step {t} {s:?}"), &y_t, &want, 1e-6, 1e-6);
        }
        // After the steps, the state is that of the whole sequence.
        assert_eq!(state, causal_conv1d_state(&s, &x).unwrap(), "{s:?}");
    }
}

fn rms_norm_literal(x: &[f64], w: &[f64], dim: usize, eps: f64) -> Vec<f64> {
    x.chunks(dim)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / dim as f64;
            row.iter()
                .zip(w)
                .map(move |(v, wv)| v / (ms + eps).sqrt() * wv)
        })
        .collect()
}

fn layer_norm_literal(x: &[f64], w: &[f64], b: &[f64], dim: usize, eps: f64) -> Vec<f64> {
    x.chunks(dim)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / dim as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / dim as f64;
            row.iter()
                .zip(w.iter().zip(b))
                .map(move |(v, (wv, bv))| (v - mean) / (var + eps).sqrt() * wv + bv)
        })
        .collect()
}

#[test]
fn norms_match_their_formulas_and_finite_differences() {
    for (i, &(rows, dim)) in [(1usize, 1usize), (1, 7), (3, 16), (5, 33)]
        .iter()
        .enumerate()
    {
        let seed = 40 + i as u64 * 10;
        let x = random_vec::<f64>(rows * dim, seed);
        let w = random_vec::<f64>(dim, seed + 1);
        let bias = random_vec::<f64>(dim, seed + 2);
        let g = random_vec::<f64>(rows * dim, seed + 3);
        let eps = 1e-5;
        let tag = format!("rows={rows} dim={dim}");

        let mut y = vec![0.0; rows * dim];
        rms_norm_forward(&x, &w, dim, eps, &mut y).unwrap();
        assert_close(
            &format!("rmsnorm {tag}"),
            &y,
            &rms_norm_literal(&x, &w, dim, eps),
            1e-14,
            1e-13,
        );
        let rms_loss = |x: &[f64], w: &[f64]| dot(&rms_norm_literal(x, w, dim, eps), &g);
        let gr = rms_norm_backward(&x, &w, dim, eps, &g).unwrap();
        assert_close(
            &format!("rmsnorm dx {tag}"),
            &gr.x,
            &fd_grad(&x, |x| rms_loss(x, &w)),
            1e-7,
            1e-6,
        );
        assert_close(
            &format!("rmsnorm dw {tag}"),
            &gr.weight,
            &fd_grad(&w, |w| rms_loss(&x, w)),
            1e-7,
            1e-6,
        );

        layer_norm_forward(&x, &w, &bias, dim, eps, &mut y).unwrap();
        assert_close(
            &format!("layernorm {tag}"),
            &y,
            &layer_norm_literal(&x, &w, &bias, dim, eps),
            1e-14,
            1e-13,
        );
        let ln_loss =
            |x: &[f64], w: &[f64], b: &[f64]| dot(&layer_norm_literal(x, w, b, dim, eps), &g);
        let gr = layer_norm_backward(&x, &w, dim, eps, &g).unwrap();
        assert_close(
            &format!("layernorm dx {tag}"),
            &gr.x,
            &fd_grad(&x, |x| ln_loss(x, &w, &bias)),
            1e-7,
            1e-6,
        );
        assert_close(
            &format!("layernorm dw {tag}"),
            &gr.weight,
            &fd_grad(&w, |w| ln_loss(&x, w, &bias)),
            1e-7,
            1e-6,
        );
        assert_close(
            &format!("layernorm db {tag}"),
            gr.bias.as_ref().unwrap(),
            &fd_grad(&bias, |b| ln_loss(&x, &w, b)),
            1e-7,
            1e-6,
        );

        // f32 forward agrees with the f64 formula.
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let mut y32 = vec![0.0f32; rows * dim];
        rms_norm_forward(&x32, &w32, dim, 1e-5, &mut y32).unwrap();
        assert_close(
            &format!("rmsnorm f32 {tag}"),
            &y32,
            &rms_norm_literal(&x, &w, dim, eps),
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn activations_match_formulas_and_finite_differences() {
    let x: Vec<f64> = (-60..60).map(|i| i as f64 * 0.41 + 0.013).collect();
    let g = random_vec::<f64>(x.len(), 77);
    let mut y = vec![0.0; x.len()];
    silu_forward(&x, &mut y).unwrap();
    let silu: Vec<f64> = x.iter().map(|v| v / (1.0 + (-v).exp())).collect();
    assert_close("silu", &y, &silu, 1e-15, 1e-14);
    softplus_forward(&x, &mut y).unwrap();
    let sp: Vec<f64> = x
        .iter()
        .map(|&v| if v > 20.0 { v } else { v.exp().ln_1p() })
        .collect();
    assert_close("softplus", &y, &sp, 1e-15, 1e-14);

    let mut dx = vec![0.0; x.len()];
    silu_backward(&x, &g, &mut dx).unwrap();
    let fd: Vec<f64> = fd_grad(&x, |x| {
        let mut y = vec![0.0; x.len()];
        silu_forward(x, &mut y).unwrap();
        dot(&y, &g)
    });
    assert_close("silu'", &dx, &fd, 1e-7, 1e-6);
    softplus_backward(&x, &g, &mut dx).unwrap();
    let fd: Vec<f64> = fd_grad(&x, |x| {
        let mut y = vec![0.0; x.len()];
        softplus_forward(x, &mut y).unwrap();
        dot(&y, &g)
    });
    assert_close("softplus'", &dx, &fd, 1e-7, 1e-6);
}

#[test]
fn block_op_shape_errors_name_the_tensor() {
    let s = ConvShape {
        batch: 2,
        len: 3,
        channels: 4,
        kernel: 4,
    };
    let x = vec![0.0f32; 24];
    let mut y = vec![0.0f32; 24];
    let msg = causal_conv1d_forward(&s, &x, &[0.0; 15], None, &mut y)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`weight`") && msg.contains("channels=4, kernel=4") && msg.contains("15"),
        "{msg}"
    );
    let msg = causal_conv1d_forward(&s, &x[..23], &[0.0; 16], None, &mut y)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`x`"), "{msg}");
    let msg = rms_norm_forward(&x, &[1.0; 5], 4, 1e-5, &mut y)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`weight`"), "{msg}");
    let msg = rms_norm_forward(&x[..22], &[1.0; 4], 4, 1e-5, &mut y)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("multiple of dim=4"), "{msg}");
    let msg = silu_forward(&x, &mut y[..3]).unwrap_err().to_string();
    assert!(msg.contains("`y`"), "{msg}");
}

/// A sequence cut in two, the second part continuing from the first's
/// state, gives the outputs and state of the whole sequence.
#[test]
fn conv1d_forward_continuing_equals_the_whole_sequence() {
    for (i, dims) in CONV_SHAPES.iter().enumerate() {
        let s = conv_shape(dims);
        let (b, l, c, k) = (s.batch, s.len, s.channels, s.kernel);
        let x = random_vec::<f64>(b * l * c, 40 + i as u64);
        let w = random_vec::<f64>(c * k, 50 + i as u64);
        let bias = random_vec::<f64>(c, 60 + i as u64);
        let full = causal_conv1d_reference(&s, &x, &w, Some(&bias)).unwrap();
        for split in [0, 1, l / 2, l.saturating_sub(1), l] {
            let part = |t0: usize, t1: usize| -> Vec<f64> {
                (0..b)
                    .flat_map(|bb| x[(bb * l + t0) * c..(bb * l + t1) * c].to_vec())
                    .collect()
            };
            let mut state = vec![0.0f64; b * c * k];
            let mut outputs = vec![Vec::new(); b];
            for (t0, t1) in [(0, split), (split, l)] {
                if t1 == t0 {
                    continue;
                }
                let shape = ConvShape { len: t1 - t0, ..s };
                let mut y = vec![0.0; b * (t1 - t0) * c];
                causal_conv1d_forward_continuing(
                    &shape,
                    &part(t0, t1),
                    &w,
                    Some(&bias),
                    &mut state,
                    &mut y,
                )
                .unwrap();
                for (bb, o) in outputs.iter_mut().enumerate() {
                    o.extend_from_slice(&y[bb * (t1 - t0) * c..(bb + 1) * (t1 - t0) * c]);
                }
            }
            let got: Vec<f64> = outputs.concat();
            assert_close(
                &format!("continuing {s:?} split {split}"),
                &got,
                &full,
                1e-12,
                1e-12,
            );
            assert_eq!(
                state,
                causal_conv1d_state(&s, &x).unwrap(),
                "state {s:?} split {split}"
            );
        }
    }
}
