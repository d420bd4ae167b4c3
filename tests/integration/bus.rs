//! Channels across hosts: two wshost processes on one real `redis-server` (started here on a
//! free port), Redis killed and restarted under them.

use std::time::{Duration, Instant};

use test_support::Redis;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{ask, connect, eventually, eventually_async, next, text, Host, Ws, PATIENCE};

/// Waits until `channel` has `n` subscribers in Redis.
async fn wait_numsub(redis: &Redis, channel: &str, n: i64) {
    eventually_async(&format!("{channel} has {n} subscribers in Redis"), || {
        redis.numsub(channel) == n
    })
    .await;
}

/// A host on `redis`, once both its links (publish, subscribe) are connected: a publish made
/// before its publish link is up waits in the bus queue and could reach a host that subscribed
/// meanwhile.
fn bus_host(redis: &Redis, plugin: &str) -> Host {
    let host = Host::builder()
        .plugin(plugin)
        .args(&["--bus", &redis.url()])
        .args(&[
            "--bus-reconnect-min",
            "20ms",
            "--bus-reconnect-max",
            "200ms",
        ])
        .start();
    eventually("the bus connects", || {
        metric(&host, "wshost_bus_connected{link=\"publish\"}") >= 1.0
            && metric(&host, "wshost_bus_connected{link=\"subscribe\"}") >= 1.0
    });
    host
}

/// The value of the metric line `name` (labels included), or 0.
fn metric(host: &Host, name: &str) -> f64 {
    host.metric(name).unwrap_or(0.0)
}

#[tokio::test]
async fn chat_members_on_two_hosts_hear_each_other_exactly_once() {
    let redis = Redis::start();
    let a = bus_host(&redis, "chat");
    let b = bus_host(&redis, "chat");
    let mut alice = connect(&a.url("/chat/lobby?name=alice")).await;
    assert_eq!(text(&mut alice).await, "* alice joined");
    wait_numsub(&redis, "wshost:chat:lobby", 1).await;
    let mut bob = connect(&b.url("/chat/lobby?name=bob")).await;
    assert_eq!(text(&mut bob).await, "* bob joined");
    assert_eq!(text(&mut alice).await, "* bob joined");
    wait_numsub(&redis, "wshost:chat:lobby", 2).await;

    alice.send(Message::text("hello")).await.unwrap();
    assert_eq!(text(&mut alice).await, "alice: hello");
    assert_eq!(text(&mut bob).await, "alice: hello");
    bob.send(Message::text("hi")).await.unwrap();
    assert_eq!(text(&mut bob).await, "bob: hi");
    assert_eq!(text(&mut alice).await, "bob: hi");
    // Redis keeps each host's publishes in order: a second copy of anything above would arrive
    // before these.
    bob.send(Message::text("end")).await.unwrap();
    assert_eq!(text(&mut alice).await, "bob: end");
    assert_eq!(text(&mut bob).await, "bob: end");
    alice.send(Message::text("end")).await.unwrap();
    assert_eq!(text(&mut bob).await, "alice: end");
    assert_eq!(text(&mut alice).await, "alice: end");

    assert_eq!(metric(&a, "wshost_bus_received_total"), 3.0); // bob joined, hi, end
    assert_eq!(metric(&b, "wshost_bus_received_total"), 2.0); // hello, end
    assert_eq!(metric(&a, "wshost_bus_connected{link=\"subscribe\"}"), 1.0);
}

#[tokio::test]
async fn unsubscribe_and_close_stop_delivery_and_leave_redis() {
    let redis = Redis::start();
    let a = bus_host(&redis, "testkit");
    let b = bus_host(&redis, "testkit");
    let mut a1 = connect(&a.url("/testkit")).await;
    let mut b1 = connect(&b.url("/testkit")).await;
    let mut publisher = connect(&b.url("/testkit")).await;
    assert_eq!(ask(&mut a1, "sub:room").await, "Ok(())");
    assert_eq!(ask(&mut a1, "sub:other").await, "Ok(())");
    assert_eq!(ask(&mut b1, "sub:room").await, "Ok(())");
    wait_numsub(&redis, "wshost:testkit:room", 2).await;
    wait_numsub(&redis, "wshost:testkit:other", 1).await;

    // Text and binary cross; the count is the publishing host's own subscribers.
    assert_eq!(ask(&mut publisher, "pub:room:zero").await, "published 1");
    assert_eq!(text(&mut a1).await, "zero");
    assert_eq!(text(&mut b1).await, "zero");
    assert_eq!(ask(&mut publisher, "pubbin:room").await, "published 1");
    assert_eq!(next(&mut a1).await, Message::binary(vec![0u8, 1, 2, 255]));
    assert_eq!(next(&mut b1).await, Message::binary(vec![0u8, 1, 2, 255]));

    // a1 leaves `room`: host A has no member left there and unsubscribes in Redis.
    assert_eq!(ask(&mut a1, "unsub:room").await, "true");
    wait_numsub(&redis, "wshost:testkit:room", 1).await;
    assert_eq!(ask(&mut publisher, "pub:room:one").await, "published 1");
    assert_eq!(ask(&mut publisher, "pub:other:two").await, "published 0");
    assert_eq!(text(&mut b1).await, "one");
    // In Redis order `one` came first: a1's next message being `two` shows it did not get `one`.
    assert_eq!(text(&mut a1).await, "two");

    // Closing leaves too.
    b1.close(None).await.unwrap();
    wait_numsub(&redis, "wshost:testkit:room", 0).await;
    a1.close(None).await.unwrap();
    wait_numsub(&redis, "wshost:testkit:other", 0).await;
    // The gauge follows the unsubscribe the host sent (Redis may see it first).
    eventually_async("host A counts no channels", || {
        metric(&a, "wshost_bus_channels") == 0.0
    })
    .await;
}

/// Publishes `msg` from `publisher` until `reader` receives it (publishes made while a link is
/// still reconnecting are lost by design).
async fn publish_until_received(publisher: &mut Ws, channel: &str, msg: &str, reader: &mut Ws) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        ask(publisher, &format!("pub:{channel}:{msg}")).await;
        if let Ok(got) = tokio::time::timeout(Duration::from_millis(100), text(reader)).await {
            assert_eq!(got, msg);
            // Copies of earlier attempts may still be on their way.
            drain(reader, msg).await;
            return;
        }
        assert!(Instant::now() < deadline, "{msg:?} never crossed");
    }
}

/// Reads `msg` until nothing more arrives for a while; fails on anything else.
async fn drain(ws: &mut Ws, msg: &str) {
    while let Ok(got) = tokio::time::timeout(Duration::from_millis(200), text(ws)).await {
        assert_eq!(got, msg);
    }
}

#[tokio::test]
async fn redis_killed_and_restarted_local_delivery_goes_on_then_crossing_resumes() {
    let mut redis = Redis::start();
    let mut a = bus_host(&redis, "testkit");
    let mut b = bus_host(&redis, "testkit");
    let mut a1 = connect(&a.url("/testkit")).await;
    let mut a_pub = connect(&a.url("/testkit")).await;
    let mut b1 = connect(&b.url("/testkit")).await;
    assert_eq!(ask(&mut a1, "sub:news").await, "Ok(())");
    assert_eq!(ask(&mut b1, "sub:news").await, "Ok(())");
    wait_numsub(&redis, "wshost:testkit:news", 2).await;
    assert_eq!(ask(&mut a_pub, "pub:news:before").await, "published 1");
    assert_eq!(text(&mut a1).await, "before");
    assert_eq!(text(&mut b1).await, "before");

    redis.kill();
    a.wait_for_log(&["lost the Redis subscription connection"]);
    b.wait_for_log(&["lost the Redis subscription connection"]);
    // Local delivery does not wait for Redis; publishes that cannot cross are counted.
    for i in 0..5 {
        let msg = format!("local-{i}");
        assert_eq!(
            ask(&mut a_pub, &format!("pub:news:{msg}")).await,
            "published 1"
        );
        assert_eq!(text(&mut a1).await, msg);
    }
    let deadline = Instant::now() + PATIENCE;
    while metric(&a, "wshost_bus_dropped_total{reason=\"error\"}")
        + metric(&a, "wshost_bus_dropped_total{reason=\"disconnected\"}")
        < 1.0
    {
        assert!(Instant::now() < deadline, "no dropped publish counted");
        ask(&mut a_pub, "pub:news:lost").await;
        assert_eq!(text(&mut a1).await, "lost");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.is_running() && b.is_running());

    redis.restart();
    // Both hosts resubscribe by themselves.
    wait_numsub(&redis, "wshost:testkit:news", 2).await;
    let mut b_pub = connect(&b.url("/testkit")).await;
    publish_until_received(&mut a_pub, "news", "a-after", &mut b1).await;
    drain(&mut a1, "a-after").await; // a1 got each attempt locally
    publish_until_received(&mut b_pub, "news", "b-after", &mut a1).await;
    assert!(a.is_running() && b.is_running());
    assert!(metric(&a, "wshost_bus_connects_total{link=\"subscribe\"}") >= 2.0);
    assert!(a.log().contains("bus: subscribed in Redis"));
}
