//! The `selective` command line: a thin layer over the library.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};

mod model_source;
mod task;
use model_source::ModelSource;
use selective::bench::bench_training;
use selective::bench::generation::{
    bench_generation, peak_resident_bytes, prefill_scaling, resident_bytes,
};
use selective::bench::scan::time_scan;
use selective::generate::sampling::SamplingConfig;
use selective::generate::tokenizer::Tokenizer;
use selective::generate::{generate, options_for, TextGenerator};
use selective::io::npy::NpyWriter;
use selective::io::{load_sequence, save_sequence, DType};
use selective::kernels::WeightFormat;
use selective::kernels::{ScanParallelism, ScanShape};
use selective::nn::loss::perplexity;
use selective::nn::{InferenceModel, Mamba, MambaConfig, Sequence};
use selective::train::{ProgressMode, RunOptions, TrainConfig, Trainer};

#[derive(Parser)]
#[command(
    name = "selective",
    version,
    about = "Mamba (selective state space models) in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mean negative log-likelihood per token and perplexity of a text
    /// (like llama-perplexity, or lm-eval's loglikelihood).
    Score {
        /// Model directory: config.json + model.safetensors (or
        /// pytorch_model.bin); default: the built-in Shakespeare model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Text to score, tokenised with the model directory's tokenizer.json.
        #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
        text_file: Option<PathBuf>,
        /// Token ids to score: a JSON array of integers.
        #[arg(long)]
        ids: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also write every position's logits, (tokens, vocab) f32, as .npy.
        #[arg(long)]
        logits_out: Option<PathBuf>,
        #[arg(long)]
        threads: Option<usize>,
        /// Score with the weights in this format (f32 arithmetic), through
        /// the inference path (f32, bf16, f16 or q8); without it, the f32
        /// training forward.
        #[arg(long)]
        dtype: Option<WeightFormat>,
        /// With --dtype: score one token at a time through the decoding
        /// step, the path generation takes, instead of chunked prefill.
        #[arg(long, requires = "dtype")]
        stepwise: bool,
    },
    /// Convert a model directory (original `pytorch_model.bin` or
    /// safetensors, either config dialect) into a Hugging Face-layout
    /// directory: config.json + model.safetensors (+ tokenizer.json).
    Convert {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The stored dtype: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: DType,
    },
    /// Write a freshly initialised model (official initialisation) as a
    /// Hugging Face-layout directory.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// A released configuration; the size flags below override it.
        #[arg(long, value_enum, default_value_t = Preset::Mamba130m)]
        preset: Preset,
        #[arg(long)]
        d_model: Option<usize>,
        #[arg(long)]
        n_layer: Option<usize>,
        #[arg(long)]
        vocab_size: Option<usize>,
        #[arg(long)]
        d_state: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The stored dtype: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: DType,
    },
    /// Train a language model on a text file (byte-level, or a
    /// tokenizer.json): AdamW, warm-up + cosine, checkpoints, --resume.
    Train(Box<TrainArgs>),
    /// Train and evaluate on a synthetic task (copying, selective-copying,
    /// induction-heads), S6 or S4D, gated or not; or --eval-only a saved
    /// induction-heads model at many lengths.
    Task(Box<task::TaskArgs>),
    /// Generate text: parallel prefill of the prompt, then recurrent
    /// decoding, streaming the text to stdout as it is produced.
    Generate(GenerateArgs),
    /// Prefill and decode speed in the manner of llama-bench, or (with
    /// --scaling) prefill time per token across sequence lengths.
    Bench(BenchArgs),
    /// Time the fused selective scan (forward and backward) on a Mamba
    /// layer's shape and print nanoseconds per (position x channel x state).
    BenchScan {
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Sequence lengths to time, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
        len: Vec<usize>,
        #[arg(long, default_value_t = 1536)]
        channels: usize,
        #[arg(long, default_value_t = 16)]
        state: usize,
        /// Thread counts to time, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Positions between the states kept for the backward pass.
        #[arg(long, default_value_t = 256)]
        chunk_len: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// d_model 256, 4 layers, vocabulary 72 (Tiny Shakespeare's 65
    /// characters, padded): the built-in Shakespeare model's shape.
    #[value(name = "char-small")]
    CharSmall,
    #[value(name = "mamba-130m")]
    Mamba130m,
    #[value(name = "mamba-370m")]
    Mamba370m,
    #[value(name = "mamba-790m")]
    Mamba790m,
    #[value(name = "mamba-1.4b")]
    Mamba1_4b,
    #[value(name = "mamba-2.8b")]
    Mamba2_8b,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model directory: config.json + weights (+ tokenizer.json, or
    /// "tokenizer": "bytes" or {"chars": ...} in config.json). Default: the
    /// built-in character-level Shakespeare model (models/shakespeare-char).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt text; repeat the flag to generate for several prompts as one
    /// batch. Default for byte- and character-level models: a newline.
    #[arg(long)]
    prompt: Vec<String>,
    /// Prompt as token ids, comma separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    prompt_ids: Vec<u32>,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 128)]
    max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to p (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep tokens at least this fraction as likely as the most likely one (0: all).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens by this (1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    #[arg(long, default_value_t = 64)]
    repetition_window: usize,
    /// Always take the most likely token (same as --temperature 0).
    #[arg(long)]
    greedy: bool,
    /// Random seed (default: from the clock, printed so the run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the text contains this string (not printed); repeatable.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going after the end-of-text token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print the generated token ids (one line, comma separated) instead of text.
    #[arg(long)]
    print_ids: bool,
    #[arg(long)]
    threads: Option<usize>,
    /// Weight format for the projections and embedding: f32, bf16, f16 or q8.
    #[arg(long, default_value = "f32")]
    dtype: WeightFormat,
    /// After generating, save the sequence's state here (fixed size).
    #[arg(long)]
    save_state: Option<PathBuf>,
    /// Continue the sequence saved in this state file (the prompt, if any, follows it).
    #[arg(long)]
    load_state: Option<PathBuf>,
}

/// Settings left out take the config file's value, else the default
/// (char-small: d_model 256, 4 layers, d_state 16, byte-level).
#[derive(clap::Args)]
struct TrainArgs {
    /// Run directory: config.json, metrics.jsonl, checkpoint/, model/.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its checkpoint, with its settings.
    #[arg(long)]
    resume: bool,
    /// Training settings as JSON (the fields of RUN/config.json; any subset).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Training text.
    #[arg(long)]
    data: Option<PathBuf>,
    /// A tokenizer.json (default: byte-level, vocabulary 256).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// A character vocabulary: the distinct characters of the text (65 for
    /// Tiny Shakespeare), as nanoGPT's shakespeare_char.
    #[arg(long)]
    char_vocab: bool,
    #[arg(long)]
    d_model: Option<usize>,
    #[arg(long)]
    n_layer: Option<usize>,
    #[arg(long)]
    d_state: Option<usize>,
    #[arg(long)]
    expand: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per sequence.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Optimizer steps of the whole run.
    #[arg(long)]
    steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    min_lr: Option<f64>,
    /// Default: 10% of the steps.
    #[arg(long)]
    warmup_steps: Option<usize>,
    #[arg(long)]
    weight_decay: Option<f64>,
    /// AdamW betas, e.g. 0.9,0.95.
    #[arg(long, value_delimiter = ',')]
    betas: Option<Vec<f64>>,
    /// Maximum global gradient norm (0: no clipping).
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    eval_every: Option<usize>,
    #[arg(long)]
    eval_batches: Option<usize>,
    #[arg(long)]
    save_every: Option<usize>,
    /// Log line every this many steps when stderr is not a terminal.
    #[arg(long)]
    log_every: Option<usize>,
    /// Fraction of the text (its end) held out for validation.
    #[arg(long)]
    val_fraction: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop (with a checkpoint) after this step; continue later with --resume.
    #[arg(long)]
    stop_after: Option<usize>,
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Model directory; without it, a randomly initialised model of --preset.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Default: mamba-130m; char-small with --train.
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    #[arg(long)]
    d_model: Option<usize>,
    #[arg(long)]
    n_layer: Option<usize>,
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Prompt tokens to prefill.
    #[arg(short = 'p', long = "prompt-tokens", default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(short = 'n', long = "gen-tokens", default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long)]
    threads: Option<usize>,
    /// Weight formats to time, comma separated (f32, bf16, f16, q8).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    dtype: Vec<WeightFormat>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Instead: time the prefill of one sequence at lengths 2^10, 2^12, ..., 2^max-log2.
    #[arg(long)]
    scaling: bool,
    #[arg(long, default_value_t = 20)]
    max_log2: u32,
    /// Instead: time whole training steps (forward, backward, clipping,
    /// AdamW) of a random model and report their peak memory.
    #[arg(long)]
    train: bool,
    /// Sequences per training batch (--train).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Sequence lengths to time (--train), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "256")]
    seq_len: Vec<usize>,
    /// Timed training steps per length (--train), after one untimed step.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl Preset {
    /// The preset's configuration with the given sizes overridden.
    fn config(
        self,
        d_model: Option<usize>,
        n_layer: Option<usize>,
        vocab_size: Option<usize>,
        d_state: Option<usize>,
    ) -> MambaConfig {
        let (dm, nl, vocab) = match self {
            Preset::CharSmall => (256, 4, 72),
            Preset::Mamba130m => (768, 24, 50280),
            Preset::Mamba370m => (1024, 48, 50280),
            Preset::Mamba790m => (1536, 48, 50280),
            Preset::Mamba1_4b => (2048, 48, 50280),
            Preset::Mamba2_8b => (2560, 64, 50280),
        };
        MambaConfig::new(
            d_model.unwrap_or(dm),
            n_layer.unwrap_or(nl),
            vocab_size.unwrap_or(vocab),
            d_state.unwrap_or(16),
        )
    }
}

/// Keeps freed memory in the process for the next allocation of the same
/// size instead of handing it back to the kernel. A training step allocates
/// and frees the same activation buffers (megabytes each) every step; with
/// glibc's defaults each comes from a fresh mmap whose pages the kernel
/// zeroes on first touch, which measured 1.14 s of system time in 7
/// char-small steps against 0.18 s with these settings. Peak memory is
/// unchanged (the same buffers are live at the peak).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory_for_reuse() {
    extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    // SAFETY: mallopt only changes glibc's allocator settings; called before
    // any thread starts. 32 MiB is the largest mmap threshold glibc accepts
    // on 64-bit systems; a failed call (return 0) leaves the defaults.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, std::ffi::c_int::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory_for_reuse() {}

fn main() {
    keep_freed_memory_for_reuse();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match cli.command {
        Command::Score {
            model,
            text_file,
            ids,
            json,
            logits_out,
            threads,
            dtype,
            stepwise,
        } => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads.unwrap_or(0))
                .build()?;
            pool.install(|| {
                score(
                    &ModelSource::new(model),
                    text_file,
                    ids,
                    json,
                    logits_out,
                    dtype,
                    stepwise,
                )
            })
        }
        Command::Generate(args) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(args.threads.unwrap_or(0))
                .build()?;
            pool.install(|| generate_command(args))
        }
        Command::Train(args) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(args.threads.unwrap_or(0))
                .build()?;
            pool.install(|| train_command(*args))
        }
        Command::Task(args) => Ok(task::run_task_command(*args)?),
        Command::Bench(args) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(args.threads.unwrap_or(0))
                .build()?;
            pool.install(|| bench_command(args))
        }
        Command::Convert { model, out, dtype } => {
            let t0 = Instant::now();
            let m = Mamba::<f32>::from_dir(&model)?;
            m.save(&out, dtype.into())?;
            let tokenizer = model.join("tokenizer.json");
            if tokenizer.exists() {
                std::fs::copy(&tokenizer, out.join("tokenizer.json"))
                    .map_err(|e| format!("{}: {e}", tokenizer.display()))?;
            }
            eprintln!(
                "wrote {} ({} parameters) in {:.2} s",
                out.display(),
                m.config.n_params(),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Init {
            out,
            preset,
            d_model,
            n_layer,
            vocab_size,
            d_state,
            seed,
            dtype,
        } => {
            let config = preset.config(d_model, n_layer, vocab_size, d_state);
            let model = Mamba::<f32>::init(config, seed)?;
            model.save(&out, dtype.into())?;
            eprintln!(
                "wrote {} ({} parameters)",
                out.display(),
                model.config.n_params()
            );
            Ok(())
        }
        Command::BenchScan {
            batch,
            len,
            channels,
            state,
            threads,
            reps,
            chunk_len,
        } => {
            println!("| threads | batch | len | channels | state | forward ms | forward ns/elem | backward ms | backward ns/elem |");
            println!("|---|---|---|---|---|---|---|---|---|");
            for &t in &threads {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
                for &l in &len {
                    let shape = ScanShape {
                        batch,
                        len: l,
                        channels,
                        state,
                    };
                    let r =
                        pool.install(|| time_scan(shape, reps, chunk_len, ScanParallelism::Auto))?;
                    let per = |s: f64| s * 1e9 / r.elements as f64;
                    println!(
                        "| {t} | {batch} | {l} | {channels} | {state} | {:.2} | {:.3} | {:.2} | {:.3} |",
                        r.forward_s * 1e3,
                        per(r.forward_s),
                        r.backward_s * 1e3,
                        per(r.backward_s)
                    );
                }
            }
            Ok(())
        }
    }
}

fn score(
    source: &ModelSource,
    text_file: Option<PathBuf>,
    ids_file: Option<PathBuf>,
    json: bool,
    logits_out: Option<PathBuf>,
    dtype: Option<WeightFormat>,
    stepwise: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if dtype.is_some() && logits_out.is_some() {
        return Err("--logits-out works with the f32 training forward only; drop --dtype".into());
    }
    let t0 = Instant::now();
    let model = source.load()?;
    let tokenizer = source.tokenizer()?;
    let inference = match dtype {
        Some(t) => Some(InferenceModel::from_mamba(model.clone(), t.into())?),
        None => None,
    };
    let load_s = t0.elapsed().as_secs_f64();
    let ids: Vec<u32> = match (text_file, ids_file) {
        (Some(path), _) => {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let tokenizer = tokenizer.as_ref().ok_or_else(|| {
                format!(
                    "{}: no tokenizer.json to tokenise the text; pass --ids instead",
                    source.name()
                )
            })?;
            tokenizer.encode(&text)?
        }
        (None, Some(path)) => {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            serde_json::from_str(&text).map_err(|e| {
                format!(
                    "{}: expected a JSON array of token ids: {e}",
                    path.display()
                )
            })?
        }
        (None, None) => return Err("give --text-file or --ids".into()),
    };
    let vocab = model.config.vocab_size;
    // Padding rows of the embedding are not tokens: scoring one is an error,
    // not a count (the text path cannot produce them).
    if let Some(tokenizer) = &tokenizer {
        let real = tokenizer.vocab_size().min(vocab);
        if let Some(pos) = ids.iter().position(|&id| id as usize >= real) {
            return Err(format!(
                "token {pos} is id {}, a padding id: the tokenizer has {} tokens (the embedding {vocab} rows)",
                ids[pos],
                tokenizer.vocab_size()
            )
            .into());
        }
    }
    let mut writer = match &logits_out {
        Some(path) => Some(NpyWriter::create(path, &[ids.len(), vocab])?),
        None => None,
    };
    let t1 = Instant::now();
    let result = match &inference {
        Some(m) if stepwise => m.perplexity_stepwise(&ids)?,
        Some(m) => m.perplexity(&ids)?,
        None => perplexity(&model, &ids, |block| match writer.as_mut() {
            Some(w) => w.write(block.iter().copied()),
            None => Ok(()),
        })?,
    };
    let score_s = t1.elapsed().as_secs_f64();
    if let Some(w) = writer {
        w.finish()?;
    }
    if json {
        let v = serde_json::json!({
            "model": source.name(),
            "dtype": inference.as_ref().map_or("f32 (training forward)", |m| m.format().name()),
            "path": match (&inference, stepwise) {
                (None, _) => "training forward",
                (Some(_), false) => "chunked prefill",
                (Some(_), true) => "decoding step",
            },
            "tokens": ids.len(),
            "predicted_tokens": result.predicted_tokens,
            "mean_nll": result.mean_nll,
            "perplexity": result.perplexity,
            "load_seconds": load_s,
            "score_seconds": score_s,
        });
        println!("{v}");
    } else {
        println!(
            "tokens {}  predicted {}  mean NLL {:.6} nats/token  perplexity {:.4}",
            ids.len(),
            result.predicted_tokens,
            result.mean_nll,
            result.perplexity
        );
        eprintln!(
            "load {load_s:.2} s, score {score_s:.2} s ({:.1} tokens/s)",
            ids.len() as f64 / score_s
        );
    }
    Ok(())
}

type CliResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn megabytes(bytes: Option<u64>) -> String {
    bytes.map_or("?".into(), |b| format!("{:.0} MB", b as f64 / 1e6))
}

fn generate_command(args: GenerateArgs) -> CliResult {
    use std::io::Write;
    let t0 = Instant::now();
    let source = ModelSource::new(args.model.clone());
    let mamba = source.load()?;
    let model = InferenceModel::from_mamba(mamba, args.dtype.into())?;
    let tokenizer = source.tokenizer()?;
    eprintln!(
        "loaded {} ({} weights) in {:.2} s",
        source.name(),
        model.format().name(),
        t0.elapsed().as_secs_f64()
    );
    let prompts: Vec<Vec<u32>> = if !args.prompt_ids.is_empty() {
        vec![args.prompt_ids.clone()]
    } else if args.prompt.is_empty() {
        // Byte- and character-level models start from a newline, as
        // nanoGPT's samples do; others need a prompt or a state.
        match &tokenizer {
            Some(tok @ (Tokenizer::Bytes | Tokenizer::Chars(_))) if args.load_state.is_none() => {
                vec![tok.encode("\n")?]
            }
            _ => vec![Vec::new()],
        }
    } else {
        let tok = tokenizer.as_ref().ok_or_else(|| {
            format!(
                "{}: no tokenizer (tokenizer.json, or \"tokenizer\": \"bytes\" in config.json); use --prompt-ids",
                source.name()
            )
        })?;
        args.prompt
            .iter()
            .map(|p| tok.encode(p))
            .collect::<selective::Result<_>>()?
    };
    if args.load_state.is_some() && prompts.len() > 1 {
        return Err("--load-state continues one sequence: give at most one --prompt".into());
    }
    if args.save_state.is_some() && prompts.len() > 1 {
        return Err("--save-state saves one sequence: give at most one --prompt".into());
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let sampling = SamplingConfig {
        temperature: if args.greedy { 0.0 } else { args.temperature },
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        repetition_window: args.repetition_window,
        seed,
    };
    sampling.validate()?;
    // Prefill every prompt (each alone: no padding between sequences).
    let t_prefill = Instant::now();
    let mut seqs = Vec::with_capacity(prompts.len());
    for prompt in &prompts {
        let mut seq = match &args.load_state {
            Some(path) => load_sequence(path, &model.config)?,
            None => Sequence::new(&model.config),
        };
        model.prefill(&mut seq, prompt)?;
        if seq.logits.is_empty() {
            return Err("nothing to continue: give --prompt, --prompt-ids or --load-state".into());
        }
        seqs.push(seq);
    }
    let prefill_s = t_prefill.elapsed().as_secs_f64();
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let text_mode = tokenizer.is_some() && !args.print_ids;
    if !args.stop.is_empty() && !text_mode {
        return Err("--stop needs text: a model with a tokenizer and no --print-ids".into());
    }
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    let out = match tokenizer.as_ref().filter(|_| text_mode) {
        Some(tok) => {
            let generator = TextGenerator::new(
                &model,
                tok,
                args.max_tokens,
                sampling,
                args.stop.clone(),
                args.ignore_eos,
            )?;
            // one sequence streams as it comes; several print whole at the end
            let streaming = seqs.len() == 1;
            let text = generator.generate(&mut seqs, |_, piece| {
                if streaming {
                    let mut lock = stdout.lock();
                    let _ = lock.write_all(piece.as_bytes());
                    let _ = lock.flush();
                }
                Ok(())
            })?;
            if streaming {
                writeln!(lock)?;
            } else {
                for (i, t) in text.texts.iter().enumerate() {
                    writeln!(lock, "--- sequence {i} ---")?;
                    writeln!(lock, "{t}")?;
                }
            }
            text.output
        }
        None => {
            let options = options_for(
                &model,
                tokenizer.as_ref(),
                args.max_tokens,
                sampling,
                args.ignore_eos,
            )?;
            let out = generate(&model, &mut seqs, &options, |_, _| Ok(true))?;
            for tokens in &out.tokens {
                let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
                writeln!(lock, "{}", ids.join(","))?;
            }
            out
        }
    };
    drop(lock);
    if let Some(path) = &args.save_state {
        save_sequence(path, &seqs[0], &model.config)?;
        eprintln!(
            "saved the state after {} tokens to {}",
            seqs[0].position,
            path.display()
        );
    }
    let generated: usize = out.tokens.iter().map(Vec::len).sum();
    eprintln!(
        "prefill {prompt_tokens} tokens in {:.3} s ({:.1} tokens/s); decode {generated} tokens in {:.3} s ({:.1} tokens/s); seed {seed}; resident {} (peak {})",
        prefill_s,
        prompt_tokens as f64 / prefill_s.max(1e-12),
        out.seconds,
        out.tokens_per_second(),
        megabytes(resident_bytes()),
        megabytes(peak_resident_bytes()),
    );
    Ok(())
}

fn train_command(args: TrainArgs) -> CliResult {
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
    let mut trainer = if args.resume {
        if args.config.is_some() || !given.is_empty() {
            return Err(format!(
                "--resume continues with the run's own settings ({}); drop --config and --{}",
                args.out.join("config.json").display(),
                given.join(", --").replace('_', "-")
            )
            .into());
        }
        Trainer::resume(&args.out)?
    } else {
        Trainer::new(config, &args.out)?
    };
    eprintln!(
        "{} {}: {} parameters, {} training and {} validation tokens, step {}/{}",
        if args.resume { "resuming" } else { "training" },
        args.out.display(),
        trainer.model.config.n_params(),
        trainer.train_tokens(),
        trainer.val_tokens(),
        trainer.state.step,
        trainer.config.steps
    );
    let report = trainer.run(&options)?;
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

/// `selective bench --train`: tokens per second of whole training steps
/// and peak memory, at each --seq-len.
fn bench_train_command(args: &BenchArgs) -> CliResult {
    if args.model.is_some() {
        return Err("--train times a randomly initialised model of --preset; drop --model".into());
    }
    let threads = rayon::current_num_threads();
    let config = args.preset.unwrap_or(Preset::CharSmall).config(
        args.d_model,
        args.n_layer,
        args.vocab_size,
        None,
    );
    let mut rows = Vec::new();
    for &len in &args.seq_len {
        rows.push(bench_training(
            &config,
            args.batch_size,
            len,
            args.steps,
            args.seed,
        )?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "training steps (forward, backward, clipping, AdamW), d_model {} n_layer {} vocab {} \
         ({} parameters), {threads} threads",
        config.d_model,
        config.n_layer,
        config.vocab_size,
        config.n_params()
    );
    println!("| batch | seq_len | tokens/step | tokens/s | peak resident |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} ± {:.0} | {} |",
            r.batch,
            r.seq_len,
            r.batch * r.seq_len,
            r.tokens_per_second.mean,
            r.tokens_per_second.sd,
            megabytes(r.peak_resident_bytes)
        );
    }
    Ok(())
}

fn bench_model(args: &BenchArgs, format: WeightFormat) -> selective::Result<InferenceModel> {
    let mamba = match &args.model {
        Some(dir) => Mamba::<f32>::from_dir(dir)?,
        None => Mamba::<f32>::init(
            args.preset.unwrap_or(Preset::Mamba130m).config(
                args.d_model,
                args.n_layer,
                args.vocab_size,
                None,
            ),
            args.seed,
        )?,
    };
    InferenceModel::from_mamba(mamba, format)
}

fn bench_command(args: BenchArgs) -> CliResult {
    let threads = rayon::current_num_threads();
    if args.train {
        return bench_train_command(&args);
    }
    if args.scaling {
        let model = bench_model(&args, WeightFormat::F32)?;
        let lengths: Vec<usize> = (10..=args.max_log2)
            .step_by(2)
            .map(|p| 1usize << p)
            .collect();
        let timings = prefill_scaling(&model, &lengths, 1 << 14, args.seed)?;
        if args.json {
            println!("{}", serde_json::to_string(&timings)?);
            return Ok(());
        }
        println!(
            "prefill of one sequence, d_model {} n_layer {} d_inner {} (f32, {threads} threads)",
            model.config.d_model, model.config.n_layer, model.config.d_inner
        );
        println!("| length | seconds | µs per token | vs 2^10 |");
        println!("|---|---|---|---|");
        let base = timings[0].microseconds_per_token;
        for t in &timings {
            println!(
                "| 2^{} | {:.3} | {:.2} | {:.2} |",
                t.len.trailing_zeros(),
                t.seconds,
                t.microseconds_per_token,
                t.microseconds_per_token / base
            );
        }
        return Ok(());
    }
    let bandwidth = selective::bench::scan::read_bandwidth(1 << 30, threads);
    let mut rows = Vec::new();
    for &dtype in &args.dtype {
        let model = bench_model(&args, dtype.into())?;
        let r = bench_generation(
            &model,
            args.prompt_tokens,
            args.gen_tokens,
            args.reps,
            args.seed,
        )?;
        let bytes = model.bytes_per_token();
        let bound = bandwidth * 1e9 / bytes as f64;
        rows.push(serde_json::json!({
            "dtype": model.format().name(),
            "threads": threads,
            "n_params": model.config.n_params(),
            "prompt_tokens": r.prompt_tokens,
            "gen_tokens": r.generated_tokens,
            "reps": r.reps,
            "prefill_tokens_per_second": r.prefill.mean,
            "prefill_sd": r.prefill.sd,
            "decode_tokens_per_second": r.decode.mean,
            "decode_sd": r.decode.sd,
            "weight_bytes_per_token": bytes,
            "read_bandwidth_gb_per_s": bandwidth,
            "decode_bound_tokens_per_second": bound,
            "fraction_of_bound": r.decode.mean / bound,
            "peak_resident_bytes": peak_resident_bytes(),
        }));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("read bandwidth {bandwidth:.1} GB/s ({threads} threads)");
    println!("| dtype | threads | test | tokens/s | bound tokens/s | of bound |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {threads} | pp{} | {:.1} ± {:.1} | | |",
            r["dtype"].as_str().unwrap_or("?"),
            r["prompt_tokens"],
            r["prefill_tokens_per_second"].as_f64().unwrap_or(0.0),
            r["prefill_sd"].as_f64().unwrap_or(0.0),
        );
        println!(
            "| {} | {threads} | tg{} | {:.1} ± {:.1} | {:.1} | {:.0}% |",
            r["dtype"].as_str().unwrap_or("?"),
            r["gen_tokens"],
            r["decode_tokens_per_second"].as_f64().unwrap_or(0.0),
            r["decode_sd"].as_f64().unwrap_or(0.0),
            r["decode_bound_tokens_per_second"].as_f64().unwrap_or(0.0),
            100.0 * r["fraction_of_bound"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}
