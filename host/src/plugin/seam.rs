//! The seam between the host and plugin code, in native types: what a session calls
//! ([`Callbacks`]), what a connection offers a plugin ([`ConnOps`], implemented by the session's
//! shared state), and the request map a plugin decides on ([`RequestMap`]). The abi_stable
//! types stay behind it, in this layer.

use std::sync::Arc;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RResult, RSlice, RStr, RString, RVec, Tuple2};
use plugin_api::abi::{ConnFfi, ConnFfi_TO, ConnHandle, HandlerBox};
use plugin_api::SendError;

use super::isolate::proto;

/// What a connection offers plugin code (`Conn`'s methods), in native types. Implemented by
/// the session's shared state.
pub(crate) trait ConnOps: Send + Sync + Sized + 'static {
    /// The connection's id.
    fn id(&self) -> u64;
    /// The client's address.
    fn remote_addr(&self) -> &str;
    /// Whether it is open.
    fn is_open(&self) -> bool;
    /// Queues a text message.
    fn send_text(&self, text: &str) -> Result<(), SendError>;
    /// Queues a binary message.
    fn send_binary(&self, data: &[u8]) -> Result<(), SendError>;
    /// Queues a ping.
    fn ping(&self, payload: &[u8]) -> Result<(), SendError>;
    /// Starts the close handshake.
    fn close(&self, code: u16, reason: &str) -> Result<(), SendError>;
    /// Bytes queued.
    fn buffered_amount(&self) -> u64;
    /// Subscribes to a channel of the plugin.
    fn subscribe(self: &Arc<Self>, channel: &str) -> Result<(), SendError>;
    /// Unsubscribes; whether it was subscribed.
    fn unsubscribe(&self, channel: &str) -> bool;
    /// Pauses or resumes reading.
    fn set_paused(&self, paused: bool);
    /// What the connection's upgrade was: local address, TLS, path, query.
    fn facts(&self) -> &ConnFacts;
    /// Changes the idle timeout (zero: none).
    fn set_idle_timeout(&self, timeout: std::time::Duration);
    /// Arms (or moves) timer `tag`: the session runs `on_timer(tag)` after `after`.
    fn set_timer(&self, tag: u64, after: std::time::Duration) -> Result<(), SendError>;
    /// Disarms timer `tag`; whether it was armed.
    fn cancel_timer(&self, tag: u64) -> bool;
    /// Sets the send queue's low-water mark (0: none): `on_drain` when the queue falls to it.
    fn set_low_water(&self, bytes: u64);
    /// Sets the label member lists show for the connection.
    fn set_label(&self, label: &str);
    /// Queues a text or binary message whose fate the session reports (`on_sent(tag)`).
    fn send_tracked(
        &self,
        msg: tokio_tungstenite::tungstenite::Message,
        tag: u64,
    ) -> Result<(), SendError>;
}

/// What a connection's upgrade was, for `Conn`'s accessors.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct ConnFacts {
    // (Boxed strings, not `String`s: every connection keeps these; 24 bytes fewer keep
    // `ConnShared` in the allocator's 384-byte class, not the 448-byte one.)
    pub(crate) local: Box<str>,
    pub(crate) secure: bool,
    pub(crate) path: Box<str>,
    pub(crate) query: Box<str>,
    /// The request headers the plugin kept (`Response::keep_header`), lowercase names.
    #[serde(default)]
    pub(crate) headers: Vec<(String, String)>,
}

/// A [`ConnOps`] as the plugin's `Conn` handle calls it.
#[derive(Debug)]
struct ConnAdapter<C>(Arc<C>);

impl<C> Clone for ConnAdapter<C> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

fn code(r: Result<(), SendError>) -> u32 {
    match r {
        Ok(()) => 0,
        Err(e) => e.code(),
    }
}

impl<C: ConnOps> ConnFfi for ConnAdapter<C> {
    fn id(&self) -> u64 {
        self.0.id()
    }
    fn remote_addr(&self) -> RString {
        RString::from(self.0.remote_addr())
    }
    fn is_open(&self) -> bool {
        self.0.is_open()
    }
    fn send_text(&self, text: RStr<'_>) -> u32 {
        code(self.0.send_text(text.as_str()))
    }
    fn send_binary(&self, data: RSlice<'_, u8>) -> u32 {
        code(self.0.send_binary(data.as_slice()))
    }
    fn ping(&self, payload: RSlice<'_, u8>) -> u32 {
        code(self.0.ping(payload.as_slice()))
    }
    fn close(&self, close_code: u16, reason: RStr<'_>) -> u32 {
        code(self.0.close(close_code, reason.as_str()))
    }
    fn buffered_amount(&self) -> u64 {
        self.0.buffered_amount()
    }
    fn subscribe(&self, channel: RStr<'_>) -> u32 {
        code(self.0.subscribe(channel.as_str()))
    }
    fn unsubscribe(&self, channel: RStr<'_>) -> bool {
        self.0.unsubscribe(channel.as_str())
    }
    fn set_paused(&self, paused: bool) {
        self.0.set_paused(paused);
    }
    fn local_addr(&self) -> RString {
        RString::from(&*self.0.facts().local)
    }
    fn is_secure(&self) -> bool {
        self.0.facts().secure
    }
    fn path(&self) -> RString {
        RString::from(&*self.0.facts().path)
    }
    fn query(&self) -> RString {
        RString::from(&*self.0.facts().query)
    }
    fn set_idle_timeout_ms(&self, ms: u64) -> bool {
        self.0
            .set_idle_timeout(std::time::Duration::from_millis(ms));
        true
    }
    fn set_timer(&self, tag: u64, after_ms: u64) -> u32 {
        code(
            self.0
                .set_timer(tag, std::time::Duration::from_millis(after_ms)),
        )
    }
    fn cancel_timer(&self, tag: u64) -> bool {
        self.0.cancel_timer(tag)
    }
    fn header(&self, name: RStr<'_>) -> abi_stable::std_types::ROption<RString> {
        self.0
            .facts()
            .headers
            .iter()
            .find(|(k, _)| k == name.as_str())
            .map(|(_, v)| RString::from(v.as_str()))
            .into()
    }
    fn set_low_water(&self, bytes: u64) -> bool {
        self.0.set_low_water(bytes);
        true
    }
    fn set_label(&self, label: RStr<'_>) -> bool {
        self.0.set_label(label.as_str());
        true
    }
    fn send_text_tracked(&self, text: RStr<'_>, tag: u64) -> u32 {
        code(self.0.send_tracked(
            tokio_tungstenite::tungstenite::Message::text(text.as_str()),
            tag,
        ))
    }
    fn send_binary_tracked(&self, data: RSlice<'_, u8>, tag: u64) -> u32 {
        code(self.0.send_tracked(
            tokio_tungstenite::tungstenite::Message::Binary(bytes::Bytes::copy_from_slice(
                data.as_slice(),
            )),
            tag,
        ))
    }
}

/// A connection's callbacks as a plugin's 101 answer carries them (opaque outside this layer):
/// in this process, or held by the plugin's worker process.
pub(crate) enum Handler {
    /// Plugin code mapped in this process.
    Inline(HandlerBox),
    /// A handler in a worker process.
    Remote(super::isolate::RemoteHandler),
    /// A handler written in the test (in-process session tests).
    #[cfg(test)]
    Fake(FakeHandler),
}

/// What a fake handler is told (in-process session tests).
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) enum FakeEvent<'a> {
    Connect,
    Text(&'a str),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    Drain,
    Timer(u64),
    Sent(u64, bool),
    Error(&'a str),
    Close(u16, &'a str),
}

/// A handler written in a test: every event, and the connection to act on.
#[cfg(test)]
pub(crate) struct FakeHandler(pub(crate) Box<FakeFn>);

/// What a fake handler runs for each event.
#[cfg(test)]
pub(crate) type FakeFn = dyn FnMut(FakeEvent<'_>, &dyn DynConn) -> Result<(), String> + Send;

#[cfg(test)]
impl std::fmt::Debug for FakeHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeHandler")
    }
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler").finish_non_exhaustive()
    }
}

/// What the host's side of a connection offers beyond [`ConnOps`], for a plugin whose code runs
/// in a worker process.
pub(crate) trait SessionConn: ConnOps {
    /// Queues a message the worker sent (its own credit already bounds it; only the host's
    /// memory budget applies here: past it the connection closes with 1013).
    fn send_from_worker(&self, msg: tokio_tungstenite::tungstenite::Message);
    /// As `send_from_worker`, a tracked send (`Some(tag)`): its fate goes back as `on_sent`.
    fn send_from_worker_tracked(
        &self,
        msg: tokio_tungstenite::tungstenite::Message,
        tag: Option<u64>,
    );
    /// The plugin failed this connection: a callback panicked (`crashed` false) or its worker
    /// died (`crashed` true). No more callbacks but `on_close`; the close code is 1011.
    fn fail(&self, crashed: bool);
    /// Runs `hook` whenever the send queue empties.
    fn on_queue_empty(&self, hook: Box<dyn Fn() + Send + Sync>);
    /// The connection's send queue limit.
    fn max_send_queue(&self) -> u64;
}

/// A [`SessionConn`] as an object (what a worker's link keeps per connection).
pub(crate) trait DynConn: Send + Sync {
    fn id(&self) -> u64;
    fn remote_addr(&self) -> &str;
    fn send_from_worker(&self, msg: tokio_tungstenite::tungstenite::Message);
    fn send_from_worker_tracked(
        &self,
        msg: tokio_tungstenite::tungstenite::Message,
        tag: Option<u64>,
    );
    fn close(&self, code: u16, reason: &str) -> Result<(), SendError>;
    fn subscribe(&self, channel: &str) -> Result<(), SendError>;
    fn unsubscribe(&self, channel: &str) -> bool;
    fn set_paused(&self, paused: bool);
    fn fail(&self, crashed: bool);
    fn buffered(&self) -> u64;
    fn facts(&self) -> &ConnFacts;
    fn set_idle_timeout(&self, timeout: std::time::Duration);
    fn set_timer(&self, tag: u64, after: std::time::Duration) -> Result<(), SendError>;
    fn cancel_timer(&self, tag: u64) -> bool;
    fn set_low_water(&self, bytes: u64);
    fn set_label(&self, label: &str);
    fn on_queue_empty(&self, hook: Box<dyn Fn() + Send + Sync>);
    fn max_send_queue(&self) -> u64;
}

struct Bound<C>(Arc<C>);

impl<C: SessionConn> DynConn for Bound<C> {
    fn id(&self) -> u64 {
        self.0.id()
    }
    fn remote_addr(&self) -> &str {
        self.0.remote_addr()
    }
    fn send_from_worker(&self, msg: tokio_tungstenite::tungstenite::Message) {
        self.0.send_from_worker(msg);
    }
    fn send_from_worker_tracked(
        &self,
        msg: tokio_tungstenite::tungstenite::Message,
        tag: Option<u64>,
    ) {
        self.0.send_from_worker_tracked(msg, tag);
    }
    fn close(&self, code: u16, reason: &str) -> Result<(), SendError> {
        self.0.close(code, reason)
    }
    fn subscribe(&self, channel: &str) -> Result<(), SendError> {
        self.0.subscribe(channel)
    }
    fn unsubscribe(&self, channel: &str) -> bool {
        self.0.unsubscribe(channel)
    }
    fn set_paused(&self, paused: bool) {
        self.0.set_paused(paused);
    }
    fn fail(&self, crashed: bool) {
        self.0.fail(crashed);
    }
    fn buffered(&self) -> u64 {
        self.0.buffered_amount()
    }
    fn facts(&self) -> &ConnFacts {
        self.0.facts()
    }
    fn set_idle_timeout(&self, timeout: std::time::Duration) {
        self.0.set_idle_timeout(timeout);
    }
    fn set_timer(&self, tag: u64, after: std::time::Duration) -> Result<(), SendError> {
        self.0.set_timer(tag, after)
    }
    fn cancel_timer(&self, tag: u64) -> bool {
        self.0.cancel_timer(tag)
    }
    fn set_low_water(&self, bytes: u64) {
        self.0.set_low_water(bytes);
    }
    fn set_label(&self, label: &str) {
        self.0.set_label(label);
    }
    fn on_queue_empty(&self, hook: Box<dyn Fn() + Send + Sync>) {
        self.0.on_queue_empty(hook);
    }
    fn max_send_queue(&self) -> u64 {
        self.0.max_send_queue()
    }
}

/// A plugin's callbacks bound to their connection: what a session calls. Each returns the
/// plugin's panic message if the callback panicked (in a worker process, a panic comes back
/// later, through [`SessionConn::fail`]).
#[derive(Debug)]
pub(crate) enum Callbacks {
    /// Called here.
    Inline(InlineCallbacks),
    /// Sent to the worker process.
    Remote(super::isolate::RemoteCallbacks),
    /// A test's handler.
    #[cfg(test)]
    Fake(FakeHandler, Box<dyn DynConn>),
}

impl std::fmt::Debug for dyn DynConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynConn").field("id", &self.id()).finish()
    }
}

impl Callbacks {
    /// Binds `handler` to the connection `conn`.
    pub(crate) fn new<C: SessionConn>(handler: Handler, conn: Arc<C>) -> Self {
        match handler {
            Handler::Inline(h) => Self::Inline(InlineCallbacks::new(h, conn)),
            Handler::Remote(h) => Self::Remote(super::isolate::RemoteCallbacks::bind(
                h,
                Box::new(Bound(conn)),
            )),
            #[cfg(test)]
            Handler::Fake(h) => Self::Fake(h, Box::new(Bound(conn))),
        }
    }

    /// Tells a test's handler `event`.
    #[cfg(test)]
    fn fake(&mut self, event: FakeEvent<'_>) -> Result<(), String> {
        match self {
            Self::Fake(h, conn) => (h.0)(event, conn.as_ref()),
            _ => Ok(()),
        }
    }

    pub(crate) fn on_connect(&mut self) -> Result<(), String> {
        match self {
            Self::Inline(c) => c.on_connect(),
            Self::Remote(r) => r.event(proto::CONNECT, &[]),
            #[cfg(test)]
            Self::Fake(..) => self.fake(FakeEvent::Connect),
        }
    }
    pub(crate) fn on_text(&mut self, text: &str) -> Result<(), String> {
        match self {
            Self::Inline(c) => c.on_text(text),
            Self::Remote(r) => r.event(proto::TEXT, &[text.as_bytes()]),
            #[cfg(test)]
            Self::Fake(..) => self.fake(FakeEvent::Text(text)),
        }
    }
    pub(crate) fn on_binary(&mut self, data: &[u8]) -> Result<(), String> {
        match self {
            Self::Inline(c) => c.on_binary(data),
            Self::Remote(r) => r.event(proto::BINARY, &[data]),
            #[cfg(test)]
            Self::Fake(..) => self.fake(FakeEvent::Binary(data)),
        }
    }
    pub(crate) fn on_ping(&mut self, payload: &[u8]) -> Result<(), String> {
        match self {
            Self::Inline(c) => c.on_ping(payload),
            Self::Remote(r) => r.event(proto::PING, &[payload]),
            #[cfg(test)]
            Self::Fake(..) => self.fake(FakeEvent::Ping(payload)),
        }
    }
    pub(crate) fn on_pong(&mut self, payload: &[u8]) -> Result<(), String> {
        match self {
            Self::Inline(c) => c.on_pong(payload),
            Self::Remote(r) => r.event(proto::PONG, &[payload]),
            #[cfg(test)]
            Self::Fake(..) => self.fake(FakeEvent::Pong(payload)),
        }
    }
    /// In a worker, `on_drain` after a refusal follows the worker's own credit; this (the
    /// host's queue fell to the low-water mark) hands the worker its credit with the event.
    pub(crate) fn on_drain(&mut self) -> Result<(), String> {
        match self {
            Self::Inline(c) => c.on_drain(),
            Self::Remote(r) => {
                r.drain();
                Ok(())
            }
            #[cfg(test)]
            Self::Fake(..) => self.fake(FakeEvent::Drain),
        }
    }
    pub(crate) fn on_sent(&mut self, tag: u64, written: bool) -> Result<(), String> {
        match self {
            Self::Inline(c) => c.on_sent(tag, written),
            Self::Remote(r) => r.event(proto::SENT, &[&tag.to_le_bytes(), &[u8::from(written)]]),
            #[cfg(test)]
            Self::Fake(..) => self.fake(FakeEvent::Sent(tag, written)),
        }
    }
    pub(crate) fn on_timer(&mut self, tag: u64) -> Result<(), String> {
        match self {
            Self::Inline(c) => c.on_timer(tag),
            Self::Remote(r) => r.event(proto::TIMER, &[&tag.to_le_bytes()]),
            #[cfg(test)]
            Self::Fake(..) => self.fake(FakeEvent::Timer(tag)),
        }
    }
    pub(crate) fn on_error(&mut self, error: &str) -> Result<(), String> {
        match self {
            Self::Inline(c) => c.on_error(error),
            Self::Remote(r) => r.event(proto::ERROR, &[error.as_bytes()]),
            #[cfg(test)]
            Self::Fake(..) => self.fake(FakeEvent::Error(error)),
        }
    }
    pub(crate) fn on_close(&mut self, code: u16, reason: &str) -> Result<(), String> {
        match self {
            Self::Inline(c) => c.on_close(code, reason),
            Self::Remote(r) => r.event(proto::CLOSE, &[&proto::close_body(code, reason)]),
            #[cfg(test)]
            Self::Fake(..) => self.fake(FakeEvent::Close(code, reason)),
        }
    }
}

/// A plugin's callbacks in this process, bound to their connection.
pub(crate) struct InlineCallbacks {
    handler: HandlerBox,
    conn: ConnHandle,
}

impl std::fmt::Debug for InlineCallbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineCallbacks").finish_non_exhaustive()
    }
}

fn done(r: RResult<(), RString>) -> Result<(), String> {
    r.into_result().map_err(RString::into_string)
}

impl InlineCallbacks {
    /// Binds `handler` to the connection `conn`.
    pub(crate) fn new<C: ConnOps>(handler: HandlerBox, conn: Arc<C>) -> Self {
        Self {
            handler,
            conn: ConnFfi_TO::from_ptr(RArc::new(ConnAdapter(conn)), TD_Opaque),
        }
    }

    pub(crate) fn on_connect(&mut self) -> Result<(), String> {
        done(self.handler.on_connect(&self.conn))
    }
    pub(crate) fn on_text(&mut self, text: &str) -> Result<(), String> {
        done(self.handler.on_text(&self.conn, RStr::from_str(text)))
    }
    pub(crate) fn on_binary(&mut self, data: &[u8]) -> Result<(), String> {
        done(self.handler.on_binary(&self.conn, RSlice::from_slice(data)))
    }
    pub(crate) fn on_ping(&mut self, payload: &[u8]) -> Result<(), String> {
        done(
            self.handler
                .on_ping(&self.conn, RSlice::from_slice(payload)),
        )
    }
    pub(crate) fn on_pong(&mut self, payload: &[u8]) -> Result<(), String> {
        done(
            self.handler
                .on_pong(&self.conn, RSlice::from_slice(payload)),
        )
    }
    pub(crate) fn on_drain(&mut self) -> Result<(), String> {
        done(self.handler.on_drain(&self.conn))
    }
    pub(crate) fn on_timer(&mut self, tag: u64) -> Result<(), String> {
        done(self.handler.on_timer(&self.conn, tag))
    }
    pub(crate) fn on_sent(&mut self, tag: u64, written: bool) -> Result<(), String> {
        done(self.handler.on_sent(&self.conn, tag, written))
    }
    pub(crate) fn on_error(&mut self, error: &str) -> Result<(), String> {
        done(self.handler.on_error(&self.conn, RStr::from_str(error)))
    }
    pub(crate) fn on_close(&mut self, code: u16, reason: &str) -> Result<(), String> {
        done(
            self.handler
                .on_close(&self.conn, code, RStr::from_str(reason)),
        )
    }
}

/// A request as the HTTP layer hands it to a plugin (the ring request map), in native types.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct RequestMap {
    pub(crate) method: String,
    /// `HTTP/1.1`, `HTTP/2.0`.
    #[serde(default)]
    pub(crate) protocol: std::borrow::Cow<'static, str>,
    pub(crate) path: String,
    pub(crate) query: String,
    pub(crate) scheme: std::borrow::Cow<'static, str>,
    pub(crate) server_name: String,
    pub(crate) server_port: u16,
    pub(crate) remote_addr: String,
    /// Lower-cased names, arrival order, repeats kept.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) subprotocols: Vec<String>,
    pub(crate) body: Vec<u8>,
    pub(crate) is_upgrade: bool,
    /// The route prefix that matched.
    pub(crate) route: String,
}

impl From<RequestMap> for super::HostRequest {
    fn from(m: RequestMap) -> Self {
        super::HostRequest {
            method: RString::from(m.method),
            protocol: RString::from(if m.protocol.is_empty() {
                "HTTP/1.1"
            } else {
                &m.protocol
            }),
            path: RString::from(m.path),
            query: RString::from(m.query),
            scheme: RString::from(m.scheme),
            server_name: RString::from(m.server_name),
            server_port: m.server_port,
            remote_addr: RString::from(m.remote_addr),
            headers: m
                .headers
                .into_iter()
                .map(|(k, v)| Tuple2(RString::from(k), RString::from(v)))
                .collect::<RVec<_>>(),
            subprotocols: m.subprotocols.into_iter().map(RString::from).collect(),
            body: RVec::from(m.body),
            is_upgrade: m.is_upgrade,
            route: RString::from(m.route),
            deferred: Default::default(),
        }
    }
}
