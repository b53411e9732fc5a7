//! The one Mamba block (src/nn/block.rs) against a literal reference
//! written from the equations of docs/DESIGN.md §6, its three forms (whole
//! chunk, continued chunks, single steps) against each other, and wrong
//! shapes at each of its public entry points.

use selective::kernels::{WeightFormat, Weights};
use selective::nn::{
    BlockStateMut, ChunkBuffers, DecodeBuffers, Dense, InferenceModel, Linear, Mamba, MambaConfig,
    Sequence, StepBuffers,
};

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// y (rows, out) = x (rows, inp) Wᵀ (+ b), by definition.
fn linear(
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    rows: usize,
    inp: usize,
    out: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; rows * out];
    for i in 0..rows {
        for o in 0..out {
            let mut acc = b.map_or(0.0, |b| b[o]);
            for j in 0..inp {
                acc += x[i * inp + j] * w[o * inp + j];
            }
            y[i * out + o] = acc;
        }
    }
    y
}

/// The block of docs/DESIGN.md §6.2 for one layer of `model`, one loop per
/// equation: h + y W_outᵀ for h (batch, len, D).
fn reference_block(
    model: &Mamba<f64>,
    layer: usize,
    h: &[f64],
    batch: usize,
    len: usize,
) -> Vec<f64> {
    let c = &model.config;
    let (d, e, n, r, k) = (c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_conv);
    let p = &model.params.layers[layer];
    let m = &p.mixer;
    let rows = batch * len;
    // u = norm(h): LayerNorm with a bias, RMSNorm without
    let mut u = vec![0.0; rows * d];
    for i in 0..rows {
        let x = &h[i * d..(i + 1) * d];
        let mean = x.iter().sum::<f64>() / d as f64;
        for j in 0..d {
            u[i * d + j] = match &p.norm_bias {
                Some(b) => {
                    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
                    (x[j] - mean) / (var + c.norm_eps).sqrt() * p.norm_weight[j] + b[j]
                }
                None => {
                    let ms = x.iter().map(|v| v * v).sum::<f64>() / d as f64;
                    x[j] / (ms + c.norm_eps).sqrt() * p.norm_weight[j]
                }
            };
        }
    }
    let xz = linear(
        &u,
        &m.in_proj_weight,
        m.in_proj_bias.as_deref(),
        rows,
        d,
        2 * e,
    );
    let mut out = h.to_vec();
    for b in 0..batch {
        let row = |t: usize| b * len + t;
        // v = silu(conv1d(x) + b_conv), causal: taps on x[t-K+1 ..= t]
        let mut v = vec![0.0; len * e];
        for t in 0..len {
            for ch in 0..e {
                let mut acc = m.conv1d_bias.as_ref().map_or(0.0, |bias| bias[ch]);
                for j in 0..k {
                    let src = t as isize - (k - 1) as isize + j as isize;
                    if src >= 0 {
                        acc += m.conv1d_weight[ch * k + j] * xz[row(src as usize) * 2 * e + ch];
                    }
                }
                v[t * e + ch] = silu(acc);
            }
        }
        let x_dbl = linear(&v, &m.x_proj_weight, None, len, e, r + 2 * n);
        let mut state = vec![0.0; e * n];
        let mut y = vec![0.0; len * e];
        for t in 0..len {
            let xd = &x_dbl[t * (r + 2 * n)..(t + 1) * (r + 2 * n)];
            let (dt_low, bt, ct) = (&xd[..r], &xd[r..r + n], &xd[r + n..]);
            for ch in 0..e {
                let mut raw = m.dt_proj_bias[ch];
                for j in 0..r {
                    raw += dt_low[j] * m.dt_proj_weight[ch * r + j];
                }
                let delta = softplus(raw);
                let mut acc = m.d[ch] * v[t * e + ch];
                for s in 0..n {
                    let a = -m.a_log[ch * n + s].exp();
                    let hs = &mut state[ch * n + s];
                    *hs = (delta * a).exp() * *hs + delta * bt[s] * v[t * e + ch];
                    acc += ct[s] * *hs;
                }
                let z = xz[row(t) * 2 * e + e + ch];
                y[t * e + ch] = acc * silu(z);
            }
        }
        let o = linear(
            &y,
            &m.out_proj_weight,
            m.out_proj_bias.as_deref(),
            len,
            e,
            d,
        );
        for t in 0..len {
            for j in 0..d {
                out[row(t) * d + j] += o[t * d + j];
            }
        }
    }
    out
}

/// A model with every optional tensor: LayerNorm (with bias), projection
/// biases and conv bias, and sizes that fit no block of any kernel.
fn awkward_model() -> Mamba<f64> {
    let mut c = MambaConfig::new(12, 2, 19, 5);
    c.rms_norm = false;
    c.proj_bias = true;
    let mut model = Mamba::<f64>::init(c, 11).unwrap();
    // biases start at 0: make them matter
    let mut rng = selective::rng::Rng::new(3);
    for layer in &mut model.params.layers {
        for b in [
            layer.norm_bias.as_mut(),
            layer.mixer.in_proj_bias.as_mut(),
            layer.mixer.out_proj_bias.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            b.iter_mut().for_each(|v| *v = rng.uniform_in(-0.5, 0.5));
        }
    }
    model
}

fn random(len: usize, seed: u64) -> Vec<f64> {
    let mut rng = selective::rng::Rng::new(seed);
    (0..len).map(|_| rng.uniform_in(-1.0, 1.0)).collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn the_block_computes_the_equations_of_the_design_in_every_form() {
    let model = awkward_model();
    let c = model.config.clone();
    let (d, e, n, k) = (c.d_model, c.d_inner, c.d_state, c.d_conv);
    for (batch, len) in [(1, 1), (2, 7), (3, 300)] {
        let h = random(batch * len * d, 5 + len as u64);
        let want = reference_block(&model, 1, &h, batch, len);
        let block = model.block(1).unwrap();
        // the whole chunk from zeros
        let mut whole = h.clone();
        block
            .forward(
                &mut whole,
                batch,
                len,
                None,
                &mut ChunkBuffers::default(),
                false,
            )
            .unwrap();
        let err = max_abs_diff(&whole, &want);
        assert!(err < 1e-12, "forward (batch {batch}, len {len}): {err:e}");
        // the same positions as chunks continuing a carried state, per sequence
        let split = len / 2;
        for b in 0..batch {
            let mut conv = vec![0.0; e * k];
            let mut ssm = vec![0.0; e * n];
            let mut bufs = ChunkBuffers::default();
            let mut got = Vec::new();
            for (t0, t1) in [(0, split), (split, len)] {
                if t1 == t0 {
                    continue;
                }
                let mut part = h[(b * len + t0) * d..(b * len + t1) * d].to_vec();
                let state = BlockStateMut {
                    conv: &mut conv,
                    ssm: &mut ssm,
                };
                block
                    .forward(&mut part, 1, t1 - t0, Some(state), &mut bufs, false)
                    .unwrap();
                got.extend(part);
            }
            let err = max_abs_diff(&got, &want[b * len * d..(b + 1) * len * d]);
            assert!(
                err < 1e-12,
                "continued chunks (sequence {b}, len {len}): {err:e}"
            );
        }
        // one token of every sequence at a time
        let mut convs = vec![vec![0.0; e * k]; batch];
        let mut ssms = vec![vec![0.0; e * n]; batch];
        let mut bufs = StepBuffers::new(&c.block_shape(), batch);
        for t in 0..len.min(20) {
            let mut h_t: Vec<f64> = (0..batch)
                .flat_map(|b| h[(b * len + t) * d..(b * len + t + 1) * d].to_vec())
                .collect();
            let mut states: Vec<BlockStateMut<'_, f64>> = convs
                .iter_mut()
                .zip(ssms.iter_mut())
                .map(|(conv, ssm)| BlockStateMut { conv, ssm })
                .collect();
            block.step(&mut h_t, &mut states, &mut bufs).unwrap();
            for b in 0..batch {
                let row = (b * len + t) * d;
                let err = max_abs_diff(&h_t[b * d..(b + 1) * d], &want[row..row + d]);
                assert!(err < 1e-12, "step {t} of sequence {b}: {err:e}");
            }
        }
    }
}

#[test]
fn wrong_shapes_at_the_blocks_entry_points_are_errors() {
    let model = awkward_model();
    let c = model.config.clone();
    let (d, e, n, k) = (c.d_model, c.d_inner, c.d_state, c.d_conv);
    let block = model.block(0).unwrap();
    assert!(model.block(2).is_err(), "a layer past the last");
    // a parameter of the wrong size is named
    let mut bad = block.clone();
    bad.in_proj = Dense::new(&model.params.layers[0].mixer.in_proj_weight, e, 2 * d);
    let msg = bad.validate().unwrap_err().to_string();
    assert!(msg.contains("in_proj"), "{msg}");
    // activations of the wrong length
    let mut h = vec![0.0; 5 * d - 1];
    assert!(block
        .forward(&mut h, 1, 5, None, &mut ChunkBuffers::default(), false)
        .is_err());
    let mut conv = vec![0.0; e * k];
    let mut ssm = vec![0.0; e * n - 1];
    let mut h = vec![0.0; d];
    let state = BlockStateMut {
        conv: &mut conv,
        ssm: &mut ssm,
    };
    assert!(
        block
            .forward(
                &mut h,
                1,
                1,
                Some(state),
                &mut ChunkBuffers::default(),
                false
            )
            .is_err(),
        "a state of the wrong size"
    );
    let mut bufs = StepBuffers::new(&c.block_shape(), 1);
    let mut h2 = vec![0.0; 2 * d];
    let (mut conv, mut ssm) = (vec![0.0; e * k], vec![0.0; e * n]);
    let mut states = vec![BlockStateMut {
        conv: &mut conv,
        ssm: &mut ssm,
    }];
    assert!(
        block.step(&mut h2, &mut states, &mut bufs).is_err(),
        "2 rows of h for 1 state"
    );
    let mut v = vec![0.0; 4];
    assert!(block
        .step_conv(e - 2, &[0.0; 4], &mut [0.0; 16], &mut v)
        .is_err());
    // a weight's rows out of range, for both storages
    let dense = Dense::new(&model.params.layers[0].mixer.out_proj_weight, d, e);
    assert!(dense
        .forward_rows(&vec![0.0; e], d - 1, &mut [0.0; 2], false)
        .is_err());
    assert!(dense
        .forward_rows(&vec![0.0; e + 1], 0, &mut [0.0; 2], false)
        .is_err());
    let w = Weights::from_f32(WeightFormat::Q8, 8, 32, &vec![0.5f32; 8 * 32]).unwrap();
    assert!(w
        .forward_rows(&[0.0f32; 32], 7, &mut [0.0f32; 2], false)
        .is_err());
    assert!(w
        .forward_rows(&[0.0f32; 31], 0, &mut [0.0f32; 2], false)
        .is_err());
}

#[test]
fn decoding_with_buffers_of_another_model_is_an_error_on_one_thread_and_on_a_team() {
    let small = MambaConfig::new(16, 2, 20, 4);
    let other = MambaConfig::new(24, 2, 20, 4);
    let model = InferenceModel::from_mamba(
        Mamba::<f32>::init(small.clone(), 1).unwrap(),
        WeightFormat::F32,
    )
    .unwrap();
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut seq = Sequence::new(&small);
            let mut wrong = DecodeBuffers::new(&other, 1);
            let err = model
                .decode_step(&mut [&mut seq], &[3], &mut wrong)
                .unwrap_err();
            assert!(err.to_string().contains("buffers"), "{err}");
            let mut right = DecodeBuffers::new(&small, 1);
            let mut foreign = Sequence::new(&other);
            assert!(model
                .decode_step(&mut [&mut foreign], &[3], &mut right)
                .is_err());
            assert!(model
                .decode_step(&mut [&mut seq], &[20], &mut right)
                .is_err());
            model
                .decode_step(&mut [&mut seq], &[3], &mut right)
                .unwrap();
            assert_eq!(seq.logits.len(), 20);
        });
    }
}
