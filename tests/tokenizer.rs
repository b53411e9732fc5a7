//! Tokenizers: GPT-NeoX and bytes round trips, the end-of-text id, and which
//! tokenizer a model directory gets.

use std::path::{Path, PathBuf};

use selective::generate::tokenizer::Tokenizer;

fn gpt_neox_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/gpt-neox-20b-tokenizer.json")
}

const TEXTS: [&str; 5] = [
    "Hello, world!",
    "café 日本語 🦀",
    "",
    "  two spaces\nnew line\ttab",
    "The quick brown fox jumps over the lazy dog.",
];

#[test]
fn gpt_neox_round_trips_and_knows_its_end_of_text() {
    let tokenizer = Tokenizer::from_file(gpt_neox_path()).unwrap();
    assert!(matches!(tokenizer, Tokenizer::HuggingFace(_)));
    for text in TEXTS {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    }
    assert_eq!(tokenizer.encode("Hello").unwrap(), vec![12092]);
    assert_eq!(tokenizer.eos_token_id(), Some(0));
    assert_eq!(tokenizer.decode(&[0]).unwrap(), "<|endoftext|>");
    assert_eq!(tokenizer.vocab_size(), 50277);
}

#[test]
fn bytes_round_trip_and_decode_lossily() {
    let bytes = Tokenizer::Bytes;
    for text in TEXTS {
        let ids = bytes.encode(text).unwrap();
        let expected: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, expected);
        assert_eq!(bytes.decode(&ids).unwrap(), text);
    }
    assert_eq!(bytes.encode("é").unwrap(), vec![0xC3, 0xA9]);
    assert_eq!(
        bytes.decode(&[b'a' as u32, 0xFF, b'b' as u32]).unwrap(),
        "a\u{FFFD}b"
    );
    // A truncated character.
    assert_eq!(bytes.decode(&[0xC3]).unwrap(), "\u{FFFD}");
    assert!(bytes.decode(&[256]).is_err());
    assert_eq!(bytes.eos_token_id(), None);
    assert_eq!(bytes.vocab_size(), 256);
}

/// A fresh empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "selective-tokenizer-test-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn write(&self, file: &str, contents: &str) {
        std::fs::write(self.0.join(file), contents).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CONFIG: &str = r#"{"d_model": 64, "n_layer": 2, "vocab_size": 256"#;

#[test]
fn model_directory_rule() {
    // tokenizer.json wins, even over a config asking for bytes.
    let dir = TempDir::new("hf");
    std::fs::copy(gpt_neox_path(), dir.0.join("tokenizer.json")).unwrap();
    dir.write(
        "config.json",
        &format!(r#"{CONFIG}, "tokenizer": "bytes"}}"#),
    );
    let found = Tokenizer::for_model_dir(&dir.0).unwrap().unwrap();
    assert!(matches!(found, Tokenizer::HuggingFace(_)));
    assert_eq!(found.eos_token_id(), Some(0));

    let dir = TempDir::new("bytes");
    dir.write(
        "config.json",
        &format!(r#"{CONFIG}, "tokenizer": "bytes"}}"#),
    );
    let found = Tokenizer::for_model_dir(&dir.0).unwrap().unwrap();
    assert!(matches!(found, Tokenizer::Bytes));

    // A config without the key, or no config at all: no tokenizer.
    let dir = TempDir::new("plain");
    dir.write("config.json", &format!("{CONFIG}}}"));
    assert!(Tokenizer::for_model_dir(&dir.0).unwrap().is_none());
    let dir = TempDir::new("empty");
    assert!(Tokenizer::for_model_dir(&dir.0).unwrap().is_none());

    // An unknown tokenizer name or a broken config is an error, not "none".
    let dir = TempDir::new("unknown");
    dir.write("config.json", &format!(r#"{CONFIG}, "tokenizer": "spm"}}"#));
    let err = Tokenizer::for_model_dir(&dir.0).err().unwrap().to_string();
    assert!(err.contains("spm"), "{err}");
    let dir = TempDir::new("broken");
    dir.write("config.json", "{not json");
    assert!(Tokenizer::for_model_dir(&dir.0).is_err());
    // A broken tokenizer.json is an error too.
    let dir = TempDir::new("broken-hf");
    dir.write("tokenizer.json", "{}");
    assert!(Tokenizer::for_model_dir(&dir.0).is_err());
}

#[test]
fn char_vocabularies_round_trip_and_read_from_config() {
    use selective::generate::tokenizer::CharVocab;
    let vocab = CharVocab::from_text("hello, world\n").unwrap();
    assert_eq!(vocab.as_string(), "\n ,dehlorw");
    let tok = Tokenizer::Chars(vocab);
    let ids = tok.encode("world, hello\n").unwrap();
    assert_eq!(ids, vec![9, 7, 8, 6, 3, 2, 1, 5, 4, 6, 6, 7, 0]);
    assert_eq!(tok.decode(&ids).unwrap(), "world, hello\n");
    assert!(CharVocab::from_text("").is_err());
    assert!(CharVocab::new(vec!['a', 'b', 'a'])
        .unwrap_err()
        .to_string()
        .contains("twice"));

    let dir = TempDir::new("chars-config");
    std::fs::write(
        dir.0.join("config.json"),
        r#"{"tokenizer": {"chars": "ba"}}"#,
    )
    .unwrap();
    let found = Tokenizer::for_model_dir(&dir.0).unwrap().unwrap();
    assert_eq!(found.encode("ab").unwrap(), vec![1, 0]);
    std::fs::write(dir.0.join("config.json"), r#"{"tokenizer": {"chars": 5}}"#).unwrap();
    let err = Tokenizer::for_model_dir(&dir.0).err().unwrap().to_string();
    assert!(
        err.contains("config.json") && err.contains("string"),
        "{err}"
    );
    std::fs::write(
        dir.0.join("config.json"),
        r#"{"tokenizer": {"chars": "aa"}}"#,
    )
    .unwrap();
    assert!(Tokenizer::for_model_dir(&dir.0)
        .err()
        .unwrap()
        .to_string()
        .contains("twice"));
}
