//! Parked connections against the real binary: a connection quiet for a few seconds gives up
//! its stream's memory (`wshost_connections_parked` counts it) and answers as before once
//! something arrives or is sent — over TCP, TLS and HTTP/2, with permessage-deflate, with the
//! plugin in a worker process, and when what wakes it is another connection's publish, the
//! plugin's timer or a ping.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{ask, connect, eventually_async, text, Host, PATIENCE};

/// Waits until exactly `n` connections are parked.
async fn parked(host: &Host, n: u32) {
    eventually_async(&format!("{n} connections parked"), || {
        host.metric("wshost_connections_parked") == Some(f64::from(n))
    })
    .await;
}

#[tokio::test]
async fn parked_connections_wake_for_messages_publishes_timers_and_pings() {
    let host = Host::builder().plugin("testkit").start();
    let mut a = connect(&host.url("/testkit")).await;
    let mut b = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut a, "sub:room").await, "Ok(())");
    assert!(ask(&mut b, "info").await.starts_with("id="));
    parked(&host, 2).await;

    // b's message opens b; its publish reaches a, parked, which opens for it.
    assert_eq!(ask(&mut b, "pub:room:hello").await, "published 1");
    assert_eq!(text(&mut a).await, "hello");
    parked(&host, 2).await;

    // The plugin's timer, armed to fire well after a parks: its event opens it.
    assert_eq!(ask(&mut a, "timer:5:3000").await, "Ok(())");
    parked(&host, 2).await;
    assert_eq!(text(&mut a).await, "timer 5");
    parked(&host, 2).await;

    // A ping to a parked connection: the pong comes back.
    a.send(Message::Ping("p".into())).await.unwrap();
    let pong = tokio::time::timeout(PATIENCE, a.next()).await.unwrap();
    assert_eq!(pong.unwrap().unwrap(), Message::Pong("p".into()));

    // Closing a parked connection: the close handshake completes, the count falls.
    parked(&host, 2).await;
    b.close(None).await.unwrap();
    while let Some(Ok(_)) = tokio::time::timeout(PATIENCE, b.next()).await.unwrap() {}
    parked(&host, 1).await;
    assert_eq!(ask(&mut a, "still").await, "still");
}

#[tokio::test]
async fn over_tls_a_parked_connection_answers_after() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, cert_path, key_path) = crate::harness::self_signed(dir.path());
    let host = Host::builder()
        .plugin("echo")
        .tls(&cert_path, &key_path)
        .start();
    let connector = crate::harness::tls_connector(&cert, &[]);
    let mut ws = crate::harness::wss_connect(&connector, host.addr, "/echo").await;
    for round in ["before", "after"] {
        ws.send(Message::text(round)).await.unwrap();
        let reply = tokio::time::timeout(PATIENCE, ws.next()).await.unwrap();
        assert_eq!(reply.unwrap().unwrap(), Message::text(round));
        parked(&host, 1).await;
    }
}

#[tokio::test]
async fn http2_websockets_park_and_answer_after() {
    use crate::http2::{ask2, h2, open};
    let host = Host::builder().plugin("echo").start();
    let mut send = h2(host.addr).await;
    let (mut a, _) = open(&mut send, host.addr, "/echo").await;
    let (mut b, _) = open(&mut send, host.addr, "/echo").await;
    for round in ["before", "after"] {
        assert_eq!(ask2(&mut a, round).await, round);
        assert_eq!(ask2(&mut b, round).await, round);
        parked(&host, 2).await;
    }
}

#[tokio::test]
async fn a_parked_compressed_connection_still_inflates_and_deflates() {
    use crate::compression::{deflate, handshake, inflate, recv, send, JSON};
    let host = Host::builder().plugin("echo").start();
    let (mut s, ext) = handshake(host.addr, "/echo", "permessage-deflate");
    assert!(ext.is_some(), "permessage-deflate negotiated");
    for _ in 0..2 {
        send(&mut s, 1, true, &deflate(JSON.as_bytes()));
        let (rsv1, opcode, payload) = recv(&mut s);
        assert!(rsv1 && opcode == 1);
        assert_eq!(inflate(&payload), JSON.as_bytes());
        parked(&host, 1).await;
    }
}

#[tokio::test]
async fn with_the_plugin_in_a_worker_process_a_parked_connection_answers_after() {
    let host = Host::builder()
        .plugin("echo")
        .args(&["--isolation", "process"])
        .start();
    let mut ws = connect(&host.url("/echo")).await;
    for round in ["before", "after"] {
        assert_eq!(ask(&mut ws, round).await, round);
        parked(&host, 1).await;
    }
}

/// The host's pings and the pongs that answer them pass parked connections without opening
/// them (`wshost_connections_unparked_total` stays where it was), over TCP, with
/// permessage-deflate and over TLS; each connection answers as before after them.
#[tokio::test]
async fn pings_and_their_pongs_pass_parked_connections_without_opening_them() {
    use crate::compression::{deflate, handshake, inflate, recv, send, JSON};
    const PINGS: usize = 5;
    let args = ["--ping-interval", "300ms"];
    let host = Host::builder().plugin("echo").args(&args).start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, cert_path, key_path) = crate::harness::self_signed(dir.path());
    let tls_host = Host::builder()
        .plugin("echo")
        .args(&args)
        .tls(&cert_path, &key_path)
        .start();
    let connector = crate::harness::tls_connector(&cert, &[]);

    let mut ws = connect(&host.url("/echo")).await;
    let mut wss = crate::harness::wss_connect(&connector, tls_host.addr, "/echo").await;
    let (mut raw, ext) = handshake(host.addr, "/echo", "permessage-deflate");
    assert!(ext.is_some(), "permessage-deflate negotiated");
    // The compressed client answers pings itself; the echo of `JSON` is what it waits for.
    let compressed_echo = |raw: &mut std::net::TcpStream| {
        send(raw, 1, true, &deflate(JSON.as_bytes()));
        loop {
            match recv(raw) {
                (false, 9, ping) => send(raw, 0xA, false, &ping),
                (true, 1, payload) => break assert_eq!(inflate(&payload), JSON.as_bytes()),
                other => panic!("unexpected frame {other:?}"),
            }
        }
    };
    let mut raw = tokio::task::spawn_blocking(move || {
        compressed_echo(&mut raw);
        raw
    })
    .await
    .unwrap();
    assert_eq!(ask(&mut ws, "before").await, "before");
    wss.send(Message::text("before")).await.unwrap();
    assert_eq!(text(&mut wss).await, "before");
    parked(&host, 2).await;
    parked(&tls_host, 1).await;
    let unparked = "wshost_connections_unparked_total";
    let opened = (host.metric(unparked), tls_host.metric(unparked));

    // Each client reads PINGS pings, answering each (tungstenite does it on its next read).
    let pings = |n: &mut usize, m: Message| *n += usize::from(m.is_ping());
    let (mut n_ws, mut n_wss) = (0, 0);
    while n_ws < PINGS || n_wss < PINGS {
        tokio::select! {
            m = ws.next(), if n_ws < PINGS => pings(&mut n_ws, m.unwrap().unwrap()),
            m = wss.next(), if n_wss < PINGS => pings(&mut n_wss, m.unwrap().unwrap()),
            () = tokio::time::sleep(PATIENCE) => panic!("no ping within {PATIENCE:?}"),
        }
    }
    let mut raw = tokio::task::spawn_blocking(move || {
        for _ in 0..PINGS {
            let (rsv1, opcode, ping) = recv(&mut raw);
            assert_eq!((rsv1, opcode), (false, 9), "a ping");
            send(&mut raw, 0xA, false, &ping);
        }
        raw
    })
    .await
    .unwrap();
    assert_eq!(
        (host.metric(unparked), tls_host.metric(unparked)),
        opened,
        "a ping or its pong opened a parked connection"
    );

    assert_eq!(ask(&mut ws, "after").await, "after");
    wss.send(Message::text("after")).await.unwrap();
    assert_eq!(text(&mut wss).await, "after");
    tokio::task::spawn_blocking(move || compressed_echo(&mut raw))
        .await
        .unwrap();
}

/// A publish reaches parked subscribers without opening them: over TCP, compressed with
/// permessage-deflate (the frame written on the bare socket is deflated as any other), and
/// over TLS. Only the publisher, whose message arrives, opens.
#[tokio::test]
async fn a_publish_reaches_parked_subscribers_without_opening_them() {
    use crate::compression::{deflate, handshake, inflate, recv, send, JSON};
    let host = Host::builder().plugin("testkit").start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, cert_path, key_path) = crate::harness::self_signed(dir.path());
    let tls_host = Host::builder()
        .plugin("testkit")
        .tls(&cert_path, &key_path)
        .start();
    let connector = crate::harness::tls_connector(&cert, &[]);

    // The compressed subscriber: its frames from the host are deflated (JSON is well over
    // the extension's smallest compressed size).
    let (raw, ext) = handshake(host.addr, "/testkit", "permessage-deflate");
    assert!(ext.is_some(), "permessage-deflate negotiated");
    let text_of = |(rsv1, opcode, payload): (bool, u8, Vec<u8>)| {
        assert_eq!(opcode, 1);
        String::from_utf8(if rsv1 { inflate(&payload) } else { payload }).unwrap()
    };
    let mut raw = tokio::task::spawn_blocking(move || {
        let mut raw = raw;
        send(&mut raw, 1, true, &deflate(b"sub:room"));
        assert_eq!(text_of(recv(&mut raw)), "Ok(())");
        raw
    })
    .await
    .unwrap();
    let mut plain = connect(&host.url("/testkit")).await;
    let mut publisher = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut plain, "sub:room").await, "Ok(())");
    assert!(ask(&mut publisher, "info").await.starts_with("id="));
    let mut tls_sub = crate::harness::wss_connect(&connector, tls_host.addr, "/testkit").await;
    let mut tls_pub = crate::harness::wss_connect(&connector, tls_host.addr, "/testkit").await;
    tls_sub.send(Message::text("sub:room")).await.unwrap();
    assert_eq!(text(&mut tls_sub).await, "Ok(())");
    tls_pub.send(Message::text("info")).await.unwrap();
    assert!(text(&mut tls_pub).await.starts_with("id="));
    parked(&host, 3).await;
    parked(&tls_host, 2).await;
    let unparked = "wshost_connections_unparked_total";
    let opened = (host.metric(unparked), tls_host.metric(unparked));

    let publish = format!("pub:room:{JSON}");
    assert_eq!(ask(&mut publisher, &publish).await, "published 2");
    assert_eq!(text(&mut plain).await, JSON);
    let raw = tokio::task::spawn_blocking(move || {
        let (rsv1, opcode, payload) = recv(&mut raw);
        assert!(rsv1, "deflated");
        assert_eq!(text_of((rsv1, opcode, payload)), JSON);
        raw
    })
    .await
    .unwrap();
    tls_pub.send(Message::text(publish)).await.unwrap();
    assert_eq!(text(&mut tls_pub).await, "published 1");
    assert_eq!(text(&mut tls_sub).await, JSON);
    let plus_one = |n: Option<f64>| n.map(|n| n + 1.0);
    assert_eq!(
        (host.metric(unparked), tls_host.metric(unparked)),
        (plus_one(opened.0), plus_one(opened.1)),
        "only the publishers opened"
    );
    drop(raw);
}

/// Over HTTP/2 too, a publish reaches a parked subscriber without opening it (the frame is
/// written on the stream of the HTTP/2 connection as any other), and the subscriber answers
/// as before after it.
#[tokio::test]
async fn over_http2_a_publish_reaches_a_parked_subscriber_without_opening_it() {
    use crate::http2::{ask2, h2, open};
    let host = Host::builder().plugin("testkit").start();
    let mut send = h2(host.addr).await;
    let (mut sub, _) = open(&mut send, host.addr, "/testkit").await;
    let (mut publisher, _) = open(&mut send, host.addr, "/testkit").await;
    assert_eq!(ask2(&mut sub, "sub:room").await, "Ok(())");
    assert!(ask2(&mut publisher, "info").await.starts_with("id="));
    parked(&host, 2).await;
    let unparked = "wshost_connections_unparked_total";
    let opened = host.metric(unparked).unwrap();
    assert_eq!(ask2(&mut publisher, "pub:room:hello").await, "published 1");
    let delivered = loop {
        match tokio::time::timeout(PATIENCE, sub.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => break t.as_str().to_owned(),
            Some(Ok(_)) => continue,
            other => panic!("no delivery: {other:?}"),
        }
    };
    assert_eq!(delivered, "hello");
    assert_eq!(
        host.metric(unparked),
        Some(opened + 1.0),
        "only the publisher opened"
    );
    assert_eq!(ask2(&mut sub, "still").await, "still");
}

/// A publish to parked subscribers is written to their sockets by the publish's sweep,
/// without waking their sessions: `wshost_deliveries_swept_total` counts each, and no
/// subscriber opens. 300 subscribers: more than tokio's budget of 128 socket operations per
/// poll of a task (a sweep under that budget found the socket "not ready" after 128) and more
/// than one turn of a sweep.
#[tokio::test]
async fn a_publish_is_written_to_parked_subscribers_without_waking_them() {
    const SUBS: usize = 300;
    let host = Host::builder().plugin("testkit").start();
    let mut subs = Vec::new();
    for _ in 0..SUBS {
        let mut ws = connect(&host.url("/testkit")).await;
        assert_eq!(ask(&mut ws, "sub:room").await, "Ok(())");
        subs.push(ws);
    }
    let mut publisher = connect(&host.url("/testkit")).await;
    assert!(ask(&mut publisher, "info").await.starts_with("id="));
    parked(&host, u32::try_from(SUBS).unwrap() + 1).await;
    let swept = "wshost_deliveries_swept_total";
    let unparked = "wshost_connections_unparked_total";
    let (swept_before, opened) = (host.metric(swept).unwrap(), host.metric(unparked).unwrap());

    // One publish at a time: the sweeps of two publishes running at once may meet at a
    // subscriber, and the one that finds its socket in use wakes it instead (as it must).
    for (round, msg) in ["one", "two"].into_iter().enumerate() {
        let published = ask(&mut publisher, &format!("pub:room:{msg}")).await;
        assert_eq!(published, format!("published {SUBS}"));
        for ws in &mut subs {
            assert_eq!(text(ws).await, msg);
        }
        let all = swept_before + ((round + 1) * SUBS) as f64;
        eventually_async(&format!("{all} deliveries swept"), || {
            host.metric(swept) == Some(all)
        })
        .await;
    }
    assert_eq!(
        host.metric(unparked),
        Some(opened + 1.0),
        "only the publisher opened"
    );
}

/// A parked subscriber whose socket is full (its client reads nothing, with a 4 KiB receive
/// buffer; on loopback the server's send buffer still takes a megabyte or more, hence 3 MiB
/// of publishes and a send queue to hold them): the sweep hands what the socket does not take
/// to the subscriber's session, which finishes it once the client reads, so no frame lands in
/// the middle of another, and the subscriber stays parked throughout. Another subscriber,
/// reading, gets every publish meanwhile; the full one, once it reads, gets all of them, whole
/// and in order, and answers as before.
#[tokio::test]
async fn a_full_subscriber_gets_every_publish_whole_once_it_reads() {
    const PUBLISHES: usize = 48;
    let host = Host::builder()
        .plugin("testkit")
        .args(&["--max-send-queue", "16777216"])
        .start();
    let mut full =
        crate::harness::connect_with_recv_buffer(&host, &host.url("/testkit"), 4096).await;
    let mut reading = connect(&host.url("/testkit")).await;
    let mut publisher = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut full, "sub:room").await, "Ok(())");
    assert_eq!(ask(&mut reading, "sub:room").await, "Ok(())");
    assert!(ask(&mut publisher, "info").await.starts_with("id="));
    parked(&host, 3).await;
    let swept = "wshost_deliveries_swept_total";
    let unparked = "wshost_connections_unparked_total";
    let (swept_before, opened) = (host.metric(swept).unwrap(), host.metric(unparked).unwrap());

    let message = |i: usize| char::from(b'0' + i as u8).to_string().repeat(64 << 10);
    let reader = tokio::spawn(async move {
        for i in 0..PUBLISHES {
            assert_eq!(text(&mut reading).await, message(i), "publish {i}");
        }
        // (Kept open: a client that goes away opens its connection, for the close.)
        reading
    });
    for i in 0..PUBLISHES {
        let published = ask(&mut publisher, &format!("pub:room:{}", message(i))).await;
        assert_eq!(published, "published 2");
    }
    let _reading = reader.await.unwrap();
    let all = swept_before + 2.0 * PUBLISHES as f64;
    assert!(
        host.metric(swept).unwrap() < all,
        "the full socket took everything: the test proves nothing"
    );
    for i in 0..PUBLISHES {
        assert_eq!(text(&mut full).await, message(i), "publish {i}");
    }
    assert_eq!(
        host.metric(unparked),
        Some(opened + 1.0),
        "only the publisher opened"
    );
    assert!(ask(&mut full, "info").await.starts_with("id="));
}

/// Parked subscribers, whose sockets are lent to the publish's sweeps, leave cleanly: one
/// whose client goes away ends (no longer parked, off the channel's member count), and on
/// SIGTERM the others get their 1001 close (a close frame takes the socket back) and the host
/// exits.
#[tokio::test]
async fn lent_subscribers_end_when_their_client_goes_and_close_on_sigterm() {
    let mut host = Host::builder().plugin("testkit").start();
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&host.url("/testkit")).await;
        assert_eq!(ask(&mut ws, "sub:room").await, "Ok(())");
        subs.push(ws);
    }
    let mut publisher = connect(&host.url("/testkit")).await;
    assert!(ask(&mut publisher, "info").await.starts_with("id="));
    parked(&host, 4).await;
    let swept = "wshost_deliveries_swept_total";
    let before = host.metric(swept).unwrap();
    assert_eq!(ask(&mut publisher, "pub:room:hi").await, "published 3");
    for ws in &mut subs {
        assert_eq!(text(ws).await, "hi");
    }
    eventually_async("3 deliveries swept", || {
        host.metric(swept) == Some(before + 3.0)
    })
    .await;

    drop(subs.pop());
    // Its session has ended (it left the channel before the count drops): the parked count
    // alone could read 3 while the dropped one is still counted and the publisher is open.
    eventually_async("the dropped subscriber's connection ends", || {
        host.metric(r#"wshost_connections_open{plugin="testkit",generation="1"}"#) == Some(3.0)
    })
    .await;
    parked(&host, 3).await;
    assert_eq!(
        ask(&mut publisher, "subscribers:room").await,
        "subscribers 2"
    );

    // (The publisher's close is read too: the host waits for each close's answer.)
    subs.push(publisher);
    let closing: Vec<_> = subs
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { crate::harness::closed_with(&mut ws).await }))
        .collect();
    let status = tokio::task::spawn_blocking(move || host.terminate())
        .await
        .unwrap();
    for c in closing {
        assert_eq!(c.await.unwrap().0, 1001);
    }
    assert!(status.success(), "{status:?}");
}
