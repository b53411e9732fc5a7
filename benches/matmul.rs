//! The matrix multiplication wrapper (src/kernels/matmul.rs) on mamba-130m's
//! shapes: the forward products at 512 rows (prefill, training) and 1 row
//! (decoding), and the two backward products of in_proj. The comparison of
//! candidate crates that chose `gemm` lives in tools/matmul-bench
//! (docs/MATMUL.md).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use selective::kernels::{matmul_xtw, matmul_xw, matmul_xwt};
use selective::rng::Rng;

fn random(len: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).vec(len, |r| r.uniform_in(-1.0, 1.0))
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    // (name, k = in_features, n = out_features)
    let layers = [
        ("in_proj", 768, 3072),
        ("x_proj", 1536, 80),
        ("out_proj", 1536, 768),
        ("lm_head", 768, 50280),
    ];
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut group = c.benchmark_group(format!("matmul/t{threads}"));
        for m in [512, 1] {
            for (name, k, n) in layers {
                let x = random(m * k, 1);
                let w = random(n * k, 2);
                let mut y = vec![0.0f32; m * n];
                group.throughput(Throughput::Elements((2 * m * n * k) as u64));
                group.bench_function(format!("{name}/m{m}"), |b| {
                    b.iter(|| {
                        pool.install(|| {
                            matmul_xwt(black_box(&x), &w, m, k, n, &mut y, false).unwrap()
                        })
                    })
                });
            }
        }
        // in_proj backward at 512 rows.
        let (m, k, n) = (512, 768, 3072);
        let (x, w, dy) = (random(m * k, 3), random(n * k, 4), random(m * n, 5));
        let mut dx = vec![0.0f32; m * k];
        let mut dw = vec![0.0f32; n * k];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function("in_proj_dx/m512", |b| {
            b.iter(|| {
                pool.install(|| matmul_xw(black_box(&dy), &w, m, n, k, &mut dx, false).unwrap())
            })
        });
        group.bench_function("in_proj_dw/m512", |b| {
            b.iter(|| {
                pool.install(|| matmul_xtw(black_box(&dy), &x, m, n, k, &mut dw, false).unwrap())
            })
        });
        group.finish();
    }
    c.final_summary();
}
