//! The memory budget: bytes buffered across all connections — send queues and partly received
//! messages — against `--max-buffered-total`. Sends past it fail with `QueueFull`; incoming
//! data that does not fit closes its connection with 1013.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes buffered across all connections (send queues and partly received messages), against
/// `max_buffered_total`.
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    used: AtomicU64,
    max: u64,
    /// When the last refusal was logged (ms since `since`), so floods log once a second.
    last_log_ms: AtomicU64,
    since: std::time::Instant,
}

impl MemoryBudget {
    pub(crate) fn new(max: u64) -> Self {
        Self {
            used: AtomicU64::new(0),
            max,
            last_log_ms: AtomicU64::new(0),
            since: std::time::Instant::now(),
        }
    }

    /// Bytes buffered now, across all connections.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub(crate) fn take(&self, n: u64) -> bool {
        let before = self.used.fetch_add(n, Ordering::AcqRel);
        if before > 0 && before + n > self.max {
            self.give(n);
            let now = self.since.elapsed().as_millis() as u64 + 1000;
            let last = self.last_log_ms.load(Ordering::Relaxed);
            if now >= last + 1000
                && self
                    .last_log_ms
                    .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    max_buffered_total = self.max,
                    "memory budget for buffered bytes exhausted: refusing sends (QueueFull) and \
                     incoming data (close 1013)"
                );
            }
            return false;
        }
        true
    }

    pub(crate) fn give(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }
}
