//! A session's clock-driven policy: its timers and limits (`Timing`), the message rate
//! (`RateLimit`), and every close code the host itself sends (`CloseReason`).

use std::time::Duration;

use tokio::time::Instant;

use crate::limits::ConnLimits;

/// The connection's own timers, from the plugin's 101 over the host's defaults (the host-wide
/// ones — close timeout, message timeout, rate — are read from the config, not copied into every
/// connection).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) ping_interval: Option<Duration>,
    pub(crate) pong_timeout: Duration,
    pub(crate) idle_timeout: Option<Duration>,
}

impl Timing {
    /// `limits` has every value set (the host's defaults merged last).
    pub(super) fn new(limits: &ConnLimits) -> Self {
        // A plugin's 101 may carry any number of milliseconds: bounded, so that no deadline
        // overflows the clock.
        let bounded = |v: Option<Duration>| v.unwrap_or_default().min(crate::config::MAX_DURATION);
        Self {
            ping_interval: nonzero(bounded(limits.ping_interval)),
            pong_timeout: bounded(limits.pong_timeout),
            idle_timeout: nonzero(bounded(limits.idle_timeout)),
        }
    }
}

/// `None` for zero (a timer that is off).
pub(crate) fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
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
    /// More data messages per second than `--max-message-rate`: 1008.
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
    pub(super) rate: f64,
    pub(super) tokens: f64,
    pub(super) at: Instant,
}

impl RateLimit {
    pub(super) fn new(rate: u32, now: Instant) -> Option<Self> {
        (rate > 0).then(|| Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: now,
        })
    }

    /// Takes one token; false if there is none.
    pub(super) fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
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
        assert!(r.take(t0));
        assert!(r.take(t0));
        assert!(!r.take(t0), "the burst is the rate");
        assert!(
            r.take(t0 + Duration::from_millis(500)),
            "half a second refills one"
        );
        assert!(!r.take(t0 + Duration::from_millis(500)));
        assert!(r.take(t0 + Duration::from_secs(60)));
        assert!(r.take(t0 + Duration::from_secs(60)));
        assert!(
            !r.take(t0 + Duration::from_secs(60)),
            "refills never past the burst"
        );
        assert!(RateLimit::new(0, t0).is_none(), "0 is off");
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
        assert_eq!(t.ping_interval, Some(max));
        assert_eq!(t.pong_timeout, max);
        assert_eq!(t.idle_timeout, Some(max));
        // The session adds these to the clock: that must not panic.
        let _ = Instant::now() + max + max;
    }
}
