//! Training: AdamW, parameter groups, schedule, clipping, accumulation,
//! exact resuming, NaN stop, learning, errors, and the command line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use selective::nn::{Architecture, Mamba, MambaConfig, MambaParams, Transformer};
use selective::train::{
    clip_global_norm, decays, global_norm, AdamW, AdamWConfig, LrSchedule, ProcessGroup,
    ProgressMode, ResumeOptions, RunOptions, ThreadGroup, TrainConfig, TrainableModel, Trainer,
};

/// A fresh, empty directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    common::fresh_temp_dir("train", name)
}

/// A small repetitive text (byte-level).
fn write_text(dir: &Path) -> PathBuf {
    common::write_pangram_text(dir, 60)
}

/// A model small enough for a step in milliseconds.
fn tiny_config(data: PathBuf) -> TrainConfig {
    TrainConfig {
        data,
        d_model: 16,
        n_layer: 2,
        d_state: 4,
        batch_size: 4,
        seq_len: 24,
        steps: 6,
        lr: 3e-3,
        eval_every: 0,
        eval_batches: 2,
        save_every: 0,
        ..TrainConfig::default()
    }
}

fn silent() -> RunOptions {
    RunOptions {
        stop_after: None,
        progress: ProgressMode::Silent,
    }
}

fn small_model_config() -> MambaConfig {
    let mut c = MambaConfig::new(8, 2, 16, 2);
    c.tie_embeddings = false;
    c
}

#[test]
fn adamw_two_steps_match_the_hand_computed_update() {
    let config = small_model_config();
    let mut params = MambaParams::<f32>::zeros(&config).filled(&config, 0.5f32);
    let adam = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::<MambaParams<f32>>::new(&config, adam);
    let lr = 0.01;
    let (g1, g2) = (0.1f64, -0.2f64);
    let (grads1, grads2) = (
        params.filled(&config, g1 as f32),
        params.filled(&config, g2 as f32),
    );
    opt.update(&config, &mut params, &grads1, lr).unwrap();
    opt.update(&config, &mut params, &grads2, lr).unwrap();
    assert_eq!(opt.step, 2);

    // PyTorch AdamW written out for one element.
    let expected = |decay: bool| {
        let wd = if decay { 0.1 } else { 0.0 };
        let (mut p, mut m, mut v) = (0.5f64, 0.0f64, 0.0f64);
        for (t, g) in [(1, g1), (2, g2)] {
            p *= 1.0 - lr * wd;
            m = 0.9 * m + 0.1 * g;
            v = 0.95 * v + 0.05 * g * g;
            let m_hat = m / (1.0 - 0.9f64.powi(t));
            let v_hat = v / (1.0 - 0.95f64.powi(t));
            p -= lr * m_hat / (v_hat.sqrt() + 1e-8);
        }
        p
    };
    // After step 1 (no decay): 0.5 - 0.01 = 0.49; step 2 moves it back up.
    let (with, without) = (expected(true), expected(false));
    assert!((with - without).abs() > 1e-4);
    for (info, p) in params.tensors(&config) {
        let want = expected(decays(&info));
        for &x in p.iter() {
            assert!(
                (x as f64 - want).abs() < 1e-6,
                "{}: {x} vs {want}",
                info.name
            );
        }
    }
}

#[test]
fn weight_decay_groups_follow_the_official_names() {
    let mut config = small_model_config();
    config.rms_norm = false; // norm biases too
    config.proj_bias = true;
    let params = MambaParams::<f32>::zeros(&config);
    let mut seen = 0;
    for (info, _) in params.tensors(&config) {
        let n = &info.name;
        let decayed = [
            "in_proj.weight",
            "conv1d.weight",
            "x_proj.weight",
            "dt_proj.weight",
            "out_proj.weight",
            "lm_head.weight",
        ]
        .iter()
        .any(|s| n.ends_with(s));
        let not_decayed = n.ends_with("A_log")
            || n.ends_with(".D")
            || n.ends_with(".bias")
            || n.contains("norm")
            || n.contains("embeddings");
        assert!(decayed != not_decayed, "{n} is in neither group or both");
        assert_eq!(decays(&info), decayed, "{n}");
        seen += 1;
    }
    // embedding, 2 x (norm w+b, A_log, D, conv w+b, in w+b, x, dt w+b, out w+b), norm_f w+b, head
    assert_eq!(seen, 1 + 2 * 13 + 2 + 1);
}

#[test]
fn schedule_warms_up_linearly_then_decays_by_cosine() {
    let s = LrSchedule {
        peak: 1e-3,
        min: 1e-5,
        warmup_steps: 10,
        total_steps: 110,
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(s.lr(0), 1e-4)); // warm-up start
    assert!(close(s.lr(4), 5e-4)); // warm-up middle
    assert!(close(s.lr(9), 1e-3)); // warm-up end: the peak
    assert!(s.lr(10) < 1e-3 && s.lr(10) > s.lr(11)); // decay starts
    assert!(close(s.lr(59), 1e-5 + 0.5 * (1e-3 - 1e-5))); // half-way: the mean
    assert!(close(s.lr(109), 1e-5)); // last step: the minimum
    assert!(close(s.lr(500), 1e-5));
    // No warm-up: the first step is at the peak's neighbourhood, decreasing.
    let s0 = LrSchedule {
        warmup_steps: 0,
        ..s
    };
    assert!(s0.lr(0) <= 1e-3 && s0.lr(0) > s0.lr(1));
}

#[test]
fn clipping_scales_to_the_global_norm() {
    let config = small_model_config();
    let mut grads = MambaParams::<f32>::zeros(&config).filled(&config, 3.0f32);
    let n: usize = grads.tensors(&config).iter().map(|(_, g)| g.len()).sum();
    let norm = 3.0 * (n as f64).sqrt();
    assert!((global_norm(&config, &grads) - norm).abs() < 1e-9 * norm);
    // Above the threshold: every gradient scaled by the same factor.
    let before = clip_global_norm(&config, &mut grads, 1.0);
    assert!((before - norm).abs() < 1e-9 * norm);
    assert!((global_norm(&config, &grads) - 1.0).abs() < 1e-5);
    for (_, g) in grads.tensors(&config) {
        assert!(g.iter().all(|&x| x == g[0]));
    }
    // Below: unchanged.
    let copy = grads.clone();
    clip_global_norm(&config, &mut grads, 10.0);
    assert_eq!(copy, grads);
    // NaN: reported, left alone.
    grads.layers[1].mixer.d[0] = f32::NAN;
    assert!(clip_global_norm(&config, &mut grads, 1.0).is_nan());
}

#[test]
fn accumulating_two_micro_batches_equals_one_double_batch() {
    let dir = temp_dir("accum");
    let data = write_text(&dir);
    let double = TrainConfig {
        batch_size: 4,
        grad_accum: 1,
        steps: 3,
        ..tiny_config(data.clone())
    };
    let halves = TrainConfig {
        batch_size: 2,
        grad_accum: 2,
        ..double.clone()
    };
    let mut a = Trainer::<Mamba<f32>>::new(double, dir.join("a")).unwrap();
    let mut b = Trainer::<Mamba<f32>>::new(halves, dir.join("b")).unwrap();
    let ra = a.run(&silent()).unwrap();
    let rb = b.run(&silent()).unwrap();
    for (x, y) in ra.losses.iter().zip(&rb.losses) {
        assert!((x - y).abs() < 1e-5 * x.abs(), "losses {x} vs {y}");
    }
    let config = a.model.config.clone();
    for ((info, p), (_, q)) in a
        .model
        .params
        .tensors(&config)
        .into_iter()
        .zip(b.model.params.tensors(&config))
    {
        let worst = p
            .iter()
            .zip(q.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{}: differs by {worst}", info.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_resumed_run_gives_bit_identical_losses() {
    resumed_run_is_bit_identical("resume", |c| c);
}

#[test]
fn a_resumed_mamba2_run_gives_bit_identical_losses() {
    // 4 heads of 8 channels, 2 groups, SSD chunks of 5 over windows of 24
    resumed_run_is_bit_identical("resume-mamba2", |c| TrainConfig {
        arch: Architecture::Mamba2,
        head_dim: 8,
        n_groups: 2,
        chunk_size: 5,
        ..c
    });
}

fn resumed_run_is_bit_identical(name: &str, arch: impl Fn(TrainConfig) -> TrainConfig) {
    let dir = temp_dir(name);
    let data = write_text(&dir);
    let config = arch(TrainConfig {
        eval_every: 2,
        warmup_steps: Some(2),
        ..tiny_config(data)
    });
    let straight = Trainer::<Mamba<f32>>::new(config.clone(), dir.join("straight"))
        .unwrap()
        .run(&silent())
        .unwrap();
    assert_eq!(straight.losses.len(), 6);
    assert!(straight.finished);

    let first = Trainer::<Mamba<f32>>::new(config, dir.join("split"))
        .unwrap()
        .run(&RunOptions {
            stop_after: Some(3),
            progress: ProgressMode::Silent,
        })
        .unwrap();
    assert_eq!((first.end_step, first.finished), (3, false));
    assert!(!dir.join("split/model").exists());
    let mut resumed = Trainer::<Mamba<f32>>::resume(dir.join("split")).unwrap();
    assert_eq!(resumed.state.step, 3);
    let second = resumed.run(&silent()).unwrap();
    assert!(second.finished);

    let joined: Vec<f32> = first.losses.iter().chain(&second.losses).copied().collect();
    assert_eq!(joined, straight.losses);
    let val_joined: Vec<(usize, f32)> = first
        .val_losses
        .iter()
        .chain(&second.val_losses)
        .copied()
        .collect();
    assert_eq!(val_joined, straight.val_losses);
    let weights = |run: &str| std::fs::read(dir.join(run).join("model/model.safetensors")).unwrap();
    assert!(
        weights("straight") == weights("split"),
        "final weights differ"
    );
    // The metrics file of the split run reads like the straight one's.
    let losses = |run: &str| -> Vec<f64> {
        std::fs::read_to_string(dir.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
            .collect()
    };
    assert_eq!(losses("split"), losses("straight"));
    assert_eq!(losses("split").len(), 6);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = temp_dir("nan");
    let data = write_text(&dir);
    let config = TrainConfig {
        lr: 1e30,
        min_lr: 0.0,
        warmup_steps: Some(0),
        grad_clip: 0.0,
        weight_decay: 0.0,
        save_every: 1,
        steps: 20,
        ..tiny_config(data)
    };
    let run = dir.join("run");
    let err = Trainer::<Mamba<f32>>::new(config, &run)
        .unwrap()
        .run(&silent())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not finite"), "{err}");
    assert!(err.contains("last good checkpoint"), "{err}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("checkpoint/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(err.contains(&format!("step {}:", step + 1)), "{err}");
    let model = Mamba::<f32>::from_dir(run.join("checkpoint")).unwrap();
    for (info, p) in model.params.tensors(&model.config) {
        assert!(p.iter().all(|x| x.is_finite()), "{}", info.name);
    }
    assert!(!run.join("model").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_loss_falls_on_a_repetitive_text() {
    let dir = temp_dir("learn");
    let data = write_text(&dir);
    let config = TrainConfig {
        d_model: 32,
        steps: 60,
        lr: 1e-2,
        warmup_steps: Some(5),
        eval_every: 30,
        ..tiny_config(data)
    };
    let report = Trainer::<Mamba<f32>>::new(config, dir.join("run"))
        .unwrap()
        .run(&silent())
        .unwrap();
    let first = report.losses[0];
    let last = *report.losses.last().unwrap();
    assert!(first > 5.0, "starts near ln 256 = 5.55: {first}");
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let (_, val) = *report.val_losses.last().unwrap();
    assert!(val < 0.5 * first, "validation loss {val}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_settings_and_missing_files_are_clear_errors() {
    let dir = temp_dir("errors");
    let data = write_text(&dir);
    let err = |config: TrainConfig| {
        Trainer::<Mamba<f32>>::new(config, dir.join("run"))
            .err()
            .expect("an error")
            .to_string()
    };
    let missing = dir.join("no-such-file.txt");
    let e = err(tiny_config(missing.clone()));
    assert!(e.contains("no-such-file.txt"), "{e}");
    let e = err(TrainConfig {
        batch_size: 0,
        ..tiny_config(data.clone())
    });
    assert!(e.contains("batch_size"), "{e}");
    let e = err(TrainConfig {
        seq_len: 100_000,
        ..tiny_config(data.clone())
    });
    assert!(e.contains("seq_len"), "{e}");
    let e = err(TrainConfig {
        lr: -1.0,
        ..tiny_config(data.clone())
    });
    assert!(e.contains("lr"), "{e}");
    let e = err(TrainConfig {
        data: PathBuf::new(),
        ..tiny_config(data.clone())
    });
    assert!(e.contains("--data"), "{e}");
    // Resuming needs a checkpoint; a new run refuses a used directory.
    assert!(Trainer::<Mamba<f32>>::resume(dir.join("nothing")).is_err());
    Trainer::<Mamba<f32>>::new(tiny_config(data.clone()), dir.join("used"))
        .unwrap()
        .run(&RunOptions {
            stop_after: Some(1),
            progress: ProgressMode::Silent,
        })
        .unwrap();
    let e = Trainer::<Mamba<f32>>::new(tiny_config(data), dir.join("used"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_command_line_trains_and_the_model_generates() {
    let dir = temp_dir("cli");
    let data = write_text(&dir);
    let run = dir.join("run");
    let selective = || Command::new(env!("CARGO_BIN_EXE_selective"));
    let out = selective()
        .arg("train")
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .args(["--d-model", "16", "--n-layer", "1", "--d-state", "4"])
        .args(["--batch-size", "2", "--seq-len", "16", "--steps", "4"])
        .args([
            "--eval-every",
            "2",
            "--eval-batches",
            "1",
            "--save-every",
            "2",
        ])
        .args(["--betas", "0.9,0.95", "--seed", "7", "--threads", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("validation loss"), "{stderr}");
    for file in [
        "config.json",
        "metrics.jsonl",
        "checkpoint/model.safetensors",
        "checkpoint/optimizer.safetensors",
        "checkpoint/trainer_state.json",
        "checkpoint/config.json",
        "model/model.safetensors",
        "model/config.json",
    ] {
        assert!(run.join(file).exists(), "{file}");
    }
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(settings["d_model"], 16);
    assert_eq!(settings["seed"], 7);
    assert_eq!(settings["beta2"], 0.95);

    let out = selective()
        .args(["generate", "--model"])
        .arg(run.join("model"))
        .args(["--prompt", "the ", "-n", "5", "--seed", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Five bytes of continuation (and a newline).
    assert!(!out.stdout.is_empty());

    // Resuming takes no new settings; a missing text is named.
    let out = selective()
        .arg("train")
        .arg("--out")
        .arg(&run)
        .args(["--resume", "--lr", "0.1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lr"));
    let out = selective()
        .arg("train")
        .arg("--data")
        .arg(dir.join("missing.txt"))
        .arg("--out")
        .arg(dir.join("run2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.txt"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tokenizer_json_run_carries_its_tokenizer_into_the_model_directory() {
    let dir = temp_dir("tokenizer");
    let data = write_text(&dir);
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/gpt-neox-20b-tokenizer.json");
    let config = TrainConfig {
        tokenizer: Some(tokenizer),
        steps: 2,
        seq_len: 8,
        ..tiny_config(data)
    };
    let report = Trainer::<Mamba<f32>>::new(config, dir.join("run"))
        .unwrap()
        .run(&silent())
        .unwrap();
    assert!(report.finished);
    let model_dir = dir.join("run/model");
    assert!(model_dir.join("tokenizer.json").exists());
    let model = Mamba::<f32>::from_dir(&model_dir).unwrap();
    assert_eq!(model.config.vocab_size, 50280); // 50277 padded to a multiple of 8
    let tok = selective::generate::tokenizer::Tokenizer::for_model_dir(&model_dir)
        .unwrap()
        .unwrap();
    assert_eq!(tok.vocab_size(), 50277);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_char_vocab_run_stores_its_characters_and_draws_its_loss() {
    let dir = temp_dir("chars");
    let data = write_text(&dir);
    let config = TrainConfig {
        char_vocab: true,
        steps: 4,
        eval_every: 2,
        ..tiny_config(data)
    };
    let report = Trainer::<Mamba<f32>>::new(config, dir.join("run"))
        .unwrap()
        .run(&silent())
        .unwrap();
    assert_eq!(report.val_losses.len(), 2);
    let model_dir = dir.join("run/model");
    let model = Mamba::<f32>::from_dir(&model_dir).unwrap();
    // the pangram has 28 distinct characters (" .a-z"), padded to 32 ids
    assert_eq!(model.config.vocab_size, 32);
    let tok = selective::generate::tokenizer::Tokenizer::for_model_dir(&model_dir)
        .unwrap()
        .unwrap();
    assert_eq!(tok.vocab_size(), 28);
    assert_eq!(tok.encode(" .a").unwrap(), vec![0, 1, 2]);
    assert_eq!(tok.decode(&[21, 2, 25]).unwrap(), "tax");
    let err = tok.encode("Tax").unwrap_err().to_string();
    assert!(err.contains("'T'") && err.contains("28-character"), "{err}");
    assert!(tok
        .decode(&[28])
        .unwrap_err()
        .to_string()
        .contains("padding"));

    // the loss plot is a PNG redrawn at each evaluation
    let png = std::fs::read(dir.join("run/loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // both vocabularies at once are refused
    let both = TrainConfig {
        char_vocab: true,
        tokenizer: Some(dir.join("tokenizer.json")),
        ..tiny_config(dir.join("text.txt"))
    };
    let err = Trainer::<Mamba<f32>>::new(both, dir.join("run2"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not both"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tiny run as a Transformer++ (two heads of 8).
fn tiny_transformer_config(data: PathBuf) -> TrainConfig {
    TrainConfig {
        arch: Architecture::Transformer,
        n_head: 2,
        ..tiny_config(data)
    }
}

#[test]
fn a_transformer_trains_resumes_bit_identically_and_saves_a_model() {
    let dir = temp_dir("transformer");
    let data = write_text(&dir);
    let config = TrainConfig {
        eval_every: 2,
        warmup_steps: Some(2),
        ..tiny_transformer_config(data)
    };
    let straight = Trainer::<Transformer<f32>>::new(config.clone(), dir.join("straight"))
        .unwrap()
        .run(&silent())
        .unwrap();
    assert_eq!(straight.losses.len(), 6);
    assert!(straight.losses.iter().all(|l| l.is_finite()));
    let first = Trainer::<Transformer<f32>>::new(config.clone(), dir.join("split"))
        .unwrap()
        .run(&RunOptions {
            stop_after: Some(3),
            progress: ProgressMode::Silent,
        })
        .unwrap();
    assert_eq!((first.end_step, first.finished), (3, false));
    let second = Trainer::<Transformer<f32>>::resume(dir.join("split"))
        .unwrap()
        .run(&silent())
        .unwrap();
    let joined: Vec<f32> = first.losses.iter().chain(&second.losses).copied().collect();
    assert_eq!(joined, straight.losses);
    let weights = |run: &str| std::fs::read(dir.join(run).join("model/model.safetensors")).unwrap();
    assert!(
        weights("straight") == weights("split"),
        "final weights differ"
    );

    // The saved model is a Llama directory the Transformer reads back,
    // with the trained shapes, and its logits are finite.
    let model =
        <Transformer<f32> as TrainableModel>::from_dir(&dir.join("straight/model")).unwrap();
    assert_eq!(model.config.d_model, 16);
    assert_eq!(model.config.n_layer, 2);
    assert_eq!(model.config.n_head, 2);
    let hf: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("straight/model/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(hf["model_type"], "llama");
    let logits = model.forward(&[1, 2, 3], 1, 3).unwrap();
    assert_eq!(logits.len(), 3 * model.config.vocab_size);
    assert!(logits.iter().all(|x| x.is_finite()));

    // A Transformer run is not resumed as a Mamba one.
    let err = Trainer::<Mamba<f32>>::resume(dir.join("split"))
        .err()
        .expect("a Transformer run resumed as Mamba")
        .to_string();
    assert!(err.contains("transformer"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_loss_falls_for_a_transformer_too() {
    let dir = temp_dir("transformer-learn");
    let data = write_text(&dir);
    let config = TrainConfig {
        d_model: 32,
        steps: 60,
        lr: 1e-2,
        warmup_steps: Some(5),
        ..tiny_transformer_config(data)
    };
    let report = Trainer::<Transformer<f32>>::new(config, dir.join("run"))
        .unwrap()
        .run(&silent())
        .unwrap();
    let first = report.losses[0];
    let last = *report.losses.last().unwrap();
    assert!(first > 5.0, "starts near ln 256 = 5.55: {first}");
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_command_line_trains_a_transformer_and_resumes_it() {
    let dir = temp_dir("cli-transformer");
    let data = write_text(&dir);
    let run = dir.join("run");
    let selective = || Command::new(env!("CARGO_BIN_EXE_selective"));
    let out = selective()
        .arg("train")
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .args([
            "--arch",
            "transformer",
            "--n-head",
            "2",
            "--positions",
            "learned",
        ])
        .args(["--d-model", "16", "--n-layer", "1"])
        .args(["--batch-size", "2", "--seq-len", "16", "--steps", "4"])
        .args(["--eval-every", "0", "--save-every", "2", "--threads", "1"])
        .args(["--stop-after", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(settings["arch"], "transformer");
    assert_eq!(settings["positions"], "learned");
    let out = selective()
        .arg("train")
        .args(["--resume", "--out"])
        .arg(&run)
        .args(["--threads", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(hf["model_type"], "llama");
    let model = <Transformer<f32> as TrainableModel>::from_dir(&run.join("model")).unwrap();
    assert_eq!(model.config.positions.name(), "learned");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `config` as `ranks` data-parallel ranks on threads (ThreadGroup)
/// in `run` (fresh, or resumed when `resume`), up to `stop_after`; rank
/// 0's report.
fn run_on_thread_ranks<M: TrainableModel>(
    config: &TrainConfig,
    run: &Path,
    ranks: usize,
    resume: bool,
    stop_after: Option<usize>,
) -> selective::train::TrainReport {
    let reports: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(ranks)
            .into_iter()
            .map(|group| {
                s.spawn(move || {
                    let group: Box<dyn ProcessGroup> = Box::new(group);
                    let mut trainer = if resume {
                        Trainer::<M>::resume_in_group(run, &ResumeOptions::default(), group)
                    } else {
                        Trainer::<M>::new_in_group(config.clone(), run, group)
                    }
                    .unwrap();
                    trainer
                        .run(&RunOptions {
                            stop_after,
                            progress: ProgressMode::Silent,
                        })
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &reports[1..] {
        assert_eq!(r.losses, reports[0].losses, "ranks report different losses");
    }
    reports.into_iter().next().unwrap()
}

#[test]
fn data_parallel_ranks_give_the_bits_of_one_process_and_resume_on_another_count() {
    data_parallel_case::<Mamba<f32>>(Architecture::Mamba, "dp-mamba");
    data_parallel_case::<Mamba<f32>>(Architecture::Mamba2, "dp-mamba2");
    data_parallel_case::<Transformer<f32>>(Architecture::Transformer, "dp-transformer");
}

/// Architecture `arch` (trained by `M`) on 1, 2, 4 and 8 thread ranks, and
/// moved from 2 to 4 to 1 ranks, against one process: equal bits.
fn data_parallel_case<M: TrainableModel>(arch: Architecture, name: &str) {
    let dir = temp_dir(name);
    let data = write_text(&dir);
    // 8 micro-batches of 2 sequences a step; 3 evaluation batches, which
    // 2 and 4 ranks cannot share evenly
    let config = TrainConfig {
        arch,
        head_dim: 8,
        n_groups: 2,
        chunk_size: 5,
        batch_size: 2,
        grad_accum: 8,
        eval_every: 2,
        eval_batches: 3,
        save_every: 2,
        warmup_steps: Some(2),
        ..tiny_config(data)
    };
    let weights = |run: &str| std::fs::read(dir.join(run).join("model/model.safetensors")).unwrap();
    let alone = Trainer::<M>::new(config.clone(), dir.join("one"))
        .unwrap()
        .run(&silent())
        .unwrap();
    assert!(alone.finished);
    for ranks in [1, 2, 4, 8] {
        let run = dir.join(format!("ranks{ranks}"));
        let report = run_on_thread_ranks::<M>(&config, &run, ranks, false, None);
        assert_eq!(report.losses, alone.losses, "{name}: {ranks} ranks' losses");
        assert_eq!(
            report.val_losses, alone.val_losses,
            "{name}: {ranks} ranks' validation"
        );
        assert!(
            weights(&format!("ranks{ranks}")) == weights("one"),
            "{name}: {ranks} ranks' weights"
        );
    }
    // 2 ranks stop after step 3 (checkpoint at 2); 4 ranks resume to step
    // 5 (checkpoint at 5); one process finishes.
    let run = dir.join("mixed");
    let first = run_on_thread_ranks::<M>(&config, &run, 2, false, Some(3));
    let second = run_on_thread_ranks::<M>(&config, &run, 4, true, Some(5));
    let third = Trainer::<M>::resume(&run).unwrap().run(&silent()).unwrap();
    assert_eq!(
        (
            first.end_step,
            second.start_step,
            second.end_step,
            third.start_step
        ),
        (3, 3, 5, 5)
    );
    let joined: Vec<f32> = [first.losses, second.losses, third.losses].concat();
    assert_eq!(joined, alone.losses, "{name}: 2, 4 then 1 ranks");
    assert!(
        weights("mixed") == weights("one"),
        "{name}: weights after 2, 4 then 1 ranks"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ranks_that_cannot_share_a_step_are_refused_with_the_fix() {
    let dir = temp_dir("dp-refused");
    let data = write_text(&dir);
    let config = TrainConfig {
        grad_accum: 3,
        ..tiny_config(data)
    };
    let run = dir.join("run");
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|g| {
                let (config, run) = (config.clone(), run.clone());
                s.spawn(move || {
                    match Trainer::<Mamba<f32>>::new_in_group(config, run, Box::new(g)) {
                        Ok(_) => String::new(),
                        Err(e) => e.to_string(),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in errors {
        assert!(
            e.contains("grad_accum 3 cannot be shared by 2 ranks"),
            "{e}"
        );
        assert!(e.contains("--grad-accum 2 --batch-size 6"), "{e}");
    }
    let three = ThreadGroup::new(3).remove(0);
    let e = Trainer::<Mamba<f32>>::new_in_group(
        tiny_config(dir.join("text.txt")),
        dir.join("r3"),
        Box::new(three),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("3 ranks") && e.contains("power of two"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A binary built without MPI, started by a launcher as one of several
/// processes, refuses instead of training the run N times over.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_binary_without_mpi_refuses_to_run_as_one_of_several_ranks() {
    let dir = temp_dir("dp-no-mpi");
    let data = write_text(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_selective"))
        .args(["train", "--steps", "1", "--out"])
        .arg(dir.join("run"))
        .arg("--data")
        .arg(&data)
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("one of 2 processes") && stderr.contains("--features mpi"),
        "{stderr}"
    );
    assert!(!dir.join("run").exists(), "it wrote the run directory");
    let _ = std::fs::remove_dir_all(&dir);
}
