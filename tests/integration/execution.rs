//! The execution model: plugin code runs on its plugin's own workers, so a plugin that blocks or
//! spins holds up only its own connections; deferred decisions; pausing a connection; the
//! watchdog; shutdown while a plugin never returns. Blocking is held open by gates (files the
//! test creates), so each test knows the plugin is blocked while it checks the others.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{ask, connect, eventually_async, get, text, Host, PATIENCE};

fn gate() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("open");
    (dir, file)
}

fn open(gate: &Path) {
    std::fs::write(gate, b"").unwrap();
}

/// Waits until `/metrics` has `line` (a metric line with its value).
async fn wait_metric(host: &Host, line: &str) {
    eventually_async(&format!("`{line}` in /metrics"), || {
        host.metrics().lines().any(|l| l == line)
    })
    .await;
}

/// A host with the echo plugin and testkit, each with two workers.
fn echo_and_testkit() -> Host {
    Host::builder()
        .plugin("echo")
        .plugin("testkit")
        .args(&["--plugin-workers", "2"])
        .start()
}

/// `n` round trips on an echo connection.
async fn echoes(echo: &mut crate::harness::Ws, n: usize) {
    for i in 0..n {
        assert_eq!(ask(echo, &format!("m{i}")).await, format!("m{i}"));
    }
}

#[tokio::test]
async fn callbacks_that_block_hold_up_only_their_own_plugin() {
    let host = echo_and_testkit();
    let (_dir, gate) = gate();
    let mut echo = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut echo, "before").await, "before");
    // Both of testkit's workers block in a callback.
    let mut a = connect(&host.url("/testkit")).await;
    let mut b = connect(&host.url("/testkit")).await;
    let block = format!("block:{}", gate.display());
    a.send(Message::text(block.clone())).await.unwrap();
    b.send(Message::text(block)).await.unwrap();
    wait_metric(&host, "wshost_plugin_calls_running{plugin=\"testkit\"} 2").await;
    host.wait_for_log(&[
        "plugin call still running",
        "plugin=testkit",
        "call=\"on_text\"",
    ]);
    // Meanwhile the echo plugin, new connections and the admin endpoint are served.
    echoes(&mut echo, 50).await;
    let mut fresh = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut fresh, "new").await, "new");
    assert_eq!(get(host.admin, "/healthz").0, 200);
    assert_eq!(get(host.addr, "/nothing").0, 404);
    wait_metric(&host, "wshost_plugin_calls_stuck{plugin=\"testkit\"} 2").await;
    // Still blocked: the gate is closed. Open it: both answer.
    assert!(!gate.exists());
    open(&gate);
    assert_eq!(text(&mut a).await, "unblocked");
    assert_eq!(text(&mut b).await, "unblocked");
    wait_metric(&host, "wshost_plugin_calls_running{plugin=\"testkit\"} 0").await;
}

#[tokio::test]
async fn upgrades_that_block_hold_up_only_their_own_plugin() {
    let host = echo_and_testkit();
    let (_dir, gate) = gate();
    let mut echo = connect(&host.url("/echo")).await;
    let url = host.url(&format!("/testkit/gate?file={}", gate.display()));
    // Four upgrades block (two in testkit's workers, two waiting for one).
    let upgrades: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { tokio_tungstenite::connect_async(url).await })
        })
        .collect();
    wait_metric(&host, "wshost_plugin_calls_running{plugin=\"testkit\"} 2").await;
    echoes(&mut echo, 50).await;
    let mut fresh = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut fresh, "new").await, "new");
    open(&gate);
    for u in upgrades {
        let (mut ws, _) = u.await.unwrap().expect("the blocked upgrade completes");
        assert_eq!(ask(&mut ws, "hi").await, "hi");
    }
}

#[tokio::test]
async fn a_callback_that_spins_forever_leaves_others_served_and_sigterm_stops_the_host() {
    let mut host = Host::builder()
        .plugin("echo")
        .plugin("testkit")
        .args(&["--shutdown-timeout", "2s"])
        .start();
    let mut echo = connect(&host.url("/echo")).await;
    let mut spinner = connect(&host.url("/testkit")).await;
    spinner.send(Message::text("spin")).await.unwrap();
    host.wait_for_log(&["plugin call still running", "plugin=testkit"]);
    echoes(&mut echo, 50).await;
    // Another connection of the same plugin still gets a worker (it has more than one).
    let mut other = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut other, "fine").await, "fine");
    let status = tokio::task::spawn_blocking(move || {
        let status = host.terminate();
        host.wait_for_log(&["shutdown timeout passed"]);
        status
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    drop((echo, spinner, other));
}

#[tokio::test]
async fn a_deferred_decision_answers_later_from_another_thread() {
    let host = Host::builder()
        .plugin("testkit")
        .args(&["--decision-timeout", "1s"])
        .start();
    let mut ws = connect(&host.url("/testkit/defer")).await;
    assert_eq!(ask(&mut ws, "accepted later").await, "accepted later");
    let refused = tokio_tungstenite::connect_async(host.url("/testkit/defer?reject=1"))
        .await
        .expect_err("refused");
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 403),
        other => panic!("{other}"),
    }
    // No answer within the decision timeout: 503, and the plugin hears of it.
    let late = tokio_tungstenite::connect_async(host.url("/testkit/defer?never=1"))
        .await
        .expect_err("timed out");
    match late {
        tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 503),
        other => panic!("{other}"),
    }
    host.wait_for_log(&["did not decide within --decision-timeout", "plugin=testkit"]);
    host.wait_for_log(&["the host stopped waiting for a deferred decision"]);
    host.wait_for_log(&["a late answer gets Err(Expired)"]);
    // A responder dropped unanswered: 500.
    let dropped = tokio_tungstenite::connect_async(host.url("/testkit/defer?drop=1"))
        .await
        .expect_err("dropped");
    match dropped {
        tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 500),
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn a_paused_connection_is_not_read_and_tcp_pushes_back() {
    let host = Host::builder()
        .plugin("testkit")
        .args(&["--ping-interval", "0"])
        .start();
    let (_dir, gate) = gate();
    // A raw client: it can tell when its writes stop being taken.
    let mut s = std::net::TcpStream::connect(host.addr).unwrap();
    s.write_all(
        b"GET /testkit HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let command = format!("pausegate:{}", gate.display());
    s.write_all(&masked_text(&command)).unwrap();
    let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
    read_until(&mut reader, b"paused");
    // Paused: what the client sends is left in the socket until the buffers fill up.
    s.set_nonblocking(true).unwrap();
    let frame = masked_text(&"x".repeat(60_000));
    let mut sent = 0usize;
    loop {
        match s.write(&frame) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        assert!(
            sent < 256 << 20,
            "the host kept reading a paused connection"
        );
    }
    assert!(sent > 0);
    // Resumed: the host reads again (the echo of the first of those messages comes back).
    open(&gate);
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    read_until(&mut reader, b"xxxxxxxxxx");
}

fn masked_text(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mut f = vec![0x81u8];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65_536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]); // a zero mask leaves the payload as it is
    f.extend_from_slice(payload);
    f
}

/// Reads until `needle` has gone by.
fn read_until(r: &mut impl std::io::Read, needle: &[u8]) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 65_536];
    let deadline = Instant::now() + PATIENCE;
    while !seen.windows(needle.len()).any(|w| w == needle) {
        assert!(Instant::now() < deadline, "no {needle:?}");
        let n = r.read(&mut buf).unwrap();
        assert!(n > 0, "the connection ended");
        seen.extend_from_slice(&buf[..n]);
        if seen.len() > 1 << 20 {
            seen.drain(..seen.len() - needle.len());
        }
    }
}

#[tokio::test]
async fn the_auth_example_defers_slow_lookups_without_holding_anyone_up() {
    let host = Host::builder()
        .plugin("echo")
        .plugin("auth")
        .args(&["--plugin-workers", "2"])
        .config_file("[plugin.auth.config]\nlookup_ms = 300\nlookup_threads = 16\n")
        .start();
    let mut echo = connect(&host.url("/echo")).await;
    // Sixteen logins, each a 300 ms lookup: more than the plugin's two workers, and none of
    // them waits on a worker.
    let logins: Vec<_> = (0..16)
        .map(|_| {
            let url = host.url("/auth?token=letmein");
            tokio::spawn(async move { tokio_tungstenite::connect_async(url).await })
        })
        .collect();
    echoes(&mut echo, 20).await;
    for login in logins {
        let (mut ws, _) = login.await.unwrap().expect("logged in");
        assert_eq!(ask(&mut ws, "hi").await, "hi");
    }
    match tokio_tungstenite::connect_async(host.url("/auth?token=nope")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("{other:?}"),
    }
}
