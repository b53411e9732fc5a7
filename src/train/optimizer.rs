//! AdamW (Loshchilov & Hutter; PyTorch's `torch.optim.AdamW`) over a
//! [`MambaParams`] tree, with the official parameter groups (docs/DESIGN.md
//! §11.2): weight decay on the matrices of linear layers and the conv
//! kernel only, not on A_log, D, biases, norm weights or the embedding.
//! Global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_`.

use crate::nn::{MambaConfig, MambaParams, ParamInfo, ParamKind};

/// The hyper-parameters that stay fixed through a run (the learning rate
/// comes from the schedule at every step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The paper's values: betas (0.9, 0.95), weight decay 0.1; eps as PyTorch.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// Whether weight decay applies to a parameter: only to [`ParamKind::Weight`]
/// (linear and conv kernels, and an untied head).
pub fn decays(info: &ParamInfo) -> bool {
    info.kind == ParamKind::Weight
}

/// AdamW's state: the first and second moments, in trees shaped like the
/// parameters, and the number of updates taken (for bias correction).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates taken so far.
    pub step: u64,
    /// First moment m (same shapes as the parameters).
    pub m: MambaParams<f32>,
    /// Second moment v.
    pub v: MambaParams<f32>,
}

impl AdamW {
    /// Zero moments shaped like `params`.
    pub fn new(params: &MambaParams<f32>, config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            m: params.filled(0.0f32),
            v: params.filled(0.0f32),
        }
    }

    /// One update with learning rate `lr`, as PyTorch's AdamW:
    /// ```text
    /// p ← p − lr·λ·p                         (decayed groups only)
    /// m ← β1 m + (1 − β1) g;   v ← β2 v + (1 − β2) g²
    /// p ← p − lr · (m / (1 − β1ᵗ)) / (sqrt(v / (1 − β2ᵗ)) + ε)
    /// ```
    pub fn update(
        &mut self,
        config: &MambaConfig,
        params: &mut MambaParams<f32>,
        grads: &MambaParams<f32>,
        lr: f64,
    ) {
        self.step += 1;
        let step = AdamWStep::new(&self.config, self.step, lr);
        let tensors = params
            .tensors_mut(config)
            .into_iter()
            .zip(grads.tensors(config))
            .zip(self.m.tensors_mut(config))
            .zip(self.v.tensors_mut(config));
        for ((((info, p), (_, g)), (_, m)), (_, v)) in tensors {
            step.apply(decays(&info), p, g, m, v);
        }
    }
}

/// The scalars of update number t (from 1) at learning rate lr, folded in
/// f64 once, for [`AdamWStep::apply`] on each tensor. Shared by every
/// parameter tree (the language model's and the task models').
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// lr / (1 − β1ᵗ)
    step_size: f32,
    /// 1 / sqrt(1 − β2ᵗ)
    inv_sqrt_bias2: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    /// 1 − lr·λ, for the decayed tensors
    decay_keep: f32,
}

impl AdamWStep {
    pub fn new(config: &AdamWConfig, t: u64, lr: f64) -> Self {
        let t = t as i32;
        Self {
            step_size: (lr / (1.0 - config.beta1.powi(t))) as f32,
            inv_sqrt_bias2: (1.0 / (1.0 - config.beta2.powi(t)).sqrt()) as f32,
            b1: config.beta1 as f32,
            b2: config.beta2 as f32,
            eps: config.eps as f32,
            decay_keep: (1.0 - lr * config.weight_decay) as f32,
        }
    }

    /// The update of one tensor p with its gradient g and moments m, v, per
    /// element in f32:
    /// ```text
    /// p ← p − lr·λ·p                         (if decays)
    /// m ← β1 m + (1 − β1) g;   v ← β2 v + (1 − β2) g²
    /// p ← p − lr · (m / (1 − β1ᵗ)) / (sqrt(v / (1 − β2ᵗ)) + ε)
    /// ```
    pub fn apply(&self, decays: bool, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let keep = if decays { self.decay_keep } else { 1.0 };
        let (b1, b2) = (self.b1, self.b2);
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *p *= keep;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= self.step_size * *m / (v.sqrt() * self.inv_sqrt_bias2 + self.eps);
        }
    }
}

/// Clips gradient tensors, as `torch.nn.utils.clip_grad_norm_`: sqrt(Σ g²)
/// over all of them accumulated in f64, then each scaled by max_norm /
/// (norm + 1e-6) when that is below 1. Returns the norm before clipping; a
/// non-finite norm leaves the gradients as they are.
pub fn clip_tensors_global_norm(mut grads: Vec<&mut [f32]>, max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt();
    let factor = max_norm / (norm + 1e-6);
    if norm.is_finite() && factor < 1.0 {
        for g in grads.iter_mut() {
            g.iter_mut().for_each(|x| *x *= factor as f32);
        }
    }
    norm
}

/// sqrt(Σ g²) over every gradient, accumulated in f64 (NaN or infinite if
/// any gradient is).
pub fn global_norm(config: &MambaConfig, grads: &MambaParams<f32>) -> f64 {
    grads
        .tensors(config)
        .iter()
        .flat_map(|(_, g)| g.iter())
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt()
}

/// Scales the gradients so that their global norm is at most `max_norm`
/// (PyTorch: factor max_norm / (norm + 1e-6) when below 1); returns the
/// norm before clipping. A non-finite norm leaves the gradients as they are.
pub fn clip_global_norm(config: &MambaConfig, grads: &mut MambaParams<f32>, max_norm: f64) -> f64 {
    let tensors = grads
        .tensors_mut(config)
        .into_iter()
        .map(|(_, g)| g.as_mut_slice())
        .collect();
    clip_tensors_global_norm(tensors, max_norm)
}

/// a += b, tensor by tensor.
pub fn add_into(config: &MambaConfig, a: &mut MambaParams<f32>, b: &MambaParams<f32>) {
    for ((_, a), (_, b)) in a.tensors_mut(config).into_iter().zip(b.tensors(config)) {
        a.iter_mut().zip(b.iter()).for_each(|(x, &y)| *x += y);
    }
}
