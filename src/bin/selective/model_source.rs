//! Where the command line's model comes from: a directory, or the
//! built-in model, whose files are compiled into the binary so that an
//! installed `selective` works wherever it is copied.

use std::path::PathBuf;

use selective::generate::Tokenizer;
use selective::io::SafetensorsFile;
use selective::nn::{Mamba, MambaConfig};

/// A character-level Mamba trained on Tiny Shakespeare (README, "The
/// built-in model"), as it is in the source tree's models/shakespeare-char.
const BUILTIN_NAME: &str = "the built-in model (models/shakespeare-char)";
const BUILTIN_CONFIG: &str = include_str!("../../../models/shakespeare-char/config.json");
const BUILTIN_WEIGHTS: &[u8] = include_bytes!("../../../models/shakespeare-char/model.safetensors");

pub enum ModelSource {
    Dir(PathBuf),
    Builtin,
}

impl ModelSource {
    /// `--model DIR`, or the built-in model without it.
    pub fn new(dir: Option<PathBuf>) -> Self {
        dir.map_or(ModelSource::Builtin, ModelSource::Dir)
    }

    /// What to call it in messages.
    pub fn name(&self) -> String {
        match self {
            ModelSource::Dir(dir) => dir.display().to_string(),
            ModelSource::Builtin => BUILTIN_NAME.to_string(),
        }
    }

    /// The model; fields of its config.json that disagree without being
    /// errors ([`MambaConfig::disagreements`]) are printed as warnings.
    pub fn load(&self) -> selective::Result<Mamba<f32>> {
        let model = self.load_quietly()?;
        for note in model.config.disagreements() {
            eprintln!("warning: {}: config.json: {note}", self.name());
        }
        Ok(model)
    }

    fn load_quietly(&self) -> selective::Result<Mamba<f32>> {
        match self {
            ModelSource::Dir(dir) => Mamba::from_dir(dir),
            ModelSource::Builtin => {
                let (config, _) = MambaConfig::from_json_str(BUILTIN_CONFIG, BUILTIN_NAME)?;
                let weights = SafetensorsFile::from_static(BUILTIN_NAME, BUILTIN_WEIGHTS)?;
                Mamba::from_source(config, &weights)
            }
        }
    }

    /// Its tokenizer, if it names one (see [`Tokenizer::for_model_dir`]).
    pub fn tokenizer(&self) -> selective::Result<Option<Tokenizer>> {
        match self {
            ModelSource::Dir(dir) => Tokenizer::for_model_dir(dir),
            ModelSource::Builtin => Tokenizer::from_model_config(BUILTIN_CONFIG, BUILTIN_NAME),
        }
    }
}
