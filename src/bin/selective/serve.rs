//! `selective serve`: the OpenAI-compatible server (the library's
//! `selective::serve` does the work; this loads the model and reads flags).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use selective::kernels::WeightFormat;
use selective::nn::{InferenceModel, TransformerInference};
use selective::serve::{serve, ChatTemplate, Engine, EngineOptions, Limits, Loaded, ServeOptions};

use crate::model_source::{AnyModel, ModelSource};
use crate::CliResult;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model directory (config.json, weights, tokenizer.json; a
    /// tokenizer_config.json with a chat_template is used for chat).
    /// Default: the built-in character-level Shakespeare model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// 0 picks a free port (printed when listening).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together at most; more requests wait in the queue.
    #[arg(long, default_value_t = 16)]
    pub parallel: usize,
    /// Requests (choices) that may wait for a slot; beyond it: 503.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Weight format for the projections and embedding: f32, bf16, f16 or q8.
    #[arg(long, default_value = "f32")]
    pub dtype: WeightFormat,
    /// Compute threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Megabytes of sequence states the prefix cache keeps (0: off).
    #[arg(long, default_value_t = 512)]
    pub cache_mb: usize,
    /// Tokens in one prompt at most.
    #[arg(long, default_value_t = 16384)]
    pub max_prompt_tokens: usize,
    /// max_tokens at most (and the default of a chat request).
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Seconds running requests may go on after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10.0)]
    pub drain_seconds: f64,
    /// The model's name in /v1/models and in responses (default: the
    /// directory's name).
    #[arg(long)]
    pub name: Option<String>,
}

pub fn run(args: ServeArgs) -> CliResult {
    if !(args.drain_seconds.is_finite() && args.drain_seconds >= 0.0) {
        return Err(format!("--drain-seconds must be >= 0, got {}", args.drain_seconds).into());
    }
    if let Some(dir) = &args.model {
        if !dir.is_dir() {
            return Err(format!("--model {}: no such directory", dir.display()).into());
        }
    }
    let source = ModelSource::new(args.model.clone());
    let model_name = args.name.clone().unwrap_or_else(|| match &args.model {
        Some(dir) => dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        None => "shakespeare-char".into(),
    });
    let options = ServeOptions {
        addr: SocketAddr::new(args.host, args.port),
        limits: Limits {
            max_prompt_tokens: args.max_prompt_tokens,
            max_tokens: args.max_tokens,
            ..Limits::default()
        },
        drain: Duration::from_secs_f64(args.drain_seconds),
    };
    let engine_options = EngineOptions {
        parallel: args.parallel,
        queue_capacity: args.queue,
        cache_bytes: args.cache_mb << 20,
        threads: args.threads.unwrap_or(0),
    };
    let format = args.dtype;
    let chat_dir = args.model.clone();
    let load = move || -> selective::Result<Loaded> {
        let t0 = std::time::Instant::now();
        let tokenizer = std::sync::Arc::new(source.tokenizer()?.ok_or_else(|| {
            selective::error::invalid(
                "serve",
                format!("{}: no tokenizer (tokenizer.json, or \"tokenizer\" in config.json): the server takes text", source.name()),
            )
        })?);
        let chat = match &chat_dir {
            Some(dir) => ChatTemplate::for_model_dir(dir)?,
            None => ChatTemplate::Plain,
        };
        let engine = match source.load_any()? {
            AnyModel::Mamba(mamba) => {
                for note in mamba.config.disagreements() {
                    eprintln!("warning: {}: config.json: {note}", source.name());
                }
                Engine::start(
                    InferenceModel::from_mamba(mamba, format)?,
                    tokenizer.clone(),
                    engine_options,
                )?
            }
            AnyModel::Transformer(t) => Engine::start(
                TransformerInference::from_transformer(t, format)?,
                tokenizer.clone(),
                engine_options,
            )?,
        };
        eprintln!(
            "selective serve: loaded {} ({} weights) in {:.2} s",
            source.name(),
            format.name(),
            t0.elapsed().as_secs_f64()
        );
        Ok(Loaded {
            engine,
            tokenizer,
            chat,
            model_name,
        })
    };
    serve(options, args.threads.unwrap_or(2), load, |addr| {
        eprintln!("selective serve: listening on http://{addr}");
    })?;
    Ok(())
}
