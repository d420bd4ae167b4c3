//! The seam between the host and plugin code, in native types: what a session calls
//! ([`Callbacks`]), what a connection offers a plugin ([`ConnOps`], implemented by the session's
//! shared state), and the request map a plugin decides on ([`RequestMap`]). The abi_stable
//! types stay behind it, in this layer.

use std::sync::Arc;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RResult, RSlice, RStr, RString, RVec, Tuple2};
use plugin_api::abi::{ConnFfi, ConnFfi_TO, ConnHandle, HandlerBox};
use plugin_api::SendError;

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
}

/// A connection's callbacks as a plugin's 101 answer carries them (opaque outside this layer).
pub(crate) struct Handler(pub(super) HandlerBox);

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler").finish_non_exhaustive()
    }
}

/// A plugin's callbacks bound to their connection: what a session calls. Each returns the
/// plugin's panic message if the callback panicked.
pub(crate) struct Callbacks {
    handler: HandlerBox,
    conn: ConnHandle,
}

impl std::fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callbacks").finish_non_exhaustive()
    }
}

fn done(r: RResult<(), RString>) -> Result<(), String> {
    r.into_result().map_err(RString::into_string)
}

impl Callbacks {
    /// Binds `handler` to the connection `conn`.
    pub(crate) fn new<C: ConnOps>(handler: Handler, conn: Arc<C>) -> Self {
        Self {
            handler: handler.0,
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
#[derive(Debug, Default)]
pub(crate) struct RequestMap {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: String,
    pub(crate) scheme: &'static str,
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
