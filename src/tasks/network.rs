//! What the task runner needs of a model, so that one training loop and
//! one length evaluation serve the SSM task models ([`TaskModel`]: S6 or
//! S4D, gated or not) and the attention baseline (a [`Transformer`]: the
//! paper's Table 2 compares them on induction heads).
//!
//! The answer loss needs logits at a few positions only, but every model
//! here is asked for logits (batch, len, V) at every position and given
//! dL/dlogits of the same shape, zero away from the answers: with the
//! tasks' vocabularies (16 to a few dozen ids) that costs B·L·V·D
//! multiply-adds, next to nothing beside the blocks.
//!
//! Long sequences are read chunk by chunk through a [`ChunkReader`]: an
//! SSM carries its recurrent state (a fixed size), attention its KV cache
//! (two rows of H·Dh values per token and layer).

use std::path::Path;

use super::model::{TaskModel, TaskModelConfig, TaskParams, TaskScalar, TaskState, TaskStepper};
use super::train::EvalMode;
use crate::error::{invalid, Result};
use crate::io::DType;
use crate::kernels::{matmul_xtw, matmul_xw};
use crate::nn::{KvCache, Transformer, TransformerCache, TransformerConfig, TransformerParams};
use crate::train::ParamTree;

/// A model of the synthetic tasks: token ids in, logits out, with a
/// hand-written backward and a way to read sequences chunk by chunk.
pub trait TaskNetwork<T: TaskScalar>: Sized {
    type Config: Clone + PartialEq + std::fmt::Debug;
    /// Parameters, and gradients of the same shape.
    type Params;
    /// What [`Self::forward_with_cache`] keeps for the backward.
    type Cache;
    /// Reads a batch of long sequences a chunk at a time.
    type Reader<'a>: ChunkReader<T>
    where
        Self: 'a;
    /// Whether the cost of a token grows with the tokens before it
    /// (attention: O(L) per token, O(L²) per sequence), or not (a
    /// recurrence: O(1) per token). Used to foresee the time of a longer
    /// evaluation from a shorter one.
    const COST_GROWS_WITH_CONTEXT: bool;

    fn config(&self) -> &Self::Config;
    fn params_mut(&mut self) -> &mut Self::Params;
    fn vocab_size(&self) -> usize;
    fn parameter_count(&self) -> usize;
    /// Logits (batch, len, V) of sequences from an empty context.
    fn logits(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<T>>;
    /// The same, keeping what [`Self::backward_from_logits`] needs.
    fn forward_with_cache(
        &self,
        ids: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<(Vec<T>, Self::Cache)>;
    /// Gradients of every parameter given dL/dlogits (batch, len, V).
    fn backward_from_logits(
        &self,
        ids: &[u32],
        cache: &Self::Cache,
        d_logits: &[T],
    ) -> Result<Self::Params>;
    /// Logits (rows, V) of final hidden rows (rows, D).
    fn logits_from_hidden(&self, hidden: &[T]) -> Result<Vec<T>>;
    /// A reader of `batch` sequences from an empty context; with
    /// [`EvalMode::Step`] it is fed one token at a time.
    fn reader(&self, batch: usize, mode: EvalMode) -> Result<Self::Reader<'_>>;
    /// Bytes one sequence's context takes after `len` tokens.
    fn context_bytes_at(&self, len: usize) -> usize;
    /// The longest sequence the model can read (learned positions end at
    /// their table); None: any length.
    fn max_positions(&self) -> Option<usize>;
    /// Writes the model into `dir` (atomically, file by file).
    fn save(&self, dir: &Path) -> Result<()>;
    /// "S6 / mamba", "attention (rotary)": what a chart or table calls it.
    fn label(&self) -> String;
    /// One line of sizes for a report.
    fn describe(&self) -> String;
}

/// A batch of sequences read a chunk at a time.
pub trait ChunkReader<T> {
    /// Reads the next `n` tokens of every sequence (ids (batch, n)) and
    /// returns the final hidden states (batch, n, D).
    fn read(&mut self, ids: &[u32], n: usize) -> Result<Vec<T>>;
    /// Bytes the batch's context takes now.
    fn context_bytes(&self) -> usize;
}

/// The configuration of a task model trained in f32: it names the model
/// type, so that a run's settings fix what is trained.
pub trait TaskNetConfig: Clone + PartialEq + std::fmt::Debug + serde::Serialize {
    type Model: TaskNetwork<f32, Config = Self, Params: ParamTree<Config = Self>> + Clone;
    /// A freshly initialised model.
    fn init(&self, seed: u64) -> Result<Self::Model>;
    fn vocab_size(&self) -> usize;
    /// f32 values a training step keeps per token, at least (the memory
    /// check's estimate).
    fn training_values_per_token(&self) -> u128;
}

impl<T: TaskScalar> TaskModel<T> {
    /// Adds the tied head's part to gradients of the blocks: logits =
    /// hidden · Eᵀ, so d hidden = d_logits · E and dE += d_logitsᵀ · hidden.
    fn d_hidden_of_logits(&self, d_logits: &[T], rows: usize) -> Result<Vec<T>> {
        let (d, v) = (self.config.d_model, self.config.vocab_size);
        let mut d_hidden = vec![T::ZERO; rows * d];
        matmul_xw(
            d_logits,
            &self.params.embedding,
            rows,
            v,
            d,
            &mut d_hidden,
            false,
        )?;
        Ok(d_hidden)
    }
}

impl<T: TaskScalar> TaskNetwork<T> for TaskModel<T> {
    type Config = TaskModelConfig;
    type Params = TaskParams<T>;
    type Cache = super::model::TaskCache<T>;
    type Reader<'a>
        = SsmReader<'a, T>
    where
        T: 'a;
    const COST_GROWS_WITH_CONTEXT: bool = false;

    fn config(&self) -> &TaskModelConfig {
        &self.config
    }
    fn params_mut(&mut self) -> &mut TaskParams<T> {
        &mut self.params
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn parameter_count(&self) -> usize {
        TaskModel::parameter_count(self)
    }
    fn logits(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<T>> {
        self.forward(ids, batch, len)
    }
    fn forward_with_cache(
        &self,
        ids: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<(Vec<T>, Self::Cache)> {
        let cache = self.forward_train(ids, batch, len)?;
        Ok((self.logits_from_hidden(cache.final_hidden())?, cache))
    }
    fn backward_from_logits(
        &self,
        ids: &[u32],
        cache: &Self::Cache,
        d_logits: &[T],
    ) -> Result<TaskParams<T>> {
        let (d, v) = (self.config.d_model, self.config.vocab_size);
        let hidden = cache.final_hidden();
        let rows = hidden.len() / d;
        crate::error::check_len(
            "TaskModel::backward_from_logits",
            "d_logits",
            d_logits,
            &[("rows", rows), ("vocab", v)],
        )?;
        let d_hidden = self.d_hidden_of_logits(d_logits, rows)?;
        let mut grads = self.backward(ids, cache, &d_hidden)?;
        matmul_xtw(d_logits, hidden, rows, v, d, &mut grads.embedding, true)?;
        Ok(grads)
    }
    fn logits_from_hidden(&self, hidden: &[T]) -> Result<Vec<T>> {
        TaskModel::logits_from_hidden(self, hidden)
    }
    fn reader(&self, batch: usize, mode: EvalMode) -> Result<SsmReader<'_, T>> {
        Ok(SsmReader {
            model: self,
            state: self.zero_state(batch),
            stepper: match mode {
                EvalMode::Step => Some(self.stepper(batch)?),
                EvalMode::Chunked => None,
            },
        })
    }
    fn context_bytes_at(&self, _len: usize) -> usize {
        state_bytes(&self.zero_state(1))
    }
    fn max_positions(&self) -> Option<usize> {
        None
    }
    fn save(&self, dir: &Path) -> Result<()> {
        TaskModel::save(self, dir)
    }
    fn label(&self) -> String {
        format!("{} / {}", self.config.layer.name(), self.config.arch.name())
    }
    fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "{} layers, d_model {}, d_state {}, expand {}, layer {}, arch {}: {} parameters",
            c.n_layer,
            c.d_model,
            c.d_state,
            c.expand,
            c.layer.name(),
            c.arch.name(),
            self.parameter_count()
        )
    }
}

fn state_bytes<T>(state: &TaskState<T>) -> usize {
    state
        .blocks
        .iter()
        .map(|s| (s.conv.len() + s.ssm.len()) * std::mem::size_of::<T>())
        .sum()
}

/// An SSM task model reading chunks from its carried recurrent state.
pub struct SsmReader<'a, T: TaskScalar> {
    model: &'a TaskModel<T>,
    state: TaskState<T>,
    /// Step mode: the blocks and step buffers, built once.
    stepper: Option<TaskStepper<'a, T>>,
}

impl<T: TaskScalar> ChunkReader<T> for SsmReader<'_, T> {
    fn read(&mut self, ids: &[u32], n: usize) -> Result<Vec<T>> {
        match self.stepper.as_mut() {
            Some(_) if n != 1 => Err(invalid(
                "SsmReader::read",
                format!("a step reader reads one token at a time, not {n}"),
            )),
            Some(stepper) => stepper.step(&mut self.state, ids),
            None => {
                let batch = self.state.batch;
                self.model.forward_chunk(&mut self.state, ids, batch, n)
            }
        }
    }
    fn context_bytes(&self) -> usize {
        state_bytes(&self.state)
    }
}

impl TaskNetConfig for TaskModelConfig {
    type Model = TaskModel<f32>;
    fn init(&self, seed: u64) -> Result<TaskModel<f32>> {
        TaskModel::init(*self, seed)
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn training_values_per_token(&self) -> u128 {
        self.n_layer as u128 * self.block_shape().cached_values_per_token()
            + 2 * self.d_model as u128
            + self.vocab_size as u128
    }
}

impl<T: TaskScalar> TaskNetwork<T> for Transformer<T> {
    type Config = TransformerConfig;
    type Params = TransformerParams<T>;
    type Cache = TransformerCache<T>;
    type Reader<'a>
        = AttentionReader<'a, T>
    where
        T: 'a;
    const COST_GROWS_WITH_CONTEXT: bool = true;

    fn config(&self) -> &TransformerConfig {
        &self.config
    }
    fn params_mut(&mut self) -> &mut TransformerParams<T> {
        &mut self.params
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn parameter_count(&self) -> usize {
        self.config.n_params()
    }
    fn logits(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<T>> {
        self.forward(ids, batch, len)
    }
    fn forward_with_cache(
        &self,
        ids: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<(Vec<T>, TransformerCache<T>)> {
        self.forward_train(ids, batch, len)
    }
    fn backward_from_logits(
        &self,
        ids: &[u32],
        cache: &TransformerCache<T>,
        d_logits: &[T],
    ) -> Result<TransformerParams<T>> {
        self.backward(ids, cache, d_logits)
    }
    fn logits_from_hidden(&self, hidden: &[T]) -> Result<Vec<T>> {
        Transformer::logits_from_hidden(self, hidden)
    }
    fn reader(&self, batch: usize, _mode: EvalMode) -> Result<AttentionReader<'_, T>> {
        if batch == 0 {
            return Err(invalid("AttentionReader", "batch must be at least 1"));
        }
        Ok(AttentionReader {
            model: self,
            batch,
            caches: vec![vec![KvCache::default(); batch]; self.config.n_layer],
        })
    }
    fn context_bytes_at(&self, len: usize) -> usize {
        let c = &self.config;
        2 * c.n_layer * len * c.n_head * c.head_dim * std::mem::size_of::<T>()
    }
    fn max_positions(&self) -> Option<usize> {
        (self.config.positions == crate::nn::Positions::Learned)
            .then_some(self.config.max_position_embeddings)
    }
    fn save(&self, dir: &Path) -> Result<()> {
        Transformer::save(self, dir, DType::F32)
    }
    fn label(&self) -> String {
        format!("attention ({})", self.config.positions.name())
    }
    fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "{} layers, d_model {}, {} heads of {}, d_ff {}, {} positions{}: {} parameters",
            c.n_layer,
            c.d_model,
            c.n_head,
            c.head_dim,
            c.d_ff,
            c.positions.name(),
            match c.positions {
                crate::nn::Positions::Learned =>
                    format!(" (a table of {})", c.max_position_embeddings),
                crate::nn::Positions::Rotary => String::new(),
            },
            c.n_params()
        )
    }
}

/// Attention reading chunks after its KV caches, which grow by two rows of
/// H·Dh values per token and layer.
pub struct AttentionReader<'a, T> {
    model: &'a Transformer<T>,
    batch: usize,
    /// [layer][sequence]
    caches: Vec<Vec<KvCache<T>>>,
}

impl<T: TaskScalar> ChunkReader<T> for AttentionReader<'_, T> {
    fn read(&mut self, ids: &[u32], _n: usize) -> Result<Vec<T>> {
        self.model
            .forward_cached_batch(ids, self.batch, &mut self.caches)
    }
    fn context_bytes(&self) -> usize {
        self.caches
            .iter()
            .flatten()
            .map(|c| (c.keys.len() + c.values.len()) * std::mem::size_of::<T>())
            .sum()
    }
}

impl TaskNetConfig for TransformerConfig {
    type Model = Transformer<f32>;
    fn init(&self, seed: u64) -> Result<Transformer<f32>> {
        Transformer::init(self.clone(), seed)
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn training_values_per_token(&self) -> u128 {
        self.n_layer as u128 * self.block_shape().cached_values_per_token()
            + 2 * self.d_model as u128
            + self.vocab_size as u128
    }
}
