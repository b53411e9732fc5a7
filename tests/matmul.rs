//! The GEMM wrapper's three products against plain loops, on awkward sizes,
//! with and without accumulation, on 1 and 2 threads.

mod common;

use common::*;
use selective::kernels::matmul::matmul_xwt_reference;
use selective::kernels::*;

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; a.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

#[test]
fn three_products_match_plain_loops() {
    let sizes = [
        (1, 1, 1),
        (1, 7, 5),
        (3, 1, 4),
        (5, 17, 3),
        (33, 65, 80),
        (130, 96, 70),
        (1, 768, 80),
    ];
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for (i, &(m, k, n)) in sizes.iter().enumerate() {
            let seed = 10 * i as u64;
            let x = random_vec::<f64>(m * k, seed);
            let w = random_vec::<f64>(n * k, seed + 1);
            let dy = random_vec::<f64>(m * n, seed + 2);
            let prior = random_vec::<f64>(m * n.max(k) * n.max(m), seed + 3);
            let tag = format!("m={m} k={k} n={n} threads={threads}");
            pool.install(|| {
                // y = x Wᵀ
                let want = matmul_xwt_reference(&x, &w, m, k, n);
                let mut y = vec![0.0; m * n];
                matmul_xwt(&x, &w, m, k, n, &mut y, false).unwrap();
                assert_close(&format!("xwt {tag}"), &y, &want, 1e-12, 1e-12);
                // accumulate: y = prior + x Wᵀ
                let mut y = prior[..m * n].to_vec();
                matmul_xwt(&x, &w, m, k, n, &mut y, true).unwrap();
                let acc: Vec<f64> = want.iter().zip(&prior).map(|(a, b)| a + b).collect();
                assert_close(&format!("xwt+ {tag}"), &y, &acc, 1e-12, 1e-12);
                // dx = dy W = dy (Wᵀ)ᵀ
                let want = matmul_xwt_reference(&dy, &transpose(&w, n, k), m, n, k);
                let mut dx = vec![0.0; m * k];
                matmul_xw(&dy, &w, m, n, k, &mut dx, false).unwrap();
                assert_close(&format!("xw {tag}"), &dx, &want, 1e-12, 1e-12);
                // dW = dyᵀ x
                let want =
                    matmul_xwt_reference(&transpose(&dy, m, n), &transpose(&x, m, k), n, m, k);
                let mut dw = prior[..n * k].to_vec();
                matmul_xtw(&dy, &x, m, n, k, &mut dw, true).unwrap();
                let acc: Vec<f64> = want.iter().zip(&prior).map(|(a, b)| a + b).collect();
                assert_close(&format!("xtw+ {tag}"), &dw, &acc, 1e-12, 1e-12);
            });
            // f32 forward.
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
            let mut y32 = vec![0.0f32; m * n];
            pool.install(|| matmul_xwt(&x32, &w32, m, k, n, &mut y32, false))
                .unwrap();
            let want = matmul_xwt_reference(&x, &w, m, k, n);
            assert_close(&format!("xwt f32 {tag}"), &y32, &want, 1e-4, 1e-5);
        }
    }
}

#[test]
fn matmul_shape_errors_name_the_operand() {
    let mut y = vec![0.0f32; 6];
    let msg = matmul_xwt(&[0.0f32; 6], &[0.0f32; 5], 2, 3, 3, &mut y, false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`w`") && msg.contains("n=3, k=3") && msg.contains("5"),
        "{msg}"
    );
    let msg = matmul_xw(&[0.0f32; 6], &[0.0f32; 9], 2, 3, 3, &mut y[..5], false)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`dx`"), "{msg}");
}
