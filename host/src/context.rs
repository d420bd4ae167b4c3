//! What every connection task shares ([`Ctx`]), and a WebSocket session's place under the
//! connection limits ([`Admission`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::plugin::registry::Registry;

/// What every connection task shares.
pub(crate) struct Ctx {
    pub(crate) config: Arc<Config>,
    pub(crate) registry: Arc<Registry>,
    /// Cancelled when the host shuts down.
    pub(crate) shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    /// TLS, if configured.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// Bytes queued for sending across all connections.
    pub(crate) send_budget: Arc<crate::budget::MemoryBudget>,
    /// Prometheus metrics.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    next_id: AtomicU64,
    /// Open TCP connections (HTTP or WebSocket).
    pub(crate) open_tcp: AtomicUsize,
    /// Open WebSocket sessions, in all and per client IP.
    pub(crate) sessions: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("tls", &self.tls.is_some())
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

/// A WebSocket session's place under the connection limits; given back when dropped.
#[derive(Debug)]
pub(crate) struct Admission {
    ctx: Arc<Ctx>,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.ctx.sessions.fetch_sub(1, Ordering::AcqRel);
        if self.ctx.config.max_connections_per_ip > 0 {
            let mut per_ip = self
                .ctx
                .per_ip
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
    }
}

impl Ctx {
    pub(crate) fn new(
        config: Config,
        registry: Arc<Registry>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        metrics: Arc<crate::metrics::Metrics>,
        send_budget: Arc<crate::budget::MemoryBudget>,
    ) -> Self {
        Self {
            metrics,
            send_budget,
            config: Arc::new(config),
            registry,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            tls,
            next_id: AtomicU64::new(1),
            open_tcp: AtomicUsize::new(0),
            sessions: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a place for a WebSocket session from `ip`, or the status that refuses it.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, hyper::StatusCode> {
        let before = self.sessions.fetch_add(1, Ordering::AcqRel);
        if before >= self.config.max_connections {
            self.sessions.fetch_sub(1, Ordering::AcqRel);
            return Err(hyper::StatusCode::SERVICE_UNAVAILABLE);
        }
        let cap = self.config.max_connections_per_ip;
        if cap > 0 {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= cap {
                drop(per_ip);
                self.sessions.fetch_sub(1, Ordering::AcqRel);
                return Err(hyper::StatusCode::TOO_MANY_REQUESTS);
            }
            *n += 1;
        }
        Ok(Admission {
            ctx: Arc::clone(self),
            ip,
        })
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}
