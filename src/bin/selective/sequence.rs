//! `selective pretrain DATA` and `selective classify DATA`: next-token
//! models and sequence classifiers on a set made by `selective data`
//! (docs/DESIGN.md §16): great-ape DNA or spoken digits. Each writes
//! `results.json` (settings, curve, held-out scores, wall time) and the
//! model into --out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde_json::json;

use selective::datasets::{mulaw_decode, ApeSplit, PreparedSet, SpeechSplit};
use selective::error::{invalid, Error, Result};
use selective::io::write_atomically;
use selective::io::Wav;
use selective::nn::{Positions, TransformerConfig};
use selective::rng::Rng;
use selective::tasks::{
    answer_loss_and_grads, answer_score, fit, AnswerScore, BlockArch, ClassifierInput, FitSettings,
    Pooling, SequenceClassifier, SequenceInput, SsmLayer, TaskBatch, TaskModel, TaskModelConfig,
    TaskNetConfig, TaskNetwork,
};
use selective::train::ProgressMode;

use crate::task::TaskLayer;

/// Sizes and optimiser settings both commands share.
#[derive(Args, Debug, Clone)]
pub struct ModelAndOptimiser {
    /// The sequence layer: s6 (Mamba), s4d (Mamba block with the
    /// time-invariant S4D layer) or attention (Transformer++, rotary).
    #[arg(long, default_value = "s6")]
    pub layer: TaskLayer,
    #[arg(long, default_value_t = 64)]
    pub d_model: usize,
    #[arg(long, default_value_t = 2)]
    pub n_layer: usize,
    #[arg(long, default_value_t = 16)]
    pub d_state: usize,
    /// Attention: heads per layer.
    #[arg(long, default_value_t = 4)]
    pub n_head: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Peak learning rate (warm-up 5% of the steps, cosine decay to lr/10).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 50)]
    pub eval_every: usize,
    /// Where to write results.json and the model (under model/).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ModelAndOptimiser {
    fn fit_settings(&self, tokens_per_step: usize) -> FitSettings {
        FitSettings {
            steps: self.steps,
            lr: self.lr,
            min_lr: self.lr / 10.0,
            warmup_steps: self.steps / 20,
            weight_decay: self.weight_decay,
            beta2: 0.95,
            adam_eps: 1e-8,
            clip: self.clip,
            eval_every: self.eval_every,
            stop_at_accuracy: None,
            tokens_per_step,
            log_every: 10,
            progress: ProgressMode::Auto,
        }
    }

    fn ssm_config(&self, vocab: usize, layer: SsmLayer) -> TaskModelConfig {
        let mut c =
            TaskModelConfig::new(vocab, self.d_model, self.n_layer, layer, BlockArch::Mamba);
        c.d_state = self.d_state;
        c
    }
}

/// Arguments of `selective pretrain`.
#[derive(Args, Debug, Clone)]
pub struct PretrainArgs {
    /// A directory made by `selective data dna-apes` or `speech-digits`.
    pub data: PathBuf,
    #[command(flatten)]
    pub common: ModelAndOptimiser,
    /// Tokens of context each training window has (its length L).
    #[arg(long, default_value_t = 1024)]
    pub seq_len: usize,
    /// DNA: the species whose genome is modelled.
    #[arg(long, default_value = "Hsap")]
    pub species: String,
    /// Held-out tokens scored at each evaluation (validation split).
    #[arg(long, default_value_t = 65_536)]
    pub eval_tokens: usize,
    /// Held-out tokens scored at the end (test split: held-out regions or
    /// voices).
    #[arg(long, default_value_t = 262_144)]
    pub test_tokens: usize,
    /// Also score the test split in windows of each of these lengths
    /// (comma separated; the same number of tokens at every length): the
    /// loss against the context the model reads.
    #[arg(long, value_delimiter = ',')]
    pub test_lengths: Vec<usize>,
    /// Speech: write this many generated clips as WAV files (S6 or S4D).
    #[arg(long, default_value_t = 0)]
    pub generate: usize,
    /// Speech: samples per generated clip.
    #[arg(long, default_value_t = 16_000)]
    pub generate_samples: usize,
    /// Speech: sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
}

/// Arguments of `selective classify`.
#[derive(Args, Debug, Clone)]
pub struct ClassifyArgs {
    /// A directory made by `selective data dna-apes` or `speech-digits`.
    pub data: PathBuf,
    #[command(flatten)]
    pub common: ModelAndOptimiser,
    /// DNA: the window length (bases) to classify by species. Speech: the
    /// whole clip is read.
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
    /// tokens (ids: nucleotides or µ-law codes) or vectors (speech: the
    /// decoded sample value, one real number per step).
    #[arg(long, default_value = "tokens")]
    pub input: String,
    #[arg(long, default_value = "mean")]
    pub pooling: Pooling,
    /// Fine-tune the blocks of this model from `selective pretrain`
    /// (its model/ directory; S6 or S4D) instead of a fresh initialisation.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Held-out windows per species (DNA) or clips per digit (speech) at
    /// each evaluation (validation split).
    #[arg(long, default_value_t = 16)]
    pub eval_windows: usize,
    /// Windows per species (DNA: test regions) or clips per digit
    /// (speech: test voices) scored at the end.
    #[arg(long, default_value_t = 64)]
    pub test_windows: usize,
}

fn in_pool(threads: Option<usize>, f: impl FnOnce() -> Result<()> + Send) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
        .map_err(|e| invalid("selective", format!("thread pool: {e}")))?
        .install(f)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON serialises");
    write_atomically(path, text.as_bytes())
}

/// Seeds of the validation and test windows, apart from the training stream.
const VAL_SEED: u64 = 0x0DA7_A001;
const TEST_SEED: u64 = 0x0DA7_A002;

/// Where the windows of a next-token model come from.
enum TokenSource {
    Dna {
        splits: [ApeSplit; 3],
        species: usize,
    },
    Speech {
        splits: [SpeechSplit; 3],
    },
}

impl TokenSource {
    fn vocab(&self) -> usize {
        match self {
            TokenSource::Dna { .. } => 5,
            TokenSource::Speech { .. } => 256,
        }
    }

    /// `n` windows of `len + 1` ids from split 0 (train), 1 (val) or 2 (test).
    fn windows(&self, split: usize, n: usize, len: usize, rng: &mut Rng) -> Result<Vec<Vec<u8>>> {
        (0..n)
            .map(|_| match self {
                TokenSource::Dna { splits, species } => splits[split]
                    .sample_window(*species, len + 1, rng)
                    .map(|w| w.to_vec())
                    .ok_or_else(|| {
                        invalid(
                            "selective pretrain",
                            format!(
                                "no segment of the {} split holds {} bases",
                                SPLIT_NAMES[split],
                                len + 1
                            ),
                        )
                    }),
                TokenSource::Speech { splits } => {
                    let s = &splits[split];
                    if len + 1 > s.clip_samples {
                        return Err(invalid(
                            "selective pretrain",
                            format!(
                                "--seq-len {len} + 1 is longer than a clip ({} samples)",
                                s.clip_samples
                            ),
                        ));
                    }
                    let clip = s.clip(rng.below(s.len()));
                    let start = rng.below(s.clip_samples - len);
                    Ok(clip[start..start + len + 1].to_vec())
                }
            })
            .collect()
    }
}

/// Bases in each held-out DNA stretch: every window length up to it tiles
/// the same bases.
const DNA_STRETCH: usize = 32_768;

impl TokenSource {
    /// The held-out stretches of `split`, the same on every run and for
    /// every window length up to the stretch: for DNA ⌊tokens / S⌋ (at
    /// least one) evenly spaced stretches of S + 1 bases, S = max(len, 2^15
    /// or the longest segment if shorter),
    /// for speech ⌊tokens / clip⌋ evenly spaced whole clips.
    fn stretches(&self, split: usize, tokens: usize, len: usize) -> Result<Vec<Vec<u8>>> {
        const OP: &str = "selective pretrain";
        match self {
            TokenSource::Dna { splits, species } => {
                // 2^15 bases, or less in a split without such a segment
                let fits = splits[split].longest_segment(*species).saturating_sub(1);
                let span = DNA_STRETCH.min(fits).max(len);
                let n = (tokens / span).max(1);
                let windows = splits[split]
                    .spaced_windows(*species, span + 1, n)
                    .ok_or_else(|| {
                        invalid(
                            OP,
                            format!(
                                "no segment of the {} split holds {} bases",
                                SPLIT_NAMES[split],
                                span + 1
                            ),
                        )
                    })?;
                Ok(windows.into_iter().map(|w| w.to_vec()).collect())
            }
            TokenSource::Speech { splits } => {
                let s = &splits[split];
                if len + 1 > s.clip_samples {
                    return Err(invalid(
                        OP,
                        format!(
                            "--seq-len {len} + 1 is longer than a clip ({} samples)",
                            s.clip_samples
                        ),
                    ));
                }
                let n = (tokens / s.clip_samples).clamp(1, s.len());
                Ok((0..n)
                    .map(|k| s.clip((2 * k + 1) * s.len() / (2 * n)).to_vec())
                    .collect())
            }
        }
    }
}

const SPLIT_NAMES: [&str; 3] = ["train", "val", "test"];

fn open_token_source(args: &PretrainArgs) -> Result<(TokenSource, String)> {
    match PreparedSet::open(&args.data)? {
        PreparedSet::DnaApes(m) => {
            let species = m
                .species
                .iter()
                .position(|s| *s == args.species)
                .ok_or_else(|| {
                    invalid(
                        "selective pretrain",
                        format!("--species {} is not one of {:?}", args.species, m.species),
                    )
                })?;
            let read = |s| ApeSplit::read(&args.data, &m, s);
            Ok((
                TokenSource::Dna {
                    splits: [read("train")?, read("val")?, read("test")?],
                    species,
                },
                format!("dna-apes ({})", args.species),
            ))
        }
        PreparedSet::SpeechDigits(m) => {
            let read = |s| SpeechSplit::read(&args.data, &m, s);
            Ok((
                TokenSource::Speech {
                    splits: [read("train")?, read("val")?, read("test")?],
                },
                "speech-digits (8-bit mu-law, 16 kHz)".into(),
            ))
        }
    }
}

/// Mean next-token loss over the held-out stretches of `split`
/// ([`TokenSource::stretches`]), each read in consecutive windows of `len`
/// from an empty context (the last one shorter when `len` does not divide
/// the stretch): every length scores the same tokens.
fn held_out<M: TaskNetwork<f32>>(
    model: &M,
    source: &TokenSource,
    split: usize,
    tokens: usize,
    len: usize,
) -> Result<AnswerScore> {
    let stretches = source.stretches(split, tokens, len)?;
    let mut score = AnswerScore::default();
    let span = stretches[0].len() - 1;
    let mut by_length: Vec<(usize, Vec<&[u8]>)> = vec![(len, Vec::new())];
    if span % len != 0 {
        by_length.push((span % len, Vec::new()));
    }
    for s in &stretches {
        for k in 0..span / len {
            by_length[0].1.push(&s[k * len..(k + 1) * len + 1]);
        }
        if let Some((r, rest)) = by_length.get_mut(1) {
            rest.push(&s[span - *r..]);
        }
    }
    for (l, windows) in &by_length {
        for chunk in windows.chunks((16_384 / l).max(1)) {
            score.add(answer_score(model, &TaskBatch::next_token(chunk, *l)?)?);
        }
    }
    Ok(score)
}

pub fn run_pretrain(args: PretrainArgs) -> Result<()> {
    in_pool(args.common.threads, || {
        let (source, data) = open_token_source(&args)?;
        let c = &args.common;
        match c.layer {
            TaskLayer::Ssm(layer) => {
                pretrain(&args, &source, &data, c.ssm_config(source.vocab(), layer))
            }
            TaskLayer::Attention => {
                if c.n_head == 0 || !c.d_model.is_multiple_of(c.n_head) {
                    return Err(invalid(
                        "selective pretrain",
                        format!("--n-head {} must divide --d-model {}", c.n_head, c.d_model),
                    ));
                }
                let mut t = TransformerConfig::new(c.d_model, c.n_layer, source.vocab(), c.n_head);
                t.positions = Positions::Rotary;
                t.max_position_embeddings = args.seq_len;
                pretrain(&args, &source, &data, t)
            }
        }
    })
}

fn pretrain<C: TaskNetConfig>(
    args: &PretrainArgs,
    source: &TokenSource,
    data: &str,
    config: C,
) -> Result<()>
where
    C::Model: TaskNetwork<f32, Config = C>,
{
    let c = &args.common;
    let len = args.seq_len;
    if len == 0 {
        return Err(invalid(
            "selective pretrain",
            "--seq-len must be at least 1",
        ));
    }
    std::fs::create_dir_all(&c.out).map_err(|e| Error::io(&c.out, e))?;
    let mut model = config.init(c.seed)?;
    eprintln!(
        "pretrain {}: {} ({} parameters), L {len}, batch {}, {} steps",
        data,
        model.describe(),
        model.parameter_count(),
        c.batch,
        c.steps
    );
    let settings = c.fit_settings(c.batch * len);
    let mut rng = Rng::new(c.seed.wrapping_add(1));
    let model_dir = c.out.join("model");
    let t0 = Instant::now();
    let outcome = fit(
        &config,
        &mut model,
        |m| m.params_mut(),
        &settings,
        |m, _| {
            let windows = source.windows(0, c.batch, len, &mut rng)?;
            let refs: Vec<&[u8]> = windows.iter().map(|w| w.as_slice()).collect();
            answer_loss_and_grads(m, &TaskBatch::next_token(&refs, len)?, 0.0)
        },
        |m| held_out(m, source, 1, args.eval_tokens, len),
        |m| m.save(&model_dir),
    )?;
    let train_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let test = held_out(&model, source, 2, args.test_tokens, len)?;
    let test_seconds = t1.elapsed().as_secs_f64();
    let nats = test.mean_loss();
    eprintln!(
        "test: {:.4} nats/token, perplexity {:.4}, {:.4} bits/token over {} tokens; trained in {train_seconds:.1}s",
        nats,
        nats.exp(),
        nats / std::f64::consts::LN_2,
        test.count
    );
    let mut by_length = Vec::new();
    for &l in &args.test_lengths {
        if l == 0 {
            return Err(invalid("selective pretrain", "a --test-lengths entry is 0"));
        }
        let t = Instant::now();
        let s = held_out(&model, source, 2, args.test_tokens, l)?;
        eprintln!(
            "test at length {l}: {:.4} nats/token over {} tokens",
            s.mean_loss(),
            s.count
        );
        by_length.push(json!({
            "length": l,
            "tokens": s.count,
            "nats_per_token": s.mean_loss(),
            "perplexity": s.mean_loss().exp(),
            "seconds": t.elapsed().as_secs_f64(),
        }));
    }
    let generated = if args.generate > 0 {
        generate_wavs(args, &model_dir, config_is_ssm(&model.label()))?
    } else {
        Vec::new()
    };
    let report = json!({
        "command": "pretrain",
        "data": data,
        "data_dir": args.data.display().to_string(),
        "label": model.label(),
        "model": config,
        "parameters": model.parameter_count(),
        "seq_len": len,
        "batch": c.batch,
        "steps": c.steps,
        "seed": c.seed,
        "settings": settings,
        "tokens_trained": c.steps * c.batch * len,
        "threads": rayon::current_num_threads(),
        "train_seconds": train_seconds,
        "curve": outcome.curve,
        "test_tokens": test.count,
        "test_nats_per_token": nats,
        "test_perplexity": nats.exp(),
        "test_bits_per_token": nats / std::f64::consts::LN_2,
        "test_next_token_accuracy": test.accuracy(),
        "test_seconds": test_seconds,
        "test_by_length": by_length,
        "generated": generated,
        "model_dir": model_dir.display().to_string(),
    });
    write_json(&c.out.join("results.json"), &report)
}

fn config_is_ssm(label: &str) -> bool {
    !label.starts_with("attention")
}

/// Samples `args.generate` clips from the saved S6/S4D model, one µ-law
/// code at a time from a zero state, and writes them as 16-bit WAV files.
fn generate_wavs(args: &PretrainArgs, model_dir: &Path, ssm: bool) -> Result<Vec<String>> {
    if !ssm {
        return Err(invalid(
            "selective pretrain",
            "--generate samples from an S6 or S4D model",
        ));
    }
    let model = TaskModel::<f32>::load(model_dir)?;
    if model.config.vocab_size != 256 {
        return Err(invalid(
            "selective pretrain",
            "--generate writes audio: it needs the speech-digits set",
        ));
    }
    let n = args.generate;
    let mut stepper = model.stepper(n)?;
    let mut state = model.zero_state(n);
    let mut rng = Rng::new(args.common.seed.wrapping_add(0x6E4E));
    // start from silence: µ-law code of 0.0
    let mut ids = vec![selective::datasets::mulaw_encode(0.0) as u32; n];
    let mut clips = vec![Vec::with_capacity(args.generate_samples); n];
    for _ in 0..args.generate_samples {
        let hidden = stepper.step(&mut state, &ids)?;
        let logits = model.logits_from_hidden(&hidden)?;
        for (b, row) in logits.chunks(256).enumerate() {
            let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let weights: Vec<f64> = row
                .iter()
                .map(|&v| ((v as f64 - max) / args.temperature).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let mut u = rng.uniform() * total;
            let mut code = 255;
            for (k, w) in weights.iter().enumerate() {
                if u < *w {
                    code = k;
                    break;
                }
                u -= w;
            }
            ids[b] = code as u32;
            clips[b].push(code as u8);
        }
    }
    let mut names = Vec::new();
    for (i, clip) in clips.iter().enumerate() {
        let samples = clip
            .iter()
            .map(|&c| (mulaw_decode(c) * 32767.0).round() as i16)
            .collect();
        let name = format!("generated-{i}.wav");
        Wav {
            sample_rate: 16_000,
            samples,
        }
        .write(&args.common.out.join(&name))?;
        names.push(name);
    }
    eprintln!("wrote {} generated clips", names.len());
    Ok(names)
}

/// Labelled sequences for a classifier.
enum LabelledSource {
    Dna {
        splits: [ApeSplit; 3],
        window: usize,
    },
    Speech {
        splits: [SpeechSplit; 3],
        vectors: bool,
    },
}

/// One batch: the inputs as ids or vectors, the labels, and the length.
struct LabelledBatch {
    ids: Vec<u32>,
    values: Vec<f32>,
    labels: Vec<u32>,
    len: usize,
}

impl LabelledBatch {
    fn input(&self) -> SequenceInput<'_, f32> {
        if self.values.is_empty() {
            SequenceInput::Tokens(&self.ids)
        } else {
            SequenceInput::Vectors(&self.values)
        }
    }
}

impl LabelledSource {
    fn classes(&self) -> usize {
        match self {
            LabelledSource::Dna { splits, .. } => splits[0].species.len(),
            LabelledSource::Speech { .. } => 10,
        }
    }

    /// A batch from (split, item) picks: DNA picks a species and a random
    /// window of it; speech names a clip.
    fn batch(&self, split: usize, picks: &[usize], rng: &mut Rng) -> Result<LabelledBatch> {
        let mut b = LabelledBatch {
            ids: Vec::new(),
            values: Vec::new(),
            labels: Vec::new(),
            len: 0,
        };
        for &pick in picks {
            match self {
                LabelledSource::Dna { splits, window } => {
                    let w = splits[split]
                        .sample_window(pick, *window, rng)
                        .ok_or_else(|| {
                            invalid(
                                "selective classify",
                                format!(
                                    "no segment of the {} split holds a window of {window}",
                                    SPLIT_NAMES[split]
                                ),
                            )
                        })?;
                    b.ids.extend(w.iter().map(|&v| v as u32));
                    b.labels.push(pick as u32);
                    b.len = *window;
                }
                LabelledSource::Speech { splits, vectors } => {
                    let s = &splits[split];
                    let clip = s.clip(pick);
                    if *vectors {
                        b.values
                            .extend(clip.iter().map(|&c| mulaw_decode(c) as f32));
                    } else {
                        b.ids.extend(clip.iter().map(|&c| c as u32));
                    }
                    b.labels.push(s.digits[pick] as u32);
                    b.len = s.clip_samples;
                }
            }
        }
        Ok(b)
    }

    /// Training picks: a uniform species, or a uniform training clip.
    fn training_picks(&self, n: usize, rng: &mut Rng) -> Vec<usize> {
        let bound = match self {
            LabelledSource::Dna { splits, .. } => splits[0].species.len(),
            LabelledSource::Speech { splits, .. } => splits[0].len(),
        };
        (0..n).map(|_| rng.below(bound)).collect()
    }

    /// Held-out picks: `per_class` windows of every species, or clips of
    /// every digit.
    fn held_out_picks(&self, split: usize, per_class: usize) -> Vec<usize> {
        match self {
            LabelledSource::Dna { splits, .. } => (0..per_class)
                .flat_map(|_| 0..splits[split].species.len())
                .collect(),
            LabelledSource::Speech { splits, .. } => {
                // the first `per_class` clips of each digit, in clip order
                let mut taken = [0usize; 10];
                let digits = &splits[split].digits;
                (0..digits.len())
                    .filter(|&i| {
                        let d = digits[i] as usize;
                        taken[d] += 1;
                        taken[d] <= per_class
                    })
                    .collect()
            }
        }
    }
}

fn score_classifier(
    model: &SequenceClassifier<f32>,
    source: &LabelledSource,
    split: usize,
    per_class: usize,
    batch: usize,
    seed: u64,
) -> Result<AnswerScore> {
    let mut rng = Rng::new(seed);
    let mut score = AnswerScore::default();
    for picks in source.held_out_picks(split, per_class).chunks(batch.max(1)) {
        let b = source.batch(split, picks, &mut rng)?;
        score.add(model.score(b.input(), &b.labels, picks.len(), b.len)?);
    }
    Ok(score)
}

pub fn run_classify(args: ClassifyArgs) -> Result<()> {
    in_pool(args.common.threads, || classify(&args))
}

fn classify(args: &ClassifyArgs) -> Result<()> {
    const OP: &str = "selective classify";
    let c = &args.common;
    let vectors = match args.input.as_str() {
        "tokens" => false,
        "vectors" => true,
        other => {
            return Err(invalid(
                OP,
                format!("--input {other:?}: expected tokens or vectors"),
            ))
        }
    };
    let (source, data, vocab) = match PreparedSet::open(&args.data)? {
        PreparedSet::DnaApes(m) => {
            if vectors {
                return Err(invalid(
                    OP,
                    "--input vectors reads speech samples; DNA is read as tokens",
                ));
            }
            let read = |s| ApeSplit::read(&args.data, &m, s);
            (
                LabelledSource::Dna {
                    splits: [read("train")?, read("val")?, read("test")?],
                    window: args.window,
                },
                format!("dna-apes, window {}", args.window),
                5,
            )
        }
        PreparedSet::SpeechDigits(m) => {
            let read = |s| SpeechSplit::read(&args.data, &m, s);
            (
                LabelledSource::Speech {
                    splits: [read("train")?, read("val")?, read("test")?],
                    vectors,
                },
                format!("speech-digits, {} input", args.input),
                256,
            )
        }
    };
    let input = if vectors {
        ClassifierInput::Vectors { width: 1 }
    } else {
        ClassifierInput::Tokens
    };
    let layer = match c.layer {
        TaskLayer::Ssm(layer) => layer,
        TaskLayer::Attention => {
            return Err(invalid(
                OP,
                "the classifier's blocks are S6 or S4D (--layer s6|s4d)",
            ))
        }
    };
    let backbone = match &args.init {
        Some(dir) => {
            let m = TaskModel::<f32>::load(dir)?;
            if m.config.vocab_size != vocab && !vectors {
                return Err(invalid(
                    OP,
                    format!(
                        "{}: a model of {} tokens, the data has {vocab}",
                        dir.display(),
                        m.config.vocab_size
                    ),
                ));
            }
            m
        }
        None => TaskModel::init(c.ssm_config(if vectors { 1 } else { vocab }, layer), c.seed)?,
    };
    let mut model =
        SequenceClassifier::from_backbone(backbone, source.classes(), args.pooling, input, c.seed)?;
    std::fs::create_dir_all(&c.out).map_err(|e| Error::io(&c.out, e))?;
    let len = match &source {
        LabelledSource::Dna { window, .. } => *window,
        LabelledSource::Speech { splits, .. } => splits[0].clip_samples,
    };
    eprintln!(
        "classify {data}: {} classes, {} parameters ({:?} {}x{} d_state {}), {}, batch {}, {} steps",
        source.classes(),
        model.parameter_count(),
        model.config.backbone.layer,
        model.config.backbone.n_layer,
        model.config.backbone.d_model,
        model.config.backbone.d_state,
        args.init.as_ref().map_or("from scratch".to_string(), |p| format!("fine-tuned from {}", p.display())),
        c.batch,
        c.steps
    );
    let settings = c.fit_settings(c.batch * len);
    let config = model.config;
    let mut rng = Rng::new(c.seed.wrapping_add(1));
    let model_dir = c.out.join("model");
    let t0 = Instant::now();
    let eval_batch = (65_536 / len).clamp(1, 16);
    let outcome = fit(
        &config,
        &mut model,
        |m| &mut m.params,
        &settings,
        |m, _| {
            let picks = source.training_picks(c.batch, &mut rng);
            let b = source.batch(0, &picks, &mut rng)?;
            m.loss_and_grads(b.input(), &b.labels, picks.len(), b.len)
        },
        |m| score_classifier(m, &source, 1, args.eval_windows, eval_batch, VAL_SEED),
        |m| m.save(&model_dir),
    )?;
    let train_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let test = score_classifier(&model, &source, 2, args.test_windows, eval_batch, TEST_SEED)?;
    let test_seconds = t1.elapsed().as_secs_f64();
    eprintln!(
        "test accuracy {:.2}% (loss {:.4}) on {} sequences; chance {:.1}%; trained in {train_seconds:.1}s",
        100.0 * test.accuracy(),
        test.mean_loss(),
        test.count,
        100.0 / source.classes() as f64
    );
    let report = json!({
        "command": "classify",
        "data": data,
        "data_dir": args.data.display().to_string(),
        "init": args.init.as_ref().map(|p| p.display().to_string()),
        "model": config,
        "parameters": model.parameter_count(),
        "len": len,
        "batch": c.batch,
        "steps": c.steps,
        "seed": c.seed,
        "settings": settings,
        "threads": rayon::current_num_threads(),
        "train_seconds": train_seconds,
        "curve": outcome.curve,
        "test_sequences": test.count,
        "test_accuracy": test.accuracy(),
        "test_loss": test.mean_loss(),
        "chance_accuracy": 1.0 / source.classes() as f64,
        "test_seconds": test_seconds,
        "model_dir": model_dir.display().to_string(),
    });
    write_json(&c.out.join("results.json"), &report)
}
