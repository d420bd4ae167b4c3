//! A session's write side: frames taken from the connection's queue, fed to the socket in
//! batches and flushed once per burst (`Writer`), and the socket poll that tells the session
//! what happened (`IoEvent`).

use std::task::{Context, Poll};

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::Message;

use super::{Counts, Ws, COUNT_BATCH, MAX_BATCH, MAX_READS_BEFORE_FLUSH};
use crate::ws::conn::ConnShared;

pub(super) fn count_out(counts: &mut Counts, m: &Message) {
    if is_data(m) {
        counts.messages += 1;
        counts.bytes += m.len() as u64;
    }
}

pub(super) fn is_data(m: &Message) -> bool {
    matches!(m, Message::Text(_) | Message::Binary(_))
}

/// What a socket event was.
pub(super) enum IoEvent {
    Read(Result<Message, WsError>),
    /// The peer's side is over (after the close handshake, or the TCP connection ended).
    End,
    /// The connection's handle set a flag (the queue drained after a refusal, a close was
    /// queued) for the session to act on; or a parked connection was opened again.
    Flags,
    WriteFailed,
    /// Continuation frames were read (not by `poll_io`: the session takes the count when the
    /// socket has nothing more), to be charged to the message rate.
    Fragments(u16),
}

/// The writing side of a session: frames taken from the connection's queue, fed to the socket
/// and flushed.
#[derive(Default)]
pub(super) struct Writer {
    /// Frames taken from the shared queue, not yet fed.
    pub(super) local: crate::ws::conn::Queue,
    /// Queued bytes fed since the last flush (released from the send queue once flushed).
    pub(super) fed: u64,
    /// Whether a data message is among them (for the idle timeout).
    pub(super) data: bool,
    /// Something was fed and not flushed yet.
    pub(super) dirty: bool,
    /// Messages read since the last flush.
    pub(super) reads: u32,
    /// A close frame was fed: nothing after it.
    pub(super) close_fed: bool,
    pub(super) counts: Counts,
    /// Tracked sends among the frames fed since the last flush.
    pub(super) tracked: usize,
    /// The last `poll_io` ended with nothing to read, write or flush.
    pub(super) rested: bool,
    /// A message was read since the session last looked (see `Link::try_park`). Writes do
    /// not count: a parked connection writes what it is sent without opening, so one that
    /// only receives (a subscriber, a server push) is better parked.
    pub(super) stirred: bool,
    /// The clock as the session last read it (when its last callback ended), if the session
    /// has not waited since: what the next message read or flush in the same run of work is
    /// stamped with, instead of reading the clock again ([`Link::clock_for`]). Cleared whenever
    /// `poll_io` returns `Pending`.
    ///
    /// [`Link::clock_for`]: super::link::Link::clock_for
    pub(super) clock: Option<Instant>,
}

impl Writer {
    /// Feeds queued frames while the socket takes them.
    pub(super) fn feed(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut Ws,
        conn: &ConnShared,
    ) -> Result<(), ()> {
        while !self.close_fed && self.fed < MAX_BATCH {
            if self.local.is_empty() {
                conn.take_queued(&mut self.local);
                if self.local.is_empty() {
                    break;
                }
            }
            match ws.poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Err(()),
                Poll::Pending => break,
            }
            let Some((msg, n)) = self.local.pop_front() else {
                break;
            };
            if n & crate::ws::conn::TRACKED != 0 {
                self.tracked += 1;
            }
            let n = n & !crate::ws::conn::TRACKED;
            count_out(&mut self.counts, &msg);
            self.data |= is_data(&msg);
            self.close_fed = matches!(msg, Message::Close(_));
            ws.start_send(cx, msg).map_err(|_| ())?;
            self.fed += n;
            self.dirty = true;
        }
        Ok(())
    }

    /// Flushes what was fed; `Ready(Ok)` once it is on the wire.
    pub(super) fn flush(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut Ws,
        conn: &ConnShared,
    ) -> Poll<Result<(), ()>> {
        if !self.dirty {
            return Poll::Ready(Ok(()));
        }
        match ws.poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.dirty = false;
                self.reads = 0;
                // An idle connection keeps no queue memory.
                self.local.shrink_if_empty();
                conn.written(std::mem::take(&mut self.fed));
                if self.tracked > 0 {
                    conn.tracked_written(std::mem::take(&mut self.tracked));
                }
                if std::mem::take(&mut self.data) {
                    conn.sent_data(self.clock);
                }
                if self.counts.messages >= COUNT_BATCH {
                    self.counts.flush_out(conn.metrics());
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(())),
            Poll::Pending => Poll::Pending,
        }
    }

    /// One step of the connection's I/O: feed what is queued, read the next message if one
    /// has arrived, and flush only when nothing more is readable (or after many reads).
    pub(super) fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut Ws,
        conn: &ConnShared,
    ) -> Poll<IoEvent> {
        let polled = self.poll_io_inner(cx, ws, conn);
        if polled.is_pending() {
            // The session waits now (or yields): the clock it read is not now any more.
            self.clock = None;
        }
        polled
    }

    fn poll_io_inner(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut Ws,
        conn: &ConnShared,
    ) -> Poll<IoEvent> {
        self.rested = false;
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
                match ws.poll_next(cx) {
                    Poll::Ready(Some(msg)) => {
                        self.reads += 1;
                        self.stirred = true;
                        return Poll::Ready(IoEvent::Read(msg));
                    }
                    Poll::Ready(None) => return Poll::Ready(IoEvent::End),
                    Poll::Pending => {}
                }
            }
            match self.flush(cx, ws, conn) {
                Poll::Ready(Ok(())) => {
                    // Done unless reading was skipped for this flush, or more was queued (or
                    // held back by MAX_BATCH) meanwhile.
                    let more = !self.close_fed && (!self.local.is_empty() || conn.has_queued());
                    if conn.has_flags() {
                        // The flush emptied a queue a refused send waits on: `on_drain` now.
                        return Poll::Ready(IoEvent::Flags);
                    }
                    if (read_polled || paused) && !more {
                        if self.registered_late(cx, conn, paused) {
                            continue;
                        }
                        self.rested = read_polled;
                        return Poll::Pending;
                    }
                }
                Poll::Ready(Err(())) => return Poll::Ready(IoEvent::WriteFailed),
                Poll::Pending => {
                    // The socket wakes the session when it takes more; the handle's flags
                    // cannot wait for that.
                    conn.register(cx.waker());
                    if conn.has_flags() {
                        return Poll::Ready(IoEvent::Flags);
                    }
                    return Poll::Pending;
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Before waiting: registers the session with the connection's handle (a send, a flag or
    /// a resume from another thread wakes it), then looks again at what such a wake-up would
    /// have been for; whether one came before the registration. Done only when about to wait,
    /// not on every poll: a batch of messages registers once.
    fn registered_late(&self, cx: &mut Context<'_>, conn: &ConnShared, paused: bool) -> bool {
        conn.register(cx.waker());
        conn.has_flags() || (!self.close_fed && conn.has_queued()) || conn.is_paused() != paused
    }

    /// After the session: writes out what is still queued, then flushes.
    pub(super) fn poll_final(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut Ws,
        conn: &ConnShared,
    ) -> Poll<()> {
        loop {
            if self.feed(cx, ws, conn).is_err() {
                return Poll::Ready(());
            }
            if !self.dirty {
                return Poll::Ready(());
            }
            match ws.poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.dirty = false;
                    conn.written(std::mem::take(&mut self.fed));
                    if self.tracked > 0 {
                        conn.tracked_written(std::mem::take(&mut self.tracked));
                    }
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
