//! selective: Mamba, the selective state space model (Gu & Dao, 2023), in Rust.
//!
//! The crate is layered so that each piece knows only what it must:
//! - [`kernels`]: the numerical operations (selective scan, S4D, causal
//!   convolution, norms, activations, matrix multiplication), each with a
//!   forward, a backward and, where it applies, a single-step form. They
//!   know nothing of models.
//! - [`float`]: the scalar type the kernels are generic over (f32 for
//!   speed, f64 for finite-difference checks).
//! - [`error`]: the error type every public function returns.
//! - [`tokenizer`], [`sampling`], [`text_stream`]: text generation's pieces
//!   around the model: text to ids and back, choosing the next token from
//!   logits, and printing the text as it streams (with stop strings).
//! - [`train`]: training from a text file (AdamW, schedule, checkpoints).
//! - [`tasks`]: the paper's synthetic tasks (copying, selective copying,
//!   induction heads) with S6 and S4D model variants.
//! - [`datasets`]: the real data of the DNA and audio experiments
//!   (great-ape DNA, spoken digits), built from public packages.
//! - [`serve`]: the OpenAI-compatible HTTP server: continuous batching over
//!   any decoder and a cache of states under their token prefixes.

pub mod bench;
pub mod datasets;
pub mod error;
pub mod float;
pub mod fuzzing;
pub mod generate;
pub mod io;
pub mod kernels;
pub mod memory;
pub mod nn;
pub mod plot;
pub mod rng;
pub mod serve;
pub mod tasks;
pub mod train;

pub use error::{Error, Result};
pub use float::Float;
