//! Text to token ids and back: a Hugging Face `tokenizer.json` (the
//! GPT-NeoX-20B one for the released Mamba models) through the
//! `tokenizers` crate.

use std::path::Path;

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: String,
}

impl Tokenizer {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Format {
            file: shown.clone(),
            message: format!("not a usable tokenizer.json: {e}"),
        })?;
        Ok(Self { inner, path: shown })
    }

    /// `dir/tokenizer.json` when the model directory has one.
    pub fn for_model_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = dir.as_ref().join("tokenizer.json");
        if path.exists() {
            Self::from_file(path).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Format {
            file: self.path.clone(),
            message: format!("encoding failed: {e}"),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Format {
            file: self.path.clone(),
            message: format!("decoding failed: {e}"),
        })
    }
}
