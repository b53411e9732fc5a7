//! Text generation: sampling the next token of each sequence from its
//! logits, feeding it back through the decoder (any [`Decoder`]: Mamba's
//! recurrent state or a Transformer's KV cache), for a batch of
//! sequences at once, until each reaches its token limit, the end-of-text
//! token, or a stop the caller decides (stop strings).
//!
//! ```
//! use selective::generate::{generate, GenerateOptions};
//! use selective::kernels::WeightFormat;
//! use selective::nn::{InferenceModel, Mamba, Sequence};
//! use selective::generate::sampling::SamplingConfig;
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/models/tiny-hf");
//! let model = InferenceModel::from_mamba(Mamba::<f32>::from_dir(dir)?, WeightFormat::F32)?;
//! let mut seq = Sequence::new(&model.config);
//! model.prefill(&mut seq, &[3, 1, 4, 1, 5])?;
//! let options = GenerateOptions { max_new_tokens: 8, eos: None, sampling: SamplingConfig::greedy(), vocab_size: None };
//! let out = generate(&model, std::slice::from_mut(&mut seq), &options, |_, _| Ok(true))?;
//! assert_eq!(out.tokens[0].len(), 8);
//! # Ok::<(), selective::Error>(())
//! ```

use std::time::Instant;

use crate::error::{invalid, Result};
use crate::generate::sampling::{Sampler, SamplingConfig};
use crate::nn::{Decoder, DecodingState};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Tokens to generate per sequence at most.
    pub max_new_tokens: usize,
    /// Stop a sequence when it produces this token (it is kept in the output).
    pub eos: Option<u32>,
    /// Sequence i samples with seed `sampling.seed + i`.
    pub sampling: SamplingConfig,
    /// The tokenizer's vocabulary size: ids at or above it are padding rows
    /// of the embedding and are never sampled. None: every row is a token.
    pub vocab_size: Option<usize>,
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    MaxTokens,
    Eos,
    /// The caller's `on_token` returned false (a stop string, say).
    Stopped,
}

#[derive(Clone, Debug)]
pub struct GenerationOutput {
    /// The generated tokens of each sequence.
    pub tokens: Vec<Vec<u32>>,
    pub finish: Vec<FinishReason>,
    /// Decoding steps run (each for all sequences still active).
    pub steps: usize,
    /// Wall time of sampling and decoding.
    pub seconds: f64,
}

impl GenerationOutput {
    /// Generated tokens per second over all sequences.
    pub fn tokens_per_second(&self) -> f64 {
        let n: usize = self.tokens.iter().map(Vec::len).sum();
        n as f64 / self.seconds.max(1e-12)
    }
}

/// Generates from each of `seqs`, which must have seen at least one token
/// (their logits predict the next). `on_token(i, token)` sees each token
/// as soon as it is sampled and returns whether sequence i goes on.
///
/// Every generated token, the last included, is fed to its sequence before
/// returning, so each sequence's state covers its whole text and its logits
/// predict what comes next: the state can be saved and continued.
pub fn generate<M: Decoder>(
    model: &M,
    seqs: &mut [M::State],
    options: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<bool>,
) -> Result<GenerationOutput> {
    const OP: &str = "generate";
    if let Some(i) = seqs.iter().position(|s| s.logits().is_empty()) {
        return Err(invalid(
            OP,
            format!("sequence {i} is empty: prefill at least one token first"),
        ));
    }
    let mut samplers = (0..seqs.len())
        .map(|i| {
            Sampler::new(SamplingConfig {
                seed: options.sampling.seed.wrapping_add(i as u64),
                ..options.sampling.clone()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let start = Instant::now();
    let mut tokens = vec![Vec::new(); seqs.len()];
    let mut finish: Vec<Option<FinishReason>> = vec![None; seqs.len()];
    let mut buffers = model.new_buffers(seqs.len());
    let mut steps = 0;
    let mut active: Vec<usize> = if options.max_new_tokens == 0 {
        Vec::new()
    } else {
        (0..seqs.len()).collect()
    };
    while !active.is_empty() {
        let mut step_tokens = Vec::with_capacity(active.len());
        for &i in &active {
            let (logits, recent) = seqs[i].logits_and_recent();
            let token = match options.vocab_size {
                Some(vocab) => samplers[i].sample_within(logits, recent, vocab),
                None => samplers[i].sample(logits, recent),
            }?;
            tokens[i].push(token);
            step_tokens.push(token);
            let go_on = on_token(i, token)?;
            finish[i] = if options.eos == Some(token) {
                Some(FinishReason::Eos)
            } else if !go_on {
                Some(FinishReason::Stopped)
            } else if tokens[i].len() >= options.max_new_tokens {
                Some(FinishReason::MaxTokens)
            } else {
                None
            };
        }
        {
            // Feed the sampled tokens of every sequence active this step.
            let mut refs: Vec<&mut M::State> = seqs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| active.contains(i))
                .map(|(_, s)| s)
                .collect();
            model.decode_step(&mut refs, &step_tokens, &mut buffers)?;
        }
        steps += 1;
        active.retain(|&i| finish[i].is_none());
    }
    Ok(GenerationOutput {
        tokens,
        finish: finish
            .into_iter()
            .map(|f| f.unwrap_or(FinishReason::MaxTokens))
            .collect(),
        steps,
        seconds: start.elapsed().as_secs_f64(),
    })
}
