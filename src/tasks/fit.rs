//! One training loop for models trained on real sequences (docs/DESIGN.md
//! §16.3): next-token models of DNA and audio, and sequence classifiers.
//! The caller says how a step's loss and gradients are made and how the
//! model is scored; the loop runs AdamW with warm-up and cosine decay and
//! global-norm clipping (as [`super::train_task`] does for the synthetic
//! tasks, whose batches come from a [`super::TaskSpec`]).

use std::time::Instant;

use serde::Serialize;

use super::data::{Answer, TaskBatch};
use super::train::AnswerScore;
use crate::error::{invalid, Result};
use crate::train::progress::{Reporter, StepLine};
use crate::train::{clip_global_norm, AdamW, AdamWConfig, LrSchedule, ParamTree, ProgressMode};

/// The optimiser's settings and how often to score.
#[derive(Clone, Debug, Serialize)]
pub struct FitSettings {
    pub steps: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta2: f64,
    /// AdamW's ε.
    pub adam_eps: f64,
    pub clip: f64,
    pub eval_every: usize,
    /// Stop once the held-out accuracy reaches this (None: run every step).
    pub stop_at_accuracy: Option<f64>,
    /// Tokens (or steps of input) a training step reads, for the display.
    pub tokens_per_step: usize,
    /// Steps between two progress lines when stderr is not a terminal.
    pub log_every: usize,
    #[serde(skip)]
    pub progress: ProgressMode,
}

/// A point of the training curve.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct FitPoint {
    pub step: usize,
    pub seconds: f64,
    /// Mean training loss since the previous point.
    pub train_loss: f64,
    pub eval_loss: f64,
    pub eval_accuracy: f64,
}

/// What [`fit`] did.
#[derive(Clone, Debug, Serialize)]
pub struct FitOutcome {
    pub curve: Vec<FitPoint>,
    /// Fewer than the steps asked for when the accuracy target was reached.
    pub steps_run: usize,
    pub wall_seconds: f64,
}

/// Trains `model` for `settings.steps` steps. `train_step(model, step)`
/// gives a batch's score and the gradients of its mean loss;
/// `evaluate(model)` scores the held-out data every `eval_every` steps and
/// at the end; `after_eval(model)` runs after each (e.g. saves it).
pub fn fit<M, P: ParamTree>(
    config: &P::Config,
    model: &mut M,
    params_of: impl Fn(&mut M) -> &mut P,
    settings: &FitSettings,
    mut train_step: impl FnMut(&M, usize) -> Result<(AnswerScore, P)>,
    mut evaluate: impl FnMut(&M) -> Result<AnswerScore>,
    mut after_eval: impl FnMut(&M) -> Result<()>,
) -> Result<FitOutcome> {
    const OP: &str = "fit";
    if settings.steps == 0 || settings.eval_every == 0 {
        return Err(invalid(OP, "steps and eval_every must be at least 1"));
    }
    if !(settings.lr > 0.0) {
        return Err(invalid(OP, "the learning rate must be positive"));
    }
    let mut opt = AdamW::<P>::new(
        config,
        AdamWConfig {
            beta1: 0.9,
            beta2: settings.beta2,
            eps: settings.adam_eps,
            weight_decay: settings.weight_decay,
        },
    );
    let schedule = LrSchedule {
        peak: settings.lr,
        min: settings.min_lr.min(settings.lr),
        warmup_steps: settings.warmup_steps.min(settings.steps),
        total_steps: settings.steps,
    };
    let t0 = Instant::now();
    let reporter = Reporter::new(settings.progress, 0, settings.steps, settings.log_every);
    let mut since = AnswerScore::default();
    let mut curve = Vec::new();
    let mut steps_run = 0;
    for step in 0..settings.steps {
        let (score, mut grads) = train_step(model, step)?;
        if !score.loss_sum.is_finite() {
            return Err(invalid(
                OP,
                format!("the loss is not finite at step {step}"),
            ));
        }
        clip_global_norm(config, &mut grads, settings.clip);
        let lr = schedule.lr(step);
        opt.update(config, params_of(model), &grads, lr)?;
        since.add(score);
        let done = step + 1;
        steps_run = done;
        let elapsed = t0.elapsed().as_secs_f64();
        reporter.step(&StepLine {
            step: done,
            total: settings.steps,
            loss: score.mean_loss() as f32,
            lr,
            tokens_per_second: (done * settings.tokens_per_step) as f64 / elapsed,
            seconds_left: elapsed / done as f64 * (settings.steps - done) as f64,
        });
        if done % settings.eval_every == 0 || done == settings.steps {
            let eval = evaluate(model)?;
            let point = FitPoint {
                step: done,
                seconds: t0.elapsed().as_secs_f64(),
                train_loss: since.mean_loss(),
                eval_loss: eval.mean_loss(),
                eval_accuracy: eval.accuracy(),
            };
            reporter.line(&format!(
                "step {done}: train loss {:.4}, held-out loss {:.4}, accuracy {:.2}%",
                point.train_loss,
                point.eval_loss,
                100.0 * point.eval_accuracy
            ));
            curve.push(point);
            since = AnswerScore::default();
            after_eval(model)?;
            if settings
                .stop_at_accuracy
                .is_some_and(|a| point.eval_accuracy >= a)
            {
                reporter.line(&format!(
                    "held-out accuracy reached the target: stopping at step {done}"
                ));
                break;
            }
        }
    }
    reporter.finish();
    Ok(FitOutcome {
        curve,
        steps_run,
        wall_seconds: t0.elapsed().as_secs_f64(),
    })
}

impl TaskBatch {
    /// Next-token prediction over windows of `len + 1` ids: the inputs are
    /// each window's first `len` ids and every position t answers with
    /// id t + 1, so the answer loss is the language-model loss.
    pub fn next_token(windows: &[&[u8]], len: usize) -> Result<TaskBatch> {
        if len == 0 || windows.is_empty() {
            return Err(invalid(
                "TaskBatch::next_token",
                "at least one window of at least 2 ids is needed",
            ));
        }
        let mut ids = Vec::with_capacity(windows.len() * len);
        let mut answers = Vec::with_capacity(windows.len() * len);
        for (row, w) in windows.iter().enumerate() {
            if w.len() != len + 1 {
                return Err(invalid(
                    "TaskBatch::next_token",
                    format!(
                        "window {row} holds {} ids, not len + 1 = {}",
                        w.len(),
                        len + 1
                    ),
                ));
            }
            ids.extend(w[..len].iter().map(|&v| v as u32));
            answers.extend((0..len).map(|position| Answer {
                row,
                position,
                token: w[position + 1] as u32,
            }));
        }
        Ok(TaskBatch {
            batch: windows.len(),
            len,
            ids,
            answers,
        })
    }
}
