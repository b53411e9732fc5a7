//! Data-parallel training over MPI (docs/DESIGN.md §19), through the
//! binary: `mpirun -np 2 selective train` gives the bits of one process; a
//! rank killed or hung stops the run with an error instead of a hang; the
//! run resumes from its checkpoint on another number of ranks, still bit
//! for bit.
//!
//! Needs a build with the `mpi` feature and Open MPI's `mpirun`:
//! `cargo test --release --features mpi --test mpi`. Without `mpirun` the
//! tests skip, unless SELECTIVE_MPI_TESTS=require (CI) makes that a failure.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn mpirun() -> Option<&'static str> {
    let found = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found && std::env::var("SELECTIVE_MPI_TESTS").as_deref() == Ok("require") {
        panic!(
            "SELECTIVE_MPI_TESTS=require but mpirun is not on PATH (apt-get install openmpi-bin)"
        );
    }
    found.then_some("mpirun")
}

/// A fresh, empty directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    common::fresh_temp_dir("mpi", name)
}

/// A small repetitive text (byte-level).
fn write_text(dir: &Path) -> PathBuf {
    common::write_pangram_text(dir, 200)
}

/// The training flags of every run here: 4 micro-batches of 2 sequences
/// a step, evaluation every 2 steps over 3 batches, a checkpoint every
/// `save_every` steps.
fn train_args(data: &Path, out: &Path, steps: usize, save_every: usize) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--d-model",
        "16",
        "--n-layer",
        "2",
        "--d-state",
        "4",
        "--batch-size",
        "2",
        "--grad-accum",
        "4",
        "--seq-len",
        "24",
        "--eval-every",
        "2",
        "--eval-batches",
        "3",
        "--warmup-steps",
        "2",
    ]
    .map(String::from)
    .to_vec();
    args.extend(["--steps".into(), steps.to_string()]);
    args.extend(["--save-every".into(), save_every.to_string()]);
    args.extend(["--data".into(), data.display().to_string()]);
    args.extend(["--out".into(), out.display().to_string()]);
    args
}

/// `mpirun -np ranks selective ARGS`, each rank on one thread, allowed to
/// run as root (CI) and on more ranks than cores.
fn launch(ranks: usize, args: &[String]) -> Command {
    let mut c = Command::new(mpirun().unwrap());
    c.args([
        "-np",
        &ranks.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .arg(env!("CARGO_BIN_EXE_selective"))
    .args(args)
    .args(["--threads", "1"])
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    c
}

fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn alone(args: &[String]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_selective"))
        .args(args)
        .args(["--threads", "2"])
        .output()
        .unwrap();
    check(out, "one process")
}

/// (step, loss) of every training step, and (step, val_loss) of every
/// evaluation, from a run's metrics.jsonl: the values as written, bits
/// included.
fn metrics(run: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let value = v.get("loss").or(v.get("val_loss")).unwrap().to_string();
            (v["step"].as_u64().unwrap(), value)
        })
        .collect()
}

fn weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("model/model.safetensors")).unwrap()
}

#[test]
fn two_mpi_ranks_give_the_bits_of_one_process() {
    if mpirun().is_none() {
        return eprintln!("skipped: no mpirun");
    }
    let dir = temp_dir("bits");
    let data = write_text(&dir);
    alone(&train_args(&data, &dir.join("one"), 6, 2));
    for ranks in [1, 2] {
        let run = dir.join(format!("np{ranks}"));
        let out = check(
            launch(ranks, &train_args(&data, &run, 6, 2))
                .output()
                .unwrap(),
            "mpirun",
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        if ranks == 2 {
            assert!(stderr.contains("2 ranks, data-parallel"), "{stderr}");
        }
        assert_eq!(metrics(&run), metrics(&dir.join("one")), "{ranks} ranks");
        assert!(
            weights(&run) == weights(&dir.join("one")),
            "{ranks} ranks' weights"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The process of MPI rank `rank` whose command line names `run`.
fn rank_pid(run: &Path, rank: usize) -> Option<u32> {
    let run = run.display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        let is_rank = has(
            &environ,
            format!("OMPI_COMM_WORLD_RANK={rank}\0").as_bytes(),
        );
        (is_rank && has(&cmdline, run.as_bytes()) && !has(&cmdline, b"mpirun")).then_some(pid)
    })
}

/// Waits until `run`'s checkpoint is at least at `step`.
fn wait_for_checkpoint(run: &Path, step: u64, child: &mut Child) {
    let t0 = Instant::now();
    loop {
        let at = std::fs::read_to_string(run.join("checkpoint/trainer_state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["step"].as_u64());
        if at.is_some_and(|s| s >= step) {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before step {step}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint at step {step}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits at most `limit` for `child` to end; its exit status and stderr.
fn wait_ended(mut child: Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("the run did not stop within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `args` on 2 ranks, sends `signal` to rank 1 once `run`'s
/// checkpoint reaches `step`, and waits (at most a minute) for mpirun to
/// end: its status and stderr.
fn signal_rank_one(
    args: &[String],
    run: &Path,
    step: u64,
    signal: &str,
) -> (std::process::ExitStatus, String) {
    let mut child = launch(2, args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_checkpoint(run, step, &mut child);
    let pid = rank_pid(run, 1).expect("rank 1's process");
    let sent = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal} {pid}");
    wait_ended(child, Duration::from_secs(60))
}

#[test]
fn a_killed_or_hung_rank_stops_the_run_which_resumes_on_another_count_bit_for_bit() {
    if mpirun().is_none() {
        return eprintln!("skipped: no mpirun");
    }
    let dir = temp_dir("faults");
    let data = write_text(&dir);
    let steps = 3000;
    alone(&train_args(&data, &dir.join("one"), steps, 100));

    // Rank 1 is killed once a checkpoint exists: mpirun stops rank 0 and
    // says which rank died.
    let run = dir.join("run");
    let (status, stderr) = signal_rank_one(&train_args(&data, &run, steps, 100), &run, 100, "KILL");
    assert!(!status.success());
    assert!(
        stderr.contains("rank 1") && stderr.contains("signal 9"),
        "{stderr}"
    );

    // One process resumes for a while; then rank 1 of two hangs (stopped),
    // and rank 0 gives up after --rank-timeout, naming it.
    let mut resume = vec!["train".to_string(), "--resume".into(), "--out".into()];
    resume.push(run.display().to_string());
    let mut first = resume.clone();
    first.extend(["--stop-after".into(), "1500".into()]);
    alone(&first);
    let mut hung = resume.clone();
    hung.extend(["--rank-timeout".into(), "2".into()]);
    let (status, stderr) = signal_rank_one(&hung, &run, 1600, "STOP");
    assert!(!status.success());
    assert!(
        stderr.contains("rank 0: waited") && stderr.contains("for rank 1"),
        "{stderr}"
    );

    // Two ranks finish the run: the same losses and weights as one process
    // that never stopped.
    check(launch(2, &resume).output().unwrap(), "the resumed run");
    assert_eq!(metrics(&run), metrics(&dir.join("one")));
    assert!(
        weights(&run) == weights(&dir.join("one")),
        "weights after the faults"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
