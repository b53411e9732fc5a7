//! Timing whole training steps (forward, backward, clipping, AdamW) and
//! their peak memory, for `selective bench --train`.

use std::time::Instant;

use crate::bench::generation::{peak_resident_bytes, reset_peak_resident, Stats};
use crate::error::{invalid, Result};
use crate::rng::Rng;
use crate::train::{training_step, SingleProcess};
use crate::train::{AdamW, AdamWConfig, TrainableModel};

/// Training throughput at one sequence length.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainingBench {
    pub batch: usize,
    pub seq_len: usize,
    /// Steps timed (after the untimed warm-up step).
    pub steps: usize,
    /// Tokens (batch · seq_len) per second of whole steps, one sample per step.
    pub tokens_per_second: Stats,
    /// Peak resident memory of the process during these steps (Linux VmHWM
    /// after a reset of the high-water mark), in bytes; None where the
    /// system cannot say.
    pub peak_resident_bytes: Option<u64>,
}

/// Times `steps` training steps of a model of `config` (randomly
/// initialised from `seed`) on uniformly random token ids: one untimed
/// step first, then each step alone. The ids' values do not change the
/// work a step does.
pub fn bench_training<M: TrainableModel>(
    config: &M::Config,
    batch: usize,
    seq_len: usize,
    steps: usize,
    seed: u64,
) -> Result<TrainingBench> {
    if batch == 0 || seq_len < 2 || steps == 0 {
        return Err(invalid(
            "bench_training",
            format!("need batch ≥ 1, seq_len ≥ 2 and steps ≥ 1; got {batch}, {seq_len}, {steps}"),
        ));
    }
    // The parameters, gradients and moments of the previous length are
    // gone before the high-water mark is reset.
    reset_peak_resident();
    let mut model = M::init(config.clone(), seed)?;
    let mut optimizer = AdamW::<M::Params>::new(model.config(), AdamWConfig::default());
    let mut rng = Rng::new(seed ^ 0xBE_4C4);
    let vocab = model.vocab_size();
    let mut next_batch = || {
        Ok((0..batch * seq_len)
            .map(|_| rng.below(vocab) as u32)
            .collect())
    };
    let mut samples = Vec::with_capacity(steps);
    for step in 0..=steps {
        let t0 = Instant::now();
        let outcome = training_step(
            &mut model,
            &mut optimizer,
            1,
            &mut next_batch,
            (batch, seq_len),
            1e-3,
            1.0,
            &SingleProcess,
        )?;
        if !outcome.updated {
            return Err(invalid(
                "bench_training",
                format!(
                    "step {step}: loss {} or gradient norm {} not finite",
                    outcome.loss, outcome.grad_norm
                ),
            ));
        }
        if step > 0 {
            samples.push((batch * seq_len) as f64 / t0.elapsed().as_secs_f64());
        }
    }
    Ok(TrainingBench {
        batch,
        seq_len,
        steps,
        tokens_per_second: Stats::of(samples),
        peak_resident_bytes: peak_resident_bytes(),
    })
}
