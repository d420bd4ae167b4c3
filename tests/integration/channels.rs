//! Host-owned channels: subscribe, publish, unsubscribe, leave on close.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{ask, ask_until, connect, id_of, next, text, Host};

#[tokio::test]
async fn publish_reaches_every_subscriber_and_only_them() {
    let host = Host::builder().plugin("testkit").start();
    let mut a = connect(&host.url("/testkit")).await;
    let mut b = connect(&host.url("/testkit")).await;
    let mut outsider = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut a, "sub:news").await, "Ok(())");
    assert_eq!(ask(&mut b, "sub:news").await, "Ok(())");
    assert_eq!(
        ask(&mut outsider, "subscribers:news").await,
        "subscribers 2"
    );
    assert_eq!(ask(&mut outsider, "pub:news:extra!").await, "published 2");
    assert_eq!(text(&mut a).await, "extra!");
    assert_eq!(text(&mut b).await, "extra!");
    assert_eq!(ask(&mut outsider, "pubbin:news").await, "published 2");
    assert_eq!(next(&mut a).await, Message::binary(vec![0u8, 1, 2, 255]));
    // The outsider's next message is the answer to its own command: it got nothing published.
    assert_eq!(ask(&mut outsider, "ping-pong").await, "ping-pong");
}

#[tokio::test]
async fn unsubscribe_and_close_leave_the_channel() {
    let host = Host::builder().plugin("testkit").start();
    let mut a = connect(&host.url("/testkit")).await;
    let mut b = connect(&host.url("/testkit")).await;
    let mut publisher = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut a, "sub:room").await, "Ok(())");
    assert_eq!(ask(&mut b, "sub:room").await, "Ok(())");
    assert_eq!(ask(&mut a, "unsub:room").await, "true");
    assert_eq!(ask(&mut a, "unsub:room").await, "false");
    assert_eq!(ask(&mut publisher, "pub:room:one").await, "published 1");
    assert_eq!(text(&mut b).await, "one");
    b.close(None).await.unwrap();
    // Leaving on close happens as the connection ends; wait until it has.
    ask_until(&mut publisher, "subscribers:room", "subscribers 0").await;
    assert_eq!(ask(&mut publisher, "pub:room:two").await, "published 0");
    a.send(Message::text("a is fine")).await.unwrap();
    assert_eq!(text(&mut a).await, "a is fine");
}

#[tokio::test]
async fn channels_are_per_plugin() {
    let host = Host::builder().plugin("testkit").plugin("chat").start();
    let mut member = connect(&host.url("/chat/news?name=M")).await;
    assert_eq!(text(&mut member).await, "* M joined");
    // testkit publishing to its own `news` does not reach chat's room `news`.
    let mut kit = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut kit, "pub:news:leak?").await, "published 0");
}

/// A connection the plugin closes leaves its channels when its close begins, not when its
/// close handshake ends: a client that never answers the close frame is no member (and gets
/// no publish) while the host waits for it.
#[tokio::test]
async fn a_closing_connection_leaves_its_channels_at_once() {
    let host = Host::builder()
        .plugin("testkit")
        .args(&["--close-timeout", "600s"])
        .start();
    let mut mute = connect(&host.url("/testkit")).await;
    let mut other = connect(&host.url("/testkit")).await;
    let mute_id = id_of(&mut mute).await;
    let other_id = id_of(&mut other).await;
    assert_eq!(ask(&mut mute, "sub:room").await, "Ok(())");
    assert_eq!(ask(&mut other, "sub:room").await, "Ok(())");
    assert_eq!(
        ask(&mut other, "members:room").await,
        format!("members {mute_id}=,{other_id}=")
    );
    // The plugin closes `mute`, whose client is never read again: it never answers.
    mute.send(Message::text("close:4000:bye")).await.unwrap();
    ask_until(&mut other, "members:room", &format!("members {other_id}=")).await;
    // (The publisher is the only member: the publish reaches it before the answer.)
    assert_eq!(ask(&mut other, "pub:room:x").await, "x");
    assert_eq!(text(&mut other).await, "published 1");
    drop(mute);
}
