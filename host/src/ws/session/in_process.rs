//! The session in process, with a handler written in the test and an in-memory socket: the
//! timer logic (idle, ping and pong, close handshake deadlines, rate) with paused time, which
//! the runtime advances whenever everything waits.
use std::sync::Mutex;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::DuplexStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::*;
use crate::limits::ConnLimits;
use crate::plugin::{DynConn, FakeEvent, FakeHandler, Handler};

type Client = WebSocketStream<DuplexStream>;
type Events = Arc<Mutex<Vec<String>>>;

/// A virtual hour (time is paused: the runtime jumps to each timer): a session that never
/// does what a test waits for fails it instead of hanging it.
const HOUR: Duration = Duration::from_secs(3600);

/// Starts a session with `config`, `limits` from the plugin's 101, and a handler that
/// records every event and then calls `reply`; returns the client's end, the events and
/// the session's task.
async fn session_with(
    config: Config,
    limits: ConnLimits,
    reply: fn(FakeEvent<'_>, &dyn DynConn),
) -> (Client, Events, tokio::task::JoinHandle<()>) {
    let (client, server) = tokio::io::duplex(256 << 10);
    let (start, events) = fake_start(&config, limits, reply);
    let task = tokio::spawn(serve(
        Socket::Ready(Box::new(SessionIo::Test(server))),
        Box::new(start),
        Arc::new(config),
    ));
    let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    (client, events, task)
}

/// What a session starts from, with a handler that records every event and then calls `reply`.
fn fake_start(
    config: &Config,
    limits: ConnLimits,
    reply: fn(FakeEvent<'_>, &dyn DynConn),
) -> (Start, Events) {
    let hub = Arc::new(Hub::default());
    let registry = Arc::new(
        crate::plugin::registry::Registry::new(Arc::clone(&hub), None).expect("a temp dir"),
    );
    let budget = Arc::new(crate::budget::MemoryBudget::new(config.max_buffered_total));
    let metrics = Arc::new(Metrics::new(
        Arc::clone(&registry),
        Arc::clone(&budget),
        None,
    ));
    let ctx = Arc::new(crate::context::Ctx::new(
        config.clone(),
        registry,
        None,
        Arc::clone(&metrics),
        Arc::clone(&budget),
    ));
    let admission = ctx.admit("127.0.0.1".parse().unwrap()).unwrap();
    let events: Events = Arc::default();
    let seen = Arc::clone(&events);
    let handler = FakeHandler(Box::new(move |event, conn| {
        seen.lock().unwrap().push(match event {
            FakeEvent::Connect => "connect".to_owned(),
            FakeEvent::Text(t) => format!("text {t}"),
            FakeEvent::Binary(b) => format!("binary {}", b.len()),
            FakeEvent::Ping(p) => format!("ping {}", p.len()),
            FakeEvent::Pong(p) => format!("pong {}", p.len()),
            FakeEvent::Error(e) => format!("error {e}"),
            FakeEvent::Drain => "drain".to_owned(),
            FakeEvent::Timer(tag) => format!("timer {tag}"),
            FakeEvent::Sent(tag, ok) => format!("sent {tag} {ok}"),
            FakeEvent::Close(code, reason) => format!("close {code} {reason}"),
        });
        reply(event, conn);
        Ok(())
    }));
    let start = Start {
        id: 1,
        remote: "127.0.0.1:1".into(),
        admission,
        plugin: Arc::new(LoadedPlugin::fake("fake")),
        handler: Handler::Fake(handler),
        facts: Default::default(),
        limits,
        deflate: None,
        hub,
        budget,
        metrics,
        shutdown: ctx.shutdown.clone(),
    };
    (start, events)
}

/// The session's future is the memory of every idle connection (it is the largest part of it),
/// so its size is bounded here: a local that comes to live across an `.await`, or an argument
/// passed unboxed, shows up as a failure rather than as a quiet kilobyte per connection.
/// (2,760 bytes before the setup moved into `open`, 1,624 after; 1,400 once the read loop took
/// the socket's parts behind one reference and the host-wide limits stayed in the config; 1,392
/// with `Alarms` in place of `select!`; 1,008 once tungstenite's stream and the writer were boxed
/// apart so that a parked connection gives them up; 760 with the parked socket boxed too, the
/// close frames boxed, the timings in nanoseconds and the plugin's generation in `Wire`; 752
/// with the read loop's deadlines in one struct and its wake-up read from the timer; 792 with
/// the connection's span (40 B) kept in the session, made when first needed, rather than
/// around the future: the task holds the same. tokio allocates a task in steps of 128 bytes,
/// about 100 more than the future: at this bound the task is 896 bytes (jemalloc's 896 B
/// class), 128 more past it.)
#[tokio::test]
async fn the_sessions_future_stays_small() {
    let config = quiet();
    let (start, _) = fake_start(&config, ConnLimits::default(), none);
    let (_client, server) = tokio::io::duplex(64);
    let session = serve(
        Socket::Ready(Box::new(SessionIo::Test(server))),
        Box::new(start),
        Arc::new(config),
    );
    let size = std::mem::size_of_val(&session);
    assert!(
        size <= SESSION_FUTURE_MAX,
        "the session's future is {size} bytes"
    );
}

/// `ConnShared`, the other large part of every connection, is allocated in an `Arc` (16 bytes
/// more): at 368 bytes that is jemalloc's 384-byte class, at 369 its 448-byte one.
#[test]
fn the_connections_shared_state_stays_in_its_size_class() {
    let size = std::mem::size_of::<crate::ws::conn::ConnShared>();
    assert!(size <= 368, "ConnShared is {size} bytes");
}

/// The bound [`the_sessions_future_stays_small`] holds the session's future to.
const SESSION_FUTURE_MAX: usize = 792;

/// The defaults, without the host's pings.
fn quiet() -> Config {
    Config {
        limits: ConnLimits {
            ping_interval: Some(Duration::ZERO),
            ..ConnLimits::host_defaults()
        },
        ..Config::default()
    }
}

fn none(_: FakeEvent<'_>, _: &dyn DynConn) {}

fn echo(event: FakeEvent<'_>, conn: &dyn DynConn) {
    if let FakeEvent::Text(t) = event {
        conn.send_from_worker(Message::text(t));
    }
}

/// The next close frame the client gets, skipping anything else.
async fn close_of(client: &mut Client) -> (u16, String) {
    let wait = async {
        while let Some(msg) = client.next().await {
            if let Ok(Message::Close(Some(f))) = msg {
                return (u16::from(f.code), f.reason.as_str().to_owned());
            }
        }
        panic!("the connection ended without a close frame");
    };
    tokio::time::timeout(HOUR, wait)
        .await
        .expect("no close frame within a virtual hour")
}

/// Reads on after the server's close frame: the client answers it, and the stream ends.
async fn finish(mut client: Client) {
    while let Some(Ok(_)) = client.next().await {}
}

/// Waits for the session to end.
async fn ended(task: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(HOUR, task)
        .await
        .expect("the session did not end within a virtual hour")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn echoes_and_tells_the_handler_every_event_in_order() {
    let (mut client, events, task) = session_with(quiet(), ConnLimits::default(), echo).await;
    client.send(Message::text("hi")).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::text("hi"));
    client.close(None).await.unwrap();
    ended(task).await;
    assert_eq!(
        *events.lock().unwrap(),
        ["connect", "text hi", "close 1005 "]
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_closes_with_1001_at_its_idle_timeout() {
    let limits = ConnLimits {
        idle_timeout: Some(Duration::from_secs(10)),
        ..ConnLimits::default()
    };
    let started = Instant::now();
    let (mut client, events, task) = session_with(quiet(), limits, none).await;
    assert_eq!(close_of(&mut client).await, (1001, "idle timeout".into()));
    let idle_for = started.elapsed();
    assert!(idle_for >= Duration::from_secs(10), "{idle_for:?}");
    finish(client).await;
    ended(task).await;
    assert_eq!(
        events.lock().unwrap().last().unwrap(),
        "close 1001 idle timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn data_keeps_a_connection_from_idling_out() {
    let limits = ConnLimits {
        idle_timeout: Some(Duration::from_secs(10)),
        ..ConnLimits::default()
    };
    let started = Instant::now();
    let (mut client, _events, task) = session_with(quiet(), limits, echo).await;
    for i in 0..5 {
        tokio::time::sleep(Duration::from_secs(6)).await;
        client.send(Message::text(format!("{i}"))).await.unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::text(format!("{i}"))
        );
    }
    // 30 s in, never 10 s quiet: still open; now quiet, it closes 10 s after the last echo.
    assert_eq!(close_of(&mut client).await.0, 1001);
    assert!(started.elapsed() >= Duration::from_secs(40));
    finish(client).await;
    ended(task).await;
}

/// The session stamps a message read in the same run of work as the callback before it with
/// that callback's end (one clock read per message); a message that comes after the session
/// waited gets the clock of its own arrival. Here the gaps are shorter than the look to park
/// (which would start the connection's state afresh) and nothing is sent back (a send is
/// stamped too), so a stale stamp would idle the connection out after its first message.
#[tokio::test(start_paused = true)]
async fn a_message_after_a_wait_is_stamped_with_its_own_arrival() {
    let limits = ConnLimits {
        idle_timeout: Some(Duration::from_secs(1)),
        ..ConnLimits::default()
    };
    let started = Instant::now();
    let (mut client, events, task) = session_with(quiet(), limits, none).await;
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        client.send(Message::text(format!("{i}"))).await.unwrap();
    }
    assert_eq!(close_of(&mut client).await.0, 1001);
    let open_for = started.elapsed();
    assert!(open_for >= Duration::from_millis(5_500), "{open_for:?}");
    finish(client).await;
    ended(task).await;
    let texts = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.starts_with("text"))
        .count();
    assert_eq!(texts, 5);
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_never_answers_pings_is_dropped_after_the_pong_timeout() {
    let limits = ConnLimits {
        ping_interval: Some(Duration::from_secs(1)),
        pong_timeout: Some(Duration::from_secs(2)),
        ..ConnLimits::default()
    };
    let started = Instant::now();
    // The client is never read, so it never answers the ping.
    let (_client, events, task) = session_with(Config::default(), limits, none).await;
    ended(task).await;
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(events.lock().unwrap().last().unwrap(), "close 1006 ");
}

#[tokio::test(start_paused = true)]
async fn a_close_the_peer_never_answers_ends_at_the_close_timeout() {
    fn close_at_once(event: FakeEvent<'_>, conn: &dyn DynConn) {
        if matches!(event, FakeEvent::Connect) {
            conn.close(4000, "bye").unwrap();
        }
    }
    let config = Config {
        close_timeout: Duration::from_secs(5),
        ..quiet()
    };
    let started = Instant::now();
    let (_client, events, task) = session_with(config, ConnLimits::default(), close_at_once).await;
    ended(task).await;
    assert!(started.elapsed() >= Duration::from_secs(5));
    // The peer sent no close frame: 1006.
    assert_eq!(events.lock().unwrap().last().unwrap(), "close 1006 ");
}

#[tokio::test(start_paused = true)]
async fn past_the_message_rate_the_connection_closes_with_1008() {
    let config = Config {
        max_message_rate: 5,
        ..quiet()
    };
    let (mut client, events, task) = session_with(config, ConnLimits::default(), none).await;
    for i in 0..10 {
        client.send(Message::text(format!("{i}"))).await.unwrap();
    }
    assert_eq!(close_of(&mut client).await.0, 1008);
    finish(client).await;
    ended(task).await;
    let events = events.lock().unwrap();
    // The burst of 5 was delivered; nothing after the limit was.
    assert_eq!(events.iter().filter(|e| e.starts_with("text")).count(), 5);
    assert_eq!(
        events.last().unwrap(),
        "close 1008 message rate limit exceeded"
    );
}

#[tokio::test(start_paused = true)]
async fn timers_fire_in_due_order_move_when_rearmed_and_end_with_the_connection() {
    fn timers(event: FakeEvent<'_>, conn: &dyn DynConn) {
        match event {
            FakeEvent::Connect => {
                let s = Duration::from_secs;
                conn.set_timer(1, s(5)).unwrap();
                conn.set_timer(2, s(3)).unwrap();
                conn.set_timer(1, s(8)).unwrap(); // moved, not added
                conn.set_timer(3, s(1)).unwrap();
                assert!(conn.cancel_timer(3));
                assert!(!conn.cancel_timer(3));
                for tag in 100..162 {
                    conn.set_timer(tag, HOUR).unwrap();
                }
                assert_eq!(
                    conn.set_timer(999, s(1)),
                    Err(plugin_api::SendError::Limit),
                    "64 armed at most"
                );
                // Re-arming an armed tag is no new timer.
                conn.set_timer(100, HOUR).unwrap();
                for tag in 100..162 {
                    conn.cancel_timer(tag);
                }
            }
            FakeEvent::Timer(tag) => {
                conn.send_from_worker(Message::text(format!("timer {tag}")));
                if tag == 1 {
                    conn.set_timer(7, Duration::from_secs(1)).unwrap();
                    conn.close(1000, "done").unwrap();
                }
            }
            _ => {}
        }
    }
    let started = Instant::now();
    let (mut client, events, task) = session_with(quiet(), ConnLimits::default(), timers).await;
    let at = |m: &str, elapsed: Duration| format!("{m} at {}s", elapsed.as_secs());
    let mut seen = Vec::new();
    for _ in 0..2 {
        let msg = client.next().await.unwrap().unwrap();
        seen.push(at(msg.to_text().unwrap(), started.elapsed()));
    }
    assert_eq!(seen, ["timer 2 at 3s", "timer 1 at 8s"]);
    assert_eq!(close_of(&mut client).await, (1000, "done".into()));
    finish(client).await;
    ended(task).await;
    // Timer 7, armed while closing, never fired: timers end with the connection.
    let events = events.lock().unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.starts_with("timer"))
            .collect::<Vec<_>>(),
        ["timer 2", "timer 1"]
    );
}

#[tokio::test(start_paused = true)]
async fn with_a_low_water_mark_on_drain_runs_when_the_queue_falls_to_it() {
    fn fill(event: FakeEvent<'_>, conn: &dyn DynConn) {
        match event {
            FakeEvent::Connect => conn.set_low_water(1000),
            FakeEvent::Text("fill") => {
                for _ in 0..10 {
                    conn.send_from_worker(Message::binary(vec![0u8; 500]));
                }
            }
            FakeEvent::Text("small") => conn.send_from_worker(Message::binary(vec![0u8; 10])),
            _ => {}
        }
    }
    let (mut client, events, task) = session_with(quiet(), ConnLimits::default(), fill).await;
    // Under the mark: no on_drain.
    client.send(Message::text("small")).await.unwrap();
    client.next().await.unwrap().unwrap();
    // Above it (5,000 bytes queued): on_drain once the writer brings it down to the mark.
    client.send(Message::text("fill")).await.unwrap();
    for _ in 0..10 {
        client.next().await.unwrap().unwrap();
    }
    client.close(None).await.unwrap();
    finish(client).await;
    ended(task).await;
    let events = events.lock().unwrap();
    let drains: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| *e == "drain")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(drains.len(), 1, "{events:?}");
    let fill_at = events.iter().position(|e| e == "text fill").unwrap();
    assert!(drains[0] > fill_at, "{events:?}");
}

#[tokio::test(start_paused = true)]
async fn tracked_sends_are_reported_once_written_or_never_written_at_the_end() {
    fn tracked(event: FakeEvent<'_>, conn: &dyn DynConn) {
        match event {
            FakeEvent::Text("two") => {
                conn.send_from_worker_tracked(Message::text("a"), Some(1));
                conn.send_from_worker(Message::text("untracked"));
                conn.send_from_worker_tracked(Message::text("b"), Some(2));
            }
            FakeEvent::Text("bye") => {
                conn.close(1000, "bye").unwrap();
                // Queued after the close frame: never written.
                conn.send_from_worker_tracked(Message::text("late"), Some(3));
            }
            _ => {}
        }
    }
    let (mut client, events, task) = session_with(quiet(), ConnLimits::default(), tracked).await;
    client.send(Message::text("two")).await.unwrap();
    for _ in 0..3 {
        client.next().await.unwrap().unwrap();
    }
    client.send(Message::text("bye")).await.unwrap();
    assert_eq!(close_of(&mut client).await.0, 1000);
    finish(client).await;
    ended(task).await;
    let events = events.lock().unwrap();
    let sent: Vec<&String> = events.iter().filter(|e| e.starts_with("sent")).collect();
    assert_eq!(
        sent,
        ["sent 1 true", "sent 2 true", "sent 3 false"],
        "{events:?}"
    );
    // Reported before on_close.
    let close_at = events.iter().position(|e| e.starts_with("close")).unwrap();
    assert!(events.iter().rposition(|e| e.starts_with("sent")).unwrap() < close_at);
}

/// As [`session_with`], with the host's metrics (whose parked count tells a parked session).
async fn session_with_metrics(
    reply: fn(FakeEvent<'_>, &dyn DynConn),
) -> (Client, Events, tokio::task::JoinHandle<()>, Arc<Metrics>) {
    session_with_config_and_metrics(quiet(), reply).await
}

async fn session_with_config_and_metrics(
    config: Config,
    reply: fn(FakeEvent<'_>, &dyn DynConn),
) -> (Client, Events, tokio::task::JoinHandle<()>, Arc<Metrics>) {
    let (client, server) = tokio::io::duplex(256 << 10);
    let (start, events) = fake_start(&config, ConnLimits::default(), reply);
    let metrics = Arc::clone(&start.metrics);
    let task = tokio::spawn(serve(
        Socket::Ready(Box::new(SessionIo::Test(server))),
        Box::new(start),
        Arc::new(config),
    ));
    let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    (client, events, task, metrics)
}

/// Waits (in virtual time) until the parked count is `n`; how long that took.
async fn parked(metrics: &Metrics, n: i64) -> Duration {
    let started = Instant::now();
    let wait = async {
        while metrics.parked.get() != n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(HOUR, wait)
        .await
        .expect("the parked count did not come within a virtual hour");
    started.elapsed()
}

#[tokio::test(start_paused = true)]
async fn a_quiet_connection_parks_and_what_the_client_sends_opens_it_again() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    fn handler(event: FakeEvent<'_>, conn: &dyn DynConn) {
        match event {
            FakeEvent::Text("timer") => {
                conn.set_timer(1, Duration::from_secs(5)).unwrap();
            }
            FakeEvent::Text(t) => conn.send_from_worker(Message::text(t)),
            FakeEvent::Timer(1) => {
                conn.send_from_worker(Message::text("tick"));
                conn.set_timer(2, Duration::from_secs(5)).unwrap();
            }
            FakeEvent::Timer(_) => conn.close(4000, "done").unwrap(),
            _ => {}
        }
    }
    let (mut client, events, task, metrics) = session_with_metrics(handler).await;
    let next_text = |m: Option<Result<Message, WsError>>| m.unwrap().unwrap().into_text().unwrap();

    client.send(Message::text("a")).await.unwrap();
    assert_eq!(next_text(client.next().await), "a");
    // The first look (a second after it opened) finds the echo; the next, two seconds later,
    // parks it.
    let quiet = parked(&metrics, 1).await;
    assert!(
        quiet >= 2 * PARK_AFTER && quiet <= 3 * PARK_AFTER + PARK_AFTER / 10,
        "{quiet:?}"
    );

    // A message: opened, answered.
    client.send(Message::text("b")).await.unwrap();
    assert_eq!(next_text(client.next().await), "b");
    assert_eq!(metrics.parked.get(), 0);
    // Woken, it is looked at from the start again (not at the longer wait it had reached).
    let again = parked(&metrics, 1).await;
    assert!(again <= 3 * PARK_AFTER + PARK_AFTER / 10, "{again:?}");

    // A ping: tungstenite's pong comes from the stream made again.
    client.send(Message::Ping("p".into())).await.unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::Pong("p".into())
    );
    parked(&metrics, 1).await;

    // Half a fragmented message: the connection stays open (tungstenite holds the part).
    let first = Frame::message(&b"frag"[..], OpCode::Data(Data::Text), false);
    client.send(Message::Frame(first)).await.unwrap();
    parked(&metrics, 0).await;
    tokio::time::sleep(5 * PARK_AFTER).await;
    assert_eq!(metrics.parked.get(), 0, "parked with a message part-way in");
    let last = Frame::message(&b"ment"[..], OpCode::Data(Data::Continue), true);
    client.send(Message::Frame(last)).await.unwrap();
    assert_eq!(next_text(client.next().await), "fragment");
    parked(&metrics, 1).await;

    // The plugin's timer, due while parked: its send goes out without opening it; the
    // second timer's close opens it.
    client.send(Message::text("timer")).await.unwrap();
    parked(&metrics, 0).await;
    parked(&metrics, 1).await;
    let opened = metrics.unparked.get();
    assert_eq!(next_text(client.next().await), "tick");
    assert_eq!(metrics.unparked.get(), opened, "the timer's send opened it");
    assert_eq!(close_of(&mut client).await, (4000, "done".into()));
    finish(client).await;
    ended(task).await;
    assert_eq!(metrics.parked.get(), 0);
    assert_eq!(
        *events.lock().unwrap(),
        [
            "connect",
            "text a",
            "text b",
            "ping 1",
            "text fragment",
            "text timer",
            "timer 1",
            "timer 2",
            "close 4000 done"
        ]
    );
}

/// The host's ping and the client's pong pass a parked connection without opening it: the
/// ping is written on the bare socket and the pong read there (the plugin's `on_pong` still
/// runs). Before, each ping made the connection's stream again until the pong came.
#[tokio::test(start_paused = true)]
async fn a_parked_connection_stays_parked_through_the_hosts_ping_and_its_pong() {
    let interval = Duration::from_secs(30);
    let config = Config {
        limits: ConnLimits {
            ping_interval: Some(interval),
            ..ConnLimits::host_defaults()
        },
        ..Config::default()
    };
    let (mut client, events, task, metrics) = session_with_config_and_metrics(config, echo).await;
    client.send(Message::text("a")).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::text("a"));
    // The client reads from now on (answering pings as it reads them), counting the pings.
    let pings = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&pings);
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = client.next().await {
            if m.is_ping() {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    parked(&metrics, 1).await;
    let opened = metrics.unparked.get();
    let pongs = || {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.starts_with("pong"))
            .count()
    };
    tokio::time::timeout(HOUR, async {
        while pongs() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the host pings every 30 s");
    assert_eq!(pings.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(metrics.unparked.get(), opened, "a ping or pong opened it");
    assert_eq!(metrics.parked.get(), 1);
    task.abort();
    reader.abort();
}

/// A client frame as a client sends it: final, masked.
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [3u8, 1, 4, 1];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    frame
}

/// Only a whole pong is read on a parked connection; a pong in two parts, or one followed by
/// a message in the same read, is left to tungstenite, which gets every byte of it.
#[tokio::test(start_paused = true)]
async fn a_parked_connection_reads_only_whole_pongs_itself() {
    use tokio::io::AsyncWriteExt as _;
    let (mut client, events, task, metrics) = session_with_metrics(echo).await;
    client.send(Message::text("a")).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::text("a"));
    parked(&metrics, 1).await;
    let opened = metrics.unparked.get();
    let count = |prefix: &str| {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.starts_with(prefix))
            .count()
    };
    let until = |prefix: &'static str, n: usize| {
        let count = &count;
        async move {
            tokio::time::timeout(HOUR, async {
                while count(prefix) < n {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the event came");
        }
    };

    // An unsolicited pong with a payload: read parked, told to the plugin.
    client
        .get_mut()
        .write_all(&masked(0xA, b"xyz"))
        .await
        .unwrap();
    until("pong", 1).await;
    assert_eq!(metrics.unparked.get(), opened);
    assert_eq!(metrics.parked.get(), 1);

    // Two pongs in one read: both read parked.
    let mut two = masked(0xA, b"");
    two.extend(masked(0xA, b"12"));
    client.get_mut().write_all(&two).await.unwrap();
    until("pong", 3).await;
    assert_eq!(metrics.unparked.get(), opened);

    // A pong in two parts: the first part opens the connection; tungstenite reads the pong.
    let split = masked(0xA, b"half");
    client.get_mut().write_all(&split[..3]).await.unwrap();
    parked(&metrics, 0).await;
    client.get_mut().write_all(&split[3..]).await.unwrap();
    until("pong", 4).await;
    assert_eq!(metrics.unparked.get(), opened + 1);
    parked(&metrics, 1).await;

    // A pong and a message in one read: the pong parked, then the message opens it.
    let mut both = masked(0xA, b"p");
    both.extend(masked(0x1, b"after"));
    client.get_mut().write_all(&both).await.unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::text("after")
    );
    assert_eq!(metrics.unparked.get(), opened + 2);
    task.abort();
    let events = events.lock().unwrap().clone();
    assert_eq!(
        events[..],
        [
            "connect",
            "text a",
            "pong 3",
            "pong 0",
            "pong 2",
            "pong 4",
            "pong 1",
            "text after"
        ]
    );
}

/// Waits until `events` has an event starting with `prefix`.
async fn event_seen(events: &Events, prefix: &str) {
    tokio::time::timeout(HOUR, async {
        while !events.lock().unwrap().iter().any(|e| e.starts_with(prefix)) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the event came within a virtual hour");
}

/// What is sent to a parked connection goes out without opening it: data messages, the
/// plugin's ping (and the pong that answers it comes in parked). A tracked send needs the
/// stream: it opens the connection, behind the frames queued before it.
#[tokio::test(start_paused = true)]
async fn sends_to_a_parked_connection_go_out_without_opening_it() {
    fn handler(event: FakeEvent<'_>, conn: &dyn DynConn) {
        match event {
            FakeEvent::Text(_) => conn.set_timer(1, Duration::from_secs(30)).unwrap(),
            FakeEvent::Timer(1) => {
                conn.send_from_worker(Message::text("one"));
                conn.send_from_worker(Message::Ping("p".into()));
                conn.send_from_worker(Message::binary(vec![1, 2, 3]));
                conn.send_from_worker(Message::text("two"));
                conn.set_timer(2, Duration::from_secs(30)).unwrap();
            }
            FakeEvent::Timer(_) => {
                conn.send_from_worker(Message::text("three"));
                conn.send_from_worker_tracked(Message::text("tracked"), Some(7));
                conn.send_from_worker(Message::text("last"));
            }
            _ => {}
        }
    }
    let (mut client, events, task, metrics) = session_with_metrics(handler).await;
    client.send(Message::text("go")).await.unwrap();
    parked(&metrics, 1).await;
    let opened = metrics.unparked.get();
    let sent = metrics.messages_out.get();
    let next = |m: Option<Result<Message, WsError>>| m.unwrap().unwrap();
    assert_eq!(next(client.next().await), Message::text("one"));
    assert_eq!(next(client.next().await), Message::Ping("p".into()));
    assert_eq!(next(client.next().await), Message::binary(vec![1, 2, 3]));
    assert_eq!(next(client.next().await), Message::text("two"));
    // (The client's pong to the ping went out as it read on.)
    event_seen(&events, "pong").await;
    assert_eq!(metrics.unparked.get(), opened, "a send opened it");
    assert_eq!(metrics.parked.get(), 1);
    assert_eq!(metrics.messages_out.get(), sent + 3);

    // The second timer: "three" parked, then the tracked send opens it.
    assert_eq!(next(client.next().await), Message::text("three"));
    assert_eq!(next(client.next().await), Message::text("tracked"));
    assert_eq!(next(client.next().await), Message::text("last"));
    event_seen(&events, "sent 7 true").await;
    assert_eq!(metrics.unparked.get(), opened + 1);
    parked(&metrics, 1).await;
    task.abort();
    assert_eq!(
        events.lock().unwrap()[..],
        [
            "connect",
            "text go",
            "timer 1",
            "pong 1",
            "timer 2",
            "sent 7 true"
        ]
    );
}

/// A connection that only receives (a subscriber, a server push) parks though it is sent a
/// message every 300 ms, and gets the rest of them parked: writes do not keep it open.
#[tokio::test(start_paused = true)]
async fn a_connection_that_only_receives_parks_and_is_written_to_parked() {
    fn handler(event: FakeEvent<'_>, conn: &dyn DynConn) {
        match event {
            FakeEvent::Text(_) => conn.set_timer(1, Duration::from_millis(300)).unwrap(),
            FakeEvent::Timer(_) => {
                conn.send_from_worker(Message::text("tick"));
                conn.set_timer(1, Duration::from_millis(300)).unwrap();
            }
            _ => {}
        }
    }
    let (mut client, _events, task, metrics) = session_with_metrics(handler).await;
    client.send(Message::text("go")).await.unwrap();
    let ticks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&ticks);
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = client.next().await {
            assert_eq!(m, Message::text("tick"));
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    parked(&metrics, 1).await;
    let opened = metrics.unparked.get();
    let before = ticks.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = ticks.load(std::sync::atomic::Ordering::SeqCst);
    assert!(after >= before + 30, "{before} -> {after} ticks in 10 s");
    assert_eq!(metrics.unparked.get(), opened);
    assert_eq!(metrics.parked.get(), 1);
    task.abort();
    reader.abort();
}

/// A frame the socket does not take at once (the client is not reading) is finished before
/// anything else is written, and the connection stays parked meanwhile.
#[tokio::test(start_paused = true)]
async fn a_frame_part_way_out_of_a_parked_connection_is_finished_first() {
    const BIG: usize = 1 << 20;
    fn handler(event: FakeEvent<'_>, conn: &dyn DynConn) {
        match event {
            FakeEvent::Text(_) => conn.set_timer(1, Duration::from_secs(30)).unwrap(),
            FakeEvent::Timer(_) => {
                conn.send_from_worker(Message::binary(vec![7u8; BIG]));
                conn.send_from_worker(Message::text("after"));
            }
            _ => {}
        }
    }
    let (mut client, events, task, metrics) = session_with_metrics(handler).await;
    client.send(Message::text("go")).await.unwrap();
    parked(&metrics, 1).await;
    let opened = metrics.unparked.get();
    // The timer fires; the client reads nothing yet (the in-memory pipe holds 256 KiB).
    event_seen(&events, "timer").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(metrics.parked.get(), 1);
    assert_eq!(metrics.unparked.get(), opened);
    let next = |m: Option<Result<Message, WsError>>| m.unwrap().unwrap();
    assert_eq!(next(client.next().await), Message::binary(vec![7u8; BIG]));
    assert_eq!(next(client.next().await), Message::text("after"));
    assert_eq!(metrics.unparked.get(), opened);
    task.abort();
}

/// A read that fails while a frame is part-way out of a parked connection (here the memory
/// budget, full with that frame) ends the session at once: it does not wait for a client that
/// reads nothing to take the frame first.
#[tokio::test(start_paused = true)]
async fn a_failed_read_while_a_frame_is_part_way_out_ends_the_session() {
    use tokio::io::AsyncWriteExt as _;
    const BIG: usize = 1 << 20;
    fn handler(event: FakeEvent<'_>, conn: &dyn DynConn) {
        match event {
            FakeEvent::Text(_) => conn.set_timer(1, Duration::from_secs(30)).unwrap(),
            FakeEvent::Timer(_) => conn.send_from_worker(Message::binary(vec![7u8; BIG])),
            _ => {}
        }
    }
    let config = Config {
        // The frame queued takes all of it but 100 bytes until it is written.
        max_buffered_total: BIG as u64 + 100,
        ..quiet()
    };
    let (mut client, events, task, metrics) =
        session_with_config_and_metrics(config, handler).await;
    client.send(Message::text("go")).await.unwrap();
    parked(&metrics, 1).await;
    event_seen(&events, "timer").await;
    // The client, reading nothing, sends more than the budget has left.
    client
        .get_mut()
        .write_all(&masked(0x1, &[b'x'; 125]))
        .await
        .unwrap();
    client
        .get_mut()
        .write_all(&masked(0x1, &[b'y'; 125]))
        .await
        .unwrap();
    ended(task).await;
    let events = events.lock().unwrap().clone();
    assert!(
        events.iter().any(|e| e.starts_with("error")),
        "the read failed: {events:?}"
    );
    assert!(
        events.last().unwrap().starts_with("close 1013"),
        "{events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_gone_while_parked_ends_the_session() {
    let (mut client, events, task, metrics) = session_with_metrics(echo).await;
    client.send(Message::text("a")).await.unwrap();
    client.next().await.unwrap().unwrap();
    parked(&metrics, 1).await;
    drop(client);
    ended(task).await;
    assert_eq!(metrics.parked.get(), 0);
    assert_eq!(events.lock().unwrap().last().unwrap(), "close 1006 ");
}

/// Counts the `conn` spans made, and notes each event with whether a `conn` span held it,
/// while it is the thread's subscriber (at `info`, the host's default).
#[derive(Clone, Default)]
struct ConnSpans {
    made: Arc<std::sync::atomic::AtomicUsize>,
    events: Arc<Mutex<Vec<(String, bool)>>>,
}

impl<S> tracing_subscriber::Layer<S> for ConnSpans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() == "conn" {
            self.made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let in_conn = ctx
            .event_scope(event)
            .is_some_and(|mut scope| scope.any(|span| span.name() == "conn"));
        let mut message = String::new();
        event.record(
            &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                if field.name() == "message" {
                    message = format!("{value:?}");
                }
            },
        );
        self.events.lock().unwrap().push((message, in_conn));
    }
}

impl ConnSpans {
    fn made(&self) -> usize {
        self.made.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Installs it as this thread's subscriber (the in-process sessions run on it).
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::Layer as _;
        tracing::subscriber::set_default(
            tracing_subscriber::registry().with(
                self.clone()
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            ),
        )
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_makes_its_span_only_when_something_of_it_is_logged() {
    let spans = ConnSpans::default();
    let _subscriber = spans.install();
    let (mut client, _, task) = session_with(quiet(), ConnLimits::default(), echo).await;
    client.send(Message::text("hi")).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::text("hi"));
    client.close(None).await.unwrap();
    ended(task).await;
    assert_eq!(
        spans.made(),
        0,
        "a connection that logged nothing made a span"
    );

    // Every callback is "slow" here: each one logs a warning, in the connection's one span.
    let config = Config {
        slow_callback: Duration::ZERO,
        ..quiet()
    };
    let (mut client, _, task) = session_with(config, ConnLimits::default(), echo).await;
    for text in ["a", "b"] {
        client.send(Message::text(text)).await.unwrap();
        assert_eq!(client.next().await.unwrap().unwrap(), Message::text(text));
    }
    client.close(None).await.unwrap();
    ended(task).await;
    assert_eq!(spans.made(), 1);
    let events = spans.events.lock().unwrap();
    let slow: Vec<_> = events
        .iter()
        .filter(|(message, _)| message.starts_with("slow callback"))
        .collect();
    // on_connect, two on_text and on_close.
    assert_eq!(slow.len(), 4, "{events:?}");
    assert!(slow.iter().all(|(_, in_conn)| *in_conn), "{events:?}");
}
