//! `selective pretrain` and `selective classify` end to end on small
//! synthetic sets written in the layout of `selective data` (the real sets
//! need Debian packages; tests/datasets.rs checks those): each task here
//! has a known answer that a model must find to pass, so a broken loss,
//! gradient or data path fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use selective::datasets::dna::ManifestSource;
use selective::datasets::speech::write_speech_set;
use selective::datasets::{plan_utterances, ApeGenomes, ClipFit};
use selective::io::Wav;
use selective::rng::Rng;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("selective-seqcli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn selective(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_selective"))
        .args(args)
        .output()
        .unwrap()
}

fn results(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap()
}

/// Two species: "Hsap" repeats ACGT with 10% of the letters replaced at
/// random (next-nucleotide loss near 0.4 nats once learned, against ln 5 =
/// 1.61 for a uniform guess); "Ptro" draws A with probability 0.55 and C,
/// G, T, N with 0.1125 each, so that a window's composition tells the
/// species.
fn synthetic_apes(dir: &Path) {
    let mut rng = Rng::new(7);
    let letters = b"ACGTN";
    let mut periodic = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|i| {
                if rng.uniform() < 0.1 {
                    letters[rng.below(5)]
                } else {
                    letters[i % 4]
                }
            })
            .collect()
    };
    let human: Vec<Vec<Vec<u8>>> = vec![
        vec![periodic(30_000), periodic(10_000)],
        vec![periodic(6_000)],
        vec![periodic(6_000)],
    ];
    let mut rng = Rng::new(8);
    let mut a_rich = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                if rng.uniform() < 0.55 {
                    b'A'
                } else {
                    letters[1 + rng.below(4)]
                }
            })
            .collect()
    };
    let chimp: Vec<Vec<Vec<u8>>> = vec![
        vec![a_rich(30_000), a_rich(10_000)],
        vec![a_rich(6_000)],
        vec![a_rich(6_000)],
    ];
    let segments = (0..3)
        .map(|s| vec![human[s].clone(), chimp[s].clone()])
        .collect();
    let genomes = ApeGenomes {
        species: vec!["Hsap".into(), "Ptro".into()],
        reference: "Hsap".into(),
        region_bp: 1000,
        segments,
        blocks: [2, 1, 1],
    };
    let source = ManifestSource {
        path: "synthetic".into(),
        sha256: String::new(),
        bytes: 0,
    };
    genomes.write(dir, &source).unwrap();
}

#[test]
fn pretrain_learns_a_periodic_genome_and_classify_tells_two_species_apart() {
    let data = scratch("apes");
    synthetic_apes(&data);
    let d = data.to_str().unwrap();

    let out = scratch("pretrain");
    let o = selective(&[
        "pretrain",
        d,
        "--out",
        out.to_str().unwrap(),
        "--d-model",
        "16",
        "--n-layer",
        "1",
        "--seq-len",
        "64",
        "--batch",
        "8",
        "--steps",
        "60",
        "--eval-every",
        "30",
        "--lr",
        "1e-2",
        "--eval-tokens",
        "2048",
        "--test-tokens",
        "4096",
        "--threads",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = results(&out);
    let nats = r["test_nats_per_token"].as_f64().unwrap();
    eprintln!("periodic genome: test loss {nats:.4} nats per token");
    assert!(
        nats < 0.9,
        "test loss {nats} nats: the period was not learned"
    );
    // one held-out stretch, the test split's only segment (6,000 bases),
    // read in windows of 64: every base after the first predicted once
    assert_eq!(r["test_tokens"].as_u64().unwrap(), 5999);
    assert!(out.join("model/task-model.json").exists());

    for (init, lr) in [(None, "1e-2"), (Some(out.join("model")), "5e-3")] {
        let cls = scratch(if init.is_some() {
            "finetune"
        } else {
            "scratch"
        });
        let mut args = vec![
            "classify".to_string(),
            d.into(),
            "--out".into(),
            cls.to_str().unwrap().into(),
            "--window".into(),
            "64".into(),
            "--batch".into(),
            "16".into(),
            "--steps".into(),
            "40".into(),
            "--eval-every".into(),
            "20".into(),
            "--lr".into(),
            lr.into(),
            "--test-windows".into(),
            "32".into(),
            "--threads".into(),
            "1".into(),
        ];
        if let Some(init) = &init {
            args.extend(["--init".to_string(), init.to_str().unwrap().to_string()]);
        } else {
            args.extend(["--d-model", "16", "--n-layer", "1"].map(String::from));
        }
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let o = selective(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = results(&cls);
        let acc = r["test_accuracy"].as_f64().unwrap();
        eprintln!("two species, init {init:?}: test accuracy {acc}");
        assert_eq!(r["test_sequences"].as_u64().unwrap(), 64);
        assert_eq!(r["chance_accuracy"].as_f64().unwrap(), 0.5);
        assert!(acc > 0.9, "init {init:?}: test accuracy {acc}");
        assert!(cls.join("model/classifier.json").exists());
    }

    // refusals that name the problem
    let cls = scratch("refused");
    let c = cls.to_str().unwrap();
    let refused = |args: &[&str], says: &str| {
        let o = selective(args);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(says), "{args:?}: {e}");
    };
    refused(
        &["classify", d, "--out", c, "--layer", "attention"],
        "S6 or S4D",
    );
    refused(
        &["classify", d, "--out", c, "--input", "vectors"],
        "DNA is read as tokens",
    );
    refused(
        &["classify", d, "--out", c, "--window", "7000"],
        "no segment of the val split holds a window of 7000",
    );
    refused(&["pretrain", c, "--out", c], "manifest.json");
    for dir in [data, out] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Ten "voices", each saying ten "digits" as 256-sample clips: a digit is
/// a tone of (digit + 1) · 2 cycles per clip, at a random phase and
/// loudness. A classifier reading the samples as real values must tell
/// the tones apart on the held-out voices; a µ-law model trained on them
/// generates WAV clips.
#[test]
fn classify_reads_real_valued_samples_and_pretrain_writes_wav_clips() {
    let data = scratch("speech");
    let variants: Vec<String> = (0..10).map(|i| format!("v{i}")).collect();
    let accents = vec!["xx".to_string()];
    let plan = plan_utterances(&accents, &variants, 2, (150, 150), (50, 50), 3).unwrap();
    let mut rng = Rng::new(5);
    let n = 256;
    let clips: Vec<(Vec<i16>, ClipFit)> = plan
        .iter()
        .map(|u| {
            let cycles = (u.digit as f64 + 1.0) * 2.0;
            let phase = rng.uniform() * std::f64::consts::TAU;
            let amp = 8000.0 + 16000.0 * rng.uniform();
            let s = (0..n)
                .map(|t| {
                    let x = (std::f64::consts::TAU * cycles * t as f64 / n as f64 + phase).sin();
                    (amp * x) as i16
                })
                .collect();
            (
                s,
                ClipFit {
                    speech_samples: n,
                    cropped: 0,
                },
            )
        })
        .collect();
    write_speech_set(&data, &plan, &clips, 16_000, n, &accents, "tones", 3).unwrap();
    let d = data.to_str().unwrap();

    let cls = scratch("tones");
    let o = selective(&[
        "classify",
        d,
        "--out",
        cls.to_str().unwrap(),
        "--input",
        "vectors",
        "--d-model",
        "16",
        "--n-layer",
        "2",
        "--batch",
        "16",
        "--steps",
        "150",
        "--eval-every",
        "50",
        "--lr",
        "1e-2",
        "--eval-windows",
        "2",
        "--test-windows",
        "2",
        "--threads",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = results(&cls);
    assert_eq!(r["test_sequences"].as_u64().unwrap(), 20);
    assert_eq!(r["model"]["input"]["vectors"]["width"].as_u64().unwrap(), 1);
    let acc = r["test_accuracy"].as_f64().unwrap();
    eprintln!("tones: test accuracy {acc}");
    assert!(acc >= 0.6, "test accuracy {acc} (chance 0.1)");

    let lm = scratch("tones-lm");
    let o = selective(&[
        "pretrain",
        d,
        "--out",
        lm.to_str().unwrap(),
        "--d-model",
        "16",
        "--n-layer",
        "1",
        "--seq-len",
        "128",
        "--batch",
        "4",
        "--steps",
        "20",
        "--eval-every",
        "20",
        "--eval-tokens",
        "1024",
        "--test-tokens",
        "1024",
        "--generate",
        "2",
        "--generate-samples",
        "300",
        "--threads",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = results(&lm);
    let bits = r["test_bits_per_token"].as_f64().unwrap();
    assert!(bits > 0.0 && bits < 8.0, "{bits} bits per sample");
    assert_eq!(r["generated"].as_array().unwrap().len(), 2);
    let wav = Wav::read(&lm.join("generated-1.wav")).unwrap();
    assert_eq!((wav.sample_rate, wav.samples.len()), (16_000, 300));
    let o = selective(&[
        "pretrain",
        d,
        "--out",
        lm.to_str().unwrap(),
        "--seq-len",
        "256",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("longer than a clip (256 samples)"),
        "{e}"
    );
    for dir in [data, cls, lm] {
        let _ = std::fs::remove_dir_all(dir);
    }
}
