//! Writes the seed corpus: every seed of `selective::fuzzing::seeds` to
//! fuzz/corpus/<target>/seed-<i> (i counting per target), and the
//! pytorch_model.bin test files (tests/data/torch/*.bin) to
//! fuzz/corpus/torch_checkpoint/. Not a fuzz target: run it with
//! `cargo run --release --example make_seeds` from fuzz/, without the
//! fuzzing flags. It also fails if a target of `selective::fuzzing::TARGETS`
//! has no fuzz_targets/<target>.rs, so that a target added to the library
//! is not silently left unfuzzed.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("make_seeds: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = fuzz_dir.join("corpus");
    let scratch = std::env::temp_dir().join(format!("selective-make-seeds-{}", std::process::id()));
    fs::create_dir_all(&scratch)?;
    let seeds = selective::fuzzing::seeds(&scratch);
    let _ = fs::remove_dir_all(&scratch);
    let seeds = seeds?;

    let missing: Vec<&str> = selective::fuzzing::TARGETS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !fuzz_dir.join("fuzz_targets").join(format!("{name}.rs")).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "selective::fuzzing::TARGETS has no fuzz target for {missing:?}: add \
             fuzz_targets/<name>.rs and a [[bin]] for each to fuzz/Cargo.toml"
        )
        .into());
    }
    for (name, _) in selective::fuzzing::TARGETS {
        fs::create_dir_all(corpus.join(name))?;
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (name, bytes) in &seeds {
        let i = counts.entry(name).or_insert(0);
        let path = corpus.join(name).join(format!("seed-{i}"));
        fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        *i += 1;
    }

    let torch_dir = fuzz_dir.join("../tests/data/torch");
    let mut torch: Vec<PathBuf> = fs::read_dir(&torch_dir)
        .map_err(|e| format!("{}: {e}", torch_dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
        .collect();
    torch.sort();
    for path in &torch {
        let to = corpus.join("torch_checkpoint").join(path.file_name().unwrap_or_default());
        fs::copy(path, &to).map_err(|e| format!("{} -> {}: {e}", path.display(), to.display()))?;
    }
    *counts.entry("torch_checkpoint").or_insert(0) += torch.len();

    for (name, _) in selective::fuzzing::TARGETS {
        println!("{name}: {} seeds", counts.get(name).copied().unwrap_or(0));
    }
    println!("corpus written to {}", corpus.display());
    Ok(())
}
