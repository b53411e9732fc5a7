//! The Transformer's kernels: blockwise causal attention against the
//! literal whole-matrix softmax, its backward against the matrix-form
//! reference and finite differences in f64; rotary embedding against an
//! explicit rotation matrix; SwiGLU against finite differences.

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

/// (batch, q_len, kv_len, heads, head_dim): length 1, lengths on both
/// sides of the query and key blocks (64), continuing a cache (q_len <
/// kv_len), head sizes that are not multiples of the 8 lanes.
const SHAPES: [(usize, usize, usize, usize, usize); 9] = [
    (1, 1, 1, 1, 1),
    (2, 1, 1, 3, 8),
    (1, 1, 70, 2, 5),
    (2, 13, 13, 3, 8),
    (1, 63, 63, 2, 12),
    (2, 64, 64, 1, 16),
    (1, 65, 65, 2, 9),
    (1, 130, 130, 3, 4),
    (2, 37, 101, 2, 10),
];

fn shape(
    &(batch, q_len, kv_len, heads, head_dim): &(usize, usize, usize, usize, usize),
) -> AttentionShape {
    AttentionShape {
        batch,
        q_len,
        kv_len,
        heads,
        head_dim,
    }
}

/// Random q, k, v with scores of order 1..3 (so the softmax is neither
/// flat nor one-hot).
fn inputs<T: selective::Float>(s: &AttentionShape, seed: u64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let w = s.width();
    let scale = |v: Vec<T>| -> Vec<T> { v.into_iter().map(|x| x * T::from_f64(1.5)).collect() };
    (
        scale(random_vec(s.batch * s.q_len * w, seed)),
        scale(random_vec(s.batch * s.kv_len * w, seed + 1)),
        random_vec(s.batch * s.kv_len * w, seed + 2),
    )
}

#[test]
fn blockwise_forward_matches_whole_matrix_softmax() {
    for (i, dims) in SHAPES.iter().enumerate() {
        let s = shape(dims);
        let (q, k, v) = inputs::<f64>(&s, 10 * i as u64);
        let (want_o, want_lse) = causal_attention_reference(&s, &q, &k, &v).unwrap();
        let mut o = vec![0.0; q.len()];
        let mut lse = vec![0.0; want_lse.len()];
        causal_attention_forward(&s, &q, &k, &v, &mut o, Some(&mut lse)).unwrap();
        assert_close(&format!("o {s:?}"), &o, &want_o, 1e-12, 1e-11);
        assert_close(&format!("lse {s:?}"), &lse, &want_lse, 1e-12, 1e-11);
        // f32 against the f64 reference
        let (q32, k32, v32): (Vec<f32>, Vec<f32>, Vec<f32>) = inputs(&s, 10 * i as u64);
        let mut o32 = vec![0.0f32; q.len()];
        causal_attention_forward(&s, &q32, &k32, &v32, &mut o32, None).unwrap();
        let (want32, _) = causal_attention_reference(
            &s,
            &q32.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            &k32.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            &v32.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        )
        .unwrap();
        assert_close(&format!("o f32 {s:?}"), &o32, &want32, 2e-5, 2e-5);
    }
}

#[test]
fn queries_after_a_cache_equal_the_tail_of_the_whole_sequence() {
    // The last q_len rows of a square call equal a call with only those
    // queries over every key: what prefill continuing a KV cache relies on.
    let (batch, len, heads, dh) = (2, 77, 2, 6);
    let full = AttentionShape::square(batch, len, heads, dh);
    let (q, k, v) = inputs::<f64>(&full, 5);
    let mut o = vec![0.0; q.len()];
    causal_attention_forward(&full, &q, &k, &v, &mut o, None).unwrap();
    let w = full.width();
    for q_len in [1, 9, 64, 70] {
        let tail = AttentionShape { q_len, ..full };
        let q_tail: Vec<f64> = (0..batch)
            .flat_map(|b| q[(b * len + len - q_len) * w..(b + 1) * len * w].to_vec())
            .collect();
        let mut o_tail = vec![0.0; q_tail.len()];
        causal_attention_forward(&tail, &q_tail, &k, &v, &mut o_tail, None).unwrap();
        let want: Vec<f64> = (0..batch)
            .flat_map(|b| o[(b * len + len - q_len) * w..(b + 1) * len * w].to_vec())
            .collect();
        assert_close(&format!("tail {q_len}"), &o_tail, &want, 1e-13, 1e-12);
    }
}

#[test]
fn backward_matches_matrix_form_reference() {
    for (i, dims) in SHAPES.iter().enumerate() {
        let s = shape(dims);
        let (q, k, v) = inputs::<f64>(&s, 100 + 10 * i as u64);
        let d_o: Vec<f64> = random_vec(q.len(), 999 + i as u64);
        let mut o = vec![0.0; q.len()];
        let mut lse = vec![0.0; s.batch * s.heads * s.q_len];
        causal_attention_forward(&s, &q, &k, &v, &mut o, Some(&mut lse)).unwrap();
        let got = causal_attention_backward(&s, &q, &k, &v, &o, &lse, &d_o).unwrap();
        let want = causal_attention_backward_reference(&s, &q, &k, &v, &d_o).unwrap();
        assert_close(&format!("dq {s:?}"), &got.q, &want.q, 1e-12, 1e-10);
        assert_close(&format!("dk {s:?}"), &got.k, &want.k, 1e-12, 1e-10);
        assert_close(&format!("dv {s:?}"), &got.v, &want.v, 1e-12, 1e-10);
    }
}

#[test]
fn backward_matches_finite_differences() {
    for dims in [(1, 5, 5, 2, 3), (2, 4, 7, 1, 4), (1, 66, 66, 1, 2)] {
        let s = shape(&dims);
        let (q, k, v) = inputs::<f64>(&s, 7);
        let d_o: Vec<f64> = random_vec(q.len(), 8);
        // L = Σ o ⊙ d_o
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let mut o = vec![0.0; q.len()];
            causal_attention_forward(&s, q, k, v, &mut o, None).unwrap();
            dot(&o, &d_o)
        };
        let mut o = vec![0.0; q.len()];
        let mut lse = vec![0.0; s.batch * s.heads * s.q_len];
        causal_attention_forward(&s, &q, &k, &v, &mut o, Some(&mut lse)).unwrap();
        let g = causal_attention_backward(&s, &q, &k, &v, &o, &lse, &d_o).unwrap();
        let fq = fd_grad(&q, |x| loss(x, &k, &v));
        let fk = fd_grad(&k, |x| loss(&q, x, &v));
        let fv = fd_grad(&v, |x| loss(&q, &k, x));
        assert_close(&format!("dq fd {s:?}"), &g.q, &fq, 1e-7, 1e-6);
        assert_close(&format!("dk fd {s:?}"), &g.k, &fk, 1e-7, 1e-6);
        assert_close(&format!("dv fd {s:?}"), &g.v, &fv, 1e-7, 1e-6);
    }
}

#[test]
fn attention_is_causal() {
    // Changing keys and values after a query's position leaves its output.
    let s = AttentionShape::square(1, 90, 2, 8);
    let (q, mut k, mut v) = inputs::<f64>(&s, 3);
    let mut before = vec![0.0; q.len()];
    causal_attention_forward(&s, &q, &k, &v, &mut before, None).unwrap();
    let w = s.width();
    for x in k[50 * w..].iter_mut().chain(v[50 * w..].iter_mut()) {
        *x += 1.0;
    }
    let mut after = vec![0.0; q.len()];
    causal_attention_forward(&s, &q, &k, &v, &mut after, None).unwrap();
    assert_eq!(&before[..50 * w], &after[..50 * w]);
    assert!(before[50 * w..]
        .iter()
        .zip(&after[50 * w..])
        .any(|(a, b)| a != b));
}

#[test]
fn bad_shapes_are_errors() {
    let s = AttentionShape {
        batch: 1,
        q_len: 4,
        kv_len: 3,
        heads: 1,
        head_dim: 2,
    };
    let x = vec![0.0f64; 8];
    let mut o = vec![0.0f64; 8];
    let e = causal_attention_forward(&s, &x, &x[..6], &x[..6], &mut o, None).unwrap_err();
    assert!(e.to_string().contains("4 queries but only 3 keys"), "{e}");
    let s = AttentionShape::square(1, 4, 1, 2);
    let e = causal_attention_forward(&s, &x, &x[..7], &x, &mut o, None).unwrap_err();
    assert!(e.to_string().contains("k"), "{e}");
}

/// The rotary embedding as an explicit (Dh × Dh) rotation matrix per
/// position: R[i][i] = R[i+h][i+h] = cos φ_i, R[i][i+h] = −sin φ_i,
/// R[i+h][i] = sin φ_i, with φ_i = p / base^(2i/Dh).
fn rope_by_matrix(
    x: &[f64],
    len: usize,
    heads: usize,
    dh: usize,
    base: f64,
    start: usize,
) -> Vec<f64> {
    let half = dh / 2;
    let mut out = vec![0.0; x.len()];
    for (row, (xr, yr)) in x
        .chunks(heads * dh)
        .zip(out.chunks_mut(heads * dh))
        .enumerate()
    {
        let p = (start + row % len) as f64;
        let mut r = vec![vec![0.0; dh]; dh];
        for i in 0..half {
            // θ_i = base^(−2i/Dh) in f64
            let theta = 1.0 / base.powf((2 * i) as f64 / dh as f64);
            let phi = p * theta;
            r[i][i] = phi.cos();
            r[i + half][i + half] = phi.cos();
            r[i][i + half] = -phi.sin();
            r[i + half][i] = phi.sin();
        }
        for h in 0..heads {
            for i in 0..dh {
                yr[h * dh + i] = (0..dh).map(|j| r[i][j] * xr[h * dh + j]).sum();
            }
        }
    }
    out
}

#[test]
fn rotary_matches_rotation_matrix_and_inverts() {
    for (batch, len, heads, dh, base, start) in [
        (1, 1, 1, 2, 10000.0, 0),
        (2, 13, 3, 8, 10000.0, 0),
        (1, 7, 2, 12, 500.0, 33),
        (3, 5, 1, 6, 1e6, 1000),
    ] {
        let rope = Rotary::new(dh, base).unwrap();
        let x: Vec<f64> = random_vec(batch * len * heads * dh, 4);
        let mut got = x.clone();
        rope.apply(&mut got, batch, len, heads, start, false)
            .unwrap();
        let want = rope_by_matrix(&x, len, heads, dh, base, start);
        assert_close("rope", &got, &want, 1e-14, 1e-13);
        rope.apply(&mut got, batch, len, heads, start, true)
            .unwrap();
        assert_close("rope inverse", &got, &x, 1e-14, 1e-13);
    }
    // The backward is the inverse rotation: <R x, g> = <x, Rᵀ g>.
    let rope = Rotary::new(10, 100.0).unwrap();
    let x: Vec<f64> = random_vec(4 * 2 * 10, 5);
    let g: Vec<f64> = random_vec(x.len(), 6);
    let mut rx = x.clone();
    rope.apply(&mut rx, 1, 4, 2, 3, false).unwrap();
    let mut rtg = g.clone();
    rope.apply(&mut rtg, 1, 4, 2, 3, true).unwrap();
    assert!((dot(&rx, &g) - dot(&x, &rtg)).abs() < 1e-12);
    assert!(Rotary::new(7, 10000.0).is_err());
    assert!(Rotary::new(8, f64::NAN).is_err());
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let n = 37;
    let gate: Vec<f64> = random_vec(n, 1);
    let up: Vec<f64> = random_vec(n, 2);
    let dy: Vec<f64> = random_vec(n, 3);
    let mut y = vec![0.0; n];
    swiglu_forward(&gate, &up, &mut y).unwrap();
    for i in 0..n {
        let want = gate[i] / (1.0 + (-gate[i]).exp()) * up[i];
        assert!((y[i] - want).abs() < 1e-15);
    }
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    swiglu_backward(&gate, &up, &dy, &mut dg, &mut du).unwrap();
    let loss = |g: &[f64], u: &[f64]| {
        let mut y = vec![0.0; n];
        swiglu_forward(g, u, &mut y).unwrap();
        dot(&y, &dy)
    };
    assert_close("d_gate", &dg, &fd_grad(&gate, |g| loss(g, &up)), 1e-8, 1e-7);
    assert_close("d_up", &du, &fd_grad(&up, |u| loss(&gate, u)), 1e-8, 1e-7);
}
