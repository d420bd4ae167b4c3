//! The admin endpoint (loopback by default): `GET /status`, `POST /reload`, `GET /healthz`;
//! and the client side that `wshost status` and `wshost reload` use.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::plugin::registry::Registry;
use crate::plugin::watcher::Reloader;

/// The admin endpoint's default address: loopback only.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:8181";

/// Most admin connections at once: one local user cannot hold the host's descriptors.
pub const MAX_ADMIN_CONNECTIONS: usize = 32;

/// Where the admin endpoint listens.
#[derive(Debug)]
pub enum AdminListener {
    /// A TCP address (loopback by default).
    Tcp(TcpListener),
    /// A Unix socket (mode 0600: only the host's user can connect).
    Unix(tokio::net::UnixListener),
}

/// How the admin endpoint guards itself.
#[derive(Debug, Clone, Default)]
pub struct AdminGuard {
    /// A request must carry `Authorization: Bearer TOKEN` (except `/healthz`, `/readyz`).
    pub token: Option<String>,
    /// How long a client may take to send its request head.
    pub header_read_timeout: std::time::Duration,
}

/// Serves the admin endpoint until `shutdown` is cancelled: at most
/// [`MAX_ADMIN_CONNECTIONS`] connections (more are closed at once), the main listener's
/// header-read timeout, a pause on running out of descriptors.
pub(crate) async fn serve(
    listener: AdminListener,
    guard: AdminGuard,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    reloader: Reloader,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let guard = Arc::new(guard);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = accept(&listener) => accepted,
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                crate::server::accept_error(&e).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(
                max = MAX_ADMIN_CONNECTIONS,
                "admin endpoint at its connection limit; connection closed"
            );
            continue;
        };
        let (registry, reloader) = (Arc::clone(&registry), reloader.clone());
        let (metrics, guard) = (Arc::clone(&metrics), Arc::clone(&guard));
        let timeout = guard.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                answer(
                    req,
                    Arc::clone(&guard),
                    Arc::clone(&registry),
                    Arc::clone(&metrics),
                    reloader.clone(),
                )
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(stream, service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection failed");
            }
        });
    }
}

/// An admin connection, TCP or Unix.
type AdminStream = TokioIo<Box<dyn AdminIo>>;

trait AdminIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AdminIo for T {}

async fn accept(listener: &AdminListener) -> std::io::Result<AdminStream> {
    Ok(match listener {
        AdminListener::Tcp(l) => TokioIo::new(Box::new(l.accept().await?.0) as Box<dyn AdminIo>),
        AdminListener::Unix(l) => TokioIo::new(Box::new(l.accept().await?.0) as Box<dyn AdminIo>),
    })
}

/// Whether a `Host` header names this machine's loopback (DNS rebinding sends another name).
fn loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a request to the admin endpoint is refused, if it is.
fn refusal(req: &Request<Incoming>, guard: &AdminGuard) -> Option<(StatusCode, &'static str)> {
    if req.headers().contains_key(hyper::header::ORIGIN) {
        // Browsers send Origin on cross-site requests (a form POST to /reload); the CLI never.
        return Some((StatusCode::FORBIDDEN, "requests from web pages are refused"));
    }
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok());
    if host.is_some_and(|h| !loopback_host(h)) {
        return Some((
            StatusCode::FORBIDDEN,
            "the Host header must name a loopback address",
        ));
    }
    let open = matches!(req.uri().path(), "/healthz" | "/readyz");
    if let (Some(token), false) = (&guard.token, open) {
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given.is_none_or(|g| !constant_time_eq(g.trim().as_bytes(), token.as_bytes())) {
            return Some((StatusCode::UNAUTHORIZED, "a bearer token is required"));
        }
    }
    None
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let text = serde_json::to_vec_pretty(body).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn answer(
    req: Request<Incoming>,
    guard: Arc<AdminGuard>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    reloader: Reloader,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some((status, why)) = refusal(&req, &guard) {
        tracing::warn!(%status, why, path = req.uri().path(), "admin request refused");
        return Ok(json(status, &why));
    }
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/status") => json(StatusCode::OK, &Status::of(&registry)),
        (&Method::POST, "/reload") => match reloader.reload().await {
            Some(report) => json(StatusCode::OK, &report),
            None => json(StatusCode::SERVICE_UNAVAILABLE, &"shutting down"),
        },
        (&Method::GET, "/healthz") => json(StatusCode::OK, &"ok"),
        (&Method::GET, "/readyz") => {
            // Ready once at least one plugin serves; the first load happens before serving.
            if registry.table().plugins().next().is_some() {
                json(StatusCode::OK, &"ready")
            } else {
                json(StatusCode::SERVICE_UNAVAILABLE, &"no plugin loaded")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(metrics.encode())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => json(StatusCode::NOT_FOUND, &"unknown admin path"),
    })
}

/// Where a client reaches the admin endpoint: `127.0.0.1:8181`, `http://127.0.0.1:8181/`
/// (the form the host prints), or `unix:/path/to/socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    /// `host:port`.
    Tcp(String),
    /// A Unix socket.
    Unix(PathBuf),
}

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddr::Tcp(a) => write!(f, "http://{a}"),
            AdminAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for AdminAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(AdminAddr::Unix(PathBuf::from(path)));
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
        let valid = hostport
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !valid || hostport.contains('/') {
            return Err(format!(
                "`{s}`: expected HOST:PORT, http://HOST:PORT or unix:PATH"
            ));
        }
        Ok(AdminAddr::Tcp(hostport.to_owned()))
    }
}

/// The file where a running host writes its admin address, and where `wshost status` and
/// `wshost reload` look when given none: `$WSHOST_RUNTIME_DIR/admin`, else
/// `$XDG_RUNTIME_DIR/wshost/admin`, else `/tmp/wshost-UID/admin`.
pub fn runtime_file() -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let dir = std::env::var_os("WSHOST_RUNTIME_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("wshost")))
        .unwrap_or_else(|| {
            let uid = std::fs::metadata("/proc/self").map_or(0, |m| m.uid());
            std::env::temp_dir().join(format!("wshost-{uid}"))
        });
    dir.join("admin")
}

/// Writes `addr` to [`runtime_file`] (its folder private to this user); returns the file.
pub fn write_runtime_file(addr: &AdminAddr) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    let file = runtime_file();
    if let Some(dir) = file.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, &file)?;
    Ok(file)
}

/// Removes [`runtime_file`] if it still names `addr` (another host may have written it since).
pub fn remove_runtime_file(addr: &AdminAddr) {
    let file = runtime_file();
    if std::fs::read_to_string(&file).is_ok_and(|t| t.trim() == addr.to_string()) {
        let _ = std::fs::remove_file(file);
    }
}

/// The admin address a client uses when given none: the one a running host wrote to
/// [`runtime_file`], else the default `127.0.0.1:8181`.
pub fn default_client_addr() -> AdminAddr {
    std::fs::read_to_string(runtime_file())
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| AdminAddr::Tcp(DEFAULT_ADMIN.to_owned()))
}

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The host could not be reached.
    #[error(
        "cannot reach the wshost admin endpoint at {addr}: {source} (is the host running \
         with --admin-listen {addr}? pass --admin ADDR to name another)"
    )]
    Connect {
        /// The admin address.
        addr: AdminAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("admin request to {addr} failed: {0}", addr = .1)]
    Http(hyper::Error, AdminAddr),
    /// No answer in time.
    #[error(
        "no answer from the wshost admin endpoint at {addr} within {after:?} (the host is \
             stalled or overloaded, or something else listens there); --timeout sets the wait"
    )]
    Timeout {
        /// The admin address.
        addr: AdminAddr,
        /// How long the client waited.
        after: Duration,
    },
    /// The host answered with an error status.
    #[error("admin endpoint answered {0}: {1}")]
    Status(StatusCode, String),
    /// The answer was not the expected JSON.
    #[error("unexpected answer from the admin endpoint: {0}")]
    Json(#[from] serde_json::Error),
}

/// Sends `method path` to the admin endpoint at `addr` (with `token` as a bearer token) and
/// decodes the JSON answer; gives up after `timeout`.
pub async fn request<T: serde::de::DeserializeOwned>(
    addr: &AdminAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<T, ClientError> {
    tokio::time::timeout(timeout, exchange(addr, method, path, token))
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Timeout {
                addr: addr.clone(),
                after: timeout,
            })
        })
}

async fn exchange<T: serde::de::DeserializeOwned>(
    addr: &AdminAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> Result<T, ClientError> {
    let connect_error = |source| ClientError::Connect {
        addr: addr.clone(),
        source,
    };
    let stream: Box<dyn AdminIo> = match addr {
        AdminAddr::Tcp(a) => Box::new(
            tokio::net::TcpStream::connect(a.as_str())
                .await
                .map_err(connect_error)?,
        ),
        AdminAddr::Unix(p) => Box::new(
            tokio::net::UnixStream::connect(p)
                .await
                .map_err(connect_error)?,
        ),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Http(e, addr.clone()))?;
    tokio::spawn(conn);
    let host = match addr {
        AdminAddr::Tcp(a) => a.clone(),
        AdminAddr::Unix(_) => "localhost".to_owned(),
    };
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host);
    if let Some(token) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(Full::new(Bytes::new())).expect("a valid request");
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Http(e, addr.clone()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http(e, addr.clone()))?
        .to_bytes();
    if !status.is_success() {
        return Err(ClientError::Status(
            status,
            String::from_utf8_lossy(&body).into_owned(),
        ));
    }
    Ok(serde_json::from_slice(&body)?)
}

/// One generation of a plugin, as `wshost status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GenerationStatus {
    /// The generation number.
    pub generation: u64,
    /// The plugin's version in this generation.
    pub version: String,
    /// Whether new connections go to it.
    pub current: bool,
    /// Connections open on it.
    pub open_connections: u64,
}

/// A plugin, as `wshost status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PluginStatus {
    /// The plugin's name.
    pub name: String,
    /// The current generation's version.
    pub version: String,
    /// The file it was loaded from.
    pub file: String,
    /// Its routes.
    pub routes: Vec<String>,
    /// The plugin-api version it was built against.
    pub plugin_api: String,
    /// Generations with open connections, and the current one.
    pub generations: Vec<GenerationStatus>,
}

/// The host's plugins, as `/status` answers and `wshost status` shows them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// The host's version.
    pub host_version: String,
    /// The plugin interface version the host speaks.
    pub plugin_api: String,
    /// The plugins being served.
    pub plugins: Vec<PluginStatus>,
    /// Libraries mapped into the process (never unmapped), including replaced generations.
    pub mapped_libraries: u64,
    /// Replaced generations still serving connections.
    pub old_generations_serving: u64,
}

impl Status {
    /// The registry's plugins now: each plugin being served with its generations (replaced
    /// ones still alive included).
    pub fn of(registry: &Registry) -> Self {
        let all = registry.generations();
        let plugins = all
            .iter()
            .filter(|g| g.current)
            .map(|p| PluginStatus {
                name: p.name.clone(),
                version: p.version.clone(),
                file: p.file.display().to_string(),
                routes: p.routes.clone(),
                plugin_api: p.api_version.clone(),
                generations: all
                    .iter()
                    .filter(|g| g.name == p.name)
                    .map(|g| GenerationStatus {
                        generation: g.generation,
                        version: g.version.clone(),
                        current: g.current,
                        open_connections: g.open_connections,
                    })
                    .collect(),
            })
            .collect();
        Status {
            host_version: env!("CARGO_PKG_VERSION").to_owned(),
            plugin_api: plugin_api::API_VERSION.to_owned(),
            plugins,
            mapped_libraries: crate::plugin::mapped_libraries(),
            old_generations_serving: all.iter().filter(|g| !g.current).count() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_parse() {
        let tcp = |s: &str| AdminAddr::Tcp(s.to_owned());
        assert_eq!("127.0.0.1:8181".parse(), Ok(tcp("127.0.0.1:8181")));
        assert_eq!("http://127.0.0.1:9/".parse(), Ok(tcp("127.0.0.1:9")));
        assert_eq!("localhost:9".parse(), Ok(tcp("localhost:9")));
        assert_eq!(
            "unix:/run/w.sock".parse(),
            Ok(AdminAddr::Unix("/run/w.sock".into()))
        );
        assert!("127.0.0.1".parse::<AdminAddr>().is_err());
        assert!("http://h:1/x".parse::<AdminAddr>().is_err());
    }

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "localhost:8181",
            "127.0.0.1:1",
            "[::1]:80",
            "[::1]",
            "127.1.2.3",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example.com",
            "evil.example.com:8181",
            "10.0.0.1:80",
            "[::2]",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }
}
