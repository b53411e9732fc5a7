//! The sequence classifier (docs/DESIGN.md §16.3): gradients of every
//! parameter against central differences in f64 for both inputs, both
//! poolings and both SSM layers; pooling and the head against the
//! backbone's own forward; token ids against the same model fed one-hot
//! vectors; save and load; bad input. Also the next-token batch and the
//! readers of a prepared DNA set.

use selective::datasets::dna::{ApeManifest, ManifestSource};
use selective::datasets::{ApeGenomes, ApeSplit};
use selective::rng::Rng;
use selective::tasks::{
    BlockArch, ClassifierConfig, ClassifierInput, Pooling, SequenceClassifier, SequenceInput,
    SsmLayer, TaskBatch, TaskModel, TaskModelConfig,
};

fn backbone_config(layer: SsmLayer) -> TaskModelConfig {
    let mut c = TaskModelConfig::new(5, 6, 2, layer, BlockArch::Mamba);
    c.d_state = 4;
    c.dt_rank = 2;
    c.d_conv = 3;
    c
}

/// A classifier with every weight moved off its initialisation, so that no
/// gradient is zero by symmetry (zero biases, unit norms).
fn random_classifier(config: ClassifierConfig, seed: u64) -> SequenceClassifier<f64> {
    let mut model = SequenceClassifier::<f64>::init(config, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0x5A5A);
    for t in tensors_mut(&mut model) {
        for v in t.iter_mut() {
            *v += 0.1 * rng.normal();
        }
    }
    model
}

fn tensors_mut(model: &mut SequenceClassifier<f64>) -> Vec<&mut Vec<f64>> {
    let c = model.config;
    let p = &mut model.params;
    let mut out: Vec<&mut Vec<f64>> = p
        .backbone
        .tensors_mut(&c.backbone)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    out.push(&mut p.input_weight);
    out.push(&mut p.input_bias);
    out.push(&mut p.head_weight);
    out.push(&mut p.head_bias);
    out
}

fn tensors(model: &SequenceClassifier<f64>) -> Vec<(String, Vec<f64>)> {
    model
        .params
        .named(&model.config)
        .into_iter()
        .map(|(n, _, t)| (n, t.to_vec()))
        .collect()
}

#[test]
fn gradients_match_central_differences_in_f64() {
    let cases = [
        (SsmLayer::S6, ClassifierInput::Tokens, Pooling::Mean, 2, 5),
        (
            SsmLayer::S6,
            ClassifierInput::Vectors { width: 3 },
            Pooling::Last,
            3,
            4,
        ),
        (SsmLayer::S4d, ClassifierInput::Tokens, Pooling::Last, 2, 7),
        (
            SsmLayer::S4d,
            ClassifierInput::Vectors { width: 2 },
            Pooling::Mean,
            1,
            1,
        ),
    ];
    for (case, &(layer, input, pooling, batch, len)) in cases.iter().enumerate() {
        let config = ClassifierConfig {
            backbone: backbone_config(layer),
            n_classes: 3,
            pooling,
            input,
        };
        let mut model = random_classifier(config, 11 + case as u64);
        let mut rng = Rng::new(case as u64);
        let ids: Vec<u32> = (0..batch * len).map(|_| rng.below(5) as u32).collect();
        let width = match input {
            ClassifierInput::Vectors { width } => width,
            ClassifierInput::Tokens => 0,
        };
        let x: Vec<f64> = (0..batch * len * width).map(|_| rng.normal()).collect();
        let labels: Vec<u32> = (0..batch).map(|_| rng.below(3) as u32).collect();
        let run = |m: &SequenceClassifier<f64>| {
            let input = match input {
                ClassifierInput::Tokens => SequenceInput::Tokens(&ids),
                ClassifierInput::Vectors { .. } => SequenceInput::Vectors(&x),
            };
            m.loss_and_grads(input, &labels, batch, len).unwrap()
        };
        let (score, grads) = run(&model);
        let analytic = {
            let m = SequenceClassifier {
                config,
                params: grads,
            };
            tensors(&m)
        };
        let h = 1e-5;
        let mut checked = 0;
        let mut worst = 0.0f64;
        let names: Vec<String> = analytic.iter().map(|(n, _)| n.clone()).collect();
        for (ti, (name, g)) in analytic.iter().enumerate() {
            for i in 0..g.len() {
                let nudge = |model: &mut SequenceClassifier<f64>, delta: f64| {
                    let mut owned: Vec<&mut Vec<f64>> = tensors_mut(model)
                        .into_iter()
                        .filter(|t| !t.is_empty())
                        .collect();
                    owned[ti][i] += delta;
                };
                nudge(&mut model, h);
                let up = run(&model).0.mean_loss();
                nudge(&mut model, -2.0 * h);
                let down = run(&model).0.mean_loss();
                nudge(&mut model, h);
                let fd = (up - down) / (2.0 * h);
                let err = (g[i] - fd).abs() / (1e-3 + fd.abs());
                worst = worst.max(err);
                assert!(
                    err < 1e-5,
                    "case {case} {name}[{i}]: analytic {} vs central difference {fd}",
                    g[i]
                );
                checked += 1;
            }
        }
        assert!(score.loss_sum > 0.0 && score.count == batch);
        // every tensor of the configuration was checked, the input
        // projection only for vector inputs
        assert_eq!(
            names.iter().any(|n| n == "input.weight"),
            width > 0,
            "case {case}"
        );
        assert!(checked > 500, "case {case}: {checked} entries");
        eprintln!("case {case}: {checked} entries, worst relative error {worst:.2e}");
    }
}

/// Pooling and the head, recomputed from the backbone's own forward.
#[test]
fn logits_are_the_head_of_the_pooled_final_hidden_states() {
    for pooling in [Pooling::Mean, Pooling::Last] {
        let config = ClassifierConfig {
            backbone: backbone_config(SsmLayer::S6),
            n_classes: 4,
            pooling,
            input: ClassifierInput::Tokens,
        };
        let model = random_classifier(config, 3);
        let (batch, len, d) = (3, 9, 6);
        let mut rng = Rng::new(9);
        let ids: Vec<u32> = (0..batch * len).map(|_| rng.below(5) as u32).collect();
        let got = model
            .logits(SequenceInput::Tokens(&ids), batch, len)
            .unwrap();
        let backbone = TaskModel {
            config: config.backbone,
            params: model.params.backbone.clone(),
        };
        let hidden = backbone.forward_train(&ids, batch, len).unwrap();
        let hidden = hidden.final_hidden();
        for b in 0..batch {
            let rows: Vec<&[f64]> = (0..len)
                .map(|t| &hidden[(b * len + t) * d..(b * len + t + 1) * d])
                .collect();
            let pooled: Vec<f64> = (0..d)
                .map(|j| match pooling {
                    Pooling::Mean => rows.iter().map(|r| r[j]).sum::<f64>() / len as f64,
                    Pooling::Last => rows[len - 1][j],
                })
                .collect();
            for c in 0..4 {
                let w = &model.params.head_weight[c * d..(c + 1) * d];
                let want: f64 = model.params.head_bias[c]
                    + w.iter().zip(&pooled).map(|(a, b)| a * b).sum::<f64>();
                assert!(
                    (got[b * 4 + c] - want).abs() < 1e-12,
                    "{pooling:?} {b} {c}: {} vs {want}",
                    got[b * 4 + c]
                );
            }
        }
    }
}

/// Vectors: a classifier fed one-hot rows through W_in = Eᵀ (and b_in = 0)
/// is the token classifier.
#[test]
fn one_hot_vectors_through_the_embedding_equal_token_ids() {
    let tokens = random_classifier(
        ClassifierConfig {
            backbone: backbone_config(SsmLayer::S6),
            n_classes: 3,
            pooling: Pooling::Mean,
            input: ClassifierInput::Tokens,
        },
        21,
    );
    let mut vectors = tokens.clone();
    vectors.config.input = ClassifierInput::Vectors { width: 5 };
    let (v, d) = (5, 6);
    let e = &tokens.params.backbone.embedding; // (V, D)
    vectors.params.input_weight = (0..d * v).map(|i| e[(i % v) * d + i / v]).collect(); // (D, V)
    vectors.params.input_bias = vec![0.0; d];
    let (batch, len) = (2, 6);
    let ids: Vec<u32> = (0..batch * len).map(|i| ((i * 3 + 1) % v) as u32).collect();
    let mut one_hot = vec![0.0; batch * len * v];
    for (r, &id) in ids.iter().enumerate() {
        one_hot[r * v + id as usize] = 1.0;
    }
    let a = tokens
        .logits(SequenceInput::Tokens(&ids), batch, len)
        .unwrap();
    let b = vectors
        .logits(SequenceInput::Vectors(&one_hot), batch, len)
        .unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-12, "{x} vs {y}");
    }
}

#[test]
fn a_classifier_saves_loads_and_refuses_bad_input() {
    let dir = std::env::temp_dir().join(format!("selective-classifier-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = ClassifierConfig {
        backbone: backbone_config(SsmLayer::S4d),
        n_classes: 4,
        pooling: Pooling::Last,
        input: ClassifierInput::Vectors { width: 2 },
    };
    let model = SequenceClassifier::<f32>::init(config, 1).unwrap();
    model.save(&dir).unwrap();
    let back = SequenceClassifier::<f32>::load(&dir).unwrap();
    assert_eq!(back, model);

    let x = vec![0.5f32; 2 * 3 * 2];
    let err = |r: selective::Result<_>| {
        r.map(|_: selective::tasks::AnswerScore| ())
            .unwrap_err()
            .to_string()
    };
    let e = err(model.score(SequenceInput::Tokens(&[0; 6]), &[0, 1], 2, 3));
    assert!(e.contains("reads vectors, and was given token ids"), "{e}");
    let e = err(model.score(SequenceInput::Vectors(&x), &[0, 4], 2, 3));
    assert!(
        e.contains("label 4 of sequence 1 is not one of the 4 classes"),
        "{e}"
    );
    let e = err(model.score(SequenceInput::Vectors(&x[..10]), &[0, 1], 2, 3));
    assert!(e.contains("inputs"), "{e}");
    let mut bad = x.clone();
    bad[3] = f32::NAN;
    let e = err(model.score(SequenceInput::Vectors(&bad), &[0, 1], 2, 3));
    assert!(e.contains("not finite"), "{e}");
    let e = SequenceClassifier::<f32>::init(
        ClassifierConfig {
            n_classes: 1,
            ..config
        },
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("n_classes must be at least 2"), "{e}");
    // a file with a tensor missing is named
    let other = ClassifierConfig {
        input: ClassifierInput::Tokens,
        ..config
    };
    std::fs::write(
        dir.join("classifier.json"),
        serde_json::to_string(&other).unwrap(),
    )
    .unwrap();
    let e = SequenceClassifier::<f32>::load(&dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds") && e.contains("tensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn next_token_batches_answer_every_position_with_the_next_id() {
    let w1: &[u8] = &[0, 1, 2, 3];
    let w2: &[u8] = &[4, 4, 0, 2];
    let b = TaskBatch::next_token(&[w1, w2], 3).unwrap();
    assert_eq!(b.ids, vec![0, 1, 2, 4, 4, 0]);
    let answers: Vec<(usize, usize, u32)> = b
        .answers
        .iter()
        .map(|a| (a.row, a.position, a.token))
        .collect();
    assert_eq!(
        answers,
        vec![
            (0, 0, 1),
            (0, 1, 2),
            (0, 2, 3),
            (1, 0, 4),
            (1, 1, 0),
            (1, 2, 2)
        ]
    );
    let e = TaskBatch::next_token(&[w1, &w2[..3]], 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("window 1 holds 3 ids, not len + 1 = 4"), "{e}");
}

/// Windows never cross a segment (a boundary between regions of a split),
/// reach both ends of every segment, and a too-long window is None.
#[test]
fn dna_windows_stay_inside_one_segment() {
    let dir = std::env::temp_dir().join(format!("selective-apes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // species X has two train segments (ids 0 0 0 0 0 | 1 1 1), Y one
    let genomes = ApeGenomes {
        species: vec!["X".into(), "Y".into()],
        reference: "X".into(),
        region_bp: 10,
        segments: vec![
            vec![
                vec![b"AAAAA".to_vec(), b"CCC".to_vec()],
                vec![b"GGTTN".to_vec()],
            ],
            vec![vec![b"AC".to_vec()], vec![b"GT".to_vec()]],
            vec![vec![b"A".to_vec()], vec![b"T".to_vec()]],
        ],
        blocks: [2, 1, 1],
    };
    let source = ManifestSource {
        path: "synthetic".into(),
        sha256: String::new(),
        bytes: 0,
    };
    let manifest: ApeManifest = genomes.write(&dir, &source).unwrap();
    let split = ApeSplit::read(&dir, &manifest, "train").unwrap();
    assert_eq!(split.segments[0], vec![vec![0u8; 5], vec![1u8; 3]]);
    assert_eq!(split.segments[1], vec![vec![2u8, 2, 3, 3, 4]]);
    assert_eq!(split.window_starts(0, 3), 3 + 1);
    let mut rng = Rng::new(4);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..400 {
        let w = split.sample_window(0, 3, &mut rng).unwrap();
        assert!(w == [0, 0, 0] || w == [1, 1, 1], "{w:?}");
        seen.insert(w.to_vec());
    }
    assert_eq!(seen.len(), 2);
    assert!(split.sample_window(0, 6, &mut rng).is_none());
    // evenly spaced: start indices ⌊(2k+1)·4/4⌋ = 1 and 3 of the 3 + 1
    // starts, the second in the second segment
    let spaced = split.spaced_windows(0, 3, 2).unwrap();
    assert_eq!(spaced, vec![&[0u8, 0, 0][..], &[1u8, 1, 1][..]]);
    assert_eq!(split.window_at(0, 3, 2).unwrap(), &[0, 0, 0]);
    assert!(split.window_at(0, 3, 4).is_none());
    assert_eq!(split.longest_segment(0), 5);
    assert_eq!(
        split.sample_window(1, 5, &mut rng).unwrap(),
        &[2, 2, 3, 3, 4]
    );
    let e = ApeSplit::read(&dir, &manifest, "dev")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unknown split \"dev\""), "{e}");
    std::fs::write(dir.join("val/Y.txt"), "ACGU\n").unwrap();
    let e = ApeSplit::read(&dir, &manifest, "val")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("Y.txt") && e.contains("line 1") && e.contains("'U'"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
