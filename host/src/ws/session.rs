//! A WebSocket session: the reader task turns socket events into the plugin's callbacks, one at
//! a time and in order; a writer task drains the connection's send queue, feeding every queued
//! frame before a single flush.

use std::sync::Arc;
use std::time::{Duration, Instant};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RResult, RSlice, RStr, RString};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use plugin_api::abi::{ConnFfi_TO, ConnHandle, HandlerBox};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::conn::{ConnRef, ConnShared, Outgoing};
use super::counted::{Counted, Partial, BUDGET_EXHAUSTED};
use crate::channels::Hub;
use crate::config::Config;
use crate::metrics::{CodeLabel, Metrics};
use crate::plugin::{LoadedPlugin, Settings};

type Ws = WebSocketStream<Counted<TokioIo<Upgraded>>>;

/// Most bytes the writer feeds before it flushes, so one flush never waits on an unbounded batch.
const MAX_BATCH: u64 = 256 << 10;

/// Everything a session needs besides its socket.
pub(crate) struct Start {
    pub(crate) id: u64,
    pub(crate) peer: std::net::SocketAddr,
    /// The client's address as plugins see it (behind a trusted proxy, the forwarded one).
    pub(crate) remote: String,
    /// The session's place under the connection limits.
    pub(crate) admission: crate::server::Admission,
    pub(crate) plugin: Arc<LoadedPlugin>,
    pub(crate) handler: HandlerBox,
    pub(crate) settings: Settings,
    pub(crate) hub: Arc<Hub>,
    pub(crate) budget: Arc<super::conn::SendBudget>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: CancellationToken,
}

/// Runs a session on an upgraded connection until it closes.
pub(crate) async fn run(upgraded: Upgraded, start: Start, config: &Config) {
    let span = tracing::info_span!("conn", conn_id = start.id, peer = %start.peer,
        plugin = %start.plugin.name, generation = start.plugin.generation);
    session(upgraded, start, config).instrument(span).await;
}

async fn session(upgraded: Upgraded, start: Start, config: &Config) {
    let Start {
        id,
        peer: _,
        remote,
        admission,
        plugin,
        handler,
        settings,
        hub,
        budget,
        metrics,
        shutdown,
    } = start;
    let max_message = settings
        .max_message_size
        .map_or(config.max_message_size, clamp_usize);
    let max_frame = settings
        .max_frame_size
        .map_or(config.max_frame_size, clamp_usize)
        .min(max_message);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(config.read_buffer_size)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_frame));
    let partial = Partial::new(Arc::clone(&budget));
    let io = Counted::new(TokioIo::new(upgraded), Arc::clone(&partial));
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config)).await;
    let max_send_queue = settings
        .max_send_queue
        .unwrap_or(config.max_send_queue as u64);
    let plugin_name: Arc<str> = Arc::from(plugin.name.as_str());
    let (conn, rx) = ConnShared::new(
        id,
        remote,
        plugin_name,
        hub,
        budget,
        Arc::clone(&metrics),
        max_send_queue,
    );
    let handle: ConnHandle = ConnFfi_TO::from_ptr(RArc::new(ConnRef(Arc::clone(&conn))), TD_Opaque);
    let (sink, stream) = ws.split();
    let mut writer = tokio::spawn(
        write_loop(sink, rx, Arc::clone(&conn), Arc::clone(&metrics)).in_current_span(),
    );

    tracing::debug!("connection open");
    plugin.connection_opened();
    let mut s = Session {
        handler,
        handle,
        conn,
        slow: config.slow_callback,
        failed: false,
        metrics: Arc::clone(&metrics),
        counts: Counts::default(),
    };
    s.call("on_connect", |h, c| h.on_connect(c));
    let timing = Timing::new(config, &settings);
    let (code, reason) = s.read_loop(stream, &shutdown, timing, &partial).await;
    partial.delivered();
    s.counts.flush_in(&metrics);
    s.conn.finish();
    s.call_always("on_close", |h, c| {
        h.on_close(c, code, RStr::from_str(&reason))
    });
    plugin.connection_closed();
    drop(admission);
    tracing::debug!(code, %reason, "connection closed");
    // Give the writer the chance to put a pending close frame on the wire.
    if tokio::time::timeout(config.close_timeout, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    // Last, so that a scraper that sees the close also sees every count of the connection.
    metrics.closes.get_or_create(&CodeLabel { code }).inc();
}

fn clamp_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

struct Session {
    handler: HandlerBox,
    handle: ConnHandle,
    conn: Arc<ConnShared>,
    slow: Duration,
    /// A callback panicked: no more callbacks but `on_close`.
    failed: bool,
    metrics: Arc<Metrics>,
    /// Messages and bytes received since they were last added to the metrics.
    counts: Counts,
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
    fn new(config: &Config, settings: &Settings) -> Self {
        let ms = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_millis);
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Self {
            ping_interval: nonzero(ms(settings.ping_interval_ms, config.ping_interval)),
            pong_timeout: ms(settings.pong_timeout_ms, config.pong_timeout),
            idle_timeout: nonzero(ms(settings.idle_timeout_ms, config.idle_timeout)),
            close_timeout: config.close_timeout,
            max_message_rate: config.max_message_rate,
            message_timeout: nonzero(config.message_timeout),
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
    /// Reads until the connection ends; returns the peer's close code and reason.
    async fn read_loop(
        &mut self,
        mut stream: SplitStream<Ws>,
        shutdown: &CancellationToken,
        timing: Timing,
        partial: &Partial,
    ) -> (u16, String) {
        let mut peer_close: Option<(u16, String)> = None;
        let mut close_deadline: Option<tokio::time::Instant> = None;
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
        timer.as_mut().reset(wake.into());
        loop {
            let close_wait = async {
                match close_deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                item = stream.next() => match item {
                    None => break,
                    Some(Ok(msg)) => {
                    partial.delivered();
                    match msg {
                        Message::Text(t) => {
                            if self.data_in(t.len(), &mut last_data_in, rate.as_mut()) {
                                self.call("on_text", |h, c| {
                                    h.on_text(c, RStr::from_str(t.as_str()))
                                });
                            }
                        }
                        Message::Binary(b) => {
                            if self.data_in(b.len(), &mut last_data_in, rate.as_mut()) {
                                self.call("on_binary", |h, c| {
                                    h.on_binary(c, RSlice::from_slice(&b))
                                });
                            }
                        }
                        Message::Ping(p) => self.call("on_ping", |h, c| {
                            h.on_ping(c, RSlice::from_slice(&p))
                        }),
                        Message::Pong(p) => {
                            awaiting_pong = None;
                            self.call("on_pong", |h, c| h.on_pong(c, RSlice::from_slice(&p)));
                        }
                        Message::Close(frame) => {
                            peer_close = Some(frame.map_or((1005, String::new()), |f| {
                                (u16::from(f.code), f.reason.as_str().to_owned())
                            }));
                            conn.peer_closed();
                            close_deadline.get_or_insert_with(|| {
                                tokio::time::Instant::now() + timing.close_timeout
                            });
                        }
                        Message::Frame(_) => {}
                    }},
                    Some(Err(e)) => {
                        self.read_error(e);
                        break;
                    }
                },
                () = conn.drain.notified() => self.call("on_drain", |h, c| h.on_drain(c)),
                () = conn.closing.notified() => {
                    close_deadline.get_or_insert_with(|| {
                        tokio::time::Instant::now() + timing.close_timeout
                    });
                }
                () = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    let _ = conn.close_unchecked(1001, "going away");
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if awaiting_pong.is_some_and(|sent| now >= sent + timing.pong_timeout) {
                        tracing::info!(pong_timeout = ?timing.pong_timeout,
                            "no pong in time; dropping the connection");
                        let _ = conn.close_unchecked(1001, "ping timeout");
                        // The peer is gone: it sent no close frame.
                        return (1006, String::new());
                    }
                    if let (Some(at), Some(interval)) = (next_ping, timing.ping_interval) {
                        if now >= at {
                            if awaiting_pong.is_none() {
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
                            let _ = conn.close_unchecked(1008, "message timeout");
                        }
                    }
                    if let Some(idle) = timing.idle_timeout {
                        let last = last_data_in.max(conn.last_data_out());
                        if now >= last + idle && conn.is_open() {
                            tracing::info!(idle_timeout = ?idle, "idle connection closed");
                            let _ = conn.close_unchecked(1001, "idle timeout");
                        }
                    }
                    wake = self.next_wake(&timing, next_ping, awaiting_pong,
                        last_data_in.max(conn.last_data_out()), far);
                    timer.as_mut().reset(wake.into());
                }
                () = close_wait => {
                    tracing::debug!("close handshake timed out; dropping the connection");
                    break;
                }
            }
        }
        peer_close.unwrap_or((1006, String::new()))
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
        if let Some(sent) = awaiting_pong {
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
            let _ = self
                .conn
                .close_unchecked(1008, "message rate limit exceeded");
        }
        false
    }

    /// The socket failed: tell the plugin, and close with the code RFC 6455 asks for.
    fn read_error(&mut self, e: WsError) {
        let code = match &e {
            WsError::ConnectionClosed | WsError::AlreadyClosed => return,
            WsError::Io(io) if io.to_string() == BUDGET_EXHAUSTED => Some(1013),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) | WsError::Io(_) => None,
            WsError::Protocol(_) => Some(1002),
            WsError::Utf8(_) => Some(1007),
            WsError::Capacity(_) => Some(1009),
            _ => Some(1011),
        };
        tracing::debug!(error = %e, close_code = ?code, "connection error");
        let text = e.to_string();
        self.call("on_error", |h, c| h.on_error(c, RStr::from_str(&text)));
        if let Some(code) = code {
            let _ = self.conn.close_unchecked(code, "");
        }
    }

    fn call(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&mut HandlerBox, &ConnHandle) -> RResult<(), RString>,
    ) {
        if !self.failed {
            self.call_always(name, f);
        }
    }

    fn call_always(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&mut HandlerBox, &ConnHandle) -> RResult<(), RString>,
    ) {
        let started = Instant::now();
        let result = f(&mut self.handler, &self.handle);
        let elapsed = started.elapsed();
        self.metrics.callback_seconds.observe(elapsed.as_secs_f64());
        if elapsed >= self.slow {
            tracing::warn!(
                callback = name,
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                "slow callback: callbacks run on the connection's task and must not block; \
                 move blocking work to a plugin thread"
            );
        }
        if let RResult::RErr(panic) = result {
            tracing::error!(callback = name, %panic,
                "plugin callback panicked; closing the connection with 1011");
            self.failed = true;
            let _ = self.conn.close_unchecked(1011, "internal error");
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

/// Drains the send queue: feeds every frame that is ready, then flushes once.
async fn write_loop(
    mut sink: SplitSink<Ws, Message>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    conn: Arc<ConnShared>,
    metrics: Arc<Metrics>,
) {
    let mut counts = Counts::default();
    write_batches(&mut sink, &mut rx, &conn, &mut counts, &metrics).await;
    counts.flush_out(&metrics);
}

async fn write_batches(
    sink: &mut SplitSink<Ws, Message>,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    conn: &ConnShared,
    counts: &mut Counts,
    metrics: &Metrics,
) {
    loop {
        let (first, n) = tokio::select! {
            next = rx.recv() => match next {
                Some(item) => item,
                None => return,
            },
            // The connection is over: write what is still queued (an echo, a close frame),
            // then drop the sink so the socket closes now. The session bounds this by its
            // close timeout.
            () = conn.done.notified() => {
                while let Ok((msg, _)) = rx.try_recv() {
                    if sink.feed(msg).await.is_err() {
                        return;
                    }
                }
                let _ = sink.flush().await;
                return;
            }
        };
        let mut batch = n;
        count_out(counts, &first);
        let mut data = is_data(&first);
        let mut closing = matches!(first, Message::Close(_));
        let mut ok = sink.feed(first).await.is_ok();
        while ok && !closing && batch < MAX_BATCH {
            let Ok((msg, n)) = rx.try_recv() else { break };
            batch += n;
            count_out(counts, &msg);
            data |= is_data(&msg);
            closing = matches!(msg, Message::Close(_));
            ok = sink.feed(msg).await.is_ok();
        }
        ok = ok && sink.flush().await.is_ok();
        conn.written(batch);
        if counts.messages >= COUNT_BATCH {
            counts.flush_out(metrics);
        }
        if data {
            conn.sent_data();
        }
        if !ok {
            conn.peer_closed();
            tracing::debug!("write failed; the connection is gone");
            return;
        }
        if closing {
            return;
        }
    }
}
