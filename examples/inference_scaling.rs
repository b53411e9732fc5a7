//! Plots `selective bench --scaling --json` of Mamba and of the
//! Transformer++ side by side (the paper's Figure 8, docs/RESULTS.md
//! "Inference cost against length"):
//!
//! ```sh
//! cargo run --release --example inference_scaling -- OUT_DIR NAME=bench.json NAME=bench.json
//! ```
//!
//! Writes OUT_DIR/inference-{prefill,decode,memory}-by-length.png and
//! OUT_DIR/inference-throughput-by-batch.png.

use std::path::PathBuf;

use selective::plot::{write_png, Chart, Series};

fn fail(message: String) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: inference_scaling OUT_DIR NAME=bench.json [NAME=bench.json ...]");
        std::process::exit(2);
    }
    let out = PathBuf::from(&args[0]);
    let mut reports = Vec::new();
    for spec in &args[1..] {
        let (name, path) = spec
            .split_once('=')
            .unwrap_or_else(|| fail(format!("`{spec}` is not NAME=bench.json")));
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| fail(format!("{path}: {e}")));
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| fail(format!("{path}: {e}")));
        if v["lengths"].as_array().is_none() || v["batches"].as_array().is_none() {
            fail(format!(
                "{path}: not the JSON of `selective bench --scaling --json`"
            ));
        }
        reports.push((name.to_string(), v));
    }
    let series_of = |list: &str, x: &str, y: &str, scale: f64| -> Vec<Series> {
        reports
            .iter()
            .map(|(name, v)| Series {
                name: name.clone(),
                points: v[list]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| Some((r[x].as_f64()?, r[y].as_f64()? * scale)))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    std::fs::create_dir_all(&out).unwrap_or_else(|e| fail(format!("{}: {e}", out.display())));
    let charts = [
        (
            "inference-prefill-by-length.png",
            "prefill time per token against prompt length",
            "prompt length (tokens)",
            "microseconds per token",
            series_of("lengths", "len", "prefill_us_per_token", 1.0),
            true,
        ),
        (
            "inference-decode-by-length.png",
            "decoding time per token against context length (batch 1)",
            "context length (tokens)",
            "milliseconds per token",
            series_of("lengths", "len", "decode_us_per_token", 1e-3),
            true,
        ),
        (
            "inference-memory-by-length.png",
            "memory of one sequence's context (state or KV cache)",
            "context length (tokens)",
            "MB",
            series_of("lengths", "len", "context_bytes", 1e-6),
            true,
        ),
        (
            "inference-throughput-by-batch.png",
            "decoding throughput against batch size",
            "batch size (sequences)",
            "tokens per second",
            series_of("batches", "batch", "tokens_per_second", 1.0),
            true,
        ),
    ];
    for (file, title, x_label, y_label, series, log_x) in charts {
        let chart = Chart {
            title: title.to_string(),
            x_label: x_label.to_string(),
            y_label: y_label.to_string(),
            series,
            log_x,
        };
        write_png(&chart, &out.join(file)).unwrap_or_else(|e| fail(e.to_string()));
    }
}
