//! Text to token ids and back, in one of two ways:
//! - a Hugging Face `tokenizer.json` (the GPT-NeoX-20B one for the released
//!   Mamba models) through the `tokenizers` crate;
//! - bytes: ids 0..=255 are the bytes of the UTF-8 text, for byte-level
//!   models (those trained on raw bytes have no tokenizer file).

use std::path::Path;

use crate::error::{invalid, Error, Result};

/// The name GPT-NeoX-20B (and so the released Mamba models) gives its
/// end-of-text token, id 0 there.
pub const HF_EOS_TOKEN: &str = "<|endoftext|>";

pub enum Tokenizer {
    HuggingFace(HfTokenizer),
    /// Ids 0..=255 are bytes; decoding replaces invalid UTF-8 with U+FFFD.
    Bytes,
}

/// A loaded `tokenizer.json` and the path it came from (for messages).
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    path: String,
}

impl Tokenizer {
    /// A Hugging Face `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Format {
            file: shown.clone(),
            message: format!("not a usable tokenizer.json: {e}"),
        })?;
        Ok(Tokenizer::HuggingFace(HfTokenizer { inner, path: shown }))
    }

    /// The tokenizer a model directory names:
    /// - `dir/tokenizer.json` when there is one;
    /// - otherwise bytes when `dir/config.json` says `"tokenizer": "bytes"`;
    /// - otherwise none (`Ok(None)`): the caller must be given token ids.
    pub fn for_model_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let tokenizer_json = dir.join("tokenizer.json");
        if tokenizer_json.exists() {
            return Self::from_file(tokenizer_json).map(Some);
        }
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Format {
            file: config_path.display().to_string(),
            message: format!("not valid JSON: {e}"),
        })?;
        match config.get("tokenizer") {
            None => Ok(None),
            Some(serde_json::Value::String(name)) if name == "bytes" => Ok(Some(Tokenizer::Bytes)),
            Some(other) => Err(Error::Format {
                file: config_path.display().to_string(),
                message: format!(
                    "\"tokenizer\": {other} is not known; the only built-in one is \"bytes\" \
                     (otherwise put a tokenizer.json in the model directory)"
                ),
            }),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::HuggingFace(hf) => {
                let enc = hf.inner.encode(text, false).map_err(|e| Error::Format {
                    file: hf.path.clone(),
                    message: format!("encoding failed: {e}"),
                })?;
                Ok(enc.get_ids().to_vec())
            }
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// The text of `ids`; an incomplete or invalid UTF-8 sequence becomes
    /// U+FFFD (both kinds: the byte-level BPE of GPT-NeoX decodes lossily too).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::HuggingFace(hf) => hf.inner.decode(ids, false).map_err(|e| Error::Format {
                file: hf.path.clone(),
                message: format!("decoding failed: {e}"),
            }),
            Tokenizer::Bytes => {
                let bytes = ids
                    .iter()
                    .map(|&id| {
                        u8::try_from(id).map_err(|_| {
                            invalid(
                                "Tokenizer::decode",
                                format!("byte token id {id} is not in 0..=255"),
                            )
                        })
                    })
                    .collect::<Result<Vec<u8>>>()?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    /// The end-of-text token id: `<|endoftext|>` for a `tokenizer.json` that
    /// has it (0 for GPT-NeoX-20B); bytes have none.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            Tokenizer::HuggingFace(hf) => hf.inner.token_to_id(HF_EOS_TOKEN),
            Tokenizer::Bytes => None,
        }
    }

    /// How many ids the tokenizer can produce, added tokens included (50277
    /// for GPT-NeoX-20B, whose models pad their embedding to 50280); 256 for
    /// bytes.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::HuggingFace(hf) => hf.inner.get_vocab_size(true),
            Tokenizer::Bytes => 256,
        }
    }
}
