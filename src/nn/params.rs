//! The parameters of a Mamba language model, as a small tree of structs that
//! mirrors the checkpoint's names (Hugging Face layout, docs/DESIGN.md §7.3).
//! The same tree holds gradients and optimiser moments.

use super::config::MambaConfig;

/// One Mamba mixer (`backbone.layers.{i}.mixer`). E = d_inner, D = d_model,
/// N = d_state, R = dt_rank, K = d_conv. The same tree holds a Mamba-2
/// mixer (H heads, G groups, C = E + 2GN conv channels): in_proj (2E + 2GN
/// + H, D) with rows z, x, B, C, Δ; conv1d (C, K); `dt_bias`, A_log and D
/// (H) each; the gated norm's weight (E); no x_proj or dt_proj (left empty).
#[derive(Clone, Debug, PartialEq)]
pub struct MixerParams<T> {
    /// (2E, D): rows 0..E give x, rows E..2E give z
    pub in_proj_weight: Vec<T>,
    /// (2E), only when `proj_bias`
    pub in_proj_bias: Option<Vec<T>>,
    /// (E, K); the checkpoint stores (E, 1, K)
    pub conv1d_weight: Vec<T>,
    /// (E), when `conv_bias`
    pub conv1d_bias: Option<Vec<T>>,
    /// (R + 2N, E): rows give dt_low, then B, then C
    pub x_proj_weight: Vec<T>,
    /// (E, R)
    pub dt_proj_weight: Vec<T>,
    /// (E); Mamba-2: `dt_bias` (H). Added to Δ before the softplus.
    pub dt_proj_bias: Vec<T>,
    /// (E, N); A = -exp(A_log)
    pub a_log: Vec<T>,
    /// (E)
    pub d: Vec<T>,
    /// (D, E)
    pub out_proj_weight: Vec<T>,
    /// (D), only when `proj_bias`
    pub out_proj_bias: Option<Vec<T>>,
    /// Mamba-2's gated RMSNorm weight (E) (`mixer.norm.weight`); None for Mamba-1.
    pub norm_weight: Option<Vec<T>>,
}

/// One residual block (`backbone.layers.{i}`).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerParams<T> {
    /// (D)
    pub norm_weight: Vec<T>,
    /// (D), LayerNorm only
    pub norm_bias: Option<Vec<T>>,
    pub mixer: MixerParams<T>,
}

/// The whole model.
#[derive(Clone, Debug, PartialEq)]
pub struct MambaParams<T> {
    /// (V, D), also the output head when embeddings are tied
    pub embedding: Vec<T>,
    pub layers: Vec<LayerParams<T>>,
    /// (D)
    pub norm_f_weight: Vec<T>,
    /// (D), LayerNorm only
    pub norm_f_bias: Option<Vec<T>>,
    /// (V, D), only when the head is not tied
    pub lm_head: Option<Vec<T>>,
}

/// What kind of parameter a tensor is, for weight-decay groups and
/// initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Matrices of linear layers and the conv kernel: weight decay applies.
    Weight,
    Bias,
    Norm,
    Embedding,
    /// A_log and D: no weight decay (official `_no_weight_decay`).
    Ssm,
}

/// Name, shape and kind of one parameter tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    /// The Hugging Face name, e.g. `backbone.layers.0.mixer.in_proj.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

/// The one declaration of the tree: every tensor's checkpoint name, shape
/// and kind beside the field that holds it, in checkpoint order. Expanded
/// twice, over `&` and `&mut` (`[$($m)?]`, `$iter`, `$opt` choose which);
/// `$f(info, tensor)` is called for each tensor the tree holds (optional
/// ones only when present: [`MambaParams::zeros`] decides which from the
/// configuration).
macro_rules! for_each_tensor {
    ($params:expr, $config:expr, [$($m:tt)?], $iter:ident, $opt:ident, $f:expr) => {{
        let c: &MambaConfig = $config;
        let (d, e, n, r, k, v) = (c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_conv, c.vocab_size);
        let p = $params;
        let mut f = $f;
        let mut t = |name: String, shape: Vec<usize>, kind: ParamKind, tensor| {
            f(ParamInfo { name, shape, kind }, tensor)
        };
        use ParamKind::{Bias, Embedding, Norm, Ssm, Weight};
        t("backbone.embeddings.weight".into(), vec![v, d], Embedding, & $($m)? p.embedding);
        for (i, l) in p.layers.$iter().enumerate() {
            let pre = format!("backbone.layers.{i}");
            t(format!("{pre}.norm.weight"), vec![d], Norm, & $($m)? l.norm_weight);
            if let Some(b) = l.norm_bias.$opt() {
                t(format!("{pre}.norm.bias"), vec![d], Norm, b);
            }
            let x = & $($m)? l.mixer;
            // Mamba-2: one A, D and dt bias per head, the conv over (x, B, C)
            let (ssm_rows, ssm_cols) = if c.ssd.is_some() { (c.n_heads(), 0) } else { (e, n) };
            let ssm_shape = |cols: usize| if cols == 0 { vec![ssm_rows] } else { vec![ssm_rows, cols] };
            let (conv, in_rows) = (c.conv_channels(), c.in_proj_rows());
            t(format!("{pre}.mixer.A_log"), ssm_shape(ssm_cols), Ssm, & $($m)? x.a_log);
            t(format!("{pre}.mixer.D"), vec![ssm_rows], Ssm, & $($m)? x.d);
            t(format!("{pre}.mixer.conv1d.weight"), vec![conv, 1, k], Weight, & $($m)? x.conv1d_weight);
            if let Some(b) = x.conv1d_bias.$opt() {
                t(format!("{pre}.mixer.conv1d.bias"), vec![conv], Bias, b);
            }
            t(format!("{pre}.mixer.in_proj.weight"), vec![in_rows, d], Weight, & $($m)? x.in_proj_weight);
            if let Some(b) = x.in_proj_bias.$opt() {
                t(format!("{pre}.mixer.in_proj.bias"), vec![in_rows], Bias, b);
            }
            if c.ssd.is_some() {
                t(format!("{pre}.mixer.dt_bias"), vec![ssm_rows], Bias, & $($m)? x.dt_proj_bias);
            } else {
                t(format!("{pre}.mixer.x_proj.weight"), vec![r + 2 * n, e], Weight, & $($m)? x.x_proj_weight);
                t(format!("{pre}.mixer.dt_proj.weight"), vec![e, r], Weight, & $($m)? x.dt_proj_weight);
                t(format!("{pre}.mixer.dt_proj.bias"), vec![e], Bias, & $($m)? x.dt_proj_bias);
            }
            if let Some(w) = x.norm_weight.$opt() {
                t(format!("{pre}.mixer.norm.weight"), vec![e], Norm, w);
            }
            t(format!("{pre}.mixer.out_proj.weight"), vec![d, e], Weight, & $($m)? x.out_proj_weight);
            if let Some(b) = x.out_proj_bias.$opt() {
                t(format!("{pre}.mixer.out_proj.bias"), vec![d], Bias, b);
            }
        }
        t("backbone.norm_f.weight".into(), vec![d], Norm, & $($m)? p.norm_f_weight);
        if let Some(b) = p.norm_f_bias.$opt() {
            t("backbone.norm_f.bias".into(), vec![d], Norm, b);
        }
        if let Some(h) = p.lm_head.$opt() {
            t("lm_head.weight".into(), vec![v, d], Weight, h);
        }
    }};
}

impl<T> MambaParams<T> {
    /// Every tensor with its name, shape and kind, in a fixed order.
    pub fn tensors<'a>(&'a self, c: &MambaConfig) -> Vec<(ParamInfo, &'a Vec<T>)> {
        let mut out = Vec::new();
        for_each_tensor!(self, c, [], iter, as_ref, |info, t: &'a Vec<T>| out
            .push((info, t)));
        out
    }

    /// Mutable access to every tensor, in the order of [`Self::tensors`].
    pub fn tensors_mut<'a>(&'a mut self, c: &MambaConfig) -> Vec<(ParamInfo, &'a mut Vec<T>)> {
        let mut out = Vec::new();
        for_each_tensor!(self, c, [mut], iter_mut, as_mut, |info, t: &'a mut Vec<T>| out
            .push((info, t)));
        out
    }
}

impl<T> MambaParams<T> {
    /// The tree of `c` with every tensor empty (nothing allocated): the
    /// optional tensors present as the configuration says.
    fn skeleton(c: &MambaConfig) -> Self {
        let opt = |present: bool| present.then(Vec::new);
        MambaParams {
            embedding: Vec::new(),
            layers: (0..c.n_layer)
                .map(|_| LayerParams {
                    norm_weight: Vec::new(),
                    norm_bias: opt(!c.rms_norm),
                    mixer: MixerParams {
                        in_proj_weight: Vec::new(),
                        in_proj_bias: opt(c.proj_bias),
                        conv1d_weight: Vec::new(),
                        conv1d_bias: opt(c.conv_bias),
                        x_proj_weight: Vec::new(),
                        dt_proj_weight: Vec::new(),
                        dt_proj_bias: Vec::new(),
                        a_log: Vec::new(),
                        d: Vec::new(),
                        out_proj_weight: Vec::new(),
                        out_proj_bias: opt(c.proj_bias),
                        norm_weight: opt(c.ssd.is_some()),
                    },
                })
                .collect(),
            norm_f_weight: Vec::new(),
            norm_f_bias: opt(!c.rms_norm),
            lm_head: opt(!c.tie_embeddings),
        }
    }

    /// Name, shape and kind of every tensor of `c`, in the order of
    /// [`Self::tensors`], without allocating any: what a loader checks a
    /// file against before it allocates.
    pub fn infos(c: &MambaConfig) -> Vec<ParamInfo> {
        let skeleton = MambaParams::<T>::skeleton(c);
        skeleton
            .tensors(c)
            .into_iter()
            .map(|(info, _)| info)
            .collect()
    }
}

impl<T: Clone + Default> MambaParams<T> {
    /// A tree of zeros with the shapes of `c`: the optional tensors present
    /// as the configuration says, every size from the declaration above.
    pub fn zeros(c: &MambaConfig) -> Self {
        let mut p = Self::skeleton(c);
        for (info, t) in p.tensors_mut(c) {
            t.resize(info.shape.iter().product(), T::default());
        }
        p
    }

    /// A tree of the same shapes with every value `value`.
    pub fn filled(&self, c: &MambaConfig, value: T) -> Self {
        let mut out = self.clone();
        for (_, t) in out.tensors_mut(c) {
            t.fill(value.clone());
        }
        out
    }
}
