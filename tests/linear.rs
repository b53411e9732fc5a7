//! Weights in f32 / bf16 / f16 / q8 and the linear layer over them: every
//! path of `matmul_xwt` (the GEMV in AVX-512 and plain Rust, expand + GEMM,
//! the automatic choice) against plain f64 loops over the dequantised
//! weights, on awkward sizes; the decoding of rows; the quantisation error.
//! The q8 GEMV multiplies by x quantised to 8 bits per block of 32 (as
//! llama.cpp's q8_0 does): its reference quantises x the same way, written
//! out here, and its distance from the f32-x result is bounded separately.

use selective::kernels::huge_pages::{HugePageBuffer, HUGE_PAGE};
use selective::kernels::linear::{
    bf16_bits_to_f32, f32_to_bf16_bits, Kernel, QuantizedRows, GEMM_ROWS,
};
use selective::kernels::{linear_reference, WeightFormat, Weights, Q8_BLOCK};
use selective::rng::Rng;

const FORMATS: [WeightFormat; 4] = [
    WeightFormat::F32,
    WeightFormat::Bf16,
    WeightFormat::F16,
    WeightFormat::Q8,
];
const KERNELS: [Kernel; 5] = [
    Kernel::Auto,
    Kernel::Gemv,
    Kernel::GemvNoPrefetch,
    Kernel::Portable,
    Kernel::Gemm,
];

fn random(len: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).vec(len, |r| r.normal())
}

/// Weights with magnitudes spread over a few decades, so that Q8 blocks
/// have different scales.
fn random_weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..rows * cols)
        .map(|i| {
            let decade = ((i / Q8_BLOCK) % 4) as i32 - 2;
            (r.normal() * 10f64.powi(decade)) as f32
        })
        .collect()
}

/// |got - want| within the error of summing k products in f32 in another
/// order: a multiple of eps · sqrt(k) · Σ|x w| (plus |y0| when accumulating).
fn check(what: &str, got: &[f32], want: &[f32], abs_sum: &[f64], y0: Option<&[f32]>, k: usize) {
    assert_eq!(got.len(), want.len(), "{what}");
    let rel = 8.0 * f32::EPSILON as f64 * (k.max(1) as f64).sqrt();
    for idx in 0..got.len() {
        let (w, base) = match y0 {
            Some(y0) => (want[idx] as f64 + y0[idx] as f64, y0[idx].abs() as f64),
            None => (want[idx] as f64, 0.0),
        };
        let tol = rel * abs_sum[idx] + 2.0 * f32::EPSILON as f64 * base + 1e-30;
        let err = (got[idx] as f64 - w).abs();
        assert!(
            err <= tol,
            "{what}: element {idx}: got {} want {w} (error {err:e} > {tol:e})",
            got[idx]
        );
    }
}

/// Σ_l |x_il w_jl| over the dequantised weights: the scale of the rounding.
fn abs_sums(w: &Weights, x: &[f32], m: usize) -> Vec<f64> {
    let wf = w.to_f32();
    let (n, k) = (w.rows(), w.cols());
    let mut s = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            s[i * n + j] = (0..k)
                .map(|l| (x[i * k + l] as f64 * wf[j * k + l] as f64).abs())
                .sum();
        }
    }
    s
}

/// x (m, k) quantised as the q8 GEMV does, written out and dequantised in
/// f64: per row, blocks of Q8_BLOCK, s = max|x| / 127 (f32), q = x · 127 /
/// max|x| rounded to the nearest integer, ties to even; x' = s · q.
fn x_quantised_by_hand(x: &[f32], m: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * k];
    for i in 0..m {
        for b0 in (0..k).step_by(Q8_BLOCK) {
            let idx = i * k + b0..i * k + (b0 + Q8_BLOCK).min(k);
            let amax = x[idx.clone()].iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let s = amax / 127.0;
            for l in idx {
                let q = if amax > 0.0 {
                    (x[l] * (127.0 / amax)).round_ties_even()
                } else {
                    0.0
                };
                out[l] = s as f64 * q as f64;
            }
        }
    }
    out
}

/// The q8 GEMV's result in f64: the dequantised weights times x'.
/// Returns (y, Σ|w x'|).
fn q8_gemv_reference(w: &Weights, x: &[f32], m: usize) -> (Vec<f32>, Vec<f64>) {
    let wf = w.to_f32();
    let (n, k) = (w.rows(), w.cols());
    let xq = x_quantised_by_hand(x, m, k);
    let mut y = vec![0.0f32; m * n];
    let mut abs = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let terms = (0..k).map(|l| xq[i * k + l] * wf[j * k + l] as f64);
            y[i * n + j] = terms.clone().sum::<f64>() as f32;
            abs[i * n + j] = terms.map(f64::abs).sum();
        }
    }
    (y, abs)
}

/// Whether `kernel` at m rows multiplies q8 weights by quantised x.
fn multiplies_quantised_x(w: &Weights, kernel: Kernel, m: usize) -> bool {
    w.format() == WeightFormat::Q8
        && match kernel {
            Kernel::Auto => m <= GEMM_ROWS,
            Kernel::Gemm => false,
            Kernel::Gemv | Kernel::GemvNoPrefetch | Kernel::Portable => true,
        }
}

fn check_all_paths(w: &Weights, m: usize, seed: u64) {
    let (n, k) = (w.rows(), w.cols());
    let x = random(m * k, seed);
    let want_f32_x = linear_reference(w, &x, m).unwrap();
    let abs_sum_f32_x = abs_sums(w, &x, m);
    let (want_q8_x, abs_sum_q8_x) = q8_gemv_reference(w, &x, m);
    let y0 = random(m * n, seed + 1);
    for kernel in KERNELS {
        let (want, abs_sum) = if multiplies_quantised_x(w, kernel, m) {
            (&want_q8_x, &abs_sum_q8_x)
        } else {
            (&want_f32_x, &abs_sum_f32_x)
        };
        let what = format!("{} {n}x{k} m={m} {kernel:?}", w.format().name());
        let mut y = vec![f32::NAN; m * n];
        w.matmul_xwt_with(&x, m, &mut y, false, kernel).unwrap();
        check(&what, &y, want, abs_sum, None, k);
        let mut y = y0.clone();
        w.matmul_xwt_with(&x, m, &mut y, true, kernel).unwrap();
        check(
            &format!("{what} accumulate"),
            &y,
            want,
            abs_sum,
            Some(&y0),
            k,
        );
    }
}

#[test]
fn matmul_matches_reference_on_awkward_shapes() {
    let mut seed = 0;
    for format in FORMATS {
        for rows in [1, 7, 33, 1000] {
            for cols in [1, 31, 32, 33, 48, 100, 768] {
                seed += 10;
                let w = Weights::from_f32(format, rows, cols, &random_weights(rows, cols, seed))
                    .unwrap();
                for m in [1, 2, 3, 5, 8, 9, 17, 64] {
                    check_all_paths(&w, m, seed + m as u64);
                }
            }
        }
    }
}

#[test]
fn matmul_matches_reference_on_other_pools() {
    // 1 thread (no split), 3 threads (uneven chunks of rows), on a matrix
    // big enough to be split.
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for format in FORMATS {
                let (rows, cols) = (1001, 200);
                let w =
                    Weights::from_f32(format, rows, cols, &random_weights(rows, cols, 7)).unwrap();
                for m in [1, 4, 8, 9, 64] {
                    check_all_paths(&w, m, 100 + m as u64);
                }
            }
        });
    }
}

/// Buffers of 2 MiB and more are anonymous mappings on a 2 MiB boundary
/// (Linux): zeroed, writable to the last element, copied exactly.
#[test]
fn huge_page_buffers_hold_what_is_written() {
    for len in [
        0,
        1,
        1000,
        HUGE_PAGE / 4 - 1,
        HUGE_PAGE / 4,
        HUGE_PAGE / 4 * 3 + 17,
    ] {
        let mut b = HugePageBuffer::<f32>::zeroed(len);
        assert_eq!(b.len(), len);
        assert!(b.iter().all(|&v| v == 0.0), "len {len}: not zeroed");
        if cfg!(target_os = "linux") && len * 4 >= HUGE_PAGE {
            assert_eq!(
                b.as_ptr() as usize % HUGE_PAGE,
                0,
                "len {len}: not 2 MiB-aligned"
            );
        }
        for (i, v) in b.iter_mut().enumerate() {
            *v = i as f32;
        }
        let c = b.clone();
        assert_eq!(c.len(), len);
        assert!(len == 0 || c.as_ptr() != b.as_ptr());
        assert!(
            c.iter().enumerate().all(|(i, &v)| v == i as f32),
            "len {len}: clone differs"
        );
        drop(b);
        // the clone owns its memory: still readable after the original is gone
        assert!(c.iter().enumerate().all(|(i, &v)| v == i as f32));
    }
    let bits: Vec<u16> = (0..HUGE_PAGE as u16 / 2).chain(0..7).collect();
    assert_eq!(&HugePageBuffer::from_slice(&bits)[..], &bits[..]);
}

/// Matrices above 2 MiB (huge-page buffers) in f32 and bf16 through the
/// GEMV, against the reference.
#[test]
fn matmul_matches_reference_on_matrices_over_2_mib() {
    let (rows, cols) = (1031, 1029); // 4.2 MB in f32, 2.1 MB in bf16
    let values = random_weights(rows, cols, 77);
    for format in [WeightFormat::F32, WeightFormat::Bf16] {
        let w = Weights::from_f32(format, rows, cols, &values).unwrap();
        assert!(w.bytes() >= HUGE_PAGE);
        for m in [1, 3] {
            check_all_paths(&w, m, 78 + m as u64);
        }
    }
}

#[test]
fn empty_shapes() {
    for format in FORMATS {
        for (rows, cols, m) in [(0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0)] {
            let w = Weights::from_f32(format, rows, cols, &vec![1.0; rows * cols]).unwrap();
            let x = vec![1.0; m * cols];
            for kernel in KERNELS {
                let mut y = vec![f32::NAN; m * rows];
                w.matmul_xwt_with(&x, m, &mut y, false, kernel).unwrap();
                assert!(y.iter().all(|&v| v == 0.0), "{format:?} {kernel:?}");
                let mut y = vec![2.0; m * rows];
                w.matmul_xwt_with(&x, m, &mut y, true, kernel).unwrap();
                assert!(y.iter().all(|&v| v == 2.0), "{format:?} {kernel:?}");
            }
        }
    }
}

#[test]
fn shape_errors_are_errors() {
    for format in FORMATS {
        assert!(Weights::from_f32(format, 3, 4, &[0.0; 11]).is_err());
        let w = Weights::from_f32(format, 3, 4, &[0.5; 12]).unwrap();
        let mut y = vec![0.0; 6];
        assert!(w.matmul_xwt(&[0.0; 7], 2, &mut y, false).is_err());
        assert!(w.matmul_xwt(&[0.0; 8], 2, &mut y[..5], false).is_err());
        assert!(w.matmul_xwt(&[0.0; 8], 3, &mut y, true).is_err());
        assert!(w.matmul_xwt(&[0.0; 8], 2, &mut y, false).is_ok());
        // a row past the end, or into a buffer of the wrong width
        assert!(w.row_to_f32(3, &mut [0.0; 4]).is_err());
        assert!(w.row_to_f32(2, &mut [0.0; 5]).is_err());
        assert!(w.row_to_f32(2, &mut [0.0; 4]).is_ok());
        assert!(linear_reference(&w, &[0.0; 7], 2).is_err());
        for m in [9, 20] {
            let mut y = vec![0.0; m * 3];
            assert!(w
                .matmul_xwt(&vec![0.0; m * 4 - 1], m, &mut y, false)
                .is_err());
        }
    }
}

/// Q8 quantisation written out: per row, blocks of 32 with the f16 scale
/// amax / 127, q = round(w / s).
fn q8_by_hand(values: &[f32], rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    let mut deq = vec![0.0; rows * cols];
    let mut scale_of = vec![0.0; rows * cols];
    for r in 0..rows {
        for b0 in (0..cols).step_by(Q8_BLOCK) {
            let idx = r * cols + b0..r * cols + (b0 + Q8_BLOCK).min(cols);
            let amax = values[idx.clone()]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            let s = half::f16::from_f32(amax / 127.0).to_f32();
            for i in idx {
                let q = if s > 0.0 {
                    (values[i] * (1.0 / s)).round().clamp(-127.0, 127.0) as i8
                } else {
                    0
                };
                deq[i] = s * q as f32;
                scale_of[i] = s;
            }
        }
    }
    (deq, scale_of)
}

#[test]
fn rows_decode_exactly() {
    for (rows, cols) in [
        (3, 1),
        (5, 31),
        (4, 32),
        (6, 33),
        (2, 48),
        (9, 100),
        (3, 768),
    ] {
        let values = random_weights(rows, cols, (rows * cols) as u64);
        let (q8, _) = q8_by_hand(&values, rows, cols);
        for format in FORMATS {
            let w = Weights::from_f32(format, rows, cols, &values).unwrap();
            let all = w.to_f32();
            let mut row = vec![f32::NAN; cols];
            for r in 0..rows {
                w.row_to_f32(r, &mut row).unwrap();
                for c in 0..cols {
                    let v = values[r * cols + c];
                    let want = match format {
                        WeightFormat::F32 => v,
                        WeightFormat::Bf16 => bf16_bits_to_f32(f32_to_bf16_bits(v)),
                        WeightFormat::F16 => half::f16::from_f32(v).to_f32(),
                        WeightFormat::Q8 => q8[r * cols + c],
                    };
                    assert_eq!(row[c].to_bits(), want.to_bits(), "{format:?} ({r}, {c})");
                    assert_eq!(all[r * cols + c].to_bits(), want.to_bits());
                }
            }
        }
    }
}

#[test]
fn bytes_per_format() {
    let (rows, cols) = (3, 40); // 2 blocks per row, the second of 8
    let w = |f| {
        Weights::from_f32(f, rows, cols, &[0.0; 120])
            .unwrap()
            .bytes()
    };
    assert_eq!(w(WeightFormat::F32), 480);
    assert_eq!(w(WeightFormat::Bf16), 240);
    assert_eq!(w(WeightFormat::F16), 240);
    assert_eq!(w(WeightFormat::Q8), 120 + 3 * 2 * 2);
}

#[test]
fn half_precision_round_trip_error() {
    // Magnitudes from 1e-4 to 6e4: normal numbers of f16 (and of bf16).
    let mut r = Rng::new(3);
    let values: Vec<f32> = (0..10_000)
        .map(|_| {
            let mag = 10f64.powf(r.uniform_in(-4.0, 4.7));
            (if r.uniform() < 0.5 { -mag } else { mag }) as f32
        })
        .collect();
    for (format, bound) in [
        (WeightFormat::Bf16, 2f32.powi(-8)),
        (WeightFormat::F16, 2f32.powi(-11)),
    ] {
        let w = Weights::from_f32(format, 100, 100, &values).unwrap();
        for (&v, &d) in values.iter().zip(&w.to_f32()) {
            assert!(
                (d - v).abs() <= bound * v.abs(),
                "{format:?}: {v} -> {d}, relative error {}",
                ((d - v) / v).abs()
            );
        }
    }
}

#[test]
fn q8_error_is_half_a_step() {
    let (rows, cols) = (20, 100);
    let values = random_weights(rows, cols, 11);
    let w = Weights::from_f32(WeightFormat::Q8, rows, cols, &values).unwrap();
    let (_, scale_of) = q8_by_hand(&values, rows, cols);
    let deq = w.to_f32();
    for r in 0..rows {
        for b0 in (0..cols).step_by(Q8_BLOCK) {
            let idx = r * cols + b0..r * cols + (b0 + Q8_BLOCK).min(cols);
            let amax = values[idx.clone()]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            for i in idx {
                let s = scale_of[i];
                // half a step, plus what rounding the scale to f16 moved
                // the block's largest value (clamped at ±127 s)
                let bound = s / 2.0 + amax * 2f32.powi(-11) + 1e-6 * values[i].abs();
                let err = (deq[i] - values[i]).abs();
                assert!(
                    err <= bound,
                    "({r}, {i}): {} -> {} (bound {bound})",
                    values[i],
                    deq[i]
                );
            }
        }
    }
}

#[test]
fn q8_zero_blocks_and_outliers() {
    let cols = 100; // blocks 32, 32, 32, 4
    let mut values = random_weights(2, cols, 5);
    values[..32].fill(0.0); // row 0, block 0: all zero
    values[cols + 96..].fill(0.0); // row 1, the short last block: all zero
    values[40] = 3.0e4; // row 0, block 1: one huge value among ~0.01..1
    let w = Weights::from_f32(WeightFormat::Q8, 2, cols, &values).unwrap();
    let deq = w.to_f32();
    assert!(deq[..32].iter().all(|&v| v == 0.0));
    assert!(deq[cols + 96..].iter().all(|&v| v == 0.0));
    assert!(deq.iter().all(|v| v.is_finite()));
    let s = half::f16::from_f32(3.0e4 / 127.0).to_f32();
    assert!((deq[40] - 3.0e4).abs() <= 3.0e4 * 2f32.powi(-10));
    for i in 32..64 {
        assert!((deq[i] - values[i]).abs() <= s / 2.0 + 3.0e4 * 2f32.powi(-11));
    }
    let mut x = random(3 * cols, 6);
    x[cols..cols + 32].fill(0.0); // row 1 of x, block 0: all zero
    x[2 * cols + 70] = -5.0e3; // row 2 of x, block 2: an outlier
    let want = linear_reference(&w, &x, 3).unwrap();
    let abs_sum = abs_sums(&w, &x, 3);
    let (want_q, abs_sum_q) = q8_gemv_reference(&w, &x, 3);
    for kernel in KERNELS {
        let mut y = vec![0.0; 6];
        w.matmul_xwt_with(&x, 3, &mut y, false, kernel).unwrap();
        if multiplies_quantised_x(&w, kernel, 3) {
            check(&format!("{kernel:?}"), &y, &want_q, &abs_sum_q, None, cols);
        } else {
            check(&format!("{kernel:?}"), &y, &want, &abs_sum, None, cols);
        }
    }
}

#[test]
fn q8_activation_quantisation_written_out() {
    let (m, k) = (3, 100); // blocks 32, 32, 32, 4
    let mut x = random(m * k, 8);
    x[32..64].fill(0.0); // row 0, block 1: zero
    x[k + 99] = 40.0; // row 1, short last block: outlier
    x[2 * k + 5] = -1e-30; // tiny
    let xq = QuantizedRows::new(&x, m, k).unwrap();
    assert!(QuantizedRows::new(&x[1..], m, k).is_err());
    assert!(xq.row(m).is_none() && xq.scales(m).is_none());
    let want = x_quantised_by_hand(&x, m, k);
    for i in 0..m {
        let (q, s) = (xq.row(i).unwrap(), xq.scales(i).unwrap());
        assert_eq!(q.len(), 128, "padded to 64 columns");
        assert_eq!(s.len(), 16, "padded to 16 blocks");
        assert!(q[k..].iter().all(|&v| v == 0) && s[4..].iter().all(|&v| v == 0.0));
        for l in 0..k {
            let got = s[l / Q8_BLOCK] as f64 * q[l] as f64;
            assert_eq!(got, want[i * k + l], "row {i} column {l}");
            // the error of a value is at most half a step of its block
            let err = (got - x[i * k + l] as f64).abs();
            assert!(
                err <= s[l / Q8_BLOCK] as f64 / 2.0 * (1.0 + 1e-6),
                "row {i} col {l}: {err}"
            );
        }
    }
    assert!(xq.row(0).unwrap()[32..64].iter().all(|&v| v == 0) && xq.scales(0).unwrap()[1] == 0.0);
    assert_eq!(xq.row(1).unwrap()[99], 127);
}

/// The q8 GEMV's distance from the f32-x product is the activations'
/// quantisation error and no more: |Δy| <= Σ_l |w_l| s_x(l) / 2, plus
/// rounding.
#[test]
fn q8_gemv_stays_within_the_activation_quantisation_bound() {
    for (rows, cols) in [(64, 768), (33, 48), (5, 1536), (9, 100)] {
        let w = Weights::from_f32(
            WeightFormat::Q8,
            rows,
            cols,
            &random_weights(rows, cols, 21),
        )
        .unwrap();
        let wf = w.to_f32();
        for m in [1, 2, 8] {
            let x = random(m * cols, 22 + m as u64);
            let exact = linear_reference(&w, &x, m).unwrap();
            let xq = QuantizedRows::new(&x, m, cols).unwrap();
            let abs = abs_sums(&w, &x, m);
            for kernel in [Kernel::Gemv, Kernel::Portable] {
                let mut y = vec![0.0; m * rows];
                w.matmul_xwt_with(&x, m, &mut y, false, kernel).unwrap();
                let mut worst = 0.0f64;
                for i in 0..m {
                    for j in 0..rows {
                        let bound: f64 = (0..cols)
                            .map(|l| {
                                wf[j * cols + l].abs() as f64
                                    * xq.scales(i).unwrap()[l / Q8_BLOCK] as f64
                                    / 2.0
                            })
                            .sum();
                        let err = (y[i * rows + j] as f64 - exact[i * rows + j] as f64).abs();
                        let tol = bound + 1e-5 * abs[i * rows + j];
                        assert!(
                            err <= tol,
                            "{rows}x{cols} m={m} {kernel:?} ({i},{j}): {err} > {tol}"
                        );
                        worst = worst.max(err / abs[i * rows + j]);
                    }
                }
                // and it does quantise: the result is not the f32-x one
                assert!(worst > 1e-5, "{rows}x{cols} m={m} {kernel:?}: {worst}");
            }
        }
    }
}

/// A NaN or an infinity in x makes the q8 GEMV's outputs NaN (in f32 they
/// would be NaN or infinite), never a finite number that hides it.
#[test]
fn q8_gemv_does_not_hide_non_finite_activations() {
    let (rows, cols) = (9, 100);
    let w =
        Weights::from_f32(WeightFormat::Q8, rows, cols, &random_weights(rows, cols, 3)).unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for at in [0, 40, 99] {
            let mut x = random(2 * cols, 4);
            x[cols + at] = bad;
            for kernel in [Kernel::Auto, Kernel::Gemv, Kernel::Portable] {
                let mut y = vec![0.0; 2 * rows];
                w.matmul_xwt_with(&x, 2, &mut y, false, kernel).unwrap();
                assert!(y[..rows].iter().all(|v| v.is_finite()), "{kernel:?} row 0");
                assert!(
                    y[rows..].iter().all(|v| v.is_nan()),
                    "{bad} at {at} {kernel:?}: {:?}",
                    &y[rows..]
                );
            }
        }
    }
}
