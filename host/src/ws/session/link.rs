//! A session's socket, open for messages or parked: a connection that has been quiet for a
//! while gives up tungstenite's stream (its state, read buffer and wakers) and the writer, and
//! keeps the bare socket until something arrives or something is to be sent. Most of a
//! server's connections are idle most of the time; this is what each of them holds then.
//!
//! What a parked connection is sent needs no stream either: data frames, pings and pongs
//! (the host's and the plugin's) are written on the bare socket, and a pong that is all that
//! arrived is read there. A publish to a quiet subscriber, or the host's ping every 30 s,
//! would otherwise make its stream again each time.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::io::AsyncWrite as _;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::Message;

use super::writer::{IoEvent, Writer};
use super::{Io, Ws};
use crate::metrics::Metrics;
use crate::ws::conn::{ConnShared, LentSocket};
use crate::ws::counted::FILL_MAX;

/// The connection's socket.
pub(super) enum Link {
    /// Open for messages. (Both states are boxed: the session's future, which every connection
    /// holds in either, keeps room for neither.)
    Open(Box<Active>),
    /// Quiet: the socket with its wrappers (which hold nothing of the client's then).
    Parked(Box<Parked>),
    /// Parked, with the socket lent to the connection's shared state: a subscriber's, so
    /// that a publish's sweep writes to it without waking the session ([`LentSocket`]).
    Lent(Lend),
    /// Only for the moment of a change between the others.
    Moving,
}

/// An open socket: tungstenite's stream and the writer that feeds it.
pub(super) struct Active {
    ws: Ws,
    out: Writer,
    sizes: Sizes,
    /// The session asks to be parked if the connection is quiet ([`Link::look_to_park`]).
    park_look: bool,
    /// Opened from parked, not yet told to the session ([`Link::take_reopened`]).
    reopened: bool,
}

/// A parked socket, and the sizes tungstenite's stream is made again with.
pub(super) struct Parked {
    io: Io,
    sizes: Sizes,
    /// Frames written on the bare socket that are not all out yet: finished before anything
    /// else is written, so no frame ever lands in the middle of another. (Boxed: rarely
    /// there, and `Parked` stays in its 192-byte class.)
    owed: Option<Box<Owed>>,
}

/// The session's claim on its lent socket: dropped (the session ends, its future is dropped),
/// it takes the socket back from the shared state, so the socket closes with the session.
pub(super) struct Lend(Arc<ConnShared>);

impl Drop for Lend {
    fn drop(&mut self) {
        drop(self.0.take_lent());
    }
}

impl Lend {
    /// Runs `f` on the lent socket, holding its place locked.
    fn with<R>(&self, f: impl FnOnce(&mut Parked) -> R) -> R {
        let mut slot = self.0.lent();
        let socket: &mut dyn std::any::Any = slot.as_deref_mut().expect("lent until taken back");
        f(socket
            .downcast_mut::<Parked>()
            .expect("only a Parked is lent"))
    }
}

impl LentSocket for Parked {
    fn write_queued(&mut self, conn: &ConnShared, now: Instant) -> bool {
        if self.owed.is_some() {
            // (The session waits on the socket with its own waker: a write here would take
            // that place.)
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        matches!(
            self.poll_queued(&mut cx, conn, Some(now)),
            Poll::Ready(Ok(()))
        ) && self.owed.is_none()
            && !conn.has_queued()
    }
}

/// The part of a batch of frames the socket has not taken yet (see [`Parked::owed`]).
struct Owed {
    /// The rest of the batch as it goes on the wire (empty: only a flush is owed).
    bytes: Vec<u8>,
    /// How much of it the socket has taken since.
    at: usize,
    /// What the batch counts once it is out (none: counted already).
    tally: Option<Tally>,
}

/// What a batch of frames written parked counts once it is all out.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// What its frames counted against the send queue.
    queued: u64,
    /// The data messages among them and their payload bytes.
    messages: u64,
    data_bytes: u64,
}

impl Tally {
    /// The batch is out: its bytes leave the send queue, its messages count as sent (and for
    /// the idle timeout, at `now` if given, else the clock is read).
    fn sent(self, conn: &ConnShared, now: Option<Instant>) {
        if self.queued > 0 || self.messages > 0 {
            conn.written(self.queued);
        }
        if self.messages > 0 {
            conn.metrics().messages_out.inc_by(self.messages);
            conn.metrics().bytes_out.inc_by(self.data_bytes);
            conn.sent_data(now);
        }
    }
}

thread_local! {
    /// Where a parked connection encodes a batch of frames, one buffer per worker thread: a
    /// batch the socket takes whole (nearly every one) allocates nothing of its own.
    static FRAMES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most [`FRAMES`] keeps between batches; a larger buffer is given back after its batch.
const FRAMES_KEPT: usize = 64 << 10;

/// Whether a parked connection writes `item` itself: a data frame, a ping or a pong that is
/// not a tracked send. (A close frame, a raw frame or a tracked send opens the connection.)
fn parked_frame(item: &crate::ws::conn::Outgoing) -> bool {
    item.1 & crate::ws::conn::TRACKED == 0
        && matches!(
            item.0,
            Message::Text(_) | Message::Binary(_) | Message::Ping(_) | Message::Pong(_)
        )
}

/// Appends `msg` to `bytes` as this server writes it: final, unmasked.
fn append_frame(bytes: &mut Vec<u8>, msg: Message) {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let frame = match msg {
        Message::Text(t) => Frame::message(t, OpCode::Data(Data::Text), true),
        Message::Binary(b) => Frame::message(b, OpCode::Data(Data::Binary), true),
        Message::Ping(p) => Frame::ping(p),
        Message::Pong(p) => Frame::pong(p),
        Message::Close(_) | Message::Frame(_) => unreachable!("not a parked frame"),
    };
    bytes.reserve(frame.len());
    frame.format(bytes).expect("writing to a Vec cannot fail");
}

impl Parked {
    /// Writes the rest of the batch being written, counts it as sent, and flushes;
    /// `Ready(Ok)` once nothing is owed.
    fn poll_owed(
        &mut self,
        cx: &mut Context<'_>,
        conn: &ConnShared,
        now: Option<Instant>,
    ) -> Poll<io::Result<()>> {
        let Some(owed) = self.owed.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while owed.at < owed.bytes.len() {
            match Pin::new(&mut self.io).poll_write(cx, &owed.bytes[owed.at..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => owed.at += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if let Some(tally) = owed.tally.take() {
            tally.sent(conn, now);
        }
        // (Through TLS or permessage-deflate, bytes may wait in the wrapper.)
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.owed = None;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    /// Writes the queued frames a parked connection writes itself ([`parked_frame`]), in
    /// order and in batches, until the queue is empty or its first frame needs the stream;
    /// `Pending` while the socket is full.
    fn poll_queued(
        &mut self,
        cx: &mut Context<'_>,
        conn: &ConnShared,
        now: Option<Instant>,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.poll_owed(cx, conn, now) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            if !FRAMES.with_borrow_mut(|frames| self.write_batch(cx, conn, frames, now)) {
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Encodes the queued frames a parked connection writes itself, up to
    /// [`MAX_BATCH`](super::MAX_BATCH) bytes, into `frames` and writes them; false if there
    /// were none. A batch the socket takes whole is counted as sent; what it does not take,
    /// or a flush it did not finish, is owed (what it met, `Pending` or an error, is met again
    /// by [`Parked::poll_owed`]).
    fn write_batch(
        &mut self,
        cx: &mut Context<'_>,
        conn: &ConnShared,
        frames: &mut Vec<u8>,
        now: Option<Instant>,
    ) -> bool {
        frames.clear();
        let mut tally = Tally::default();
        while let Some((msg, queued)) = conn
            .pop_queued_if(|item| parked_frame(item) && (frames.len() as u64) < super::MAX_BATCH)
        {
            if super::writer::is_data(&msg) {
                tally.messages += 1;
                tally.data_bytes += msg.len() as u64;
            }
            tally.queued += queued;
            append_frame(frames, msg);
        }
        if frames.is_empty() {
            return false;
        }
        let mut at = 0;
        while at < frames.len() {
            match Pin::new(&mut self.io).poll_write(cx, &frames[at..]) {
                Poll::Ready(Ok(n)) if n > 0 => at += n,
                _ => break,
            }
        }
        if at < frames.len() {
            self.owed = Some(Box::new(Owed {
                bytes: frames[at..].to_vec(),
                at: 0,
                tally: Some(tally),
            }));
        } else {
            tally.sent(conn, now);
            if !matches!(Pin::new(&mut self.io).poll_flush(cx), Poll::Ready(Ok(()))) {
                self.owed = Some(Box::new(Owed {
                    bytes: Vec::new(),
                    at: 0,
                    tally: None,
                }));
            }
        }
        if frames.capacity() > FRAMES_KEPT {
            *frames = Vec::new();
        }
        true
    }
}

/// What a parked connection's poll came to.
enum ParkedStep {
    /// Something for the session, parked.
    Ready(IoEvent),
    /// Nothing yet; woken by the socket or the handle.
    Pending,
    /// It must open: bytes other than a whole pong came, or a queued frame needs the stream;
    /// with the error the read met, if it failed.
    Open(Option<io::Error>),
}

impl Parked {
    /// One step of a parked connection's I/O ([`Link::poll_io`]): writes the queued frames
    /// it writes itself, then waits for more or for bytes from the client (reading at most a
    /// control frame's worth, kept in `Counted`); a pong that is all that arrived is read here.
    fn poll_parked(&mut self, cx: &mut Context<'_>, conn: &ConnShared) -> ParkedStep {
        conn.register(cx.waker());
        if conn.has_flags() {
            return ParkedStep::Ready(IoEvent::Flags);
        }
        let writing = match self.poll_queued(cx, conn, None) {
            Poll::Ready(Ok(())) => false,
            Poll::Ready(Err(_)) => return ParkedStep::Ready(IoEvent::WriteFailed),
            Poll::Pending => true,
        };
        // (What was written may have emptied a queue a refused send waits on.)
        if conn.has_flags() {
            return ParkedStep::Ready(IoEvent::Flags);
        }
        let mut failed = None;
        // (Only a frame that needs the stream opens it: one queued since the last batch, by a
        // publish whose sweep is still to come, is written at the next poll or by the sweep.)
        if writing || !conn.queued_front_is(|item| !parked_frame(item)) {
            if conn.is_paused() {
                return ParkedStep::Pending;
            }
            let counted = self.io.get_mut();
            match counted.poll_fill(cx, FILL_MAX) {
                Poll::Pending => return ParkedStep::Pending,
                Poll::Ready(Ok(())) => {
                    if let Some((n, payload)) = pong_at_start(counted.ahead()) {
                        counted.consume_ahead(n);
                        return ParkedStep::Ready(IoEvent::Read(Ok(Message::Pong(payload))));
                    }
                }
                // (An error is what tungstenite's next read would have met.)
                Poll::Ready(Err(e)) => failed = Some(e),
            }
            if writing {
                // Opened once the frame part-way out is out (the socket wakes it); a failed
                // read ends the session now (its final write finishes the frame).
                return match failed {
                    Some(e) => ParkedStep::Ready(IoEvent::Read(Err(WsError::Io(e)))),
                    None => ParkedStep::Pending,
                };
            }
        }
        ParkedStep::Open(failed)
    }
}

/// If `bytes` start with a whole pong frame as a client must send it (final, no reserved
/// bits, masked, a payload of at most 125 bytes): its length and its payload, unmasked.
/// Anything else, a pong not yet whole among it, is for tungstenite to read.
fn pong_at_start(bytes: &[u8]) -> Option<(usize, bytes::Bytes)> {
    let [0x8A, second, rest @ ..] = bytes else {
        return None;
    };
    if second & 0x80 == 0 {
        return None;
    }
    let len = usize::from(second & 0x7F);
    if len > 125 {
        return None;
    }
    let mask = rest.get(..4)?;
    let payload = rest.get(4..4 + len)?;
    let payload: Vec<u8> = payload
        .iter()
        .zip(mask.iter().cycle())
        .map(|(b, m)| b ^ m)
        .collect();
    Some((2 + 4 + len, payload.into()))
}

/// The sizes tungstenite's stream is configured with (its other settings are its defaults).
#[derive(Debug, Clone, Copy)]
pub(super) struct Sizes {
    pub(super) read_buffer: usize,
    pub(super) max_message: usize,
    pub(super) max_frame: usize,
}

impl Link {
    pub(super) fn open(ws: Ws, sizes: Sizes) -> Self {
        Self::Open(Box::new(Active {
            ws,
            out: Writer::default(),
            sizes,
            park_look: false,
            reopened: false,
        }))
    }

    /// Whether the connection was opened from parked since the last call (it may have
    /// parked and opened again within one poll of the session).
    pub(super) fn take_reopened(&mut self) -> bool {
        match self {
            Self::Open(a) => std::mem::take(&mut a.reopened),
            _ => false,
        }
    }

    /// Asks that the connection be parked at its next poll if it is quiet then
    /// ([`Link::try_park`]): after the socket was looked at, so that what has arrived is read
    /// first.
    pub(super) fn look_to_park(&mut self) {
        if let Self::Open(a) = self {
            a.park_look = true;
        }
    }

    /// When a data message of `len` bytes just read arrived: the clock the session read at
    /// the end of its last callback if it has not waited since ([`Writer::clock`]; a message
    /// read in the same run of work came in at most the parsing of it later), else the
    /// clock now. One clock read per message, not two, when messages come in batches. (A large
    /// message may have taken a while to assemble from bytes already read: the clock then.)
    pub(super) fn clock_for(&self, len: usize) -> Instant {
        const SMALL: usize = 64 << 10;
        match self {
            Self::Open(a) if len <= SMALL => a.out.clock,
            _ => None,
        }
        .unwrap_or_else(Instant::now)
    }

    /// The clock as read at the end of a callback, for [`Link::clock_for`] and the writer's
    /// flush until the session next waits.
    pub(super) fn set_clock(&mut self, now: Option<Instant>) {
        if let Self::Open(a) = self {
            a.out.clock = now;
        }
    }

    /// Asks that the connection be parked at its next poll if nothing else is read or written
    /// before then ([`Link::try_park`]): the pong answering the host's ping has come, and a
    /// ping is all that woke a quiet connection. (Without this it would stay open until its
    /// next look, a second or more: with the default 30 s pings, every idle connection would
    /// make its stream again for that long every 30 s.)
    pub(super) fn park_after_pong(&mut self) {
        if let Self::Open(a) = self {
            a.out.stirred = false;
            a.park_look = true;
        }
    }

    /// The bytes read toward the next message: a message was delivered, and they go back to
    /// the budget.
    pub(super) fn delivered(&mut self) {
        match self {
            Self::Open(a) => a.ws.get_mut().get_mut().partial_mut().delivered(),
            Self::Parked(p) => p.io.get_mut().partial_mut().delivered(),
            Self::Lent(l) => l.with(|p| p.io.get_mut().partial_mut().delivered()),
            Self::Moving => {}
        }
    }

    /// The continuation frames read since the last call (charged to the message rate).
    /// Only an open connection reads them: a parked one reads at most a control frame's
    /// worth and opens for anything but a pong, so what it counted waits in the socket's
    /// wrapper until then (and a lent socket's lock is not taken at every wake-up).
    pub(super) fn take_fragments(&mut self) -> u16 {
        match self {
            Self::Open(a) => a.ws.get_mut().get_mut().take_fragments(),
            Self::Parked(_) | Self::Lent(_) | Self::Moving => 0,
        }
    }

    /// How long the message now arriving has been arriving, if one is.
    pub(super) fn pending_for(&self, now: Instant) -> Option<std::time::Duration> {
        match self {
            Self::Open(a) => a.ws.get_ref().get_ref().partial().pending_for(now),
            Self::Parked(p) => p.io.get_ref().partial().pending_for(now),
            Self::Lent(l) => l.with(|p| p.io.get_ref().partial().pending_for(now)),
            Self::Moving => None,
        }
    }

    pub(super) fn is_parked(&self) -> bool {
        matches!(self, Self::Parked(_) | Self::Lent(_))
    }

    /// Lends a parked subscriber's socket to its connection's shared state (see
    /// [`Link::Lent`]); one that subscribed while parked is lent at its next poll.
    fn lend_if_subscriber(&mut self, conn: &Arc<ConnShared>) {
        if !matches!(self, Self::Parked(_)) || !conn.is_subscriber() {
            return;
        }
        if let Self::Parked(p) = std::mem::replace(self, Self::Moving) {
            conn.lend(p);
            *self = Self::Lent(Lend(Arc::clone(conn)));
        }
    }

    /// Takes a lent socket back: the link is `Parked` again.
    fn unlend(&mut self) {
        if let Self::Lent(l) = self {
            let Some(socket) = l.0.take_lent() else {
                unreachable!("lent until taken back");
            };
            let socket: Box<dyn std::any::Any> = socket;
            let Ok(p) = socket.downcast::<Parked>() else {
                unreachable!("only a Parked is lent");
            };
            *self = Self::Parked(p);
        }
    }

    /// One step of the connection's I/O ([`Writer::poll_io`]). A parked connection writes the
    /// queued frames it can write itself ([`parked_frame`]), then waits for more or for bytes
    /// from the client (reading at most a control frame's worth, kept in `Counted`). A pong
    /// that is all that arrived is read there and reported, parked; anything else, or a queued
    /// frame that needs the stream, opens the connection again (it says so, with `Flags` if
    /// nothing else: the session then looks to park it again later), and tungstenite reads
    /// what was kept first. While the socket is full it stays parked (a frame is part-way
    /// out). The handle's flags need no socket and are reported as they are.
    #[inline]
    pub(super) fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        conn: &Arc<ConnShared>,
    ) -> Poll<IoEvent> {
        match self {
            // The path of every message: open, and no look to park due.
            Self::Open(a) if !a.park_look => a.out.poll_io(cx, &mut a.ws, conn),
            _ => self.poll_io_moving(cx, conn),
        }
    }

    /// [`Link::poll_io`] when the connection is parked, or is to be looked at to park.
    #[cold]
    fn poll_io_moving(&mut self, cx: &mut Context<'_>, conn: &Arc<ConnShared>) -> Poll<IoEvent> {
        let mut opened = false;
        self.lend_if_subscriber(conn);
        let step = match self {
            Self::Parked(p) => Some(p.poll_parked(cx, conn)),
            Self::Lent(l) => Some(l.with(|p| p.poll_parked(cx, conn))),
            Self::Open(_) | Self::Moving => None,
        };
        match step {
            None => {}
            Some(ParkedStep::Ready(event)) => return Poll::Ready(event),
            Some(ParkedStep::Pending) => return Poll::Pending,
            Some(ParkedStep::Open(failed)) => {
                self.unpark(conn);
                opened = true;
                if let Some(e) = failed {
                    return Poll::Ready(IoEvent::Read(Err(WsError::Io(e))));
                }
            }
        }
        let a = self.active(conn);
        let polled = a.out.poll_io(cx, &mut a.ws, conn);
        if polled.is_pending() && std::mem::take(&mut a.park_look) && self.try_park(cx, conn) {
            // Parked: registered for the socket's next bytes.
            return self.poll_io(cx, conn);
        }
        if opened && polled.is_pending() {
            return Poll::Ready(IoEvent::Flags);
        }
        polled
    }

    /// Parks the connection if it is open, nothing was read since the last look (what it
    /// writes does not count: parked, it writes what it is sent), and it holds nothing
    /// half-done: its last poll found nothing to read, write or flush,
    /// no frame or fragmented message is part-way in, nothing is queued, it is neither closing
    /// nor paused, and tungstenite has no answer (a pong) left to write. Whether it is
    /// parked now.
    fn try_park(&mut self, cx: &mut Context<'_>, conn: &ConnShared) -> bool {
        let Self::Open(a) = self else {
            return self.is_parked();
        };
        let stirred = std::mem::take(&mut a.out.stirred);
        let at_rest = !stirred
            && a.out.rested
            && conn.is_open()
            && !conn.is_paused()
            && !conn.has_queued()
            && !conn.has_flags()
            && a.ws.get_ref().at_rest()
            && a.ws.get_ref().get_ref().at_rest()
            && matches!(a.ws.poll_flush(cx), Poll::Ready(Ok(())));
        if !at_rest {
            return false;
        }
        a.out.counts.flush_out(conn.metrics());
        *self = match std::mem::replace(self, Self::Moving) {
            Self::Open(a) => {
                let Active { ws, sizes, .. } = *a;
                Self::Parked(Box::new(Parked {
                    io: ws.into_inner(),
                    sizes,
                    owed: None,
                }))
            }
            other => other,
        };
        conn.metrics().parked.inc();
        tracing::trace!("parked");
        true
    }

    /// Opens a parked connection again (never with a frame part-way out: see
    /// [`Parked::owed`]).
    fn unpark(&mut self, conn: &ConnShared) {
        if !self.is_parked() {
            // (An open one is not moved out and back on every poll.)
            return;
        }
        self.unlend();
        *self = match std::mem::replace(self, Self::Moving) {
            Self::Parked(p) => {
                conn.metrics().parked.dec();
                conn.metrics().unparked.inc();
                let Parked { io, sizes, .. } = *p;
                let mut open = Self::open(super::raw_socket(io, sizes), sizes);
                if let Self::Open(a) = &mut open {
                    a.reopened = true;
                }
                open
            }
            other => other,
        };
    }

    fn active(&mut self, conn: &ConnShared) -> &mut Active {
        self.unpark(conn);
        match self {
            Self::Open(a) => a,
            Self::Parked(_) | Self::Lent(_) | Self::Moving => unreachable!("opened just above"),
        }
    }

    /// After the session: writes out what is still queued (a parked connection opens for
    /// it), then flushes.
    pub(super) fn poll_final(&mut self, cx: &mut Context<'_>, conn: &ConnShared) -> Poll<()> {
        self.unlend();
        if let Self::Parked(p) = self {
            match p.poll_queued(cx, conn, None) {
                Poll::Ready(Ok(())) => {}
                // (Nothing more can be written.)
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
            if !conn.has_queued() {
                return Poll::Ready(());
            }
        }
        let a = self.active(conn);
        a.out.poll_final(cx, &mut a.ws, conn)
    }

    /// At the session's end: adds the messages and bytes written to the metrics (a parked
    /// connection did when it parked), and a parked one leaves the parked count (a lent
    /// socket is taken back, to close with the session).
    pub(super) fn finish(&mut self, metrics: &Metrics) {
        self.unlend();
        match self {
            Self::Open(a) => a.out.counts.flush_out(metrics),
            Self::Parked(_) => {
                metrics.parked.dec();
            }
            Self::Lent(_) | Self::Moving => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every parked connection holds (boxed): at 192 bytes it is jemalloc's 192-byte
    /// class, at 193 its 224-byte one.
    #[test]
    fn a_parked_socket_stays_in_its_size_class() {
        let size = std::mem::size_of::<Parked>();
        assert!(size <= 192, "Parked is {size} bytes");
    }

    #[test]
    fn only_a_whole_masked_pong_is_a_pong() {
        let pong = [0x8A, 0x82, 1, 2, 3, 4, b'o' ^ 1, b'k' ^ 2];
        let (n, payload) = pong_at_start(&pong).unwrap();
        assert_eq!((n, &payload[..]), (8, &b"ok"[..]));
        let mut more = pong.to_vec();
        more.push(0x81);
        assert_eq!(pong_at_start(&more).unwrap().0, 8);
        // Not whole, not masked, not final, a reserved bit, another opcode, too long.
        assert!(pong_at_start(&pong[..7]).is_none());
        assert!(pong_at_start(&[0x8A, 0x00]).is_none());
        assert!(pong_at_start(&[0x0A, 0x80, 0, 0, 0, 0]).is_none());
        assert!(pong_at_start(&[0xCA, 0x80, 0, 0, 0, 0]).is_none());
        assert!(pong_at_start(&[0x89, 0x80, 0, 0, 0, 0]).is_none());
        assert!(pong_at_start(&[0x8A, 0xFE, 0, 0, 0, 0]).is_none());
    }
}
