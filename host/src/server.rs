//! The accept loop, one hyper connection task per client (HTTP/1.1 or HTTP/2 on the same
//! port), and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::context::Ctx;

/// A TCP connection's place under the accept-level cap; given back when dropped.
struct TcpSlot(Arc<Ctx>);

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.0.open_tcp.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connections in their HTTP phase allowed beyond `max_connections`, so that upgrades past the
/// limit can still be answered with 503 instead of being dropped.
const HTTP_HEADROOM: usize = 256;

/// Accepts clients until `shutdown` resolves, then closes every connection with 1001 and waits
/// for them up to the configured shutdown timeout.
pub(crate) async fn run(ctx: Arc<Ctx>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let open = ctx.open_tcp.fetch_add(1, Ordering::AcqRel)
                        + ctx.sessions.load(Ordering::Acquire);
                    let slot = TcpSlot(Arc::clone(&ctx));
                    if open >= ctx.config.max_connections + HTTP_HEADROOM {
                        tracing::debug!(%peer, open, "too many connections; dropped at accept");
                        drop((stream, slot));
                        continue;
                    }
                    ctx.tracker.spawn(accept_connection(stream, peer, slot));
                }
                Err(e) => accept_error(&e).await,
            }
        }
    }
    drop(listener);
    let open = ctx.tracker.len();
    tracing::info!(open, "shutting down: closing connections with 1001");
    ctx.shutdown.cancel();
    // Sessions watch their generation's token, a child of the registry's.
    ctx.registry.close_all();
    ctx.tracker.close();
    // One deadline for all of it: connections, then plugin shutdowns. A plugin that never
    // returns (a callback that spins) holds up neither: the process exits at the deadline.
    let deadline = tokio::time::Instant::now() + ctx.config.shutdown_timeout;
    if tokio::time::timeout_at(deadline, ctx.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = ctx.tracker.len(),
            "shutdown timeout passed; dropping the remaining connections"
        );
    }
    // Plugin shutdowns run plugin code: on retirement threads, waited for off this one.
    let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
    let registry = Arc::clone(&ctx.registry);
    let _ = tokio::task::spawn_blocking(move || registry.shutdown_all(timeout)).await;
    tracing::info!("stopped");
}

/// Errors of `accept` are about one client, or about this process running out of descriptors;
/// in the second case, back off instead of spinning.
pub(crate) async fn accept_error(e: &std::io::Error) {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    if matches!(e.raw_os_error(), Some(EMFILE | ENFILE)) {
        tracing::warn!(error = %e, "out of file descriptors; pausing accept for 100 ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        tracing::debug!(error = %e, "accept failed");
    }
}

/// Completes TLS if configured, then serves HTTP/1.1 or HTTP/2: by ALPN with TLS, by the
/// client's first bytes (the HTTP/2 preface) without.
async fn accept_connection(stream: TcpStream, peer: SocketAddr, slot: TcpSlot) {
    let ctx = Arc::clone(&slot.0);
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let http2 = ctx.config.http2_max_streams > 0;
    match &ctx.tls {
        None => {
            let h2 = if http2 {
                match starts_with_h2_preface(&stream, ctx.config.header_read_timeout).await {
                    Some(h2) => h2,
                    None => {
                        tracing::debug!(%peer, "no request within the header read timeout");
                        return;
                    }
                }
            } else {
                false
            };
            // A socket that can move to the runtime of the plugin whose session it becomes.
            let stream = crate::ws::rebind::Rebind::new(stream);
            serve_connection(stream, peer, local, ctx, slot, h2).await;
        }
        Some(acceptor) => {
            let stream = crate::ws::rebind::Rebind::new(stream);
            let handshake = acceptor.accept(stream);
            match tokio::time::timeout(ctx.config.header_read_timeout, handshake).await {
                Ok(Ok(tls)) => {
                    let h2 = http2 && tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    serve_connection(tls, peer, local, Arc::clone(&ctx), slot, h2).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

/// Whether the client's first bytes are the HTTP/2 connection preface (`PRI * HTTP/2.0`), read
/// without consuming them; `None` if nothing came within `within` (the header read timeout).
/// (hyper-util's automatic detection would wrap the socket in a type of its own, and an
/// upgraded HTTP/1.1 socket could no longer move to its plugin's runtime.)
async fn starts_with_h2_preface(stream: &TcpStream, within: Duration) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI ";
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Some(false),
            Err(_) => return None,
        };
        if n == 0 || !PREFACE.starts_with(&buf[..n]) {
            return Some(false);
        }
        if n == PREFACE.len() {
            return Some(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        // A client that sent the first bytes of the preface only: wait for the rest.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Drives hyper connection `$conn` to its end; at shutdown, gracefully (the HTTP/1.1 and HTTP/2
/// connections share no trait for it).
macro_rules! until_shutdown {
    ($conn:ident, $ctx:ident) => {{
        tokio::pin!($conn);
        tokio::select! {
            r = $conn.as_mut() => r,
            () = $ctx.shutdown.cancelled() => {
                $conn.as_mut().graceful_shutdown();
                $conn.await
            }
        }
    }};
}

async fn serve_connection<I>(
    stream: I,
    peer: SocketAddr,
    local: SocketAddr,
    ctx: Arc<Ctx>,
    slot: TcpSlot,
    h2: bool,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_ctx = Arc::clone(&ctx);
    let service =
        service_fn(move |req| crate::http::handle(req, Arc::clone(&svc_ctx), peer, local));
    let result = if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .enable_connect_protocol()
            .max_concurrent_streams(ctx.config.http2_max_streams)
            .max_header_list_size(u32::try_from(ctx.config.max_header_size).unwrap_or(u32::MAX))
            // Against clients that open and reset streams in a loop (CVE-2023-44487).
            .max_pending_accept_reset_streams(Some(64))
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(ctx.config.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        until_shutdown!(conn, ctx)
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(ctx.config.header_read_timeout)
            .max_buf_size(ctx.config.max_header_size.max(8192))
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        until_shutdown!(conn, ctx)
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
    // An upgraded connection lives on as a session, counted by its `Admission` instead.
    drop(slot);
}
