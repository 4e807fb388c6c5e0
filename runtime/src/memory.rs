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

/// While alive, blocks of 128 KiB and more are mapped and unmapped one by one instead of being
/// carved from the allocator's heaps (glibc's default raises that threshold to the size of
/// the largest block freed, up to 32 MiB). Calibration's activations live in ONNX Runtime's
/// shared arena ([`crate::SharedArena`]); what is left on malloc (sample files, the arena's
/// own chunks) is few and large, and carved from the heap it fragments it so that the
/// resident peak climbs sample after sample. On drop the threshold is set to 32 MiB, where
/// glibc's own adjustment would have taken it. A no-op outside glibc.
pub struct MapLargeBlocks(());

impl MapLargeBlocks {
    pub fn new() -> Self {
        set_mmap_threshold(128 << 10);
        Self(())
    }
}

impl Default for MapLargeBlocks {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for MapLargeBlocks {
    fn drop(&mut self) {
        set_mmap_threshold(32 << 20);
    }
}

fn set_mmap_threshold(bytes: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
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
