//! Benchmarks of generation in the manner of llama-bench, for
//! `selective bench`: prefill tokens per second (logits for the last
//! position only) and decode tokens per second, over repetitions; and the
//! prefill time per token across sequence lengths (linear time).

use std::time::Instant;

use crate::error::{invalid, Result};
pub use crate::memory::{peak_resident_bytes, reset_peak_resident, resident_bytes};
use crate::nn::{DecodeBuffers, InferenceModel, Sequence};
use crate::rng::Rng;

/// Mean and sample standard deviation of repeated measurements.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Stats {
    pub mean: f64,
    pub sd: f64,
    pub samples: Vec<f64>,
}

impl Stats {
    pub fn of(samples: Vec<f64>) -> Self {
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n.max(1.0);
        let var = if samples.len() > 1 {
            samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Self {
            mean,
            sd: var.sqrt(),
            samples,
        }
    }
}

/// Tokens per second of prefill and decoding.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GenerationBench {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub reps: usize,
    /// prefill tokens per second
    pub prefill: Stats,
    /// decode tokens per second
    pub decode: Stats,
}

fn random_ids(n: usize, vocab: usize, rng: &mut Rng) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Times `reps` runs of: prefill `prompt_tokens` random tokens, then decode
/// `generated_tokens` steps (each feeding the greedy choice), after one
/// untimed warm-up run.
pub fn bench_generation(
    model: &InferenceModel,
    prompt_tokens: usize,
    generated_tokens: usize,
    reps: usize,
    seed: u64,
) -> Result<GenerationBench> {
    if prompt_tokens == 0 || reps == 0 {
        return Err(invalid(
            "bench_generation",
            "the prompt and the repetitions must be at least 1",
        ));
    }
    let mut rng = Rng::new(seed);
    let v = model.config.vocab_size;
    let mut buffers = DecodeBuffers::new(&model.config, 1);
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for rep in 0..=reps {
        let ids = random_ids(prompt_tokens, v, &mut rng);
        let mut seq = Sequence::new(&model.config);
        let t0 = Instant::now();
        model.prefill(&mut seq, &ids)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        for _ in 0..generated_tokens {
            let token = argmax(&seq.logits);
            model.decode_step(&mut [&mut seq], &[token], &mut buffers)?;
        }
        let decode_secs = t0.elapsed().as_secs_f64();
        if rep > 0 {
            prefill.push(prompt_tokens as f64 / prefill_secs);
            if generated_tokens > 0 {
                decode.push(generated_tokens as f64 / decode_secs);
            }
        }
    }
    Ok(GenerationBench {
        prompt_tokens,
        generated_tokens,
        reps,
        prefill: Stats::of(prefill),
        decode: Stats::of(decode),
    })
}

/// Prefill time of one sequence at one length.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PrefillTiming {
    pub len: usize,
    pub seconds: f64,
    pub microseconds_per_token: f64,
}

/// Times the prefill of one random sequence at each of `lengths` (the
/// shorter ones repeated until about `min_tokens` were processed, best run
/// kept).
pub fn prefill_scaling(
    model: &InferenceModel,
    lengths: &[usize],
    min_tokens: usize,
    seed: u64,
) -> Result<Vec<PrefillTiming>> {
    let mut rng = Rng::new(seed);
    let v = model.config.vocab_size;
    let mut out = Vec::new();
    for &len in lengths {
        let ids = random_ids(len, v, &mut rng);
        let reps = min_tokens.div_ceil(len.max(1)).max(1);
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let mut seq = Sequence::new(&model.config);
            let t0 = Instant::now();
            model.prefill(&mut seq, &ids)?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        out.push(PrefillTiming {
            len,
            seconds: best,
            microseconds_per_token: best * 1e6 / len as f64,
        });
    }
    Ok(out)
}
