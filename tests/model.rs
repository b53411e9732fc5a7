//! The Mamba language model against Hugging Face transformers'
//! MambaForCausalLM (float64 references made by
//! scripts/make_model_reference.py; Falcon-Mamba's and Mamba-2's by
//! scripts/make_mamba2_reference.py), finite differences, and its own
//! loading, saving and initialisation rules.

mod common;

use common::{
    assert_close, assert_gradients_match_finite_differences, ids_of, models_dir, read_reference,
};
use selective::io::{DType, SafetensorsFile, TensorSource};
use selective::nn::{next_token_cross_entropy, Mamba, MambaConfig, ParamKind};
use selective::Error;

/// Greedy continuation by re-running the whole forward (the recurrent
/// decoder is tested elsewhere).
fn greedy<T: selective::nn::BlockScalar>(model: &Mamba<T>, prompt: &[u32], n: usize) -> Vec<u32> {
    let v = model.config.vocab_size;
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let logits = model.forward(&seq, 1, seq.len()).unwrap();
        let last = &logits[(seq.len() - 1) * v..];
        let mut best = 0;
        for (i, x) in last.iter().enumerate() {
            if x.to_f64() > last[best].to_f64() {
                best = i;
            }
        }
        seq.push(best as u32);
    }
    seq[prompt.len()..].to_vec()
}

use selective::Float;

#[test]
fn logits_loss_and_greedy_tokens_equal_transformers() {
    // Falcon-Mamba and Mamba-2 (docs/DESIGN.md §17; made by
    // scripts/make_mamba2_reference.py: transformers for one group, the
    // script's mamba_ssm equations for more groups and the state-spaces
    // layout)
    for dir in [
        "tiny-hf",
        "small-hf",
        "small-bf16",
        "falcon-tiny-hf",
        "mamba2-tiny-hf",
        "mamba2-tiny-hf-limit",
        "mamba2-g4-hf",
        "mamba2-g2-original",
    ] {
        let r = read_reference(dir);
        let (ids, batch, len) = ids_of(&r, "input_ids");
        let want = &r["logits"].1;
        let m64 = Mamba::<f64>::from_dir(models_dir().join(dir)).unwrap();
        let got = m64.forward(&ids, batch, len).unwrap();
        assert_close(&format!("{dir} f64 logits"), &got, want, 1e-9, 1e-9);
        let m32 = Mamba::<f32>::from_dir(models_dir().join(dir)).unwrap();
        let got32 = m32.forward(&ids, batch, len).unwrap();
        let max_diff = got32
            .iter()
            .zip(want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        let max64 = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!("{dir}: max |logit diff| f64 {max64:.3e}, f32 {max_diff:.3e}");
        assert!(max_diff <= 1e-4, "{dir} f32 max |logit diff| {max_diff}");
        let (loss, _) =
            next_token_cross_entropy(&got, &ids, batch, len, m64.config.vocab_size).unwrap();
        assert!(
            (loss - r["loss"].1[0]).abs() < 1e-10,
            "{dir} loss {loss} vs {}",
            r["loss"].1[0]
        );
        let (prompt, _, _) = ids_of(&r, "greedy_prompt");
        let (tokens, _, n) = ids_of(&r, "greedy_tokens");
        assert_eq!(greedy(&m32, &prompt, n), tokens, "{dir} greedy");
    }
}

#[test]
fn gradients_equal_pytorch_autograd() {
    for dir in [
        "tiny-hf",
        "small-hf",
        "falcon-tiny-hf",
        "mamba2-tiny-hf",
        "mamba2-tiny-hf-limit",
        "mamba2-g4-hf",
    ] {
        let r = read_reference(dir);
        let (ids, batch, len) = ids_of(&r, "input_ids");
        let model = Mamba::<f64>::from_dir(models_dir().join(dir)).unwrap();
        let (logits, cache) = model.forward_train(&ids, batch, len).unwrap();
        let (_, d_logits) =
            next_token_cross_entropy(&logits, &ids, batch, len, model.config.vocab_size).unwrap();
        let grads = model.backward(&ids, &cache, &d_logits).unwrap();
        let mut checked = 0;
        for (info, g) in grads.tensors(&model.config) {
            let (shape, want) = r
                .get(&format!("grad.{}", info.name))
                .unwrap_or_else(|| panic!("{dir}: no reference gradient for {}", info.name));
            assert_eq!(shape, &info.shape, "{dir} {}", info.name);
            assert_close(&format!("{dir} grad {}", info.name), g, want, 1e-10, 1e-8);
            checked += 1;
        }
        assert_eq!(
            checked,
            r.keys().filter(|k| k.starts_with("grad.")).count(),
            "{dir}: every gradient checked"
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    // A small random model with LayerNorm, projection biases and an untied
    // head, so that every optional parameter is covered; initialised
    // constants are perturbed so that no term hides.
    let mut c = MambaConfig::new(8, 2, 11, 3);
    c.dt_rank = 2;
    c.rms_norm = false;
    c.proj_bias = true;
    c.tie_embeddings = false;
    check_finite_differences(&c);
    // Falcon-Mamba: dt_low, B and C RMS-normalised after x_proj (a rank of
    // 3 so that dt_low's norm is not a sign function)
    let mut falcon = MambaConfig::new(8, 2, 11, 3);
    falcon.dt_rank = 3;
    falcon.tie_embeddings = false;
    falcon.dt_bc_rms_eps = Some(1e-6);
    check_finite_differences(&falcon);
}

fn check_finite_differences(c: &MambaConfig) {
    let mut model = Mamba::<f64>::init(c.clone(), 5).unwrap();
    let mut rng = selective::rng::Rng::new(9);
    for (_, t) in model.params.tensors_mut(c) {
        for v in t.iter_mut() {
            *v += 0.2 * rng.normal();
        }
    }
    let label = format!("mixer_rms_eps {:?}", c.dt_bc_rms_eps);
    assert_gradients_match_finite_differences(&mut model, &label);
}

#[test]
fn original_checkpoint_pytorch_bin_loads() {
    let r = read_reference("tiny-original");
    let (ids, batch, len) = ids_of(&r, "input_ids");
    let m = Mamba::<f64>::from_dir(models_dir().join("tiny-original")).unwrap();
    assert_eq!(m.config.vocab_size, 40, "37 padded to a multiple of 8");
    let got = m.forward(&ids, batch, len).unwrap();
    assert_close("tiny-original logits", &got, &r["logits"].1, 1e-9, 1e-9);
}

/// The generator of tests/data/models/mamba-130m-uniform/GENERATOR.md.
fn generated_value(name: &str, shape: &[usize]) -> Vec<f32> {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.as_bytes() {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    let mut rng = selective::rng::Rng::new(h);
    let numel: usize = shape.iter().product();
    let cols = *shape.last().unwrap();
    (0..numel)
        .map(|i| {
            let e = 2.0 * rng.uniform() - 1.0;
            let v = if name.ends_with("embeddings.weight") {
                0.1 * e
            } else if name.ends_with("conv1d.weight") {
                0.5 * e
            } else if name.ends_with("conv1d.bias") {
                0.1 * e
            } else if name.ends_with("dt_proj.bias") {
                let dt = (0.001f64.ln() + (e + 1.0) / 2.0 * (0.1f64.ln() - 0.001f64.ln())).exp();
                dt + (-(-dt).exp_m1()).ln()
            } else if name.ends_with("A_log") {
                ((i % cols) as f64 + 1.0).ln() + 0.1 * e
            } else if name.ends_with(".D")
                || name.ends_with("norm.weight")
                || name.ends_with("norm_f.weight")
            {
                1.0 + 0.1 * e
            } else {
                e / (shape[1] as f64).sqrt()
            };
            v as f32
        })
        .collect()
}

#[test]
fn mamba_130m_configuration_matches_transformers_within_1e_2() {
    let dir = models_dir().join("mamba-130m-uniform");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let (config, _) = MambaConfig::from_json_str(&text, "config.json").unwrap();
    assert_eq!(config, MambaConfig::mamba_130m());
    let mut model = Mamba::<f32>::init(config.clone(), 0).unwrap();
    for (info, t) in model.params.tensors_mut(&config) {
        *t = generated_value(&info.name, &info.shape);
    }
    // The generator's check values from GENERATOR.md.
    let first = |name: &str| {
        model
            .params
            .tensors(&config)
            .into_iter()
            .find(|(i, _)| i.name == name)
            .unwrap()
            .1[..2]
            .to_vec()
    };
    assert_eq!(
        first("backbone.layers.0.mixer.in_proj.weight"),
        [0.00858477657821438f32, 0.03589302238414031]
    );
    assert_eq!(
        first("backbone.layers.0.mixer.A_log"),
        [0.037738233430413916f32, 0.6245983289168215]
    );
    let r = read_reference("mamba-130m-uniform");
    let (ids, batch, len) = ids_of(&r, "input_ids");
    let got = model.forward(&ids, batch, len).unwrap();
    let max_diff = got
        .iter()
        .zip(&r["logits"].1)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    eprintln!("mamba-130m configuration: max |logit diff| f32 {max_diff:.3e}");
    assert!(max_diff <= 1e-2, "max |logit diff| {max_diff}");
    let (tokens, _, n) = ids_of(&r, "greedy_tokens");
    assert_eq!(greedy(&model, &ids, n), tokens);
}

#[test]
fn saved_checkpoints_have_the_transformers_layout_and_reload_exactly() {
    let src = models_dir().join("small-hf");
    let model = Mamba::<f32>::from_dir(&src).unwrap();
    let out = std::env::temp_dir().join(format!("selective-save-{}", std::process::id()));
    model.save(&out, DType::F32).unwrap();
    // Names, shapes and dtypes equal those transformers' save_pretrained wrote.
    let ours = SafetensorsFile::open(out.join("model.safetensors")).unwrap();
    let theirs = SafetensorsFile::open(src.join("model.safetensors")).unwrap();
    assert_eq!(ours.names(), theirs.names());
    for name in theirs.names() {
        let (a, b) = (
            ours.tensor(&name).unwrap().unwrap(),
            theirs.tensor(&name).unwrap().unwrap(),
        );
        assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape), "{name}");
        assert_eq!(a.bytes, b.bytes, "{name}: values differ");
    }
    let back = Mamba::<f32>::from_dir(&out).unwrap();
    assert_eq!(back, model);
    // bf16 saving rounds each weight to bf16.
    model.save(&out, DType::BF16).unwrap();
    let back16 = Mamba::<f32>::from_dir(&out).unwrap();
    let w = &model.params.layers[0].mixer.in_proj_weight;
    let w16 = &back16.params.layers[0].mixer.in_proj_weight;
    for (a, b) in w.iter().zip(w16) {
        assert!((a - b).abs() <= a.abs() / 128.0, "{a} vs {b}");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_checkpoints_are_errors_that_name_file_and_tensor() {
    let src = models_dir().join("tiny-hf");
    let model = Mamba::<f32>::from_dir(&src).unwrap();
    let dir = std::env::temp_dir().join(format!("selective-bad-{}", std::process::id()));
    let config = model.config.clone();
    let write = |tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)>| {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            config.to_hugging_face_json().to_string(),
        )
        .unwrap();
        selective::io::safetensors::write_safetensors(
            &dir.join("model.safetensors"),
            &tensors,
            None,
        )
        .unwrap();
    };
    let all: Vec<(String, DType, Vec<usize>, Vec<u8>)> = model
        .params
        .tensors(&config)
        .into_iter()
        .map(|(i, t)| {
            (
                i.name,
                DType::F32,
                i.shape,
                selective::io::safetensors::encode(t, DType::F32),
            )
        })
        .collect();

    // A missing tensor.
    write(
        all.iter()
            .filter(|t| t.0 != "backbone.layers.1.mixer.D")
            .cloned()
            .collect(),
    );
    let msg = Mamba::<f32>::from_dir(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("backbone.layers.1.mixer.D")
            && msg.contains("missing"),
        "{msg}"
    );

    // A wrong shape.
    let mut bad = all.clone();
    let x = bad
        .iter_mut()
        .find(|t| t.0.ends_with("0.mixer.x_proj.weight"))
        .unwrap();
    x.2 = vec![x.2[1], x.2[0]];
    write(bad);
    let msg = Mamba::<f32>::from_dir(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("x_proj.weight") && msg.contains("expected shape [10, 32], found [32, 10]"),
        "{msg}"
    );

    // An unexpected tensor.
    let mut extra = all.clone();
    extra.push((
        "backbone.layers.9.mixer.D".into(),
        DType::F32,
        vec![32],
        vec![0; 128],
    ));
    write(extra);
    let msg = Mamba::<f32>::from_dir(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("backbone.layers.9.mixer.D") && msg.contains("not a parameter"),
        "{msg}"
    );

    // A truncated file, and one that is not safetensors at all.
    write(all.clone());
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = Mamba::<f32>::from_dir(&dir).unwrap_err();
        assert!(
            err.to_string().contains("model.safetensors"),
            "cut {cut}: {err}"
        );
    }
    std::fs::write(&path, b"hello, this is not a checkpoint").unwrap();
    assert!(matches!(
        Mamba::<f32>::from_dir(&dir),
        Err(Error::Format { .. })
    ));

    // A config that cannot describe a model.
    std::fs::write(
        dir.join("config.json"),
        r#"{"hidden_size": 16, "num_hidden_layers": 0, "vocab_size": 40}"#,
    )
    .unwrap();
    let msg = Mamba::<f32>::from_dir(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("config.json") && msg.contains("n_layer"),
        "{msg}"
    );
    // Token ids outside the vocabulary.
    let msg = model.forward(&[1, 2, 40], 1, 3).unwrap_err().to_string();
    assert!(msg.contains("token id 40"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn initialisation_follows_the_official_recipe() {
    let c = MambaConfig::new(64, 4, 100, 16);
    let m = Mamba::<f64>::init(c.clone(), 3).unwrap();
    for layer in &m.params.layers {
        let mx = &layer.mixer;
        // A_log rows are log(1..N); D = 1.
        for row in mx.a_log.chunks(16) {
            for (n, &v) in row.iter().enumerate() {
                assert!((v - ((n + 1) as f64).ln()).abs() < 1e-15);
            }
        }
        assert!(mx.d.iter().all(|&v| v == 1.0));
        // softplus(dt_proj.bias) lies in [dt_min, dt_max] and spreads over it log-uniformly.
        let dts: Vec<f64> = mx.dt_proj_bias.iter().map(|&b| b.softplus()).collect();
        assert!(
            dts.iter()
                .all(|&dt| (0.001 - 1e-12..=0.1 + 1e-12).contains(&dt)),
            "{dts:?}"
        );
        let mean_log = dts.iter().map(|d| d.ln()).sum::<f64>() / dts.len() as f64;
        let mid = (0.001f64.ln() + 0.1f64.ln()) / 2.0;
        assert!(
            (mean_log - mid).abs() < 0.5,
            "mean ln dt {mean_log} vs {mid}"
        );
        // dt_proj.weight ~ U(±R^-1/2)
        let bound = 1.0 / (c.dt_rank as f64).sqrt();
        let max = mx.dt_proj_weight.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(
            max <= bound && max > 0.9 * bound,
            "dt_proj max {max} bound {bound}"
        );
        // out_proj: kaiming-uniform bound 1/sqrt(E), divided by sqrt(n_layer).
        let out_bound = 1.0 / (c.d_inner as f64).sqrt() / (c.n_layer as f64).sqrt();
        let max = mx
            .out_proj_weight
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(
            max <= out_bound && max > 0.95 * out_bound,
            "out_proj max {max} bound {out_bound}"
        );
        let in_bound = 1.0 / (c.d_model as f64).sqrt();
        let max = mx.in_proj_weight.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(max <= in_bound && max > 0.95 * in_bound);
        assert!(layer.norm_weight.iter().all(|&v| v == 1.0));
    }
    // embedding ~ N(0, 0.02)
    let e = &m.params.embedding;
    let std = (e.iter().map(|v| v * v).sum::<f64>() / e.len() as f64).sqrt();
    assert!((std - 0.02).abs() < 0.001, "embedding std {std}");
    // Weight decay groups: A_log and D are Ssm, biases and norms are not weights.
    for info in m.parameter_infos() {
        let kind = info.kind;
        if info.name.ends_with("A_log") || info.name.ends_with(".D") {
            assert_eq!(kind, ParamKind::Ssm, "{}", info.name);
        } else if info.name.ends_with("bias") {
            assert_eq!(kind, ParamKind::Bias, "{}", info.name);
        }
    }
    // The same seed gives the same model; another seed another.
    assert_eq!(Mamba::<f64>::init(c.clone(), 3).unwrap(), m);
    assert_ne!(Mamba::<f64>::init(c, 4).unwrap(), m);
}
