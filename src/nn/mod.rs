//! The models as mathematics (docs/DESIGN.md §6, §7 and §15):
//! configuration, parameter trees, the Mamba block and the Transformer
//! block, the language models for training and for inference, and the
//! losses. Nothing here reads or writes a file;
//! [`crate::io`] does that.

pub mod attention_block;
pub mod block;
pub mod config;
pub mod decoder;
pub mod inference;
pub mod lm;
pub mod loss;
pub mod params;
pub mod transformer;
pub mod transformer_inference;

pub use attention_block::{
    AttentionBlock, AttentionBlockCache, AttentionBlockGradients, AttentionBlockShape, KvCache,
};
pub use block::{
    Block, BlockArch, BlockCache, BlockGradients, BlockScalar, BlockShape, BlockStateMut,
    ChunkBuffers, Conv, Dense, Linear, Mixer, MixerGradients, Ssd, SsmLayer, StepBuffers, Values,
    S6,
};
pub use config::{Architecture, ConfigFormat, MambaConfig, SsdConfig};
pub use decoder::{Decoder, DecodingState};
pub use inference::{DecodeBuffers, InferenceModel, LayerState, Sequence};
pub use lm::{next_token_cross_entropy, ForwardCache, Mamba};
pub use loss::{perplexity, token_nll, LanguageModel, Perplexity};
pub use params::{LayerParams, MambaParams, MixerParams, ParamInfo, ParamKind};
pub use transformer::{
    Positions, Transformer, TransformerCache, TransformerConfig, TransformerLayerParams,
    TransformerParams,
};
pub use transformer_inference::{KvDecodeBuffers, KvSequence, TransformerInference};
