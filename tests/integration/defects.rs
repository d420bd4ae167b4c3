//! Regression tests for the defects found by using wshost as its users would (backpressure,
//! plugin lifecycle, reload, the admin endpoint, input validation), one test per behaviour.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{
    ask, closed_with, connect, eventually_async, get, http, id_of, install, next, plugin,
    serve_refused, text, variant, Host, PATIENCE,
};

fn wshost(args: &[&str], env: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wshost"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

// ---------------------------------------------------------------------------------------------
// Backpressure and sessions.

#[tokio::test]
async fn on_drain_comes_as_soon_as_the_writer_empties_the_queue() {
    // No pings: nothing but the writer can wake the session for on_drain.
    let host = Host::builder()
        .plugin("testkit")
        .args(&["--ping-interval", "0"])
        .start();
    let mut ws = connect(&host.url("/testkit")).await;
    // 32 MiB in 64 KiB messages, each batch sent when on_drain says the queue emptied.
    ws.send(Message::text("stream:33554432")).await.unwrap();
    assert_eq!(crate::harness::receive_stream(&mut ws).await, 32 << 20);
}

#[tokio::test]
async fn a_send_larger_than_the_whole_queue_is_message_too_large() {
    let host = Host::builder().plugin("testkit").start();
    let mut small = connect(&host.url("/testkit?max_queue=1000")).await;
    assert_eq!(
        ask(&mut small, "send:5000").await,
        "send Err(\"MessageTooLarge\")"
    );
    small.send(Message::text("send:900")).await.unwrap();
    assert_eq!(next(&mut small).await, Message::binary(vec![b's'; 900]));
    assert_eq!(text(&mut small).await, "send Ok(())");
    let mut default = connect(&host.url("/testkit")).await;
    assert_eq!(
        ask(&mut default, "send:2000000").await,
        "send Err(\"MessageTooLarge\")"
    );
}

#[tokio::test]
async fn on_close_gets_the_code_the_host_closed_with() {
    let host = Host::builder().plugin("testkit").start();
    let mut ws = connect(&host.url("/testkit?max_message=100")).await;
    let id = id_of(&mut ws).await;
    ws.send(Message::binary(vec![0u8; 5000])).await.unwrap();
    assert_eq!(closed_with(&mut ws).await.0, 1009);
    host.wait_for_log(&[&format!("on_close conn={id} code=1009 ")]);
}

#[tokio::test]
async fn a_closing_connection_gives_its_queued_bytes_back_once() {
    let host = Host::builder()
        .plugin("testkit")
        .args(&[
            "--max-buffered-total",
            "67108864",
            "--close-timeout",
            "300ms",
        ])
        .args(&["--ping-interval", "0"])
        .start();
    // A message arriving half-way holds its bytes in the budget: the baseline.
    let mut half = TcpStream::connect(host.addr).unwrap();
    half.write_all(
        b"GET /testkit HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let mut head = [0u8; 12];
    half.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    // A masked binary frame announcing 200,000 bytes, of which 100,000 are sent.
    let mut frame = vec![0x82, 0xFF];
    frame.extend_from_slice(&200_000u64.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend(std::iter::repeat_n(0u8, 100_000));
    half.write_all(&frame).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let baseline = loop {
        let held = host.metric("wshost_buffered_bytes").unwrap_or(0.0);
        // The frame's 14-byte head and the 100,000 bytes of payload.
        if held >= 100_014.0 {
            break held;
        }
        assert!(
            Instant::now() < deadline,
            "the half message was not charged"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // A connection with 16 MiB queued is closed by its plugin and read slowly: its close
    // handshake times out with bytes still queued, and the final write sends more of them.
    let mut slow = connect(&host.url("/testkit?max_queue=33554432")).await;
    slow.send(Message::text("flood:256:65536")).await.unwrap();
    slow.send(Message::text("close:1000:bye")).await.unwrap();
    let reader = tokio::spawn(async move {
        loop {
            match tokio::time::timeout(PATIENCE, slow.next()).await {
                Ok(Some(Ok(_))) => tokio::time::sleep(Duration::from_millis(10)).await,
                _ => return,
            }
        }
    });
    // The close is counted last, after the final write and the budget's accounting.
    eventually_async("the slow connection ends", || {
        host.metric("wshost_closes_total{code=\"1006\"}").is_some()
    })
    .await;
    assert_eq!(host.metric("wshost_buffered_bytes"), Some(baseline));
    reader.abort();
    // The half message's client goes away mid-frame: what its connection held goes back too.
    drop(half);
    eventually_async("the half message's bytes are given back", || {
        host.metric("wshost_buffered_bytes") == Some(0.0)
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Plugin lifecycle.

fn needy() -> std::path::PathBuf {
    variant(
        "needy",
        &crate::harness::plugin_api_version(),
        &[
            ("WSHOST_VARIANT_NAME", "needy"),
            ("WSHOST_VARIANT_ROUTE", "/needy"),
            ("WSHOST_VARIANT_NEW", "needs-config"),
        ],
    )
}

#[tokio::test]
async fn the_probe_creates_a_plugin_with_its_config_table() {
    let so = needy();
    // The probe is on (the default): it must hand the plugin its table, as the host does.
    let host = Host::builder()
        .plugin_file(&so, "libneedy.so")
        .config_file("[plugin.needy.config]\ntoken = \"t\"\n")
        .start();
    host.wait_for_log(&["plugin loaded", "plugin=needy "]);
    let mut ws = connect(&host.url("/needy")).await;
    assert_eq!(ask(&mut ws, "x").await, "v:x");
    // `wshost check --config` applies the file too; without it the plugin is refused.
    let config = host.config_path().display().to_string();
    let so = so.display().to_string();
    let (ok, out) = wshost(&["check", "--config", &config, &so], &[]);
    assert!(ok, "{out}");
    let (ok, out) = wshost(&["check", &so], &[]);
    assert!(!ok && out.contains("no `token`"), "{out}");
}

#[tokio::test]
async fn status_metrics_and_connections_are_served_while_a_plugin_loads_slowly() {
    let slow = variant(
        "slowpoke",
        &crate::harness::plugin_api_version(),
        &[
            ("WSHOST_VARIANT_NAME", "slowpoke"),
            ("WSHOST_VARIANT_ROUTE", "/slowpoke"),
            ("WSHOST_VARIANT_NEW", "wait-file"),
        ],
    );
    let gate = tempfile::tempdir().unwrap();
    let release = gate.path().join("release");
    let host = Host::builder()
        .plugin("echo")
        .config_file(&format!(
            "[plugin.slowpoke.config]\nrelease = \"{}\"\n",
            release.display()
        ))
        .start();
    let mut ws = connect(&host.url("/echo")).await;
    install(
        host.plugins_dir(),
        "libslowpoke.so",
        &std::fs::read(&slow).unwrap(),
    );
    // The constructor (in the probe) is now blocked until `release` exists.
    let started = gate.path().join("release.started");
    eventually_async("the slow constructor runs", || started.exists()).await;
    assert_eq!(get(host.admin, "/status").0, 200);
    assert!(host.metrics().contains("wshost_plugins 1"));
    assert_eq!(ask(&mut ws, "during the load").await, "during the load");
    let mut other = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut other, "new").await, "new");
    std::fs::write(&release, b"").unwrap();
    host.wait_for_log(&["plugin loaded", "plugin=slowpoke "]);
}

#[tokio::test]
async fn a_generation_shuts_down_off_the_io_threads_and_slow_shutdowns_are_logged() {
    let host = Host::builder()
        .plugin("testkit")
        .config_file("[plugin.testkit.config]\nshutdown_sleep_ms = \"200\"\n")
        .start();
    // A new build (a new inode) replaces generation 1, which has no connections: it retires.
    crate::harness::redeploy(host.plugins_dir(), "testkit");
    let line = host.wait_for_log(&["testkit shutdown on thread"]);
    // The OS keeps 15 bytes of a thread's name.
    assert!(line.contains("thread wshost-retire-t"), "{line}");
    host.wait_for_log(&["slow plugin shutdown", "plugin=testkit", "generation=1"]);
    host.wait_for_log(&["generation shut down", "plugin=testkit", "generation=1"]);
}

#[tokio::test]
async fn a_retired_generation_can_no_longer_publish() {
    let host = Host::builder().plugin("testkit").start();
    let mut old = connect(&host.url("/testkit")).await;
    // Generation 1 leaks a thread that publishes to `ticks` forever.
    assert_eq!(ask(&mut old, "leak:ticks").await, "leaking");
    crate::harness::redeploy(host.plugins_dir(), "testkit");
    host.wait_for_log(&["plugin reloaded", "plugin=testkit", "generation=2"]);
    old.close(None).await.unwrap();
    let _ = closed_with(&mut old).await;
    host.wait_for_log(&["generation shut down", "plugin=testkit", "generation=1"]);
    host.wait_for_log(&["refused a host call", "generation=1"]);
    // From now on nothing of generation 1 reaches `ticks`: a subscriber hears only the marker.
    let mut sub = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut sub, "sub:ticks").await, "Ok(())");
    let mut publisher = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut publisher, "pub:ticks:marker").await, "published 1");
    assert_eq!(text(&mut sub).await, "marker");
}

#[tokio::test]
async fn private_copies_do_not_pile_up_and_sigterm_retires_every_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let mut host = Host::builder()
        .plugin("testkit")
        .env("TMPDIR", &tmp.path().display().to_string())
        .start();
    let bytes = std::fs::read(plugin("testkit")).unwrap();
    for g in 2..=4 {
        install(host.plugins_dir(), "libtestkit.so", &bytes);
        host.wait_for_log(&["plugin reloaded", &format!("generation={g} ")]);
    }
    let copies: Vec<_> = walk(tmp.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "so"))
        .collect();
    assert!(copies.is_empty(), "private copies left: {copies:?}");
    // A connection whose plugin keeps a thread (and so a handle) alive at SIGTERM.
    let mut ws = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut ws, "leak:x").await, "leaking");
    let status = tokio::task::spawn_blocking(move || {
        let status = host.terminate();
        host.wait_for_log(&["generation shut down", "plugin=testkit", "generation=4"]);
        status
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        walk(tmp.path()).is_empty(),
        "left in TMPDIR: {:?}",
        walk(tmp.path())
    );
}

#[tokio::test]
async fn a_killed_hosts_private_folder_is_removed_by_the_next_host() {
    let tmp = tempfile::tempdir().unwrap();
    let tmpdir = tmp.path().display().to_string();
    let private = |tmp: &Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("wshost-plugins-")
            })
            .collect()
    };
    let mut killed = Host::builder()
        .plugin("echo")
        .env("TMPDIR", &tmpdir)
        .start();
    connect(&killed.url("/echo")).await;
    let left = private(tmp.path());
    assert_eq!(left.len(), 1, "{left:?}");
    killed.signal("KILL");
    killed.wait_exit();
    assert!(
        left[0].exists(),
        "a killed host cannot clean up after itself"
    );

    let running = Host::builder()
        .plugin("echo")
        .env("TMPDIR", &tmpdir)
        .start();
    running.wait_for_log(&["removed private plugin folders", "count=1"]);
    assert!(!left[0].exists());
    // Its own folder, and nothing else, is there; a third host leaves it alone.
    let now = private(tmp.path());
    assert_eq!(now.len(), 1, "{now:?}");
    let third = Host::builder()
        .plugin("echo")
        .env("TMPDIR", &tmpdir)
        .start();
    connect(&third.url("/echo")).await;
    assert!(now[0].exists());
    assert!(!third.log().contains("removed private plugin folders"));
    connect(&running.url("/echo")).await;
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[tokio::test]
async fn files_past_the_size_limit_are_refused_without_being_read() {
    let host = Host::builder().plugin("echo").start();
    let sparse = host.plugins_dir().join("sparse.so");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    host.wait_for_log(&[
        "plugin refused",
        "sparse.so",
        "larger than --max-plugin-size",
    ]);
    // Not an ELF file and under the limit: refused on its header, before any copy.
    install(host.plugins_dir(), "text.so", b"#!/bin/sh\n");
    host.wait_for_log(&["plugin refused", "text.so", "not an ELF file"]);
}

#[tokio::test]
async fn a_replaced_plugins_directory_is_watched_again() {
    let host = Host::builder().start();
    let dir = host.plugins_dir().to_owned();
    std::fs::remove_dir_all(&dir).unwrap();
    host.wait_for_log(&["the plugins directory is gone"]);
    std::fs::create_dir(&dir).unwrap();
    host.wait_for_log(&["the plugins directory was replaced; watching it again"]);
    crate::harness::redeploy(&dir, "echo");
    host.wait_for_log(&["plugin loaded", "plugin=echo "]);
    let mut ws = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut ws, "back").await, "back");
}

#[tokio::test]
async fn the_readme_mount_example_serves_chat_rooms_at_the_mounts() {
    let host = Host::builder()
        .plugin("chat")
        .plugin("testkit")
        .config_file(
            "[plugin.chat]\nroutes = [\"/rooms\", \"/lobby\"]\n\n\
             [plugin.testkit]\nroutes = [\"/kit\"]\n",
        )
        .start();
    let mut a = connect(&host.url("/rooms/x?name=ann")).await;
    let mut b = connect(&host.url("/rooms/x?name=bob")).await;
    let mut c = connect(&host.url("/lobby/x?name=cy")).await;
    // Each member hears joins; wait until bob has joined before ann speaks.
    text_containing(&mut a, "bob").await;
    a.send(Message::text("hello")).await.unwrap();
    text_containing(&mut b, "hello").await;
    c.send(Message::text("here")).await.unwrap();
    assert_eq!(get(host.addr, "/rooms/").0, 200);
    assert_eq!(get(host.addr, "/lobby").0, 200);
    let (_, _, body) = get(host.addr, "/kit/info");
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("route=/kit path_info=/info "), "{body}");
}

/// Reads text messages until one contains `needle` (each read is bounded by PATIENCE).
async fn text_containing(ws: &mut crate::harness::Ws, needle: &str) {
    while !text(ws).await.contains(needle) {}
}

#[tokio::test]
async fn reload_reads_the_config_file_again() {
    let host = Host::builder()
        .plugin("testkit")
        .config_file("[plugin.testkit.config]\ngreeting = \"one\"\n")
        .start();
    let mut ws = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut ws, "config:greeting").await, "Some(\"one\")");
    // Edited as editors and deploy tools do: a new file renamed over the old one.
    let rewrite = |text: &str| {
        let tmp = host.config_path().with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, host.config_path()).unwrap();
    };
    rewrite("[plugin.testkit.config]\ngreeting = \"two\"\n");
    let (ok, out) = host.admin_cmd(&["reload"]);
    assert!(ok, "{out}");
    assert!(out.contains("loaded testkit generation 2"), "{out}");
    let mut fresh = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut fresh, "config:greeting").await, "Some(\"two\")");
    // A bad file is reported and the running sections stay.
    rewrite("[plugin.testkit\n");
    let (ok, out) = host.admin_cmd(&["reload"]);
    assert!(!ok && out.contains("config file not re-read"), "{out}");
    let mut again = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut again, "config:greeting").await, "Some(\"two\")");
    // SIGHUP re-reads it too.
    rewrite("[plugin.testkit.config]\ngreeting = \"three\"\n");
    host.signal("HUP");
    host.wait_for_log(&["plugin reloaded", "plugin=testkit", "generation=3"]);
    let mut third = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut third, "config:greeting").await, "Some(\"three\")");
}

#[tokio::test]
async fn plugin_panics_are_single_json_log_lines() {
    let host = Host::builder()
        .plugin("testkit")
        .args(&["--log-format", "json"])
        .env("RUST_BACKTRACE", "1")
        .start();
    let mut ws = connect(&host.url("/testkit")).await;
    ws.send(Message::text("panic")).await.unwrap();
    assert_eq!(closed_with(&mut ws).await.0, 1011);
    let _ = tokio_tungstenite::connect_async(host.url("/testkit/panic")).await;
    let mut other = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut other, "thread-panic").await, "spawned");
    host.wait_for_log(&["on_text panicked", "testkit"]);
    host.wait_for_log(&["upgrade panicked"]);
    host.wait_for_log(&["panic on plugin thread `testkit-worker`"]);
    for line in host.log().lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
    }
}

#[tokio::test]
async fn every_metric_the_readme_names_is_in_a_live_scrape() {
    let host = Host::builder().plugin("echo").start();
    let mut ws = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut ws, "x").await, "x");
    ws.close(None).await.unwrap();
    let _ = closed_with(&mut ws).await;
    let readme =
        std::fs::read_to_string(crate::harness::workspace_root().join("README.md")).unwrap();
    let mut names: Vec<&str> = readme
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("wshost_") && w.len() > 7)
        // The bus's metrics exist with --bus redis:// only (the bus tests scrape them).
        .filter(|w| !w.starts_with("wshost_bus_"))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let scrape = host.metrics();
        let families: Vec<&str> = scrape
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let missing: Vec<&&str> = names
            .iter()
            .filter(|n| {
                !families
                    .iter()
                    .any(|f| *f == **n || n.strip_suffix("_total") == Some(f))
            })
            .collect();
        if missing.is_empty() {
            assert!(!scrape.contains("wshost_wshost"), "{scrape}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not scraped: {missing:?}\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The admin endpoint.

#[tokio::test]
async fn the_admin_endpoint_drops_idle_clients_and_caps_connections() {
    let host = Host::builder()
        .plugin("echo")
        .args(&["--header-read-timeout", "1s"])
        .start();
    let idle: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(host.admin).unwrap())
        .collect();
    // The WebSocket port is unaffected.
    let mut ws = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut ws, "fine").await, "fine");
    // Every idle admin client is dropped: past the cap at once, the rest at the header timeout.
    let deadline = Instant::now() + PATIENCE;
    let ends = tokio::task::spawn_blocking(move || {
        idle.into_iter()
            .map(|mut s| {
                // One deadline for all: a host that never drops them fails in PATIENCE.
                let left = deadline.saturating_duration_since(Instant::now());
                s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .unwrap();
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).is_ok()
            })
            .filter(|ended| *ended)
            .count()
    })
    .await
    .unwrap();
    assert_eq!(ends, 64);
    host.wait_for_log(&["admin endpoint at its connection limit"]);
    assert_eq!(get(host.admin, "/healthz").0, 200);
}

#[tokio::test]
async fn the_admin_endpoint_refuses_other_host_names_and_web_pages() {
    let host = Host::builder().plugin("echo").start();
    let (status, _, _) = http(
        host.admin,
        "GET /status HTTP/1.1\r\nHost: evil.example.com\r\nConnection: close\r\n\r\n",
        b"",
    );
    assert_eq!(status, 403);
    let (status, _, _) = http(
        host.admin,
        "POST /reload HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil.example.com\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n",
        b"",
    );
    assert_eq!(status, 403);
    let (ok, out) = host.admin_cmd(&["status"]);
    assert!(ok, "{out}");
}

#[tokio::test]
async fn the_admin_endpoint_on_a_unix_socket_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    // The harness reads a TCP admin address; this host has a second, Unix, one through env.
    let host = Host::builder()
        .plugin("echo")
        .args(&["--admin-token-file", &token.display().to_string()])
        .start();
    // The TCP endpoint now wants the token (health checks excepted).
    assert_eq!(get(host.admin, "/healthz").0, 200);
    assert_eq!(get(host.admin, "/status").0, 401);
    let (ok, out) = host.admin_cmd(&["status"]);
    assert!(!ok && out.contains("401"), "{out}");
    let (ok, out) = host.admin_cmd(&["status", "--token-file", &token.display().to_string()]);
    assert!(ok, "{out}");
    drop(host);

    let mut child = Command::new(env!("CARGO_BIN_EXE_wshost"))
        .args(["serve", "--listen", "127.0.0.1:0", "--no-watch"])
        .arg("--admin-listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--plugins")
        .arg(dir.path())
        .env("WSHOST_RUNTIME_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("listening on") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0);
    }
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let admin = format!("unix:{}", socket.display());
    let (ok, out) = wshost(&["status", "--admin", &admin], &[]);
    assert!(ok && out.contains("0 plugin(s)"), "{out}");
    // Found without --admin, through the runtime file the host wrote.
    let (ok, out) = wshost(&["status"], &[("WSHOST_RUNTIME_DIR", dir.path())]);
    assert!(ok && out.contains("0 plugin(s)"), "{out}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn the_admin_client_takes_urls_finds_the_host_and_times_out() {
    let host = Host::builder().plugin("echo").start();
    let url = format!("http://{}", host.admin);
    let (ok, out) = wshost(&["status", "--admin", &url], &[]);
    assert!(ok && out.contains("1 plugin(s)"), "{out}");
    let (ok, out) = wshost(&["status"], &[("WSHOST_RUNTIME_DIR", host.runtime.path())]);
    assert!(ok && out.contains("1 plugin(s)"), "{out}");
    // A listener that accepts and never answers: the client gives up with a clear message.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = stalled.local_addr().unwrap().to_string();
    let (ok, out) = wshost(&["status", "--admin", &addr, "--timeout", "1s"], &[]);
    assert!(!ok && out.contains("no answer"), "{out}");
    drop(stalled);
}

// ---------------------------------------------------------------------------------------------
// Input validation.

#[tokio::test]
async fn durations_and_sizes_are_checked_at_start() {
    for flag in [
        "--ping-interval",
        "--header-read-timeout",
        "--close-timeout",
        "--probe-timeout",
    ] {
        let err = serve_refused(&[flag, "500000000000years"], None);
        assert!(err.contains("too long"), "{flag}: {err}");
    }
    let err = serve_refused(&["--max-frame-size", "0"], None);
    assert!(err.contains("at least 1"), "{err}");
    for (toml, expect) in [
        (
            "ping_interval = \"500000000000years\"\n",
            "wshost.toml:1: `ping_interval`:",
        ),
        (
            "\nmax_message_size = -1\n",
            "wshost.toml:2: `max_message_size`:",
        ),
        ("max_frame_size = 0\n", "wshost.toml:1: `max_frame_size`:"),
        (
            "max_message_size = [1, 2]\n",
            "wshost.toml:1: `max_message_size`: must be a number",
        ),
        (
            "[plugin.echo]\nidle_timeout = \"500000000000years\"\n",
            "wshost.toml:2: `plugin.echo.idle_timeout`:",
        ),
    ] {
        let err = serve_refused(&[], Some(toml));
        assert!(err.contains(expect), "{toml}: {err}");
    }
}

#[tokio::test]
async fn http10_upgrades_and_repeated_keys_are_refused_and_large_expects_get_413() {
    let host = Host::builder().plugin("echo").plugin("testkit").start();
    let upgrade = |version: &str, extra: &str| {
        format!(
            "GET /echo HTTP/{version}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    };
    let (status, head, _) = http(host.addr, &upgrade("1.0", ""), b"");
    assert_eq!(status, 400, "{head}");
    let (status, head, _) = http(
        host.addr,
        &upgrade(
            "1.1",
            "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\nConnection: close\r\n",
        ),
        b"",
    );
    assert_eq!(status, 400, "{head}");
    // A declared body past --max-body-size: 413 before the body, no "100 Continue".
    let mut s = TcpStream::connect(host.addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(
        b"POST /testkit/body HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\
          Expect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&head));
}
