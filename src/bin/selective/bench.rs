//! `selective bench` (prefill and decode speed as llama-bench, prefill
//! scaling with length, whole training steps) and `selective bench-scan`.

use std::path::PathBuf;

use selective::bench::bench_training;
use selective::bench::generation::bench_generation;
use selective::bench::scaling::{batch_throughput, context_scaling, SyntheticContext};
use selective::bench::scan::time_scan;
use selective::kernels::{ScanParallelism, ScanShape, WeightFormat};
use selective::memory::peak_resident_bytes;
use selective::nn::{
    Architecture, Decoder, InferenceModel, Mamba, MambaConfig, Transformer, TransformerConfig,
    TransformerInference,
};

use crate::model_source::{AnyModel, ModelSource};
use crate::{megabytes, CliResult, Preset};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model directory. Default: the built-in model, unless --preset or a
    /// size below asks for a randomly initialised one.
    #[arg(long, conflicts_with_all = ["preset", "d_model", "n_layer", "vocab_size"])]
    pub model: Option<PathBuf>,
    /// Time a randomly initialised model of this configuration (default
    /// with a size flag: mamba-130m; with --train always random, default
    /// char-small, the built-in model's shape).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    #[arg(long)]
    pub d_model: Option<usize>,
    #[arg(long)]
    pub n_layer: Option<usize>,
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// The architecture of a random model: mamba, or transformer (the
    /// Transformer++ of about the same parameter count: the same d_model
    /// and half the layers of the Mamba preset, unless --n-layer says
    /// how many; --n-head heads).
    #[arg(long, default_value = "mamba")]
    pub arch: Architecture,
    /// Transformer: attention heads (default d_model / 64, at least 1).
    #[arg(long)]
    pub n_head: Option<usize>,
    /// Prompt tokens to prefill.
    #[arg(short = 'p', long = "prompt-tokens", default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(short = 'n', long = "gen-tokens", default_value_t = 128)]
    pub gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Weight formats to time, comma separated (f32, bf16, f16, q8).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub dtype: Vec<WeightFormat>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Instead: inference cost against context length, at lengths 2^10,
    /// 2^12, ..., 2^max-log2: prefill time per token, decoding time per
    /// token after that much context, the context's memory; then decoding
    /// throughput at batch sizes 1 ... 32.
    #[arg(long)]
    pub scaling: bool,
    /// --scaling: the longest length, 2^this (default 20 for Mamba, 16 for
    /// a Transformer, whose KV cache at 2^20 would not fit).
    #[arg(long)]
    max_log2: Option<u32>,
    /// --scaling: once one prefill takes longer than this, longer ones are skipped.
    #[arg(long, default_value_t = 120.0)]
    prefill_limit_s: f64,
    /// --scaling: decoding steps timed per length and per batch size.
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// --scaling: batch sizes of the decoding throughput, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    batches: Vec<usize>,
    /// --scaling: context of each sequence in the throughput batches.
    #[arg(long, default_value_t = 2048)]
    batch_context: usize,
    /// Instead: time whole training steps (forward, backward, clipping,
    /// AdamW) of a random model and report their peak memory.
    #[arg(long)]
    pub train: bool,
    /// Sequences per training batch (--train).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Sequence lengths to time (--train), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "256")]
    pub seq_len: Vec<usize>,
    /// Timed training steps per length (--train), after one untimed step.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(clap::Args)]
pub struct BenchScanArgs {
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Sequence lengths to time, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    pub len: Vec<usize>,
    #[arg(long, default_value_t = 1536)]
    pub channels: usize,
    #[arg(long, default_value_t = 16)]
    pub state: usize,
    /// Thread counts to time, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Positions between the states kept for the backward pass.
    #[arg(long, default_value_t = 256)]
    pub chunk_len: usize,
}

/// `selective bench --train`: tokens per second of whole training steps
/// and peak memory, at each --seq-len.
fn bench_train_command(args: &BenchArgs) -> CliResult {
    if args.model.is_some() {
        return Err("--train times a randomly initialised model of --preset; drop --model".into());
    }
    let threads = rayon::current_num_threads();
    let mamba = preset_of(args, Preset::CharSmall)?.config(
        args.d_model,
        args.n_layer,
        args.vocab_size,
        None,
    );
    let transformer = transformer_of_equal_size(args, &mamba);
    let (d_model, n_layer, vocab, n_params) = match args.arch {
        Architecture::Mamba | Architecture::Mamba2 => (
            mamba.d_model,
            mamba.n_layer,
            mamba.vocab_size,
            mamba.n_params(),
        ),
        Architecture::Transformer => {
            let t = &transformer;
            (t.d_model, t.n_layer, t.vocab_size, t.n_params())
        }
    };
    let mut rows = Vec::new();
    for &len in &args.seq_len {
        let (b, steps, seed) = (args.batch_size, args.steps, args.seed);
        rows.push(match args.arch {
            Architecture::Mamba | Architecture::Mamba2 => {
                bench_training::<Mamba<f32>>(&mamba, b, len, steps, seed)?
            }
            Architecture::Transformer => {
                bench_training::<Transformer<f32>>(&transformer, b, len, steps, seed)?
            }
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "training steps (forward, backward, clipping, AdamW), {} d_model {d_model} n_layer {n_layer} \
         vocab {vocab} ({n_params} parameters), {threads} threads",
        args.arch.name(),
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

/// The preset a random model is made of: `--preset`, else `default`, or
/// mamba2-130m for `--arch mamba2`; a Mamba-1 preset with `--arch mamba2`
/// is refused rather than silently changed.
fn preset_of(args: &BenchArgs, default: Preset) -> selective::Result<Preset> {
    let mamba2 = args.arch == Architecture::Mamba2;
    match args.preset {
        None if mamba2 => Ok(Preset::Mamba2_130m),
        None => Ok(default),
        Some(p) if mamba2 && !p.is_mamba2() => Err(selective::Error::Invalid {
            op: "bench",
            message: format!(
                "--preset {} is a Mamba-1; --arch mamba2 takes a mamba2-* preset",
                p.name()
            ),
        }),
        Some(p) => Ok(p),
    }
}

/// The Transformer++ that `--arch transformer` times beside the Mamba
/// of `mamba`'s sizes: the same d_model and vocabulary, half the layers
/// (a Transformer layer, 12 D², has the parameters of two Mamba blocks,
/// 6 D² each, as the paper pairs them) unless --n-layer gives the number,
/// and --n-head heads (default D / 64).
fn transformer_of_equal_size(args: &BenchArgs, mamba: &MambaConfig) -> TransformerConfig {
    let n_layer = args.n_layer.unwrap_or((mamba.n_layer / 2).max(1));
    let n_head = args.n_head.unwrap_or((mamba.d_model / 64).max(1));
    TransformerConfig::new(mamba.d_model, n_layer, mamba.vocab_size, n_head)
}

/// What `bench` times: `--model DIR` (either architecture, as its
/// config.json says); a randomly initialised model of `--preset` (default
/// mamba-130m) and `--arch` when a preset, a size or the Transformer is
/// asked for; else the built-in model, as `generate` and `score` default to.
fn bench_source(args: &BenchArgs) -> selective::Result<(String, AnyModel)> {
    let random = args.preset.is_some()
        || args.d_model.is_some()
        || args.n_layer.is_some()
        || args.vocab_size.is_some()
        || args.arch != Architecture::Mamba;
    if random && args.model.is_none() {
        let preset = preset_of(args, Preset::Mamba130m)?;
        let config = preset.config(args.d_model, args.n_layer, args.vocab_size, None);
        return Ok(match args.arch {
            Architecture::Mamba | Architecture::Mamba2 => (
                format!("random {} (seed {})", preset.name(), args.seed),
                AnyModel::Mamba(Mamba::<f32>::init(config, args.seed)?),
            ),
            Architecture::Transformer => {
                let t = transformer_of_equal_size(args, &config);
                (
                    format!(
                        "random Transformer++ the size of {} ({} layers, {} heads; seed {})",
                        preset.name(),
                        t.n_layer,
                        t.n_head,
                        args.seed
                    ),
                    AnyModel::Transformer(Transformer::<f32>::init(t, args.seed)?),
                )
            }
        });
    }
    let source = ModelSource::new(args.model.clone());
    Ok((source.name(), source.load_any()?))
}

/// `selective bench --scaling`: the model's inference cost against context length.
fn scaling_command<M: SyntheticContext>(
    args: &BenchArgs,
    name: &str,
    model: &M,
    shape: &str,
) -> CliResult {
    let threads = rayon::current_num_threads();
    let default_max = match args.arch {
        Architecture::Mamba | Architecture::Mamba2 => 20,
        Architecture::Transformer => 16,
    };
    let max_log2 = args.max_log2.unwrap_or(default_max);
    if max_log2 < 10 {
        return Err(format!(
            "--max-log2 {max_log2}: the lengths run from 2^10, so it must be at least 10"
        )
        .into());
    }
    let lengths: Vec<usize> = (10..=max_log2).step_by(2).map(|p| 1usize << p).collect();
    let report = context_scaling(
        model,
        &lengths,
        1 << 14,
        args.prefill_limit_s,
        args.decode_steps,
        args.seed,
    )?;
    let batches = batch_throughput(
        model,
        &args.batches,
        args.batch_context,
        args.decode_steps,
        args.seed,
    )?;
    if args.json {
        let v = serde_json::json!({
            "model": name,
            "shape": shape,
            "n_params": model.n_params(),
            "threads": threads,
            "lengths": report.lengths,
            "prefill_skipped": report.prefill_skipped,
            "batches": batches,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "inference cost against context, {name}: {shape}, {} parameters (f32, {threads} threads)",
        model.n_params()
    );
    println!("| length | prefill µs per token | vs 2^10 | decode µs per token | vs 2^10 | context memory |");
    println!("|---|---|---|---|---|---|");
    let base = &report.lengths[0];
    for r in &report.lengths {
        let prefill = match (r.prefill_us_per_token, base.prefill_us_per_token) {
            (Some(p), Some(b)) => format!("{p:.2} | {:.2}", p / b),
            _ => "not run | ".to_string(),
        };
        println!(
            "| 2^{} | {prefill} | {:.1} | {:.2} | {} |",
            r.len.trailing_zeros(),
            r.decode_us_per_token,
            r.decode_us_per_token / base.decode_us_per_token,
            human_bytes(r.context_bytes),
        );
    }
    if let Some(why) = &report.prefill_skipped {
        println!("\n{why}.");
    }
    println!(
        "\ndecoding throughput, every sequence after {} tokens of context:",
        args.batch_context
    );
    println!("| batch | tokens/s | context memory |");
    println!("|---|---|---|");
    for b in &batches {
        println!(
            "| {} | {:.1} | {} |",
            b.batch,
            b.tokens_per_second,
            human_bytes(b.context_bytes)
        );
    }
    Ok(())
}

/// 1.2 KB, 3.4 MB, 5.6 GB.
fn human_bytes(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} KB", b / 1e3)
    }
}

/// `selective bench`: prefill and decode tokens per second of each --dtype.
fn generation_rows<M: Decoder>(
    args: &BenchArgs,
    name: &str,
    model: &M,
    bandwidth: f64,
    rows: &mut Vec<serde_json::Value>,
) -> CliResult {
    let threads = rayon::current_num_threads();
    let r = bench_generation(
        model,
        args.prompt_tokens,
        args.gen_tokens,
        args.reps,
        args.seed,
    )?;
    let bytes = model.bytes_per_token();
    let bound = bandwidth * 1e9 / bytes as f64;
    rows.push(serde_json::json!({
        "model": name,
        "dtype": model.format().name(),
        "threads": threads,
        "n_params": model.n_params(),
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
    Ok(())
}

pub fn run(args: BenchArgs) -> CliResult {
    let threads = rayon::current_num_threads();
    if args.train {
        return bench_train_command(&args);
    }
    if args.scaling {
        let (name, model) = bench_source(&args)?;
        return match model {
            AnyModel::Mamba(m) => {
                let c = &m.config;
                let shape = format!(
                    "Mamba d_model {} n_layer {} d_inner {} d_state {}",
                    c.d_model, c.n_layer, c.d_inner, c.d_state
                );
                let model = InferenceModel::from_mamba(m, WeightFormat::F32)?;
                scaling_command(&args, &name, &model, &shape)
            }
            AnyModel::Transformer(t) => {
                let c = &t.config;
                let shape = format!(
                    "Transformer++ d_model {} n_layer {} n_head {} d_ff {}",
                    c.d_model, c.n_layer, c.n_head, c.d_ff
                );
                let model = TransformerInference::from_transformer(t, WeightFormat::F32)?;
                scaling_command(&args, &name, &model, &shape)
            }
        };
    }
    let bandwidth = selective::bench::scan::read_bandwidth(1 << 30, threads);
    let mut rows = Vec::new();
    for &dtype in &args.dtype {
        let (name, model) = bench_source(&args)?;
        match model {
            AnyModel::Mamba(m) => {
                let model = InferenceModel::from_mamba(m, dtype)?;
                generation_rows(&args, &name, &model, bandwidth, &mut rows)?;
            }
            AnyModel::Transformer(t) => {
                let model = TransformerInference::from_transformer(t, dtype)?;
                generation_rows(&args, &name, &model, bandwidth, &mut rows)?;
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let name = rows
        .first()
        .and_then(|r| r["model"].as_str())
        .unwrap_or("?");
    println!("{name}; read bandwidth {bandwidth:.1} GB/s ({threads} threads)");
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

/// `selective bench-scan`: the fused selective scan alone, forward and
/// backward, at each thread count and length.
pub fn run_scan(args: BenchScanArgs) -> CliResult {
    let BenchScanArgs {
        batch,
        len,
        channels,
        state,
        threads,
        reps,
        chunk_len,
    } = args;
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
            let r = pool.install(|| time_scan(shape, reps, chunk_len, ScanParallelism::Auto))?;
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
