//! Every reader of a file the user hands the program, as a function of the
//! file's bytes: the entry points of the fuzz targets (fuzz/, run by
//! cargo-fuzz) and of the deterministic mutation corpus in the tests
//! (tests/hostile_input.rs). Each reads the bytes as the loader would and
//! then uses what it read (every tensor converted, every id decoded), so
//! that a value a parser let through is exercised too. They return the
//! loader's error; a panic, an abort or a hang in any of them is a bug.
//!
//! Files that go with a model (safetensors weights, state files) are read
//! against the small model configuration [`TARGET_MODEL_CONFIG`], whose
//! tensors the seed inputs have.

use crate::error::Result;
use crate::generate::{CharVocab, Tokenizer};
use crate::io::{encode, from_object_str, safetensors_bytes, sequence_from_bytes, DType};
use crate::io::{model_files::shard_files, TorchCheckpoint};
use crate::io::{SafetensorsFile, TensorSource};
use crate::nn::{Mamba, MambaConfig};
use crate::tasks::TaskModelConfig;

/// The config.json that weights and state files are read against: d_model
/// 8, 2 layers, vocabulary 16, N 4, K 4, dt_rank 1, tied embeddings.
pub const TARGET_MODEL_CONFIG: &str = r#"{"model_type": "mamba", "hidden_size": 8,
    "num_hidden_layers": 2, "vocab_size": 16, "state_size": 4, "conv_kernel": 4,
    "expand": 2, "intermediate_size": 16, "time_step_rank": 1, "tie_word_embeddings": true}"#;

/// [`TARGET_MODEL_CONFIG`] parsed.
pub fn target_model_config() -> MambaConfig {
    MambaConfig::from_json_str(TARGET_MODEL_CONFIG, "TARGET_MODEL_CONFIG")
        .map(|(c, _)| c)
        .unwrap_or_else(|e| unreachable!("the target config is valid: {e}"))
}

/// The target model's weights (official initialisation, seed 0) as a
/// safetensors file, built once.
pub fn target_weights() -> &'static [u8] {
    static WEIGHTS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let config = target_model_config();
        let model = Mamba::<f32>::init(config.clone(), 0)
            .unwrap_or_else(|e| unreachable!("the target model initialises: {e}"));
        let tensors: Vec<_> = model
            .params
            .tensors(&config)
            .into_iter()
            .map(|(info, data)| (info.name, DType::F32, info.shape, encode(data, DType::F32)))
            .collect();
        safetensors_bytes("target weights", &tensors, None)
            .unwrap_or_else(|e| unreachable!("the target weights serialise: {e}"))
    })
}

/// A config.json (either dialect) with the target model's weights: the
/// loader checks the config's every size against the weights' header
/// before it allocates (a config of 10^15-sized fields, say).
pub fn model_config_with_weights(bytes: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(bytes);
    let (config, _) = MambaConfig::from_json_str(&text, "fuzz/config.json")?;
    let file = SafetensorsFile::from_static("target.safetensors", target_weights())?;
    let model = Mamba::<f32>::from_source(config, &file)?;
    model.forward(&[1, 2, 3], 1, 3)?;
    Ok(())
}

/// A safetensors file: the header, then every tensor converted to f32.
pub fn safetensors(bytes: &[u8]) -> Result<()> {
    read_every_tensor(&SafetensorsFile::from_bytes(
        "fuzz.safetensors",
        bytes.to_vec(),
    )?)
}

/// Every tensor of `source` converted to f32, as a loader would.
fn read_every_tensor(source: &dyn TensorSource) -> Result<()> {
    for name in source.names() {
        if let Some(t) = source.tensor(&name)? {
            t.to_vec::<f32>(source.file(), &name)?;
        }
    }
    Ok(())
}

/// A model's weights as a safetensors file, loaded into the target model
/// (every name, shape, dtype and value checked), then one forward pass.
pub fn model_weights(bytes: &[u8]) -> Result<()> {
    let file = SafetensorsFile::from_bytes("fuzz.safetensors", bytes.to_vec())?;
    let model = Mamba::<f32>::from_source(target_model_config(), &file)?;
    model.forward(&[1, 2, 3], 1, 3)?;
    Ok(())
}

/// A `model.safetensors.index.json`'s shard list.
pub fn shard_index(bytes: &[u8]) -> Result<()> {
    shard_files(&String::from_utf8_lossy(bytes), "fuzz.index.json")?;
    Ok(())
}

/// A `pytorch_model.bin` (zip archive with a pickle): every tensor read.
pub fn torch_checkpoint(bytes: &[u8]) -> Result<()> {
    read_every_tensor(&TorchCheckpoint::from_bytes("fuzz.bin", bytes.to_vec())?)
}

/// A config.json of either dialect, its tokenizer entry, and its sizes'
/// parameter count.
pub fn config_json(bytes: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(bytes);
    let (config, _) = MambaConfig::from_json_str(&text, "fuzz/config.json")?;
    config.n_params();
    config.disagreements();
    Tokenizer::from_model_config(&text, "fuzz/config.json")?;
    Ok(())
}

/// A task-model.json, validated (and its parameter count formed).
pub fn task_model_json(bytes: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(bytes);
    let config: TaskModelConfig =
        from_object_str(&text, "fuzz/task-model.json", "a task model configuration")?;
    config.validate()
}

/// A tokenizer.json, then the bytes themselves encoded and decoded back.
pub fn tokenizer_json(bytes: &[u8]) -> Result<()> {
    let tokenizer = Tokenizer::from_json_bytes(bytes, "fuzz/tokenizer.json")?;
    let ids = tokenizer.encode(&String::from_utf8_lossy(bytes))?;
    tokenizer.decode(&ids)?;
    Ok(())
}

/// A character vocabulary as config.json's `{"chars": ...}` gives it (the
/// text's characters in order: refused if one repeats), and the text's own
/// vocabulary (its distinct characters), through which the text must
/// encode and decode back to itself, and the id one past the end must be
/// refused.
pub fn char_vocab(bytes: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(bytes);
    let _ = CharVocab::new(text.chars().collect());
    let vocab = CharVocab::from_text(&text)?;
    let ids = vocab.encode(&text)?;
    if vocab.decode(&ids)? != text {
        unreachable!("a character vocabulary did not decode its own text back");
    }
    let past_end = vocab.chars().len() as u32;
    if vocab.decode(&[past_end]).is_ok() {
        unreachable!("id {past_end} of a {past_end}-character vocabulary decoded");
    }
    Ok(())
}

/// A saved decoding state for the target model.
pub fn state_file(bytes: &[u8]) -> Result<()> {
    let seq = sequence_from_bytes(bytes, "fuzz.state", &target_model_config())?;
    seq.check_fits(&target_model_config())
}

/// The targets by name, as the fuzz crate and the corpus call them.
pub const TARGETS: [(&str, fn(&[u8]) -> Result<()>); 10] = [
    ("safetensors", safetensors),
    ("model_weights", model_weights),
    ("model_config_with_weights", model_config_with_weights),
    ("shard_index", shard_index),
    ("torch_checkpoint", torch_checkpoint),
    ("config_json", config_json),
    ("task_model_json", task_model_json),
    ("tokenizer_json", tokenizer_json),
    ("char_vocab", char_vocab),
    ("state_file", state_file),
];

/// Valid inputs to start mutating from, (target, bytes): the target
/// model's weights and a state of it (written through the directory
/// `scratch`), both config.json dialects, a task-model.json, a small
/// word-level tokenizer.json, a text for a character vocabulary, and a
/// shard index. pytorch_model.bin seeds are files (tests/data/torch).
pub fn seeds(scratch: &std::path::Path) -> Result<Vec<(&'static str, Vec<u8>)>> {
    use crate::io::save_sequence;
    use crate::kernels::WeightFormat;
    use crate::nn::{InferenceModel, Sequence};
    use crate::tasks::{BlockArch, SsmLayer};

    let read =
        |path: &std::path::Path| std::fs::read(path).map_err(|e| crate::error::Error::io(path, e));
    let config = target_model_config();
    let model = Mamba::<f32>::init(config.clone(), 0)?;
    let weights = target_weights().to_vec();
    let inference = InferenceModel::from_mamba(model, WeightFormat::F32)?;
    let mut seq = Sequence::new(&config);
    inference.prefill(&mut seq, &[1, 2, 3])?;
    let state_path = scratch.join("target.state");
    save_sequence(&state_path, &seq, &config)?;
    let state = read(&state_path)?;
    let task = TaskModelConfig::new(8, 16, 2, SsmLayer::S6, BlockArch::Mamba);
    let task_json = serde_json::to_vec_pretty(&task).unwrap_or_default();
    Ok(vec![
        ("safetensors", weights.clone()),
        ("model_weights", weights),
        (
            "shard_index",
            br#"{"metadata": {"total_size": 64}, "weight_map": {"backbone.norm_f.weight":
                "model-00001-of-00002.safetensors", "backbone.embeddings.weight":
                "model-00002-of-00002.safetensors"}}"#
                .to_vec(),
        ),
        ("config_json", TARGET_MODEL_CONFIG.as_bytes().to_vec()),
        (
            "model_config_with_weights",
            TARGET_MODEL_CONFIG.as_bytes().to_vec(),
        ),
        (
            "config_json",
            br#"{"d_model": 8, "n_layer": 2, "vocab_size": 13, "ssm_cfg": {"d_state": 4},
                "rms_norm": true, "pad_vocab_size_multiple": 8, "tokenizer": {"chars": "abc"}}"#
                .to_vec(),
        ),
        ("task_model_json", task_json),
        (
            "tokenizer_json",
            br#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
                "post_processor": null, "decoder": null, "model": {"type": "WordLevel",
                "vocab": {"[UNK]": 0, "the": 1, "king": 2, ",": 3}, "unk_token": "[UNK]"}}"#
                .to_vec(),
        ),
        (
            "char_vocab",
            "First Citizen:\nBefore we proceed any further, hear me speak.\n"
                .as_bytes()
                .to_vec(),
        ),
        ("state_file", state),
    ])
}
