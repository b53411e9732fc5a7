//! A sequence classifier over the block stack (docs/DESIGN.md §16.3): which
//! of C classes a whole sequence belongs to (the species a DNA window comes
//! from, the digit a clip says), with any sequence as input: token ids or
//! real-valued vectors per step.
//!
//! ```text
//! tokens:   h0 = E[ids]                                     (B·L, D)
//! vectors:  h0 = x W_inᵀ + b_in,   x: (B·L, F)               (B·L, D)
//! hn = rmsnorm(blocks(h0)) · w_f                            (B·L, D)   TaskModel
//! pooling = mean:  p_b = (1/L) Σ_t hn[b, t]                 (B, D)
//!         = last:  p_b = hn[b, L-1]
//! logits = p W_clsᵀ + b_cls                                 (B, C)
//! loss = (1/B) Σ_b −log softmax(logits_b)[label_b]
//! ```
//!
//! The blocks are a [`TaskModel`]'s (S6 or S4D, gated or not), so a model
//! pretrained as a next-token model is fine-tuned by taking its blocks and
//! embedding ([`SequenceClassifier::from_backbone`]) and adding a fresh
//! head; its tied output head goes unused.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::model::{TaskModel, TaskModelConfig, TaskParams, TaskScalar};
use super::train::AnswerScore;
use crate::error::{check_len, invalid, Result};
use crate::float::Float;
use crate::io::{load_config_dir, save_config_dir};
use crate::kernels::{matmul_xtw, matmul_xw, matmul_xwt};
use crate::rng::Rng;

/// What a sequence is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassifierInput {
    /// Token ids below the backbone's vocab_size, embedded by E.
    Tokens,
    /// `width` real values per step, projected by W_in (D, F) and b_in.
    Vectors { width: usize },
}

/// How the hidden states of a sequence become one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The mean over every position.
    Mean,
    /// The last position's (for a causal model, the only one that has read
    /// the whole sequence).
    Last,
}

impl std::str::FromStr for Pooling {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "last" => Ok(Pooling::Last),
            _ => Err(invalid(
                "Pooling",
                format!("unknown pooling {s:?} (expected mean or last)"),
            )),
        }
    }
}

/// Sizes and switches of a classifier.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    pub backbone: TaskModelConfig,
    pub n_classes: usize,
    pub pooling: Pooling,
    pub input: ClassifierInput,
}

impl ClassifierConfig {
    pub fn validate(&self) -> Result<()> {
        self.backbone.validate()?;
        if self.n_classes < 2 {
            return Err(invalid(
                "ClassifierConfig",
                format!("n_classes must be at least 2, got {}", self.n_classes),
            ));
        }
        if let ClassifierInput::Vectors { width: 0 } = self.input {
            return Err(invalid(
                "ClassifierConfig",
                "vector inputs need a width of at least 1",
            ));
        }
        Ok(())
    }

    /// F, the values per step of vector inputs (0 for tokens).
    fn input_width(&self) -> usize {
        match self.input {
            ClassifierInput::Tokens => 0,
            ClassifierInput::Vectors { width } => width,
        }
    }
}

/// Every parameter of a classifier (also the shape of its gradients).
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierParams<T> {
    pub backbone: TaskParams<T>,
    /// (D, F); empty for token inputs.
    pub input_weight: Vec<T>,
    /// (D); empty for token inputs.
    pub input_bias: Vec<T>,
    /// (C, D)
    pub head_weight: Vec<T>,
    /// (C)
    pub head_bias: Vec<T>,
}

impl<T: TaskScalar> ClassifierParams<T> {
    pub fn zeros(config: &ClassifierConfig) -> Self {
        let (d, f, c) = (
            config.backbone.d_model,
            config.input_width(),
            config.n_classes,
        );
        ClassifierParams {
            backbone: TaskParams::zeros(&config.backbone),
            input_weight: vec![T::ZERO; d * f],
            input_bias: vec![T::ZERO; if f > 0 { d } else { 0 }],
            head_weight: vec![T::ZERO; c * d],
            head_bias: vec![T::ZERO; c],
        }
    }

    /// Every tensor with its name and whether weight decay applies, in a
    /// fixed order: the backbone's, then the input projection, then the head.
    pub fn named(&self, config: &ClassifierConfig) -> Vec<(String, bool, &[T])> {
        let mut out: Vec<(String, bool, &[T])> = self
            .backbone
            .tensors(&config.backbone)
            .into_iter()
            .map(|(info, t)| (format!("backbone.{}", info.name), info.decays, t))
            .collect();
        if config.input_width() > 0 {
            out.push(("input.weight".into(), true, &self.input_weight));
            out.push(("input.bias".into(), false, &self.input_bias));
        }
        out.push(("head.weight".into(), true, &self.head_weight));
        out.push(("head.bias".into(), false, &self.head_bias));
        out
    }

    fn slices_mut(&mut self, config: &ClassifierConfig) -> Vec<&mut [T]> {
        let mut out: Vec<&mut [T]> = self
            .backbone
            .tensors_mut(&config.backbone)
            .into_iter()
            .map(|(_, t)| t.as_mut_slice())
            .collect();
        if config.input_width() > 0 {
            out.push(&mut self.input_weight);
            out.push(&mut self.input_bias);
        }
        out.push(&mut self.head_weight);
        out.push(&mut self.head_bias);
        out
    }
}

impl crate::train::ParamTree for ClassifierParams<f32> {
    type Config = ClassifierConfig;
    fn tensors_with_decay(&self, config: &ClassifierConfig) -> Vec<(bool, &[f32])> {
        self.named(config)
            .into_iter()
            .map(|(_, decays, t)| (decays, t))
            .collect()
    }
    fn tensor_slices_mut(&mut self, config: &ClassifierConfig) -> Vec<&mut [f32]> {
        self.slices_mut(config)
    }
    fn zeros_of(config: &ClassifierConfig) -> Self {
        ClassifierParams::zeros(config)
    }
    fn expected_sizes(config: &ClassifierConfig) -> Vec<(String, usize)> {
        ClassifierParams::<f32>::zeros(config)
            .named(config)
            .into_iter()
            .map(|(name, _, t)| (name, t.len()))
            .collect()
    }
}

/// A batch of sequences: (batch, len) token ids or (batch, len, F) values.
#[derive(Clone, Copy, Debug)]
pub enum SequenceInput<'a, T> {
    Tokens(&'a [u32]),
    Vectors(&'a [T]),
}

/// What [`SequenceClassifier::forward_train`] keeps for the backward.
pub struct ClassifierCache<T> {
    batch: usize,
    len: usize,
    backbone: super::model::TaskCache<T>,
    /// (B, D)
    pooled: Vec<T>,
}

/// A sequence classifier: configuration and parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceClassifier<T> {
    pub config: ClassifierConfig,
    pub params: ClassifierParams<T>,
}

impl<T: TaskScalar> SequenceClassifier<T> {
    /// A fresh classifier: the backbone as [`TaskModel::init`], W_in and
    /// W_cls uniform in ±1/sqrt(fan_in) (PyTorch's nn.Linear), biases zero.
    pub fn init(config: ClassifierConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let backbone = TaskModel::init(config.backbone, seed)?;
        Self::from_backbone(
            backbone,
            config.n_classes,
            config.pooling,
            config.input,
            seed,
        )
    }

    /// A classifier whose blocks (and embedding, for tokens) are those of
    /// `backbone` (e.g. a pretrained next-token model), with a fresh head.
    pub fn from_backbone(
        backbone: TaskModel<T>,
        n_classes: usize,
        pooling: Pooling,
        input: ClassifierInput,
        seed: u64,
    ) -> Result<Self> {
        let config = ClassifierConfig {
            backbone: backbone.config,
            n_classes,
            pooling,
            input,
        };
        config.validate()?;
        let d = config.backbone.d_model;
        let f = config.input_width();
        let mut rng = Rng::new(seed ^ 0xC1A5_51F1);
        let mut uniform = |len: usize, fan_in: usize| -> Vec<T> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            rng.vec(len, |r| r.uniform_in(-bound, bound))
        };
        let input_weight = if f > 0 { uniform(d * f, f) } else { Vec::new() };
        let head_weight = uniform(n_classes * d, d);
        Ok(SequenceClassifier {
            config,
            params: ClassifierParams {
                backbone: backbone.params,
                input_weight,
                input_bias: vec![T::ZERO; if f > 0 { d } else { 0 }],
                head_weight,
                head_bias: vec![T::ZERO; n_classes],
            },
        })
    }

    pub fn parameter_count(&self) -> usize {
        self.params
            .named(&self.config)
            .iter()
            .map(|(_, _, t)| t.len())
            .sum()
    }

    /// The backbone as a [`TaskModel`] (a copy of its parameters).
    fn backbone(&self) -> TaskModel<T> {
        TaskModel {
            config: self.config.backbone,
            params: self.params.backbone.clone(),
        }
    }

    /// h0 (B·L, D) of the input, checked against the configuration.
    fn input_rows(&self, input: SequenceInput<'_, T>, batch: usize, len: usize) -> Result<Vec<T>> {
        const OP: &str = "SequenceClassifier";
        if batch == 0 || len == 0 {
            return Err(invalid(OP, "batch and len must be at least 1"));
        }
        let d = self.config.backbone.d_model;
        match (self.config.input, input) {
            (ClassifierInput::Tokens, SequenceInput::Tokens(ids)) => {
                check_len(OP, "ids", ids, &[("batch", batch), ("len", len)])?;
                let v = self.config.backbone.vocab_size;
                if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
                    return Err(invalid(
                        OP,
                        format!("token id {id} at position {i} is outside the vocabulary of {v}"),
                    ));
                }
                Ok(crate::kernels::embedding_forward(
                    &self.params.backbone.embedding,
                    ids,
                    d,
                ))
            }
            (ClassifierInput::Vectors { width }, SequenceInput::Vectors(x)) => {
                check_len(
                    OP,
                    "inputs",
                    x,
                    &[("batch", batch), ("len", len), ("width", width)],
                )?;
                if x.iter().any(|v| !v.to_f64().is_finite()) {
                    return Err(invalid(OP, "an input value is not finite"));
                }
                let rows = batch * len;
                let mut h0 = vec![T::ZERO; rows * d];
                matmul_xwt(x, &self.params.input_weight, rows, width, d, &mut h0, false)?;
                for row in h0.chunks_mut(d) {
                    for (h, &b) in row.iter_mut().zip(&self.params.input_bias) {
                        *h += b;
                    }
                }
                Ok(h0)
            }
            (ClassifierInput::Tokens, SequenceInput::Vectors(_)) => Err(invalid(
                OP,
                "this classifier reads token ids, and was given vectors",
            )),
            (ClassifierInput::Vectors { .. }, SequenceInput::Tokens(_)) => Err(invalid(
                OP,
                "this classifier reads vectors, and was given token ids",
            )),
        }
    }

    /// p (B, D) of the final hidden states hn (B, L, D).
    fn pool(&self, hn: &[T], batch: usize, len: usize) -> Vec<T> {
        let d = self.config.backbone.d_model;
        let mut pooled = vec![T::ZERO; batch * d];
        for (b, p) in pooled.chunks_mut(d).enumerate() {
            let seq = &hn[b * len * d..(b + 1) * len * d];
            match self.config.pooling {
                Pooling::Mean => {
                    let mut sum = vec![0.0f64; d];
                    for row in seq.chunks(d) {
                        for (s, &v) in sum.iter_mut().zip(row) {
                            *s += v.to_f64();
                        }
                    }
                    for (dst, s) in p.iter_mut().zip(sum) {
                        *dst = <T as Float>::from_f64(s / len as f64);
                    }
                }
                Pooling::Last => p.copy_from_slice(&seq[(len - 1) * d..]),
            }
        }
        pooled
    }

    /// logits = p W_clsᵀ + b_cls  (B, C)
    fn head(&self, pooled: &[T], batch: usize) -> Result<Vec<T>> {
        let (d, c) = (self.config.backbone.d_model, self.config.n_classes);
        let mut logits = vec![T::ZERO; batch * c];
        matmul_xwt(
            pooled,
            &self.params.head_weight,
            batch,
            d,
            c,
            &mut logits,
            false,
        )?;
        for row in logits.chunks_mut(c) {
            for (l, &b) in row.iter_mut().zip(&self.params.head_bias) {
                *l += b;
            }
        }
        Ok(logits)
    }

    fn forward_inner(
        &self,
        input: SequenceInput<'_, T>,
        batch: usize,
        len: usize,
        keep: bool,
    ) -> Result<(Vec<T>, ClassifierCache<T>)> {
        let h0 = self.input_rows(input, batch, len)?;
        let cache = self.backbone().forward_from_input(h0, batch, len, keep)?;
        let pooled = self.pool(cache.final_hidden(), batch, len);
        let logits = self.head(&pooled, batch)?;
        Ok((
            logits,
            ClassifierCache {
                batch,
                len,
                backbone: cache,
                pooled,
            },
        ))
    }

    /// Class logits (batch, C) of a batch of sequences.
    pub fn logits(&self, input: SequenceInput<'_, T>, batch: usize, len: usize) -> Result<Vec<T>> {
        Ok(self.forward_inner(input, batch, len, false)?.0)
    }

    /// Mean cross-entropy and accuracy of `labels` (batch), and with
    /// `gradients` the gradient of that mean with respect to every parameter.
    pub fn loss_and_grads(
        &self,
        input: SequenceInput<'_, T>,
        labels: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<(AnswerScore, ClassifierParams<T>)> {
        const OP: &str = "SequenceClassifier::loss_and_grads";
        self.check_labels(OP, labels, batch)?;
        let (logits, cache) = self.forward_inner(input, batch, len, true)?;
        let (score, d_logits) = cross_entropy(&logits, self.config.n_classes, labels, true);
        let grads = self.backward(input, &cache, &d_logits)?;
        Ok((score, grads))
    }

    /// Mean cross-entropy and accuracy of `labels` by the plain forward.
    pub fn score(
        &self,
        input: SequenceInput<'_, T>,
        labels: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<AnswerScore> {
        self.check_labels("SequenceClassifier::score", labels, batch)?;
        let logits = self.logits(input, batch, len)?;
        Ok(cross_entropy(&logits, self.config.n_classes, labels, false).0)
    }

    fn check_labels(&self, op: &'static str, labels: &[u32], batch: usize) -> Result<()> {
        check_len(op, "labels", labels, &[("batch", batch)])?;
        let c = self.config.n_classes;
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= c) {
            return Err(invalid(
                op,
                format!("label {l} of sequence {i} is not one of the {c} classes"),
            ));
        }
        Ok(())
    }

    /// Gradients of every parameter given dL/dlogits (B, C).
    fn backward(
        &self,
        input: SequenceInput<'_, T>,
        cache: &ClassifierCache<T>,
        d_logits: &[T],
    ) -> Result<ClassifierParams<T>> {
        let (batch, len) = (cache.batch, cache.len);
        let (d, c) = (self.config.backbone.d_model, self.config.n_classes);
        let mut g = ClassifierParams::<T>::zeros(&self.config);
        // logits = p W_clsᵀ + b: dW_cls = dlogitsᵀ p, db = Σ_b dlogits, dp = dlogits W_cls
        matmul_xtw(
            d_logits,
            &cache.pooled,
            batch,
            c,
            d,
            &mut g.head_weight,
            false,
        )?;
        for row in d_logits.chunks(c) {
            for (gb, &v) in g.head_bias.iter_mut().zip(row) {
                *gb += v;
            }
        }
        let mut d_pooled = vec![T::ZERO; batch * d];
        matmul_xw(
            d_logits,
            &self.params.head_weight,
            batch,
            c,
            d,
            &mut d_pooled,
            false,
        )?;
        // pooling: mean spreads dp/L over every position, last puts dp at L-1
        let mut d_hidden = vec![T::ZERO; batch * len * d];
        for (b, dp) in d_pooled.chunks(d).enumerate() {
            let seq = &mut d_hidden[b * len * d..(b + 1) * len * d];
            match self.config.pooling {
                Pooling::Mean => {
                    let scale = <T as Float>::from_f64(1.0 / len as f64);
                    for row in seq.chunks_mut(d) {
                        for (dst, &v) in row.iter_mut().zip(dp) {
                            *dst = v * scale;
                        }
                    }
                }
                Pooling::Last => seq[(len - 1) * d..].copy_from_slice(dp),
            }
        }
        let backbone = self.backbone();
        let (gb, dh0) = backbone.backward_to_input(&cache.backbone, &d_hidden)?;
        g.backbone = gb;
        match input {
            SequenceInput::Tokens(ids) => {
                crate::kernels::embedding_backward(ids, &dh0, d, &mut g.backbone.embedding)
            }
            SequenceInput::Vectors(x) => {
                // h0 = x W_inᵀ + b_in: dW_in = dh0ᵀ x, db_in = Σ_rows dh0
                let f = self.config.input_width();
                let rows = batch * len;
                matmul_xtw(&dh0, x, rows, d, f, &mut g.input_weight, false)?;
                for row in dh0.chunks(d) {
                    for (gb, &v) in g.input_bias.iter_mut().zip(row) {
                        *gb += v;
                    }
                }
            }
        }
        Ok(g)
    }

    /// Writes `model.safetensors` and `classifier.json` into `dir`, each
    /// atomically (tensors flat, named as [`ClassifierParams::named`]).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tensors = self
            .params
            .named(&self.config)
            .into_iter()
            .map(|(name, _, t)| (name, vec![t.len()], t))
            .collect();
        save_config_dir(dir, CLASSIFIER_FILE, &self.config, tensors)
    }

    /// Reads what [`Self::save`] wrote, checking every name and size.
    pub fn load(dir: &Path) -> Result<Self> {
        let (config, tensors) = load_config_dir::<T, ClassifierConfig>(
            dir,
            CLASSIFIER_FILE,
            "a classifier configuration",
            |c| c.validate(),
            |c| {
                ClassifierParams::<f32>::zeros(c)
                    .named(c)
                    .into_iter()
                    .map(|(name, _, t)| (name, vec![t.len()]))
                    .collect()
            },
        )?;
        let mut params = ClassifierParams::<T>::zeros(&config);
        for (dst, t) in params.slices_mut(&config).into_iter().zip(tensors) {
            dst.copy_from_slice(&t);
        }
        Ok(SequenceClassifier { config, params })
    }
}

/// The configuration file of a saved classifier.
pub const CLASSIFIER_FILE: &str = "classifier.json";

/// Summed cross-entropy and correct argmaxes of `logits` (rows, C) against
/// `labels`; with `gradient`, dL/dlogits of the mean over the rows.
pub fn cross_entropy<T: TaskScalar>(
    logits: &[T],
    classes: usize,
    labels: &[u32],
    gradient: bool,
) -> (AnswerScore, Vec<T>) {
    let mut score = AnswerScore::default();
    let mut grad = if gradient {
        vec![T::ZERO; logits.len()]
    } else {
        Vec::new()
    };
    let scale = 1.0 / labels.len().max(1) as f64;
    for (i, &label) in labels.iter().enumerate() {
        let l = &logits[i * classes..(i + 1) * classes];
        let best = (0..classes).fold(0, |b, j| if l[j] > l[b] { j } else { b });
        let max = l[best].to_f64();
        let log_z = max
            + l.iter()
                .map(|&v| (v.to_f64() - max).exp())
                .sum::<f64>()
                .ln();
        score.loss_sum += log_z - l[label as usize].to_f64();
        score.correct += usize::from(best == label as usize);
        score.count += 1;
        if gradient {
            let g = &mut grad[i * classes..(i + 1) * classes];
            for (gv, &v) in g.iter_mut().zip(l) {
                *gv = <T as Float>::from_f64((v.to_f64() - log_z).exp() * scale);
            }
            g[label as usize] -= <T as Float>::from_f64(scale);
        }
    }
    (score, grad)
}
