//! Draws the validation-accuracy curves of several `selective task` runs on
//! one chart, for side-by-side comparisons (docs/RESULTS.md):
//!
//! ```sh
//! cargo run --release --example task_curves -- OUT.png "title" NAME=DIR/results.json ...
//! ```

use std::path::Path;

use selective::plot::{write_png, Chart, Series};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: task_curves OUT.png TITLE NAME=RESULTS.json [NAME=RESULTS.json ...]");
        std::process::exit(2);
    }
    let mut series = Vec::new();
    for spec in &args[2..] {
        let (name, path) = spec.split_once('=').unwrap_or_else(|| {
            eprintln!("error: `{spec}` is not NAME=RESULTS.json");
            std::process::exit(2)
        });
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
            eprintln!("error: {path}: {e}");
            std::process::exit(1)
        });
        let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            eprintln!("error: {path}: not JSON: {e}");
            std::process::exit(1)
        });
        let points = report["curve"]
            .as_array()
            .map(|curve| {
                curve
                    .iter()
                    .filter_map(|p| {
                        Some((p["step"].as_f64()?, 100.0 * p["val_accuracy"].as_f64()?))
                    })
                    .collect()
            })
            .unwrap_or_else(|| {
                eprintln!("error: {path}: no `curve` array (a results.json of a training run?)");
                std::process::exit(1)
            });
        series.push(Series {
            name: name.to_string(),
            points,
        });
    }
    let chart = Chart {
        title: args[1].clone(),
        x_label: "training step".into(),
        y_label: "validation accuracy (%)".into(),
        series,
        log_x: false,
    };
    if let Err(e) = write_png(&chart, Path::new(&args[0])) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
