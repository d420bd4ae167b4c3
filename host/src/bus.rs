//! The Redis bus: carries channel publishes between wshost instances that share a Redis.
//!
//! Each host delivers its own publishes to its own subscribers directly (see
//! [`crate::channels`]) and hands a copy to the bus, which `PUBLISH`es it to Redis tagged with the
//! host's random origin id. A host `SUBSCRIBE`s in Redis only to the channels that have local
//! subscribers, and delivers what arrives from other origins to them; its own publishes coming
//! back are skipped, so every host delivers a publish to its subscribers exactly once.
//!
//! Two tasks own the two Redis connections: the publisher (a multiplexed connection, writes
//! pipelined in batches) and the subscriber (a pub/sub connection). Connection tasks only ever
//! `try_send` to them, so nothing a connection does waits for Redis. While Redis is unreachable
//! local delivery goes on; publishes that cannot cross are dropped and counted, and both tasks
//! reconnect with exponential backoff, the subscriber resubscribing every wanted channel.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::channels::Hub;

/// How channels reach other hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BusConfig {
    /// In memory: channels are local to this host (the default).
    #[default]
    Memory,
    /// Through Redis pub/sub: every host on the same Redis (and prefix) shares channels.
    Redis(RedisConfig),
}

/// The Redis engine's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]HOST:PORT[/DB]`.
    pub url: String,
    /// Redis channel names are `PREFIX:PLUGIN:CHANNEL`; hosts share channels only with hosts
    /// of the same prefix. Default `wshost`.
    pub prefix: String,
    /// First wait before reconnecting; doubles on each failure up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
    /// Publishes waiting to be written to Redis; past it they are dropped and counted.
    pub queue: usize,
}

impl RedisConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "wshost".into(),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            queue: 65_536,
        }
    }
}

impl std::fmt::Display for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory => f.write_str("memory"),
            Self::Redis(r) => f.write_str(&r.url),
        }
    }
}

impl std::str::FromStr for BusConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "memory" {
            return Ok(Self::Memory);
        }
        if !s.starts_with("redis://") {
            return Err(format!("`{s}`: expected `memory` or `redis://HOST:PORT/`"));
        }
        redis::Client::open(s).map_err(|e| format!("`{s}`: {e}"))?;
        Ok(Self::Redis(RedisConfig::new(s)))
    }
}

/// Why the bus could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("bad Redis address: {0}")]
pub struct BusError(#[from] redis::RedisError);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LinkLabel {
    pub(crate) link: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub(crate) reason: &'static str,
}

/// The bus's metrics, registered with the host's other metrics.
#[derive(Debug, Clone, Default)]
pub(crate) struct BusMetrics {
    /// 1 while the link (`publish` or `subscribe`) is connected.
    pub(crate) connected: Family<LinkLabel, Gauge>,
    /// Successful (re)connections by link.
    pub(crate) connects: Family<LinkLabel, Counter>,
    /// Publishes written to Redis.
    pub(crate) published: Counter,
    /// Publishes from other hosts delivered here.
    pub(crate) received: Counter,
    /// Publishes that did not cross, by reason (`queue_full`, `disconnected`, `error`).
    pub(crate) dropped: Family<ReasonLabel, Counter>,
    /// Channels this host is subscribed to in Redis.
    pub(crate) channels: Gauge,
}

impl BusMetrics {
    fn drop_n(&self, reason: &'static str, n: u64) {
        self.dropped
            .get_or_create(&ReasonLabel { reason })
            .inc_by(n);
    }

    fn set_connected(&self, link: &'static str, up: bool) {
        self.connected
            .get_or_create(&LinkLabel { link })
            .set(i64::from(up));
        if up {
            self.connects.get_or_create(&LinkLabel { link }).inc();
        }
    }
}

/// A publish on its way to Redis.
struct Outgoing {
    key: String,
    payload: Vec<u8>,
}

/// A change of the channels this host wants from Redis.
enum Want {
    Subscribe {
        key: String,
        plugin: Arc<str>,
        channel: Arc<str>,
    },
    Unsubscribe {
        key: String,
    },
}

const TEXT: u8 = b't';
const BINARY: u8 = b'b';
const ORIGIN_LEN: usize = 16;

impl crate::channels::Engine for Link {
    fn want(&self, plugin: &str, channel: &str) {
        Link::want(self, plugin, channel);
    }
    fn unwant(&self, plugin: &str, channel: &str) {
        Link::unwant(self, plugin, channel);
    }
    fn publish(&self, plugin: &str, channel: &str, msg: &Message) {
        Link::publish(self, plugin, channel, msg);
    }
}

/// The hub's side of the bus: cheap, never blocking sends to the bus tasks.
#[derive(Debug)]
pub(crate) struct Link {
    origin: [u8; ORIGIN_LEN],
    prefix: String,
    wants: mpsc::UnboundedSender<Want>,
    out: mpsc::Sender<Outgoing>,
    pub(crate) metrics: BusMetrics,
}

impl std::fmt::Debug for Want {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Want::Subscribe { key, .. } => write!(f, "Subscribe({key})"),
            Want::Unsubscribe { key } => write!(f, "Unsubscribe({key})"),
        }
    }
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Outgoing({}, {} bytes)", self.key, self.payload.len())
    }
}

impl Link {
    /// The Redis channel of `channel` of `plugin`. A `:` or `%` in the plugin's name is
    /// percent-encoded so that two (plugin, channel) pairs never share a key.
    fn key(&self, plugin: &str, channel: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + plugin.len() + channel.len() + 2);
        key.push_str(&self.prefix);
        key.push(':');
        for c in plugin.chars() {
            match c {
                ':' => key.push_str("%3A"),
                '%' => key.push_str("%25"),
                c => key.push(c),
            }
        }
        key.push(':');
        key.push_str(channel);
        key
    }

    /// The first local subscriber of a channel arrived.
    pub(crate) fn want(&self, plugin: &str, channel: &str) {
        let _ = self.wants.send(Want::Subscribe {
            key: self.key(plugin, channel),
            plugin: plugin.into(),
            channel: channel.into(),
        });
    }

    /// The last local subscriber of a channel left.
    pub(crate) fn unwant(&self, plugin: &str, channel: &str) {
        let _ = self.wants.send(Want::Unsubscribe {
            key: self.key(plugin, channel),
        });
    }

    /// Hands a publish to the publisher task; never waits.
    pub(crate) fn publish(&self, plugin: &str, channel: &str, msg: &Message) {
        let (kind, data): (u8, &[u8]) = match msg {
            Message::Text(t) => (TEXT, t.as_bytes()),
            Message::Binary(b) => (BINARY, b),
            _ => return,
        };
        let mut payload = Vec::with_capacity(ORIGIN_LEN + 1 + data.len());
        payload.extend_from_slice(&self.origin);
        payload.push(kind);
        payload.extend_from_slice(data);
        let outgoing = Outgoing {
            key: self.key(plugin, channel),
            payload,
        };
        match self.out.try_send(outgoing) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.drop_n("queue_full", 1);
                tracing::debug!("bus: publish queue full; publish not sent to Redis");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.metrics.drop_n("disconnected", 1),
        }
    }
}

/// The bus tasks, created with the hub and started by [`Pending::spawn`] inside the runtime.
#[derive(Debug)]
pub struct Pending {
    client: redis::Client,
    config: RedisConfig,
    origin: [u8; ORIGIN_LEN],
    wants: mpsc::UnboundedReceiver<Want>,
    out: mpsc::Receiver<Outgoing>,
    metrics: BusMetrics,
}

/// Sets up the Redis engine: the link for the hub and the tasks to spawn.
pub(crate) fn redis(config: &RedisConfig) -> Result<(Link, Pending), BusError> {
    let client = redis::Client::open(config.url.as_str())?;
    let origin = random_origin();
    let (wants_tx, wants_rx) = mpsc::unbounded_channel();
    let (out_tx, out_rx) = mpsc::channel(config.queue.max(1));
    let metrics = BusMetrics::default();
    let link = Link {
        origin,
        prefix: config.prefix.clone(),
        wants: wants_tx,
        out: out_tx,
        metrics: metrics.clone(),
    };
    let pending = Pending {
        client,
        config: config.clone(),
        origin,
        wants: wants_rx,
        out: out_rx,
        metrics,
    };
    Ok((link, pending))
}

/// 128 random bits from the OS-seeded hasher keys std uses.
fn random_origin() -> [u8; ORIGIN_LEN] {
    let mut origin = [0; ORIGIN_LEN];
    for (i, chunk) in origin.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i as u64);
        h.write_u32(std::process::id());
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    origin
}

impl Pending {
    /// Starts the publisher and subscriber tasks; they end when the hub is dropped.
    pub(crate) fn spawn(self, hub: Weak<Hub>) {
        let server = redacted(&self.client);
        tracing::info!(redis = %server, prefix = %self.config.prefix, "channels shared through Redis");
        tokio::spawn(publisher(
            self.client.clone(),
            self.config.clone(),
            self.out,
            self.metrics.clone(),
            server.clone(),
        ));
        tokio::spawn(subscriber(
            self.client,
            self.config,
            self.origin,
            self.wants,
            hub,
            self.metrics,
            server,
        ));
    }
}

/// The server's address without credentials, for logs.
fn redacted(client: &redis::Client) -> String {
    client.get_connection_info().addr().to_string()
}

/// Exponential backoff between `min` and `max`.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(config: &RedisConfig) -> Self {
        let min = config.reconnect_min.max(Duration::from_millis(1));
        Self {
            min,
            max: config.reconnect_max.max(min),
            next: min,
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

fn connection_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)))
}

/// Writes queued publishes to Redis, pipelined in batches of what has queued up meanwhile.
async fn publisher(
    client: redis::Client,
    config: RedisConfig,
    mut out: mpsc::Receiver<Outgoing>,
    metrics: BusMetrics,
    server: String,
) {
    const BATCH: usize = 512;
    let mut backoff = Backoff::new(&config);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let mut conn = match client
            .get_multiplexed_async_connection_with_config(&connection_config())
            .await
        {
            Ok(conn) => conn,
            Err(e) => {
                let wait = backoff.next();
                tracing::warn!(redis = %server, error = %e, retry_in = ?wait,
                    "bus: cannot connect to Redis for publishing; publishes stay local");
                let dropped = drop_for(&mut out, wait).await;
                metrics.drop_n("disconnected", dropped.unwrap_or(0));
                if dropped.is_none() {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        metrics.set_connected("publish", true);
        tracing::info!(redis = %server, "bus: publishing to Redis");
        loop {
            if out.recv_many(&mut batch, BATCH).await == 0 {
                return;
            }
            let mut pipe = redis::pipe();
            for o in &batch {
                pipe.cmd("PUBLISH").arg(&o.key).arg(&o.payload).ignore();
            }
            let n = batch.len() as u64;
            batch.clear();
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => {
                    metrics.published.inc_by(n);
                }
                Err(e) => {
                    metrics.drop_n("error", n);
                    metrics.set_connected("publish", false);
                    tracing::warn!(redis = %server, error = %e, dropped = n,
                        "bus: lost the Redis connection for publishing; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Drops what arrives on `out` for `wait`; returns how many, or `None` once the hub is gone.
async fn drop_for(out: &mut mpsc::Receiver<Outgoing>, wait: Duration) -> Option<u64> {
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    let mut n = 0;
    loop {
        tokio::select! {
            () = &mut deadline => return Some(n),
            o = out.recv() => match o {
                Some(_) => n += 1,
                None => return None,
            },
        }
    }
}

type Wanted = HashMap<String, (Arc<str>, Arc<str>)>;

/// Keeps the Redis subscriptions equal to the channels with local subscribers and delivers
/// other hosts' publishes to them.
async fn subscriber(
    client: redis::Client,
    config: RedisConfig,
    origin: [u8; ORIGIN_LEN],
    mut wants: mpsc::UnboundedReceiver<Want>,
    hub: Weak<Hub>,
    metrics: BusMetrics,
    server: String,
) {
    let mut backoff = Backoff::new(&config);
    let mut wanted = Wanted::new();
    loop {
        let pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                let wait = backoff.next();
                tracing::warn!(redis = %server, error = %e, retry_in = ?wait,
                    "bus: cannot connect to Redis for subscribing; other hosts' publishes do not arrive");
                if !note_wants_for(&mut wants, &mut wanted, wait).await {
                    return;
                }
                metrics.channels.set(wanted.len() as i64);
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        let keys: Vec<&String> = wanted.keys().collect();
        let mut result = Ok(());
        for chunk in keys.chunks(1024) {
            result = sink.subscribe(chunk).await;
            if result.is_err() {
                break;
            }
        }
        if let Err(e) = result {
            let wait = backoff.next();
            tracing::warn!(redis = %server, error = %e, retry_in = ?wait,
                "bus: cannot resubscribe in Redis");
            if !note_wants_for(&mut wants, &mut wanted, wait).await {
                return;
            }
            continue;
        }
        backoff.reset();
        metrics.set_connected("subscribe", true);
        metrics.channels.set(wanted.len() as i64);
        tracing::info!(redis = %server, channels = wanted.len(), "bus: subscribed in Redis");
        let lost = loop {
            tokio::select! {
                want = wants.recv() => {
                    let Some(want) = want else { return };
                    let result = match note(&mut wanted, want) {
                        Change::Subscribe(key) => sink.subscribe(&key).await,
                        Change::Unsubscribe(key) => sink.unsubscribe(&key).await,
                        Change::None => Ok(()),
                    };
                    metrics.channels.set(wanted.len() as i64);
                    if let Err(e) = result {
                        break e.to_string();
                    }
                }
                msg = stream.next() => {
                    let Some(msg) = msg else { break "connection closed".to_owned() };
                    let Some(hub) = hub.upgrade() else { return };
                    deliver(&hub, &wanted, &origin, &msg, &metrics);
                }
            }
        };
        metrics.set_connected("subscribe", false);
        let wait = backoff.next();
        tracing::warn!(redis = %server, error = %lost, retry_in = ?wait,
            "bus: lost the Redis subscription connection; reconnecting");
        if !note_wants_for(&mut wants, &mut wanted, wait).await {
            return;
        }
    }
}

enum Change {
    Subscribe(String),
    Unsubscribe(String),
    None,
}

fn note(wanted: &mut Wanted, want: Want) -> Change {
    match want {
        Want::Subscribe {
            key,
            plugin,
            channel,
        } => {
            if wanted.insert(key.clone(), (plugin, channel)).is_none() {
                Change::Subscribe(key)
            } else {
                Change::None
            }
        }
        Want::Unsubscribe { key } => {
            if wanted.remove(&key).is_some() {
                Change::Unsubscribe(key)
            } else {
                Change::None
            }
        }
    }
}

/// Records subscription changes for `wait` while disconnected; false once the hub is gone.
async fn note_wants_for(
    wants: &mut mpsc::UnboundedReceiver<Want>,
    wanted: &mut Wanted,
    wait: Duration,
) -> bool {
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return true,
            want = wants.recv() => match want {
                Some(want) => { note(wanted, want); }
                None => return false,
            },
        }
    }
}

/// Delivers a publish from Redis to the local subscribers, unless this host published it.
fn deliver(
    hub: &Hub,
    wanted: &Wanted,
    origin: &[u8; ORIGIN_LEN],
    msg: &redis::Msg,
    metrics: &BusMetrics,
) {
    let Some((plugin, channel)) = wanted.get(msg.get_channel_name()) else {
        return; // unsubscribed meanwhile
    };
    let payload = msg.get_payload_bytes();
    if payload.len() <= ORIGIN_LEN || payload[..ORIGIN_LEN] == origin[..] {
        return;
    }
    let data = Bytes::copy_from_slice(&payload[ORIGIN_LEN + 1..]);
    let message = match payload[ORIGIN_LEN] {
        TEXT => match Utf8Bytes::try_from(data) {
            Ok(text) => Message::Text(text),
            Err(_) => {
                tracing::warn!(channel = %msg.get_channel_name(), "bus: dropped a text publish that is not UTF-8");
                return;
            }
        },
        BINARY => Message::Binary(data),
        kind => {
            tracing::warn!(channel = %msg.get_channel_name(), kind, "bus: dropped a publish of unknown kind");
            return;
        }
    };
    metrics.received.inc();
    hub.deliver(plugin, channel, &message);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_injective() {
        let (link, _pending) = redis(&RedisConfig::new("redis://127.0.0.1:1/")).unwrap();
        assert_eq!(link.key("chat", "lobby"), "wshost:chat:lobby");
        assert_ne!(link.key("a:b", "c"), link.key("a", "b:c"));
        assert_eq!(link.key("a%:", "c"), "wshost:a%25%3A:c");
    }

    #[test]
    fn origins_differ() {
        assert_ne!(random_origin(), random_origin());
    }

    #[test]
    fn bus_flag() {
        assert_eq!("memory".parse::<BusConfig>(), Ok(BusConfig::Memory));
        assert!(matches!(
            "redis://127.0.0.1:6379/".parse::<BusConfig>(),
            Ok(BusConfig::Redis(_))
        ));
        assert!("nats://x".parse::<BusConfig>().is_err());
    }
}
