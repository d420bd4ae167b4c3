//! An open connection's WebSocket stream: tungstenite's protocol state over the session's
//! socket, polled with the session task's own context.
//!
//! tokio-tungstenite's `WebSocketStream` serves any number of tasks (a stream split between a
//! reader and a writer), so it puts two waker proxies between the socket and the tasks and
//! registers the caller's waker with both on every poll: four `AtomicWaker` registrations per
//! message read and flushed, and a wake-up through both proxies for every socket event. A
//! session is one task that polls its stream itself, so here each call hands the socket the
//! session's context directly: tungstenite's `WebSocketContext` does the protocol, and a
//! [`Bridge`] that lives for one call is its `Read + Write`.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tokio_tungstenite::tungstenite::Message;

/// The socket as `std::io` for the length of one call, with the context of the task making it:
/// `Pending` is `WouldBlock`, and the socket wakes that task when it is ready.
struct Bridge<'a, 'b, S> {
    io: &'a mut S,
    cx: &'a mut Context<'b>,
}

fn would_block() -> io::Error {
    io::ErrorKind::WouldBlock.into()
}

impl<S: AsyncRead + Unpin> Read for Bridge<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.io).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(would_block()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Write for Bridge<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(would_block()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.io).poll_flush(self.cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(would_block()),
        }
    }
}

/// `Pending` for tungstenite's `WouldBlock`, as tokio-tungstenite does.
fn cvt<T>(r: Result<T, WsError>) -> Poll<Result<T, WsError>> {
    match r {
        Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        other => Poll::Ready(other),
    }
}

/// A server's WebSocket over `S`, past the handshake; the same contract as tokio-tungstenite's
/// `Stream` and `Sink` for `WebSocketStream`, for one task.
pub(super) struct WsStream<S> {
    proto: WebSocketContext,
    io: S,
    /// A send was accepted without blocking; otherwise `poll_ready` flushes first.
    ready: bool,
    /// The stream returned its end or an error: it yields nothing more.
    ended: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    pub(super) fn new(io: S, config: WebSocketConfig) -> Self {
        Self {
            proto: WebSocketContext::new(Role::Server, Some(config)),
            io,
            ready: true,
            ended: false,
        }
    }

    fn bridge<'a, 'b>(io: &'a mut S, cx: &'a mut Context<'b>) -> Bridge<'a, 'b, S> {
        Bridge { io, cx }
    }

    /// The next message; `None` once the stream is over (after the close handshake, or the
    /// connection ended), and after an error.
    pub(super) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message, WsError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match std::task::ready!(cvt(self.proto.read(&mut Self::bridge(&mut self.io, cx)))) {
            Ok(m) => Poll::Ready(Some(Ok(m))),
            Err(e) => {
                self.ended = true;
                if matches!(e, WsError::AlreadyClosed | WsError::ConnectionClosed) {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(e)))
                }
            }
        }
    }

    /// Ready to take a message: what a blocked send left is flushed first.
    pub(super) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.ready {
            return Poll::Ready(Ok(()));
        }
        let r = std::task::ready!(cvt(self.proto.flush(&mut Self::bridge(&mut self.io, cx))));
        self.ready = true;
        Poll::Ready(r)
    }

    /// Takes a message (after `poll_ready`); it goes out at the next flush, or before if the
    /// write buffer fills.
    pub(super) fn start_send(&mut self, cx: &mut Context<'_>, msg: Message) -> Result<(), WsError> {
        match self.proto.write(&mut Self::bridge(&mut self.io, cx), msg) {
            Ok(()) => {
                self.ready = true;
                Ok(())
            }
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                // Taken and buffered; `poll_ready` flushes it before the next.
                self.ready = false;
                Ok(())
            }
            Err(e) => {
                self.ready = true;
                Err(e)
            }
        }
    }

    /// Flushes what was taken; `Ready(Ok)` once it is on the wire (or the close handshake
    /// just ended).
    pub(super) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let r = std::task::ready!(cvt(self.proto.flush(&mut Self::bridge(&mut self.io, cx))));
        self.ready = true;
        match r {
            Err(WsError::ConnectionClosed) => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}

impl<S> WsStream<S> {
    pub(super) fn get_ref(&self) -> &S {
        &self.io
    }

    pub(super) fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// The socket, and with it whatever tungstenite read and had not parsed yet is dropped:
    /// only for a stream at rest (see `Link::try_park`).
    pub(super) fn into_inner(self) -> S {
        self.io
    }
}
