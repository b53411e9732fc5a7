//! The Mamba language model (docs/DESIGN.md §6, §7): embedding, the blocks
//! of [`super::block`] and the head; forward and backward over batches of
//! token sequences, and initialisation. Its files are read and written by
//! [`crate::io::model_files`].
//!
//! ```text
//! h = E[ids]                                              (BL, D)
//! per layer:  h = h + block(h)                            (BL, D)   src/nn/block.rs
//! logits = norm_f(h) Eᵀ                                   (BL, V)
//! ```
//! BL = batch · len rows, token-major. The residual stream h stays in the
//! compute type (f32 or f64), as the official `residual_in_fp32`.

use super::block::{
    norm_backward, norm_forward, Block, BlockCache, BlockGradients, BlockScalar, ChunkBuffers,
    Conv, Dense, Mixer, MixerGradients, Ssd, Values, S6,
};
use super::config::MambaConfig;
use super::params::{LayerParams, MambaParams, ParamInfo};
use crate::error::{invalid, Result};
use crate::kernels::{matmul_xtw, matmul_xw, matmul_xwt, MatmulScalar};
use crate::rng::Rng;

/// A Mamba language model with parameters in `T`.
#[derive(Clone, Debug, PartialEq)]
pub struct Mamba<T> {
    pub config: MambaConfig,
    pub params: MambaParams<T>,
}

/// What the forward pass keeps for the backward pass.
pub struct ForwardCache<T> {
    batch: usize,
    len: usize,
    layers: Vec<BlockCache<T>>,
    /// the residual stream after the last layer (BL, D)
    h_last: Vec<T>,
    /// norm_f(h_last) (BL, D)
    h_normed: Vec<T>,
}

impl<T: BlockScalar> Mamba<T> {
    /// Names, shapes and kinds of every parameter.
    pub fn parameter_infos(&self) -> Vec<ParamInfo> {
        self.params
            .tensors(&self.config)
            .into_iter()
            .map(|(i, _)| i)
            .collect()
    }

    /// Checks token ids against the vocabulary and the batch shape.
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
        Ok(())
    }

    /// Logits (batch, len, vocab) for token ids (batch, len).
    ///
    /// ```
    /// use selective::nn::Mamba;
    /// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/models/tiny-hf");
    /// let model = Mamba::<f32>::from_dir(dir)?;
    /// let (batch, len) = (1, 4);
    /// let logits = model.forward(&[3, 1, 4, 1], batch, len)?;
    /// let vocab = model.config.vocab_size;
    /// assert_eq!(logits.len(), batch * len * vocab);
    /// // The most likely token after the whole prompt:
    /// let last = &logits[(len - 1) * vocab..];
    /// let next = (0..vocab).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap();
    /// assert!(next < vocab);
    /// # Ok::<(), selective::Error>(())
    /// ```
    pub fn forward(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<T>> {
        let hidden = self.final_hidden(ids, batch, len)?;
        self.logits_from_hidden(&hidden)
    }

    /// norm_f(h) after the last layer, (batch, len, d_model): what the head
    /// reads. With [`Self::logits_from_hidden`] it lets a caller compute the
    /// vocabulary-sized logits only for the rows it needs, a few at a time.
    pub fn final_hidden(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<T>> {
        self.check_ids("Mamba::final_hidden", ids, batch, len)?;
        let mut h = self.embed(ids);
        let mut bufs = ChunkBuffers::default();
        for i in 0..self.config.n_layer {
            self.block(i)?
                .forward(&mut h, batch, len, None, &mut bufs, false)?;
        }
        self.norm_forward(
            &h,
            &self.params.norm_f_weight,
            self.params.norm_f_bias.as_deref(),
        )
    }

    /// Logits (rows, vocab) of rows of [`Self::final_hidden`] (rows, d_model).
    pub fn logits_from_hidden(&self, hidden: &[T]) -> Result<Vec<T>> {
        let (d, v) = (self.config.d_model, self.config.vocab_size);
        if hidden.len() % d != 0 {
            return Err(invalid(
                "Mamba::logits_from_hidden",
                format!("{} values are not rows of d_model={d}", hidden.len()),
            ));
        }
        let rows = hidden.len() / d;
        let mut logits = vec![T::ZERO; rows * v];
        matmul_xwt(hidden, self.head_weight(), rows, d, v, &mut logits, false)?;
        Ok(logits)
    }

    /// Forward that keeps what [`Self::backward`] needs.
    pub fn forward_train(
        &self,
        ids: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<(Vec<T>, ForwardCache<T>)> {
        self.check_ids("Mamba::forward_train", ids, batch, len)?;
        let mut h = self.embed(ids);
        let mut layers = Vec::with_capacity(self.config.n_layer);
        for i in 0..self.config.n_layer {
            layers.push(self.block(i)?.forward_train(&mut h, batch, len)?);
        }
        let (h_normed, logits) = self.head(&h)?;
        Ok((
            logits,
            ForwardCache {
                batch,
                len,
                layers,
                h_last: h,
                h_normed,
            },
        ))
    }

    /// h = E[ids]  (BL, D)
    fn embed(&self, ids: &[u32]) -> Vec<T> {
        crate::kernels::embedding_forward(&self.params.embedding, ids, self.config.d_model)
    }

    fn head_weight(&self) -> &[T] {
        self.params
            .lm_head
            .as_deref()
            .unwrap_or(&self.params.embedding)
    }

    /// (norm_f(h), norm_f(h) · headᵀ)
    fn head(&self, h: &[T]) -> Result<(Vec<T>, Vec<T>)> {
        let (d, v) = (self.config.d_model, self.config.vocab_size);
        let rows = h.len() / d;
        let normed = self.norm_forward(
            h,
            &self.params.norm_f_weight,
            self.params.norm_f_bias.as_deref(),
        )?;
        let mut logits = vec![T::ZERO; rows * v];
        matmul_xwt(&normed, self.head_weight(), rows, d, v, &mut logits, false)?;
        Ok((normed, logits))
    }

    fn norm_forward(&self, x: &[T], w: &[T], b: Option<&[T]>) -> Result<Vec<T>> {
        let mut y = vec![T::ZERO; x.len()];
        norm_forward(x, w, b, self.config.norm_eps, &mut y)?;
        Ok(y)
    }

    /// Layer `i` as a [`Block`] over this model's parameters.
    pub fn block(&self, i: usize) -> Result<Block<'_, T, Dense<'_, T>>> {
        let layer = self.params.layers.get(i).ok_or_else(|| {
            invalid(
                "Mamba::block",
                format!("layer {i} of {}", self.config.n_layer),
            )
        })?;
        let c = &self.config;
        let (d, e, n, r) = (c.d_model, c.d_inner, c.d_state, c.dt_rank);
        let m = &layer.mixer;
        let a = Values::Owned(m.a_log.iter().map(|&v| -v.exp()).collect());
        if c.ssd.is_some() {
            let missing = || {
                invalid(
                    "Mamba::block",
                    format!("layer {i} has no gated norm weight"),
                )
            };
            let block = Block {
                shape: c.block_shape(),
                norm_weight: &layer.norm_weight,
                norm_bias: layer.norm_bias.as_deref(),
                in_proj: Dense::new(&m.in_proj_weight, c.in_proj_rows(), d),
                in_proj_bias: m.in_proj_bias.as_deref(),
                conv: Some(Conv {
                    weight: &m.conv1d_weight,
                    bias: m.conv1d_bias.as_deref(),
                }),
                mixer: Mixer::Ssd(Ssd {
                    dt_bias: &m.dt_proj_bias,
                    a,
                    d: &m.d,
                    norm_weight: m.norm_weight.as_deref().ok_or_else(missing)?,
                }),
                out_proj: Dense::new(&m.out_proj_weight, d, e),
                out_proj_bias: m.out_proj_bias.as_deref(),
            };
            block.validate()?;
            return Ok(block);
        }
        let block = Block {
            shape: c.block_shape(),
            norm_weight: &layer.norm_weight,
            norm_bias: layer.norm_bias.as_deref(),
            in_proj: Dense::new(&m.in_proj_weight, 2 * e, d),
            in_proj_bias: m.in_proj_bias.as_deref(),
            conv: Some(Conv {
                weight: &m.conv1d_weight,
                bias: m.conv1d_bias.as_deref(),
            }),
            mixer: Mixer::S6(S6 {
                x_proj: Dense::new(&m.x_proj_weight, r + 2 * n, e),
                dt_proj: Dense::new(&m.dt_proj_weight, e, r),
                dt_bias: &m.dt_proj_bias,
                a,
                d: &m.d,
                dt_bc_rms_eps: c.dt_bc_rms_eps,
            }),
            out_proj: Dense::new(&m.out_proj_weight, d, e),
            out_proj_bias: m.out_proj_bias.as_deref(),
        };
        block.validate()?;
        Ok(block)
    }

    /// Gradients of every parameter given dL/dlogits (batch, len, vocab).
    pub fn backward(
        &self,
        ids: &[u32],
        cache: &ForwardCache<T>,
        d_logits: &[T],
    ) -> Result<MambaParams<T>> {
        self.check_ids("Mamba::backward", ids, cache.batch, cache.len)?;
        let c = &self.config;
        let (d, v) = (c.d_model, c.vocab_size);
        let rows = cache.batch * cache.len;
        if d_logits.len() != rows * v {
            return Err(invalid(
                "Mamba::backward",
                format!(
                    "d_logits has {} elements, expected {rows} x {v}",
                    d_logits.len()
                ),
            ));
        }
        let mut g = MambaParams::<T>::zeros(c);
        // logits = hn · headᵀ
        let mut d_hn = vec![T::ZERO; rows * d];
        matmul_xw(d_logits, self.head_weight(), rows, v, d, &mut d_hn, false)?;
        {
            let head_grad = g.lm_head.as_mut().unwrap_or(&mut g.embedding);
            matmul_xtw(d_logits, &cache.h_normed, rows, v, d, head_grad, true)?;
        }
        let ng = norm_backward(
            &cache.h_last,
            &self.params.norm_f_weight,
            self.params.norm_f_bias.is_some(),
            c.norm_eps,
            &d_hn,
        )?;
        g.norm_f_weight = ng.weight;
        if let Some(b) = ng.bias {
            g.norm_f_bias = Some(b);
        }
        let mut dh = ng.x;
        for i in (0..c.n_layer).rev() {
            let grads =
                self.block(i)?
                    .backward(&cache.layers[i], cache.batch, cache.len, &mut dh)?;
            set_layer_gradients(&mut g.layers[i], grads)?;
        }
        // h = E[ids]
        crate::kernels::embedding_backward(ids, &dh, d, &mut g.embedding);
        Ok(g)
    }

    /// A freshly initialised model (docs/DESIGN.md §8).
    pub fn init(config: MambaConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (d, e, n, r, k) = (c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_conv);
        let mut rng = Rng::new(seed);
        let mut p = MambaParams::<T>::zeros(c);
        // kaiming_uniform(a=√5): U(±1/sqrt(fan_in))
        let uniform = |rng: &mut Rng, len: usize, bound: f64| -> Vec<T> {
            rng.vec(len, |r| r.uniform_in(-bound, bound))
        };
        p.embedding = rng.vec(c.vocab_size * d, |r| r.normal() * 0.02);
        // Δ's initial value per channel (Mamba-1) or head (Mamba-2):
        // log-uniform in [dt_min, dt_max], floored, stored through softplus⁻¹
        let dt_bias = |rng: &mut Rng, len: usize| -> Vec<T> {
            rng.vec(len, |rng| {
                let dt = rng
                    .uniform_in(c.dt_min.ln(), c.dt_max.ln())
                    .exp()
                    .max(c.dt_init_floor);
                dt + (-(-dt).exp_m1()).ln() // softplus⁻¹(dt)
            })
        };
        for layer in p.layers.iter_mut() {
            layer.norm_weight = vec![T::ONE; d];
            let m = &mut layer.mixer;
            if c.ssd.is_some() {
                // mamba_ssm Mamba2: default Linear and Conv1d inits, A
                // uniform in [1, 16] per head, D and the norm weight ones
                let (rows, channels, h) = (c.in_proj_rows(), c.conv_channels(), c.n_heads());
                m.in_proj_weight = uniform(&mut rng, rows * d, 1.0 / (d as f64).sqrt());
                m.conv1d_weight = uniform(&mut rng, channels * k, 1.0 / (k as f64).sqrt());
                if let Some(b) = m.conv1d_bias.as_mut() {
                    *b = uniform(&mut rng, channels, 1.0 / (k as f64).sqrt());
                }
                m.dt_proj_bias = dt_bias(&mut rng, h);
                m.a_log = rng.vec(h, |r| r.uniform_in(1.0, 16.0).ln());
                m.d = vec![T::ONE; h];
                m.norm_weight = Some(vec![T::ONE; e]);
                let out_bound = 1.0 / (e as f64).sqrt();
                let scale = 1.0 / (c.n_layer as f64).sqrt();
                m.out_proj_weight = rng.vec(d * e, |r| r.uniform_in(-out_bound, out_bound) * scale);
                continue;
            }
            m.in_proj_weight = uniform(&mut rng, 2 * e * d, 1.0 / (d as f64).sqrt());
            m.conv1d_weight = uniform(&mut rng, e * k, 1.0 / (k as f64).sqrt());
            if let Some(b) = m.conv1d_bias.as_mut() {
                *b = uniform(&mut rng, e, 1.0 / (k as f64).sqrt());
            }
            m.x_proj_weight = uniform(&mut rng, (r + 2 * n) * e, 1.0 / (e as f64).sqrt());
            m.dt_proj_weight = uniform(&mut rng, e * r, 1.0 / (r as f64).sqrt());
            m.dt_proj_bias = dt_bias(&mut rng, e);
            m.a_log = (0..e * n)
                .map(|i| <T as crate::float::Float>::from_f64(((i % n) as f64 + 1.0).ln()))
                .collect();
            m.d = vec![T::ONE; e];
            let out_bound = 1.0 / (e as f64).sqrt();
            let scale = 1.0 / (c.n_layer as f64).sqrt();
            m.out_proj_weight = rng.vec(d * e, |r| r.uniform_in(-out_bound, out_bound) * scale);
            // in_proj/out_proj biases (if any) stay 0.
        }
        p.norm_f_weight = vec![T::ONE; d];
        if let Some(head) = p.lm_head.as_mut() {
            *head = uniform(&mut rng, c.vocab_size * d, 1.0 / (d as f64).sqrt());
        }
        if let Some(b) = p.norm_f_bias.as_mut() {
            b.fill(T::ZERO);
        }
        Ok(Self { config, params: p })
    }
}

/// Mean cross-entropy of predicting ids[b, t+1] from logits[b, t], over all
/// batch · (len - 1) predictions; returns (loss, dL/dlogits).
pub fn next_token_cross_entropy<T: MatmulScalar>(
    logits: &[T],
    ids: &[u32],
    batch: usize,
    len: usize,
    vocab: usize,
) -> Result<(T, Vec<T>)> {
    if len < 2 || logits.len() != batch * len * vocab || ids.len() != batch * len {
        return Err(invalid(
            "next_token_cross_entropy",
            format!(
                "needs len >= 2, logits (batch={batch}, len={len}, vocab={vocab}) and ids (batch, len); got {} logits and {} ids",
                logits.len(),
                ids.len()
            ),
        ));
    }
    let count = T::from_usize(batch * (len - 1));
    let mut loss = T::ZERO;
    let mut grad = vec![T::ZERO; logits.len()];
    for b in 0..batch {
        for t in 0..len - 1 {
            let row = (b * len + t) * vocab;
            let target = ids[b * len + t + 1] as usize;
            let l = &logits[row..row + vocab];
            let max = l.iter().fold(l[0], |m, &v| m.max_nan(v));
            let sum: T = l.iter().map(|&v| (v - max).exp()).sum();
            let log_z = max + sum.ln();
            loss += log_z - l[target];
            for (gv, &v) in grad[row..row + vocab].iter_mut().zip(l) {
                *gv = (v - log_z).exp() / count;
            }
            grad[row + target] -= T::ONE / count;
        }
    }
    Ok((loss / count, grad))
}

/// Moves one block's gradients into the layer's place in the gradient tree.
fn set_layer_gradients<T>(g: &mut LayerParams<T>, grads: BlockGradients<T>) -> Result<()> {
    g.norm_weight = grads.norm_weight;
    g.norm_bias = grads.norm_bias;
    let m = &mut g.mixer;
    match grads.mixer {
        MixerGradients::S6 {
            x_proj_weight,
            dt_proj_weight,
            dt_proj_bias,
            a_log,
            d,
        } => {
            m.x_proj_weight = x_proj_weight;
            m.dt_proj_weight = dt_proj_weight;
            m.dt_proj_bias = dt_proj_bias;
            m.a_log = a_log;
            m.d = d;
        }
        MixerGradients::Ssd {
            dt_bias,
            a_log,
            d,
            norm_weight,
        } => {
            m.dt_proj_bias = dt_bias;
            m.a_log = a_log;
            m.d = d;
            m.norm_weight = Some(norm_weight);
        }
        MixerGradients::S4d(_) => {
            return Err(invalid(
                "Mamba::backward",
                "a language-model layer is S6 or SSD",
            ))
        }
    }
    m.in_proj_weight = grads.in_proj_weight;
    m.in_proj_bias = grads.in_proj_bias;
    m.conv1d_weight = grads.conv_weight;
    m.conv1d_bias = grads.conv_bias;
    m.out_proj_weight = grads.out_proj_weight;
    m.out_proj_bias = grads.out_proj_bias;
    Ok(())
}
