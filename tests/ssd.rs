//! The SSD kernels (Mamba-2): the chunked forward and backward against the
//! literal recurrence, central finite differences, the single-token step,
//! thread-count independence, shape errors and (when present) numbers from
//! a PyTorch autograd implementation.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::{assert_close, dot};
use selective::kernels::*;
use selective::rng::Rng;
use selective::{Error, Float};

/// A dt_limit that clamps some Δ at both ends with the random inputs below
/// (Δ = softplus(dt + dt_bias) spans about 0.01..1.5).
const CLAMP: (f64, f64) = (0.05, 0.6);
const NO_CLAMP: (f64, f64) = (0.0, f64::INFINITY);

#[allow(clippy::too_many_arguments)]
fn shape(
    batch: usize,
    len: usize,
    heads: usize,
    head_dim: usize,
    groups: usize,
    state: usize,
) -> SsdShape {
    SsdShape {
        batch,
        len,
        heads,
        head_dim,
        groups,
        state,
    }
}

/// Owned inputs of an SSD layer.
#[derive(Clone, Debug)]
struct Case<T> {
    shape: SsdShape,
    x: Vec<T>,
    dt: Vec<T>,
    dt_bias: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
    c: Vec<T>,
    d: Vec<T>,
    initial_state: Option<Vec<T>>,
}

impl Case<f64> {
    /// Mamba-2-like random inputs: raw dt such that Δ spans about
    /// 0.01..1.5, A = -exp(U(-1, 0.7)) (slow and fast heads), the rest N(0, 1).
    fn random(shape: SsdShape, initial: bool, seed: u64) -> Self {
        let mut r = Rng::new(seed);
        let (act, tok) = (
            shape.batch * shape.len * shape.heads * shape.head_dim,
            shape.batch * shape.len * shape.groups * shape.state,
        );
        Self {
            shape,
            x: r.vec(act, |r| r.normal()),
            dt: r.vec(shape.batch * shape.len * shape.heads, |r| {
                r.uniform_in(-4.0, 0.5)
            }),
            dt_bias: r.vec(shape.heads, |r| r.normal() * 0.5),
            a: r.vec(shape.heads, |r| -r.uniform_in(-1.0, 0.7).exp()),
            b: r.vec(tok, |r| r.normal()),
            c: r.vec(tok, |r| r.normal()),
            d: r.vec(shape.heads, |r| r.normal()),
            initial_state: initial.then(|| r.vec(shape.batch * shape.state_len(), |r| r.normal())),
        }
    }
}

impl<T: Float> Case<T> {
    fn inputs(&self) -> SsdInputs<'_, T> {
        SsdInputs {
            x: &self.x,
            dt: &self.dt,
            dt_bias: &self.dt_bias,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: &self.d,
            initial_state: self.initial_state.as_deref(),
        }
    }

    /// The same values in another scalar type.
    fn cast<U: Float>(&self) -> Case<U> {
        let f = |v: &Vec<T>| {
            v.iter()
                .map(|x| U::from_f64(x.to_f64()))
                .collect::<Vec<U>>()
        };
        Case {
            shape: self.shape,
            x: f(&self.x),
            dt: f(&self.dt),
            dt_bias: f(&self.dt_bias),
            a: f(&self.a),
            b: f(&self.b),
            c: f(&self.c),
            d: f(&self.d),
            initial_state: self.initial_state.as_ref().map(f),
        }
    }

    /// Positions t0..t1 of every sequence, starting from `initial`.
    fn window(&self, t0: usize, t1: usize, initial: Option<Vec<T>>) -> Self {
        let s = self.shape;
        let cut = |v: &Vec<T>, width: usize| -> Vec<T> {
            (0..s.batch)
                .flat_map(|b| v[(b * s.len + t0) * width..(b * s.len + t1) * width].to_vec())
                .collect()
        };
        Self {
            shape: SsdShape { len: t1 - t0, ..s },
            x: cut(&self.x, s.heads * s.head_dim),
            dt: cut(&self.dt, s.heads),
            dt_bias: self.dt_bias.clone(),
            a: self.a.clone(),
            b: cut(&self.b, s.groups * s.state),
            c: cut(&self.c, s.groups * s.state),
            d: self.d.clone(),
            initial_state: initial,
        }
    }
}

fn options(chunk_len: usize, dt_limit: (f64, f64)) -> SsdOptions {
    SsdOptions {
        chunk_len,
        dt_limit,
    }
}

/// Chunked forward keeping the chunk states: (y, final state, chunk states).
fn forward<T: MatmulScalar>(case: &Case<T>, o: &SsdOptions) -> (Vec<T>, Vec<T>, Vec<T>) {
    let s = case.shape;
    let mut y = vec![T::ZERO; case.x.len()];
    let mut fs = vec![T::ZERO; s.batch * s.state_len()];
    let mut cs = vec![T::ZERO; s.chunk_states_len(o.chunk_len)];
    ssd_forward(&s, &case.inputs(), o, &mut y, Some(&mut fs), Some(&mut cs)).unwrap();
    (y, fs, cs)
}

/// The largest error seen by each family of comparisons, as
/// max |got - want| / max |want| over a tensor, printed by the tests
/// (`--nocapture`) for the record.
struct Worst(AtomicU64);

impl Worst {
    const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    fn note(&self, e: f64) {
        self.0.fetch_max(e.to_bits(), Ordering::Relaxed);
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Checks `got` against `want` to `tol` relative to the tensor's scale
/// (elementwise |got - want| <= tol (max|want| + |want|)), and records the
/// normwise error in `worst`.
fn close<T: Float, U: Float>(what: &str, got: &[T], want: &[U], tol: f64, worst: &Worst) {
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.to_f64().abs()));
    let scale = if scale > 0.0 { scale } else { 1.0 };
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g.to_f64() - w.to_f64()).abs()))
        / scale;
    worst.note(err);
    assert_close(what, got, want, tol * scale, tol);
}

/// (batch, len, heads, head_dim, groups, state, chunk): length 1, Q - 1,
/// Q, Q + 1 and many chunks, Q = 1 and the default 256, head_dim 1, 3, 5,
/// 6, state 1, 5, 7, groups 1 to 4 with 1 to 8 heads each.
const SIZES: [(usize, usize, usize, usize, usize, usize, usize); 12] = [
    (1, 1, 1, 1, 1, 1, 4),
    (2, 1, 4, 3, 2, 5, 256),
    (2, 3, 2, 3, 1, 5, 4),
    (1, 4, 4, 6, 2, 7, 4),
    (2, 5, 4, 3, 4, 5, 4),
    (2, 17, 4, 6, 2, 7, 4),
    (1, 17, 6, 3, 2, 5, 4),
    (3, 9, 8, 5, 4, 7, 1),
    (1, 40, 8, 6, 1, 7, 16),
    (2, 37, 6, 6, 3, 7, 8),
    (1, 300, 4, 16, 2, 16, 256),
    (1, 130, 4, 6, 4, 5, 64),
];

/// How many Δ = softplus(dt + dt_bias) fall below and above `limit`.
fn clamped(case: &Case<f64>, limit: (f64, f64)) -> (usize, usize) {
    let h = case.shape.heads;
    let mut counts = (0, 0);
    for (i, &v) in case.dt.iter().enumerate() {
        let sp = (v + case.dt_bias[i % h]).softplus();
        counts.0 += (sp < limit.0) as usize;
        counts.1 += (sp > limit.1) as usize;
    }
    counts
}

static FWD_F64: Worst = Worst::new();
static FWD_F32: Worst = Worst::new();

#[test]
fn chunked_forward_matches_reference_f64_and_f32() {
    let mut seed = 10;
    let mut clamps = (0, 0);
    for &(b, l, h, p, g, n, q) in &SIZES {
        for initial in [false, true] {
            for limit in [NO_CLAMP, CLAMP] {
                seed += 1;
                let s = shape(b, l, h, p, g, n);
                let o = options(q, limit);
                let tag = format!("{s:?} Q={q} initial={initial} dt_limit={limit:?}");
                let case = Case::random(s, initial, seed);
                if limit == CLAMP {
                    let (lo, hi) = clamped(&case, limit);
                    clamps = (clamps.0 + lo, clamps.1 + hi);
                }
                let want = ssd_reference(&s, &case.inputs(), &o).unwrap();
                let (y, fs, _) = forward(&case, &o);
                close(&format!("f64 y {tag}"), &y, &want.y, 1e-12, &FWD_F64);
                close(
                    &format!("f64 final {tag}"),
                    &fs,
                    &want.final_state,
                    1e-12,
                    &FWD_F64,
                );
                // f32 against the f64 reference on the same (rounded) inputs.
                let case32 = case.cast::<f32>();
                let want = ssd_reference(&s, &case32.cast::<f64>().inputs(), &o).unwrap();
                let (y, fs, _) = forward(&case32, &o);
                close(&format!("f32 y {tag}"), &y, &want.y, 1e-5, &FWD_F32);
                close(
                    &format!("f32 final {tag}"),
                    &fs,
                    &want.final_state,
                    1e-5,
                    &FWD_F32,
                );
            }
        }
    }
    assert!(
        clamps.0 > 20 && clamps.1 > 20,
        "dt_limit should clamp at both ends: {clamps:?}"
    );
    eprintln!(
        "chunked forward vs reference, max normwise error: f64 {:.2e}, f32 {:.2e}",
        FWD_F64.get(),
        FWD_F32.get()
    );
}

#[test]
fn chunk_states_and_final_state_are_the_reference_states() {
    let worst = Worst::new();
    for (i, &(b, l, h, p, g, n, q)) in [
        (2, 17, 4, 6, 2, 7, 4),
        (1, 23, 6, 3, 3, 5, 5),
        (3, 9, 8, 5, 4, 7, 1),
        (1, 300, 4, 16, 2, 16, 64),
    ]
    .iter()
    .enumerate()
    {
        for initial in [false, true] {
            let s = shape(b, l, h, p, g, n);
            let o = options(q, CLAMP);
            let case = Case::random(s, initial, 300 + i as u64);
            let (_, fs, cs) = forward(&case, &o);
            let per = s.state_len();
            let n_chunks = s.n_chunks(q);
            for k in 0..=n_chunks {
                // The state after the first min(k·Q, len) positions.
                let cut = (k * q).min(l);
                let want = if cut == 0 {
                    case.initial_state
                        .clone()
                        .unwrap_or_else(|| vec![0.0; b * per])
                } else {
                    let prefix = case.window(0, cut, case.initial_state.clone());
                    ssd_reference(&prefix.shape, &prefix.inputs(), &o)
                        .unwrap()
                        .final_state
                };
                let got: Vec<f64> = if k < n_chunks {
                    (0..b)
                        .flat_map(|bb| cs[(bb * n_chunks + k) * per..][..per].to_vec())
                        .collect()
                } else {
                    fs.clone()
                };
                let what = if k < n_chunks { "chunk state" } else { "final" };
                close(
                    &format!("{what} {k} {s:?} Q={q} initial={initial}"),
                    &got,
                    &want,
                    1e-12,
                    &worst,
                );
            }
        }
    }
    eprintln!(
        "kept states vs reference, max normwise error {:.2e}",
        worst.get()
    );
}

#[test]
fn two_halves_with_the_state_carried_equal_one_run() {
    let worst = Worst::new();
    let s = shape(2, 23, 6, 3, 2, 5);
    for initial in [false, true] {
        for (split, q) in [(10, 4), (8, 4), (1, 4), (22, 4), (12, 256), (5, 1)] {
            let case = Case::random(s, initial, 77);
            let o = options(q, CLAMP);
            let (y, fs, _) = forward(&case, &o);
            let first = case.window(0, split, case.initial_state.clone());
            let (y1, fs1, _) = forward(&first, &o);
            let second = case.window(split, s.len, Some(fs1));
            let (y2, fs2, _) = forward(&second, &o);
            let tag = format!("split {split} Q={q} initial={initial}");
            let joined: Vec<f64> = (0..s.batch)
                .flat_map(|b| {
                    let w = s.heads * s.head_dim;
                    let mut row = y1[b * split * w..(b + 1) * split * w].to_vec();
                    let rest = s.len - split;
                    row.extend_from_slice(&y2[b * rest * w..(b + 1) * rest * w]);
                    row
                })
                .collect();
            close(&format!("y {tag}"), &joined, &y, 1e-12, &worst);
            close(&format!("final {tag}"), &fs2, &fs, 1e-12, &worst);
        }
    }
    eprintln!(
        "two halves vs one run, max normwise error {:.2e}",
        worst.get()
    );
}

/// Stepping token by token equals the reference; splitting the heads into
/// ranges gives exactly what all heads at once give, and the batched form
/// exactly what one sequence at a time gives.
#[test]
fn steps_equal_the_reference_and_head_ranges_equal_all_heads() {
    let (w64, w32) = (Worst::new(), Worst::new());
    steps_equal_reference::<f64>(1e-12, &w64);
    steps_equal_reference::<f32>(1e-5, &w32);
    eprintln!(
        "steps vs reference, max normwise error: f64 {:.2e}, f32 {:.2e}",
        w64.get(),
        w32.get()
    );
}

fn steps_equal_reference<T: Float>(tol: f64, worst: &Worst) {
    for (i, &(b, l, h, p, g, n, _)) in SIZES[..10].iter().enumerate() {
        for limit in [NO_CLAMP, CLAMP] {
            let s = shape(b, l, h, p, g, n);
            let exact = Case::random(s, true, 500 + i as u64);
            let case = exact.cast::<T>();
            let o = options(4, limit);
            let want = ssd_reference(&s, &case.cast::<f64>().inputs(), &o).unwrap();
            let step = s.step_shape();
            let (hp, gn, hpn) = (h * p, g * n, s.state_len());
            let mut state = case.initial_state.clone().unwrap();
            let mut state_split = state.clone();
            let mut state_batch = state.clone();
            let mut y = vec![T::ZERO; case.x.len()];
            // Head ranges as a decoding team would split them: uneven, and
            // not on group boundaries.
            let cuts: Vec<usize> = if h >= 3 {
                vec![0, 1, h / 2 + 1, h]
            } else {
                vec![0, h]
            };
            for t in 0..l {
                let row = |v: &[T], width: usize| -> Vec<T> {
                    (0..b)
                        .flat_map(|bb| v[(bb * l + t) * width..][..width].to_vec())
                        .collect()
                };
                let (x_t, dt_t) = (row(&case.x, hp), row(&case.dt, h));
                let (b_t, c_t) = (row(&case.b, gn), row(&case.c, gn));
                let mut y_batch = vec![T::ZERO; b * hp];
                let batched = SsdStepInputs {
                    x: &x_t,
                    dt: &dt_t,
                    b: &b_t,
                    c: &c_t,
                    dt_bias: &case.dt_bias,
                    a: &case.a,
                    d: &case.d,
                };
                ssd_step_batch(&step, b, &batched, &o, &mut state_batch, &mut y_batch).unwrap();
                for bb in 0..b {
                    let one = |h0: usize, h1: usize| SsdStepInputs {
                        x: &x_t[bb * hp + h0 * p..bb * hp + h1 * p],
                        dt: &dt_t[bb * h + h0..bb * h + h1],
                        b: &b_t[bb * gn..(bb + 1) * gn],
                        c: &c_t[bb * gn..(bb + 1) * gn],
                        dt_bias: &case.dt_bias,
                        a: &case.a,
                        d: &case.d,
                    };
                    let y_row = &mut y[(bb * l + t) * hp..][..hp];
                    ssd_step(
                        &step,
                        0..h,
                        &one(0, h),
                        &o,
                        &mut state[bb * hpn..(bb + 1) * hpn],
                        y_row,
                    )
                    .unwrap();
                    let mut y_split = vec![T::ZERO; hp];
                    for w in cuts.windows(2) {
                        let (h0, h1) = (w[0], w[1]);
                        ssd_step(
                            &step,
                            h0..h1,
                            &one(h0, h1),
                            &o,
                            &mut state_split[bb * hpn + h0 * p * n..bb * hpn + h1 * p * n],
                            &mut y_split[h0 * p..h1 * p],
                        )
                        .unwrap();
                    }
                    assert_eq!(bits(&y_split), bits(y_row), "head ranges {cuts:?} t={t}");
                    assert_eq!(
                        bits(&y_batch[bb * hp..(bb + 1) * hp]),
                        bits(y_row),
                        "batched step t={t}"
                    );
                }
            }
            let tag = format!("{} {s:?} dt_limit={limit:?}", T::NAME);
            close(&format!("step y {tag}"), &y, &want.y, tol, worst);
            close(
                &format!("step state {tag}"),
                &state,
                &want.final_state,
                tol,
                worst,
            );
            assert_eq!(bits(&state_split), bits(&state), "split state {tag}");
            assert_eq!(bits(&state_batch), bits(&state), "batched state {tag}");
        }
    }
}

/// Exact bit patterns (f32 widens to f64 exactly, sign of zero included).
fn bits<T: Float>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn check_grads<T: Float, U: Float>(
    tag: &str,
    got: &SsdGrads<T>,
    want: &SsdGrads<U>,
    tol: f64,
    worst: &Worst,
) {
    close(&format!("dx {tag}"), &got.x, &want.x, tol, worst);
    close(&format!("ddt {tag}"), &got.dt, &want.dt, tol, worst);
    close(
        &format!("ddt_bias {tag}"),
        &got.dt_bias,
        &want.dt_bias,
        tol,
        worst,
    );
    close(&format!("dA {tag}"), &got.a, &want.a, tol, worst);
    close(&format!("dB {tag}"), &got.b, &want.b, tol, worst);
    close(&format!("dC {tag}"), &got.c, &want.c, tol, worst);
    close(&format!("dD {tag}"), &got.d, &want.d, tol, worst);
    assert_eq!(
        got.initial_state.is_some(),
        want.initial_state.is_some(),
        "dinitial_state presence {tag}"
    );
    if let (Some(g), Some(w)) = (&got.initial_state, &want.initial_state) {
        close(&format!("dinitial_state {tag}"), g, w, tol, worst);
    }
}

fn backward<T: MatmulScalar>(
    case: &Case<T>,
    o: &SsdOptions,
    dy: &[T],
    d_final: Option<&[T]>,
) -> SsdGrads<T> {
    let (_, _, cs) = forward(case, o);
    ssd_backward(&case.shape, &case.inputs(), o, &cs, dy, d_final).unwrap()
}

fn random_vec(len: usize, seed: u64) -> Vec<f64> {
    let mut r = Rng::new(seed);
    r.vec(len, |r| r.normal())
}

#[test]
fn chunked_backward_matches_reference_backward() {
    let (w64, w32) = (Worst::new(), Worst::new());
    let mut seed = 1000;
    for &(b, l, h, p, g, n, q) in &SIZES {
        for (initial, limit, with_d_final) in [
            (true, CLAMP, true),
            (false, NO_CLAMP, true),
            (true, NO_CLAMP, false),
        ] {
            seed += 1;
            let s = shape(b, l, h, p, g, n);
            let o = options(q, limit);
            let case = Case::random(s, initial, seed);
            let dy = random_vec(case.x.len(), seed + 7);
            let d_final = random_vec(b * s.state_len(), seed + 8);
            let d_final = with_d_final.then_some(&d_final[..]);
            let want = ssd_backward_reference(&s, &case.inputs(), &o, &dy, d_final).unwrap();
            let got = backward(&case, &o, &dy, d_final);
            let tag = format!("{s:?} Q={q} initial={initial} dt_limit={limit:?}");
            check_grads(&format!("f64 {tag}"), &got, &want, 1e-11, &w64);

            let case32 = case.cast::<f32>();
            let exact = case32.cast::<f64>();
            let dy32: Vec<f32> = dy.iter().map(|&v| v as f32).collect();
            let df32: Option<Vec<f32>> = d_final.map(|v| v.iter().map(|&x| x as f32).collect());
            let dy_r: Vec<f64> = dy32.iter().map(|&v| v as f64).collect();
            let df_r: Option<Vec<f64>> =
                df32.as_ref().map(|v| v.iter().map(|&x| x as f64).collect());
            let want =
                ssd_backward_reference(&s, &exact.inputs(), &o, &dy_r, df_r.as_deref()).unwrap();
            let got = backward(&case32, &o, &dy32, df32.as_deref());
            check_grads(&format!("f32 {tag}"), &got, &want, 1e-4, &w32);
        }
    }
    eprintln!(
        "chunked backward vs reference backward, max normwise error: f64 {:.2e}, f32 {:.2e}",
        w64.get(),
        w32.get()
    );
}

/// Loss = Σ y ⊙ dy + Σ final ⊙ d_final, by the chunked forward.
fn loss(case: &Case<f64>, o: &SsdOptions, dy: &[f64], d_final: &[f64]) -> f64 {
    let r = ssd(&case.shape, &case.inputs(), o).unwrap();
    dot(&r.y, dy) + dot(&r.final_state, d_final)
}

#[test]
fn backward_matches_central_finite_differences_f64() {
    let (w_chunked, w_reference) = (Worst::new(), Worst::new());
    let mut seed = 2000;
    let mut clamped_zeros = 0;
    for &(b, l, h, p, g, n, q) in &[
        (1, 1, 1, 1, 1, 1, 4),
        (2, 5, 4, 3, 2, 3, 2),
        (1, 9, 6, 2, 3, 3, 4),
        (2, 7, 2, 3, 1, 2, 3),
    ] {
        for limit in [NO_CLAMP, CLAMP] {
            seed += 1;
            let s = shape(b, l, h, p, g, n);
            let o = options(q, limit);
            let mut case = Case::random(s, true, seed);
            let dy = random_vec(case.x.len(), seed + 1);
            let d_final = random_vec(b * s.state_len(), seed + 2);
            let got = backward(&case, &o, &dy, Some(&d_final));
            let reference =
                ssd_backward_reference(&s, &case.inputs(), &o, &dy, Some(&d_final)).unwrap();
            let eps = 1e-6;
            let tag = format!("{s:?} Q={q} dt_limit={limit:?}");
            let mut check = |name: &str,
                             field: fn(&mut Case<f64>) -> &mut Vec<f64>,
                             grad: &[f64],
                             grad_ref: &[f64]| {
                let len = field(&mut case).len();
                let mut fd = vec![0.0; len];
                for (i, fd_i) in fd.iter_mut().enumerate() {
                    let orig = field(&mut case)[i];
                    field(&mut case)[i] = orig + eps;
                    let plus = loss(&case, &o, &dy, &d_final);
                    field(&mut case)[i] = orig - eps;
                    let minus = loss(&case, &o, &dy, &d_final);
                    field(&mut case)[i] = orig;
                    *fd_i = (plus - minus) / (2.0 * eps);
                }
                // Central differences are good to about eps² f''' + 1e-16 |L| / eps.
                close(&format!("{name} vs FD {tag}"), grad, &fd, 1e-6, &w_chunked);
                close(
                    &format!("reference {name} vs FD {tag}"),
                    grad_ref,
                    &fd,
                    1e-6,
                    &w_reference,
                );
            };
            check("dx", |c| &mut c.x, &got.x, &reference.x);
            check("ddt", |c| &mut c.dt, &got.dt, &reference.dt);
            check(
                "ddt_bias",
                |c| &mut c.dt_bias,
                &got.dt_bias,
                &reference.dt_bias,
            );
            check("dA", |c| &mut c.a, &got.a, &reference.a);
            check("dB", |c| &mut c.b, &got.b, &reference.b);
            check("dC", |c| &mut c.c, &got.c, &reference.c);
            check("dD", |c| &mut c.d, &got.d, &reference.d);
            check(
                "dinitial_state",
                |c| c.initial_state.as_mut().unwrap(),
                got.initial_state.as_ref().unwrap(),
                reference.initial_state.as_ref().unwrap(),
            );
            if limit == CLAMP {
                // Where Δ was clamped the dt gradient is exactly 0.
                clamped_zeros += got.dt.iter().filter(|&&v| v == 0.0).count();
            }
        }
    }
    assert!(clamped_zeros > 5, "too few clamped Δ: {clamped_zeros}");
    eprintln!(
        "backward vs central differences, max normwise error: chunked {:.2e}, reference {:.2e}",
        w_chunked.get(),
        w_reference.get()
    );
}

/// Every output and gradient has the same bits on 1, 2 and 3 threads, at
/// sizes whose products go to the GEMM's own threads (C Bᵀ of a chunk is
/// 64·64·32 multiply-adds, over its threading threshold).
#[test]
fn results_do_not_depend_on_the_thread_count() {
    fn run<T: MatmulScalar>(case: &Case<T>, o: &SsdOptions, dy: &[T], df: &[T]) -> Vec<Vec<u64>> {
        let (y, fs, cs) = forward(case, o);
        let g = ssd_backward(&case.shape, &case.inputs(), o, &cs, dy, Some(df)).unwrap();
        [
            &y,
            &fs,
            &cs,
            &g.x,
            &g.dt,
            &g.dt_bias,
            &g.a,
            &g.b,
            &g.c,
            &g.d,
            g.initial_state.as_ref().unwrap(),
        ]
        .iter()
        .map(|v| bits(v))
        .collect()
    }
    fn check<T: MatmulScalar>(case: &Case<f64>, o: &SsdOptions, dy: &[f64], df: &[f64]) {
        let case = case.cast::<T>();
        let dy: Vec<T> = dy.iter().map(|&v| T::from_f64(v)).collect();
        let df: Vec<T> = df.iter().map(|&v| T::from_f64(v)).collect();
        let runs: Vec<Vec<Vec<u64>>> = [1, 2, 3]
            .iter()
            .map(|&threads| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| run(&case, o, &dy, &df))
            })
            .collect();
        let names = [
            "y",
            "final",
            "chunk_states",
            "dx",
            "ddt",
            "ddt_bias",
            "dA",
            "dB",
            "dC",
            "dD",
            "dinitial",
        ];
        for (threads, r) in [2, 3].iter().zip(&runs[1..]) {
            for ((name, a), b) in names.iter().zip(&runs[0]).zip(r) {
                assert!(
                    a == b,
                    "{} {name}: {threads} threads differ from 1 ({:?}, Q={})",
                    T::NAME,
                    case.shape,
                    o.chunk_len
                );
            }
        }
    }
    for (s, q) in [
        (shape(2, 150, 4, 16, 2, 32), 64),
        (shape(1, 200, 6, 8, 1, 16), 256),
        (shape(3, 17, 4, 3, 2, 5), 4),
    ] {
        let case = Case::random(s, true, 4242);
        let dy = random_vec(case.x.len(), 1);
        let df = random_vec(s.batch * s.state_len(), 2);
        let o = options(q, CLAMP);
        check::<f32>(&case, &o, &dy, &df);
        check::<f64>(&case, &o, &dy, &df);
    }
}

#[test]
fn bad_sizes_are_errors_naming_the_tensor() {
    let s = shape(2, 5, 4, 3, 2, 6);
    let case = Case::random(s, true, 3);
    let o = options(4, NO_CLAMP);

    let short = vec![0.0; 7];
    let mut x = case.inputs();
    x.b = &short;
    let err = ssd(&s, &x, &o).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Shape { tensor: "B", .. }), "{msg}");
    assert!(
        msg.contains("batch=2, len=5, groups=2, state=6") && msg.contains("has 7"),
        "{msg}"
    );
    for (name, field) in [
        ("x", 0usize),
        ("dt", 1),
        ("dt_bias", 2),
        ("A", 3),
        ("C", 4),
        ("D", 5),
        ("initial_state", 6),
    ] {
        let mut x = case.inputs();
        match field {
            0 => x.x = &short,
            1 => x.dt = &short,
            2 => x.dt_bias = &short,
            3 => x.a = &short,
            4 => x.c = &short,
            5 => x.d = &short,
            _ => x.initial_state = Some(&short),
        }
        let msg = ssd(&s, &x, &o).unwrap_err().to_string();
        assert!(msg.contains(&format!("`{name}`")), "{name}: {msg}");
    }

    let msg = ssd(&shape(2, 5, 4, 3, 3, 6), &case.inputs(), &o)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("groups"), "{msg}");
    assert!(ssd(&shape(2, 0, 4, 3, 2, 6), &case.inputs(), &o).is_err());
    assert!(ssd(&s, &case.inputs(), &options(0, NO_CLAMP)).is_err());
    let msg = ssd(&s, &case.inputs(), &options(4, (1.0, 0.5)))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("dt_limit"), "{msg}");

    let mut y = vec![0.0; case.x.len()];
    let mut small = vec![0.0; 3];
    let msg = ssd_forward(&s, &case.inputs(), &o, &mut y, None, Some(&mut small))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`chunk_states`") && msg.contains("n_chunks=2"),
        "{msg}"
    );
    let msg = ssd_forward(&s, &case.inputs(), &o, &mut y, Some(&mut small), None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`final_state`"), "{msg}");
    let msg = ssd_forward(&s, &case.inputs(), &o, &mut small, None, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`y`"), "{msg}");

    let (_, _, cs) = forward(&case, &o);
    let dy = vec![0.0; case.x.len()];
    let msg = ssd_backward(&s, &case.inputs(), &o, &short, &dy, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`chunk_states`"), "{msg}");
    let msg = ssd_backward(&s, &case.inputs(), &o, &cs, &short, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`dy`"), "{msg}");
    let msg = ssd_backward(&s, &case.inputs(), &o, &cs, &dy, Some(&short))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`d_final_state`"), "{msg}");
    let msg = ssd_backward_reference(&s, &case.inputs(), &o, &short, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`dy`"), "{msg}");

    // The step: heads 1..3 of 4, P = 3, N = 6, G = 2.
    let step = s.step_shape();
    let (x2, dt2, bc) = (vec![0.0; 6], vec![0.0; 2], vec![0.0; 12]);
    let inputs = SsdStepInputs {
        x: &x2,
        dt: &dt2,
        b: &bc,
        c: &bc[..11],
        dt_bias: &case.dt_bias,
        a: &case.a,
        d: &case.d,
    };
    let (mut state, mut y2) = (vec![0.0; 2 * 3 * 6], vec![0.0; 6]);
    let msg = ssd_step(&step, 1..3, &inputs, &o, &mut state, &mut y2)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`C`"), "{msg}");
    let inputs = SsdStepInputs { c: &bc, ..inputs };
    ssd_step(&step, 1..3, &inputs, &o, &mut state, &mut y2).unwrap();
    let msg = ssd_step(&step, 3..5, &inputs, &o, &mut state, &mut y2)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("3..5"), "{msg}");
    let msg = ssd_step(&step, 0..3, &inputs, &o, &mut state, &mut y2)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`x`"), "{msg}");
    let msg = ssd_step(&step, 1..3, &inputs, &o, &mut state[1..], &mut y2)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`state`"), "{msg}");
    let msg = ssd_step_batch(&step, 1, &inputs, &o, &mut state, &mut y2)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`x`"), "{msg}");
}

/// Forward and backward against a PyTorch autograd implementation of the
/// recurrence (tests/data/ssd_reference.safetensors, F64), when present.
#[test]
fn ssd_matches_autograd_reference() {
    use selective::io::{SafetensorsFile, TensorSource};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/ssd_reference.safetensors");
    if !path.exists() {
        eprintln!(
            "skipped: {} is not there (made with PyTorch autograd)",
            path.display()
        );
        return;
    }
    let file = SafetensorsFile::open(&path).unwrap();
    let worst = Worst::new();
    for case in ["g1", "g3"] {
        let get = |name: &str| -> (Vec<usize>, Vec<f64>) {
            let key = format!("{case}.{name}");
            let t = file
                .tensor(&key)
                .unwrap()
                .unwrap_or_else(|| panic!("{key} missing"));
            let v = t.to_vec::<f64>(file.file(), &key).unwrap();
            (t.shape, v)
        };
        let (xs, x) = get("x");
        let (bs, b) = get("b");
        let [batch, len, heads, head_dim] = xs[..] else {
            panic!("{case}.x shape {xs:?}")
        };
        let [_, _, groups, state] = bs[..] else {
            panic!("{case}.b shape {bs:?}")
        };
        let s = shape(batch, len, heads, head_dim, groups, state);
        let limit = get("dt_limit").1;
        let chunk = get("chunk").1[0] as usize;
        let o = options(chunk, (limit[0], limit[1]));
        let (dt, dt_bias, a, c, d, s0, dy, df) = (
            get("dt").1,
            get("dt_bias").1,
            get("a").1,
            get("c").1,
            get("d").1,
            get("initial_state").1,
            get("dy").1,
            get("d_final_state").1,
        );
        let inputs = SsdInputs {
            x: &x,
            dt: &dt,
            dt_bias: &dt_bias,
            a: &a,
            b: &b,
            c: &c,
            d: &d,
            initial_state: Some(&s0),
        };
        let tag = format!("{case} {s:?} Q={chunk} dt_limit={limit:?}");
        let mut y = vec![0.0; x.len()];
        let mut fs = vec![0.0; s0.len()];
        let mut cs = vec![0.0; s.chunk_states_len(chunk)];
        ssd_forward(&s, &inputs, &o, &mut y, Some(&mut fs), Some(&mut cs)).unwrap();
        close(&format!("y {tag}"), &y, &get("y").1, 1e-10, &worst);
        close(
            &format!("final_state {tag}"),
            &fs,
            &get("final_state").1,
            1e-10,
            &worst,
        );
        let g = ssd_backward(&s, &inputs, &o, &cs, &dy, Some(&df)).unwrap();
        let r = ssd_reference(&s, &inputs, &o).unwrap();
        close(
            &format!("reference y {tag}"),
            &r.y,
            &get("y").1,
            1e-10,
            &worst,
        );
        for (name, got) in [
            ("x", &g.x),
            ("dt", &g.dt),
            ("dt_bias", &g.dt_bias),
            ("a", &g.a),
            ("b", &g.b),
            ("c", &g.c),
            ("d", &g.d),
            ("initial_state", g.initial_state.as_ref().unwrap()),
        ] {
            let want = get(&format!("grad.{name}")).1;
            close(&format!("grad.{name} {tag}"), got, &want, 1e-10, &worst);
        }
    }
    eprintln!(
        "against PyTorch autograd, max normwise error {:.2e}",
        worst.get()
    );
}
