//! The admin endpoint (loopback by default): `GET /status`, `POST /reload`, `GET /healthz`;
//! and the client side that `wshost status` and `wshost reload` use.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

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

/// Serves the admin endpoint until `shutdown` is cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    reloader: Reloader,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let (registry, reloader) = (Arc::clone(&registry), reloader.clone());
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                answer(
                    req,
                    Arc::clone(&registry),
                    Arc::clone(&metrics),
                    reloader.clone(),
                )
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "admin connection failed");
            }
        });
    }
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
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    reloader: Reloader,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/status") => json(StatusCode::OK, &registry.status()),
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

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The host could not be reached.
    #[error(
        "cannot reach the wshost admin endpoint at {addr}: {source} (is the host running \
             with --admin-listen {addr}?)"
    )]
    Connect {
        /// The admin address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("admin request to {addr} failed: {0}", addr = .1)]
    Http(hyper::Error, SocketAddr),
    /// The host answered with an error status.
    #[error("admin endpoint answered {0}: {1}")]
    Status(StatusCode, String),
    /// The answer was not the expected JSON.
    #[error("unexpected answer from the admin endpoint: {0}")]
    Json(#[from] serde_json::Error),
}

/// Sends `method path` to the admin endpoint at `addr` and decodes the JSON answer.
pub async fn request<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    method: Method,
    path: &str,
) -> Result<T, ClientError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Http(e, addr))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Http(e, addr))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http(e, addr))?
        .to_bytes();
    if !status.is_success() {
        return Err(ClientError::Status(
            status,
            String::from_utf8_lossy(&body).into_owned(),
        ));
    }
    Ok(serde_json::from_slice(&body)?)
}
