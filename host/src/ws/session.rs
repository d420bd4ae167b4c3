//! A WebSocket session: one task per connection turns socket events into the plugin's callbacks,
//! one at a time and in order, and writes the connection's send queue out. It reads every
//! message that has already arrived (running its callbacks, whose sends go straight into the
//! queue without waking anyone) before it flushes once: an echo of a burst is one write.

use std::sync::Arc;
use std::time::Duration;

// The runtime's clock (the OS clock, unless a test paused it): the session's timers are tested
// in process with paused time.
use tokio::time::Instant;

use std::task::{Context, Poll};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::conn::ConnShared;
use super::counted::{Counted, Partial};
use super::rebind::SessionIo;
use crate::channels::Hub;
use crate::config::Config;
use crate::limits::ConnLimits;
use crate::metrics::{CodeLabel, Metrics};
use crate::plugin::LoadedPlugin;

type Ws = WebSocketStream<Counted<SessionIo>>;

/// Most bytes fed to the socket before a flush, so one flush never waits on an unbounded batch.
const MAX_BATCH: u64 = 256 << 10;
/// Most messages read (and answered) before the answers are flushed, so that a client that
/// keeps sending still gets its answers.
const MAX_READS_BEFORE_FLUSH: u32 = 64;

/// Everything a session needs besides its socket.
pub(crate) struct Start {
    pub(crate) id: u64,
    pub(crate) peer: std::net::SocketAddr,
    /// The client's address as plugins see it (behind a trusted proxy, the forwarded one).
    pub(crate) remote: String,
    /// The session's place under the connection limits.
    pub(crate) admission: crate::context::Admission,
    pub(crate) plugin: Arc<LoadedPlugin>,
    pub(crate) handler: crate::plugin::Handler,
    /// What the upgrade was, for `Conn`'s accessors.
    pub(crate) facts: crate::plugin::ConnFacts,
    pub(crate) limits: ConnLimits,
    pub(crate) hub: Arc<Hub>,
    pub(crate) budget: Arc<crate::budget::MemoryBudget>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: CancellationToken,
}

/// The session of an upgrade: waits for hyper to hand over the connection, then runs until it
/// closes. A plain function (not `async`), so the task holds one future, not a future and the
/// arguments it was made from: its size is the connection's memory.
pub(crate) fn run(
    on_upgrade: hyper::upgrade::OnUpgrade,
    start: Start,
    config: Arc<Config>,
) -> impl std::future::Future<Output = ()> + Send {
    let span = tracing::info_span!("conn", conn_id = start.id, peer = %start.peer,
        plugin = %start.plugin.name, generation = start.plugin.generation);
    serve(Socket::Upgrade(on_upgrade), start, config).instrument(span)
}

/// Where a session's socket comes from.
enum Socket {
    /// hyper's upgrade, once it completes.
    Upgrade(hyper::upgrade::OnUpgrade),
    /// A socket already past the handshake (in-process tests).
    #[cfg(test)]
    Ready(SessionIo),
}

/// Runs the session until the connection closes. One `async fn` for all of it (the upgrade
/// included), not one that awaits another: the task's future is the connection's memory.
async fn serve(socket: Socket, start: Start, config: Arc<Config>) {
    // The socket moves to this runtime (the plugin's) with what hyper read past the handshake.
    // (The bytes are copied out, and hyper's read buffer, which they may share, freed now: the
    // session must not keep it for its lifetime.)
    let (io, read_ahead) = match socket {
        Socket::Upgrade(on_upgrade) => match on_upgrade.await {
            Ok(upgraded) => SessionIo::take(upgraded),
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        },
        #[cfg(test)]
        Socket::Ready(io) => (io, bytes::Bytes::new()),
    };
    let config = &*config;
    let Start {
        id,
        peer: _,
        remote,
        admission,
        plugin,
        handler,
        facts,
        limits: own_limits,
        hub,
        budget,
        metrics,
        shutdown,
    } = start;
    // Every limit is set: the host's defaults are the last source merged.
    let limits = own_limits.over(config.limits);
    let max_message = limits.max_message_size.map_or(usize::MAX, clamp_usize);
    let max_frame = limits
        .max_frame_size
        .map_or(usize::MAX, clamp_usize)
        .min(max_message);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(config.read_buffer_size)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_frame));
    let partial = Partial::new(Arc::clone(&budget));
    let io = Counted::new(io, Arc::clone(&partial)).with_ahead(&read_ahead);
    // Freed now, not at the end: it may share hyper's read buffer (measured: 4 KiB more an
    // idle connection while it was kept).
    drop(read_ahead);
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config)).await;
    let max_send_queue = limits.max_send_queue.unwrap_or(u64::MAX);
    let plugin_name: Arc<str> = Arc::from(plugin.name.as_str());
    let conn = ConnShared::new(
        id,
        remote,
        plugin_name,
        hub,
        budget,
        Arc::clone(&metrics),
        max_send_queue,
        facts,
    );
    let callbacks = crate::plugin::Callbacks::new(handler, Arc::clone(&conn));
    let mut ws = ws;
    let mut out = Writer::default();

    tracing::debug!("connection open");
    plugin.connection_opened();
    let mut s = Session {
        callbacks,
        conn,
        slow: config.slow_callback,
        failed: false,
        host_close: None,
        metrics: Arc::clone(&metrics),
        counts: Counts::default(),
        durations: Default::default(),
    };
    s.call("on_connect", |cb| cb.on_connect());
    let timing = Timing::new(config, &limits);
    let (code, reason) = s
        .read_loop(
            &mut ws,
            &mut out,
            &shutdown,
            plugin.restarting(),
            timing,
            &partial,
        )
        .await;
    partial.delivered();
    s.counts.flush_in(&metrics);
    s.conn.finish();
    s.call_always("on_close", |cb| cb.on_close(code, &reason));
    s.durations.flush_into(&metrics.callback_seconds);
    // The handler's drop is plugin code too: on the watchdog's books.
    crate::plugin::exec::enter(
        crate::plugin::exec::call_index("drop"),
        s.conn.id,
        std::time::Instant::now(),
    );
    let Session { callbacks, .. } = s;
    drop(callbacks);
    crate::plugin::exec::leave();
    plugin.connection_closed();
    drop(admission);
    tracing::debug!(code, %reason, "connection closed");
    // Write what is still queued (an answer, a close frame), bounded by the close timeout;
    // then the socket closes as `ws` is dropped.
    let _ = tokio::time::timeout(
        config.close_timeout,
        std::future::poll_fn(|cx| out.poll_final(cx, &mut ws, &s.conn)),
    )
    .await;
    s.conn.release_queued();
    out.counts.flush_out(&metrics);
    // Last, so that a scraper that sees the close also sees every count of the connection.
    metrics.closes.get_or_create(&CodeLabel { code }).inc();
}

fn clamp_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

struct Session {
    /// The plugin's callbacks, bound to this connection.
    callbacks: crate::plugin::Callbacks,
    conn: Arc<ConnShared>,
    slow: Duration,
    /// A callback panicked: no more callbacks but `on_close`.
    failed: bool,
    /// The close frame the host itself started the close handshake with (a limit, an error,
    /// shutdown): `on_close` is told this code rather than the peer's echo of it.
    host_close: Option<(u16, String)>,
    metrics: Arc<Metrics>,
    /// Messages and bytes received since they were last added to the metrics.
    counts: Counts,
    /// Callback durations since they were last added to the metrics.
    durations: crate::metrics::LocalHistogram,
}

/// Message and byte counts kept by one task and added to the shared metrics in batches, so the
/// per-message path touches no shared cache line.
#[derive(Debug, Default)]
struct Counts {
    messages: u64,
    bytes: u64,
}

/// Messages counted locally before they are added to the metrics.
const COUNT_BATCH: u64 = 1024;

impl Counts {
    fn add(&mut self, bytes: usize) -> bool {
        self.messages += 1;
        self.bytes += bytes as u64;
        self.messages >= COUNT_BATCH
    }

    fn flush_in(&mut self, m: &Metrics) {
        m.messages_in.inc_by(std::mem::take(&mut self.messages));
        m.bytes_in.inc_by(std::mem::take(&mut self.bytes));
    }

    fn flush_out(&mut self, m: &Metrics) {
        m.messages_out.inc_by(std::mem::take(&mut self.messages));
        m.bytes_out.inc_by(std::mem::take(&mut self.bytes));
    }
}

/// The connection's timers and limits, from the host's config and the plugin's 101.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) ping_interval: Option<Duration>,
    pub(crate) pong_timeout: Duration,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) close_timeout: Duration,
    pub(crate) max_message_rate: u32,
    pub(crate) message_timeout: Option<Duration>,
}

impl Timing {
    fn new(config: &Config, limits: &ConnLimits) -> Self {
        // A plugin's 101 may carry any number of milliseconds: bounded, so that no deadline
        // overflows the clock.
        let bounded = |v: Option<Duration>| v.unwrap_or_default().min(crate::config::MAX_DURATION);
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Self {
            ping_interval: nonzero(bounded(limits.ping_interval)),
            pong_timeout: bounded(limits.pong_timeout),
            idle_timeout: nonzero(bounded(limits.idle_timeout)),
            close_timeout: config.close_timeout,
            max_message_rate: config.max_message_rate,
            message_timeout: nonzero(config.message_timeout),
        }
    }
}

/// Why the host closes a connection itself, each with the code (RFC 6455 §7.4.1) and the reason
/// it sends; `on_close` is told the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The host is shutting down (SIGTERM): 1001.
    ShuttingDown,
    /// The connection's generation was replaced and `--replaced-grace` passed: 1012, so the
    /// client reconnects to the new one.
    ServiceRestart,
    /// No data messages either way for `--idle-timeout`: 1001.
    IdleTimeout,
    /// No pong within `--pong-timeout` (the peer is gone; `on_close` gets 1006): 1001.
    PingTimeout,
    /// The peer broke the protocol: 1002.
    ProtocolError,
    /// A text message that is not UTF-8: 1007.
    InvalidUtf8,
    /// A message did not arrive whole within `--message-timeout`: 1008.
    MessageTimeout,
    /// More data messages per second than `--max-message-rate`: 1008.
    RateLimit,
    /// A message or frame over the connection's limit: 1009.
    TooBig,
    /// A callback of the plugin panicked: 1011.
    PluginPanicked,
    /// The plugin's worker process died (crash, callback timeout, memory limit): 1011.
    PluginCrashed,
    /// Any other failure on the host's side: 1011.
    InternalError,
    /// Incoming data did not fit the host's memory budget (`--max-buffered-total`): 1013.
    MemoryBudget,
}

impl CloseReason {
    /// The close code sent.
    pub(crate) fn code(self) -> u16 {
        match self {
            Self::ShuttingDown | Self::IdleTimeout | Self::PingTimeout => 1001,
            Self::ProtocolError => 1002,
            Self::InvalidUtf8 => 1007,
            Self::MessageTimeout | Self::RateLimit => 1008,
            Self::TooBig => 1009,
            Self::ServiceRestart => 1012,
            Self::PluginPanicked | Self::PluginCrashed | Self::InternalError => 1011,
            Self::MemoryBudget => 1013,
        }
    }

    /// The close reason sent.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::ShuttingDown => "going away",
            Self::IdleTimeout => "idle timeout",
            Self::PingTimeout => "ping timeout",
            Self::ProtocolError => "protocol error",
            Self::InvalidUtf8 => "invalid UTF-8",
            Self::MessageTimeout => "message timeout",
            Self::RateLimit => "message rate limit exceeded",
            Self::TooBig => "message too big",
            Self::PluginPanicked | Self::InternalError => "internal error",
            Self::PluginCrashed => "plugin crashed",
            Self::MemoryBudget => "server busy: try again later",
            Self::ServiceRestart => "service restart",
        }
    }
}

/// A token bucket: `rate` messages a second, bursts of as many.
struct RateLimit {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    fn new(rate: u32, now: Instant) -> Option<Self> {
        (rate > 0).then(|| Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: now,
        })
    }

    /// Takes one token; false if there is none.
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Session {
    /// Starts the close handshake for a reason of the host's; `on_close` will get its code.
    fn close_by_host(&mut self, why: CloseReason) {
        let (code, reason) = (why.code(), why.reason());
        if self.conn.close_unchecked(code, reason).is_ok() {
            self.host_close = Some((code, reason.to_owned()));
        }
    }

    /// Reads until the connection ends; returns the code and reason `on_close` gets: the
    /// host's if it started the close, else the peer's (1006 if the peer sent none).
    async fn read_loop(
        &mut self,
        ws: &mut Ws,
        out: &mut Writer,
        shutdown: &CancellationToken,
        restart: &std::sync::atomic::AtomicBool,
        mut timing: Timing,
        partial: &Partial,
    ) -> (u16, String) {
        let mut peer_close: Option<(u16, String)> = None;
        let mut close_deadline: Option<Instant> = None;
        let mut shutting_down = false;
        let conn = Arc::clone(&self.conn);
        let started = Instant::now();
        let mut last_data_in = started;
        let mut next_ping = timing.ping_interval.map(|i| started + i);
        let mut awaiting_pong: Option<Instant> = None;
        let mut rate = RateLimit::new(timing.max_message_rate, started);
        let far = Duration::from_secs(86_400 * 365);
        let timer = tokio::time::sleep(far);
        tokio::pin!(timer);
        let mut wake = self.next_wake(&timing, next_ping, awaiting_pong, last_data_in, far);
        timer.as_mut().reset(wake);
        // Made once, not per message: a waiting cancellation future takes a lock to register and
        // another to leave.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        loop {
            // Flags the connection's handle set (and woke this task for): a send that was
            // refused has drained; a close was queued (its handshake has a deadline).
            if conn.take_drained() {
                self.call("on_drain", |cb| cb.on_drain());
            }
            if let Some(idle) = conn.take_idle_change() {
                timing.idle_timeout =
                    (!idle.is_zero()).then_some(idle.min(crate::config::MAX_DURATION));
                wake = self.next_wake(
                    &timing,
                    next_ping,
                    awaiting_pong,
                    last_data_in.max(conn.last_data_out()),
                    far,
                );
                if let Some(d) = close_deadline {
                    wake = wake.min(d);
                }
                timer.as_mut().reset(wake);
            }
            if let Some(crashed) = conn.take_failed() {
                if !self.failed {
                    self.failed = true;
                    self.close_by_host(if crashed {
                        CloseReason::PluginCrashed
                    } else {
                        CloseReason::PluginPanicked
                    });
                }
            }
            if conn.take_closing() && close_deadline.is_none() {
                close_deadline = Some(Instant::now() + timing.close_timeout);
                if close_deadline < Some(wake) {
                    wake = close_deadline.unwrap_or(wake);
                    timer.as_mut().reset(wake);
                }
            }
            // Biased, I/O first: while messages are ready nothing else is polled (the timer and
            // the cancellation future each take a lock or a clock read when polled). Tokio's
            // cooperative budget makes a busy socket return Pending now and then, so the other
            // branches still get their turn.
            tokio::select! {
                biased;
                item = std::future::poll_fn(|cx| out.poll_io(cx, ws, &conn, &self.metrics)) => match item {
                    IoEvent::End => break,
                    IoEvent::Flags => {}
                    IoEvent::WriteFailed => {
                        conn.peer_closed();
                        tracing::debug!("write failed; the connection is gone");
                        break;
                    }
                    IoEvent::Read(Ok(msg)) => {
                    partial.delivered();
                    match msg {
                        Message::Text(t) => {
                            if self.data_in(t.len(), &mut last_data_in, rate.as_mut()) {
                                self.call_at(last_data_in, "on_text", |cb| cb.on_text(t.as_str()));
                            }
                        }
                        Message::Binary(b) => {
                            if self.data_in(b.len(), &mut last_data_in, rate.as_mut()) {
                                self.call_at(last_data_in, "on_binary", |cb| cb.on_binary(&b));
                            }
                        }
                        Message::Ping(p) => self.call("on_ping", |cb| cb.on_ping(&p)),
                        Message::Pong(p) => {
                            awaiting_pong = None;
                            self.call("on_pong", |cb| cb.on_pong(&p));
                        }
                        Message::Close(frame) => {
                            peer_close = Some(frame.map_or((1005, String::new()), |f| {
                                (u16::from(f.code), f.reason.as_str().to_owned())
                            }));
                            conn.peer_closed();
                            if close_deadline.is_none() {
                                let d = Instant::now() + timing.close_timeout;
                                close_deadline = Some(d);
                                if d < wake {
                                    wake = d;
                                    timer.as_mut().reset(wake);
                                }
                            }
                        }
                        Message::Frame(_) => {}
                    }},
                    IoEvent::Read(Err(e)) => {
                        self.read_error(e);
                        break;
                    }
                },
                () = &mut cancelled, if !shutting_down => {
                    shutting_down = true;
                    self.close_by_host(if restart.load(std::sync::atomic::Ordering::Acquire) {
                        CloseReason::ServiceRestart
                    } else {
                        CloseReason::ShuttingDown
                    });
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if close_deadline.is_some_and(|d| now >= d) {
                        tracing::debug!("close handshake timed out; dropping the connection");
                        break;
                    }
                    // A paused connection is not read, so its pongs cannot arrive: no pings then.
                    let paused = conn.is_paused();
                    if !paused && awaiting_pong.is_some_and(|sent| now >= sent + timing.pong_timeout) {
                        tracing::info!(pong_timeout = ?timing.pong_timeout,
                            "no pong in time; dropping the connection");
                        let why = CloseReason::PingTimeout;
                        let _ = conn.close_unchecked(why.code(), why.reason());
                        // The peer is gone: it sent no close frame.
                        return (1006, String::new());
                    }
                    if let (Some(at), Some(interval)) = (next_ping, timing.ping_interval) {
                        if now >= at {
                            if awaiting_pong.is_none() && !paused {
                                // A ping that cannot be queued still starts the pong clock:
                                // a peer that does not read gets dropped all the same.
                                let _ = conn.enqueue(Message::Ping(bytes::Bytes::new()));
                                awaiting_pong = Some(now);
                            }
                            next_ping = Some(now + interval);
                        }
                    }
                    if let Some(limit) = timing.message_timeout {
                        if partial.pending_for(now).is_some_and(|d| d >= limit) && conn.is_open() {
                            tracing::info!(message_timeout = ?limit,
                                "a message took too long to arrive; closing with 1008");
                            self.close_by_host(CloseReason::MessageTimeout);
                        }
                    }
                    if let Some(idle) = timing.idle_timeout {
                        let last = last_data_in.max(conn.last_data_out());
                        if now >= last + idle && conn.is_open() {
                            tracing::info!(idle_timeout = ?idle, "idle connection closed");
                            self.close_by_host(CloseReason::IdleTimeout);
                        }
                    }
                    wake = self.next_wake(&timing, next_ping, awaiting_pong,
                        last_data_in.max(conn.last_data_out()), far);
                    if let Some(d) = close_deadline {
                        wake = wake.min(d);
                    }
                    timer.as_mut().reset(wake);
                }
            }
        }
        self.host_close
            .take()
            .or(peer_close)
            .unwrap_or((1006, String::new()))
    }

    /// When the timer must next look at the connection.
    fn next_wake(
        &self,
        timing: &Timing,
        next_ping: Option<Instant>,
        awaiting_pong: Option<Instant>,
        last_data: Instant,
        far: Duration,
    ) -> Instant {
        let mut wake = Instant::now() + far;
        if let Some(p) = next_ping {
            wake = wake.min(p);
        }
        if let Some(sent) = awaiting_pong.filter(|_| !self.conn.is_paused()) {
            wake = wake.min(sent + timing.pong_timeout);
        }
        if let Some(idle) = timing.idle_timeout {
            if self.conn.is_open() {
                wake = wake.min(last_data + idle);
            }
        }
        if let Some(limit) = timing.message_timeout {
            // Look at least this often, so a message that starts arriving between two looks is
            // caught within twice the limit.
            wake = wake.min(Instant::now() + limit);
        }
        wake
    }

    /// A data message of `len` bytes arrived: note when, count it, and say whether it may be
    /// delivered under the rate limit.
    fn data_in(
        &mut self,
        len: usize,
        last_data_in: &mut Instant,
        rate: Option<&mut RateLimit>,
    ) -> bool {
        let now = Instant::now();
        *last_data_in = now;
        if self.counts.add(len) {
            self.counts.flush_in(&self.metrics);
        }
        self.within_rate(rate, now)
    }

    /// Whether a data message may be delivered under the rate limit; past it, the connection
    /// is closed with 1008 and no more callbacks run.
    fn within_rate(&mut self, rate: Option<&mut RateLimit>, now: Instant) -> bool {
        let Some(r) = rate else {
            return !self.failed;
        };
        if r.take(now) {
            return !self.failed;
        }
        if !self.failed {
            tracing::warn!(
                limit = r.rate,
                "message rate limit exceeded; closing with 1008"
            );
            self.failed = true;
            self.close_by_host(CloseReason::RateLimit);
        }
        false
    }

    /// The socket failed: tell the plugin, and close with the code RFC 6455 asks for.
    fn read_error(&mut self, e: WsError) {
        let why = match &e {
            WsError::ConnectionClosed | WsError::AlreadyClosed => return,
            WsError::Io(io) if super::counted::is_budget_exhausted(io) => {
                Some(CloseReason::MemoryBudget)
            }
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) | WsError::Io(_) => None,
            WsError::Protocol(_) => Some(CloseReason::ProtocolError),
            WsError::Utf8(_) => Some(CloseReason::InvalidUtf8),
            WsError::Capacity(_) => Some(CloseReason::TooBig),
            _ => Some(CloseReason::InternalError),
        };
        tracing::debug!(error = %e, close_code = ?why.map(CloseReason::code), "connection error");
        let text = e.to_string();
        self.call("on_error", |cb| cb.on_error(&text));
        if let Some(why) = why {
            self.close_by_host(why);
        }
    }

    fn call(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&mut crate::plugin::Callbacks) -> Result<(), String>,
    ) {
        if !self.failed {
            self.call_always(name, f);
        }
    }

    fn call_always(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&mut crate::plugin::Callbacks) -> Result<(), String>,
    ) {
        self.run_callback(Instant::now(), name, f);
    }

    /// As `call`, for a callback whose message arrived at `now` (one clock read per message).
    fn call_at(
        &mut self,
        now: Instant,
        name: &'static str,
        f: impl FnOnce(&mut crate::plugin::Callbacks) -> Result<(), String>,
    ) {
        if !self.failed {
            self.run_callback(now, name, f);
        }
    }

    fn run_callback(
        &mut self,
        started: Instant,
        name: &'static str,
        f: impl FnOnce(&mut crate::plugin::Callbacks) -> Result<(), String>,
    ) {
        self.conn.set_in_callback(true);
        crate::plugin::exec::enter(
            crate::plugin::exec::call_index(name),
            self.conn.id,
            started.into_std(),
        );
        let result = f(&mut self.callbacks);
        crate::plugin::exec::leave();
        self.conn.set_in_callback(false);
        let elapsed = started.elapsed();
        if self.durations.observe(elapsed) {
            self.durations.flush_into(&self.metrics.callback_seconds);
        }
        if elapsed >= self.slow {
            tracing::warn!(
                callback = name,
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                "slow callback: callbacks run on the connection's task and must not block; \
                 move blocking work to a plugin thread"
            );
        }
        if let Err(panic) = result {
            tracing::error!(callback = name, %panic,
                "plugin callback panicked; closing the connection with 1011");
            self.failed = true;
            self.close_by_host(CloseReason::PluginPanicked);
        }
    }
}

fn count_out(counts: &mut Counts, m: &Message) {
    if is_data(m) {
        counts.messages += 1;
        counts.bytes += m.len() as u64;
    }
}

fn is_data(m: &Message) -> bool {
    matches!(m, Message::Text(_) | Message::Binary(_))
}

/// What a socket event was.
enum IoEvent {
    Read(Result<Message, WsError>),
    /// The peer's side is over (after the close handshake, or the TCP connection ended).
    End,
    /// The connection's handle set a flag (the queue drained after a refusal, a close was
    /// queued) for the session to act on.
    Flags,
    WriteFailed,
}

/// The writing side of a session: frames taken from the connection's queue, fed to the socket
/// and flushed.
#[derive(Default)]
struct Writer {
    /// Frames taken from the shared queue, not yet fed.
    local: super::conn::Queue,
    /// Queued bytes fed since the last flush (released from the send queue once flushed).
    fed: u64,
    /// Whether a data message is among them (for the idle timeout).
    data: bool,
    /// Something was fed and not flushed yet.
    dirty: bool,
    /// Messages read since the last flush.
    reads: u32,
    /// A close frame was fed: nothing after it.
    close_fed: bool,
    counts: Counts,
}

impl Writer {
    /// Feeds queued frames while the socket takes them.
    fn feed(&mut self, cx: &mut Context<'_>, ws: &mut Ws, conn: &ConnShared) -> Result<(), ()> {
        while !self.close_fed && self.fed < MAX_BATCH {
            if self.local.is_empty() {
                conn.take_queued(&mut self.local);
                if self.local.is_empty() {
                    break;
                }
            }
            match ws.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Err(()),
                Poll::Pending => break,
            }
            let Some((msg, n)) = self.local.pop_front() else {
                break;
            };
            count_out(&mut self.counts, &msg);
            self.data |= is_data(&msg);
            self.close_fed = matches!(msg, Message::Close(_));
            ws.start_send_unpin(msg).map_err(|_| ())?;
            self.fed += n;
            self.dirty = true;
        }
        Ok(())
    }

    /// Flushes what was fed; `Ready(Ok)` once it is on the wire.
    fn flush(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut Ws,
        conn: &ConnShared,
        metrics: &Metrics,
    ) -> Poll<Result<(), ()>> {
        if !self.dirty {
            return Poll::Ready(Ok(()));
        }
        match ws.poll_flush_unpin(cx) {
            Poll::Ready(Ok(())) => {
                self.dirty = false;
                self.reads = 0;
                // An idle connection keeps no queue memory.
                self.local.shrink_if_empty();
                conn.written(std::mem::take(&mut self.fed));
                if std::mem::take(&mut self.data) {
                    conn.sent_data();
                }
                if self.counts.messages >= COUNT_BATCH {
                    self.counts.flush_out(metrics);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(())),
            Poll::Pending => Poll::Pending,
        }
    }

    /// One step of the connection's I/O: feed what is queued, read the next message if one
    /// has arrived, and flush only when nothing more is readable (or after many reads).
    fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut Ws,
        conn: &ConnShared,
        metrics: &Metrics,
    ) -> Poll<IoEvent> {
        conn.register(cx.waker());
        if conn.has_flags() {
            return Poll::Ready(IoEvent::Flags);
        }
        // A few rounds of feed, read, flush; if there is still work after them, yield to the
        // other connections and come back.
        for _ in 0..4 {
            if self.feed(cx, ws, conn).is_err() {
                return Poll::Ready(IoEvent::WriteFailed);
            }
            let paused = conn.is_paused();
            let read_polled = !paused && (self.reads < MAX_READS_BEFORE_FLUSH || !self.dirty);
            if read_polled {
                match ws.poll_next_unpin(cx) {
                    Poll::Ready(Some(msg)) => {
                        self.reads += 1;
                        return Poll::Ready(IoEvent::Read(msg));
                    }
                    Poll::Ready(None) => return Poll::Ready(IoEvent::End),
                    Poll::Pending => {}
                }
            }
            match self.flush(cx, ws, conn, metrics) {
                Poll::Ready(Ok(())) => {
                    // Done unless reading was skipped for this flush, or more was queued (or
                    // held back by MAX_BATCH) meanwhile.
                    let more = !self.close_fed && (!self.local.is_empty() || conn.has_queued());
                    if conn.has_flags() {
                        // The flush emptied a queue a refused send waits on: `on_drain` now.
                        return Poll::Ready(IoEvent::Flags);
                    }
                    if (read_polled || paused) && !more {
                        return Poll::Pending;
                    }
                }
                Poll::Ready(Err(())) => return Poll::Ready(IoEvent::WriteFailed),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// After the session: writes out what is still queued, then flushes.
    fn poll_final(&mut self, cx: &mut Context<'_>, ws: &mut Ws, conn: &ConnShared) -> Poll<()> {
        loop {
            if self.feed(cx, ws, conn).is_err() {
                return Poll::Ready(());
            }
            if !self.dirty {
                return Poll::Ready(());
            }
            match ws.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => {
                    self.dirty = false;
                    conn.written(std::mem::take(&mut self.fed));
                    if self.close_fed || (self.local.is_empty() && !conn.has_queued()) {
                        return Poll::Ready(());
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_refills_with_time() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(2, t0).expect("a limit");
        assert!(r.take(t0));
        assert!(r.take(t0));
        assert!(!r.take(t0), "the burst is the rate");
        assert!(
            r.take(t0 + Duration::from_millis(500)),
            "half a second refills one"
        );
        assert!(!r.take(t0 + Duration::from_millis(500)));
        assert!(r.take(t0 + Duration::from_secs(60)));
        assert!(r.take(t0 + Duration::from_secs(60)));
        assert!(
            !r.take(t0 + Duration::from_secs(60)),
            "refills never past the burst"
        );
        assert!(RateLimit::new(0, t0).is_none(), "0 is off");
    }

    #[test]
    fn a_plugins_timers_are_bounded_so_deadlines_never_overflow() {
        let settings = ConnLimits {
            ping_interval: Some(Duration::from_millis(u64::MAX)),
            pong_timeout: Some(Duration::from_millis(u64::MAX)),
            idle_timeout: Some(Duration::from_millis(u64::MAX)),
            ..ConnLimits::default()
        };
        let t = Timing::new(&Config::default(), &settings);
        let max = crate::config::MAX_DURATION;
        assert_eq!(t.ping_interval, Some(max));
        assert_eq!(t.pong_timeout, max);
        assert_eq!(t.idle_timeout, Some(max));
        // The session adds these to the clock: that must not panic.
        let _ = Instant::now() + max + max;
    }
}

/// The session in process, with a handler written in the test and an in-memory socket: the
/// timer logic (idle, ping and pong, close handshake deadlines, rate) with paused time, which
/// the runtime advances whenever everything waits.
#[cfg(test)]
mod in_process {
    use std::sync::Mutex;

    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::io::DuplexStream;

    use super::*;
    use crate::limits::ConnLimits;
    use crate::plugin::{DynConn, FakeEvent, FakeHandler, Handler};

    type Client = WebSocketStream<DuplexStream>;
    type Events = Arc<Mutex<Vec<String>>>;

    /// A virtual hour (time is paused: the runtime jumps to each timer): a session that never
    /// does what a test waits for fails it instead of hanging it.
    const HOUR: Duration = Duration::from_secs(3600);

    /// Starts a session with `config`, `limits` from the plugin's 101, and a handler that
    /// records every event and then calls `reply`; returns the client's end, the events and
    /// the session's task.
    async fn session_with(
        config: Config,
        limits: ConnLimits,
        reply: fn(FakeEvent<'_>, &dyn DynConn),
    ) -> (Client, Events, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(256 << 10);
        let hub = Arc::new(Hub::default());
        let registry = Arc::new(
            crate::plugin::registry::Registry::new(Arc::clone(&hub), None).expect("a temp dir"),
        );
        let budget = Arc::new(crate::budget::MemoryBudget::new(config.max_buffered_total));
        let metrics = Arc::new(Metrics::new(
            Arc::clone(&registry),
            Arc::clone(&budget),
            None,
        ));
        let ctx = Arc::new(crate::context::Ctx::new(
            config.clone(),
            registry,
            None,
            Arc::clone(&metrics),
            Arc::clone(&budget),
        ));
        let admission = ctx.admit("127.0.0.1".parse().unwrap()).unwrap();
        let events: Events = Arc::default();
        let seen = Arc::clone(&events);
        let handler = FakeHandler(Box::new(move |event, conn| {
            seen.lock().unwrap().push(match event {
                FakeEvent::Connect => "connect".to_owned(),
                FakeEvent::Text(t) => format!("text {t}"),
                FakeEvent::Binary(b) => format!("binary {}", b.len()),
                FakeEvent::Ping(p) => format!("ping {}", p.len()),
                FakeEvent::Pong(p) => format!("pong {}", p.len()),
                FakeEvent::Error(e) => format!("error {e}"),
                FakeEvent::Drain => "drain".to_owned(),
                FakeEvent::Close(code, reason) => format!("close {code} {reason}"),
            });
            reply(event, conn);
            Ok(())
        }));
        let start = Start {
            id: 1,
            peer: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:1".into(),
            admission,
            plugin: Arc::new(LoadedPlugin::fake("fake")),
            handler: Handler::Fake(handler),
            facts: Default::default(),
            limits,
            hub,
            budget,
            metrics,
            shutdown: ctx.shutdown.clone(),
        };
        let task = tokio::spawn(serve(
            Socket::Ready(SessionIo::Test(server)),
            start,
            Arc::new(config),
        ));
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        (client, events, task)
    }

    /// The defaults, without the host's pings.
    fn quiet() -> Config {
        Config {
            limits: ConnLimits {
                ping_interval: Some(Duration::ZERO),
                ..ConnLimits::host_defaults()
            },
            ..Config::default()
        }
    }

    fn none(_: FakeEvent<'_>, _: &dyn DynConn) {}

    fn echo(event: FakeEvent<'_>, conn: &dyn DynConn) {
        if let FakeEvent::Text(t) = event {
            conn.send_from_worker(Message::text(t));
        }
    }

    /// The next close frame the client gets, skipping anything else.
    async fn close_of(client: &mut Client) -> (u16, String) {
        let wait = async {
            while let Some(msg) = client.next().await {
                if let Ok(Message::Close(Some(f))) = msg {
                    return (u16::from(f.code), f.reason.as_str().to_owned());
                }
            }
            panic!("the connection ended without a close frame");
        };
        tokio::time::timeout(HOUR, wait)
            .await
            .expect("no close frame within a virtual hour")
    }

    /// Reads on after the server's close frame: the client answers it, and the stream ends.
    async fn finish(mut client: Client) {
        while let Some(Ok(_)) = client.next().await {}
    }

    /// Waits for the session to end.
    async fn ended(task: tokio::task::JoinHandle<()>) {
        tokio::time::timeout(HOUR, task)
            .await
            .expect("the session did not end within a virtual hour")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn echoes_and_tells_the_handler_every_event_in_order() {
        let (mut client, events, task) = session_with(quiet(), ConnLimits::default(), echo).await;
        client.send(Message::text("hi")).await.unwrap();
        assert_eq!(client.next().await.unwrap().unwrap(), Message::text("hi"));
        client.close(None).await.unwrap();
        ended(task).await;
        assert_eq!(
            *events.lock().unwrap(),
            ["connect", "text hi", "close 1005 "]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_with_1001_at_its_idle_timeout() {
        let limits = ConnLimits {
            idle_timeout: Some(Duration::from_secs(10)),
            ..ConnLimits::default()
        };
        let started = Instant::now();
        let (mut client, events, task) = session_with(quiet(), limits, none).await;
        assert_eq!(close_of(&mut client).await, (1001, "idle timeout".into()));
        let idle_for = started.elapsed();
        assert!(idle_for >= Duration::from_secs(10), "{idle_for:?}");
        finish(client).await;
        ended(task).await;
        assert_eq!(
            events.lock().unwrap().last().unwrap(),
            "close 1001 idle timeout"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn data_keeps_a_connection_from_idling_out() {
        let limits = ConnLimits {
            idle_timeout: Some(Duration::from_secs(10)),
            ..ConnLimits::default()
        };
        let started = Instant::now();
        let (mut client, _events, task) = session_with(quiet(), limits, echo).await;
        for i in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.send(Message::text(format!("{i}"))).await.unwrap();
            assert_eq!(
                client.next().await.unwrap().unwrap(),
                Message::text(format!("{i}"))
            );
        }
        // 30 s in, never 10 s quiet: still open; now quiet, it closes 10 s after the last echo.
        assert_eq!(close_of(&mut client).await.0, 1001);
        assert!(started.elapsed() >= Duration::from_secs(40));
        finish(client).await;
        ended(task).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_answers_pings_is_dropped_after_the_pong_timeout() {
        let limits = ConnLimits {
            ping_interval: Some(Duration::from_secs(1)),
            pong_timeout: Some(Duration::from_secs(2)),
            ..ConnLimits::default()
        };
        let started = Instant::now();
        // The client is never read, so it never answers the ping.
        let (_client, events, task) = session_with(Config::default(), limits, none).await;
        ended(task).await;
        assert!(started.elapsed() >= Duration::from_secs(3));
        assert_eq!(events.lock().unwrap().last().unwrap(), "close 1006 ");
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_the_peer_never_answers_ends_at_the_close_timeout() {
        fn close_at_once(event: FakeEvent<'_>, conn: &dyn DynConn) {
            if matches!(event, FakeEvent::Connect) {
                conn.close(4000, "bye").unwrap();
            }
        }
        let config = Config {
            close_timeout: Duration::from_secs(5),
            ..quiet()
        };
        let started = Instant::now();
        let (_client, events, task) =
            session_with(config, ConnLimits::default(), close_at_once).await;
        ended(task).await;
        assert!(started.elapsed() >= Duration::from_secs(5));
        // The peer sent no close frame: 1006.
        assert_eq!(events.lock().unwrap().last().unwrap(), "close 1006 ");
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_message_rate_the_connection_closes_with_1008() {
        let config = Config {
            max_message_rate: 5,
            ..quiet()
        };
        let (mut client, events, task) = session_with(config, ConnLimits::default(), none).await;
        for i in 0..10 {
            client.send(Message::text(format!("{i}"))).await.unwrap();
        }
        assert_eq!(close_of(&mut client).await.0, 1008);
        finish(client).await;
        ended(task).await;
        let events = events.lock().unwrap();
        // The burst of 5 was delivered; nothing after the limit was.
        assert_eq!(events.iter().filter(|e| e.starts_with("text")).count(), 5);
        assert_eq!(
            events.last().unwrap(),
            "close 1008 message rate limit exceeded"
        );
    }
}
