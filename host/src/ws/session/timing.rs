//! A session's clock-driven policy: its timers and limits (`Timing`), the message rate
//! (`RateLimit`), the wake-ups besides its socket (`Alarms`), and every close code the host
//! itself sends (`CloseReason`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::limits::ConnLimits;

/// The connection's own timers, from the plugin's 101 over the host's defaults (the host-wide
/// ones — close timeout, message timeout, rate — are read from the config, not copied into every
/// connection).
///
/// Each in nanoseconds (0: off), 8 bytes rather than a `Duration`'s 16: every connection's
/// future holds them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    ping_interval: u64,
    pong_timeout: u64,
    idle_timeout: u64,
}

/// `d` in nanoseconds, bounded by [`crate::config::MAX_DURATION`] (a year: 3.2e16 ns, far
/// inside a `u64`), so that no deadline overflows the clock.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.min(crate::config::MAX_DURATION).as_nanos()).unwrap_or(u64::MAX)
}

impl Timing {
    /// `limits` has every value set (the host's defaults merged last).
    pub(super) fn new(limits: &ConnLimits) -> Self {
        // A plugin's 101 may carry any number of milliseconds: bounded.
        let bounded = |v: Option<Duration>| nanos(v.unwrap_or_default());
        Self {
            ping_interval: bounded(limits.ping_interval),
            pong_timeout: bounded(limits.pong_timeout),
            idle_timeout: bounded(limits.idle_timeout),
        }
    }

    pub(crate) fn ping_interval(&self) -> Option<Duration> {
        nonzero(Duration::from_nanos(self.ping_interval))
    }

    pub(crate) fn pong_timeout(&self) -> Duration {
        Duration::from_nanos(self.pong_timeout)
    }

    pub(crate) fn idle_timeout(&self) -> Option<Duration> {
        nonzero(Duration::from_nanos(self.idle_timeout))
    }

    /// The plugin changed the idle timeout (zero: off).
    pub(crate) fn set_idle_timeout(&mut self, idle: Duration) {
        self.idle_timeout = nanos(idle);
    }
}

/// `None` for zero (a timer that is off).
pub(crate) fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// The read loop's own clock: when data last came in and what is due next (the plugin's
/// timers are in `ConnShared`, the host-wide limits in the config).
#[derive(Debug)]
pub(super) struct Deadlines {
    pub(super) last_data_in: Instant,
    pub(super) next_ping: Option<Instant>,
    /// When the ping now unanswered was sent.
    pub(super) awaiting_pong: Option<Instant>,
    /// When the close handshake gives up, once it started.
    pub(super) close: Option<Instant>,
    /// When the connection is next looked at to be parked (none while it is).
    pub(super) park_at: Option<Instant>,
    /// Looks that found the connection busy since it opened or woke (capped).
    park_backoff: u8,
}

/// The first ping comes up to this fraction of the interval later than the interval (by the
/// connection's id): connections opened together are then not all pinged, and so not all
/// opened again from parked, in the same instant every interval after.
const PING_SPREAD: u32 = 4;

/// How much later than `interval` connection `id`'s first ping comes: less than
/// `interval / PING_SPREAD`, spread over ids by a multiplicative hash.
pub(super) fn ping_delay(interval: Duration, id: u64) -> Duration {
    let slot = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54; // 0..1024
    interval.mul_f64(slot as f64 / 1024.0 / f64::from(PING_SPREAD))
}

impl Deadlines {
    /// The clocks of connection `id`, opened at `started`.
    pub(super) fn new(started: Instant, timing: &Timing, id: u64) -> Self {
        Self {
            last_data_in: started,
            next_ping: timing
                .ping_interval()
                .map(|i| started + i + ping_delay(i, id)),
            awaiting_pong: None,
            close: None,
            park_at: Some(started + PARK_AFTER),
            park_backoff: 0,
        }
    }

    /// Starts the close handshake's clock unless it runs already; the new deadline, if set.
    pub(super) fn start_close(&mut self, timeout: Duration) -> Option<Instant> {
        if self.close.is_some() {
            return None;
        }
        self.close = Some(Instant::now() + timeout);
        self.close
    }

    /// The connection woke from parked: looked at from the start again; when.
    pub(super) fn woke(&mut self) -> Instant {
        let at = Instant::now() + PARK_AFTER;
        self.park_at = Some(at);
        self.park_backoff = 0;
        at
    }

    /// Whether the connection is due to be looked at to park at `now` (none while parked);
    /// if so, the next look is set twice as far as the last.
    pub(super) fn look_to_park(&mut self, now: Instant, parked: bool) -> bool {
        if parked {
            self.park_at = None;
            return false;
        }
        if self.park_at.is_none_or(|at| now < at) {
            return false;
        }
        self.park_backoff = (self.park_backoff + 1).min(PARK_BACKOFF_MAX);
        self.park_at = Some(now + PARK_AFTER * (1 << self.park_backoff));
        true
    }
}

/// When an open connection is first looked at to be parked (after it opens, or wakes from
/// parking): one that read nothing since the last look gives up its stream's memory until it
/// reads again (`Link`; sends to it are written parked). Each look that finds it busy doubles the wait for the
/// next, up to [`PARK_AFTER`] × 2^[`PARK_BACKOFF_MAX`] (32 s): a busy connection costs a timer
/// wake-up now and then, not one a second (measured: one a second added 12% to the CPU of a
/// fan-out to 10,000 connections that each get a message every 100 ms).
pub(super) const PARK_AFTER: Duration = Duration::from_secs(1);
const PARK_BACKOFF_MAX: u8 = 5;

/// What woke a session besides its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alarm {
    /// The host is shutting down (or the plugin's generation was replaced).
    Shutdown,
    /// The session's timer is due.
    Timer,
}

/// A session's timer and the host's shutdown, looked at after every socket event without
/// polling them each time: a waiting cancellation future takes the token's lock (shared by
/// every connection) whenever it is polled, and a timer takes the task's budget and
/// re-registers its waker. Each is polled once to register the task's waker (the timer again
/// after every reset); afterwards an atomic load tells whether it fired.
pub(crate) struct Alarms<'a, 't> {
    timer: Pin<&'a mut Sleep>,
    cancelled: Pin<&'a mut WaitForCancellationFuture<'t>>,
    shutdown: &'t CancellationToken,
    /// The timer was set since it was last polled: its waker is not registered yet.
    timer_fresh: bool,
    /// The cancellation future was polled (its waker is registered).
    cancel_armed: bool,
    /// Shutdown was reported: it is not reported again.
    pub(crate) shutting_down: bool,
}

impl<'a, 't> Alarms<'a, 't> {
    pub(crate) fn new(
        timer: Pin<&'a mut Sleep>,
        cancelled: Pin<&'a mut WaitForCancellationFuture<'t>>,
        shutdown: &'t CancellationToken,
    ) -> Self {
        Self {
            timer,
            cancelled,
            shutdown,
            timer_fresh: true,
            cancel_armed: false,
            shutting_down: false,
        }
    }

    /// Sets the timer to `at`.
    pub(crate) fn reset(&mut self, at: Instant) {
        self.timer.as_mut().reset(at);
        self.timer_fresh = true;
    }

    /// Sets the timer to `at` if that is earlier than it is set to.
    pub(crate) fn pull_in(&mut self, at: Instant) {
        if at < self.timer.deadline() {
            self.reset(at);
        }
    }

    /// Whether shutdown started or the timer fired since the last look (shutdown first).
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Alarm> {
        if !self.shutting_down {
            if self.shutdown.is_cancelled() {
                return Poll::Ready(Alarm::Shutdown);
            }
            if !self.cancel_armed {
                self.cancel_armed = true;
                if self.cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Alarm::Shutdown);
                }
            }
        }
        if self.timer_fresh {
            self.timer_fresh = false;
            if self.timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Alarm::Timer);
            }
        } else if self.timer.is_elapsed() {
            return Poll::Ready(Alarm::Timer);
        }
        Poll::Pending
    }
}

/// Why the host closes a connection itself, each with the code (RFC 6455 §7.4.1) and the reason
/// it sends; `on_close` is told the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The host is shutting down (SIGTERM): 1001.
    ShuttingDown,
    /// The connection's generation was replaced and `--replaced-grace` passed: 1012, so the
    /// client reconnects to the new one.
    ServiceRestart,
    /// No data messages either way for `--idle-timeout`: 1001.
    IdleTimeout,
    /// No pong within `--pong-timeout` (the peer is gone; `on_close` gets 1006): 1001.
    PingTimeout,
    /// The peer broke the protocol: 1002.
    ProtocolError,
    /// A text message that is not UTF-8: 1007.
    InvalidUtf8,
    /// A message did not arrive whole within `--message-timeout`: 1008.
    MessageTimeout,
    /// More messages per second than `--max-message-rate` (data messages, pings, pongs and
    /// continuation frames): 1008.
    RateLimit,
    /// A message or frame over the connection's limit: 1009.
    TooBig,
    /// A callback of the plugin panicked: 1011.
    PluginPanicked,
    /// The plugin's worker process died (crash, callback timeout, memory limit): 1011.
    PluginCrashed,
    /// Any other failure on the host's side: 1011.
    InternalError,
    /// Incoming data did not fit the host's memory budget (`--max-buffered-total`): 1013.
    MemoryBudget,
}

impl CloseReason {
    /// The close code sent.
    pub(crate) fn code(self) -> u16 {
        match self {
            Self::ShuttingDown | Self::IdleTimeout | Self::PingTimeout => 1001,
            Self::ProtocolError => 1002,
            Self::InvalidUtf8 => 1007,
            Self::MessageTimeout | Self::RateLimit => 1008,
            Self::TooBig => 1009,
            Self::ServiceRestart => 1012,
            Self::PluginPanicked | Self::PluginCrashed | Self::InternalError => 1011,
            Self::MemoryBudget => 1013,
        }
    }

    /// The close reason sent.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::ShuttingDown => "going away",
            Self::IdleTimeout => "idle timeout",
            Self::PingTimeout => "ping timeout",
            Self::ProtocolError => "protocol error",
            Self::InvalidUtf8 => "invalid UTF-8",
            Self::MessageTimeout => "message timeout",
            Self::RateLimit => "message rate limit exceeded",
            Self::TooBig => "message too big",
            Self::PluginPanicked | Self::InternalError => "internal error",
            Self::PluginCrashed => "plugin crashed",
            Self::MemoryBudget => "server busy: try again later",
            Self::ServiceRestart => "service restart",
        }
    }
}

/// A token bucket: `rate` messages a second, bursts of as many.
pub(super) struct RateLimit {
    /// Messages a second (an integer: 24 bytes in all, not 32, in every connection's future).
    pub(super) rate: u32,
    pub(super) tokens: f64,
    pub(super) at: Instant,
}

impl RateLimit {
    pub(super) fn new(rate: u32, now: Instant) -> Option<Self> {
        (rate > 0).then(|| Self {
            rate,
            tokens: f64::from(rate),
            at: now,
        })
    }

    /// Takes `n` tokens; false if there are fewer.
    pub(super) fn take(&mut self, now: Instant, n: u32) -> bool {
        let rate = f64::from(self.rate);
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(rate);
        self.at = now;
        let n = f64::from(n);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_refills_with_time() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(2, t0).expect("a limit");
        assert!(r.take(t0, 1));
        assert!(r.take(t0, 1));
        assert!(!r.take(t0, 1), "the burst is the rate");
        assert!(
            r.take(t0 + Duration::from_millis(500), 1),
            "half a second refills one"
        );
        assert!(!r.take(t0 + Duration::from_millis(500), 1));
        assert!(r.take(t0 + Duration::from_secs(60), 1));
        assert!(r.take(t0 + Duration::from_secs(60), 1));
        assert!(
            !r.take(t0 + Duration::from_secs(60), 1),
            "refills never past the burst"
        );
        assert!(RateLimit::new(0, t0).is_none(), "0 is off");
    }

    #[test]
    fn several_tokens_are_taken_at_once_or_none() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, t0).expect("a limit");
        assert!(r.take(t0, 7));
        assert!(!r.take(t0, 4), "three are left");
        assert!(r.take(t0, 3), "a refused take takes nothing");
        assert!(r.take(t0 + Duration::from_millis(500), 5));
    }

    #[test]
    fn a_plugins_timers_are_bounded_so_deadlines_never_overflow() {
        let settings = ConnLimits {
            ping_interval: Some(Duration::from_millis(u64::MAX)),
            pong_timeout: Some(Duration::from_millis(u64::MAX)),
            idle_timeout: Some(Duration::from_millis(u64::MAX)),
            ..ConnLimits::default()
        };
        let t = Timing::new(&settings);
        let max = crate::config::MAX_DURATION;
        assert_eq!(t.ping_interval(), Some(max));
        assert_eq!(t.pong_timeout(), max);
        assert_eq!(t.idle_timeout(), Some(max));
        // The session adds these to the clock: that must not panic.
        let _ = Instant::now() + max + max;
    }

    /// The next alarm, or `Err` if none comes within a (paused-time) day.
    async fn next_alarm(alarms: &mut Alarms<'_, '_>) -> Result<Alarm, tokio::time::error::Elapsed> {
        tokio::time::timeout(
            Duration::from_secs(86_400),
            std::future::poll_fn(|cx| alarms.poll(cx)),
        )
        .await
    }

    /// The alarms register the task's waker once per reset and are then looked at with atomic
    /// loads: the timer still wakes a task that was woken (and polled) by other events in
    /// between, shutdown wakes it once, and a reset timer fires at its new deadline. (Paused
    /// time: a waker that was not registered would let the clock run to the outer timeout.)
    #[tokio::test(start_paused = true)]
    async fn alarms_wake_the_task_after_other_wakeups_and_report_shutdown_once() {
        let token = CancellationToken::new();
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        let cancelled = token.cancelled();
        tokio::pin!(cancelled);
        let mut alarms = Alarms::new(timer, cancelled, &token);
        let t0 = Instant::now();
        alarms.reset(t0 + Duration::from_secs(1));
        // Three other wake-ups before the timer is due, each followed by a look at the alarms.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = tx.send(());
            }
        });
        let mut others = 0;
        let first = tokio::time::timeout(
            Duration::from_secs(86_400),
            std::future::poll_fn(|cx| {
                while let Poll::Ready(Some(())) = rx.poll_recv(cx) {
                    others += 1;
                }
                alarms.poll(cx)
            }),
        )
        .await
        .expect("the timer wakes the task");
        assert_eq!(first, Alarm::Timer);
        assert_eq!(others, 3);
        assert_eq!(Instant::now(), t0 + Duration::from_secs(1));

        alarms.reset(t0 + Duration::from_secs(10));
        let canceller = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            canceller.cancel();
        });
        let second = next_alarm(&mut alarms)
            .await
            .expect("shutdown wakes the task");
        assert_eq!(second, Alarm::Shutdown);
        assert_eq!(Instant::now(), t0 + Duration::from_secs(3));

        // Reported once: after it, the timer set before it still fires at its deadline.
        alarms.shutting_down = true;
        let third = next_alarm(&mut alarms)
            .await
            .expect("the timer wakes the task");
        assert_eq!(third, Alarm::Timer);
        assert_eq!(Instant::now(), t0 + Duration::from_secs(10));
    }

    #[test]
    fn first_pings_spread_over_a_quarter_of_the_interval() {
        let interval = Duration::from_secs(30);
        let delays: Vec<Duration> = (0..1000).map(|id| ping_delay(interval, id)).collect();
        assert!(delays.iter().all(|d| *d < interval / 4));
        // Spread: every 1.5 s step of the 7.5 s range holds some of 1,000 consecutive ids.
        for step in 0..5 {
            let (lo, hi) = (
                Duration::from_millis(1500 * step),
                Duration::from_millis(1500 * (step + 1)),
            );
            assert!(
                delays.iter().filter(|d| **d >= lo && **d < hi).count() > 100,
                "{step}"
            );
        }
    }
}
