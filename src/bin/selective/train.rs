//! `selective train`: a language model on a text file, with checkpoints and
//! exact --resume (the library's Trainer does the work). Started by
//! `mpirun -np N` (or `srun`) in a build with the `mpi` feature, the N
//! processes train one run data-parallel (docs/DESIGN.md §19).

use std::path::PathBuf;

use selective::nn::{Architecture, Mamba, Positions, Transformer};
use selective::train::{
    ProcessGroup, ProgressMode, ResumeOptions, RunOptions, SingleProcess, TrainConfig,
    TrainableModel, Trainer,
};

use crate::CliResult;

/// Settings left out take the config file's value, else the default
/// (char-small: d_model 256, 4 layers, d_state 16, byte-level).
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Run directory: config.json, metrics.jsonl, checkpoint/, model/.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its checkpoint, with its settings.
    #[arg(long)]
    pub resume: bool,
    /// With --resume: continue although the training text differs from the
    /// one the run started with (it must still encode with the run's
    /// vocabulary).
    #[arg(long, requires = "resume")]
    pub allow_changed_data: bool,
    /// Training settings as JSON (the fields of RUN/config.json; any subset).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Training text.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A tokenizer.json (default: byte-level, vocabulary 256).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A character vocabulary: the distinct characters of the text (65 for
    /// Tiny Shakespeare), as nanoGPT's shakespeare_char.
    #[arg(long)]
    pub char_vocab: bool,
    /// The model: mamba (default), mamba2 (the SSD mixer) or transformer
    /// (the Transformer++ baseline: RMSNorm, rotary attention, SwiGLU,
    /// tied embeddings).
    #[arg(long)]
    pub arch: Option<Architecture>,
    #[arg(long)]
    pub d_model: Option<usize>,
    #[arg(long)]
    pub n_layer: Option<usize>,
    #[arg(long)]
    pub d_state: Option<usize>,
    #[arg(long)]
    pub expand: Option<usize>,
    /// Mamba-2: channels per head (default 64).
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Mamba-2: groups of B and C (default 1).
    #[arg(long)]
    pub n_groups: Option<usize>,
    /// Mamba-2: the SSD's chunk length (default 256).
    #[arg(long)]
    pub chunk_size: Option<usize>,
    /// Transformer: attention heads (head_dim = d_model / n_head; default 4).
    #[arg(long)]
    pub n_head: Option<usize>,
    /// Transformer: SwiGLU width (default 8 d_model / 3 rounded up to 8).
    #[arg(long)]
    pub d_ff: Option<usize>,
    /// Transformer: rotary (default) or learned positions.
    #[arg(long)]
    pub positions: Option<Positions>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Optimizer steps of the whole run.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Default: 10% of the steps.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW betas, e.g. 0.9,0.95.
    #[arg(long, value_delimiter = ',')]
    pub betas: Option<Vec<f64>>,
    /// Maximum global gradient norm (0: no clipping).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[arg(long)]
    pub eval_batches: Option<usize>,
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Log line every this many steps when stderr is not a terminal.
    #[arg(long)]
    pub log_every: Option<usize>,
    /// Fraction of the text (its end) held out for validation.
    #[arg(long)]
    pub val_fraction: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop (with a checkpoint) after this step; continue later with --resume.
    #[arg(long)]
    pub stop_after: Option<usize>,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Under mpirun: a rank that waits longer than this in one gradient
    /// all-reduce stops the run (a hung rank); it must exceed the time rank
    /// 0 takes to write a checkpoint.
    #[arg(long, default_value_t = 600.0, value_name = "SECONDS")]
    pub rank_timeout: f64,
}

pub fn run(args: TrainArgs) -> CliResult {
    let options = RunOptions {
        stop_after: args.stop_after,
        progress: ProgressMode::Auto,
    };
    let mut config = match &args.config {
        Some(path) => TrainConfig::from_file(path)?,
        None => TrainConfig::default(),
    };
    // Each flag given overrides the setting; `given` names them.
    let mut given: Vec<&str> = Vec::new();
    macro_rules! set {
        ($($field:ident),*) => {$(
            if let Some(v) = args.$field.clone() {
                config.$field = v.into();
                given.push(stringify!($field));
            }
        )*};
    }
    set!(
        arch,
        head_dim,
        n_groups,
        chunk_size,
        n_head,
        d_ff,
        positions,
        data,
        tokenizer,
        d_model,
        n_layer,
        d_state,
        expand,
        batch_size,
        seq_len,
        steps,
        lr,
        min_lr,
        warmup_steps,
        weight_decay,
        grad_clip,
        grad_accum,
        eval_every,
        eval_batches,
        save_every,
        log_every,
        val_fraction,
        seed
    );
    if args.char_vocab {
        config.char_vocab = true;
        given.push("char_vocab");
    }
    if let Some(b) = &args.betas {
        let [beta1, beta2] = b[..] else {
            return Err(format!("--betas takes two numbers, e.g. 0.9,0.95; got {b:?}").into());
        };
        (config.beta1, config.beta2) = (beta1, beta2);
        given.push("betas");
    }
    if args.resume {
        if args.config.is_some() || !given.is_empty() {
            return Err(format!(
                "--resume continues with the run's own settings ({}); drop --config and --{}",
                args.out.join("config.json").display(),
                given.join(", --").replace('_', "-")
            )
            .into());
        }
        // the run's own settings say which architecture it trains
        config = TrainConfig::from_file(&args.out.join("config.json"))?;
    }
    match config.arch {
        Architecture::Mamba | Architecture::Mamba2 => train::<Mamba<f32>>(&args, config, &options),
        Architecture::Transformer => train::<Transformer<f32>>(&args, config, &options),
    }
}

/// How many processes the launcher that started this one started in all:
/// Open MPI's mpirun, MPICH's Hydra and Slurm's srun say so in the
/// environment; None when no launcher did.
fn launched_ranks() -> Option<usize> {
    let in_slurm_step = std::env::var_os("SLURM_STEP_ID").is_some();
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"]
        .into_iter()
        .filter(|name| *name != "SLURM_NTASKS" || in_slurm_step)
        .find_map(|name| std::env::var(name).ok()?.parse().ok())
}

/// Trains with the ranks the launcher started, or alone. An error in one
/// rank of several aborts them all (MPI_Abort) after printing it, so that
/// none waits for it forever.
fn train<M: TrainableModel>(
    args: &TrainArgs,
    config: TrainConfig,
    options: &RunOptions,
) -> CliResult {
    match launched_ranks() {
        #[cfg(feature = "mpi")]
        Some(_) => {
            use mpi::topology::Communicator;
            let threading = mpi::Threading::Funneled;
            let (universe, _) =
                mpi::initialize_with_threading(threading).ok_or("MPI was initialised already")?;
            let world = universe.world();
            let (rank, ranks) = (world.rank(), world.size());
            let timeout = std::time::Duration::try_from_secs_f64(args.rank_timeout)
                .ok()
                .filter(|t| !t.is_zero())
                .ok_or_else(|| {
                    format!(
                        "--rank-timeout must be a positive number of seconds, got {}",
                        args.rank_timeout
                    )
                })?;
            let group = Box::new(selective::train::MpiGroup::new(universe.world(), timeout));
            let result = train_in_group::<M>(args, config, options, group);
            if let Err(e) = &result {
                if ranks > 1 {
                    eprintln!("error: rank {rank} of {ranks}: {e}");
                    world.abort(1);
                }
            }
            result
        }
        #[cfg(not(feature = "mpi"))]
        Some(ranks) if ranks > 1 => Err(format!(
            "started as one of {ranks} processes (mpirun or srun), but this binary was built \
             without MPI: each process would train the whole run alone into the same --out. \
             Build with `cargo build --release --features mpi`, or run one process"
        )
        .into()),
        _ => train_in_group::<M>(args, config, options, Box::new(SingleProcess)),
    }
}

fn train_in_group<M: TrainableModel>(
    args: &TrainArgs,
    config: TrainConfig,
    options: &RunOptions,
    group: Box<dyn ProcessGroup>,
) -> CliResult {
    let ranks = group.ranks();
    let mut trainer = if args.resume {
        Trainer::<M>::resume_in_group(
            &args.out,
            &ResumeOptions {
                allow_changed_data: args.allow_changed_data,
            },
            group,
        )?
    } else {
        Trainer::<M>::new_in_group(config, &args.out, group)?
    };
    let lead = trainer.rank() == 0;
    if lead {
        eprintln!(
            "{} {} ({}): {} parameters, {} training and {} validation tokens, step {}/{}",
            if args.resume { "resuming" } else { "training" },
            args.out.display(),
            trainer.config.arch.name(),
            trainer.model.n_params(),
            trainer.train_tokens(),
            trainer.val_tokens(),
            trainer.state.step,
            trainer.config.steps
        );
        if ranks > 1 {
            eprintln!(
                "{ranks} ranks, data-parallel: each takes {} micro-batches of {} sequences a step",
                trainer.config.grad_accum / ranks,
                trainer.config.batch_size
            );
        }
    }
    let report = trainer.run(options)?;
    if !lead {
        return Ok(());
    }
    eprintln!(
        "steps {}..{} in {:.1} s, {:.0} training tokens/s; last loss {}; validation loss {}",
        report.start_step,
        report.end_step,
        report.seconds,
        report.tokens_per_second,
        report
            .losses
            .last()
            .map_or("-".into(), |l| format!("{l:.4}")),
        report
            .val_losses
            .last()
            .map_or("-".into(), |(_, l)| format!("{l:.4}")),
    );
    Ok(())
}
