//! Training text as token ids: a train/validation split and batches of
//! random windows drawn with a seeded [`Rng`], so that the data position of
//! a run is the generator's state (saved in checkpoints).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::distributed::fnv1a_64;
use crate::error::{invalid, Error, Result};
use crate::generate::tokenizer::Tokenizer;
use crate::rng::Rng;

/// The size and 64-bit FNV-1a hash of a training file's bytes, saved with
/// every checkpoint: a resumed run whose text has changed since (an edit,
/// a character added that shifts a character vocabulary) is told so
/// instead of continuing on other data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    pub bytes: u64,
    /// 16 hexadecimal digits
    pub fnv1a_64: String,
}

impl DataFingerprint {
    pub fn of_bytes(data: &[u8]) -> Self {
        Self {
            bytes: data.len() as u64,
            fnv1a_64: format!("{:016x}", fnv1a_64(data.iter().copied())),
        }
    }

    pub fn of_file(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok(Self::of_bytes(&data))
    }
}

/// A tokenised text split into a training part (the first tokens) and a
/// validation part (the last `val_fraction` of them).
#[derive(Clone, Debug, PartialEq)]
pub struct TextData {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

impl TextData {
    /// Reads and tokenises `path`: byte-level without a tokenizer (any file,
    /// UTF-8 or not), otherwise through `tokenizer`.
    pub fn load(path: &Path, tokenizer: &Tokenizer, val_fraction: f64) -> Result<Self> {
        let ids = match tokenizer {
            Tokenizer::Bytes => {
                let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
                bytes.into_iter().map(u32::from).collect()
            }
            _ => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                tokenizer
                    .encode(&text)
                    .map_err(|e| invalid("TextData::load", format!("{}: {e}", path.display())))?
            }
        };
        Self::split(ids, val_fraction)
    }

    /// Splits ids: the last `round(len · val_fraction)` tokens are validation.
    pub fn split(mut ids: Vec<u32>, val_fraction: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(invalid(
                "TextData::split",
                format!("val_fraction must be in [0, 1), got {val_fraction}"),
            ));
        }
        let n_val = (ids.len() as f64 * val_fraction).round() as usize;
        let val = ids.split_off(ids.len() - n_val);
        Ok(Self { train: ids, val })
    }
}

/// `batch` windows of `len` consecutive tokens from `tokens`, each starting
/// at a uniformly random position (one `rng.below` per window, so batches
/// of 2B and two batches of B draw the same windows); (batch, len) row-major.
pub fn random_windows(tokens: &[u32], batch: usize, len: usize, rng: &mut Rng) -> Result<Vec<u32>> {
    if tokens.len() < len {
        return Err(invalid(
            "random_windows",
            format!(
                "{} tokens cannot hold one window of {len}: use a longer text or a shorter --seq-len",
                tokens.len()
            ),
        ));
    }
    let starts = tokens.len() - len + 1;
    let mut out = Vec::with_capacity(batch * len);
    for _ in 0..batch {
        let s = rng.below(starts);
        out.extend_from_slice(&tokens[s..s + len]);
    }
    Ok(out)
}
