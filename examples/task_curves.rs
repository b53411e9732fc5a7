//! Draws the validation-accuracy curves of several `selective task` runs on
//! one chart, for side-by-side comparisons (docs/RESULTS.md); with
//! `--lengths`, their induction-heads accuracy against the test length
//! instead (the `lengths` of a results.json, log-scaled x):
//!
//! ```sh
//! cargo run --release --example task_curves -- OUT.png "title" NAME=DIR/results.json ...
//! cargo run --release --example task_curves -- --lengths OUT.png "title" NAME=DIR/results.json ...
//! ```

use std::path::Path;

use selective::plot::{write_png, Chart, Series};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let by_length = args.first().is_some_and(|a| a == "--lengths");
    if by_length {
        args.remove(0);
    }
    if args.len() < 3 {
        eprintln!(
            "usage: task_curves [--lengths] OUT.png TITLE NAME=RESULTS.json [NAME=RESULTS.json ...]"
        );
        std::process::exit(2);
    }
    let (list, x_key, y_key) = if by_length {
        ("lengths", "length", "accuracy")
    } else {
        ("curve", "step", "val_accuracy")
    };
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
        let points = report[list]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .filter_map(|p| Some((p[x_key].as_f64()?, 100.0 * p[y_key].as_f64()?)))
                    .collect()
            })
            .unwrap_or_else(|| {
                eprintln!("error: {path}: no `{list}` array (a results.json of `selective task`?)");
                std::process::exit(1)
            });
        series.push(Series {
            name: name.to_string(),
            points,
        });
    }
    let chart = Chart {
        title: args[1].clone(),
        x_label: if by_length {
            "test sequence length".into()
        } else {
            "training step".into()
        },
        y_label: if by_length {
            "accuracy (%)".into()
        } else {
            "validation accuracy (%)".into()
        },
        series,
        log_x: by_length,
    };
    if let Err(e) = write_png(&chart, Path::new(&args[0])) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
