//! Tables and charts of the DNA and audio runs of `scripts/dna_audio.sh`:
//! reads RUNS/NAME/results.json, prints Markdown tables, writes the charts
//! into OUT and a copy of every results.json (the model directories left
//! out) as OUT/NAME.json.
//!
//!     cargo run --release --example dna_audio_report -- RUNS OUT

use std::path::{Path, PathBuf};

use selective::plot::{write_png, Chart, Series};
use serde_json::Value;

fn fail(message: String) -> ! {
    eprintln!("dna_audio_report: {message}");
    std::process::exit(1)
}

fn read(runs: &Path, name: &str) -> Option<Value> {
    let path = runs.join(name).join("results.json");
    let text = std::fs::read_to_string(&path).ok()?;
    Some(serde_json::from_str(&text).unwrap_or_else(|e| fail(format!("{}: {e}", path.display()))))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| fail(format!("no number {key}")))
}

fn chart(out: &Path, file: &str, title: &str, x: &str, y: &str, series: Vec<Series>) {
    let series: Vec<Series> = series
        .into_iter()
        .filter(|s| !s.points.is_empty())
        .collect();
    if series.is_empty() {
        return;
    }
    let chart = Chart {
        title: title.into(),
        x_label: x.into(),
        y_label: y.into(),
        series,
        log_x: true,
    };
    write_png(&chart, &out.join(file)).unwrap_or_else(|e| fail(e.to_string()));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        fail("usage: dna_audio_report RUNS OUT".into());
    }
    let (runs, out) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
    std::fs::create_dir_all(&out).unwrap_or_else(|e| fail(e.to_string()));
    let mut names: Vec<String> = std::fs::read_dir(&runs)
        .unwrap_or_else(|e| fail(format!("{}: {e}", runs.display())))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| runs.join(n).join("results.json").exists())
        .collect();
    names.sort();
    for n in &names {
        let v = read(&runs, n).expect("listed above");
        let text = serde_json::to_string_pretty(&v).expect("JSON serialises");
        std::fs::write(out.join(format!("{n}.json")), text).unwrap_or_else(|e| fail(e.to_string()));
    }
    let lengths = [1024usize, 4096, 16384, 32768];
    let windows = [1024usize, 4096, 16384, 65536];
    let layers = [("s6", "Mamba (S6)"), ("s4d", "Mamba block with S4D")];

    // DNA pretraining: test loss against the training context
    println!("## DNA pretraining: test nats per base against training length\n");
    println!(
        "| model | params | {} |",
        lengths.map(|l| l.to_string()).join(" | ")
    );
    println!("|---|---|{}", "---|".repeat(lengths.len()));
    let mut series = Vec::new();
    for (layer, label) in layers.iter().chain([("attention", "Transformer++")].iter()) {
        let rows: Vec<Option<Value>> = lengths
            .iter()
            .map(|l| read(&runs, &format!("dna-pre-{layer}-{l}")))
            .collect();
        let Some(first) = rows.iter().flatten().next() else {
            continue;
        };
        let cells: Vec<String> = rows
            .iter()
            .map(|r| {
                r.as_ref().map_or("not run".into(), |r| {
                    format!(
                        "{:.4} ({:.0} s)",
                        num(r, "test_nats_per_token"),
                        num(r, "train_seconds")
                    )
                })
            })
            .collect();
        println!(
            "| {label} | {} | {} |",
            first["parameters"],
            cells.join(" | ")
        );
        series.push(Series {
            name: label.to_string(),
            points: lengths
                .iter()
                .zip(&rows)
                .filter_map(|(&l, r)| {
                    r.as_ref()
                        .map(|r| (l as f64, num(r, "test_nats_per_token")))
                })
                .collect(),
        });
    }
    chart(
        &out,
        "dna-pretrain-by-length.png",
        "Human chr22: test loss against training context (equal tokens)",
        "training sequence length (bases)",
        "test loss (nats per base)",
        series,
    );

    // the long runs: test loss of one model against the window it reads
    let mut series = Vec::new();
    println!("\n## DNA, 600 steps at 2^15: test nats per base against the window read\n");
    for (layer, label) in layers {
        let Some(r) = read(&runs, &format!("dna-pre-long-{layer}-32768")) else {
            continue;
        };
        let points: Vec<(f64, f64)> = r["test_by_length"]
            .as_array()
            .unwrap_or_else(|| fail("no test_by_length".into()))
            .iter()
            .map(|p| (num(p, "length"), num(p, "nats_per_token")))
            .collect();
        println!(
            "| {label} | {} | trained {:.0} s |",
            points
                .iter()
                .map(|(l, n)| format!("{l}: {n:.4}"))
                .collect::<Vec<_>>()
                .join(" | "),
            num(&r, "train_seconds")
        );
        series.push(Series {
            name: label.to_string(),
            points,
        });
    }
    chart(
        &out,
        "dna-context.png",
        "Human chr22, trained at 2^15: test loss against the window read",
        "window (bases)",
        "test loss (nats per base)",
        series,
    );

    // great apes
    println!("\n## Great apes: test accuracy against window (chance 25 %)\n");
    println!("| model | {} |", windows.map(|l| l.to_string()).join(" | "));
    println!("|---|{}", "---|".repeat(windows.len()));
    let mut series = Vec::new();
    for (prefix, label) in [
        ("apes-s6", "Mamba (S6), from scratch"),
        ("apes-s4d", "S4D, from scratch"),
        ("apes-s6-pretrained", "Mamba (S6), pretrained"),
    ] {
        let rows: Vec<Option<Value>> = windows
            .iter()
            .map(|w| read(&runs, &format!("{prefix}-{w}")))
            .collect();
        let cells: Vec<String> = rows
            .iter()
            .map(|r| {
                r.as_ref().map_or("not run".into(), |r| {
                    format!(
                        "{:.1} % ({:.0} s)",
                        100.0 * num(r, "test_accuracy"),
                        num(r, "train_seconds")
                    )
                })
            })
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
        series.push(Series {
            name: label.to_string(),
            points: windows
                .iter()
                .zip(&rows)
                .filter_map(|(&w, r)| {
                    r.as_ref()
                        .map(|r| (w as f64, 100.0 * num(r, "test_accuracy")))
                })
                .collect(),
        });
    }
    series.push(Series {
        name: "chance".into(),
        points: vec![(1024.0, 25.0), (65536.0, 25.0)],
    });
    chart(
        &out,
        "apes-by-window.png",
        "Great apes (4 species, held-out regions): test accuracy against window",
        "window (bases)",
        "test accuracy (%)",
        series,
    );

    // audio
    println!("\n## Speech: test bits per sample on held-out voices\n");
    for n in names.iter().filter(|n| n.starts_with("audio-")) {
        let r = read(&runs, n).expect("listed");
        println!(
            "| {n} | {} | {:.4} | {:.0} s |",
            r["parameters"],
            num(&r, "test_bits_per_token"),
            num(&r, "train_seconds")
        );
    }
    println!("\n## Spoken digits: test accuracy on held-out voices (chance 10 %)\n");
    for n in names.iter().filter(|n| n.starts_with("digits-")) {
        let r = read(&runs, n).expect("listed");
        println!(
            "| {n} | {} | {:.1} % | {:.0} s |",
            r["parameters"],
            100.0 * num(&r, "test_accuracy"),
            num(&r, "train_seconds")
        );
    }
}
