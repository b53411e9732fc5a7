//! Small sequence models for the synthetic tasks, with the SSM layer and
//! the block architecture each chosen by one switch (paper Table 1):
//!
//! ```text
//! h = E[ids]                                                (BL, D)
//! per layer:  u = rmsnorm(h) · w_norm                       (BL, D)
//!   arch = mamba (gated):
//!             x = u W_inxᵀ,  z = u W_inzᵀ                    (BL, E) each
//!             v = silu(conv1d(x) + b_conv)                  (BL, E)
//!             s = ssm(v)                                    (BL, E)
//!             y = s ⊙ silu(z)
//!   arch = nogate (a single SSM, the S4 block shape):
//!             v = u W_inᵀ                                    (BL, E)
//!             s = ssm(v);   y = silu(s)
//!             h = h + y W_outᵀ                               (BL, D)
//! logits = rmsnorm(h) · w_f · Eᵀ                             (rows, V), tied head
//!
//! ssm = S6 (selective, docs/DESIGN.md §2.2):
//!             dt_low, B, C = v W_xᵀ  split [R, N, N]
//!             Δ = softplus(dt_low W_dtᵀ + b_dt);   A = -exp(A_log)
//!             h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t v_t;   s_t = C_t h_t + D v_t
//!     | S4D (time-invariant, docs/DESIGN.md §3): s = K̄ * v + D v with
//!             K̄ from (log_dt, A, B, C) fixed per channel: no dependence on v
//! ```
//! With arch = mamba and layer = S6 this is exactly the Mamba block of
//! [`crate::nn::Mamba`] (the gate applied after the scan instead of
//! inside it). The Hugging Face-compatible model is left untouched: these
//! models have their own parameter names and file (`task-model.json` +
//! `model.safetensors`).
//!
//! Three ways to run the same function: [`TaskModel::forward_train`] (whole
//! sequences from a zero state, keeping what the backward needs; S4D by
//! FFT convolution), [`TaskModel::forward_chunk`] (a chunk continuing from
//! a [`TaskState`], S6 by the scan from the carried state, S4D by its
//! recurrence: memory independent of the total length) and
//! [`TaskModel::step`] (one token, with the step kernels).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{check_len, invalid, Result};
use crate::float::Float;
use crate::io::{load_config_dir, save_config_dir};
use crate::kernels::{matmul_xwt, rms_norm_backward, rms_norm_forward, S4dInit, S4dParams};
use crate::nn::block::{
    Block, BlockCache, BlockGradients, BlockScalar, BlockShape, BlockStateMut, ChunkBuffers, Conv,
    Dense, Mixer, MixerGradients, StepBuffers, Values, S6,
};
use crate::nn::config::check_sizes;
use crate::rng::Rng;

/// Scalar types of the task models: those the matmul and FFT kernels take.
pub trait TaskScalar: BlockScalar {}
impl<T: BlockScalar> TaskScalar for T {}

pub use crate::nn::block::{BlockArch, SsmLayer};

/// Sizes and switches of a task model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layer: usize,
    /// N; for S4D (S4D-Lin) N/2 complex modes, so N must be even.
    pub d_state: usize,
    /// E = expand · d_model
    pub expand: usize,
    /// K, the causal convolution width (arch = mamba only).
    pub d_conv: usize,
    /// R, the rank of Δ's projection (S6 only): ceil(d_model / 16) by default.
    pub dt_rank: usize,
    pub layer: SsmLayer,
    pub arch: BlockArch,
    pub norm_eps: f64,
}

impl TaskModelConfig {
    /// The official defaults for the other sizes: N 16, expand 2, K 4,
    /// R = ceil(d_model / 16).
    pub fn new(
        vocab_size: usize,
        d_model: usize,
        n_layer: usize,
        layer: SsmLayer,
        arch: BlockArch,
    ) -> Self {
        Self {
            vocab_size,
            d_model,
            n_layer,
            d_state: 16,
            expand: 2,
            d_conv: 4,
            dt_rank: d_model.div_ceil(16),
            layer,
            arch,
            norm_eps: 1e-5,
        }
    }

    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }

    /// The sizes of each of its blocks.
    pub fn block_shape(&self) -> BlockShape {
        BlockShape {
            d_model: self.d_model,
            d_inner: self.d_inner(),
            d_state: self.d_state,
            d_conv: self.d_conv,
            dt_rank: self.dt_rank,
            norm_eps: self.norm_eps,
            ssd: None,
        }
    }

    /// The parameter count in u128, from the tensors of one block (whose
    /// shapes are products of two sizes that passed the first gate of
    /// [`check_sizes`]) times n_layer, plus the rest.
    fn parameter_count_wide(&self) -> u128 {
        let count = |c: &TaskModelConfig| -> u128 {
            tensor_infos(c)
                .iter()
                .map(|info| info.shape.iter().map(|&v| v as u128).product::<u128>())
                .sum()
        };
        let outside = count(&TaskModelConfig {
            n_layer: 0,
            ..*self
        });
        let one_block = count(&TaskModelConfig {
            n_layer: 1,
            ..*self
        }) - outside;
        outside + self.n_layer as u128 * one_block
    }

    pub fn validate(&self) -> Result<()> {
        const OP: &str = "TaskModelConfig";
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layer", self.n_layer),
            ("d_state", self.d_state),
            ("expand", self.expand),
        ] {
            if v == 0 {
                return Err(invalid(OP, format!("{name} must be at least 1")));
            }
        }
        // sizes a task-model.json gives pass the gate a config.json does
        // before a tree of n_layer blocks is built (or E = expand·D formed)
        let d_inner = self.d_model as u128 * self.expand as u128;
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layer", self.n_layer),
            ("d_state", self.d_state),
            ("expand", self.expand),
            ("d_conv", self.d_conv),
            ("dt_rank", self.dt_rank),
            ("d_inner", usize::try_from(d_inner).unwrap_or(usize::MAX)),
        ];
        check_sizes(OP, &sizes, || self.parameter_count_wide())?;
        if self.arch == BlockArch::Mamba && self.d_conv == 0 {
            return Err(invalid(OP, "d_conv must be at least 1 for the mamba block"));
        }
        if self.layer == SsmLayer::S6 && self.dt_rank == 0 {
            return Err(invalid(OP, "dt_rank must be at least 1 for the S6 layer"));
        }
        if self.layer == SsmLayer::S4d && !self.d_state.is_multiple_of(2) {
            return Err(invalid(
                OP,
                format!(
                    "the S4D layer (S4D-Lin, N/2 conjugate pairs) needs an even d_state, got {}",
                    self.d_state
                ),
            ));
        }
        if !(self.norm_eps > 0.0) {
            return Err(invalid(OP, "norm_eps must be positive"));
        }
        Ok(())
    }
}

/// Parameters of the S6 layer of one block.
#[derive(Clone, Debug, PartialEq)]
pub struct S6Params<T> {
    /// (R + 2N, E): rows give dt_low, B, C in that order.
    pub x_proj_weight: Vec<T>,
    /// (E, R)
    pub dt_proj_weight: Vec<T>,
    /// (E)
    pub dt_proj_bias: Vec<T>,
    /// (E, N): A = -exp(A_log)
    pub a_log: Vec<T>,
    /// (E)
    pub d: Vec<T>,
}

/// The SSM layer of one block.
#[derive(Clone, Debug, PartialEq)]
pub enum SsmParams<T> {
    S6(S6Params<T>),
    S4d(S4dParams<T>),
}

/// Parameters of one residual block.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockParams<T> {
    /// (D)
    pub norm_weight: Vec<T>,
    /// (2E, D) for arch = mamba (rows 0..E give x, E..2E give z); (E, D) for nogate.
    pub in_proj_weight: Vec<T>,
    /// (E, K); empty for nogate.
    pub conv1d_weight: Vec<T>,
    /// (E); empty for nogate.
    pub conv1d_bias: Vec<T>,
    pub ssm: SsmParams<T>,
    /// (D, E)
    pub out_proj_weight: Vec<T>,
}

/// Every parameter of a task model (also the shape of its gradients).
#[derive(Clone, Debug, PartialEq)]
pub struct TaskParams<T> {
    /// (V, D), also the output head (tied).
    pub embedding: Vec<T>,
    pub layers: Vec<BlockParams<T>>,
    /// (D)
    pub norm_f_weight: Vec<T>,
}

/// Name, shape and weight-decay group of one parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    /// Linear and conv kernels decay; A, D, Δ and S4D parameters, biases,
    /// norms and the embedding do not (the official grouping).
    pub decays: bool,
}

/// The one declaration of a task model's tree: every tensor's name, shape
/// and decay group beside the field that holds it. Expanded over `&` and
/// `&mut` (`[$($m)?]`, `$iter`); `$f(info, tensor)` for each tensor.
macro_rules! for_each_task_tensor {
    ($params:expr, $config:expr, [$($m:tt)?], $iter:ident, $f:expr) => {{
        let c: &TaskModelConfig = $config;
        let (d, e, n, r, k) = (c.d_model, c.d_inner(), c.d_state, c.dt_rank, c.d_conv);
        let p = $params;
        let mut f = $f;
        let mut t = |name: String, shape: Vec<usize>, decays: bool, tensor| {
            f(TensorInfo { name, shape, decays }, tensor)
        };
        t("embedding.weight".into(), vec![c.vocab_size, d], false, & $($m)? p.embedding);
        for (i, l) in p.layers.$iter().enumerate() {
            let pre = format!("layers.{i}");
            t(format!("{pre}.norm.weight"), vec![d], false, & $($m)? l.norm_weight);
            t(format!("{pre}.mixer.in_proj.weight"), vec![in_proj_rows(c), d], true, & $($m)? l.in_proj_weight);
            if c.arch == BlockArch::Mamba {
                t(format!("{pre}.mixer.conv1d.weight"), vec![e, k], true, & $($m)? l.conv1d_weight);
                t(format!("{pre}.mixer.conv1d.bias"), vec![e], false, & $($m)? l.conv1d_bias);
            }
            match & $($m)? l.ssm {
                SsmParams::S6(s) => {
                    t(format!("{pre}.mixer.x_proj.weight"), vec![r + 2 * n, e], true, & $($m)? s.x_proj_weight);
                    t(format!("{pre}.mixer.dt_proj.weight"), vec![e, r], true, & $($m)? s.dt_proj_weight);
                    t(format!("{pre}.mixer.dt_proj.bias"), vec![e], false, & $($m)? s.dt_proj_bias);
                    t(format!("{pre}.mixer.A_log"), vec![e, n], false, & $($m)? s.a_log);
                    t(format!("{pre}.mixer.D"), vec![e], false, & $($m)? s.d);
                }
                SsmParams::S4d(s) => {
                    let m = n / 2;
                    t(format!("{pre}.mixer.s4d.log_dt"), vec![e], false, & $($m)? s.log_dt);
                    t(format!("{pre}.mixer.s4d.log_a_real"), vec![e, m], false, & $($m)? s.log_a_real);
                    t(format!("{pre}.mixer.s4d.a_imag"), vec![e, m], false, & $($m)? s.a_imag);
                    t(format!("{pre}.mixer.s4d.b_re"), vec![e, m], false, & $($m)? s.b_re);
                    t(format!("{pre}.mixer.s4d.b_im"), vec![e, m], false, & $($m)? s.b_im);
                    t(format!("{pre}.mixer.s4d.c_re"), vec![e, m], false, & $($m)? s.c_re);
                    t(format!("{pre}.mixer.s4d.c_im"), vec![e, m], false, & $($m)? s.c_im);
                    t(format!("{pre}.mixer.s4d.D"), vec![e], false, & $($m)? s.d);
                }
            }
            t(format!("{pre}.mixer.out_proj.weight"), vec![d, e], true, & $($m)? l.out_proj_weight);
        }
        t("norm_f.weight".into(), vec![d], false, & $($m)? p.norm_f_weight);
    }};
}

impl<T> TaskParams<T> {
    /// The tree of `config` with every tensor empty (nothing allocated).
    fn skeleton(config: &TaskModelConfig) -> Self {
        let (e, n) = (config.d_inner(), config.d_state);
        TaskParams {
            embedding: Vec::new(),
            layers: (0..config.n_layer)
                .map(|_| BlockParams {
                    norm_weight: Vec::new(),
                    in_proj_weight: Vec::new(),
                    conv1d_weight: Vec::new(),
                    conv1d_bias: Vec::new(),
                    ssm: match config.layer {
                        SsmLayer::S6 => SsmParams::S6(S6Params {
                            x_proj_weight: Vec::new(),
                            dt_proj_weight: Vec::new(),
                            dt_proj_bias: Vec::new(),
                            a_log: Vec::new(),
                            d: Vec::new(),
                        }),
                        SsmLayer::S4d => SsmParams::S4d(S4dParams {
                            kind: S4dInit::Lin,
                            channels: e,
                            modes: n / 2,
                            log_dt: Vec::new(),
                            log_a_real: Vec::new(),
                            a_imag: Vec::new(),
                            b_re: Vec::new(),
                            b_im: Vec::new(),
                            c_re: Vec::new(),
                            c_im: Vec::new(),
                            d: Vec::new(),
                        }),
                    },
                    out_proj_weight: Vec::new(),
                })
                .collect(),
            norm_f_weight: Vec::new(),
        }
    }

    /// Every tensor with its name, shape and decay group, in a fixed order.
    pub fn tensors<'a>(&'a self, config: &TaskModelConfig) -> Vec<(TensorInfo, &'a [T])> {
        let mut out = Vec::new();
        for_each_task_tensor!(self, config, [], iter, |info, t: &'a Vec<T>| out
            .push((info, t.as_slice())));
        out
    }

    /// As [`Self::tensors`], mutably.
    pub fn tensors_mut<'a>(
        &'a mut self,
        config: &TaskModelConfig,
    ) -> Vec<(TensorInfo, &'a mut Vec<T>)> {
        let mut out = Vec::new();
        for_each_task_tensor!(self, config, [mut], iter_mut, |info, t: &'a mut Vec<T>| out
            .push((info, t)));
        out
    }
}

impl<T: TaskScalar> TaskParams<T> {
    /// Zeros in every tensor (a gradient accumulator), every size from the
    /// declaration above.
    pub fn zeros(config: &TaskModelConfig) -> Self {
        let mut p = Self::skeleton(config);
        for (info, t) in p.tensors_mut(config) {
            t.resize(info.shape.iter().product(), T::ZERO);
        }
        p
    }

    /// Number of scalars.
    pub fn count(&self, config: &TaskModelConfig) -> usize {
        self.tensors(config).iter().map(|(_, t)| t.len()).sum()
    }
}

/// Rows of in_proj: 2E (x and z) for the mamba block, E for nogate.
fn in_proj_rows(config: &TaskModelConfig) -> usize {
    match config.arch {
        BlockArch::Mamba => 2 * config.d_inner(),
        BlockArch::Nogate => config.d_inner(),
    }
}

/// Names, shapes and decay groups of every tensor, in the order of
/// [`TaskParams::tensors`] (nothing allocated).
pub fn tensor_infos(config: &TaskModelConfig) -> Vec<TensorInfo> {
    let skeleton = TaskParams::<f32>::skeleton(config);
    skeleton
        .tensors(config)
        .into_iter()
        .map(|(info, _)| info)
        .collect()
}

impl crate::train::ParamTree for TaskParams<f32> {
    type Config = TaskModelConfig;
    fn tensors_with_decay(&self, config: &TaskModelConfig) -> Vec<(bool, &[f32])> {
        self.tensors(config)
            .into_iter()
            .map(|(info, t)| (info.decays, t))
            .collect()
    }
    fn tensor_slices_mut(&mut self, config: &TaskModelConfig) -> Vec<&mut [f32]> {
        self.tensors_mut(config)
            .into_iter()
            .map(|(_, t)| t.as_mut_slice())
            .collect()
    }
    fn zeros_of(config: &TaskModelConfig) -> Self {
        TaskParams::zeros(config)
    }
    fn expected_sizes(config: &TaskModelConfig) -> Vec<(String, usize)> {
        tensor_infos(config)
            .into_iter()
            .map(|info| (info.name, info.shape.iter().product()))
            .collect()
    }
}

/// A task model: configuration and parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskModel<T> {
    pub config: TaskModelConfig,
    pub params: TaskParams<T>,
}

/// What [`TaskModel::forward_train`] keeps for [`TaskModel::backward`].
pub struct TaskCache<T> {
    batch: usize,
    len: usize,
    blocks: Vec<BlockCache<T>>,
    /// the residual stream after the last block (BL, D)
    h_last: Vec<T>,
    /// rmsnorm(h_last) · w_f (BL, D)
    h_normed: Vec<T>,
}

impl<T> TaskCache<T> {
    /// rmsnorm(h) · w_f after the last block, (batch, len, d_model).
    pub fn final_hidden(&self) -> &[T] {
        &self.h_normed
    }
}

/// The recurrent state of a batch of sequences: constant in size whatever
/// the length read so far.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskState<T> {
    pub batch: usize,
    /// Tokens read so far.
    pub position: usize,
    pub blocks: Vec<BlockState<T>>,
}

/// One block's state.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockState<T> {
    /// The last K pre-conv inputs, (batch, E, K); empty for nogate.
    pub conv: Vec<T>,
    /// S6: h (batch, E, N). S4D: h (batch, E, N/2, 2) (complex modes).
    pub ssm: Vec<T>,
}

impl<T: TaskScalar> BlockParams<T> {
    /// This block as a [`Block`] of `config`'s shape.
    pub fn block(&self, config: &TaskModelConfig) -> Result<Block<'_, T, Dense<'_, T>>> {
        let c = config;
        let (d, e, n, r) = (c.d_model, c.d_inner(), c.d_state, c.dt_rank);
        let mixer = match &self.ssm {
            SsmParams::S6(p) => Mixer::S6(S6 {
                x_proj: Dense::new(&p.x_proj_weight, r + 2 * n, e),
                dt_proj: Dense::new(&p.dt_proj_weight, e, r),
                dt_bias: &p.dt_proj_bias,
                a: Values::Owned(p.a_log.iter().map(|&v| -v.exp()).collect()),
                d: &p.d,
                dt_bc_rms_eps: None,
            }),
            SsmParams::S4d(p) => Mixer::S4d(p),
        };
        let block = Block {
            shape: c.block_shape(),
            norm_weight: &self.norm_weight,
            norm_bias: None,
            in_proj: Dense::new(&self.in_proj_weight, in_proj_rows(c), d),
            in_proj_bias: None,
            conv: (c.arch == BlockArch::Mamba).then_some(Conv {
                weight: &self.conv1d_weight,
                bias: Some(&self.conv1d_bias),
            }),
            mixer,
            out_proj: Dense::new(&self.out_proj_weight, d, e),
            out_proj_bias: None,
        };
        block.validate()?;
        Ok(block)
    }

    /// Moves one block's gradients into this place of a gradient tree.
    fn set_gradients(&mut self, g: BlockGradients<T>) -> Result<()> {
        self.norm_weight = g.norm_weight;
        self.in_proj_weight = g.in_proj_weight;
        self.conv1d_weight = g.conv_weight;
        self.conv1d_bias = g.conv_bias.unwrap_or_default();
        self.out_proj_weight = g.out_proj_weight;
        match (&mut self.ssm, g.mixer) {
            (
                SsmParams::S6(p),
                MixerGradients::S6 {
                    x_proj_weight,
                    dt_proj_weight,
                    dt_proj_bias,
                    a_log,
                    d,
                },
            ) => {
                p.x_proj_weight = x_proj_weight;
                p.dt_proj_weight = dt_proj_weight;
                p.dt_proj_bias = dt_proj_bias;
                p.a_log = a_log;
                p.d = d;
            }
            (SsmParams::S4d(p), MixerGradients::S4d(sg)) => {
                p.log_dt = sg.log_dt;
                p.log_a_real = sg.log_a_real;
                p.a_imag = sg.a_imag;
                p.b_re = sg.b_re;
                p.b_im = sg.b_im;
                p.c_re = sg.c_re;
                p.c_im = sg.c_im;
                p.d = sg.d;
            }
            _ => {
                return Err(invalid(
                    "TaskModel::backward",
                    "gradient tree of another layer type",
                ))
            }
        }
        Ok(())
    }
}

impl<T: TaskScalar> TaskModel<T> {
    /// A freshly initialised model: the official Mamba initialisation
    /// (docs/DESIGN.md §8; S4D-Lin §3.6) for the block, `s4d.py`'s S4D-Lin for S4D layers.
    pub fn init(config: TaskModelConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (d, e, n, r, k) = (c.d_model, c.d_inner(), c.d_state, c.dt_rank, c.d_conv);
        let mut rng = Rng::new(seed);
        let mut p = TaskParams::<T>::zeros(c);
        // kaiming_uniform(a=√5): U(±1/sqrt(fan_in))
        let uniform = |rng: &mut Rng, len: usize, bound: f64| -> Vec<T> {
            rng.vec(len, |r| r.uniform_in(-bound, bound))
        };
        p.embedding = rng.vec(c.vocab_size * d, |r| r.normal() * 0.02);
        for layer in p.layers.iter_mut() {
            layer.norm_weight = vec![T::ONE; d];
            layer.in_proj_weight = uniform(&mut rng, in_proj_rows(c) * d, 1.0 / (d as f64).sqrt());
            if c.arch == BlockArch::Mamba {
                layer.conv1d_weight = uniform(&mut rng, e * k, 1.0 / (k as f64).sqrt());
                layer.conv1d_bias = uniform(&mut rng, e, 1.0 / (k as f64).sqrt());
            }
            layer.ssm = match c.layer {
                SsmLayer::S6 => SsmParams::S6(S6Params {
                    x_proj_weight: uniform(&mut rng, (r + 2 * n) * e, 1.0 / (e as f64).sqrt()),
                    dt_proj_weight: uniform(&mut rng, e * r, 1.0 / (r as f64).sqrt()),
                    dt_proj_bias: rng.vec(e, |rng| {
                        let dt = rng.uniform_in(0.001f64.ln(), 0.1f64.ln()).exp().max(1e-4);
                        dt + (-(-dt).exp_m1()).ln() // softplus⁻¹(dt)
                    }),
                    a_log: (0..e * n)
                        .map(|i| <T as Float>::from_f64(((i % n) as f64 + 1.0).ln()))
                        .collect(),
                    d: vec![T::ONE; e],
                }),
                SsmLayer::S4d => {
                    SsmParams::S4d(S4dParams::init(S4dInit::Lin, e, n, rng.next_u64())?)
                }
            };
            let out_bound = 1.0 / (e as f64).sqrt();
            let scale = 1.0 / (c.n_layer as f64).sqrt();
            layer.out_proj_weight = rng.vec(d * e, |r| r.uniform_in(-out_bound, out_bound) * scale);
        }
        p.norm_f_weight = vec![T::ONE; d];
        Ok(Self { config, params: p })
    }

    /// Number of parameters.
    pub fn parameter_count(&self) -> usize {
        self.params.count(&self.config)
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
        Ok(())
    }

    /// h = E[ids]  (BL, D)
    fn embed(&self, ids: &[u32]) -> Vec<T> {
        crate::kernels::embedding_forward(&self.params.embedding, ids, self.config.d_model)
    }

    fn rms_norm(&self, x: &[T], w: &[T]) -> Result<Vec<T>> {
        let mut y = vec![T::ZERO; x.len()];
        rms_norm_forward(
            x,
            w,
            self.config.d_model,
            <T as Float>::from_f64(self.config.norm_eps),
            &mut y,
        )?;
        Ok(y)
    }

    /// Logits (rows, V) of final hidden rows (rows, D): the tied head.
    pub fn logits_from_hidden(&self, hidden: &[T]) -> Result<Vec<T>> {
        let (d, v) = (self.config.d_model, self.config.vocab_size);
        if hidden.len() % d != 0 {
            return Err(invalid(
                "TaskModel::logits_from_hidden",
                format!("{} values are not rows of d_model={d}", hidden.len()),
            ));
        }
        let rows = hidden.len() / d;
        let mut logits = vec![T::ZERO; rows * v];
        matmul_xwt(
            hidden,
            &self.params.embedding,
            rows,
            d,
            v,
            &mut logits,
            false,
        )?;
        Ok(logits)
    }

    /// Logits (batch, len, V) of whole sequences from a zero state.
    pub fn forward(&self, ids: &[u32], batch: usize, len: usize) -> Result<Vec<T>> {
        let cache = self.forward_inner(ids, batch, len, false)?;
        self.logits_from_hidden(&cache.h_normed)
    }

    /// Forward over whole sequences that keeps what [`Self::backward`] needs.
    /// The final hidden states are in [`TaskCache::final_hidden`].
    pub fn forward_train(&self, ids: &[u32], batch: usize, len: usize) -> Result<TaskCache<T>> {
        self.forward_inner(ids, batch, len, true)
    }

    fn forward_inner(
        &self,
        ids: &[u32],
        batch: usize,
        len: usize,
        keep: bool,
    ) -> Result<TaskCache<T>> {
        self.check_ids("TaskModel::forward", ids, batch, len)?;
        self.forward_blocks(self.embed(ids), batch, len, keep)
    }

    /// The blocks and the final norm over input rows `h0` (batch, len, D)
    /// given directly instead of E[ids]: a model whose inputs are not
    /// tokens (a [`crate::tasks::SequenceClassifier`] over real-valued
    /// vectors) projects them to `h0` itself. The final hidden states are
    /// in [`TaskCache::final_hidden`]; with `keep`, the cache also holds
    /// what [`Self::backward_to_input`] needs.
    pub fn forward_from_input(
        &self,
        h0: Vec<T>,
        batch: usize,
        len: usize,
        keep: bool,
    ) -> Result<TaskCache<T>> {
        const OP: &str = "TaskModel::forward_from_input";
        if batch == 0 || len == 0 {
            return Err(invalid(OP, "batch and len must be at least 1"));
        }
        let d = self.config.d_model;
        check_len(
            OP,
            "h0",
            &h0,
            &[("batch", batch), ("len", len), ("d_model", d)],
        )?;
        self.forward_blocks(h0, batch, len, keep)
    }

    fn forward_blocks(
        &self,
        mut h: Vec<T>,
        batch: usize,
        len: usize,
        keep: bool,
    ) -> Result<TaskCache<T>> {
        let mut blocks = Vec::with_capacity(self.config.n_layer);
        let mut bufs = ChunkBuffers::default();
        for layer in &self.params.layers {
            let block = layer.block(&self.config)?;
            if keep {
                blocks.push(block.forward_train(&mut h, batch, len)?);
            } else {
                block.forward(&mut h, batch, len, None, &mut bufs, false)?;
            }
        }
        let h_normed = self.rms_norm(&h, &self.params.norm_f_weight)?;
        Ok(TaskCache {
            batch,
            len,
            blocks,
            h_last: if keep { h } else { Vec::new() },
            h_normed,
        })
    }

    /// A zero state for `batch` sequences.
    pub fn zero_state(&self, batch: usize) -> TaskState<T> {
        let c = &self.config;
        let e = c.d_inner();
        let blocks = (0..c.n_layer)
            .map(|_| BlockState {
                conv: match c.arch {
                    BlockArch::Mamba => vec![T::ZERO; batch * e * c.d_conv],
                    BlockArch::Nogate => Vec::new(),
                },
                ssm: vec![T::ZERO; batch * e * c.d_state],
            })
            .collect();
        TaskState {
            batch,
            position: 0,
            blocks,
        }
    }

    fn check_state(&self, op: &'static str, state: &TaskState<T>, batch: usize) -> Result<()> {
        let want = self.zero_state(state.batch);
        let fits = state.batch == batch
            && state.blocks.len() == want.blocks.len()
            && state
                .blocks
                .iter()
                .zip(&want.blocks)
                .all(|(a, b)| a.conv.len() == b.conv.len() && a.ssm.len() == b.ssm.len());
        if state.batch != batch {
            return Err(invalid(
                op,
                format!(
                    "{batch} sequences of ids for a state of batch {}",
                    state.batch
                ),
            ));
        }
        if !fits {
            return Err(invalid(
                op,
                format!("the state is not one of this model for batch={batch}: its blocks' sizes differ (make it with zero_state)"),
            ));
        }
        Ok(())
    }

    /// Final hidden states (batch, len, D) of a chunk of tokens (batch,
    /// len) that continues the sequences of `state`, which is advanced past
    /// the chunk. Memory is that of one chunk, whatever the total length.
    pub fn forward_chunk(
        &self,
        state: &mut TaskState<T>,
        ids: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        const OP: &str = "TaskModel::forward_chunk";
        self.check_ids(OP, ids, batch, len)?;
        self.check_state(OP, state, batch)?;
        let mut h = self.embed(ids);
        let mut bufs = ChunkBuffers::default();
        for (layer, st) in self.params.layers.iter().zip(state.blocks.iter_mut()) {
            let st = BlockStateMut {
                conv: &mut st.conv,
                ssm: &mut st.ssm,
            };
            layer
                .block(&self.config)?
                .forward(&mut h, batch, len, Some(st), &mut bufs, false)?;
        }
        state.position += len;
        self.rms_norm(&h, &self.params.norm_f_weight)
    }

    /// Gradients of every parameter, given dL/d(final hidden) (batch, len, D)
    /// for the sequences of `cache` (from [`Self::forward_train`] on `ids`).
    pub fn backward(
        &self,
        ids: &[u32],
        cache: &TaskCache<T>,
        d_hidden: &[T],
    ) -> Result<TaskParams<T>> {
        const OP: &str = "TaskModel::backward";
        let rows = cache.batch * cache.len;
        check_len(OP, "ids", ids, &[("rows", rows)])?;
        let (mut g, dh) = self.backward_to_input(cache, d_hidden)?;
        // h = E[ids]
        crate::kernels::embedding_backward(ids, &dh, self.config.d_model, &mut g.embedding);
        Ok(g)
    }

    /// Gradients of the blocks and the final norm (the embedding's left at
    /// zero) and dL/dh0 (batch, len, D), the gradient of the input rows,
    /// given dL/d(final hidden) for the sequences of `cache`.
    pub fn backward_to_input(
        &self,
        cache: &TaskCache<T>,
        d_hidden: &[T],
    ) -> Result<(TaskParams<T>, Vec<T>)> {
        const OP: &str = "TaskModel::backward";
        let c = &self.config;
        let d = c.d_model;
        let rows = cache.batch * cache.len;
        check_len(OP, "d_hidden", d_hidden, &[("rows", rows), ("d_model", d)])?;
        if cache.h_last.is_empty() {
            return Err(invalid(
                OP,
                "the cache holds nothing: make it with forward_train",
            ));
        }
        let mut g = TaskParams::<T>::zeros(c);
        let eps = <T as Float>::from_f64(c.norm_eps);
        let ng = rms_norm_backward(&cache.h_last, &self.params.norm_f_weight, d, eps, d_hidden)?;
        g.norm_f_weight = ng.weight;
        let mut dh = ng.x;
        for (i, layer) in self.params.layers.iter().enumerate().rev() {
            let grads =
                layer
                    .block(c)?
                    .backward(&cache.blocks[i], cache.batch, cache.len, &mut dh)?;
            g.layers[i].set_gradients(grads)?;
        }
        Ok((g, dh))
    }

    /// One token for every sequence of `state` (ids_t: (batch)): returns the
    /// final hidden (batch, D) and advances the state. The step kernels
    /// (conv shift, one scan step, one S4D step) on the caller's thread.
    /// For many steps, [`TaskModel::stepper`] builds the blocks and buffers
    /// once.
    pub fn step(&self, state: &mut TaskState<T>, ids_t: &[u32]) -> Result<Vec<T>> {
        self.stepper(ids_t.len())?.step(state, ids_t)
    }

    /// The blocks (with A = −exp(A_log) computed) and the step buffers for
    /// `batch` sequences, to take many steps with.
    pub fn stepper(&self, batch: usize) -> Result<TaskStepper<'_, T>> {
        let blocks = self
            .params
            .layers
            .iter()
            .map(|layer| layer.block(&self.config))
            .collect::<Result<Vec<_>>>()?;
        Ok(TaskStepper {
            model: self,
            blocks,
            buffers: StepBuffers::new(&self.config.block_shape(), batch),
            batch,
        })
    }

    /// Writes `dir/task-model.json` (the configuration) and
    /// `dir/model.safetensors` (f32), each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tensors = self
            .params
            .tensors(&self.config)
            .into_iter()
            .map(|(info, data)| (info.name, info.shape, data))
            .collect();
        save_config_dir(dir, CONFIG_FILE, &self.config, tensors)
    }

    /// Loads what [`Self::save`] wrote, checking every name and shape.
    pub fn load(dir: &Path) -> Result<Self> {
        let (config, tensors) = load_config_dir::<T, TaskModelConfig>(
            dir,
            CONFIG_FILE,
            "a task model configuration",
            |c| c.validate(),
            |c| {
                tensor_infos(c)
                    .into_iter()
                    .map(|info| (info.name, info.shape))
                    .collect()
            },
        )?;
        let mut params = TaskParams::<T>::skeleton(&config);
        for ((_, dst), t) in params.tensors_mut(&config).into_iter().zip(tensors) {
            *dst = t;
        }
        Ok(Self { config, params })
    }
}

/// The configuration file of a saved task model.
pub const CONFIG_FILE: &str = "task-model.json";

/// A task model's blocks and step buffers for `batch` sequences
/// ([`TaskModel::stepper`]): each [`TaskStepper::step`] is one token.
pub struct TaskStepper<'a, T: TaskScalar> {
    model: &'a TaskModel<T>,
    blocks: Vec<Block<'a, T, Dense<'a, T>>>,
    buffers: StepBuffers<T>,
    batch: usize,
}

impl<T: TaskScalar> TaskStepper<'_, T> {
    /// As [`TaskModel::step`]: ids_t (batch) → the final hidden (batch, D).
    pub fn step(&mut self, state: &mut TaskState<T>, ids_t: &[u32]) -> Result<Vec<T>> {
        const OP: &str = "TaskModel::step";
        let model = self.model;
        let batch = ids_t.len();
        model.check_ids(OP, ids_t, batch.max(1), 1)?;
        model.check_state(OP, state, batch)?;
        if batch != self.batch {
            return Err(invalid(
                OP,
                format!("{batch} ids for a stepper of batch {}", self.batch),
            ));
        }
        let c = &model.config;
        let (e, n, k) = (c.d_inner(), c.d_state, c.d_conv);
        let mut h = model.embed(ids_t);
        for (block, st) in self.blocks.iter().zip(state.blocks.iter_mut()) {
            // one state per sequence: (E, K) of conv (none for nogate) and (E, N)
            let conv_len = if st.conv.is_empty() { 0 } else { e * k };
            let mut conv_rest = st.conv.as_mut_slice();
            let mut states = Vec::with_capacity(batch);
            for ssm in st.ssm.chunks_mut(e * n) {
                let (conv, rest) = std::mem::take(&mut conv_rest).split_at_mut(conv_len);
                conv_rest = rest;
                states.push(BlockStateMut { conv, ssm });
            }
            block.step(&mut h, &mut states, &mut self.buffers)?;
        }
        state.position += 1;
        model.rms_norm(&h, &model.params.norm_f_weight)
    }
}
