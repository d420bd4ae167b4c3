//! A WebSocket session: one task per connection turns socket events into the plugin's callbacks,
//! one at a time and in order, and writes the connection's send queue out. It reads every
//! message that has already arrived (running its callbacks, whose sends go straight into the
//! queue without waking anyone) before it flushes once: an echo of a burst is one write.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

// The runtime's clock (the OS clock, unless a test paused it): the session's timers are tested
// in process with paused time.
use tokio::time::Instant;

use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::conn::ConnShared;
use super::counted::{Counted, Partial};
use super::rebind::SessionIo;
use crate::channels::Hub;
use crate::config::Config;
use crate::limits::ConnLimits;
use crate::metrics::{CodeLabel, Metrics};
use crate::plugin::LoadedPlugin;

#[cfg(test)]
mod in_process;
mod link;
mod stream;
mod timing;
mod writer;

use link::Link;
#[cfg(test)]
use timing::PARK_AFTER;
use timing::{Alarm, Alarms, Deadlines, RateLimit};
pub(crate) use timing::{CloseReason, Timing};
use writer::IoEvent;

/// A session's socket with the wrappers that count its bytes and (if negotiated) deflate.
type Io = super::deflate::Deflate<Counted<SessionIo>>;
type Ws = stream::WsStream<Io>;

/// Most bytes fed to the socket before a flush, so one flush never waits on an unbounded batch.
const MAX_BATCH: u64 = 256 << 10;
/// Most messages read (and answered) before the answers are flushed, so that a client that
/// keeps sending still gets its answers.
const MAX_READS_BEFORE_FLUSH: u32 = 64;
/// The session's timer when nothing is due: a year away.
const FAR: Duration = Duration::from_secs(86_400 * 365);

/// Everything a session needs besides its socket.
pub(crate) struct Start {
    pub(crate) id: u64,
    /// The client's address as plugins see it (behind a trusted proxy, the forwarded one).
    pub(crate) remote: String,
    /// The session's place under the connection limits.
    pub(crate) admission: crate::context::Admission,
    pub(crate) plugin: Arc<LoadedPlugin>,
    pub(crate) handler: crate::plugin::Handler,
    /// What the upgrade was, for `Conn`'s accessors.
    pub(crate) facts: crate::plugin::ConnFacts,
    pub(crate) limits: ConnLimits,
    /// permessage-deflate was negotiated, with this window for the host's compression.
    pub(crate) deflate: Option<u8>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) budget: Arc<crate::budget::MemoryBudget>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: CancellationToken,
}

/// The session of an upgrade: waits for hyper to hand over the connection, then runs until it
/// closes. A plain function (not `async`), so the task holds one future, not a future and the
/// arguments it was made from: its size is the connection's memory.
///
/// The connection's span (`conn`: its id, address, plugin and generation) is made when
/// something of the connection is first logged, not here: most connections never log
/// anything at the default level, and the subscriber keeps ~500 B for each span. It is made at
/// once when `debug` is on, or when the plugin has logged from a callback
/// ([`Session::span`]).
pub(crate) fn run(
    on_upgrade: hyper::upgrade::OnUpgrade,
    start: Start,
    config: Arc<Config>,
) -> impl std::future::Future<Output = ()> + Send {
    serve(Socket::Upgrade(on_upgrade), Box::new(start), config)
}

/// Where a session's socket comes from.
enum Socket {
    /// hyper's upgrade, once it completes.
    Upgrade(hyper::upgrade::OnUpgrade),
    /// A socket already past the handshake (in-process tests; boxed, so that the future's size
    /// in tests is its size in the binary).
    #[cfg(test)]
    Ready(Box<SessionIo>),
}

/// Runs the session until the connection closes. One `async fn` for all of it (the upgrade
/// included), not one that awaits another: the task's future is the connection's memory.
///
/// Its size is kept down on purpose (a unit test bounds it): an async function keeps its
/// arguments for its whole life and every local that is in scope across an `.await`, so `start`
/// comes boxed (8 bytes here; the box is taken apart and freed in [`open`], a plain function,
/// whose temporaries — the limits, the upgrade's facts, the read-ahead bytes — never become part
/// of the future).
async fn serve(socket: Socket, start: Box<Start>, config: Arc<Config>) {
    // The socket moves to this runtime (the plugin's) with what hyper read past the handshake.
    // (The bytes are copied out, and hyper's read buffer, which they may share, freed now: the
    // session must not keep it for its lifetime.)
    let (io, read_ahead) = match socket {
        Socket::Upgrade(on_upgrade) => match on_upgrade.await {
            Ok(upgraded) => SessionIo::take(upgraded),
            Err(e) => {
                tracing::debug!(conn_id = start.id, error = %e, "upgrade did not complete");
                return;
            }
        },
        #[cfg(test)]
        Socket::Ready(io) => (*io, bytes::Bytes::new()),
    };
    let Opened {
        mut w,
        mut s,
        admission,
    } = open(io, read_ahead, start, config);
    let (code, reason) = s.read_loop(&mut w).await;
    // (Used in place from here on: moved out into locals, its parts would be stored twice.)
    w.link.delivered();
    let metrics = Arc::clone(s.conn.metrics());
    s.counts.flush_in(&metrics);
    s.conn.finish();
    // Every tracked send is reported once: written, or never written (before on_close).
    let (written, unwritten) = s.conn.take_all_tracked();
    for (tag, ok) in written
        .into_iter()
        .map(|t| (t, true))
        .chain(unwritten.into_iter().map(|t| (t, false)))
    {
        s.call("on_sent", |cb| cb.on_sent(tag, ok));
    }
    s.call_always("on_close", |cb| cb.on_close(code, &reason));
    s.durations.flush_into(&metrics.callback_seconds);
    // The handler's drop is plugin code too: on the watchdog's books.
    crate::plugin::exec::enter(
        crate::plugin::exec::call_index("drop"),
        s.conn.id,
        std::time::Instant::now(),
    );
    if s.span.is_none() {
        crate::plugin::exec::set_unspanned(s.conn.id);
    }
    {
        let _entered = s.span.enter();
        let Session { callbacks, .. } = s;
        drop(callbacks);
    }
    crate::plugin::exec::leave();
    s.plugin.connection_closed();
    drop(admission);
    {
        let _entered = s.span.enter();
        tracing::debug!(code, %reason, "connection closed");
    }
    // Write what is still queued (an answer, a close frame), bounded by the close timeout;
    // then the socket closes as `ws` is dropped.
    let _ = tokio::time::timeout(
        s.host.close_timeout,
        std::future::poll_fn(|cx| {
            let _entered = s.span.enter();
            w.link.poll_final(cx, &s.conn)
        }),
    )
    .await;
    s.conn.release_queued();
    w.link.finish(&metrics);
    // Last, so that a scraper that sees the close also sees every count of the connection.
    metrics.closes.get_or_create(&CodeLabel { code }).inc();
}

/// What a session keeps while it runs, made by [`open`].
struct Opened {
    w: Wire,
    s: Session,
    admission: crate::context::Admission,
}

/// The socket's side of a session, handed to its read loop behind one reference.
struct Wire {
    link: Link,
    timing: Timing,
    shutdown: CancellationToken,
}

/// Sets the session up on its socket and runs `on_connect`. A plain function: nothing it uses
/// only here stays in the session's future, and `start`'s box is freed when it returns (moved
/// out of in the caller, the box would live as long as the connection).
fn open(io: SessionIo, read_ahead: bytes::Bytes, start: Box<Start>, config: Arc<Config>) -> Opened {
    let Start {
        id,
        remote,
        admission,
        plugin,
        handler,
        facts,
        limits: own_limits,
        deflate,
        hub,
        budget,
        metrics,
        shutdown,
    } = *start;
    // Every limit is set: the host's defaults are the last source merged.
    let limits = own_limits.over(config.limits);
    let max_message = limits.max_message_size.map_or(usize::MAX, clamp_usize);
    let max_frame = limits
        .max_frame_size
        .map_or(usize::MAX, clamp_usize)
        .min(max_message);
    let sizes = link::Sizes {
        read_buffer: config.read_buffer_size,
        max_message,
        max_frame,
    };
    let io = Counted::new(io, Partial::new(Arc::clone(&budget))).with_ahead(&read_ahead);
    let io = super::deflate::Deflate::new(
        io,
        deflate.map(|window_bits| super::deflate::DeflateConfig {
            max_message,
            max_frame,
            min_size: limits.compression_min_size.map_or(0, clamp_usize),
            window_bits,
        }),
    );
    if deflate.is_some() {
        metrics.deflate_connections.inc();
    }
    // Freed now, not at the end: it may share hyper's read buffer (measured: 4 KiB more an
    // idle connection while it was kept).
    drop(read_ahead);
    let ws = raw_socket(io, sizes);
    let max_send_queue = limits.max_send_queue.unwrap_or(u64::MAX);
    let conn = ConnShared::new(
        id,
        remote,
        Arc::clone(&plugin.shared_name),
        hub,
        budget,
        metrics,
        max_send_queue,
        facts,
    );
    let callbacks = crate::plugin::Callbacks::new(handler, Arc::clone(&conn));

    plugin.connection_opened();
    let mut s = Session {
        host: config,
        callbacks,
        conn,
        span: tracing::Span::none(),
        plugin,
        failed: false,
        cut: false,
        clock_stale: false,
        host_close: None,
        counts: Counts::default(),
        durations: Default::default(),
    };
    if tracing::enabled!(tracing::Level::DEBUG) || s.plugin.logs_in_callbacks() {
        s.span();
    }
    {
        let _entered = s.span.enter();
        tracing::debug!("connection open");
    }
    s.call("on_connect", |cb| cb.on_connect());
    Opened {
        w: Wire {
            link: Link::open(ws, sizes),
            timing: Timing::new(&limits),
            shutdown,
        },
        s,
        admission,
    }
}

/// The WebSocket stream over a socket past the handshake.
fn raw_socket(io: Io, sizes: link::Sizes) -> Ws {
    let config = WebSocketConfig::default()
        .read_buffer_size(sizes.read_buffer)
        .max_message_size(Some(sizes.max_message))
        .max_frame_size(Some(sizes.max_frame));
    stream::WsStream::new(io, config)
}

fn clamp_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

struct Session {
    /// The plugin's callbacks, bound to this connection.
    callbacks: crate::plugin::Callbacks,
    conn: Arc<ConnShared>,
    /// The connection's span once made (none before: [`Session::span`]). Entered for each
    /// step of the session's work while it exists (a callback, a poll of the socket, a line of
    /// the session's own), never across an `.await`.
    span: tracing::Span,
    /// The plugin's generation (whose replacement closes with 1012 rather than 1001).
    plugin: Arc<LoadedPlugin>,
    /// The host's settings (the session reads its host-wide limits here).
    host: Arc<Config>,
    /// A callback panicked: no more callbacks but `on_close`.
    failed: bool,
    /// The client went on past the rate limit after the host closed for it (or after another
    /// failure): the connection is dropped without waiting for the close handshake, which a
    /// flooding client could otherwise stretch to `--close-timeout` of reading.
    cut: bool,
    /// A callback other than for a data message ran: the clock the writer holds from the last
    /// one is older than that ([`Link::clock_for`]).
    clock_stale: bool,
    /// The close frame the host itself started the close handshake with (a limit, an error,
    /// shutdown): `on_close` is told this code rather than the peer's echo of it.
    /// (Boxed: set at most once; every connection's future keeps 8 bytes for it, not 32.)
    host_close: Option<Box<(u16, String)>>,
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

impl Session {
    /// Starts the close handshake for a reason of the host's; `on_close` will get its code.
    fn close_by_host(&mut self, why: CloseReason) {
        let (code, reason) = (why.code(), why.reason());
        if self.conn.close_unchecked(code, reason).is_ok() {
            self.host_close = Some(Box::new((code, reason.to_owned())));
        }
    }

    /// Reads until the connection ends; returns the code and reason `on_close` gets: the
    /// host's if it started the close, else the peer's (1006 if the peer sent none).
    ///
    /// Its locals are the session future's largest part: the socket's parts come behind one
    /// reference, and what is used only at the start or per iteration is scoped so that it is
    /// not kept across the `.await`.
    async fn read_loop(&mut self, w: &mut Wire) -> (u16, String) {
        // (Boxed: set once, at the end; the future keeps 8 bytes for it, not 32.)
        let mut peer_close: Option<Box<(u16, String)>> = None;
        let (mut d, mut rate) = {
            let started = Instant::now();
            (
                Deadlines::new(started, &w.timing, self.conn.id),
                RateLimit::new(self.host.max_message_rate, started),
            )
        };
        let timer = tokio::time::sleep(FAR);
        tokio::pin!(timer);
        // Made once, not per message: a waiting cancellation future takes a lock to register and
        // another to leave.
        let cancelled = w.shutdown.cancelled();
        tokio::pin!(cancelled);
        let mut alarms = Alarms::new(timer, cancelled, &w.shutdown);
        alarms.reset(self.next_wake(&w.timing, &d));
        loop {
            // Flags the connection's handle set (and woke this task for): a send that was
            // refused has drained; a close was queued (its handshake has a deadline).
            if self.conn.take_drained() {
                self.call("on_drain", |cb| cb.on_drain());
            }
            for tag in self.conn.take_sent() {
                self.call("on_sent", |cb| cb.on_sent(tag, true));
            }
            let idle_changed = match self.conn.take_idle_change() {
                Some(idle) => {
                    w.timing.set_idle_timeout(idle);
                    true
                }
                None => false,
            };
            // A timer the plugin armed may be due before the session's next wake-up.
            if idle_changed | self.conn.take_timers_changed() {
                alarms.reset(self.next_wake(&w.timing, &d));
            }
            if let Some(crashed) = self.conn.take_failed() {
                if !self.failed {
                    self.failed = true;
                    self.close_by_host(if crashed {
                        CloseReason::PluginCrashed
                    } else {
                        CloseReason::PluginPanicked
                    });
                }
            }
            if self.conn.take_closing() {
                if let Some(at) = d.start_close(self.host.close_timeout) {
                    alarms.pull_in(at);
                }
            }
            // The socket first (`Ok`), then the alarms (`Err`): while messages are ready nothing
            // else is looked at. Tokio's cooperative budget makes a busy socket return Pending
            // now and then, so the alarms still get their turn; looking at them is an atomic
            // load each unless they were just set (`Alarms`).
            if std::mem::take(&mut self.clock_stale) {
                w.link.set_clock(None);
            }
            let woke = std::future::poll_fn(|cx| {
                let _entered = self.span.enter();
                if let Poll::Ready(item) = w.link.poll_io(cx, &self.conn) {
                    return Poll::Ready(Ok(item));
                }
                // Continuation frames read in (tungstenite shows no message for them until
                // the last): charged to the message rate before waiting for more.
                match w.link.take_fragments() {
                    0 => alarms.poll(cx).map(Err),
                    n => Poll::Ready(Ok(IoEvent::Fragments(n))),
                }
            })
            .await;
            if w.link.take_reopened() {
                // Busy again: looked at to be parked from now on.
                alarms.pull_in(d.woke());
            }
            match woke {
                Ok(item) => match item {
                    IoEvent::End => break,
                    IoEvent::Flags => {}
                    IoEvent::Fragments(n) => {
                        self.within_rate(rate.as_mut(), Instant::now(), u32::from(n));
                        if self.cut {
                            break;
                        }
                    }
                    IoEvent::WriteFailed => {
                        self.conn.peer_closed();
                        let _entered = self.span.enter();
                        tracing::debug!("write failed; the connection is gone");
                        break;
                    }
                    IoEvent::Read(Ok(msg)) => {
                        w.link.delivered();
                        match msg {
                            Message::Text(t) => {
                                let now = w.link.clock_for(t.len());
                                if self.data_in(now, t.len(), &mut d.last_data_in, rate.as_mut()) {
                                    let ended =
                                        self.call_at(now, "on_text", |cb| cb.on_text(t.as_str()));
                                    w.link.set_clock(ended);
                                }
                            }
                            Message::Binary(b) => {
                                let now = w.link.clock_for(b.len());
                                if self.data_in(now, b.len(), &mut d.last_data_in, rate.as_mut()) {
                                    let ended =
                                        self.call_at(now, "on_binary", |cb| cb.on_binary(&b));
                                    w.link.set_clock(ended);
                                }
                            }
                            // A ping or a pong is a callback too: it counts as a message.
                            Message::Ping(p) => {
                                if self.within_rate(rate.as_mut(), Instant::now(), 1) {
                                    self.call("on_ping", |cb| cb.on_ping(&p));
                                }
                            }
                            Message::Pong(p) => {
                                let answered = d.awaiting_pong.take().is_some();
                                if self.within_rate(rate.as_mut(), Instant::now(), 1) {
                                    self.call("on_pong", |cb| cb.on_pong(&p));
                                }
                                if answered {
                                    w.link.park_after_pong();
                                }
                            }
                            Message::Close(frame) => {
                                peer_close =
                                    Some(Box::new(frame.map_or((1005, String::new()), |f| {
                                        (u16::from(f.code), f.reason.as_str().to_owned())
                                    })));
                                self.conn.peer_closed();
                                if let Some(at) = d.start_close(self.host.close_timeout) {
                                    alarms.pull_in(at);
                                }
                            }
                            Message::Frame(_) => {}
                        }
                        if self.cut {
                            break;
                        }
                    }
                    IoEvent::Read(Err(e)) => {
                        self.read_error(e);
                        break;
                    }
                },
                Err(Alarm::Shutdown) => {
                    alarms.shutting_down = true;
                    let restart = self.plugin.restarting();
                    self.close_by_host(if restart.load(std::sync::atomic::Ordering::Acquire) {
                        CloseReason::ServiceRestart
                    } else {
                        CloseReason::ShuttingDown
                    });
                }
                Err(Alarm::Timer) => {
                    let now = Instant::now();
                    if d.close.is_some_and(|at| now >= at) {
                        let _entered = self.span.enter();
                        tracing::debug!("close handshake timed out; dropping the connection");
                        break;
                    }
                    // A paused connection is not read, so its pongs cannot arrive: no pings then.
                    let paused = self.conn.is_paused();
                    if !paused
                        && d.awaiting_pong
                            .is_some_and(|sent| now >= sent + w.timing.pong_timeout())
                    {
                        let pong_timeout = w.timing.pong_timeout();
                        self.span().in_scope(|| {
                            tracing::info!(
                                ?pong_timeout,
                                "no pong in time; dropping the connection"
                            );
                        });
                        let why = CloseReason::PingTimeout;
                        let _ = self.conn.close_unchecked(why.code(), why.reason());
                        // The peer is gone: it sent no close frame.
                        return (1006, String::new());
                    }
                    if let (Some(at), Some(interval)) = (d.next_ping, w.timing.ping_interval()) {
                        if now >= at {
                            if d.awaiting_pong.is_none() && !paused {
                                // A ping that cannot be queued still starts the pong clock:
                                // a peer that does not read gets dropped all the same. (A
                                // parked connection writes it without opening.)
                                let _ = self
                                    .conn
                                    .enqueue_keepalive(Message::Ping(bytes::Bytes::new()));
                                d.awaiting_pong = Some(now);
                            }
                            d.next_ping = Some(now + interval);
                        }
                    }
                    if let Some(limit) = timing::nonzero(self.host.message_timeout) {
                        if w.link.pending_for(now).is_some_and(|d| d >= limit)
                            && self.conn.is_open()
                        {
                            self.span().in_scope(|| {
                                tracing::info!(message_timeout = ?limit,
                                    "a message took too long to arrive; closing with 1008");
                            });
                            self.close_by_host(CloseReason::MessageTimeout);
                        }
                    }
                    if let Some(idle) = w.timing.idle_timeout() {
                        let last = d.last_data_in.max(self.conn.last_data_out());
                        if now >= last + idle && self.conn.is_open() {
                            self.span().in_scope(|| {
                                tracing::info!(idle_timeout = ?idle, "idle connection closed");
                            });
                            self.close_by_host(CloseReason::IdleTimeout);
                        }
                    }
                    // The plugin's timers, in the connection's event order; they end with it.
                    for tag in self.conn.take_due_timers(now) {
                        if self.conn.is_open() {
                            self.call("on_timer", |cb| cb.on_timer(tag));
                        }
                    }
                    if d.look_to_park(now, w.link.is_parked()) {
                        // Looked at in the next poll, after the socket's (and after the
                        // plugin's timers above: what they queue keeps it open).
                        w.link.look_to_park();
                    }
                    alarms.reset(self.next_wake(&w.timing, &d));
                }
            }
        }
        *self
            .host_close
            .take()
            .or(peer_close)
            .unwrap_or_else(|| Box::new((1006, String::new())))
    }

    /// When the timer must next look at the connection: its next ping, pong deadline, idle
    /// deadline (from the last data message either way), plugin timer, message-timeout look,
    /// close deadline and look to park, whichever comes first (a year away if none).
    fn next_wake(&self, timing: &Timing, d: &Deadlines) -> Instant {
        let now = Instant::now();
        let mut wake = now + FAR;
        if let Some(sent) = d.awaiting_pong.filter(|_| !self.conn.is_paused()) {
            wake = wake.min(sent + timing.pong_timeout());
        }
        if let Some(idle) = timing.idle_timeout() {
            if self.conn.is_open() {
                wake = wake.min(d.last_data_in.max(self.conn.last_data_out()) + idle);
            }
        }
        if let Some(at) = self.conn.next_timer() {
            wake = wake.min(at);
        }
        if let Some(limit) = timing::nonzero(self.host.message_timeout) {
            // Look at least this often, so a message that starts arriving between two looks is
            // caught within twice the limit.
            wake = wake.min(now + limit);
        }
        for at in [d.next_ping, d.close, d.park_at].into_iter().flatten() {
            wake = wake.min(at);
        }
        wake
    }

    /// A data message of `len` bytes arrived at `now`: note when, count it, and say whether it
    /// may be delivered under the rate limit.
    fn data_in(
        &mut self,
        now: Instant,
        len: usize,
        last_data_in: &mut Instant,
        rate: Option<&mut RateLimit>,
    ) -> bool {
        *last_data_in = now;
        if self.counts.add(len) {
            self.counts.flush_in(self.conn.metrics());
        }
        self.within_rate(rate, now, 1)
    }

    /// Whether `n` more messages (a data message, a ping or a pong, continuation frames) are
    /// within the rate limit; past it, the connection is closed with 1008 and no more
    /// callbacks run.
    fn within_rate(&mut self, rate: Option<&mut RateLimit>, now: Instant, n: u32) -> bool {
        let Some(r) = rate else {
            return !self.failed;
        };
        if r.take(now, n) {
            return !self.failed;
        }
        if self.failed {
            if !self.cut {
                self.cut = true;
                self.span().in_scope(|| {
                    tracing::debug!("still past the rate limit after the close; dropping");
                });
            }
        } else {
            let limit = r.rate;
            self.span().in_scope(|| {
                tracing::warn!(limit, "message rate limit exceeded; closing with 1008");
            });
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
            WsError::Io(io) if super::counted::is_invalid_utf8(io) => {
                Some(CloseReason::InvalidUtf8)
            }
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) | WsError::Io(_) => None,
            WsError::Protocol(_) => Some(CloseReason::ProtocolError),
            WsError::Utf8(_) => Some(CloseReason::InvalidUtf8),
            WsError::Capacity(_) => Some(CloseReason::TooBig),
            _ => Some(CloseReason::InternalError),
        };
        {
            let _entered = self.span.enter();
            tracing::debug!(error = %e, close_code = ?why.map(CloseReason::code),
                "connection error");
        }
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
        self.clock_stale = true;
        self.run_callback(Instant::now(), name, f);
    }

    /// As `call`, for a callback whose message arrived at `now`; when it ended, if it ran.
    fn call_at(
        &mut self,
        now: Instant,
        name: &'static str,
        f: impl FnOnce(&mut crate::plugin::Callbacks) -> Result<(), String>,
    ) -> Option<Instant> {
        (!self.failed).then(|| self.run_callback(now, name, f))
    }

    /// The connection's span, made now if it has none: what is logged of the connection is
    /// logged in it.
    fn span(&mut self) -> &tracing::Span {
        if self.span.is_none() {
            self.span = tracing::info_span!("conn", conn_id = self.conn.id,
                peer = %self.conn.remote, plugin = %self.plugin.name,
                generation = self.plugin.generation);
        }
        &self.span
    }

    /// Runs a callback that starts at `started`; returns when it ended.
    fn run_callback(
        &mut self,
        started: Instant,
        name: &'static str,
        f: impl FnOnce(&mut crate::plugin::Callbacks) -> Result<(), String>,
    ) -> Instant {
        if self.span.is_none() && self.plugin.logs_in_callbacks() {
            self.span();
        }
        self.conn.set_in_callback(true);
        crate::plugin::exec::enter(
            crate::plugin::exec::call_index(name),
            self.conn.id,
            started.into_std(),
        );
        // Without its span, the connection's id goes on the plugin's log lines instead.
        if self.span.is_none() {
            crate::plugin::exec::set_unspanned(self.conn.id);
        }
        let result = {
            let _entered = self.span.enter();
            f(&mut self.callbacks)
        };
        crate::plugin::exec::leave();
        self.conn.set_in_callback(false);
        let ended = Instant::now();
        let elapsed = ended.saturating_duration_since(started);
        if self.durations.observe(elapsed) {
            self.durations
                .flush_into(&self.conn.metrics().callback_seconds);
        }
        if elapsed >= self.host.slow_callback {
            self.span().in_scope(|| {
                tracing::warn!(
                    callback = name,
                    elapsed_ms = crate::units::log_ms(elapsed),
                    "slow callback: callbacks run on the connection's task and must not block; \
                     move blocking work to a plugin thread"
                );
            });
        }
        if let Err(panic) = result {
            self.span().in_scope(|| {
                tracing::error!(callback = name, %panic,
                    "plugin callback panicked; closing the connection with 1011");
            });
            self.failed = true;
            self.close_by_host(CloseReason::PluginPanicked);
        }
        ended
    }
}
