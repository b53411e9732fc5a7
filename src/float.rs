//! The scalar type the kernels are generic over: `f32` for speed, `f64` for
//! the finite-difference checks of every backward pass.
//!
//! The transcendental functions the scan evaluates per (position, channel,
//! state) element (`exp`, and `softplus`/`sigmoid` per (position, channel))
//! have branch-free polynomial versions for `f32`, so that the compiler can
//! vectorise the inner loops over a block of channels; calls into libm would
//! not vectorise. For `f64` they are the standard library's functions.

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

/// Floating-point scalar of the kernels.
pub trait Float:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + Debug
    + Display
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
{
    const ZERO: Self;
    const ONE: Self;
    /// Name used in error messages and benchmark output.
    const NAME: &'static str;
    /// Below this argument [`Float::exp`] returns exactly 0.
    const EXP_ZERO_BELOW: f64;

    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn from_usize(x: usize) -> Self {
        Self::from_f64(x as f64)
    }

    /// e^x, vectorisable for f32 (max relative error about 2e-7 on
    /// [-87, 88]; 0 below -87.34, the f32 underflow; +inf above 88.72).
    fn exp(self) -> Self;
    /// Natural logarithm of a positive number.
    fn ln(self) -> Self;
    /// ln(1 + x) for x >= 0 without cancellation for small x.
    fn ln_1p(self) -> Self;
    /// (e^x - 1) / x, with its limit 1 at x = 0 and no cancellation near 0.
    fn expm1_over_x(self) -> Self;
    /// d/dx [(e^x - 1) / x] = (x e^x - e^x + 1) / x², with its limit 1/2 at 0.
    fn expm1_over_x_grad(self) -> Self;
    /// self · a + b with one rounding (an FMA instruction where the CPU has one).
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn is_finite(self) -> bool;

    /// max that propagates NaN from `self`.
    #[inline(always)]
    fn max_nan(self, other: Self) -> Self {
        if self < other {
            other
        } else {
            self
        }
    }

    /// σ(x) = 1 / (1 + e^-x)
    #[inline(always)]
    fn sigmoid(self) -> Self {
        Self::ONE / (Self::ONE + (-self).exp())
    }

    /// silu(x) = x σ(x)
    #[inline(always)]
    fn silu(self) -> Self {
        self * self.sigmoid()
    }

    /// d silu / dx = σ(x) (1 + x (1 - σ(x)))
    #[inline(always)]
    fn silu_grad(self) -> Self {
        let s = self.sigmoid();
        s * (Self::ONE + self * (Self::ONE - s))
    }

    /// softplus(x) = ln(1 + e^x), and x itself above 20 as PyTorch's
    /// `F.softplus` (threshold 20) and the official scan do.
    #[inline(always)]
    fn softplus(self) -> Self {
        let threshold = Self::from_f64(20.0);
        // ln(1 + e^x) = max(x, 0) + ln(1 + e^-|x|): the exponent never overflows.
        let stable = self.max_nan(Self::ZERO) + (-self.abs()).exp().ln_1p();
        if self > threshold {
            self
        } else {
            stable
        }
    }

    /// Σ p over 16 lanes by halving (16 → 8 → 4 → 2 → 1): four dependent
    /// adds. f32 with AVX-512 reduces one register instead.
    #[inline(always)]
    fn sum_16(mut p: [Self; 16]) -> Self {
        let mut width = 8;
        while width > 0 {
            for w in 0..width {
                p[w] = p[w] + p[w + width];
            }
            width /= 2;
        }
        p[0]
    }

    /// d softplus / dx = σ(x), and 1 above the threshold 20.
    #[inline(always)]
    fn softplus_grad(self) -> Self {
        if self > Self::from_f64(20.0) {
            Self::ONE
        } else {
            self.sigmoid()
        }
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f64";
    const EXP_ZERO_BELOW: f64 = -745.2;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn ln_1p(self) -> Self {
        f64::ln_1p(self)
    }
    #[inline(always)]
    fn expm1_over_x(self) -> Self {
        if self == 0.0 {
            1.0
        } else {
            f64::exp_m1(self) / self
        }
    }
    #[inline(always)]
    fn expm1_over_x_grad(self) -> Self {
        let x = self;
        if x.abs() < 0.05 {
            expm1_over_x_grad_series(x)
        } else {
            (x.exp() * (x - 1.0) + 1.0) / (x * x)
        }
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f32";
    /// The same halving order as the default (the sum's bits do not depend
    /// on the CPU): LLVM turned the default into 2-lane pieces read back
    /// from memory.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    #[inline(always)]
    fn sum_16(p: [Self; 16]) -> Self {
        use std::arch::x86_64::*;
        // SAFETY: avx512f is enabled at compile time (cfg above); p holds 16
        // f32.
        unsafe {
            let v = _mm512_loadu_ps(p.as_ptr());
            // lanes w + 8 onto w, then w + 4, w + 2, w + 1: the default's order
            let hi8 = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            let s8 = _mm256_add_ps(_mm512_castps512_ps256(v), hi8);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
            _mm_cvtss_f32(s1)
        }
    }
    const EXP_ZERO_BELOW: f64 = -87.336_55;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        ln_f32(self)
    }
    #[inline(always)]
    fn ln_1p(self) -> Self {
        // ln(1+x) = ln(u) · x / (u - 1) with u = fl(1 + x): the rounding of u
        // cancels between numerator and denominator (Goldberg's trick).
        let u = 1.0 + self;
        let d = u - 1.0;
        if d == 0.0 {
            self
        } else {
            ln_f32(u) * (self / d)
        }
    }
    #[inline(always)]
    fn expm1_over_x(self) -> Self {
        // Taylor series near 0, where e^x - 1 would cancel; the truncation
        // error at |x| = 0.5 is 0.5^8/9! ≈ 1e-8.
        let x = self;
        let series = 1.0
            + x * (1.0 / 2.0
                + x * (1.0 / 6.0
                    + x * (1.0 / 24.0
                        + x * (1.0 / 120.0
                            + x * (1.0 / 720.0 + x * (1.0 / 5040.0 + x / 40320.0))))));
        let direct = (exp_f32(x) - 1.0) / x;
        if x.abs() < 0.5 {
            series
        } else {
            direct
        }
    }
    #[inline(always)]
    fn expm1_over_x_grad(self) -> Self {
        let x = self;
        // The direct form cancels badly for small |x|: the series up to 1.
        let series = expm1_over_x_grad_series(x as f64) as f32;
        let direct = (exp_f32(x) * (x - 1.0) + 1.0) / (x * x);
        if x.abs() < 1.0 {
            series
        } else {
            direct
        }
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}

/// Σ_k k x^(k-1) / (k+1)!, the Taylor series of d/dx [(e^x - 1)/x] to
/// x^11 (truncation below 3e-9 relative for |x| <= 1).
#[inline(always)]
fn expm1_over_x_grad_series(x: f64) -> f64 {
    const C: [f64; 12] = [
        1.0 / 2.0,
        1.0 / 3.0,
        1.0 / 8.0,
        1.0 / 30.0,
        1.0 / 144.0,
        1.0 / 840.0,
        1.0 / 5760.0,
        1.0 / 45360.0,
        1.0 / 403200.0,
        1.0 / 3991680.0,
        1.0 / 43545600.0,
        1.0 / 518918400.0,
    ];
    let mut acc = C[11];
    for &c in C[..11].iter().rev() {
        acc = acc * x + c;
    }
    acc
}

/// e^x for f32 without branches or libm calls (Cephes' `expf` polynomial):
/// x = k ln2 + r with |r| <= ln2/2, e^x = 2^k e^r.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.336_55; // ln(2^-126): below it the result is 0
    const HI: f32 = 88.722_83; // ln(f32::MAX)
                               // 1.5 · 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;
    // Comparisons (not f32::max/min) so that NaN passes through.
    let xc = if x < LO {
        LO
    } else if x > HI {
        HI
    } else {
        x
    };
    let shifted = xc.mul_add(LOG2E, ROUNDER);
    let k = shifted - ROUNDER;
    let r = (-k).mul_add(LN2_LO, (-k).mul_add(LN2_HI, xc));
    let mut p = 1.987_569_2e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5.000_000_1e-1);
    let er = (p * r).mul_add(r, r + 1.0);
    // 2^k: the low bits of `shifted` hold k (+ an offset that the shift by 23
    // pushes out of the word), so (bits + 127) << 23 is the exponent field.
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    let y = er * scale;
    if x < LO {
        0.0
    } else {
        y
    }
}

/// ln(x) for positive normal f32 (Cephes' `logf` polynomial), branch-free.
#[inline(always)]
pub fn ln_f32(x: f32) -> f32 {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let bits = x.to_bits();
    // x = m · 2^e with m in [0.5, 1)
    let e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x807f_ffff) | 0x3f00_0000);
    let small = m < SQRT_HALF;
    let e = (if small { e - 1 } else { e }) as f32;
    let f = if small { m + m - 1.0 } else { m - 1.0 };
    let z = f * f;
    let mut p = 7.037_683_6e-2_f32;
    p = p * f - 1.151_461e-1;
    p = p * f + 1.167_699_9e-1;
    p = p * f - 1.242_014_1e-1;
    p = p * f + 1.424_932_3e-1;
    p = p * f - 1.666_805_8e-1;
    p = p * f + 2.000_071_4e-1;
    p = p * f - 2.499_999_4e-1;
    p = p * f + 3.333_333e-1;
    let mut y = p * f * z;
    y += -2.121_944_4e-4 * e;
    y += -0.5 * z;
    let r = f + y;
    let r = r + 0.693_359_4 * e;
    if x.is_nan() || x < 0.0 {
        f32::NAN
    } else if x == 0.0 {
        f32::NEG_INFINITY
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(1e-300)
    }

    #[test]
    fn exp_f32_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(rel(got, want));
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(100.0), f32::INFINITY);
    }

    #[test]
    fn ln_f32_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = 1e-30f32;
        while x < 1e30 {
            let got = ln_f32(x) as f64;
            let want = (x as f64).ln();
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
            x *= 1.037;
        }
        assert!(worst < 3e-7, "worst error {worst}");
        assert!(ln_f32(-1.0).is_nan());
    }

    /// sum_16 adds in the halving order on every CPU (f32 with AVX-512 has
    /// its own code): bit for bit, on values whose sum depends on the order.
    #[test]
    fn sum_16_adds_by_halving() {
        let mut seed = 1u64;
        for _ in 0..1000 {
            let p: [f32; 16] = std::array::from_fn(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let mantissa = ((seed >> 40) as f32) / (1u64 << 24) as f32 - 0.5;
                mantissa * 2f32.powi(((seed >> 20) % 40) as i32 - 20)
            });
            let mut q = p;
            for width in [8, 4, 2, 1] {
                for w in 0..width {
                    q[w] += q[w + width];
                }
            }
            assert_eq!(f32::sum_16(p).to_bits(), q[0].to_bits(), "{p:?}");
            let p64 = p.map(|v| v as f64);
            let mut q64 = p64;
            for width in [8, 4, 2, 1] {
                for w in 0..width {
                    q64[w] += q64[w + width];
                }
            }
            assert_eq!(f64::sum_16(p64).to_bits(), q64[0].to_bits());
        }
    }

    #[test]
    fn softplus_and_friends_match_f64() {
        for i in -4000..4000 {
            // Compare at the f32-rounded argument: the rounding of x itself
            // is not the function's error.
            let x = (i as f64 * 0.01 + 0.003) as f32 as f64;
            let want = if x > 20.0 { x } else { x.exp().ln_1p() };
            let got = (x as f32).softplus() as f64;
            assert!(rel(got, want) < 4e-7, "softplus({x}) = {got}, want {want}");
            let want_s = 1.0 / (1.0 + (-x).exp());
            assert!(rel((x as f32).sigmoid() as f64, want_s) < 4e-7);
            assert!(rel(x.softplus(), want) < 1e-15);
        }
        // ln(1+x) for tiny x keeps its relative precision.
        let tiny = 1e-6f32;
        assert!(rel(tiny.ln_1p() as f64, (tiny as f64).ln_1p()) < 2e-7);
    }

    #[test]
    fn expm1_over_x_is_accurate_near_zero() {
        for i in -3000..3000 {
            let x = i as f64 * 0.001 + 1e-4;
            let want = x.exp_m1() / x;
            let got = (x as f32).expm1_over_x() as f64;
            assert!(rel(got, want) < 5e-7, "x={x}: {got} vs {want}");
        }
        assert_eq!(0.0f32.expm1_over_x(), 1.0);
    }

    #[test]
    fn expm1_over_x_grad_matches_central_difference() {
        for i in -300..300 {
            let x = i as f64 * 0.01 + 1e-3;
            let h = 1e-5;
            let fd = ((x + h).expm1_over_x() - (x - h).expm1_over_x()) / (2.0 * h);
            let got = x.expm1_over_x_grad();
            assert!((got - fd).abs() < 1e-8, "x={x}: {got} vs {fd}");
            let got32 = (x as f32).expm1_over_x_grad() as f64;
            assert!(
                (got32 - got).abs() < 1e-6 * got.abs().max(1e-3),
                "f32 x={x}: {got32} vs {got}"
            );
        }
    }
}
