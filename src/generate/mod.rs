//! Text generation around the model: tokenizers (text to ids and back),
//! the sampler (logits to the next id), streaming decoded text with stop
//! strings, the generation loop over a batch of sequences, and
//! [`TextGenerator`], which puts them together as text.

pub mod generation;
pub mod sampling;
pub mod text_generator;
pub mod text_stream;
pub mod tokenizer;

pub use generation::{generate, FinishReason, GenerateOptions, GenerationOutput};
pub use sampling::{Sampler, SamplingConfig};
pub use text_generator::{options_for, SequenceText, TextGeneration, TextGenerator};
pub use text_stream::{StopStrings, TextStream};
pub use tokenizer::{CharVocab, Tokenizer};
