//! The accept loop, one hyper connection task per client (HTTP/1.1 or HTTP/2 on the same
//! port), and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
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

/// Completes TLS if configured, then serves HTTP.
async fn accept_connection(stream: TcpStream, peer: SocketAddr, slot: TcpSlot) {
    let ctx = Arc::clone(&slot.0);
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    // A socket that can move to the runtime of the plugin whose session it becomes.
    let stream = crate::ws::rebind::Rebind::new(stream);
    match &ctx.tls {
        None => serve_connection(stream, peer, local, ctx, slot).await,
        Some(acceptor) => {
            let handshake = acceptor.accept(stream);
            match tokio::time::timeout(ctx.config.header_read_timeout, handshake).await {
                Ok(Ok(tls)) => serve_connection(tls, peer, local, Arc::clone(&ctx), slot).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn serve_connection<I>(
    stream: I,
    peer: SocketAddr,
    local: SocketAddr,
    ctx: Arc<Ctx>,
    slot: TcpSlot,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_ctx = Arc::clone(&ctx);
    let service =
        service_fn(move |req| crate::http::handle(req, Arc::clone(&svc_ctx), peer, local));
    // HTTP/1.1 and HTTP/2 on the same connection type: hyper-util reads the preface (prior
    // knowledge without TLS; with TLS, ALPN offered `h2`).
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.config.header_read_timeout)
        .max_buf_size(ctx.config.max_header_size.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(ctx.config.http2_max_streams)
        .max_header_list_size(u32::try_from(ctx.config.max_header_size).unwrap_or(u32::MAX))
        // A client that opens and resets streams in a loop is cut off (CVE-2023-44487).
        .max_pending_accept_reset_streams(Some(64))
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(ctx.config.header_read_timeout);
    let builder = if ctx.config.http2_max_streams == 0 {
        builder.http1_only()
    } else {
        builder
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = ctx.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
    // An upgraded connection lives on as a session, counted by its `Admission` instead.
    drop(slot);
}
