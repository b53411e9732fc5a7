//! Timing of the kernels on a model's shapes, for `selective bench-scan`.
//! (Criterion benchmarks in `benches/` measure the same with statistics;
//! this is the quick look from the command line.)

use std::time::Instant;

use crate::error::Result;
use crate::kernels::huge_pages::HugePageBuffer;
use crate::kernels::{
    selective_scan_backward, selective_scan_forward, ScanInputs, ScanOptions, ScanParallelism,
    ScanShape,
};
use crate::rng::Rng;

/// Random inputs shaped like a Mamba layer's: Δ around the official
/// dt_proj.bias initialisation (softplus⁻¹ of dt in [0.001, 0.1]),
/// A = -(1..=N) per channel (S4D-Real), B, C, u, z standard normal.
pub struct ScanBenchInputs {
    pub shape: ScanShape,
    pub u: Vec<f32>,
    pub delta: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
    pub d: Vec<f32>,
    pub z: Vec<f32>,
    /// None in the fast-decay variant.
    pub delta_bias: Option<Vec<f32>>,
}

impl ScanBenchInputs {
    pub fn new(shape: ScanShape, seed: u64) -> Self {
        let mut r = Rng::new(seed);
        let act = shape.batch * shape.len * shape.channels;
        let tok = shape.batch * shape.len * shape.state;
        let delta_bias = r.vec(shape.channels, |r| {
            let dt = r.uniform_in(0.001f64.ln(), 0.1f64.ln()).exp();
            dt + (-(-dt).exp_m1()).ln() // inverse softplus
        });
        Self {
            shape,
            u: r.vec(act, |r| r.normal()),
            delta: r.vec(act, |r| r.normal() * 0.5),
            a: (0..shape.channels * shape.state)
                .map(|i| -((i % shape.state) as f32 + 1.0))
                .collect(),
            b: r.vec(tok, |r| r.normal()),
            c: r.vec(tok, |r| r.normal()),
            d: vec![1.0; shape.channels],
            z: r.vec(act, |r| r.normal()),
            delta_bias: Some(delta_bias),
        }
    }

    /// The same without delta_bias and with raw delta ~ N(0, 1), so that
    /// Δ = softplus(N(0, 1)) ≈ 0.8 and every state decays within ~100 steps.
    pub fn fast_decay(shape: ScanShape, seed: u64) -> Self {
        let mut x = Self::new(shape, seed);
        let mut r = Rng::new(seed ^ 0x5eed);
        x.delta = r.vec(x.delta.len(), |r| r.normal());
        x.delta_bias = None;
        x
    }

    pub fn inputs(&self) -> ScanInputs<'_, f32> {
        ScanInputs {
            u: &self.u,
            delta: &self.delta,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: Some(&self.d),
            z: Some(&self.z),
            delta_bias: self.delta_bias.as_deref(),
            initial_state: None,
        }
    }
}

/// Median seconds of forward and backward over `reps` repetitions.
pub struct ScanTiming {
    pub forward_s: f64,
    pub backward_s: f64,
    /// (batch · len · channels · state), the element count of the scan.
    pub elements: usize,
}

pub fn time_scan(
    shape: ScanShape,
    reps: usize,
    chunk_len: usize,
    parallelism: ScanParallelism,
) -> Result<ScanTiming> {
    let data = ScanBenchInputs::new(shape, 0);
    let options = ScanOptions {
        delta_softplus: true,
        chunk_len,
        parallelism,
        ..ScanOptions::default()
    };
    let mut out = vec![0.0f32; data.u.len()];
    let mut ck = vec![0.0f32; shape.checkpoints_len(chunk_len)];
    let d_out = vec![1.0f32; data.u.len()];
    let (mut fw, mut bw) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        selective_scan_forward(
            &shape,
            &data.inputs(),
            &options,
            &mut out,
            None,
            Some(&mut ck),
        )?;
        fw.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let grads = selective_scan_backward(&shape, &data.inputs(), &options, &ck, &d_out, None)?;
        bw.push(t0.elapsed().as_secs_f64());
        std::hint::black_box(grads);
    }
    Ok(ScanTiming {
        forward_s: median(&mut fw),
        backward_s: median(&mut bw),
        elements: shape.batch * shape.len * shape.channels * shape.state,
    })
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Read bandwidth in GB/s (1e9 bytes/s): `threads` threads summing a
/// buffer of `bytes` bytes of f32, best of a few passes. With a buffer
/// much larger than the last-level cache this is the DRAM bound of the
/// decoding GEMV, which reads every weight once per token.
pub fn read_bandwidth(bytes: usize, threads: usize) -> f64 {
    use rayon::prelude::*;
    // 64 lanes: 4 independent vector adds, so the sum keeps up with memory.
    const LANES: usize = 64;
    let len = (bytes / 4).max(LANES);
    // Written once so that every page is really mapped; held as weights
    // are (2 MiB pages where Linux gives them), so that the bound and the
    // GEMV read memory the same way.
    let mut data = HugePageBuffer::<f32>::zeroed(len);
    for (i, v) in data.iter_mut().enumerate() {
        *v = (i % 7) as f32;
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .expect("a thread pool");
    let chunk = len.div_ceil(threads.max(1) * 4).next_multiple_of(LANES);
    let sum = |s: &[f32]| {
        let mut acc = [0.0f32; LANES];
        let mut it = s.chunks_exact(LANES);
        for c in &mut it {
            for l in 0..LANES {
                acc[l] += c[l];
            }
        }
        acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
    };
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        let total: f32 = pool.install(|| data.par_chunks(chunk).map(sum).sum());
        best = best.min(t0.elapsed().as_secs_f64());
        std::hint::black_box(total);
    }
    (len * 4) as f64 / best / 1e9
}
