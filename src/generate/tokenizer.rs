//! Text to token ids and back, in one of two ways:
//! - a Hugging Face `tokenizer.json` (the GPT-NeoX-20B one for the released
//!   Mamba models) through the `tokenizers` crate;
//! - bytes: ids 0..=255 are the bytes of the UTF-8 text, for byte-level
//!   models (those trained on raw bytes have no tokenizer file);
//! - characters: id i is the i-th of a list of characters stored in the
//!   model's config.json, as nanoGPT's shakespeare_char (65 characters for
//!   Tiny Shakespeare).

use std::path::Path;

use crate::error::{invalid, Error, Result};

/// The name GPT-NeoX-20B (and so the released Mamba models) gives its
/// end-of-text token, id 0 there.
pub const HF_EOS_TOKEN: &str = "<|endoftext|>";

pub enum Tokenizer {
    HuggingFace(HfTokenizer),
    /// Ids 0..=255 are bytes; decoding replaces invalid UTF-8 with U+FFFD.
    Bytes,
    Chars(CharVocab),
}

/// A character-level vocabulary: id i is `chars[i]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CharVocab {
    chars: Vec<char>,
    /// char → id, the inverse of `chars`
    ids: std::collections::HashMap<char, u32>,
}

impl CharVocab {
    /// The distinct characters of `text` in code-point order (the
    /// vocabulary nanoGPT's shakespeare_char builds).
    pub fn from_text(text: &str) -> Result<Self> {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Self::new(chars)
    }

    /// A vocabulary given in order; characters must be distinct.
    pub fn new(chars: Vec<char>) -> Result<Self> {
        let mut sorted = chars.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(
                "CharVocab::new",
                format!("character {:?} appears twice in the vocabulary", w[0]),
            ));
        }
        if chars.is_empty() {
            return Err(invalid(
                "CharVocab::new",
                "the vocabulary has no characters",
            ));
        }
        if chars.len() > u32::MAX as usize {
            return Err(invalid("CharVocab::new", "more characters than u32 ids"));
        }
        let ids = chars
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        Ok(CharVocab { chars, ids })
    }

    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// The vocabulary as it is stored in config.json: its characters, in order.
    pub fn as_string(&self) -> String {
        self.chars.iter().collect()
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .enumerate()
            .map(|(i, ch)| {
                self.ids.get(&ch).copied().ok_or_else(|| {
                    invalid(
                        "Tokenizer::encode",
                        format!(
                            "character {ch:?} (at character {i} of the text) is not in the \
                             model's {}-character vocabulary",
                            self.chars.len()
                        ),
                    )
                })
            })
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        ids.iter()
            .map(|&id| {
                self.chars.get(id as usize).copied().ok_or_else(|| {
                    invalid(
                        "Tokenizer::decode",
                        format!(
                            "token id {id} is not in the {}-character vocabulary (a padding id)",
                            self.chars.len()
                        ),
                    )
                })
            })
            .collect()
    }
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
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_bytes(&bytes, &path.display().to_string())
    }

    /// A Hugging Face tokenizer.json's contents; `file` names it in errors.
    pub fn from_json_bytes(bytes: &[u8], file: &str) -> Result<Self> {
        let bad = |message: String| Error::Format {
            file: file.to_string(),
            message: format!("not a usable tokenizer.json: {message}"),
        };
        // The tokenizers crate (0.21) panics, instead of returning its
        // error, on some malformed sections (an `expect` in the decoder's
        // deserializer, found by fuzz/tokenizer_json): the text must be
        // JSON first, and a panic left in the crate becomes this error.
        // (a Value, not IgnoredAny: IgnoredAny lets a string of invalid
        // UTF-8 through, which the crate's decoder then panics on)
        let text = std::str::from_utf8(bytes).map_err(|e| bad(format!("not UTF-8: {e}")))?;
        serde_json::from_str::<serde_json::Value>(text)
            .map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|_| bad("the tokenizers crate could not read it (it panicked)".into()))?;
        let inner = parsed.map_err(|e| bad(e.to_string()))?;
        Ok(Tokenizer::HuggingFace(HfTokenizer {
            inner,
            path: file.to_string(),
        }))
    }

    /// The tokenizer a model directory names:
    /// - `dir/tokenizer.json` when there is one;
    /// - otherwise bytes when `dir/config.json` says `"tokenizer": "bytes"`,
    ///   characters when it says `"tokenizer": {"chars": "..."}`;
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
        Self::from_model_config(&text, &config_path.display().to_string())
    }

    /// The built-in tokenizer a model's `config.json` text names
    /// (`"tokenizer": "bytes"` or `{"chars": "..."}`), or none; `file`
    /// names it in errors.
    pub fn from_model_config(text: &str, file: &str) -> Result<Option<Self>> {
        let config: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Format {
            file: file.to_string(),
            message: format!("not valid JSON: {e}"),
        })?;
        match config.get("tokenizer") {
            None => Ok(None),
            Some(serde_json::Value::String(name)) if name == "bytes" => Ok(Some(Tokenizer::Bytes)),
            Some(serde_json::Value::Object(map)) if map.contains_key("chars") => {
                let bad = |message: String| Error::Format {
                    file: file.to_string(),
                    message,
                };
                let chars = map["chars"].as_str().ok_or_else(|| {
                    bad("\"tokenizer\": {\"chars\": ...} must be a string of characters".into())
                })?;
                CharVocab::new(chars.chars().collect())
                    .map(|v| Some(Tokenizer::Chars(v)))
                    .map_err(|e| bad(format!("\"tokenizer\": {e}")))
            }
            Some(other) => Err(Error::Format {
                file: file.to_string(),
                message: format!(
                    "\"tokenizer\": {other} is not known; the built-in ones are \"bytes\" and \
                     {{\"chars\": \"...\"}} (otherwise put a tokenizer.json in the model directory)"
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
            Tokenizer::Chars(vocab) => vocab.encode(text),
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
            Tokenizer::Chars(vocab) => vocab.decode(ids),
        }
    }

    /// The end-of-text token id: `<|endoftext|>` for a `tokenizer.json` that
    /// has it (0 for GPT-NeoX-20B); bytes have none.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            Tokenizer::HuggingFace(hf) => hf.inner.token_to_id(HF_EOS_TOKEN),
            Tokenizer::Bytes | Tokenizer::Chars(_) => None,
        }
    }

    /// How many ids the tokenizer can produce, added tokens included (50277
    /// for GPT-NeoX-20B, whose models pad their embedding to 50280); 256 for
    /// bytes.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::HuggingFace(hf) => hf.inner.get_vocab_size(true),
            Tokenizer::Bytes => 256,
            Tokenizer::Chars(vocab) => vocab.chars.len(),
        }
    }

    /// An error unless every id this tokenizer produces has a row in an
    /// embedding of `rows` rows (a model's vocab_size): a tokenizer of
    /// another model, say, is refused before any text is encoded.
    pub fn check_fits(&self, rows: usize) -> Result<()> {
        if self.vocab_size() > rows {
            return Err(invalid(
                "Tokenizer",
                format!(
                    "the tokenizer has {} tokens but the model's embedding only {rows} rows \
                     (vocab_size): it belongs to another model",
                    self.vocab_size()
                ),
            ));
        }
        Ok(())
    }
}
