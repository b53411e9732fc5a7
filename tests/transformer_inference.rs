//! The Transformer++'s inference path (`TransformerInference`: chunked
//! prefill into a KV cache, batched decoding steps) against its training
//! forward and against transformers' greedy continuation; weight formats;
//! and the errors of its entry points.

mod common;

use common::{ids_of, models_dir, read_reference};
use selective::generate::{generate, GenerateOptions, SamplingConfig};
use selective::kernels::WeightFormat;
use selective::nn::{
    perplexity, Decoder, DecodingState, KvSequence, Positions, Transformer, TransformerConfig,
    TransformerInference,
};
use selective::rng::Rng;

fn load(dir: &str) -> Transformer<f32> {
    Transformer::<f32>::from_dir(models_dir().join(dir)).unwrap()
}

fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A random model with weights of order 0.3, so that attention is far from
/// uniform and a wrong position or a wrong cache row changes the logits.
fn random_model(positions: Positions, tied: bool) -> Transformer<f32> {
    let mut c = TransformerConfig::new(24, 3, 29, 3);
    c.d_ff = 40;
    c.positions = positions;
    c.max_position_embeddings = 64;
    c.tie_embeddings = tied;
    let mut model = Transformer::<f32>::init(c.clone(), 5).unwrap();
    let mut rng = Rng::new(6);
    for (_, t) in model.params.tensors_mut(&c) {
        for v in t.iter_mut() {
            *v = *v * 8.0 + 0.05 * rng.normal() as f32;
        }
    }
    model
}

#[test]
fn prefill_in_any_chunking_then_decoding_equals_the_full_forward() {
    for (positions, tied) in [(Positions::Rotary, true), (Positions::Learned, false)] {
        let model = random_model(positions, tied);
        let v = model.config.vocab_size;
        let ids = random_ids(37, v, 11);
        let full = model.forward(&ids, 1, ids.len()).unwrap();
        let scale = max_abs(&full).max(1.0);
        let mut inference =
            TransformerInference::from_transformer(model, WeightFormat::F32).unwrap();
        for chunk in [1, 3, 16, 36, 37, 4096] {
            inference.prefill_chunk = chunk;
            for split in [1, 4, 20, 36] {
                let mut seq = inference.new_state();
                inference.prefill(&mut seq, &ids[..split]).unwrap();
                let mut got = seq.logits.clone();
                let mut buffers = inference.new_buffers(1);
                for &id in &ids[split..] {
                    inference
                        .decode_step(&mut [&mut seq], &[id], &mut buffers)
                        .unwrap();
                    got.extend_from_slice(&seq.logits);
                }
                let want = &full[(split - 1) * v..];
                let diff = max_abs_diff(&got, want);
                assert!(
                    diff <= 2e-5 * scale,
                    "{positions:?} chunk {chunk} split {split}: max |diff| {diff} (scale {scale})"
                );
                assert_eq!(seq.position, ids.len() as u64);
                assert_eq!(
                    seq.context_bytes(),
                    2 * 3 * ids.len() * 24 * 4,
                    "keys and values of 3 layers, 37 positions, width 24, f32"
                );
            }
        }
    }
}

#[test]
fn a_batch_of_sequences_at_different_positions_decodes_as_each_alone() {
    let model = random_model(Positions::Rotary, true);
    let v = model.config.vocab_size;
    let inference = TransformerInference::from_transformer(model, WeightFormat::F32).unwrap();
    let prompts = [
        random_ids(9, v, 1),
        random_ids(2, v, 2),
        random_ids(17, v, 3),
    ];
    let next = random_ids(3 * 5, v, 4);
    // alone
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut seq = inference.new_state();
        inference.prefill(&mut seq, p).unwrap();
        let mut buffers = inference.new_buffers(1);
        for s in 0..5 {
            inference
                .decode_step(&mut [&mut seq], &[next[s * 3 + i]], &mut buffers)
                .unwrap();
        }
        alone.push(seq);
    }
    // together
    let mut seqs: Vec<KvSequence> = prompts
        .iter()
        .map(|p| {
            let mut seq = inference.new_state();
            inference.prefill(&mut seq, p).unwrap();
            seq
        })
        .collect();
    let mut buffers = inference.new_buffers(3);
    for s in 0..5 {
        let mut refs: Vec<&mut KvSequence> = seqs.iter_mut().collect();
        inference
            .decode_step(&mut refs, &next[s * 3..s * 3 + 3], &mut buffers)
            .unwrap();
    }
    for (i, (a, b)) in alone.iter().zip(&seqs).enumerate() {
        assert_eq!(a.position, b.position, "sequence {i}");
        let diff = max_abs_diff(&a.logits, &b.logits);
        assert!(
            diff <= 1e-5 * max_abs(&a.logits).max(1.0),
            "sequence {i}: {diff}"
        );
        assert_eq!(a.recent, b.recent, "sequence {i}");
    }
}

#[test]
fn greedy_generation_equals_transformers() {
    for dir in ["tiny-llama", "small-llama"] {
        let r = read_reference(dir);
        let (prompt, _, _) = ids_of(&r, "greedy_prompt");
        let (want, _, n) = ids_of(&r, "greedy_tokens");
        let inference =
            TransformerInference::from_transformer(load(dir), WeightFormat::F32).unwrap();
        let mut seqs = vec![inference.new_state()];
        inference.prefill(&mut seqs[0], &prompt).unwrap();
        let options = GenerateOptions {
            max_new_tokens: n,
            eos: None,
            sampling: SamplingConfig::greedy(),
            vocab_size: None,
        };
        let out = generate(&inference, &mut seqs, &options, |_, _| Ok(true)).unwrap();
        assert_eq!(out.tokens[0], want, "{dir}");
    }
}

#[test]
fn perplexity_through_prefill_and_through_steps_equals_the_training_forward() {
    let model = load("small-llama");
    let v = model.config.vocab_size;
    let ids = random_ids(300, v, 9);
    let want = perplexity(&model, &ids, |_| Ok(())).unwrap().mean_nll;
    let mut inference = TransformerInference::from_transformer(model, WeightFormat::F32).unwrap();
    inference.prefill_chunk = 128; // three chunks, the last partial
    let chunked = inference.perplexity(&ids).unwrap().mean_nll;
    let stepwise = inference.perplexity_stepwise(&ids).unwrap().mean_nll;
    assert!((chunked - want).abs() < 1e-5, "{chunked} vs {want}");
    assert!((stepwise - want).abs() < 1e-5, "{stepwise} vs {want}");
}

#[test]
fn every_weight_format_stays_near_f32() {
    let model = load("small-llama");
    let v = model.config.vocab_size;
    let ids = random_ids(64, v, 3);
    let f32_nll = TransformerInference::from_transformer(model.clone(), WeightFormat::F32)
        .unwrap()
        .perplexity(&ids)
        .unwrap()
        .mean_nll;
    for (format, tol) in [
        (WeightFormat::Bf16, 0.02),
        (WeightFormat::F16, 0.005),
        (WeightFormat::Q8, 0.02),
    ] {
        let inference = TransformerInference::from_transformer(model.clone(), format).unwrap();
        let nll = inference.perplexity(&ids).unwrap().mean_nll;
        let stepwise = inference.perplexity_stepwise(&ids).unwrap().mean_nll;
        for (path, got) in [("prefill", nll), ("steps", stepwise)] {
            assert!(
                (got - f32_nll).abs() < tol * f32_nll,
                "{format:?} {path}: {got} vs f32 {f32_nll}"
            );
        }
        assert!(inference.bytes_per_token() > 0);
    }
}

#[test]
fn bad_input_to_the_inference_path_is_an_error() {
    let model = random_model(Positions::Learned, true);
    let inference = TransformerInference::from_transformer(model, WeightFormat::F32).unwrap();
    let mut seq = inference.new_state();
    let e = inference.prefill(&mut seq, &[1, 29]).unwrap_err();
    assert!(
        e.to_string().contains("outside the vocabulary of 29"),
        "{e}"
    );
    // learned positions end at 64
    let e = inference.prefill(&mut seq, &[1; 65]).unwrap_err();
    assert!(
        e.to_string().contains("past the 64 learned positions"),
        "{e}"
    );
    inference.prefill(&mut seq, &[1; 64]).unwrap();
    let mut buffers = inference.new_buffers(1);
    let e = inference
        .decode_step(&mut [&mut seq], &[2], &mut buffers)
        .unwrap_err();
    assert!(
        e.to_string().contains("past the 64 learned positions"),
        "{e}"
    );
    // buffers for fewer sequences, and tokens that do not match the batch
    let mut a = inference.new_state();
    let mut b = inference.new_state();
    inference.prefill(&mut a, &[1]).unwrap();
    inference.prefill(&mut b, &[1]).unwrap();
    let e = inference
        .decode_step(&mut [&mut a, &mut b], &[2, 3], &mut buffers)
        .unwrap_err();
    assert!(e.to_string().contains("buffers for 1"), "{e}");
    let e = inference
        .decode_step(&mut [&mut a], &[2, 3], &mut buffers)
        .unwrap_err();
    assert!(e.to_string().contains("2 tokens for 1 sequences"), "{e}");
    // a cache of another model
    let other =
        TransformerInference::from_transformer(load("tiny-llama"), WeightFormat::F32).unwrap();
    let mut foreign = other.new_state();
    other.prefill(&mut foreign, &[1, 2]).unwrap();
    let e = inference.prefill(&mut foreign, &[1]).unwrap_err();
    assert!(e.to_string().contains("does not fit the model"), "{e}");
}
