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
        ("mamba2", "model_type", serde_json::json!("mamba2")),
        ("empty", "model_type", serde_json::json!("")),
        ("number", "model_type", serde_json::json!(5)),
        (
            "arch",
            "architectures",
            serde_json::json!(["Mamba2ForCausalLM"]),
        ),
    ] {
        let dir = edited_copy(tag, |c| c[key] = value.clone());
        let err = load_error(&dir);
        assert!(err.contains("is not supported"), "{tag}: {err}");
        assert!(err.contains("MambaForCausalLM"), "{tag}: {err}");
    }
}
