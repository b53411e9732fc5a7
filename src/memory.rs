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

/// Memory the operating system could give this process now without
/// swapping (Linux's MemAvailable in /proc/meminfo), in bytes; None where
/// it does not say.
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// An error, before any work starts, when `needed` bytes (a lower bound
/// from the shapes: what must be live at once) exceed the memory
/// available; `what` says what needs them and `lower` what to lower.
/// Where the platform does not report available memory, nothing is
/// refused.
pub fn check_fits(op: &'static str, needed: u128, what: &str, lower: &str) -> crate::Result<()> {
    let Some(available) = available_bytes() else {
        return Ok(());
    };
    if needed > available as u128 {
        return Err(crate::error::invalid(
            op,
            format!(
                "{what} needs at least {:.2} GB, but {:.2} GB of memory is available; lower {lower}",
                needed as f64 / 1e9,
                available as f64 / 1e9
            ),
        ));
    }
    Ok(())
}
