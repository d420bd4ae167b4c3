//! Sockets that move: a connection is accepted on the host's runtime, and once upgraded its
//! session runs on its plugin's runtime; the socket moves with it (deregistered from one I/O
//! driver, registered with the other), so that its readiness events reach the plugin's workers
//! directly, and the host's threads never run anything of the plugin's.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream that can be registered again with the current runtime's I/O driver.
#[derive(Debug)]
pub(crate) struct Rebind {
    /// Always present, but for the moment of a move.
    inner: Option<TcpStream>,
}

impl Rebind {
    pub(crate) fn new(stream: TcpStream) -> Self {
        Self {
            inner: Some(stream),
        }
    }

    /// Moves the socket to the I/O driver of the runtime this runs on.
    fn rebind(&mut self) -> io::Result<()> {
        let stream = self
            .inner
            .take()
            .ok_or_else(|| io::Error::other("socket lost in a move"))?;
        self.inner = Some(TcpStream::from_std(stream.into_std()?)?);
        Ok(())
    }

    fn stream(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.inner
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::other("socket lost in a move"))
    }
}

macro_rules! ready_io {
    ($e:expr) => {
        match $e {
            Ok(s) => s,
            Err(e) => return Poll::Ready(Err(e)),
        }
    };
}

impl AsyncRead for Rebind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready_io!(self.stream()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rebind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready_io!(self.stream()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready_io!(self.stream()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready_io!(self.stream()).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready_io!(self.stream()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

/// The socket of a session, on the plugin's runtime.
#[derive(Debug)]
pub(crate) enum SessionIo {
    /// Plain TCP, moved to this runtime.
    Tcp(Rebind),
    /// TLS over TCP, the TCP part moved to this runtime.
    Tls(Box<tokio_rustls::server::TlsStream<Rebind>>),
    /// Anything else, left where it is (an HTTP/2 stream). Boxed: every connection's socket,
    /// parked or open, keeps room for the largest kind.
    Other(Box<TokioIo<Upgraded>>),
    /// One end of an in-memory pipe (in-process session tests).
    #[cfg(test)]
    Test(tokio::io::DuplexStream),
}

impl SessionIo {
    /// Takes the socket out of hyper's upgrade and moves it to the current runtime; also
    /// returns the bytes hyper read past the handshake.
    pub(crate) fn take(upgraded: Upgraded) -> (Self, bytes::Bytes) {
        let upgraded = match upgraded.downcast::<TokioIo<Rebind>>() {
            Ok(parts) => {
                let mut io = parts.io.into_inner();
                return match io.rebind() {
                    Ok(()) => (SessionIo::Tcp(io), parts.read_buf),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot move the socket; it stays put");
                        (SessionIo::Tcp(io), parts.read_buf)
                    }
                };
            }
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<tokio_rustls::server::TlsStream<Rebind>>>() {
            Ok(parts) => {
                let mut tls = parts.io.into_inner();
                if let Err(e) = tls.get_mut().0.rebind() {
                    tracing::debug!(error = %e, "cannot move the socket; it stays put");
                }
                (SessionIo::Tls(Box::new(tls)), parts.read_buf)
            }
            Err(upgraded) => {
                tracing::debug!("unknown socket type; it stays on the host's runtime");
                (
                    SessionIo::Other(Box::new(TokioIo::new(upgraded))),
                    bytes::Bytes::new(),
                )
            }
        }
    }
}

impl AsyncRead for SessionIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            SessionIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            SessionIo::Other(s) => Pin::new(&mut **s).poll_read(cx, buf),
            #[cfg(test)]
            SessionIo::Test(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SessionIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            SessionIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            SessionIo::Other(s) => Pin::new(&mut **s).poll_write(cx, buf),
            #[cfg(test)]
            SessionIo::Test(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            SessionIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            SessionIo::Other(s) => Pin::new(&mut **s).poll_flush(cx),
            #[cfg(test)]
            SessionIo::Test(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            SessionIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            SessionIo::Other(s) => Pin::new(&mut **s).poll_shutdown(cx),
            #[cfg(test)]
            SessionIo::Test(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SessionIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            SessionIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            SessionIo::Other(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
            #[cfg(test)]
            SessionIo::Test(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            SessionIo::Tcp(s) => s.is_write_vectored(),
            SessionIo::Tls(s) => s.is_write_vectored(),
            SessionIo::Other(s) => s.is_write_vectored(),
            #[cfg(test)]
            SessionIo::Test(s) => s.is_write_vectored(),
        }
    }
}
