//! The data sets of the DNA and audio experiments (docs/DESIGN.md §16):
//! MAF parsing and the split by region, µ-law, clip fitting, the utterance
//! plan, WAV files; and the two `selective data` commands on the real
//! Debian packages, whose output must equal the committed manifests.
//!
//! The last two need Debian's maffilter-examples, espeak-ng and sox. CI
//! installs them and sets SELECTIVE_DATA_TESTS=require, so that they must
//! run there; on a machine without them they say so and pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use selective::datasets::dna::{read_maf, split_of_region, ApeGenomes, ManifestSource};
use selective::datasets::speech::{
    fit_clip, mulaw_decode, mulaw_encode, plan_utterances, split_of_variant,
};
use selective::io::Wav;

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("selective-datasets-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn mulaw_codes_follow_the_companding_law() {
    // by hand: F(x) = sign(x) ln(1 + 255|x|) / ln 256, code = round((F + 1) / 2 · 255)
    assert_eq!(mulaw_encode(1.0), 255);
    assert_eq!(mulaw_encode(-1.0), 0);
    assert_eq!(mulaw_encode(2.0), 255, "clamped");
    assert_eq!(mulaw_encode(0.5), 239); // 239.152
    assert_eq!(mulaw_encode(-0.5), 16); // 15.848
    assert_eq!(mulaw_encode(0.01), 157); // 156.631
    assert_eq!(mulaw_encode(0.0), 128); // 127.5
    assert!((mulaw_decode(255) - 1.0).abs() < 1e-12);
    assert!((mulaw_decode(0) + 1.0).abs() < 1e-12);
    // codes are monotonic, and decoding undoes encoding to within half a
    // step (1/255) of y = F(x) times the largest |dx/dy| = ln(256)
    // 256^|y| / 255 within it: ln(256) (1 + 255|x|) 256^(1/255) / 255
    let mut last = 0u8;
    for i in 0..=20_000 {
        let x = -1.0 + i as f64 / 10_000.0;
        let code = mulaw_encode(x);
        assert!(code >= last, "not monotonic at {x}");
        last = code;
        let slope = 256f64.ln() * (1.0 + 255.0 * x.abs()) * 256f64.powf(1.0 / 255.0) / 255.0;
        let bound = slope / 255.0 + 1e-12;
        let err = (mulaw_decode(code) - x).abs();
        assert!(
            err <= bound,
            "x {x}: code {code} decodes {} (bound {bound})",
            mulaw_decode(code)
        );
    }
    for code in 0..=255u8 {
        assert_eq!(mulaw_encode(mulaw_decode(code)), code);
    }
}

#[test]
fn clips_are_trimmed_centred_padded_and_cropped_evenly() {
    let speech = [0i16, 3, -2, 0, 100, -200, 300, 5, 0, 0];
    // |x| ≤ 10 is silence: the speech is 100, -200, 300
    let (clip, fit) = fit_clip(&speech, 7, 10);
    assert_eq!(clip, vec![0, 0, 100, -200, 300, 0, 0]);
    assert_eq!((fit.speech_samples, fit.cropped), (3, 0));
    let (clip, fit) = fit_clip(&speech, 2, 10);
    assert_eq!(
        clip,
        vec![100, -200],
        "cropped by 1: none from the start, 1 from the end"
    );
    assert_eq!((fit.speech_samples, fit.cropped), (3, 1));
    let (clip, fit) = fit_clip(&[1, -1, 0], 4, 10);
    assert_eq!(clip, vec![0; 4], "all silence");
    assert_eq!(fit.speech_samples, 0);
}

#[test]
fn utterances_are_split_by_variant_and_reproducible() {
    let accents = vec!["en-us".to_string(), "en-gb".to_string()];
    let variants: Vec<String> = (0..12).rev().map(|i| format!("v{i:02}")).collect();
    let plan = plan_utterances(&accents, &variants, 2, (150, 210), (25, 75), 7).unwrap();
    assert_eq!(plan.len(), 12 * 2 * 10 * 2);
    assert_eq!(
        plan,
        plan_utterances(&accents, &variants, 2, (150, 210), (25, 75), 7).unwrap()
    );
    // variants sorted: v08 (index 8) is validation, v09 test, the rest training
    for u in &plan {
        let index: usize = u.variant[1..].parse().unwrap();
        assert_eq!(u.split, split_of_variant(index));
        assert_eq!(u.voice, format!("{}+{}", u.accent, u.variant));
        assert!((150..=210).contains(&u.speed) && (25..=75).contains(&u.pitch));
    }
    let test: Vec<&str> = plan
        .iter()
        .filter(|u| u.split == 2)
        .map(|u| u.variant.as_str())
        .collect();
    assert!(test.iter().all(|&v| v == "v09"));
    // a test voice is never a training voice, in any accent
    assert!(!plan.iter().any(|u| u.split == 0 && u.variant == "v09"));
    let speeds: std::collections::BTreeSet<u32> = plan.iter().map(|u| u.speed).collect();
    assert!(speeds.len() > 20, "speeds vary: {}", speeds.len());
    let e = plan_utterances(&["en us".into()], &variants, 1, (150, 210), (25, 75), 0).unwrap_err();
    assert!(e.to_string().contains("\"en us\""), "{e}");
    let e = plan_utterances(&accents, &variants, 1, (150, 210), (25, 120), 0).unwrap_err();
    assert!(e.to_string().contains("pitch at most 99"), "{e}");
}

#[test]
fn wav_files_round_trip_and_odd_ones_are_named() {
    let wav = Wav {
        sample_rate: 16_000,
        samples: vec![0, 1, -1, i16::MAX, i16::MIN, 1234],
    };
    let bytes = wav.to_bytes();
    assert_eq!(bytes.len(), 44 + 12);
    assert_eq!(Wav::from_bytes(&bytes, "t.wav").unwrap(), wav);
    // a LIST chunk before the data, and the sizes a streaming writer leaves
    let mut streamed = bytes[..36].to_vec();
    streamed[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    streamed.extend_from_slice(b"LIST");
    streamed.extend_from_slice(&3u32.to_le_bytes());
    streamed.extend_from_slice(b"abc\0"); // 3 bytes and a pad byte
    streamed.extend_from_slice(b"data");
    streamed.extend_from_slice(&u32::MAX.to_le_bytes());
    streamed.extend_from_slice(&bytes[44..]);
    assert_eq!(Wav::from_bytes(&streamed, "s.wav").unwrap(), wav);
    let mut stereo = bytes.clone();
    stereo[22] = 2;
    let e = Wav::from_bytes(&stereo, "stereo.wav")
        .unwrap_err()
        .to_string();
    assert!(e.contains("stereo.wav") && e.contains("2 channels"), "{e}");
    let e = Wav::from_bytes(b"RIFF\0\0\0\0WAVEjunk", "x.wav")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no fmt chunk"), "{e}");
    let e = Wav::from_bytes(b"OggS", "x.ogg").unwrap_err().to_string();
    assert!(e.contains("not a RIFF/WAVE file"), "{e}");
}

/// Three species, rows in varying order, gaps, lower case, an N, and
/// reference positions that fall into regions 0, 1, 8, 9 and 10 of 100 bp.
const SMALL_MAF: &str = "##maf version=1
# a comment
a score=1
s Hsap.22 10 6 + 1000 ACg-TAC
s Ptro.22 20 7 + 900 ACGGTAC
s Ggor.22 30 6 + 800 AC-GTNC

a
s Ptro.22 27 4 + 900 TTTT
s Hsap.22 16 4 + 1000 TTTA
s Ggor.22 36 4 + 800 TTTC

a
s Hsap.22 150 3 + 1000 GGG
s Ggor.22 40 3 + 800 GGR
s Ptro.22 40 3 + 900 GGG

a
s Hsap.22 850 2 + 1000 CC
s Ptro.22 850 2 + 900 CC
s Ggor.22 850 2 + 800 CA

a
s Hsap.22 920 2 + 1000 AA
s Ptro.22 920 2 + 900 AT
s Ggor.22 920 2 + 800 AA

a
s Hsap.22 1010 1 + 1000 G
s Ptro.22 1010 1 + 900 G
s Ggor.22 1010 1 + 800 G
";

#[test]
fn maf_blocks_become_one_sequence_per_species_split_by_region() {
    let blocks = read_maf(SMALL_MAF.as_bytes(), "small.maf").unwrap();
    assert_eq!(blocks.len(), 6);
    assert_eq!(blocks[0].line, 3);
    assert_eq!(blocks[0].rows[0].text, b"ACg-TAC");
    let g = ApeGenomes::from_blocks(&blocks, "Hsap", 100, "small.maf").unwrap();
    assert_eq!(g.species, ["Hsap", "Ptro", "Ggor"]);
    assert_eq!(
        [
            split_of_region(0),
            split_of_region(8),
            split_of_region(9),
            split_of_region(10)
        ],
        [0, 1, 2, 0]
    );
    // training: region 0 (blocks 1-2, one segment), region 1 (block 3),
    // region 10 (block 6); validation: region 8; test: region 9
    assert_eq!(g.blocks, [4, 1, 1]);
    let seg = |split: usize, s: usize| -> Vec<String> {
        g.segments[split][s]
            .iter()
            .map(|x| String::from_utf8(x.clone()).unwrap())
            .collect()
    };
    assert_eq!(seg(0, 0), ["ACGTACTTTA", "GGG", "G"]);
    assert_eq!(seg(0, 1), ["ACGGTACTTTT", "GGG", "G"]);
    assert_eq!(
        seg(0, 2),
        ["ACGTNCTTTC", "GGN", "G"],
        "gaps dropped, lower case raised, R read as N"
    );
    assert_eq!(seg(1, 2), ["CA"]);
    assert_eq!(seg(2, 1), ["AT"]);

    let dir = scratch("small-apes");
    let maf_path = dir.join("small.maf");
    std::fs::write(&maf_path, SMALL_MAF).unwrap();
    let source = ManifestSource::of_file(&maf_path).unwrap();
    let manifest = g.write(&dir.join("out"), &source).unwrap();
    let text = std::fs::read_to_string(dir.join("out/train/Ggor.txt")).unwrap();
    assert_eq!(text, "ACGTNCTTTC\nGGN\nG\n");
    assert_eq!(manifest.splits["train"].species["Ggor"].bases, 14);
    assert_eq!(manifest.splits["train"].species["Ggor"].n_bases, 2);
    assert_eq!(manifest.splits["train"].species["Ggor"].segments, 3);
    for (rel, sha) in &manifest.files {
        let bytes = std::fs::read(dir.join("out").join(rel)).unwrap();
        assert_eq!(&selective::datasets::dna::sha256_hex(&bytes), sha, "{rel}");
    }
    // the SHA-256 of "abc" (FIPS 180-2's example)
    assert_eq!(
        selective::datasets::dna::sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn broken_maf_files_are_errors_that_name_the_line() {
    let cases = [
        (
            "a\ns Hsap.22 1 3 + 10 AC\n",
            "line 2: size 3 but the text has 2 letters",
        ),
        (
            "a\ns Hsap.22 1 3 + 10\n",
            "line 2: an `s` line has 7 fields, this one 6",
        ),
        (
            "s Hsap.22 1 2 + 10 AC\n",
            "line 1: an `s` line outside a block",
        ),
        (
            "a\ns Hsap.22 1 2 + 10 AC\ns Ptro.22 1 3 + 10 ACG\n",
            "line 3: a row of 3 columns in a block of 2",
        ),
        (
            "a\ns Hsap.22 x 2 + 10 AC\n",
            "line 2: start \"x\" is not a number",
        ),
        (
            "a\ns Hsap.22 1 2 * 10 AC\n",
            "line 2: strand \"*\" is not + or -",
        ),
    ];
    for (text, want) in cases {
        let e = read_maf(text.as_bytes(), "bad.maf")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bad.maf: ") && e.contains(want), "{e}");
    }
    let missing = "a\ns Hsap.22 1 2 + 10 AC\ns Ptro.22 1 2 + 10 AC\n\na\ns Hsap.22 5 2 + 10 AC\n";
    let blocks = read_maf(missing.as_bytes(), "m.maf").unwrap();
    let e = ApeGenomes::from_blocks(&blocks, "Hsap", 100, "m.maf")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("block at line 5") && e.contains("one row of each of"),
        "{e}"
    );
    let e = ApeGenomes::from_blocks(&blocks[..1], "Ggor", 100, "m.maf")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no row of the reference species Ggor"), "{e}");
}

/// Whether the data tests must run (CI) or may be skipped here.
fn required() -> bool {
    std::env::var("SELECTIVE_DATA_TESTS").is_ok_and(|v| v == "require")
}

fn selective() -> Command {
    Command::new(env!("CARGO_BIN_EXE_selective"))
}

fn committed_manifest(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/datasets")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const MAF: &str = "/usr/share/doc/maffilter/examples/Gorilla/Compara.epo_5_catarrhini_hsap-projected.chr22.subset.nogap.cleaned_aln.maf.gz";

/// `selective data dna-apes` on Debian's alignment builds exactly the
/// committed manifest: the alignment's hash, every split's counts and every
/// file's SHA-256.
#[test]
fn dna_apes_from_the_debian_alignment_equals_the_committed_manifest() {
    if !Path::new(MAF).exists() {
        assert!(
            !required(),
            "{MAF} is missing: apt-get install maffilter-examples"
        );
        eprintln!("skipped: {MAF} is missing (apt-get install maffilter-examples)");
        return;
    }
    let out = scratch("dna-apes");
    let o = selective()
        .args(["data", "dna-apes"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let want = committed_manifest("dna-apes-manifest.json");
    for key in ["splits", "files", "species", "region_bp", "reference"] {
        assert_eq!(got[key], want[key], "{key}");
    }
    assert_eq!(got["source"]["sha256"], want["source"]["sha256"]);
}

/// `selective data speech-digits` with the first 10 variants builds exactly
/// the committed manifest, and again the same bytes on a second run.
#[test]
fn speech_digits_are_reproducible_and_equal_the_committed_manifest() {
    let have = |p: &str| Command::new(p).arg("--version").output().is_ok();
    if !have("espeak-ng") || !have("sox") {
        assert!(
            !required(),
            "espeak-ng or sox is missing: apt-get install espeak-ng sox"
        );
        eprintln!("skipped: espeak-ng or sox is missing (apt-get install espeak-ng sox)");
        return;
    }
    let run = |name: &str| {
        let out = scratch(name);
        let o = selective()
            .args(["data", "speech-digits"])
            .arg(&out)
            .args(["--max-variants", "10", "--threads", "2"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = std::fs::read_to_string(out.join("manifest.json")).unwrap();
        let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
        (out, manifest)
    };
    let (out, a) = run("speech-a");
    let (_, b) = run("speech-b");
    assert_eq!(a["files"], b["files"], "two runs, the same bytes");
    let want = committed_manifest("speech-digits-10-manifest.json");
    for key in ["files", "clips", "variants", "accents", "cropped_clips"] {
        assert_eq!(a[key], want[key], "{key}");
    }
    // 800 clips: 8 accents x 10 variants x 10 digits, a row of 16000 bytes each
    let train = std::fs::read(out.join("train/clips.mulaw")).unwrap();
    assert_eq!(train.len(), 640 * 16_000);
    let wav = Wav::read(&out.join("examples/seven-en-gb_Gene.wav")).unwrap();
    assert_eq!((wav.sample_rate, wav.samples.len()), (16_000, 16_000));
}
