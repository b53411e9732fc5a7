//! `TorchCheckpoint`: PyTorch `torch.save` zip checkpoints, read without
//! PyTorch. The fixtures in tests/data/torch/ and their expected values
//! (expected.json) come from scripts/make_torch_fixtures.py.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use selective::io::torch::TorchCheckpoint;
use selective::io::{DType, TensorSource};
use selective::Error;
use serde_json::Value;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch")
}

fn expected() -> BTreeMap<String, Value> {
    let text = std::fs::read_to_string(data_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn dtype_of(name: &str) -> DType {
    match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        other => panic!("dtype {other}"),
    }
}

/// The error's text, checked to name `file`.
fn err_naming(e: Error, file: &str) -> String {
    let text = e.to_string();
    assert!(text.contains(file), "error {text:?} does not name {file}");
    text
}

#[test]
fn fixtures_match_expected_values_exactly() {
    let expected = expected();
    assert!(expected.len() >= 7);
    for (file, want) in &expected {
        let path = data_dir().join(file);
        let ck = TorchCheckpoint::open(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(ck.file(), path.display().to_string());
        let tensors = want["tensors"].as_object().unwrap();
        let want_names: Vec<String> = tensors.keys().cloned().collect(); // sorted
        assert_eq!(ck.names(), want_names, "{file}: names");
        for (name, t) in tensors {
            let got = ck.tensor(name).unwrap().unwrap();
            assert_eq!(
                got.dtype,
                dtype_of(t["dtype"].as_str().unwrap()),
                "{file} {name}"
            );
            let shape: Vec<usize> = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(got.shape, shape, "{file} {name}: shape");
            assert_eq!(
                hex(&got.bytes),
                t["hex"].as_str().unwrap(),
                "{file} {name}: values"
            );
            // The bytes convert through the library's own path too.
            let v: Vec<f64> = got.to_vec(ck.file(), name).unwrap();
            assert_eq!(v.len(), shape.iter().product::<usize>());
        }
        // Non-float tensors are skipped: not listed, and an error by name.
        let skipped: Vec<String> = want["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        let got_skipped: Vec<String> = ck.skipped().into_iter().map(|(n, _)| n).collect();
        assert_eq!(got_skipped, skipped, "{file}: skipped");
        for name in &skipped {
            let e = ck.tensor(name).expect_err("a skipped tensor is an error");
            let text = err_naming(e, file);
            assert!(text.contains("int64"), "{text}");
        }
        assert!(ck.tensor("no.such.tensor").unwrap().is_none());
    }
}

#[test]
fn views_share_one_storage() {
    let ck = TorchCheckpoint::open(data_dir().join("views.bin")).unwrap();
    let get = |n: &str| {
        let t = ck.tensor(n).unwrap().unwrap();
        (
            t.shape.clone(),
            t.to_vec::<f32>("views.bin", n).unwrap(),
            matches!(t.bytes, Cow::Borrowed(_)),
        )
    };
    let (ws, w, w_borrowed) = get("w");
    assert_eq!(ws, [5, 7]);
    assert!(w_borrowed, "a contiguous tensor is borrowed from the file");
    let at = |i: usize, j: usize| w[i * 7 + j];
    let (ts, tied, _) = get("tied");
    assert_eq!((ts, tied), (ws.clone(), w.clone()));
    let (s, wt, wt_borrowed) = get("wt");
    assert_eq!(s, [7, 5]);
    assert!(!wt_borrowed, "a transposed view is gathered");
    for i in 0..7 {
        for j in 0..5 {
            assert_eq!(wt[i * 5 + j], at(j, i));
        }
    }
    let (s, row, _) = get("row");
    assert_eq!(s, [7]);
    assert_eq!(row, (0..7).map(|j| at(2, j)).collect::<Vec<_>>());
    let (s, col, _) = get("col");
    assert_eq!(s, [5]);
    assert_eq!(col, (0..5).map(|i| at(i, 3)).collect::<Vec<_>>());
    let (s, block, _) = get("block");
    assert_eq!(s, [3, 4]);
    let want: Vec<f32> = (1..4)
        .flat_map(|i| (2..6).map(move |j| (i, j)))
        .map(|(i, j)| at(i, j))
        .collect();
    assert_eq!(block, want);
    let (s, step, _) = get("step");
    assert_eq!(s, [3, 3]);
    let want: Vec<f32> = [0, 2, 4]
        .iter()
        .flat_map(|&i| [0, 3, 6].map(|j| at(i, j)))
        .collect();
    assert_eq!(step, want);
    let (s, elem, _) = get("elem");
    assert_eq!((s, elem), (vec![], vec![at(4, 6)]));
}

#[test]
fn nested_dicts_join_keys_with_dots() {
    let ck = TorchCheckpoint::open(data_dir().join("nested.bin")).unwrap();
    assert_eq!(
        ck.names(),
        [
            "model.backbone.weight",
            "model.sub.bias",
            "model.sub.deeper.t"
        ]
    );
    assert_eq!(
        ck.skipped(),
        [("extra.ids".to_string(), "int64".to_string())]
    );
}

#[test]
fn unsupported_files_give_errors_naming_the_file() {
    let dir = data_dir();
    let cases = [
        ("legacy.bin", "legacy"),
        ("bigendian.bin", "big-endian"),
        ("unknown_global.bin", "fractions.Fraction"),
        ("expected.json", "not a zip archive"),
    ];
    for (file, what) in cases {
        let e = TorchCheckpoint::open(dir.join(file))
            .err()
            .unwrap_or_else(|| panic!("{file} opened"));
        assert!(matches!(e, Error::Format { .. }), "{file}: {e:?}");
        let text = err_naming(e, file);
        println!("{text}");
        assert!(text.contains(what), "{file}: {text}");
    }
    let e = TorchCheckpoint::open(dir.join("missing.bin"))
        .err()
        .unwrap();
    assert!(matches!(e, Error::Io { .. }));
    err_naming(e, "missing.bin");
    let e = TorchCheckpoint::from_bytes("empty.bin", Vec::new())
        .err()
        .unwrap();
    err_naming(e, "empty.bin");
}

#[test]
fn truncated_files_give_errors() {
    let tmp = std::env::temp_dir().join(format!("selective-torch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for file in ["f32.bin", "views.bin", "bf16.bin"] {
        let full = std::fs::read(data_dir().join(file)).unwrap();
        for len in 0..full.len() {
            let name = format!("{file}[..{len}]");
            let e = TorchCheckpoint::from_bytes(name.clone(), full[..len].to_vec())
                .err()
                .unwrap_or_else(|| panic!("{name} opened"));
            err_naming(e, &name);
        }
        // Through the file system, the error names the path.
        for len in [0, 1, 100, full.len() / 2, full.len() - 1] {
            let path = tmp.join(format!("cut{len}-{file}"));
            std::fs::write(&path, &full[..len]).unwrap();
            let e = TorchCheckpoint::open(&path).err().unwrap();
            err_naming(e, &path.display().to_string());
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Opens `bytes`; if that works, reads every tensor and checks it is
/// self-consistent. Returns whether everything read cleanly.
fn open_and_read_all(name: &str, bytes: Vec<u8>) -> bool {
    let Ok(ck) = TorchCheckpoint::from_bytes(name, bytes) else {
        return false;
    };
    let mut all_ok = true;
    for n in ck.names() {
        match ck.tensor(&n) {
            Ok(Some(t)) => {
                let numel: usize = t.shape.iter().product();
                assert_eq!(t.bytes.len(), numel * t.dtype.size(), "{name} {n}");
            }
            Ok(None) => panic!("{name}: listed tensor {n} missing"),
            Err(_) => all_ok = false,
        }
    }
    for (n, _) in ck.skipped() {
        assert!(ck.tensor(&n).is_err());
    }
    all_ok
}

fn u16_at(b: &[u8], i: usize) -> usize {
    u16::from_le_bytes([b[i], b[i + 1]]) as usize
}

/// Byte range of `<prefix>/data.pkl` and the file with that entry's CRC-32
/// set to 0 ("not computed") in both zip headers, so that flipped bytes
/// reach the pickle interpreter instead of failing the CRC check.
fn without_pkl_crc(full: &[u8]) -> (std::ops::Range<usize>, Vec<u8>) {
    let mut out = full.to_vec();
    // torch.save writes data.pkl first.
    assert_eq!(&full[..4], b"PK\x03\x04");
    let name_len = u16_at(full, 26);
    assert!(full[30..30 + name_len].ends_with(b"/data.pkl"));
    let start = 30 + name_len + u16_at(full, 28);
    let size = u32::from_le_bytes(full[22..26].try_into().unwrap()) as usize;
    out[14..18].fill(0);
    let mut patched_central = false;
    for i in 0..full.len() - 46 {
        if &full[i..i + 4] == b"PK\x01\x02" {
            let n = u16_at(full, i + 28);
            if full[i + 46..i + 46 + n].ends_with(b"/data.pkl") {
                out[i + 16..i + 20].fill(0);
                patched_central = true;
            }
        }
    }
    assert!(patched_central);
    (start..start + size, out)
}

#[test]
fn corrupted_bytes_never_panic() {
    let mut opened = 0;
    let mut rejected = 0;
    for file in ["f32.bin", "views.bin", "nested.bin"] {
        let full = std::fs::read(data_dir().join(file)).unwrap();
        // Anywhere in the file, CRCs intact.
        for i in 0..full.len() {
            let mut b = full.clone();
            b[i] ^= 0xff;
            if open_and_read_all(file, b) {
                opened += 1;
            } else {
                rejected += 1;
            }
        }
        // In data.pkl, with its CRC disabled so the pickle itself is fuzzed.
        let (pkl, base) = without_pkl_crc(&full);
        assert!(
            open_and_read_all(file, base.clone()),
            "{file}: CRC 0 means not computed"
        );
        for i in pkl.clone() {
            for mask in [0x01u8, 0x02, 0x10, 0x80, 0xff] {
                let mut b = base.clone();
                b[i] ^= mask;
                if open_and_read_all(file, b) {
                    opened += 1;
                } else {
                    rejected += 1;
                }
            }
            for value in [0u8, b'(', b'.', b'q', b'h', b'R', b'Q', b'u', 0x7f, 0xff] {
                let mut b = base.clone();
                b[i] = value;
                if open_and_read_all(file, b) {
                    opened += 1;
                } else {
                    rejected += 1;
                }
            }
        }
        // The pickle truncated inside the archive.
        for cut in pkl.clone() {
            let mut b = base.clone();
            b[cut..pkl.end].fill(b'N');
            if cut + 1 < pkl.end {
                b[cut] = b'(';
            }
            open_and_read_all(file, b);
        }
    }
    println!("byte flips: {opened} opened cleanly, {rejected} rejected");
    assert!(rejected > 0 && opened > 0);
}

#[test]
fn checkpoint_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<TorchCheckpoint>();
}

/// The official (state-spaces) layout of a tiny Mamba, written by
/// scripts/make_model_reference.py: `lm_head.weight` tied to the embedding.
#[test]
fn tiny_original_checkpoint_lists_the_mamba_names() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/models/tiny-original/pytorch_model.bin");
    if !path.exists() {
        eprintln!("skipping: {} not present", path.display());
        return;
    }
    let ck = TorchCheckpoint::open(&path).unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(path.with_file_name("config.json")).unwrap())
            .unwrap();
    let n_layer = config["n_layer"].as_u64().unwrap() as usize;
    let d_model = config["d_model"].as_u64().unwrap() as usize;
    let ssm = &config["ssm_cfg"];
    let d_state = ssm["d_state"].as_u64().unwrap() as usize;
    let d_conv = ssm["d_conv"].as_u64().unwrap() as usize;
    let d_inner = ssm["expand"].as_u64().unwrap() as usize * d_model;
    let dt_rank = ssm["dt_rank"].as_u64().unwrap() as usize;
    let multiple = config["pad_vocab_size_multiple"].as_u64().unwrap() as usize;
    let vocab = (config["vocab_size"].as_u64().unwrap() as usize).div_ceil(multiple) * multiple;

    let mut want: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    want.insert("backbone.embedding.weight".into(), vec![vocab, d_model]);
    want.insert("backbone.norm_f.weight".into(), vec![d_model]);
    want.insert("lm_head.weight".into(), vec![vocab, d_model]);
    for l in 0..n_layer {
        let p = format!("backbone.layers.{l}.");
        for (n, s) in [
            ("mixer.A_log", vec![d_inner, d_state]),
            ("mixer.D", vec![d_inner]),
            ("mixer.in_proj.weight", vec![2 * d_inner, d_model]),
            ("mixer.conv1d.weight", vec![d_inner, 1, d_conv]),
            ("mixer.conv1d.bias", vec![d_inner]),
            ("mixer.x_proj.weight", vec![dt_rank + 2 * d_state, d_inner]),
            ("mixer.dt_proj.weight", vec![d_inner, dt_rank]),
            ("mixer.dt_proj.bias", vec![d_inner]),
            ("mixer.out_proj.weight", vec![d_model, d_inner]),
            ("norm.weight", vec![d_model]),
        ] {
            want.insert(format!("{p}{n}"), s);
        }
    }
    assert_eq!(ck.names(), want.keys().cloned().collect::<Vec<_>>());
    for (name, shape) in &want {
        let t = ck.tensor(name).unwrap().unwrap();
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(t.dtype, DType::F32, "{name}");
    }
    let emb = ck.tensor("backbone.embedding.weight").unwrap().unwrap();
    let head = ck.tensor("lm_head.weight").unwrap().unwrap();
    assert_eq!(emb.bytes, head.bytes, "tied head");
}
