//! Evaluation of a language model on a token sequence: the mean negative
//! log-likelihood per predicted token and the perplexity (the analogue of
//! llama-perplexity and lm-eval's loglikelihood).

use crate::error::{invalid, Result};
use crate::kernels::MatmulScalar;
use crate::model::Mamba;

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

/// Scores `ids` (one sequence) with one forward pass. `on_logits` sees the
/// logits of consecutive row blocks (rows, vocab), in order, for callers that
/// want to keep them.
pub fn perplexity<T: MatmulScalar>(
    model: &Mamba<T>,
    ids: &[u32],
    mut on_logits: impl FnMut(&[T]) -> Result<()>,
) -> Result<Perplexity> {
    if ids.len() < 2 {
        return Err(invalid(
            "perplexity",
            format!("needs at least 2 tokens, got {}", ids.len()),
        ));
    }
    let (d, v) = (model.config.d_model, model.config.vocab_size);
    let hidden = model.final_hidden(ids, 1, ids.len())?;
    let mut nll = 0.0f64;
    for start in (0..ids.len()).step_by(HEAD_ROWS) {
        let end = (start + HEAD_ROWS).min(ids.len());
        let logits = model.logits_from_hidden(&hidden[start * d..end * d])?;
        for t in start..end.min(ids.len() - 1) {
            let row = &logits[(t - start) * v..(t - start + 1) * v];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, x| m.max(x.to_f64()));
            let sum: f64 = row.iter().map(|x| (x.to_f64() - max).exp()).sum();
            nll += max + sum.ln() - row[ids[t + 1] as usize].to_f64();
        }
        on_logits(&logits)?;
    }
    let n = ids.len() - 1;
    let mean_nll = nll / n as f64;
    Ok(Perplexity {
        predicted_tokens: n,
        mean_nll,
        perplexity: mean_nll.exp(),
    })
}
