//! WebSockets over HTTP/2 (RFC 8441): several on one connection, beside plain requests, on the
//! same port as HTTP/1.1, with TLS (ALPN `h2`) and without (prior knowledge).

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http2;
use hyper::{Method, Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::harness::{ask, connect, Host, PATIENCE};

type H2 = http2::SendRequest<Empty<Bytes>>;
type H2Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// An HTTP/2 connection by prior knowledge.
pub(crate) async fn h2(addr: SocketAddr) -> H2 {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .expect("the server speaks HTTP/2");
    tokio::spawn(conn);
    send
}

/// Opens a WebSocket on `send`'s connection (extended CONNECT); the answer's headers too.
pub(crate) async fn open(send: &mut H2, addr: SocketAddr, path: &str) -> (H2Ws, hyper::HeaderMap) {
    let req = Request::builder()
        .method(Method::CONNECT)
        .version(Version::HTTP_2)
        .uri(format!("http://{addr}{path}"))
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    send.ready().await.unwrap();
    let resp = tokio::time::timeout(PATIENCE, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{path}");
    let headers = resp.headers().clone();
    let upgraded = hyper::upgrade::on(resp).await.expect("the stream is ours");
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    (ws, headers)
}

pub(crate) async fn ask2(ws: &mut H2Ws, msg: &str) -> String {
    ws.send(Message::text(msg)).await.unwrap();
    loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => return t.as_str().to_owned(),
            Some(Ok(_)) => continue,
            other => panic!("no answer: {other:?}"),
        }
    }
}

#[tokio::test]
async fn several_websockets_share_one_http2_connection_with_plain_requests() {
    let host = Host::builder().plugin("echo").plugin("testkit").start();
    let mut send = h2(host.addr).await;
    let (mut a, _) = open(&mut send, host.addr, "/echo").await;
    let (mut b, _) = open(&mut send, host.addr, "/echo").await;
    let (mut kit, headers) = open(&mut send, host.addr, "/testkit").await;
    // The plugin saw the same request map as over HTTP/1.1, with its protocol.
    assert_eq!(headers["x-request"], "GET HTTP/2.0");
    assert_eq!(ask2(&mut a, "one").await, "one");
    assert_eq!(ask2(&mut b, "two").await, "two");
    assert!(ask2(&mut kit, "info").await.starts_with("id="));
    // A plain request on the same connection, between the WebSockets' messages.
    let req = Request::builder()
        .uri(format!("http://{}/testkit/info", host.addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("protocol=HTTP/2.0"),
        "{body:?}"
    );
    // A large message crosses as HTTP/2 DATA frames.
    let big = "x".repeat(200_000);
    assert_eq!(ask2(&mut a, &big).await.len(), 200_000);
    // Closing one stream leaves the others open.
    b.close(None).await.unwrap();
    assert_eq!(ask2(&mut a, "still").await, "still");
    // HTTP/1.1 on the same port is unchanged.
    let mut h1 = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut h1, "h1").await, "h1");
    assert!(
        host.metric("wshost_connections_open{plugin=\"echo\",generation=\"1\"}")
            .unwrap_or(0.0)
            >= 2.0
    );
}

#[tokio::test]
async fn http2_websockets_keep_the_limits_and_the_caps() {
    let host = Host::builder()
        .plugin("echo")
        .args(&[
            "--max-message-size",
            "1000",
            "--max-connections-per-ip",
            "2",
        ])
        .start();
    let mut send = h2(host.addr).await;
    let (mut a, _) = open(&mut send, host.addr, "/echo").await;
    let (_b, _) = open(&mut send, host.addr, "/echo").await;
    // The per-address cap counts streams: the third is refused with 429.
    let req = Request::builder()
        .method(Method::CONNECT)
        .version(Version::HTTP_2)
        .uri(format!("http://{}/echo", host.addr))
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    send.ready().await.unwrap();
    let third = send.send_request(req).await.unwrap();
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    // The message limit closes the stream's WebSocket with 1009.
    a.send(Message::binary(vec![0u8; 5000])).await.unwrap();
    let close = loop {
        match tokio::time::timeout(PATIENCE, a.next()).await.unwrap() {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(close, Some(1009));
}

#[tokio::test]
async fn with_tls_http2_is_chosen_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, cert_path, key_path) = crate::harness::self_signed(dir.path());
    let host = Host::builder()
        .plugin("echo")
        .tls(&cert_path, &key_path)
        .start();
    let connector = crate::harness::tls_connector(&cert, &[b"h2", b"http/1.1"]);
    let tls = crate::harness::tls_to(&connector, host.addr).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (mut ws, _) = open(&mut send, host.addr, "/echo").await;
    assert_eq!(ask2(&mut ws, "over h2 and tls").await, "over h2 and tls");
}

#[tokio::test]
async fn http2_can_be_turned_off() {
    let host = Host::builder()
        .plugin("echo")
        .args(&["--http2-max-streams", "0"])
        .start();
    let tcp = tokio::net::TcpStream::connect(host.addr).await.unwrap();
    let refused = http2::handshake::<_, _, Empty<Bytes>>(TokioExecutor::new(), TokioIo::new(tcp));
    let result = tokio::time::timeout(PATIENCE, async {
        let (mut send, conn) = refused.await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .uri(format!("http://{}/echo", host.addr))
            .body(Empty::<Bytes>::new())
            .unwrap();
        send.send_request(req).await.map(|r| r.status())
    })
    .await
    .expect("the host answers or closes");
    assert!(result.is_err(), "HTTP/2 was served: {result:?}");
    let mut h1 = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut h1, "h1 only").await, "h1 only");
}

#[tokio::test]
async fn http2_websockets_reach_a_process_isolated_plugin() {
    let host = Host::builder()
        .plugin("echo")
        .args(&["--isolation", "process"])
        .start();
    let mut send = h2(host.addr).await;
    let (mut a, _) = open(&mut send, host.addr, "/echo").await;
    let (mut b, _) = open(&mut send, host.addr, "/echo").await;
    assert_eq!(ask2(&mut a, "a").await, "a");
    assert_eq!(ask2(&mut b, "b").await, "b");
    assert_eq!(
        host.metric("wshost_upgrades_total{status=\"200\",protocol=\"h2\"}"),
        Some(2.0)
    );
}

#[tokio::test]
async fn http1_sockets_still_move_to_their_plugin_s_runtime() {
    // Serving HTTP/2 on the same port must not wrap HTTP/1.1 sockets in a type the session
    // cannot take over: only HTTP/2 streams stay where they are.
    let host = Host::builder()
        .plugin("echo")
        .env("RUST_LOG", "info,wshost::ws::rebind=debug")
        .start();
    let mut h1 = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut h1, "h1").await, "h1");
    let mut send = h2(host.addr).await;
    let (mut ws, _) = open(&mut send, host.addr, "/echo").await;
    assert_eq!(ask2(&mut ws, "h2").await, "h2");
    // Log lines are written in order: the HTTP/1.1 session's would come before this one.
    let log = host.wait_for_log(&["unknown socket type"]);
    assert_eq!(log.matches("unknown socket type").count(), 1, "{log}");
}
