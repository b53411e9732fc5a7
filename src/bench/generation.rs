//! Benchmarks of generation in the manner of llama-bench, for
//! `selective bench`: prefill tokens per second (logits for the last
//! position only) and decode tokens per second, over repetitions (the
//! cost against context length is [`super::scaling`]).

use std::time::Instant;

use crate::error::{invalid, Result};
pub use crate::memory::{peak_resident_bytes, reset_peak_resident, resident_bytes};
use crate::nn::{Decoder, DecodingState};
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
pub fn bench_generation<M: Decoder>(
    model: &M,
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
    let v = model.vocab_rows();
    let mut buffers = model.new_buffers(1);
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for rep in 0..=reps {
        let ids = random_ids(prompt_tokens, v, &mut rng);
        let mut seq = model.new_state();
        let t0 = Instant::now();
        model.prefill(&mut seq, &ids)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        for _ in 0..generated_tokens {
            let token = argmax(seq.logits());
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
