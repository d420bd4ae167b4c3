//! Channels across hosts: two wshost processes on one real `redis-server` (started here on a
//! free port), Redis killed and restarted under them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{ask, connect, next, text, Host, Ws, PATIENCE};

/// A `redis-server` of this test's own; killed when dropped.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Self {
        let mut redis = Redis {
            child: None,
            port: 0,
            dir: tempfile::tempdir().unwrap(),
        };
        for _ in 0..10 {
            redis.port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if redis.run() {
                return redis;
            }
        }
        panic!("redis-server did not start on any of 10 free ports");
    }

    /// Starts the server on `self.port`; false if it exited (the port was taken meanwhile).
    fn run(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server not found: the bus tests need it (apt-get install redis-server; \
                 .ci/run installs it)"
            ),
            Err(e) => panic!("cannot run redis-server: {e}"),
        };
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            if self.try_command(&["PING"]).is_some_and(|r| r == "+PONG") {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer PING on port {}", self.port);
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn restart(&mut self) {
        self.kill();
        // The same port: the hosts reconnect to the address they were given.
        assert!(self.run(), "redis-server did not restart on its port");
    }

    /// Sends one command; the first line of the reply.
    fn try_command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(PATIENCE)).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 512];
        // Replies here are small and end with CRLF.
        loop {
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            if reply.ends_with(b"\r\n") && complete(&reply) {
                break;
            }
        }
        Some(String::from_utf8_lossy(&reply).trim_end().to_owned())
    }

    /// How many hosts are subscribed to `channel` (`PUBSUB NUMSUB`).
    fn numsub(&self, channel: &str) -> i64 {
        let reply = self
            .try_command(&["PUBSUB", "NUMSUB", channel])
            .expect("redis answers");
        let last = reply.lines().last().unwrap();
        last.strip_prefix(':')
            .unwrap_or_else(|| panic!("unexpected NUMSUB reply {reply:?}"))
            .parse()
            .unwrap()
    }

    /// Waits until `channel` has `n` subscribers in Redis.
    async fn wait_numsub(&self, channel: &str, n: i64) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let seen = self.numsub(channel);
            if seen == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{channel}: {seen} subscribers in Redis, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Whether a reply (a simple one, or a `*2` array of a bulk string and an integer) is whole.
fn complete(reply: &[u8]) -> bool {
    let text = String::from_utf8_lossy(reply);
    if text.starts_with("*2") {
        text.lines().count() >= 4
    } else {
        true
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
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
    let deadline = Instant::now() + PATIENCE;
    while metric(&host, "wshost_bus_connected{link=\"publish\"}") < 1.0
        || metric(&host, "wshost_bus_connected{link=\"subscribe\"}") < 1.0
    {
        assert!(Instant::now() < deadline, "the bus never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
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
    redis.wait_numsub("wshost:chat:lobby", 1).await;
    let mut bob = connect(&b.url("/chat/lobby?name=bob")).await;
    assert_eq!(text(&mut bob).await, "* bob joined");
    assert_eq!(text(&mut alice).await, "* bob joined");
    redis.wait_numsub("wshost:chat:lobby", 2).await;

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
    redis.wait_numsub("wshost:testkit:room", 2).await;
    redis.wait_numsub("wshost:testkit:other", 1).await;

    // Text and binary cross; the count is the publishing host's own subscribers.
    assert_eq!(ask(&mut publisher, "pub:room:zero").await, "published 1");
    assert_eq!(text(&mut a1).await, "zero");
    assert_eq!(text(&mut b1).await, "zero");
    assert_eq!(ask(&mut publisher, "pubbin:room").await, "published 1");
    assert_eq!(next(&mut a1).await, Message::binary(vec![0u8, 1, 2, 255]));
    assert_eq!(next(&mut b1).await, Message::binary(vec![0u8, 1, 2, 255]));

    // a1 leaves `room`: host A has no member left there and unsubscribes in Redis.
    assert_eq!(ask(&mut a1, "unsub:room").await, "true");
    redis.wait_numsub("wshost:testkit:room", 1).await;
    assert_eq!(ask(&mut publisher, "pub:room:one").await, "published 1");
    assert_eq!(ask(&mut publisher, "pub:other:two").await, "published 0");
    assert_eq!(text(&mut b1).await, "one");
    // In Redis order `one` came first: a1's next message being `two` shows it did not get `one`.
    assert_eq!(text(&mut a1).await, "two");

    // Closing leaves too.
    b1.close(None).await.unwrap();
    redis.wait_numsub("wshost:testkit:room", 0).await;
    a1.close(None).await.unwrap();
    redis.wait_numsub("wshost:testkit:other", 0).await;
    // The gauge follows the unsubscribe the host sent (Redis may see it first).
    let deadline = Instant::now() + PATIENCE;
    while metric(&a, "wshost_bus_channels") != 0.0 {
        assert!(Instant::now() < deadline, "host A still counts channels");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
    redis.wait_numsub("wshost:testkit:news", 2).await;
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
    redis.wait_numsub("wshost:testkit:news", 2).await;
    let mut b_pub = connect(&b.url("/testkit")).await;
    publish_until_received(&mut a_pub, "news", "a-after", &mut b1).await;
    drain(&mut a1, "a-after").await; // a1 got each attempt locally
    publish_until_received(&mut b_pub, "news", "b-after", &mut a1).await;
    assert!(a.is_running() && b.is_running());
    assert!(metric(&a, "wshost_bus_connects_total{link=\"subscribe\"}") >= 2.0);
    assert!(a.log().contains("bus: subscribed in Redis"));
}
