//! Routing of requests: WebSocket handshakes go to the plugin's `upgrade`, plain requests to its
//! `request`, by the longest matching route prefix; everything else is answered here.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::config::Config;
use crate::context::Ctx;
use crate::metrics::StatusLabel;
use crate::plugin::{Answer, Decision, LoadedPlugin, RequestMap};
use crate::proxy::client_ip;
use crate::ws::session;
use crate::ws::upgrade::{self, Handshake};

type Body = Full<Bytes>;

/// Answers one request of a client connection.
pub(crate) async fn handle(
    req: Request<Incoming>,
    ctx: Arc<Ctx>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let version = req.version();
    let protocol = req
        .extensions()
        .get::<hyper::ext::Protocol>()
        .map(|p| p.as_str().to_owned());
    let response = match upgrade::inspect(
        req.method(),
        req.version(),
        req.headers(),
        protocol.as_deref(),
    ) {
        Handshake::Plain => plain(req, &ctx, peer, local).await,
        Handshake::Invalid(status, why) => {
            let label = StatusLabel {
                status: status.as_u16(),
                protocol: label_protocol(version),
            };
            ctx.metrics.upgrades.get_or_create(&label).inc();
            tracing::debug!(%peer, path = req.uri().path(), %status, why, "handshake refused");
            let mut r = text(status, why);
            if status == StatusCode::UPGRADE_REQUIRED {
                r.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            r
        }
        Handshake::Valid {
            key,
            subprotocols,
            deflate,
        } => {
            let r = websocket(
                req,
                &ctx,
                peer,
                local,
                key.as_deref(),
                subprotocols,
                deflate,
            )
            .await;
            let label = StatusLabel {
                status: r.status().as_u16(),
                protocol: label_protocol(version),
            };
            ctx.metrics.upgrades.get_or_create(&label).inc();
            r
        }
    };
    Ok(response)
}

/// The `protocol` label of an upgrade's metrics.
fn label_protocol(version: hyper::Version) -> &'static str {
    if version == hyper::Version::HTTP_2 {
        "h2"
    } else {
        "http/1.1"
    }
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "no plugin serves this path")
}

fn internal_error() -> Response<Body> {
    text(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
}

/// The ring request map of `parts`.
#[allow(
    clippy::too_many_arguments,
    reason = "the parts of one request map, each from another layer"
)]
fn request_map(
    ctx: &Ctx,
    parts: &hyper::http::request::Parts,
    client: IpAddr,
    local: SocketAddr,
    is_upgrade: bool,
    route: &str,
    subprotocols: Vec<String>,
    body: Vec<u8>,
) -> RequestMap {
    let scheme = match (is_upgrade, ctx.tls.is_some()) {
        (true, false) => "ws",
        (true, true) => "wss",
        (false, false) => "http",
        (false, true) => "https",
    };
    // HTTP/2 carries the host in the `:authority` (the URI), HTTP/1.1 in `Host`.
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .map(strip_port)
        .unwrap_or_default();
    let server_name = if host.is_empty() {
        local.ip().to_string()
    } else {
        host.to_owned()
    };
    RequestMap {
        // A WebSocket over HTTP/2 is a CONNECT on the wire; to a plugin it is the same upgrade
        // as over HTTP/1.1 (its `protocol` says which).
        method: if is_upgrade {
            "GET".to_owned()
        } else {
            parts.method.as_str().to_owned()
        },
        protocol: match parts.version {
            hyper::Version::HTTP_2 => "HTTP/2.0",
            hyper::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }
        .into(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or("").to_owned(),
        scheme: scheme.into(),
        server_name,
        server_port: local.port(),
        remote_addr: client.to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        subprotocols,
        body,
        is_upgrade,
        route: route.to_owned(),
    }
}

/// Whether an upgrade's `Origin` passes the allow-list; `Err` says why not.
fn origin_allowed(config: &Config, headers: &hyper::HeaderMap) -> Result<(), &'static str> {
    match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        None if config.require_origin => Err("an Origin header is required"),
        None => Ok(()),
        Some(Err(_)) => Err("the Origin header is not valid"),
        Some(Ok(origin)) => {
            let ok = config.allowed_origins.is_empty()
                || config
                    .allowed_origins
                    .iter()
                    .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin));
            if ok {
                Ok(())
            } else {
                Err("this origin may not open WebSockets here")
            }
        }
    }
}

/// `host[:port]` → `host`, keeping bracketed IPv6 literals whole.
fn strip_port(host: &str) -> &str {
    if let Some(end) = host.find(']') {
        return &host[..=end];
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// A plain request: read the body (bounded in size and time), then ask the plugin.
async fn plain(
    req: Request<Incoming>,
    ctx: &Ctx,
    peer: SocketAddr,
    local: SocketAddr,
) -> Response<Body> {
    let table = ctx.registry.table();
    let Some((route, plugin)) = table.route_prefix(req.uri().path()) else {
        return not_found();
    };
    let (route, plugin) = (route.to_owned(), Arc::clone(plugin));
    let (parts, body) = req.into_parts();
    let limit = ctx.config.max_body_size;
    // A declared length past the limit is refused before the body is read, so a client that
    // sent `Expect: 100-continue` gets 413 instead of "100 Continue".
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        tracing::debug!(%peer, limit, declared, "request body too large (Content-Length)");
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body larger than {limit} bytes"),
        );
    }
    let read = tokio::time::timeout(ctx.config.body_timeout, Limited::new(body, limit).collect());
    let body = match read.await {
        Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "request body timed out"),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            tracing::debug!(%peer, limit, "request body too large");
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body larger than {limit} bytes"),
            );
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "request body unreadable");
            return text(StatusCode::BAD_REQUEST, "request body unreadable");
        }
        Ok(Ok(collected)) => collected.to_bytes().to_vec(),
    };
    let client = client_ip(peer.ip(), &parts.headers, &ctx.config.trusted_proxies);
    let map = request_map(ctx, &parts, client, local, false, &route, Vec::new(), body);
    match plugin.decide(map, ctx.config.decision_timeout).await {
        Decision::Answer(answer) => plain_response(answer, &plugin),
        other => undecided(
            other,
            &plugin,
            "request",
            parts.uri.path(),
            ctx.config.decision_timeout,
        ),
    }
}

/// The answer when a plugin gave none: it panicked (500), took too long (503), or dropped its
/// responder (500).
fn undecided(
    decision: Decision,
    plugin: &LoadedPlugin,
    call: &str,
    path: &str,
    timeout: std::time::Duration,
) -> Response<Body> {
    let (name, generation) = (&plugin.name, plugin.generation);
    match decision {
        Decision::Answer(_) => internal_error(),
        Decision::Panicked(panic) => {
            tracing::error!(plugin = %name, generation, %panic, path,
                "plugin {call} handler panicked; answered 500");
            internal_error()
        }
        Decision::TimedOut => {
            tracing::warn!(plugin = %name, generation, path, ?timeout, call,
                "plugin did not decide within --decision-timeout; answered 503");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server did not decide in time",
            )
        }
        Decision::Dropped => {
            tracing::error!(plugin = %name, generation, path, call,
                "plugin deferred a decision and dropped its responder; answered 500");
            internal_error()
        }
        Decision::Unavailable(why) => {
            tracing::warn!(plugin = %name, generation, path, call, %why, "answered 503");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the plugin is restarting; try again",
            )
        }
    }
}

/// A plugin's answer as an HTTP response (any status but 1xx).
fn plain_response(mut answer: Answer, loaded: &LoadedPlugin) -> Response<Body> {
    if let Some(handler) = answer.handler.take() {
        loaded.drop_there(handler);
    }
    let plugin = loaded.name.as_str();
    let status = match StatusCode::from_u16(answer.status) {
        Ok(s) if !s.is_informational() => s,
        _ => {
            tracing::error!(%plugin, status = answer.status,
                "plugin answered with a status that cannot end a request; answered 500");
            return internal_error();
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(answer.body)));
    *r.status_mut() = status;
    for (name, value) in &answer.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) if n != header::CONTENT_LENGTH && n != header::TRANSFER_ENCODING => {
                r.headers_mut().append(n, v);
            }
            _ => tracing::warn!(%plugin, header = %name, "plugin set an invalid header; ignored"),
        }
    }
    r
}

/// A valid WebSocket handshake: the plugin decides; on 101 the session starts.
async fn websocket(
    req: Request<Incoming>,
    ctx: &Arc<Ctx>,
    peer: SocketAddr,
    local: SocketAddr,
    key: Option<&str>,
    subprotocols: Vec<String>,
    deflate_offered: Option<u8>,
) -> Response<Body> {
    let table = ctx.registry.table();
    let Some((prefix, plugin)) = table.route_prefix(req.uri().path()) else {
        return not_found();
    };
    let (prefix, plugin) = (prefix.to_owned(), Arc::clone(plugin));
    let (parts, body) = req.into_parts();
    if let Err(why) = origin_allowed(&ctx.config, &parts.headers) {
        tracing::info!(%peer, path = parts.uri.path(), why, "upgrade refused: origin");
        return text(StatusCode::FORBIDDEN, why);
    }
    let client = client_ip(peer.ip(), &parts.headers, &ctx.config.trusted_proxies);
    let admission = match ctx.admit(client) {
        Ok(a) => a,
        Err(status) => {
            tracing::warn!(%client, %status, "upgrade refused: connection limit");
            let why = if status == StatusCode::TOO_MANY_REQUESTS {
                "too many connections from this address"
            } else {
                "server at its connection limit"
            };
            return text(status, why);
        }
    };
    let offered = subprotocols.clone();
    let map = request_map(
        ctx,
        &parts,
        client,
        local,
        true,
        &prefix,
        subprotocols,
        Vec::new(),
    );
    let timeout = ctx.config.decision_timeout;
    let mut answer = match plugin.decide(map, timeout).await {
        Decision::Answer(a) => a,
        other => return undecided(other, &plugin, "upgrade", parts.uri.path(), timeout),
    };
    if answer.status != 101 {
        return plain_response(answer, &plugin);
    }
    let Some(handler) = answer.handler.take() else {
        tracing::error!(plugin = %plugin.name, "plugin answered 101 without callbacks; answered 500");
        return internal_error();
    };
    // The plugin's own 101 settings, then its route's and its own config file limits.
    let route_limits = plugin
        .route_limits
        .get(&prefix)
        .copied()
        .unwrap_or_default();
    let limits = answer.limits.over(route_limits).over(plugin.limits);
    // permessage-deflate if the client offered it and no source turned it off.
    let deflate =
        deflate_offered.filter(|_| limits.over(ctx.config.limits).compression == Some(true));
    let response = match upgrade::switching_protocols(key, &offered, &answer.headers, deflate) {
        Ok(r) => r,
        Err(refusal) => {
            tracing::error!(plugin = %plugin.name, ?refusal, ?offered,
                "plugin's 101 is not a valid handshake answer; answered 500");
            plugin.drop_there(handler);
            return internal_error();
        }
    };
    let id = ctx.next_conn_id();
    let remote = if client == peer.ip() {
        peer.to_string()
    } else {
        client.to_string()
    };
    let closing = plugin.closing().clone();
    let facts = crate::plugin::ConnFacts {
        local: local.to_string().into(),
        secure: ctx.tls.is_some(),
        path: parts.uri.path().into(),
        query: parts.uri.query().unwrap_or("").into(),
        headers: answer
            .kept_headers
            .iter()
            .flat_map(|name| {
                parts
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .map(move |v| (name.clone(), v.to_owned()))
            })
            .collect(),
    };
    let start = session::Start {
        id,
        remote,
        admission,
        plugin,
        handler,
        facts,
        limits,
        deflate,
        hub: Arc::clone(ctx.registry.hub()),
        budget: Arc::clone(&ctx.send_budget),
        metrics: Arc::clone(&ctx.metrics),
        // Fires on shutdown, or when a replaced generation's grace ends.
        shutdown: closing,
    };
    // Only the upgrade's handle goes into the task, not the request: what a task captures stays
    // in its memory for the life of the connection.
    let on_upgrade = hyper::upgrade::on(Request::from_parts(parts, body));
    // The session runs on the plugin's own runtime: its callbacks never hold up the threads
    // that serve other plugins.
    let exec = start.plugin.executor().map(|e| e.handle().clone());
    let session =
        ctx.tracker
            .track_future(session::run(on_upgrade, start, Arc::clone(&ctx.config)));
    match exec {
        Some(handle) => drop(handle.spawn(session)),
        None => drop(tokio::spawn(session)),
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_port_is_stripped() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
