//! Reading and writing a language model's files: `config.json` (either
//! Mamba dialect, docs/DESIGN.md §7.4, or transformers' Llama, §15.6) with `model.safetensors`, a sharded
//! `model.safetensors.index.json`, or the original `pytorch_model.bin`.
//! These are methods of [`Mamba`] defined here, so that the model itself
//! (src/nn/) knows nothing of files.

use std::path::Path;

use super::safetensors::{encode, write_safetensors, DType, SafetensorsFile, TensorSource};
use super::torch::TorchCheckpoint;
use super::write_atomically;
use crate::error::{Error, Result};
use crate::kernels::MatmulScalar;
use crate::nn::{BlockScalar, Mamba, MambaConfig, MambaParams};
use crate::nn::{Transformer, TransformerConfig, TransformerParams};

/// An embedding stored with fewer rows than config.json's vocab_size is
/// accepted when vocab_size is its rows rounded up to a multiple of this
/// (mamba_ssm's `pad_vocab_size_multiple`).
pub const VOCAB_PAD_MULTIPLE: usize = 8;

impl<T: BlockScalar> Mamba<T> {
    /// Loads `dir/config.json` (either dialect) and the weights:
    /// `model.safetensors`, a sharded `model.safetensors.index.json`, or
    /// the original `pytorch_model.bin`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let (config, _) = MambaConfig::from_json_str(&text, &config_path.display().to_string())?;
        Self::from_source(config, open_weights(dir)?.as_ref())
    }

    /// Builds the model from named tensors, checking every name, shape and
    /// dtype. Accepts both spellings of the embedding, a stored or absent
    /// tied head, conv1d weights as (E, 1, K) or (E, K), and an embedding
    /// with fewer rows than vocab_size when vocab_size is those rows padded
    /// to a multiple of [`VOCAB_PAD_MULTIPLE`] (zeros are added).
    ///
    /// Every tensor is checked against the configuration's shape before
    /// anything of the configuration's size is allocated, so a config.json
    /// that contradicts its weights (or claims an impossible size) is an
    /// error naming the tensor and the sizes, never an allocation failure.
    pub fn from_source(config: MambaConfig, source: &dyn TensorSource) -> Result<Self> {
        config.validate()?;
        let file = source.file().to_string();
        let c = &config;
        let sizes = format!(
            "config: vocab_size {}, d_model {}, d_inner {}, d_state {}, dt_rank {}, d_conv {}, n_layer {}",
            c.vocab_size, c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_conv, c.n_layer
        );
        // 0. before a tree of n_layer layers is built: every layer has at
        // least 9 tensors, so more layers than stored tensors is impossible
        // (a smaller shortfall is named tensor by tensor below)
        let stored = source.names().len();
        if c.n_layer > stored {
            return Err(Error::Format {
                file,
                message: format!(
                    "config.json says n_layer {}, but this file holds only {stored} tensors",
                    c.n_layer
                ),
            });
        }
        // 1. names and shapes against the header, nothing allocated yet
        let mut stored_names = Vec::new();
        for info in MambaParams::<T>::infos(c) {
            let names: &[&str] = if info.name == "backbone.embeddings.weight" {
                &["backbone.embeddings.weight", "backbone.embedding.weight"]
            } else {
                &[info.name.as_str()]
            };
            let mut found = None;
            for name in names {
                if let Some(t) = source.tensor(name)? {
                    found = Some((name.to_string(), t.shape.clone(), t.dtype));
                    break;
                }
            }
            let (name, t_shape, t_dtype) = found.ok_or_else(|| Error::Tensor {
                file: file.clone(),
                tensor: info.name.clone(),
                message: format!("missing (expected shape {:?}; {sizes})", info.shape),
            })?;
            let fits = if info.name == "backbone.embeddings.weight" {
                // fewer stored rows than vocab_size only as mamba_ssm pads
                // (pad_vocab_size_multiple 8): the rows added are zeros, and
                // never sampled (src/generate/sampling.rs). A vocab_size
                // further from the rows contradicts the file.
                t_shape.len() == 2
                    && t_shape[1] == info.shape[1]
                    && t_shape[0] <= info.shape[0]
                    && t_shape[0].div_ceil(VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE >= info.shape[0]
            } else {
                let conv_2d = info.shape.len() == 3 && t_shape == [info.shape[0], info.shape[2]];
                t_shape == info.shape || conv_2d
            };
            if !fits {
                return Err(Error::Tensor {
                    file: file.clone(),
                    tensor: name,
                    message: format!(
                        "expected shape {:?}, found {:?} ({}); {sizes}",
                        info.shape,
                        t_shape,
                        t_dtype.name()
                    ),
                });
            }
            stored_names.push(name);
        }
        // 2. the copy
        let mut params = MambaParams::<T>::zeros(c);
        let mut used = std::collections::BTreeSet::new();
        for ((_, dst), name) in params.tensors_mut(c).into_iter().zip(stored_names) {
            let t = source.tensor(&name)?.ok_or_else(|| Error::Tensor {
                file: file.clone(),
                tensor: name.clone(),
                message: "vanished while loading".into(),
            })?;
            let values = finite_values::<T>(t, &file, &name)?;
            source.release(&name);
            // the embedding may have fewer rows (zeros after them)
            dst[..values.len()].copy_from_slice(&values);
            used.insert(name);
        }
        check_all_used(source, &used, config.tie_embeddings)?;
        Ok(Self { config, params })
    }

    /// Writes `dir/config.json` (Hugging Face dialect) and
    /// `dir/model.safetensors` with the weights in `dtype`, each atomically.
    pub fn save(&self, dir: impl AsRef<Path>, dtype: DType) -> Result<()> {
        let tensors = self
            .params
            .tensors(&self.config)
            .into_iter()
            .map(|(info, data)| (info.name, dtype, info.shape, encode(data, dtype)))
            .collect();
        write_model_dir(
            dir.as_ref(),
            tensors,
            self.config.to_hugging_face_json(),
            dtype,
        )
    }
}

/// A stored tensor's values in `T`, refused when one is not finite: a NaN
/// or infinite weight makes every output NaN, so it is named here rather
/// than scored as a NaN loss.
fn finite_values<T: BlockScalar>(
    t: super::safetensors::StoredTensor<'_>,
    file: &str,
    name: &str,
) -> Result<Vec<T>> {
    let values = t.to_vec::<T>(file, name)?;
    if let Some(i) = values.iter().position(|v| !v.to_f64().is_finite()) {
        return Err(Error::Tensor {
            file: file.to_string(),
            tensor: name.to_string(),
            message: format!(
                "value {i} is {} (weights must be finite numbers)",
                values[i].to_f64()
            ),
        });
    }
    Ok(values)
}

/// Every stored tensor must have been read: one that is not a parameter
/// means config.json describes another model. A tied head stored anyway
/// (the official Mamba checkpoints do) is the embedding.
fn check_all_used(
    source: &dyn TensorSource,
    used: &std::collections::BTreeSet<String>,
    tied: bool,
) -> Result<()> {
    for name in source.names() {
        if used.contains(&name) || (name == "lm_head.weight" && tied) {
            continue;
        }
        return Err(Error::Tensor {
            file: source.file().to_string(),
            tensor: name,
            message: "is not a parameter of this configuration (check config.json)".into(),
        });
    }
    Ok(())
}

/// The weights file of a model directory: `model.safetensors`, a sharded
/// `model.safetensors.index.json`, or the original `pytorch_model.bin`.
fn open_weights(dir: &Path) -> Result<Box<dyn TensorSource>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let torch = dir.join("pytorch_model.bin");
    if single.exists() {
        Ok(Box::new(SafetensorsFile::open(&single)?))
    } else if index.exists() {
        Ok(Box::new(ShardedSafetensors::open(&index)?))
    } else if torch.exists() {
        Ok(Box::new(TorchCheckpoint::open(&torch)?))
    } else {
        Err(Error::Format {
            file: dir.display().to_string(),
            message: "no model.safetensors, model.safetensors.index.json or pytorch_model.bin in this directory"
                .into(),
        })
    }
}

/// Writes `tensors` as `dir/model.safetensors` and `config` (with
/// torch_dtype set) as `dir/config.json`, each atomically.
fn write_model_dir(
    dir: &Path,
    tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)>,
    mut config: serde_json::Value,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&dir.join("model.safetensors"), &tensors, Some(meta))?;
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

impl<T: MatmulScalar + BlockScalar> Transformer<T> {
    /// Loads a transformers Llama directory: `config.json` and the weights
    /// (model.safetensors, sharded, or pytorch_model.bin).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = TransformerConfig::from_json_str(&text, &config_path.display().to_string())?;
        Self::from_source(config, open_weights(dir)?.as_ref())
    }

    /// Builds the model from named tensors: every name and shape is checked
    /// against the configuration before anything of its size is allocated;
    /// a tied head may be stored or absent.
    pub fn from_source(config: TransformerConfig, source: &dyn TensorSource) -> Result<Self> {
        config.validate()?;
        let file = source.file().to_string();
        let c = &config;
        let sizes = format!(
            "config: vocab_size {}, hidden_size {}, heads {} x head_dim {}, intermediate_size {}, layers {}",
            c.vocab_size, c.d_model, c.n_head, c.head_dim, c.d_ff, c.n_layer
        );
        let stored = source.names().len();
        if c.n_layer > stored {
            return Err(Error::Format {
                file,
                message: format!(
                    "config.json says num_hidden_layers {}, but this file holds only {stored} tensors",
                    c.n_layer
                ),
            });
        }
        let infos = TransformerParams::<T>::infos(c);
        for info in &infos {
            let t = source.tensor(&info.name)?.ok_or_else(|| Error::Tensor {
                file: file.clone(),
                tensor: info.name.clone(),
                message: format!("missing (expected shape {:?}; {sizes})", info.shape),
            })?;
            if t.shape != info.shape {
                return Err(Error::Tensor {
                    file: file.clone(),
                    tensor: info.name.clone(),
                    message: format!(
                        "expected shape {:?}, found {:?} ({}); {sizes}",
                        info.shape,
                        t.shape,
                        t.dtype.name()
                    ),
                });
            }
        }
        let mut params = TransformerParams::<T>::zeros(c);
        let mut used = std::collections::BTreeSet::new();
        for (info, dst) in params.tensors_mut(c) {
            let t = source.tensor(&info.name)?.ok_or_else(|| Error::Tensor {
                file: file.clone(),
                tensor: info.name.clone(),
                message: "vanished while loading".into(),
            })?;
            *dst = finite_values::<T>(t, &file, &info.name)?;
            source.release(&info.name);
            used.insert(info.name);
        }
        check_all_used(source, &used, c.tie_embeddings)?;
        Transformer::new(config, params)
    }

    /// Writes `dir/config.json` (LlamaForCausalLM) and `dir/model.safetensors`
    /// with the weights in `dtype`, each atomically.
    pub fn save(&self, dir: impl AsRef<Path>, dtype: DType) -> Result<()> {
        let tensors = self
            .params
            .tensors(&self.config)
            .into_iter()
            .map(|(info, data)| (info.name, dtype, info.shape, encode(data, dtype)))
            .collect();
        write_model_dir(
            dir.as_ref(),
            tensors,
            self.config.to_hugging_face_json(),
            dtype,
        )
    }
}

/// The shard files a `model.safetensors.index.json` (text, from `file`)
/// names in its `weight_map`, each once, sorted. A shard must be a plain
/// file name beside the index: a path that leaves the directory is refused.
pub fn shard_files(text: &str, file: &str) -> Result<Vec<String>> {
    let bad = |message: String| Error::Format {
        file: file.to_string(),
        message,
    };
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files = Vec::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            bad(format!(
                "weight_map[{tensor:?}] is not a file name: {shard}"
            ))
        })?;
        let plain = Path::new(shard).file_name().and_then(|n| n.to_str()) == Some(shard);
        if !plain {
            return Err(bad(format!(
                "weight_map[{tensor:?}] = {shard:?} is not a file name beside the index"
            )));
        }
        files.push(shard.to_string());
    }
    files.sort_unstable();
    files.dedup();
    Ok(files)
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
        let files = shard_files(&text, &shown)?;
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
    fn tensor(&self, name: &str) -> Result<Option<super::safetensors::StoredTensor<'_>>> {
        for s in &self.shards {
            if let Some(t) = s.tensor(name)? {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }
}
