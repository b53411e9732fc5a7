//! Text generation around the model: tokenizers (text to ids and back),
//! the sampler (logits to the next id), streaming decoded text with stop
//! strings, and the generation loop over a batch of sequences.

pub mod generation;
pub mod sampling;
pub mod text_stream;
pub mod tokenizer;

pub use generation::{generate, FinishReason, GenerateOptions, GenerationOutput};
pub use sampling::{Sampler, SamplingConfig};
pub use text_stream::{StopStrings, TextStream};
pub use tokenizer::{CharVocab, Tokenizer};
