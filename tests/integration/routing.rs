//! Routing, handshake validation, plain requests, and what plugins' responses may do.

use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{connect, get, http, Host, PATIENCE};

fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         {extra}\r\n"
    )
}

const KEY_V13: &str =
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn unrouted_paths_get_404() {
    let host = Host::builder().plugin("echo").start();
    assert_eq!(get(host.addr, "/nothing").0, 404);
    assert_eq!(get(host.addr, "/").0, 404);
    let (status, _, _) = http(host.addr, &upgrade_request("/nothing", KEY_V13), b"");
    assert_eq!(status, 404);
}

#[tokio::test]
async fn routes_match_whole_path_segments() {
    let host = Host::builder().plugin("echo").start();
    let (status, _, _) = http(host.addr, &upgrade_request("/echoes", KEY_V13), b"");
    assert_eq!(status, 404, "/echo must not serve /echoes");
    let (status, head, _) = http(host.addr, &upgrade_request("/echo/deeper", KEY_V13), b"");
    assert_eq!(status, 101, "{head}");
    // The echo plugin has no plain-request handler: the default answers 404.
    assert_eq!(get(host.addr, "/echo").0, 404);
}

#[tokio::test]
async fn malformed_handshakes_are_refused_before_any_plugin() {
    let host = Host::builder().plugin("echo").start();
    let cases = [
        (
            upgrade_request("/echo", "Sec-WebSocket-Version: 13\r\n"),
            400,
        ),
        (
            upgrade_request(
                "/echo",
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n",
            ),
            400,
        ),
        (
            upgrade_request(
                "/echo",
                "Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            ),
            426,
        ),
        (
            format!(
                "POST /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                 Content-Length: 0\r\n{KEY_V13}\r\n"
            ),
            400,
        ),
        (
            format!("GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n{KEY_V13}\r\n"),
            400,
        ),
    ];
    for (request, want) in cases {
        let (status, head, _) = http(host.addr, &request, b"");
        assert_eq!(status, want, "{request}");
        if want == 426 {
            assert!(head
                .to_ascii_lowercase()
                .contains("sec-websocket-version: 13"));
        }
    }
    // The host is unharmed.
    connect(&host.url("/echo")).await;
}

#[tokio::test]
async fn plain_requests_reach_the_plugin_as_a_request_map() {
    let host = Host::builder().plugin("testkit").start();
    let (status, _, body) = http(
        host.addr,
        "GET /testkit/info?a=1&b=two HTTP/1.1\r\nHost: example.test:9999\r\nX-One: 1\r\n\
         X-Two: a\r\nX-Two: b\r\nConnection: close\r\n\r\n",
        b"",
    );
    assert_eq!(status, 200);
    let info = String::from_utf8(body).unwrap();
    for part in [
        "method=GET",
        "path=/testkit/info",
        "query=a=1&b=two",
        "scheme=http",
        "protocol=HTTP/1.1",
        "server_name=example.test",
        &format!("server_port={}", host.addr.port()),
        "remote_addr=127.0.0.1",
        "upgrade=false",
        "headers=x-one=1,x-two=a,x-two=b",
    ] {
        assert!(info.contains(part), "{part} missing from {info}");
    }
    let payload = b"\x00binary body\xff";
    let (status, _, body) = http(
        host.addr,
        &format!(
            "POST /testkit/body HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            payload.len()
        ),
        payload,
    );
    assert_eq!(status, 200);
    assert_eq!(body, payload);
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let host = Host::builder()
        .plugin("testkit")
        .arg("--max-body-size")
        .arg("1000")
        .start();
    let body = vec![b'x'; 5000];
    let (status, _, _) = http(
        host.addr,
        "POST /testkit/body HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n",
        &body,
    );
    assert_eq!(status, 413);
}

#[tokio::test]
async fn a_refused_upgrade_sends_the_plugins_status_headers_and_body() {
    let host = Host::builder().plugin("testkit").start();
    let (status, head, body) = http(host.addr, &upgrade_request("/testkit/reject", KEY_V13), b"");
    assert_eq!(status, 403);
    assert!(
        head.to_ascii_lowercase().contains("x-reason: testing"),
        "{head}"
    );
    assert_eq!(body, b"go away");
}

#[tokio::test]
async fn panics_in_upgrade_and_request_answer_500_and_the_host_lives_on() {
    let host = Host::builder().plugin("testkit").start();
    let (status, _, _) = http(host.addr, &upgrade_request("/testkit/panic", KEY_V13), b"");
    assert_eq!(status, 500);
    assert_eq!(get(host.addr, "/testkit/panic").0, 500);
    host.wait_for_log(&["upgrade handler panicked", "testkit: upgrade panics"]);
    host.wait_for_log(&["request handler panicked", "testkit: request panics"]);
    connect(&host.url("/testkit")).await;
}

#[tokio::test]
async fn headers_of_a_101_reach_the_client() {
    let host = Host::builder().plugin("testkit").start();
    let (_ws, resp) = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::connect_async(host.url("/testkit")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.headers()["set-cookie"], "testkit=1");
}

#[tokio::test]
async fn a_subprotocol_the_client_did_not_offer_is_refused_with_500() {
    let host = Host::builder().plugin("testkit").start();
    let mut req = host
        .url("/testkit?proto=other")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "mine".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req)
        .await
        .expect_err("refused");
    assert!(
        matches!(err, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 500),
        "{err}"
    );
    host.wait_for_log(&["UnofferedSubprotocol"]);
}
