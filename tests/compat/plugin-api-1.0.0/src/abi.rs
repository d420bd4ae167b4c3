//! The ABI module: every type that crosses the boundary between the host and a plugin, and the
//! only module of this crate allowed to use `unsafe`.
//!
//! Plugin authors never touch these types; they implement the safe traits of the crate root and
//! `export_plugin!` turns them into this module's root module. The host uses them through its
//! loader.
//!
//! # Growing the interface without breaking plugins
//!
//! Nothing here is a plain `#[repr(C)]` struct or an exhaustive enum that a later version would
//! need to extend. The root module is a *prefix type*, and every object (request, response,
//! handler, connection, host services) crosses as a `#[sabi_trait]` object whose vtable is a
//! prefix type too. A later 1.x may append fields and methods after the `last_prefix_field`
//! markers; a method added later must have a default body, which is what runs when the other side
//! was built against an older 1.x. Statuses cross as plain integers (`u16`, `u32`) whose unknown
//! values are tolerated, never as enums.

#![allow(
    non_local_definitions,
    reason = "#[sabi_trait] and #[derive(StableAbi)] expand to impls inside consts"
)]

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::{
    declare_root_module_statics,
    library::{LibHeader, RootModule},
    package_version_strings,
    prefix_type::PrefixTypeTrait,
    sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RArc, RBox, ROption, RResult, RSlice, RStr, RString, RVec, Tuple2},
    StableAbi,
};

/// A header as it crosses the ABI: lower-cased name, value.
pub type HeaderPair = Tuple2<RString, RString>;

/// The host's services, as handed to a plugin at creation.
pub type HostHandle = HostFfi_TO<RArc<()>>;
/// A connection handle, implemented by the host; cheap to clone, usable from any thread.
pub type ConnHandle = ConnFfi_TO<RArc<()>>;
/// A connection's callbacks, implemented by the plugin.
pub type HandlerBox = HandlerFfi_TO<RBox<()>>;
/// A response to an upgrade or a plain request, implemented by the plugin.
pub type ResponseBox = ResponseFfi_TO<RBox<()>>;
/// A plugin instance, implemented by the plugin.
pub type PluginBox = PluginFfi_TO<RBox<()>>;
/// A request borrowed by the plugin for the duration of one call, implemented by the host.
pub type RequestRef<'a> = RequestFfi_TO<'a, abi_stable::sabi_types::RRef<'a, ()>>;

/// Log levels as they cross the ABI (`u8`): the numbers of the `log` crate.
pub mod level {
    /// An error.
    pub const ERROR: u8 = 1;
    /// A warning.
    pub const WARN: u8 = 2;
    /// Information.
    pub const INFO: u8 = 3;
    /// Debugging detail.
    pub const DEBUG: u8 = 4;
    /// Tracing detail.
    pub const TRACE: u8 = 5;
}

/// Keys of the per-connection settings a 101 response may carry ([`ResponseFfi::setting`]).
/// Unknown keys are ignored by hosts that do not know them.
pub mod setting {
    /// Interval between the host's pings, in milliseconds; 0 disables them.
    pub const PING_INTERVAL_MS: &str = "ping_interval_ms";
    /// How long the host waits for a pong before closing, in milliseconds.
    pub const PONG_TIMEOUT_MS: &str = "pong_timeout_ms";
    /// Close after this long without data messages either way, in milliseconds; 0 disables it.
    pub const IDLE_TIMEOUT_MS: &str = "idle_timeout_ms";
    /// Largest message accepted from the client, in bytes.
    pub const MAX_MESSAGE_SIZE: &str = "max_message_size";
    /// Largest frame accepted from the client, in bytes.
    pub const MAX_FRAME_SIZE: &str = "max_frame_size";
    /// Most bytes queued for sending before sends fail with `QueueFull`.
    pub const MAX_SEND_QUEUE: &str = "max_send_queue";
}

/// Services the host offers a plugin. Implemented by the host.
#[sabi_trait]
pub trait HostFfi: Clone + Send + Sync + 'static {
    /// Writes a log line at `level` (see [`level`]) carrying the plugin's name.
    fn log(&self, level: u8, message: RStr<'_>);
    /// Whether a line at `level` would be written at all.
    fn log_enabled(&self, level: u8) -> bool;
    /// The plugin's configuration table.
    fn config(&self) -> RVec<Tuple2<RString, RString>>;
    /// Publishes a text message to every subscriber of the plugin's `channel`; returns how many
    /// local subscribers it was queued for.
    fn publish_text(&self, channel: RStr<'_>, text: RStr<'_>) -> u64;
    /// Publishes a binary message, as `publish_text`.
    fn publish_binary(&self, channel: RStr<'_>, data: RSlice<'_, u8>) -> u64;
    /// How many local connections are subscribed to the plugin's `channel`.
    fn subscribers(&self, channel: RStr<'_>) -> u64;
    /// The host's version, for diagnostics.
    #[sabi(last_prefix_field)]
    fn host_version(&self) -> RString;
}

/// A WebSocket connection as the plugin sees it. Implemented by the host.
///
/// Sending methods return a status code: 0 for success, otherwise a `SendError` code.
#[sabi_trait]
pub trait ConnFfi: Clone + Send + Sync + 'static {
    /// The connection's id, unique within one host process.
    fn id(&self) -> u64;
    /// The client's address (`ip:port`).
    fn remote_addr(&self) -> RString;
    /// Whether the connection is open: false once a close was sent or received.
    fn is_open(&self) -> bool;
    /// Queues a text message.
    fn send_text(&self, text: RStr<'_>) -> u32;
    /// Queues a binary message.
    fn send_binary(&self, data: RSlice<'_, u8>) -> u32;
    /// Queues a ping (payload at most 125 bytes).
    fn ping(&self, payload: RSlice<'_, u8>) -> u32;
    /// Starts the close handshake with `code` and `reason` (at most 123 bytes).
    fn close(&self, code: u16, reason: RStr<'_>) -> u32;
    /// Bytes queued for sending and not yet written to the socket.
    fn buffered_amount(&self) -> u64;
    /// Subscribes the connection to the plugin's `channel`.
    fn subscribe(&self, channel: RStr<'_>) -> u32;
    /// Unsubscribes; returns whether it was subscribed.
    #[sabi(last_prefix_field)]
    fn unsubscribe(&self, channel: RStr<'_>) -> bool;
}

/// A request, borrowed for one call. Implemented by the host.
#[sabi_trait]
pub trait RequestFfi {
    /// `GET`, `POST`, ...
    fn method(&self) -> RStr<'_>;
    /// The path, without the query string.
    fn path(&self) -> RStr<'_>;
    /// The query string without `?`, empty if none.
    fn query(&self) -> RStr<'_>;
    /// `HTTP/1.1`.
    fn protocol(&self) -> RStr<'_>;
    /// `ws`, `wss`, `http` or `https`.
    fn scheme(&self) -> RStr<'_>;
    /// The server name the client asked for (the `Host` header without the port).
    fn server_name(&self) -> RStr<'_>;
    /// The port the request arrived on.
    fn server_port(&self) -> u16;
    /// The client's IP address.
    fn remote_addr(&self) -> RStr<'_>;
    /// Headers in arrival order, names lower-cased, repeated headers kept.
    fn headers(&self) -> RSlice<'_, HeaderPair>;
    /// Subprotocols the client offered, in its order.
    fn subprotocols(&self) -> RSlice<'_, RString>;
    /// The body of a plain request; empty for upgrades.
    fn body(&self) -> RSlice<'_, u8>;
    /// Whether this is a WebSocket upgrade request.
    #[sabi(last_prefix_field)]
    fn is_upgrade(&self) -> bool;
}

/// A response. Implemented by the plugin; the host takes its parts once.
#[sabi_trait]
pub trait ResponseFfi: Send + 'static {
    /// The status: 101 accepts an upgrade, anything else is sent as a plain HTTP response.
    fn status(&self) -> u16;
    /// Takes the headers.
    fn take_headers(&mut self) -> RVec<HeaderPair>;
    /// Takes the body.
    fn take_body(&mut self) -> RVec<u8>;
    /// Takes the connection's callbacks (present on a 101).
    fn take_handler(&mut self) -> ROption<HandlerBox>;
    /// A per-connection setting (see [`setting`]), if the plugin set it.
    #[sabi(last_prefix_field)]
    fn setting(&self, key: RStr<'_>) -> ROption<u64>;
}

/// A connection's callbacks. Implemented by the plugin. An `RErr` means the callback panicked.
#[sabi_trait]
pub trait HandlerFfi: Send + 'static {
    /// The connection is open.
    fn on_connect(&mut self, conn: &ConnHandle) -> RResult<(), RString>;
    /// A text message arrived.
    fn on_text(&mut self, conn: &ConnHandle, text: RStr<'_>) -> RResult<(), RString>;
    /// A binary message arrived.
    fn on_binary(&mut self, conn: &ConnHandle, data: RSlice<'_, u8>) -> RResult<(), RString>;
    /// A ping arrived (the host answers it).
    fn on_ping(&mut self, conn: &ConnHandle, payload: RSlice<'_, u8>) -> RResult<(), RString>;
    /// A pong arrived.
    fn on_pong(&mut self, conn: &ConnHandle, payload: RSlice<'_, u8>) -> RResult<(), RString>;
    /// The send queue emptied after a send was refused as full.
    fn on_drain(&mut self, conn: &ConnHandle) -> RResult<(), RString>;
    /// A protocol or I/O error; the connection is being closed.
    fn on_error(&mut self, conn: &ConnHandle, error: RStr<'_>) -> RResult<(), RString>;
    /// The connection closed, with the peer's code and reason (1005/1006 where none).
    #[sabi(last_prefix_field)]
    fn on_close(&mut self, conn: &ConnHandle, code: u16, reason: RStr<'_>) -> RResult<(), RString>;
}

/// A plugin instance. Implemented by the plugin. An `RErr` means the call panicked.
#[sabi_trait]
pub trait PluginFfi: Send + Sync + 'static {
    /// Decides an upgrade request.
    fn upgrade(&self, req: RequestRef<'_>) -> RResult<ResponseBox, RString>;
    /// Answers a plain request.
    fn request(&self, req: RequestRef<'_>) -> RResult<ResponseBox, RString>;
    /// The host is done with this instance: no more calls will come.
    #[sabi(last_prefix_field)]
    fn shutdown(&self) -> RResult<(), RString>;
}

/// The root module every plugin library exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The plugin's name (unique per host).
    pub name: extern "C" fn() -> RStr<'static>,
    /// The plugin's own version.
    pub version: extern "C" fn() -> RStr<'static>,
    /// The route prefixes the plugin serves.
    pub routes: extern "C" fn() -> RVec<RStr<'static>>,
    /// Whether the plugin was built with `panic = "unwind"`: only then can its panics be caught.
    pub panic_unwinds: extern "C" fn() -> bool,
    /// Panics inside the plugin and catches it: returns `ROk` if panics are contained. A plugin
    /// built with `panic = "abort"` ends the process here, so the host calls it only in a
    /// short-lived probe process.
    pub self_test: extern "C" fn() -> RResult<(), RString>,
    /// Creates the plugin instance; `RErr` carries why it could not be created.
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(host: HostHandle) -> RResult<PluginBox, RString>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "wshost_plugin";
    const NAME: &'static str = "wshost plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

impl fmt::Debug for PluginMod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginMod").finish_non_exhaustive()
    }
}

impl fmt::Debug for PluginModRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginModRef")
            .field("name", &(self.name())())
            .finish_non_exhaustive()
    }
}

/// The plugin-api version this crate is, as compiled into plugins and the host.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The symbol every plugin exports: abi_stable's root module loader name.
#[doc(hidden)]
pub const ROOT_SYMBOL: &str = abi_stable::library::ROOT_MODULE_LOADER_NAME;

// ----------------------------------------------------------------------------------------------
// Panic containment.

/// Runs `f`, turning a panic into an error string that names `what`.
pub(crate) fn guard<R>(what: &str, f: impl FnOnce() -> R) -> RResult<R, RString> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => RResult::ROk(v),
        Err(payload) => {
            let msg = panic_message(&*payload);
            // Dropping the payload could itself panic; keep that inside the plugin too.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            RResult::RErr(RString::from(format!("{what} panicked: {msg}")))
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Owns a plugin value so that its `Drop` runs under `catch_unwind`: abi_stable's box destructor
/// ends the process if a destructor panics.
pub(crate) struct Guarded<T>(Option<T>);

impl<T> Guarded<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(Some(value))
    }
    pub(crate) fn get(&self) -> &T {
        self.0.as_ref().expect("guarded value present until drop")
    }
    pub(crate) fn get_mut(&mut self) -> &mut T {
        self.0.as_mut().expect("guarded value present until drop")
    }
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        if let Some(value) = self.0.take() {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(value)));
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Plugin-side implementations of the ABI traits, generic over the author's safe types.

pub(crate) struct PluginShell<P: crate::Plugin>(pub(crate) Guarded<P>);

impl<P: crate::Plugin> PluginFfi for PluginShell<P> {
    fn upgrade(&self, req: RequestRef<'_>) -> RResult<ResponseBox, RString> {
        guard("upgrade", || {
            self.0.get().upgrade(&crate::Request::new(req)).into_ffi()
        })
    }

    fn request(&self, req: RequestRef<'_>) -> RResult<ResponseBox, RString> {
        guard("request", || {
            self.0.get().request(&crate::Request::new(req)).into_ffi()
        })
    }

    fn shutdown(&self) -> RResult<(), RString> {
        guard("shutdown", || self.0.get().shutdown())
    }
}

pub(crate) struct HandlerShell<H: crate::Handler>(pub(crate) Guarded<H>);

impl<H: crate::Handler> HandlerFfi for HandlerShell<H> {
    fn on_connect(&mut self, conn: &ConnHandle) -> RResult<(), RString> {
        guard("on_connect", || {
            self.0.get_mut().on_connect(Conn::from_ref(conn))
        })
    }
    fn on_text(&mut self, conn: &ConnHandle, text: RStr<'_>) -> RResult<(), RString> {
        guard("on_text", || {
            self.0
                .get_mut()
                .on_text(Conn::from_ref(conn), text.as_str())
        })
    }
    fn on_binary(&mut self, conn: &ConnHandle, data: RSlice<'_, u8>) -> RResult<(), RString> {
        guard("on_binary", || {
            self.0
                .get_mut()
                .on_binary(Conn::from_ref(conn), data.as_slice())
        })
    }
    fn on_ping(&mut self, conn: &ConnHandle, payload: RSlice<'_, u8>) -> RResult<(), RString> {
        guard("on_ping", || {
            self.0
                .get_mut()
                .on_ping(Conn::from_ref(conn), payload.as_slice())
        })
    }
    fn on_pong(&mut self, conn: &ConnHandle, payload: RSlice<'_, u8>) -> RResult<(), RString> {
        guard("on_pong", || {
            self.0
                .get_mut()
                .on_pong(Conn::from_ref(conn), payload.as_slice())
        })
    }
    fn on_drain(&mut self, conn: &ConnHandle) -> RResult<(), RString> {
        guard("on_drain", || {
            self.0.get_mut().on_drain(Conn::from_ref(conn))
        })
    }
    fn on_error(&mut self, conn: &ConnHandle, error: RStr<'_>) -> RResult<(), RString> {
        guard("on_error", || {
            self.0
                .get_mut()
                .on_error(Conn::from_ref(conn), error.as_str())
        })
    }
    fn on_close(&mut self, conn: &ConnHandle, code: u16, reason: RStr<'_>) -> RResult<(), RString> {
        guard("on_close", || {
            self.0
                .get_mut()
                .on_close(Conn::from_ref(conn), code, reason.as_str())
        })
    }
}

pub(crate) struct ResponseShell {
    pub(crate) status: u16,
    pub(crate) headers: RVec<HeaderPair>,
    pub(crate) body: RVec<u8>,
    pub(crate) handler: Option<HandlerBox>,
    pub(crate) settings: Vec<(&'static str, u64)>,
}

impl ResponseFfi for ResponseShell {
    fn status(&self) -> u16 {
        self.status
    }
    fn take_headers(&mut self) -> RVec<HeaderPair> {
        std::mem::take(&mut self.headers)
    }
    fn take_body(&mut self) -> RVec<u8> {
        std::mem::take(&mut self.body)
    }
    fn take_handler(&mut self) -> ROption<HandlerBox> {
        self.handler.take().into()
    }
    fn setting(&self, key: RStr<'_>) -> ROption<u64> {
        self.settings
            .iter()
            .find(|(k, _)| *k == key.as_str())
            .map(|(_, v)| *v)
            .into()
    }
}

pub(crate) fn handler_box<H: crate::Handler>(handler: H) -> HandlerBox {
    HandlerFfi_TO::from_value(HandlerShell(Guarded::new(handler)), sabi_trait::TD_Opaque)
}

pub(crate) fn response_box(shell: ResponseShell) -> ResponseBox {
    ResponseFfi_TO::from_value(shell, sabi_trait::TD_Opaque)
}

// ----------------------------------------------------------------------------------------------
// The connection handle as plugin authors see it.

/// A WebSocket connection: send to it, close it, subscribe it to channels.
///
/// `Clone + Send + Sync`: store it and use it later from any thread, for example to broadcast
/// from another connection's callback or from a plugin thread. Sends never block: they queue the
/// message and return an error once the connection is closed or its send queue is full.
#[derive(Clone)]
#[repr(transparent)]
pub struct Conn(ConnHandle);

impl Conn {
    /// Views the host's handle as a `Conn` without cloning it.
    pub(crate) fn from_ref(handle: &ConnHandle) -> &Conn {
        // SAFETY: `Conn` is `#[repr(transparent)]` over `ConnHandle`, so both have the same
        // layout and a reference to one is a valid reference to the other for the same lifetime.
        unsafe { &*(handle as *const ConnHandle as *const Conn) }
    }

    pub(crate) fn handle(&self) -> &ConnHandle {
        &self.0
    }
}

/// Wraps a host-implemented handle (used by the host and by tests of plugins).
#[doc(hidden)]
pub fn conn_from_handle(handle: ConnHandle) -> Conn {
    Conn(handle)
}

/// Wraps a host-implemented service handle.
#[doc(hidden)]
pub fn host_from_handle(handle: HostHandle) -> crate::Host {
    crate::Host::from_handle(handle)
}

// ----------------------------------------------------------------------------------------------
// The root module and the library header, as `export_plugin!` emits them.

extern "C" fn mod_name<P: crate::Plugin>() -> RStr<'static> {
    RStr::from_str(P::NAME)
}

extern "C" fn mod_version<P: crate::Plugin>() -> RStr<'static> {
    RStr::from_str(P::VERSION)
}

extern "C" fn mod_routes<P: crate::Plugin>() -> RVec<RStr<'static>> {
    P::ROUTES.iter().map(|r| RStr::from_str(r)).collect()
}

extern "C" fn mod_panic_unwinds() -> bool {
    cfg!(panic = "unwind")
}

extern "C" fn mod_self_test() -> RResult<(), RString> {
    // Silence the panic message of this deliberate panic (the hook is the plugin's own).
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = guard("self-test", || panic!("wshost self-test"));
    std::panic::set_hook(previous);
    match result {
        RResult::RErr(msg) if msg.as_str().contains("wshost self-test") => RResult::ROk(()),
        RResult::RErr(other) => RResult::RErr(other),
        RResult::ROk(()) => RResult::RErr(RString::from("the self-test panic was not caught")),
    }
}

extern "C" fn mod_create<P: crate::Plugin>(host: HostHandle) -> RResult<PluginBox, RString> {
    let created = guard("new", || P::new(crate::Host::from_handle(host)));
    match created {
        RResult::ROk(Ok(plugin)) => RResult::ROk(PluginFfi_TO::from_value(
            PluginShell(Guarded::new(plugin)),
            sabi_trait::TD_Opaque,
        )),
        RResult::ROk(Err(e)) => RResult::RErr(RString::from(e.to_string())),
        RResult::RErr(panic) => RResult::RErr(panic),
    }
}

fn root_module<P: crate::Plugin>() -> PluginModRef {
    PluginMod {
        name: mod_name::<P>,
        version: mod_version::<P>,
        routes: mod_routes::<P>,
        panic_unwinds: mod_panic_unwinds,
        self_test: mod_self_test,
        create: mod_create::<P>,
    }
    .leak_into_prefix()
}

extern "C" fn load_root_module<P: crate::Plugin>() -> abi_stable::library::RootModuleResult {
    abi_stable::library::__call_root_module_loader(root_module::<P>)
}

/// The library header for plugin `P`: what `export_plugin!` exports under [`ROOT_SYMBOL`].
#[doc(hidden)]
pub const fn lib_header<P: crate::Plugin>() -> LibHeader {
    // SAFETY: `load_root_module::<P>` returns the root module of type `PluginModRef`, the type
    // this header is declared for, so the layout recorded in the header is that of the module.
    unsafe {
        LibHeader::from_constructor::<PluginModRef>(
            load_root_module::<P>,
            abi_stable::library::CheckTypeLayout::Yes,
        )
    }
}
