//! The linear layer over stored weights (src/kernels/linear.rs) at one row
//! of x, decoding mamba-130m: each format on each layer's shape, on 1 and 2
//! threads, throughput in bytes of weights read.
//!
//! Groups (filter with `cargo bench --bench linear -- <group>`):
//! - `linear/t{1,2}/<layer>/<format>`: one matrix, repeated: it stays in
//!   cache if it fits (all but lm_head in f32/bf16/f16 fit L3 here).
//! - `linear_dram/t{1,2}/<format>`: copies of lm_head totalling >= 1 GiB,
//!   one per iteration in turn, so that every pass streams from DRAM as
//!   decoding a whole model does.
//! - `linear_m/t2/<layer>/<format>/<path>/m<m>`: the GEMV against expand +
//!   GEMM over the rows of x, to place the threshold between them.
//! - `linear_token`: one token of mamba-130m at m = 1 (and 4) on 2 threads:
//!   for each of 24 distinct layers in_proj (3072 x 768), x_proj (80 x
//!   1536), dt_proj (1536 x 48), out_proj (768 x 1536), then lm_head (50280
//!   x 768), in that order. `model` reads one copy of these weights per
//!   token, as decoding does (bf16 / f16 / q8 are smaller than the reported
//!   L3); `dram` rotates over copies totalling >= 1 GiB so that every token
//!   comes from DRAM. Timed by hand (not criterion): median ms per token of
//!   `TOKEN_REPS` tokens, GB/s of weights and the equivalent tokens/s.
//!
//! The read bandwidth of the machine (the DRAM bound) is printed first.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use selective::bench::scan::read_bandwidth;
use selective::kernels::linear::Kernel;
use selective::kernels::{WeightFormat, Weights};
use selective::rng::Rng;

const FORMATS: [WeightFormat; 4] = [
    WeightFormat::F32,
    WeightFormat::Bf16,
    WeightFormat::F16,
    WeightFormat::Q8,
];

/// (name, rows = out_features, cols = in_features) of mamba-130m's
/// decoding products; in_proj is timed per half (x and z).
const LAYERS: [(&str, usize, usize); 5] = [
    ("in_proj_half", 1536, 768),
    ("x_proj", 80, 1536),
    ("dt_proj", 1536, 48),
    ("out_proj", 768, 1536),
    ("lm_head", 50280, 768),
];

fn random(len: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).vec(len, |r| r.normal() * 0.05)
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// Tokens timed per `linear_token` measurement (the median is reported).
const TOKEN_REPS: usize = 40;

/// One token of mamba-130m: the decoding products of 24 layers and lm_head.
fn token_shapes() -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for _ in 0..24 {
        v.extend([(3072, 768), (80, 1536), (1536, 48), (768, 1536)]);
    }
    v.push((50280, 768));
    v
}

fn bench_token() {
    let shapes = token_shapes();
    let pool = pool(2);
    // LINEAR_TOKEN_FORMATS=q8,bf16 and LINEAR_TOKEN_M=1 narrow the run
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let (formats, ms) = (env("LINEAR_TOKEN_FORMATS"), env("LINEAR_TOKEN_M"));
    for format in FORMATS {
        if !formats.is_empty() && !formats.split(',').any(|f| f == format.name()) {
            continue;
        }
        // one model copy: distinct weights per layer (random, as trained
        // weights are for the kernels)
        let model: Vec<Weights> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(r, c))| {
                Weights::from_f32(format, r, c, &random(r * c, 100 + i as u64)).unwrap()
            })
            .collect();
        let bytes: usize = model.iter().map(|w| w.bytes()).sum();
        for (mode, copies) in [
            ("model", 1),
            ("dram", (1usize << 30).div_ceil(bytes).max(2)),
        ] {
            let extra: Vec<Vec<Weights>> = (1..copies).map(|_| model.clone()).collect();
            let set: Vec<&[Weights]> = std::iter::once(model.as_slice())
                .chain(extra.iter().map(|v| v.as_slice()))
                .collect();
            for m in [1usize, 4] {
                if !ms.is_empty() && !ms.split(',').any(|v| v == m.to_string()) {
                    continue;
                }
                let xs: Vec<Vec<f32>> = shapes.iter().map(|&(_, c)| random(m * c, 7)).collect();
                let mut ys: Vec<Vec<f32>> = shapes.iter().map(|&(r, _)| vec![0.0; m * r]).collect();
                let mut times = pool.install(|| {
                    let mut times = Vec::new();
                    for t in 0..TOKEN_REPS + 3 {
                        let ws = set[t % set.len()];
                        let t0 = Instant::now();
                        for ((w, x), y) in ws.iter().zip(&xs).zip(ys.iter_mut()) {
                            w.matmul_xwt(black_box(x), m, y, false).unwrap();
                        }
                        let dt = t0.elapsed().as_secs_f64();
                        if t >= 3 {
                            times.push(dt);
                        }
                    }
                    times
                });
                black_box(&ys);
                times.sort_by(f64::total_cmp);
                let med = times[times.len() / 2];
                println!(
                    "linear_token/t2/{mode}/{}/m{m}: {:.3} ms/token (min {:.3}), {:.1} GB/s, {:.1} tokens/s",
                    format.name(),
                    med * 1e3,
                    times[0] * 1e3,
                    bytes as f64 / med / 1e9,
                    1.0 / med
                );
            }
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    let args: Vec<String> = std::env::args().collect();
    let wanted = |group: &str| {
        // criterion's filter is a substring of the benchmark id; skip the
        // (large) setup of groups it excludes.
        let filters: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with('-')).collect();
        filters.is_empty()
            || filters
                .iter()
                .any(|f| group.contains(f.as_str()) || f.contains(group))
    };

    for threads in [1, 2] {
        println!(
            "read bandwidth, {threads} thread(s), 1 GiB: {:.1} GB/s",
            read_bandwidth(1 << 30, threads)
        );
    }

    if wanted("linear_token") {
        bench_token();
    }

    if wanted("linear/") {
        for threads in [1, 2] {
            let pool = pool(threads);
            let mut group = c.benchmark_group(format!("linear/t{threads}"));
            for (name, rows, cols) in LAYERS {
                let values = random(rows * cols, 1);
                let x = random(cols, 2);
                let mut y = vec![0.0f32; rows];
                for format in FORMATS {
                    let w = Weights::from_f32(format, rows, cols, &values).unwrap();
                    group.throughput(Throughput::Bytes(w.bytes() as u64));
                    group.bench_function(format!("{name}/{}", format.name()), |b| {
                        b.iter_custom(|iters| {
                            // timed inside the pool, as the model calls it:
                            // no hand-off to the pool per call
                            pool.install(|| {
                                let t0 = Instant::now();
                                for _ in 0..iters {
                                    w.matmul_xwt(black_box(&x), 1, &mut y, false).unwrap();
                                }
                                t0.elapsed()
                            })
                        })
                    });
                }
            }
            group.finish();
        }
    }

    if wanted("linear_dram/") {
        let (_, rows, cols) = LAYERS[4];
        let values = random(rows * cols, 3);
        let x = random(cols, 4);
        let mut y = vec![0.0f32; rows];
        for format in FORMATS {
            let one = Weights::from_f32(format, rows, cols, &values).unwrap();
            let copies = (1usize << 30).div_ceil(one.bytes()).max(2);
            let set: Vec<Weights> = (0..copies).map(|_| one.clone()).collect();
            for threads in [1, 2] {
                let pool = pool(threads);
                let mut group = c.benchmark_group(format!("linear_dram/t{threads}"));
                group.throughput(Throughput::Bytes(one.bytes() as u64));
                for (path, kernel) in [("", Kernel::Gemv), ("/no_prefetch", Kernel::GemvNoPrefetch)]
                {
                    let mut next = 0;
                    group.bench_function(format!("{}{path}", format.name()), |b| {
                        b.iter_custom(|iters| {
                            pool.install(|| {
                                let t0 = Instant::now();
                                for _ in 0..iters {
                                    let w = &set[next];
                                    next = (next + 1) % set.len();
                                    w.matmul_xwt_with(black_box(&x), 1, &mut y, false, kernel)
                                        .unwrap();
                                }
                                t0.elapsed()
                            })
                        })
                    });
                }
                group.finish();
            }
        }
    }

    if wanted("linear_m/") {
        let pool = pool(2);
        let mut group = c.benchmark_group("linear_m/t2");
        let layers = [
            ("in_proj", 3072, 768),
            ("out_proj", 768, 1536),
            ("lm_head", 50280, 768),
        ];
        for (name, rows, cols) in layers {
            let values = random(rows * cols, 5);
            for format in FORMATS {
                let w = Weights::from_f32(format, rows, cols, &values).unwrap();
                for m in [1, 4, 8, 9, 16, 24, 32, 64] {
                    let x = random(m * cols, 6);
                    let mut y = vec![0.0f32; m * rows];
                    group.throughput(Throughput::Elements((m * rows * cols) as u64));
                    for (path, kernel) in [("gemv", Kernel::Gemv), ("gemm", Kernel::Gemm)] {
                        group.bench_function(
                            format!("{name}/{}/{path}/m{m}", format.name()),
                            |b| {
                                b.iter(|| {
                                    pool.install(|| {
                                        w.matmul_xwt_with(black_box(&x), m, &mut y, false, kernel)
                                            .unwrap()
                                    })
                                })
                            },
                        );
                    }
                }
            }
        }
        group.finish();
    }
    c.final_summary();
}
