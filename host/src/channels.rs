//! Channels: host-owned publish/subscribe, one namespace per plugin, in memory, shared with
//! other hosts through the Redis bus when one is configured.
//!
//! Owned by the host so that membership survives plugin reloads. A publish builds its message
//! once (a reference-counted buffer) and queues it to each subscriber's normal send queue, so a
//! slow subscriber never slows the publisher or the others. With a bus, the first subscriber of
//! a channel makes the host subscribe to it in Redis and the last one leaving unsubscribes; a
//! publish is delivered here directly and handed to the bus for the other hosts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tokio_tungstenite::tungstenite::Message;

/// Where channels are shared beyond this host (the Redis bus); the hub tells it which channels
/// have local subscribers and hands it every publish.
pub(crate) trait Engine: Send + Sync + std::fmt::Debug {
    /// `channel` of `plugin` got its first local subscriber.
    fn want(&self, plugin: &str, channel: &str);
    /// `channel` of `plugin` lost its last local subscriber.
    fn unwant(&self, plugin: &str, channel: &str);
    /// A publish made on this host, for the others.
    fn publish(&self, plugin: &str, channel: &str, msg: &Message);
}

/// What a channel delivers to: a connection, as far as channels go.
pub(crate) trait Subscriber: Send + Sync + std::fmt::Debug {
    /// Queues `msg`; false if it was not taken (closed, queue full, too large).
    fn deliver(&self, msg: Message) -> bool;
}

type Subscribers = HashMap<u64, Arc<dyn Subscriber>>;

/// One channel. Its lock is held for the whole of a publish, so every subscriber sees the
/// channel's messages in the same order (a reply published after a message is never delivered
/// before it). Enqueueing never blocks, so the lock is short.
#[derive(Debug, Default)]
struct Channel {
    subs: Mutex<Subscribers>,
}

impl Channel {
    fn subs(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// All channels of all plugins.
#[derive(Debug, Default)]
pub struct Hub {
    /// plugin name → channel name → channel.
    plugins: RwLock<HashMap<String, HashMap<String, Arc<Channel>>>>,
    /// The engine sharing channels with other hosts (the Redis bus), if any.
    bus: Option<Box<dyn Engine>>,
}

impl Hub {
    /// A hub whose channels other hosts share through `bus`.
    pub(crate) fn with_bus(bus: Box<dyn Engine>) -> Self {
        Self {
            plugins: RwLock::default(),
            bus: Some(bus),
        }
    }

    fn channel(&self, plugin: &str, channel: &str) -> Option<Arc<Channel>> {
        let plugins = self.plugins.read().unwrap_or_else(PoisonError::into_inner);
        plugins.get(plugin).and_then(|c| c.get(channel)).cloned()
    }

    /// Subscribes `conn` (connection `id`) to `channel` of `plugin`; returns false if it
    /// already was.
    pub(crate) fn subscribe(
        &self,
        plugin: &str,
        channel: &str,
        id: u64,
        conn: Arc<dyn Subscriber>,
    ) -> bool {
        let mut plugins = self.plugins.write().unwrap_or_else(PoisonError::into_inner);
        let channels = plugins.entry(plugin.to_owned()).or_default();
        let ch = match channels.get(channel) {
            Some(ch) => ch,
            None => {
                // Under the write lock, so the bus sees wants and unwants in their real order.
                if let Some(bus) = &self.bus {
                    bus.want(plugin, channel);
                }
                channels.entry(channel.to_owned()).or_default()
            }
        };
        let added = ch.subs().insert(id, conn).is_none();
        added
    }

    /// Unsubscribes connection `id` from `channel` of `plugin`; returns whether it was there.
    pub(crate) fn unsubscribe(&self, plugin: &str, channel: &str, id: u64) -> bool {
        let mut plugins = self.plugins.write().unwrap_or_else(PoisonError::into_inner);
        let Some(channels) = plugins.get_mut(plugin) else {
            return false;
        };
        let Some(ch) = channels.get(channel) else {
            return false;
        };
        let mut subs = ch.subs();
        let was = subs.remove(&id).is_some();
        let empty = subs.is_empty();
        drop(subs);
        if empty {
            channels.remove(channel);
            if let Some(bus) = &self.bus {
                bus.unwant(plugin, channel);
            }
        }
        was
    }

    /// Queues `msg` to every local subscriber of `channel` of `plugin` and hands it to the bus
    /// for the other hosts; returns how many local subscribers took it.
    pub(crate) fn publish(&self, plugin: &str, channel: &str, msg: &Message) -> u64 {
        let Some(ch) = self.channel(plugin, channel) else {
            if let Some(bus) = &self.bus {
                bus.publish(plugin, channel, msg);
            }
            return 0;
        };
        let subs = ch.subs();
        let local = subs
            .values()
            .filter(|conn| conn.deliver(msg.clone()))
            .count() as u64;
        // Still under the channel's lock: other hosts get this host's publishes in the order
        // its own subscribers do.
        if let Some(bus) = &self.bus {
            bus.publish(plugin, channel, msg);
        }
        local
    }

    /// Queues `msg` to every local subscriber of `channel` of `plugin`; returns how many took it.
    pub(crate) fn deliver(&self, plugin: &str, channel: &str, msg: &Message) -> u64 {
        let Some(ch) = self.channel(plugin, channel) else {
            return 0;
        };
        let subs = ch.subs();
        subs.values()
            .filter(|conn| conn.deliver(msg.clone()))
            .count() as u64
    }

    /// How many connections of this host are subscribed to `channel` of `plugin`.
    pub(crate) fn subscribers(&self, plugin: &str, channel: &str) -> u64 {
        self.channel(plugin, channel)
            .map_or(0, |ch| ch.subs().len() as u64)
    }
}
