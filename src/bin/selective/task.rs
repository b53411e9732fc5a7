//! `selective task NAME ...`: train a task model and evaluate it, or
//! evaluate a saved induction-heads model at many lengths; writes
//! `results.json`, `results.md`, the accuracy curve(s) as PNG and the model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde_json::json;

use selective::error::{invalid, Error, Result};
use selective::io::write_atomically;
use selective::memory::peak_resident_bytes;
use selective::nn::{Positions, Transformer, TransformerConfig};
use selective::tasks::train::{
    evaluate, evaluate_induction_lengths, train_task, CurvePoint, EvalMode, LengthEvalOptions,
    LengthSweep, TrainSettings, TEST_SEED_OFFSET,
};
use selective::tasks::{BlockArch, SsmLayer, TaskModel, TaskModelConfig};
use selective::tasks::{TaskKind, TaskNetConfig, TaskNetwork, TaskSpec};
use selective::train::ProgressMode;

/// The sequence layer of a task model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskLayer {
    /// An SSM in the Mamba block (or alone, --arch nogate).
    Ssm(SsmLayer),
    /// Multi-head attention in Transformer++ layers (the paper's Table 2
    /// baseline).
    Attention,
}

impl std::str::FromStr for TaskLayer {
    type Err = selective::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "attention" | "mha" => Ok(TaskLayer::Attention),
            _ => s.parse().map(TaskLayer::Ssm).map_err(|_| {
                invalid(
                    "--layer",
                    format!("unknown layer {s:?} (expected s6, s4d or attention)"),
                )
            }),
        }
    }
}

/// A saved task model of either kind.
enum SavedTaskModel {
    Ssm(TaskModel<f32>),
    Attention(Transformer<f32>),
}

impl SavedTaskModel {
    /// task-model.json (an SSM task model) or config.json (attention, in
    /// the Llama layout).
    fn load(dir: &Path) -> Result<Self> {
        if dir.join(selective::tasks::model::CONFIG_FILE).exists() {
            Ok(SavedTaskModel::Ssm(TaskModel::load(dir)?))
        } else if dir.join("config.json").exists() {
            Ok(SavedTaskModel::Attention(Transformer::from_dir(dir)?))
        } else {
            Err(invalid(
                "selective task",
                format!(
                    "{}: no task-model.json (an S6/S4D task model) or config.json (an attention model)",
                    dir.display()
                ),
            ))
        }
    }
}

/// Arguments of `selective task`.
#[derive(Args, Debug, Clone)]
pub struct TaskArgs {
    /// copying, selective-copying or induction-heads
    pub name: String,
    /// The sequence layer: selective (s6), time-invariant (s4d), or
    /// multi-head attention (attention: Transformer++ layers with
    /// --positions, --n-head).
    #[arg(long, default_value = "s6")]
    pub layer: TaskLayer,
    /// The block: the gated Mamba block (mamba), or a single SSM without gate (nogate).
    #[arg(long, default_value = "mamba")]
    pub arch: BlockArch,
    #[arg(long, default_value_t = 32)]
    pub d_model: usize,
    #[arg(long, default_value_t = 2)]
    pub n_layer: usize,
    #[arg(long, default_value_t = 16)]
    pub d_state: usize,
    #[arg(long, default_value_t = 2)]
    pub expand: usize,
    /// Attention: heads per layer.
    #[arg(long, default_value_t = 2)]
    pub n_head: usize,
    /// Attention: rotary positions, or learned absolute ones.
    #[arg(long, default_value = "rotary")]
    pub positions: Positions,
    /// Attention with learned positions: the table's length (default: the
    /// training length; longer test sequences cannot be read, and rows past
    /// the training length stay as initialised).
    #[arg(long)]
    pub max_positions: Option<usize>,
    /// Vocabulary of the task, special tokens included.
    #[arg(long, default_value_t = 16)]
    pub vocab: usize,
    /// Copying tasks: blanks L (inputs are L + 2M). Induction heads: the
    /// training length. Default 64 for copying tasks, 64 for induction heads.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Copying tasks: M, the tokens to memorise.
    #[arg(long, default_value_t = 8)]
    pub memorize: usize,
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Learning rate at the end of the cosine decay (default: --lr / 10);
    /// equal to --lr for a constant rate after the warm-up.
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Warm-up steps (default: 5% of the steps).
    #[arg(long)]
    pub warmup: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// AdamW's ε.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// ε of label smoothing in the training loss (targets (1-ε)·onehot + ε/V);
    /// the reported losses stay plain cross-entropy.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Validation examples evaluated every --eval-every steps.
    #[arg(long, default_value_t = 256)]
    pub eval_examples: usize,
    /// Test examples evaluated at the end (a separate seed).
    #[arg(long, default_value_t = 1024)]
    pub test_examples: usize,
    /// Stop training once the validation accuracy reaches this fraction.
    #[arg(long)]
    pub stop_at_accuracy: Option<f64>,
    /// Induction heads: test lengths, comma separated (e.g. 64,256,...,1048576).
    #[arg(long, value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// Induction heads: sequences per test length.
    #[arg(long, default_value_t = 64)]
    pub eval_samples: usize,
    /// Induction heads: sequences run together at a test length.
    #[arg(long, default_value_t = 16)]
    pub eval_batch: usize,
    /// Induction heads: tokens per chunk in chunked mode.
    #[arg(long, default_value_t = 1024)]
    pub eval_chunk: usize,
    /// Induction heads: chunks from a carried state (chunked), or one token at a time (step).
    #[arg(long, default_value = "chunked")]
    pub eval_mode: EvalMode,
    /// Induction heads: skip the test lengths whose time, projected from
    /// the last length run, exceeds this many seconds (attention's grows
    /// with the square of the length).
    #[arg(long)]
    pub eval_time_limit: Option<f64>,
    /// Evaluate the model of --model instead of training.
    #[arg(long, requires = "model")]
    pub eval_only: bool,
    /// A saved task model directory (task-model.json + model.safetensors,
    /// or an attention model's config.json + model.safetensors).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Train further from this saved model (its layer, arch and sizes are
    /// used; the size flags must agree) instead of a fresh initialisation.
    #[arg(long, conflicts_with = "eval_only")]
    pub init: Option<PathBuf>,
    /// Where to write results (and the trained model, under model/).
    #[arg(long, default_value = "task-results")]
    pub out: PathBuf,
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Runs `selective task` on a thread pool of --threads threads.
pub fn run_task_command(args: TaskArgs) -> Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads.unwrap_or(0))
        .build()
        .map_err(|e| invalid("selective task", format!("thread pool: {e}")))?;
    pool.install(|| run(args))
}

fn spec_of(args: &TaskArgs, kind: TaskKind) -> TaskSpec {
    TaskSpec {
        kind,
        vocab: args.vocab,
        seq_len: args.seq_len.unwrap_or(64),
        memorize: args.memorize,
    }
}

fn run(args: TaskArgs) -> Result<()> {
    let kind = TaskKind::parse(&args.name)?;
    let spec = spec_of(&args, kind);
    spec.validate()?;
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    if !args.lengths.is_empty() && kind != TaskKind::InductionHeads {
        return Err(invalid(
            "selective task",
            "--lengths applies to induction-heads only",
        ));
    }
    if args.eval_only {
        if kind != TaskKind::InductionHeads {
            return Err(invalid(
                "selective task",
                "--eval-only evaluates length extrapolation: induction-heads only",
            ));
        }
        let dir = args.model.as_ref().expect("clap requires --model");
        return match SavedTaskModel::load(dir)? {
            SavedTaskModel::Ssm(m) => eval_only(&args, kind, spec, dir, &m),
            SavedTaskModel::Attention(m) => eval_only(&args, kind, spec, dir, &m),
        };
    }
    let init = args.init.as_deref().map(SavedTaskModel::load).transpose()?;
    match (init, args.layer) {
        (Some(SavedTaskModel::Ssm(m)), _) => train_and_test(&args, kind, spec, m.config, Some(m)),
        (Some(SavedTaskModel::Attention(m)), _) => {
            train_and_test(&args, kind, spec, m.config.clone(), Some(m))
        }
        (None, TaskLayer::Ssm(layer)) => {
            let mut c =
                TaskModelConfig::new(args.vocab, args.d_model, args.n_layer, layer, args.arch);
            c.d_state = args.d_state;
            c.expand = args.expand;
            train_and_test(&args, kind, spec, c, None)
        }
        (None, TaskLayer::Attention) => {
            if args.n_head == 0 || !args.d_model.is_multiple_of(args.n_head) {
                return Err(invalid(
                    "selective task",
                    format!(
                        "--n-head {} must be at least 1 and divide --d-model {}",
                        args.n_head, args.d_model
                    ),
                ));
            }
            let mut c = TransformerConfig::new(args.d_model, args.n_layer, args.vocab, args.n_head);
            c.positions = args.positions;
            // the learned table's length; informational with rotary positions
            c.max_position_embeddings = args.max_positions.unwrap_or(spec.input_len());
            train_and_test(&args, kind, spec, c, None)
        }
    }
}

/// `--eval-only`: the length sweep of a saved induction-heads model.
fn eval_only<M: TaskNetwork<f32>>(
    args: &TaskArgs,
    kind: TaskKind,
    spec: TaskSpec,
    dir: &Path,
    model: &M,
) -> Result<()> {
    let out = &args.out;
    let lengths = if args.lengths.is_empty() {
        vec![spec.seq_len]
    } else {
        args.lengths.clone()
    };
    eprintln!(
        "evaluating {} ({}) at {} lengths, {} sequences each, {:?} mode",
        dir.display(),
        model.describe(),
        lengths.len(),
        args.eval_samples,
        args.eval_mode
    );
    let sweep = length_eval(model, args, &lengths)?;
    let report = json!({
        "task": kind.name(),
        "mode": "eval-only",
        "model_dir": dir.display().to_string(),
        "model": format!("{:?}", model.config()),
        "label": model.label(),
        "parameters": model.parameter_count(),
        "eval_mode": args.eval_mode,
        "eval_batch": args.eval_batch,
        "eval_chunk": args.eval_chunk,
        "threads": rayon::current_num_threads(),
        "lengths": sweep.results,
        "not_run": sweep.not_run,
        "peak_resident_bytes": peak_resident_bytes(),
    });
    write_json(&out.join("results.json"), &report)?;
    let md = format!(
        "# {} length extrapolation of {}\n\nModel: {}.\n\n{}",
        kind.name(),
        dir.display(),
        model.describe(),
        lengths_table(&sweep)
    );
    write_atomically(&out.join("results.md"), md.as_bytes())?;
    write_length_png(&out.join("accuracy-by-length.png"), &model.label(), &sweep)?;
    println!("{md}");
    Ok(())
}

/// Trains a model of `config` (from `init`'s weights if given), tests it,
/// sweeps the lengths, and writes the results and the model.
fn train_and_test<C: TaskNetConfig>(
    args: &TaskArgs,
    kind: TaskKind,
    spec: TaskSpec,
    config: C,
    init: Option<C::Model>,
) -> Result<()> {
    let out = &args.out;
    if config.vocab_size() != args.vocab {
        return Err(invalid(
            "selective task",
            format!(
                "the model's vocabulary is {}, the task's --vocab {}",
                config.vocab_size(),
                args.vocab
            ),
        ));
    }
    let settings = TrainSettings {
        spec,
        model: config,
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        min_lr: args.min_lr.unwrap_or(args.lr / 10.0),
        warmup_steps: args.warmup.unwrap_or(args.steps / 20),
        weight_decay: args.weight_decay,
        beta2: 0.999,
        adam_eps: args.adam_eps,
        clip: args.clip,
        label_smoothing: args.label_smoothing,
        seed: args.seed,
        eval_every: args.eval_every,
        eval_examples: args.eval_examples,
        stop_at_accuracy: args.stop_at_accuracy,
        init,
        save_dir: Some(args.out.join("model")),
        progress: ProgressMode::Auto,
    };
    let fresh = settings.model.init(settings.seed)?;
    eprintln!(
        "task {} (vocab {}, L {}, M {}, input length {}), {}: {}",
        kind.name(),
        spec.vocab,
        spec.seq_len,
        spec.memorize,
        spec.input_len(),
        fresh.label(),
        fresh.describe()
    );
    drop(fresh);
    let outcome = train_task(&settings)?;
    let model = outcome.model;
    let model_dir = out.join("model");
    model.save(&model_dir)?;
    let t_test = Instant::now();
    let test = evaluate(
        &model,
        &spec,
        args.test_examples,
        64,
        args.seed.wrapping_add(TEST_SEED_OFFSET),
    )?;
    let test_seconds = t_test.elapsed().as_secs_f64();
    eprintln!(
        "test accuracy {:.2}% (loss {:.4}) on {} examples; trained {} steps in {:.1}s",
        100.0 * test.accuracy(),
        test.mean_loss(),
        args.test_examples,
        outcome.steps_run,
        outcome.wall_seconds
    );
    let sweep = if kind == TaskKind::InductionHeads && !args.lengths.is_empty() {
        length_eval(&model, args, &args.lengths)?
    } else {
        LengthSweep::default()
    };
    let report = json!({
        "task": kind.name(),
        "init": args.init.as_ref().map(|p| p.display().to_string()),
        "spec": spec,
        "input_len": spec.input_len(),
        "chance_accuracy": spec.chance_accuracy(),
        "model": settings.model,
        "label": model.label(),
        "parameters": model.parameter_count(),
        "settings": settings,
        "steps_run": outcome.steps_run,
        "train_seconds": outcome.wall_seconds,
        "threads": rayon::current_num_threads(),
        "test_examples": args.test_examples,
        "test_accuracy": test.accuracy(),
        "test_loss": test.mean_loss(),
        "test_seconds": test_seconds,
        "curve": outcome.curve,
        "lengths": sweep.results,
        "not_run": sweep.not_run,
        "model_dir": model_dir.display().to_string(),
    });
    write_json(&out.join("results.json"), &report)?;
    let mut md = format!(
        "# {} with {}\n\nModel: {}.\n\
         Task: vocabulary {}, L {}, M {}, input length {}; chance accuracy {:.1}%.\n\
         Training: {} steps of batch {} (lr {:e}, label smoothing {}, seed {}), {:.1} s on {} threads.\n\n\
         | test examples | test accuracy | test loss |\n|---|---|---|\n| {} | {:.2}% | {:.4} |\n",
        kind.name(),
        model.label(),
        model.describe(),
        spec.vocab,
        spec.seq_len,
        spec.memorize,
        spec.input_len(),
        100.0 * spec.chance_accuracy(),
        outcome.steps_run,
        args.batch,
        args.lr,
        args.label_smoothing,
        args.seed,
        outcome.wall_seconds,
        rayon::current_num_threads(),
        args.test_examples,
        100.0 * test.accuracy(),
        test.mean_loss()
    );
    if !sweep.results.is_empty() || !sweep.not_run.is_empty() {
        md.push('\n');
        md.push_str(&lengths_table(&sweep));
        write_length_png(&out.join("accuracy-by-length.png"), &model.label(), &sweep)?;
    }
    write_atomically(&out.join("results.md"), md.as_bytes())?;
    write_curve_png(
        &out.join("accuracy.png"),
        &format!("{} ({})", kind.name(), model.label()),
        &outcome.curve,
    )?;
    println!("{md}");
    Ok(())
}

fn length_eval<M: TaskNetwork<f32>>(
    model: &M,
    args: &TaskArgs,
    lengths: &[usize],
) -> Result<LengthSweep> {
    let options = LengthEvalOptions {
        samples: args.eval_samples,
        batch: args.eval_batch,
        chunk: args.eval_chunk,
        mode: args.eval_mode,
        seed: args.seed.wrapping_add(TEST_SEED_OFFSET),
        time_limit_s: args.eval_time_limit,
    };
    let sweep = evaluate_induction_lengths(model, args.vocab, lengths, &options, |r| {
        eprintln!(
            "length {:>8}: accuracy {:6.2}% of {} ({:.1}s, {:.0} tok/s, peak RSS {})",
            r.length,
            100.0 * r.accuracy,
            r.samples,
            r.seconds,
            r.tokens_per_second,
            mib(r.peak_resident_bytes)
        )
    })?;
    for n in &sweep.not_run {
        eprintln!("length {:>8}: not run: {}", n.length, n.reason);
    }
    Ok(sweep)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("?".into(), |b| {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    })
}

fn lengths_table(sweep: &LengthSweep) -> String {
    let mut s = String::from(
        "| length | sequences | accuracy | seconds | tokens/s | peak RSS | context |\n|---|---|---|---|---|---|---|\n",
    );
    for r in &sweep.results {
        s.push_str(&format!(
            "| {} | {} | {:.2}% | {:.1} | {:.0} | {} | {:.1} KiB |\n",
            r.length,
            r.samples,
            100.0 * r.accuracy,
            r.seconds,
            r.tokens_per_second,
            mib(r.peak_resident_bytes),
            r.context_bytes as f64 / 1024.0
        ));
    }
    for n in &sweep.not_run {
        s.push_str(&format!(
            "| {} | | not run: {} | | | | |\n",
            n.length, n.reason
        ));
    }
    s
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON serialises");
    write_atomically(path, text.as_bytes())
}

fn write_curve_png(path: &Path, title: &str, curve: &[CurvePoint]) -> Result<()> {
    let chart = selective::plot::Chart {
        title: title.to_string(),
        x_label: "training step".into(),
        y_label: "validation accuracy (%)".into(),
        series: vec![selective::plot::Series {
            name: "answer accuracy".into(),
            points: curve
                .iter()
                .map(|p| (p.step as f64, 100.0 * p.val_accuracy))
                .collect(),
        }],
        log_x: false,
    };
    selective::plot::write_png(&chart, path)
}

fn write_length_png(path: &Path, label: &str, sweep: &LengthSweep) -> Result<()> {
    if sweep.results.is_empty() {
        return Ok(());
    }
    let chart = selective::plot::Chart {
        title: format!("induction heads by test length ({label})"),
        x_label: "test sequence length".into(),
        y_label: "accuracy (%)".into(),
        series: vec![selective::plot::Series {
            name: label.to_string(),
            points: sweep
                .results
                .iter()
                .map(|r| (r.length as f64, 100.0 * r.accuracy))
                .collect(),
        }],
        log_x: true,
    };
    selective::plot::write_png(&chart, path)
}
