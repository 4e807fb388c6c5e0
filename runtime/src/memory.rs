//! Peak resident memory of this process (Linux `VmHWM`), resettable so that one phase's peak
//! (FP32 inference, calibration) can be measured on its own.

/// The current resident size, in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|kib| kib * 1024)
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(key))?;
    line.trim_start_matches(key).trim().trim_end_matches("kB").trim().parse().ok()
}

/// Resets the peak to the current resident size. False where the kernel does not allow it.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak resident size since the process started or the last [`reset_peak`], in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|kib| kib * 1024)
}

/// Hands memory the allocator holds free back to the operating system (glibc keeps freed
/// blocks of every thread's arena otherwise), so a phase that drops a large session leaves
/// room for the next one instead of raising the resident peak. A no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused pages of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs `phase` and returns its result with the peak resident size reached while it ran
/// (`None` where the peak cannot be reset or read).
pub fn measure<T>(phase: impl FnOnce() -> T) -> (T, Option<u64>) {
    let reset = reset_peak();
    let result = phase();
    (result, peak_rss_bytes().filter(|_| reset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_that_touches_memory_raises_its_peak() {
        let (_, idle) = measure(|| ());
        let (sum, busy) = measure(|| {
            let block = vec![1u8; 64 << 20];
            block.iter().map(|&b| u64::from(b)).sum::<u64>()
        });
        assert_eq!(sum, 64 << 20);
        if let (Some(idle), Some(busy)) = (idle, busy) {
            assert!(busy >= idle + (48 << 20), "idle {idle}, busy {busy}");
        }
    }
}
