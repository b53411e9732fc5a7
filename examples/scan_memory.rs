//! Peak memory of one selective scan backward: recomputation from chunk
//! checkpoints (the fused kernel) against storing every state (the
//! reference backward, which keeps the whole (batch, len, channels, state)
//! tensor of h).
//!
//! ```text
//! cargo run --release --example scan_memory -- recompute 2048
//! cargo run --release --example scan_memory -- store-all 2048
//! cargo run --release --example scan_memory -- recompute 8192 [chunk_len]
//! ```
//!
//! Run each mode in its own process: the peak resident set (VmHWM in
//! /proc/self/status) covers the whole process. The program resets the peak
//! after building the inputs (writing 5 to /proc/self/clear_refs) where the
//! kernel allows it, and prints the resident set before the call, so that
//! the difference is what the backward (and, for `recompute`, its forward)
//! allocated on top of the inputs.
//!
//! Shape: batch 1, 1536 channels, N = 16, f32, with delta_softplus, D, z and
//! delta_bias, as in a Mamba block.

use std::time::Instant;

use selective::kernels::{
    selective_scan_backward, selective_scan_backward_reference, selective_scan_forward, ScanInputs,
    ScanOptions, ScanShape,
};
use selective::rng::Rng;

const CHANNELS: usize = 1536;
const STATE: usize = 16;
const MIB: f64 = 1024.0 * 1024.0;

/// A field of /proc/self/status in bytes (the kernel gives kB).
fn status_bytes(field: &str) -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

/// ln(e^y - 1), the inverse of softplus, for y > 0.
fn inverse_softplus(y: f64) -> f64 {
    y + (-(-y).exp_m1()).ln()
}

fn usage() -> ! {
    eprintln!("usage: scan_memory (recompute|store-all) [len = 2048] [chunk_len = 256]");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match args.first().map(String::as_str) {
        Some(m @ ("recompute" | "store-all")) => m.to_string(),
        _ => usage(),
    };
    let len: usize = args
        .get(1)
        .map(|s| s.parse().unwrap_or_else(|_| usage()))
        .unwrap_or(2048);
    let chunk_len: usize = args
        .get(2)
        .map(|s| s.parse().unwrap_or_else(|_| usage()))
        .unwrap_or(256);

    let shape = ScanShape {
        batch: 1,
        len,
        channels: CHANNELS,
        state: STATE,
    };
    let options = ScanOptions {
        delta_softplus: true,
        chunk_len,
        ..ScanOptions::default()
    };

    // Inputs shaped like a real model's (see benches/selective_scan.rs).
    let mut r = Rng::new(7);
    let act = len * CHANNELS;
    let tok = len * STATE;
    let u: Vec<f32> = r.vec(act, |r| r.normal());
    let delta: Vec<f32> = r.vec(act, |r| r.normal() * 0.5);
    let (lo, hi) = (0.001f64.ln(), 0.1f64.ln());
    let delta_bias: Vec<f32> = r.vec(CHANNELS, |r| inverse_softplus(r.uniform_in(lo, hi).exp()));
    let a: Vec<f32> = (0..CHANNELS * STATE)
        .map(|i| -((i % STATE + 1) as f32))
        .collect();
    let b: Vec<f32> = r.vec(tok, |r| r.normal());
    let c: Vec<f32> = r.vec(tok, |r| r.normal());
    let d = vec![1.0f32; CHANNELS];
    let z: Vec<f32> = r.vec(act, |r| r.normal());
    let d_out: Vec<f32> = r.vec(act, |r| r.normal());
    let inputs = ScanInputs {
        u: &u,
        delta: &delta,
        a: &a,
        b: &b,
        c: &c,
        d: Some(&d),
        z: Some(&z),
        delta_bias: Some(&delta_bias),
        initial_state: None,
    };
    let f = std::mem::size_of::<f32>();
    let input_bytes = (u.len()
        + delta.len()
        + delta_bias.len()
        + a.len()
        + b.len()
        + c.len()
        + d.len()
        + z.len()
        + d_out.len())
        * f;
    // What either backward must return: one gradient per input.
    let grad_bytes = input_bytes - d_out.len() * f;
    let out_bytes = act * f;
    let checkpoint_bytes = shape.checkpoints_len(chunk_len) * f;
    let all_states_bytes = len * CHANNELS * STATE * f;

    let peak_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let rss_before = status_bytes("VmRSS:").unwrap_or(0);
    let start = Instant::now();
    let grads = if mode == "recompute" {
        let mut out = vec![0.0f32; act];
        let mut checkpoints = vec![0.0f32; shape.checkpoints_len(chunk_len)];
        selective_scan_forward(
            &shape,
            &inputs,
            &options,
            &mut out,
            None,
            Some(&mut checkpoints),
        )
        .expect("forward");
        let grads = selective_scan_backward(&shape, &inputs, &options, &checkpoints, &d_out, None)
            .expect("backward");
        std::hint::black_box(&out);
        grads
    } else {
        selective_scan_backward_reference(&shape, &inputs, &options, &d_out, None)
            .expect("reference backward")
    };
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(&grads);
    let peak = status_bytes("VmHWM:").unwrap_or(0);

    println!("mode                 {mode}");
    println!(
        "shape                batch 1, len {len}, channels {CHANNELS}, state {STATE}, f32{}",
        if mode == "recompute" {
            format!(", chunk_len {chunk_len}")
        } else {
            String::new()
        }
    );
    println!("threads              {}", rayon::current_num_threads());
    println!("time                 {seconds:.3} s");
    println!("inputs (+ d_out)     {}", mib(input_bytes));
    println!("gradients returned   {}", mib(grad_bytes));
    if mode == "recompute" {
        println!("forward out          {}", mib(out_bytes));
        println!("checkpoints          {}", mib(checkpoint_bytes));
    } else {
        println!("all states h (b,l,d,n) {}", mib(all_states_bytes));
    }
    println!(
        "VmRSS before call    {}{}",
        mib(rss_before),
        if peak_reset {
            " (peak reset here)"
        } else {
            " (peak NOT reset: VmHWM includes input construction)"
        }
    );
    println!("VmHWM (peak)         {}", mib(peak));
    println!(
        "peak - before        {}  (the scan's own extra memory)",
        mib(peak.saturating_sub(rss_before))
    );
}
