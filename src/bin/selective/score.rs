//! `selective score`: mean negative log-likelihood per token and perplexity
//! of a text or of token ids, through the training forward or (--dtype) the
//! inference path.

use std::path::PathBuf;
use std::time::Instant;

use selective::io::NpyWriter;
use selective::kernels::WeightFormat;
use selective::nn::{perplexity, Decoder, InferenceModel, Perplexity, TransformerInference};

use crate::model_source::{AnyModel, ModelSource};
use crate::CliResult;

/// The inference path of either architecture.
enum Inference {
    Mamba(InferenceModel),
    Transformer(TransformerInference),
}

impl Inference {
    fn new(model: &AnyModel, format: WeightFormat) -> selective::Result<Self> {
        Ok(match model {
            AnyModel::Mamba(m) => Inference::Mamba(InferenceModel::from_mamba(m.clone(), format)?),
            AnyModel::Transformer(t) => {
                Inference::Transformer(TransformerInference::from_transformer(t.clone(), format)?)
            }
        })
    }

    fn score(&self, ids: &[u32], stepwise: bool) -> selective::Result<Perplexity> {
        fn with<M: Decoder>(m: &M, ids: &[u32], stepwise: bool) -> selective::Result<Perplexity> {
            if stepwise {
                m.perplexity_stepwise(ids)
            } else {
                m.perplexity(ids)
            }
        }
        match self {
            Inference::Mamba(m) => with(m, ids, stepwise),
            Inference::Transformer(m) => with(m, ids, stepwise),
        }
    }

    fn format(&self) -> WeightFormat {
        match self {
            Inference::Mamba(m) => Decoder::format(m),
            Inference::Transformer(m) => Decoder::format(m),
        }
    }
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Model directory: config.json + model.safetensors (or
    /// pytorch_model.bin); default: the built-in Shakespeare model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Text to score, tokenised with the model's tokenizer.
    #[arg(
        long,
        conflicts_with_all = ["ids", "ids_file"],
        required_unless_present_any = ["ids", "ids_file"]
    )]
    pub text_file: Option<PathBuf>,
    /// Token ids to score: a list, e.g. 5,6,7 (as `generate --prompt-ids`).
    #[arg(long, conflicts_with = "ids_file")]
    pub ids: Option<String>,
    /// Token ids to score in a file: a list as --ids takes, a JSON array,
    /// or ids separated by whitespace (as `generate --prompt-ids-file`).
    #[arg(long)]
    pub ids_file: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write every position's logits, (tokens, vocab) f32, as .npy.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Score with the weights in this format (f32 arithmetic), through
    /// the inference path (f32, bf16, f16 or q8); without it, the f32
    /// training forward.
    #[arg(long)]
    pub dtype: Option<WeightFormat>,
    /// With --dtype: score one token at a time through the decoding
    /// step, the path generation takes, instead of chunked prefill.
    #[arg(long, requires = "dtype")]
    pub stepwise: bool,
    /// Score only the last FRACTION of the tokens: the validation split
    /// that `selective train --val-fraction FRACTION` held out of the same
    /// text (split by the same rule, after tokenising).
    #[arg(long, value_name = "FRACTION")]
    pub held_out: Option<f64>,
    /// Score the tokens as consecutive windows of this many tokens, each
    /// from an empty context (as training's validation windows), instead of
    /// as one sequence; the mean is over every window's predictions (a
    /// last window of one token predicts nothing and is dropped).
    #[arg(long, conflicts_with = "logits_out")]
    pub window: Option<usize>,
}

pub fn run(args: ScoreArgs) -> CliResult {
    let ScoreArgs {
        model,
        text_file,
        ids,
        ids_file,
        json,
        logits_out,
        threads: _,
        dtype,
        stepwise,
        held_out,
        window,
    } = args;
    if window.is_some_and(|w| w < 2) {
        return Err("--window must be at least 2 tokens (one to read, one to predict)".into());
    }
    let source = &ModelSource::new(model);
    if dtype.is_some() && logits_out.is_some() {
        return Err("--logits-out works with the f32 training forward only; drop --dtype".into());
    }
    let t0 = Instant::now();
    let model = source.load_any()?;
    let vocab = match &model {
        AnyModel::Mamba(m) => {
            for note in m.config.disagreements() {
                eprintln!("warning: {}: config.json: {note}", source.name());
            }
            m.config.vocab_size
        }
        AnyModel::Transformer(t) => t.config.vocab_size,
    };
    let tokenizer = source.tokenizer()?;
    if let Some(t) = &tokenizer {
        t.check_fits(vocab)?;
    }
    let inference = match dtype {
        Some(t) => Some(Inference::new(&model, t)?),
        None => None,
    };
    let load_s = t0.elapsed().as_secs_f64();
    let listed = crate::token_ids::from_flags(ids.as_deref(), "--ids", ids_file.as_deref())?;
    let ids: Vec<u32> = match (text_file, listed) {
        (Some(path), _) => {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let tokenizer = tokenizer.as_ref().ok_or_else(|| {
                format!(
                    "{}: no tokenizer.json to tokenise the text; pass --ids or --ids-file instead",
                    source.name()
                )
            })?;
            tokenizer.encode(&text)?
        }
        (None, Some(ids)) => ids,
        (None, None) => return Err("give --text-file, --ids or --ids-file".into()),
    };
    let ids = match held_out {
        Some(fraction) => {
            let split = selective::train::TextData::split(ids, fraction)?;
            if split.val.len() < 2 {
                return Err(format!(
                    "--held-out {fraction} leaves {} tokens to score; at least 2 are needed",
                    split.val.len()
                )
                .into());
            }
            split.val
        }
        None => ids,
    };
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
    let mut keep = |block: &[f32]| match writer.as_mut() {
        Some(w) => w.write(block.iter().copied()),
        None => Ok(()),
    };
    let mut score = |ids: &[u32]| match (&inference, &model) {
        (Some(m), _) => m.score(ids, stepwise),
        (None, AnyModel::Mamba(m)) => perplexity(m, ids, &mut keep),
        (None, AnyModel::Transformer(m)) => perplexity(m, ids, &mut keep),
    };
    let result = match window {
        Some(_) if ids.len() < 2 => {
            return Err(format!("{} tokens to score; at least 2 are needed", ids.len()).into())
        }
        Some(w) => Perplexity::of_parts(
            &ids.chunks(w)
                .filter(|c| c.len() >= 2)
                .map(&mut score)
                .collect::<selective::Result<Vec<_>>>()?,
        ),
        None => score(&ids)?,
    };
    let score_s = t1.elapsed().as_secs_f64();
    if !result.mean_nll.is_finite() {
        return Err(format!(
            "{}: the mean NLL is {} (the model's outputs are not finite numbers)",
            source.name(),
            result.mean_nll
        )
        .into());
    }
    if let Some(w) = writer {
        w.finish()?;
    }
    if json {
        let v = serde_json::json!({
            "model": source.name(),
            "dtype": inference.as_ref().map_or("f32 (training forward)", |m| m.format().name()),
            "architecture": match &model {
                AnyModel::Mamba(m) if m.config.ssd.is_some() => "mamba2",
                AnyModel::Mamba(m) if m.config.dt_bc_rms_eps.is_some() => "falcon_mamba",
                AnyModel::Mamba(_) => "mamba",
                AnyModel::Transformer(_) => "transformer",
            },
            "path": match (&inference, stepwise) {
                (None, _) => "training forward",
                (Some(_), false) => "chunked prefill",
                (Some(_), true) => "decoding step",
            },
            "tokens": ids.len(),
            "held_out": held_out,
            "window": window,
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
