//! Retirement: a generation's `shutdown` and the drop of its instance run plugin code, which may
//! block (join a thread, flush a file). They run here, each on a thread of its own, never on
//! the I/O threads; the host waits for them when it stops.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Retirements started and not finished.
static PENDING: Mutex<usize> = Mutex::new(0);
static IDLE: Condvar = Condvar::new();
/// A retirement slower than this is logged (the host's `--slow-callback`), in milliseconds.
static SLOW_MS: AtomicU64 = AtomicU64::new(50);

/// Sets the threshold above which a retirement is logged as slow.
pub(crate) fn set_slow(threshold: Duration) {
    SLOW_MS.store(
        u64::try_from(threshold.as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// The threshold above which a retirement is logged as slow.
pub(crate) fn slow() -> Duration {
    Duration::from_millis(SLOW_MS.load(Ordering::Relaxed))
}

/// Runs `job` (plugin code: a `shutdown`, an instance's drop) on a thread of its own, named
/// after `plugin`; logs it when it took longer than the slow threshold.
pub(crate) fn submit(
    plugin: &str,
    generation: u64,
    what: &'static str,
    job: impl FnOnce() + Send + 'static,
) {
    *PENDING.lock().unwrap_or_else(PoisonError::into_inner) += 1;
    let name = plugin.to_owned();
    let spawned = std::thread::Builder::new()
        .name(format!("wshost-retire-{plugin}"))
        .spawn(move || {
            let _done = Done;
            let started = Instant::now();
            job();
            let elapsed = started.elapsed();
            if elapsed >= slow() {
                tracing::warn!(plugin = %name, generation, call = what,
                    elapsed_ms = crate::units::log_ms(elapsed),
                    "slow plugin {what}: it ran on a retirement thread, not on the I/O threads");
            }
        });
    if let Err(e) = spawned {
        *PENDING.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
        IDLE.notify_all();
        tracing::error!(plugin, generation, error = %e,
            "cannot start a thread to retire a generation; its {what} does not run");
    }
}

/// Marks one retirement finished, even if its plugin code panicked.
struct Done;

impl Drop for Done {
    fn drop(&mut self) {
        let mut pending = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
        *pending -= 1;
        IDLE.notify_all();
    }
}

/// Waits until every retirement started so far has finished, at most `timeout`; returns how
/// many are still running.
pub(crate) fn wait_idle(timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut pending = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
    while *pending > 0 {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        pending = IDLE
            .wait_timeout(pending, deadline - now)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    *pending
}
