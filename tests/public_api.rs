//! Every public entry point above the kernels, driven with wrong shapes,
//! ids outside the vocabulary and objects of another configuration: each
//! returns an error that names the problem, and none panics (each call
//! runs under `catch_unwind`, so a panic fails the test with its name).
//! The kernels' own shape errors are in their test files (selective_scan,
//! s4d, block_ops, matmul, linear), the block's in tests/block.rs.

use std::panic::{catch_unwind, AssertUnwindSafe};

use selective::generate::{generate, CharVocab, GenerateOptions, Sampler, SamplingConfig};
use selective::io::{load_sequence, save_sequence};
use selective::kernels::WeightFormat;
use selective::nn::{
    next_token_cross_entropy, token_nll, DecodeBuffers, Decoder, InferenceModel, Mamba,
    MambaConfig, MambaParams, Sequence,
};
use selective::rng::Rng;
use selective::tasks::{
    answer_loss_and_grads, BlockArch, SsmLayer, TaskKind, TaskModel, TaskModelConfig, TaskParams,
    TaskSpec,
};
use selective::train::{add_into, random_windows, AdamW, AdamWConfig};

/// The error `f` returns; fails the test if it succeeds or panics, or if
/// the message does not contain `names` (what the caller must be told).
fn refused<R>(what: &str, names: &str, f: impl FnOnce() -> selective::Result<R>) {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Err(e)) => {
            let message = e.to_string();
            assert!(
                message.contains(names),
                "{what}: the error does not mention {names:?}: {message}"
            );
        }
        Ok(Ok(_)) => panic!("{what}: accepted"),
        Err(_) => panic!("{what}: panicked instead of returning an error"),
    }
}

/// d_model 16, 2 layers, vocabulary 11, N 4.
fn small_config() -> MambaConfig {
    MambaConfig::new(16, 2, 11, 4)
}

#[test]
fn language_model_entry_points_refuse_wrong_shapes() {
    let model = Mamba::<f64>::init(small_config(), 1).unwrap();
    let ids: Vec<u32> = (0..6).map(|i| i % 11).collect();
    refused("forward, 6 ids as 2 x 4", "ids", || {
        model.forward(&ids, 2, 4)
    });
    refused("forward, id 11 of 11", "11", || {
        model.forward(&[1, 11], 1, 2)
    });
    refused("final_hidden, 6 ids as 4 x 2", "ids", || {
        model.final_hidden(&ids, 4, 2)
    });
    refused("logits_from_hidden, 17 values", "d_model", || {
        model.logits_from_hidden(&[0.0; 17])
    });
    refused("forward_train, 6 ids as 1 x 5", "ids", || {
        model.forward_train(&ids, 1, 5)
    });
    refused("block 2 of 2", "2", || model.block(2).map(|_| ()));
    let (logits, cache) = model.forward_train(&ids, 2, 3).unwrap();
    refused("backward, d_logits one short", "d_logits", || {
        model.backward(&ids, &cache, &logits[1..])
    });
    refused("backward, other ids than the cache's", "ids", || {
        model.backward(&ids[..3], &cache, &logits)
    });
    refused(
        "cross entropy, logits of another vocabulary",
        "logits",
        || next_token_cross_entropy(&logits, &ids, 2, 3, 12),
    );
    refused("cross entropy, length 1", "len", || {
        next_token_cross_entropy(&logits[..2 * 11], &ids[..2], 2, 1, 11)
    });
    refused("token_nll, target past the logits", "target id 11", || {
        token_nll(&logits[..11], 11)
    });
}

#[test]
fn inference_entry_points_refuse_wrong_shapes_and_foreign_states() {
    let model = InferenceModel::from_mamba(
        Mamba::<f32>::init(small_config(), 2).unwrap(),
        WeightFormat::F32,
    )
    .unwrap();
    let other = MambaConfig::new(16, 3, 11, 4);
    let mut seq = Sequence::new(&model.config);
    refused("prefill, id 11 of 11", "11", || {
        model.prefill(&mut seq, &[3, 11])
    });
    refused("prefill, a state of 3 layers", "layer", || {
        model.prefill(&mut Sequence::new(&other), &[3])
    });
    model.prefill(&mut seq, &[1, 2, 3]).unwrap();
    let mut buffers = DecodeBuffers::new(&model.config, 1);
    refused("decode, two tokens for one sequence", "token", || {
        model.decode_step(&mut [&mut seq], &[1, 2], &mut buffers)
    });
    refused("decode, id 11 of 11", "11", || {
        model.decode_step(&mut [&mut seq], &[11], &mut buffers)
    });
    let mut second = seq.clone();
    refused(
        "decode, two sequences in buffers for one",
        "buffers",
        || model.decode_step(&mut [&mut seq, &mut second], &[1, 2], &mut buffers),
    );
    refused("perplexity of one token", "2 tokens", || {
        model.perplexity(&[1])
    });
    refused("perplexity, id 11 of 11", "11", || {
        model.perplexity(&[1, 11])
    });
    refused("stepwise perplexity, id 11 of 11", "11", || {
        model.perplexity_stepwise(&[1, 2, 11])
    });
    let options = GenerateOptions {
        max_new_tokens: 2,
        eos: None,
        sampling: SamplingConfig::greedy(),
        vocab_size: None,
    };
    refused("generate from an empty sequence", "empty", || {
        generate(
            &model,
            &mut [Sequence::new(&model.config)],
            &options,
            |_, _| Ok(true),
        )
    });
    let mut foreign = Sequence::new(&other);
    foreign.logits = vec![0.0; 11];
    refused("generate from a state of 3 layers", "layer", || {
        generate(&model, &mut [foreign], &options, |_, _| Ok(true))
    });
}

#[test]
fn sampler_refuses_a_vocabulary_wider_than_its_logits() {
    let mut sampler = Sampler::new(SamplingConfig::greedy()).unwrap();
    refused("sample_within, vocabulary 8 over 5 logits", "5", || {
        sampler.sample_within(&[0.0; 5], &[], 8)
    });
    refused("distribution_within, vocabulary 0", "0", || {
        sampler.distribution_within(&[0.0; 5], &[], 0)
    });
    refused("sample, every logit NaN", "NaN", || {
        sampler.sample(&[f32::NAN; 4], &[])
    });
}

#[test]
fn optimizer_refuses_trees_of_another_configuration() {
    let config = small_config();
    let wider = MambaConfig::new(24, 2, 11, 4);
    let mut params = MambaParams::<f32>::zeros(&config);
    let grads = MambaParams::<f32>::zeros(&config);
    let foreign = MambaParams::<f32>::zeros(&wider);
    let mut opt = AdamW::new(&config, AdamWConfig::default());
    refused("update with gradients of d_model 24", "gradients", || {
        opt.update(&config, &mut params, &foreign, 1e-3)
    });
    assert_eq!(opt.step, 0, "a refused update does not count");
    let mut foreign_opt = AdamW::new(&wider, AdamWConfig::default());
    refused("update with moments of d_model 24", "moments", || {
        foreign_opt.update(&config, &mut params, &grads, 1e-3)
    });
    let mut sum = MambaParams::<f32>::zeros(&config);
    refused("add_into of another shape", "addend", || {
        add_into(&config, &mut sum, &foreign)
    });
    let task = TaskModelConfig::new(8, 16, 1, SsmLayer::S6, BlockArch::Mamba);
    let mut task_params = TaskParams::<f32>::zeros(&task);
    let other_task = TaskModelConfig::new(8, 16, 2, SsmLayer::S6, BlockArch::Mamba);
    refused("task update with 2-layer gradients", "gradients", || {
        AdamW::new(&task, AdamWConfig::default()).update(
            &task,
            &mut task_params,
            &TaskParams::zeros(&other_task),
            1e-3,
        )
    });
}

#[test]
fn task_model_entry_points_refuse_wrong_shapes() {
    for layer in [SsmLayer::S6, SsmLayer::S4d] {
        let config = TaskModelConfig::new(8, 16, 2, layer, BlockArch::Mamba);
        let model = TaskModel::<f64>::init(config, 3).unwrap();
        let ids = [1u32, 2, 3, 4, 5, 6];
        refused("task forward, 6 ids as 2 x 2", "ids", || {
            model.forward(&ids, 2, 2)
        });
        refused("task forward, id 8 of 8", "8", || {
            model.forward(&[1, 8], 1, 2)
        });
        refused("task logits_from_hidden, 15 values", "d_model", || {
            model.logits_from_hidden(&[0.0; 15])
        });
        let cache = model.forward_train(&ids, 2, 3).unwrap();
        refused("task backward, d_hidden one short", "d_hidden", || {
            model.backward(&ids, &cache, &vec![0.0; 2 * 3 * 16 - 1])
        });
        let mut state = model.zero_state(2);
        refused("task step, 3 tokens for a batch of 2", "batch 2", || {
            model.step(&mut state, &[1, 2, 3])
        });
        refused("task chunk, 4 ids as 2 x 3", "ids", || {
            model.forward_chunk(&mut state, &ids[..4], 2, 3)
        });
        let deeper =
            TaskModel::<f64>::init(TaskModelConfig::new(8, 16, 3, layer, BlockArch::Mamba), 3)
                .unwrap();
        let mut foreign = deeper.zero_state(2);
        refused("task step, a state of 3 blocks", "blocks", || {
            model.step(&mut foreign, &[1, 2])
        });
        let spec = TaskSpec {
            kind: TaskKind::SelectiveCopying,
            vocab: 8,
            seq_len: 16,
            memorize: 4,
        };
        let batch = spec.sample(2, &mut Rng::new(4)).unwrap();
        refused(
            "answer loss, label smoothing 1.5",
            "label smoothing",
            || answer_loss_and_grads(&model, &batch, 1.5),
        );
    }
}

#[test]
fn data_and_files_refuse_what_does_not_fit() {
    refused("windows of 10 from 3 tokens", "3", || {
        random_windows(&[1, 2, 3], 1, 10, &mut Rng::new(0))
    });
    let vocab = CharVocab::new(vec!['a', 'b']).unwrap();
    refused("decode id 2 of 2 characters", "2", || vocab.decode(&[0, 2]));
    refused("encode a character outside", "c", || vocab.encode("abc"));
    refused("a vocabulary with a repeated character", "a", || {
        CharVocab::new(vec!['a', 'b', 'a'])
    });

    let dir = std::env::temp_dir().join(format!("selective-public-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.bin");
    let config = small_config();
    let other = MambaConfig::new(16, 3, 11, 4);
    refused("save a 3-layer state as a 2-layer model's", "layer", || {
        save_sequence(&path, &Sequence::new(&other), &config)
    });
    save_sequence(&path, &Sequence::new(&config), &config).unwrap();
    refused("load a 2-layer state into a 3-layer model", "layer", || {
        load_sequence(&path, &other)
    });
    std::fs::remove_dir_all(&dir).unwrap();
}
