//! A small model directory: a configuration as JSON beside its f32
//! weights in `model.safetensors`, both written atomically. The task
//! models and the sequence classifier are saved this way.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::safetensors::{encode, write_safetensors, DType, SafetensorsFile, TensorSource};
use super::{read_object, write_atomically};
use crate::error::{Error, Result};
use crate::float::Float;

/// The weights file of the directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Writes `tensors` (name, shape, values) as f32 into dir/model.safetensors
/// and `config` as JSON into dir/`config_file`.
pub fn save_config_dir<T: Float, C: Serialize>(
    dir: &Path,
    config_file: &str,
    config: &C,
    tensors: Vec<(String, Vec<usize>, &[T])>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape, data)| (name, DType::F32, shape, encode(data, DType::F32)))
        .collect();
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, None)?;
    let text = serde_json::to_string_pretty(config).expect("a config serialises");
    write_atomically(&dir.join(config_file), text.as_bytes())
}

/// Reads dir/`config_file` (checked by `validate`, whose error is reported
/// against the file) and reads every tensor `expected` names (name and
/// shape) from dir/model.safetensors, which must hold no others.
pub fn load_config_dir<T: Float, C: DeserializeOwned>(
    dir: &Path,
    config_file: &str,
    what: &str,
    validate: impl FnOnce(&C) -> Result<()>,
    expected: impl FnOnce(&C) -> Vec<(String, Vec<usize>)>,
) -> Result<(C, Vec<Vec<T>>)> {
    let config_path = dir.join(config_file);
    let config: C = read_object(&config_path, what)?;
    validate(&config).map_err(|e| Error::Format {
        file: config_path.display().to_string(),
        message: e.to_string(),
    })?;
    let file = SafetensorsFile::open(dir.join(WEIGHTS_FILE))?;
    let expected = expected(&config);
    // each expected tensor first, so that a missing one is named
    let tensors = expected
        .iter()
        .map(|(name, shape)| file.tensor_of_shape::<T>(name, shape))
        .collect::<Result<Vec<_>>>()?;
    if expected.len() != file.names().len() {
        return Err(Error::Format {
            file: file.file().to_string(),
            message: format!(
                "holds {} tensors, this configuration has {} (check {config_file})",
                file.names().len(),
                expected.len()
            ),
        });
    }
    Ok((config, tensors))
}
