//! A model directory whose config.json contradicts its weights, names
//! another architecture, or claims an impossible size: each is an error
//! that names what disagrees, before anything of the claimed size is
//! allocated (issue 23's corpus aborted on 10^15-sized configs).

mod common;

use std::path::PathBuf;

use common::models_dir;
use selective::nn::Mamba;

/// tiny-hf copied to a fresh directory with `edit` applied to its config.json.
fn edited_copy(tag: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let src = models_dir().join("tiny-hf");
    let dir = std::env::temp_dir().join(format!(
        "selective-model-files-{tag}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

fn load_error(dir: &PathBuf) -> String {
    let err = Mamba::<f32>::from_dir(dir).unwrap_err().to_string();
    std::fs::remove_dir_all(dir).unwrap();
    err
}

#[test]
fn the_unedited_copy_loads() {
    let dir = edited_copy("plain", |_| {});
    Mamba::<f32>::from_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_expand_that_contradicts_the_weights_names_the_tensor_and_the_sizes() {
    let dir = edited_copy("expand", |c| {
        c["expand"] = 4.into();
        c["intermediate_size"] = 64.into();
    });
    let err = load_error(&dir);
    assert!(err.contains("expected shape"), "{err}");
    assert!(err.contains("d_inner 64"), "{err}");
    assert!(err.contains("backbone.layers.0.mixer."), "{err}");
}

#[test]
fn sizes_of_ten_to_the_fifteen_are_errors_not_allocation_failures() {
    for field in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "state_size",
        "vocab_size",
        "conv_kernel",
        "time_step_rank",
    ] {
        let dir = edited_copy(field, |c| c[field] = 1_000_000_000_000_000u64.into());
        let err = load_error(&dir);
        // the error names the size (as the parameter count's bound or as
        // the sizes beside the contradicted tensor)
        assert!(err.contains("1000000000000000"), "{field}: {err}");
    }
}

#[test]
fn another_architecture_is_refused_with_the_supported_list() {
    for (tag, key, value) in [
        ("llama", "model_type", serde_json::json!("llama")),
        ("jamba", "model_type", serde_json::json!("jamba")),
        ("empty", "model_type", serde_json::json!("")),
        ("number", "model_type", serde_json::json!(5)),
        (
            "arch",
            "architectures",
            serde_json::json!(["JambaForCausalLM"]),
        ),
    ] {
        let dir = edited_copy(tag, |c| c[key] = value.clone());
        let err = load_error(&dir);
        if tag == "llama" {
            // a Llama config is an architecture this project reads, with
            // another type: the error says which one reads it
            assert!(err.contains("is a Transformer"), "{tag}: {err}");
            assert!(err.contains("Transformer::from_dir"), "{tag}: {err}");
        } else {
            assert!(err.contains("is not supported"), "{tag}: {err}");
            assert!(err.contains("MambaForCausalLM"), "{tag}: {err}");
        }
    }
}

#[test]
fn a_vocab_size_beyond_the_padding_of_the_embedding_is_refused() {
    // tiny-hf's embedding has 40 rows: 40 is a multiple of 8, so any other
    // vocab_size contradicts it (issue 23: vocab_size 128 on 64 rows)
    for vocab in [48, 80] {
        let dir = edited_copy(&format!("vocab{vocab}"), |c| c["vocab_size"] = vocab.into());
        let err = load_error(&dir);
        assert!(
            err.contains("backbone.embeddings.weight")
                && err.contains(&format!("vocab_size {vocab}")),
            "{vocab}: {err}"
        );
    }
}

#[test]
fn an_embedding_padded_to_a_multiple_of_eight_loads_with_zero_rows() {
    use selective::io::{write_safetensors, DType, SafetensorsFile, TensorSource};
    // 37 stored rows under vocab_size 40: mamba_ssm's padding
    let dir = edited_copy("padded", |_| {});
    let file = SafetensorsFile::open(dir.join("model.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for name in file.names() {
        let t = file.tensor(&name).unwrap().unwrap();
        let mut values = t.to_vec::<f32>("tiny-hf", &name).unwrap();
        let mut shape = t.shape.clone();
        if name == "backbone.embeddings.weight" {
            shape[0] = 37;
            values.truncate(37 * 16);
        }
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((name, DType::F32, shape, bytes));
    }
    drop(file);
    write_safetensors(&dir.join("model.safetensors"), &tensors, None).unwrap();
    let model = Mamba::<f32>::from_dir(&dir).unwrap();
    let full = Mamba::<f32>::from_dir(models_dir().join("tiny-hf")).unwrap();
    assert_eq!(
        model.params.embedding[..37 * 16],
        full.params.embedding[..37 * 16]
    );
    assert!(model.params.embedding[37 * 16..].iter().all(|&v| v == 0.0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_expand_that_only_duplicates_intermediate_size_is_a_note_not_an_error() {
    // as tiiuae/falcon-mamba-7b ships: expand 16, hidden 4096, intermediate 8192
    let dir = edited_copy("expand-note", |c| c["expand"] = 16.into());
    let model = Mamba::<f32>::from_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(model.config.d_inner, 32, "intermediate_size decides");
    let notes = model.config.disagreements();
    assert_eq!(notes.len(), 1);
    assert!(
        notes[0].contains("expand 16") && notes[0].contains("intermediate_size 32"),
        "{notes:?}"
    );
    let plain = Mamba::<f32>::from_dir(models_dir().join("tiny-hf")).unwrap();
    assert!(plain.config.disagreements().is_empty());
}

#[test]
fn more_layers_than_the_file_holds_and_non_finite_weights_are_refused() {
    let dir = edited_copy("layers", |c| c["num_hidden_layers"] = 100_000.into());
    let err = load_error(&dir);
    assert!(err.contains("n_layer 100000"), "{err}");
    for (tag, bits) in [
        ("nan", f32::NAN.to_bits()),
        ("inf", f32::INFINITY.to_bits()),
    ] {
        let dir = edited_copy(tag, |_| {});
        // the last 4 bytes of the file are the last value of some tensor
        let path = dir.join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&bits.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
        let err = load_error(&dir);
        assert!(err.contains("weights must be finite"), "{tag}: {err}");
    }
}

#[test]
fn a_tokenizer_larger_than_the_embedding_is_refused() {
    use selective::generate::{CharVocab, Tokenizer};
    let chars: Vec<char> = (0..200u32)
        .map(|i| char::from_u32(0x100 + i).unwrap())
        .collect();
    let tokenizer = Tokenizer::Chars(CharVocab::new(chars).unwrap());
    let err = tokenizer.check_fits(64).unwrap_err().to_string();
    assert!(
        err.contains("200 tokens") && err.contains("64 rows"),
        "{err}"
    );
    tokenizer.check_fits(200).unwrap();
}
