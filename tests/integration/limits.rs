//! Heartbeat, timeouts, limits, origin and proxy rules, TLS and graceful shutdown: each with
//! short configured intervals, waiting for what the host does rather than for a time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{ask, closed_with, connect, event, http, id_of, observer, Host, PATIENCE};

fn refusal_status(err: tokio_tungstenite::tungstenite::Error) -> u16 {
    match err {
        tokio_tungstenite::tungstenite::Error::Http(r) => r.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test]
async fn the_host_pings_and_drops_a_peer_whose_pong_does_not_come() {
    let host = Host::builder()
        .plugin("testkit")
        // A pong timeout long enough for a busy machine's reader to answer in time.
        .args(&["--ping-interval", "200ms", "--pong-timeout", "3s"])
        .args(&["--idle-timeout", "0"])
        .start();
    // A client that reads answers pings (tungstenite does) and stays: it sees ten pings,
    // several pong timeouts' worth, without being dropped.
    let mut alive = connect(&host.url("/testkit")).await;
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        while pings < 10 {
            match tokio::time::timeout(PATIENCE, alive.next()).await {
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(Some(Ok(_))) => {}
                other => panic!("the reading client was dropped: {other:?}"),
            }
        }
        pings
    });
    // A client that stops reading never answers: the host drops it (on_close gets 1006).
    let mut mute = connect(&host.url("/testkit")).await;
    let id = id_of(&mut mute).await;
    let log = tokio::task::spawn_blocking(move || {
        host.wait_for_log(&["no pong in time", &format!("conn_id={id} ")]);
        host.wait_for_log(&[&format!("on_close conn={id} code=1006 ")]);
        host
    });
    let host = log.await.unwrap();
    assert_eq!(reader.await.unwrap(), 10);
    drop((mute, host));
}

#[tokio::test]
async fn an_idle_connection_is_closed_with_1001_and_pings_do_not_count() {
    let host = Host::builder()
        .plugin("testkit")
        .args(&["--idle-timeout", "500ms", "--ping-interval", "100ms"])
        .start();
    let mut ws = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut ws, "hello").await, "hello");
    // Reading answers the host's pings; still, no data flows, so the idle timeout closes it.
    assert_eq!(
        closed_with(&mut ws).await,
        (1001, "idle timeout".to_owned())
    );
}

#[tokio::test]
async fn a_plugin_sets_its_own_limits_in_the_101() {
    let host = Host::builder().plugin("testkit").start();
    // testkit lowers max_message_size for this connection only.
    let mut small = connect(&host.url("/testkit?max_message=100")).await;
    let mut large = connect(&host.url("/testkit")).await;
    large.send(Message::binary(vec![1u8; 5000])).await.unwrap();
    assert_eq!(
        crate::harness::next(&mut large).await,
        Message::binary(vec![1u8; 5000])
    );
    small.send(Message::binary(vec![1u8; 5000])).await.unwrap();
    assert_eq!(closed_with(&mut small).await.0, 1009);
}

#[tokio::test]
async fn the_send_queue_is_bounded_and_drains() {
    let host = Host::builder()
        .plugin("testkit")
        .args(&["--max-send-queue", "1048576"])
        .start();
    let mut observer = observer(&host).await;
    let mut slow = connect(&host.url("/testkit")).await;
    let id = id_of(&mut slow).await;
    // 64 MiB to a client that is not reading: far more than socket buffers hold.
    slow.send(Message::text("flood:1024:65536")).await.unwrap();
    let report = event(&mut observer, &format!("flood {id} ")).await;
    assert!(report.contains("error=Some(QueueFull)"), "{report}");
    let buffered: u64 = report
        .rsplit("buffered=")
        .next()
        .and_then(|b| b.parse().ok())
        .expect("buffered amount");
    assert!(buffered <= 1_048_576, "{report}");
    // Reading empties the queue; the plugin hears on_drain.
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = slow.next().await {} });
    event(&mut observer, &format!("drain {id}")).await;
    reader.abort();
}

#[tokio::test]
async fn connections_past_the_limits_get_503_and_429() {
    let host = Host::builder()
        .plugin("echo")
        .args(&["--max-connections", "2", "--max-connections-per-ip", "0"])
        .start();
    let a = connect(&host.url("/echo")).await;
    let _b = connect(&host.url("/echo")).await;
    let err = tokio_tungstenite::connect_async(host.url("/echo"))
        .await
        .expect_err("third refused");
    assert_eq!(refusal_status(err), 503);
    host.wait_for_log(&["upgrade refused: connection limit", "503"]);
    drop(a);
    // A place frees up when a connection ends.
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut c = loop {
        match tokio_tungstenite::connect_async(host.url("/echo")).await {
            Ok((ws, _)) => break ws,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no place freed up: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(ask(&mut c, "in").await, "in");

    let host = Host::builder()
        .plugin("echo")
        .args(&["--max-connections-per-ip", "1"])
        .start();
    let _one = connect(&host.url("/echo")).await;
    let err = tokio_tungstenite::connect_async(host.url("/echo"))
        .await
        .expect_err("second from the same IP refused");
    assert_eq!(refusal_status(err), 429);
}

#[tokio::test]
async fn a_flood_of_messages_closes_with_1008() {
    let host = Host::builder()
        .plugin("echo")
        .args(&["--max-message-rate", "20"])
        .start();
    let mut ws = connect(&host.url("/echo")).await;
    for i in 0..200 {
        if ws.send(Message::text(format!("{i}"))).await.is_err() {
            break;
        }
    }
    assert_eq!(
        closed_with(&mut ws).await,
        (1008, "message rate limit exceeded".to_owned())
    );
    let mut other = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut other, "fine").await, "fine");
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let host = Host::builder()
        .plugin("echo")
        .args(&["--max-header-size", "8192"])
        .start();
    let big = "x".repeat(20_000);
    let (status, _, _) = http(
        host.addr,
        &format!("GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"),
        b"",
    );
    assert_eq!(status, 431);
}

#[tokio::test]
async fn a_client_trickling_its_request_head_is_dropped() {
    let host = Host::builder()
        .plugin("echo")
        .args(&["--header-read-timeout", "500ms"])
        .start();
    let mut s = TcpStream::connect(host.addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n").unwrap();
    let addr = host.addr;
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            // One header byte every 100 ms: each arrives well within any per-read timeout.
            for b in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                .iter()
                .cycle()
            {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // The host gives up on the head and closes: the read ends (408 or EOF, or a reset when
    // the close found trickled bytes unread). A read that times out instead (the host never
    // dropped the client) is an error, not an empty answer.
    let mut buf = Vec::new();
    let read = s.read_to_end(&mut buf);
    assert!(
        read.is_ok()
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the host kept the trickling client (the read timed out): {read:?}"
    );
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    writer.join().unwrap();
    // Others are served meanwhile.
    let (status, _, _) = crate::harness::get(addr, "/nothing");
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_origin_allow_list_refuses_other_origins_with_403() {
    let host = Host::builder()
        .plugin("echo")
        .args(&["--allowed-origin", "https://good.example"])
        .start();
    let with_origin = |origin: &str| {
        let mut req = host.url("/echo").into_client_request().unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        req
    };
    let err = tokio_tungstenite::connect_async(with_origin("https://evil.example"))
        .await
        .expect_err("refused");
    assert_eq!(refusal_status(err), 403);
    tokio_tungstenite::connect_async(with_origin("https://good.example"))
        .await
        .expect("allowed");
    // No Origin (a non-browser client) is allowed unless --require-origin.
    connect(&host.url("/echo")).await;
    let strict = Host::builder()
        .plugin("echo")
        .arg("--require-origin")
        .start();
    let err = tokio_tungstenite::connect_async(strict.url("/echo"))
        .await
        .expect_err("refused");
    assert_eq!(refusal_status(err), 403);
}

#[tokio::test]
async fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
    let info = |host: &Host| {
        let (_, _, body) = http(
            host.addr,
            "GET /testkit/info HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n\
             Connection: close\r\n\r\n",
            b"",
        );
        String::from_utf8(body).unwrap()
    };
    let direct = Host::builder().plugin("testkit").start();
    assert!(
        info(&direct).contains("remote_addr=127.0.0.1 "),
        "{}",
        info(&direct)
    );
    let proxied = Host::builder()
        .plugin("testkit")
        .args(&["--trusted-proxy", "127.0.0.0/8"])
        .start();
    assert!(
        info(&proxied).contains("remote_addr=203.0.113.9 "),
        "{}",
        info(&proxied)
    );
}

#[tokio::test]
async fn wss_with_a_generated_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, cert_path, key_path) = crate::harness::self_signed(dir.path());
    let host = Host::builder()
        .plugin("testkit")
        .tls(&cert_path, &key_path)
        .start();

    let connector = crate::harness::tls_connector(&cert, &[]);
    let mut ws = crate::harness::wss_connect(&connector, host.addr, "/testkit/info").await;
    ws.send(Message::text("over tls")).await.unwrap();
    let reply = tokio::time::timeout(PATIENCE, ws.next()).await.unwrap();
    assert_eq!(reply.unwrap().unwrap(), Message::text("over tls"));

    // The plugin sees the scheme: plain requests over TLS are https.
    let mut tls = crate::harness::tls_to(&connector, host.addr).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"GET /testkit/info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("scheme=https"), "{answer}");
}

#[tokio::test]
async fn graceful_shutdown_closes_everyone_with_1001_and_runs_every_on_close() {
    let mut host = Host::builder().plugin("testkit").start();
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&host.url("/testkit")).await;
        ids.push(id_of(&mut ws).await);
        clients.push(ws);
    }
    let waiting: Vec<_> = clients
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { closed_with(&mut ws).await }))
        .collect();
    let (status, host) = tokio::task::spawn_blocking(move || (host.terminate(), host))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    for w in waiting {
        assert_eq!(w.await.unwrap(), (1001, "going away".to_owned()));
    }
    for id in ids {
        host.wait_for_log(&[&format!("on_close conn={id} code="), "plugin=testkit"]);
    }
}

#[tokio::test]
async fn a_message_that_never_completes_is_closed_with_1008() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let host = Host::builder()
        .plugin("echo")
        .args(&["--message-timeout", "300ms"])
        .start();
    let mut ws = connect(&host.url("/echo")).await;
    // The first fragment of a text message, and never the rest.
    let first = Frame::message(b"never finished".to_vec(), OpCode::Data(Data::Text), false);
    ws.send(Message::Frame(first)).await.unwrap();
    assert_eq!(
        closed_with(&mut ws).await,
        (1008, "message timeout".to_owned())
    );
    host.wait_for_log(&["a message took too long to arrive"]);
}

#[tokio::test]
async fn incoming_data_past_the_memory_budget_closes_with_1013() {
    let host = Host::builder()
        .plugin("echo")
        .args(&["--max-buffered-total", "100000"])
        .start();
    let mut small = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut small, "fits").await, "fits");
    let mut big = connect(&host.url("/echo")).await;
    let _ = big.send(Message::binary(vec![0u8; 600_000])).await;
    assert_eq!(closed_with(&mut big).await.0, 1013);
    host.wait_for_log(&["memory budget for buffered bytes exhausted"]);
    // What the refused message held is given back: others still get through.
    assert_eq!(ask(&mut small, "still fits").await, "still fits");
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut host = Host::builder()
        .plugin("echo")
        .args(&["--shutdown-timeout", "10m", "--close-timeout", "10m"])
        .start();
    // A client that never reads never answers the close: the first signal's shutdown waits.
    let mute = connect(&host.url("/echo")).await;
    let status = tokio::task::spawn_blocking(move || {
        host.signal("TERM");
        host.wait_for_log(&["signal received; shutting down"]);
        host.signal("TERM");
        host.wait_exit()
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    drop(mute);
}

/// A masked client frame, final or not, without RSV1.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    crate::compression::client_frame(fin, false, opcode, payload)
}

/// Reads frames until a close frame; its code and reason (other frames are skipped).
fn close_frame(s: &mut TcpStream) -> (u16, String) {
    loop {
        let (_, opcode, payload) = crate::compression::recv(s);
        if opcode == 8 {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            return (code, String::from_utf8(payload[2..].to_vec()).unwrap());
        }
    }
}

#[test]
fn continuation_frames_and_pings_count_against_the_message_rate() {
    let host = Host::builder()
        .plugin("echo")
        .args(&["--max-message-rate", "100"])
        .start();
    // A message in 50 fragments is well within the limit, and echoed whole.
    let (mut s, _) = crate::compression::handshake(host.addr, "/echo", "x-none");
    let mut fragments = client_frame(false, 1, b"a");
    for _ in 0..48 {
        fragments.extend(client_frame(false, 0, b"b"));
    }
    fragments.extend(client_frame(true, 0, b"c"));
    s.write_all(&fragments).unwrap();
    let (_, opcode, payload) = crate::compression::recv(&mut s);
    assert_eq!(
        (opcode, payload),
        (1, [&b"a"[..], &[b'b'; 48], b"c"].concat())
    );

    // Empty fragments of a message that never ends: tungstenite delivers nothing, yet the
    // connection is closed for the rate (not, a minute later, for the message timeout).
    let (mut s, _) = crate::compression::handshake(host.addr, "/echo", "x-none");
    let mut flood = client_frame(false, 1, b"a");
    for _ in 0..5_000 {
        flood.extend(client_frame(false, 0, b""));
    }
    let _ = s.write_all(&flood);
    assert_eq!(
        close_frame(&mut s),
        (1008, "message rate limit exceeded".to_owned())
    );

    // Pings: each is a callback (`on_ping`) and a pong.
    let (mut s, _) = crate::compression::handshake(host.addr, "/echo", "x-none");
    let pings: Vec<u8> = (0..500).flat_map(|_| client_frame(true, 9, b"p")).collect();
    let _ = s.write_all(&pings);
    assert_eq!(
        close_frame(&mut s),
        (1008, "message rate limit exceeded".to_owned())
    );

    let (mut other, _) = crate::compression::handshake(host.addr, "/echo", "x-none");
    other.write_all(&client_frame(true, 1, b"fine")).unwrap();
    assert_eq!(
        crate::compression::recv(&mut other),
        (false, 1, b"fine".to_vec())
    );
}

#[test]
fn a_client_that_floods_on_after_the_rate_close_is_dropped_without_the_handshake() {
    // A close timeout longer than the test waits: only the drop can end the connection.
    let host = Host::builder()
        .plugin("echo")
        .args(&["--max-message-rate", "20", "--close-timeout", "120s"])
        .start();
    let (mut s, _) = crate::compression::handshake(host.addr, "/echo", "x-none");
    let one = client_frame(true, 1, b"x");
    for _ in 0..2_000 {
        if s.write_all(&one).is_err() {
            break; // dropped already
        }
    }
    // Read to the end: a close frame may come first; what must come is the end, not a timeout.
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection was not dropped: {e}"),
        }
    }
}
