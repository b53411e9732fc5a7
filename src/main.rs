//! The `selective` command line: a thin layer over the library.

use clap::{Parser, Subcommand};
use selective::bench::time_scan;
use selective::kernels::{ScanParallelism, ScanShape};

#[derive(Parser)]
#[command(
    name = "selective",
    version,
    about = "Mamba (selective state space models) in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time the fused selective scan (forward and backward) on a Mamba
    /// layer's shape and print nanoseconds per (position x channel x state).
    BenchScan {
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Sequence lengths to time, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
        len: Vec<usize>,
        #[arg(long, default_value_t = 1536)]
        channels: usize,
        #[arg(long, default_value_t = 16)]
        state: usize,
        /// Thread counts to time, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Positions between the states kept for the backward pass.
        #[arg(long, default_value_t = 256)]
        chunk_len: usize,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::BenchScan {
            batch,
            len,
            channels,
            state,
            threads,
            reps,
            chunk_len,
        } => {
            println!("| threads | batch | len | channels | state | forward ms | forward ns/elem | backward ms | backward ns/elem |");
            println!("|---|---|---|---|---|---|---|---|---|");
            for &t in &threads {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
                for &l in &len {
                    let shape = ScanShape {
                        batch,
                        len: l,
                        channels,
                        state,
                    };
                    let r =
                        pool.install(|| time_scan(shape, reps, chunk_len, ScanParallelism::Auto))?;
                    let per = |s: f64| s * 1e9 / r.elements as f64;
                    println!(
                        "| {t} | {batch} | {l} | {channels} | {state} | {:.2} | {:.3} | {:.2} | {:.3} |",
                        r.forward_s * 1e3,
                        per(r.forward_s),
                        r.backward_s * 1e3,
                        per(r.backward_s)
                    );
                }
            }
            Ok(())
        }
    }
}
