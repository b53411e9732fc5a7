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

use crate::error::{check_len, invalid, Error, Result};
use crate::float::Float;
use crate::io::{encode, write_atomically, write_safetensors, DType};
use crate::io::{SafetensorsFile, TensorSource};
use crate::kernels::{
    causal_conv1d_backward, causal_conv1d_forward, causal_conv1d_forward_continuing,
    causal_conv1d_step, matmul_xtw, matmul_xw, matmul_xwt, rms_norm_backward, rms_norm_forward,
    s4d_backward_conv, s4d_forward_conv, selective_scan_backward, selective_scan_forward,
    selective_scan_step, ConvShape, FftFloat, MatmulScalar, S4dGrads, S4dInit, S4dParams,
    ScanInputs, ScanOptions, ScanShape, ScanStepInputs,
};
use crate::rng::Rng;

/// Scalar types of the task models: those the matmul and FFT kernels take.
pub trait TaskScalar: MatmulScalar + FftFloat {}
impl<T: MatmulScalar + FftFloat> TaskScalar for T {}

/// The sequence-mixing layer inside each block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SsmLayer {
    /// Selective: Δ, B, C computed from the input at every position.
    S6,
    /// Linear time-invariant diagonal SSM (S4D-Lin initialisation).
    S4d,
}

/// The block around the SSM layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockArch {
    /// The Mamba block: in_proj to (x, z), conv1d + silu, SSM, gate silu(z), out_proj.
    Mamba,
    /// A single SSM without gate or conv: in_proj, SSM, silu, out_proj.
    Nogate,
}

impl SsmLayer {
    pub fn name(self) -> &'static str {
        match self {
            SsmLayer::S6 => "s6",
            SsmLayer::S4d => "s4d",
        }
    }
}

impl BlockArch {
    pub fn name(self) -> &'static str {
        match self {
            BlockArch::Mamba => "mamba",
            BlockArch::Nogate => "nogate",
        }
    }
}

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

impl<T: TaskScalar> TaskParams<T> {
    /// Every tensor with its name, shape and decay group, in a fixed order.
    pub fn tensors(&self, config: &TaskModelConfig) -> Vec<(TensorInfo, &[T])> {
        let mut out = Vec::new();
        let shapes = tensor_infos(config);
        let mut data: Vec<&[T]> = vec![&self.embedding];
        for l in &self.layers {
            data.push(&l.norm_weight);
            data.push(&l.in_proj_weight);
            if config.arch == BlockArch::Mamba {
                data.push(&l.conv1d_weight);
                data.push(&l.conv1d_bias);
            }
            match &l.ssm {
                SsmParams::S6(s) => {
                    data.extend([
                        &s.x_proj_weight[..],
                        &s.dt_proj_weight,
                        &s.dt_proj_bias,
                        &s.a_log,
                        &s.d,
                    ]);
                }
                SsmParams::S4d(s) => {
                    data.extend([
                        &s.log_dt[..],
                        &s.log_a_real,
                        &s.a_imag,
                        &s.b_re,
                        &s.b_im,
                        &s.c_re,
                        &s.c_im,
                        &s.d,
                    ]);
                }
            }
            data.push(&l.out_proj_weight);
        }
        data.push(&self.norm_f_weight);
        for (info, d) in shapes.into_iter().zip(data) {
            out.push((info, d));
        }
        out
    }

    /// As [`Self::tensors`], mutably.
    pub fn tensors_mut(&mut self, config: &TaskModelConfig) -> Vec<(TensorInfo, &mut Vec<T>)> {
        let shapes = tensor_infos(config);
        let mut data: Vec<&mut Vec<T>> = vec![&mut self.embedding];
        for l in &mut self.layers {
            data.push(&mut l.norm_weight);
            data.push(&mut l.in_proj_weight);
            if config.arch == BlockArch::Mamba {
                data.push(&mut l.conv1d_weight);
                data.push(&mut l.conv1d_bias);
            }
            match &mut l.ssm {
                SsmParams::S6(s) => {
                    data.push(&mut s.x_proj_weight);
                    data.push(&mut s.dt_proj_weight);
                    data.push(&mut s.dt_proj_bias);
                    data.push(&mut s.a_log);
                    data.push(&mut s.d);
                }
                SsmParams::S4d(s) => {
                    data.push(&mut s.log_dt);
                    data.push(&mut s.log_a_real);
                    data.push(&mut s.a_imag);
                    data.push(&mut s.b_re);
                    data.push(&mut s.b_im);
                    data.push(&mut s.c_re);
                    data.push(&mut s.c_im);
                    data.push(&mut s.d);
                }
            }
            data.push(&mut l.out_proj_weight);
        }
        data.push(&mut self.norm_f_weight);
        shapes.into_iter().zip(data).collect()
    }

    /// Zeros in every tensor (a gradient accumulator).
    pub fn zeros(config: &TaskModelConfig) -> Self {
        let (d, e, n, r, k) = (
            config.d_model,
            config.d_inner(),
            config.d_state,
            config.dt_rank,
            config.d_conv,
        );
        let z = |len: usize| vec![T::ZERO; len];
        let layers = (0..config.n_layer)
            .map(|_| BlockParams {
                norm_weight: z(d),
                in_proj_weight: z(in_proj_rows(config) * d),
                conv1d_weight: if config.arch == BlockArch::Mamba {
                    z(e * k)
                } else {
                    Vec::new()
                },
                conv1d_bias: if config.arch == BlockArch::Mamba {
                    z(e)
                } else {
                    Vec::new()
                },
                ssm: match config.layer {
                    SsmLayer::S6 => SsmParams::S6(S6Params {
                        x_proj_weight: z((r + 2 * n) * e),
                        dt_proj_weight: z(e * r),
                        dt_proj_bias: z(e),
                        a_log: z(e * n),
                        d: z(e),
                    }),
                    SsmLayer::S4d => {
                        let m = n / 2;
                        SsmParams::S4d(S4dParams {
                            kind: S4dInit::Lin,
                            channels: e,
                            modes: m,
                            log_dt: z(e),
                            log_a_real: z(e * m),
                            a_imag: z(e * m),
                            b_re: z(e * m),
                            b_im: z(e * m),
                            c_re: z(e * m),
                            c_im: z(e * m),
                            d: z(e),
                        })
                    }
                },
                out_proj_weight: z(d * e),
            })
            .collect();
        Self {
            embedding: z(config.vocab_size * d),
            layers,
            norm_f_weight: z(d),
        }
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
/// [`TaskParams::tensors`].
pub fn tensor_infos(config: &TaskModelConfig) -> Vec<TensorInfo> {
    let (d, e, n, r, k) = (
        config.d_model,
        config.d_inner(),
        config.d_state,
        config.dt_rank,
        config.d_conv,
    );
    let info = |name: String, shape: Vec<usize>, decays: bool| TensorInfo {
        name,
        shape,
        decays,
    };
    let mut out = vec![info(
        "embedding.weight".into(),
        vec![config.vocab_size, d],
        false,
    )];
    for i in 0..config.n_layer {
        let p = format!("layers.{i}");
        out.push(info(format!("{p}.norm.weight"), vec![d], false));
        out.push(info(
            format!("{p}.mixer.in_proj.weight"),
            vec![in_proj_rows(config), d],
            true,
        ));
        if config.arch == BlockArch::Mamba {
            out.push(info(format!("{p}.mixer.conv1d.weight"), vec![e, k], true));
            out.push(info(format!("{p}.mixer.conv1d.bias"), vec![e], false));
        }
        match config.layer {
            SsmLayer::S6 => {
                out.push(info(
                    format!("{p}.mixer.x_proj.weight"),
                    vec![r + 2 * n, e],
                    true,
                ));
                out.push(info(format!("{p}.mixer.dt_proj.weight"), vec![e, r], true));
                out.push(info(format!("{p}.mixer.dt_proj.bias"), vec![e], false));
                out.push(info(format!("{p}.mixer.A_log"), vec![e, n], false));
                out.push(info(format!("{p}.mixer.D"), vec![e], false));
            }
            SsmLayer::S4d => {
                let m = n / 2;
                out.push(info(format!("{p}.mixer.s4d.log_dt"), vec![e], false));
                for name in ["log_a_real", "a_imag", "b_re", "b_im", "c_re", "c_im"] {
                    out.push(info(format!("{p}.mixer.s4d.{name}"), vec![e, m], false));
                }
                out.push(info(format!("{p}.mixer.s4d.D"), vec![e], false));
            }
        }
        out.push(info(format!("{p}.mixer.out_proj.weight"), vec![d, e], true));
    }
    out.push(info("norm_f.weight".into(), vec![d], false));
    out
}

/// A task model: configuration and parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskModel<T> {
    pub config: TaskModelConfig,
    pub params: TaskParams<T>,
}

/// What the training forward keeps of one block.
struct BlockCache<T> {
    /// the block's input, the residual stream (BL, D)
    resid: Vec<T>,
    /// rmsnorm(resid) (BL, D)
    normed: Vec<T>,
    /// in_proj's x rows (BL, E): the SSM input for nogate, the conv input for mamba
    x: Vec<T>,
    /// (BL, E), mamba only
    z: Vec<T>,
    /// conv1d(x) + b before silu (BL, E), mamba only
    xc: Vec<T>,
    /// the SSM input v (BL, E) (a copy of x for nogate)
    v: Vec<T>,
    /// the SSM output s (BL, E)
    s: Vec<T>,
    /// what out_proj reads (BL, E)
    y: Vec<T>,
    s6: Option<S6Cache<T>>,
}

struct S6Cache<T> {
    dt_low: Vec<T>,
    b: Vec<T>,
    c: Vec<T>,
    delta: Vec<T>,
    a: Vec<T>,
    checkpoints: Vec<T>,
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

/// Positions between the scan's kept states in training.
const SCAN_CHUNK: usize = 256;

fn scan_options() -> ScanOptions {
    ScanOptions {
        delta_softplus: true,
        chunk_len: SCAN_CHUNK,
        ..ScanOptions::default()
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
        let mut h = self.embed(ids);
        let mut blocks = Vec::with_capacity(self.config.n_layer);
        for layer in &self.params.layers {
            blocks.push(self.block_forward(layer, &mut h, batch, len, None, keep)?);
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
        if !fits {
            return Err(invalid(
                op,
                format!("the state is not one of this model for batch={batch} (make it with zero_state)"),
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
        for (layer, st) in self.params.layers.iter().zip(state.blocks.iter_mut()) {
            self.block_forward(layer, &mut h, batch, len, Some(st), false)?;
        }
        state.position += len;
        self.rms_norm(&h, &self.params.norm_f_weight)
    }

    /// One block: h ← h + mixer(rmsnorm(h)). With `state`, continues from
    /// it and leaves the state after the chunk in it.
    fn block_forward(
        &self,
        layer: &BlockParams<T>,
        h: &mut [T],
        batch: usize,
        len: usize,
        mut state: Option<&mut BlockState<T>>,
        keep: bool,
    ) -> Result<BlockCache<T>> {
        let c = &self.config;
        let (d, e) = (c.d_model, c.d_inner());
        let rows = batch * len;
        let normed = self.rms_norm(h, &layer.norm_weight)?;
        let mut x = vec![T::ZERO; rows * e];
        matmul_xwt(
            &normed,
            &layer.in_proj_weight[..e * d],
            rows,
            d,
            e,
            &mut x,
            false,
        )?;
        let (z, xc, v) = match c.arch {
            BlockArch::Mamba => {
                let mut z = vec![T::ZERO; rows * e];
                matmul_xwt(
                    &normed,
                    &layer.in_proj_weight[e * d..],
                    rows,
                    d,
                    e,
                    &mut z,
                    false,
                )?;
                let conv = ConvShape {
                    batch,
                    len,
                    channels: e,
                    kernel: c.d_conv,
                };
                let mut xc = vec![T::ZERO; rows * e];
                match state.as_deref_mut() {
                    Some(st) => causal_conv1d_forward_continuing(
                        &conv,
                        &x,
                        &layer.conv1d_weight,
                        Some(&layer.conv1d_bias),
                        &mut st.conv,
                        &mut xc,
                    )?,
                    None => causal_conv1d_forward(
                        &conv,
                        &x,
                        &layer.conv1d_weight,
                        Some(&layer.conv1d_bias),
                        &mut xc,
                    )?,
                }
                let v: Vec<T> = xc.iter().map(|&a| a.silu()).collect();
                (z, xc, v)
            }
            BlockArch::Nogate => (Vec::new(), Vec::new(), x.clone()),
        };
        let (s, s6) = match &layer.ssm {
            SsmParams::S6(p) => {
                let (s, cache) = self.s6_forward(p, &v, batch, len, state.as_deref_mut(), keep)?;
                (s, cache)
            }
            SsmParams::S4d(p) => {
                let s = match state.as_deref_mut() {
                    None => s4d_forward_conv(p, &v, batch, len)?,
                    Some(st) => {
                        // The recurrence, one position at a time, from the carried state.
                        let disc = p.discretize()?;
                        let mut s = vec![T::ZERO; rows * e];
                        let mut u_t = vec![T::ZERO; batch * e];
                        for t in 0..len {
                            for b in 0..batch {
                                let row = (b * len + t) * e;
                                u_t[b * e..(b + 1) * e].copy_from_slice(&v[row..row + e]);
                            }
                            let y_t = disc.step(&mut st.ssm, &u_t, batch)?;
                            for b in 0..batch {
                                let row = (b * len + t) * e;
                                s[row..row + e].copy_from_slice(&y_t[b * e..(b + 1) * e]);
                            }
                        }
                        s
                    }
                };
                (s, None)
            }
        };
        let y: Vec<T> = match c.arch {
            BlockArch::Mamba => s.iter().zip(&z).map(|(&sv, &zv)| sv * zv.silu()).collect(),
            BlockArch::Nogate => s.iter().map(|&sv| sv.silu()).collect(),
        };
        let resid = if keep { h.to_vec() } else { Vec::new() };
        // h += y W_outᵀ
        matmul_xwt(&y, &layer.out_proj_weight, rows, e, d, h, true)?;
        if !keep {
            return Ok(BlockCache {
                resid,
                normed: Vec::new(),
                x: Vec::new(),
                z: Vec::new(),
                xc: Vec::new(),
                v: Vec::new(),
                s: Vec::new(),
                y: Vec::new(),
                s6: None,
            });
        }
        Ok(BlockCache {
            resid,
            normed,
            x,
            z,
            xc,
            v,
            s,
            y,
            s6,
        })
    }

    /// The S6 layer: s = scan(v, Δ(v), A, B(v), C(v), D), from zeros or
    /// from `state`'s h (then left holding the final h).
    fn s6_forward(
        &self,
        p: &S6Params<T>,
        v: &[T],
        batch: usize,
        len: usize,
        state: Option<&mut BlockState<T>>,
        keep: bool,
    ) -> Result<(Vec<T>, Option<S6Cache<T>>)> {
        let c = &self.config;
        let (e, n, r) = (c.d_inner(), c.d_state, c.dt_rank);
        let rows = batch * len;
        let wx = &p.x_proj_weight;
        let mut dt_low = vec![T::ZERO; rows * r];
        let mut bm = vec![T::ZERO; rows * n];
        let mut cm = vec![T::ZERO; rows * n];
        matmul_xwt(v, &wx[..r * e], rows, e, r, &mut dt_low, false)?;
        matmul_xwt(v, &wx[r * e..(r + n) * e], rows, e, n, &mut bm, false)?;
        matmul_xwt(v, &wx[(r + n) * e..], rows, e, n, &mut cm, false)?;
        let mut delta = vec![T::ZERO; rows * e];
        matmul_xwt(&dt_low, &p.dt_proj_weight, rows, r, e, &mut delta, false)?;
        let a: Vec<T> = p.a_log.iter().map(|&x| -x.exp()).collect();
        let shape = ScanShape {
            batch,
            len,
            channels: e,
            state: n,
        };
        let initial = state.as_ref().map(|s| s.ssm.clone());
        let inputs = ScanInputs {
            u: v,
            delta: &delta,
            a: &a,
            b: &bm,
            c: &cm,
            d: Some(&p.d),
            z: None,
            delta_bias: Some(&p.dt_proj_bias),
            initial_state: initial.as_deref(),
        };
        let mut s = vec![T::ZERO; rows * e];
        let mut checkpoints = if keep {
            vec![T::ZERO; shape.checkpoints_len(SCAN_CHUNK)]
        } else {
            Vec::new()
        };
        selective_scan_forward(
            &shape,
            &inputs,
            &scan_options(),
            &mut s,
            state.map(|st| st.ssm.as_mut_slice()),
            keep.then_some(checkpoints.as_mut_slice()),
        )?;
        let cache = keep.then_some(S6Cache {
            dt_low,
            b: bm,
            c: cm,
            delta,
            a,
            checkpoints,
        });
        Ok((s, cache))
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
        let c = &self.config;
        let d = c.d_model;
        let rows = cache.batch * cache.len;
        check_len(OP, "d_hidden", d_hidden, &[("rows", rows), ("d_model", d)])?;
        check_len(OP, "ids", ids, &[("rows", rows)])?;
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
            self.block_backward(
                layer,
                &cache.blocks[i],
                cache.batch,
                cache.len,
                &mut dh,
                &mut g.layers[i],
            )?;
        }
        // h = E[ids]
        crate::kernels::embedding_backward(ids, &dh, d, &mut g.embedding);
        Ok(g)
    }

    /// Backward of one block: `dh` holds dL/dh after the block on entry and
    /// dL/dh before it on return.
    fn block_backward(
        &self,
        layer: &BlockParams<T>,
        cache: &BlockCache<T>,
        batch: usize,
        len: usize,
        dh: &mut [T],
        g: &mut BlockParams<T>,
    ) -> Result<()> {
        let c = &self.config;
        let (d, e) = (c.d_model, c.d_inner());
        let rows = batch * len;
        // h_out = h_in + y W_outᵀ
        matmul_xtw(dh, &cache.y, rows, d, e, &mut g.out_proj_weight, false)?;
        let mut dy = vec![T::ZERO; rows * e];
        matmul_xw(dh, &layer.out_proj_weight, rows, d, e, &mut dy, false)?;
        // y = s ⊙ silu(z)  or  y = silu(s)
        let mut dz = Vec::new();
        let ds: Vec<T> = match c.arch {
            BlockArch::Mamba => {
                dz = dy
                    .iter()
                    .zip(&cache.s)
                    .zip(&cache.z)
                    .map(|((&g, &s), &z)| g * s * z.silu_grad())
                    .collect();
                dy.iter()
                    .zip(&cache.z)
                    .map(|(&g, &z)| g * z.silu())
                    .collect()
            }
            BlockArch::Nogate => dy
                .iter()
                .zip(&cache.s)
                .map(|(&g, &s)| g * s.silu_grad())
                .collect(),
        };
        // s = ssm(v)
        let dv = match (&layer.ssm, &mut g.ssm) {
            (SsmParams::S6(p), SsmParams::S6(gp)) => {
                let s6 = cache
                    .s6
                    .as_ref()
                    .ok_or_else(|| invalid("TaskModel::backward", "S6 cache missing"))?;
                self.s6_backward(p, s6, &cache.v, batch, len, &ds, gp)?
            }
            (SsmParams::S4d(p), SsmParams::S4d(gp)) => {
                let sg = s4d_backward_conv(p, &cache.v, &ds, batch, len)?;
                let S4dGrads {
                    u,
                    log_dt,
                    log_a_real,
                    a_imag,
                    b_re,
                    b_im,
                    c_re,
                    c_im,
                    d,
                } = sg;
                gp.log_dt = log_dt;
                gp.log_a_real = log_a_real;
                gp.a_imag = a_imag;
                gp.b_re = b_re;
                gp.b_im = b_im;
                gp.c_re = c_re;
                gp.c_im = c_im;
                gp.d = d;
                u
            }
            _ => {
                return Err(invalid(
                    "TaskModel::backward",
                    "gradient tree of another layer type",
                ))
            }
        };
        // v = silu(conv1d(x) + b)  or  v = x
        let dx = match c.arch {
            BlockArch::Mamba => {
                let dxc: Vec<T> = dv
                    .iter()
                    .zip(&cache.xc)
                    .map(|(&g, &x)| g * x.silu_grad())
                    .collect();
                let conv = ConvShape {
                    batch,
                    len,
                    channels: e,
                    kernel: c.d_conv,
                };
                let cg = causal_conv1d_backward(&conv, &cache.x, &layer.conv1d_weight, true, &dxc)?;
                g.conv1d_weight = cg.weight;
                g.conv1d_bias = cg.bias.expect("bias requested");
                cg.x
            }
            BlockArch::Nogate => dv,
        };
        // x = u W_inxᵀ (, z = u W_inzᵀ)
        let mut d_normed = vec![T::ZERO; rows * d];
        matmul_xw(
            &dx,
            &layer.in_proj_weight[..e * d],
            rows,
            e,
            d,
            &mut d_normed,
            false,
        )?;
        matmul_xtw(
            &dx,
            &cache.normed,
            rows,
            e,
            d,
            &mut g.in_proj_weight[..e * d],
            false,
        )?;
        if c.arch == BlockArch::Mamba {
            matmul_xw(
                &dz,
                &layer.in_proj_weight[e * d..],
                rows,
                e,
                d,
                &mut d_normed,
                true,
            )?;
            matmul_xtw(
                &dz,
                &cache.normed,
                rows,
                e,
                d,
                &mut g.in_proj_weight[e * d..],
                false,
            )?;
        }
        // u = rmsnorm(h_in); the residual path adds dh itself.
        let ng = rms_norm_backward(
            &cache.resid,
            &layer.norm_weight,
            d,
            <T as Float>::from_f64(c.norm_eps),
            &d_normed,
        )?;
        g.norm_weight = ng.weight;
        for (a, &b) in dh.iter_mut().zip(&ng.x) {
            *a += b;
        }
        Ok(())
    }

    /// Backward of [`Self::s6_forward`]: returns dL/dv, writes the S6 gradients.
    #[allow(clippy::too_many_arguments)]
    fn s6_backward(
        &self,
        p: &S6Params<T>,
        cache: &S6Cache<T>,
        v: &[T],
        batch: usize,
        len: usize,
        ds: &[T],
        g: &mut S6Params<T>,
    ) -> Result<Vec<T>> {
        let c = &self.config;
        let (e, n, r) = (c.d_inner(), c.d_state, c.dt_rank);
        let rows = batch * len;
        let inputs = ScanInputs {
            u: v,
            delta: &cache.delta,
            a: &cache.a,
            b: &cache.b,
            c: &cache.c,
            d: Some(&p.d),
            z: None,
            delta_bias: Some(&p.dt_proj_bias),
            initial_state: None,
        };
        let shape = ScanShape {
            batch,
            len,
            channels: e,
            state: n,
        };
        let sg = selective_scan_backward(
            &shape,
            &inputs,
            &scan_options(),
            &cache.checkpoints,
            ds,
            None,
        )?;
        // A = -exp(A_log): dA/dA_log = A
        for ((ga, &da), &a) in g.a_log.iter_mut().zip(&sg.a).zip(&cache.a) {
            *ga = da * a;
        }
        g.d = sg.d.expect("D was given");
        g.dt_proj_bias = sg.delta_bias.expect("delta_bias was given");
        // delta = dt_low W_dtᵀ
        let mut d_dt_low = vec![T::ZERO; rows * r];
        matmul_xw(
            &sg.delta,
            &p.dt_proj_weight,
            rows,
            e,
            r,
            &mut d_dt_low,
            false,
        )?;
        matmul_xtw(
            &sg.delta,
            &cache.dt_low,
            rows,
            e,
            r,
            &mut g.dt_proj_weight,
            false,
        )?;
        // [dt_low, B, C] = v W_xᵀ
        let mut dv = sg.u;
        let wx = &p.x_proj_weight;
        let gx = &mut g.x_proj_weight;
        matmul_xw(&d_dt_low, &wx[..r * e], rows, r, e, &mut dv, true)?;
        matmul_xw(&sg.b, &wx[r * e..(r + n) * e], rows, n, e, &mut dv, true)?;
        matmul_xw(&sg.c, &wx[(r + n) * e..], rows, n, e, &mut dv, true)?;
        matmul_xtw(&d_dt_low, v, rows, r, e, &mut gx[..r * e], false)?;
        matmul_xtw(&sg.b, v, rows, n, e, &mut gx[r * e..(r + n) * e], false)?;
        matmul_xtw(&sg.c, v, rows, n, e, &mut gx[(r + n) * e..], false)?;
        Ok(dv)
    }

    /// One token for every sequence of `state` (ids_t: (batch)): returns the
    /// final hidden (batch, D) and advances the state. The step kernels
    /// (conv shift, one scan step, one S4D step) on the caller's thread.
    pub fn step(&self, state: &mut TaskState<T>, ids_t: &[u32]) -> Result<Vec<T>> {
        const OP: &str = "TaskModel::step";
        let batch = ids_t.len();
        self.check_ids(OP, ids_t, batch.max(1), 1)?;
        self.check_state(OP, state, batch)?;
        let c = &self.config;
        let (d, e, n, r) = (c.d_model, c.d_inner(), c.d_state, c.dt_rank);
        let mut h = self.embed(ids_t);
        for (layer, st) in self.params.layers.iter().zip(state.blocks.iter_mut()) {
            let normed = self.rms_norm(&h, &layer.norm_weight)?;
            let mut x = vec![T::ZERO; batch * e];
            matmul_xwt(
                &normed,
                &layer.in_proj_weight[..e * d],
                batch,
                d,
                e,
                &mut x,
                false,
            )?;
            let mut z = Vec::new();
            let v = match c.arch {
                BlockArch::Mamba => {
                    z = vec![T::ZERO; batch * e];
                    matmul_xwt(
                        &normed,
                        &layer.in_proj_weight[e * d..],
                        batch,
                        d,
                        e,
                        &mut z,
                        false,
                    )?;
                    let mut xc = vec![T::ZERO; batch * e];
                    causal_conv1d_step(
                        batch,
                        e,
                        c.d_conv,
                        &mut st.conv,
                        &x,
                        &layer.conv1d_weight,
                        Some(&layer.conv1d_bias),
                        &mut xc,
                    )?;
                    xc.iter().map(|&a| a.silu()).collect::<Vec<T>>()
                }
                BlockArch::Nogate => x,
            };
            let s = match &layer.ssm {
                SsmParams::S6(p) => {
                    let wx = &p.x_proj_weight;
                    let mut dt_low = vec![T::ZERO; batch * r];
                    let mut bm = vec![T::ZERO; batch * n];
                    let mut cm = vec![T::ZERO; batch * n];
                    matmul_xwt(&v, &wx[..r * e], batch, e, r, &mut dt_low, false)?;
                    matmul_xwt(&v, &wx[r * e..(r + n) * e], batch, e, n, &mut bm, false)?;
                    matmul_xwt(&v, &wx[(r + n) * e..], batch, e, n, &mut cm, false)?;
                    let mut delta = vec![T::ZERO; batch * e];
                    matmul_xwt(&dt_low, &p.dt_proj_weight, batch, r, e, &mut delta, false)?;
                    let a: Vec<T> = p.a_log.iter().map(|&x| -x.exp()).collect();
                    let mut s = vec![T::ZERO; batch * e];
                    selective_scan_step(
                        batch,
                        e,
                        n,
                        &ScanStepInputs {
                            u: &v,
                            delta: &delta,
                            a: &a,
                            b: &bm,
                            c: &cm,
                            d: Some(&p.d),
                            z: None,
                            delta_bias: Some(&p.dt_proj_bias),
                        },
                        &scan_options(),
                        &mut st.ssm,
                        &mut s,
                    )?;
                    s
                }
                SsmParams::S4d(p) => p.discretize()?.step(&mut st.ssm, &v, batch)?,
            };
            let y: Vec<T> = match c.arch {
                BlockArch::Mamba => s.iter().zip(&z).map(|(&sv, &zv)| sv * zv.silu()).collect(),
                BlockArch::Nogate => s.iter().map(|&sv| sv.silu()).collect(),
            };
            matmul_xwt(&y, &layer.out_proj_weight, batch, e, d, &mut h, true)?;
        }
        state.position += 1;
        self.rms_norm(&h, &self.params.norm_f_weight)
    }

    /// Writes `dir/task-model.json` (the configuration) and
    /// `dir/model.safetensors` (f32), each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)> = self
            .params
            .tensors(&self.config)
            .into_iter()
            .map(|(info, data)| (info.name, DType::F32, info.shape, encode(data, DType::F32)))
            .collect();
        write_safetensors(&dir.join("model.safetensors"), &tensors, None)?;
        let text = serde_json::to_string_pretty(&self.config).expect("a config serialises");
        write_atomically(&dir.join(CONFIG_FILE), text.as_bytes())
    }

    /// Loads what [`Self::save`] wrote, checking every name and shape.
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: TaskModelConfig = serde_json::from_str(&text).map_err(|e| Error::Format {
            file: config_path.display().to_string(),
            message: format!("not a task model configuration: {e}"),
        })?;
        config.validate()?;
        let file = SafetensorsFile::open(dir.join("model.safetensors"))?;
        let shown = file.file().to_string();
        let mut params = TaskParams::<T>::zeros(&config);
        let mut used = 0;
        for (info, dst) in params.tensors_mut(&config) {
            let t = file.tensor(&info.name)?.ok_or_else(|| Error::Tensor {
                file: shown.clone(),
                tensor: info.name.clone(),
                message: format!("missing (expected shape {:?})", info.shape),
            })?;
            if t.shape != info.shape {
                return Err(Error::Tensor {
                    file: shown.clone(),
                    tensor: info.name.clone(),
                    message: format!("expected shape {:?}, found {:?}", info.shape, t.shape),
                });
            }
            *dst = t.to_vec::<T>(&shown, &info.name)?;
            used += 1;
        }
        if used != file.names().len() {
            return Err(Error::Format {
                file: shown,
                message: format!(
                    "holds {} tensors, this configuration has {used} (check {CONFIG_FILE})",
                    file.names().len()
                ),
            });
        }
        Ok(Self { config, params })
    }
}

/// The configuration file of a saved task model.
pub const CONFIG_FILE: &str = "task-model.json";
