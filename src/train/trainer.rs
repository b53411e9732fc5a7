//! The training loop: settings, evaluation, checkpoints and resuming.
//!
//! A run directory holds
//! ```text
//! config.json            every training setting (TrainConfig)
//! metrics.jsonl          one JSON object per step, and one per evaluation
//! loss.png               training and validation loss, redrawn at each evaluation
//! checkpoint/            the latest checkpoint, replaced whole (see below)
//!   config.json            model config, Hugging Face dialect (+ "tokenizer": "bytes")
//!   model.safetensors      weights, f32, Hugging Face names
//!   tokenizer.json         when the run uses one
//!   optimizer.safetensors  AdamW moments: exp_avg.NAME, exp_avg_sq.NAME
//!   trainer_state.json     step, data generator state, tokens seen
//! model/                 the final model (what `selective generate --model` reads)
//! ```
//! A checkpoint is written whole into `.checkpoint.tmp/`, then swapped in
//! by renames; a crash between the two renames leaves `.checkpoint.old/`,
//! which resuming falls back to.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::data::{random_windows, DataFingerprint, TextData};
use super::distributed::{
    check_group_size, check_same_on_every_rank, fingerprint_f32, fnv1a_64, share,
    tree_all_reduce_sum, ProcessGroup, SingleProcess,
};
use super::model::TrainableModel;
use super::optimizer::{add_into, clip_global_norm, global_norm, AdamW, AdamWConfig, ParamTree};
use super::progress::{ProgressMode, Reporter, StepLine};
use super::schedule::LrSchedule;
use crate::error::{invalid, Error, Result};
use crate::generate::tokenizer::{CharVocab, Tokenizer};
use crate::io::{encode, read_object, write_atomically, write_safetensors};
use crate::io::{DType, SafetensorsFile, TensorSource};
use crate::nn::Transformer;
use crate::nn::{next_token_cross_entropy, Architecture, Mamba, MambaConfig, Positions, SsdConfig};
use crate::plot::{self, Chart, Series};
use crate::rng::Rng;

/// Every setting of a run; written to `RUN/config.json`, and readable from
/// a JSON file with any subset of the fields (the rest take the defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The model: "mamba", "mamba2" or "transformer" (the Transformer++
    /// baseline).
    pub arch: Architecture,
    /// The training text.
    pub data: PathBuf,
    /// A Hugging Face tokenizer.json; none: byte-level (vocabulary 256),
    /// or characters with `char_vocab`.
    pub tokenizer: Option<PathBuf>,
    /// A character vocabulary: the distinct characters of the training
    /// text, as nanoGPT's shakespeare_char (65 for Tiny Shakespeare, padded
    /// to 72 ids).
    pub char_vocab: bool,
    pub d_model: usize,
    pub n_layer: usize,
    pub d_state: usize,
    pub expand: usize,
    /// Mamba-2: channels per head (P), groups of B and C (G), and the SSD's
    /// chunk length.
    pub head_dim: usize,
    pub n_groups: usize,
    pub chunk_size: usize,
    /// Transformer: attention heads (head_dim d_model / n_head).
    pub n_head: usize,
    /// Transformer: the SwiGLU width; None: 8 d_model / 3 rounded up to 8.
    pub d_ff: Option<usize>,
    /// Transformer: "rotary" or "learned" (seq_len positions).
    pub positions: Positions,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence (seq_len − 1 predictions each).
    pub seq_len: usize,
    /// Optimizer steps in the whole run.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub min_lr: f64,
    /// None: 10% of the steps.
    pub warmup_steps: Option<usize>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    /// Maximum global gradient norm; 0 turns clipping off.
    pub grad_clip: f64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Evaluate on the validation split every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Batches of batch_size windows per evaluation.
    pub eval_batches: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Log line every this many steps when stderr is not a terminal.
    pub log_every: usize,
    /// Fraction of the tokens (the last ones) held out for validation.
    pub val_fraction: f64,
    pub seed: u64,
}

impl Default for TrainConfig {
    /// "char-small": a byte-level model of d_model 256, 4 layers, N = 16.
    fn default() -> Self {
        let adam = AdamWConfig::default();
        Self {
            arch: Architecture::Mamba,
            data: PathBuf::new(),
            tokenizer: None,
            char_vocab: false,
            d_model: 256,
            n_layer: 4,
            d_state: 16,
            expand: 2,
            head_dim: 64,
            n_groups: 1,
            chunk_size: 256,
            n_head: 4,
            d_ff: None,
            positions: Positions::Rotary,
            batch_size: 16,
            seq_len: 256,
            steps: 1000,
            lr: 2e-3,
            min_lr: 1e-5,
            warmup_steps: None,
            weight_decay: adam.weight_decay,
            beta1: adam.beta1,
            beta2: adam.beta2,
            adam_eps: adam.eps,
            grad_clip: 1.0,
            grad_accum: 1,
            eval_every: 100,
            eval_batches: 10,
            save_every: 500,
            log_every: 10,
            val_fraction: 0.1,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// Reads a JSON file of settings (unknown fields are errors).
    pub fn from_file(path: &Path) -> Result<Self> {
        read_object(path, "a training config")
    }

    pub fn warmup(&self) -> usize {
        self.warmup_steps.unwrap_or(self.steps / 10)
    }

    pub fn schedule(&self) -> LrSchedule {
        LrSchedule {
            peak: self.lr,
            min: self.min_lr,
            warmup_steps: self.warmup(),
            total_steps: self.steps,
        }
    }

    /// An error before any work when a training step of these settings
    /// cannot fit in the memory available: at least the parameters with
    /// their gradients and AdamW moments (4 copies), the blocks' caches for
    /// the backward, and the logits with their gradient, in f32, for a
    /// vocabulary of at least `vocab_size` (the tokenizer's is not known
    /// yet where this is called).
    pub fn check_memory(&self, vocab_size: usize) -> Result<()> {
        let (per_layer, n_params) = self.model_size(vocab_size)?;
        let tokens = self.batch_size as u128 * self.seq_len as u128;
        let per_token = self.n_layer as u128 * per_layer + 2 * vocab_size as u128;
        let weights = 4 * n_params as u128;
        crate::memory::check_fits(
            "train",
            (tokens * per_token + weights) * 4,
            &format!(
                "a training step of batch_size {} x seq_len {} on d_model {}, n_layer {}",
                self.batch_size, self.seq_len, self.d_model, self.n_layer
            ),
            "--batch-size (with --grad-accum to keep the tokens per step), --seq-len or the model size",
        )
    }

    /// Values cached per token and layer, and parameters, of the model
    /// these settings describe.
    /// An error where the settings make no valid model of their `arch`.
    fn model_size(&self, vocab_size: usize) -> Result<(u128, usize)> {
        fn of<M: TrainableModel>(s: &TrainConfig, vocab_size: usize) -> Result<(u128, usize)> {
            let c = M::config_of(s, vocab_size)?;
            Ok((M::cached_values_per_token(&c), M::n_params_of(&c)))
        }
        match self.arch {
            Architecture::Mamba | Architecture::Mamba2 => of::<Mamba<f32>>(self, vocab_size),
            Architecture::Transformer => of::<Transformer<f32>>(self, vocab_size),
        }
    }

    /// The Mamba model these settings describe, for a vocabulary of
    /// `vocab_size` ids (with arch "mamba" or "mamba2").
    pub fn model_config(&self, vocab_size: usize) -> MambaConfig {
        let mut c = MambaConfig::new(self.d_model, self.n_layer, vocab_size, self.d_state);
        c.expand = self.expand;
        c.d_inner = self.expand * self.d_model;
        if self.arch == Architecture::Mamba2 {
            let mut ssd = SsdConfig::new(self.head_dim, self.n_groups);
            ssd.chunk_size = self.chunk_size;
            c.ssd = Some(ssd);
        }
        c
    }

    /// Checks every setting, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(invalid("train", m));
        if self.data.as_os_str().is_empty() {
            return bad("no training text: give --data FILE".into());
        }
        for (name, v) in [
            ("d_model", self.d_model),
            ("n_layer", self.n_layer),
            ("d_state", self.d_state),
            ("expand", self.expand),
            ("n_head", self.n_head),
            ("batch_size", self.batch_size),
            ("steps", self.steps),
            ("grad_accum", self.grad_accum),
            ("eval_batches", self.eval_batches),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if self.char_vocab && self.tokenizer.is_some() {
            return bad("give either a tokenizer.json or char_vocab, not both".into());
        }
        if self.seq_len < 2 {
            return bad(format!(
                "seq_len must be at least 2 (one prediction), got {}",
                self.seq_len
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr must be a positive number, got {}", self.lr));
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad(format!(
                "min_lr must be in [0, lr = {}], got {}",
                self.lr, self.min_lr
            ));
        }
        if self.warmup() > self.steps {
            return bad(format!(
                "warmup_steps {} is more than steps {}",
                self.warmup(),
                self.steps
            ));
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("{name} must be in [0, 1), got {v}"));
            }
        }
        // NaN fails every comparison: `(0.0..).contains` rejects it.
        let positive = self.adam_eps.is_finite() && self.adam_eps > 0.0;
        let non_negative =
            (0.0..).contains(&self.weight_decay) && (0.0..).contains(&self.grad_clip);
        if !positive || !non_negative {
            return bad(format!(
                "adam_eps must be positive and weight_decay, grad_clip non-negative; got {}, {}, {}",
                self.adam_eps, self.weight_decay, self.grad_clip
            ));
        }
        if !(0.0..1.0).contains(&self.val_fraction) || self.val_fraction == 0.0 {
            return bad(format!(
                "val_fraction must be in (0, 1), got {}",
                self.val_fraction
            ));
        }
        // the model's sizes through the gate a config.json passes, before
        // model_config forms expand x d_model
        crate::nn::config::check_sizes(
            "train",
            &[
                ("d_model", self.d_model),
                ("n_layer", self.n_layer),
                ("d_state", self.d_state),
                ("expand", self.expand),
                ("n_head", self.n_head),
                ("d_ff", self.d_ff.unwrap_or(1)),
                ("batch_size", self.batch_size),
                ("seq_len", self.seq_len),
            ],
            || self.d_model as u128 * self.expand.max(self.d_ff.unwrap_or(1)) as u128,
        )?;
        self.model_size(256).map(drop)
    }

    fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// What a checkpoint records besides weights and moments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// The data generator's state: where the stream of windows continues.
    pub data_rng_state: u64,
    pub tokens_seen: u64,
    pub last_loss: Option<f32>,
    pub last_val_loss: Option<f32>,
    /// The training text when the run started ([`DataFingerprint`]);
    /// absent in checkpoints written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataFingerprint>,
}

/// How to resume (not part of the run's settings).
#[derive(Clone, Debug, Default)]
pub struct ResumeOptions {
    /// Continue although the training text differs from the one the run
    /// started with (its size or hash); it must still encode with the
    /// run's vocabulary.
    pub allow_changed_data: bool,
}

/// How to run (not part of the run's settings).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stop (with a checkpoint) once this many steps are done, to continue
    /// later with [`Trainer::resume`]; the schedule still spans all steps.
    pub stop_after: Option<usize>,
    pub progress: ProgressMode,
}

/// What one call of [`Trainer::run`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    pub start_step: usize,
    pub end_step: usize,
    /// Training loss of every step taken, in order.
    pub losses: Vec<f32>,
    /// (step, validation loss) of every evaluation.
    pub val_losses: Vec<(usize, f32)>,
    /// Training tokens (batch · seq_len · grad_accum per step) per second
    /// of training steps (evaluations and checkpoints excluded).
    pub tokens_per_second: f64,
    pub seconds: f64,
    /// All `steps` are done and `RUN/model` is written.
    pub finished: bool,
}

/// A run in progress: model, optimizer, data and position. `M` is the
/// architecture, which must be the run's `arch` setting (the command line
/// reads the setting and picks `M`).
pub struct Trainer<M: TrainableModel = Mamba<f32>> {
    pub config: TrainConfig,
    pub run_dir: PathBuf,
    pub model: M,
    pub optimizer: AdamW<M::Params>,
    pub state: TrainerState,
    data: TextData,
    tokenizer: Tokenizer,
    /// The ranks training this run together (docs/DESIGN.md §19); rank 0
    /// alone writes the run directory.
    group: Box<dyn ProcessGroup>,
}

/// The generator streams: weights from `seed` itself (`M::init`), the
/// windows from these.
const DATA_STREAM: u64 = 0xDA7A_5EED_0000_0001;
const EVAL_STREAM: u64 = 0xE7A1_5EED_0000_0002;

/// An error unless the run's settings train architecture `M`.
fn check_arch<M: TrainableModel>(config: &TrainConfig) -> Result<()> {
    if !M::trains(config.arch) {
        return Err(invalid(
            "train",
            format!(
                "the run's settings say arch {:?}, this trainer trains {:?}",
                config.arch.name(),
                M::NAME
            ),
        ));
    }
    Ok(())
}

impl<M: TrainableModel> Trainer<M> {
    /// A fresh run in `run_dir` (created; must not hold a checkpoint yet).
    pub fn new(config: TrainConfig, run_dir: impl Into<PathBuf>) -> Result<Self> {
        Self::new_in_group(config, run_dir, Box::new(SingleProcess))
    }

    /// [`Trainer::new`] as one rank of a data-parallel `group`: every rank
    /// calls it with the same settings; rank 0 writes the run directory.
    pub fn new_in_group(
        config: TrainConfig,
        run_dir: impl Into<PathBuf>,
        group: Box<dyn ProcessGroup>,
    ) -> Result<Self> {
        config.validate()?;
        check_arch::<M>(&config)?;
        check_ranks(&config, group.as_ref())?;
        config.check_memory(256)?;
        let run_dir = run_dir.into();
        if run_dir.join("checkpoint").exists() || run_dir.join(".checkpoint.old").exists() {
            return Err(invalid(
                "train",
                format!(
                    "{} already holds a run: continue it with --resume, or choose another --out",
                    run_dir.display()
                ),
            ));
        }
        let (tokenizer, data) = load_data(&config, None)?;
        let vocab = padded_vocab(&tokenizer);
        let model = M::init(M::config_of(&config, vocab)?, config.seed)?;
        let optimizer = AdamW::<M::Params>::new(model.config(), config.adamw());
        std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
        if group.rank() == 0 {
            let mut saved = config.clone();
            saved.warmup_steps = Some(config.warmup());
            let text = serde_json::to_string_pretty(&saved).expect("settings serialise");
            write_atomically(&run_dir.join("config.json"), text.as_bytes())?;
            // A fresh run starts a fresh metrics file.
            write_atomically(&run_dir.join("metrics.jsonl"), b"")?;
        }
        Ok(Self {
            state: TrainerState {
                step: 0,
                data_rng_state: config.seed ^ DATA_STREAM,
                tokens_seen: 0,
                last_loss: None,
                last_val_loss: None,
                data: Some(DataFingerprint::of_file(&config.data)?),
            },
            config,
            run_dir,
            model,
            optimizer,
            data,
            tokenizer,
            group,
        })
    }

    /// Continues the run in `run_dir` from its checkpoint, with its settings.
    pub fn resume(run_dir: impl Into<PathBuf>) -> Result<Self> {
        Self::resume_with(run_dir, &ResumeOptions::default())
    }

    /// [`Trainer::resume`]: the text is encoded with the run's own
    /// vocabulary (the one saved in its checkpoint, never rebuilt from the
    /// text), must be the text the run started with unless `options` allow
    /// a change, and the checkpoint must agree with the run's settings.
    pub fn resume_with(run_dir: impl Into<PathBuf>, options: &ResumeOptions) -> Result<Self> {
        Self::resume_in_group(run_dir, options, Box::new(SingleProcess))
    }

    /// [`Trainer::resume_with`] as one rank of a data-parallel `group`,
    /// which may have another number of ranks than the run had before.
    pub fn resume_in_group(
        run_dir: impl Into<PathBuf>,
        options: &ResumeOptions,
        group: Box<dyn ProcessGroup>,
    ) -> Result<Self> {
        let run_dir = run_dir.into();
        let config = TrainConfig::from_file(&run_dir.join("config.json"))?;
        config.validate()?;
        check_arch::<M>(&config)?;
        check_ranks(&config, group.as_ref())?;
        let mut ckpt = run_dir.join("checkpoint");
        if !ckpt.exists() {
            ckpt = run_dir.join(".checkpoint.old");
        }
        if !ckpt.exists() {
            return Err(invalid(
                "train",
                format!("{}: no checkpoint to resume from", run_dir.display()),
            ));
        }
        let shown = ckpt.display().to_string();
        let contradiction = |message: String| Error::Format {
            file: shown.clone(),
            message,
        };
        config.check_memory(256)?;
        let state_path = ckpt.join("trainer_state.json");
        let state: TrainerState = read_object(&state_path, "a trainer state")?;
        if state.step > config.steps {
            return Err(contradiction(format!(
                "the checkpoint is at step {}, past the run's {} steps",
                state.step, config.steps
            )));
        }
        if let Some(saved) = &state.data {
            let now = DataFingerprint::of_file(&config.data)?;
            if &now != saved && !options.allow_changed_data {
                return Err(invalid(
                    "train",
                    format!(
                        "{}: the training text changed since the run started ({} bytes, \
                         FNV-1a {}; now {} bytes, {}): restore it, or resume with \
                         --allow-changed-data to continue on the new text",
                        config.data.display(),
                        saved.bytes,
                        saved.fnv1a_64,
                        now.bytes,
                        now.fnv1a_64
                    ),
                ));
            }
        }
        let saved_tokenizer = Tokenizer::for_model_dir(&ckpt)?;
        let (tokenizer, data) = load_data(&config, saved_tokenizer)?;
        let model = M::from_dir(&ckpt)?;
        let want = M::config_of(&config, padded_vocab(&tokenizer))?;
        for ((field, saved), (_, settings)) in M::shape_fields(model.config())
            .into_iter()
            .zip(M::shape_fields(&want))
        {
            if saved != settings {
                return Err(contradiction(format!(
                    "the checkpoint's model has {field} {saved}, the run's settings make {settings}"
                )));
            }
        }
        let mut optimizer = AdamW::<M::Params>::new(model.config(), config.adamw());
        optimizer.step = state.step as u64;
        let opt_path = ckpt.join("optimizer.safetensors");
        let file = SafetensorsFile::open(&opt_path)?;
        let infos = M::param_infos(model.config());
        for (prefix, tree) in [
            ("exp_avg", &mut optimizer.m),
            ("exp_avg_sq", &mut optimizer.v),
        ] {
            for (info, dst) in infos.iter().zip(tree.tensor_slices_mut(model.config())) {
                let name = format!("{prefix}.{}", info.name);
                let t = file.tensor(&name)?.ok_or_else(|| Error::Tensor {
                    file: opt_path.display().to_string(),
                    tensor: name.clone(),
                    message: "missing".into(),
                })?;
                let values = t.to_vec::<f32>(&opt_path.display().to_string(), &name)?;
                if values.len() != dst.len() {
                    return Err(Error::Tensor {
                        file: opt_path.display().to_string(),
                        tensor: name,
                        message: format!("{} values, expected {}", values.len(), dst.len()),
                    });
                }
                dst.copy_from_slice(&values);
            }
        }
        if group.rank() == 0 {
            truncate_metrics(&run_dir.join("metrics.jsonl"), state.step)?;
        }
        Ok(Self {
            config,
            run_dir,
            model,
            optimizer,
            state,
            data,
            tokenizer,
            group,
        })
    }

    pub fn train_tokens(&self) -> usize {
        self.data.train.len()
    }

    pub fn val_tokens(&self) -> usize {
        self.data.val.len()
    }

    /// The rank of this process in the run's group (0 alone).
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Mean loss over `eval_batches` batches of the validation split, the
    /// same windows at every evaluation. With several ranks each evaluates
    /// its share of the batches; the mean is the same bits.
    pub fn validation_loss(&self) -> Result<f32> {
        let c = &self.config;
        let mut rng = Rng::new(c.seed ^ EVAL_STREAM);
        let vocab = self.model.vocab_size();
        let mine = share(c.eval_batches, self.group.rank(), self.group.ranks());
        // losses[i]: batch i's loss on the rank that evaluates it, 0 elsewhere
        let mut losses = vec![0.0f32; c.eval_batches];
        for (i, loss) in losses.iter_mut().enumerate() {
            let ids = random_windows(&self.data.val, c.batch_size, c.seq_len, &mut rng)
                .map_err(|e| invalid("train", format!("validation split: {e}")))?;
            if mine.contains(&i) {
                let logits = self.model.forward(&ids, c.batch_size, c.seq_len)?;
                *loss = next_token_cross_entropy(&logits, &ids, c.batch_size, c.seq_len, vocab)?.0;
            }
        }
        if self.group.ranks() > 1 {
            tree_all_reduce_sum(self.group.as_ref(), &mut losses)?;
        }
        let total: f64 = losses.iter().map(|&l| l as f64).sum();
        Ok((total / c.eval_batches as f64) as f32)
    }

    /// Fails unless every rank holds the same settings, data and weights.
    fn check_ranks_agree(&self) -> Result<()> {
        if self.group.ranks() == 1 {
            // nothing to compare: skip hashing every weight at each checkpoint
            return Ok(());
        }
        let settings =
            serde_json::to_vec(&(&self.config, &self.state)).expect("settings serialise");
        let settings = fnv1a_64(settings);
        check_same_on_every_rank(self.group.as_ref(), "settings and data position", settings)?;
        let weights = fingerprint_f32(
            self.model
                .params()
                .tensors_with_decay(self.model.config())
                .into_iter()
                .map(|(_, t)| t),
        );
        check_same_on_every_rank(self.group.as_ref(), "weights", weights)
    }

    /// Trains until all steps are done (or `options.stop_after`), evaluating
    /// and checkpointing on the way. A NaN or infinite loss or gradient stops
    /// the run with an error before the update, leaving the last checkpoint.
    pub fn run(&mut self, options: &RunOptions) -> Result<TrainReport> {
        let c = self.config.clone();
        let end = options.stop_after.unwrap_or(c.steps).min(c.steps);
        let schedule = c.schedule();
        let tokens_per_step = (c.batch_size * c.seq_len * c.grad_accum) as u64;
        let writer = self.group.rank() == 0;
        let progress = if writer {
            options.progress
        } else {
            ProgressMode::Silent
        };
        let reporter = Reporter::new(progress, self.state.step, c.steps, c.log_every);
        let metrics_path = self.run_dir.join("metrics.jsonl");
        let mut metrics = match writer {
            true => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&metrics_path)
                    .map_err(|e| Error::io(&metrics_path, e))?,
            ),
            false => None,
        };
        let mut log = |v: serde_json::Value| -> Result<()> {
            match metrics.as_mut() {
                Some(file) => writeln!(file, "{v}").map_err(|e| Error::io(&metrics_path, e)),
                None => Ok(()),
            }
        };
        self.check_ranks_agree()?;
        let start_step = self.state.step;
        let mut report = TrainReport {
            start_step,
            end_step: start_step,
            losses: Vec::new(),
            val_losses: Vec::new(),
            tokens_per_second: 0.0,
            seconds: 0.0,
            finished: false,
        };
        let t_run = Instant::now();
        let mut train_seconds = 0.0f64;
        let mut rng = Rng::new(self.state.data_rng_state);
        while self.state.step < end {
            let step = self.state.step;
            let t_step = Instant::now();
            let lr = schedule.lr(step);
            let outcome = training_step(
                &mut self.model,
                &mut self.optimizer,
                c.grad_accum,
                || random_windows(&self.data.train, c.batch_size, c.seq_len, &mut rng),
                (c.batch_size, c.seq_len),
                lr,
                c.grad_clip,
                self.group.as_ref(),
            )?;
            let (loss, grad_norm) = (outcome.loss, outcome.grad_norm);
            if !outcome.updated {
                reporter.finish();
                return Err(self.non_finite(step, loss, grad_norm));
            }
            self.state.step += 1;
            self.state.tokens_seen += tokens_per_step;
            self.state.data_rng_state = rng.state();
            self.state.last_loss = Some(loss);
            report.losses.push(loss);
            train_seconds += t_step.elapsed().as_secs_f64();
            let done = (self.state.step - start_step) as f64;
            let tokens_per_second = done * tokens_per_step as f64 / train_seconds;
            let s = self.state.step;
            let mut line = serde_json::json!({
                "step": s,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": self.state.tokens_seen,
                "tokens_per_second": tokens_per_second,
                "elapsed_seconds": t_run.elapsed().as_secs_f64(),
            });
            if self.group.ranks() > 1 {
                line["ranks"] = self.group.ranks().into();
                line["communication_seconds"] = outcome.communication_seconds.into();
                line["step_seconds"] = t_step.elapsed().as_secs_f64().into();
            }
            log(line)?;
            reporter.step(&StepLine {
                step: s,
                total: c.steps,
                loss,
                lr,
                tokens_per_second,
                seconds_left: (c.steps - s) as f64 * t_run.elapsed().as_secs_f64() / done,
            });
            let last = s == end;
            if (c.eval_every > 0 && s.is_multiple_of(c.eval_every)) || (last && s == c.steps) {
                let val = self.validation_loss()?;
                self.state.last_val_loss = Some(val);
                report.val_losses.push((s, val));
                log(serde_json::json!({ "step": s, "val_loss": val }))?;
                reporter.line(&format!(
                    "step {s}: validation loss {val:.4} (train {loss:.4})"
                ));
                if writer {
                    write_loss_plot(&metrics_path, &self.run_dir.join("loss.png"))?;
                }
            }
            if (c.save_every > 0 && s.is_multiple_of(c.save_every)) || last {
                // Every rank checks that the weights still agree, so that a
                // checkpoint is never the weights of one rank among others.
                self.check_ranks_agree()?;
                if writer {
                    self.save_checkpoint()?;
                }
            }
        }
        if self.state.step == c.steps {
            if writer {
                self.save_model(&self.run_dir.join("model"))?;
            }
            report.finished = true;
            reporter.line(&format!(
                "finished {} steps; model in {}",
                c.steps,
                self.run_dir.join("model").display()
            ));
        }
        reporter.finish();
        report.end_step = self.state.step;
        report.seconds = t_run.elapsed().as_secs_f64();
        report.tokens_per_second = if train_seconds > 0.0 {
            (report.end_step - start_step) as f64 * tokens_per_step as f64 / train_seconds
        } else {
            0.0
        };
        Ok(report)
    }

    fn non_finite(&self, step: usize, loss: f32, grad_norm: f64) -> Error {
        let ckpt = self.run_dir.join("checkpoint");
        let kept = match std::fs::read_to_string(ckpt.join("trainer_state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<TrainerState>(&t).ok())
        {
            Some(s) => format!(
                "the last good checkpoint (step {}) is kept in {}; resume from it with --resume \
                 after lowering lr or grad_clip in {}",
                s.step,
                ckpt.display(),
                self.run_dir.join("config.json").display()
            ),
            None => "no checkpoint had been written yet".into(),
        };
        invalid(
            "train",
            format!(
                "step {}: the loss ({loss}) or the gradient norm ({grad_norm}) is not finite; \
                 stopped before the update: {kept}",
                step + 1
            ),
        )
    }

    /// A model directory `selective generate`, `score` and transformers read:
    /// config.json (with the tokenizer named) and model.safetensors in f32.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        let tmp = sibling(dir, "tmp");
        remove_dir_if_exists(&tmp)?;
        self.write_model_files(&tmp)?;
        swap_in(&tmp, dir)
    }

    fn write_model_files(&self, dir: &Path) -> Result<()> {
        let mut config = self.model.save_f32(dir)?;
        let config_path = dir.join("config.json");
        config["torch_dtype"] = "float32".into();
        match (&self.tokenizer, &self.config.tokenizer) {
            (Tokenizer::Bytes, _) => config["tokenizer"] = "bytes".into(),
            (Tokenizer::Chars(vocab), _) => {
                config["tokenizer"] = serde_json::json!({ "chars": vocab.as_string() })
            }
            (_, Some(path)) => {
                let dst = dir.join("tokenizer.json");
                std::fs::copy(path, &dst).map_err(|e| Error::io(path, e))?;
            }
            (_, None) => {}
        }
        let text = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
        write_atomically(&config_path, text.as_bytes())
    }

    /// Writes `RUN/checkpoint/` whole: model, optimizer moments, state.
    pub fn save_checkpoint(&self) -> Result<()> {
        let dir = self.run_dir.join("checkpoint");
        let tmp = self.run_dir.join(".checkpoint.tmp");
        remove_dir_if_exists(&tmp)?;
        self.write_model_files(&tmp)?;
        let mut tensors = Vec::new();
        let infos = M::param_infos(self.model.config());
        for (prefix, tree) in [
            ("exp_avg", &self.optimizer.m),
            ("exp_avg_sq", &self.optimizer.v),
        ] {
            for (info, (_, data)) in infos
                .iter()
                .zip(tree.tensors_with_decay(self.model.config()))
            {
                tensors.push((
                    format!("{prefix}.{}", info.name),
                    DType::F32,
                    info.shape.clone(),
                    encode(data, DType::F32),
                ));
            }
        }
        let mut meta = std::collections::HashMap::new();
        meta.insert("step".to_string(), self.optimizer.step.to_string());
        write_safetensors(&tmp.join("optimizer.safetensors"), &tensors, Some(meta))?;
        let state = serde_json::to_string_pretty(&self.state).expect("state serialises");
        write_atomically(&tmp.join("trainer_state.json"), state.as_bytes())?;
        swap_in(&tmp, &dir)
    }
}

/// The loss and gradient norm of one optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// Mean next-token cross-entropy over the step's micro-batches.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the loss or the gradient norm was not finite: then the
    /// parameters and optimizer are left as they were.
    pub updated: bool,
    /// Seconds in the all-reduce of losses and gradients (0 on one rank);
    /// it includes waiting for the slowest rank.
    pub communication_seconds: f64,
}

/// One optimizer step: for each of `micro_batches` batches of ids
/// ((batch, len) each, from `next_batch`) forward, cross-entropy, backward
/// (the loss of the step is the mean over micro-batches, so each one's
/// gradient is scaled by 1/micro_batches); the step's gradient is their
/// fixed pairwise tree sum (docs/DESIGN.md §19); then clipping by global
/// norm (`grad_clip` > 0) and the AdamW update at learning rate `lr`.
///
/// With a `group` of N ranks, every rank draws all micro-batches (so the
/// data stream stays the same everywhere) and computes the gradients of its
/// share, [r·M/N, (r+1)·M/N); one all-reduce sums the shares in the tree's
/// order, so every rank makes the update one process makes alone, bit for
/// bit. `micro_batches` must be a multiple of N.
#[allow(clippy::too_many_arguments)]
pub fn training_step<M: TrainableModel>(
    model: &mut M,
    optimizer: &mut AdamW<M::Params>,
    micro_batches: usize,
    mut next_batch: impl FnMut() -> Result<Vec<u32>>,
    (batch, len): (usize, usize),
    lr: f64,
    grad_clip: f64,
    group: &dyn ProcessGroup,
) -> Result<StepOutcome> {
    check_group_size(group)?;
    let ranks = group.ranks();
    if micro_batches == 0 || !micro_batches.is_multiple_of(ranks) {
        return Err(invalid(
            "training_step",
            format!(
                "{micro_batches} micro-batches per step cannot be shared by {ranks} ranks:                  grad_accum must be a positive multiple of the number of ranks"
            ),
        ));
    }
    let batches = (0..micro_batches)
        .map(|_| next_batch())
        .collect::<Result<Vec<_>>>()?;
    // losses[i]: micro-batch i's loss on the rank that computes it, 0 elsewhere
    let mut losses = vec![0.0f32; micro_batches];
    let mine = share(micro_batches, group.rank(), ranks);
    let mut grads = gradient_tree(&*model, &batches, mine, &mut losses, (batch, len))?;
    let t_communication = Instant::now();
    if ranks > 1 {
        tree_all_reduce_sum(group, &mut losses)?;
        all_reduce_tree(model.config(), &mut grads, group)?;
    }
    let communication_seconds = match ranks {
        1 => 0.0,
        _ => t_communication.elapsed().as_secs_f64(),
    };
    let loss_sum: f64 = losses.iter().map(|&l| l as f64).sum();
    let loss = (loss_sum / micro_batches as f64) as f32;
    let grad_norm = if grad_clip > 0.0 {
        clip_global_norm(model.config(), &mut grads, grad_clip)
    } else {
        global_norm(model.config(), &grads)
    };
    let updated = loss.is_finite() && grad_norm.is_finite();
    if updated {
        let config = model.config().clone();
        optimizer.update(&config, model.params_mut(), &grads, lr)?;
    }
    Ok(StepOutcome {
        loss,
        grad_norm,
        updated,
        communication_seconds,
    })
}

/// The gradient of micro-batches `range` of `batches` as the pairwise tree
/// `sum(lo, hi) = sum(lo, mid) + sum(mid, hi)`, `mid = lo + (hi − lo)/2`
/// (at most log2 of the range's length gradients are held at once); each
/// micro-batch's loss goes to `losses[i]`, and its dL/dlogits is scaled by
/// 1/batches.len() (the step's loss is the mean over all micro-batches).
fn gradient_tree<M: TrainableModel>(
    model: &M,
    batches: &[Vec<u32>],
    range: std::ops::Range<usize>,
    losses: &mut [f32],
    (batch, len): (usize, usize),
) -> Result<M::Params> {
    if range.len() == 1 {
        let i = range.start;
        let ids = &batches[i];
        let (logits, cache) = model.forward_train(ids, batch, len)?;
        let (loss, mut d_logits) =
            next_token_cross_entropy(&logits, ids, batch, len, model.vocab_size())?;
        drop(logits);
        losses[i] = loss;
        if batches.len() > 1 {
            let scale = 1.0 / batches.len() as f32;
            d_logits.iter_mut().for_each(|g| *g *= scale);
        }
        return model.backward(ids, &cache, &d_logits);
    }
    let mid = range.start + range.len() / 2;
    let mut left = gradient_tree(model, batches, range.start..mid, losses, (batch, len))?;
    let right = gradient_tree(model, batches, mid..range.end, losses, (batch, len))?;
    add_into(model.config(), &mut left, &right)?;
    Ok(left)
}

/// Sums a parameter tree over the group's ranks ([`tree_all_reduce_sum`]
/// on its tensors laid end to end).
fn all_reduce_tree<P: ParamTree>(
    config: &P::Config,
    tree: &mut P,
    group: &dyn ProcessGroup,
) -> Result<()> {
    let mut flat: Vec<f32> = tree
        .tensors_with_decay(config)
        .into_iter()
        .flat_map(|(_, t)| t.iter().copied())
        .collect();
    tree_all_reduce_sum(group, &mut flat)?;
    let mut rest = flat.as_slice();
    for t in tree.tensor_slices_mut(config) {
        let (head, tail) = rest.split_at(t.len());
        t.copy_from_slice(head);
        rest = tail;
    }
    Ok(())
}

/// An error unless `group` can share the run's steps: a power of two of
/// ranks that divides the micro-batches of a step.
fn check_ranks(config: &TrainConfig, group: &dyn ProcessGroup) -> Result<()> {
    check_group_size(group)?;
    let ranks = group.ranks();
    if !config.grad_accum.is_multiple_of(ranks) {
        return Err(invalid(
            "train",
            format!(
                "grad_accum {} cannot be shared by {ranks} ranks: each rank takes whole \
                 micro-batches of batch_size sequences, so grad_accum must be a multiple of \
                 the number of ranks (the {} sequences of a step now are, for instance, \
                 --grad-accum {ranks} --batch-size {})",
                config.grad_accum,
                config.batch_size * config.grad_accum,
                (config.batch_size * config.grad_accum).div_ceil(ranks)
            ),
        ));
    }
    Ok(())
}

/// Draws the training loss of every step and the validation loss of every
/// evaluation recorded in `metrics.jsonl` into a PNG.
fn write_loss_plot(metrics_path: &Path, png_path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics_path).map_err(|e| Error::io(metrics_path, e))?;
    let mut train = Vec::new();
    let mut val = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(loss) = v["loss"].as_f64() {
            train.push((step, loss));
        }
        if let Some(loss) = v["val_loss"].as_f64() {
            val.push((step, loss));
        }
    }
    let chart = Chart {
        title: format!(
            "{}",
            metrics_path.parent().unwrap_or(Path::new(".")).display()
        ),
        x_label: "step".into(),
        y_label: "cross-entropy (nats per token)".into(),
        series: vec![
            Series {
                name: "train".into(),
                points: train,
            },
            Series {
                name: "validation".into(),
                points: val,
            },
        ],
        log_x: false,
    };
    plot::write_png(&chart, png_path)
}

/// The tokenizer of the run and its text, split.
/// The run's tokenizer (`saved`, when resuming: the one in its checkpoint)
/// and its text encoded with it.
fn load_data(config: &TrainConfig, saved: Option<Tokenizer>) -> Result<(Tokenizer, TextData)> {
    let tokenizer = match (saved, &config.tokenizer) {
        (Some(tokenizer), _) => tokenizer,
        (None, Some(path)) => Tokenizer::from_file(path)?,
        (None, None) if config.char_vocab => {
            let path = &config.data;
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let vocab = CharVocab::from_text(&text)
                .map_err(|e| invalid("train", format!("{}: {e}", path.display())))?;
            Tokenizer::Chars(vocab)
        }
        (None, None) => Tokenizer::Bytes,
    };
    let data = TextData::load(&config.data, &tokenizer, config.val_fraction)?;
    for (name, part) in [("training", &data.train), ("validation", &data.val)] {
        if part.len() < config.seq_len {
            return Err(invalid(
                "train",
                format!(
                    "{}: the {name} split has {} tokens, fewer than seq_len = {}: use a longer text, \
                     a shorter seq_len or another val_fraction",
                    config.data.display(),
                    part.len(),
                    config.seq_len
                ),
            ));
        }
    }
    Ok((tokenizer, data))
}

/// The tokenizer's vocabulary rounded up to a multiple of 8 (as the
/// released models pad theirs).
fn padded_vocab(tokenizer: &Tokenizer) -> usize {
    tokenizer.vocab_size().div_ceil(8) * 8
}

/// `.NAME.SUFFIX` next to `dir`.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(".{name}.{suffix}"))
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(dir, e)),
        _ => Ok(()),
    }
}

/// Replaces directory `dest` by `new`: dest → .dest.old, new → dest, then
/// removes the old one. At every moment one complete copy exists.
fn swap_in(new: &Path, dest: &Path) -> Result<()> {
    let old = sibling(dest, "old");
    if dest.exists() {
        remove_dir_if_exists(&old)?;
        std::fs::rename(dest, &old).map_err(|e| Error::io(dest, e))?;
    }
    std::fs::rename(new, dest).map_err(|e| Error::io(dest, e))?;
    remove_dir_if_exists(&old)
}

/// Drops metrics lines of steps after `step` (written after the checkpoint
/// a run resumes from, and about to be redone).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    write_atomically(path, kept.as_bytes())
}
