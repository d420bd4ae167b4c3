//! The chat plugin: rooms over the host's channels, its page, and its recovery from a panic.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{closed_with, connect, get, text, Host, PATIENCE};

/// Reads messages until one equals `want` (joins of others may come first).
async fn expect_line(ws: &mut crate::harness::Ws, want: &str) {
    loop {
        if text(ws).await == want {
            return;
        }
    }
}

#[tokio::test]
async fn broadcasts_to_every_member_of_the_room() {
    let host = Host::builder().plugin("chat").start();
    let mut ann = connect(&host.url("/chat/lobby?name=Ann")).await;
    expect_line(&mut ann, "* Ann joined").await;
    let mut bob = connect(&host.url("/chat/lobby?name=Bob")).await;
    expect_line(&mut bob, "* Bob joined").await;
    expect_line(&mut ann, "* Bob joined").await;
    ann.send(Message::text("hi Bob")).await.unwrap();
    expect_line(&mut bob, "Ann: hi Bob").await;
    expect_line(&mut ann, "Ann: hi Bob").await;
    bob.close(None).await.unwrap();
    expect_line(&mut ann, "* Bob left").await;
}

#[tokio::test]
async fn rooms_are_isolated() {
    let host = Host::builder().plugin("chat").start();
    let mut red = connect(&host.url("/chat/red?name=R")).await;
    expect_line(&mut red, "* R joined").await;
    let mut blue = connect(&host.url("/chat/blue?name=B")).await;
    expect_line(&mut blue, "* B joined").await;
    blue.send(Message::text("only blue")).await.unwrap();
    expect_line(&mut blue, "B: only blue").await;
    red.send(Message::text("only red")).await.unwrap();
    // Red's next message is its own: nothing of blue's reached it.
    assert_eq!(text(&mut red).await, "R: only red");
}

#[tokio::test]
async fn new_members_get_the_recent_history() {
    let host = Host::builder().plugin("chat").start();
    let mut ann = connect(&host.url("/chat/h?name=Ann")).await;
    expect_line(&mut ann, "* Ann joined").await;
    ann.send(Message::text("first")).await.unwrap();
    expect_line(&mut ann, "Ann: first").await;
    let mut bob = connect(&host.url("/chat/h?name=Bob")).await;
    assert_eq!(text(&mut bob).await, "* Ann joined");
    assert_eq!(text(&mut bob).await, "Ann: first");
}

#[tokio::test]
async fn refuses_an_upgrade_without_a_name_with_400() {
    let host = Host::builder().plugin("chat").start();
    let err = tokio_tungstenite::connect_async(host.url("/chat/lobby"))
        .await
        .expect_err("refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 400);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
            assert!(body.contains("name"), "{body}");
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
    let err = tokio_tungstenite::connect_async(host.url("/chat/bad%20room?name=x"))
        .await
        .expect_err("refused");
    assert!(
        matches!(err, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 400),
        "{err}"
    );
}

#[tokio::test]
async fn serves_its_page_on_a_plain_get() {
    let host = Host::builder().plugin("chat").start();
    let (status, head, body) = get(host.addr, "/chat/");
    assert_eq!(status, 200);
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/html"));
    let page = String::from_utf8(body).unwrap();
    assert!(
        page.contains("new WebSocket("),
        "the page opens a WebSocket"
    );
}

#[tokio::test]
async fn a_panic_inside_the_plugin_leaves_the_room_usable() {
    let host = Host::builder()
        .plugin("chat")
        .env("WSHOST_CHAT_TEST_HOOKS", "1")
        .start();
    let mut ann = connect(&host.url("/chat/p?name=Ann")).await;
    expect_line(&mut ann, "* Ann joined").await;
    let mut bob = connect(&host.url("/chat/p?name=Bob")).await;
    expect_line(&mut bob, "* Bob joined").await;
    // Bob's callback panics while holding the room's history lock: his connection closes 1011.
    bob.send(Message::text("/panic")).await.unwrap();
    assert_eq!(closed_with(&mut bob).await.0, 1011);
    host.wait_for_log(&["panicked", "chat test hook"]);
    // The lock was poisoned; the room still works for Ann and for newcomers.
    ann.send(Message::text("still here")).await.unwrap();
    expect_line(&mut ann, "Ann: still here").await;
    let mut cid = connect(&host.url("/chat/p?name=Cid")).await;
    expect_line(&mut cid, "Ann: still here").await;
    cid.send(Message::text("hello")).await.unwrap();
    expect_line(&mut ann, "Cid: hello").await;
    let _ = PATIENCE;
}

#[tokio::test]
async fn every_member_sees_the_room_in_the_same_order() {
    let host = Host::builder().plugin("chat").start();
    let names = ["A", "B", "C"];
    let mut members = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut ws = connect(&host.url(&format!("/chat/order?name={name}"))).await;
        // Wait until everyone so far has joined, so no one misses a message.
        for later in &names[..=i] {
            expect_line(&mut ws, &format!("* {later} joined")).await;
        }
        members.push(ws);
    }
    for ws in members.iter_mut().take(names.len() - 1) {
        // Earlier members also see the later joins; skip them.
        expect_line(ws, "* C joined").await;
    }
    let tasks: Vec<_> = members
        .into_iter()
        .zip(names)
        .map(|(mut ws, name)| {
            tokio::spawn(async move {
                for i in 0..30 {
                    ws.send(Message::text(format!("{name}{i}"))).await.unwrap();
                }
                let mut seen = Vec::new();
                while seen.len() < 90 {
                    seen.push(text(&mut ws).await);
                }
                seen
            })
        })
        .collect();
    let mut orders = Vec::new();
    for t in tasks {
        orders.push(t.await.unwrap());
    }
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[1], orders[2]);
}
