//! Measurement: the selective scan's kernels, prefill and decoding speed
//! (in the manner of llama-bench), inference cost against context length,
//! and whole training steps. Every result is
//! a measurement of this run; nothing here is asserted in a test.

pub mod generation;
pub mod scaling;
pub mod scan;
pub mod train;

pub use generation::{bench_generation, GenerationBench, Stats};
pub use scaling::{
    batch_throughput, context_scaling, ContextCost, ScalingReport, SyntheticContext,
};
pub use scan::{read_bandwidth, time_scan, ScanBenchInputs, ScanTiming};
pub use train::{bench_training, TrainingBench};
