//! Prefill and recurrent decoding against the full-sequence forward, the
//! Hugging Face greedy continuation, batching, and the weight formats.

mod common;

use common::{ids_of, models_dir, read_reference};
use selective::kernels::WeightFormat;
use selective::nn::{DecodeBuffers, InferenceModel, Mamba, MambaConfig, Sequence};
use selective::rng::Rng;

fn load(dir: &str) -> Mamba<f32> {
    Mamba::<f32>::from_dir(models_dir().join(dir)).unwrap()
}

fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Feeds `ids` one token at a time and returns the logits after each (len, V).
fn stepwise_logits(model: &InferenceModel, ids: &[u32]) -> Vec<f32> {
    let mut seq = Sequence::new(&model.config);
    let mut buffers = DecodeBuffers::new(&model.config, 1);
    let mut out = Vec::new();
    for &id in ids {
        model
            .decode_step(&mut [&mut seq], &[id], &mut buffers)
            .unwrap();
        out.extend_from_slice(&seq.logits);
    }
    out
}

#[test]
fn decoding_step_by_step_equals_the_full_forward_at_every_position() {
    for dir in ["tiny-hf", "small-hf", "tiny-original", "falcon-tiny-hf"] {
        let mamba = load(dir);
        let v = mamba.config.vocab_size;
        let ids = random_ids(41, v, 7);
        let full = mamba.forward(&ids, 1, ids.len()).unwrap();
        let model = InferenceModel::from_mamba(mamba, WeightFormat::F32).unwrap();
        let steps = stepwise_logits(&model, &ids);
        let scale = full.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = max_abs_diff(&steps, &full);
        eprintln!("{dir}: step vs forward max |diff| {diff:.2e} (max |logit| {scale:.2})");
        assert!(diff <= 2e-5 * scale.max(1.0), "{dir}: {diff}");
    }
}

#[test]
fn prefill_in_any_chunking_then_decoding_equals_the_full_forward() {
    let mamba = load("small-hf");
    let v = mamba.config.vocab_size;
    let ids = random_ids(37, v, 11);
    let full = mamba.forward(&ids, 1, ids.len()).unwrap();
    let mut model = InferenceModel::from_mamba(mamba, WeightFormat::F32).unwrap();
    let scale = full.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1.0);
    for chunk in [1, 2, 3, 5, 16, 36, 37, 4096] {
        model.prefill_chunk = chunk;
        for split in [1, 4, 20, 36] {
            // prefill ids[..split], then decode the rest one by one
            let mut seq = Sequence::new(&model.config);
            model.prefill(&mut seq, &ids[..split]).unwrap();
            let want = &full[(split - 1) * v..split * v];
            assert!(
                max_abs_diff(&seq.logits, want) <= 2e-5 * scale,
                "chunk {chunk} split {split}"
            );
            let mut buffers = DecodeBuffers::new(&model.config, 1);
            for (t, &id) in ids.iter().enumerate().skip(split) {
                model
                    .decode_step(&mut [&mut seq], &[id], &mut buffers)
                    .unwrap();
                let want = &full[t * v..(t + 1) * v];
                let diff = max_abs_diff(&seq.logits, want);
                assert!(
                    diff <= 2e-5 * scale,
                    "chunk {chunk} split {split} t {t}: {diff}"
                );
            }
            assert_eq!(seq.position, ids.len() as u64);
        }
    }
}

#[test]
fn prefill_continues_a_sequence_exactly() {
    let model = InferenceModel::from_mamba(load("small-hf"), WeightFormat::F32).unwrap();
    let ids = random_ids(30, model.config.vocab_size, 3);
    let mut whole = Sequence::new(&model.config);
    model.prefill(&mut whole, &ids).unwrap();
    for split in [1, 2, 3, 4, 5, 17, 29] {
        let mut parts = Sequence::new(&model.config);
        model.prefill(&mut parts, &ids[..split]).unwrap();
        model.prefill(&mut parts, &ids[split..]).unwrap();
        assert!(
            max_abs_diff(&parts.logits, &whole.logits) <= 1e-4,
            "split {split}"
        );
        for (a, b) in parts.layers.iter().zip(&whole.layers) {
            assert!(
                max_abs_diff(&a.conv, &b.conv) <= 1e-6,
                "conv state, split {split}"
            );
            assert!(
                max_abs_diff(&a.ssm, &b.ssm) <= 1e-4,
                "ssm state, split {split}"
            );
        }
    }
}

#[test]
fn greedy_decoding_reproduces_transformers_generate() {
    for dir in ["tiny-hf", "small-hf", "falcon-tiny-hf"] {
        let r = read_reference(dir);
        let (prompt, _, _) = ids_of(&r, "greedy_prompt");
        let (want, _, n) = ids_of(&r, "greedy_tokens");
        let model = InferenceModel::from_mamba(load(dir), WeightFormat::F32).unwrap();
        let mut seq = Sequence::new(&model.config);
        model.prefill(&mut seq, &prompt).unwrap();
        let mut buffers = DecodeBuffers::new(&model.config, 1);
        let mut got = Vec::new();
        for _ in 0..n {
            let t = argmax(&seq.logits);
            got.push(t);
            model
                .decode_step(&mut [&mut seq], &[t], &mut buffers)
                .unwrap();
        }
        assert_eq!(got, want, "{dir}");
    }
}

#[test]
fn batched_decoding_of_prompts_of_different_lengths_equals_each_alone() {
    for format in [WeightFormat::F32, WeightFormat::Q8] {
        let model = InferenceModel::from_mamba(load("small-hf"), format).unwrap();
        let v = model.config.vocab_size;
        let prompts: Vec<Vec<u32>> = [1usize, 9, 4, 23, 2, 13, 5, 8, 3, 11]
            .iter()
            .enumerate()
            .map(|(i, &n)| random_ids(n, v, 100 + i as u64))
            .collect();
        let steps = 12;
        // alone
        let mut alone = Vec::new();
        for p in &prompts {
            let mut seq = Sequence::new(&model.config);
            model.prefill(&mut seq, p).unwrap();
            let mut buffers = DecodeBuffers::new(&model.config, 1);
            let mut logits = Vec::new();
            for _ in 0..steps {
                let t = argmax(&seq.logits);
                model
                    .decode_step(&mut [&mut seq], &[t], &mut buffers)
                    .unwrap();
                logits.push(seq.logits.clone());
            }
            alone.push(logits);
        }
        // together: 10 sequences (more than the GEMV path's row limit)
        for batch in [3, prompts.len()] {
            let mut seqs: Vec<Sequence> = prompts[..batch]
                .iter()
                .map(|p| {
                    let mut s = Sequence::new(&model.config);
                    model.prefill(&mut s, p).unwrap();
                    s
                })
                .collect();
            let mut buffers = DecodeBuffers::new(&model.config, batch);
            for step in 0..steps {
                let tokens: Vec<u32> = seqs.iter().map(|s| argmax(&s.logits)).collect();
                let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
                model.decode_step(&mut refs, &tokens, &mut buffers).unwrap();
                for (i, s) in seqs.iter().enumerate() {
                    let diff = max_abs_diff(&s.logits, &alone[i][step]);
                    assert!(
                        diff <= 1e-4,
                        "{} batch {batch} seq {i} step {step}: {diff}",
                        format.name()
                    );
                }
            }
        }
    }
}

#[test]
fn smaller_weight_formats_stay_close_to_f32() {
    let mamba = load("small-hf");
    let v = mamba.config.vocab_size;
    let ids = random_ids(25, v, 5);
    let f32_model = InferenceModel::from_mamba(mamba.clone(), WeightFormat::F32).unwrap();
    let want = stepwise_logits(&f32_model, &ids);
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let f32_bytes = f32_model.bytes_per_token();
    // (format, bound on max |Δlogit| / max |logit|, storage ratio to f32)
    for (format, tol, ratio) in [
        (WeightFormat::Bf16, 1.5e-2, 0.5),
        (WeightFormat::F16, 2e-3, 0.5),
        (WeightFormat::Q8, 4e-2, 34.0 / 128.0),
    ] {
        let model = InferenceModel::from_mamba(mamba.clone(), format).unwrap();
        let got = stepwise_logits(&model, &ids);
        let rel = max_abs_diff(&got, &want) / scale;
        eprintln!("{}: max |Δlogit| / max |logit| = {rel:.2e}", format.name());
        assert!(rel <= tol, "{}: {rel}", format.name());
        assert!(
            rel > 0.0,
            "{} must actually round the weights",
            format.name()
        );
        // Everything but the small f32 SSM parameters and norms shrinks.
        let r = model.bytes_per_token() as f64 / f32_bytes as f64;
        assert!(
            r > ratio && r < ratio + 0.15,
            "{} bytes ratio {r}",
            format.name()
        );
    }
}

#[test]
fn decode_errors_name_the_problem() {
    let model = InferenceModel::from_mamba(load("tiny-hf"), WeightFormat::F32).unwrap();
    let mut seq = Sequence::new(&model.config);
    let mut buffers = DecodeBuffers::new(&model.config, 1);
    let err = model
        .decode_step(&mut [&mut seq], &[1000], &mut buffers)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1000") && err.contains("vocabulary"), "{err}");
    let err = model
        .decode_step(&mut [&mut seq], &[1, 2], &mut buffers)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 tokens for 1 sequences"), "{err}");
    let other = load("small-hf");
    let mut wrong = Sequence::new(&other.config);
    let err = model.prefill(&mut wrong, &[1, 2]).unwrap_err().to_string();
    assert!(err.contains("does not fit the model"), "{err}");
}

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("selective-test-{}-{name}", std::process::id()))
}

#[test]
fn saved_state_continues_the_sequence_and_has_a_fixed_size() {
    use selective::io::{load_sequence, save_sequence};
    let model = InferenceModel::from_mamba(load("small-hf"), WeightFormat::F32).unwrap();
    let v = model.config.vocab_size;
    let ids = random_ids(300, v, 21);
    let mut sizes = Vec::new();
    for split in [0usize, 3, 10, 300] {
        let mut seq = Sequence::new(&model.config);
        model.prefill(&mut seq, &ids[..split]).unwrap();
        let path = temp_path(&format!("state-{split}.safetensors"));
        save_sequence(&path, &seq, &model.config).unwrap();
        sizes.push(std::fs::metadata(&path).unwrap().len());
        let mut loaded = load_sequence(&path, &model.config).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(loaded, seq, "split {split}: the state round-trips exactly");
        // Continuing both gives identical logits.
        let mut buffers = DecodeBuffers::new(&model.config, 1);
        for &id in &ids[..5] {
            model
                .decode_step(&mut [&mut seq], &[id], &mut buffers)
                .unwrap();
            model
                .decode_step(&mut [&mut loaded], &[id], &mut buffers)
                .unwrap();
            assert_eq!(loaded.logits, seq.logits);
        }
    }
    assert!(sizes.iter().all(|&s| s == sizes[0]), "sizes {sizes:?}");
    // A state of another model, and a file that is not a state, are errors.
    let tiny = load("tiny-hf");
    let path = temp_path("state-wrong.safetensors");
    save_sequence(&path, &Sequence::new(&tiny.config), &tiny.config).unwrap();
    let err = load_sequence(&path, &model.config).unwrap_err().to_string();
    assert!(err.contains("different model"), "{err}");
    std::fs::write(&path, b"not a state").unwrap();
    let err = load_sequence(&path, &model.config).unwrap_err().to_string();
    assert!(err.contains("state-wrong.safetensors"), "{err}");
    std::fs::remove_file(&path).unwrap();
}

mod generation {
    use super::*;
    use selective::generate::sampling::SamplingConfig;
    use selective::generate::{generate, FinishReason, GenerateOptions};

    fn prefilled(model: &InferenceModel, prompt: &[u32]) -> Sequence {
        let mut seq = Sequence::new(&model.config);
        model.prefill(&mut seq, prompt).unwrap();
        seq
    }

    fn options(max_new_tokens: usize, eos: Option<u32>, seed: u64) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens,
            eos,
            sampling: SamplingConfig {
                temperature: 0.9,
                seed,
                ..SamplingConfig::default()
            },
            vocab_size: None,
        }
    }

    /// An untrained model whose embedding has 64 rows for a 61-token
    /// vocabulary draws padding ids about 5% of the time; with the
    /// vocabulary given, no seed may produce one, and every seed whose
    /// unlimited run drew no padding gives the same tokens.
    #[test]
    fn padding_ids_are_never_sampled_from_an_untrained_padded_model() {
        let config = MambaConfig::new(32, 2, 64, 8);
        let model =
            InferenceModel::from_mamba(Mamba::init(config, 7).unwrap(), WeightFormat::F32).unwrap();
        let vocab = 61;
        let (mut padding_drawn, mut unchanged) = (0, 0);
        for seed in 0..60 {
            for sampling in [
                SamplingConfig {
                    temperature: 1.0,
                    seed,
                    ..SamplingConfig::default()
                },
                SamplingConfig {
                    temperature: 1.5,
                    top_k: 40,
                    top_p: 0.95,
                    seed,
                    ..SamplingConfig::default()
                },
            ] {
                let plain = GenerateOptions {
                    max_new_tokens: 12,
                    eos: None,
                    sampling,
                    vocab_size: None,
                };
                let limited = GenerateOptions {
                    vocab_size: Some(vocab),
                    ..plain.clone()
                };
                let mut seq = [prefilled(&model, &[1, 2, 3])];
                let free = generate(&model, &mut seq, &plain, |_, _| Ok(true)).unwrap();
                let mut seq = [prefilled(&model, &[1, 2, 3])];
                let out = generate(&model, &mut seq, &limited, |_, _| Ok(true)).unwrap();
                assert!(
                    out.tokens[0].iter().all(|&t| (t as usize) < vocab),
                    "seed {seed}: {:?}",
                    out.tokens[0]
                );
                if free.tokens[0].iter().any(|&t| t as usize >= vocab) {
                    padding_drawn += 1;
                } else {
                    assert_eq!(out.tokens[0], free.tokens[0], "seed {seed}");
                    unchanged += 1;
                }
            }
        }
        // Both cases occurred, so the test can fail either way.
        assert!(
            padding_drawn > 10 && unchanged > 10,
            "{padding_drawn} {unchanged}"
        );
        // Greedy as well.
        let greedy = GenerateOptions {
            max_new_tokens: 30,
            eos: None,
            sampling: SamplingConfig::greedy(),
            vocab_size: Some(vocab),
        };
        let mut seq = [prefilled(&model, &[5])];
        let out = generate(&model, &mut seq, &greedy, |_, _| Ok(true)).unwrap();
        assert!(out.tokens[0].iter().all(|&t| (t as usize) < vocab));
    }

    #[test]
    fn sampled_batches_equal_each_sequence_alone_with_its_seed() {
        let model = InferenceModel::from_mamba(load("small-hf"), WeightFormat::F32).unwrap();
        let prompts = [vec![1u32, 2, 3], vec![7], vec![9, 8, 7, 6, 5, 4]];
        let mut seqs: Vec<Sequence> = prompts.iter().map(|p| prefilled(&model, p)).collect();
        let together =
            generate(&model, &mut seqs, &options(15, None, 42), |_, _| Ok(true)).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let mut one = [prefilled(&model, p)];
            // sequence i of a batch samples with seed + i
            let alone = generate(
                &model,
                &mut one,
                &options(15, None, 42 + i as u64),
                |_, _| Ok(true),
            )
            .unwrap();
            assert_eq!(together.tokens[i], alone.tokens[0], "sequence {i}");
            assert_eq!(one[0].position, seqs[i].position);
        }
        assert!(together
            .finish
            .iter()
            .all(|&f| f == FinishReason::MaxTokens));
    }

    #[test]
    fn sequences_stop_at_eos_at_the_callers_word_and_at_the_limit() {
        let model = InferenceModel::from_mamba(load("small-hf"), WeightFormat::F32).unwrap();
        // Greedy from this prompt: find its third token and declare it EOS.
        let greedy = GenerateOptions {
            sampling: SamplingConfig::greedy(),
            ..options(10, None, 0)
        };
        let mut seq = [prefilled(&model, &[4, 5, 6])];
        let free = generate(&model, &mut seq, &greedy, |_, _| Ok(true)).unwrap();
        let eos = free.tokens[0][2];
        let first_eos = free.tokens[0].iter().position(|&t| t == eos).unwrap();
        let mut seq = [prefilled(&model, &[4, 5, 6])];
        let out = generate(
            &model,
            &mut seq,
            &GenerateOptions {
                eos: Some(eos),
                ..greedy.clone()
            },
            |_, _| Ok(true),
        )
        .unwrap();
        assert_eq!(out.tokens[0], free.tokens[0][..=first_eos].to_vec());
        assert_eq!(out.finish[0], FinishReason::Eos);
        // Every emitted token is in the state: 3 prompt + the generated ones.
        assert_eq!(seq[0].position, 3 + out.tokens[0].len() as u64);
        let mut seq = [prefilled(&model, &[4, 5, 6])];
        let mut seen = 0;
        let out = generate(&model, &mut seq, &greedy, |_, _| {
            seen += 1;
            Ok(seen < 4)
        })
        .unwrap();
        assert_eq!(out.tokens[0].len(), 4);
        assert_eq!(out.finish[0], FinishReason::Stopped);
        let err = generate(
            &model,
            &mut [Sequence::new(&model.config)],
            &greedy,
            |_, _| Ok(true),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("prefill"), "{err}");
    }
}

/// One sequence decodes on a team of all the pool's threads; any team size
/// (including more threads than channel blocks) gives the forward's logits.
#[test]
fn single_sequence_team_decoding_equals_the_forward_for_any_thread_count() {
    for dir in [
        "small-hf",
        "tiny-hf",
        "falcon-tiny-hf",
        "mamba2-tiny-hf",
        "mamba2-g4-hf",
        "mamba2-g2-original",
    ] {
        let mamba = load(dir);
        let v = mamba.config.vocab_size;
        let ids = random_ids(19, v, 13);
        let full = mamba.forward(&ids, 1, ids.len()).unwrap();
        let scale = full.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1.0);
        for format in [WeightFormat::F32, WeightFormat::Q8] {
            let model = InferenceModel::from_mamba(mamba.clone(), format).unwrap();
            let one_thread = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let want = one_thread.install(|| stepwise_logits(&model, &ids));
            for threads in [2, 3, 5] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool.install(|| stepwise_logits(&model, &ids));
                let diff = max_abs_diff(&got, &want);
                assert!(
                    diff <= 1e-6 * scale,
                    "{dir} {} {threads} threads: {diff}",
                    format.name()
                );
                if format == WeightFormat::F32 {
                    assert!(
                        max_abs_diff(&got, &full) <= 2e-5 * scale,
                        "{dir} {threads} threads vs forward"
                    );
                }
            }
        }
    }
}
