//! Channels: host-owned publish/subscribe, one namespace per plugin, in memory, shared with
//! other hosts through the Redis bus when one is configured.
//!
//! Owned by the host so that membership survives plugin reloads. A publish builds its message
//! once (a reference-counted buffer) and queues it to each subscriber's normal send queue, so a
//! slow subscriber never slows the publisher or the others. Parked subscribers are not woken:
//! after the channel's lock is released, sweep tasks write their queues out on their sockets
//! (see [`Subscriber::sweep`]). With a bus, the first subscriber of
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
    /// Queues `msg` as [`Subscriber::deliver`] does, but leaves a parked subscriber asleep
    /// (`Deferred`): then [`Subscriber::sweep`] must follow.
    fn deliver_quietly(&self, msg: Message) -> Delivery;
    /// Writes what was delivered quietly, or wakes the subscriber to write it.
    fn sweep(&self, now: tokio::time::Instant);
    /// The connection as a member list shows it.
    fn member(&self) -> Member;
}

/// What a quiet delivery ([`Subscriber::deliver_quietly`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Not taken (closed, queue full, too large).
    Refused,
    /// Queued, and the session woken (or in its own callback).
    Queued,
    /// Queued without waking the subscriber (its parked socket is lent): a sweep must follow.
    Deferred,
}

/// A channel's member: a subscribed connection of this host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Member {
    pub(crate) id: u64,
    pub(crate) remote_addr: String,
    pub(crate) label: String,
}

/// What a watched channel tells its watcher.
#[derive(Debug, Clone, Copy)]
pub(crate) enum WatchEvent<'a> {
    /// A connection subscribed.
    Joined(&'a Member),
    /// A connection unsubscribed or closed.
    Left(&'a Member),
    /// A message was published (here, or on another host through the bus).
    Message(&'a Message),
}

/// A plugin generation watching channels (`Host::watch`). Called under the channel's lock, in
/// the channel's order: it must not block (it queues).
pub(crate) trait Watcher: Send + Sync + std::fmt::Debug {
    fn event(&self, channel: &str, event: WatchEvent<'_>);
}

type Subscribers = HashMap<u64, Arc<dyn Subscriber>>;
type Watchers = Vec<(u64, Arc<dyn Watcher>)>;

/// One channel. Its lock is held for the whole of a publish, so every subscriber sees the
/// channel's messages in the same order (a reply published after a message is never delivered
/// before it). Enqueueing never blocks, so the lock is short.
#[derive(Debug, Default)]
struct Channel {
    subs: Mutex<Subscribers>,
    /// Plugin generations watching it, by key (their generation). Taken under `subs`' lock.
    watchers: Mutex<Watchers>,
}

impl Channel {
    fn subs(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn watchers(&self) -> std::sync::MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells every watcher `event` (call with `subs` locked, so watchers see the channel's
    /// order).
    fn tell(&self, channel: &str, event: WatchEvent<'_>) {
        for (_, w) in self.watchers().iter() {
            w.event(channel, event);
        }
    }

    /// Neither subscribers nor watchers: the channel can go.
    fn unused(subs: &Subscribers, ch: &Channel) -> bool {
        subs.is_empty() && ch.watchers().is_empty()
    }
}

/// Subscribers a publish queued to without waking them, with the runtime their sweep runs
/// on.
struct Later {
    runtime: tokio::runtime::Handle,
    subs: Vec<Arc<dyn Subscriber>>,
}

/// Queues `msg` to every subscriber (called under the channel's lock, so all of them get the
/// channel's messages in one order); how many took it, and the parked ones left asleep for
/// [`sweep`]. Outside a runtime (a plugin's own thread) every subscriber is woken instead.
fn queue_to(subs: &Subscribers, msg: &Message) -> (u64, Option<Later>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        let n = subs.values().filter(|c| c.deliver(msg.clone())).count();
        return (n as u64, None);
    };
    let mut later = Vec::new();
    let mut n = 0;
    for conn in subs.values() {
        match conn.deliver_quietly(msg.clone()) {
            Delivery::Refused => continue,
            Delivery::Queued => {}
            Delivery::Deferred => {
                if later.is_empty() {
                    later.reserve(subs.len());
                }
                later.push(Arc::clone(conn));
            }
        }
        n += 1;
    }
    let later = (!later.is_empty()).then_some(Later {
        runtime,
        subs: later,
    });
    (n, later)
}

/// How many subscribers a sweep writes to before it lets the worker run other tasks.
const SWEEP_TURN: usize = 256;

/// One sweep's share of the subscribers a publish left asleep, and how far it has come.
/// Dropped before it is done (its runtime shut down before or while it ran), it sweeps the
/// rest at once: no delivery is left queued with no one to write it or wake its session.
struct Sweep {
    subs: Vec<Arc<dyn Subscriber>>,
    done: usize,
}

impl Sweep {
    /// Writes (or wakes) the next [`SWEEP_TURN`] subscribers; false once all are done.
    fn turn(&mut self) -> bool {
        let end = (self.done + SWEEP_TURN).min(self.subs.len());
        let now = tokio::time::Instant::now();
        for sub in &self.subs[self.done..end] {
            sub.sweep(now);
        }
        self.done = end;
        end < self.subs.len()
    }
}

impl Drop for Sweep {
    fn drop(&mut self) {
        while self.turn() {}
    }
}

/// Writes what [`queue_to`] left to parked subscribers: one task per worker of the runtime
/// the publish ran on, each over its share, yielding every [`SWEEP_TURN`] subscribers.
/// Outside the channel's lock: the order is the queues', which the sweep only writes out.
fn sweep(later: Option<Later>) {
    let Some(Later { runtime, mut subs }) = later else {
        return;
    };
    let tasks = runtime.metrics().num_workers().clamp(1, 16);
    let share = subs.len().div_ceil(tasks).max(SWEEP_TURN);
    while !subs.is_empty() {
        let mut part = Sweep {
            subs: subs.split_off(subs.len().saturating_sub(share)),
            done: 0,
        };
        // (Unconstrained: each write would take one of the task's 128 units of tokio's
        // budget, and the writes past it would find the socket "not ready". The sweep
        // yields by itself.)
        runtime.spawn(tokio::task::unconstrained(async move {
            while part.turn() {
                tokio::task::yield_now().await;
            }
        }));
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

    /// `channel` of `plugin`, made if it does not exist (and then wanted from the bus: under
    /// the write lock, so the bus sees wants and unwants in their real order).
    fn open<'a>(
        &self,
        plugins: &'a mut HashMap<String, HashMap<String, Arc<Channel>>>,
        plugin: &str,
        channel: &str,
    ) -> &'a Arc<Channel> {
        let channels = plugins.entry(plugin.to_owned()).or_default();
        if !channels.contains_key(channel) {
            if let Some(bus) = &self.bus {
                bus.want(plugin, channel);
            }
        }
        channels.entry(channel.to_owned()).or_default()
    }

    /// Removes `channel` of `plugin` once it has neither subscribers nor watchers (and tells
    /// the bus). Called under the write lock.
    fn close_if_unused(
        &self,
        channels: &mut HashMap<String, Arc<Channel>>,
        plugin: &str,
        channel: &str,
    ) {
        let unused = channels
            .get(channel)
            .is_some_and(|ch| Channel::unused(&ch.subs(), ch));
        if unused {
            channels.remove(channel);
            if let Some(bus) = &self.bus {
                bus.unwant(plugin, channel);
            }
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
        let ch = self.open(&mut plugins, plugin, channel);
        let mut subs = ch.subs();
        let member = conn.member();
        let added = subs.insert(id, conn).is_none();
        if added {
            ch.tell(channel, WatchEvent::Joined(&member));
        }
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
        let removed = subs.remove(&id);
        if let Some(conn) = &removed {
            ch.tell(channel, WatchEvent::Left(&conn.member()));
        }
        let was = removed.is_some();
        drop(subs);
        self.close_if_unused(channels, plugin, channel);
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
        let (local, later) = queue_to(&subs, msg);
        ch.tell(channel, WatchEvent::Message(msg));
        // Still under the channel's lock: other hosts get this host's publishes in the order
        // its own subscribers do.
        if let Some(bus) = &self.bus {
            bus.publish(plugin, channel, msg);
        }
        drop(subs);
        sweep(later);
        local
    }

    /// Queues `msg` to every local subscriber of `channel` of `plugin`; returns how many took it.
    pub(crate) fn deliver(&self, plugin: &str, channel: &str, msg: &Message) -> u64 {
        let Some(ch) = self.channel(plugin, channel) else {
            return 0;
        };
        let subs = ch.subs();
        let (n, later) = queue_to(&subs, msg);
        ch.tell(channel, WatchEvent::Message(msg));
        drop(subs);
        sweep(later);
        n
    }

    /// This host's members of `channel` of `plugin`, by connection id.
    pub(crate) fn members(&self, plugin: &str, channel: &str) -> Vec<Member> {
        let Some(ch) = self.channel(plugin, channel) else {
            return Vec::new();
        };
        let mut members: Vec<Member> = ch.subs().values().map(|c| c.member()).collect();
        members.sort_by_key(|m| m.id);
        members
    }

    /// `watcher` (key `key`: its generation) watches `channel` of `plugin`: its joins, leaves
    /// and messages. With a bus, the channel is wanted from Redis as if it had a subscriber.
    /// Returns false if that key watched it already.
    pub(crate) fn watch(
        &self,
        plugin: &str,
        channel: &str,
        key: u64,
        watcher: Arc<dyn Watcher>,
    ) -> bool {
        let mut plugins = self.plugins.write().unwrap_or_else(PoisonError::into_inner);
        let ch = self.open(&mut plugins, plugin, channel);
        let _subs = ch.subs();
        let mut watchers = ch.watchers();
        if watchers.iter().any(|(k, _)| *k == key) {
            return false;
        }
        watchers.push((key, watcher));
        true
    }

    /// Stops `key`'s watch of `channel` of `plugin`; whether it watched it.
    pub(crate) fn unwatch(&self, plugin: &str, channel: &str, key: u64) -> bool {
        let mut plugins = self.plugins.write().unwrap_or_else(PoisonError::into_inner);
        let Some(channels) = plugins.get_mut(plugin) else {
            return false;
        };
        let Some(ch) = channels.get(channel) else {
            return false;
        };
        let was = {
            let _subs = ch.subs();
            let mut watchers = ch.watchers();
            let before = watchers.len();
            watchers.retain(|(k, _)| *k != key);
            watchers.len() != before
        };
        self.close_if_unused(channels, plugin, channel);
        was
    }

    /// Stops every watch of `key` (a generation that ended, a worker that died).
    pub(crate) fn unwatch_all(&self, plugin: &str, key: u64) {
        let watched: Vec<String> = {
            let plugins = self.plugins.read().unwrap_or_else(PoisonError::into_inner);
            let Some(channels) = plugins.get(plugin) else {
                return;
            };
            channels
                .iter()
                .filter(|(_, ch)| ch.watchers().iter().any(|(k, _)| *k == key))
                .map(|(name, _)| name.clone())
                .collect()
        };
        for channel in watched {
            self.unwatch(plugin, &channel, key);
        }
    }

    /// How many connections of this host are subscribed to `channel` of `plugin`.
    pub(crate) fn subscribers(&self, plugin: &str, channel: &str) -> u64 {
        self.channel(plugin, channel)
            .map_or(0, |ch| ch.subs().len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A subscriber that counts what it was given, parked (its deliveries deferred) or not.
    #[derive(Debug, Default)]
    struct Counting {
        parked: bool,
        delivered: AtomicUsize,
        quiet: AtomicUsize,
        swept: AtomicUsize,
    }

    impl Subscriber for Counting {
        fn deliver(&self, _: Message) -> bool {
            self.delivered.fetch_add(1, Ordering::SeqCst);
            true
        }
        fn deliver_quietly(&self, _: Message) -> Delivery {
            self.quiet.fetch_add(1, Ordering::SeqCst);
            if self.parked {
                Delivery::Deferred
            } else {
                Delivery::Queued
            }
        }
        fn sweep(&self, _: tokio::time::Instant) {
            self.swept.fetch_add(1, Ordering::SeqCst);
        }
        fn member(&self) -> Member {
            Member {
                id: 0,
                remote_addr: String::new(),
                label: String::new(),
            }
        }
    }

    fn subscribers(hub: &Hub, ids: std::ops::Range<u64>, parked: bool) -> Vec<Arc<Counting>> {
        ids.map(|id| {
            let sub = Arc::new(Counting {
                parked,
                ..Counting::default()
            });
            let dyn_sub: Arc<dyn Subscriber> = Arc::clone(&sub) as _;
            assert!(hub.subscribe("p", "room", id, dyn_sub));
            sub
        })
        .collect()
    }

    fn total(subs: &[Arc<Counting>], f: impl Fn(&Counting) -> &AtomicUsize) -> usize {
        subs.iter().map(|s| f(s).load(Ordering::SeqCst)).sum()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_sweeps_every_parked_subscriber_once_and_wakes_the_others() {
        let hub = Hub::default();
        let parked = subscribers(&hub, 0..1000, true);
        let open = subscribers(&hub, 1000..1010, false);
        assert_eq!(hub.publish("p", "room", &Message::text("hi")), 1010);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while total(&parked, |s| &s.swept) < 1000 {
            assert!(std::time::Instant::now() < deadline, "not all swept");
            tokio::task::yield_now().await;
        }
        assert!(parked.iter().all(|s| s.swept.load(Ordering::SeqCst) == 1));
        assert_eq!(
            total(&open, |s| &s.swept),
            0,
            "an open subscriber was swept"
        );
        assert_eq!(total(&open, |s| &s.quiet), 10);
    }

    #[test]
    fn outside_a_runtime_a_publish_wakes_every_subscriber() {
        let hub = Hub::default();
        let parked = subscribers(&hub, 0..10, true);
        assert_eq!(hub.publish("p", "room", &Message::text("hi")), 10);
        assert_eq!(total(&parked, |s| &s.delivered), 10);
        assert_eq!(
            total(&parked, |s| &s.quiet) + total(&parked, |s| &s.swept),
            0
        );
    }

    #[test]
    fn a_sweep_dropped_before_it_ran_sweeps_the_rest() {
        let subs: Vec<Arc<Counting>> = (0..600).map(|_| Arc::default()).collect();
        let mut sweep = Sweep {
            subs: subs.iter().map(|s| Arc::clone(s) as _).collect(),
            done: 0,
        };
        assert!(sweep.turn());
        assert_eq!(total(&subs, |s| &s.swept), SWEEP_TURN);
        drop(sweep);
        assert!(subs.iter().all(|s| s.swept.load(Ordering::SeqCst) == 1));
    }
}
