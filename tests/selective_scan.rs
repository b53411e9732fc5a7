//! The fused selective scan against the literal reference, finite
//! differences, the official PyTorch `selective_scan_ref` and Theorem 1.

mod common;

use common::*;
use selective::kernels::*;
use selective::Error;
use selective::Float;

fn shape(batch: usize, len: usize, channels: usize, state: usize) -> ScanShape {
    ScanShape {
        batch,
        len,
        channels,
        state,
    }
}

/// Awkward sizes: length 1, lengths and channel counts that are not
/// multiples of the block or chunk, batch > 1, N other than 16.
const SHAPES: [(usize, usize, usize, usize); 7] = [
    (1, 1, 1, 1),
    (2, 1, 17, 16),
    (3, 7, 5, 3),
    (2, 37, 33, 16),
    (1, 300, 20, 7),
    (2, 129, 16, 4),
    (1, 65, 40, 2),
];

fn options(
    softplus: bool,
    zoh: bool,
    chunk_len: usize,
    parallelism: ScanParallelism,
) -> ScanOptions {
    ScanOptions {
        delta_softplus: softplus,
        discretization: if zoh {
            Discretization::ZeroOrderHold
        } else {
            Discretization::Official
        },
        chunk_len,
        parallelism,
    }
}

fn forward_with_checkpoints<T: selective::Float>(
    case: &ScanCase<T>,
    o: &ScanOptions,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let s = case.shape;
    let mut out = vec![T::ZERO; s.batch * s.len * s.channels];
    let mut fs = vec![T::ZERO; s.batch * s.channels * s.state];
    let mut ck = vec![T::ZERO; s.checkpoints_len(o.chunk_len)];
    selective_scan_forward(
        &s,
        &case.inputs(),
        o,
        &mut out,
        Some(&mut fs),
        Some(&mut ck),
    )
    .unwrap();
    (out, fs, ck)
}

#[test]
fn fused_forward_matches_reference_f32_and_f64() {
    let mut seed = 1;
    for &(b, l, c, n) in &SHAPES {
        for extras in [ALL, NONE] {
            for (softplus, zoh) in [(true, false), (false, false), (true, true), (false, true)] {
                seed += 1;
                let o = options(softplus, zoh, 16, ScanParallelism::Channels);
                let case64 = ScanCase::<f64>::random_for(shape(b, l, c, n), extras, seed, softplus);
                let want = selective_scan_reference(&case64.shape, &case64.inputs(), &o).unwrap();
                let got = selective_scan(&case64.shape, &case64.inputs(), &o).unwrap();
                let tag = format!("{:?} {extras:?} sp={softplus} zoh={zoh}", case64.shape);
                assert_close(&format!("f64 out {tag}"), &got.out, &want.out, 1e-12, 1e-12);
                assert_close(
                    &format!("f64 state {tag}"),
                    &got.final_state,
                    &want.final_state,
                    1e-12,
                    1e-12,
                );

                let case32 = ScanCase::<f32>::random_for(shape(b, l, c, n), extras, seed, softplus);
                let got32 = selective_scan(&case32.shape, &case32.inputs(), &o).unwrap();
                assert_close(&format!("f32 out {tag}"), &got32.out, &want.out, 2e-5, 2e-5);
                assert_close(
                    &format!("f32 state {tag}"),
                    &got32.final_state,
                    &want.final_state,
                    2e-5,
                    2e-5,
                );
            }
        }
    }
}

#[test]
fn checkpoints_are_the_states_at_chunk_starts() {
    // Scanning the first k·chunk positions alone gives the state that the
    // checkpoint of chunk k must hold.
    let s = shape(2, 23, 19, 5);
    let case = ScanCase::<f64>::random(s, ALL, 99);
    let o = options(true, false, 6, ScanParallelism::Channels);
    let (_, _, ck) = forward_with_checkpoints(&case, &o);
    for k in 0..s.n_chunks(6) {
        let want: Vec<f64> = if k == 0 {
            case.initial_state.clone().unwrap()
        } else {
            let l = 6 * k;
            let cut = |v: &Vec<f64>, width: usize| -> Vec<f64> {
                (0..s.batch)
                    .flat_map(|b| v[b * s.len * width..(b * s.len + l) * width].to_vec())
                    .collect()
            };
            let sub = ScanCase {
                shape: shape(2, l, 19, 5),
                u: cut(&case.u, 19),
                delta: cut(&case.delta, 19),
                a: case.a.clone(),
                b: cut(&case.b, 5),
                c: cut(&case.c, 5),
                d: case.d.clone(),
                z: case.z.as_ref().map(|z| cut(z, 19)),
                delta_bias: case.delta_bias.clone(),
                initial_state: case.initial_state.clone(),
            };
            selective_scan_reference(&sub.shape, &sub.inputs(), &o)
                .unwrap()
                .final_state
        };
        let per = s.channels * s.state;
        let got: Vec<f64> = (0..s.batch)
            .flat_map(|b| {
                let base = (b * s.n_chunks(6) + k) * per;
                ck[base..base + per].to_vec()
            })
            .collect();
        assert_close(&format!("checkpoint {k}"), &got, &want, 1e-12, 1e-12);
    }
}

#[test]
fn parallel_scan_over_sequence_equals_sequential() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let mut seed = 500;
    for &(b, l, c, n) in &[
        (1, 1, 1, 1),
        (1, 2, 3, 2),
        (1, 1000, 16, 16),
        (2, 777, 20, 5),
        (1, 4099, 7, 3),
    ] {
        for zoh in [false, true] {
            for extras in [ALL, NONE] {
                seed += 1;
                let case = ScanCase::<f32>::random(shape(b, l, c, n), extras, seed);
                // Small Δ: slow decay, so the carries matter across segments.
                let mut case = case;
                for v in case.delta.iter_mut() {
                    *v -= 4.0;
                }
                let seq = options(true, zoh, 10, ScanParallelism::Channels);
                let par = options(true, zoh, 10, ScanParallelism::Sequence);
                let (out_s, fs_s, ck_s) = forward_with_checkpoints(&case, &seq);
                let (out_p, fs_p, ck_p) = pool.install(|| forward_with_checkpoints(&case, &par));
                let tag = format!("{:?} zoh={zoh} {extras:?}", case.shape);
                assert_close(&format!("out {tag}"), &out_p, &out_s, 1e-5, 1e-4);
                assert_close(&format!("final state {tag}"), &fs_p, &fs_s, 1e-5, 1e-4);
                assert_close(&format!("checkpoints {tag}"), &ck_p, &ck_s, 1e-5, 1e-4);
            }
        }
    }
}

#[test]
fn auto_parallelism_gives_the_same_result() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let case = ScanCase::<f32>::random(shape(1, 5000, 16, 16), ALL, 7);
    let auto = options(true, false, 64, ScanParallelism::Auto);
    let seq = options(true, false, 64, ScanParallelism::Channels);
    let a = pool.install(|| forward_with_checkpoints(&case, &auto));
    let s = forward_with_checkpoints(&case, &seq);
    assert_close("out", &a.0, &s.0, 1e-5, 1e-4);
    assert_close("final", &a.1, &s.1, 1e-5, 1e-4);
}

fn check_grads<T: selective::Float, U: selective::Float>(
    tag: &str,
    got: &ScanGrads<T>,
    want: &ScanGrads<U>,
    atol: f64,
    rtol: f64,
) {
    assert_close(&format!("du {tag}"), &got.u, &want.u, atol, rtol);
    assert_close(
        &format!("ddelta {tag}"),
        &got.delta,
        &want.delta,
        atol,
        rtol,
    );
    assert_close(&format!("dA {tag}"), &got.a, &want.a, atol, rtol);
    assert_close(&format!("dB {tag}"), &got.b, &want.b, atol, rtol);
    assert_close(&format!("dC {tag}"), &got.c, &want.c, atol, rtol);
    let pairs = [
        ("dD", &got.d, &want.d),
        ("dz", &got.z, &want.z),
        ("ddelta_bias", &got.delta_bias, &want.delta_bias),
        ("dinitial_state", &got.initial_state, &want.initial_state),
    ];
    for (name, g, w) in pairs {
        assert_eq!(g.is_some(), w.is_some(), "{name} {tag}: presence differs");
        if let (Some(g), Some(w)) = (g, w) {
            assert_close(&format!("{name} {tag}"), g, w, atol, rtol);
        }
    }
}

#[test]
fn fused_backward_matches_reference_backward() {
    let mut seed = 1000;
    for &(b, l, c, n) in &SHAPES {
        for chunk in [1, 5, 64] {
            for (softplus, zoh) in [(true, false), (false, true)] {
                seed += 1;
                let extras = if seed % 2 == 0 { ALL } else { NONE };
                let o = options(softplus, zoh, chunk, ScanParallelism::Channels);
                let s = shape(b, l, c, n);
                let case = ScanCase::<f64>::random_for(s, extras, seed, softplus);
                let d_out = random_vec::<f64>(b * l * c, seed + 7);
                let d_fs = random_vec::<f64>(b * c * n, seed + 8);
                let want =
                    selective_scan_backward_reference(&s, &case.inputs(), &o, &d_out, Some(&d_fs))
                        .unwrap();
                let (_, _, ck) = forward_with_checkpoints(&case, &o);
                let got = selective_scan_backward(&s, &case.inputs(), &o, &ck, &d_out, Some(&d_fs))
                    .unwrap();
                let tag = format!("{s:?} chunk={chunk} sp={softplus} zoh={zoh} {extras:?}");
                check_grads(&format!("f64 {tag}"), &got, &want, 1e-11, 1e-10);

                let case32 = ScanCase::<f32>::random_for(s, extras, seed, softplus);
                let d_out32: Vec<f32> = d_out.iter().map(|&x| x as f32).collect();
                let d_fs32: Vec<f32> = d_fs.iter().map(|&x| x as f32).collect();
                let (_, _, ck32) = forward_with_checkpoints(&case32, &o);
                let got32 = selective_scan_backward(
                    &s,
                    &case32.inputs(),
                    &o,
                    &ck32,
                    &d_out32,
                    Some(&d_fs32),
                )
                .unwrap();
                check_grads(&format!("f32 {tag}"), &got32, &want, 1e-4, 1e-4);
            }
        }
    }
}

/// Loss = Σ out·g_out + Σ final_state·g_fs, evaluated by the fused forward.
fn loss(case: &ScanCase<f64>, o: &ScanOptions, g_out: &[f64], g_fs: &[f64]) -> f64 {
    let r = selective_scan(&case.shape, &case.inputs(), o).unwrap();
    dot(&r.out, g_out) + dot(&r.final_state, g_fs)
}

#[test]
fn backward_matches_central_finite_differences_f64() {
    let mut seed = 2000;
    for &(b, l, c, n) in &[(1, 1, 1, 1), (2, 5, 3, 2), (1, 9, 17, 3)] {
        for (softplus, zoh) in [(true, false), (false, false), (true, true), (false, true)] {
            seed += 1;
            let s = shape(b, l, c, n);
            let o = options(softplus, zoh, 4, ScanParallelism::Channels);
            let mut case = ScanCase::<f64>::random_for(s, ALL, seed, softplus);
            let g_out = random_vec::<f64>(b * l * c, seed + 1);
            let g_fs = random_vec::<f64>(b * c * n, seed + 2);
            let (_, _, ck) = forward_with_checkpoints(&case, &o);
            let grads =
                selective_scan_backward(&s, &case.inputs(), &o, &ck, &g_out, Some(&g_fs)).unwrap();
            let eps = 1e-6;
            macro_rules! fd_check {
                ($field:ident, $grad:expr, $name:expr) => {{
                    let len = case.$field.fd_slice().len();
                    let mut fd = vec![0.0; len];
                    for i in 0..len {
                        let orig = case.$field.fd_slice_mut()[i];
                        case.$field.fd_slice_mut()[i] = orig + eps;
                        let lp = loss(&case, &o, &g_out, &g_fs);
                        case.$field.fd_slice_mut()[i] = orig - eps;
                        let lm = loss(&case, &o, &g_out, &g_fs);
                        case.$field.fd_slice_mut()[i] = orig;
                        fd[i] = (lp - lm) / (2.0 * eps);
                    }
                    assert_close(
                        &format!("{} vs FD {s:?} sp={softplus} zoh={zoh}", $name),
                        $grad,
                        &fd,
                        1e-6,
                        1e-5,
                    );
                }};
            }
            fd_check!(u, &grads.u, "du");
            fd_check!(delta, &grads.delta, "ddelta");
            fd_check!(a, &grads.a, "dA");
            fd_check!(b, &grads.b, "dB");
            fd_check!(c, &grads.c, "dC");
            fd_check!(d, grads.d.as_ref().unwrap(), "dD");
            fd_check!(z, grads.z.as_ref().unwrap(), "dz");
            fd_check!(
                delta_bias,
                grads.delta_bias.as_ref().unwrap(),
                "ddelta_bias"
            );
            fd_check!(
                initial_state,
                grads.initial_state.as_ref().unwrap(),
                "dinitial_state"
            );
        }
    }
}

/// Uniform slice access for `Vec<T>` and `Option<Vec<T>>` fields in the
/// finite-difference macro.
trait AsSlices {
    fn fd_slice(&self) -> &[f64];
    fn fd_slice_mut(&mut self) -> &mut [f64];
}
impl AsSlices for Vec<f64> {
    fn fd_slice(&self) -> &[f64] {
        self
    }
    fn fd_slice_mut(&mut self) -> &mut [f64] {
        self
    }
}
impl AsSlices for Option<Vec<f64>> {
    fn fd_slice(&self) -> &[f64] {
        self.as_deref().unwrap()
    }
    fn fd_slice_mut(&mut self) -> &mut [f64] {
        self.as_deref_mut().unwrap()
    }
}

/// Theorem 1 of the paper: with N = 1, A = -1, B = 1, C = 1 and exact
/// ZOH, the selective SSM is the gated RNN h_t = (1 - g_t) h_{t-1} + g_t x_t
/// with g_t = σ(Δ-projection): exp(-softplus(p)) = 1 - σ(p).
#[test]
fn theorem_1_zoh_is_a_gated_rnn() {
    let (l, c) = (50, 6);
    let s = shape(1, l, c, 1);
    let x = random_vec::<f64>(l * c, 1);
    let p = random_vec::<f64>(l * c, 2); // the Δ projection, before softplus
    let ones_l = vec![1.0; l];
    let inputs = ScanInputs {
        u: &x,
        delta: &p,
        a: &vec![-1.0; c],
        b: &ones_l,
        c: &ones_l,
        d: None,
        z: None,
        delta_bias: None,
        initial_state: None,
    };
    let mut rnn = vec![0.0; l * c];
    for ch in 0..c {
        let mut h = 0.0;
        for t in 0..l {
            let g = 1.0 / (1.0 + (-p[t * c + ch]).exp());
            h = (1.0 - g) * h + g * x[t * c + ch];
            rnn[t * c + ch] = h;
        }
    }
    let zoh = selective_scan(
        &s,
        &inputs,
        &options(true, true, 8, ScanParallelism::Channels),
    )
    .unwrap();
    assert_close("ZOH scan vs gated RNN", &zoh.out, &rnn, 1e-13, 1e-12);
    // The official Euler input term (B̄ = Δ) is not the gated RNN.
    let euler = selective_scan(
        &s,
        &inputs,
        &options(true, false, 8, ScanParallelism::Channels),
    )
    .unwrap();
    let max_diff = euler
        .out
        .iter()
        .zip(&rnn)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        max_diff > 1e-2,
        "Euler should differ from the gated RNN, max diff {max_diff}"
    );
}

#[test]
fn mismatched_shapes_are_errors_naming_the_tensor() {
    let s = shape(2, 5, 3, 4);
    let case = ScanCase::<f32>::random(s, ALL, 3);
    let o = ScanOptions::default();
    let short_b = vec![0.0f32; 7];
    let mut x = case.inputs();
    x.b = &short_b;
    let err = selective_scan(&s, &x, &o).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Shape { tensor: "B", .. }), "{msg}");
    assert!(
        msg.contains("batch=2, len=5, state=4") && msg.contains("has 7"),
        "{msg}"
    );

    let mut x = case.inputs();
    let short_z = vec![0.0f32; 29];
    x.z = Some(&short_z);
    let msg = selective_scan(&s, &x, &o).unwrap_err().to_string();
    assert!(
        msg.contains("`z`") && msg.contains("30 elements") && msg.contains("29"),
        "{msg}"
    );

    let zero = shape(2, 0, 3, 4);
    assert!(selective_scan(&zero, &case.inputs(), &o).is_err());

    let ck = vec![0.0f32; 3];
    let d_out = vec![0.0f32; 30];
    let msg = selective_scan_backward(&s, &case.inputs(), &o, &ck, &d_out, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("checkpoints"), "{msg}");
    let bad = ScanOptions { chunk_len: 0, ..o };
    assert!(selective_scan(&s, &case.inputs(), &bad).is_err());
}

// ---------------------------------------------------------------------------
// Golden numbers from the official PyTorch selective_scan_ref with autograd
// (scripts/make_scan_reference.py). Official layout: u, delta, z, out are
// (batch, dim, len); B, C are (batch, dstate, len).

#[derive(serde::Deserialize)]
struct GoldenFile {
    cases: Vec<GoldenCase>,
}

#[derive(serde::Deserialize)]
struct GoldenCase {
    name: String,
    batch: usize,
    dim: usize,
    dstate: usize,
    len: usize,
    delta_softplus: bool,
    inputs: GoldenTensors,
    grad_out: Vec<f32>,
    outputs: GoldenOutputs,
    grads: GoldenTensors,
}

#[derive(serde::Deserialize)]
#[allow(non_snake_case)]
struct GoldenTensors {
    u: Vec<f32>,
    delta: Vec<f32>,
    A: Vec<f32>,
    B: Vec<f32>,
    C: Vec<f32>,
    D: Option<Vec<f32>>,
    z: Option<Vec<f32>>,
    delta_bias: Option<Vec<f32>>,
}

#[derive(serde::Deserialize)]
struct GoldenOutputs {
    out: Vec<f32>,
    last_state: Vec<f32>,
}

/// (batch, rows, len) → (batch, len, rows)
fn to_token_major(x: &[f32], batch: usize, rows: usize, len: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for b in 0..batch {
        for r in 0..rows {
            for t in 0..len {
                y[(b * len + t) * rows + r] = x[(b * rows + r) * len + t];
            }
        }
    }
    y
}

#[test]
fn matches_official_selective_scan_ref_with_autograd() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/selective_scan_ref.json"
    ))
    .expect("tests/data/selective_scan_ref.json");
    let file: GoldenFile = serde_json::from_str(&text).unwrap();
    assert!(file.cases.len() >= 7);
    for g in &file.cases {
        let (bs, dm, n, l) = (g.batch, g.dim, g.dstate, g.len);
        let act = |x: &[f32]| to_token_major(x, bs, dm, l);
        let tok = |x: &[f32]| to_token_major(x, bs, n, l);
        let s = shape(bs, l, dm, n);
        let (u, delta, b, c) = (
            act(&g.inputs.u),
            act(&g.inputs.delta),
            tok(&g.inputs.B),
            tok(&g.inputs.C),
        );
        let z = g.inputs.z.as_deref().map(act);
        let inputs = ScanInputs {
            u: &u,
            delta: &delta,
            a: &g.inputs.A,
            b: &b,
            c: &c,
            d: g.inputs.D.as_deref(),
            z: z.as_deref(),
            delta_bias: g.inputs.delta_bias.as_deref(),
            initial_state: None,
        };
        for chunk in [3, 2048] {
            let o = options(g.delta_softplus, false, chunk, ScanParallelism::Channels);
            let mut out = vec![0.0f32; bs * l * dm];
            let mut fs = vec![0.0f32; bs * dm * n];
            let mut ck = vec![0.0f32; s.checkpoints_len(chunk)];
            selective_scan_forward(&s, &inputs, &o, &mut out, Some(&mut fs), Some(&mut ck))
                .unwrap();
            let name = &g.name;
            assert_close(
                &format!("{name} out"),
                &out,
                &act(&g.outputs.out),
                1e-5,
                2e-5,
            );
            assert_close(
                &format!("{name} last_state"),
                &fs,
                &g.outputs.last_state,
                1e-5,
                2e-5,
            );
            let d_out = act(&g.grad_out);
            let gr = selective_scan_backward(&s, &inputs, &o, &ck, &d_out, None).unwrap();
            let (atol, rtol) = (1e-4, 1e-4);
            assert_close(&format!("{name} du"), &gr.u, &act(&g.grads.u), atol, rtol);
            assert_close(
                &format!("{name} ddelta"),
                &gr.delta,
                &act(&g.grads.delta),
                atol,
                rtol,
            );
            assert_close(&format!("{name} dA"), &gr.a, &g.grads.A, atol, rtol);
            assert_close(&format!("{name} dB"), &gr.b, &tok(&g.grads.B), atol, rtol);
            assert_close(&format!("{name} dC"), &gr.c, &tok(&g.grads.C), atol, rtol);
            if let Some(want) = &g.grads.D {
                assert_close(
                    &format!("{name} dD"),
                    gr.d.as_ref().unwrap(),
                    want,
                    atol,
                    rtol,
                );
            }
            if let Some(want) = &g.grads.z {
                assert_close(
                    &format!("{name} dz"),
                    gr.z.as_ref().unwrap(),
                    &act(want),
                    atol,
                    rtol,
                );
            }
            if let Some(want) = &g.grads.delta_bias {
                assert_close(
                    &format!("{name} ddelta_bias"),
                    gr.delta_bias.as_ref().unwrap(),
                    want,
                    atol,
                    rtol,
                );
            }
        }
    }
}

/// Stepping position by position with `selective_scan_step` equals the
/// literal reference over the whole sequence (outputs and final state), in
/// f64 and in f32 (whose 16-state channels sum C·h with their own code),
/// against the f64 reference.
#[test]
fn single_steps_equal_the_reference_scan() {
    steps_equal_reference::<f64>(1e-12, 1e-10);
    steps_equal_reference::<f32>(2e-5, 2e-5);
}

fn steps_equal_reference<T: Float>(atol: f64, rtol: f64) {
    for (i, &(b, l, ch, n)) in SHAPES.iter().enumerate() {
        for softplus in [true, false] {
            for zoh in [false, true] {
                let seed = 900 + i as u64;
                let exact = ScanCase::<f64>::random_for(shape(b, l, ch, n), ALL, seed, softplus);
                let case = ScanCase::<T>::random_for(shape(b, l, ch, n), ALL, seed, softplus);
                let o = options(softplus, zoh, 256, ScanParallelism::Auto);
                let want = selective_scan_reference(&exact.shape, &exact.inputs(), &o).unwrap();
                let mut state = case.initial_state.clone().unwrap();
                let mut out = vec![T::ZERO; b * l * ch];
                let row = |x: &[T], t: usize, w: usize| -> Vec<T> {
                    (0..b)
                        .flat_map(|bb| x[(bb * l + t) * w..(bb * l + t + 1) * w].to_vec())
                        .collect()
                };
                for t in 0..l {
                    let (u, delta, z) = (
                        row(&case.u, t, ch),
                        row(&case.delta, t, ch),
                        row(case.z.as_ref().unwrap(), t, ch),
                    );
                    let (bt, ct) = (row(&case.b, t, n), row(&case.c, t, n));
                    let inputs = ScanStepInputs {
                        u: &u,
                        delta: &delta,
                        a: &case.a,
                        b: &bt,
                        c: &ct,
                        d: case.d.as_deref(),
                        z: Some(&z),
                        delta_bias: case.delta_bias.as_deref(),
                    };
                    let mut y = vec![T::ZERO; b * ch];
                    selective_scan_step(b, ch, n, &inputs, &o, &mut state, &mut y).unwrap();
                    for bb in 0..b {
                        out[(bb * l + t) * ch..(bb * l + t + 1) * ch]
                            .copy_from_slice(&y[bb * ch..(bb + 1) * ch]);
                    }
                }
                let tag = format!("{} {b}x{l}x{ch}x{n} softplus {softplus} zoh {zoh}", T::NAME);
                assert_close(&format!("step out {tag}"), &out, &want.out, atol, rtol);
                assert_close(
                    &format!("step state {tag}"),
                    &state,
                    &want.final_state,
                    atol,
                    rtol,
                );
            }
        }
    }
}

#[test]
fn single_step_shape_errors_name_the_tensor() {
    let o = ScanOptions::default();
    let (u, a, bc, mut state, mut out) = (
        vec![0.0f32; 4],
        vec![-1.0f32; 8],
        vec![0.0f32; 2],
        vec![0.0f32; 8],
        vec![0.0f32; 4],
    );
    let inputs = ScanStepInputs {
        u: &u,
        delta: &u,
        a: &a,
        b: &bc,
        c: &bc[..1],
        d: None,
        z: None,
        delta_bias: None,
    };
    let err = selective_scan_step(1, 4, 2, &inputs, &o, &mut state, &mut out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("C"), "{err}");
}
