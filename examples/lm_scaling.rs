//! Gathers the language runs of scripts/lm_compare.sh (Mamba against the
//! Transformer++ on Tiny Shakespeare, docs/RESULTS.md "Language") into one
//! table, a JSON summary and the scaling plots:
//!
//! ```sh
//! cargo run --release --example lm_scaling -- runs/lm docs/results/lm
//! ```
//!
//! For every run directory holding score-256.json it reads the run's
//! settings (config.json), the model's config.json, the last training line
//! of metrics.jsonl, time.txt and the held-out scores, and counts the
//! parameters and the training FLOPs (docs/DESIGN.md §15.8) from the model's
//! configuration. Writes OUT/summary.json, OUT/lm-{char,bpe}-{params,flops}.png
//! and prints the table in Markdown. Runs of the learning-rate check
//! (named NAME-lrLR) are in the table and the JSON, not in the plots.

use std::path::{Path, PathBuf};

use selective::nn::{Architecture, MambaConfig, TransformerConfig};
use selective::plot::{write_png, Chart, Series};

#[derive(serde::Serialize)]
struct Run {
    name: String,
    tokenizer: &'static str,
    arch: &'static str,
    d_model: usize,
    n_layer: usize,
    params: usize,
    non_embedding_params: usize,
    train_tokens: u64,
    train_flops: f64,
    train_seconds: f64,
    tokens_per_second: f64,
    /// the trainer's estimate at its last evaluation (10 batches)
    val_loss_estimate: f64,
    /// the whole held-out split in windows of 256 and of 1024 tokens
    val_nll_256: f64,
    val_nll_1024: f64,
    val_tokens: u64,
    lr: f64,
    batch_size: u64,
    seq_len: u64,
    steps: u64,
}

fn fail(message: String) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

fn read_json(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| fail(format!("{}: {e}", path.display())));
    serde_json::from_str(&text).unwrap_or_else(|e| fail(format!("{}: {e}", path.display())))
}

fn number(v: &serde_json::Value, key: &str, path: &Path) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| fail(format!("{}: no number {key}", path.display())))
}

fn read_run(dir: &Path) -> Run {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let settings = read_json(&dir.join("config.json"));
    let model_config_path = dir.join("model/config.json");
    let model_text = std::fs::read_to_string(&model_config_path)
        .unwrap_or_else(|e| fail(format!("{}: {e}", model_config_path.display())));
    let source = model_config_path.display().to_string();
    let seq_len = settings["seq_len"].as_u64().unwrap_or(0);
    let arch =
        Architecture::of_config(&model_text, &source).unwrap_or_else(|e| fail(e.to_string()));
    let (arch_name, d_model, n_layer, params, non_embedding, flops_per_token) = match arch {
        Architecture::Mamba | Architecture::Mamba2 => {
            let (c, _) = MambaConfig::from_json_str(&model_text, &source)
                .unwrap_or_else(|e| fail(e.to_string()));
            (
                if c.ssd.is_some() { "mamba2" } else { "mamba" },
                c.d_model,
                c.n_layer,
                c.n_params(),
                c.n_non_embedding_params(),
                c.training_flops_per_token(),
            )
        }
        Architecture::Transformer => {
            let c = TransformerConfig::from_json_str(&model_text, &source)
                .unwrap_or_else(|e| fail(e.to_string()));
            (
                "transformer",
                c.d_model,
                c.n_layer,
                c.n_params(),
                c.n_non_embedding_params(),
                c.training_flops_per_token(seq_len as usize),
            )
        }
    };
    let metrics_path = dir.join("metrics.jsonl");
    let metrics = std::fs::read_to_string(&metrics_path)
        .unwrap_or_else(|e| fail(format!("{}: {e}", metrics_path.display())));
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let last_train = lines
        .iter()
        .rev()
        .find(|l| l.get("tokens").is_some())
        .unwrap_or_else(|| fail(format!("{}: no training line", metrics_path.display())));
    let last_val = lines
        .iter()
        .rev()
        .find(|l| l.get("val_loss").is_some())
        .unwrap_or_else(|| fail(format!("{}: no validation line", metrics_path.display())));
    let tokens = last_train["tokens"].as_u64().unwrap_or(0);
    let time_path = dir.join("time.txt");
    let train_seconds: f64 = std::fs::read_to_string(&time_path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| fail(format!("{}: no seconds", time_path.display())));
    let s256 = read_json(&dir.join("score-256.json"));
    let s1024 = read_json(&dir.join("score-1024.json"));
    Run {
        name,
        tokenizer: if settings["char_vocab"].as_bool() == Some(true) {
            "char"
        } else {
            "bpe"
        },
        arch: arch_name,
        d_model,
        n_layer,
        params,
        non_embedding_params: non_embedding,
        train_tokens: tokens,
        train_flops: flops_per_token * tokens as f64,
        train_seconds,
        tokens_per_second: number(last_train, "tokens_per_second", &metrics_path),
        val_loss_estimate: number(last_val, "val_loss", &metrics_path),
        val_nll_256: number(&s256, "mean_nll", &dir.join("score-256.json")),
        val_nll_1024: number(&s1024, "mean_nll", &dir.join("score-1024.json")),
        val_tokens: s256["tokens"].as_u64().unwrap_or(0),
        lr: settings["lr"].as_f64().unwrap_or(0.0),
        batch_size: settings["batch_size"].as_u64().unwrap_or(0),
        seq_len,
        steps: settings["steps"].as_u64().unwrap_or(0),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 {
        eprintln!("usage: lm_scaling RUNS_DIR OUT_DIR");
        std::process::exit(2);
    }
    let (runs_dir, out) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&runs_dir)
        .unwrap_or_else(|e| fail(format!("{}: {e}", runs_dir.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("score-256.json").exists())
        .collect();
    dirs.sort();
    let mut runs: Vec<Run> = dirs.iter().map(|d| read_run(d)).collect();
    runs.sort_by(|a, b| {
        (a.tokenizer, a.arch, a.non_embedding_params).cmp(&(
            b.tokenizer,
            b.arch,
            b.non_embedding_params,
        ))
    });
    std::fs::create_dir_all(&out).unwrap_or_else(|e| fail(format!("{}: {e}", out.display())));
    let summary = serde_json::to_string_pretty(&runs).expect("serialises");
    std::fs::write(out.join("summary.json"), summary)
        .unwrap_or_else(|e| fail(format!("{}: {e}", out.display())));

    println!(
        "| run | tokens | arch | d_model | layers | parameters (non-embedding) | lr | training tokens | training FLOPs | wall s | tokens/s | val NLL, windows of 256 | of 1024 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {} | {} | {} | {} | {:.2}M ({:.2}M) | {:e} | {:.2}M | {:.2e} | {:.0} | {:.0} | {:.4} | {:.4} |",
            r.name,
            r.tokenizer,
            r.arch,
            r.d_model,
            r.n_layer,
            r.params as f64 / 1e6,
            r.non_embedding_params as f64 / 1e6,
            r.lr,
            r.train_tokens as f64 / 1e6,
            r.train_flops,
            r.train_seconds,
            r.tokens_per_second,
            r.val_nll_256,
            r.val_nll_1024
        );
    }
    for tokenizer in ["char", "bpe"] {
        let unit = if tokenizer == "char" {
            "nats per character"
        } else {
            "nats per BPE token"
        };
        for (axis, label) in [
            ("params", "non-embedding parameters"),
            ("flops", "training FLOPs"),
        ] {
            let series: Vec<Series> = ["mamba", "transformer"]
                .iter()
                .map(|&arch| Series {
                    name: if arch == "mamba" {
                        "Mamba".into()
                    } else {
                        "Transformer++".into()
                    },
                    points: runs
                        .iter()
                        .filter(|r| {
                            r.tokenizer == tokenizer && r.arch == arch && !r.name.contains("-lr")
                        })
                        .map(|r| {
                            let x = if axis == "params" {
                                r.non_embedding_params as f64
                            } else {
                                r.train_flops
                            };
                            (x, r.val_nll_256)
                        })
                        .collect(),
                })
                .filter(|s| !s.points.is_empty())
                .collect();
            if series.is_empty() {
                continue;
            }
            let chart = Chart {
                title: format!("Tiny Shakespeare ({tokenizer}): held-out loss against {label}"),
                x_label: label.to_string(),
                y_label: format!("validation loss ({unit})"),
                series,
                log_x: true,
            };
            let path = out.join(format!("lm-{tokenizer}-{axis}.png"));
            write_png(&chart, &path).unwrap_or_else(|e| fail(e.to_string()));
        }
    }
}
