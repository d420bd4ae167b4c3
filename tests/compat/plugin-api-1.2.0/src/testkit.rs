//! A test kit for a plugin's unit tests, without a host (feature `testkit`): a [`TestHost`]
//! (config, a captured log, channels), a [`TestConn`] that records what the plugin sends and
//! can act as a full queue, a [`TestRequest`] builder, and [`TestResponse`] / [`TestHandler`] to
//! read a plugin's answer and drive the handler it accepted with.
//!
//! ```toml
//! [dev-dependencies]
//! plugin-api = { version = "1", features = ["testkit"] }
//! ```
//!
//! ```
//! use plugin_api::testkit::{Sent, TestConn, TestHost, TestRequest};
//! use plugin_api::{Conn, Handler, Host, Plugin, PluginError, Request, Response};
//!
//! struct Echo;
//! struct Connection;
//! impl Handler for Connection {
//!     fn on_text(&mut self, conn: &Conn, text: &str) {
//!         let _ = conn.send_text(text);
//!     }
//! }
//! impl Plugin for Echo {
//!     const NAME: &'static str = "echo";
//!     const VERSION: &'static str = "1.0.0";
//!     const ROUTES: &'static [&'static str] = &["/echo"];
//!     fn new(_host: Host) -> Result<Self, PluginError> {
//!         Ok(Echo)
//!     }
//!     fn upgrade(&self, req: &Request<'_>) -> Response {
//!         match req.query_param("token").as_deref() {
//!             Some("secret") => Response::accept(Connection),
//!             _ => Response::reject(403, "no token"),
//!         }
//!     }
//! }
//!
//! let plugin = Echo::new(TestHost::new().host()).unwrap();
//! let refused = TestRequest::upgrade("/echo").decide(|r| plugin.upgrade(r));
//! assert_eq!(refused.status(), 403);
//! let accepted = TestRequest::upgrade("/echo?token=secret").decide(|r| plugin.upgrade(r));
//! assert_eq!(accepted.status(), 101);
//! let mut handler = accepted.handler().expect("accepted with callbacks");
//! let conn = TestConn::new(1);
//! handler.on_text(&conn, "hi").unwrap();
//! assert_eq!(conn.sent(), [Sent::Text("hi".into())]);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::RRef;
use abi_stable::std_types::{RArc, ROption, RSlice, RStr, RString, RVec, Tuple2};

use crate::abi::{
    self, ConnFfi, ConnFfi_TO, ConnHandle, HandlerBox, HeaderPair, HostFfi, HostFfi_TO, RequestFfi,
    RequestFfi_TO, ResponderFfi, ResponderFfi_TO, ResponseBox,
};
use crate::{Conn, Host, Level, Request, Response, SendError};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ----------------------------------------------------------------------------------------------
// The host.

/// A host for tests: hand [`TestHost::host`] to your plugin's `new`, then read what it logged
/// and published.
#[derive(Debug, Clone, Default)]
pub struct TestHost {
    state: Arc<HostState>,
}

#[derive(Debug, Default)]
struct HostState {
    config: Mutex<Vec<(String, String)>>,
    typed: Mutex<serde_json::Map<String, serde_json::Value>>,
    log: Mutex<Vec<(Level, String)>>,
    published: Mutex<Vec<Published>>,
    subscribers: Mutex<HashMap<String, u64>>,
}

/// One publish of the plugin's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The channel.
    pub channel: String,
    /// What was published.
    pub message: Sent,
}

impl TestHost {
    /// A host with an empty config table and no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key = value` to the config table the plugin will read (`Host::config`).
    #[must_use]
    pub fn config(self, key: &str, value: &str) -> Self {
        lock(&self.state.config).push((key.to_owned(), value.to_owned()));
        lock(&self.state.typed).insert(key.to_owned(), serde_json::Value::from(value));
        self
    }

    /// Adds `key` with a typed `value` (a number, a list, a table: `serde_json::json!`), as a
    /// config file would (`Host::config_value`, `Host::config_as`); `Host::config` gets it as
    /// text.
    #[must_use]
    pub fn config_typed(self, key: &str, value: serde_json::Value) -> Self {
        let text = match &value {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        lock(&self.state.config).push((key.to_owned(), text));
        lock(&self.state.typed).insert(key.to_owned(), value);
        self
    }

    /// Makes `Host::subscribers(channel)` (and what a publish to it returns) `n`.
    pub fn set_subscribers(&self, channel: &str, n: u64) {
        lock(&self.state.subscribers).insert(channel.to_owned(), n);
    }

    /// The `Host` to hand to the plugin.
    pub fn host(&self) -> Host {
        Host::from_handle(HostFfi_TO::from_ptr(
            RArc::new(TestHostFfi(Arc::clone(&self.state))),
            TD_Opaque,
        ))
    }

    /// Every line the plugin logged, in order.
    pub fn log(&self) -> Vec<(Level, String)> {
        lock(&self.state.log).clone()
    }

    /// Whether a logged line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        lock(&self.state.log)
            .iter()
            .any(|(_, l)| l.contains(needle))
    }

    /// Every publish, in order.
    pub fn published(&self) -> Vec<Published> {
        lock(&self.state.published).clone()
    }
}

#[derive(Debug, Clone)]
struct TestHostFfi(Arc<HostState>);

fn level_of(code: u8) -> Level {
    match code {
        abi::level::ERROR => Level::Error,
        abi::level::WARN => Level::Warn,
        abi::level::INFO => Level::Info,
        abi::level::DEBUG => Level::Debug,
        _ => Level::Trace,
    }
}

impl HostFfi for TestHostFfi {
    fn log(&self, level: u8, message: RStr<'_>) {
        lock(&self.0.log).push((level_of(level), message.as_str().to_owned()));
    }
    fn log_enabled(&self, _level: u8) -> bool {
        true
    }
    fn config(&self) -> RVec<Tuple2<RString, RString>> {
        lock(&self.0.config)
            .iter()
            .map(|(k, v)| Tuple2(RString::from(k.as_str()), RString::from(v.as_str())))
            .collect()
    }
    fn publish_text(&self, channel: RStr<'_>, text: RStr<'_>) -> u64 {
        self.publish(channel.as_str(), Sent::Text(text.as_str().to_owned()))
    }
    fn publish_binary(&self, channel: RStr<'_>, data: RSlice<'_, u8>) -> u64 {
        self.publish(channel.as_str(), Sent::Binary(data.to_vec()))
    }
    fn subscribers(&self, channel: RStr<'_>) -> u64 {
        lock(&self.0.subscribers)
            .get(channel.as_str())
            .copied()
            .unwrap_or(0)
    }
    fn host_version(&self) -> RString {
        RString::from("testkit")
    }
    fn config_json(&self) -> RString {
        RString::from(serde_json::Value::Object(lock(&self.0.typed).clone()).to_string())
    }
}

impl TestHostFfi {
    fn publish(&self, channel: &str, message: Sent) -> u64 {
        lock(&self.0.published).push(Published {
            channel: channel.to_owned(),
            message,
        });
        lock(&self.0.subscribers).get(channel).copied().unwrap_or(0)
    }
}

// ----------------------------------------------------------------------------------------------
// The connection.

/// What a plugin sent on a connection (or published).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping.
    Ping(Vec<u8>),
}

/// A connection for tests: pass [`TestConn::conn`] to your handler's callbacks (or drive a
/// [`TestHandler`] with it), then read what was sent, whether it was closed, and what it
/// subscribed to. Clones share one connection.
#[derive(Clone)]
pub struct TestConn {
    state: Arc<ConnState>,
    handle: ConnHandle,
}

impl std::fmt::Debug for TestConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestConn")
            .field("id", &self.state.id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct ConnState {
    id: u64,
    remote: String,
    sent: Mutex<Vec<Sent>>,
    closed: Mutex<Option<(u16, String)>>,
    /// Sends fail with `QueueFull` while set.
    full: Mutex<bool>,
    paused: Mutex<bool>,
    channels: Mutex<Vec<String>>,
    path: String,
    query: String,
    idle_timeout: Mutex<Option<std::time::Duration>>,
}

impl TestConn {
    /// An open connection with id `id` from `127.0.0.1:40000`.
    pub fn new(id: u64) -> Self {
        Self::upgraded_from(id, "/")
    }

    /// An open connection whose upgrade was `uri` (a path with an optional `?query`), for
    /// `Conn::path` and `Conn::query`.
    pub fn upgraded_from(id: u64, uri: &str) -> Self {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let state = Arc::new(ConnState {
            id,
            remote: "127.0.0.1:40000".into(),
            sent: Mutex::default(),
            closed: Mutex::default(),
            full: Mutex::default(),
            paused: Mutex::default(),
            channels: Mutex::default(),
            path: path.to_owned(),
            query: query.to_owned(),
            idle_timeout: Mutex::default(),
        });
        let handle = ConnFfi_TO::from_ptr(RArc::new(TestConnFfi(Arc::clone(&state))), TD_Opaque);
        Self { state, handle }
    }

    /// The `Conn` the plugin's callbacks get.
    pub fn conn(&self) -> Conn {
        Conn::from_handle(self.handle.clone())
    }

    /// What was sent, in order.
    pub fn sent(&self) -> Vec<Sent> {
        lock(&self.state.sent).clone()
    }

    /// The text messages sent, in order.
    pub fn texts(&self) -> Vec<String> {
        lock(&self.state.sent)
            .iter()
            .filter_map(|s| match s {
                Sent::Text(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    /// The close the plugin started (code, reason), if it did.
    pub fn closed(&self) -> Option<(u16, String)> {
        lock(&self.state.closed).clone()
    }

    /// Makes every send fail with `QueueFull` (as a slow client's full queue would) until
    /// called with `false`; then call the handler's `on_drain`.
    pub fn set_queue_full(&self, full: bool) {
        *lock(&self.state.full) = full;
    }

    /// Whether the plugin paused reading.
    pub fn is_paused(&self) -> bool {
        *lock(&self.state.paused)
    }

    /// The channels it is subscribed to.
    pub fn channels(&self) -> Vec<String> {
        lock(&self.state.channels).clone()
    }

    /// The idle timeout the plugin last set (`Conn::set_idle_timeout`), if it did.
    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        *lock(&self.state.idle_timeout)
    }
}

#[derive(Debug, Clone)]
struct TestConnFfi(Arc<ConnState>);

impl TestConnFfi {
    fn send(&self, what: Sent) -> u32 {
        let refused = if lock(&self.0.closed).is_some() {
            Some(SendError::Closed)
        } else if *lock(&self.0.full) {
            Some(SendError::QueueFull)
        } else {
            None
        };
        match refused {
            Some(e) => e.code(),
            None => {
                lock(&self.0.sent).push(what);
                0
            }
        }
    }
}

impl ConnFfi for TestConnFfi {
    fn id(&self) -> u64 {
        self.0.id
    }
    fn remote_addr(&self) -> RString {
        RString::from(self.0.remote.as_str())
    }
    fn is_open(&self) -> bool {
        lock(&self.0.closed).is_none()
    }
    fn send_text(&self, text: RStr<'_>) -> u32 {
        self.send(Sent::Text(text.as_str().to_owned()))
    }
    fn send_binary(&self, data: RSlice<'_, u8>) -> u32 {
        self.send(Sent::Binary(data.to_vec()))
    }
    fn ping(&self, payload: RSlice<'_, u8>) -> u32 {
        if payload.len() > 125 {
            return SendError::PayloadTooLong.code();
        }
        self.send(Sent::Ping(payload.to_vec()))
    }
    fn close(&self, code: u16, reason: RStr<'_>) -> u32 {
        if !crate::is_sendable_close_code(code) {
            return SendError::InvalidCloseCode.code();
        }
        if reason.len() > crate::MAX_CLOSE_REASON {
            return SendError::ReasonTooLong.code();
        }
        let mut closed = lock(&self.0.closed);
        if closed.is_some() {
            return SendError::Closed.code();
        }
        *closed = Some((code, reason.as_str().to_owned()));
        0
    }
    fn buffered_amount(&self) -> u64 {
        0
    }
    fn subscribe(&self, channel: RStr<'_>) -> u32 {
        if lock(&self.0.closed).is_some() {
            return SendError::Closed.code();
        }
        let mut channels = lock(&self.0.channels);
        if !channels.iter().any(|c| c == channel.as_str()) {
            channels.push(channel.as_str().to_owned());
        }
        0
    }
    fn unsubscribe(&self, channel: RStr<'_>) -> bool {
        let mut channels = lock(&self.0.channels);
        let before = channels.len();
        channels.retain(|c| c != channel.as_str());
        channels.len() != before
    }
    fn set_paused(&self, paused: bool) {
        *lock(&self.0.paused) = paused;
    }
    fn local_addr(&self) -> RString {
        RString::from("127.0.0.1:8080")
    }
    fn path(&self) -> RString {
        RString::from(self.0.path.as_str())
    }
    fn query(&self) -> RString {
        RString::from(self.0.query.as_str())
    }
    fn set_idle_timeout_ms(&self, ms: u64) -> bool {
        *lock(&self.0.idle_timeout) = Some(std::time::Duration::from_millis(ms));
        true
    }
}

// ----------------------------------------------------------------------------------------------
// Requests.

/// A request for tests, built like the host would hand it over; [`TestRequest::decide`] runs
/// your plugin's `upgrade` or `request` on it and returns the answer (a deferred one
/// included).
#[derive(Debug, Clone)]
pub struct TestRequest {
    method: String,
    path: String,
    query: String,
    scheme: String,
    remote_addr: String,
    headers: Vec<(String, String)>,
    subprotocols: Vec<String>,
    body: Vec<u8>,
    upgrade: bool,
    route: String,
}

impl TestRequest {
    /// A WebSocket upgrade of `uri` (a path with an optional `?query`): `GET`, `ws`, from
    /// `127.0.0.1:40000`, its route the path's first segment.
    pub fn upgrade(uri: &str) -> Self {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let route = match path[1.min(path.len())..].find('/') {
            Some(end) => path[..end + 1].to_owned(),
            None => path.to_owned(),
        };
        Self {
            method: "GET".into(),
            path: path.to_owned(),
            query: query.to_owned(),
            scheme: "ws".into(),
            remote_addr: "127.0.0.1:40000".into(),
            headers: vec![
                ("host".into(), "localhost".into()),
                ("upgrade".into(), "websocket".into()),
            ],
            subprotocols: Vec::new(),
            body: Vec::new(),
            upgrade: true,
            route,
        }
    }

    /// A plain request: `method` `uri`, `http`.
    pub fn plain(method: &str, uri: &str) -> Self {
        let mut r = Self::upgrade(uri);
        r.method = method.to_owned();
        r.scheme = "http".into();
        r.upgrade = false;
        r.headers.retain(|(k, _)| k != "upgrade");
        r
    }

    /// Adds a header (the name is lower-cased, as the host does).
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// Offers a subprotocol (`Sec-WebSocket-Protocol`).
    #[must_use]
    pub fn subprotocol(mut self, protocol: &str) -> Self {
        self.subprotocols.push(protocol.to_owned());
        self
    }

    /// Sets the body.
    #[must_use]
    pub fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    /// Sets the client's address.
    #[must_use]
    pub fn remote_addr(mut self, addr: &str) -> Self {
        self.remote_addr = addr.to_owned();
        self
    }

    /// Sets the route prefix that matched (default: the path's first segment).
    #[must_use]
    pub fn route(mut self, route: &str) -> Self {
        self.route = route.to_owned();
        self
    }

    /// Runs `decide` (your plugin's `upgrade` or `request`) on this request. If it deferred
    /// the decision, the answer is the one its responder gives (waited for up to 10 s, as a
    /// host would with its decision timeout; past it, this panics).
    pub fn decide(&self, decide: impl FnOnce(&Request<'_>) -> Response) -> TestResponse {
        let ffi = RequestShell {
            req: self,
            headers: self
                .headers
                .iter()
                .map(|(k, v)| Tuple2(RString::from(k.as_str()), RString::from(v.as_str())))
                .collect(),
            subprotocols: self
                .subprotocols
                .iter()
                .map(|p| RString::from(p.as_str()))
                .collect(),
            deferred: Arc::default(),
        };
        let request = Request::new(RequestFfi_TO::from_ptr(RRef::new(&ffi), TD_Opaque));
        let returned = decide(&request);
        let deferred = lock(&ffi.deferred).take();
        match deferred {
            None => TestResponse::new(returned.into_ffi()),
            Some(slot) => {
                let (mut answer, _) = slot
                    .1
                    .wait_timeout_while(lock(&slot.0), std::time::Duration::from_secs(10), |a| {
                        a.is_none()
                    })
                    .unwrap_or_else(PoisonError::into_inner);
                match answer.take() {
                    Some(answer) => TestResponse::new(answer),
                    None => panic!("the plugin deferred the decision and did not answer in 10 s"),
                }
            }
        }
    }
}

/// Where a deferred answer arrives, and the signal that it did.
type Slot = Arc<(Mutex<Option<ResponseBox>>, std::sync::Condvar)>;

struct RequestShell<'a> {
    req: &'a TestRequest,
    headers: RVec<HeaderPair>,
    subprotocols: RVec<RString>,
    deferred: Arc<Mutex<Option<Slot>>>,
}

struct TestResponder(Slot);

impl ResponderFfi for TestResponder {
    fn respond(&self, response: ResponseBox) -> bool {
        let mut slot = lock(&self.0 .0);
        if slot.is_some() {
            return false;
        }
        *slot = Some(response);
        self.0 .1.notify_all();
        true
    }
    fn is_waiting(&self) -> bool {
        lock(&self.0 .0).is_none()
    }
}

impl RequestFfi for RequestShell<'_> {
    fn method(&self) -> RStr<'_> {
        RStr::from_str(&self.req.method)
    }
    fn path(&self) -> RStr<'_> {
        RStr::from_str(&self.req.path)
    }
    fn query(&self) -> RStr<'_> {
        RStr::from_str(&self.req.query)
    }
    fn protocol(&self) -> RStr<'_> {
        RStr::from_str("HTTP/1.1")
    }
    fn scheme(&self) -> RStr<'_> {
        RStr::from_str(&self.req.scheme)
    }
    fn server_name(&self) -> RStr<'_> {
        RStr::from_str("localhost")
    }
    fn server_port(&self) -> u16 {
        8080
    }
    fn remote_addr(&self) -> RStr<'_> {
        RStr::from_str(&self.req.remote_addr)
    }
    fn headers(&self) -> RSlice<'_, HeaderPair> {
        self.headers.as_rslice()
    }
    fn subprotocols(&self) -> RSlice<'_, RString> {
        self.subprotocols.as_rslice()
    }
    fn body(&self) -> RSlice<'_, u8> {
        RSlice::from_slice(&self.req.body)
    }
    fn is_upgrade(&self) -> bool {
        self.req.upgrade
    }
    fn route(&self) -> RStr<'_> {
        RStr::from_str(&self.req.route)
    }
    fn defer(&self) -> ROption<abi::ResponderHandle> {
        let mut deferred = lock(&self.deferred);
        if deferred.is_some() {
            return ROption::RNone;
        }
        let slot: Slot = Arc::default();
        *deferred = Some(Arc::clone(&slot));
        ROption::RSome(ResponderFfi_TO::from_value(TestResponder(slot), TD_Opaque))
    }
}

// ----------------------------------------------------------------------------------------------
// Answers and handlers.

/// A plugin's answer, readable: status, headers, body, and the handler it accepted with.
pub struct TestResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    handler: Option<HandlerBox>,
    settings: BTreeMap<&'static str, u64>,
}

impl std::fmt::Debug for TestResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("accepts", &self.handler.is_some())
            .finish_non_exhaustive()
    }
}

impl TestResponse {
    fn new(mut r: ResponseBox) -> Self {
        let mut settings = BTreeMap::new();
        for key in [
            abi::setting::MAX_MESSAGE_SIZE,
            abi::setting::MAX_FRAME_SIZE,
            abi::setting::MAX_SEND_QUEUE,
            abi::setting::PING_INTERVAL_MS,
            abi::setting::PONG_TIMEOUT_MS,
            abi::setting::IDLE_TIMEOUT_MS,
        ] {
            if let ROption::RSome(v) = r.setting(RStr::from_str(key)) {
                settings.insert(key, v);
            }
        }
        Self {
            status: r.status(),
            headers: r
                .take_headers()
                .into_iter()
                .map(|Tuple2(k, v)| (k.into_string(), v.into_string()))
                .collect(),
            body: r.take_body().into_vec(),
            handler: r.take_handler().into_option(),
            settings,
        }
    }

    /// The status (101: accepted).
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header, in order.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A per-connection setting of a 101 (`"max_message_size"`, `"idle_timeout_ms"`, …).
    pub fn setting(&self, key: &str) -> Option<u64> {
        self.settings.get(key).copied()
    }

    /// The handler it accepted the upgrade with, to drive with a [`TestConn`].
    pub fn handler(self) -> Option<TestHandler> {
        self.handler.map(TestHandler)
    }
}

/// An accepted handler, driven as the host would: one callback at a time. Each returns the
/// panic message if the callback panicked (the host would close the connection with 1011).
pub struct TestHandler(HandlerBox);

impl std::fmt::Debug for TestHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestHandler")
    }
}

fn done(r: abi_stable::std_types::RResult<(), RString>) -> Result<(), String> {
    r.into_result().map_err(RString::into_string)
}

impl TestHandler {
    /// `on_connect`.
    pub fn on_connect(&mut self, conn: &TestConn) -> Result<(), String> {
        done(self.0.on_connect(&conn.handle))
    }
    /// `on_text`.
    pub fn on_text(&mut self, conn: &TestConn, text: &str) -> Result<(), String> {
        done(self.0.on_text(&conn.handle, RStr::from_str(text)))
    }
    /// `on_binary`.
    pub fn on_binary(&mut self, conn: &TestConn, data: &[u8]) -> Result<(), String> {
        done(self.0.on_binary(&conn.handle, RSlice::from_slice(data)))
    }
    /// `on_drain` (after [`TestConn::set_queue_full`] with `false`).
    pub fn on_drain(&mut self, conn: &TestConn) -> Result<(), String> {
        done(self.0.on_drain(&conn.handle))
    }
    /// `on_error`.
    pub fn on_error(&mut self, conn: &TestConn, error: &str) -> Result<(), String> {
        done(self.0.on_error(&conn.handle, RStr::from_str(error)))
    }
    /// `on_close`; the connection counts as closed from then on.
    pub fn on_close(&mut self, conn: &TestConn, code: u16, reason: &str) -> Result<(), String> {
        lock(&conn.state.closed).get_or_insert((code, reason.to_owned()));
        done(self.0.on_close(&conn.handle, code, RStr::from_str(reason)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_config_reaches_the_plugin_and_every_bad_field_is_named() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code, reason = "read by Deserialize only")]
        struct Settings {
            retries: u32,
            tags: Vec<String>,
            limits: std::collections::BTreeMap<String, u64>,
            verbose: bool,
        }
        let good = TestHost::new()
            .config_typed("retries", serde_json::json!(3))
            .config_typed("tags", serde_json::json!(["a", "b"]))
            .config_typed("limits", serde_json::json!({"rooms": 10}))
            .config_typed("verbose", serde_json::json!(true))
            .host();
        let s: Settings = good.config_as().unwrap();
        assert_eq!(
            (s.retries, s.tags.len(), s.limits["rooms"], s.verbose),
            (3, 2, 10, true)
        );
        assert_eq!(good.config()["tags"], r#"["a","b"]"#);
        let bad = TestHost::new()
            .config_typed("retries", serde_json::json!("many"))
            .config_typed("tags", serde_json::json!("a"))
            .config_typed("limits", serde_json::json!({"rooms": -1}))
            .config_typed("verbose", serde_json::json!(true))
            .host();
        let err = bad.config_as::<Settings>().unwrap_err().to_string();
        for field in ["config.retries", "config.tags", "config.limits.rooms"] {
            assert!(err.contains(field), "{field} not named in: {err}");
        }
        assert!(!err.contains("missing field"), "{err}");
        let missing = TestHost::new().host().config_as::<Settings>().unwrap_err();
        assert_eq!(missing.to_string(), "config: missing field `retries`");
    }

    #[test]
    fn a_connection_knows_its_upgrade_and_its_idle_timeout() {
        let conn = TestConn::upgraded_from(3, "/rooms/a?name=Ann");
        let c = conn.conn();
        assert_eq!(
            (c.path(), c.query()),
            ("/rooms/a".into(), "name=Ann".into())
        );
        assert_eq!(
            (c.local_addr(), c.is_secure()),
            ("127.0.0.1:8080".into(), false)
        );
        assert!(c.set_idle_timeout(std::time::Duration::from_secs(600)));
        assert_eq!(
            conn.idle_timeout(),
            Some(std::time::Duration::from_secs(600))
        );
    }

    #[test]
    fn conns_are_equal_and_hash_alike_by_connection() {
        let a = TestConn::new(1);
        let b = TestConn::new(2);
        let mut members = std::collections::HashSet::new();
        members.insert(a.conn());
        members.insert(a.conn());
        members.insert(b.conn());
        assert_eq!(members.len(), 2);
        assert_eq!(a.conn(), a.clone().conn());
        assert_ne!(a.conn(), b.conn());
    }

    #[test]
    fn a_closed_connection_refuses_sends_and_a_full_one_until_it_drains() {
        let conn = TestConn::new(1);
        conn.set_queue_full(true);
        assert_eq!(conn.conn().send_text("x"), Err(SendError::QueueFull));
        conn.set_queue_full(false);
        assert_eq!(conn.conn().send_text("y"), Ok(()));
        assert_eq!(conn.conn().close(1000, "bye"), Ok(()));
        assert_eq!(conn.conn().send_text("z"), Err(SendError::Closed));
        assert_eq!(conn.closed(), Some((1000, "bye".into())));
        assert_eq!(conn.texts(), ["y"]);
    }
}
