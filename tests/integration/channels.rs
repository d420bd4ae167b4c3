//! Host-owned channels: subscribe, publish, unsubscribe, leave on close.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{ask, ask_until, connect, event, id_of, next, observer, text, Host};

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

/// A subscriber that does not read misses what does not fit in its send queue, and only that:
/// the publish counts only the subscribers it reached, the others get everything, the full one
/// gets what it was sent whole and in order (a gap where its queue was full, no message cut
/// or repeated), and its handler hears `on_drain` once its queue has emptied, so a plugin can
/// tell it to catch up.
#[tokio::test]
async fn a_subscriber_whose_queue_is_full_misses_publishes_and_its_handler_hears_on_drain() {
    const MAX_PUBLISHES: usize = 400;
    let host = Host::builder()
        .plugin("testkit")
        // The reading subscriber's queue could hold every publish: only the full one (its own
        // queue 256 KiB, from its 101) can be refused, however slowly the test reads.
        .args(&["--max-send-queue", "268435456"])
        .start();
    let mut observer = observer(&host).await;
    let mut full = crate::harness::connect_with_recv_buffer(
        &host,
        &host.url("/testkit?max_queue=262144"),
        4096,
    )
    .await;
    let full_id = id_of(&mut full).await;
    let mut reading = connect(&host.url("/testkit")).await;
    let mut publisher = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut full, "sub:room").await, "Ok(())");
    assert_eq!(ask(&mut reading, "sub:room").await, "Ok(())");

    let message = |i: usize| format!("{i:04}:{}", "x".repeat(64 << 10));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut i = 0;
        while let Some(last) = rx.recv().await {
            while i < last {
                assert_eq!(text(&mut reading).await, message(i), "publish {i}");
                i += 1;
            }
        }
        reading
    });
    // Publish until the full one's socket buffers and send queue are full.
    let mut refused_at = None;
    for i in 0..MAX_PUBLISHES {
        let published = ask(&mut publisher, &format!("pub:room:{}", message(i))).await;
        tx.send(i + 1).unwrap();
        if published == "published 1" {
            refused_at = Some(i);
            break;
        }
        assert_eq!(published, "published 2", "publish {i}");
    }
    let refused_at = refused_at.expect("the full subscriber's queue never filled");
    // Counted as what it was: one publish refused for a full queue, and nothing else.
    let overflows =
        |labels: &str| host.metric(&format!("wshost_send_queue_overflows_total{{{labels}}}"));
    assert_eq!(
        overflows(r#"source="publish",reason="queue_full""#),
        Some(1.0)
    );
    assert_eq!(overflows(r#"source="send",reason="queue_full""#), Some(0.0));
    drop(tx);
    let _reading = reader.await.unwrap();

    let mut got = Vec::new();
    let drained = tokio::spawn(async move {
        event(&mut observer, &format!("drain {full_id}")).await;
    });
    while got.len() < refused_at {
        let t = text(&mut full).await;
        let (n, rest) = t.split_once(':').expect("a whole message");
        assert_eq!(rest.len(), 64 << 10, "message {n} whole");
        got.push(n.parse::<usize>().unwrap());
    }
    assert_eq!(
        got,
        (0..refused_at).collect::<Vec<_>>(),
        "everything before the refusal, in order"
    );
    drained.await.unwrap();
    // Drained, it is reached again.
    assert_eq!(ask(&mut publisher, "pub:room:after").await, "published 2");
    assert_eq!(text(&mut full).await, "after");
}
