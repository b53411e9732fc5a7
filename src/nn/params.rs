//! The parameters of a Mamba language model, as a small tree of structs that
//! mirrors the checkpoint's names (Hugging Face layout, docs/DESIGN.md §7.3).
//! The same tree holds gradients and optimiser moments.

use super::config::MambaConfig;

/// One Mamba mixer (`backbone.layers.{i}.mixer`). E = d_inner, D = d_model,
/// N = d_state, R = dt_rank, K = d_conv.
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
    /// (E)
    pub dt_proj_bias: Vec<T>,
    /// (E, N); A = -exp(A_log)
    pub a_log: Vec<T>,
    /// (E)
    pub d: Vec<T>,
    /// (D, E)
    pub out_proj_weight: Vec<T>,
    /// (D), only when `proj_bias`
    pub out_proj_bias: Option<Vec<T>>,
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

impl<T: Clone> MambaParams<T> {
    /// Every tensor with its name, shape and kind, in a fixed order.
    pub fn tensors(&self, c: &MambaConfig) -> Vec<(ParamInfo, &Vec<T>)> {
        let mut out = Vec::new();
        visit(c, |info, sel| {
            let t = match sel {
                Sel::Embedding => Some(&self.embedding),
                Sel::NormF => Some(&self.norm_f_weight),
                Sel::NormFBias => self.norm_f_bias.as_ref(),
                Sel::LmHead => self.lm_head.as_ref(),
                Sel::Layer(i, f) => layer_field(&self.layers[i], f),
            };
            if let Some(t) = t {
                out.push((info, t));
            }
        });
        out
    }

    /// Mutable access to every tensor, in the order of [`Self::tensors`].
    pub fn tensors_mut(&mut self, c: &MambaConfig) -> Vec<(ParamInfo, &mut Vec<T>)> {
        let mut infos = Vec::new();
        visit(c, |info, sel| infos.push((info, sel)));
        let MambaParams {
            embedding,
            layers,
            norm_f_weight,
            norm_f_bias,
            lm_head,
        } = self;
        let mut emb = Some(embedding);
        let mut nf = Some(norm_f_weight);
        let mut nfb = norm_f_bias.as_mut();
        let mut head = lm_head.as_mut();
        let mut layer_fields: Vec<Vec<Option<&mut Vec<T>>>> =
            layers.iter_mut().map(layer_fields_mut).collect();
        let mut out = Vec::new();
        for (info, sel) in infos {
            let t = match sel {
                Sel::Embedding => emb.take(),
                Sel::NormF => nf.take(),
                Sel::NormFBias => nfb.take(),
                Sel::LmHead => head.take(),
                Sel::Layer(i, f) => layer_fields[i][f as usize].take(),
            };
            if let Some(t) = t {
                out.push((info, t));
            }
        }
        out
    }

    /// A tree of the same shape filled with `value`.
    pub fn filled<U: Clone>(&self, value: U) -> MambaParams<U> {
        let f = |v: &Vec<T>| vec![value.clone(); v.len()];
        let fo = |v: &Option<Vec<T>>| v.as_ref().map(f);
        MambaParams {
            embedding: f(&self.embedding),
            layers: self
                .layers
                .iter()
                .map(|l| LayerParams {
                    norm_weight: f(&l.norm_weight),
                    norm_bias: fo(&l.norm_bias),
                    mixer: MixerParams {
                        in_proj_weight: f(&l.mixer.in_proj_weight),
                        in_proj_bias: fo(&l.mixer.in_proj_bias),
                        conv1d_weight: f(&l.mixer.conv1d_weight),
                        conv1d_bias: fo(&l.mixer.conv1d_bias),
                        x_proj_weight: f(&l.mixer.x_proj_weight),
                        dt_proj_weight: f(&l.mixer.dt_proj_weight),
                        dt_proj_bias: f(&l.mixer.dt_proj_bias),
                        a_log: f(&l.mixer.a_log),
                        d: f(&l.mixer.d),
                        out_proj_weight: f(&l.mixer.out_proj_weight),
                        out_proj_bias: fo(&l.mixer.out_proj_bias),
                    },
                })
                .collect(),
            norm_f_weight: f(&self.norm_f_weight),
            norm_f_bias: fo(&self.norm_f_bias),
            lm_head: fo(&self.lm_head),
        }
    }
}

/// Which tensor a name refers to.
#[derive(Clone, Copy, Debug)]
enum Sel {
    Embedding,
    NormF,
    NormFBias,
    LmHead,
    Layer(usize, LayerField),
}

#[derive(Clone, Copy, Debug)]
enum LayerField {
    Norm = 0,
    NormBias,
    InProj,
    InProjBias,
    Conv,
    ConvBias,
    XProj,
    DtProj,
    DtBias,
    ALog,
    D,
    OutProj,
    OutProjBias,
}

fn layer_field<T>(l: &LayerParams<T>, f: LayerField) -> Option<&Vec<T>> {
    let m = &l.mixer;
    match f {
        LayerField::Norm => Some(&l.norm_weight),
        LayerField::NormBias => l.norm_bias.as_ref(),
        LayerField::InProj => Some(&m.in_proj_weight),
        LayerField::InProjBias => m.in_proj_bias.as_ref(),
        LayerField::Conv => Some(&m.conv1d_weight),
        LayerField::ConvBias => m.conv1d_bias.as_ref(),
        LayerField::XProj => Some(&m.x_proj_weight),
        LayerField::DtProj => Some(&m.dt_proj_weight),
        LayerField::DtBias => Some(&m.dt_proj_bias),
        LayerField::ALog => Some(&m.a_log),
        LayerField::D => Some(&m.d),
        LayerField::OutProj => Some(&m.out_proj_weight),
        LayerField::OutProjBias => m.out_proj_bias.as_ref(),
    }
}

/// The fields of a layer in [`LayerField`] order.
fn layer_fields_mut<T>(l: &mut LayerParams<T>) -> Vec<Option<&mut Vec<T>>> {
    let m = &mut l.mixer;
    vec![
        Some(&mut l.norm_weight),
        l.norm_bias.as_mut(),
        Some(&mut m.in_proj_weight),
        m.in_proj_bias.as_mut(),
        Some(&mut m.conv1d_weight),
        m.conv1d_bias.as_mut(),
        Some(&mut m.x_proj_weight),
        Some(&mut m.dt_proj_weight),
        Some(&mut m.dt_proj_bias),
        Some(&mut m.a_log),
        Some(&mut m.d),
        Some(&mut m.out_proj_weight),
        m.out_proj_bias.as_mut(),
    ]
}

/// Calls `f` for every parameter the configuration has, with its name,
/// checkpoint shape and kind.
fn visit(c: &MambaConfig, mut f: impl FnMut(ParamInfo, Sel)) {
    let (d, e, n, r, k, v) = (
        c.d_model,
        c.d_inner,
        c.d_state,
        c.dt_rank,
        c.d_conv,
        c.vocab_size,
    );
    let mut p = |name: String, shape: Vec<usize>, kind: ParamKind, sel: Sel| {
        f(ParamInfo { name, shape, kind }, sel)
    };
    p(
        "backbone.embeddings.weight".into(),
        vec![v, d],
        ParamKind::Embedding,
        Sel::Embedding,
    );
    for i in 0..c.n_layer {
        let pre = format!("backbone.layers.{i}");
        let l = |f: LayerField| Sel::Layer(i, f);
        p(
            format!("{pre}.norm.weight"),
            vec![d],
            ParamKind::Norm,
            l(LayerField::Norm),
        );
        if !c.rms_norm {
            p(
                format!("{pre}.norm.bias"),
                vec![d],
                ParamKind::Norm,
                l(LayerField::NormBias),
            );
        }
        let m = format!("{pre}.mixer");
        p(
            format!("{m}.A_log"),
            vec![e, n],
            ParamKind::Ssm,
            l(LayerField::ALog),
        );
        p(format!("{m}.D"), vec![e], ParamKind::Ssm, l(LayerField::D));
        p(
            format!("{m}.conv1d.weight"),
            vec![e, 1, k],
            ParamKind::Weight,
            l(LayerField::Conv),
        );
        if c.conv_bias {
            p(
                format!("{m}.conv1d.bias"),
                vec![e],
                ParamKind::Bias,
                l(LayerField::ConvBias),
            );
        }
        p(
            format!("{m}.in_proj.weight"),
            vec![2 * e, d],
            ParamKind::Weight,
            l(LayerField::InProj),
        );
        if c.proj_bias {
            p(
                format!("{m}.in_proj.bias"),
                vec![2 * e],
                ParamKind::Bias,
                l(LayerField::InProjBias),
            );
        }
        p(
            format!("{m}.x_proj.weight"),
            vec![r + 2 * n, e],
            ParamKind::Weight,
            l(LayerField::XProj),
        );
        p(
            format!("{m}.dt_proj.weight"),
            vec![e, r],
            ParamKind::Weight,
            l(LayerField::DtProj),
        );
        p(
            format!("{m}.dt_proj.bias"),
            vec![e],
            ParamKind::Bias,
            l(LayerField::DtBias),
        );
        p(
            format!("{m}.out_proj.weight"),
            vec![d, e],
            ParamKind::Weight,
            l(LayerField::OutProj),
        );
        if c.proj_bias {
            p(
                format!("{m}.out_proj.bias"),
                vec![d],
                ParamKind::Bias,
                l(LayerField::OutProjBias),
            );
        }
    }
    p(
        "backbone.norm_f.weight".into(),
        vec![d],
        ParamKind::Norm,
        Sel::NormF,
    );
    if !c.rms_norm {
        p(
            "backbone.norm_f.bias".into(),
            vec![d],
            ParamKind::Norm,
            Sel::NormFBias,
        );
    }
    if !c.tie_embeddings {
        p(
            "lm_head.weight".into(),
            vec![v, d],
            ParamKind::Weight,
            Sel::LmHead,
        );
    }
}

impl<T: Clone + Default> MambaParams<T> {
    /// A tree of zeros with the shapes of `c`.
    pub fn zeros(c: &MambaConfig) -> Self {
        let (d, e, n, r, k, v) = (
            c.d_model,
            c.d_inner,
            c.d_state,
            c.dt_rank,
            c.d_conv,
            c.vocab_size,
        );
        let z = |len: usize| vec![T::default(); len];
        let zo = |yes: bool, len: usize| yes.then(|| vec![T::default(); len]);
        MambaParams {
            embedding: z(v * d),
            layers: (0..c.n_layer)
                .map(|_| LayerParams {
                    norm_weight: z(d),
                    norm_bias: zo(!c.rms_norm, d),
                    mixer: MixerParams {
                        in_proj_weight: z(2 * e * d),
                        in_proj_bias: zo(c.proj_bias, 2 * e),
                        conv1d_weight: z(e * k),
                        conv1d_bias: zo(c.conv_bias, e),
                        x_proj_weight: z((r + 2 * n) * e),
                        dt_proj_weight: z(e * r),
                        dt_proj_bias: z(e),
                        a_log: z(e * n),
                        d: z(e),
                        out_proj_weight: z(d * e),
                        out_proj_bias: zo(c.proj_bias, d),
                    },
                })
                .collect(),
            norm_f_weight: z(d),
            norm_f_bias: zo(!c.rms_norm, d),
            lm_head: zo(!c.tie_embeddings, v * d),
        }
    }
}
