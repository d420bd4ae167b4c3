//! Per-connection limits: one type, [`ConnLimits`], for every place they are set — the host's
//! flags (its defaults, all set), a plugin's config file section, one of its routes' sections,
//! and the plugin's own 101 — merged in that order of precedence, last first, with
//! [`ConnLimits::over`].

use std::time::Duration;

/// Default largest message: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 1 << 20;
/// Default largest frame: 1 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: u64 = 1 << 20;
/// Default send queue: 1 MiB.
pub const DEFAULT_MAX_SEND_QUEUE: u64 = 1 << 20;
/// Default ping interval: 30 s.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Default pong timeout: 10 s.
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle timeout: 300 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default smallest message sent compressed: 128 bytes (smaller ones gain nothing).
pub const DEFAULT_COMPRESSION_MIN_SIZE: u64 = 128;

/// Limits of one connection; `None` leaves a limit to the next, lower source.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnLimits {
    /// Largest message; larger ones close with 1009.
    pub max_message_size: Option<u64>,
    /// Largest frame; larger ones close with 1009.
    pub max_frame_size: Option<u64>,
    /// Bytes queued for sending before sends fail with `QueueFull`.
    pub max_send_queue: Option<u64>,
    /// How often the host pings (zero: never).
    pub ping_interval: Option<Duration>,
    /// How long a pong may take before the connection is dropped.
    pub pong_timeout: Option<Duration>,
    /// Close after this long without data messages either way (zero: never).
    pub idle_timeout: Option<Duration>,
    /// Whether permessage-deflate is accepted when the client offers it.
    #[serde(default)]
    pub compression: Option<bool>,
    /// Outgoing messages smaller than this many bytes go uncompressed.
    #[serde(default)]
    pub compression_min_size: Option<u64>,
}

impl ConnLimits {
    /// The host's built-in defaults: every limit set.
    pub const fn host_defaults() -> Self {
        Self {
            max_message_size: Some(DEFAULT_MAX_MESSAGE_SIZE),
            max_frame_size: Some(DEFAULT_MAX_FRAME_SIZE),
            max_send_queue: Some(DEFAULT_MAX_SEND_QUEUE),
            ping_interval: Some(DEFAULT_PING_INTERVAL),
            pong_timeout: Some(DEFAULT_PONG_TIMEOUT),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            compression: Some(true),
            compression_min_size: Some(DEFAULT_COMPRESSION_MIN_SIZE),
        }
    }

    /// These limits where set, `under`'s elsewhere.
    #[must_use]
    pub fn over(self, under: ConnLimits) -> ConnLimits {
        ConnLimits {
            max_message_size: self.max_message_size.or(under.max_message_size),
            max_frame_size: self.max_frame_size.or(under.max_frame_size),
            max_send_queue: self.max_send_queue.or(under.max_send_queue),
            ping_interval: self.ping_interval.or(under.ping_interval),
            pong_timeout: self.pong_timeout.or(under.pong_timeout),
            idle_timeout: self.idle_timeout.or(under.idle_timeout),
            compression: self.compression.or(under.compression),
            compression_min_size: self.compression_min_size.or(under.compression_min_size),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_higher_source_wins_where_it_sets_a_limit() {
        let plugin = ConnLimits {
            max_message_size: Some(10),
            idle_timeout: Some(Duration::from_secs(1)),
            ..ConnLimits::default()
        };
        let answer = ConnLimits {
            max_message_size: Some(5),
            ..ConnLimits::default()
        };
        let merged = answer.over(plugin).over(ConnLimits::host_defaults());
        assert_eq!(merged.max_message_size, Some(5));
        assert_eq!(merged.idle_timeout, Some(Duration::from_secs(1)));
        assert_eq!(merged.max_frame_size, Some(DEFAULT_MAX_FRAME_SIZE));
        assert_eq!(merged.ping_interval, Some(DEFAULT_PING_INTERVAL));
    }
}
