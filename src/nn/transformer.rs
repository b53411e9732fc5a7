//! The Transformer++ baseline of the paper (docs/DESIGN.md §15): the
//! Llama architecture (pre-norm RMSNorm, causal multi-head attention with
//! rotary positions, SwiGLU MLP, no biases), with tied or untied
//! embeddings, and learned absolute positions as an option (for the
//! induction-heads comparison, paper Table 2). Parameters carry the
//! Hugging Face `LlamaForCausalLM` names, so that a saved model loads in
//! transformers; its files are read and written by [`crate::io`].
//!
//! ```text
//! h = E[ids] (+ P[t] with learned positions)              (BL, D)
//! per layer:  h = block(h)                                (BL, D)   src/nn/attention_block.rs
//! logits = rmsnorm(h) · w_norm · headᵀ                    (BL, V)
//! ```

use super::attention_block::{
    AttentionBlock, AttentionBlockCache, AttentionBlockGradients, AttentionBlockShape, KvCache,
};
use super::block::{norm_backward, norm_forward, Dense};
use super::config::check_sizes;
use super::params::{ParamInfo, ParamKind};
use crate::error::{invalid, Result};
use crate::kernels::{matmul_xtw, matmul_xw, matmul_xwt, MatmulScalar, Rotary};
use crate::rng::Rng;

/// How a Transformer knows where a token is (in a training run's
/// settings: "rotary" or "learned").
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Rotary embedding of q and k in every layer (Llama; Transformer++).
    Rotary,
    /// A learned vector per position added to the token embedding (GPT-2),
    /// for `max_position_embeddings` positions: longer inputs are errors.
    Learned,
}

impl Positions {
    pub fn name(self) -> &'static str {
        match self {
            Positions::Rotary => "rotary",
            Positions::Learned => "learned",
        }
    }
}

impl std::str::FromStr for Positions {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "rotary" | "rope" => Ok(Positions::Rotary),
            "learned" | "absolute" => Ok(Positions::Learned),
            _ => Err(invalid(
                "Positions",
                format!("unknown positions {s:?} (expected rotary or learned)"),
            )),
        }
    }
}

/// Everything that fixes a Transformer's shapes and arithmetic (the
/// fields of transformers' `LlamaConfig` that matter here).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TransformerConfig {
    /// hidden_size
    pub d_model: usize,
    /// num_hidden_layers
    pub n_layer: usize,
    pub vocab_size: usize,
    /// num_attention_heads (= num_key_value_heads: multi-head attention)
    pub n_head: usize,
    /// Dh
    pub head_dim: usize,
    /// intermediate_size, the SwiGLU width F
    pub d_ff: usize,
    /// rms_norm_eps
    pub norm_eps: f64,
    /// The rotary base (rope_theta).
    pub rope_theta: f64,
    /// The longest sequence of learned positions; informational with
    /// rotary positions (which extend to any length).
    pub max_position_embeddings: usize,
    pub tie_embeddings: bool,
    pub positions: Positions,
}

impl TransformerConfig {
    /// Llama's defaults for everything but the sizes: head_dim D / H,
    /// F = 8D/3 rounded up to a multiple of 8 (so that the MLP has the
    /// 8D² parameters of a 4D GELU MLP), RMSNorm eps 1e-5, rope_theta
    /// 10000, tied embeddings, rotary positions.
    pub fn new(d_model: usize, n_layer: usize, vocab_size: usize, n_head: usize) -> Self {
        Self {
            d_model,
            n_layer,
            vocab_size,
            n_head,
            head_dim: d_model / n_head.max(1),
            d_ff: (8 * d_model).div_ceil(3).next_multiple_of(8),
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 2048,
            tie_embeddings: true,
            positions: Positions::Rotary,
        }
    }

    pub fn block_shape(&self) -> AttentionBlockShape {
        AttentionBlockShape {
            d_model: self.d_model,
            n_head: self.n_head,
            head_dim: self.head_dim,
            d_ff: self.d_ff,
            norm_eps: self.norm_eps,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let fail = |field: &str, why: String| Err(invalid("config", format!("`{field}` {why}")));
        let sizes = [
            ("hidden_size", self.d_model),
            ("num_hidden_layers", self.n_layer),
            ("vocab_size", self.vocab_size),
            ("num_attention_heads", self.n_head),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.d_ff),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in sizes {
            if v == 0 {
                return fail(field, "must be at least 1".into());
            }
        }
        check_sizes("config", &sizes, || self.param_count_wide())?;
        if self.positions == Positions::Rotary && self.head_dim % 2 != 0 {
            return fail(
                "head_dim",
                format!("must be even for rotary positions, got {}", self.head_dim),
            );
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return fail(
                "rms_norm_eps",
                format!("must be positive, got {}", self.norm_eps),
            );
        }
        if !(self.rope_theta > 1.0 && self.rope_theta.is_finite()) {
            return fail(
                "rope_theta",
                format!("must be above 1, got {}", self.rope_theta),
            );
        }
        Ok(())
    }

    /// The parameter count in u128 (no size can overflow it).
    fn param_count_wide(&self) -> u128 {
        let w = |v: usize| v as u128;
        let (d, a, f, v) = (
            w(self.d_model),
            w(self.n_head) * w(self.head_dim),
            w(self.d_ff),
            w(self.vocab_size),
        );
        let layer = 2 * d + 4 * a * d + 3 * f * d;
        let head = if self.tie_embeddings { 0 } else { v * d };
        let positions = match self.positions {
            Positions::Rotary => 0,
            Positions::Learned => w(self.max_position_embeddings) * d,
        };
        v * d + positions + w(self.n_layer) * layer + d + head
    }

    /// Number of parameters (the tied head counted once).
    pub fn n_params(&self) -> usize {
        self.param_count_wide() as usize
    }

    /// Parameters outside the embedding, positions and head: what scaling
    /// laws count (Kaplan et al. 2020).
    pub fn n_non_embedding_params(&self) -> usize {
        let (d, a, f) = (self.d_model, self.n_head * self.head_dim, self.d_ff);
        self.n_layer * (2 * d + 4 * a * d + 3 * f * d) + d
    }

    /// Training FLOPs per token at context `seq_len` (docs/DESIGN.md
    /// §15.8): 6 per parameter in a matrix product (the projections and
    /// the head), plus attention's QKᵀ and PV, 6 · n_layer · L · H·Dh
    /// (Kaplan et al. 2020, the whole L × L matrix counted).
    pub fn training_flops_per_token(&self, seq_len: usize) -> f64 {
        let (d, a, f, v) = (
            self.d_model as f64,
            (self.n_head * self.head_dim) as f64,
            self.d_ff as f64,
            self.vocab_size as f64,
        );
        let layers = self.n_layer as f64;
        6.0 * (layers * (4.0 * a * d + 3.0 * f * d) + v * d) + 6.0 * layers * seq_len as f64 * a
    }
}

/// One layer (`model.layers.{i}`).
#[derive(Clone, Debug, PartialEq)]
pub struct TransformerLayerParams<T> {
    /// self_attn.{q,k,v}_proj (H·Dh, D), o_proj (D, H·Dh)
    pub q_proj: Vec<T>,
    pub k_proj: Vec<T>,
    pub v_proj: Vec<T>,
    pub o_proj: Vec<T>,
    /// mlp.{gate,up}_proj (F, D), down_proj (D, F)
    pub gate_proj: Vec<T>,
    pub up_proj: Vec<T>,
    pub down_proj: Vec<T>,
    /// input_layernorm, post_attention_layernorm (D)
    pub input_layernorm: Vec<T>,
    pub post_attention_layernorm: Vec<T>,
}

/// The whole model, as `LlamaForCausalLM` names it.
#[derive(Clone, Debug, PartialEq)]
pub struct TransformerParams<T> {
    /// model.embed_tokens (V, D), also the head when tied
    pub embed_tokens: Vec<T>,
    /// model.embed_positions (max_position_embeddings, D), learned positions only
    pub embed_positions: Option<Vec<T>>,
    pub layers: Vec<TransformerLayerParams<T>>,
    /// model.norm (D)
    pub norm: Vec<T>,
    /// lm_head (V, D), untied only
    pub lm_head: Option<Vec<T>>,
}

/// Every tensor's name, shape and kind beside its field, in the order of
/// `LlamaForCausalLM.named_parameters()`; expanded over `&` and `&mut` as
/// [`super::params`]' declaration is.
macro_rules! for_each_transformer_tensor {
    ($params:expr, $config:expr, [$($m:tt)?], $iter:ident, $opt:ident, $f:expr) => {{
        let c: &TransformerConfig = $config;
        let (d, a, f_, v) = (c.d_model, c.n_head * c.head_dim, c.d_ff, c.vocab_size);
        let p = $params;
        let mut f = $f;
        let mut t = |name: String, shape: Vec<usize>, kind: ParamKind, tensor| {
            f(ParamInfo { name, shape, kind }, tensor)
        };
        use ParamKind::{Embedding, Norm, Weight};
        t("model.embed_tokens.weight".into(), vec![v, d], Embedding, & $($m)? p.embed_tokens);
        if let Some(pos) = p.embed_positions.$opt() {
            t("model.embed_positions.weight".into(), vec![c.max_position_embeddings, d], Embedding, pos);
        }
        for (i, l) in p.layers.$iter().enumerate() {
            let pre = format!("model.layers.{i}");
            t(format!("{pre}.self_attn.q_proj.weight"), vec![a, d], Weight, & $($m)? l.q_proj);
            t(format!("{pre}.self_attn.k_proj.weight"), vec![a, d], Weight, & $($m)? l.k_proj);
            t(format!("{pre}.self_attn.v_proj.weight"), vec![a, d], Weight, & $($m)? l.v_proj);
            t(format!("{pre}.self_attn.o_proj.weight"), vec![d, a], Weight, & $($m)? l.o_proj);
            t(format!("{pre}.mlp.gate_proj.weight"), vec![f_, d], Weight, & $($m)? l.gate_proj);
            t(format!("{pre}.mlp.up_proj.weight"), vec![f_, d], Weight, & $($m)? l.up_proj);
            t(format!("{pre}.mlp.down_proj.weight"), vec![d, f_], Weight, & $($m)? l.down_proj);
            t(format!("{pre}.input_layernorm.weight"), vec![d], Norm, & $($m)? l.input_layernorm);
            t(format!("{pre}.post_attention_layernorm.weight"), vec![d], Norm, & $($m)? l.post_attention_layernorm);
        }
        t("model.norm.weight".into(), vec![d], Norm, & $($m)? p.norm);
        if let Some(h) = p.lm_head.$opt() {
            t("lm_head.weight".into(), vec![v, d], Weight, h);
        }
    }};
}

impl<T> TransformerParams<T> {
    /// Every tensor with its name, shape and kind, in a fixed order.
    pub fn tensors<'a>(&'a self, c: &TransformerConfig) -> Vec<(ParamInfo, &'a Vec<T>)> {
        let mut out = Vec::new();
        for_each_transformer_tensor!(self, c, [], iter, as_ref, |info, t: &'a Vec<T>| out
            .push((info, t)));
        out
    }

    /// Mutable access to every tensor, in the order of [`Self::tensors`].
    pub fn tensors_mut<'a>(
        &'a mut self,
        c: &TransformerConfig,
    ) -> Vec<(ParamInfo, &'a mut Vec<T>)> {
        let mut out = Vec::new();
        for_each_transformer_tensor!(self, c, [mut], iter_mut, as_mut, |info,
                                                                       t: &'a mut Vec<T>| out
            .push((info, t)));
        out
    }

    /// The tree of `c` with every tensor empty.
    fn skeleton(c: &TransformerConfig) -> Self {
        let layer = || TransformerLayerParams {
            q_proj: Vec::new(),
            k_proj: Vec::new(),
            v_proj: Vec::new(),
            o_proj: Vec::new(),
            gate_proj: Vec::new(),
            up_proj: Vec::new(),
            down_proj: Vec::new(),
            input_layernorm: Vec::new(),
            post_attention_layernorm: Vec::new(),
        };
        TransformerParams {
            embed_tokens: Vec::new(),
            embed_positions: (c.positions == Positions::Learned).then(Vec::new),
            layers: (0..c.n_layer).map(|_| layer()).collect(),
            norm: Vec::new(),
            lm_head: (!c.tie_embeddings).then(Vec::new),
        }
    }

    /// Name, shape and kind of every tensor of `c`, nothing allocated.
    pub fn infos(c: &TransformerConfig) -> Vec<ParamInfo> {
        Self::skeleton(c)
            .tensors(c)
            .into_iter()
            .map(|(info, _)| info)
            .collect()
    }
}

impl<T: Clone + Default> TransformerParams<T> {
    /// A tree of zeros with the shapes of `c`.
    pub fn zeros(c: &TransformerConfig) -> Self {
        let mut p = Self::skeleton(c);
        for (info, t) in p.tensors_mut(c) {
            t.resize(info.shape.iter().product(), T::default());
        }
        p
    }
}

/// A Transformer language model with parameters in `T`.
#[derive(Clone, Debug, PartialEq)]
pub struct Transformer<T> {
    pub config: TransformerConfig,
    pub params: TransformerParams<T>,
    /// θ of the rotary embedding (rotary positions only).
    rotary: Option<Rotary>,
}

/// What the training forward keeps for the backward.
pub struct TransformerCache<T> {
    batch: usize,
    len: usize,
    layers: Vec<AttentionBlockCache<T>>,
    /// h after the last layer (BL, D) and rmsnorm of it
    h_last: Vec<T>,
    h_normed: Vec<T>,
}

impl<T: MatmulScalar> Transformer<T> {
    /// A model of `config` with these parameters (checked against it).
    pub fn new(config: TransformerConfig, params: TransformerParams<T>) -> Result<Self> {
        config.validate()?;
        let expected = TransformerParams::<T>::infos(&config);
        let held = params.tensors(&config);
        if held.len() != expected.len() {
            return Err(invalid(
                "Transformer::new",
                format!(
                    "{} tensors for a configuration of {}",
                    held.len(),
                    expected.len()
                ),
            ));
        }
        for (info, (_, t)) in expected.iter().zip(&held) {
            let want: usize = info.shape.iter().product();
            if t.len() != want {
                return Err(invalid(
                    "Transformer::new",
                    format!(
                        "{} has {} values, expected {want} {:?}",
                        info.name,
                        t.len(),
                        info.shape
                    ),
                ));
            }
        }
        let rotary = match config.positions {
            Positions::Rotary => Some(Rotary::new(config.head_dim, config.rope_theta)?),
            Positions::Learned => None,
        };
        Ok(Self {
            config,
            params,
            rotary,
        })
    }

    /// Names, shapes and kinds of every parameter.
    pub fn parameter_infos(&self) -> Vec<ParamInfo> {
        TransformerParams::<T>::infos(&self.config)
    }

    fn check_ids(&self, op: &'static str, ids: &[u32], batch: usize, len: usize) -> Result<()> {
        if batch == 0 || len == 0 {
            return Err(invalid(op, "batch and len must be at least 1"));
        }
        if ids.len() != batch * len {
            return Err(invalid(
                op,
                format!("{} token ids for batch={batch} x len={len}", ids.len()),
            ));
        }
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.config.vocab_size)
        {
            return Err(invalid(
                op,
                format!(
                    "token id {id} at position {i} is outside the vocabulary of {}",
                    self.config.vocab_size
                ),
            ));
        }
        self.check_positions(op, len)
    }

    /// Learned positions end at max_position_embeddings.
    fn check_positions(&self, op: &'static str, end: usize) -> Result<()> {
        if self.config.positions == Positions::Learned && end > self.config.max_position_embeddings
        {
            return Err(invalid(
                op,
                format!(
                    "position {} is past the {} learned positions of this model",
                    end - 1,
                    self.config.max_position_embeddings
                ),
            ));
        }
        Ok(())
    }

    /// Layer `i` as an [`AttentionBlock`] over this model's parameters.
    pub fn block(&self, i: usize) -> Result<AttentionBlock<'_, T, Dense<'_, T>>> {
        let l = self.params.layers.get(i).ok_or_else(|| {
            invalid(
                "Transformer::block",
                format!("layer {i} of {}", self.config.n_layer),
            )
        })?;
        let c = &self.config;
        let (d, a, f) = (c.d_model, c.n_head * c.head_dim, c.d_ff);
        let block = AttentionBlock {
            shape: c.block_shape(),
            input_norm: &l.input_layernorm,
            q_proj: Dense::new(&l.q_proj, a, d),
            k_proj: Dense::new(&l.k_proj, a, d),
            v_proj: Dense::new(&l.v_proj, a, d),
            o_proj: Dense::new(&l.o_proj, d, a),
            post_norm: &l.post_attention_layernorm,
            gate_proj: Dense::new(&l.gate_proj, f, d),
            up_proj: Dense::new(&l.up_proj, f, d),
            down_proj: Dense::new(&l.down_proj, d, f),
            rotary: self.rotary.as_ref(),
        };
        block.validate()?;
        Ok(block)
    }

    /// h = E[ids] (+ P[start + t])  (BL, D), sequences of `len` tokens.
    fn embed(&self, ids: &[u32], len: usize, start: usize) -> Vec<T> {
        let d = self.config.d_model;
        let mut h = crate::kernels::embedding_forward(&self.params.embed_tokens, ids, d);
        if let Some(pos) = &self.params.embed_positions {
            for (r, row) in h.chunks_mut(d).enumerate() {
                let p = start + r % len;
                row.iter_mut()
                    .zip(&pos[p * d..(p + 1) * d])
                    .for_each(|(x, &y)| *x += y);
            }
        }
        h
    }

    fn head_weight(&self) -> &[T] {
        self.params
            .lm_head
            .as_deref()
            .unwrap_or(&self.params.embed_tokens)
    }

    fn final_norm(&self, h: &[T]) -> Result<Vec<T>> {
        let mut y = vec![T::ZERO; h.len()];
        norm_forward(h, &self.params.norm, None, self.config.norm_eps, &mut y)?;
        Ok(y)
    }

    /// Logits (batch, len, vocab) for token ids (batch, len).
    pub fn forward(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<T>> {
        let hidden = self.final_hidden(ids, batch, len)?;
        self.logits_from_hidden(&hidden)
    }

    /// rmsnorm(h) after the last layer, (batch, len, d_model).
    pub fn final_hidden(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<T>> {
        self.check_ids("Transformer::final_hidden", ids, batch, len)?;
        let mut h = self.embed(ids, len, 0);
        for i in 0..self.config.n_layer {
            self.block(i)?.forward(&mut h, batch, len, None)?;
        }
        self.final_norm(&h)
    }

    /// Logits (rows, vocab) of rows of [`Self::final_hidden`].
    pub fn logits_from_hidden(&self, hidden: &[T]) -> Result<Vec<T>> {
        let (d, v) = (self.config.d_model, self.config.vocab_size);
        if hidden.len() % d != 0 {
            return Err(invalid(
                "Transformer::logits_from_hidden",
                format!("{} values are not rows of d_model={d}", hidden.len()),
            ));
        }
        let rows = hidden.len() / d;
        let mut logits = vec![T::ZERO; rows * v];
        matmul_xwt(hidden, self.head_weight(), rows, d, v, &mut logits, false)?;
        Ok(logits)
    }

    /// Runs `ids` (one sequence) after what `caches` hold (one per layer),
    /// extending them; returns rmsnorm(h) of its positions (len, D). The
    /// path of incremental decoding in f32 or f64, for the tests; the
    /// inference model runs the same blocks over its own weights.
    pub fn forward_cached(&self, ids: &[u32], caches: &mut [KvCache<T>]) -> Result<Vec<T>> {
        let by_layer = caches.iter_mut().map(|c| vec![c]).collect();
        self.forward_with_caches("Transformer::forward_cached", ids, 1, ids.len(), by_layer)
    }

    /// The same for a batch of sequences that have all read the same
    /// number of tokens: ids (batch, len), `caches[layer][sequence]`;
    /// returns rmsnorm(h) (batch, len, D).
    pub fn forward_cached_batch(
        &self,
        ids: &[u32],
        batch: usize,
        caches: &mut [Vec<KvCache<T>>],
    ) -> Result<Vec<T>> {
        const OP: &str = "Transformer::forward_cached_batch";
        if let Some((i, l)) = caches.iter().enumerate().find(|(_, l)| l.len() != batch) {
            return Err(invalid(
                OP,
                format!("layer {i} has {} caches for {batch} sequences", l.len()),
            ));
        }
        let len = if batch == 0 { 0 } else { ids.len() / batch };
        let by_layer = caches.iter_mut().map(|l| l.iter_mut().collect()).collect();
        self.forward_with_caches(OP, ids, batch, len, by_layer)
    }

    /// `by_layer[layer][sequence]`: every sequence at the same position.
    fn forward_with_caches(
        &self,
        op: &'static str,
        ids: &[u32],
        batch: usize,
        len: usize,
        mut by_layer: Vec<Vec<&mut KvCache<T>>>,
    ) -> Result<Vec<T>> {
        if by_layer.len() != self.config.n_layer {
            return Err(invalid(
                op,
                format!(
                    "caches for {} layers; the model has {}",
                    by_layer.len(),
                    self.config.n_layer
                ),
            ));
        }
        self.check_ids(op, ids, batch, len)?;
        let width = self.config.block_shape().width();
        let start = by_layer[0][0].positions(width);
        for (i, layer) in by_layer.iter().enumerate() {
            if let Some(b) = layer.iter().position(|c| c.positions(width) != start) {
                return Err(invalid(
                    op,
                    format!(
                        "the cache of layer {i}, sequence {b} holds {} positions, that of layer 0, sequence 0 {start}: every cache must be at the same position",
                        layer[b].positions(width)
                    ),
                ));
            }
        }
        self.check_positions(op, start + len)?;
        let mut h = self.embed(ids, len, start);
        for (i, caches) in by_layer.iter_mut().enumerate() {
            self.block(i)?.forward(&mut h, batch, len, Some(caches))?;
        }
        self.final_norm(&h)
    }

    /// Forward that keeps what [`Self::backward`] needs.
    pub fn forward_train(
        &self,
        ids: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<(Vec<T>, TransformerCache<T>)> {
        self.check_ids("Transformer::forward_train", ids, batch, len)?;
        let mut h = self.embed(ids, len, 0);
        let mut layers = Vec::with_capacity(self.config.n_layer);
        for i in 0..self.config.n_layer {
            layers.push(self.block(i)?.forward_train(&mut h, batch, len)?);
        }
        let h_normed = self.final_norm(&h)?;
        let logits = self.logits_from_hidden(&h_normed)?;
        Ok((
            logits,
            TransformerCache {
                batch,
                len,
                layers,
                h_last: h,
                h_normed,
            },
        ))
    }

    /// Gradients of every parameter given dL/dlogits (batch, len, vocab).
    pub fn backward(
        &self,
        ids: &[u32],
        cache: &TransformerCache<T>,
        d_logits: &[T],
    ) -> Result<TransformerParams<T>> {
        self.check_ids("Transformer::backward", ids, cache.batch, cache.len)?;
        let c = &self.config;
        let (d, v) = (c.d_model, c.vocab_size);
        let rows = cache.batch * cache.len;
        if d_logits.len() != rows * v {
            return Err(invalid(
                "Transformer::backward",
                format!(
                    "d_logits has {} elements, expected {rows} x {v}",
                    d_logits.len()
                ),
            ));
        }
        let mut g = TransformerParams::<T>::zeros(c);
        // logits = hn · headᵀ
        let mut d_hn = vec![T::ZERO; rows * d];
        matmul_xw(d_logits, self.head_weight(), rows, v, d, &mut d_hn, false)?;
        {
            let head_grad = g.lm_head.as_mut().unwrap_or(&mut g.embed_tokens);
            matmul_xtw(d_logits, &cache.h_normed, rows, v, d, head_grad, true)?;
        }
        let ng = norm_backward(&cache.h_last, &self.params.norm, false, c.norm_eps, &d_hn)?;
        g.norm = ng.weight;
        let mut dh = ng.x;
        for i in (0..c.n_layer).rev() {
            let grads =
                self.block(i)?
                    .backward(&cache.layers[i], cache.batch, cache.len, &mut dh)?;
            set_layer_gradients(&mut g.layers[i], grads);
        }
        // h = E[ids] + P[t]
        crate::kernels::embedding_backward(ids, &dh, d, &mut g.embed_tokens);
        if let Some(pos) = g.embed_positions.as_mut() {
            for (r, row) in dh.chunks(d).enumerate() {
                let p = r % cache.len;
                pos[p * d..(p + 1) * d]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(x, &y)| *x += y);
            }
        }
        Ok(g)
    }

    /// A freshly initialised model (docs/DESIGN.md §15.5): every matrix and
    /// embedding N(0, 0.02²) (GPT-2, Llama's initializer_range), the
    /// residual projections o_proj and down_proj scaled by 1/sqrt(2
    /// n_layer) (GPT-2), norm weights 1.
    pub fn init(config: TransformerConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let mut rng = Rng::new(seed);
        let mut p = TransformerParams::<T>::zeros(c);
        let residual = 0.02 / (2.0 * c.n_layer as f64).sqrt();
        for (info, t) in p.tensors_mut(c) {
            let std = if info.name.ends_with("o_proj.weight")
                || info.name.ends_with("down_proj.weight")
            {
                residual
            } else {
                0.02
            };
            match info.kind {
                ParamKind::Norm => t.fill(T::ONE),
                _ => *t = rng.vec(t.len(), |r| r.normal() * std),
            }
        }
        Self::new(config, p)
    }
}

/// Moves one block's gradients into the layer's place in the tree.
fn set_layer_gradients<T>(g: &mut TransformerLayerParams<T>, grads: AttentionBlockGradients<T>) {
    g.q_proj = grads.q_proj;
    g.k_proj = grads.k_proj;
    g.v_proj = grads.v_proj;
    g.o_proj = grads.o_proj;
    g.gate_proj = grads.gate_proj;
    g.up_proj = grads.up_proj;
    g.down_proj = grads.down_proj;
    g.input_layernorm = grads.input_norm;
    g.post_attention_layernorm = grads.post_norm;
}
