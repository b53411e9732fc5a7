//! Inference cost against context length, for Mamba and the Transformer++
//! side by side (the paper's Figure 8, `selective bench --scaling --arch`):
//! prefill time per token at length L, decoding time per token after L
//! tokens of context, the memory that context takes, and decoding
//! throughput at batch sizes 1 … 32.
//!
//! The decoding timings start from a synthetic context: the state (Mamba)
//! or the KV cache (Transformer) is filled with random values for L
//! positions instead of being prefilled, because what a decoding step
//! costs depends on how much context there is and not on its values, and
//! prefilling 2^16 tokens through attention would take most of the run.

use std::time::Instant;

use crate::error::{invalid, Result};
use crate::nn::{Decoder, DecodingState, KvSequence, MambaConfig, Sequence, TransformerConfig};
use crate::rng::Rng;

/// A decoder whose context can be made up for timing: L positions of
/// random state or random keys and values.
pub trait SyntheticContext: Decoder {
    fn synthetic_state(&self, positions: usize, rng: &mut Rng) -> Self::State;
}

impl SyntheticContext for crate::nn::InferenceModel {
    /// The recurrent state has the same size at every position: random
    /// values of the scale a trained model's states have (|h| ~ 1).
    fn synthetic_state(&self, positions: usize, rng: &mut Rng) -> Sequence {
        random_mamba_state(&self.config, positions, rng)
    }
}

impl SyntheticContext for crate::nn::TransformerInference {
    fn synthetic_state(&self, positions: usize, rng: &mut Rng) -> KvSequence {
        random_kv_cache(&self.config, positions, rng)
    }
}

fn random_mamba_state(config: &MambaConfig, positions: usize, rng: &mut Rng) -> Sequence {
    let mut seq = Sequence::new(config);
    for layer in &mut seq.layers {
        layer.conv = rng.vec(layer.conv.len(), |r| r.normal());
        layer.ssm = rng.vec(layer.ssm.len(), |r| r.normal());
    }
    seq.position = positions as u64;
    seq
}

fn random_kv_cache(config: &TransformerConfig, positions: usize, rng: &mut Rng) -> KvSequence {
    let mut seq = KvSequence::new(config);
    let values = positions * config.n_head * config.head_dim;
    for cache in &mut seq.caches {
        cache.keys = rng.vec(values, |r| r.normal());
        cache.values = rng.vec(values, |r| r.normal());
    }
    seq.position = positions as u64;
    seq
}

/// The cost of inference at one context length.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ContextCost {
    pub len: usize,
    /// Prefill of L tokens (one sequence, logits for the last position
    /// only), in µs per token; None where it was skipped (see `skipped`).
    pub prefill_us_per_token: Option<f64>,
    /// Mean time of a decoding step after L tokens of context, in µs.
    pub decode_us_per_token: f64,
    /// Bytes the context of one sequence takes after L tokens.
    pub context_bytes: usize,
}

/// Decoding throughput of a batch.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BatchThroughput {
    pub batch: usize,
    /// Context each sequence had seen before the timed steps.
    pub context: usize,
    /// Generated tokens per second over the whole batch.
    pub tokens_per_second: f64,
    /// Bytes of all the batch's contexts.
    pub context_bytes: usize,
}

/// What [`context_scaling`] measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ScalingReport {
    pub lengths: Vec<ContextCost>,
    /// Why the prefill of the longer lengths was skipped, if it was.
    pub prefill_skipped: Option<String>,
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best }) as u32
}

/// Mean seconds of `steps` decoding steps of `seqs` (after two untimed).
fn time_decoding<M: Decoder>(
    model: &M,
    seqs: &mut [M::State],
    steps: usize,
    rng: &mut Rng,
) -> Result<f64> {
    let mut buffers = model.new_buffers(seqs.len());
    let v = model.vocab_rows();
    let mut tokens: Vec<u32> = seqs.iter().map(|_| rng.below(v) as u32).collect();
    let mut elapsed = 0.0;
    for step in 0..steps + 2 {
        let mut refs: Vec<&mut M::State> = seqs.iter_mut().collect();
        let t0 = Instant::now();
        model.decode_step(&mut refs, &tokens, &mut buffers)?;
        if step >= 2 {
            elapsed += t0.elapsed().as_secs_f64();
        }
        for (t, s) in tokens.iter_mut().zip(seqs.iter()) {
            *t = argmax(s.logits());
        }
    }
    Ok(elapsed / steps as f64)
}

/// At each of `lengths` (increasing): the prefill time per token (best of
/// enough runs to process about `min_tokens`; once one length's prefill
/// takes longer than `prefill_limit_s` seconds, the longer ones are
/// skipped and the report says why), the decoding time per token after
/// that much synthetic context (mean of `steps` steps), and the context's
/// bytes.
pub fn context_scaling<M: SyntheticContext>(
    model: &M,
    lengths: &[usize],
    min_tokens: usize,
    prefill_limit_s: f64,
    steps: usize,
    seed: u64,
) -> Result<ScalingReport> {
    if steps == 0 || lengths.contains(&0) {
        return Err(invalid(
            "context_scaling",
            "lengths and decoding steps must be at least 1",
        ));
    }
    let mut rng = Rng::new(seed);
    let v = model.vocab_rows();
    let mut rows = Vec::new();
    let mut prefill_skipped: Option<String> = None;
    for &len in lengths {
        let mut prefill_us_per_token = None;
        if prefill_skipped.is_none() {
            let ids: Vec<u32> = (0..len).map(|_| rng.below(v) as u32).collect();
            let reps = min_tokens.div_ceil(len).max(1);
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let mut seq = model.new_state();
                let t0 = Instant::now();
                model.prefill(&mut seq, &ids)?;
                best = best.min(t0.elapsed().as_secs_f64());
            }
            prefill_us_per_token = Some(best * 1e6 / len as f64);
            if best > prefill_limit_s {
                prefill_skipped = Some(format!(
                    "the prefill of {len} tokens took {best:.1} s, over the limit of {prefill_limit_s} s; longer prefills were not run"
                ));
            }
        }
        let mut seqs = vec![model.synthetic_state(len, &mut rng)];
        let context_bytes = seqs[0].context_bytes();
        let decode = time_decoding(model, &mut seqs, steps, &mut rng)?;
        rows.push(ContextCost {
            len,
            prefill_us_per_token,
            decode_us_per_token: decode * 1e6,
            context_bytes,
        });
    }
    Ok(ScalingReport {
        lengths: rows,
        prefill_skipped,
    })
}

/// Decoding throughput of each batch size, every sequence after `context`
/// tokens of synthetic context, over `steps` steps.
pub fn batch_throughput<M: SyntheticContext>(
    model: &M,
    batches: &[usize],
    context: usize,
    steps: usize,
    seed: u64,
) -> Result<Vec<BatchThroughput>> {
    if steps == 0 || batches.contains(&0) {
        return Err(invalid(
            "batch_throughput",
            "batch sizes and decoding steps must be at least 1",
        ));
    }
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for &batch in batches {
        let mut seqs: Vec<M::State> = (0..batch)
            .map(|_| model.synthetic_state(context, &mut rng))
            .collect();
        let context_bytes = seqs.iter().map(DecodingState::context_bytes).sum();
        let step_s = time_decoding(model, &mut seqs, steps, &mut rng)?;
        out.push(BatchThroughput {
            batch,
            context,
            tokens_per_second: batch as f64 / step_s,
            context_bytes,
        });
    }
    Ok(out)
}
