//! Inference for the Transformer++ baseline (docs/DESIGN.md §15.4): the
//! same [`AttentionBlock`] as training, over weights in any
//! [`WeightFormat`] (f32 arithmetic), with a KV cache per sequence and
//! layer.
//!
//! Per sequence and layer the cache grows by one row of keys and one of
//! values per token:
//!
//! ```text
//! keys    (positions, H·Dh)   rotated by their positions
//! values  (positions, H·Dh)
//! ```
//!
//! so that after L tokens a sequence holds 2·n_layer·L·H·Dh values, where
//! a Mamba sequence holds n_layer·E·(N + K) whatever L is. Prefill runs the
//! prompt in chunks of `prefill_chunk` positions through the blockwise
//! attention (each chunk's queries attend to the cache and to themselves);
//! a decoding step for a batch of sequences is
//!
//! ```text
//! h = E[token] (+ P[position])                       (b, D)
//! per layer:  q, k, v = rmsnorm(h) W_{q,k,v}ᵀ         (b, H·Dh), rotated at each sequence's position
//!             append k, v to each sequence's cache
//!             a = softmax(q Kᵀ/√Dh) V over the cache  (b, H·Dh)   one sequence at a time
//!             h += a W_oᵀ;  h += swiglu(rmsnorm(h)) W_downᵀ
//! logits = rmsnorm(h) headᵀ                          (b, V)
//! ```
//!
//! whose attention costs O(position): the cost that grows with context.

use std::collections::VecDeque;

use super::attention_block::{AttentionBlock, KvCache};
use super::block::norm_forward;
use super::decoder::{remember_tokens, Decoder, DecodingState};
use super::inference::{DEFAULT_PREFILL_CHUNK, RECENT_TOKENS};
use super::transformer::{Positions, Transformer, TransformerConfig, TransformerLayerParams};
use crate::error::{invalid, Result};
use crate::kernels::{Rotary, WeightFormat, Weights};

/// One layer's weights for inference.
struct TransformerInferenceLayer {
    /// (D) each
    input_layernorm: Vec<f32>,
    post_attention_layernorm: Vec<f32>,
    /// (H·Dh, D) each; o_proj (D, H·Dh)
    q_proj: Weights,
    k_proj: Weights,
    v_proj: Weights,
    o_proj: Weights,
    /// (F, D) each; down_proj (D, F)
    gate_proj: Weights,
    up_proj: Weights,
    down_proj: Weights,
}

/// A Transformer++ prepared for generation: projections, embedding and
/// head in one [`WeightFormat`]; norms and learned positions in f32.
pub struct TransformerInference {
    pub config: TransformerConfig,
    format: WeightFormat,
    /// (V, D), also the head when tied
    embedding: Weights,
    /// (max_position_embeddings, D), learned positions only
    embed_positions: Option<Vec<f32>>,
    layers: Vec<TransformerInferenceLayer>,
    /// (D)
    norm: Vec<f32>,
    /// (V, D), untied only
    lm_head: Option<Weights>,
    rotary: Option<Rotary>,
    /// Positions prefilled at once.
    pub prefill_chunk: usize,
}

/// Everything needed to continue one sequence: the KV cache of every layer,
/// the logits for its next token and its most recent tokens. It grows with
/// the sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct KvSequence {
    /// One per layer.
    pub caches: Vec<KvCache<f32>>,
    /// Logits (V) predicting the next token; empty before any token.
    pub logits: Vec<f32>,
    /// Tokens processed so far (the rows of each cache).
    pub position: u64,
    /// The last up to [`RECENT_TOKENS`] tokens, oldest first.
    pub recent: VecDeque<u32>,
}

impl KvSequence {
    /// An empty sequence for `config`.
    pub fn new(config: &TransformerConfig) -> Self {
        Self {
            caches: vec![KvCache::default(); config.n_layer],
            logits: Vec::new(),
            position: 0,
            recent: VecDeque::with_capacity(RECENT_TOKENS),
        }
    }

    /// Checks that this cache belongs to a model of `config`.
    pub fn check_fits(&self, config: &TransformerConfig) -> Result<()> {
        let width = config.n_head * config.head_dim;
        let rows = self.position as usize * width;
        let fits = self.caches.len() == config.n_layer
            && self
                .caches
                .iter()
                .all(|c| c.keys.len() == rows && c.values.len() == rows)
            && (self.logits.is_empty() || self.logits.len() == config.vocab_size);
        if fits {
            Ok(())
        } else {
            Err(invalid(
                "KvSequence",
                format!(
                    "this KV cache does not fit the model (n_layer={}, n_head={}, head_dim={}, vocab={}) at position {}",
                    config.n_layer, config.n_head, config.head_dim, config.vocab_size, self.position
                ),
            ))
        }
    }
}

impl DecodingState for KvSequence {
    fn logits(&self) -> &[f32] {
        &self.logits
    }

    fn logits_and_recent(&mut self) -> (&[f32], &[u32]) {
        (&self.logits, self.recent.make_contiguous())
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn context_bytes(&self) -> usize {
        self.caches
            .iter()
            .map(|c| (c.keys.len() + c.values.len()) * 4)
            .sum()
    }
}

/// Buffers of a decoding step for up to `batch` sequences.
pub struct KvDecodeBuffers {
    batch: usize,
    /// residual stream (b, D)
    h: Vec<f32>,
    /// rmsnorm(h) (b, D)
    normed: Vec<f32>,
    /// (b, V)
    logits: Vec<f32>,
}

impl TransformerInference {
    /// Converts a model, layer by layer.
    pub fn from_transformer(model: Transformer<f32>, format: WeightFormat) -> Result<Self> {
        let Transformer { config, params, .. } = model;
        let c = &config;
        let (d, a, f, v) = (c.d_model, c.n_head * c.head_dim, c.d_ff, c.vocab_size);
        let mut layers = Vec::with_capacity(c.n_layer);
        for l in params.layers {
            let TransformerLayerParams {
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                gate_proj,
                up_proj,
                down_proj,
                input_layernorm,
                post_attention_layernorm,
            } = l;
            layers.push(TransformerInferenceLayer {
                input_layernorm,
                post_attention_layernorm,
                q_proj: Weights::from_f32(format, a, d, &q_proj)?,
                k_proj: Weights::from_f32(format, a, d, &k_proj)?,
                v_proj: Weights::from_f32(format, a, d, &v_proj)?,
                o_proj: Weights::from_f32(format, d, a, &o_proj)?,
                gate_proj: Weights::from_f32(format, f, d, &gate_proj)?,
                up_proj: Weights::from_f32(format, f, d, &up_proj)?,
                down_proj: Weights::from_f32(format, d, f, &down_proj)?,
            });
        }
        let rotary = match c.positions {
            Positions::Rotary => Some(Rotary::new(c.head_dim, c.rope_theta)?),
            Positions::Learned => None,
        };
        let model = Self {
            format,
            embedding: Weights::from_f32(format, v, d, &params.embed_tokens)?,
            embed_positions: params.embed_positions,
            layers,
            norm: params.norm,
            lm_head: params
                .lm_head
                .map(|w| Weights::from_f32(format, v, d, &w))
                .transpose()?,
            rotary,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            config,
        };
        for i in 0..model.layers.len() {
            model.block(i).validate()?;
        }
        Ok(model)
    }

    /// Layer `i` as an [`AttentionBlock`] over the inference weights.
    fn block(&self, i: usize) -> AttentionBlock<'_, f32, &Weights> {
        let l = &self.layers[i];
        AttentionBlock {
            shape: self.config.block_shape(),
            input_norm: &l.input_layernorm,
            q_proj: &l.q_proj,
            k_proj: &l.k_proj,
            v_proj: &l.v_proj,
            o_proj: &l.o_proj,
            post_norm: &l.post_attention_layernorm,
            gate_proj: &l.gate_proj,
            up_proj: &l.up_proj,
            down_proj: &l.down_proj,
            rotary: self.rotary.as_ref(),
        }
    }

    fn head(&self) -> &Weights {
        self.lm_head.as_ref().unwrap_or(&self.embedding)
    }

    /// Every id in the vocabulary, and every position `start..start+n`
    /// within the learned positions.
    fn check_input(&self, op: &'static str, ids: &[u32], start: u64, n: usize) -> Result<()> {
        let v = self.config.vocab_size;
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            return Err(invalid(
                op,
                format!("token id {id} at position {i} is outside the vocabulary of {v}"),
            ));
        }
        let max = self.config.max_position_embeddings as u64;
        if self.config.positions == Positions::Learned && start + n as u64 > max {
            return Err(invalid(
                op,
                format!(
                    "position {} is past the {max} learned positions of this model",
                    start + n as u64 - 1
                ),
            ));
        }
        Ok(())
    }

    /// h = E[id] + P[position] for one row.
    fn embed_row(&self, id: u32, position: usize, row: &mut [f32]) -> Result<()> {
        self.embedding.row_to_f32(id as usize, row)?;
        if let Some(pos) = &self.embed_positions {
            let d = row.len();
            row.iter_mut()
                .zip(&pos[position * d..(position + 1) * d])
                .for_each(|(x, &p)| *x += p);
        }
        Ok(())
    }

    /// Prefill that hands rmsnorm(h) of every chunk (rows, D) to `on_chunk`
    /// with the position of its first row (counted from this call's start).
    fn prefill_with(
        &self,
        seq: &mut KvSequence,
        ids: &[u32],
        mut on_chunk: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        const OP: &str = "TransformerInference::prefill";
        seq.check_fits(&self.config)?;
        self.check_input(OP, ids, seq.position, ids.len())?;
        if self.prefill_chunk == 0 {
            return Err(invalid(OP, "prefill_chunk must be at least 1"));
        }
        let d = self.config.d_model;
        let mut normed = Vec::new();
        for (chunk_index, chunk) in ids.chunks(self.prefill_chunk).enumerate() {
            let len = chunk.len();
            let start = seq.position as usize;
            // h = E[ids] (+ P)  (L, D)
            let mut h = vec![0.0f32; len * d];
            for (t, (row, &id)) in h.chunks_mut(d).zip(chunk).enumerate() {
                self.embed_row(id, start + t, row)?;
            }
            for (i, cache) in seq.caches.iter_mut().enumerate() {
                self.block(i).forward(&mut h, 1, len, Some(&mut [cache]))?;
            }
            normed.resize(len * d, 0.0);
            norm_forward(&h, &self.norm, None, self.config.norm_eps, &mut normed)?;
            on_chunk(chunk_index * self.prefill_chunk, &normed)?;
            seq.position += len as u64;
        }
        remember_tokens(&mut seq.recent, RECENT_TOKENS, ids);
        Ok(())
    }

    /// Runs `ids` after what `seq` has seen; leaves the next-token logits
    /// in `seq.logits`.
    pub fn prefill(&self, seq: &mut KvSequence, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let d = self.config.d_model;
        let mut last = Vec::new();
        self.prefill_with(seq, ids, |_, normed| {
            last.clear();
            last.extend_from_slice(&normed[normed.len() - d..]);
            Ok(())
        })?;
        seq.logits.resize(self.config.vocab_size, 0.0);
        self.head().matmul_xwt(&last, 1, &mut seq.logits, false)
    }

    /// One decoding step for a batch of sequences, each at its own position.
    pub fn decode_step(
        &self,
        seqs: &mut [&mut KvSequence],
        tokens: &[u32],
        buffers: &mut KvDecodeBuffers,
    ) -> Result<()> {
        const OP: &str = "TransformerInference::decode_step";
        let b = seqs.len();
        let (d, v) = (self.config.d_model, self.config.vocab_size);
        if b == 0 || tokens.len() != b {
            return Err(invalid(
                OP,
                format!("{} tokens for {b} sequences", tokens.len()),
            ));
        }
        if b > buffers.batch || buffers.h.len() != buffers.batch * d {
            return Err(invalid(
                OP,
                format!(
                    "{b} sequences of d_model {d} but buffers for {} of {}",
                    buffers.batch,
                    buffers.h.len() / buffers.batch.max(1)
                ),
            ));
        }
        for (seq, &token) in seqs.iter().zip(tokens) {
            seq.check_fits(&self.config)?;
            self.check_input(OP, &[token], seq.position, 1)?;
        }
        let h = &mut buffers.h[..b * d];
        for ((row, &id), seq) in h.chunks_mut(d).zip(tokens).zip(seqs.iter()) {
            self.embed_row(id, seq.position as usize, row)?;
        }
        for i in 0..self.layers.len() {
            let mut caches: Vec<&mut KvCache<f32>> =
                seqs.iter_mut().map(|s| &mut s.caches[i]).collect();
            self.block(i).forward(h, b, 1, Some(&mut caches))?;
        }
        let normed = &mut buffers.normed[..b * d];
        norm_forward(h, &self.norm, None, self.config.norm_eps, normed)?;
        let logits = &mut buffers.logits[..b * v];
        self.head().matmul_xwt(normed, b, logits, false)?;
        for ((seq, row), &token) in seqs.iter_mut().zip(logits.chunks(v)).zip(tokens) {
            seq.logits.clear();
            seq.logits.extend_from_slice(row);
            seq.position += 1;
            remember_tokens(&mut seq.recent, RECENT_TOKENS, &[token]);
        }
        Ok(())
    }

    /// Bytes of weights one decoding step reads (the KV cache it also reads
    /// is [`DecodingState::context_bytes`] of each sequence).
    pub fn bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                (l.input_layernorm.len() + l.post_attention_layernorm.len()) * 4
                    + [
                        &l.q_proj,
                        &l.k_proj,
                        &l.v_proj,
                        &l.o_proj,
                        &l.gate_proj,
                        &l.up_proj,
                        &l.down_proj,
                    ]
                    .iter()
                    .map(|w| w.bytes())
                    .sum::<usize>()
            })
            .sum();
        layers + self.head().bytes() + self.norm.len() * 4
    }
}

impl Decoder for TransformerInference {
    type State = KvSequence;
    type Buffers = KvDecodeBuffers;

    fn vocab_rows(&self) -> usize {
        self.config.vocab_size
    }

    fn n_params(&self) -> usize {
        self.config.n_params()
    }

    fn format(&self) -> WeightFormat {
        self.format
    }

    fn bytes_per_token(&self) -> usize {
        TransformerInference::bytes_per_token(self)
    }

    fn new_state(&self) -> KvSequence {
        KvSequence::new(&self.config)
    }

    fn new_buffers(&self, batch: usize) -> KvDecodeBuffers {
        let (d, v) = (self.config.d_model, self.config.vocab_size);
        KvDecodeBuffers {
            batch,
            h: vec![0.0; batch * d],
            normed: vec![0.0; batch * d],
            logits: vec![0.0; batch * v],
        }
    }

    fn prefill(&self, seq: &mut KvSequence, ids: &[u32]) -> Result<()> {
        TransformerInference::prefill(self, seq, ids)
    }

    fn decode_step(
        &self,
        seqs: &mut [&mut KvSequence],
        tokens: &[u32],
        buffers: &mut KvDecodeBuffers,
    ) -> Result<()> {
        TransformerInference::decode_step(self, seqs, tokens, buffers)
    }

    fn prefill_hidden(
        &self,
        seq: &mut KvSequence,
        ids: &[u32],
        on_chunk: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        self.prefill_with(seq, ids, on_chunk)
    }

    fn head(&self) -> &Weights {
        TransformerInference::head(self)
    }
}
