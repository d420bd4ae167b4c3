//! The echo plugin: text, unicode, binary, order.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{connect, next, Host, PATIENCE};

#[tokio::test]
async fn echoes_text_unicode_and_binary() {
    let host = Host::builder().plugin("echo").start();
    let mut ws = connect(&host.url("/echo")).await;
    for text in ["hello", "", "Grüße, 世界 🌍 — ünïcödé"] {
        ws.send(Message::text(text)).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::text(text));
    }
    let binary: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    ws.send(Message::binary(binary.clone())).await.unwrap();
    match next(&mut ws).await {
        Message::Binary(b) => assert_eq!(b.as_ref(), binary.as_slice()),
        other => panic!("expected binary, got {other:?}"),
    }
    ws.send(Message::binary(vec![0u8, 255, 0])).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(vec![0u8, 255, 0]));
}

#[tokio::test]
async fn echoes_a_thousand_messages_in_order() {
    let host = Host::builder().plugin("echo").start();
    let mut ws = connect(&host.url("/echo")).await;
    for i in 0..1000 {
        ws.feed(Message::text(format!("message {i}")))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..1000 {
        assert_eq!(next(&mut ws).await, Message::text(format!("message {i}")));
    }
}

#[tokio::test]
async fn picks_an_offered_subprotocol() {
    let host = Host::builder().plugin("echo").start();
    let mut req = host.url("/echo").into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "v2.echo, v1.echo".parse().unwrap(),
    );
    let (_ws, resp) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "v2.echo");
    assert!(resp.headers().get("sec-websocket-extensions").is_none());
}

#[tokio::test]
async fn answers_pings_with_pongs() {
    let host = Host::builder().plugin("echo").start();
    let mut ws = connect(&host.url("/echo")).await;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    loop {
        let msg = tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(&mut ws))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Pong(p) = msg {
            assert_eq!(p.as_ref(), b"are you there");
            break;
        }
    }
}
