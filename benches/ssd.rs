//! Benchmarks of Mamba-2's SSD layer (`kernels::ssd`) at the shape of a
//! mamba2-130m layer: H = 24 heads of P = 64, one group, N = 128, f32.
//!
//! `cargo bench --bench ssd` runs:
//!
//! - `ssd_fwd`: the chunked forward (Q = 64, as the block calls it) of one
//!   sequence of 512 and 2048 positions, on 1 and 2 threads, without and
//!   with the chunk states kept for the backward;
//! - `ssd_step`: one decoding step of every head on 1 thread.
//!
//! Throughput is in positions.

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use rayon::ThreadPoolBuilder;
use selective::kernels::{ssd_forward, ssd_step, SsdInputs, SsdOptions, SsdShape, SsdStepInputs};
use selective::rng::Rng;

const HEADS: usize = 24;
const HEAD_DIM: usize = 64;
const STATE: usize = 128;
const CHUNK: usize = 64;

/// Inputs drawn as a layer at initialisation sees them: x, B, C ~ N(0, 1),
/// raw dt ~ 0.5·N(0, 1) around a bias of softplus⁻¹ of [0.001, 0.1], A in
/// [-16, -1].
struct Case {
    x: Vec<f32>,
    dt: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    dt_bias: Vec<f32>,
    a: Vec<f32>,
    d: Vec<f32>,
}

impl Case {
    fn new(len: usize) -> Self {
        let mut rng = Rng::new(7);
        let mut normal = |n: usize, scale: f64| -> Vec<f32> {
            (0..n).map(|_| (rng.normal() * scale) as f32).collect()
        };
        let x = normal(len * HEADS * HEAD_DIM, 1.0);
        let dt = normal(len * HEADS, 0.5);
        let b = normal(len * STATE, 1.0);
        let c = normal(len * STATE, 1.0);
        let d = normal(HEADS, 1.0);
        let mut rng = Rng::new(8);
        let dt_bias = (0..HEADS)
            .map(|_| {
                let dt = (rng.uniform_in(0.001f64.ln(), 0.1f64.ln())).exp();
                (dt + (-(-dt).exp_m1()).ln()) as f32
            })
            .collect();
        let a = (0..HEADS)
            .map(|_| -rng.uniform_in(1.0, 16.0) as f32)
            .collect();
        Self {
            x,
            dt,
            b,
            c,
            dt_bias,
            a,
            d,
        }
    }

    fn inputs(&self) -> SsdInputs<'_, f32> {
        SsdInputs {
            x: &self.x,
            dt: &self.dt,
            dt_bias: &self.dt_bias,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: &self.d,
            initial_state: None,
        }
    }
}

fn shape(len: usize) -> SsdShape {
    SsdShape {
        batch: 1,
        len,
        heads: HEADS,
        head_dim: HEAD_DIM,
        groups: 1,
        state: STATE,
    }
}

fn main() {
    let mut criterion = Criterion::default().sample_size(10).configure_from_args();
    let options = SsdOptions {
        chunk_len: CHUNK,
        dt_limit: (0.0, f64::INFINITY),
    };
    let mut group = criterion.benchmark_group("ssd_fwd");
    for len in [512, 2048] {
        let case = Case::new(len);
        let shape = shape(len);
        group.throughput(Throughput::Elements(len as u64));
        for threads in [1, 2] {
            let pool = ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for keep in [false, true] {
                let mut y = vec![0.0f32; len * HEADS * HEAD_DIM];
                let mut last = vec![0.0f32; shape.state_len()];
                let mut states = vec![0.0f32; shape.chunk_states_len(CHUNK)];
                let id = format!("L{len}/t{threads}/{}", if keep { "keep" } else { "infer" });
                group.bench_function(id, |bench| {
                    bench.iter(|| {
                        pool.install(|| {
                            let kept = keep.then_some(states.as_mut_slice());
                            ssd_forward(
                                &shape,
                                &case.inputs(),
                                &options,
                                &mut y,
                                Some(&mut last),
                                kept,
                            )
                            .unwrap();
                        });
                        black_box(&y);
                    })
                });
            }
        }
    }
    group.finish();
    let mut group = criterion.benchmark_group("ssd_step");
    let case = Case::new(1);
    let step_shape = shape(1).step_shape();
    let mut state = vec![0.0f32; shape(1).state_len()];
    let mut y = vec![0.0f32; HEADS * HEAD_DIM];
    group.throughput(Throughput::Elements(1));
    group.bench_function("all_heads/t1", |bench| {
        let inputs = SsdStepInputs {
            x: &case.x,
            dt: &case.dt,
            b: &case.b,
            c: &case.c,
            dt_bias: &case.dt_bias,
            a: &case.a,
            d: &case.d,
        };
        bench.iter(|| {
            ssd_step(&step_shape, 0..HEADS, &inputs, &options, &mut state, &mut y).unwrap();
            black_box(&y);
        })
    });
    group.finish();
    criterion.final_summary();
}
