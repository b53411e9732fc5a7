//! S4D, the diagonal linear time-invariant (LTI) state space model of
//! docs/DESIGN.md §3 (reference: `state-spaces/s4: models/s4/s4d.py`), the
//! baseline that the selective scan is compared with. Both of its forms,
//! the convolution and the recurrence, with their backward passes.
//!
//! Per channel h (H channels) and mode n (M modes), complex arithmetic:
//!
//! ```text
//! Δ        = exp(log_dt[h])                          learnable step, per channel
//! A_n      = -exp(log_a_real[h,n]) + i·a_imag[h,n]
//! B_n      = b_re[h,n] + i·b_im[h,n],   C_n = c_re[h,n] + i·c_im[h,n]
//! Ā_n      = exp(Δ A_n)                              zero-order hold
//! B̃_n      = B_n (exp(Δ A_n) - 1) / A_n  =  B_n Δ φ(Δ A_n),  φ(x) = (e^x - 1)/x
//! C̃_n      = C_n B̃_n
//!
//! recurrence:   h_t,n = Ā_n h_{t-1},n + B̃_n u_t        h_{-1} = 0
//!               y_t   = f · Re Σ_n C_n h_t,n + D u_t
//! convolution:  K_l   = f · Re Σ_n C̃_n Ā_n^l          l = 0..L-1
//!               y_t   = Σ_{l≤t} K_l u_{t-l} + D u_t
//! ```
//!
//! f is the mode factor ([`S4dInit::mode_factor`]): 1 for S4D-Real (M = N
//! modes, A_n = -(n+1)), 2 for S4D-Lin (M = N/2 modes, A_n = -1/2 + iπn, each
//! mode standing for a conjugate pair whose sum is twice the real part).
//! Expanding h_t gives C_n h_t,n = Σ_l C̃_n Ā_n^l u_{t-l}: the two forms are
//! the same function, and the tests check that they agree.
//!
//! # Memory layout (row-major, last index fastest)
//!
//! ```text
//! u, y, du, dy                       (batch, len, channels)   token-major, as the scan
//! log_dt, d                          (channels)
//! log_a_real, a_imag,
//! b_re, b_im, c_re, c_im             (channels, modes)        real and imaginary parts
//!                                                             in separate arrays
//! K (s4d_kernel)                     (channels, len)
//! recurrent state                    (batch, channels, modes, 2)  complex, interleaved
//!                                                             (re, im) per mode
//! ```
//!
//! # Convolution mode
//!
//! The kernel is a Vandermonde product. Ā_n^l is not formed by l repeated
//! multiplications (in f32 the rounding of Ā would grow linearly with l):
//! with a block of B = [`VANDERMONDE_BLOCK`] positions, l = kB + j, and
//!
//! ```text
//! K_{kB+j} = Σ_n Re(W_{n,k} Q_{n,j}),   W_{n,k} = f C̃_n exp(Δ A_n kB),  Q_{n,j} = exp(Δ A_n j)
//! ```
//!
//! where both tables are evaluated directly in f64 (exp, cos, sin of the
//! exact exponent) and rounded once to T; the remaining work is a real
//! matrix product (L/B × 2M)·(2M × B) per channel in T. The convolution is
//! y = irfft(rfft(u, 2L) · rfft(K, 2L))[:L] + D u with `realfft` in T
//! (f32 or f64), a plan per call shared by all workers; each worker
//! gathers one (batch, channel) column of u into its own buffer.
//!
//! Backward, with dK_l = Σ_b Σ_t dy_t u_{t-l} (a correlation, summed over
//! the batch in the frequency domain: irfft(Σ_b conj(rfft u)·rfft dy)) and
//! du_t = Σ_l K_l dy_{t+l} + D dy_t (irfft(conj(rfft K)·rfft dy)). Through
//! the Vandermonde product, writing p_n = Δ A_n and g for the gradient
//! ∂L/∂Re + i ∂L/∂Im of a complex quantity (for a holomorphic F of p, the
//! gradient of Σ dK·Re F is Σ dK·conj(∂F/∂p)):
//!
//! ```text
//! S0_n = Σ_l dK_l e^{p_n l},   S1_n = Σ_l l dK_l e^{p_n l}   (same blocked tables)
//! g_C̃_n = f conj(S0_n),        g_p_n = f conj(C̃_n S1_n)
//! ```
//!
//! # Recurrence mode
//!
//! One worker per (batch, channel) runs h_t = Ā h_{t-1} + B̃ u_t in T.
//! The backward is the reverse-time adjoint scan, per channel over the
//! batch, with the forward states of one sequence kept in a worker buffer
//! of len × modes complex values:
//!
//! ```text
//! λ_t   = f dy_t conj(C) + conj(Ā) λ_{t+1}        (λ_L = 0)
//! g_C  += f dy_t conj(h_t),   g_Ā += λ_t conj(h_{t-1}),   g_B̃ += λ_t u_t
//! du_t  = Σ_n Re(conj(λ_t,n) B̃_n) + D dy_t
//! ```
//!
//! # Common chain rule (both modes, per channel, in f64)
//!
//! With E_n = Δ φ(p_n) (so B̃ = B E, C̃ = C B E), ∂E/∂Δ = Ā, ∂E/∂A = Δ² φ'(p),
//! ∂p/∂Δ = A, ∂p/∂A = Δ:
//!
//! ```text
//! g_p   = g_Ā conj(Ā)                             (recurrence; the convolution has g_p)
//! g_E   = g_B̃ conj(B)  or  g_C̃ conj(C B)
//! g_B   = g_B̃ conj(E)  or  g_C̃ conj(C E),   g_C (convolution) = g_C̃ conj(B E)
//! g_A   = Δ g_p + conj(Δ² φ'(p)) g_E
//! dΔ    = Σ_n Re(conj(g_p) A + conj(g_E) Ā),   dlog_dt = Δ dΔ
//! dlog_a_real = -exp(log_a_real) Re g_A,      da_imag = Im g_A
//! ```
//!
//! The discretisation (Ā, φ, φ') is evaluated in f64 with a cancellation-free
//! e^x - 1 for complex x, so that small Δ|A| (Δ = 0.001, A = -1) loses no
//! digits.

use std::sync::Arc;

use rayon::prelude::*;
use realfft::num_complex::{Complex, Complex64};
use realfft::{ComplexToReal, FftNum, RealFftPlanner, RealToComplex};

use crate::error::{check_len, invalid, Result};
use crate::float::Float;
use crate::rng::Rng;

/// Positions per block of the Vandermonde product (see the module
/// documentation): Ā^(kB + j) = Ā^(kB) · Ā^j with both factors exact.
pub const VANDERMONDE_BLOCK: usize = 64;

/// The scalar types of the convolution mode: those `realfft` transforms
/// (f32 and f64), so that the FFT runs in the kernels' own precision.
pub trait FftFloat: Float + FftNum {}
impl<T: Float + FftNum> FftFloat for T {}

/// The two initialisations of `s4d.py` (and how the modes are read out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S4dInit {
    /// S4D-Real: M = N real modes A_n = -(n+1), real C, output Re Σ (factor 1).
    Real,
    /// S4D-Lin: M = N/2 complex modes A_n = -1/2 + iπn with their conjugate
    /// pairs implied, output 2 Re Σ (factor 2).
    Lin,
}

impl S4dInit {
    /// f in y = f · Re Σ_n C_n h_n: 1 for Real, 2 for Lin.
    pub fn mode_factor(self) -> f64 {
        match self {
            S4dInit::Real => 1.0,
            S4dInit::Lin => 2.0,
        }
    }

    /// Modes stored for a state size N: N (Real) or N/2 (Lin).
    pub fn modes(self, state_size: usize) -> usize {
        match self {
            S4dInit::Real => state_size,
            S4dInit::Lin => state_size / 2,
        }
    }
}

/// Parameters of an S4D layer, in the layout of the module documentation.
/// Every field is learnable; `kind` fixes the mode factor.
#[derive(Clone, Debug, PartialEq)]
pub struct S4dParams<T> {
    pub kind: S4dInit,
    pub channels: usize,
    pub modes: usize,
    /// (channels): Δ = exp(log_dt).
    pub log_dt: Vec<T>,
    /// (channels, modes): Re A = -exp(log_a_real).
    pub log_a_real: Vec<T>,
    /// (channels, modes): Im A.
    pub a_imag: Vec<T>,
    /// (channels, modes)
    pub b_re: Vec<T>,
    /// (channels, modes)
    pub b_im: Vec<T>,
    /// (channels, modes)
    pub c_re: Vec<T>,
    /// (channels, modes)
    pub c_im: Vec<T>,
    /// (channels): the skip connection D.
    pub d: Vec<T>,
}

/// Gradients of Σ dy·y with respect to every parameter and the input, each
/// in the layout of what it differentiates.
#[derive(Clone, Debug, PartialEq)]
pub struct S4dGrads<T> {
    /// (batch, len, channels)
    pub u: Vec<T>,
    /// (channels)
    pub log_dt: Vec<T>,
    /// (channels, modes)
    pub log_a_real: Vec<T>,
    pub a_imag: Vec<T>,
    pub b_re: Vec<T>,
    pub b_im: Vec<T>,
    pub c_re: Vec<T>,
    pub c_im: Vec<T>,
    /// (channels)
    pub d: Vec<T>,
}

/// Output of [`s4d_forward_recurrent`].
#[derive(Clone, Debug, PartialEq)]
pub struct S4dRecurrentOutput<T> {
    /// (batch, len, channels)
    pub y: Vec<T>,
    /// (batch, channels, modes, 2): h after the last position, ready for
    /// [`s4d_step`] (prefill, then decode).
    pub final_state: Vec<T>,
}

impl<T: Float> S4dParams<T> {
    /// The initialisation of `s4d.py` for `channels` channels and state size
    /// N = `state_size`: log_dt ~ U(ln 0.001, ln 0.1); B = 1; D ~ N(0, 1);
    /// Real: A_n = -(n+1), C real ~ N(0, 1); Lin (N even): A_n = -1/2 + iπn,
    /// C complex normal with variance 1/2 per part (`torch.randn(cfloat)`).
    pub fn init(kind: S4dInit, channels: usize, state_size: usize, seed: u64) -> Result<Self> {
        const OP: &str = "S4dParams::init";
        if channels == 0 {
            return Err(invalid(OP, "channels must be at least 1"));
        }
        match kind {
            S4dInit::Real if state_size == 0 => {
                return Err(invalid(OP, "S4D-Real needs state_size >= 1"));
            }
            S4dInit::Lin if state_size < 2 || !state_size.is_multiple_of(2) => {
                return Err(invalid(
                    OP,
                    format!(
                        "S4D-Lin needs an even state_size >= 2 (N/2 conjugate pairs), got {state_size}"
                    ),
                ));
            }
            _ => {}
        }
        let modes = kind.modes(state_size);
        let hm = channels * modes;
        let mut rng = Rng::new(seed);
        let log_dt = rng.vec(channels, |r| r.uniform_in(0.001f64.ln(), 0.1f64.ln()));
        let mode = |i: usize| (i % modes) as f64;
        let (log_a_real, a_imag, c_re, c_im): (Vec<T>, Vec<T>, Vec<T>, Vec<T>) = match kind {
            S4dInit::Real => (
                (0..hm).map(|i| T::from_f64((mode(i) + 1.0).ln())).collect(),
                vec![T::ZERO; hm],
                rng.vec(hm, |r| r.normal()),
                vec![T::ZERO; hm],
            ),
            S4dInit::Lin => {
                let sd = 0.5f64.sqrt();
                let mut c_re = Vec::with_capacity(hm);
                let mut c_im = Vec::with_capacity(hm);
                for _ in 0..hm {
                    c_re.push(T::from_f64(rng.normal() * sd));
                    c_im.push(T::from_f64(rng.normal() * sd));
                }
                (
                    vec![T::from_f64(0.5f64.ln()); hm],
                    (0..hm)
                        .map(|i| T::from_f64(std::f64::consts::PI * mode(i)))
                        .collect(),
                    c_re,
                    c_im,
                )
            }
        };
        let d = rng.vec(channels, |r| r.normal());
        Ok(Self {
            kind,
            channels,
            modes,
            log_dt,
            log_a_real,
            a_imag,
            b_re: vec![T::ONE; hm],
            b_im: vec![T::ZERO; hm],
            c_re,
            c_im,
            d,
        })
    }

    /// f in y = f · Re Σ_n C_n h_n.
    pub fn mode_factor(&self) -> f64 {
        self.kind.mode_factor()
    }

    /// Elements of a recurrent state for `batch` sequences:
    /// batch · channels · modes · 2.
    pub fn state_len(&self, batch: usize) -> usize {
        batch * self.channels * self.modes * 2
    }

    /// Checks the sizes of every field, naming the first that does not fit.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        if self.channels == 0 {
            return Err(invalid(op, "channels must be at least 1"));
        }
        if self.modes == 0 {
            return Err(invalid(op, "modes must be at least 1"));
        }
        let ch = [("channels", self.channels)];
        let cm = [("channels", self.channels), ("modes", self.modes)];
        check_len(op, "log_dt", &self.log_dt, &ch)?;
        check_len(op, "log_a_real", &self.log_a_real, &cm)?;
        check_len(op, "a_imag", &self.a_imag, &cm)?;
        check_len(op, "b_re", &self.b_re, &cm)?;
        check_len(op, "b_im", &self.b_im, &cm)?;
        check_len(op, "c_re", &self.c_re, &cm)?;
        check_len(op, "c_im", &self.c_im, &cm)?;
        check_len(op, "d", &self.d, &ch)?;
        Ok(())
    }

    /// The same parameters in another scalar type.
    pub fn cast<U: Float>(&self) -> S4dParams<U> {
        let conv = |v: &[T]| v.iter().map(|x| U::from_f64(x.to_f64())).collect();
        S4dParams {
            kind: self.kind,
            channels: self.channels,
            modes: self.modes,
            log_dt: conv(&self.log_dt),
            log_a_real: conv(&self.log_a_real),
            a_imag: conv(&self.a_imag),
            b_re: conv(&self.b_re),
            b_im: conv(&self.b_im),
            c_re: conv(&self.c_re),
            c_im: conv(&self.c_im),
            d: conv(&self.d),
        }
    }

    /// Ā, B̃ and f·C rounded to T, for step-by-step inference.
    pub fn discretize(&self) -> Result<S4dDiscrete<T>> {
        self.validate("S4dParams::discretize")?;
        Ok(S4dDiscrete::new(self))
    }
}

/// The discretised recurrence of an S4D layer: what each step needs,
/// computed once (in f64, rounded to T) instead of at every token.
#[derive(Clone, Debug, PartialEq)]
pub struct S4dDiscrete<T> {
    channels: usize,
    modes: usize,
    /// Ā, (channels, modes, 2)
    a_bar: Vec<T>,
    /// B̃, (channels, modes, 2)
    b_bar: Vec<T>,
    /// f · C, (channels, modes, 2)
    c_out: Vec<T>,
    /// (channels)
    d: Vec<T>,
}

impl<T: Float> S4dDiscrete<T> {
    fn new(params: &S4dParams<T>) -> Self {
        let m = params.modes;
        let f = params.mode_factor();
        let size = params.channels * m * 2;
        let mut s = Self {
            channels: params.channels,
            modes: m,
            a_bar: vec![T::ZERO; size],
            b_bar: vec![T::ZERO; size],
            c_out: vec![T::ZERO; size],
            d: params.d.clone(),
        };
        for h in 0..params.channels {
            let cd = ChannelDisc::new(params, h);
            for (n, md) in cd.modes.iter().enumerate() {
                let i = (h * m + n) * 2;
                let bt = md.b * md.e;
                for (dst, v) in [
                    (&mut s.a_bar, md.z),
                    (&mut s.b_bar, bt),
                    (&mut s.c_out, md.c * f),
                ] {
                    dst[i] = T::from_f64(v.re);
                    dst[i + 1] = T::from_f64(v.im);
                }
            }
        }
        s
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn modes(&self) -> usize {
        self.modes
    }

    /// One token for every sequence of the batch: `state` (batch, channels,
    /// modes, 2) is advanced in place, `u_t` is (batch, channels), the
    /// result y_t is (batch, channels).
    pub fn step(&self, state: &mut [T], u_t: &[T], batch: usize) -> Result<Vec<T>> {
        const OP: &str = "s4d_step";
        if batch == 0 {
            return Err(invalid(OP, "batch must be at least 1"));
        }
        check_len(
            OP,
            "state",
            state,
            &[
                ("batch", batch),
                ("channels", self.channels),
                ("modes", self.modes),
                ("2", 2),
            ],
        )?;
        check_len(
            OP,
            "u_t",
            u_t,
            &[("batch", batch), ("channels", self.channels)],
        )?;
        let per_channel = 2 * self.modes;
        let mut y = vec![T::ZERO; batch * self.channels];
        for (i, (h, y)) in state.chunks_mut(per_channel).zip(y.iter_mut()).enumerate() {
            *y = self.advance(i % self.channels, h, u_t[i]);
        }
        Ok(y)
    }

    /// h ← Ā h + B̃ u for channel `c`'s modes; returns f Re Σ C h + D u.
    #[inline(always)]
    fn advance(&self, c: usize, h: &mut [T], u: T) -> T {
        let base = c * 2 * self.modes;
        let range = base..base + 2 * self.modes;
        let (za, bb, co) = (
            &self.a_bar[range.clone()],
            &self.b_bar[range.clone()],
            &self.c_out[range],
        );
        let mut y = T::ZERO;
        for n in 0..self.modes {
            let (re, im) = (2 * n, 2 * n + 1);
            let (hr, hi) = (h[re], h[im]);
            let nr = za[re] * hr - za[im] * hi + bb[re] * u;
            let ni = za[re] * hi + za[im] * hr + bb[im] * u;
            h[re] = nr;
            h[im] = ni;
            y += co[re] * nr - co[im] * ni;
        }
        y + self.d[c] * u
    }
}

// ---------------------------------------------------------------------------
// Complex helpers in f64.

fn cexp(x: Complex64) -> Complex64 {
    let r = x.re.exp();
    Complex64::new(r * x.im.cos(), r * x.im.sin())
}

/// e^x - 1 without cancellation for small |x|:
/// Re = expm1(a) cos b - 2 sin²(b/2), Im = e^a sin b.
fn cexpm1(x: Complex64) -> Complex64 {
    let s = (0.5 * x.im).sin();
    Complex64::new(
        x.re.exp_m1() * x.im.cos() - 2.0 * s * s,
        x.re.exp() * x.im.sin(),
    )
}

/// φ(x) = (e^x - 1)/x, 1 at 0.
fn phi(x: Complex64) -> Complex64 {
    if x.re == 0.0 && x.im == 0.0 {
        Complex64::new(1.0, 0.0)
    } else {
        cexpm1(x) / x
    }
}

/// φ'(x) = (x e^x - e^x + 1)/x²; by its Taylor series Σ_k k x^(k-1)/(k+1)!
/// for |x| < 1/2, where the direct form cancels.
fn phi_grad(x: Complex64) -> Complex64 {
    if x.norm_sqr() < 0.25 {
        // Horner over k = 18..1 of c_k = k/(k+1)!; the first term left out
        // is about 0.5^18 · 19/20! ≈ 3e-23.
        const K: usize = 18;
        let mut fact = [1.0f64; K + 2];
        for i in 1..K + 2 {
            fact[i] = fact[i - 1] * i as f64;
        }
        let mut acc = Complex64::new(K as f64 / fact[K + 1], 0.0);
        for k in (1..K).rev() {
            acc = acc * x + k as f64 / fact[k + 1];
        }
        acc
    } else {
        (x * cexp(x) - cexpm1(x)) / (x * x)
    }
}

/// Discretisation of one mode, in f64.
struct ModeDisc {
    a: Complex64,
    /// p = Δ A
    p: Complex64,
    /// Ā = e^p
    z: Complex64,
    /// E = (e^p - 1)/A = Δ φ(p)
    e: Complex64,
    /// ∂E/∂A = Δ² φ'(p)
    de_da: Complex64,
    b: Complex64,
    c: Complex64,
    /// C̃ = C B E
    c_tilde: Complex64,
}

/// Discretisation of one channel, in f64.
struct ChannelDisc {
    dt: f64,
    modes: Vec<ModeDisc>,
}

impl ChannelDisc {
    fn new<T: Float>(params: &S4dParams<T>, h: usize) -> Self {
        let dt = params.log_dt[h].to_f64().exp();
        let m = params.modes;
        let modes = (h * m..(h + 1) * m)
            .map(|i| {
                let a = Complex64::new(
                    -params.log_a_real[i].to_f64().exp(),
                    params.a_imag[i].to_f64(),
                );
                let p = a * dt;
                let e = phi(p) * dt;
                let b = Complex64::new(params.b_re[i].to_f64(), params.b_im[i].to_f64());
                let c = Complex64::new(params.c_re[i].to_f64(), params.c_im[i].to_f64());
                ModeDisc {
                    a,
                    p,
                    z: cexp(p),
                    e,
                    de_da: phi_grad(p) * (dt * dt),
                    b,
                    c,
                    c_tilde: c * b * e,
                }
            })
            .collect();
        Self { dt, modes }
    }
}

/// Per-channel parameter gradients, in f64 until assembled.
struct ChannelGrads {
    log_dt: f64,
    d: f64,
    /// (modes) each
    log_a_real: Vec<f64>,
    a_imag: Vec<f64>,
    b: Vec<Complex64>,
    c: Vec<Complex64>,
}

/// The chain rule common to both modes (module documentation), from the
/// gradients with respect to p = ΔA, E, B and C of every mode.
fn chain_channel(
    cd: &ChannelDisc,
    g_p: &[Complex64],
    g_e: &[Complex64],
    g_b: Vec<Complex64>,
    g_c: Vec<Complex64>,
    d_grad: f64,
) -> ChannelGrads {
    let m = cd.modes.len();
    let mut d_dt = 0.0;
    let mut log_a_real = vec![0.0; m];
    let mut a_imag = vec![0.0; m];
    for (n, md) in cd.modes.iter().enumerate() {
        d_dt += (g_p[n].conj() * md.a).re + (g_e[n].conj() * md.z).re;
        let g_a = g_p[n] * cd.dt + g_e[n] * md.de_da.conj();
        // ∂A/∂log_a_real = -exp(log_a_real) = Re A (real); ∂A/∂a_imag = i.
        log_a_real[n] = md.a.re * g_a.re;
        a_imag[n] = g_a.im;
    }
    ChannelGrads {
        log_dt: cd.dt * d_dt,
        d: d_grad,
        log_a_real,
        a_imag,
        b: g_b,
        c: g_c,
    }
}

fn assemble_grads<T: Float>(
    params: &S4dParams<T>,
    batch: usize,
    len: usize,
    du_channel_major: &[T],
    per_channel: Vec<ChannelGrads>,
) -> S4dGrads<T> {
    let hm = params.channels * params.modes;
    let mut g = S4dGrads {
        u: columns_to_tokens(du_channel_major, batch, len, params.channels, true),
        log_dt: Vec::with_capacity(params.channels),
        log_a_real: Vec::with_capacity(hm),
        a_imag: Vec::with_capacity(hm),
        b_re: Vec::with_capacity(hm),
        b_im: Vec::with_capacity(hm),
        c_re: Vec::with_capacity(hm),
        c_im: Vec::with_capacity(hm),
        d: Vec::with_capacity(params.channels),
    };
    let t = T::from_f64;
    for cg in per_channel {
        g.log_dt.push(t(cg.log_dt));
        g.d.push(t(cg.d));
        g.log_a_real.extend(cg.log_a_real.iter().map(|&x| t(x)));
        g.a_imag.extend(cg.a_imag.iter().map(|&x| t(x)));
        g.b_re.extend(cg.b.iter().map(|x| t(x.re)));
        g.b_im.extend(cg.b.iter().map(|x| t(x.im)));
        g.c_re.extend(cg.c.iter().map(|x| t(x.re)));
        g.c_im.extend(cg.c.iter().map(|x| t(x.im)));
    }
    g
}

// ---------------------------------------------------------------------------
// Layout helpers.

/// Checks the parameters, the sizes and every (batch, len, channels) tensor.
fn validate_sequence<T>(
    op: &'static str,
    params: &S4dParams<T>,
    batch: usize,
    len: usize,
    tensors: &[(&'static str, &[T])],
) -> Result<()>
where
    T: Float,
{
    params.validate(op)?;
    if batch == 0 {
        return Err(invalid(op, "batch must be at least 1"));
    }
    if len == 0 {
        return Err(invalid(op, "len must be at least 1"));
    }
    let dims = [
        ("batch", batch),
        ("len", len),
        ("channels", params.channels),
    ];
    for (name, data) in tensors {
        check_len(op, name, data, &dims)?;
    }
    Ok(())
}

/// Copies column (b, c) of a (batch, len, channels) tensor into `dst[..len]`.
#[inline]
fn gather<T: Copy>(src: &[T], b: usize, c: usize, len: usize, channels: usize, dst: &mut [T]) {
    let base = b * len * channels + c;
    for (t, v) in dst[..len].iter_mut().enumerate() {
        *v = src[base + t * channels];
    }
}

/// Columns of length `len` into a (batch, len, channels) tensor. Column
/// (b, c) is number c·batch + b when `channel_major`, else b·channels + c.
fn columns_to_tokens<T: Float>(
    cols: &[T],
    batch: usize,
    len: usize,
    channels: usize,
    channel_major: bool,
) -> Vec<T> {
    let mut out = vec![T::ZERO; batch * len * channels];
    out.par_chunks_mut(channels)
        .with_min_len(64)
        .enumerate()
        .for_each(|(row, dst)| {
            let (b, t) = (row / len, row % len);
            for (c, v) in dst.iter_mut().enumerate() {
                let col = if channel_major {
                    c * batch + b
                } else {
                    b * channels + c
                };
                *v = cols[col * len + t];
            }
        });
    out
}

// ---------------------------------------------------------------------------
// The Vandermonde product.

/// e^{p_n j} for j < bs, rounded to T: re and im, layout (modes, bs) when
/// `mode_major`, else (bs, modes).
fn power_table<T: Float>(cd: &ChannelDisc, bs: usize, mode_major: bool) -> (Vec<T>, Vec<T>) {
    let m = cd.modes.len();
    let mut re = vec![T::ZERO; m * bs];
    let mut im = vec![T::ZERO; m * bs];
    for (n, md) in cd.modes.iter().enumerate() {
        for j in 0..bs {
            let v = cexp(md.p * j as f64);
            let i = if mode_major { n * bs + j } else { j * m + n };
            re[i] = T::from_f64(v.re);
            im[i] = T::from_f64(v.im);
        }
    }
    (re, im)
}

/// K_l = f Re Σ_n C̃_n Ā_n^l for l < out.len(), by blocks.
fn kernel_channel<T: Float>(cd: &ChannelDisc, factor: f64, out: &mut [T]) {
    let len = out.len();
    let bs = VANDERMONDE_BLOCK.min(len);
    let (qr, qi) = power_table::<T>(cd, bs, true);
    let mut acc = vec![T::ZERO; bs];
    for l0 in (0..len).step_by(bs) {
        let w = bs.min(len - l0);
        acc.fill(T::ZERO);
        for (n, md) in cd.modes.iter().enumerate() {
            // W = f C̃ Ā^{l0}, exact exponent
            let wk = md.c_tilde * cexp(md.p * l0 as f64) * factor;
            let (wr, wi) = (T::from_f64(wk.re), T::from_f64(wk.im));
            let (qrn, qin) = (&qr[n * bs..n * bs + w], &qi[n * bs..n * bs + w]);
            for ((a, &r), &i) in acc[..w].iter_mut().zip(qrn).zip(qin) {
                *a += wr * r - wi * i;
            }
        }
        out[l0..l0 + w].copy_from_slice(&acc[..w]);
    }
}

/// Backward of [`kernel_channel`]: the gradients (g_C̃, g_p) per mode of
/// Σ_l dk_l K_l.
fn kernel_backward_channel<T: Float>(
    cd: &ChannelDisc,
    factor: f64,
    dk: &[T],
) -> (Vec<Complex64>, Vec<Complex64>) {
    let len = dk.len();
    let m = cd.modes.len();
    let bs = VANDERMONDE_BLOCK.min(len);
    let (qr, qi) = power_table::<T>(cd, bs, false);
    let zero = Complex64::new(0.0, 0.0);
    let mut s0 = vec![zero; m];
    let mut s1 = vec![zero; m];
    // R0_n = Σ_j dk_{l0+j} Q_{n,j},  R1_n = Σ_j j dk_{l0+j} Q_{n,j}: lanes over n.
    let mut r0r = vec![T::ZERO; m];
    let mut r0i = vec![T::ZERO; m];
    let mut r1r = vec![T::ZERO; m];
    let mut r1i = vec![T::ZERO; m];
    for l0 in (0..len).step_by(bs) {
        let w = bs.min(len - l0);
        for v in [&mut r0r, &mut r0i, &mut r1r, &mut r1i] {
            v.fill(T::ZERO);
        }
        for j in 0..w {
            let d = dk[l0 + j];
            let dj = d * <T as Float>::from_usize(j);
            let (qrj, qij) = (&qr[j * m..(j + 1) * m], &qi[j * m..(j + 1) * m]);
            for n in 0..m {
                r0r[n] += d * qrj[n];
                r0i[n] += d * qij[n];
                r1r[n] += dj * qrj[n];
                r1i[n] += dj * qij[n];
            }
        }
        for (n, md) in cd.modes.iter().enumerate() {
            let pk = cexp(md.p * l0 as f64);
            let r0 = Complex64::new(r0r[n].to_f64(), r0i[n].to_f64());
            let r1 = Complex64::new(r1r[n].to_f64(), r1i[n].to_f64());
            s0[n] += pk * r0;
            s1[n] += pk * (r0 * l0 as f64 + r1);
        }
    }
    let g_ct = s0.iter().map(|s| s.conj() * factor).collect();
    let g_p = cd
        .modes
        .iter()
        .zip(&s1)
        .map(|(md, s)| (md.c_tilde * s).conj() * factor)
        .collect();
    (g_ct, g_p)
}

/// The convolution kernel K_l = f Re Σ_n C̃_n Ā_n^l, layout (channels, len).
pub fn s4d_kernel<T: Float>(params: &S4dParams<T>, len: usize) -> Result<Vec<T>> {
    const OP: &str = "s4d_kernel";
    params.validate(OP)?;
    if len == 0 {
        return Err(invalid(OP, "len must be at least 1"));
    }
    Ok(kernel_unchecked(params, len))
}

fn kernel_unchecked<T: Float>(params: &S4dParams<T>, len: usize) -> Vec<T> {
    let factor = params.mode_factor();
    let mut k = vec![T::ZERO; params.channels * len];
    k.par_chunks_mut(len).enumerate().for_each(|(h, out)| {
        kernel_channel(&ChannelDisc::new(params, h), factor, out);
    });
    k
}

// ---------------------------------------------------------------------------
// FFT convolution.

/// Real FFT plans of size 2·len.
struct Fft<T: FftNum> {
    n: usize,
    r2c: Arc<dyn RealToComplex<T>>,
    c2r: Arc<dyn ComplexToReal<T>>,
}

/// One worker's buffers: a real signal of 2·len, two spectra of len + 1.
struct FftBuffers<T> {
    real: Vec<T>,
    spec: Vec<Complex<T>>,
    spec2: Vec<Complex<T>>,
    scratch: Vec<Complex<T>>,
}

impl<T: FftFloat> Fft<T> {
    fn new(len: usize) -> Self {
        let n = 2 * len;
        let mut planner = RealFftPlanner::<T>::new();
        Self {
            n,
            r2c: planner.plan_fft_forward(n),
            c2r: planner.plan_fft_inverse(n),
        }
    }

    fn buffers(&self) -> FftBuffers<T> {
        let scratch = self.r2c.get_scratch_len().max(self.c2r.get_scratch_len());
        FftBuffers {
            real: self.r2c.make_input_vec(),
            spec: self.r2c.make_output_vec(),
            spec2: self.r2c.make_output_vec(),
            scratch: vec![Complex::new(T::ZERO, T::ZERO); scratch],
        }
    }

    /// rfft of `real` (whose first `len` values the caller set; the rest
    /// is zeroed here) into `spec`. `real` is clobbered.
    fn forward(&self, real: &mut [T], spec: &mut [Complex<T>], scratch: &mut [Complex<T>]) {
        real[self.n / 2..].fill(T::ZERO);
        let res = self.r2c.process_with_scratch(real, spec, scratch);
        debug_assert!(res.is_ok(), "{res:?}");
    }

    /// Unnormalised irfft of `spec` (clobbered) into `real`.
    fn inverse(&self, spec: &mut [Complex<T>], real: &mut [T], scratch: &mut [Complex<T>]) {
        // The spectrum of a real signal has real DC and Nyquist bins;
        // products of such spectra keep them real up to signed zeros.
        spec[0].im = T::ZERO;
        let last = spec.len() - 1;
        spec[last].im = T::ZERO;
        let res = self.c2r.process_with_scratch(spec, real, scratch);
        debug_assert!(res.is_ok(), "{res:?}");
    }

    /// rfft of every channel's kernel: (channels, len + 1).
    fn kernel_spectra(&self, kernel: &[T], len: usize) -> Vec<Complex<T>> {
        let channels = kernel.len() / len;
        let mut out = vec![Complex::new(T::ZERO, T::ZERO); channels * (len + 1)];
        out.par_chunks_mut(len + 1)
            .zip(kernel.par_chunks(len))
            .for_each_init(
                || self.buffers(),
                |bufs, (dst, k)| {
                    bufs.real[..len].copy_from_slice(k);
                    self.forward(&mut bufs.real, dst, &mut bufs.scratch);
                },
            );
        out
    }
}

/// Convolution mode: y = K * u + D u by FFTs of size 2·len.
/// u and y: (batch, len, channels).
pub fn s4d_forward_conv<T: FftFloat>(
    params: &S4dParams<T>,
    u: &[T],
    batch: usize,
    len: usize,
) -> Result<Vec<T>> {
    const OP: &str = "s4d_forward_conv";
    validate_sequence(OP, params, batch, len, &[("u", u)])?;
    let channels = params.channels;
    let fft = Fft::<T>::new(len);
    let kf = fft.kernel_spectra(&kernel_unchecked(params, len), len);
    let scale = T::ONE / <T as Float>::from_usize(fft.n);
    // (batch, channels, len)
    let mut cols = vec![T::ZERO; batch * channels * len];
    cols.par_chunks_mut(len).enumerate().for_each_init(
        || fft.buffers(),
        |bufs, (idx, col)| {
            let (b, c) = (idx / channels, idx % channels);
            gather(u, b, c, len, channels, &mut bufs.real);
            fft.forward(&mut bufs.real, &mut bufs.spec, &mut bufs.scratch);
            for (s, k) in bufs.spec.iter_mut().zip(&kf[c * (len + 1)..]) {
                *s = *s * *k;
            }
            fft.inverse(&mut bufs.spec, &mut bufs.real, &mut bufs.scratch);
            let d = params.d[c];
            let base = b * len * channels + c;
            for (t, y) in col.iter_mut().enumerate() {
                *y = bufs.real[t] * scale + d * u[base + t * channels];
            }
        },
    );
    Ok(columns_to_tokens(&cols, batch, len, channels, false))
}

/// Backward of [`s4d_forward_conv`]: gradients of Σ dy·y.
pub fn s4d_backward_conv<T: FftFloat>(
    params: &S4dParams<T>,
    u: &[T],
    dy: &[T],
    batch: usize,
    len: usize,
) -> Result<S4dGrads<T>> {
    const OP: &str = "s4d_backward_conv";
    validate_sequence(OP, params, batch, len, &[("u", u), ("dy", dy)])?;
    let channels = params.channels;
    let factor = params.mode_factor();
    let fft = Fft::<T>::new(len);
    let kf = fft.kernel_spectra(&kernel_unchecked(params, len), len);
    let scale = T::ONE / <T as Float>::from_usize(fft.n);
    let czero = Complex::new(T::ZERO, T::ZERO);
    // (channels, batch, len)
    let mut du = vec![T::ZERO; channels * batch * len];
    let per_channel: Vec<ChannelGrads> = du
        .par_chunks_mut(batch * len)
        .enumerate()
        .map_init(
            || (fft.buffers(), vec![czero; len + 1], vec![T::ZERO; len]),
            |(bufs, acc, dk), (c, du_c)| {
                let kf_c = &kf[c * (len + 1)..(c + 1) * (len + 1)];
                let d = params.d[c];
                acc.fill(czero);
                let mut dd = 0.0f64;
                for b in 0..batch {
                    let base = b * len * channels + c;
                    for t in 0..len {
                        dd += dy[base + t * channels].to_f64() * u[base + t * channels].to_f64();
                    }
                    // spec = rfft(dy), spec2 = rfft(u)
                    gather(dy, b, c, len, channels, &mut bufs.real);
                    fft.forward(&mut bufs.real, &mut bufs.spec, &mut bufs.scratch);
                    gather(u, b, c, len, channels, &mut bufs.real);
                    fft.forward(&mut bufs.real, &mut bufs.spec2, &mut bufs.scratch);
                    // dK += corr(u, dy); du = corr(K, dy)
                    for i in 0..=len {
                        let g = bufs.spec[i];
                        acc[i] = acc[i] + bufs.spec2[i].conj() * g;
                        bufs.spec2[i] = kf_c[i].conj() * g;
                    }
                    fft.inverse(&mut bufs.spec2, &mut bufs.real, &mut bufs.scratch);
                    let du_b = &mut du_c[b * len..(b + 1) * len];
                    for (t, v) in du_b.iter_mut().enumerate() {
                        *v = bufs.real[t] * scale + d * dy[base + t * channels];
                    }
                }
                bufs.spec.copy_from_slice(acc);
                fft.inverse(&mut bufs.spec, &mut bufs.real, &mut bufs.scratch);
                for (v, &r) in dk.iter_mut().zip(&bufs.real[..len]) {
                    *v = r * scale;
                }
                let cd = ChannelDisc::new(params, c);
                let (g_ct, g_p) = kernel_backward_channel(&cd, factor, dk);
                // C̃ = C B E
                let m = &cd.modes;
                let g_c = m
                    .iter()
                    .zip(&g_ct)
                    .map(|(md, g)| g * (md.b * md.e).conj())
                    .collect();
                let g_b = m
                    .iter()
                    .zip(&g_ct)
                    .map(|(md, g)| g * (md.c * md.e).conj())
                    .collect();
                let g_e: Vec<_> = m
                    .iter()
                    .zip(&g_ct)
                    .map(|(md, g)| g * (md.c * md.b).conj())
                    .collect();
                chain_channel(&cd, &g_p, &g_e, g_b, g_c, dd)
            },
        )
        .collect();
    Ok(assemble_grads(params, batch, len, &du, per_channel))
}

// ---------------------------------------------------------------------------
// Recurrence.

/// Recurrence mode over whole sequences from h = 0: u and y (batch, len,
/// channels); also returns the final state for [`s4d_step`].
pub fn s4d_forward_recurrent<T: Float>(
    params: &S4dParams<T>,
    u: &[T],
    batch: usize,
    len: usize,
) -> Result<S4dRecurrentOutput<T>> {
    const OP: &str = "s4d_forward_recurrent";
    validate_sequence(OP, params, batch, len, &[("u", u)])?;
    let disc = S4dDiscrete::new(params);
    let channels = params.channels;
    let mut cols = vec![T::ZERO; batch * channels * len]; // (batch, channels, len)
    let mut final_state = vec![T::ZERO; params.state_len(batch)];
    cols.par_chunks_mut(len)
        .zip(final_state.par_chunks_mut(2 * params.modes))
        .enumerate()
        .for_each(|(idx, (col, h))| {
            let (b, c) = (idx / channels, idx % channels);
            let base = b * len * channels + c;
            for (t, y) in col.iter_mut().enumerate() {
                *y = disc.advance(c, h, u[base + t * channels]);
            }
        });
    Ok(S4dRecurrentOutput {
        y: columns_to_tokens(&cols, batch, len, channels, false),
        final_state,
    })
}

/// One step of the recurrence for every sequence of the batch: `state`
/// (batch, channels, modes, 2) is advanced in place, `u_t` (batch,
/// channels) is the input, the result is y_t (batch, channels). Start from
/// zeros of [`S4dParams::state_len`], or from the final state of
/// [`s4d_forward_recurrent`]. For many steps, [`S4dParams::discretize`]
/// once and call [`S4dDiscrete::step`].
pub fn s4d_step<T: Float>(
    params: &S4dParams<T>,
    state: &mut [T],
    u_t: &[T],
    batch: usize,
) -> Result<Vec<T>> {
    params.validate("s4d_step")?;
    S4dDiscrete::new(params).step(state, u_t, batch)
}

/// Backward of [`s4d_forward_recurrent`] (its y only) by the reverse-time
/// adjoint scan: gradients of Σ dy·y.
pub fn s4d_backward_recurrent<T: Float>(
    params: &S4dParams<T>,
    u: &[T],
    dy: &[T],
    batch: usize,
    len: usize,
) -> Result<S4dGrads<T>> {
    const OP: &str = "s4d_backward_recurrent";
    validate_sequence(OP, params, batch, len, &[("u", u), ("dy", dy)])?;
    let disc = S4dDiscrete::new(params);
    let channels = params.channels;
    let m = params.modes;
    let m2 = 2 * m;
    let factor = params.mode_factor();
    let zero = Complex64::new(0.0, 0.0);
    // (channels, batch, len)
    let mut du = vec![T::ZERO; channels * batch * len];
    let per_channel: Vec<ChannelGrads> = du
        .par_chunks_mut(batch * len)
        .enumerate()
        .map_init(
            // The states h_0..h_{len-1} of one sequence, then h_{-1} = 0.
            || vec![T::ZERO; m2 * (len + 1)],
            |hs, (c, du_c)| {
                let range = c * m2..(c + 1) * m2;
                let (za, bb, co) = (
                    &disc.a_bar[range.clone()],
                    &disc.b_bar[range.clone()],
                    &disc.c_out[range],
                );
                let d = params.d[c];
                let (mut g_z, mut g_bt, mut g_c) = (vec![zero; m], vec![zero; m], vec![zero; m]);
                let mut dd = 0.0f64;
                let mut lam = vec![T::ZERO; m2];
                let mut gz = vec![T::ZERO; m2];
                let mut gbt = vec![T::ZERO; m2];
                let mut gc = vec![T::ZERO; m2];
                for b in 0..batch {
                    let base = b * len * channels + c;
                    let (states, h_init) = hs.split_at_mut(m2 * len);
                    h_init.fill(T::ZERO);
                    let mut h = vec![T::ZERO; m2];
                    for t in 0..len {
                        disc.advance(c, &mut h, u[base + t * channels]);
                        states[t * m2..(t + 1) * m2].copy_from_slice(&h);
                    }
                    for v in [&mut lam, &mut gz, &mut gbt, &mut gc] {
                        v.fill(T::ZERO);
                    }
                    for t in (0..len).rev() {
                        let (dyt, ut) = (dy[base + t * channels], u[base + t * channels]);
                        let ht = &states[t * m2..(t + 1) * m2];
                        let hp = if t > 0 {
                            &states[(t - 1) * m2..t * m2]
                        } else {
                            &*h_init
                        };
                        let mut du_t = T::ZERO;
                        for n in 0..m {
                            let (re, im) = (2 * n, 2 * n + 1);
                            // λ_t = f dy_t conj(C) + conj(Ā) λ_{t+1}
                            let (lr, li) = (lam[re], lam[im]);
                            let nr = co[re] * dyt + za[re] * lr + za[im] * li;
                            let ni = za[re] * li - za[im] * lr - co[im] * dyt;
                            lam[re] = nr;
                            lam[im] = ni;
                            // dy conj(h_t); the factor f is applied below
                            gc[re] += dyt * ht[re];
                            gc[im] -= dyt * ht[im];
                            // λ_t conj(h_{t-1})
                            gz[re] += nr * hp[re] + ni * hp[im];
                            gz[im] += ni * hp[re] - nr * hp[im];
                            gbt[re] += nr * ut;
                            gbt[im] += ni * ut;
                            du_t += nr * bb[re] + ni * bb[im];
                        }
                        du_c[b * len + t] = du_t + d * dyt;
                        dd += dyt.to_f64() * ut.to_f64();
                    }
                    for n in 0..m {
                        let get =
                            |v: &[T]| Complex64::new(v[2 * n].to_f64(), v[2 * n + 1].to_f64());
                        g_z[n] += get(&gz);
                        g_bt[n] += get(&gbt);
                        g_c[n] += get(&gc) * factor;
                    }
                }
                let cd = ChannelDisc::new(params, c);
                let md = &cd.modes;
                let g_p: Vec<_> = md.iter().zip(&g_z).map(|(x, g)| g * x.z.conj()).collect();
                let g_e: Vec<_> = md.iter().zip(&g_bt).map(|(x, g)| g * x.b.conj()).collect();
                let g_b = md.iter().zip(&g_bt).map(|(x, g)| g * x.e.conj()).collect();
                chain_channel(&cd, &g_p, &g_e, g_b, g_c, dd)
            },
        )
        .collect();
    Ok(assemble_grads(params, batch, len, &du, per_channel))
}
