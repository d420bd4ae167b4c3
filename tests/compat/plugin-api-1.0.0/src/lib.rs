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
//! - Callbacks of one connection run one at a time, in the order of the connection's events, on
//!   the host's task for that connection. They must not block: the host logs a warning naming the
//!   plugin when a callback takes longer than its threshold (50 ms by default). A plugin that does
//!   I/O or heavy work runs it on its own threads and answers through a stored [`Conn`].
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
pub mod abi;

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
    /// The send queue is full (see `max_send_queue`): drop the message, or close.
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
    /// The message is larger than the connection's limit.
    #[error("message too large")]
    MessageTooLarge,
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
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn").field("id", &self.id()).finish()
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
}

impl Host {
    pub(crate) fn from_handle(handle: abi::HostHandle) -> Self {
        let config = handle
            .config()
            .into_iter()
            .map(|Tuple2(k, v)| (k.into_string(), v.into_string()))
            .collect();
        Self {
            handle,
            config: std::sync::Arc::new(config),
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
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
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

/// The answer to a request: 101 with a [`Handler`] accepts an upgrade; any other status is a
/// plain HTTP response with its headers and body.
pub struct Response {
    shell: abi::ResponseShell,
}

impl Response {
    /// Accepts the upgrade (status 101); `handler` receives the connection's events.
    pub fn accept(handler: impl Handler) -> Self {
        let mut r = Self::status(101);
        r.shell.handler = Some(abi::handler_box(handler));
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
            },
        }
    }

    /// Refuses (or answers) with `status` and a plain-text `message` body.
    pub fn reject(status: u16, message: &str) -> Self {
        Self::status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(message.as_bytes())
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

    /// This connection's ping interval (zero disables the host's pings).
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
    /// a replaced version closed). Stop the plugin's threads here.
    fn shutdown(&self) {}
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
    /// The send queue emptied after a send was refused with [`SendError::QueueFull`].
    fn on_drain(&mut self, conn: &Conn) {
        let _ = conn;
    }
    /// A protocol or I/O error; the connection is closing and `on_close` follows.
    fn on_error(&mut self, conn: &Conn, error: &str) {
        let _ = (conn, error);
    }
    /// The connection closed: `code` and `reason` are the peer's (1005 when its close frame had
    /// no code, 1006 when the connection ended without a close frame).
    fn on_close(&mut self, conn: &Conn, code: u16, reason: &str) {
        let _ = (conn, code, reason);
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
/// code block in it is compiled and run as one.
#[cfg(doctest)]
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
