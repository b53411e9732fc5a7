//! The attention baseline of the synthetic tasks (`selective task
//! --layer attention`): the answer loss's gradients against finite
//! differences in f64, chunked reading from a KV cache against the
//! whole-sequence forward, the length sweep's refusals, and the command.

use std::path::Path;
use std::process::Command;

use selective::nn::{KvCache, Positions, Transformer, TransformerConfig};
use selective::rng::Rng;
use selective::tasks::{
    answer_loss_and_grads, answer_score, evaluate_induction_lengths, Answer, ChunkReader, EvalMode,
    LengthEvalOptions, TaskBatch, TaskNetwork,
};

/// Awkward sizes: d_model 6, 3 heads of 2, d_ff 10, vocabulary 7, and
/// weights moved off their initialisation so that attention is far from
/// uniform and no gradient is zero by symmetry.
fn random_model(positions: Positions, seed: u64) -> Transformer<f64> {
    let mut c = TransformerConfig::new(6, 2, 7, 3);
    c.d_ff = 10;
    c.positions = positions;
    c.max_position_embeddings = 12;
    c.rope_theta = 30.0;
    let mut model = Transformer::<f64>::init(c.clone(), seed).unwrap();
    let mut rng = Rng::new(seed ^ 0xABCD);
    for (_, t) in model.params.tensors_mut(&c) {
        for v in t.iter_mut() {
            *v = *v * 5.0 + 0.15 * rng.normal();
        }
    }
    model
}

fn random_batch(vocab: usize, batch: usize, len: usize, seed: u64) -> TaskBatch {
    let mut rng = Rng::new(seed);
    let ids = (0..batch * len).map(|_| rng.below(vocab) as u32).collect();
    let mut answers = Vec::new();
    for row in 0..batch {
        for _ in 0..2 {
            answers.push(Answer {
                row,
                position: rng.below(len),
                token: rng.below(vocab) as u32,
            });
        }
    }
    TaskBatch {
        batch,
        len,
        ids,
        answers,
    }
}

#[test]
fn answer_loss_gradients_match_finite_differences() {
    for positions in [Positions::Rotary, Positions::Learned] {
        for &(batch, len) in &[(1usize, 1usize), (3, 6), (2, 11)] {
            let model = random_model(positions, 5 + len as u64);
            let config = model.config.clone();
            let data = random_batch(7, batch, len, 100 + len as u64);
            let (score, grads) = answer_loss_and_grads(&model, &data, 0.1).unwrap();
            let plain = answer_score(&model, &data).unwrap();
            assert!((plain.loss_sum - score.loss_sum).abs() < 1e-10);
            // the label-smoothed loss (ε = 0.1), written out from the logits
            let loss_of = |m: &Transformer<f64>| {
                let logits = m.forward(&data.ids, batch, len).unwrap();
                let mut total = 0.0;
                for a in &data.answers {
                    let l = &logits[(a.row * len + a.position) * 7..][..7];
                    let log_z = l.iter().map(|x| x.exp()).sum::<f64>().ln();
                    let mean_log_p = l.iter().map(|x| x - log_z).sum::<f64>() / 7.0;
                    total += -0.9 * (l[a.token as usize] - log_z) - 0.1 * mean_log_p;
                }
                total / data.answers.len() as f64
            };
            let mut checked = 0;
            let mut nonzero = 0;
            for (ti, (info, g)) in grads.tensors(&config).iter().enumerate() {
                for (i, &analytic) in g.iter().enumerate() {
                    let central = |h: f64| {
                        let mut plus = model.clone();
                        plus.params.tensors_mut(&config)[ti].1[i] += h;
                        let mut minus = model.clone();
                        minus.params.tensors_mut(&config)[ti].1[i] -= h;
                        (loss_of(&plus) - loss_of(&minus)) / (2.0 * h)
                    };
                    // Richardson's extrapolation of two central differences
                    // cancels their h² error: peaked attention has large
                    // third derivatives
                    let h = 1e-4;
                    let numeric = (4.0 * central(h / 2.0) - central(h)) / 3.0;
                    let tol = 1e-6 + 1e-5 * numeric.abs();
                    assert!(
                        (numeric - analytic).abs() <= tol,
                        "{positions:?} batch {batch} len {len}: d loss / d {}[{i}] = {analytic}, finite difference {numeric}",
                        info.name
                    );
                    checked += 1;
                    nonzero += usize::from(analytic.abs() > 1e-8);
                }
            }
            assert_eq!(checked, model.parameter_count());
            assert!(nonzero > checked / 3, "{nonzero} of {checked} nonzero");
        }
    }
}

#[test]
fn chunked_reading_from_the_kv_cache_equals_the_whole_sequence() {
    for positions in [Positions::Rotary, Positions::Learned] {
        let model = random_model(positions, 3);
        let (batch, len) = (3, 11);
        let ids: Vec<u32> = (0..batch * len).map(|i| ((i * 5 + 2) % 7) as u32).collect();
        let want = model.final_hidden(&ids, batch, len).unwrap();
        for mode in [EvalMode::Chunked, EvalMode::Step] {
            let mut reader = model.reader(batch, mode).unwrap();
            let mut got = vec![0.0; want.len()];
            let mut at = 0;
            let chunks: &[usize] = match mode {
                EvalMode::Chunked => &[4, 1, 5, 1],
                EvalMode::Step => &[1; 11],
            };
            for &n in chunks {
                let chunk: Vec<u32> = (0..batch)
                    .flat_map(|b| ids[b * len + at..b * len + at + n].iter().copied())
                    .collect();
                let hidden = reader.read(&chunk, n).unwrap();
                for b in 0..batch {
                    got[(b * len + at) * 6..(b * len + at + n) * 6]
                        .copy_from_slice(&hidden[b * n * 6..(b + 1) * n * 6]);
                }
                at += n;
            }
            assert_eq!(at, len);
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(diff < 1e-12, "{positions:?} {mode:?}: {diff}");
            // keys and values: 2 layers x 3 sequences x 11 positions x 6 values x 8 bytes
            assert_eq!(reader.context_bytes(), 2 * 2 * 3 * 11 * 6 * 8);
            assert_eq!(model.context_bytes_at(11) * 3, reader.context_bytes());
        }
    }
}

#[test]
fn caches_at_different_positions_are_an_error() {
    let model = random_model(Positions::Rotary, 1);
    // sequence 0 has read one token (in both layers), sequence 1 none
    let mut seq0: Vec<KvCache<f64>> = vec![KvCache::default(); 2];
    model.forward_cached(&[1], &mut seq0).unwrap();
    let mut caches: Vec<Vec<KvCache<f64>>> = seq0
        .into_iter()
        .map(|c| vec![c, KvCache::default()])
        .collect();
    let e = model
        .forward_cached_batch(&[3, 4], 2, &mut caches)
        .unwrap_err();
    assert!(e.to_string().contains("same position"), "{e}");
    let e = model
        .forward_cached_batch(&[3, 4], 2, &mut caches[..1])
        .unwrap_err();
    assert!(e.to_string().contains("caches for 1 layers"), "{e}");
}

#[test]
fn the_length_sweep_says_what_it_did_not_run_and_why() {
    let mut c = TransformerConfig::new(8, 2, 16, 2);
    c.positions = Positions::Learned;
    c.max_position_embeddings = 128;
    let learned = Transformer::<f32>::init(c, 0).unwrap();
    let options = LengthEvalOptions {
        samples: 4,
        batch: 4,
        chunk: 64,
        mode: EvalMode::Chunked,
        seed: 1,
        time_limit_s: None,
    };
    let sweep =
        evaluate_induction_lengths(&learned, 16, &[64, 128, 256, 512], &options, |_| {}).unwrap();
    assert_eq!(
        sweep.results.iter().map(|r| r.length).collect::<Vec<_>>(),
        [64, 128]
    );
    assert_eq!(
        sweep.not_run.iter().map(|r| r.length).collect::<Vec<_>>(),
        [256, 512]
    );
    assert_eq!(
        sweep.not_run[1].reason,
        "512 tokens are past the 128 learned positions of the model"
    );
    // KV cache: 2 layers x 2 x 8 values x 4 bytes = 128 bytes a token and sequence
    assert_eq!(sweep.results[1].context_bytes, 4 * 128 * 128);
    // with rotary positions nothing stops it but time: 2^30 times the
    // first length's time is over any limit
    let rotary = Transformer::<f32>::init(TransformerConfig::new(8, 2, 16, 2), 0).unwrap();
    let limited = LengthEvalOptions {
        time_limit_s: Some(1e-9),
        ..options
    };
    let sweep = evaluate_induction_lengths(&rotary, 16, &[64, 128], &limited, |_| {}).unwrap();
    assert_eq!(sweep.results.len(), 1);
    assert_eq!(sweep.not_run.len(), 1);
    assert!(
        sweep.not_run[0].reason.contains("(128/64)^2"),
        "attention is projected as quadratic: {}",
        sweep.not_run[0].reason
    );
    let sweep = evaluate_induction_lengths(&rotary, 16, &[64, 128, 256], &limited, |_| {}).unwrap();
    assert_eq!(
        sweep.not_run[1].reason,
        "longer than 128, which was not run"
    );
}

#[test]
fn the_task_command_trains_and_evaluates_an_attention_model() {
    let out = std::env::temp_dir().join(format!("selective-attn-task-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_selective"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{args:?}: {stderr}");
        (String::from_utf8_lossy(&o.stdout).into_owned(), stderr)
    };
    let out_s = out.to_str().unwrap();
    run(&[
        "task",
        "induction-heads",
        "--layer",
        "attention",
        "--positions",
        "learned",
        "--d-model",
        "16",
        "--n-head",
        "2",
        "--seq-len",
        "32",
        "--steps",
        "6",
        "--batch",
        "4",
        "--eval-every",
        "3",
        "--eval-examples",
        "8",
        "--test-examples",
        "8",
        "--lengths",
        "16,32,64",
        "--eval-samples",
        "4",
        "--threads",
        "1",
        "--out",
        out_s,
    ]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(report["label"], "attention (learned)");
    assert_eq!(report["steps_run"], 6);
    assert_eq!(report["lengths"].as_array().unwrap().len(), 2, "16 and 32");
    assert_eq!(report["not_run"][0]["length"], 64);
    // the model is saved in the Llama layout and evaluates again
    let model_dir = out.join("model");
    assert!(Path::new(&model_dir.join("config.json")).exists());
    let eval_out = out.join("eval");
    let (stdout, _) = run(&[
        "task",
        "induction-heads",
        "--eval-only",
        "--model",
        model_dir.to_str().unwrap(),
        "--lengths",
        "32",
        "--eval-samples",
        "4",
        "--threads",
        "1",
        "--out",
        eval_out.to_str().unwrap(),
    ]);
    assert!(stdout.contains("learned positions"), "{stdout}");
    // and trains further from it
    run(&[
        "task",
        "induction-heads",
        "--init",
        model_dir.to_str().unwrap(),
        "--d-model",
        "16",
        "--seq-len",
        "32",
        "--steps",
        "2",
        "--batch",
        "4",
        "--eval-every",
        "2",
        "--eval-examples",
        "4",
        "--test-examples",
        "4",
        "--threads",
        "1",
        "--out",
        out.join("more").to_str().unwrap(),
    ]);
    let e = Command::new(env!("CARGO_BIN_EXE_selective"))
        .args([
            "task",
            "induction-heads",
            "--layer",
            "attention",
            "--n-head",
            "3",
        ])
        .args(["--out", out.join("bad").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr)
        .contains("--n-head 3 must be at least 1 and divide --d-model 32"));
}
