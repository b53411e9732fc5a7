//! Where the command line's model comes from: a directory, or the
//! built-in model, whose files are compiled into the binary so that an
//! installed `selective` works wherever it is copied.

use std::path::PathBuf;

use selective::generate::Tokenizer;
use selective::io::SafetensorsFile;
use selective::nn::{Architecture, Mamba, MambaConfig, Transformer};

/// A character-level Mamba trained on Tiny Shakespeare (README, "The
/// built-in model"), as it is in the source tree's models/shakespeare-char.
const BUILTIN_NAME: &str = "the built-in model (models/shakespeare-char)";
const BUILTIN_CONFIG: &str = include_str!("../../../models/shakespeare-char/config.json");
const BUILTIN_WEIGHTS: &[u8] = include_bytes!("../../../models/shakespeare-char/model.safetensors");

/// A model of either architecture, as its config.json says.
pub enum AnyModel {
    Mamba(Mamba<f32>),
    Transformer(Transformer<f32>),
}

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

    /// What its config.json describes (a directory whose config.json cannot
    /// be read is taken for Mamba, whose reader then names the problem).
    pub fn architecture(&self) -> selective::Result<Architecture> {
        match self {
            ModelSource::Dir(dir) => {
                let path = dir.join("config.json");
                match std::fs::read_to_string(&path) {
                    Ok(text) => Architecture::of_config(&text, &path.display().to_string()),
                    Err(_) => Ok(Architecture::Mamba),
                }
            }
            ModelSource::Builtin => Ok(Architecture::Mamba),
        }
    }

    /// The model, Mamba or Transformer++ as its config.json says.
    pub fn load_any(&self) -> selective::Result<AnyModel> {
        match (self.architecture()?, self) {
            (Architecture::Transformer, ModelSource::Dir(dir)) => {
                Ok(AnyModel::Transformer(Transformer::from_dir(dir)?))
            }
            _ => Ok(AnyModel::Mamba(self.load()?)),
        }
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
