//! Benchmarks of the selective scan (docs/BENCHMARKS.md has the results).
//!
//! `cargo bench --bench selective_scan` runs, in f32 with delta_softplus,
//! D, z and delta_bias (as the Mamba block calls it):
//!
//! - `scan_fwd`: the fused forward at batch 1, 1536 channels, N = 16,
//!   lengths 512, 2048 and 8192, on 1 and 2 threads, and the literal
//!   reference forward at length 512 on 1 thread;
//! - `scan_bwd`: the fused backward (the call alone: the forward that keeps
//!   the checkpoints runs once, outside the timing) at the same sizes;
//! - `seq_scan`: one long sequence (65536 positions) with 16 or 64 channels,
//!   the sequential scan (`ScanParallelism::Channels`) on 1 and 2 threads
//!   against the parallel scan over the sequence (`Sequence`) on 2 threads,
//!   for a model-like small Δ and for a fast-decaying Δ = softplus(N(0,1)).
//!
//! Throughput is in elements = batch · len · channels · state. Every
//! benchmark also records its per-iteration times, and a summary (ns per
//! element, speed-ups) is printed at the end from the median and the minimum
//! of the measurement samples. Runs take about 2 to 2.5 minutes on 2 cores.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use rayon::{ThreadPool, ThreadPoolBuilder};
use selective::bench::scan::ScanBenchInputs;
use selective::kernels::{
    selective_scan_backward, selective_scan_forward, selective_scan_reference, ScanOptions,
    ScanParallelism, ScanShape,
};
use selective::rng::Rng;

const SAMPLES: usize = 10;
const CHANNELS: usize = 1536;
const STATE: usize = 16;
const LENGTHS: [usize; 3] = [512, 2048, 8192];
const REFERENCE_LEN: usize = 512;
const LONG_LEN: usize = 65536;
const LONG_CHANNELS: [usize; 2] = [16, 64];

/// Per-iteration seconds of every call of every benchmark, by id.
static TIMES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// How the raw Δ is drawn.
#[derive(Clone, Copy)]
enum DeltaRegime {
    /// As in a trained Mamba layer at initialisation: delta_bias is the
    /// inverse softplus of dt, log-uniform in [0.001, 0.1] per channel, and
    /// the raw delta is N(0, 1) · 0.5 around it.
    Model,
    /// Δ = softplus(N(0, 1)), no bias: large steps, fast decay.
    FastDecay,
}

/// Inputs of one benchmark case (`selective::bench::scan::ScanBenchInputs`) and
/// the upstream gradient for the backward.
struct Case {
    data: ScanBenchInputs,
    d_out: Vec<f32>,
}

impl Case {
    fn new(len: usize, channels: usize, regime: DeltaRegime, seed: u64) -> Self {
        let shape = ScanShape {
            batch: 1,
            len,
            channels,
            state: STATE,
        };
        let data = match regime {
            DeltaRegime::Model => ScanBenchInputs::new(shape, seed),
            DeltaRegime::FastDecay => ScanBenchInputs::fast_decay(shape, seed),
        };
        let d_out = Rng::new(seed + 1).vec(data.u.len(), |r| r.normal());
        Self { data, d_out }
    }

    fn elements(&self) -> u64 {
        let s = self.data.shape;
        (s.batch * s.len * s.channels * s.state) as u64
    }
}

fn options(parallelism: ScanParallelism) -> ScanOptions {
    ScanOptions {
        delta_softplus: true,
        parallelism,
        ..ScanOptions::default()
    }
}

fn pool(threads: usize) -> ThreadPool {
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

/// Benchmarks `routine` inside `pool`, timing only the calls, and records
/// every sample's per-iteration time under `group/id`.
fn bench(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    pool: &ThreadPool,
    mut routine: impl FnMut() + Send,
) {
    let key = format!("{}/{}", CURRENT_GROUP.lock().unwrap(), id);
    group.bench_function(id, |bencher| {
        bencher.iter_custom(|iters| {
            let elapsed = pool.install(|| {
                let start = Instant::now();
                for _ in 0..iters {
                    routine();
                }
                start.elapsed()
            });
            TIMES
                .lock()
                .unwrap()
                .entry(key.clone())
                .or_default()
                .push(elapsed.as_secs_f64() / iters as f64);
            elapsed
        })
    });
}

/// Name of the group being run (BenchmarkGroup does not expose it).
static CURRENT_GROUP: Mutex<String> = Mutex::new(String::new());

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
    measurement: Duration,
) -> BenchmarkGroup<'a, WallTime> {
    *CURRENT_GROUP.lock().unwrap() = name.to_string();
    let mut g = c.benchmark_group(name);
    g.sample_size(SAMPLES)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(measurement)
        .sampling_mode(SamplingMode::Flat);
    g
}

fn bench_forward(c: &mut Criterion, pools: &[(usize, ThreadPool)], cases: &[Case]) {
    let mut g = group(c, "scan_fwd", Duration::from_secs(4));
    for case in cases {
        let len = case.data.shape.len;
        let x = case.data.inputs();
        let o = options(ScanParallelism::Auto);
        let mut out = vec![0.0f32; case.data.u.len()];
        let mut fs = vec![0.0f32; CHANNELS * STATE];
        g.throughput(Throughput::Elements(case.elements()));
        for (t, p) in pools {
            bench(&mut g, &format!("fused/t{t}/L{len}"), p, || {
                selective_scan_forward(&case.data.shape, &x, &o, &mut out, Some(&mut fs), None)
                    .unwrap();
                black_box(&out);
            });
        }
        if len == REFERENCE_LEN {
            let (_, p1) = pools.iter().find(|(t, _)| *t == 1).expect("1-thread pool");
            bench(&mut g, &format!("reference/t1/L{len}"), p1, || {
                black_box(selective_scan_reference(&case.data.shape, &x, &o).unwrap());
            });
        }
    }
    g.finish();
}

fn bench_backward(c: &mut Criterion, pools: &[(usize, ThreadPool)], cases: &[Case]) {
    let mut g = group(c, "scan_bwd", Duration::from_secs(4));
    for case in cases {
        let len = case.data.shape.len;
        let x = case.data.inputs();
        let o = options(ScanParallelism::Auto);
        let mut out = vec![0.0f32; case.data.u.len()];
        let mut ck = vec![0.0f32; case.data.shape.checkpoints_len(o.chunk_len)];
        selective_scan_forward(&case.data.shape, &x, &o, &mut out, None, Some(&mut ck)).unwrap();
        g.throughput(Throughput::Elements(case.elements()));
        for (t, p) in pools {
            bench(&mut g, &format!("fused/t{t}/L{len}"), p, || {
                black_box(
                    selective_scan_backward(&case.data.shape, &x, &o, &ck, &case.d_out, None)
                        .unwrap(),
                );
            });
        }
    }
    g.finish();
}

fn bench_sequence(c: &mut Criterion, pools: &[(usize, ThreadPool)]) {
    let mut g = group(c, "seq_scan", Duration::from_secs(3));
    for (regime, name) in [
        (DeltaRegime::Model, "small_dt"),
        (DeltaRegime::FastDecay, "fast_decay"),
    ] {
        for &channels in &LONG_CHANNELS {
            let case = Case::new(LONG_LEN, channels, regime, 3);
            let x = case.data.inputs();
            let mut out = vec![0.0f32; case.data.u.len()];
            let mut fs = vec![0.0f32; channels * STATE];
            g.throughput(Throughput::Elements(case.elements()));
            let configs = [
                (1, ScanParallelism::Channels, "channels"),
                (2, ScanParallelism::Channels, "channels"),
                (2, ScanParallelism::Sequence, "sequence"),
            ];
            for (threads, parallelism, label) in configs {
                let (_, p) = pools
                    .iter()
                    .find(|(t, _)| *t == threads)
                    .expect("thread pool");
                let o = options(parallelism);
                bench(
                    &mut g,
                    &format!("{name}/C{channels}/{label}/t{threads}"),
                    p,
                    || {
                        selective_scan_forward(
                            &case.data.shape,
                            &x,
                            &o,
                            &mut out,
                            Some(&mut fs),
                            None,
                        )
                        .unwrap();
                        black_box(&out);
                    },
                );
            }
        }
    }
    g.finish();
}

/// Per-iteration seconds of the measurement samples of `key` (the last
/// SAMPLES calls; the earlier ones are criterion's warm-up), sorted.
fn samples(key: &str) -> Option<Vec<f64>> {
    let times = TIMES.lock().unwrap();
    let all = times.get(key)?;
    let mut v = all[all.len().saturating_sub(SAMPLES)..].to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v)
}

fn median_secs(key: &str) -> Option<f64> {
    samples(key).map(|v| v[v.len() / 2])
}

fn min_secs(key: &str) -> Option<f64> {
    samples(key).map(|v| v[0])
}

/// time(num) / time(den), from the medians and from the minima.
fn ratio(num: &str, den: &str) -> String {
    match (
        median_secs(num),
        median_secs(den),
        min_secs(num),
        min_secs(den),
    ) {
        (Some(a), Some(b), Some(c), Some(d)) => {
            format!("{:.2}x (min: {:.2}x)", a / b, c / d)
        }
        _ => "n/a".to_string(),
    }
}

fn print_summary() {
    let elements = |key: &str| -> f64 {
        // The length and channels are in the id: .../C{channels}/... or /L{len}
        let mut len = None;
        let mut channels = CHANNELS;
        for part in key.split('/') {
            if let Some(l) = part.strip_prefix('L').and_then(|s| s.parse::<usize>().ok()) {
                len = Some(l);
            }
            if let Some(ch) = part.strip_prefix('C').and_then(|s| s.parse::<usize>().ok()) {
                channels = ch;
                len = len.or(Some(LONG_LEN));
            }
        }
        (len.expect("length in the id") * channels * STATE) as f64
    };
    let keys: Vec<String> = TIMES.lock().unwrap().keys().cloned().collect();
    if keys.is_empty() {
        return;
    }
    eprintln!("\n=== summary (median and minimum of {SAMPLES} samples) ===");
    eprintln!(
        "{:<44} {:>10} {:>10} {:>10} {:>10}",
        "benchmark", "ms/iter", "ns/elem", "min ms", "min ns/el"
    );
    for key in &keys {
        let (s, m) = (median_secs(key).unwrap(), min_secs(key).unwrap());
        let e = elements(key);
        eprintln!(
            "{:<44} {:>10.3} {:>10.4} {:>10.3} {:>10.4}",
            key,
            s * 1e3,
            s * 1e9 / e,
            m * 1e3,
            m * 1e9 / e
        );
    }
    eprintln!("\nspeed-ups (time of the first / time of the second):");
    let r = REFERENCE_LEN;
    eprintln!(
        "  fused fwd vs reference, L{r}, 1 thread:  {}",
        ratio(
            &format!("scan_fwd/reference/t1/L{r}"),
            &format!("scan_fwd/fused/t1/L{r}")
        )
    );
    eprintln!(
        "  fused fwd (2 threads) vs reference (1 thread), L{r}: {}",
        ratio(
            &format!("scan_fwd/reference/t1/L{r}"),
            &format!("scan_fwd/fused/t2/L{r}")
        )
    );
    for g in ["scan_fwd", "scan_bwd"] {
        for len in LENGTHS {
            eprintln!(
                "  {g} L{len}: 2 threads vs 1 thread: {}",
                ratio(
                    &format!("{g}/fused/t1/L{len}"),
                    &format!("{g}/fused/t2/L{len}")
                )
            );
        }
    }
    for regime in ["small_dt", "fast_decay"] {
        for ch in LONG_CHANNELS {
            let k = |s: &str| format!("seq_scan/{regime}/C{ch}/{s}");
            eprintln!(
                "  {regime} C{ch}: sequence t2 vs channels t2: {}; vs channels t1: {}; channels t2 vs t1: {}",
                ratio(&k("channels/t2"), &k("sequence/t2")),
                ratio(&k("channels/t1"), &k("sequence/t2")),
                ratio(&k("channels/t1"), &k("channels/t2")),
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(SAMPLES)
        .nresamples(10_000)
        .configure_from_args();
    let pools: Vec<(usize, ThreadPool)> = [1, 2].into_iter().map(|t| (t, pool(t))).collect();
    let cases: Vec<Case> = LENGTHS
        .iter()
        .map(|&len| Case::new(len, CHANNELS, DeltaRegime::Model, len as u64))
        .collect();
    bench_forward(&mut c, &pools, &cases);
    bench_backward(&mut c, &pools, &cases);
    drop(cases);
    bench_sequence(&mut c, &pools);
    c.final_summary();
    print_summary();
}
