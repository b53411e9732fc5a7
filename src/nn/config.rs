//! Model configuration, read from either kind of `config.json` (docs/DESIGN.md
//! §7.4): the original state-spaces one (`d_model`, `n_layer`,
//! `ssm_cfg`, ...) or the Hugging Face one (`hidden_size`,
//! `num_hidden_layers`, `state_size`, ...).

use serde_json::{json, Map, Value};

use super::transformer::{Positions, TransformerConfig};
use crate::error::{invalid, Error, Result};

/// Everything that fixes a Mamba language model's shapes and arithmetic.
#[derive(Clone, Debug, PartialEq)]
pub struct MambaConfig {
    pub d_model: usize,
    pub n_layer: usize,
    /// Rows of the embedding, after padding (50280 for the released models).
    pub vocab_size: usize,
    /// N
    pub d_state: usize,
    pub d_conv: usize,
    pub expand: usize,
    /// expand · d_model
    pub d_inner: usize,
    pub dt_rank: usize,
    /// RMSNorm (true, every released model) or LayerNorm.
    pub rms_norm: bool,
    pub norm_eps: f64,
    /// The residual stream in f32 (always so here: the model computes in
    /// f32 or f64 whatever the storage type).
    pub residual_in_fp32: bool,
    pub tie_embeddings: bool,
    /// conv1d has a bias (true in every released model).
    pub conv_bias: bool,
    /// in_proj and out_proj have biases (false in every released model).
    pub proj_bias: bool,
    /// dt initialisation range and floor (docs/DESIGN.md §8).
    pub dt_min: f64,
    pub dt_max: f64,
    pub dt_init_floor: f64,
    /// Falcon-Mamba (`model_type` "falcon_mamba"): the ε of the weightless
    /// RMSNorm applied to dt_low, B and C after x_proj (`mixer_rms_eps`);
    /// None for Mamba.
    pub dt_bc_rms_eps: Option<f64>,
    /// Mamba-2 (`ssm_cfg.layer` "Mamba2", `model_type` "mamba2"): the SSD
    /// mixer's heads and groups; None for Mamba-1 (and Falcon-Mamba).
    pub ssd: Option<SsdConfig>,
}

/// The Mamba-2 mixer's shape beyond [`MambaConfig`]'s (docs/DESIGN.md
/// §17): H = d_inner / head_dim heads of P = head_dim channels, G groups
/// of B and C (head h reads group h / (H/G)), one A, D and dt bias per
/// head. `dt_rank` is unused (Δ comes straight out of in_proj, one per head).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SsdConfig {
    /// P
    pub head_dim: usize,
    /// G
    pub n_groups: usize,
    /// Q, the chunk length of the SSD matrix form (prefill and training).
    pub chunk_size: usize,
    /// Δ is clamped to [lo, hi] after the softplus (mamba_ssm `dt_limit`,
    /// transformers `time_step_limit`; (0, ∞) leaves it alone).
    pub dt_limit: (f64, f64),
}

impl SsdConfig {
    /// mamba_ssm's Mamba2 defaults: P 64, G 1, Q 256, no clamp.
    pub fn new(head_dim: usize, n_groups: usize) -> Self {
        Self {
            head_dim,
            n_groups,
            chunk_size: 256,
            dt_limit: (0.0, f64::INFINITY),
        }
    }
}

/// Which `config.json` dialect a model directory uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigFormat {
    Original,
    HuggingFace,
}

impl MambaConfig {
    /// A configuration with the official defaults for everything but the
    /// sizes: d_conv 4, expand 2, dt_rank ceil(d_model / 16), RMSNorm
    /// eps 1e-5, tied embeddings, conv bias, no projection bias.
    pub fn new(d_model: usize, n_layer: usize, vocab_size: usize, d_state: usize) -> Self {
        Self {
            d_model,
            n_layer,
            vocab_size,
            d_state,
            d_conv: 4,
            expand: 2,
            d_inner: 2 * d_model,
            dt_rank: d_model.div_ceil(16),
            rms_norm: true,
            norm_eps: 1e-5,
            residual_in_fp32: true,
            tie_embeddings: true,
            conv_bias: true,
            proj_bias: false,
            dt_min: 0.001,
            dt_max: 0.1,
            dt_init_floor: 1e-4,
            dt_bc_rms_eps: None,
            ssd: None,
        }
    }

    /// A Mamba-2 configuration with mamba_ssm's defaults for everything
    /// but the sizes: d_conv 4, expand 2, RMSNorm eps 1e-5, tied
    /// embeddings, conv bias, no projection bias.
    pub fn mamba2(
        d_model: usize,
        n_layer: usize,
        vocab_size: usize,
        d_state: usize,
        ssd: SsdConfig,
    ) -> Self {
        let mut c = Self::new(d_model, n_layer, vocab_size, d_state);
        c.ssd = Some(ssd);
        c
    }

    /// Heads H of the Mamba-2 mixer (0 for Mamba-1).
    pub fn n_heads(&self) -> usize {
        self.block_shape().heads()
    }

    /// Rows of in_proj: 2E (x, z) for Mamba-1; 2E + 2GN + H (z, x, B, C,
    /// Δ) for Mamba-2.
    pub fn in_proj_rows(&self) -> usize {
        self.block_shape().in_proj_rows()
    }

    /// Mamba-2's heads H = E / P; 0 for Mamba-1.
    pub fn heads(&self) -> usize {
        self.block_shape().heads()
    }

    /// Channels of the causal convolution: E for Mamba-1; E + 2GN (x, B
    /// and C) for Mamba-2.
    pub fn conv_channels(&self) -> usize {
        self.block_shape().conv_channels()
    }

    /// The configuration of state-spaces/mamba-130m.
    pub fn mamba_130m() -> Self {
        Self::new(768, 24, 50280, 16)
    }

    /// Checks that the numbers describe a model that can be built.
    /// The sizes of each of its blocks.
    pub fn block_shape(&self) -> super::block::BlockShape {
        super::block::BlockShape {
            d_model: self.d_model,
            d_inner: self.d_inner,
            d_state: self.d_state,
            d_conv: self.d_conv,
            dt_rank: self.dt_rank,
            norm_eps: self.norm_eps,
            ssd: self.ssd,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let fail = |field: &str, why: &str| Err(invalid("config", format!("`{field}` {why}")));
        for (field, v) in [
            ("d_model", self.d_model),
            ("n_layer", self.n_layer),
            ("vocab_size", self.vocab_size),
            ("d_state", self.d_state),
            ("d_conv", self.d_conv),
            ("expand", self.expand),
            ("d_inner", self.d_inner),
            ("dt_rank", self.dt_rank),
        ] {
            if v == 0 {
                return fail(field, "must be at least 1");
            }
        }
        let ssd = self.ssd.unwrap_or(SsdConfig::new(1, 1));
        let sizes = [
            ("head_dim", ssd.head_dim),
            ("n_groups", ssd.n_groups),
            ("chunk_size", ssd.chunk_size),
            ("d_model", self.d_model),
            ("n_layer", self.n_layer),
            ("vocab_size", self.vocab_size),
            ("d_inner", self.d_inner),
            ("d_state", self.d_state),
            ("dt_rank", self.dt_rank),
            ("d_conv", self.d_conv),
            ("expand", self.expand),
        ];
        check_sizes("config", &sizes, || self.param_count_wide())?;
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return fail(
                "norm_eps",
                &format!("must be positive, got {}", self.norm_eps),
            );
        }
        if let Some(ssd) = self.ssd {
            if ssd.head_dim == 0 || ssd.n_groups == 0 || ssd.chunk_size == 0 {
                return fail(
                    "ssm_cfg",
                    &format!(
                        "head_dim {}, n_groups {} and chunk_size {} must be at least 1",
                        ssd.head_dim, ssd.n_groups, ssd.chunk_size
                    ),
                );
            }
            if self.d_inner % ssd.head_dim != 0 {
                return fail(
                    "head_dim",
                    &format!("{} does not divide d_inner {}", ssd.head_dim, self.d_inner),
                );
            }
            let heads = self.d_inner / ssd.head_dim;
            if heads % ssd.n_groups != 0 {
                return fail(
                    "n_groups",
                    &format!("{} does not divide the {heads} heads", ssd.n_groups),
                );
            }
            let (lo, hi) = ssd.dt_limit;
            if !(lo >= 0.0 && lo < hi) {
                return fail(
                    "time_step_limit",
                    &format!("must be 0 <= lo < hi, got ({lo}, {hi})"),
                );
            }
            if self.dt_bc_rms_eps.is_some() {
                return fail("mixer_rms_eps", "is a Falcon-Mamba (Mamba-1) setting");
            }
        }
        if let Some(eps) = self.dt_bc_rms_eps {
            if !(eps > 0.0 && eps.is_finite()) {
                return fail("mixer_rms_eps", &format!("must be positive, got {eps}"));
            }
        }
        if !(self.dt_min > 0.0 && self.dt_min <= self.dt_max) {
            return fail(
                "dt_min",
                &format!(
                    "must be positive and at most dt_max ({} > {})",
                    self.dt_min, self.dt_max
                ),
            );
        }
        Ok(())
    }

    /// The parameter count (the tied head counted once) in u128: no size
    /// that passed the parser's gate can overflow it.
    fn param_count_wide(&self) -> u128 {
        let w = |v: usize| v as u128;
        let (d, e, n, r, k, v) = (
            w(self.d_model),
            w(self.d_inner),
            w(self.d_state),
            w(self.dt_rank),
            w(self.d_conv),
            w(self.vocab_size),
        );
        let norm = if self.rms_norm { d } else { 2 * d };
        let proj_bias = |in_rows: u128| if self.proj_bias { in_rows + d } else { 0 };
        let layer = match self.ssd {
            None => {
                norm + 2 * e * d
                    + e * k
                    + if self.conv_bias { e } else { 0 }
                    + (r + 2 * n) * e
                    + e * r
                    + e
                    + e * n
                    + e
                    + d * e
                    + proj_bias(2 * e)
            }
            Some(ssd) => {
                // in_proj (z, x, B, C, Δ), conv over (x, B, C), dt_bias,
                // A_log and D per head, the gated norm's weight, out_proj
                let h = e / w(ssd.head_dim.max(1));
                let bc = 2 * w(ssd.n_groups) * n;
                let in_rows = 2 * e + bc + h;
                norm + in_rows * d
                    + (e + bc) * k
                    + if self.conv_bias { e + bc } else { 0 }
                    + 3 * h
                    + e
                    + d * e
                    + proj_bias(in_rows)
            }
        };
        let head = if self.tie_embeddings { 0 } else { v * d };
        v * d + w(self.n_layer) * layer + norm + head
    }

    /// Number of parameters (the tied head counted once).
    pub fn n_params(&self) -> usize {
        // validate() has bounded it by MAX_PARAMETERS
        self.param_count_wide() as usize
    }

    /// Parameters outside the embedding and the head: what scaling laws
    /// count (Kaplan et al. 2020).
    pub fn n_non_embedding_params(&self) -> usize {
        let head = if self.tie_embeddings { 0 } else { 1 };
        self.n_params() - (1 + head) * self.vocab_size * self.d_model
    }

    /// Training FLOPs per token (docs/DESIGN.md §15.8): 6 per parameter in
    /// a matrix product (in_proj, x_proj, dt_proj, out_proj, the head),
    /// plus the convolution (6·E·K) and the selective scan (3 · 9·E·N, the
    /// paper's count of its forward) of every layer.
    pub fn training_flops_per_token(&self) -> f64 {
        let (d, e, n, r, k, v) = (
            self.d_model as f64,
            self.d_inner as f64,
            self.d_state as f64,
            self.dt_rank as f64,
            self.d_conv as f64,
            self.vocab_size as f64,
        );
        let layers = self.n_layer as f64;
        if self.ssd.is_some() {
            // in_proj and out_proj; the convolution over x, B and C; the
            // SSD recurrence's 5·E·N per token forward (S ← aS + Δx⊗B:
            // 3, y = S·C: 2), three times for the backward
            let in_rows = self.in_proj_rows() as f64;
            let conv = self.conv_channels() as f64;
            let matmul_params = in_rows * d + d * e;
            return 6.0 * (layers * matmul_params + v * d)
                + layers * (6.0 * conv * k + 15.0 * e * n);
        }
        let matmul_params = 2.0 * e * d + (r + 2.0 * n) * e + e * r + d * e;
        6.0 * (layers * matmul_params + v * d) + layers * (6.0 * e * k + 27.0 * e * n)
    }

    /// Fields that duplicate others and disagree with them, as sentences
    /// for the user: not errors, because released checkpoints carry such a
    /// disagreement (tiiuae/falcon-mamba-7b: expand 16 with hidden_size
    /// 4096 and intermediate_size 8192). `intermediate_size` is what the
    /// weights have and what transformers uses (a config.json value
    /// overrides the one its constructor derives from expand); `expand` is
    /// kept only to be written back.
    pub fn disagreements(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.expand.checked_mul(self.d_model) != Some(self.d_inner) {
            notes.push(format!(
                "expand {} x hidden_size {} is not intermediate_size {}: intermediate_size (the \
                 weights' width) is used, as transformers does",
                self.expand, self.d_model, self.d_inner
            ));
        }
        notes
    }

    /// Parses either dialect from JSON text; `source` names the file in errors.
    pub fn from_json_str(text: &str, source: &str) -> Result<(Self, ConfigFormat)> {
        let value = parse_object(text, source)?;
        let obj = value.as_object().expect("checked to be an object");
        check_model_type(obj, source)?;
        let r = Reader { obj, source };
        let (config, format) = if obj.contains_key("d_model") {
            (r.original()?, ConfigFormat::Original)
        } else if obj.contains_key("hidden_size") {
            (r.hugging_face()?, ConfigFormat::HuggingFace)
        } else {
            return Err(Error::Format {
                file: source.to_string(),
                message: "neither `d_model` (state-spaces config) nor `hidden_size` (Hugging Face config) is present"
                    .into(),
            });
        };
        config.validate().map_err(|e| Error::Format {
            file: source.to_string(),
            message: e.to_string(),
        })?;
        Ok((config, format))
    }

    /// The Hugging Face `config.json` that `MambaForCausalLM` reads.
    pub fn to_hugging_face_json(&self) -> Value {
        let mut config = json!({
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "vocab_size": self.vocab_size,
            "state_size": self.d_state,
            "conv_kernel": self.d_conv,
            "expand": self.expand,
            "intermediate_size": self.d_inner,
            "time_step_rank": self.dt_rank,
            "use_bias": self.proj_bias,
            "use_conv_bias": self.conv_bias,
            "layer_norm_epsilon": self.norm_eps,
            "residual_in_fp32": self.residual_in_fp32,
            "tie_word_embeddings": self.tie_embeddings,
            "time_step_min": self.dt_min,
            "time_step_max": self.dt_max,
            "time_step_floor": self.dt_init_floor,
            "time_step_init_scheme": "random",
            "time_step_scale": 1.0,
            "hidden_act": "silu",
            "initializer_range": 0.1,
            "rescale_prenorm_residual": false,
            "use_cache": true,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
            "torch_dtype": "float32",
        });
        if let Some(ssd) = self.ssd {
            let (lo, hi) = ssd.dt_limit;
            // transformers' own spelling of an infinite float
            let hi = if hi.is_finite() {
                json!(hi)
            } else {
                json!({"__float__": "Infinity"})
            };
            config["architectures"] = json!(["Mamba2ForCausalLM"]);
            config["model_type"] = json!("mamba2");
            config["head_dim"] = json!(ssd.head_dim);
            config["num_heads"] = json!(self.n_heads());
            config["n_groups"] = json!(ssd.n_groups);
            config["chunk_size"] = json!(ssd.chunk_size);
            config["time_step_limit"] = json!([lo, hi]);
            config["rms_norm"] = json!(true);
        }
        if let Some(eps) = self.dt_bc_rms_eps {
            config["architectures"] = json!(["FalconMambaForCausalLM"]);
            config["model_type"] = json!("falcon_mamba");
            config["mixer_rms_eps"] = json!(eps);
        }
        config
    }
}

/// Typed field access with errors that name the file and the field.
struct Reader<'a> {
    obj: &'a Map<String, Value>,
    source: &'a str,
}

impl Reader<'_> {
    fn err(&self, field: &str, message: impl std::fmt::Display) -> Error {
        Error::Format {
            file: self.source.to_string(),
            message: format!("field `{field}`: {message}"),
        }
    }

    fn usize_in(&self, obj: &Map<String, Value>, field: &str) -> Result<Option<usize>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let x = v.as_u64().ok_or_else(|| {
                    self.err(field, format!("expected a non-negative integer, found {v}"))
                })?;
                // the first gate of check_sizes, here so that the parser's own
                // products (expand x d_model, padding) cannot overflow
                if x as u128 > MAX_PARAMETERS {
                    return Err(self.err(
                        field,
                        format!(
                            "{x} is larger than any model ({MAX_PARAMETERS} parameters at most)"
                        ),
                    ));
                }
                Ok(Some(x as usize))
            }
        }
    }

    fn usize_req(&self, field: &str) -> Result<usize> {
        self.usize_in(self.obj, field)?
            .ok_or_else(|| self.err(field, "missing"))
    }

    fn bool_or(&self, obj: &Map<String, Value>, field: &str, default: bool) -> Result<bool> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    fn f64_or(&self, obj: &Map<String, Value>, field: &str, default: f64) -> Result<f64> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    /// `dt_rank` / `time_step_rank`: an integer or "auto" (ceil(d_model/16)).
    fn rank(&self, obj: &Map<String, Value>, field: &str, d_model: usize) -> Result<usize> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(d_model.div_ceil(16)),
            Some(Value::String(s)) if s == "auto" => Ok(d_model.div_ceil(16)),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                self.err(field, format!("expected an integer or \"auto\", found {v}"))
            }),
        }
    }

    /// state-spaces/mamba `MambaConfig` (mixer_seq_simple.py).
    fn original(&self) -> Result<MambaConfig> {
        let d_model = self.usize_req("d_model")?;
        let n_layer = self.usize_req("n_layer")?;
        let vocab = self.usize_req("vocab_size")?;
        let pad = self
            .usize_in(self.obj, "pad_vocab_size_multiple")?
            .unwrap_or(8)
            .max(1);
        let empty = Map::new();
        let ssm = match self.obj.get("ssm_cfg") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(v) => return Err(self.err("ssm_cfg", format!("expected an object, found {v}"))),
        };
        let mamba2 = match ssm.get("layer") {
            None | Some(Value::Null) => false,
            Some(Value::String(l)) if l == "Mamba1" => false,
            Some(Value::String(l)) if l == "Mamba2" => true,
            Some(v) => {
                return Err(self.err(
                    "ssm_cfg.layer",
                    format!("expected \"Mamba1\" or \"Mamba2\", found {v}"),
                ))
            }
        };
        // mamba_ssm's hybrid and MLP extensions, absent from the released
        // checkpoints: refused rather than loaded without their layers
        if self.usize_in(self.obj, "d_intermediate")?.unwrap_or(0) != 0 {
            return Err(self.err(
                "d_intermediate",
                "MLP layers after the mixer are not supported",
            ));
        }
        if let Some(Value::Array(a)) = self.obj.get("attn_layer_idx") {
            if !a.is_empty() {
                return Err(self.err("attn_layer_idx", "attention layers are not supported"));
            }
        }
        let expand = self.usize_in(ssm, "expand")?.unwrap_or(2);
        let mut c = MambaConfig::new(
            d_model,
            n_layer,
            vocab.div_ceil(pad).saturating_mul(pad),
            16,
        );
        c.d_state = self.usize_in(ssm, "d_state")?.unwrap_or(16);
        c.d_conv = self.usize_in(ssm, "d_conv")?.unwrap_or(4);
        c.expand = expand;
        c.d_inner = expand.saturating_mul(d_model);
        c.dt_rank = self.rank(ssm, "dt_rank", d_model)?;
        c.conv_bias = self.bool_or(ssm, "conv_bias", true)?;
        c.proj_bias = self.bool_or(ssm, "bias", false)?;
        c.dt_min = self.f64_or(ssm, "dt_min", 0.001)?;
        c.dt_max = self.f64_or(ssm, "dt_max", 0.1)?;
        c.dt_init_floor = self.f64_or(ssm, "dt_init_floor", 1e-4)?;
        c.rms_norm = self.bool_or(self.obj, "rms_norm", true)?;
        c.norm_eps = self.f64_or(self.obj, "norm_epsilon", 1e-5)?;
        c.residual_in_fp32 = self.bool_or(self.obj, "residual_in_fp32", true)?;
        c.tie_embeddings = self.bool_or(self.obj, "tie_embeddings", true)?;
        if mamba2 {
            // mamba_ssm Mamba2's defaults
            c.d_state = self.usize_in(ssm, "d_state")?.unwrap_or(128);
            let mut ssd = SsdConfig::new(
                self.usize_in(ssm, "headdim")?.unwrap_or(64),
                self.usize_in(ssm, "ngroups")?.unwrap_or(1),
            );
            ssd.chunk_size = self.usize_in(ssm, "chunk_size")?.unwrap_or(256);
            ssd.dt_limit = self.limit(ssm, "dt_limit")?;
            for (field, supported) in [
                ("rmsnorm", true),
                ("norm_before_gate", false),
                ("D_has_hdim", false),
            ] {
                if self.bool_or(ssm, field, supported)? != supported {
                    return Err(self.err(
                        &format!("ssm_cfg.{field}"),
                        format!("only {supported} is supported (as in every released Mamba-2)"),
                    ));
                }
            }
            if let Some(d_ssm) = self.usize_in(ssm, "d_ssm")? {
                if d_ssm != c.d_inner {
                    return Err(self.err(
                        "ssm_cfg.d_ssm",
                        format!(
                            "{d_ssm} is not d_inner {}: an MLP beside the SSM is not supported",
                            c.d_inner
                        ),
                    ));
                }
            }
            c.ssd = Some(ssd);
        }
        Ok(c)
    }

    /// A (lo, hi) limit: a two-element list of numbers, where transformers
    /// writes infinity as {"__float__": "Infinity"}; (0, ∞) when absent.
    fn limit(&self, obj: &Map<String, Value>, field: &str) -> Result<(f64, f64)> {
        let number = |v: &Value| -> Option<f64> {
            match v {
                Value::Number(x) => x.as_f64(),
                Value::Object(o) => match o.get("__float__").and_then(Value::as_str) {
                    Some("Infinity" | "inf") => Some(f64::INFINITY),
                    _ => None,
                },
                Value::String(t) if t == "inf" || t == "Infinity" => Some(f64::INFINITY),
                _ => None,
            }
        };
        match obj.get(field) {
            None | Some(Value::Null) => Ok((0.0, f64::INFINITY)),
            Some(Value::Array(a)) if a.len() == 2 => match (number(&a[0]), number(&a[1])) {
                (Some(lo), Some(hi)) => Ok((lo, hi)),
                _ => Err(self.err(field, format!("expected two numbers, found {:?}", a))),
            },
            Some(v) => Err(self.err(field, format!("expected [lo, hi], found {v}"))),
        }
    }

    /// transformers `MambaConfig` (configuration_mamba.py).
    fn hugging_face(&self) -> Result<MambaConfig> {
        let d_model = self.usize_req("hidden_size")?;
        let n_layer = self.usize_req("num_hidden_layers")?;
        let vocab = self.usize_req("vocab_size")?;
        let expand = self.usize_in(self.obj, "expand")?.unwrap_or(2);
        let mut c = MambaConfig::new(d_model, n_layer, vocab, 16);
        c.d_state = self.usize_in(self.obj, "state_size")?.unwrap_or(16);
        c.d_conv = self.usize_in(self.obj, "conv_kernel")?.unwrap_or(4);
        c.expand = expand;
        c.d_inner = self
            .usize_in(self.obj, "intermediate_size")?
            .unwrap_or(expand.saturating_mul(d_model));
        c.dt_rank = self.rank(self.obj, "time_step_rank", d_model)?;
        // transformers' own defaults where the file is silent.
        c.proj_bias = self.bool_or(self.obj, "use_bias", false)?;
        c.conv_bias = self.bool_or(self.obj, "use_conv_bias", true)?;
        c.norm_eps = self.f64_or(self.obj, "layer_norm_epsilon", 1e-5)?;
        c.residual_in_fp32 = self.bool_or(self.obj, "residual_in_fp32", true)?;
        c.tie_embeddings = self.bool_or(self.obj, "tie_word_embeddings", true)?;
        c.dt_min = self.f64_or(self.obj, "time_step_min", 0.001)?;
        c.dt_max = self.f64_or(self.obj, "time_step_max", 0.1)?;
        c.dt_init_floor = self.f64_or(self.obj, "time_step_floor", 1e-4)?;
        if self.obj.get("model_type").and_then(Value::as_str) == Some("mamba2") {
            // transformers' Mamba2Config defaults
            c.d_state = self.usize_in(self.obj, "state_size")?.unwrap_or(128);
            c.tie_embeddings = self.bool_or(self.obj, "tie_word_embeddings", false)?;
            let mut ssd = SsdConfig::new(
                self.usize_in(self.obj, "head_dim")?.unwrap_or(64),
                self.usize_in(self.obj, "n_groups")?.unwrap_or(8),
            );
            ssd.chunk_size = self.usize_in(self.obj, "chunk_size")?.unwrap_or(256);
            ssd.dt_limit = self.limit(self.obj, "time_step_limit")?;
            if let Some(h) = self.usize_in(self.obj, "num_heads")? {
                if ssd.head_dim.checked_mul(h) != Some(c.d_inner) {
                    return Err(self.err(
                        "num_heads",
                        format!(
                            "{h} heads of head_dim {} are not intermediate size {}",
                            ssd.head_dim, c.d_inner
                        ),
                    ));
                }
            }
            c.ssd = Some(ssd);
        }
        if self.obj.get("model_type").and_then(Value::as_str) == Some("falcon_mamba") {
            // transformers' FalconMambaConfig default
            c.dt_bc_rms_eps = Some(self.f64_or(self.obj, "mixer_rms_eps", 1e-6)?);
        }
        Ok(c)
    }
}

impl Reader<'_> {
    /// transformers `LlamaConfig` (configuration_llama.py), the
    /// Transformer++ baseline: multi-head attention (num_key_value_heads =
    /// num_attention_heads), no biases, SiLU, rotary positions with the
    /// default rope type (theta as `rope_theta`, or in `rope_parameters`
    /// as transformers 5 writes it). `"position_embedding": "learned"` is
    /// this library's extension (not loadable by transformers).
    fn llama(&self) -> Result<TransformerConfig> {
        let d_model = self.usize_req("hidden_size")?;
        let n_layer = self.usize_req("num_hidden_layers")?;
        let vocab = self.usize_req("vocab_size")?;
        let n_head = self.usize_req("num_attention_heads")?;
        if n_head == 0 {
            return Err(self.err("num_attention_heads", "must be at least 1"));
        }
        let mut c = TransformerConfig::new(d_model, n_layer, vocab, n_head);
        c.d_ff = self.usize_req("intermediate_size")?;
        c.head_dim = self
            .usize_in(self.obj, "head_dim")?
            .unwrap_or(d_model / n_head);
        if let Some(kv) = self.usize_in(self.obj, "num_key_value_heads")? {
            if kv != n_head {
                return Err(self.err(
                    "num_key_value_heads",
                    format!(
                        "{kv} is not num_attention_heads {n_head}: grouped-query attention is not supported"
                    ),
                ));
            }
        }
        for field in ["attention_bias", "mlp_bias"] {
            if self.bool_or(self.obj, field, false)? {
                return Err(self.err(field, "biases are not supported (Llama has none)"));
            }
        }
        match self.obj.get("hidden_act") {
            None | Some(Value::Null) => {}
            Some(Value::String(a)) if a == "silu" => {}
            Some(v) => {
                return Err(self.err(
                    "hidden_act",
                    format!("only \"silu\" is supported, found {v}"),
                ))
            }
        }
        c.norm_eps = self.f64_or(self.obj, "rms_norm_eps", 1e-6)?;
        c.tie_embeddings = self.bool_or(self.obj, "tie_word_embeddings", false)?;
        c.max_position_embeddings = self
            .usize_in(self.obj, "max_position_embeddings")?
            .unwrap_or(2048);
        c.rope_theta = self.f64_or(self.obj, "rope_theta", 10000.0)?;
        for field in ["rope_parameters", "rope_scaling"] {
            match self.obj.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::Object(rope)) => {
                    if let Some(t) = rope.get("rope_type").or(rope.get("type")) {
                        if t.as_str() != Some("default") {
                            return Err(self.err(
                                field,
                                format!("rope type {t} is not supported (only \"default\")"),
                            ));
                        }
                    }
                    c.rope_theta = self.f64_or(rope, "rope_theta", c.rope_theta)?;
                }
                Some(v) => return Err(self.err(field, format!("expected an object, found {v}"))),
            }
        }
        c.positions = match self.obj.get("position_embedding") {
            None | Some(Value::Null) => Positions::Rotary,
            Some(Value::String(p)) => p
                .parse()
                .map_err(|e: Error| self.err("position_embedding", e))?,
            Some(v) => {
                return Err(self.err(
                    "position_embedding",
                    format!("expected a string, found {v}"),
                ))
            }
        };
        Ok(c)
    }
}

impl TransformerConfig {
    /// Parses a transformers Llama `config.json`; `source` names the file
    /// in errors.
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let value = parse_object(text, source)?;
        let obj = value.as_object().expect("checked to be an object");
        let config = Reader { obj, source }.llama()?;
        config.validate().map_err(|e| Error::Format {
            file: source.to_string(),
            message: e.to_string(),
        })?;
        Ok(config)
    }

    /// The `config.json` that transformers' `LlamaForCausalLM` reads
    /// (learned positions add this library's `position_embedding` key,
    /// which transformers does not know).
    pub fn to_hugging_face_json(&self) -> Value {
        let mut v = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_head,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "pretraining_tp": 1,
            "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": 0.02,
            "use_cache": true,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
            "torch_dtype": "float32",
        });
        if self.positions == Positions::Learned {
            v["position_embedding"] = "learned".into();
        }
        v
    }
}

/// The architecture a `config.json` describes (and a training run's
/// `arch` setting, spelled "mamba" or "transformer").
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Mamba,
    /// Mamba-2: the block with the SSD mixer.
    Mamba2,
    /// Llama, the Transformer++ baseline.
    Transformer,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Mamba => "mamba",
            Architecture::Mamba2 => "mamba2",
            Architecture::Transformer => "transformer",
        }
    }

    /// Which of the two a config.json is: `model_type` "llama" (or
    /// architectures LlamaForCausalLM) is the Transformer, anything else
    /// is read as Mamba (whose reader refuses what it does not know).
    pub fn of_config(text: &str, source: &str) -> Result<Self> {
        let value = parse_object(text, source)?;
        let obj = value.as_object().expect("checked to be an object");
        let llama = obj.get("model_type").and_then(Value::as_str) == Some("llama")
            || obj
                .get("architectures")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|n| n.as_str() == Some("LlamaForCausalLM")));
        Ok(if llama {
            Architecture::Transformer
        } else {
            Architecture::Mamba
        })
    }
}

impl std::str::FromStr for Architecture {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "mamba" => Ok(Architecture::Mamba),
            "mamba2" => Ok(Architecture::Mamba2),
            "transformer" | "llama" => Ok(Architecture::Transformer),
            _ => Err(invalid(
                "arch",
                format!("unknown architecture {s:?} (expected mamba, mamba2 or transformer)"),
            )),
        }
    }
}

/// JSON text that must be an object.
fn parse_object(text: &str, source: &str) -> Result<Value> {
    let value: Value = serde_json::from_str(text).map_err(|e| Error::Format {
        file: source.to_string(),
        message: format!("not valid JSON: {e}"),
    })?;
    if !value.is_object() {
        return Err(Error::Format {
            file: source.to_string(),
            message: "the top level is not a JSON object".into(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_130m_config() {
        let text = r#"{"d_model":768,"n_layer":24,"vocab_size":50277,"ssm_cfg":{},"rms_norm":true,
            "residual_in_fp32":true,"fused_add_norm":true,"pad_vocab_size_multiple":8}"#;
        let (c, f) = MambaConfig::from_json_str(text, "config.json").unwrap();
        assert_eq!(f, ConfigFormat::Original);
        assert_eq!(c, MambaConfig::mamba_130m());
        assert_eq!(c.vocab_size, 50280);
        assert_eq!(c.dt_rank, 48);
        assert_eq!(c.d_inner, 1536);
        // 129.1M parameters, tied head (docs/DESIGN.md §7.5).
        assert_eq!((c.n_params() as f64 / 1e5).round() / 10.0, 129.1);
    }

    #[test]
    fn hugging_face_config() {
        let text = r#"{"hidden_size":768,"num_hidden_layers":24,"vocab_size":50280,"state_size":16,
            "conv_kernel":4,"expand":2,"intermediate_size":1536,"time_step_rank":48,"use_bias":false,
            "use_conv_bias":true,"layer_norm_epsilon":1e-5,"residual_in_fp32":true,"tie_word_embeddings":true}"#;
        let (c, f) = MambaConfig::from_json_str(text, "config.json").unwrap();
        assert_eq!(f, ConfigFormat::HuggingFace);
        assert_eq!(c, MambaConfig::mamba_130m());
        // Round trip through our own writer.
        let back = c.to_hugging_face_json().to_string();
        assert_eq!(MambaConfig::from_json_str(&back, "x").unwrap().0, c);
    }

    #[test]
    fn falcon_mamba_config() {
        // tiiuae/falcon-mamba-7b's config.json, abridged (its `expand` 16
        // disagrees with intermediate_size, which wins)
        let text = r#"{"architectures":["FalconMambaForCausalLM"],"model_type":"falcon_mamba",
            "hidden_size":4096,"num_hidden_layers":64,"vocab_size":65024,"state_size":16,
            "conv_kernel":4,"expand":16,"intermediate_size":8192,"time_step_rank":256,
            "use_bias":false,"use_conv_bias":true,"layer_norm_epsilon":1e-5,
            "mixer_rms_eps":1e-6,"tie_word_embeddings":false}"#;
        let (c, _) = MambaConfig::from_json_str(text, "config.json").unwrap();
        assert_eq!(c.dt_bc_rms_eps, Some(1e-6));
        assert_eq!((c.d_inner, c.dt_rank, c.tie_embeddings), (8192, 256, false));
        let back = c.to_hugging_face_json();
        assert_eq!(back["model_type"], "falcon_mamba");
        assert_eq!(
            MambaConfig::from_json_str(&back.to_string(), "x")
                .unwrap()
                .0,
            c
        );
        // transformers' default ε when the field is absent
        let text = r#"{"model_type":"falcon_mamba","hidden_size":16,"num_hidden_layers":2,
            "vocab_size":10}"#;
        let (c, _) = MambaConfig::from_json_str(text, "config.json").unwrap();
        assert_eq!(c.dt_bc_rms_eps, Some(1e-6));
        // a plain Mamba has none
        let text = r#"{"model_type":"mamba","hidden_size":16,"num_hidden_layers":2,
            "vocab_size":10,"mixer_rms_eps":1e-6}"#;
        assert_eq!(
            MambaConfig::from_json_str(text, "x")
                .unwrap()
                .0
                .dt_bc_rms_eps,
            None
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (
                r#"{"hidden_size":0,"num_hidden_layers":2,"vocab_size":10}"#,
                "d_model",
            ),
            (r#"{"hidden_size":16,"vocab_size":10}"#, "num_hidden_layers"),
            (
                r#"{"hidden_size":16,"num_hidden_layers":2,"vocab_size":"ten"}"#,
                "vocab_size",
            ),
            (
                r#"{"d_model":16,"n_layer":2,"vocab_size":10,"ssm_cfg":{"d_state":-1}}"#,
                "d_state",
            ),
            (
                r#"{"hidden_size":16,"num_hidden_layers":2,"vocab_size":10,"time_step_rank":"big"}"#,
                "time_step_rank",
            ),
            (r#"{"foo":1}"#, "hidden_size"),
            ("{not json", "JSON"),
        ];
        for (text, needle) in cases {
            let msg = MambaConfig::from_json_str(text, "dir/config.json")
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(needle) && msg.contains("dir/config.json"),
                "{text}: {msg}"
            );
        }
    }
}

/// The most parameters a configuration may have: 2^40 (4 TiB of f32; the
/// largest Mamba has 2.8e9) is far past any model, and far below where
/// products of sizes in u128 could overflow.
pub const MAX_PARAMETERS: u128 = 1 << 40;

/// The one gate for sizes that a file gives (config.json, task-model.json),
/// passed before anything of those sizes is allocated or multiplied in
/// `usize`: each size is at most [`MAX_PARAMETERS`], and so is the
/// parameter count, which `count` computes in u128 (no product of sizes
/// that passed the first check can overflow it). The error names every
/// size.
pub fn check_sizes(
    op: &'static str,
    sizes: &[(&str, usize)],
    count: impl FnOnce() -> u128,
) -> Result<()> {
    let listed = || {
        sizes
            .iter()
            .map(|(name, v)| format!("{name} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some((name, v)) = sizes.iter().find(|(_, v)| *v as u128 > MAX_PARAMETERS) {
        return Err(invalid(
            op,
            format!(
                "`{name}` {v} is larger than any model ({MAX_PARAMETERS} parameters at most; {})",
                listed()
            ),
        ));
    }
    let count = count();
    if count > MAX_PARAMETERS {
        return Err(invalid(
            op,
            format!(
                "these sizes make {count} parameters, more than the {MAX_PARAMETERS} this \
                 library accepts ({})",
                listed()
            ),
        ));
    }
    Ok(())
}

/// The architectures this library reads, as config.json names them.
pub const SUPPORTED_ARCHITECTURES: &str = "model_type \"mamba\" (architectures MambaForCausalLM, \
MambaModel, MambaLMHeadModel), \"mamba2\" (Mamba2ForCausalLM, Mamba2Model), \"falcon_mamba\" \
(FalconMambaForCausalLM, FalconMambaModel), a state-spaces config.json without model_type (ssm_cfg \
layer Mamba1 or Mamba2), or model_type \"llama\" (LlamaForCausalLM, the \
Transformer++ baseline)";

/// `model_type` and `architectures`, when given, must name Mamba-1,
/// Mamba-2 or Falcon-Mamba: another model read as one of them would load
/// its tensors under wrong equations or fail later with a puzzling shape
/// error.
fn check_model_type(obj: &serde_json::Map<String, Value>, source: &str) -> Result<()> {
    let refuse = |what: String| {
        Err(Error::Format {
            file: source.to_string(),
            message: format!("{what} is not supported; supported: {SUPPORTED_ARCHITECTURES}"),
        })
    };
    match obj.get("model_type") {
        None => {}
        Some(Value::String(t)) if matches!(t.as_str(), "mamba" | "falcon_mamba" | "mamba2") => {}
        Some(Value::String(t)) if t == "llama" => {
            return Err(Error::Format {
                file: source.to_string(),
                message: "model_type \"llama\" is a Transformer, not a Mamba model: read it \
                          with Transformer::from_dir (the command line tells the two apart)"
                    .into(),
            })
        }
        Some(other) => return refuse(format!("model_type {other}")),
    }
    match obj.get("architectures") {
        None | Some(Value::Null) => {}
        Some(Value::Array(names)) => {
            for name in names {
                let known = matches!(
                    name.as_str(),
                    Some(
                        "MambaForCausalLM"
                            | "MambaModel"
                            | "MambaLMHeadModel"
                            | "FalconMambaForCausalLM"
                            | "FalconMambaModel"
                            | "Mamba2ForCausalLM"
                            | "Mamba2Model"
                    )
                );
                if !known {
                    return refuse(format!("architecture {name}"));
                }
            }
        }
        Some(other) => return refuse(format!("architectures {other}")),
    }
    Ok(())
}
