//! Choosing the next token from a model's logits, as in the official Mamba
//! `generation.py`: repetition penalty, temperature, top-k, top-p, min-p,
//! then a seeded draw.
//!
//! The filters run in this order on one vocabulary-sized row of logits:
//! 1. repetition penalty (CTRL, Keskar et al. 2019, as `generation.py`):
//!    for each distinct token among the last `repetition_window` of the
//!    recent tokens, a positive logit is divided by the penalty and a
//!    negative one multiplied by it. A token is penalised once however
//!    often it occurs.
//! 2. temperature: logits / temperature. Temperature 0 (or top-k 1) is
//!    greedy: the argmax, lowest index on ties, with no random draw.
//! 3. top-k: keep the k most likely tokens (lowest index on ties).
//! 4. top-p: keep the smallest set of most likely tokens whose probability
//!    (renormalised over what top-k kept) sums to at least top_p, within
//!    f32 rounding; at least one token.
//! 5. min-p: keep tokens whose probability is at least min_p times the
//!    maximum probability. The official implementation reads
//!    `logits[..., 0]` as the maximum, which is whatever token 0's logit is,
//!    not the maximum (and a logit, not a probability); here it is the true
//!    maximum. As a ratio to the maximum it does not depend on the
//!    renormalisations before it.
//! 6. a draw from the kept tokens, renormalised, by inverse CDF with one
//!    uniform from the sampler's seeded [`Rng`].
//!
//! Non-finite logits: NaN counts as -inf (that token is never chosen);
//! +inf is an error, as is a row with no finite logit.
//!
//! Padding ids: a model's embedding is often padded past its tokenizer's
//! vocabulary (50277 tokens in 50280 rows for GPT-NeoX; to a multiple of 8
//! in `train`), and those rows have logits like any other. With a vocabulary
//! size given ([`Sampler::sample_within`]) the draw is made over the whole
//! row first; if it lands on a padding id it is made again over the real ids
//! alone (`logits[..vocab]`). A token the first draw chooses is kept, so the
//! output is the same as without the limit wherever no padding id is drawn;
//! with temperature alone the result is exactly the distribution with the
//! padding masked (p(x) + p(pad) p(x) / (1 - p(pad)) = p(x) / (1 - p(pad))).
//! Greedy takes the argmax of the real ids.
//!
//! Cost for a vocabulary of n, all O(n) and allocation-free once the
//! [`Sampler`]'s scratch buffers have grown: one copy, one vectorised pass of
//! a polynomial exp (the library `exp` is a call per element) unless top-k
//! leaves only k tokens; top-k keeps a buffer of 2k candidates above a
//! rising threshold; top-p histograms the weights by their float bits and
//! sorts only the tokens in the bucket where the mass crosses top_p; the
//! draw sums blocks of weights and walks into one.

use crate::error::{invalid, Result};
use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Divides the logits; 0 means greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = off, 1 = greedy.
    pub top_k: usize,
    /// Nucleus: keep the most likely tokens up to this much probability;
    /// in (0, 1], 1 = off.
    pub top_p: f32,
    /// Keep tokens at least this fraction as likely as the most likely one;
    /// in [0, 1], 0 = off.
    pub min_p: f32,
    /// > 0; 1 = off. Above 1 discourages repeating recent tokens.
    pub repetition_penalty: f32,
    /// How many of the most recent tokens the penalty looks at.
    pub repetition_window: usize,
    /// Seeds the sampler's random number generator.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_window: 64,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Always the most likely token (after any repetition penalty).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// True when sampling takes the argmax and draws nothing.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    pub fn validate(&self) -> Result<()> {
        const OP: &str = "SamplingConfig";
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(invalid(
                OP,
                format!(
                    "temperature must be a finite number >= 0 (0 = greedy), got {}",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid(
                OP,
                format!("top_p must be in (0, 1] (1 = off), got {}", self.top_p),
            ));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(invalid(
                OP,
                format!("min_p must be in [0, 1] (0 = off), got {}", self.min_p),
            ));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(invalid(
                OP,
                format!(
                    "repetition_penalty must be a finite number > 0 (1 = off), got {}",
                    self.repetition_penalty
                ),
            ));
        }
        Ok(())
    }
}

/// A token still in the running, in the sparse (top-k) path or in top-p's
/// boundary bucket: `score` orders candidates (a logit or a weight, both
/// monotone in probability), `weight` is exp(scaled logit - max) in (0, 1].
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    score: f32,
    weight: f32,
}

/// Most likely first; lowest id first among equals, so ties are decided the
/// same way on every platform.
fn rank(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.score.total_cmp(&a.score).then(a.id.cmp(&b.id))
}

/// Scaled logits (minus the maximum) below this get weight 0: exp(-87) is
/// about 1.6e-38 of the most likely token's weight, the smallest normal f32.
const EXP_CUTOFF: f32 = -87.0;

/// Top-p compares sums of f32 weights with a threshold; this much relative
/// slack makes a set that sums to top_p exactly in real numbers count as
/// enough despite rounding.
const TOP_P_SLACK: f64 = 1e-6;

/// Top-p buckets weights in (0, 1] by their f32 bits without the low 19:
/// the exponent and 4 mantissa bits, 16 buckets per octave, in order of
/// weight. 1.0 is the largest key.
const BUCKET_SHIFT: u32 = 19;
const BUCKETS: usize = (0x3F80_0000u32 >> BUCKET_SHIFT) as usize + 1;

/// The inverse CDF walks the dense weights in blocks of this many, summing
/// each block (vectorised) before looking inside the one that holds the draw.
const DRAW_BLOCK: usize = 256;

#[derive(Default)]
struct Scratch {
    /// (vocab,) logits after NaN -> -inf and the repetition penalty; in the
    /// dense path then overwritten by the kept weights (0 = dropped).
    weights: Vec<f32>,
    /// The sparse path's kept tokens; top-p's boundary bucket in the dense one.
    candidates: Vec<Candidate>,
    /// (BUCKETS,) weight per top-p bucket.
    bucket_mass: Vec<f64>,
}

/// What the filters left, and where.
enum Filtered {
    Greedy(u32),
    /// Kept tokens are `scratch.candidates` (top-k ran).
    Sparse {
        total_weight: f64,
    },
    /// Kept tokens are the nonzero entries of `scratch.weights`.
    Dense {
        total_weight: f64,
    },
}

pub struct Sampler {
    config: SamplingConfig,
    rng: Rng,
    scratch: Scratch,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Result<Self> {
        config.validate()?;
        let rng = Rng::new(config.seed);
        Ok(Self {
            config,
            rng,
            scratch: Scratch::default(),
        })
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// The generator the draws come from (to save its state, or to check
    /// that greedy sampling left it alone).
    pub fn rng(&self) -> &Rng {
        &self.rng
    }

    /// The next token for one row of logits (vocab,), given the tokens so far
    /// (`recent`, oldest first; only the last `repetition_window` matter).
    /// Greedy configurations draw no random number.
    pub fn sample(&mut self, logits: &[f32], recent: &[u32]) -> Result<u32> {
        self.sample_all(logits, recent)
    }

    /// As [`Sampler::sample`], never choosing an id at or above `vocab`
    /// (padding rows of the embedding; see the module notes).
    pub fn sample_within(&mut self, logits: &[f32], recent: &[u32], vocab: usize) -> Result<u32> {
        check_vocab(logits, vocab)?;
        let token = self.sample_all(logits, recent)?;
        if (token as usize) < vocab {
            return Ok(token);
        }
        self.sample_all(&logits[..vocab], recent)
    }

    /// The probabilities (vocab,) that [`Sampler::sample_within`] draws
    /// from: the first draw's, with the padding ids' mass spread by the
    /// second draw's distribution over the real ids. Padding ids get 0.
    pub fn distribution_within(
        &self,
        logits: &[f32],
        recent: &[u32],
        vocab: usize,
    ) -> Result<Vec<f32>> {
        check_vocab(logits, vocab)?;
        let mut probs = self.distribution(logits, recent)?;
        let padding_mass: f64 = probs[vocab..].iter().map(|&p| p as f64).sum();
        if padding_mass > 0.0 {
            let second = self.distribution(&logits[..vocab], recent)?;
            for (p, q) in probs.iter_mut().zip(second) {
                *p = (*p as f64 + padding_mass * q as f64) as f32;
            }
        }
        probs[vocab..].fill(0.0);
        Ok(probs)
    }

    fn sample_all(&mut self, logits: &[f32], recent: &[u32]) -> Result<u32> {
        let filtered = filter(&self.config, logits, recent, &mut self.scratch)?;
        Ok(match filtered {
            Filtered::Greedy(id) => id,
            Filtered::Sparse { total_weight } => {
                let target = self.rng.uniform() * total_weight;
                draw_sparse(&self.scratch.candidates, target)
            }
            Filtered::Dense { total_weight } => {
                let target = self.rng.uniform() * total_weight;
                draw_dense(&self.scratch.weights, target)
            }
        })
    }

    /// The probabilities (vocab,) that [`Sampler::sample`] draws from, after
    /// every filter and renormalisation; one-hot when greedy. Pure: it does
    /// not touch the random number generator.
    pub fn distribution(&self, logits: &[f32], recent: &[u32]) -> Result<Vec<f32>> {
        let mut scratch = Scratch::default();
        let mut probs = vec![0.0f32; logits.len()];
        match filter(&self.config, logits, recent, &mut scratch)? {
            Filtered::Greedy(id) => probs[id as usize] = 1.0,
            Filtered::Sparse { total_weight } => {
                for c in &scratch.candidates {
                    probs[c.id as usize] = (c.weight as f64 / total_weight) as f32;
                }
            }
            Filtered::Dense { total_weight } => {
                for (p, &w) in probs.iter_mut().zip(&scratch.weights) {
                    *p = (w as f64 / total_weight) as f32;
                }
            }
        }
        Ok(probs)
    }
}

fn check_vocab(logits: &[f32], vocab: usize) -> Result<()> {
    if vocab == 0 || vocab > logits.len() {
        return Err(invalid(
            "Sampler::sample_within",
            format!(
                "vocabulary size {vocab} must be in 1..={} (the logits row)",
                logits.len()
            ),
        ));
    }
    Ok(())
}

/// Inverse CDF over the candidates in their order.
fn draw_sparse(candidates: &[Candidate], target: f64) -> u32 {
    let mut cumulative = 0.0f64;
    for c in candidates {
        cumulative += c.weight as f64;
        if target < cumulative {
            return c.id;
        }
    }
    // Rounding left the target at the very top: the last kept token.
    candidates
        .last()
        .expect("filter keeps at least one token")
        .id
}

/// Inverse CDF over the vocabulary in id order, skipping whole blocks.
fn draw_dense(weights: &[f32], target: f64) -> u32 {
    let mut cumulative = 0.0f64;
    let mut last_kept = None;
    for (b, block) in weights.chunks(DRAW_BLOCK).enumerate() {
        let block_weight = sum_f64(block);
        if block_weight > 0.0 {
            last_kept = Some(b);
        }
        if target < cumulative + block_weight {
            for (j, &w) in block.iter().enumerate() {
                cumulative += w as f64;
                if target < cumulative {
                    return (b * DRAW_BLOCK + j) as u32;
                }
            }
            // The sequential sum fell short of the block's sum by rounding:
            // carry on from the next block.
        } else {
            cumulative += block_weight;
        }
    }
    // Rounding left the target at the very top: the last kept token.
    let b = last_kept.expect("filter keeps at least one token");
    let block = &weights[b * DRAW_BLOCK..(b * DRAW_BLOCK + DRAW_BLOCK).min(weights.len())];
    let j = block
        .iter()
        .rposition(|&w| w > 0.0)
        .expect("block has weight");
    (b * DRAW_BLOCK + j) as u32
}

/// Sum in f64, in 8 independent lanes so that it vectorises.
fn sum_f64(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v as f64;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    lanes.iter().sum::<f64>() + tail
}

/// Maximum of NaN-free values, in 8 lanes so that it vectorises.
fn max_f32(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// exp(x) for x in [EXP_CUTOFF, 0], about 1 ulp, branch-free so that loops
/// over it vectorise (the library exp is a call per element): x = k ln2 + r
/// with |r| <= ln2 / 2, exp(r) by its Taylor series to r^6 (relative error
/// below 2e-7), times 2^k built from the exponent bits. exp(0) is exactly 1.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that k * LN2_HI is exact for the k that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer (to nearest) in the low bits.
    const ROUND: f32 = 12_582_912.0;
    let k = (x * LOG2_E + ROUND) - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // k is in [-126, 0], so 2^k is a normal f32.
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    p * scale
}

/// Runs penalty, temperature, top-k, top-p and min-p; says where the kept
/// tokens' weights are.
fn filter(
    config: &SamplingConfig,
    logits: &[f32],
    recent: &[u32],
    scratch: &mut Scratch,
) -> Result<Filtered> {
    const OP: &str = "Sampler";
    if logits.is_empty() {
        return Err(invalid(OP, "no logits to sample from"));
    }
    if logits.len() > u32::MAX as usize {
        return Err(invalid(OP, "more logits than u32 token ids"));
    }

    let penalised = &mut scratch.weights;
    penalised.clear();
    penalised.extend(
        logits
            .iter()
            .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l }),
    );

    if config.repetition_penalty != 1.0 {
        let window = &recent[recent.len().saturating_sub(config.repetition_window)..];
        for &id in window {
            let Some(&original) = logits.get(id as usize) else {
                return Err(invalid(
                    OP,
                    format!(
                        "recent token {id} is outside the vocabulary of {}",
                        logits.len()
                    ),
                ));
            };
            if original.is_nan() {
                continue;
            }
            // From the original logit, so a repeated token is penalised once.
            penalised[id as usize] = if original < 0.0 {
                original * config.repetition_penalty
            } else {
                original / config.repetition_penalty
            };
        }
    }

    let max_logit = max_f32(penalised);
    if max_logit == f32::INFINITY {
        let at = penalised.iter().position(|&l| l == max_logit).unwrap_or(0);
        return Err(invalid(OP, format!("logit of token {at} is +inf")));
    }
    if max_logit == f32::NEG_INFINITY {
        return Err(invalid(
            OP,
            "every logit is -inf or NaN: no token can be chosen",
        ));
    }
    if config.is_greedy() {
        // The first maximum: lowest index on ties.
        let best = penalised.iter().position(|&l| l == max_logit).unwrap_or(0);
        return Ok(Filtered::Greedy(best as u32));
    }

    if config.top_k > 0 && config.top_k < logits.len() {
        filter_sparse(config, max_logit, scratch)
    } else {
        Ok(filter_dense(config, max_logit, scratch))
    }
}

/// Top-k on: select the k largest penalised logits in one pass, then the
/// other filters on those k.
fn filter_sparse(
    config: &SamplingConfig,
    max_logit: f32,
    scratch: &mut Scratch,
) -> Result<Filtered> {
    let k = config.top_k;
    let candidates = &mut scratch.candidates;
    candidates.clear();
    // Keep a buffer of up to 2k tokens above a threshold; when it fills,
    // cut it to the best k and raise the threshold to the k-th logit. Ids
    // only grow, so a later token equal to the threshold ranks below it
    // (lowest id wins ties) and strict > is right. Tokens at -inf never enter.
    let mut threshold = f32::NEG_INFINITY;
    for (i, &l) in scratch.weights.iter().enumerate() {
        if l > threshold {
            candidates.push(Candidate {
                id: i as u32,
                score: l,
                weight: 0.0,
            });
            if candidates.len() == 2 * k {
                candidates.select_nth_unstable_by(k - 1, rank);
                candidates.truncate(k);
                threshold = candidates[k - 1].score;
            }
        }
    }
    candidates.sort_unstable_by(rank);
    candidates.truncate(k);

    // Weights, and the normaliser top-p measures against: the top k.
    let mut top_k_weight = 0.0f64;
    for c in candidates.iter_mut() {
        let scaled = (c.score - max_logit) / config.temperature;
        c.weight = if scaled >= EXP_CUTOFF {
            exp_nonpositive(scaled)
        } else {
            0.0
        };
        top_k_weight += c.weight as f64;
    }
    if config.top_p < 1.0 {
        let threshold = (config.top_p as f64 - TOP_P_SLACK) * top_k_weight;
        let mut cumulative = 0.0f64;
        let keep = candidates
            .iter()
            .position(|c| {
                cumulative += c.weight as f64;
                cumulative >= threshold
            })
            .map_or(candidates.len(), |j| j + 1);
        candidates.truncate(keep);
    }
    // min_p times the maximum's weight, which is 1.
    let min_weight = config.min_p;
    candidates.retain(|c| c.weight > 0.0 && c.weight >= min_weight);
    let total_weight = candidates.iter().map(|c| c.weight as f64).sum();
    Ok(Filtered::Sparse { total_weight })
}

/// Top-k off: weights for the whole vocabulary, top-p by buckets of weight
/// (only the bucket where the mass crosses top_p is sorted), min-p by a
/// threshold. Dropped tokens get weight 0.
fn filter_dense(config: &SamplingConfig, max_logit: f32, scratch: &mut Scratch) -> Filtered {
    let weights = &mut scratch.weights;
    let temperature = config.temperature;
    for w in weights.iter_mut() {
        let scaled = (*w - max_logit) / temperature;
        // Clamped so that the exp stays in its range; the select zeroes
        // what was below it (and -inf).
        let e = exp_nonpositive(scaled.max(EXP_CUTOFF));
        *w = if scaled >= EXP_CUTOFF { e } else { 0.0 };
    }

    if config.top_p < 1.0 {
        let all_weight = sum_f64(weights);
        let threshold = (config.top_p as f64 - TOP_P_SLACK) * all_weight;
        top_p_dense(
            weights,
            threshold,
            &mut scratch.bucket_mass,
            &mut scratch.candidates,
        );
    }

    if config.min_p > 0.0 {
        // min_p times the maximum's weight, which is 1.
        let min_weight = config.min_p;
        for w in weights.iter_mut() {
            *w = if *w >= min_weight { *w } else { 0.0 };
        }
    }
    Filtered::Dense {
        total_weight: sum_f64(weights),
    }
}

/// Zeroes all but the smallest most-likely set of `weights` whose sum
/// reaches `threshold`.
fn top_p_dense(
    weights: &mut [f32],
    threshold: f64,
    bucket_mass: &mut Vec<f64>,
    boundary: &mut Vec<Candidate>,
) {
    let key = |w: f32| (w.to_bits() >> BUCKET_SHIFT) as usize;
    bucket_mass.clear();
    bucket_mass.resize(BUCKETS, 0.0);
    for &w in weights.iter() {
        bucket_mass[key(w)] += w as f64;
    }
    // The bucket where the cumulative mass, from the top, reaches the threshold.
    let mut above = 0.0f64;
    let mut crossing = None;
    for b in (1..BUCKETS).rev() {
        if above + bucket_mass[b] >= threshold {
            crossing = Some(b);
            break;
        }
        above += bucket_mass[b];
    }
    // Bucket 0 holds only weight 0 (dropped already); rounding that never
    // reaches the threshold keeps everything.
    let Some(crossing) = crossing else { return };

    // Within the crossing bucket, the most likely until the threshold.
    boundary.clear();
    for (i, w) in weights.iter_mut().enumerate() {
        let k = key(*w);
        if k == crossing {
            boundary.push(Candidate {
                id: i as u32,
                score: *w,
                weight: *w,
            });
        }
        if k < crossing {
            *w = 0.0;
        }
    }
    boundary.sort_unstable_by(rank);
    let mut cumulative = above;
    let keep = boundary
        .iter()
        .position(|c| {
            cumulative += c.weight as f64;
            cumulative >= threshold
        })
        .map_or(boundary.len(), |j| j + 1);
    for c in &boundary[keep..] {
        weights[c.id as usize] = 0.0;
    }
}
