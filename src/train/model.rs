//! What the trainer needs of a language model, so that one training loop
//! (settings, schedule, clipping, AdamW, evaluation, checkpoints, exact
//! resume) serves every architecture: Mamba and the Transformer++
//! baseline (docs/DESIGN.md §15) today.
//!
//! A model is trained in f32. Its parameters form a [`ParamTree`], the
//! tree AdamW's moments and the gradients share; the forward keeps a cache
//! that its backward reads.

use std::path::Path;

use super::optimizer::ParamTree;
use super::trainer::TrainConfig;
use crate::error::{invalid, Result};
use crate::io::DType;
use crate::nn::{
    Architecture, ForwardCache, Mamba, MambaConfig, MambaParams, ParamInfo, Transformer,
    TransformerCache, TransformerConfig, TransformerParams,
};

use super::optimizer::decays;

/// A language model the trainer can train: token ids (batch, len) in,
/// logits (batch, len, vocab) out, with a hand-written backward.
pub trait TrainableModel: Sized {
    /// Everything that fixes the model's shapes.
    type Config: Clone;
    /// Parameters, gradients and AdamW moments: trees of one shape.
    type Params: ParamTree<Config = Self::Config>;
    /// What the training forward keeps for the backward.
    type Cache;
    /// The `arch` values (as a user reads them) of runs that train this model.
    const NAME: &'static str;
    /// Whether a run's settings of `arch` train this model.
    fn trains(arch: Architecture) -> bool;

    /// The model a run's settings describe, for a vocabulary of
    /// `vocab_size` ids; an error names the setting that cannot be.
    fn config_of(settings: &TrainConfig, vocab_size: usize) -> Result<Self::Config>;
    /// Names, shapes and kinds of every parameter, in the tree's order.
    fn param_infos(config: &Self::Config) -> Vec<ParamInfo>;
    /// The sizes a checkpoint must share with the run's settings, by name.
    fn shape_fields(config: &Self::Config) -> Vec<(&'static str, String)>;
    /// f32 values one layer keeps per token for the backward (the memory
    /// check's estimate).
    fn cached_values_per_token(config: &Self::Config) -> u128;
    fn n_params_of(config: &Self::Config) -> usize;
    fn n_layer(config: &Self::Config) -> usize;

    /// Fresh parameters from `seed` (the architecture's initialisation).
    fn init(config: Self::Config, seed: u64) -> Result<Self>;
    /// A model directory (config.json and weights).
    fn from_dir(dir: &Path) -> Result<Self>;
    /// Writes config.json (Hugging Face layout, returned for additions)
    /// and model.safetensors in f32.
    fn save_f32(&self, dir: &Path) -> Result<serde_json::Value>;

    fn config(&self) -> &Self::Config;
    fn params(&self) -> &Self::Params;
    fn params_mut(&mut self) -> &mut Self::Params;
    fn vocab_size(&self) -> usize;

    fn forward(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<f32>>;
    fn forward_train(
        &self,
        ids: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<(Vec<f32>, Self::Cache)>;
    /// Gradients of every parameter given dL/dlogits.
    fn backward(&self, ids: &[u32], cache: &Self::Cache, d_logits: &[f32]) -> Result<Self::Params>;

    fn n_params(&self) -> usize {
        Self::n_params_of(self.config())
    }
}

impl TrainableModel for Mamba<f32> {
    type Config = MambaConfig;
    type Params = MambaParams<f32>;
    type Cache = ForwardCache<f32>;
    const NAME: &'static str = "mamba or mamba2";
    fn trains(arch: Architecture) -> bool {
        matches!(arch, Architecture::Mamba | Architecture::Mamba2)
    }

    fn config_of(s: &TrainConfig, vocab_size: usize) -> Result<MambaConfig> {
        let c = s.model_config(vocab_size);
        c.validate()?;
        Ok(c)
    }
    fn param_infos(config: &MambaConfig) -> Vec<ParamInfo> {
        MambaParams::<f32>::infos(config)
    }
    fn shape_fields(m: &MambaConfig) -> Vec<(&'static str, String)> {
        [
            ("d_model", m.d_model),
            ("n_layer", m.n_layer),
            ("d_state", m.d_state),
            ("d_inner", m.d_inner),
            ("vocab_size", m.vocab_size),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
    }
    fn cached_values_per_token(config: &MambaConfig) -> u128 {
        config.block_shape().cached_values_per_token()
    }
    fn n_params_of(config: &MambaConfig) -> usize {
        config.n_params()
    }
    fn n_layer(config: &MambaConfig) -> usize {
        config.n_layer
    }
    fn init(config: MambaConfig, seed: u64) -> Result<Self> {
        Mamba::init(config, seed)
    }
    fn from_dir(dir: &Path) -> Result<Self> {
        Mamba::from_dir(dir)
    }
    fn save_f32(&self, dir: &Path) -> Result<serde_json::Value> {
        self.save(dir, DType::F32)?;
        Ok(self.config.to_hugging_face_json())
    }
    fn config(&self) -> &MambaConfig {
        &self.config
    }
    fn params(&self) -> &MambaParams<f32> {
        &self.params
    }
    fn params_mut(&mut self) -> &mut MambaParams<f32> {
        &mut self.params
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn forward(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<f32>> {
        Mamba::forward(self, ids, batch, len)
    }
    fn forward_train(
        &self,
        ids: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<(Vec<f32>, ForwardCache<f32>)> {
        Mamba::forward_train(self, ids, batch, len)
    }
    fn backward(
        &self,
        ids: &[u32],
        cache: &ForwardCache<f32>,
        d_logits: &[f32],
    ) -> Result<MambaParams<f32>> {
        Mamba::backward(self, ids, cache, d_logits)
    }
}

impl ParamTree for TransformerParams<f32> {
    type Config = TransformerConfig;
    fn tensors_with_decay(&self, config: &TransformerConfig) -> Vec<(bool, &[f32])> {
        self.tensors(config)
            .into_iter()
            .map(|(info, t)| (decays(&info), t.as_slice()))
            .collect()
    }
    fn tensor_slices_mut(&mut self, config: &TransformerConfig) -> Vec<&mut [f32]> {
        self.tensors_mut(config)
            .into_iter()
            .map(|(_, t)| t.as_mut_slice())
            .collect()
    }
    fn zeros_of(config: &TransformerConfig) -> Self {
        TransformerParams::zeros(config)
    }
    fn expected_sizes(config: &TransformerConfig) -> Vec<(String, usize)> {
        TransformerParams::<f32>::infos(config)
            .into_iter()
            .map(|info| (info.name, info.shape.iter().product()))
            .collect()
    }
}

impl TrainableModel for Transformer<f32> {
    type Config = TransformerConfig;
    type Params = TransformerParams<f32>;
    type Cache = TransformerCache<f32>;
    const NAME: &'static str = "transformer";
    fn trains(arch: Architecture) -> bool {
        arch == Architecture::Transformer
    }

    /// d_model, n_layer, n_head (head_dim d_model / n_head), d_ff (default
    /// 8 d_model / 3 rounded up to 8), positions; learned positions cover
    /// seq_len (the positions training sees), rotary ones extend to any length.
    fn config_of(s: &TrainConfig, vocab_size: usize) -> Result<TransformerConfig> {
        if s.n_head == 0 || !s.d_model.is_multiple_of(s.n_head) {
            return Err(invalid(
                "train",
                format!(
                    "n_head must be at least 1 and divide d_model {}; got {}",
                    s.d_model, s.n_head
                ),
            ));
        }
        let mut c = TransformerConfig::new(s.d_model, s.n_layer, vocab_size, s.n_head);
        if let Some(f) = s.d_ff {
            c.d_ff = f;
        }
        c.positions = s.positions;
        c.max_position_embeddings = match s.positions {
            crate::nn::Positions::Learned => s.seq_len,
            crate::nn::Positions::Rotary => s.seq_len.max(c.max_position_embeddings),
        };
        c.validate()?;
        Ok(c)
    }
    fn param_infos(config: &TransformerConfig) -> Vec<ParamInfo> {
        TransformerParams::<f32>::infos(config)
    }
    fn shape_fields(m: &TransformerConfig) -> Vec<(&'static str, String)> {
        vec![
            ("d_model", m.d_model.to_string()),
            ("n_layer", m.n_layer.to_string()),
            ("n_head", m.n_head.to_string()),
            ("d_ff", m.d_ff.to_string()),
            ("vocab_size", m.vocab_size.to_string()),
            ("positions", m.positions.name().to_string()),
        ]
    }
    fn cached_values_per_token(config: &TransformerConfig) -> u128 {
        config.block_shape().cached_values_per_token()
    }
    fn n_params_of(config: &TransformerConfig) -> usize {
        config.n_params()
    }
    fn n_layer(config: &TransformerConfig) -> usize {
        config.n_layer
    }
    fn init(config: TransformerConfig, seed: u64) -> Result<Self> {
        Transformer::init(config, seed)
    }
    fn from_dir(dir: &Path) -> Result<Self> {
        Transformer::from_dir(dir)
    }
    fn save_f32(&self, dir: &Path) -> Result<serde_json::Value> {
        self.save(dir, DType::F32)?;
        Ok(self.config.to_hugging_face_json())
    }
    fn config(&self) -> &TransformerConfig {
        &self.config
    }
    fn params(&self) -> &TransformerParams<f32> {
        &self.params
    }
    fn params_mut(&mut self) -> &mut TransformerParams<f32> {
        &mut self.params
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn forward(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<f32>> {
        Transformer::forward(self, ids, batch, len)
    }
    fn forward_train(
        &self,
        ids: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<(Vec<f32>, TransformerCache<f32>)> {
        Transformer::forward_train(self, ids, batch, len)
    }
    fn backward(
        &self,
        ids: &[u32],
        cache: &TransformerCache<f32>,
        d_logits: &[f32],
    ) -> Result<TransformerParams<f32>> {
        Transformer::backward(self, ids, cache, d_logits)
    }
}
