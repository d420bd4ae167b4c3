//! The accept loop, one hyper HTTP/1.1 connection task per client, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::plugin::registry::Registry;

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) config: Config,
    pub(crate) registry: Arc<Registry>,
    /// Cancelled when the host shuts down.
    pub(crate) shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    next_id: AtomicU64,
}

impl Ctx {
    pub(crate) fn new(config: Config, registry: Arc<Registry>) -> Self {
        Self {
            config,
            registry,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            next_id: AtomicU64::new(1),
        }
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Accepts clients until `shutdown` resolves, then closes every connection with 1001 and waits
/// for them up to the configured shutdown timeout.
pub(crate) async fn run(ctx: Arc<Ctx>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let ctx2 = Arc::clone(&ctx);
                    ctx.tracker.spawn(serve_connection(stream, peer, ctx2));
                }
                Err(e) => accept_error(&e).await,
            }
        }
    }
    drop(listener);
    let open = ctx.tracker.len();
    tracing::info!(open, "shutting down: closing connections with 1001");
    ctx.shutdown.cancel();
    ctx.tracker.close();
    if tokio::time::timeout(ctx.config.shutdown_timeout, ctx.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = ctx.tracker.len(),
            "shutdown timeout passed; dropping the remaining connections"
        );
    }
    ctx.registry.shutdown_all();
    tracing::info!("stopped");
}

/// Errors of `accept` are about one client, or about this process running out of descriptors;
/// in the second case, back off instead of spinning.
async fn accept_error(e: &std::io::Error) {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    if matches!(e.raw_os_error(), Some(EMFILE | ENFILE)) {
        tracing::warn!(error = %e, "out of file descriptors; pausing accept for 100 ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        tracing::debug!(error = %e, "accept failed");
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, ctx: Arc<Ctx>) {
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let svc_ctx = Arc::clone(&ctx);
    let service =
        service_fn(move |req| crate::http::handle(req, Arc::clone(&svc_ctx), peer, local));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.config.header_read_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
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
}
