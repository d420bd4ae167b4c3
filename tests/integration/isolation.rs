//! Process isolation (`--isolation process`): each plugin generation runs in a worker process
//! of its own. A fault in plugin code — abort, segfault, exit, stack overflow, a panic while
//! unwinding, an endless loop, a runaway allocation — ends only that worker: its connections
//! close with 1011, other plugins' connections go on, and a new worker serves new connections.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{ask, closed_with, connect, eventually_async, variant, Host, Ws};

/// Echo and testkit, each in a worker; testkit with a memory limit and a callback timeout.
fn isolated() -> Host {
    Host::builder()
        .plugin("echo")
        .plugin("testkit")
        .args(&["--isolation", "process", "--callback-timeout", "3s"])
        .config_file("[plugin.testkit]\nmemory_limit = \"256MiB\"\n")
        .start()
}

/// Connects to `url` once a worker serves it again (a 503 while it restarts); returns the
/// connection and how long it took.
async fn connect_when_served(url: &str, within: Duration) -> (Ws, Duration) {
    let started = Instant::now();
    loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => return (ws, started.elapsed()),
            Err(e) => assert!(
                started.elapsed() < within,
                "{url} not served again within {within:?}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn pid_of(ws: &mut Ws) -> u32 {
    let reply = ask(ws, "pid").await;
    reply
        .strip_prefix("pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {reply}"))
}

#[tokio::test]
async fn every_fault_in_a_callback_ends_only_its_worker() {
    let host = isolated();
    let mut echo = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut echo, "before").await, "before");
    let host_pid = host.pid();
    let faults = [
        ("abort", "signal 6 (SIGABRT)"),
        ("segv", "signal 11 (SIGSEGV)"),
        ("exit:7", "exited with code 7"),
        ("overflow", "has overflowed its stack"),
        ("drop-unwind-panic", "signal 6 (SIGABRT)"),
        ("spin", "past the callback timeout"),
        ("alloc:400", "past its memory_limit of 256 MiB"),
    ];
    let mut testkit = connect(&host.url("/testkit")).await;
    let mut pids = vec![pid_of(&mut testkit).await];
    for (i, (fault, said)) in faults.iter().enumerate() {
        assert_ne!(
            pids[i], host_pid,
            "testkit runs in a worker, not in the host"
        );
        testkit.send(Message::text(*fault)).await.unwrap();
        let (code, _) = closed_with(&mut testkit).await;
        assert_eq!(code, 1011, "{fault}: the connection closes with 1011");
        host.wait_for_log(&[
            "plugin worker process",
            said,
            "plugin=testkit",
            "connections_closed=1",
        ]);
        // The other plugin's connection, opened before, goes on.
        assert_eq!(ask(&mut echo, fault).await, *fault);
        // The plugin serves new connections again within 5 s, in a new worker.
        let (ws, took) = connect_when_served(&host.url("/testkit"), Duration::from_secs(5)).await;
        testkit = ws;
        let pid = pid_of(&mut testkit).await;
        assert!(!pids.contains(&pid), "{fault}: a new worker ({pid}) serves");
        pids.push(pid);
        eprintln!("{fault}: served again after {took:?}");
    }
    assert_eq!(
        host.metric("wshost_plugin_restarts_total{plugin=\"testkit\",generation=\"1\"}"),
        Some(faults.len() as f64)
    );
    assert_eq!(host.metric("wshost_mapped_libraries"), Some(0.0));
    assert!(
        host.metric("wshost_plugin_rss_bytes{plugin=\"echo\",generation=\"1\"}")
            .unwrap()
            > 0.0
    );
}

#[tokio::test]
async fn a_panicking_callback_closes_its_connection_and_the_worker_stays() {
    let host = isolated();
    let mut a = connect(&host.url("/testkit")).await;
    let mut b = connect(&host.url("/testkit")).await;
    let pid = pid_of(&mut a).await;
    a.send(Message::text("panic")).await.unwrap();
    assert_eq!(closed_with(&mut a).await.0, 1011);
    host.wait_for_log(&["plugin callback panicked", "on_text panics on request"]);
    assert_eq!(
        pid_of(&mut b).await,
        pid,
        "the same worker serves the other connection"
    );
}

#[tokio::test]
async fn plugin_threads_sends_channels_and_logs_cross_to_the_host() {
    let host = isolated();
    let mut a = connect(&host.url("/testkit")).await;
    let mut b = connect(&host.url("/testkit")).await;
    // A thread of the plugin's sends on a connection.
    a.send(Message::text("spawn:3")).await.unwrap();
    for i in 0..3 {
        assert_eq!(crate::harness::text(&mut a).await, format!("bg {i}"));
    }
    // Channels: subscribe, publish (one crossing, counted by the host), subscribers.
    assert_eq!(ask(&mut a, "sub:room").await, "Ok(())");
    assert_eq!(ask(&mut b, "sub:room").await, "Ok(())");
    assert_eq!(ask(&mut b, "subscribers:room").await, "subscribers 2");
    b.send(Message::text("pub:room:hello")).await.unwrap();
    let mut got_b = Vec::new();
    while got_b.len() < 2 {
        got_b.push(crate::harness::text(&mut b).await);
    }
    got_b.sort();
    assert_eq!(got_b, ["hello", "published 2"]);
    assert_eq!(crate::harness::text(&mut a).await, "hello");
    // The plugin's log lines reach the host's log with its name.
    assert_eq!(ask(&mut a, "log:across").await, "logged");
    host.wait_for_log(&["testkit says across", "plugin=testkit"]);
    // A close the plugin starts reaches the client.
    a.send(Message::text("close:4000:bye")).await.unwrap();
    assert_eq!(closed_with(&mut a).await, (4000, "bye".into()));
}

#[tokio::test]
async fn a_queue_full_refusal_is_followed_by_on_drain() {
    let host = isolated();
    let mut ws = connect(&host.url("/testkit?max_queue=65536")).await;
    // Streams 4 MiB in 64 KiB messages paced by `on_drain` (testkit's `stream`).
    ws.send(Message::text(format!("stream:{}", 4 << 20)))
        .await
        .unwrap();
    assert_eq!(crate::harness::receive_stream(&mut ws).await, 4 << 20);
}

#[tokio::test]
async fn sends_a_worker_refuses_are_counted_in_the_hosts_metrics() {
    let host = isolated();
    let overflows = |reason: &str| {
        host.metric(&format!(
            "wshost_send_queue_overflows_total{{source=\"send\",reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(overflows("too_large"), Some(0.0));
    let mut small = connect(&host.url("/testkit?max_queue=1000")).await;
    assert_eq!(
        ask(&mut small, "send:5000").await,
        "send Err(\"MessageTooLarge\")"
    );
    eventually_async("the worker's too-large refusal is counted", || {
        overflows("too_large") == Some(1.0)
    })
    .await;
    // A stream paced by on_drain is refused (queue full) whenever it runs ahead of the host.
    let mut ws = connect(&host.url("/testkit?max_queue=65536")).await;
    ws.send(Message::text(format!("stream:{}", 1 << 20)))
        .await
        .unwrap();
    assert_eq!(crate::harness::receive_stream(&mut ws).await, 1 << 20);
    eventually_async("the worker's queue-full refusals are counted", || {
        overflows("queue_full").is_some_and(|n| n >= 1.0)
    })
    .await;
    assert_eq!(overflows("too_large"), Some(1.0));
    assert_eq!(
        host.metric(r#"wshost_send_queue_overflows_total{source="publish",reason="queue_full"}"#),
        Some(0.0)
    );
}

/// A worker's send that the host's memory budget cannot hold closes the connection with 1013
/// and is counted as a refused send for the budget.
#[tokio::test]
async fn a_workers_send_past_the_memory_budget_is_counted() {
    let host = Host::builder()
        .plugin("testkit")
        .args(&["--isolation", "process", "--max-buffered-total", "100000"])
        .start();
    let budget = r#"wshost_send_queue_overflows_total{source="send",reason="memory_budget"}"#;
    assert_eq!(host.metric(budget), Some(0.0));
    // A client that reads nothing: once the sockets are full, the stream's 64 KiB messages
    // (within the worker's 1 MiB of credit) pile up in the host against its 100,000 bytes.
    let mut mute =
        crate::harness::connect_with_recv_buffer(&host, &host.url("/testkit"), 4096).await;
    mute.send(Message::text(format!("stream:{}", 32 << 20)))
        .await
        .unwrap();
    host.wait_for_log(&["a worker's send does not fit --max-buffered-total"]);
    eventually_async("the budget refusal is counted", || {
        host.metric(budget).is_some_and(|n| n >= 1.0)
    })
    .await;
}

#[tokio::test]
async fn a_reload_starts_a_new_worker_and_the_old_one_exits_after_its_last_connection() {
    let host = isolated();
    let mut old = connect(&host.url("/testkit")).await;
    let old_pid = pid_of(&mut old).await;
    crate::harness::redeploy(host.plugins_dir(), "testkit");
    host.wait_for_log(&["plugin reloaded", "plugin=testkit", "generation=2"]);
    let mut new = connect(&host.url("/testkit")).await;
    let new_pid = pid_of(&mut new).await;
    assert_ne!(new_pid, old_pid);
    // The old generation's worker serves its connection until it closes, then exits.
    assert_eq!(pid_of(&mut old).await, old_pid);
    assert!(std::path::Path::new(&format!("/proc/{old_pid}")).exists());
    old.close(None).await.unwrap();
    let proc_dir = format!("/proc/{old_pid}");
    eventually_async(&format!("the old worker {old_pid} exits"), || {
        !std::path::Path::new(&proc_dir).exists()
    })
    .await;
    host.wait_for_log(&["generation shut down", "generation=1"]);
    assert_eq!(host.metric("wshost_mapped_libraries"), Some(0.0));
    assert_eq!(pid_of(&mut new).await, new_pid);
}

#[tokio::test]
async fn a_constructor_that_aborts_is_refused_and_the_host_stays_up() {
    let good = variant("iso-good", &crate::harness::plugin_api_version(), &[]);
    let bad = variant(
        "iso-abort",
        &crate::harness::plugin_api_version(),
        &[("WSHOST_VARIANT_NEW", "abort")],
    );
    let host = Host::builder()
        .plugin("echo")
        .plugin_file(&good, "libvariant.so")
        .args(&["--isolation", "process", "--no-probe"])
        .start();
    let mut v = connect(&host.url("/variant")).await;
    assert_eq!(ask(&mut v, "x").await, "v:x");
    crate::harness::install(
        host.plugins_dir(),
        "libvariant.so",
        &std::fs::read(&bad).unwrap(),
    );
    host.wait_for_log(&["plugin refused", "libvariant.so", "signal 6 (SIGABRT)"]);
    // Generation 1 keeps serving, old and new connections alike.
    assert_eq!(ask(&mut v, "y").await, "v:y");
    let mut fresh = connect(&host.url("/variant")).await;
    assert_eq!(ask(&mut fresh, "z").await, "v:z");
}

#[test]
fn isolation_settings_are_checked_with_file_line_and_key() {
    let err =
        crate::harness::serve_refused(&[], Some("[plugin.echo]\nisolation = \"sometimes\"\n"));
    assert!(
        err.contains(":2:") && err.contains("isolation") && err.contains("\"process\""),
        "{err}"
    );
    let err = crate::harness::serve_refused(&[], Some("[plugin.echo]\nmemory_limit = \"lots\"\n"));
    assert!(err.contains(":2:") && err.contains("memory_limit"), "{err}");
    let err = crate::harness::serve_refused(&["--isolation", "sometimes"], None);
    assert!(err.contains("--isolation"), "{err}");
}

/// A config table with lists, tables and numbers reaches the plugin with its types, inline and
/// in a worker; `Host::config` has them as text.
#[tokio::test]
async fn typed_config_reaches_the_plugin_inline_and_in_a_worker() {
    let toml = "[plugin.testkit.config]\nretries = 3\ntags = [\"a\", \"b\"]\n\
                [plugin.testkit.config.limits]\nrooms = 10\n";
    for args in [&[][..], &["--isolation", "process"][..]] {
        let host = Host::builder()
            .plugin("testkit")
            .args(args)
            .config_file(toml)
            .start();
        let mut ws = connect(&host.url("/testkit")).await;
        let typed: serde_json::Value =
            serde_json::from_str(&ask(&mut ws, "config-json").await).unwrap();
        assert_eq!(
            typed,
            serde_json::json!({"retries": 3, "tags": ["a", "b"], "limits": {"rooms": 10}}),
            "{args:?}"
        );
        assert_eq!(
            ask(&mut ws, "config-text:tags").await,
            r#"Some("[\"a\",\"b\"]")"#
        );
        assert_eq!(ask(&mut ws, "config-text:retries").await, r#"Some("3")"#);
    }
}

/// After the upgrade a connection still knows it (local address, TLS, path, query), and its
/// idle timeout can be changed: inline and in a worker.
#[tokio::test]
async fn a_connection_knows_its_upgrade_and_its_idle_timeout_can_change() {
    for args in [&[][..], &["--isolation", "process"][..]] {
        let host = Host::builder().plugin("testkit").args(args).start();
        let mut ws = connect(&host.url("/testkit/room?a=1&b=2")).await;
        assert_eq!(
            ask(&mut ws, "facts").await,
            format!(
                "local={} secure=false path=/testkit/room query=a=1&b=2",
                host.addr
            ),
            "{args:?}"
        );
        // The default idle timeout is 300 s; 200 ms from now on.
        assert_eq!(ask(&mut ws, "idle:200").await, "idle set true");
        assert_eq!(
            closed_with(&mut ws).await,
            (1001, "idle timeout".into()),
            "{args:?}"
        );
    }
}
