//! The `selective` command line: a thin layer over the library.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use selective::bench::time_scan;
use selective::eval::perplexity;
use selective::kernels::{ScanParallelism, ScanShape};
use selective::model::{DType, Mamba, MambaConfig};
use selective::npy::NpyWriter;
use selective::tokenizer::Tokenizer;

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
        /// Model directory: config.json + model.safetensors (or pytorch_model.bin).
        #[arg(long)]
        model: PathBuf,
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
    },
    /// Convert a model directory (original `pytorch_model.bin` or
    /// safetensors, either config dialect) into a Hugging Face-layout
    /// directory: config.json + model.safetensors (+ tokenizer.json).
    Convert {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = StorageType::F32)]
        dtype: StorageType,
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
        #[arg(long, value_enum, default_value_t = StorageType::F32)]
        dtype: StorageType,
    },
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

#[derive(Clone, Copy, ValueEnum)]
enum StorageType {
    F32,
    F16,
    Bf16,
}

impl From<StorageType> for DType {
    fn from(t: StorageType) -> Self {
        match t {
            StorageType::F32 => DType::F32,
            StorageType::F16 => DType::F16,
            StorageType::Bf16 => DType::BF16,
        }
    }
}

fn main() {
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
        } => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads.unwrap_or(0))
                .build()?;
            pool.install(|| score(&model, text_file, ids, json, logits_out))
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
            let (dm, nl) = match preset {
                Preset::Mamba130m => (768, 24),
                Preset::Mamba370m => (1024, 48),
                Preset::Mamba790m => (1536, 48),
                Preset::Mamba1_4b => (2048, 48),
                Preset::Mamba2_8b => (2560, 64),
            };
            let config = MambaConfig::new(
                d_model.unwrap_or(dm),
                n_layer.unwrap_or(nl),
                vocab_size.unwrap_or(50280),
                d_state.unwrap_or(16),
            );
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
    dir: &PathBuf,
    text_file: Option<PathBuf>,
    ids_file: Option<PathBuf>,
    json: bool,
    logits_out: Option<PathBuf>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let t0 = Instant::now();
    let model = Mamba::<f32>::from_dir(dir)?;
    let load_s = t0.elapsed().as_secs_f64();
    let ids: Vec<u32> = match (text_file, ids_file) {
        (Some(path), _) => {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let tokenizer = Tokenizer::for_model_dir(dir)?.ok_or_else(|| {
                format!(
                    "{}: no tokenizer.json to tokenise the text; pass --ids instead",
                    dir.display()
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
    let mut writer = match &logits_out {
        Some(path) => Some(NpyWriter::create(path, &[ids.len(), vocab])?),
        None => None,
    };
    let t1 = Instant::now();
    let result = perplexity(&model, &ids, |block| match writer.as_mut() {
        Some(w) => w.write(block.iter().copied()),
        None => Ok(()),
    })?;
    let score_s = t1.elapsed().as_secs_f64();
    if let Some(w) = writer {
        w.finish()?;
    }
    if json {
        let v = serde_json::json!({
            "model": dir.display().to_string(),
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
