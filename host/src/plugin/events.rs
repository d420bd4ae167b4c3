//! A generation's plugin-level events: its timers (`Host::set_timer` → `Plugin::on_timer`) and
//! the channels it watches (`Host::watch` → `Plugin::on_channel`), queued (bounded) and run one
//! at a time, in order, by one task — inline on the plugin's runtime, in a worker on the
//! worker's.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::channels::{WatchEvent, Watcher};

/// Events waiting for the plugin; past it a channel's events are dropped (and logged).
const QUEUE: usize = 4096;

/// What the events task is told.
#[derive(Debug)]
pub(crate) enum PluginEvent {
    SetTimer(u64, Instant),
    CancelTimer(u64),
    Channel {
        channel: String,
        kind: u8,
        data: bytes::Bytes,
    },
}

/// One call into the plugin.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Call<'a> {
    Timer(u64),
    Channel {
        channel: &'a str,
        kind: u8,
        data: &'a [u8],
    },
}

impl Call<'_> {
    /// The call's name, for the watchdog and logs.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Call::Timer(_) => "on_timer",
            Call::Channel { .. } => "on_channel",
        }
    }
}

/// A generation's event queue and its armed timers.
#[derive(Debug)]
pub(crate) struct Events {
    plugin: String,
    tx: mpsc::Sender<PluginEvent>,
    rx: Mutex<Option<mpsc::Receiver<PluginEvent>>>,
    /// The armed timers' tags (the task keeps their deadlines).
    armed: Mutex<HashSet<u64>>,
    /// Channel events dropped because the queue was full.
    dropped: AtomicU64,
}

impl Events {
    pub(crate) fn new(plugin: &str) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        Arc::new(Self {
            plugin: plugin.to_owned(),
            tx,
            rx: Mutex::new(Some(rx)),
            armed: Mutex::default(),
            dropped: AtomicU64::new(0),
        })
    }

    /// Arms (or moves) timer `tag`; false past [`plugin_api::MAX_PLUGIN_TIMERS`] or if the
    /// queue is full.
    pub(crate) fn set_timer(&self, tag: u64, after: Duration) -> bool {
        let at = Instant::now() + after.min(crate::units::MAX_DURATION);
        let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
        if !armed.contains(&tag) && armed.len() >= plugin_api::MAX_PLUGIN_TIMERS {
            return false;
        }
        if self.tx.try_send(PluginEvent::SetTimer(tag, at)).is_err() {
            return false;
        }
        armed.insert(tag);
        true
    }

    /// Disarms timer `tag`; whether it was armed.
    pub(crate) fn cancel_timer(&self, tag: u64) -> bool {
        let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
        if !armed.remove(&tag) {
            return false;
        }
        // A full queue cannot cancel: the tag is no longer armed, so the task skips it.
        let _ = self.tx.try_send(PluginEvent::CancelTimer(tag));
        true
    }

    /// Queues a channel event (from the hub, or from the host's frame in a worker).
    pub(crate) fn channel(&self, channel: &str, kind: u8, data: bytes::Bytes) {
        let event = PluginEvent::Channel {
            channel: channel.to_owned(),
            kind,
            data,
        };
        if self.tx.try_send(event).is_err() && self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(plugin = %self.plugin, channel,
                "a watched channel's events come faster than on_channel takes them: \
                 dropping them (logged once)");
        }
    }

    /// The receiving end, for the task that runs the events (once).
    pub(crate) fn take_receiver(&self) -> Option<mpsc::Receiver<PluginEvent>> {
        self.rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl Watcher for Events {
    fn event(&self, channel: &str, event: WatchEvent<'_>) {
        let (kind, data) = match event {
            WatchEvent::Joined(m) | WatchEvent::Left(m) => (
                if matches!(event, WatchEvent::Joined(_)) {
                    plugin_api::abi::channel_event::JOINED
                } else {
                    plugin_api::abi::channel_event::LEFT
                },
                bytes::Bytes::from(serde_json::to_vec(m).unwrap_or_default()),
            ),
            // The publish's buffer itself, not a copy.
            WatchEvent::Message(Message::Text(t)) => (
                plugin_api::abi::channel_event::TEXT,
                bytes::Bytes::from(t.clone()),
            ),
            WatchEvent::Message(Message::Binary(b)) => {
                (plugin_api::abi::channel_event::BINARY, b.clone())
            }
            WatchEvent::Message(_) => return,
        };
        self.channel(channel, kind, data);
    }
}

/// Runs the events of `rx` until `call` says the generation is gone (returns false) or every
/// sender is gone: timers fire when due (earliest first), channel events in order.
pub(crate) async fn run(
    mut rx: mpsc::Receiver<PluginEvent>,
    events: Arc<Events>,
    mut call: impl FnMut(Call<'_>) -> bool,
) {
    let mut timers: HashMap<u64, Instant> = HashMap::new();
    loop {
        let next = timers.values().min().copied();
        let event = tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => Some(ev),
                None => return,
            },
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => None,
        };
        match event {
            Some(PluginEvent::SetTimer(tag, at)) => {
                timers.insert(tag, at);
            }
            Some(PluginEvent::CancelTimer(tag)) => {
                timers.remove(&tag);
            }
            Some(PluginEvent::Channel {
                channel,
                kind,
                data,
            }) => {
                if !call(Call::Channel {
                    channel: &channel,
                    kind,
                    data: &data,
                }) {
                    return;
                }
            }
            None => {
                let now = Instant::now();
                let mut due: Vec<(Instant, u64)> = timers
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(tag, at)| (*at, *tag))
                    .collect();
                due.sort_unstable();
                for (_, tag) in due {
                    timers.remove(&tag);
                    let armed = events
                        .armed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&tag);
                    if armed && !call(Call::Timer(tag)) {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn timers_fire_when_due_earliest_first_and_cancelled_ones_never() {
        let events = Events::new("p");
        let rx = events.take_receiver().unwrap();
        assert!(events.set_timer(1, Duration::from_secs(5)));
        assert!(events.set_timer(2, Duration::from_secs(2)));
        assert!(events.set_timer(3, Duration::from_secs(1)));
        assert!(events.cancel_timer(3));
        assert!(!events.cancel_timer(3));
        events.channel("room", plugin_api::abi::channel_event::TEXT, "hi".into());
        let fired = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&fired);
        let started = Instant::now();
        let task = tokio::spawn(run(rx, Arc::clone(&events), move |call| {
            let what = match call {
                Call::Timer(t) => format!("timer {t} at {}s", started.elapsed().as_secs()),
                Call::Channel { channel, data, .. } => {
                    format!("{channel} {}", String::from_utf8_lossy(data))
                }
            };
            let mut seen = seen.lock().unwrap();
            seen.push(what);
            seen.len() < 3
        }));
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the task ends once told to")
            .unwrap();
        assert_eq!(
            *fired.lock().unwrap(),
            ["room hi", "timer 2 at 2s", "timer 1 at 5s"]
        );
        assert!(!events.cancel_timer(1), "a fired timer is no longer armed");
    }

    #[test]
    fn at_most_so_many_timers() {
        let events = Events::new("p");
        for tag in 0..plugin_api::MAX_PLUGIN_TIMERS as u64 {
            assert!(events.set_timer(tag, Duration::from_secs(1)));
        }
        assert!(!events.set_timer(u64::MAX, Duration::from_secs(1)));
        assert!(
            events.set_timer(0, Duration::from_secs(2)),
            "moving one is fine"
        );
    }
}
