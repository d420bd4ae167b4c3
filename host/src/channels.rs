//! Channels: host-owned publish/subscribe, one namespace per plugin, in memory.
//!
//! Owned by the host so that membership survives plugin reloads. A publish builds its message
//! once (a reference-counted buffer) and queues it to each subscriber's normal send queue, so a
//! slow subscriber never slows the publisher or the others.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use tokio_tungstenite::tungstenite::Message;

use crate::ws::conn::ConnShared;

type Subscribers = HashMap<u64, Arc<ConnShared>>;

/// All channels of all plugins.
#[derive(Debug, Default)]
pub struct Hub {
    /// plugin name → channel → connection id → connection.
    plugins: RwLock<HashMap<String, HashMap<String, Subscribers>>>,
}

impl Hub {
    /// Subscribes `conn` to `channel` of `plugin`; returns false if it already was.
    pub(crate) fn subscribe(&self, plugin: &str, channel: &str, conn: &Arc<ConnShared>) -> bool {
        let mut plugins = self.plugins.write().unwrap_or_else(PoisonError::into_inner);
        let channels = plugins.entry(plugin.to_owned()).or_default();
        let subs = channels.entry(channel.to_owned()).or_default();
        subs.insert(conn.id, Arc::clone(conn)).is_none()
    }

    /// Unsubscribes connection `id` from `channel` of `plugin`; returns whether it was there.
    pub(crate) fn unsubscribe(&self, plugin: &str, channel: &str, id: u64) -> bool {
        let mut plugins = self.plugins.write().unwrap_or_else(PoisonError::into_inner);
        let Some(channels) = plugins.get_mut(plugin) else {
            return false;
        };
        let Some(subs) = channels.get_mut(channel) else {
            return false;
        };
        let was = subs.remove(&id).is_some();
        if subs.is_empty() {
            channels.remove(channel);
        }
        was
    }

    /// Queues `msg` to every subscriber of `channel` of `plugin`; returns how many took it.
    pub(crate) fn publish(&self, plugin: &str, channel: &str, msg: &Message) -> u64 {
        let plugins = self.plugins.read().unwrap_or_else(PoisonError::into_inner);
        let Some(subs) = plugins.get(plugin).and_then(|c| c.get(channel)) else {
            return 0;
        };
        subs.values()
            .filter(|conn| conn.enqueue(msg.clone()).is_ok())
            .count() as u64
    }

    /// How many connections are subscribed to `channel` of `plugin`.
    pub(crate) fn subscribers(&self, plugin: &str, channel: &str) -> u64 {
        let plugins = self.plugins.read().unwrap_or_else(PoisonError::into_inner);
        plugins
            .get(plugin)
            .and_then(|c| c.get(channel))
            .map_or(0, |s| s.len() as u64)
    }

    /// How many channels `plugin` has with at least one subscriber.
    pub fn channel_count(&self, plugin: &str) -> usize {
        let plugins = self.plugins.read().unwrap_or_else(PoisonError::into_inner);
        plugins.get(plugin).map_or(0, HashMap::len)
    }
}
