//! This process's memory as the operating system reports it (Linux's
//! /proc/self/status): what the benchmarks, the trainer and the task runner
//! report as resident and peak memory.

/// The peak resident memory of this process (Linux's VmHWM), in bytes.
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak resident memory of this process to its current
/// resident memory (Linux: writing 5 to /proc/self/clear_refs), so that
/// [`peak_resident_bytes`] measures from here on. Elsewhere it does nothing.
pub fn reset_peak_resident() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The resident memory of this process now (Linux's VmRSS), in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
