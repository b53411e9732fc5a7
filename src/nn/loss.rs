//! Evaluation of a language model on a token sequence: the mean negative
//! log-likelihood per predicted token and the perplexity (the analogue of
//! llama-perplexity and lm-eval's loglikelihood).

use super::block::BlockScalar;
use crate::error::{invalid, Result};
use crate::float::Float;
use crate::kernels::MatmulScalar;
use crate::nn::{Mamba, Transformer};

/// Rows of logits computed at a time, so that memory stays
/// O(rows × vocab) instead of O(len × vocab).
const HEAD_ROWS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    /// Tokens predicted: every token but the first.
    pub predicted_tokens: usize,
    /// Mean of -ln p(token_t | tokens_<t) in nats.
    pub mean_nll: f64,
    /// exp(mean_nll)
    pub perplexity: f64,
}

/// A language model whose forward ends in a normalised hidden state and a
/// vocabulary head, so that it can be scored a few rows of logits at a
/// time: Mamba and the Transformer++.
pub trait LanguageModel<T> {
    fn vocab_size(&self) -> usize;
    fn d_model(&self) -> usize;
    /// The normalised final hidden state (batch, len, d_model).
    fn final_hidden(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<T>>;
    /// Logits (rows, vocab) of rows of [`Self::final_hidden`].
    fn logits_from_hidden(&self, hidden: &[T]) -> Result<Vec<T>>;
}

impl<T: BlockScalar> LanguageModel<T> for Mamba<T> {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn d_model(&self) -> usize {
        self.config.d_model
    }
    fn final_hidden(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<T>> {
        Mamba::final_hidden(self, ids, batch, len)
    }
    fn logits_from_hidden(&self, hidden: &[T]) -> Result<Vec<T>> {
        Mamba::logits_from_hidden(self, hidden)
    }
}

impl<T: MatmulScalar> LanguageModel<T> for Transformer<T> {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn d_model(&self) -> usize {
        self.config.d_model
    }
    fn final_hidden(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<T>> {
        Transformer::final_hidden(self, ids, batch, len)
    }
    fn logits_from_hidden(&self, hidden: &[T]) -> Result<Vec<T>> {
        Transformer::logits_from_hidden(self, hidden)
    }
}

/// Scores `ids` (one sequence) with one forward pass. `on_logits` sees the
/// logits of consecutive row blocks (rows, vocab), in order, for callers that
/// want to keep them.
pub fn perplexity<T: Float, M: LanguageModel<T>>(
    model: &M,
    ids: &[u32],
    mut on_logits: impl FnMut(&[T]) -> Result<()>,
) -> Result<Perplexity> {
    if ids.len() < 2 {
        return Err(invalid(
            "perplexity",
            format!("needs at least 2 tokens, got {}", ids.len()),
        ));
    }
    let (d, v) = (model.d_model(), model.vocab_size());
    let hidden = model.final_hidden(ids, 1, ids.len())?;
    let mut nll = 0.0f64;
    for start in (0..ids.len()).step_by(HEAD_ROWS) {
        let end = (start + HEAD_ROWS).min(ids.len());
        let logits = model.logits_from_hidden(&hidden[start * d..end * d])?;
        for t in start..end.min(ids.len() - 1) {
            let row = &logits[(t - start) * v..(t - start + 1) * v];
            nll += token_nll(row, ids[t + 1])?;
        }
        on_logits(&logits)?;
    }
    Ok(Perplexity::from_total_nll(nll, ids.len() - 1))
}

/// -ln softmax(logits)[target] in f64, for one row of logits.
pub fn token_nll<T: Float>(logits: &[T], target: u32) -> Result<f64> {
    let Some(target_logit) = logits.get(target as usize) else {
        return Err(invalid(
            "token_nll",
            format!(
                "target id {target} is not among the {} logits",
                logits.len()
            ),
        ));
    };
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, x| m.max(x.to_f64()));
    let sum: f64 = logits.iter().map(|x| (x.to_f64() - max).exp()).sum();
    Ok(max + sum.ln() - target_logit.to_f64())
}

impl Perplexity {
    /// From the summed NLL of `predicted_tokens` predictions.
    pub fn from_total_nll(total_nll: f64, predicted_tokens: usize) -> Self {
        let mean_nll = total_nll / predicted_tokens as f64;
        Self {
            predicted_tokens,
            mean_nll,
            perplexity: mean_nll.exp(),
        }
    }

    /// The perplexity of several texts (or windows of one) together: the
    /// mean over every prediction of all of them.
    pub fn of_parts(parts: &[Perplexity]) -> Self {
        let total: f64 = parts
            .iter()
            .map(|p| p.mean_nll * p.predicted_tokens as f64)
            .sum();
        Self::from_total_nll(total, parts.iter().map(|p| p.predicted_tokens).sum())
    }
}
