//! S4D (the LTI baseline): the convolution and the recurrence against each
//! other, against a literal double loop written from the equations, and
//! their backward passes against central finite differences and each other.

mod common;

use common::*;
use selective::kernels::*;
use selective::rng::Rng;
use selective::{Error, Float};

// ---------------------------------------------------------------------------
// Helpers.

/// The init of `kind` with B and C made generic complex numbers and A
/// moved off its grid, so that every parameter matters (for S4D-Real the
/// init has B = 1 and real C, for which b_im, c_im and a_imag would get
/// zero gradients). Δ keeps its init range unless `dt_range` is given.
fn random_params(
    kind: S4dInit,
    channels: usize,
    state_size: usize,
    seed: u64,
    dt_range: Option<(f64, f64)>,
) -> S4dParams<f64> {
    let mut p = S4dParams::<f64>::init(kind, channels, state_size, seed).unwrap();
    let mut r = Rng::new(seed.wrapping_mul(31).wrapping_add(7));
    if let Some((lo, hi)) = dt_range {
        for v in p.log_dt.iter_mut() {
            *v = r.uniform_in(lo.ln(), hi.ln());
        }
    }
    for v in p.log_a_real.iter_mut() {
        *v += 0.3 * r.normal();
    }
    for v in p.a_imag.iter_mut() {
        *v += 0.5 * r.normal();
    }
    for v in p.b_re.iter_mut() {
        *v += 0.3 * r.normal();
    }
    for v in p.b_im.iter_mut() {
        *v = 0.3 * r.normal();
    }
    for v in p.c_im.iter_mut() {
        *v += 0.5 * r.normal();
    }
    p
}

fn max_abs<T: Float>(a: &[T]) -> f64 {
    a.iter().map(|x| x.to_f64().abs()).fold(0.0, f64::max)
}

fn max_abs_diff<T: Float, U: Float>(a: &[T], b: &[U]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.to_f64() - y.to_f64()).abs())
        .fold(0.0, f64::max)
}

/// max |got - want| / max |want|, and asserts it is at most `tol`.
fn assert_rel_max<T: Float, U: Float>(what: &str, got: &[T], want: &[U], tol: f64) -> f64 {
    let err = max_abs_diff(got, want) / max_abs(want).max(1e-300);
    assert!(
        err <= tol,
        "{what}: max error {err:.3e} of max |want| = {:.3e} (tolerance {tol:.1e})",
        max_abs(want)
    );
    err
}

// Plain complex arithmetic on (re, im) pairs, for the literal reference.
type C = (f64, f64);
fn cmul(a: C, b: C) -> C {
    (a.0 * b.0 - a.1 * b.1, a.0 * b.1 + a.1 * b.0)
}
fn cdiv(a: C, b: C) -> C {
    let d = b.0 * b.0 + b.1 * b.1;
    ((a.0 * b.0 + a.1 * b.1) / d, (a.1 * b.0 - a.0 * b.1) / d)
}
fn cexp(a: C) -> C {
    let r = a.0.exp();
    (r * a.1.cos(), r * a.1.sin())
}

/// K_l = f Re Σ_n C_n B_n (exp(ΔA_n) - 1)/A_n · exp(ΔA_n l), straight from
/// the equations: (channels, len).
fn literal_kernel(p: &S4dParams<f64>, len: usize) -> Vec<f64> {
    let f = match p.kind {
        S4dInit::Real => 1.0,
        S4dInit::Lin => 2.0,
    };
    let mut k = vec![0.0; p.channels * len];
    for h in 0..p.channels {
        let dt = p.log_dt[h].exp();
        for l in 0..len {
            let mut sum = 0.0;
            for n in 0..p.modes {
                let i = h * p.modes + n;
                let a = (-p.log_a_real[i].exp(), p.a_imag[i]);
                let dta = (a.0 * dt, a.1 * dt);
                let e = cexp(dta);
                let ct = cmul(
                    cmul((p.c_re[i], p.c_im[i]), (p.b_re[i], p.b_im[i])),
                    cdiv((e.0 - 1.0, e.1), a),
                );
                sum += cmul(ct, cexp((dta.0 * l as f64, dta.1 * l as f64))).0;
            }
            k[h * len + l] = f * sum;
        }
    }
    k
}

/// y_t = Σ_{l≤t} K_l u_{t-l} + D u_t by a double loop over t and l.
fn literal_forward(p: &S4dParams<f64>, u: &[f64], batch: usize, len: usize) -> Vec<f64> {
    let ch = p.channels;
    let k = literal_kernel(p, len);
    let mut y = vec![0.0; batch * len * ch];
    for b in 0..batch {
        for h in 0..ch {
            let at = |t: usize| (b * len + t) * ch + h;
            for t in 0..len {
                let mut s = p.d[h] * u[at(t)];
                for l in 0..=t {
                    s += k[h * len + l] * u[at(t - l)];
                }
                y[at(t)] = s;
            }
        }
    }
    y
}

/// Parameter fields by name, for the finite-difference loops.
const FIELDS: [&str; 8] = [
    "log_dt",
    "log_a_real",
    "a_imag",
    "b_re",
    "b_im",
    "c_re",
    "c_im",
    "d",
];

fn field_mut<'a>(p: &'a mut S4dParams<f64>, name: &str) -> &'a mut Vec<f64> {
    match name {
        "log_dt" => &mut p.log_dt,
        "log_a_real" => &mut p.log_a_real,
        "a_imag" => &mut p.a_imag,
        "b_re" => &mut p.b_re,
        "b_im" => &mut p.b_im,
        "c_re" => &mut p.c_re,
        "c_im" => &mut p.c_im,
        "d" => &mut p.d,
        _ => unreachable!("{name}"),
    }
}

fn grad_field<'a, T>(g: &'a S4dGrads<T>, name: &str) -> &'a [T] {
    match name {
        "u" => &g.u,
        "log_dt" => &g.log_dt,
        "log_a_real" => &g.log_a_real,
        "a_imag" => &g.a_imag,
        "b_re" => &g.b_re,
        "b_im" => &g.b_im,
        "c_re" => &g.c_re,
        "c_im" => &g.c_im,
        "d" => &g.d,
        _ => unreachable!("{name}"),
    }
}

fn check_all_grads<T: Float, U: Float>(
    tag: &str,
    got: &S4dGrads<T>,
    want: &S4dGrads<U>,
    atol: f64,
    rtol: f64,
) {
    for name in std::iter::once("u").chain(FIELDS) {
        let w = grad_field(want, name);
        // Tolerances scaled by the field's largest gradient.
        let scale = max_abs(w).max(1e-3);
        assert_close(
            &format!("d{name} {tag}"),
            grad_field(got, name),
            w,
            atol * scale,
            rtol,
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Conv,
    Recurrent,
}

fn forward(mode: Mode, p: &S4dParams<f64>, u: &[f64], batch: usize, len: usize) -> Vec<f64> {
    match mode {
        Mode::Conv => s4d_forward_conv(p, u, batch, len).unwrap(),
        Mode::Recurrent => s4d_forward_recurrent(p, u, batch, len).unwrap().y,
    }
}

fn backward<T: FftFloat>(
    mode: Mode,
    p: &S4dParams<T>,
    u: &[T],
    dy: &[T],
    batch: usize,
    len: usize,
) -> S4dGrads<T> {
    match mode {
        Mode::Conv => s4d_backward_conv(p, u, dy, batch, len).unwrap(),
        Mode::Recurrent => s4d_backward_recurrent(p, u, dy, batch, len).unwrap(),
    }
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn init_follows_s4d_py() {
    let (h, n) = (64, 64);
    let real = S4dParams::<f64>::init(S4dInit::Real, h, n, 1).unwrap();
    assert_eq!((real.modes, real.mode_factor()), (n, 1.0));
    let lin = S4dParams::<f64>::init(S4dInit::Lin, h, n, 1).unwrap();
    assert_eq!((lin.modes, lin.mode_factor()), (n / 2, 2.0));
    for p in [&real, &lin] {
        p.validate("test").unwrap();
        assert!(p.b_re.iter().all(|&x| x == 1.0) && p.b_im.iter().all(|&x| x == 0.0));
        for &l in &p.log_dt {
            assert!((0.001f64.ln()..0.1f64.ln()).contains(&l), "log_dt {l}");
        }
        // Δ spread over the whole range, log-uniformly.
        let mean = p.log_dt.iter().sum::<f64>() / h as f64;
        assert!((mean - (0.001f64 * 0.1).ln() / 2.0).abs() < 0.5, "{mean}");
    }
    for ch in 0..h {
        for m in 0..n {
            let i = ch * n + m;
            assert!((-real.log_a_real[i].exp() + (m as f64 + 1.0)).abs() < 1e-12);
            assert_eq!((real.a_imag[i], real.c_im[i]), (0.0, 0.0));
        }
        for m in 0..n / 2 {
            let i = ch * n / 2 + m;
            assert!((lin.log_a_real[i].exp() - 0.5).abs() < 1e-15);
            assert!((lin.a_imag[i] - std::f64::consts::PI * m as f64).abs() < 1e-12);
        }
    }
    let var = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64;
    assert!((var(&real.c_re) - 1.0).abs() < 0.1, "{}", var(&real.c_re));
    assert!((var(&lin.c_re) - 0.5).abs() < 0.05, "{}", var(&lin.c_re));
    assert!((var(&lin.c_im) - 0.5).abs() < 0.05, "{}", var(&lin.c_im));
    // Reproducible per seed, different across seeds.
    assert_eq!(
        real,
        S4dParams::<f64>::init(S4dInit::Real, h, n, 1).unwrap()
    );
    assert_ne!(
        real.c_re,
        S4dParams::<f64>::init(S4dInit::Real, h, n, 2).unwrap().c_re
    );
    assert!(S4dParams::<f32>::init(S4dInit::Lin, 3, 5, 0).is_err());
    assert!(S4dParams::<f32>::init(S4dInit::Real, 0, 4, 0).is_err());
}

/// Requirement (1): the convolution and the recurrence are the same
/// function, in f64 to rounding and in f32 to a few 1e-5 of max |y|, at
/// lengths up to 4096 (long memory: Δ down to 0.001 with A = -1).
#[test]
fn convolution_and_recurrence_agree_up_to_4096() {
    let (batch, channels, n) = (2, 7, 16);
    // [conv, recurrence] over all lengths, and at len = 4096 alone.
    let mut worst32 = [0.0f64; 2];
    let mut worst32_ssm = [0.0f64; 2];
    let mut at4096 = [0.0f64; 2];
    for (ki, kind) in [S4dInit::Real, S4dInit::Lin].into_iter().enumerate() {
        let mut p = random_params(kind, channels, n, 10 + ki as u64, None);
        // One channel with the slowest decay of the init range.
        p.log_dt[0] = 0.001f64.ln();
        let p32 = p.cast::<f32>();
        for len in [1, 2, 3, 17, 100, 1000, 4096] {
            let u = random_vec::<f64>(batch * len * channels, len as u64);
            let u32v = to_f32(&u);
            let conv = s4d_forward_conv(&p, &u, batch, len).unwrap();
            let rec = s4d_forward_recurrent(&p, &u, batch, len).unwrap().y;
            let tag = format!("{kind:?} len={len}");
            assert_rel_max(&format!("f64 recurrence vs conv {tag}"), &rec, &conv, 1e-12);

            // The SSM part alone (y - D u): D u dominates max |y| otherwise.
            let ssm: Vec<f64> = conv
                .iter()
                .zip(&u)
                .enumerate()
                .map(|(i, (y, x))| y - p.d[i % channels] * x)
                .collect();
            let conv32 = s4d_forward_conv(&p32, &u32v, batch, len).unwrap();
            let rec32 = s4d_forward_recurrent(&p32, &u32v, batch, len).unwrap().y;
            for (mi, got) in [&conv32, &rec32].into_iter().enumerate() {
                let e = assert_rel_max(&format!("f32 mode {mi} {tag}"), got, &conv, 3e-5);
                worst32[mi] = worst32[mi].max(e);
                let e_ssm = max_abs_diff(got, &conv) / max_abs(&ssm);
                assert!(
                    e_ssm < 5e-5,
                    "f32 mode {mi} {tag}: SSM part error {e_ssm:.3e}"
                );
                worst32_ssm[mi] = worst32_ssm[mi].max(e_ssm);
                if len == 4096 {
                    at4096[mi] = at4096[mi].max(e);
                }
            }
        }
    }
    eprintln!(
        "f32 vs f64, max error / max|y|: conv {:.2e}, recurrence {:.2e} (len 4096: {:.2e}, {:.2e}); \
         / max|y - Du|: conv {:.2e}, recurrence {:.2e}",
        worst32[0], worst32[1], at4096[0], at4096[1], worst32_ssm[0], worst32_ssm[1]
    );
}

/// Requirement (2): both fast modes and the blocked kernel against a plain
/// double loop written from the equations.
#[test]
fn fast_modes_match_literal_double_loop() {
    let mut seed = 100;
    for kind in [S4dInit::Real, S4dInit::Lin] {
        for &(batch, len, channels, n) in &[
            (1, 1, 1, 2),
            (2, 5, 3, 4),
            (3, 64, 5, 8),
            (2, 65, 3, 6),
            (2, 300, 5, 16),
            (1, 1000, 3, 16),
        ] {
            seed += 1;
            let p = random_params(kind, channels, n, seed, Some((0.001, 0.5)));
            let u = random_vec::<f64>(batch * len * channels, seed);
            let tag = format!("{kind:?} b={batch} len={len} ch={channels} N={n}");
            let k_want = literal_kernel(&p, len);
            let k = s4d_kernel(&p, len).unwrap();
            assert_rel_max(&format!("kernel {tag}"), &k, &k_want, 1e-12);
            let want = literal_forward(&p, &u, batch, len);
            for mode in [Mode::Conv, Mode::Recurrent] {
                let got = forward(mode, &p, &u, batch, len);
                assert_rel_max(&format!("{mode:?} f64 {tag}"), &got, &want, 1e-12);
            }
            let p32 = p.cast::<f32>();
            let u32v = to_f32(&u);
            assert_rel_max(
                &format!("kernel f32 {tag}"),
                &s4d_kernel(&p32, len).unwrap(),
                &k_want,
                1e-5,
            );
            let conv32 = s4d_forward_conv(&p32, &u32v, batch, len).unwrap();
            assert_rel_max(&format!("conv f32 {tag}"), &conv32, &want, 3e-5);
            let rec32 = s4d_forward_recurrent(&p32, &u32v, batch, len).unwrap().y;
            assert_rel_max(&format!("recurrence f32 {tag}"), &rec32, &want, 3e-5);
        }
    }
}

/// One real mode with B = C = 1 is an exponential moving average:
/// h_t = e^{-Δ} h_{t-1} + (1 - e^{-Δ}) u_t, y = h + D u.
#[test]
fn one_real_mode_is_an_exponential_moving_average() {
    let (len, channels) = (200, 3);
    let mut p = S4dParams::<f64>::init(S4dInit::Real, channels, 1, 5).unwrap();
    p.c_re.fill(1.0);
    let u = random_vec::<f64>(len * channels, 6);
    let mut want = vec![0.0; len * channels];
    for h in 0..channels {
        let a = (-p.log_dt[h].exp()).exp();
        let mut s = 0.0;
        for t in 0..len {
            let i = t * channels + h;
            s = a * s + (1.0 - a) * u[i];
            want[i] = s + p.d[h] * u[i];
        }
    }
    for mode in [Mode::Conv, Mode::Recurrent] {
        let got = forward(mode, &p, &u, 1, len);
        assert_rel_max(&format!("{mode:?}"), &got, &want, 1e-12);
    }
}

/// Requirement (3): both backward passes against central differences of
/// their own forward, every parameter and u, in f64. Lengths cross the
/// Vandermonde block (64).
#[test]
fn backward_matches_central_finite_differences() {
    let mut seed = 300;
    for kind in [S4dInit::Real, S4dInit::Lin] {
        for &(batch, len, channels, n) in &[(1, 1, 1, 2), (2, 7, 3, 4), (1, 70, 2, 4)] {
            for mode in [Mode::Conv, Mode::Recurrent] {
                seed += 1;
                let mut p = random_params(kind, channels, n, seed, Some((0.05, 0.5)));
                let mut u = random_vec::<f64>(batch * len * channels, seed + 1);
                let g = random_vec::<f64>(batch * len * channels, seed + 2);
                let grads = backward(mode, &p, &u, &g, batch, len);
                let tag = format!("{mode:?} {kind:?} b={batch} len={len} ch={channels} N={n}");
                let eps = 1e-6;
                let check = |name: &str, fd: &[f64]| {
                    let got = grad_field(&grads, name);
                    let scale = max_abs(fd);
                    assert!(scale > 1e-6, "d{name} {tag}: FD gradient too small to test");
                    assert_close(
                        &format!("d{name} vs FD {tag}"),
                        got,
                        fd,
                        1e-9 + 1e-7 * scale,
                        1e-5,
                    );
                };
                // u
                let mut fd = vec![0.0; u.len()];
                for i in 0..u.len() {
                    let orig = u[i];
                    u[i] = orig + eps;
                    let lp = dot(&forward(mode, &p, &u, batch, len), &g);
                    u[i] = orig - eps;
                    let lm = dot(&forward(mode, &p, &u, batch, len), &g);
                    u[i] = orig;
                    fd[i] = (lp - lm) / (2.0 * eps);
                }
                check("u", &fd);
                for name in FIELDS {
                    let n_el = field_mut(&mut p, name).len();
                    let mut fd = vec![0.0; n_el];
                    for (i, v) in fd.iter_mut().enumerate() {
                        let orig = field_mut(&mut p, name)[i];
                        field_mut(&mut p, name)[i] = orig + eps;
                        let lp = dot(&forward(mode, &p, &u, batch, len), &g);
                        field_mut(&mut p, name)[i] = orig - eps;
                        let lm = dot(&forward(mode, &p, &u, batch, len), &g);
                        field_mut(&mut p, name)[i] = orig;
                        *v = (lp - lm) / (2.0 * eps);
                    }
                    check(name, &fd);
                }
            }
        }
    }
}

/// Requirement (4): the two backward passes agree (f64 tightly, f32 with
/// either mode against the f64 result), at lengths where the FFT
/// correlations and the adjoint scan do real work.
#[test]
fn convolution_and_recurrence_backward_agree() {
    let mut seed = 500;
    for kind in [S4dInit::Real, S4dInit::Lin] {
        for &(batch, len, channels, n) in &[(2, 300, 5, 16), (1, 1000, 3, 8), (3, 129, 2, 2)] {
            seed += 1;
            let p = random_params(kind, channels, n, seed, None);
            let u = random_vec::<f64>(batch * len * channels, seed + 1);
            let dy = random_vec::<f64>(batch * len * channels, seed + 2);
            let conv = backward(Mode::Conv, &p, &u, &dy, batch, len);
            let rec = backward(Mode::Recurrent, &p, &u, &dy, batch, len);
            let tag = format!("{kind:?} b={batch} len={len} ch={channels} N={n}");
            check_all_grads(
                &format!("f64 conv vs recurrence {tag}"),
                &conv,
                &rec,
                1e-10,
                1e-9,
            );

            let (p32, u32v, dy32) = (p.cast::<f32>(), to_f32(&u), to_f32(&dy));
            for mode in [Mode::Conv, Mode::Recurrent] {
                let g32 = backward(mode, &p32, &u32v, &dy32, batch, len);
                check_all_grads(
                    &format!("f32 {mode:?} vs f64 {tag}"),
                    &g32,
                    &rec,
                    1e-4,
                    1e-3,
                );
            }
        }
    }
}

/// Requirement (5): s4d_step repeated from zero gives the whole-sequence
/// recurrence and the convolution; a prefill's final state continues into
/// steps exactly as the whole sequence would.
#[test]
fn steps_match_the_whole_sequence() {
    let (batch, len, channels) = (3, 150, 5);
    for (i, kind) in [S4dInit::Real, S4dInit::Lin].into_iter().enumerate() {
        let p = random_params(kind, channels, 8, 700 + i as u64, None);
        let u = random_vec::<f64>(batch * len * channels, 800 + i as u64);
        let rec = s4d_forward_recurrent(&p, &u, batch, len).unwrap();
        let conv = s4d_forward_conv(&p, &u, batch, len).unwrap();

        let token = |t: usize| -> Vec<f64> {
            (0..batch)
                .flat_map(|b| u[(b * len + t) * channels..(b * len + t + 1) * channels].to_vec())
                .collect()
        };
        let mut state = vec![0.0; p.state_len(batch)];
        let mut stepped = vec![0.0; batch * len * channels];
        for t in 0..len {
            let y = s4d_step(&p, &mut state, &token(t), batch).unwrap();
            for b in 0..batch {
                stepped[(b * len + t) * channels..(b * len + t + 1) * channels]
                    .copy_from_slice(&y[b * channels..(b + 1) * channels]);
            }
        }
        assert_rel_max(
            &format!("{kind:?} steps vs recurrence"),
            &stepped,
            &rec.y,
            1e-13,
        );
        assert_rel_max(&format!("{kind:?} steps vs conv"), &stepped, &conv, 1e-12);
        assert_rel_max(
            &format!("{kind:?} final state"),
            &state,
            &rec.final_state,
            1e-13,
        );

        // Prefill the first `cut` tokens, then decode the rest.
        let cut = 97;
        let prefix: Vec<f64> = (0..batch)
            .flat_map(|b| u[b * len * channels..(b * len + cut) * channels].to_vec())
            .collect();
        let pre = s4d_forward_recurrent(&p, &prefix, batch, cut).unwrap();
        let disc = p.discretize().unwrap();
        let mut state = pre.final_state.clone();
        for t in cut..len {
            let y = disc.step(&mut state, &token(t), batch).unwrap();
            for b in 0..batch {
                let want = &rec.y[(b * len + t) * channels..(b * len + t + 1) * channels];
                assert_rel_max(
                    &format!("{kind:?} decode t={t} b={b}"),
                    &y[b * channels..(b + 1) * channels],
                    want,
                    1e-12,
                );
            }
        }
    }
}

/// Requirement (6): malformed inputs are errors naming the tensor.
#[test]
fn shape_errors_name_the_tensor() {
    let (batch, len, channels) = (2, 5, 3);
    let p = S4dParams::<f32>::init(S4dInit::Lin, channels, 4, 1).unwrap();
    let u = vec![0.0f32; batch * len * channels];
    let short = vec![0.0f32; 29];

    let err = s4d_forward_conv(&p, &short, batch, len).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Shape { tensor: "u", .. }), "{msg}");
    assert!(
        msg.contains("batch=2, len=5, channels=3") && msg.contains("has 29"),
        "{msg}"
    );
    let msg = s4d_forward_recurrent(&p, &short, batch, len)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`u`") && msg.contains("s4d_forward_recurrent"),
        "{msg}"
    );
    for mode in [Mode::Conv, Mode::Recurrent] {
        let err = match mode {
            Mode::Conv => s4d_backward_conv(&p, &u, &short, batch, len),
            Mode::Recurrent => s4d_backward_recurrent(&p, &u, &short, batch, len),
        }
        .unwrap_err();
        assert!(matches!(err, Error::Shape { tensor: "dy", .. }), "{err}");
    }

    let mut bad = p.clone();
    bad.b_im.pop();
    let err = s4d_forward_conv(&bad, &u, batch, len).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Shape { tensor: "b_im", .. }), "{msg}");
    assert!(msg.contains("channels=3, modes=2"), "{msg}");
    assert!(s4d_kernel(&bad, 4).is_err());
    assert!(bad.discretize().is_err());

    let mut state = vec![0.0f32; p.state_len(batch) - 1];
    let u_t = vec![0.0f32; batch * channels];
    let err = s4d_step(&p, &mut state, &u_t, batch).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            Error::Shape {
                tensor: "state",
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("modes=2, 2=2"), "{msg}");
    let mut state = vec![0.0f32; p.state_len(batch)];
    let err = s4d_step(&p, &mut state, &u_t[1..], batch).unwrap_err();
    assert!(matches!(err, Error::Shape { tensor: "u_t", .. }), "{err}");

    assert!(s4d_forward_conv(&p, &[], batch, 0).is_err());
    assert!(s4d_forward_recurrent(&p, &[], 0, len).is_err());
    assert!(s4d_kernel(&p, 0).is_err());
}
