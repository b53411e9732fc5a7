//! Training and evaluation on the synthetic tasks: cross-entropy and
//! accuracy on the answer positions only, AdamW with warm-up and cosine
//! decay, and the length-extrapolation evaluation of induction heads in
//! constant memory.

use std::time::Instant;

use serde::Serialize;

use super::data::{InductionSequence, TaskBatch, TaskKind, TaskSpec};
use super::fit::{fit, FitSettings};
use super::model::TaskScalar;
use super::network::{ChunkReader, TaskNetConfig, TaskNetwork};
use crate::error::{invalid, Result};
use crate::float::Float;
use crate::memory::peak_resident_bytes;
use crate::rng::Rng;
use crate::train::ProgressMode;
use std::path::PathBuf;

/// Summed cross-entropy and the number of correct argmax predictions over
/// some answers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AnswerScore {
    /// Σ over answers of -log softmax(logits)[answer]
    pub loss_sum: f64,
    pub correct: usize,
    pub count: usize,
}

impl AnswerScore {
    pub fn add(&mut self, other: AnswerScore) {
        self.loss_sum += other.loss_sum;
        self.correct += other.correct;
        self.count += other.count;
    }

    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.count.max(1) as f64
    }

    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.count.max(1) as f64
    }
}

/// What the training loss's gradient is taken of: L = scale · Σ over
/// answers of the cross-entropy against the target distribution
/// q = (1 - ε)·onehot(answer) + ε/V (label smoothing; ε = 0 is plain
/// cross-entropy).
#[derive(Clone, Copy, Debug)]
struct LossGradient {
    scale: f64,
    label_smoothing: f64,
}

/// Scores logits rows (A, V) against their answers (plain cross-entropy
/// and argmax accuracy); with `gradient`, also returns dL/dlogits =
/// scale · (softmax(logits) - q).
fn score_logits<T: TaskScalar>(
    logits: &[T],
    vocab: usize,
    targets: &[u32],
    gradient: Option<LossGradient>,
) -> (AnswerScore, Vec<T>) {
    let mut score = AnswerScore::default();
    let mut grad = if gradient.is_some() {
        vec![T::ZERO; logits.len()]
    } else {
        Vec::new()
    };
    for (i, &target) in targets.iter().enumerate() {
        let l = &logits[i * vocab..(i + 1) * vocab];
        // argmax, first on ties
        let best = (0..vocab).fold(0, |b, j| if l[j] > l[b] { j } else { b });
        let max = l[best].to_f64();
        let sum: f64 = l.iter().map(|&v| (v.to_f64() - max).exp()).sum();
        let log_z = max + sum.ln();
        score.loss_sum += log_z - l[target as usize].to_f64();
        score.correct += usize::from(best == target as usize);
        score.count += 1;
        if let Some(LossGradient {
            scale,
            label_smoothing: eps,
        }) = gradient
        {
            let uniform = eps / vocab as f64;
            let g = &mut grad[i * vocab..(i + 1) * vocab];
            for (gv, &v) in g.iter_mut().zip(l) {
                *gv = <T as Float>::from_f64(((v.to_f64() - log_z).exp() - uniform) * scale);
            }
            g[target as usize] -= <T as Float>::from_f64((1.0 - eps) * scale);
        }
    }
    (score, grad)
}

fn check_batch(vocab: usize, batch: &TaskBatch) -> Result<()> {
    const OP: &str = "answer loss";
    if batch.answers.is_empty() {
        return Err(invalid(OP, "the batch has no answer positions"));
    }
    for a in &batch.answers {
        if a.row >= batch.batch || a.position >= batch.len {
            return Err(invalid(
                OP,
                format!(
                    "answer at row {} position {} is outside the batch ({} x {})",
                    a.row, a.position, batch.batch, batch.len
                ),
            ));
        }
        if a.token as usize >= vocab {
            return Err(invalid(
                OP,
                format!(
                    "answer token {} is outside the vocabulary of {vocab}",
                    a.token
                ),
            ));
        }
    }
    Ok(())
}

/// The logits rows (answers, V) of the answer positions of `logits`
/// (batch, len, V).
fn answer_logits<T: TaskScalar>(logits: &[T], vocab: usize, batch: &TaskBatch) -> Vec<T> {
    let mut rows = Vec::with_capacity(batch.answers.len() * vocab);
    for a in &batch.answers {
        let r = a.row * batch.len + a.position;
        rows.extend_from_slice(&logits[r * vocab..(r + 1) * vocab]);
    }
    rows
}

/// Mean cross-entropy over the answers of `batch` and the gradient with
/// respect to every parameter of the mean cross-entropy against labels
/// smoothed by `label_smoothing` (0: the plain cross-entropy whose value is
/// returned).
pub fn answer_loss_and_grads<T: TaskScalar, M: TaskNetwork<T>>(
    model: &M,
    batch: &TaskBatch,
    label_smoothing: f64,
) -> Result<(AnswerScore, M::Params)> {
    let v = model.vocab_size();
    check_batch(v, batch)?;
    if !(0.0..1.0).contains(&label_smoothing) {
        return Err(invalid(
            "answer loss",
            format!("label smoothing must be in [0, 1); got {label_smoothing}"),
        ));
    }
    let (logits, cache) = model.forward_with_cache(&batch.ids, batch.batch, batch.len)?;
    let targets: Vec<u32> = batch.answers.iter().map(|a| a.token).collect();
    let gradient = LossGradient {
        scale: 1.0 / targets.len() as f64,
        label_smoothing,
    };
    let (score, d_answers) = score_logits(
        &answer_logits(&logits, v, batch),
        v,
        &targets,
        Some(gradient),
    );
    // dL/dlogits: the answers' rows, zero elsewhere (an answer position
    // named twice gets both gradients)
    let mut d_logits = vec![T::ZERO; logits.len()];
    for (a, g) in batch.answers.iter().zip(d_answers.chunks(v)) {
        let r = a.row * batch.len + a.position;
        for (dst, &x) in d_logits[r * v..(r + 1) * v].iter_mut().zip(g) {
            *dst += x;
        }
    }
    let grads = model.backward_from_logits(&batch.ids, &cache, &d_logits)?;
    Ok((score, grads))
}

/// The score of `batch` by the plain forward (no cache kept).
pub fn answer_score<T: TaskScalar, M: TaskNetwork<T>>(
    model: &M,
    batch: &TaskBatch,
) -> Result<AnswerScore> {
    let v = model.vocab_size();
    check_batch(v, batch)?;
    let logits = model.logits(&batch.ids, batch.batch, batch.len)?;
    let targets: Vec<u32> = batch.answers.iter().map(|a| a.token).collect();
    Ok(score_logits(&answer_logits(&logits, v, batch), v, &targets, None).0)
}

/// Everything a training run needs; `C` is the model's configuration
/// (a [`crate::tasks::TaskModelConfig`] or, for attention, a
/// [`crate::nn::TransformerConfig`]).
#[derive(Clone, Serialize)]
pub struct TrainSettings<C: TaskNetConfig> {
    pub spec: TaskSpec,
    pub model: C,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta2: f64,
    /// AdamW's ε (PyTorch's default 1e-8). Once the loss is near 0 the
    /// gradients fall towards ε and the updates fade with them; a smaller ε
    /// keeps the steps normalised.
    pub adam_eps: f64,
    pub clip: f64,
    /// ε of the label smoothing in the training loss (0: plain
    /// cross-entropy). Plain cross-entropy stops pulling once every answer
    /// is right with a wide margin; smoothed labels ask for the same finite
    /// margin at every gap length, so a memory that fades over the gap
    /// still has a gradient.
    pub label_smoothing: f64,
    pub seed: u64,
    pub eval_every: usize,
    /// Examples in the fixed validation set evaluated every `eval_every` steps.
    pub eval_examples: usize,
    /// Stop once the validation accuracy reaches this (None: run every step).
    pub stop_at_accuracy: Option<f64>,
    /// Start from this model's weights instead of a fresh initialisation
    /// (its configuration must equal `model`): a curriculum, e.g. a model
    /// trained on short sequences trained further on longer ones.
    #[serde(skip)]
    pub init: Option<C::Model>,
    /// Where the weights are saved (atomically) at every evaluation, so
    /// that a long run stopped midway can be continued with `--init`.
    #[serde(skip)]
    pub save_dir: Option<PathBuf>,
    #[serde(skip)]
    pub progress: ProgressMode,
}

/// A point of the training curve.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CurvePoint {
    pub step: usize,
    /// mean training loss since the previous point
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
}

/// The result of [`train_task`].
pub struct TrainOutcome<M> {
    pub model: M,
    pub curve: Vec<CurvePoint>,
    pub steps_run: usize,
    pub wall_seconds: f64,
}

/// Scores `examples` examples from `seed` in batches of at most `batch`.
pub fn evaluate<T: TaskScalar, M: TaskNetwork<T>>(
    model: &M,
    spec: &TaskSpec,
    examples: usize,
    batch: usize,
    seed: u64,
) -> Result<AnswerScore> {
    let mut rng = Rng::new(seed);
    let mut score = AnswerScore::default();
    let mut left = examples;
    while left > 0 {
        let b = left.min(batch.max(1));
        score.add(answer_score(model, &spec.sample(b, &mut rng)?)?);
        left -= b;
    }
    Ok(score)
}

/// Seed offsets keep the training stream, the validation set and the test
/// set apart for one `seed`.
pub const VALIDATION_SEED_OFFSET: u64 = 0x5EED_0001;
pub const TEST_SEED_OFFSET: u64 = 0x5EED_0002;

/// Trains a fresh model on `settings.spec`.
pub fn train_task<C: TaskNetConfig>(settings: &TrainSettings<C>) -> Result<TrainOutcome<C::Model>> {
    const OP: &str = "train_task";
    settings.spec.validate()?;
    if settings.model.vocab_size() < settings.spec.vocab {
        return Err(invalid(
            OP,
            format!(
                "model vocabulary {} is smaller than the task's {}",
                settings.model.vocab_size(),
                settings.spec.vocab
            ),
        ));
    }
    if settings.steps == 0 || settings.batch == 0 || settings.eval_every == 0 {
        return Err(invalid(
            OP,
            "steps, batch and eval_every must be at least 1",
        ));
    }
    if !(settings.lr > 0.0) {
        return Err(invalid(OP, "the learning rate must be positive"));
    }
    if !(settings.adam_eps > 0.0) {
        return Err(invalid(OP, "AdamW's ε must be positive"));
    }
    // what a step keeps at once, at least: the blocks' caches for the
    // backward and the hidden states, in f32
    let tokens = settings.batch as u128 * settings.spec.input_len() as u128;
    let per_token = settings.model.training_values_per_token();
    crate::memory::check_fits(
        OP,
        tokens * per_token * 4,
        &format!(
            "a training step of batch {} x {} tokens (seq_len {} + 2 x memorize {})",
            settings.batch,
            settings.spec.input_len(),
            settings.spec.seq_len,
            settings.spec.memorize
        ),
        "--batch, --seq-len or --memorize",
    )?;
    let mut model = match &settings.init {
        Some(m) if *m.config() != settings.model => {
            return Err(invalid(
                OP,
                format!(
                    "the initial model's configuration {:?} differs from the run's {:?}",
                    m.config(),
                    settings.model
                ),
            ))
        }
        Some(m) => m.clone(),
        None => settings.model.init(settings.seed)?,
    };
    let fit_settings = FitSettings {
        steps: settings.steps,
        lr: settings.lr,
        min_lr: settings.min_lr,
        warmup_steps: settings.warmup_steps,
        weight_decay: settings.weight_decay,
        beta2: settings.beta2,
        adam_eps: settings.adam_eps,
        clip: settings.clip,
        eval_every: settings.eval_every,
        stop_at_accuracy: settings.stop_at_accuracy,
        tokens_per_step: settings.batch * settings.spec.input_len(),
        log_every: 50,
        progress: settings.progress,
    };
    let mut rng = Rng::new(settings.seed.wrapping_add(1));
    let val_seed = settings.seed.wrapping_add(VALIDATION_SEED_OFFSET);
    let outcome = fit(
        &settings.model,
        &mut model,
        |m| m.params_mut(),
        &fit_settings,
        |m, _| {
            let batch = settings.spec.sample(settings.batch, &mut rng)?;
            answer_loss_and_grads(m, &batch, settings.label_smoothing)
        },
        |m| evaluate(m, &settings.spec, settings.eval_examples, 64, val_seed),
        |m| match &settings.save_dir {
            Some(dir) => m.save(dir),
            None => Ok(()),
        },
    )?;
    Ok(TrainOutcome {
        model,
        curve: outcome
            .curve
            .iter()
            .map(|p| CurvePoint {
                step: p.step,
                train_loss: p.train_loss,
                val_loss: p.eval_loss,
                val_accuracy: p.eval_accuracy,
            })
            .collect(),
        steps_run: outcome.steps_run,
        wall_seconds: outcome.wall_seconds,
    })
}

/// Accuracy of induction heads at one test length.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LengthResult {
    pub length: usize,
    pub samples: usize,
    pub accuracy: f64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// The process's peak resident memory after this length (VmHWM).
    pub peak_resident_bytes: Option<u64>,
    /// The context of the batch evaluated together at the end of its
    /// sequences: the recurrent state (a fixed size) or the KV cache.
    pub context_bytes: usize,
}

/// A test length that was not run, and why.
#[derive(Clone, Debug, Serialize)]
pub struct LengthNotRun {
    pub length: usize,
    pub reason: String,
}

/// What [`evaluate_induction_lengths`] measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LengthSweep {
    pub results: Vec<LengthResult>,
    /// Lengths past the first one that could not be run (time, memory,
    /// or positions the model cannot represent), in order.
    pub not_run: Vec<LengthNotRun>,
}

/// How the long sequences are run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalMode {
    /// Chunks of `chunk` tokens continuing from the carried state.
    Chunked,
    /// One token at a time with the step kernels.
    Step,
}

impl std::str::FromStr for EvalMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "chunked" => Ok(EvalMode::Chunked),
            "step" => Ok(EvalMode::Step),
            _ => Err(invalid(
                "EvalMode",
                format!("unknown evaluation mode {s:?} (expected chunked or step)"),
            )),
        }
    }
}

/// How [`evaluate_induction_lengths`] runs the sequences.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LengthEvalOptions {
    /// Sequences per length.
    pub samples: usize,
    /// Sequences run together.
    pub batch: usize,
    /// Tokens per chunk in chunked mode.
    pub chunk: usize,
    pub mode: EvalMode,
    /// Sequences of each length come from `seed` + length.
    pub seed: u64,
    /// Once a length's projected time (from the last one run, linear in
    /// the length for a recurrence, quadratic for attention) is over this
    /// many seconds, it and the longer lengths are not run.
    pub time_limit_s: Option<f64>,
}

/// Induction-heads accuracy at every length of `lengths`, the sequences
/// generated chunk by chunk and read from a carried context: for an SSM
/// the recurrent state, so that memory does not grow with the length; for
/// attention the KV cache, which does. A length whose context cannot fit
/// in memory, or that the time limit rules out, ends the sweep with the
/// reason in [`LengthSweep::not_run`].
pub fn evaluate_induction_lengths<T: TaskScalar, M: TaskNetwork<T>>(
    model: &M,
    vocab: usize,
    lengths: &[usize],
    options: &LengthEvalOptions,
    mut on_result: impl FnMut(&LengthResult),
) -> Result<LengthSweep> {
    const OP: &str = "evaluate_induction_lengths";
    let LengthEvalOptions {
        samples,
        batch,
        chunk,
        time_limit_s,
        ..
    } = *options;
    if samples == 0 || batch == 0 || chunk == 0 {
        return Err(invalid(OP, "samples, batch and chunk must be at least 1"));
    }
    if vocab > model.vocab_size() {
        return Err(invalid(
            OP,
            format!(
                "task vocabulary {vocab} exceeds the model's {}",
                model.vocab_size()
            ),
        ));
    }
    let mut sweep = LengthSweep::default();
    let mut last: Option<(usize, f64)> = None;
    for (i, &length) in lengths.iter().enumerate() {
        let b = batch.min(samples);
        let not_run = if let Some(reason) = model_cannot_read(model, length) {
            Some(reason)
        } else if let Err(e) = crate::memory::check_fits(
            OP,
            model.context_bytes_at(length) as u128 * b as u128,
            &format!("the context of {b} sequences of {length} tokens"),
            "--eval-batch",
        ) {
            Some(e.to_string())
        } else {
            match (time_limit_s, last) {
                (Some(limit), Some((prev, seconds))) => {
                    let ratio = length as f64 / prev as f64;
                    let power = if M::COST_GROWS_WITH_CONTEXT { 2 } else { 1 };
                    let projected = seconds * ratio.powi(power);
                    (projected > limit).then(|| {
                        format!(
                            "projected {projected:.0} s ({seconds:.1} s at {prev} times ({length}/{prev})^{power}), over the limit of {limit} s"
                        )
                    })
                }
                _ => None,
            }
        };
        if let Some(reason) = not_run {
            sweep.not_run.push(LengthNotRun { length, reason });
            sweep.not_run.extend(lengths[i + 1..].iter().map(|&longer| {
                LengthNotRun {
                    length: longer,
                    reason: model_cannot_read(model, longer)
                        .unwrap_or_else(|| format!("longer than {length}, which was not run")),
                }
            }));
            break;
        }
        let result = evaluate_one_length(model, vocab, length, options)?;
        last = Some((length, result.seconds));
        on_result(&result);
        sweep.results.push(result);
    }
    Ok(sweep)
}

/// Why a model cannot read a sequence of `length` tokens at all, if it
/// cannot (learned positions end at their table).
fn model_cannot_read<T: TaskScalar, M: TaskNetwork<T>>(model: &M, length: usize) -> Option<String> {
    let table = model.max_positions()?;
    (length > table)
        .then(|| format!("{length} tokens are past the {table} learned positions of the model"))
}

fn evaluate_one_length<T: TaskScalar, M: TaskNetwork<T>>(
    model: &M,
    vocab: usize,
    length: usize,
    options: &LengthEvalOptions,
) -> Result<LengthResult> {
    let t0 = Instant::now();
    let mut rng = Rng::new(options.seed.wrapping_add(length as u64));
    let mut score = AnswerScore::default();
    let mut left = options.samples;
    let mut context_bytes = 0;
    while left > 0 {
        let b = left.min(options.batch);
        let mut seqs = (0..b)
            .map(|_| InductionSequence::new(vocab, length, &mut rng))
            .collect::<Result<Vec<_>>>()?;
        let mut reader = model.reader(b, options.mode)?;
        let mut last_hidden = Vec::new();
        while seqs[0].remaining() > 0 {
            let n = match options.mode {
                EvalMode::Chunked => options.chunk.min(seqs[0].remaining()),
                EvalMode::Step => 1,
            };
            let mut ids = Vec::with_capacity(b * n);
            for s in seqs.iter_mut() {
                ids.extend(s.next_chunk(n));
            }
            let hidden = reader.read(&ids, n)?;
            if seqs[0].remaining() == 0 {
                // the last position of every row
                let d = hidden.len() / (b * n);
                last_hidden = (0..b)
                    .flat_map(|r| hidden[(r * n + n - 1) * d..(r * n + n) * d].iter().copied())
                    .collect();
            }
        }
        context_bytes = reader.context_bytes();
        let logits = model.logits_from_hidden(&last_hidden)?;
        let targets: Vec<u32> = seqs.iter().map(|s| s.answer()).collect();
        score.add(score_logits(&logits, model.vocab_size(), &targets, None).0);
        left -= b;
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(LengthResult {
        length,
        samples: options.samples,
        accuracy: score.accuracy(),
        seconds,
        tokens_per_second: (options.samples * length) as f64 / seconds,
        peak_resident_bytes: peak_resident_bytes(),
        context_bytes,
    })
}

/// Whether a task is induction heads (the one with length extrapolation).
pub fn has_length_extrapolation(kind: TaskKind) -> bool {
    kind == TaskKind::InductionHeads
}
