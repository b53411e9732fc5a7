//! What generation, scoring and the inference benchmarks need of a
//! language model prepared for inference, whatever carries its context:
//! the Mamba [`super::InferenceModel`]'s recurrent state, fixed in size, or
//! the [`super::TransformerInference`]'s KV cache, which grows by a row of
//! keys and one of values per token and layer (docs/DESIGN.md §9, §15).
//!
//! Both prefill a prompt through the parallel path and then decode a batch
//! of sequences a token at a time; everything above them (sampling, stop
//! strings, `selective generate`, `score`, `bench`) is written once over
//! this trait.

use crate::error::{invalid, Result};
use crate::kernels::{WeightFormat, Weights};
use crate::nn::loss::{token_nll, Perplexity};

/// One sequence's context as a decoder keeps it.
pub trait DecodingState {
    /// Logits (V) predicting the next token; empty before any token.
    fn logits(&self) -> &[f32];
    /// The logits and the most recent tokens (oldest first) at once, for a
    /// sampler with a repetition penalty.
    fn logits_and_recent(&mut self) -> (&[f32], &[u32]);
    /// Tokens seen so far.
    fn position(&self) -> u64;
    /// Bytes the context takes (the recurrent state, or the KV cache),
    /// without the logits and the recent tokens.
    fn context_bytes(&self) -> usize;
}

/// A language model that continues sequences token by token.
pub trait Decoder: Sync {
    type State: DecodingState + Send;
    /// Working memory of a decoding step, reused from step to step.
    type Buffers;

    /// Rows of the embedding and the head (the tokenizer may use fewer).
    fn vocab_rows(&self) -> usize;
    fn n_params(&self) -> usize;
    /// The format of the projection and embedding weights.
    fn format(&self) -> WeightFormat;
    /// Bytes of weights one decoding step reads.
    fn bytes_per_token(&self) -> usize;
    /// A sequence that has seen nothing.
    fn new_state(&self) -> Self::State;
    /// Buffers for decoding steps of up to `batch` sequences.
    fn new_buffers(&self, batch: usize) -> Self::Buffers;
    /// Runs `ids` after what `seq` has seen, leaving the logits after the
    /// last of them in `seq`.
    fn prefill(&self, seq: &mut Self::State, ids: &[u32]) -> Result<()>;
    /// Feeds `tokens[i]` to `seqs[i]` and leaves its next-token logits.
    fn decode_step(
        &self,
        seqs: &mut [&mut Self::State],
        tokens: &[u32],
        buffers: &mut Self::Buffers,
    ) -> Result<()>;
    /// Runs `ids` after what `seq` has seen through prefill, handing
    /// rmsnorm(h) (rows, D) of each chunk to `on_chunk` with the position
    /// of its first row (counted from this call's start), instead of
    /// computing logits.
    fn prefill_hidden(
        &self,
        seq: &mut Self::State,
        ids: &[u32],
        on_chunk: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()>;
    /// The vocabulary head (V, D).
    fn head(&self) -> &Weights;

    /// Mean negative log-likelihood of `ids` (one sequence) through
    /// prefill in chunks, the head applied a few rows at a time.
    fn perplexity(&self, ids: &[u32]) -> Result<Perplexity> {
        if ids.len() < 2 {
            return Err(invalid(
                "perplexity",
                format!("needs at least 2 tokens, got {}", ids.len()),
            ));
        }
        let mut seq = self.new_state();
        let mut nll = 0.0f64;
        self.prefill_hidden(&mut seq, ids, &mut |start, normed| {
            nll += chunk_nll(self.head(), normed, start, ids)?;
            Ok(())
        })?;
        Ok(Perplexity::from_total_nll(nll, ids.len() - 1))
    }

    /// The same through the decoding step, one token at a time: the path
    /// that generation takes (which for q8 differs from prefill's: 8-bit
    /// activations in the GEMV).
    fn perplexity_stepwise(&self, ids: &[u32]) -> Result<Perplexity> {
        if ids.len() < 2 {
            return Err(invalid(
                "perplexity_stepwise",
                format!("needs at least 2 tokens, got {}", ids.len()),
            ));
        }
        let mut seq = self.new_state();
        self.prefill(&mut seq, &ids[..1])?;
        let mut buffers = self.new_buffers(1);
        let mut nll = token_nll(seq.logits(), ids[1])?;
        for t in 1..ids.len() - 1 {
            self.decode_step(&mut [&mut seq], &[ids[t]], &mut buffers)?;
            nll += token_nll(seq.logits(), ids[t + 1])?;
        }
        Ok(Perplexity::from_total_nll(nll, ids.len() - 1))
    }
}

/// The summed −ln p(ids[t+1] | ids[..=t]) over the rows of one prefill
/// chunk: `normed` holds norm_f(h) (rows, D) of positions start.., and the
/// head is applied a few rows at a time so that memory stays
/// O(rows × vocab) rather than O(len × vocab).
fn chunk_nll(head: &Weights, normed: &[f32], start: usize, ids: &[u32]) -> Result<f64> {
    const HEAD_ROWS: usize = 256;
    let (d, v) = (head.cols(), head.rows());
    let rows = normed.len() / d.max(1);
    let mut logits = vec![0.0f32; HEAD_ROWS.min(rows) * v];
    let mut nll = 0.0;
    for r0 in (0..rows).step_by(HEAD_ROWS) {
        let r1 = (r0 + HEAD_ROWS).min(rows);
        let out = &mut logits[..(r1 - r0) * v];
        head.matmul_xwt(&normed[r0 * d..r1 * d], r1 - r0, out, false)?;
        for (i, row) in out.chunks(v).enumerate() {
            let t = start + r0 + i;
            if t + 1 >= ids.len() {
                break;
            }
            nll += token_nll(row, ids[t + 1])?;
        }
    }
    Ok(nll)
}

/// Appends `ids` to a sequence's most recent tokens, keeping the last
/// `keep` (a fixed number, so that a saved state has a fixed size).
pub(crate) fn remember_tokens(
    recent: &mut std::collections::VecDeque<u32>,
    keep: usize,
    ids: &[u32],
) {
    let skip = ids.len().saturating_sub(keep);
    for &id in &ids[skip..] {
        if recent.len() == keep {
            recent.pop_front();
        }
        recent.push_back(id);
    }
}
