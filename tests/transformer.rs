//! The Transformer++ baseline against Hugging Face transformers'
//! LlamaForCausalLM (float64 references made by
//! scripts/make_transformer_reference.py), finite differences, its KV
//! cache, and its files.

mod common;

use common::{assert_close, ids_of, models_dir, read_reference, read_reference_file};
use selective::io::DType;
use selective::nn::{next_token_cross_entropy, KvCache, Positions, Transformer, TransformerConfig};

/// An empty directory of its own under the system's temporary directory.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "selective-transformer-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small random model with every norm weight perturbed away from 1.
fn random_model(positions: Positions, tied: bool, seed: u64) -> Transformer<f64> {
    let mut c = TransformerConfig::new(12, 2, 11, 3);
    c.d_ff = 20;
    c.positions = positions;
    c.max_position_embeddings = 16;
    c.tie_embeddings = tied;
    c.rope_theta = 50.0;
    let mut model = Transformer::<f64>::init(c.clone(), seed).unwrap();
    let mut rng = selective::rng::Rng::new(seed + 1);
    for (_, t) in model.params.tensors_mut(&c) {
        for v in t.iter_mut() {
            // weights of order 0.3 so that attention is far from uniform
            *v = *v * 10.0 + 0.1 * rng.normal();
        }
    }
    model
}

#[test]
fn gradients_match_finite_differences() {
    for (positions, tied) in [(Positions::Rotary, true), (Positions::Learned, false)] {
        let model = random_model(positions, tied, 3);
        let c = model.config.clone();
        let (batch, len) = (2, 7);
        let ids: Vec<u32> = (0..batch * len)
            .map(|i| ((i * 7 + 3) % 11) as u32)
            .collect();
        let loss_of = |m: &Transformer<f64>| {
            let logits = m.forward(&ids, batch, len).unwrap();
            next_token_cross_entropy(&logits, &ids, batch, len, 11)
                .unwrap()
                .0
        };
        let (logits, cache) = model.forward_train(&ids, batch, len).unwrap();
        let (_, d_logits) = next_token_cross_entropy(&logits, &ids, batch, len, 11).unwrap();
        let grads = model.backward(&ids, &cache, &d_logits).unwrap();
        let eps = 1e-6;
        let mut probe = model.clone();
        for ((info, g), idx) in grads.tensors(&c).into_iter().zip(0..) {
            let mut fd = vec![0.0; g.len()];
            for (i, f) in fd.iter_mut().enumerate() {
                let orig = probe.params.tensors(&c)[idx].1[i];
                probe.params.tensors_mut(&c)[idx].1[i] = orig + eps;
                let lp = loss_of(&probe);
                probe.params.tensors_mut(&c)[idx].1[i] = orig - eps;
                let lm = loss_of(&probe);
                probe.params.tensors_mut(&c)[idx].1[i] = orig;
                *f = (lp - lm) / (2.0 * eps);
            }
            assert!(
                g.iter().any(|&x| x.abs() > 1e-6),
                "{positions:?} {}: a gradient of zeros checks nothing",
                info.name
            );
            assert_close(
                &format!("{positions:?} fd {}", info.name),
                g,
                &fd,
                1e-8,
                1e-6,
            );
        }
    }
}

#[test]
fn kv_cache_chunks_equal_the_full_forward() {
    for positions in [Positions::Rotary, Positions::Learned] {
        let model = random_model(positions, true, 11);
        let ids: Vec<u32> = (0..13).map(|i| ((i * 5 + 1) % 11) as u32).collect();
        let want = model.final_hidden(&ids, 1, ids.len()).unwrap();
        // prefill 5, then 1, 4, then single steps
        let mut caches = vec![KvCache::default(); model.config.n_layer];
        let mut got = Vec::new();
        let mut at = 0;
        for n in [5, 1, 4, 1, 1, 1] {
            got.extend(model.forward_cached(&ids[at..at + n], &mut caches).unwrap());
            at += n;
        }
        assert_eq!(at, ids.len());
        assert_close(&format!("{positions:?} cached"), &got, &want, 1e-12, 1e-11);
    }
}

#[test]
fn learned_positions_end_at_their_table() {
    let model = random_model(Positions::Learned, true, 2);
    let ids = vec![1u32; 17];
    let e = model.forward(&ids, 1, 17).unwrap_err();
    assert!(
        e.to_string().contains("past the 16 learned positions"),
        "{e}"
    );
    assert!(model.forward(&ids[..16], 1, 16).is_ok());
}

#[test]
fn logits_loss_and_greedy_tokens_equal_transformers() {
    for dir in ["tiny-llama", "small-llama"] {
        let r = read_reference(dir);
        let (ids, batch, len) = ids_of(&r, "input_ids");
        let want = &r["logits"].1;
        let m64 = Transformer::<f64>::from_dir(models_dir().join(dir)).unwrap();
        let got = m64.forward(&ids, batch, len).unwrap();
        assert_close(&format!("{dir} f64 logits"), &got, want, 1e-9, 1e-9);
        let m32 = Transformer::<f32>::from_dir(models_dir().join(dir)).unwrap();
        let got32 = m32.forward(&ids, batch, len).unwrap();
        assert_close(&format!("{dir} f32 logits"), &got32, want, 1e-4, 1e-4);
        let (loss, _) =
            next_token_cross_entropy(&got, &ids, batch, len, m64.config.vocab_size).unwrap();
        assert!(
            (loss - r["loss"].1[0]).abs() < 1e-10,
            "{dir} loss {loss} vs {}",
            r["loss"].1[0]
        );
        // greedy through the KV cache
        let (prompt, _, _) = ids_of(&r, "greedy_prompt");
        let (tokens, _, n) = ids_of(&r, "greedy_tokens");
        let v = m64.config.vocab_size;
        let mut caches = vec![KvCache::default(); m64.config.n_layer];
        let mut hidden = m64.forward_cached(&prompt, &mut caches).unwrap();
        let mut out = Vec::new();
        for _ in 0..n {
            let d = m64.config.d_model;
            let logits = m64.logits_from_hidden(&hidden[hidden.len() - d..]).unwrap();
            let next = (0..v)
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap() as u32;
            out.push(next);
            hidden = m64.forward_cached(&[next], &mut caches).unwrap();
        }
        assert_eq!(out, tokens, "{dir} greedy");
        // one cached decode step after a prefill of t tokens, as transformers' cache
        let kv = read_reference_file(dir, "kv_decode.safetensors");
        let t = kv["decode_position"].1[0] as usize;
        let mut caches = vec![KvCache::default(); m64.config.n_layer];
        m64.forward_cached(&ids[..t], &mut caches).unwrap();
        let hidden = m64.forward_cached(&ids[t..t + 1], &mut caches).unwrap();
        let got = m64.logits_from_hidden(&hidden).unwrap();
        assert_close(
            &format!("{dir} decode logits"),
            &got,
            &kv["decode_logits"].1,
            1e-9,
            1e-9,
        );
    }
}

#[test]
fn gradients_equal_pytorch_autograd() {
    for dir in ["tiny-llama", "small-llama"] {
        let r = read_reference(dir);
        let (ids, batch, len) = ids_of(&r, "input_ids");
        let model = Transformer::<f64>::from_dir(models_dir().join(dir)).unwrap();
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
fn save_and_load_round_trip_in_the_llama_layout() {
    for (positions, tied) in [
        (Positions::Rotary, true),
        (Positions::Rotary, false),
        (Positions::Learned, true),
    ] {
        let model = random_model(positions, tied, 5);
        let dir = scratch_dir(&format!("{positions:?}-{tied}"));
        model.save(&dir, DType::F64).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], "llama");
        assert_eq!(config["architectures"][0], "LlamaForCausalLM");
        let back = Transformer::<f64>::from_dir(&dir).unwrap();
        assert_eq!(back, model);
    }
}

#[test]
fn bad_files_are_errors_that_name_the_tensor() {
    let model = random_model(Positions::Rotary, true, 5);
    let dir = scratch_dir("bad");
    model.save(&dir, DType::F32).unwrap();
    // a config of another width
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["intermediate_size"] = 24.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let e = Transformer::<f32>::from_dir(&dir).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[24, 12]"),
        "{e}"
    );
    // grouped-query attention is refused by name
    config["intermediate_size"] = 20.into();
    config["num_key_value_heads"] = 1.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let e = Transformer::<f32>::from_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("num_key_value_heads"), "{e}");
    // a Llama directory read as Mamba says what it is
    let e = selective::nn::Mamba::<f32>::from_dir(&dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Transformer"), "{e}");
}

/// docs/DESIGN.md §15.8, by hand for the smallest sizes of the language
/// comparison.
#[test]
fn training_flops_per_token_follow_the_counting_rule() {
    use selective::nn::MambaConfig;
    // Transformer++ D 128, 2 layers, 2 heads, F 344, V 72, context 256:
    // 6 (2 (4·128² + 3·344·128) + 72·128) + 6·2·256·128
    let t = TransformerConfig::new(128, 2, 72, 2);
    assert_eq!(t.d_ff, 344);
    assert_eq!(t.training_flops_per_token(256), 2_426_880.0 + 393_216.0);
    assert_eq!(t.n_non_embedding_params(), t.n_params() - 72 * 128);
    // Mamba D 128 (E 256, N 16, R 8, K 4), 4 layers, V 72:
    // 6 (4 (2·256·128 + 40·256 + 256·8 + 128·256) + 72·128) + 4 (6·256·4 + 27·256·16)
    let m = MambaConfig::new(128, 4, 72, 16);
    assert_eq!((m.d_inner, m.dt_rank, m.d_conv), (256, 8, 4));
    assert_eq!(m.training_flops_per_token(), 2_709_504.0 + 466_944.0);
    assert_eq!(m.n_non_embedding_params(), m.n_params() - 72 * 128);
}
