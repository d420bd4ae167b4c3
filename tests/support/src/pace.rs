//! The load generator's pacer: a clock in nanoseconds and a wait that does not spin.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The clock: nanoseconds since the process first read it.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Waits until the clock reads `t`, in a plain thread with `nanosleep` (tokio's timers tick in
/// milliseconds, far too coarse for pacing). It does not spin: on two CPUs the pacer shares its
/// CPU with the client's runtime, and a spinning pacer would delay the very answers it
/// measures. The kernel's timer slack (50 µs unless [`precise_timers`]) makes a send up to that
/// late; callers measure latency from `t`, so the lateness counts.
pub fn wait_until(t: u64) {
    let now = now_ns();
    if now < t {
        std::thread::sleep(Duration::from_nanos(t - now));
    }
}

/// Makes this thread's sleeps end within ~1 µs of their time instead of the kernel's default
/// 50 µs timer slack.
pub fn precise_timers() {
    let _ = nix::sys::prctl::set_timerslack(1);
}
