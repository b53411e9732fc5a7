//! Generation as text: [`generate`] with a tokenizer around it, so that a
//! caller gets printable pieces of text as they become final, with stop
//! strings and the end-of-text token handled once, here, for every
//! front end (the command line, a server).
//!
//! Per sequence, each sampled token goes through a [`TextStream`] (a
//! character split over several tokens is held back until complete), the
//! end-of-text token is dropped from the text, and [`StopStrings`] holds
//! back any tail that might begin a stop string and ends the sequence when
//! one appears (the stop string itself is not part of the text).
//!
//! ```
//! use selective::generate::{SamplingConfig, TextGenerator, Tokenizer};
//! use selective::kernels::WeightFormat;
//! use selective::nn::{InferenceModel, Mamba, Sequence};
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare-char");
//! let model = InferenceModel::from_mamba(Mamba::<f32>::from_dir(dir)?, WeightFormat::F32)?;
//! let tokenizer = Tokenizer::for_model_dir(dir)?.expect("a character vocabulary");
//! let generator = TextGenerator::new(&model, &tokenizer, 40, SamplingConfig::greedy(), vec!["\n\n".into()], false)?;
//! let mut seq = Sequence::new(&model.config);
//! model.prefill(&mut seq, &tokenizer.encode("ROMEO:")?)?;
//! let mut printed = String::new();
//! let out = generator.generate(std::slice::from_mut(&mut seq), |_, piece| {
//!     printed.push_str(piece); // a front end would print it here
//!     Ok(())
//! })?;
//! assert_eq!(out.texts[0], printed);
//! assert!(!printed.contains("\n\n"));
//! # Ok::<(), selective::Error>(())
//! ```

use super::generation::{generate, FinishReason, GenerateOptions, GenerationOutput};
use super::sampling::SamplingConfig;
use super::text_stream::{Decode, Released, StopStrings, TextStream};
use super::tokenizer::Tokenizer;
use crate::error::Result;
use crate::nn::Decoder;

/// The generation options for `model` read with `tokenizer`: its
/// end-of-text token (unless `ignore_eos`) and its vocabulary size, so that
/// the embedding's padding rows are never sampled. Errors if the tokenizer
/// has more tokens than the embedding has rows.
pub fn options_for<M: Decoder>(
    model: &M,
    tokenizer: Option<&Tokenizer>,
    max_new_tokens: usize,
    sampling: SamplingConfig,
    ignore_eos: bool,
) -> Result<GenerateOptions> {
    sampling.validate()?;
    let vocab_size = match tokenizer {
        Some(t) => {
            t.check_fits(model.vocab_rows())?;
            Some(t.vocab_size())
        }
        None => None,
    };
    let eos = if ignore_eos {
        None
    } else {
        tokenizer.and_then(Tokenizer::eos_token_id)
    };
    Ok(GenerateOptions {
        max_new_tokens,
        eos,
        sampling,
        vocab_size,
    })
}

/// A model and its tokenizer, generating text.
pub struct TextGenerator<'a, M: Decoder> {
    model: &'a M,
    tokenizer: &'a Tokenizer,
    options: GenerateOptions,
    stop: Vec<String>,
}

/// What [`TextGenerator::generate`] produced.
#[derive(Clone, Debug)]
pub struct TextGeneration {
    /// The text of each sequence (without the end-of-text token or a stop string).
    pub texts: Vec<String>,
    /// The tokens, why each sequence ended, and the timing.
    pub output: GenerationOutput,
}

impl<'a, M: Decoder> TextGenerator<'a, M> {
    /// Up to `max_new_tokens` per sequence, sampled by `sampling`, ending
    /// at the tokenizer's end-of-text token (unless `ignore_eos`) or at the
    /// first of `stop`.
    pub fn new(
        model: &'a M,
        tokenizer: &'a Tokenizer,
        max_new_tokens: usize,
        sampling: SamplingConfig,
        stop: Vec<String>,
        ignore_eos: bool,
    ) -> Result<Self> {
        let options = options_for(model, Some(tokenizer), max_new_tokens, sampling, ignore_eos)?;
        StopStrings::new(stop.clone())?;
        Ok(Self {
            model,
            tokenizer,
            options,
            stop,
        })
    }

    pub fn options(&self) -> &GenerateOptions {
        &self.options
    }

    /// Continues each of `seqs` (each must have seen a token). `on_text(i,
    /// piece)` receives sequence i's text in pieces as soon as they are
    /// final; the pieces of a sequence make up its text in the result.
    /// Each sequence's state covers every generated token, as [`generate`]
    /// leaves it.
    pub fn generate(
        &self,
        seqs: &mut [M::State],
        mut on_text: impl FnMut(usize, &str) -> Result<()>,
    ) -> Result<TextGeneration> {
        let n = seqs.len();
        let mut pieces: Vec<SequenceText<&Tokenizer>> = (0..n)
            .map(|_| SequenceText::new(self.tokenizer, &self.stop, self.options.eos))
            .collect::<Result<_>>()?;
        let mut texts = vec![String::new(); n];
        let output = generate(self.model, seqs, &self.options, |i, token| {
            let released = pieces[i].push(token)?;
            if !released.text.is_empty() {
                on_text(i, &released.text)?;
                texts[i].push_str(&released.text);
            }
            Ok(!released.stopped)
        })?;
        for i in 0..n {
            let rest = pieces[i].finish(output.finish[i])?;
            if !rest.is_empty() {
                on_text(i, &rest)?;
                texts[i].push_str(&rest);
            }
        }
        Ok(TextGeneration { texts, output })
    }
}

/// One sequence's generated tokens as text, for any front end that samples
/// token by token ([`TextGenerator`], the server): each token goes through a
/// [`TextStream`] (a character split over several tokens is held back until
/// complete), the end-of-text token is dropped from the text, and
/// [`StopStrings`] holds back any tail that might begin a stop string and
/// says when one has appeared (the stop string itself is not text).
pub struct SequenceText<D> {
    stream: TextStream<D>,
    stops: StopStrings,
    eos: Option<u32>,
}

impl<D: Decode> SequenceText<D> {
    /// Stop strings must not be empty.
    pub fn new(decoder: D, stop: &[String], eos: Option<u32>) -> Result<Self> {
        Ok(Self {
            stream: TextStream::new(decoder),
            stops: StopStrings::new(stop.iter().cloned())?,
            eos,
        })
    }

    /// The text that `token` makes final (possibly empty), and whether a
    /// stop string has appeared (the sequence should end).
    pub fn push(&mut self, token: u32) -> Result<Released> {
        let piece = self.stream.push(token)?;
        // the end-of-text token is not part of the text
        let piece = if self.eos == Some(token) {
            String::new()
        } else {
            piece
        };
        Ok(self.stops.push(&piece))
    }

    /// At the end of the sequence: what the stream and the stop strings
    /// still hold back (nothing after a stop string).
    pub fn finish(&mut self, reason: FinishReason) -> Result<String> {
        if self.stops.stopped() {
            return Ok(String::new());
        }
        let mut rest = String::new();
        if reason != FinishReason::Eos {
            rest = self.stops.push(&self.stream.finish()?).text;
        }
        if !self.stops.stopped() {
            rest.push_str(&self.stops.flush());
        }
        Ok(rest)
    }
}
