//! The Mamba language model (docs/DESIGN.md §6, §7): forward and backward over
//! batches of token sequences, loading, saving and initialisation.
//!
//! ```text
//! h = E[ids]                                              (BL, D)
//! per layer:  u = norm(h)                                 (BL, D)
//!             x = u W_inxᵀ,  z = u W_inzᵀ                  (BL, E) each
//!             xs = silu(conv1d(x) + b_conv)               (BL, E)
//!             dt_low, B, C = xs W_xᵀ  split [R, N, N]       (BL, R), (BL, N), (BL, N)
//!             delta = dt_low W_dtᵀ                         (BL, E)   (bias and softplus in the scan)
//!             y = selective_scan(xs, delta, -exp(A_log), B, C, D, z, b_dt)   (BL, E)
//!             h = h + y W_outᵀ                             (BL, D)
//! logits = norm_f(h) Eᵀ                                   (BL, V)
//! ```
//! BL = batch · len rows, token-major. The residual stream h stays in the
//! compute type (f32 or f64), as the official `residual_in_fp32`.

use std::path::Path;

use super::block::{
    norm_backward, norm_forward, Block, BlockCache, BlockGradients, BlockScalar, ChunkBuffers,
    Conv, Dense, Mixer, MixerGradients, Values, S6,
};
use super::config::MambaConfig;
use super::params::{LayerParams, MambaParams, ParamInfo};
use crate::error::{invalid, Error, Result};
use crate::io::torch::TorchCheckpoint;
use crate::io::{
    encode, write_atomically, write_safetensors, DType, SafetensorsFile, TensorSource,
};
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
    /// Loads `dir/config.json` (either dialect) and the weights:
    /// `model.safetensors`, a sharded `model.safetensors.index.json`, or
    /// the original `pytorch_model.bin`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let (config, _) = MambaConfig::from_json_str(&text, &config_path.display().to_string())?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let torch = dir.join("pytorch_model.bin");
        if single.exists() {
            Self::from_source(config, &SafetensorsFile::open(&single)?)
        } else if index.exists() {
            Self::from_source(config, &ShardedSafetensors::open(&index)?)
        } else if torch.exists() {
            Self::from_source(config, &TorchCheckpoint::open(&torch)?)
        } else {
            Err(Error::Format {
                file: dir.display().to_string(),
                message: "no model.safetensors, model.safetensors.index.json or pytorch_model.bin in this directory"
                    .into(),
            })
        }
    }

    /// Builds the model from named tensors, checking every name, shape and
    /// dtype. Accepts both spellings of the embedding, a stored or absent
    /// tied head, conv1d weights as (E, 1, K) or (E, K), and an embedding
    /// with fewer rows than the padded vocabulary (padded with zeros).
    pub fn from_source(config: MambaConfig, source: &dyn TensorSource) -> Result<Self> {
        config.validate()?;
        let file = source.file().to_string();
        let mut params = MambaParams::<T>::zeros(&config);
        let mut used = std::collections::BTreeSet::new();
        for (info, dst) in params.tensors_mut(&config) {
            let aliases: &[&str] = if info.name == "backbone.embeddings.weight" {
                &["backbone.embeddings.weight", "backbone.embedding.weight"]
            } else {
                &[]
            };
            let names: Vec<&str> = if aliases.is_empty() {
                vec![info.name.as_str()]
            } else {
                aliases.to_vec()
            };
            let mut found = None;
            for name in &names {
                if let Some(t) = source.tensor(name)? {
                    found = Some((name.to_string(), t));
                    break;
                }
            }
            let (name, t) = found.ok_or_else(|| Error::Tensor {
                file: file.clone(),
                tensor: info.name.clone(),
                message: format!("missing (expected shape {:?})", info.shape),
            })?;
            used.insert(name.clone());
            let values = t.to_vec::<T>(&file, &name)?;
            let (t_shape, t_dtype) = (t.shape.clone(), t.dtype);
            drop(t);
            source.release(&name);
            let shape_err = || Error::Tensor {
                file: file.clone(),
                tensor: name.clone(),
                message: format!(
                    "expected shape {:?}, found {:?} ({})",
                    info.shape,
                    t_shape,
                    t_dtype.name()
                ),
            };
            if info.name == "backbone.embeddings.weight" {
                // Fewer stored rows than the padded vocabulary: pad with zeros.
                let ok = t_shape.len() == 2
                    && t_shape[1] == info.shape[1]
                    && t_shape[0] <= info.shape[0];
                if !ok {
                    return Err(shape_err());
                }
                dst[..values.len()].copy_from_slice(&values);
            } else {
                let conv_2d = info.shape.len() == 3 && t_shape == [info.shape[0], info.shape[2]];
                if t_shape != info.shape && !conv_2d {
                    return Err(shape_err());
                }
                dst.copy_from_slice(&values);
            }
        }
        for name in source.names() {
            if used.contains(&name) {
                continue;
            }
            // A tied head stored anyway (the official checkpoints do) is the embedding.
            if name == "lm_head.weight" && config.tie_embeddings {
                continue;
            }
            return Err(Error::Tensor {
                file,
                tensor: name,
                message: "is not a parameter of this configuration (check config.json)".into(),
            });
        }
        Ok(Self { config, params })
    }

    /// Writes `dir/config.json` (Hugging Face dialect) and
    /// `dir/model.safetensors` with the weights in `dtype`, each atomically.
    pub fn save(&self, dir: impl AsRef<Path>, dtype: DType) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)> = self
            .params
            .tensors(&self.config)
            .into_iter()
            .map(|(info, data)| (info.name, dtype, info.shape, encode(data, dtype)))
            .collect();
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write_safetensors(&dir.join("model.safetensors"), &tensors, Some(meta))?;
        let mut config = self.config.to_hugging_face_json();
        config["torch_dtype"] = match dtype {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F64 => "float64",
        }
        .into();
        let text = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
        write_atomically(&dir.join("config.json"), text.as_bytes())
    }

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
                a: Values::Owned(m.a_log.iter().map(|&v| -v.exp()).collect()),
                d: &m.d,
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
        for layer in p.layers.iter_mut() {
            layer.norm_weight = vec![T::ONE; d];
            let m = &mut layer.mixer;
            m.in_proj_weight = uniform(&mut rng, 2 * e * d, 1.0 / (d as f64).sqrt());
            m.conv1d_weight = uniform(&mut rng, e * k, 1.0 / (k as f64).sqrt());
            if let Some(b) = m.conv1d_bias.as_mut() {
                *b = uniform(&mut rng, e, 1.0 / (k as f64).sqrt());
            }
            m.x_proj_weight = uniform(&mut rng, (r + 2 * n) * e, 1.0 / (e as f64).sqrt());
            m.dt_proj_weight = uniform(&mut rng, e * r, 1.0 / (r as f64).sqrt());
            m.dt_proj_bias = rng.vec(e, |rng| {
                let dt = rng
                    .uniform_in(c.dt_min.ln(), c.dt_max.ln())
                    .exp()
                    .max(c.dt_init_floor);
                dt + (-(-dt).exp_m1()).ln() // softplus⁻¹(dt)
            });
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

/// A Hugging Face sharded checkpoint: `model.safetensors.index.json` with a
/// `weight_map` from tensor name to shard file.
struct ShardedSafetensors {
    path: String,
    shards: Vec<SafetensorsFile>,
}

impl ShardedSafetensors {
    fn open(index: &Path) -> Result<Self> {
        let shown = index.display().to_string();
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Format {
            file: shown.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
        let map = v["weight_map"].as_object().ok_or_else(|| Error::Format {
            file: shown.clone(),
            message: "no `weight_map` object".into(),
        })?;
        let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        files.sort_unstable();
        files.dedup();
        let dir = index.parent().unwrap_or(Path::new("."));
        let shards = files
            .iter()
            .map(|f| SafetensorsFile::open(dir.join(f)))
            .collect::<Result<_>>()?;
        Ok(Self {
            path: shown,
            shards,
        })
    }
}

impl TensorSource for ShardedSafetensors {
    fn file(&self) -> &str {
        &self.path
    }
    fn names(&self) -> Vec<String> {
        self.shards.iter().flat_map(|s| s.names()).collect()
    }
    fn tensor(&self, name: &str) -> Result<Option<crate::io::StoredTensor<'_>>> {
        for s in &self.shards {
            if let Some(t) = s.tensor(name)? {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }
}

/// Moves one block's gradients into the layer's place in the gradient tree.
fn set_layer_gradients<T>(g: &mut LayerParams<T>, grads: BlockGradients<T>) -> Result<()> {
    let MixerGradients::S6 {
        x_proj_weight,
        dt_proj_weight,
        dt_proj_bias,
        a_log,
        d,
    } = grads.mixer
    else {
        return Err(invalid("Mamba::backward", "a language-model layer is S6"));
    };
    g.norm_weight = grads.norm_weight;
    g.norm_bias = grads.norm_bias;
    let m = &mut g.mixer;
    m.in_proj_weight = grads.in_proj_weight;
    m.in_proj_bias = grads.in_proj_bias;
    m.conv1d_weight = grads.conv_weight;
    m.conv1d_bias = grads.conv_bias;
    m.x_proj_weight = x_proj_weight;
    m.dt_proj_weight = dt_proj_weight;
    m.dt_proj_bias = dt_proj_bias;
    m.a_log = a_log;
    m.d = d;
    m.out_proj_weight = grads.out_proj_weight;
    m.out_proj_bias = grads.out_proj_bias;
    Ok(())
}
