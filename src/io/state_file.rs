//! Saving and loading a [`Sequence`] (the recurrent state of one sequence),
//! so that generation can continue later without processing the sequence
//! again. The file is a safetensors file of fixed size for a given model:
//!
//! ```text
//! layers.{i}.conv_state   F32 (E, K)
//! layers.{i}.ssm_state    F32 (E, N)
//! logits                  F32 (V)      next-token logits (zeros before any token)
//! recent_tokens           U32 (RECENT_TOKENS)   oldest first, u32::MAX = empty slot
//! position                U64 (1)      tokens processed
//! metadata: format = "selective-sequence-state", version, model dimensions
//! ```

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::io::write_atomically;
use crate::nn::inference::{LayerState, Sequence, RECENT_TOKENS};
use crate::nn::MambaConfig;

const FORMAT: &str = "selective-sequence-state";
const VERSION: &str = "1";

/// The dimensions a state must match, as written in the file.
fn dimensions(config: &MambaConfig) -> String {
    let mut dims = format!(
        "n_layer={} d_inner={} d_state={} d_conv={} vocab_size={} d_model={}",
        config.n_layer,
        config.d_inner,
        config.d_state,
        config.d_conv,
        config.vocab_size,
        config.d_model
    );
    if let Some(ssd) = config.ssd {
        // a Mamba-2 state is not a Mamba-1 state of the same sizes
        dims += &format!(" heads={} n_groups={}", config.n_heads(), ssd.n_groups);
    }
    dims
}

/// The shapes of one layer's (conv, ssm) states: (C, K) and (E, N), or
/// for Mamba-2 (E + 2GN, K) and (H, P, N).
fn state_shapes(config: &MambaConfig) -> (Vec<usize>, Vec<usize>) {
    let conv = vec![config.conv_channels(), config.d_conv];
    let ssm = match config.ssd {
        None => vec![config.d_inner, config.d_state],
        Some(ssd) => vec![config.n_heads(), ssd.head_dim, config.d_state],
    };
    (conv, ssm)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `seq` to `path` atomically.
pub fn save_sequence(path: impl AsRef<Path>, seq: &Sequence, config: &MambaConfig) -> Result<()> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    seq.check_fits(config)?;
    let v = config.vocab_size;
    let (conv_shape, ssm_shape) = state_shapes(config);
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, layer) in seq.layers.iter().enumerate() {
        tensors.push((
            format!("layers.{i}.conv_state"),
            Dtype::F32,
            conv_shape.clone(),
            f32_bytes(&layer.conv),
        ));
        tensors.push((
            format!("layers.{i}.ssm_state"),
            Dtype::F32,
            ssm_shape.clone(),
            f32_bytes(&layer.ssm),
        ));
    }
    let logits = if seq.logits.is_empty() {
        vec![0.0; v]
    } else {
        seq.logits.clone()
    };
    tensors.push(("logits".into(), Dtype::F32, vec![v], f32_bytes(&logits)));
    let mut recent = vec![u32::MAX; RECENT_TOKENS];
    let kept: Vec<u32> = seq.recent.iter().copied().collect();
    recent[RECENT_TOKENS - kept.len()..].copy_from_slice(&kept);
    tensors.push((
        "recent_tokens".into(),
        Dtype::U32,
        vec![RECENT_TOKENS],
        recent.iter().flat_map(|x| x.to_le_bytes()).collect(),
    ));
    tensors.push((
        "position".into(),
        Dtype::U64,
        vec![1],
        seq.position.to_le_bytes().to_vec(),
    ));
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::Tensor {
                    file: shown.clone(),
                    tensor: name.clone(),
                    message: format!("cannot be written: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), VERSION.to_string()),
        ("model".to_string(), dimensions(config)),
    ]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Format {
        file: shown.clone(),
        message: format!("serialising: {e}"),
    })?;
    write_atomically(path, &bytes)
}

/// Reads a state written by [`save_sequence`] for a model of `config`.
pub fn load_sequence(path: impl AsRef<Path>, config: &MambaConfig) -> Result<Sequence> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    sequence_from_bytes(&bytes, &path.display().to_string(), config)
}

/// [`load_sequence`] of a state file's bytes; `file` names it in errors.
pub fn sequence_from_bytes(bytes: &[u8], file: &str, config: &MambaConfig) -> Result<Sequence> {
    let file = file.to_string();
    let format_err = |message: String| Error::Format {
        file: file.clone(),
        message,
    };
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| format_err(format!("not a safetensors file: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(format_err(format!(
            "not a sequence state (metadata format is not {FORMAT:?})"
        )));
    }
    if meta.get("version").map(String::as_str) != Some(VERSION) {
        return Err(format_err(format!(
            "unsupported state version {:?}",
            meta.get("version")
        )));
    }
    let want = dimensions(config);
    if meta.get("model") != Some(&want) {
        return Err(format_err(format!(
            "state of a different model: file has {:?}, this model is {want:?}",
            meta.get("model").map(String::as_str).unwrap_or("nothing")
        )));
    }
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| format_err(format!("not a safetensors file: {e}")))?;
    let tensor = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>> {
        let view = st.tensor(name).map_err(|_| Error::Tensor {
            file: file.clone(),
            tensor: name.into(),
            message: "missing".into(),
        })?;
        if view.dtype() != dtype || view.shape() != shape {
            return Err(Error::Tensor {
                file: file.clone(),
                tensor: name.into(),
                message: format!(
                    "expected {dtype:?} {shape:?}, found {:?} {:?}",
                    view.dtype(),
                    view.shape()
                ),
            });
        }
        Ok(view.data().to_vec())
    };
    let f32s = |b: Vec<u8>| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    let v = config.vocab_size;
    let (conv_shape, ssm_shape) = state_shapes(config);
    let mut layers = Vec::with_capacity(config.n_layer);
    for i in 0..config.n_layer {
        layers.push(LayerState {
            conv: f32s(tensor(
                &format!("layers.{i}.conv_state"),
                Dtype::F32,
                &conv_shape,
            )?),
            ssm: f32s(tensor(
                &format!("layers.{i}.ssm_state"),
                Dtype::F32,
                &ssm_shape,
            )?),
        });
    }
    let position_bytes = tensor("position", Dtype::U64, &[1])?;
    let position = u64::from_le_bytes(position_bytes[..8].try_into().expect("8 bytes"));
    let logits = if position == 0 {
        Vec::new()
    } else {
        f32s(tensor("logits", Dtype::F32, &[v])?)
    };
    let recent = tensor("recent_tokens", Dtype::U32, &[RECENT_TOKENS])?
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .filter(|&id| id != u32::MAX)
        .collect::<std::collections::VecDeque<u32>>();
    if let Some(bad) = recent.iter().find(|&&id| id as usize >= v) {
        return Err(Error::Tensor {
            file,
            tensor: "recent_tokens".into(),
            message: format!("token id {bad} is outside the vocabulary of {v}"),
        });
    }
    Ok(Sequence {
        layers,
        logits,
        position,
        recent,
    })
}
