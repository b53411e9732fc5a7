//! The `selective` command line: a thin layer over the library, one file
//! per command (score, generate, train, task, bench); this file holds the
//! command tree and the commands of a few lines (convert, init).

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};

mod bench;
mod data;
mod generate;
mod model_source;
mod score;
mod sequence;
mod serve;
mod task;
mod token_ids;
mod train;

use selective::io::DType;
use selective::nn::{Mamba, MambaConfig};

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
    Score(score::ScoreArgs),
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
    Train(Box<train::TrainArgs>),
    /// Train and evaluate on a synthetic task (copying, selective-copying,
    /// induction-heads), S6 or S4D, gated or not; or --eval-only a saved
    /// induction-heads model at many lengths.
    Task(Box<task::TaskArgs>),
    /// Generate text: parallel prefill of the prompt, then recurrent
    /// decoding, streaming the text to stdout as it is produced.
    Generate(generate::GenerateArgs),
    /// An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions,
    /// streaming, continuous batching, a cache of states by prompt prefix).
    Serve(Box<serve::ServeArgs>),
    /// Prefill and decode speed in the manner of llama-bench, or (with
    /// --scaling) prefill time per token across sequence lengths.
    Bench(bench::BenchArgs),
    /// Build the real data sets of the DNA and audio experiments from
    /// Debian packages: great-ape DNA (dna-apes), spoken digits
    /// (speech-digits).
    Data(data::DataArgs),
    /// Train a next-token model (S6, S4D or attention) on a set made by
    /// `selective data`: a great ape's genome, or µ-law speech; held-out
    /// perplexity (bits per sample for audio), and generated WAV clips.
    Pretrain(Box<sequence::PretrainArgs>),
    /// Train a sequence classifier (S6 or S4D blocks, pooling, class head)
    /// on a set made by `selective data`: which great ape a DNA window
    /// comes from, which digit a clip says; from scratch or fine-tuned
    /// from `selective pretrain`.
    Classify(Box<sequence::ClassifyArgs>),
    /// Time the fused selective scan (forward and backward) on a Mamba
    /// layer's shape and print nanoseconds per (position x channel x state).
    BenchScan(bench::BenchScanArgs),
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
    /// tiiuae/falcon-mamba-7b: Mamba-1 with dt_low, B and C RMS-normalised,
    /// an untied head and a 65,024-token vocabulary.
    #[value(name = "falcon-mamba-7b")]
    FalconMamba7b,
    /// state-spaces/mamba2-*: the SSD mixer, d_state 128, head_dim 64, one
    /// group, vocabulary 50277 padded to 50288.
    #[value(name = "mamba2-130m")]
    Mamba2_130m,
    #[value(name = "mamba2-370m")]
    Mamba2_370m,
    #[value(name = "mamba2-780m")]
    Mamba2_780m,
    #[value(name = "mamba2-1.3b")]
    Mamba2_1_3b,
    #[value(name = "mamba2-2.7b")]
    Mamba2_2_7b,
}

impl Preset {
    /// The name on the command line.
    fn name(self) -> &'static str {
        match self {
            Preset::CharSmall => "char-small",
            Preset::Mamba130m => "mamba-130m",
            Preset::Mamba370m => "mamba-370m",
            Preset::Mamba790m => "mamba-790m",
            Preset::Mamba1_4b => "mamba-1.4b",
            Preset::Mamba2_8b => "mamba-2.8b",
            Preset::FalconMamba7b => "falcon-mamba-7b",
            Preset::Mamba2_130m => "mamba2-130m",
            Preset::Mamba2_370m => "mamba2-370m",
            Preset::Mamba2_780m => "mamba2-780m",
            Preset::Mamba2_1_3b => "mamba2-1.3b",
            Preset::Mamba2_2_7b => "mamba2-2.7b",
        }
    }

    /// Whether the preset is a Mamba-2.
    fn is_mamba2(self) -> bool {
        matches!(
            self,
            Preset::Mamba2_130m
                | Preset::Mamba2_370m
                | Preset::Mamba2_780m
                | Preset::Mamba2_1_3b
                | Preset::Mamba2_2_7b
        )
    }

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
            Preset::FalconMamba7b => (4096, 64, 65024),
            Preset::Mamba2_130m => (768, 24, 50288),
            Preset::Mamba2_370m => (1024, 48, 50288),
            Preset::Mamba2_780m => (1536, 48, 50288),
            Preset::Mamba2_1_3b => (2048, 48, 50288),
            Preset::Mamba2_2_7b => (2560, 64, 50288),
        };
        let mamba2 = self.is_mamba2();
        let d_state = d_state.unwrap_or(if mamba2 { 128 } else { 16 });
        let mut config = MambaConfig::new(
            d_model.unwrap_or(dm),
            n_layer.unwrap_or(nl),
            vocab_size.unwrap_or(vocab),
            d_state,
        );
        if mamba2 {
            config.ssd = Some(selective::nn::SsdConfig::new(64, 1));
        }
        if let Preset::FalconMamba7b = self {
            config.tie_embeddings = false;
            config.dt_bc_rms_eps = Some(1e-6);
        }
        config
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

type CliResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Runs `f` on a rayon pool of `threads` threads (default: one per core).
fn with_threads(threads: Option<usize>, f: impl FnOnce() -> CliResult + Send) -> CliResult {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()?;
    pool.install(f)
}

/// "123 MB", or "?" where the platform does not say.
fn megabytes(bytes: Option<u64>) -> String {
    bytes.map_or("?".into(), |b| format!("{:.0} MB", b as f64 / 1e6))
}

fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::Score(args) => with_threads(args.threads, || score::run(args)),
        Command::Generate(args) => with_threads(args.threads, || generate::run(args)),
        Command::Train(args) => with_threads(args.threads, || train::run(*args)),
        Command::Serve(args) => serve::run(*args),
        Command::Task(args) => Ok(task::run_task_command(*args)?),
        Command::Bench(args) => with_threads(args.threads, || bench::run(args)),
        Command::BenchScan(args) => bench::run_scan(args),
        Command::Data(args) => data::run(args),
        Command::Pretrain(args) => Ok(sequence::run_pretrain(*args)?),
        Command::Classify(args) => Ok(sequence::run_classify(*args)?),
        Command::Convert { model, out, dtype } => {
            let t0 = Instant::now();
            let m = model_source::ModelSource::Dir(model.clone()).load()?;
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
    }
}
