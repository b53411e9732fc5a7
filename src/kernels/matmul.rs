//! Matrix multiplication in the three forms a linear layer needs, on
//! row-major slices, with weights stored as PyTorch's `nn.Linear` does
//! (out_features, in_features):
//!
//! ```text
//! forward          y  (m, n) = x (m, k) · Wᵀ           W: (n, k)
//! input gradient   dx (m, k) = dy (m, n) · W
//! weight gradient  dW (n, k) = dyᵀ (n, m) · x (m, k)
//! ```
//!
//! All three go to one strided GEMM (the `gemm` crate, chosen by the
//! measurement in docs/MATMUL.md), so transposes cost nothing. Every form can
//! accumulate into its output (y += ...), which the backward pass uses to sum
//! gradients without temporaries. Threads: rayon's current pool.

use gemm::Parallelism;

use crate::error::{check_len, Result};
use crate::float::Float;

/// Scalars the GEMM handles.
pub trait MatmulScalar: Float {}
impl MatmulScalar for f32 {}
impl MatmulScalar for f64 {}

/// Below this many multiply-adds one thread does the whole product: the
/// cost of waking the others is larger than the work.
const PARALLEL_THRESHOLD: usize = 48 * 48 * 48;

/// A row-major (rows, cols) operand, possibly read transposed.
#[derive(Clone, Copy)]
struct Operand<'a, T> {
    data: &'a [T],
    /// element (i, j) is data[i * row_stride + j * col_stride]
    row_stride: isize,
    col_stride: isize,
}

/// dst (m, n) = [dst +] lhs (m, k) · rhs (k, n)
fn gemm_into<T: MatmulScalar>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    lhs: Operand<'_, T>,
    rhs: Operand<'_, T>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::ZERO);
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * k >= PARALLEL_THRESHOLD {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the callers checked every slice against (m, n, k) and the
    // strides, so all accesses are in bounds; dst does not alias lhs or rhs
    // (it is a distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride,
            lhs.row_stride,
            rhs.data.as_ptr(),
            rhs.col_stride,
            rhs.row_stride,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// y (m, n) [+]= x (m, k) · Wᵀ with W (n, k): the linear layer's forward.
pub fn matmul_xwt<T: MatmulScalar>(
    x: &[T],
    w: &[T],
    m: usize,
    k: usize,
    n: usize,
    y: &mut [T],
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "matmul_xwt";
    check_len(OP, "x", x, &[("m", m), ("k", k)])?;
    check_len(OP, "w", w, &[("n", n), ("k", k)])?;
    check_len(OP, "y", y, &[("m", m), ("n", n)])?;
    let lhs = Operand {
        data: x,
        row_stride: k as isize,
        col_stride: 1,
    };
    // Wᵀ (k, n): element (i, j) = W[j, i]
    let rhs = Operand {
        data: w,
        row_stride: 1,
        col_stride: k as isize,
    };
    gemm_into(m, n, k, y, accumulate, lhs, rhs);
    Ok(())
}

/// dx (m, k) [+]= dy (m, n) · W with W (n, k): the input gradient.
pub fn matmul_xw<T: MatmulScalar>(
    dy: &[T],
    w: &[T],
    m: usize,
    n: usize,
    k: usize,
    dx: &mut [T],
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "matmul_xw";
    check_len(OP, "dy", dy, &[("m", m), ("n", n)])?;
    check_len(OP, "w", w, &[("n", n), ("k", k)])?;
    check_len(OP, "dx", dx, &[("m", m), ("k", k)])?;
    let lhs = Operand {
        data: dy,
        row_stride: n as isize,
        col_stride: 1,
    };
    let rhs = Operand {
        data: w,
        row_stride: k as isize,
        col_stride: 1,
    };
    gemm_into(m, k, n, dx, accumulate, lhs, rhs);
    Ok(())
}

/// dW (n, k) [+]= dyᵀ · x with dy (m, n), x (m, k): the weight gradient.
pub fn matmul_xtw<T: MatmulScalar>(
    dy: &[T],
    x: &[T],
    m: usize,
    n: usize,
    k: usize,
    dw: &mut [T],
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "matmul_xtw";
    check_len(OP, "dy", dy, &[("m", m), ("n", n)])?;
    check_len(OP, "x", x, &[("m", m), ("k", k)])?;
    check_len(OP, "dw", dw, &[("n", n), ("k", k)])?;
    // dyᵀ (n, m): element (i, j) = dy[j, i]
    let lhs = Operand {
        data: dy,
        row_stride: 1,
        col_stride: n as isize,
    };
    let rhs = Operand {
        data: x,
        row_stride: k as isize,
        col_stride: 1,
    };
    gemm_into(n, k, m, dw, accumulate, lhs, rhs);
    Ok(())
}

/// The three products written as plain loops, for the tests.
pub fn matmul_xwt_reference<T: Float>(x: &[T], w: &[T], m: usize, k: usize, n: usize) -> Vec<T> {
    let mut y = vec![T::ZERO; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = T::ZERO;
            for l in 0..k {
                acc += x[i * k + l] * w[j * k + l];
            }
            y[i * n + j] = acc;
        }
    }
    y
}
