//! AdamW (Loshchilov & Hutter; PyTorch's `torch.optim.AdamW`) over any
//! parameter tree ([`ParamTree`]: the language model's [`MambaParams`], the
//! task models' parameters), with the official parameter groups
//! (docs/DESIGN.md §11.2): weight decay on the matrices of linear layers
//! and the conv kernel only, not on A_log, D, biases, norm weights or the
//! embedding. Global-norm gradient clipping as
//! `torch.nn.utils.clip_grad_norm_`. One optimiser and one clipper serve
//! every model.

use crate::error::{invalid, Result};
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

/// A tree of f32 tensors shaped by a configuration: a model's parameters,
/// its gradients, or AdamW's moments. Every tree lists its tensors in one
/// fixed order, so that trees of one configuration zip tensor by tensor.
pub trait ParamTree: Sized {
    type Config;
    /// Every tensor, with whether weight decay applies to it.
    fn tensors_with_decay(&self, config: &Self::Config) -> Vec<(bool, &[f32])>;
    /// Every tensor, mutably, in the same order.
    fn tensor_slices_mut(&mut self, config: &Self::Config) -> Vec<&mut [f32]>;
    /// A tree of zeros of `config`'s shapes.
    fn zeros_of(config: &Self::Config) -> Self;
    /// Every tensor's name and element count as `config` implies them, in
    /// the same order.
    fn expected_sizes(config: &Self::Config) -> Vec<(String, usize)>;

    /// An error naming the first tensor whose size is not what `config`
    /// implies (a tree of another configuration), as the `what` of `op`.
    fn check_fits(&self, config: &Self::Config, op: &'static str, what: &str) -> Result<()> {
        let expected = Self::expected_sizes(config);
        let held = self.tensors_with_decay(config);
        if held.len() != expected.len() {
            return Err(invalid(
                op,
                format!(
                    "the {what} hold {} tensors; the configuration has {}",
                    held.len(),
                    expected.len()
                ),
            ));
        }
        for ((name, want), (_, t)) in expected.iter().zip(&held) {
            if t.len() != *want {
                return Err(invalid(
                    op,
                    format!("{what}: {name} has {} values, expected {want}", t.len()),
                ));
            }
        }
        Ok(())
    }
}

impl ParamTree for MambaParams<f32> {
    type Config = MambaConfig;
    fn tensors_with_decay(&self, config: &MambaConfig) -> Vec<(bool, &[f32])> {
        self.tensors(config)
            .into_iter()
            .map(|(info, t)| (decays(&info), t.as_slice()))
            .collect()
    }
    fn tensor_slices_mut(&mut self, config: &MambaConfig) -> Vec<&mut [f32]> {
        self.tensors_mut(config)
            .into_iter()
            .map(|(_, t)| t.as_mut_slice())
            .collect()
    }
    fn zeros_of(config: &MambaConfig) -> Self {
        MambaParams::zeros(config)
    }
    fn expected_sizes(config: &MambaConfig) -> Vec<(String, usize)> {
        MambaParams::<f32>::infos(config)
            .into_iter()
            .map(|info| (info.name, info.shape.iter().product()))
            .collect()
    }
}

/// AdamW's state: the first and second moments, in trees shaped like the
/// parameters, and the number of updates taken (for bias correction).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW<P = MambaParams<f32>> {
    pub config: AdamWConfig,
    /// Updates taken so far.
    pub step: u64,
    /// First moment m (same shapes as the parameters).
    pub m: P,
    /// Second moment v.
    pub v: P,
}

impl<P: ParamTree> AdamW<P> {
    /// Zero moments for a model of `model_config`.
    pub fn new(model_config: &P::Config, config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            m: P::zeros_of(model_config),
            v: P::zeros_of(model_config),
        }
    }

    /// One update with learning rate `lr`, as PyTorch's AdamW
    /// ([`AdamWStep::apply`] on each tensor):
    /// ```text
    /// p ← p − lr·λ·p                         (decayed groups only)
    /// m ← β1 m + (1 − β1) g;   v ← β2 v + (1 − β2) g²
    /// p ← p − lr · (m / (1 − β1ᵗ)) / (sqrt(v / (1 − β2ᵗ)) + ε)
    /// ```
    /// The parameters, gradients and moments must all have `model_config`'s
    /// shapes; if not, nothing changes and the error names the tensor.
    pub fn update(
        &mut self,
        model_config: &P::Config,
        params: &mut P,
        grads: &P,
        lr: f64,
    ) -> Result<()> {
        const OP: &str = "AdamW::update";
        params.check_fits(model_config, OP, "parameters")?;
        grads.check_fits(model_config, OP, "gradients")?;
        self.m.check_fits(model_config, OP, "first moments")?;
        self.v.check_fits(model_config, OP, "second moments")?;
        self.step += 1;
        let step = AdamWStep::new(&self.config, self.step, lr);
        let tensors = params
            .tensor_slices_mut(model_config)
            .into_iter()
            .zip(grads.tensors_with_decay(model_config))
            .zip(self.m.tensor_slices_mut(model_config))
            .zip(self.v.tensor_slices_mut(model_config));
        for (((p, (decays, g)), m), v) in tensors {
            step.apply(decays, p, g, m, v);
        }
        Ok(())
    }
}

/// The scalars of update number t (from 1) at learning rate lr, folded in
/// f64 once, for [`AdamWStep::apply`] on each tensor. Shared by every
/// parameter tree (the language model's and the task models').
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamWStep {
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
    /// The four slices have one length (the trees are checked first).
    fn apply(&self, decays: bool, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        debug_assert!(p.len() == g.len() && p.len() == m.len() && p.len() == v.len());
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
pub fn global_norm<P: ParamTree>(config: &P::Config, grads: &P) -> f64 {
    grads
        .tensors_with_decay(config)
        .iter()
        .flat_map(|(_, g)| g.iter())
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt()
}

/// Scales the gradients so that their global norm is at most `max_norm`
/// (PyTorch: factor max_norm / (norm + 1e-6) when below 1); returns the
/// norm before clipping. A non-finite norm leaves the gradients as they are.
pub fn clip_global_norm<P: ParamTree>(config: &P::Config, grads: &mut P, max_norm: f64) -> f64 {
    clip_tensors_global_norm(grads.tensor_slices_mut(config), max_norm)
}

/// a += b, tensor by tensor (both of `config`'s shapes, or an error and
/// no change).
pub fn add_into<P: ParamTree>(config: &P::Config, a: &mut P, b: &P) -> Result<()> {
    a.check_fits(config, "add_into", "sum")?;
    b.check_fits(config, "add_into", "addend")?;
    for (a, (_, b)) in a
        .tensor_slices_mut(config)
        .into_iter()
        .zip(b.tensors_with_decay(config))
    {
        a.iter_mut().zip(b.iter()).for_each(|(x, &y)| *x += y);
    }
    Ok(())
}
