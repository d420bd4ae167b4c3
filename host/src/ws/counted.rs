//! The socket of a session, charging every byte read to the host's memory budget until the
//! message it belongs to is delivered: tungstenite assembles fragments out of sight, so
//! partly received messages are bounded here, at the socket.
//!
//! It also reads ahead: tungstenite reads at most its read-buffer size per call, and that
//! buffer lives as long as the connection, so a small one (lean idle connections) would mean
//! a system call per few hundred bytes. Here every socket read goes through one 64 KiB buffer
//! per worker thread; what tungstenite did not take yet is kept per connection only until it
//! does.
//!
//! And it follows the frames as they arrive, so that a text frame with invalid UTF-8 fails as
//! soon as the bad bytes are in, not when its last byte is ([`Utf8Watch`]).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::utf8_watch::Utf8Watch;
use crate::budget::MemoryBudget;

/// The error the budget refuses bytes with (the session closes with 1013 on it).
#[derive(Debug, thiserror::Error)]
#[error("memory budget for buffered bytes exhausted")]
pub(crate) struct BudgetExhausted;

/// The error a text frame with invalid UTF-8 fails with before it is whole (the session closes
/// with 1007 on it).
#[derive(Debug, thiserror::Error)]
#[error("invalid UTF-8 in a text frame")]
pub(crate) struct InvalidUtf8;

fn invalid_utf8() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, InvalidUtf8)
}

/// Whether an I/O error is [`InvalidUtf8`].
pub(crate) fn is_invalid_utf8(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<InvalidUtf8>())
}

/// Whether an I/O error is the budget's refusal.
pub(crate) fn is_budget_exhausted(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<BudgetExhausted>())
}

/// The bytes read since the last delivered message, charged to the budget until it is.
/// Kept in the socket's wrapper itself (the session reaches it through the socket): a
/// separate shared allocation would be one more object every idle connection holds.
#[derive(Debug)]
pub(crate) struct Partial {
    budget: Arc<MemoryBudget>,
    bytes: u64,
    /// When the first byte after the last delivered message arrived (none: no such byte).
    since: Option<Instant>,
}

impl Partial {
    pub(crate) fn new(budget: Arc<MemoryBudget>) -> Self {
        Self {
            budget,
            bytes: 0,
            since: None,
        }
    }

    /// A message was delivered: what it held goes back to the budget.
    pub(crate) fn delivered(&mut self) {
        let held = std::mem::take(&mut self.bytes);
        if held > 0 {
            self.budget.give(held);
            self.since = None;
        }
    }

    /// How long the message now arriving has been arriving, if one is.
    pub(crate) fn pending_for(&self, now: Instant) -> Option<Duration> {
        self.since.map(|since| now.saturating_duration_since(since))
    }
}

impl Drop for Partial {
    /// What a connection held when it ended, however it ended, goes back to the budget.
    fn drop(&mut self) {
        self.delivered();
    }
}

/// The most [`Counted::poll_fill`] reads: a client's largest control frame (a 2-byte header,
/// a 4-byte mask and 125 bytes).
pub(crate) const FILL_MAX: usize = 2 + 4 + 125;

/// Size of the per-thread read-ahead buffer: one system call reads this much at most.
const READ_AHEAD: usize = 64 << 10;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_AHEAD].into_boxed_slice());
}

/// A socket whose reads are charged to a [`Partial`].
#[derive(Debug)]
pub(crate) struct Counted<S> {
    inner: S,
    partial: Partial,
    /// Read from the socket, not yet taken by tungstenite; empty (no allocation) when idle.
    ahead: BytesMut,
    /// Follows the frames to fail invalid UTF-8 early.
    watch: Utf8Watch,
    /// Invalid UTF-8 was found; the bytes before its frame were handed on, the next read fails.
    spoiled: bool,
    /// A read answered "not yet" once for continuation frames not yet taken
    /// ([`YIELD_AFTER_FRAGMENTS`]); cleared when the session takes their count.
    yielded: bool,
}

/// Continuation frames after which a read answers "not yet" (once), so that the session takes
/// their count and charges it to the message rate: tungstenite reads a fragmented message
/// without returning until its last frame, and a client streaming empty fragments would
/// otherwise keep it reading for as long as it likes.
const YIELD_AFTER_FRAGMENTS: u16 = 1024;

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, partial: Partial) -> Self {
        Self {
            inner,
            partial,
            ahead: BytesMut::new(),
            watch: Utf8Watch::default(),
            spoiled: false,
            yielded: false,
        }
    }

    /// Starts with `bytes` already read (what hyper read past the handshake).
    pub(crate) fn with_ahead(mut self, bytes: &[u8]) -> Self {
        let keep = self.watched(bytes);
        if keep > 0 {
            self.ahead = BytesMut::from(&bytes[..keep]);
        }
        self
    }

    /// The bytes read toward the next message.
    pub(crate) fn partial(&self) -> &Partial {
        &self.partial
    }

    /// The continuation frames read since the last call ([`Utf8Watch::take_fragments`]).
    pub(crate) fn take_fragments(&mut self) -> u16 {
        self.yielded = false;
        self.watch.take_fragments()
    }

    pub(crate) fn partial_mut(&mut self) -> &mut Partial {
        &mut self.partial
    }

    /// Whether nothing of the client's is held here or half-read: every byte read so far was
    /// handed on and ends a whole frame outside a fragmented message.
    pub(crate) fn at_rest(&self) -> bool {
        self.ahead.is_empty() && !self.spoiled && self.watch.at_rest()
    }

    /// Waits until bytes from the client are held here, not yet handed on: if none are, reads
    /// at most `max` of them from the socket (charged and followed as any read). What a parked
    /// connection looks at before it makes tungstenite's stream again ([`Counted::ahead`]).
    /// Ready with nothing held at the end of the stream (a read after it meets the end again)
    /// or once invalid UTF-8 spoiled the frame read (the next read fails).
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<()>>
    where
        S: AsyncRead + Unpin,
    {
        if !self.ahead.is_empty() || self.spoiled {
            return Poll::Ready(Ok(()));
        }
        let mut bytes = [0u8; FILL_MAX];
        let mut buf = ReadBuf::new(&mut bytes[..max.min(FILL_MAX)]);
        match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let data = buf.filled();
                self.charge(data.len() as u64)?;
                let keep = self.watched(data);
                if keep > 0 {
                    self.ahead = BytesMut::from(&data[..keep]);
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    /// What was read from the socket and not yet handed on.
    pub(crate) fn ahead(&self) -> &[u8] {
        &self.ahead
    }

    /// Takes the first `n` bytes held ahead as consumed here (not handed on).
    pub(crate) fn consume_ahead(&mut self, n: usize) {
        self.ahead.advance(n.min(self.ahead.len()));
        if self.ahead.is_empty() {
            self.ahead = BytesMut::new();
        }
    }

    /// Follows `data`, just read; how much of it to hand on (all, unless a text frame in it
    /// holds invalid UTF-8: then what comes before that frame, and the next read fails).
    fn watched(&mut self, data: &[u8]) -> usize {
        match self.watch.feed(data) {
            Ok(()) => data.len(),
            Err(invalid) => {
                self.spoiled = true;
                invalid.frame_start
            }
        }
    }

    /// Charges `read` bytes just read from the socket to the budget.
    fn charge(&mut self, read: u64) -> io::Result<()> {
        if read > 0 {
            let p = &mut self.partial;
            if !p.budget.take(read) {
                return Err(io::Error::other(BudgetExhausted));
            }
            if p.bytes == 0 {
                p.since = Some(Instant::now());
            }
            p.bytes += read;
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.spoiled && this.ahead.is_empty() {
            return Poll::Ready(Err(invalid_utf8()));
        }
        if !this.yielded && this.watch.fragments() >= YIELD_AFTER_FRAGMENTS {
            // Once: a reader that does not take the count (none but the session does) reads on.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if !this.ahead.is_empty() {
            let n = this.ahead.len().min(buf.remaining());
            buf.put_slice(&this.ahead[..n]);
            this.ahead.advance(n);
            if this.ahead.is_empty() {
                // Give the memory back: an idle connection holds none.
                this.ahead = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= READ_AHEAD {
            let before = buf.filled().len();
            let result = Pin::new(&mut this.inner).poll_read(cx, buf);
            this.charge((buf.filled().len() - before) as u64)?;
            let keep = this.watched(&buf.filled()[before..]);
            buf.set_filled(before + keep);
            if this.spoiled && keep == 0 {
                return Poll::Ready(Err(invalid_utf8()));
            }
            return result;
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut ahead = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut ahead) {
                Poll::Ready(Ok(())) => {
                    let data = ahead.filled();
                    this.charge(data.len() as u64)?;
                    let data = &data[..this.watched(data)];
                    if this.spoiled && data.is_empty() {
                        return Poll::Ready(Err(invalid_utf8()));
                    }
                    let n = data.len().min(buf.remaining());
                    buf.put_slice(&data[..n]);
                    if n < data.len() {
                        this.ahead = BytesMut::from(&data[n..]);
                    }
                    Poll::Ready(Ok(()))
                }
                other => other,
            }
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
