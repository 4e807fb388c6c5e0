//! Bounded draining at shutdown. Once a stop is requested no queue takes new work, and queued
//! work still waiting when the exit timeout is about to run out is answered UNAVAILABLE
//! instead of run, so the process exits within the timeout (Kubernetes kills it after its
//! grace period) and no caller is left without an answer.
//!
//! A stop is a property of the process (one signal stops every model), so the state is
//! process-wide; it is only ever set once, by the shutdown path.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When the stop was requested and when queued work starts being cut.
#[derive(Debug, Clone, Copy)]
struct Stop {
    cut_at: Instant,
    timeout: Duration,
}

static STOP: OnceLock<Stop> = OnceLock::new();
static CUT: AtomicU64 = AtomicU64::new(0);

/// How long before the exit timeout runs out queued work is cut: the batches running then
/// still finish, and the workers, listeners and metrics still close.
fn margin(timeout: Duration) -> Duration {
    (timeout / 5).min(Duration::from_secs(1))
}

/// Starts draining: from now on queues refuse new work, and from `timeout` less a margin on
/// queued work is answered instead of run. Later calls change nothing.
pub fn begin(timeout: Duration) {
    let now = Instant::now();
    let _ = STOP.set(Stop { cut_at: now + timeout.saturating_sub(margin(timeout)), timeout });
}

/// Whether a stop was requested (queues take no new work).
pub fn stopping() -> bool {
    STOP.get().is_some()
}

/// The exit timeout, when `now` is past the instant queued work is cut.
pub(crate) fn cut_now(now: Instant) -> Option<Duration> {
    STOP.get().filter(|stop| now >= stop.cut_at).map(|stop| stop.timeout)
}

/// Counts a job answered unrun because the exit timeout ran out.
pub(crate) fn count_cut() {
    CUT.fetch_add(1, Ordering::Relaxed);
}

/// Jobs answered unrun because the exit timeout ran out, so far.
pub fn cut_jobs() -> u64 {
    CUT.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_leaves_time_for_running_batches_and_closing() {
        assert_eq!(margin(Duration::from_secs(30)), Duration::from_secs(1));
        assert_eq!(margin(Duration::from_secs(2)), Duration::from_millis(400));
        assert_eq!(margin(Duration::ZERO), Duration::ZERO);
    }
}
