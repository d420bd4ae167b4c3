//! The kv example: plain JSON requests, and their changes pushed over a WebSocket.

use crate::harness::{ask, connect, http, text, Host};

fn request(host: &Host, method: &str, path: &str, body: &str) -> (u16, String) {
    let (status, _, body) = http(
        host.addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        b"",
    );
    (status, String::from_utf8(body).unwrap())
}

#[tokio::test]
async fn serves_json_and_pushes_changes() {
    let host = Host::builder().plugin("kv").start();
    let mut watcher = connect(&host.url("/kv")).await;
    // Its answer proves the watcher is subscribed (on_connect ran before on_text).
    assert_eq!(ask(&mut watcher, "watching?").await, r#"{"watching":true}"#);
    let (status, body) = request(&host, "PUT", "/kv/probe", "0");
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"key":"probe","value":0}"#)
    );
    assert_eq!(text(&mut watcher).await, r#"{"key":"probe","value":0}"#);

    let (status, _) = request(&host, "PUT", "/kv/colour", r#"{"name":"teal"}"#);
    assert_eq!(status, 200);
    assert_eq!(
        text(&mut watcher).await,
        r#"{"key":"colour","value":{"name":"teal"}}"#
    );
    assert_eq!(
        request(&host, "GET", "/kv/colour", ""),
        (
            200,
            r#"{"key":"colour","value":{"name":"teal"}}"#.to_owned()
        )
    );
    assert_eq!(
        request(&host, "GET", "/kv", ""),
        (200, r#"{"keys":["colour","probe"]}"#.to_owned())
    );
    assert_eq!(request(&host, "PUT", "/kv/bad", "{not json").0, 400);
    assert_eq!(request(&host, "DELETE", "/kv/colour", "").0, 204);
    assert_eq!(text(&mut watcher).await, r#"{"key":"colour","value":null}"#);
    assert_eq!(request(&host, "GET", "/kv/colour", "").0, 404);
    assert_eq!(request(&host, "POST", "/kv/x", "1").0, 405);
}
