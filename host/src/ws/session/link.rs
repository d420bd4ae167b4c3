//! A session's socket, open for messages or parked: a connection that has been quiet for a
//! while gives up tungstenite's stream (its state, read buffer and wakers) and the writer, and
//! keeps the bare socket until something arrives or something is to be sent. Most of a
//! server's connections are idle most of the time; this is what each of them holds then.
//!
//! The host's ping and the client's pong that answers it pass a parked connection without
//! opening it: the ping's two bytes are written on the bare socket, and a pong that is all
//! that arrived is read there. With the default 30 s pings, an idle connection would otherwise
//! make its stream again every 30 s.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::SinkExt as _;
use tokio::io::AsyncWrite as _;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::Message;

use super::writer::{IoEvent, Writer};
use super::{Io, Ws};
use crate::metrics::Metrics;
use crate::ws::conn::ConnShared;
use crate::ws::counted::FILL_MAX;

/// The host's ping as a server writes it: final, opcode 9, unmasked, empty.
const PING: [u8; 2] = [0x89, 0x00];

/// The connection's socket.
pub(super) enum Link {
    /// Open for messages. (Both states are boxed: the session's future, which every connection
    /// holds in either, keeps room for neither.)
    Open(Box<Active>),
    /// Quiet: the socket with its wrappers (which hold nothing of the client's then).
    Parked(Box<Parked>),
    /// Only for the moment of a change between the two.
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
    /// Bytes of the host's [`PING`] not yet taken by the socket (from its end): written before
    /// anything else, so no frame is ever written into the middle of it.
    owed: u8,
    /// The ping was written and not yet flushed (through a wrapper that holds bytes: TLS,
    /// permessage-deflate).
    flush_owed: bool,
}

impl Parked {
    /// Writes and flushes what is owed of the host's ping; `Ready(Ok)` once nothing is.
    fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.owed > 0 {
            let from = PING.len() - usize::from(self.owed);
            match Pin::new(&mut self.io).poll_write(cx, &PING[from..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    // (`n` is at most the 2 bytes asked for.)
                    self.owed = self.owed.saturating_sub(u8::try_from(n).unwrap_or(u8::MAX));
                    self.flush_owed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.flush_owed {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flush_owed = false,
                other => return other,
            }
        }
        Poll::Ready(Ok(()))
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
            Self::Moving => {}
        }
    }

    /// How long the message now arriving has been arriving, if one is.
    pub(super) fn pending_for(&self, now: Instant) -> Option<std::time::Duration> {
        match self {
            Self::Open(a) => a.ws.get_ref().get_ref().partial().pending_for(now),
            Self::Parked(p) => p.io.get_ref().partial().pending_for(now),
            Self::Moving => None,
        }
    }

    pub(super) fn is_parked(&self) -> bool {
        matches!(self, Self::Parked(_))
    }

    /// Sends the host's ping from a parked connection without opening it (written at the
    /// next poll, before anything else). False if the connection is open or has sends
    /// queued (which open it): the ping is then queued as any frame.
    pub(super) fn ping_parked(&mut self, conn: &ConnShared) -> bool {
        match self {
            Self::Parked(p) if p.owed == 0 && !conn.has_queued() => {
                p.owed = PING.len() as u8;
                true
            }
            _ => false,
        }
    }

    /// One step of the connection's I/O ([`Writer::poll_io`]). A parked connection writes
    /// what it owes of the host's ping, then waits for something to send or for bytes from the
    /// client (reading at most a control frame's worth, kept in `Counted`). A pong that is
    /// all that arrived is read there and reported, parked; anything else opens the connection
    /// again (it says so, with `Flags` if nothing else: the session then looks to park it again
    /// later), and tungstenite reads what was kept first. The handle's flags need no socket and
    /// are reported as they are.
    #[inline]
    pub(super) fn poll_io(&mut self, cx: &mut Context<'_>, conn: &ConnShared) -> Poll<IoEvent> {
        match self {
            // The path of every message: open, and no look to park due.
            Self::Open(a) if !a.park_look => a.out.poll_io(cx, &mut a.ws, conn),
            _ => self.poll_io_moving(cx, conn),
        }
    }

    /// [`Link::poll_io`] when the connection is parked, or is to be looked at to park.
    #[cold]
    fn poll_io_moving(&mut self, cx: &mut Context<'_>, conn: &ConnShared) -> Poll<IoEvent> {
        let mut opened = false;
        if let Self::Parked(p) = self {
            conn.register(cx.waker());
            if conn.has_flags() {
                return Poll::Ready(IoEvent::Flags);
            }
            match p.poll_owed(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(IoEvent::WriteFailed),
                Poll::Pending => return Poll::Pending,
            }
            let mut failed = None;
            if !conn.has_queued() {
                if conn.is_paused() {
                    return Poll::Pending;
                }
                let counted = p.io.get_mut();
                match counted.poll_fill(cx, FILL_MAX) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => {
                        if let Some((n, payload)) = pong_at_start(counted.ahead()) {
                            counted.consume_ahead(n);
                            return Poll::Ready(IoEvent::Read(Ok(Message::Pong(payload))));
                        }
                    }
                    // (An error is what tungstenite's next read would have met.)
                    Poll::Ready(Err(e)) => failed = Some(e),
                }
            }
            self.unpark(conn);
            opened = true;
            if let Some(e) = failed {
                return Poll::Ready(IoEvent::Read(Err(WsError::Io(e))));
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

    /// Parks the connection if it is open, nothing was read or written since the last look,
    /// and it holds nothing half-done: its last poll found nothing to read, write or flush,
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
            && matches!(a.ws.poll_flush_unpin(cx), Poll::Ready(Ok(())));
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
                    owed: 0,
                    flush_owed: false,
                }))
            }
            other => other,
        };
        conn.metrics().parked.inc();
        tracing::trace!("parked");
        true
    }

    /// Opens a parked connection again (once its ping is written: see [`Parked::owed`]).
    fn unpark(&mut self, conn: &ConnShared) {
        if !self.is_parked() {
            // (An open one is not moved out and back on every poll.)
            return;
        }
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
            Self::Parked(_) | Self::Moving => unreachable!("opened just above"),
        }
    }

    /// After the session: writes out what is still queued (a parked connection opens for
    /// it), then flushes.
    pub(super) fn poll_final(&mut self, cx: &mut Context<'_>, conn: &ConnShared) -> Poll<()> {
        if let Self::Parked(p) = self {
            match p.poll_owed(cx) {
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
    /// connection did when it parked), and a parked one leaves the parked count.
    pub(super) fn finish(&mut self, metrics: &Metrics) {
        match self {
            Self::Open(a) => a.out.counts.flush_out(metrics),
            Self::Parked(_) => {
                metrics.parked.dec();
            }
            Self::Moving => {}
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
