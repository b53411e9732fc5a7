//! `selective generate`: prefill the prompt, then decode, streaming the
//! text as it is produced (the library's TextGenerator does the work).

use std::path::PathBuf;
use std::time::Instant;

use selective::generate::{generate, options_for, SamplingConfig, TextGenerator, Tokenizer};
use selective::io::{load_sequence, save_sequence};
use selective::kernels::WeightFormat;
use selective::memory::{peak_resident_bytes, resident_bytes};
use selective::nn::{Decoder, DecodingState, InferenceModel, TransformerInference};

use crate::model_source::{AnyModel, ModelSource};
use crate::{megabytes, CliResult};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Model directory: config.json + weights (+ tokenizer.json, or
    /// "tokenizer": "bytes" or {"chars": ...} in config.json). Default: the
    /// built-in character-level Shakespeare model (models/shakespeare-char).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt text; repeat the flag to generate for several prompts as one
    /// batch. Default for byte- and character-level models: a newline.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Prompt as token ids: a list, e.g. 5,6,7 (as `score --ids`).
    #[arg(long, conflicts_with_all = ["prompt", "prompt_ids_file"])]
    pub prompt_ids: Option<String>,
    /// Prompt as token ids in a file: a list as --prompt-ids takes, a JSON
    /// array, or ids separated by whitespace (as `score --ids-file`).
    #[arg(long, conflicts_with = "prompt")]
    pub prompt_ids_file: Option<PathBuf>,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to p (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep tokens at least this fraction as likely as the most likely one (0: all).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens by this (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    #[arg(long, default_value_t = 64)]
    pub repetition_window: usize,
    /// Always take the most likely token (same as --temperature 0).
    #[arg(long)]
    pub greedy: bool,
    /// Random seed (default: from the clock, printed so the run can be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the text contains this string (not printed); repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep going after the end-of-text token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print the generated token ids (one line, comma separated) instead of text.
    #[arg(long)]
    pub print_ids: bool,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Weight format for the projections and embedding: f32, bf16, f16 or q8.
    #[arg(long, default_value = "f32")]
    pub dtype: WeightFormat,
    /// After generating, save the sequence's state here (fixed size).
    #[arg(long)]
    pub save_state: Option<PathBuf>,
    /// Continue the sequence saved in this state file (the prompt, if any, follows it).
    #[arg(long)]
    pub load_state: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> CliResult {
    let t0 = Instant::now();
    let source = ModelSource::new(args.model.clone());
    let tokenizer = source.tokenizer()?;
    let format: WeightFormat = args.dtype;
    match source.load_any()? {
        AnyModel::Mamba(mamba) => {
            for note in mamba.config.disagreements() {
                eprintln!("warning: {}: config.json: {note}", source.name());
            }
            let model = InferenceModel::from_mamba(mamba, format)?;
            let load_state = args.load_state.clone();
            let seqs = generate_with(&model, &source, tokenizer, &args, t0, || {
                Ok(match &load_state {
                    Some(path) => load_sequence(path, &model.config)?,
                    None => model.new_state(),
                })
            })?;
            if let Some(path) = &args.save_state {
                save_sequence(path, &seqs[0], &model.config)?;
                eprintln!(
                    "saved the state after {} tokens to {}",
                    seqs[0].position,
                    path.display()
                );
            }
        }
        AnyModel::Transformer(transformer) => {
            if args.save_state.is_some() || args.load_state.is_some() {
                return Err(format!(
                    "{}: --save-state and --load-state hold a Mamba's fixed-size state; a Transformer's context is its KV cache, which grows with the text (give the whole text as the prompt instead)",
                    source.name()
                )
                .into());
            }
            let model = TransformerInference::from_transformer(transformer, format)?;
            generate_with(&model, &source, tokenizer, &args, t0, || {
                Ok(model.new_state())
            })?;
        }
    }
    Ok(())
}

/// Prefills every prompt after `initial()`, generates, prints, and
/// returns the sequences (their states cover every generated token).
fn generate_with<M: Decoder>(
    model: &M,
    source: &ModelSource,
    tokenizer: Option<Tokenizer>,
    args: &GenerateArgs,
    t0: Instant,
    initial: impl Fn() -> CliResult<M::State>,
) -> CliResult<Vec<M::State>> {
    use std::io::Write;
    eprintln!(
        "loaded {} ({} weights) in {:.2} s",
        source.name(),
        model.format().name(),
        t0.elapsed().as_secs_f64()
    );
    let prompt_ids = crate::token_ids::from_flags(
        args.prompt_ids.as_deref(),
        "--prompt-ids",
        args.prompt_ids_file.as_deref(),
    )?;
    let prompts: Vec<Vec<u32>> = if let Some(ids) = prompt_ids {
        vec![ids]
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
        let mut seq = initial()?;
        model.prefill(&mut seq, prompt)?;
        if seq.logits().is_empty() {
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
                model,
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
                model,
                tokenizer.as_ref(),
                args.max_tokens,
                sampling,
                args.ignore_eos,
            )?;
            let out = generate(model, &mut seqs, &options, |_, _| Ok(true))?;
            for tokens in &out.tokens {
                let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
                writeln!(lock, "{}", ids.join(","))?;
            }
            out
        }
    };
    drop(lock);
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
    Ok(seqs)
}
