//! `selective bench` (prefill and decode speed as llama-bench, prefill
//! scaling with length, whole training steps) and `selective bench-scan`.

use std::path::PathBuf;

use selective::bench::bench_training;
use selective::bench::generation::{bench_generation, prefill_scaling};
use selective::bench::scan::time_scan;
use selective::kernels::{ScanParallelism, ScanShape, WeightFormat};
use selective::memory::peak_resident_bytes;
use selective::nn::{InferenceModel, Mamba};

use crate::model_source::ModelSource;
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
    /// Instead: time the prefill of one sequence at lengths 2^10, 2^12, ..., 2^max-log2.
    #[arg(long)]
    pub scaling: bool,
    #[arg(long, default_value_t = 20)]
    max_log2: u32,
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
    let config = args.preset.unwrap_or(Preset::CharSmall).config(
        args.d_model,
        args.n_layer,
        args.vocab_size,
        None,
    );
    let mut rows = Vec::new();
    for &len in &args.seq_len {
        rows.push(bench_training::<Mamba<f32>>(
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

/// What `bench` times: `--model DIR`; a randomly initialised model of
/// `--preset` (default mamba-130m) when a preset or a size is given; else
/// the built-in model, as `generate` and `score` default to.
fn bench_source(args: &BenchArgs) -> selective::Result<(String, Mamba<f32>)> {
    let random = args.preset.is_some()
        || args.d_model.is_some()
        || args.n_layer.is_some()
        || args.vocab_size.is_some();
    if random && args.model.is_none() {
        let preset = args.preset.unwrap_or(Preset::Mamba130m);
        let config = preset.config(args.d_model, args.n_layer, args.vocab_size, None);
        let name = format!("random {} (seed {})", preset.name(), args.seed);
        return Ok((name, Mamba::<f32>::init(config, args.seed)?));
    }
    let source = ModelSource::new(args.model.clone());
    Ok((source.name(), source.load()?))
}

pub fn run(args: BenchArgs) -> CliResult {
    let threads = rayon::current_num_threads();
    if args.train {
        return bench_train_command(&args);
    }
    if args.scaling {
        if args.max_log2 < 10 {
            return Err(format!(
                "--max-log2 {}: the lengths run from 2^10, so it must be at least 10",
                args.max_log2
            )
            .into());
        }
        let (name, mamba) = bench_source(&args)?;
        let model = InferenceModel::from_mamba(mamba, WeightFormat::F32)?;
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
            "prefill of one sequence, {name}: d_model {} n_layer {} d_inner {} (f32, {threads} threads)",
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
        let (name, mamba) = bench_source(&args)?;
        let model = InferenceModel::from_mamba(mamba, dtype)?;
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
            "model": name,
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
