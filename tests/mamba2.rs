//! Mamba-2 (the SSD mixer): how the fixtures of
//! scripts/make_mamba2_reference.py read (their logits and gradients are
//! checked in tests/model.rs), finite differences, the recurrent decoder,
//! batching and weight formats, state files, saving and the
//! configuration rules.

mod common;

use common::{assert_gradients_match_finite_differences, models_dir};
use selective::kernels::WeightFormat;
use selective::nn::{DecodeBuffers, InferenceModel, Mamba, MambaConfig, Sequence, SsdConfig};
use selective::rng::Rng;

/// Every Mamba-2 fixture: n_groups 1 (untied; tied with a clamping
/// time_step_limit), 4 groups, and the state-spaces layout with 2 groups.
const FIXTURES: [&str; 4] = [
    "mamba2-tiny-hf",
    "mamba2-tiny-hf-limit",
    "mamba2-g4-hf",
    "mamba2-g2-original",
];

fn argmax<T: selective::Float>(v: &[T]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if x.to_f64() > v[best].to_f64() {
            best = i;
        }
    }
    best as u32
}

#[test]
fn configurations_of_both_layouts_read_as_the_fixtures_were_made() {
    let tiny = Mamba::<f32>::from_dir(models_dir().join("mamba2-tiny-hf")).unwrap();
    let c = &tiny.config;
    assert_eq!(
        c.ssd,
        Some(SsdConfig {
            head_dim: 6,
            n_groups: 1,
            chunk_size: 4,
            dt_limit: (0.0, f64::INFINITY)
        })
    );
    assert_eq!(
        (c.d_model, c.d_inner, c.d_state, c.n_heads()),
        (15, 30, 5, 5)
    );
    assert!(!c.tie_embeddings);
    let limit = Mamba::<f32>::from_dir(models_dir().join("mamba2-tiny-hf-limit")).unwrap();
    assert_eq!(limit.config.ssd.unwrap().dt_limit, (0.004, 0.04));
    assert!(limit.config.tie_embeddings);
    let original = Mamba::<f32>::from_dir(models_dir().join("mamba2-g2-original")).unwrap();
    let c = &original.config;
    assert_eq!(
        c.ssd,
        Some(SsdConfig {
            head_dim: 8,
            n_groups: 2,
            chunk_size: 5,
            dt_limit: (0.0, f64::INFINITY)
        })
    );
    // vocab 37 padded to a multiple of 8, head tied
    assert_eq!((c.vocab_size, c.d_state, c.n_heads()), (40, 7, 4));
    assert!(c.tie_embeddings);
}

// Logits, loss, greedy tokens and every gradient of the fixtures are
// checked beside Mamba-1's, in tests/model.rs.

/// A small random Mamba-2 with every optional parameter (projection
/// biases, an untied head), 2 groups, head_dim 3, a chunk that does not
/// divide the length, and perturbed constants so that no term hides.
fn random_mamba2(dt_limit: (f64, f64), seed: u64) -> Mamba<f64> {
    let mut ssd = SsdConfig::new(3, 2);
    ssd.chunk_size = 3;
    ssd.dt_limit = dt_limit;
    let mut c = MambaConfig::mamba2(6, 2, 11, 4, ssd);
    c.proj_bias = true;
    c.tie_embeddings = false;
    let mut model = Mamba::<f64>::init(c.clone(), seed).unwrap();
    let mut rng = Rng::new(seed + 4);
    for (_, t) in model.params.tensors_mut(&c) {
        for v in t.iter_mut() {
            *v += 0.2 * rng.normal();
        }
    }
    model
}

#[test]
fn gradients_match_finite_differences() {
    // no clamp, then a limit that clamps some Δ (away from its bounds:
    // the clamp's derivative jumps there)
    for limit in [(0.0, f64::INFINITY), (0.02, 0.12)] {
        let mut model = random_mamba2(limit, 5);
        assert_gradients_match_finite_differences(&mut model, &format!("limit {limit:?}"));
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn decoding_step_by_step_and_chunked_prefill_equal_the_full_forward() {
    for dir in FIXTURES {
        let mamba = Mamba::<f32>::from_dir(models_dir().join(dir)).unwrap();
        let v = mamba.config.vocab_size;
        let mut rng = Rng::new(7);
        let ids: Vec<u32> = (0..23).map(|_| rng.below(37) as u32).collect();
        let full = mamba.forward(&ids, 1, ids.len()).unwrap();
        let mut model = InferenceModel::from_mamba(mamba, WeightFormat::F32).unwrap();
        // one token at a time
        let mut seq = Sequence::new(&model.config);
        let mut buffers = DecodeBuffers::new(&model.config, 1);
        for (t, &id) in ids.iter().enumerate() {
            model
                .decode_step(&mut [&mut seq], &[id], &mut buffers)
                .unwrap();
            let diff = max_abs_diff(&seq.logits, &full[t * v..(t + 1) * v]);
            assert!(diff < 1e-4, "{dir} step {t}: {diff}");
        }
        // prefill in chunks that do not divide the SSD's chunk, then decode
        for prefill_chunk in [1, 5, 64] {
            model.prefill_chunk = prefill_chunk;
            let mut seq = Sequence::new(&model.config);
            model.prefill(&mut seq, &ids[..17]).unwrap();
            let diff = max_abs_diff(&seq.logits, &full[16 * v..17 * v]);
            assert!(diff < 1e-4, "{dir} prefill chunk {prefill_chunk}: {diff}");
            for (t, &id) in ids.iter().enumerate().skip(17) {
                model
                    .decode_step(&mut [&mut seq], &[id], &mut buffers)
                    .unwrap();
                let diff = max_abs_diff(&seq.logits, &full[t * v..(t + 1) * v]);
                assert!(diff < 1e-4, "{dir} chunk {prefill_chunk} step {t}: {diff}");
            }
        }
    }
}

#[test]
fn batched_decoding_and_every_weight_format_agree() {
    let mamba = Mamba::<f32>::from_dir(models_dir().join("mamba2-g4-hf")).unwrap();
    let v = mamba.config.vocab_size;
    let prompts: [&[u32]; 3] = [&[3, 1, 4, 1, 5], &[9, 2], &[6, 5, 3, 5, 8, 9, 7]];
    let f32_model = InferenceModel::from_mamba(mamba.clone(), WeightFormat::F32).unwrap();
    for format in [
        WeightFormat::F32,
        WeightFormat::Bf16,
        WeightFormat::F16,
        WeightFormat::Q8,
    ] {
        let model = InferenceModel::from_mamba(mamba.clone(), format).unwrap();
        // each prompt alone, then 4 greedy tokens
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| {
                let mut seq = Sequence::new(&model.config);
                model.prefill(&mut seq, p).unwrap();
                let mut bufs = DecodeBuffers::new(&model.config, 1);
                let mut out = Vec::new();
                for _ in 0..4 {
                    let next = argmax(&seq.logits);
                    model
                        .decode_step(&mut [&mut seq], &[next], &mut bufs)
                        .unwrap();
                    out.extend_from_slice(&seq.logits);
                }
                out
            })
            .collect();
        // all three together
        let mut seqs: Vec<Sequence> = prompts
            .iter()
            .map(|p| {
                let mut seq = Sequence::new(&model.config);
                model.prefill(&mut seq, p).unwrap();
                seq
            })
            .collect();
        let mut bufs = DecodeBuffers::new(&model.config, 3);
        let mut together = vec![Vec::new(); 3];
        for _ in 0..4 {
            let next: Vec<u32> = seqs.iter().map(|s| argmax(&s.logits)).collect();
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
            model.decode_step(&mut refs, &next, &mut bufs).unwrap();
            for (out, s) in together.iter_mut().zip(&seqs) {
                out.extend_from_slice(&s.logits);
            }
        }
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a, b, "{format:?} prompt {i}: batched differs from alone");
        }
        // the smaller formats stay near f32 on the first decoded logits
        let mut seq = Sequence::new(&f32_model.config);
        f32_model.prefill(&mut seq, prompts[0]).unwrap();
        let mut mine = Sequence::new(&model.config);
        model.prefill(&mut mine, prompts[0]).unwrap();
        let diff = max_abs_diff(&seq.logits, &mine.logits);
        let bound = match format {
            WeightFormat::F32 => 0.0,
            _ => 0.05,
        };
        assert!(diff <= bound, "{format:?}: {diff} from f32 over {v} logits");
    }
}

#[test]
fn a_saved_state_continues_the_sequence_exactly() {
    use selective::io::{load_sequence, save_sequence};
    let mamba = Mamba::<f32>::from_dir(models_dir().join("mamba2-g2-original")).unwrap();
    let model = InferenceModel::from_mamba(mamba, WeightFormat::F32).unwrap();
    let ids = [5u32, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9];
    let mut whole = Sequence::new(&model.config);
    model.prefill(&mut whole, &ids).unwrap();
    let mut first = Sequence::new(&model.config);
    model.prefill(&mut first, &ids[..6]).unwrap();
    let path =
        std::env::temp_dir().join(format!("mamba2-state-{}.safetensors", std::process::id()));
    save_sequence(&path, &first, &model.config).unwrap();
    let mut resumed = load_sequence(&path, &model.config).unwrap();
    model.prefill(&mut resumed, &ids[6..]).unwrap();
    // bit for bit what the sequence would have done without the file
    let mut kept = first.clone();
    model.prefill(&mut kept, &ids[6..]).unwrap();
    assert_eq!(resumed, kept);
    // and, up to rounding (the SSD's chunks fall elsewhere), the prompt
    // prefilled at once
    let diff = max_abs_diff(&resumed.logits, &whole.logits);
    assert!(diff < 1e-5, "{diff}");
    // a Mamba-1 model of the same d_inner and d_state refuses it
    let mamba1 = MambaConfig::new(16, 2, 40, 7);
    let err = load_sequence(&path, &mamba1).unwrap_err().to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(err.contains("heads=4"), "{err}");
}

#[test]
fn saved_models_reload_exactly_in_the_transformers_layout() {
    let model = random_mamba2((0.0, f64::INFINITY), 3);
    let dir = std::env::temp_dir().join(format!("mamba2-save-{}", std::process::id()));
    let model = Mamba::<f32> {
        config: model.config.clone(),
        params: {
            let mut p = selective::nn::MambaParams::<f32>::zeros(&model.config);
            for ((_, dst), (_, src)) in p
                .tensors_mut(&model.config)
                .into_iter()
                .zip(model.params.tensors(&model.config))
            {
                *dst = src.iter().map(|&v| v as f32).collect();
            }
            p
        },
    };
    model.save(&dir, selective::io::DType::F32).unwrap();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let back = Mamba::<f32>::from_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        text.contains("\"model_type\": \"mamba2\"") || text.contains("\"model_type\":\"mamba2\"")
    );
    assert_eq!(back, model);
}

#[test]
fn initialisation_follows_mamba_ssm() {
    let mut c = MambaConfig::mamba2(64, 2, 50, 16, SsdConfig::new(16, 2));
    c.tie_embeddings = false;
    let m = Mamba::<f64>::init(c.clone(), 1).unwrap();
    for layer in &m.params.layers {
        let x = &layer.mixer;
        let h = c.n_heads();
        assert_eq!(x.a_log.len(), h);
        // A uniform in [1, 16]
        assert!(
            x.a_log.iter().all(|&a| a >= 0.0 && a <= 16f64.ln()),
            "{:?}",
            x.a_log
        );
        assert!(x.d.iter().all(|&d| d == 1.0));
        assert!(x.norm_weight.as_ref().unwrap().iter().all(|&w| w == 1.0));
        // softplus(dt_bias) in [dt_min, dt_max]
        for &b in &x.dt_proj_bias {
            let dt = (1.0 + b.exp()).ln();
            assert!((c.dt_min - 1e-12..=c.dt_max + 1e-12).contains(&dt), "{dt}");
        }
        assert_eq!(x.in_proj_weight.len(), c.in_proj_rows() * 64);
        assert_eq!(c.in_proj_rows(), 2 * 128 + 2 * 2 * 16 + 8);
    }
    assert_eq!(
        c.n_params(),
        m.params
            .tensors(&c)
            .iter()
            .map(|(_, t)| t.len())
            .sum::<usize>()
    );
}

#[test]
fn unsupported_mamba2_settings_are_refused_by_name() {
    let cases = [
        (
            r#"{"d_model":16,"n_layer":2,"vocab_size":40,"ssm_cfg":{"layer":"Mamba2","D_has_hdim":true}}"#,
            "D_has_hdim",
        ),
        (
            r#"{"d_model":16,"n_layer":2,"vocab_size":40,"d_intermediate":64,"ssm_cfg":{"layer":"Mamba2"}}"#,
            "d_intermediate",
        ),
        (
            r#"{"d_model":16,"n_layer":2,"vocab_size":40,"ssm_cfg":{"layer":"Mamba2","headdim":7}}"#,
            "head_dim",
        ),
        (
            r#"{"d_model":16,"n_layer":2,"vocab_size":40,"ssm_cfg":{"layer":"Mamba3"}}"#,
            "ssm_cfg.layer",
        ),
        (
            r#"{"model_type":"mamba2","hidden_size":16,"num_hidden_layers":2,"vocab_size":40,"head_dim":8,"num_heads":3,"n_groups":1}"#,
            "num_heads",
        ),
        (
            r#"{"model_type":"mamba2","hidden_size":16,"num_hidden_layers":2,"vocab_size":40,"head_dim":8,"n_groups":3}"#,
            "n_groups",
        ),
        (
            r#"{"model_type":"mamba2","hidden_size":16,"num_hidden_layers":2,"vocab_size":40,"head_dim":8,"n_groups":1,"time_step_limit":[1.0,0.5]}"#,
            "time_step_limit",
        ),
    ];
    for (text, needle) in cases {
        let msg = MambaConfig::from_json_str(text, "dir/config.json")
            .unwrap_err()
            .to_string();
        assert!(msg.contains(needle), "{text}: {msg}");
    }
}
