//! The callback contract: order, exactly-once on_close, panics (also in Drop), slow callbacks,
//! close codes, handles used from other threads.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{ask, closed_with, connect, event, id_of, observer, text, Host};

#[tokio::test]
async fn a_panicking_callback_closes_only_its_connection_with_1011() {
    let host = Host::builder().plugin("testkit").start();
    let mut victim = connect(&host.url("/testkit")).await;
    let mut other = connect(&host.url("/testkit")).await;
    victim.send(Message::text("panic")).await.unwrap();
    assert_eq!(closed_with(&mut victim).await.0, 1011);
    host.wait_for_log(&["callback panicked", "on_text", "testkit: on_text panics"]);
    assert_eq!(ask(&mut other, "still alive").await, "still alive");
    let mut fresh = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut fresh, "new one").await, "new one");
}

#[tokio::test]
async fn a_panic_in_a_handlers_drop_is_contained() {
    let host = Host::builder().plugin("testkit").start();
    let mut observer = observer(&host).await;
    let mut ws = connect(&host.url("/testkit")).await;
    let id = id_of(&mut ws).await;
    assert_eq!(ask(&mut ws, "drop-panic").await, "armed");
    ws.close(None).await.unwrap();
    event(&mut observer, &format!("close {id} ")).await;
    // The handler has been dropped (and panicked in Drop); the process is still serving.
    let mut fresh = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut fresh, "after").await, "after");
    observer.send(Message::text("observer ok")).await.unwrap();
    event(&mut observer, "observer ok").await;
}

#[tokio::test]
async fn on_close_runs_exactly_once_with_the_peers_code_and_reason() {
    let host = Host::builder().plugin("testkit").start();
    let mut observer = observer(&host).await;
    let mut ws = connect(&host.url("/testkit")).await;
    let id = id_of(&mut ws).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye now".into(),
    }))
    .await
    .unwrap();
    assert_eq!(
        event(&mut observer, &format!("close {id} ")).await,
        format!("close {id} 4001 bye now")
    );
    // A refused upgrade never runs on_connect, so never on_close. Then count the closes: the
    // one above and none more for the same connection.
    let _ = tokio_tungstenite::connect_async(host.url("/testkit/reject")).await;
    let mut probe = connect(&host.url("/testkit")).await;
    let probe_id = id_of(&mut probe).await;
    assert_eq!(ask(&mut probe, "closes").await, "closes 1");
    probe.close(None).await.unwrap();
    assert_eq!(
        event(&mut observer, "close ").await,
        format!("close {probe_id} 1005 ")
    );
}

#[tokio::test]
async fn on_close_gets_1006_when_the_peer_vanishes() {
    let host = Host::builder().plugin("testkit").start();
    let mut observer = observer(&host).await;
    let mut ws = connect(&host.url("/testkit")).await;
    let id = id_of(&mut ws).await;
    drop(ws);
    assert_eq!(
        event(&mut observer, &format!("close {id} ")).await,
        format!("close {id} 1006 ")
    );
}

#[tokio::test]
async fn the_plugin_closes_with_its_code_and_no_send_gets_through_after() {
    let host = Host::builder().plugin("testkit").start();
    let mut observer = observer(&host).await;
    let mut ws = connect(&host.url("/testkit")).await;
    let id = id_of(&mut ws).await;
    ws.send(Message::text("close:4002:done here"))
        .await
        .unwrap();
    assert_eq!(closed_with(&mut ws).await, (4002, "done here".to_owned()));
    assert_eq!(
        event(&mut observer, &format!("send-after-close {id}")).await,
        format!("send-after-close {id} Err(Closed)")
    );
}

#[tokio::test]
async fn invalid_close_codes_and_reasons_are_refused() {
    let host = Host::builder().plugin("testkit").start();
    let mut ws = connect(&host.url("/testkit")).await;
    for code in [1005, 1006, 1015, 999, 2000] {
        assert_eq!(
            ask(&mut ws, &format!("close:{code}:x")).await,
            "close refused: InvalidCloseCode"
        );
    }
    let long = "r".repeat(124);
    assert_eq!(
        ask(&mut ws, &format!("close:1000:{long}")).await,
        "close refused: ReasonTooLong"
    );
    assert_eq!(ask(&mut ws, "still open").await, "still open");
}

#[tokio::test]
async fn a_slow_callback_is_logged_with_the_plugins_name() {
    let host = Host::builder()
        .plugin("testkit")
        .arg("--slow-callback")
        .arg("20ms")
        .start();
    let mut ws = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut ws, "sleep:60").await, "slept");
    let line = host.wait_for_log(&["slow callback", "on_text"]);
    assert!(line.contains("plugin=testkit"), "{line}");
}

#[tokio::test]
async fn a_handle_can_send_from_another_thread() {
    let host = Host::builder().plugin("testkit").start();
    let mut ws = connect(&host.url("/testkit")).await;
    ws.send(Message::text("spawn:200")).await.unwrap();
    for i in 0..200 {
        assert_eq!(text(&mut ws).await, format!("bg {i}"));
    }
}

#[tokio::test]
async fn the_ticker_pushes_from_a_plugin_thread() {
    let host = Host::builder().plugin("ticker").start();
    let mut a = connect(&host.url("/ticker")).await;
    let mut b = connect(&host.url("/ticker")).await;
    let first = text(&mut a).await;
    assert!(first.starts_with("tick "), "{first}");
    assert!(text(&mut b).await.starts_with("tick "));
}

#[tokio::test]
async fn plugin_log_lines_carry_the_plugins_name_and_the_connection() {
    let host = Host::builder().plugin("testkit").start();
    host.wait_for_log(&["testkit started", "plugin=testkit"]);
    let mut ws = connect(&host.url("/testkit")).await;
    let id = id_of(&mut ws).await;
    // The connection has no span yet (it is made when something of it is logged): the line
    // names the connection itself.
    assert_eq!(ask(&mut ws, "log:hello log").await, "logged");
    let line = host.wait_for_log(&["testkit says hello log"]);
    assert!(
        line.contains("WARN")
            && line.contains("plugin=testkit")
            && line.contains(&format!("conn_id={id}")),
        "{line}"
    );
    // From then on the plugin's callbacks run in their connections' spans, address and all.
    assert_eq!(ask(&mut ws, "log:again").await, "logged");
    let line = host.wait_for_log(&["testkit says again"]);
    assert!(
        line.contains(&format!("conn{{conn_id={id} peer=127.0.0.1:")),
        "{line}"
    );
    let mut other = connect(&host.url("/testkit")).await;
    let other_id = id_of(&mut other).await;
    assert_eq!(ask(&mut other, "log:from the other").await, "logged");
    let line = host.wait_for_log(&["testkit says from the other"]);
    assert!(
        line.contains(&format!("conn{{conn_id={other_id} peer=127.0.0.1:")),
        "{line}"
    );
}

#[tokio::test]
async fn oversized_messages_close_with_1009() {
    let host = Host::builder().plugin("testkit").start();
    let mut ws = connect(&host.url("/testkit?max_message=1000")).await;
    assert_eq!(ask(&mut ws, "small").await, "small");
    ws.send(Message::binary(vec![7u8; 5000])).await.unwrap();
    assert_eq!(closed_with(&mut ws).await.0, 1009);
}

#[tokio::test]
async fn the_plugin_can_ping_and_sees_the_pong() {
    let host = Host::builder().plugin("testkit").start();
    let mut ws = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut ws, "ping:abc").await, "Ok(())");
    // tungstenite answers the ping; the plugin's on_pong reports it.
    assert_eq!(text(&mut ws).await, "pong abc");
}

#[tokio::test]
async fn sigterm_closes_connections_with_1001_and_runs_on_close() {
    let mut host = Host::builder().plugin("testkit").start();
    let mut ws = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut ws, "ready").await, "ready");
    let status = {
        let closing = tokio::spawn(async move { closed_with(&mut ws).await });
        let status = tokio::task::spawn_blocking(move || {
            let status = host.terminate();
            (status, host)
        })
        .await
        .unwrap();
        assert_eq!(closing.await.unwrap().0, 1001);
        host = status.1;
        status.0
    };
    assert!(status.success(), "{status:?}");
    assert!(!host.is_running());
}
