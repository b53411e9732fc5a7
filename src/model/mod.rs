//! The Mamba language model (SPEC.md sections 3 and 4): configuration,
//! checkpoints, parameters, forward and backward passes.

pub mod checkpoint;
pub mod config;
pub mod inference;
pub mod mamba;
pub mod params;
pub mod state_file;
pub mod torch_checkpoint;

pub use checkpoint::{DType, SafetensorsFile, StoredTensor, TensorSource};
pub use config::{ConfigFormat, MambaConfig};
pub use inference::{DecodeBuffers, InferenceModel, LayerState, Sequence};
pub use mamba::{next_token_cross_entropy, ForwardCache, Mamba};
pub use params::{LayerParams, MambaParams, MixerParams, ParamInfo, ParamKind};
pub use state_file::{load_sequence, save_sequence};
