//! The stable interface between the `wshost` WebSocket server and its handler plugins.
//!
//! A plugin is a `cdylib` that implements [`Plugin`] and calls [`export_plugin!`]. For every
//! WebSocket upgrade request on one of its routes, the host calls [`Plugin::upgrade`] with the
//! [`Request`]; the returned [`Response`] decides: [`Response::accept`] (status 101) opens the
//! WebSocket and hands its events to a [`Handler`]; any other status is sent as a plain HTTP
//! response. Plain (non-upgrade) requests on the plugin's routes go to [`Plugin::request`].
//! This is the model of ring-jetty-ws (`:status` decides, `:ws-handlers` receive the events),
//! in safe Rust: plugin authors write no `unsafe`.
//!
//! ```
//! use plugin_api::{Conn, Handler, Host, Plugin, PluginError, Request, Response};
//!
//! pub struct Echo;
//!
//! impl Plugin for Echo {
//!     const NAME: &'static str = "echo";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     const ROUTES: &'static [&'static str] = &["/echo"];
//!
//!     fn new(_host: Host) -> Result<Self, PluginError> {
//!         Ok(Echo)
//!     }
//!
//!     fn upgrade(&self, _req: &Request<'_>) -> Response {
//!         Response::accept(EchoConn)
//!     }
//! }
//!
//! struct EchoConn;
//!
//! impl Handler for EchoConn {
//!     fn on_text(&mut self, conn: &Conn, text: &str) {
//!         let _ = conn.send_text(text);
//!     }
//!     fn on_binary(&mut self, conn: &Conn, data: &[u8]) {
//!         let _ = conn.send_binary(data);
//!     }
//! }
//!
//! plugin_api::export_plugin!(Echo);
//! ```
//!
//! # Execution model
//!
//! - Each plugin runs on worker threads of its own (its capacity, `--plugin-workers`): its
//!   connections, callbacks, `upgrade` and `request` calls run there and nowhere else, so a
//!   plugin that blocks holds up only its own connections, never another plugin's.
//! - Callbacks of one connection run one at a time, in the order of the connection's events.
//!   A callback that blocks holds one of the plugin's workers meanwhile; the host logs calls
//!   that run longer than its threshold (50 ms by default) while they run. Long waits belong on
//!   the plugin's own threads: answer through a stored [`Conn`], defer a decision with
//!   [`Request::defer`], stop reading with [`Conn::pause`].
//! - [`Handler::on_close`] runs exactly once for every connection whose [`Handler::on_connect`]
//!   ran, and never for one whose upgrade was refused.
//! - [`Plugin::upgrade`] and [`Plugin::request`] may run concurrently on several threads.
//! - A panic anywhere in plugin code (a callback, `new`, `upgrade`, `request`, `shutdown`, a
//!   `Drop`) is caught on the plugin's side and never crosses into the host: a panicking callback
//!   closes only its own connection, with 1011; a panicking `upgrade` or `request` answers 500.
//!   A `Mutex` poisoned by such a panic is still yours to use: recover it with
//!   `lock().unwrap_or_else(PoisonError::into_inner)` so that later callbacks keep working.
//!   Plugins must be built with `panic = "unwind"` (the default).
//! - Each plugin has its own copy of the standard library and of every `static`: it cannot see
//!   the host's logger or async runtime. Log through [`Host::log`]; share state between
//!   connections through your plugin struct (it is `Sync`) or the host's channels.
//!
//! # Channels
//!
//! The host keeps publish/subscribe channels for each plugin ([`Conn::subscribe`],
//! [`Host::publish_text`]). They are owned by the host, so they survive a plugin reload, and a
//! closing connection leaves its channels by itself.
//!
//! # Compatibility
//!
//! This crate is the interface version. A host accepts plugins built against any plugin-api with
//! the same major version (1.x), and refuses others with a message that names the version to
//! rebuild against. Within 1.x, the interface only grows at the end of its vtables, and every
//! method added after 1.0 has a default body, which is what runs when the other side is older.

#![cfg_attr(docsrs, feature(doc_cfg))]

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use abi_stable::std_types::{RSlice, RStr, RString, RVec, Tuple2};

#[allow(
    unsafe_code,
    reason = "the ABI module: sabi_trait impls, the Conn ref-cast, the header"
)]
#[doc(hidden)]
pub mod abi;
#[cfg(feature = "testkit")]
pub mod testkit;

pub mod middleware;

/// The JSON crate of [`Host::config_value`]'s values (and of the test kit's typed config).
pub use serde_json;

pub use abi::{Conn, API_VERSION};

/// The version of this interface, parsed: `(major, minor, patch)`.
pub fn api_version() -> (u64, u64, u64) {
    parse_version(API_VERSION).expect("the crate's own version parses")
}

/// Parses `MAJOR.MINOR.PATCH` (a pre-release or build suffix on the patch is ignored).
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    let patch = it.next()?;
    let digits = patch
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or("");
    Some((major, minor, digits.parse().ok()?))
}

/// Whether a host speaking interface `host` can load a plugin built against `plugin`: the major
/// versions must be equal (for 0.x, the minor versions too).
///
/// ```
/// assert!(plugin_api::is_compatible((1, 0, 0), (1, 3, 2)));
/// assert!(plugin_api::is_compatible((1, 3, 0), (1, 0, 0)));
/// assert!(!plugin_api::is_compatible((1, 0, 0), (2, 0, 0)));
/// assert!(!plugin_api::is_compatible((0, 1, 0), (0, 2, 0)));
/// ```
pub fn is_compatible(host: (u64, u64, u64), plugin: (u64, u64, u64)) -> bool {
    host.0 == plugin.0 && (host.0 != 0 || host.1 == plugin.1)
}

// ----------------------------------------------------------------------------------------------
// Errors.

/// Why a plugin could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PluginError(pub String);

impl PluginError {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Why a send, ping, close or subscribe was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The connection is closed or closing.
    #[error("connection is closed")]
    Closed,
    /// The message does not fit in the send queue now (see `max_send_queue`) or the host's
    /// memory budget: drop it, wait for [`Handler::on_drain`], or close.
    #[error("send queue is full")]
    QueueFull,
    /// The close code may not be sent (1004-1006, 1015, below 1000, reserved ranges).
    #[error("invalid close code")]
    InvalidCloseCode,
    /// The close reason is longer than 123 bytes.
    #[error("close reason longer than 123 bytes")]
    ReasonTooLong,
    /// A ping payload is longer than 125 bytes.
    #[error("control frame payload longer than 125 bytes")]
    PayloadTooLong,
    /// The message is larger than the connection's whole send queue: it can never be sent.
    #[error("message too large")]
    MessageTooLarge,
    /// A per-connection limit was reached (more than [`MAX_TIMERS`] timers).
    #[error("per-connection limit reached")]
    Limit,
    /// An error this version of plugin-api does not know (from a newer host).
    #[error("send error {0}")]
    Other(u32),
}

impl SendError {
    /// The code that carries this error across the ABI.
    pub fn code(self) -> u32 {
        match self {
            SendError::Closed => 1,
            SendError::QueueFull => 2,
            SendError::InvalidCloseCode => 3,
            SendError::ReasonTooLong => 4,
            SendError::PayloadTooLong => 5,
            SendError::MessageTooLarge => 6,
            SendError::Limit => 7,
            SendError::Other(c) => c,
        }
    }

    /// The result a code stands for (0 is success).
    pub fn from_code(code: u32) -> Result<(), SendError> {
        match code {
            0 => Ok(()),
            1 => Err(SendError::Closed),
            2 => Err(SendError::QueueFull),
            3 => Err(SendError::InvalidCloseCode),
            4 => Err(SendError::ReasonTooLong),
            5 => Err(SendError::PayloadTooLong),
            6 => Err(SendError::MessageTooLarge),
            7 => Err(SendError::Limit),
            c => Err(SendError::Other(c)),
        }
    }
}

/// Whether an endpoint may send `code` in a close frame (RFC 6455 §7.4): 1000-1003, 1007-1014,
/// and 3000-4999. 1004-1006 and 1015 are reserved or only for reporting, never for the wire.
///
/// ```
/// assert!(plugin_api::is_sendable_close_code(1000));
/// assert!(plugin_api::is_sendable_close_code(4000));
/// assert!(!plugin_api::is_sendable_close_code(1005));
/// assert!(!plugin_api::is_sendable_close_code(1006));
/// assert!(!plugin_api::is_sendable_close_code(2000));
/// ```
pub fn is_sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The longest close reason, in bytes (a control frame carries 125 bytes, 2 are the code).
pub const MAX_CLOSE_REASON: usize = 123;

// ----------------------------------------------------------------------------------------------
// The connection handle.

impl Conn {
    /// The connection's id, unique within one host process.
    pub fn id(&self) -> u64 {
        self.handle().id()
    }

    /// The client's address (`ip:port`).
    pub fn remote_addr(&self) -> String {
        self.handle().remote_addr().into_string()
    }

    /// Whether the connection is open: false once a close was sent or received.
    pub fn is_open(&self) -> bool {
        self.handle().is_open()
    }

    /// Queues a text message.
    pub fn send_text(&self, text: &str) -> Result<(), SendError> {
        SendError::from_code(self.handle().send_text(RStr::from_str(text)))
    }

    /// Queues a binary message.
    pub fn send_binary(&self, data: &[u8]) -> Result<(), SendError> {
        SendError::from_code(self.handle().send_binary(RSlice::from_slice(data)))
    }

    /// Queues a ping; its pong arrives at [`Handler::on_pong`]. At most 125 bytes.
    pub fn ping(&self, payload: &[u8]) -> Result<(), SendError> {
        SendError::from_code(self.handle().ping(RSlice::from_slice(payload)))
    }

    /// Starts the close handshake. `code` must satisfy [`is_sendable_close_code`] and `reason`
    /// fit in [`MAX_CLOSE_REASON`] bytes. Sends queued before it are delivered first.
    pub fn close(&self, code: u16, reason: &str) -> Result<(), SendError> {
        SendError::from_code(self.handle().close(code, RStr::from_str(reason)))
    }

    /// Bytes queued and not yet written to the socket (the browser's `bufferedAmount`).
    pub fn buffered_amount(&self) -> u64 {
        self.handle().buffered_amount()
    }

    /// Subscribes this connection to `channel` (of this plugin); messages published there are
    /// queued to it like its own sends. It leaves every channel when it closes.
    pub fn subscribe(&self, channel: &str) -> Result<(), SendError> {
        SendError::from_code(self.handle().subscribe(RStr::from_str(channel)))
    }

    /// Leaves `channel`; returns whether the connection was subscribed.
    pub fn unsubscribe(&self, channel: &str) -> bool {
        self.handle().unsubscribe(RStr::from_str(channel))
    }

    /// Stops reading from the client (Jetty's `suspend`): no more `on_text`/`on_binary` until
    /// [`Conn::resume`]; what the client sends meanwhile waits in the socket, and TCP slows the
    /// client down. For a plugin that works on a message asynchronously (on its own thread)
    /// and wants the next one only when done. Sends, pings and closes go on as usual.
    pub fn pause(&self) {
        self.handle().set_paused(true);
    }

    /// Reads from the client again after [`Conn::pause`].
    pub fn resume(&self) {
        self.handle().set_paused(false);
    }

    /// The server address the client connected to (`ip:port`); empty on a host older than 1.2.
    pub fn local_addr(&self) -> String {
        self.handle().local_addr().into_string()
    }

    /// Whether the connection is over TLS (`wss`).
    pub fn is_secure(&self) -> bool {
        self.handle().is_secure()
    }

    /// The upgrade request's path (as [`Request::path`] was).
    pub fn path(&self) -> String {
        self.handle().path().into_string()
    }

    /// The upgrade request's query string, without `?` (as [`Request::query`] was).
    pub fn query(&self) -> String {
        self.handle().query().into_string()
    }

    /// Changes this connection's idle timeout from now on (zero: none), e.g. longer once a
    /// client has authenticated; `false` if the host cannot (older than 1.2).
    pub fn set_idle_timeout(&self, timeout: Duration) -> bool {
        self.handle().set_idle_timeout_ms(millis(timeout))
    }

    /// Arms this connection's timer `tag`: [`Handler::on_timer`] runs with `tag` once `after`
    /// has passed, in the connection's event order (never at the same time as another of its
    /// callbacks). Arming a tag that is already armed moves it (a debounce); re-arm in
    /// `on_timer` for a periodic timer. Timers end with the connection. At most
    /// [`MAX_TIMERS`] per connection ([`SendError::Limit`] past it); [`SendError::Closed`] once
    /// the connection is closing.
    pub fn set_timer(&self, after: Duration, tag: u64) -> Result<(), SendError> {
        SendError::from_code(self.handle().set_timer(tag, millis(after)))
    }

    /// Disarms timer `tag`; whether it was armed.
    pub fn cancel_timer(&self, tag: u64) -> bool {
        self.handle().cancel_timer(tag)
    }

    /// Queues a text message, as [`Conn::send_text`], and reports its fate: once the host has
    /// written it to the socket, [`Handler::on_sent`] runs with `tag` and `written: true`; if
    /// the connection closes first, with `false` (before `on_close`). Ring's asynchronous send
    /// with its callbacks. A refused send (`Err`) reports nothing.
    pub fn send_text_tracked(&self, text: &str, tag: u64) -> Result<(), SendError> {
        SendError::from_code(self.handle().send_text_tracked(RStr::from_str(text), tag))
    }

    /// Queues a binary message and reports its fate, as [`Conn::send_text_tracked`].
    pub fn send_binary_tracked(&self, data: &[u8], tag: u64) -> Result<(), SendError> {
        SendError::from_code(
            self.handle()
                .send_binary_tracked(RSlice::from_slice(data), tag),
        )
    }

    /// A request header of the upgrade that the plugin kept with [`Response::keep_header`]
    /// (names are case-insensitive); `None` for any other.
    pub fn header(&self, name: &str) -> Option<String> {
        self.handle()
            .header(RStr::from_str(&name.to_ascii_lowercase()))
            .into_option()
            .map(RString::into_string)
    }

    /// Sets the label this connection shows as a channel member ([`Host::members`],
    /// [`ChannelEvent::Joined`]), e.g. the user's name; `false` if the host cannot (older than
    /// 1.3). Set it before subscribing for the join to carry it.
    pub fn set_label(&self, label: &str) -> bool {
        self.handle().set_label(RStr::from_str(label))
    }

    /// Sets the send queue's low-water mark: from now on [`Handler::on_drain`] also runs
    /// whenever the queued bytes fall to `bytes` or below from above it, whether or not a send
    /// was refused — the usual high-water/low-water pacing (stop at your own mark, resume on
    /// `on_drain`). Zero (the default) keeps the plain behaviour: `on_drain` only after a
    /// refusal. `false` if the host cannot (older than 1.3).
    pub fn set_low_water(&self, bytes: usize) -> bool {
        self.handle().set_low_water(bytes as u64)
    }
}

/// The most timers one connection may have armed at once.
pub const MAX_TIMERS: usize = 64;

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn").field("id", &self.id()).finish()
    }
}

/// Two handles are equal when they are handles of the same connection (its [`Conn::id`]), so a
/// `Conn` can key a `HashMap` or sit in a `HashSet` of members.
impl PartialEq for Conn {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl Eq for Conn {}

impl std::hash::Hash for Conn {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id().hash(state);
    }
}

// ----------------------------------------------------------------------------------------------
// Host services.

/// Log levels for [`Host::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// An error.
    Error,
    /// A warning.
    Warn,
    /// Information.
    Info,
    /// Debugging detail.
    Debug,
    /// Tracing detail.
    Trace,
}

impl Level {
    fn code(self) -> u8 {
        match self {
            Level::Error => abi::level::ERROR,
            Level::Warn => abi::level::WARN,
            Level::Info => abi::level::INFO,
            Level::Debug => abi::level::DEBUG,
            Level::Trace => abi::level::TRACE,
        }
    }
}

/// The host's services: logging, configuration, channels. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Host {
    handle: abi::HostHandle,
    config: std::sync::Arc<BTreeMap<String, String>>,
    typed: std::sync::Arc<serde_json::Value>,
}

impl Host {
    pub(crate) fn from_handle(handle: abi::HostHandle) -> Self {
        let config: BTreeMap<String, String> = handle
            .config()
            .into_iter()
            .map(|Tuple2(k, v)| (k.into_string(), v.into_string()))
            .collect();
        // The typed table (a 1.2 host); from an older host, the text table as strings.
        let typed = serde_json::from_str::<serde_json::Value>(handle.config_json().as_str())
            .ok()
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| {
                serde_json::Value::Object(
                    config
                        .iter()
                        .map(|(k, v): (&String, &String)| {
                            (k.clone(), serde_json::Value::String(v.clone()))
                        })
                        .collect(),
                )
            });
        Self {
            handle,
            config: std::sync::Arc::new(config),
            typed: std::sync::Arc::new(typed),
        }
    }

    /// Writes a line to the host's log, tagged with this plugin's name.
    pub fn log(&self, level: Level, message: &str) {
        self.handle.log(level.code(), RStr::from_str(message));
    }

    /// Whether a line at `level` would be written; check it before formatting costly messages.
    pub fn log_enabled(&self, level: Level) -> bool {
        self.handle.log_enabled(level.code())
    }

    /// Logs at [`Level::Info`].
    pub fn info(&self, message: &str) {
        self.log(Level::Info, message);
    }

    /// Logs at [`Level::Warn`].
    pub fn warn(&self, message: &str) {
        self.log(Level::Warn, message);
    }

    /// Logs at [`Level::Error`].
    pub fn error(&self, message: &str) {
        self.log(Level::Error, message);
    }

    /// The plugin's configuration table (empty unless the host was configured with one).
    pub fn config(&self) -> &BTreeMap<String, String> {
        &self.config
    }

    /// The config table with its types (numbers, booleans, lists, tables), as the config file
    /// wrote it: a JSON object.
    pub fn config_value(&self) -> &serde_json::Value {
        &self.typed
    }

    /// The config table as your own type (any `serde::Deserialize`), e.g. a struct with the
    /// fields you expect. Every field that does not fit is reported, in one error that names
    /// each (`config.retries: invalid type: string "x", expected u32; config.tags: ...`), so
    /// that a plugin refuses a bad table at start with all of its faults at once.
    pub fn config_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, PluginError> {
        deserialize_all((*self.typed).clone())
    }

    /// Publishes a text message to every subscriber of this plugin's `channel` (on every host,
    /// when hosts share a bus: `wshost serve --bus redis://…`); returns how many connections of
    /// this host it was queued for.
    pub fn publish_text(&self, channel: &str, text: &str) -> u64 {
        self.handle
            .publish_text(RStr::from_str(channel), RStr::from_str(text))
    }

    /// Publishes a binary message, as [`Host::publish_text`].
    pub fn publish_binary(&self, channel: &str, data: &[u8]) -> u64 {
        self.handle
            .publish_binary(RStr::from_str(channel), RSlice::from_slice(data))
    }

    /// How many connections of this host are subscribed to this plugin's `channel`.
    pub fn subscribers(&self, channel: &str) -> u64 {
        self.handle.subscribers(RStr::from_str(channel))
    }

    /// The host's version string.
    pub fn host_version(&self) -> String {
        self.handle.host_version().into_string()
    }

    /// Arms the plugin's timer `tag`: [`Plugin::on_timer`] runs with it once `after` has passed,
    /// on the plugin's own workers, one plugin-level call (timer or channel event) at a time.
    /// Arming an armed tag moves it; re-arm in `on_timer` for a periodic timer. Timers end
    /// with the generation (a replaced build's stop). `false` if the host cannot (older than
    /// 1.3) or [`MAX_PLUGIN_TIMERS`] are armed.
    pub fn set_timer(&self, after: Duration, tag: u64) -> bool {
        self.handle.set_timer(tag, millis(after))
    }

    /// Disarms the plugin's timer `tag`; whether it was armed.
    pub fn cancel_timer(&self, tag: u64) -> bool {
        self.handle.cancel_timer(tag)
    }

    /// This host's members of `channel`: each subscribed connection's id, client address and
    /// label ([`Conn::set_label`]). With a Redis bus, other hosts' members are theirs.
    pub fn members(&self, channel: &str) -> Vec<Member> {
        let json = self.handle.members_json(RStr::from_str(channel));
        serde_json::from_str(json.as_str()).unwrap_or_default()
    }

    /// Watches `channel`: [`Plugin::on_channel`] gets its joins and leaves (connections of
    /// this host subscribing, unsubscribing or closing) and every message published to it —
    /// the plugin's own server-side subscription, to bridge, log or track presence. Watching
    /// ends with the generation. `false` if the host cannot (older than 1.3).
    pub fn watch(&self, channel: &str) -> bool {
        self.handle.watch(RStr::from_str(channel))
    }

    /// Stops watching `channel`; whether it was watched.
    pub fn unwatch(&self, channel: &str) -> bool {
        self.handle.unwatch(RStr::from_str(channel))
    }
}

/// The most plugin-level timers ([`Host::set_timer`]) one generation may have armed.
pub const MAX_PLUGIN_TIMERS: usize = 1024;

/// A connection subscribed to a channel, as [`Host::members`] and [`ChannelEvent`] show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    /// The connection's id ([`Conn::id`]).
    pub id: u64,
    /// The client's address.
    pub remote_addr: String,
    /// The label the plugin gave the connection ([`Conn::set_label`]); empty if none.
    pub label: String,
}

/// What a watched channel ([`Host::watch`]) tells [`Plugin::on_channel`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ChannelEvent<'a> {
    /// A connection of this host subscribed.
    Joined(Member),
    /// A connection of this host left: unsubscribed, or closed.
    Left(Member),
    /// A text message was published (by any plugin connection or host on the channel).
    Text(&'a str),
    /// A binary message was published.
    Binary(&'a [u8]),
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Deserializes `value` into `T`; on failure, names every field that does not fit: each
/// faulty field is taken out and the rest tried again, so one bad field does not hide the next.
fn deserialize_all<T: serde::de::DeserializeOwned>(
    mut value: serde_json::Value,
) -> Result<T, PluginError> {
    let mut faults = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..64 {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(t) if faults.is_empty() => return Ok(t),
            Ok(_) => break,
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.inner().to_string();
                // A field this loop took out is now "missing": already reported.
                let ours = removed.iter().any(|r| {
                    let leaf = r.rsplit('.').next().unwrap_or(r);
                    inner.starts_with(&format!("missing field `{leaf}`"))
                });
                if ours {
                    break;
                }
                faults.push(match path.as_str() {
                    "." | "" => format!("config: {inner}"),
                    p => format!("config.{p}: {inner}"),
                });
                // Take the faulty field out and try the rest; a missing one cannot be.
                if !remove_path(&mut value, &path) {
                    break;
                }
                removed.push(path);
            }
        }
    }
    Err(PluginError::new(faults.join("; ")))
}

/// Removes the value at `path` (`a.b.c`, `list[2]`); whether there was one.
fn remove_path(value: &mut serde_json::Value, path: &str) -> bool {
    let mut parts: Vec<&str> = path
        .split('.')
        .filter(|p| !p.is_empty() && *p != "?")
        .collect();
    let Some(last) = parts.pop() else {
        return false;
    };
    let mut at = value;
    for p in parts {
        let next = match p.split_once('[') {
            Some((k, _)) => at.get_mut(k),
            None => at.get_mut(p),
        };
        match next {
            Some(n) => at = n,
            None => return false,
        }
    }
    let key = last.split_once('[').map_or(last, |(k, _)| k);
    at.as_object_mut().and_then(|o| o.remove(key)).is_some()
}

// ----------------------------------------------------------------------------------------------
// Requests.

/// An upgrade or plain request, as ring would hand it over: method, path, query, headers, ...
pub struct Request<'a> {
    inner: abi::RequestRef<'a>,
}

impl<'a> Request<'a> {
    pub(crate) fn new(inner: abi::RequestRef<'a>) -> Self {
        Self { inner }
    }

    /// `GET`, `POST`, ...
    pub fn method(&self) -> &str {
        self.inner.method().as_str()
    }
    /// The path without the query string, e.g. `/chat/lobby`.
    pub fn path(&self) -> &str {
        self.inner.path().as_str()
    }
    /// The raw query string without `?` (empty if none).
    pub fn query(&self) -> &str {
        self.inner.query().as_str()
    }
    /// The first value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query().as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
    /// `HTTP/1.1`.
    pub fn protocol(&self) -> &str {
        self.inner.protocol().as_str()
    }
    /// `ws`/`wss` for upgrades, `http`/`https` for plain requests.
    pub fn scheme(&self) -> &str {
        self.inner.scheme().as_str()
    }
    /// The server name the client asked for (the `Host` header without its port).
    pub fn server_name(&self) -> &str {
        self.inner.server_name().as_str()
    }
    /// The port the request arrived on.
    pub fn server_port(&self) -> u16 {
        self.inner.server_port()
    }
    /// The client's IP address.
    pub fn remote_addr(&self) -> &str {
        self.inner.remote_addr().as_str()
    }
    /// All headers in arrival order; names are lower-case and repeated headers are kept.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.inner
            .headers()
            .as_slice()
            .iter()
            .map(|Tuple2(k, v)| (k.as_str(), v.as_str()))
    }
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
    /// The subprotocols the client offered (`Sec-WebSocket-Protocol`), in its order.
    pub fn subprotocols(&self) -> impl Iterator<Item = &str> + '_ {
        self.inner
            .subprotocols()
            .as_slice()
            .iter()
            .map(|s| s.as_str())
    }
    /// The body of a plain request (empty for upgrades).
    pub fn body(&self) -> &[u8] {
        self.inner.body().as_slice()
    }
    /// Whether this is a WebSocket upgrade request.
    pub fn is_upgrade(&self) -> bool {
        self.inner.is_upgrade()
    }
    /// The route prefix this request matched: one of the plugin's `ROUTES`, or the route the
    /// host's config file mounted the plugin at (`[plugin.NAME] routes = [...]`). Use it (or
    /// [`Request::path_info`]) instead of hard-coding a prefix, so the plugin works wherever
    /// it is mounted. Empty from a host older than plugin-api 1.1.
    pub fn route(&self) -> &str {
        self.inner.route().as_str()
    }
    /// Defers the decision on this request: the host answers with the [`Response`] given to
    /// the returned [`Responder`] later, from any thread (after an asynchronous lookup, say),
    /// and ignores what `upgrade`/`request` returns (return [`Response::deferred`]). No host
    /// thread waits meanwhile. If no response comes within the host's decision timeout
    /// (`--decision-timeout`, 10 s by default), the client gets 503 and
    /// [`Responder::respond`] says so. Copy what you need from the request before returning:
    /// it is borrowed for the call only. `None` from a host older than plugin-api 1.1.
    ///
    /// ```
    /// use plugin_api::{Handler, Request, Response};
    ///
    /// struct Member;
    /// impl Handler for Member {}
    ///
    /// fn upgrade(req: &Request<'_>) -> Response {
    ///     let Some(responder) = req.defer() else {
    ///         return Response::reject(503, "this host cannot defer");
    ///     };
    ///     let token = req.query_param("token").unwrap_or_default();
    ///     std::thread::spawn(move || {
    ///         let allowed = token == "letmein"; // a slow lookup, off the host's threads
    ///         let response = if allowed {
    ///             Response::accept(Member)
    ///         } else {
    ///             Response::reject(403, "bad token")
    ///         };
    ///         let _ = responder.respond(response);
    ///     });
    ///     Response::deferred()
    /// }
    /// # let _ = upgrade;
    /// ```
    pub fn defer(&self) -> Option<Responder> {
        self.inner.defer().into_option().map(Responder)
    }
    /// The path below the matched route: `/lobby` for `/rooms/lobby` under route `/rooms`,
    /// empty for `/rooms` itself. The whole path under route `/` (and from a host older
    /// than plugin-api 1.1).
    ///
    /// ```
    /// # fn room(req: &plugin_api::Request<'_>) -> Option<String> {
    /// // A chat room at ROUTE/ROOM, wherever the plugin is mounted.
    /// let room = req.path_info().strip_prefix('/')?;
    /// (!room.is_empty() && !room.contains('/')).then(|| room.to_owned())
    /// # }
    /// ```
    pub fn path_info(&self) -> &str {
        let path = self.path();
        match self.route() {
            "" | "/" => path,
            route => path.strip_prefix(route).unwrap_or(path),
        }
    }
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method())
            .field("path", &self.path())
            .field("query", &self.query())
            .finish_non_exhaustive()
    }
}

// ----------------------------------------------------------------------------------------------
// Responses.

/// Completes a deferred decision ([`Request::defer`]); `Send`, usable from any thread, once.
pub struct Responder(abi::ResponderHandle);

/// The host stopped waiting for a deferred decision (its decision timeout passed, or the client
/// went away): the client was answered 503, or is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the host stopped waiting for this decision")]
pub struct Expired;

impl Responder {
    /// Answers the deferred request with `response`, as if `upgrade`/`request` had returned it.
    pub fn respond(self, response: Response) -> Result<(), Expired> {
        if self.0.respond(response.into_ffi()) {
            Ok(())
        } else {
            Err(Expired)
        }
    }

    /// Whether the host still waits for the answer.
    pub fn is_waiting(&self) -> bool {
        self.0.is_waiting()
    }
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("waiting", &self.is_waiting())
            .finish()
    }
}

/// The answer to a request: 101 with a [`Handler`] accepts an upgrade; any other status is a
/// plain HTTP response with its headers and body.
pub struct Response {
    shell: abi::ResponseShell,
}

impl Response {
    /// Accepts the upgrade (status 101); `handler` receives the connection's events.
    pub fn accept(handler: impl Handler) -> Self {
        let mut r = Self::status(101);
        r.shell.handler = Some(Box::new(handler));
        r
    }

    /// A response with `status` and no body. For an upgrade, anything but 101 refuses it.
    pub fn status(status: u16) -> Self {
        Self {
            shell: abi::ResponseShell {
                status,
                headers: RVec::new(),
                body: RVec::new(),
                handler: None,
                settings: Vec::new(),
                kept_headers: Vec::new(),
            },
        }
    }

    /// Refuses (or answers) with `status` and a plain-text `message` body.
    pub fn reject(status: u16, message: &str) -> Self {
        Self::status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(message.as_bytes())
    }

    /// What `upgrade`/`request` returns after [`Request::defer`]: the host ignores it and waits
    /// for the responder.
    pub fn deferred() -> Self {
        Self::reject(
            500,
            "the plugin deferred this decision and the host cannot wait for it\n",
        )
    }

    /// The status (101 for an accepted upgrade).
    pub fn status_code(&self) -> u16 {
        self.shell.status
    }

    /// Whether this accepts an upgrade (101 with a handler).
    pub fn is_accept(&self) -> bool {
        self.shell.status == 101 && self.shell.handler.is_some()
    }

    /// Changes the status. Changing a 101 to anything else refuses the upgrade (its handler is
    /// dropped); a status changed to 101 without a handler is answered 500 by the host.
    pub fn set_status(&mut self, status: u16) {
        self.shell.status = status;
        if status != 101 {
            self.shell.handler = None;
        }
    }

    /// The headers, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.shell
            .headers
            .iter()
            .map(|Tuple2(k, v)| (k.as_str(), v.as_str()))
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Sets header `name` to `value`, replacing every value it had.
    pub fn set_header(&mut self, name: &str, value: &str) {
        self.remove_header(name);
        self.shell
            .headers
            .push(Tuple2(RString::from(name), RString::from(value)));
    }

    /// Removes every value of header `name`; whether it had one.
    pub fn remove_header(&mut self, name: &str) -> bool {
        let before = self.shell.headers.len();
        self.shell
            .headers
            .retain(|Tuple2(k, _)| !k.as_str().eq_ignore_ascii_case(name));
        self.shell.headers.len() != before
    }

    /// The body.
    pub fn body_bytes(&self) -> &[u8] {
        &self.shell.body
    }

    /// Replaces the body.
    pub fn set_body(&mut self, body: &[u8]) {
        self.shell.body = RVec::from_slice(body);
    }

    /// Replaces the handler of an accepted upgrade with what `wrap` makes of it (nothing
    /// happens to a response that does not accept): the way middleware gets inside an accept.
    pub fn map_handler(mut self, wrap: impl FnOnce(Box<dyn Handler>) -> Box<dyn Handler>) -> Self {
        if let Some(h) = self.shell.handler.take() {
            self.shell.handler = Some(wrap(h));
        }
        self
    }

    /// Puts `layer` around the handler of an accepted upgrade (see [`Layer`]).
    pub fn layer(self, layer: impl Layer) -> Self {
        self.map_handler(|inner| Box::new(Layered::new(layer, inner)))
    }

    /// Keeps the upgrade request's header `name` with the connection, for [`Conn::header`]
    /// (e.g. a user id an auth proxy added). Only the headers named are kept, so that an idle
    /// connection stays small.
    pub fn keep_header(mut self, name: &str) -> Self {
        let name = name.to_ascii_lowercase();
        if !self.shell.kept_headers.contains(&name) {
            self.shell.kept_headers.push(name);
        }
        self
    }

    /// 404 Not Found.
    pub fn not_found() -> Self {
        Self::reject(404, "not found\n")
    }

    /// 200 with an HTML body.
    pub fn html(body: &str) -> Self {
        Self::status(200)
            .header("content-type", "text/html; charset=utf-8")
            .body(body.as_bytes())
    }

    /// 200 with a plain-text body.
    pub fn text(body: &str) -> Self {
        Self::status(200)
            .header("content-type", "text/plain; charset=utf-8")
            .body(body.as_bytes())
    }

    /// Adds a header (on a 101, it is added to the handshake response, e.g. `Set-Cookie`).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.shell
            .headers
            .push(Tuple2(RString::from(name), RString::from(value)));
        self
    }

    /// Picks the subprotocol (one of [`Request::subprotocols`]).
    pub fn protocol(self, subprotocol: &str) -> Self {
        self.header("sec-websocket-protocol", subprotocol)
    }

    /// Sets the body.
    pub fn body(mut self, body: &[u8]) -> Self {
        self.shell.body = RVec::from_slice(body);
        self
    }

    fn setting(mut self, key: &'static str, value: u64) -> Self {
        self.shell.settings.retain(|(k, _)| *k != key);
        self.shell.settings.push((key, value));
        self
    }

    /// This connection's ping interval (zero disables the host's pings). The first ping comes
    /// up to a quarter interval later, spread by connection.
    pub fn ping_interval(self, every: Duration) -> Self {
        self.setting(abi::setting::PING_INTERVAL_MS, millis(every))
    }

    /// How long this connection may take to answer a ping.
    pub fn pong_timeout(self, timeout: Duration) -> Self {
        self.setting(abi::setting::PONG_TIMEOUT_MS, millis(timeout))
    }

    /// Closes this connection after `timeout` without data messages (zero disables it).
    pub fn idle_timeout(self, timeout: Duration) -> Self {
        self.setting(abi::setting::IDLE_TIMEOUT_MS, millis(timeout))
    }

    /// The largest message this connection accepts from its client.
    pub fn max_message_size(self, bytes: usize) -> Self {
        self.setting(abi::setting::MAX_MESSAGE_SIZE, bytes as u64)
    }

    /// The largest frame this connection accepts from its client.
    pub fn max_frame_size(self, bytes: usize) -> Self {
        self.setting(abi::setting::MAX_FRAME_SIZE, bytes as u64)
    }

    /// The most bytes this connection may have queued for sending.
    pub fn max_send_queue(self, bytes: usize) -> Self {
        self.setting(abi::setting::MAX_SEND_QUEUE, bytes as u64)
    }

    /// Whether this connection may use permessage-deflate when the client offers it (the
    /// host's and the config file's setting otherwise; on by default): `false` for data that
    /// does not compress (already compressed media, random bytes), where it costs CPU for
    /// nothing.
    pub fn compression(self, enabled: bool) -> Self {
        self.setting(abi::setting::COMPRESSION, u64::from(enabled))
    }

    pub(crate) fn into_ffi(self) -> abi::ResponseBox {
        abi::response_box(self.shell)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.shell.status)
            .field("accepts", &self.shell.handler.is_some())
            .finish_non_exhaustive()
    }
}

// ----------------------------------------------------------------------------------------------
// The traits plugin authors implement.

/// A plugin: its identity, and how it answers requests. One instance per loaded file.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// The plugin's name, unique on a host (a newer file with the same name replaces it).
    const NAME: &'static str;
    /// The plugin's own version.
    const VERSION: &'static str;
    /// The route prefixes it serves, matched on whole path segments: `/echo` matches `/echo`
    /// and `/echo/x`, not `/echoes`.
    const ROUTES: &'static [&'static str];

    /// Creates the plugin; `host` gives logging, configuration and channels. An error refuses
    /// the plugin.
    fn new(host: Host) -> Result<Self, PluginError>;

    /// Decides a WebSocket upgrade request: [`Response::accept`] opens the connection, any other
    /// status refuses it.
    fn upgrade(&self, req: &Request<'_>) -> Response;

    /// Answers a plain (non-upgrade) request on one of the plugin's routes. Default: 404.
    fn request(&self, req: &Request<'_>) -> Response {
        let _ = req;
        Response::not_found()
    }

    /// Called once when the host stops using this instance (shutdown, or the last connection of
    /// a replaced version closed), on a thread of the host's own (not an I/O thread): it may
    /// block to join the plugin's threads. Stop them here: afterwards the host refuses this
    /// instance's `Host` calls.
    fn shutdown(&self) {}

    /// Called once when a newer build of this plugin took over its routes (a reload): new
    /// connections and requests go to the new one from now on, while this instance keeps
    /// serving the connections it has — until they close, or until the host's
    /// `--replaced-grace` passes and it closes them with 1012 (Service Restart), so that clients
    /// reconnect to the new code. Stop here what only one generation should do (a background
    /// publisher, a timer), and, if you like, tell your clients to reconnect. Runs on a thread
    /// of the host's own; `shutdown` still follows once the last connection is gone. (Since
    /// plugin-api 1.2.)
    fn replaced(&self) {}

    /// The plugin's timer `tag` ([`Host::set_timer`]) fired.
    fn on_timer(&self, tag: u64) {
        let _ = tag;
    }

    /// An event of a channel the plugin watches ([`Host::watch`]).
    fn on_channel(&self, channel: &str, event: ChannelEvent<'_>) {
        let _ = (channel, event);
    }
}

/// A connection's callbacks; every one is optional (the default does nothing).
///
/// The `&mut self` lets a handler keep per-connection state.
pub trait Handler: Send + 'static {
    /// The connection is open: store `conn` (clone it) to send later or from other threads.
    fn on_connect(&mut self, conn: &Conn) {
        let _ = conn;
    }
    /// A text message arrived.
    fn on_text(&mut self, conn: &Conn, text: &str) {
        let _ = (conn, text);
    }
    /// A binary message arrived.
    fn on_binary(&mut self, conn: &Conn, data: &[u8]) {
        let _ = (conn, data);
    }
    /// A ping arrived; the host has already answered it.
    fn on_ping(&mut self, conn: &Conn, payload: &[u8]) {
        let _ = (conn, payload);
    }
    /// A pong arrived.
    fn on_pong(&mut self, conn: &Conn, payload: &[u8]) {
        let _ = (conn, payload);
    }
    /// The send queue emptied after a send was refused with [`SendError::QueueFull`]: runs as
    /// soon as the host has written the queue out. With a low-water mark
    /// ([`Conn::set_low_water`]) it also runs whenever the queue falls to the mark from above.
    fn on_drain(&mut self, conn: &Conn) {
        let _ = conn;
    }
    /// Timer `tag` ([`Conn::set_timer`]) fired.
    fn on_timer(&mut self, conn: &Conn, tag: u64) {
        let _ = (conn, tag);
    }
    /// A tracked send ([`Conn::send_text_tracked`]) was written to the socket (`written`), or
    /// the connection closed before it was (`!written`; it may still have gone out with the
    /// closing handshake).
    fn on_sent(&mut self, conn: &Conn, tag: u64, written: bool) {
        let _ = (conn, tag, written);
    }
    /// A protocol or I/O error; the connection is closing and `on_close` follows.
    fn on_error(&mut self, conn: &Conn, error: &str) {
        let _ = (conn, error);
    }
    /// The connection closed. When the host started the close (a limit, an error, shutdown, a
    /// panic), `code` and `reason` are the ones it sent (1001, 1002, 1007, 1008, 1009, 1011,
    /// 1013); otherwise the peer's (1005 when its close frame had no code, 1006 when the
    /// connection ended without a close frame).
    fn on_close(&mut self, conn: &Conn, code: u16, reason: &str) {
        let _ = (conn, code, reason);
    }
}

impl Handler for Box<dyn Handler> {
    fn on_connect(&mut self, conn: &Conn) {
        (**self).on_connect(conn)
    }
    fn on_text(&mut self, conn: &Conn, text: &str) {
        (**self).on_text(conn, text)
    }
    fn on_binary(&mut self, conn: &Conn, data: &[u8]) {
        (**self).on_binary(conn, data)
    }
    fn on_ping(&mut self, conn: &Conn, payload: &[u8]) {
        (**self).on_ping(conn, payload)
    }
    fn on_pong(&mut self, conn: &Conn, payload: &[u8]) {
        (**self).on_pong(conn, payload)
    }
    fn on_drain(&mut self, conn: &Conn) {
        (**self).on_drain(conn)
    }
    fn on_timer(&mut self, conn: &Conn, tag: u64) {
        (**self).on_timer(conn, tag)
    }
    fn on_sent(&mut self, conn: &Conn, tag: u64, written: bool) {
        (**self).on_sent(conn, tag, written)
    }
    fn on_error(&mut self, conn: &Conn, error: &str) {
        (**self).on_error(conn, error)
    }
    fn on_close(&mut self, conn: &Conn, code: u16, reason: &str) {
        (**self).on_close(conn, code, reason)
    }
}

/// One of a connection's events, as a [`Layer`] sees it: every [`Handler`] callback is one
/// variant. New callbacks of later 1.x versions become new variants, which a layer that
/// forwards what it does not handle (`_ => event.deliver(inner, conn)`) passes on unchanged.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Event<'a> {
    /// [`Handler::on_connect`].
    Connect,
    /// [`Handler::on_text`].
    Text(&'a str),
    /// [`Handler::on_binary`].
    Binary(&'a [u8]),
    /// [`Handler::on_ping`].
    Ping(&'a [u8]),
    /// [`Handler::on_pong`].
    Pong(&'a [u8]),
    /// [`Handler::on_drain`].
    Drain,
    /// [`Handler::on_timer`].
    Timer(u64),
    /// [`Handler::on_sent`].
    Sent {
        /// The send's tag.
        tag: u64,
        /// Whether it was written.
        written: bool,
    },
    /// [`Handler::on_error`].
    Error(&'a str),
    /// [`Handler::on_close`].
    Close {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: &'a str,
    },
}

impl Event<'_> {
    /// Calls the callback of `to` this event stands for.
    pub fn deliver(self, to: &mut dyn Handler, conn: &Conn) {
        match self {
            Event::Connect => to.on_connect(conn),
            Event::Text(t) => to.on_text(conn, t),
            Event::Binary(d) => to.on_binary(conn, d),
            Event::Ping(p) => to.on_ping(conn, p),
            Event::Pong(p) => to.on_pong(conn, p),
            Event::Drain => to.on_drain(conn),
            Event::Timer(tag) => to.on_timer(conn, tag),
            Event::Sent { tag, written } => to.on_sent(conn, tag, written),
            Event::Error(e) => to.on_error(conn, e),
            Event::Close { code, reason } => to.on_close(conn, code, reason),
        }
    }
}

/// Middleware around a connection's handler: sees every event first and decides whether (and
/// how) the handler inside gets it. The default forwards everything, so a layer overrides
/// [`Layer::on_event`] for the events it cares about and forwards the rest — including
/// callbacks added to [`Handler`] after the layer was written.
///
/// ```
/// use plugin_api::{Conn, Event, Handler, Layer};
///
/// /// Drops text messages longer than 10 bytes; everything else goes through.
/// struct ShortTexts;
///
/// impl Layer for ShortTexts {
///     fn on_event(&mut self, inner: &mut dyn Handler, conn: &Conn, event: Event<'_>) {
///         match event {
///             Event::Text(t) if t.len() > 10 => {}
///             other => other.deliver(inner, conn),
///         }
///     }
/// }
/// ```
///
/// Put a layer around the handler of an accepted upgrade with [`Response::layer`].
pub trait Layer: Send + 'static {
    /// One event for the handler `inner`.
    fn on_event(&mut self, inner: &mut dyn Handler, conn: &Conn, event: Event<'_>) {
        event.deliver(inner, conn);
    }
}

/// A [`Handler`] inside a [`Layer`]: every callback goes to the layer as an [`Event`].
pub struct Layered<L: Layer, H: Handler> {
    layer: L,
    inner: H,
}

impl<L: Layer, H: Handler> Layered<L, H> {
    /// `inner`, with `layer` around it.
    pub fn new(layer: L, inner: H) -> Self {
        Self { layer, inner }
    }
}

impl<L: Layer, H: Handler> fmt::Debug for Layered<L, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layered").finish_non_exhaustive()
    }
}

impl<L: Layer, H: Handler> Handler for Layered<L, H> {
    fn on_connect(&mut self, conn: &Conn) {
        self.layer.on_event(&mut self.inner, conn, Event::Connect)
    }
    fn on_text(&mut self, conn: &Conn, text: &str) {
        self.layer
            .on_event(&mut self.inner, conn, Event::Text(text))
    }
    fn on_binary(&mut self, conn: &Conn, data: &[u8]) {
        self.layer
            .on_event(&mut self.inner, conn, Event::Binary(data))
    }
    fn on_ping(&mut self, conn: &Conn, payload: &[u8]) {
        self.layer
            .on_event(&mut self.inner, conn, Event::Ping(payload))
    }
    fn on_pong(&mut self, conn: &Conn, payload: &[u8]) {
        self.layer
            .on_event(&mut self.inner, conn, Event::Pong(payload))
    }
    fn on_drain(&mut self, conn: &Conn) {
        self.layer.on_event(&mut self.inner, conn, Event::Drain)
    }
    fn on_timer(&mut self, conn: &Conn, tag: u64) {
        self.layer
            .on_event(&mut self.inner, conn, Event::Timer(tag))
    }
    fn on_sent(&mut self, conn: &Conn, tag: u64, written: bool) {
        self.layer
            .on_event(&mut self.inner, conn, Event::Sent { tag, written })
    }
    fn on_error(&mut self, conn: &Conn, error: &str) {
        self.layer
            .on_event(&mut self.inner, conn, Event::Error(error))
    }
    fn on_close(&mut self, conn: &Conn, code: u16, reason: &str) {
        self.layer
            .on_event(&mut self.inner, conn, Event::Close { code, reason })
    }
}

/// Exports `$plugin` (a type implementing [`Plugin`]) as this library's wshost plugin.
///
/// Use it once, in a crate built with `crate-type = ["cdylib"]`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            #[allow(unsafe_code, reason = "the exported symbol that the host looks up")]
            #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
            pub static WSHOST_PLUGIN_HEADER: $crate::__private::LibHeader =
                $crate::abi::lib_header::<$plugin>();
        };
    };
}

/// The plugin guide (`docs/plugin-guide.md`), included only when doc tests run, so that every
/// code block in it is compiled and run as one (with the test kit: `cargo test --workspace`
/// enables it through the example plugins' dev-dependencies).
#[cfg(all(doctest, feature = "testkit"))]
#[doc = include_str!("../../docs/plugin-guide.md")]
pub struct PluginGuide;

#[doc(hidden)]
pub mod __private {
    pub use abi_stable::library::LibHeader;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_symbol_is_abi_stables_root_symbol() {
        // export_plugin! hard-codes the name (a macro cannot compute it); keep them equal.
        assert_eq!(abi::ROOT_SYMBOL, "_1as_0lib_1header_0root_bmodule_bloader");
    }

    #[test]
    fn send_error_codes_round_trip() {
        for e in [
            SendError::Closed,
            SendError::QueueFull,
            SendError::InvalidCloseCode,
            SendError::ReasonTooLong,
            SendError::PayloadTooLong,
            SendError::MessageTooLarge,
            SendError::Limit,
            SendError::Other(77),
        ] {
            assert_eq!(SendError::from_code(e.code()), Err(e));
        }
        assert_eq!(SendError::from_code(0), Ok(()));
    }

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("1.2.3"), Some((1, 2, 3)));
        assert_eq!(parse_version("1.2.3-beta.1"), Some((1, 2, 3)));
        assert_eq!(parse_version("1.2"), None);
        assert_eq!(api_version().0, 1);
    }

    #[test]
    fn close_codes() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999] {
            assert!(is_sendable_close_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!is_sendable_close_code(bad), "{bad}");
        }
    }
}
