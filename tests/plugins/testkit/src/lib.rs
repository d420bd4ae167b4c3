//! `testkit`: a plugin for the integration tests, at `/testkit`. Each text message is a
//! command that makes the plugin misbehave or exercise one part of the interface.
//!
//! Every connection's `on_connect` and `on_close` are published to the channel `events` as
//! `connect ID` and `close ID CODE REASON`; `/testkit/observe` subscribes to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use plugin_api::{export_plugin, Conn, Handler, Host, Plugin, PluginError, Request, Response};

/// The test plugin.
#[derive(Debug)]
pub struct Testkit {
    host: Host,
    closes: Arc<AtomicU64>,
}

impl Plugin for Testkit {
    const NAME: &'static str = "testkit";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const ROUTES: &'static [&'static str] = &["/testkit"];

    fn new(host: Host) -> Result<Self, PluginError> {
        host.info("testkit started");
        Ok(Testkit {
            host,
            closes: Arc::default(),
        })
    }

    fn upgrade(&self, req: &Request<'_>) -> Response {
        match req.path_info() {
            "/reject" => Response::reject(403, "go away").header("x-reason", "testing"),
            "/panic" => panic!("testkit: upgrade panics on request"),
            "/gate" => {
                // Blocks in `upgrade` until the file `?file=` exists.
                wait_for_file(&req.query_param("file").unwrap_or_default());
                self.accept(req, false)
            }
            "/defer" => {
                // Decides later, on a thread: accepts, or refuses with `?reject=1`; with
                // `?never=1` never answers and reports when the host stops waiting; with
                // `?drop=1` drops the responder.
                let Some(responder) = req.defer() else {
                    return Response::reject(500, "cannot defer");
                };
                let reject = req.query_param("reject").is_some();
                let never = req.query_param("never").is_some();
                let drop_it = req.query_param("drop").is_some();
                let accept = self.accept(req, false);
                let host = self.host.clone();
                std::thread::spawn(move || {
                    if drop_it {
                        return;
                    }
                    if never {
                        while responder.is_waiting() {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        host.info("testkit: the host stopped waiting for a deferred decision");
                        let late = responder.respond(Response::reject(418, "late"));
                        host.info(&format!("testkit: a late answer gets {late:?}"));
                        return;
                    }
                    let response = if reject {
                        Response::reject(403, "decided later: no")
                    } else {
                        accept
                    };
                    let _ = responder.respond(response);
                });
                Response::deferred()
            }
            path => self.accept(req, path == "/observe"),
        }
    }

    fn request(&self, req: &Request<'_>) -> Response {
        match req.path_info() {
            "/panic" => panic!("testkit: request panics on request"),
            "/body" => Response::status(200)
                .header("content-type", "application/octet-stream")
                .body(req.body()),
            "/info" => {
                let headers: Vec<String> = req
                    .headers()
                    .filter(|(k, _)| k.starts_with("x-"))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                Response::text(&format!(
                    "method={} path={} route={} path_info={} query={} scheme={} protocol={} \
                     server_name={} server_port={} remote_addr={} upgrade={} headers={}",
                    req.method(),
                    req.path(),
                    req.route(),
                    req.path_info(),
                    req.query(),
                    req.scheme(),
                    req.protocol(),
                    req.server_name(),
                    req.server_port(),
                    req.remote_addr(),
                    req.is_upgrade(),
                    headers.join(",")
                ))
            }
            _ => Response::not_found(),
        }
    }

    fn on_timer(&self, tag: u64) {
        self.host.publish_text("events", &format!("ptimer {tag}"));
    }

    fn on_channel(&self, channel: &str, event: plugin_api::ChannelEvent<'_>) {
        let what = match event {
            plugin_api::ChannelEvent::Joined(m) => format!("joined {}", m.label),
            plugin_api::ChannelEvent::Left(m) => format!("left {}", m.label),
            plugin_api::ChannelEvent::Text(t) => format!("text {t}"),
            plugin_api::ChannelEvent::Binary(b) => format!("binary {}", b.len()),
            _ => "other".to_owned(),
        };
        self.host
            .publish_text("events", &format!("watch {channel} {what}"));
    }

    fn replaced(&self) {
        let thread = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default();
        self.host
            .info(&format!("testkit replaced, on thread {}", thread.trim()));
    }

    fn shutdown(&self) {
        // The OS name of the thread (this plugin's own std does not know the host's threads).
        let thread = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default();
        self.host
            .info(&format!("testkit shutdown on thread {}", thread.trim()));
        if let Some(ms) = self
            .host
            .config()
            .get("shutdown_sleep_ms")
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
}

/// Waits until `path` exists (a gate a test opens by creating the file).
fn wait_for_file(path: &str) {
    while !std::path::Path::new(path).exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Testkit {
    fn accept(&self, req: &Request<'_>, observe: bool) -> Response {
        let mut response = Response::accept(Kit {
            host: self.host.clone(),
            closes: Arc::clone(&self.closes),
            observe,
            panic_on_drop: false,
            stream_left: 0,
            streaming: false,
        })
        .header("set-cookie", "testkit=1")
        .header("x-request", &format!("{} {}", req.method(), req.protocol()));
        if let Some(p) = req.query_param("proto") {
            response = response.protocol(&p);
        } else if let Some(p) = req.subprotocols().next() {
            response = response.protocol(p);
        }
        if let Some(n) = req.query_param("max_message").and_then(|n| n.parse().ok()) {
            response = response.max_message_size(n);
        }
        if let Some(n) = req.query_param("max_queue").and_then(|n| n.parse().ok()) {
            response = response.max_send_queue(n);
        }
        if let Some(h) = req.query_param("keep") {
            response = response.keep_header(&h);
        }
        if req.query_param("nocompress").is_some() {
            response = response.compression(false);
        }
        response
    }
}

struct Kit {
    host: Host,
    closes: Arc<AtomicU64>,
    observe: bool,
    panic_on_drop: bool,
    /// Bytes of a `stream` command still to send.
    stream_left: u64,
    /// A `stream` command is under way (its last word may still be waiting for room).
    streaming: bool,
}

impl Kit {
    fn event(&self, line: &str) {
        self.host.publish_text("events", line);
    }

    /// Sends the stream's next messages until the queue is full (`on_drain` goes on) or the
    /// stream is done (then it says `stream done`).
    fn pump(&mut self, conn: &Conn) {
        const CHUNK: u64 = 64 << 10;
        while self.stream_left > 0 {
            let n = self.stream_left.min(CHUNK);
            match conn.send_binary(&vec![b'x'; n as usize]) {
                Ok(()) => self.stream_left -= n,
                Err(plugin_api::SendError::QueueFull) => return,
                Err(_) => {
                    self.streaming = false;
                    self.stream_left = 0;
                    return;
                }
            }
        }
        // The last word waits for room too.
        if conn.send_text("stream done") != Err(plugin_api::SendError::QueueFull) {
            self.streaming = false;
        }
    }
}

impl Handler for Kit {
    fn on_connect(&mut self, conn: &Conn) {
        if self.observe {
            conn.subscribe("events")
                .expect("an open connection can subscribe");
        }
        self.event(&format!("connect {}", conn.id()));
    }

    fn on_text(&mut self, conn: &Conn, text: &str) {
        let (cmd, arg) = text.split_once(':').unwrap_or((text, ""));
        let reply = match cmd {
            "panic" => panic!("testkit: on_text panics on request"),
            "drop-panic" => {
                self.panic_on_drop = true;
                "armed".to_owned()
            }
            "sleep" => {
                std::thread::sleep(Duration::from_millis(arg.parse().unwrap_or(100)));
                "slept".to_owned()
            }
            "sub" => format!("{:?}", conn.subscribe(arg)),
            "unsub" => format!("{}", conn.unsubscribe(arg)),
            "pub" => {
                let (channel, msg) = arg.split_once(':').unwrap_or((arg, ""));
                format!("published {}", self.host.publish_text(channel, msg))
            }
            "pubbin" => format!(
                "published {}",
                self.host.publish_binary(arg, &[0, 1, 2, 255])
            ),
            "subscribers" => format!("subscribers {}", self.host.subscribers(arg)),
            "close" => {
                let (code, reason) = arg.split_once(':').unwrap_or((arg, ""));
                match conn.close(code.parse().unwrap_or(0), reason) {
                    Ok(()) => {
                        // Sends after close are refused.
                        let after = conn.send_text("after close");
                        self.event(&format!("send-after-close {} {after:?}", conn.id()));
                        return;
                    }
                    Err(e) => format!("close refused: {e:?}"),
                }
            }
            "spawn" => {
                let n: u32 = arg.parse().unwrap_or(10);
                let conn = conn.clone();
                std::thread::spawn(move || {
                    for i in 0..n {
                        if conn.send_text(&format!("bg {i}")).is_err() {
                            return;
                        }
                    }
                });
                return;
            }
            "info" => format!(
                "id={} open={} remote={} buffered={}",
                conn.id(),
                conn.is_open(),
                conn.remote_addr(),
                conn.buffered_amount()
            ),
            "config-json" => self.host.config_value().to_string(),
            "facts" => format!(
                "local={} secure={} path={} query={}",
                conn.local_addr(),
                conn.is_secure(),
                conn.path(),
                conn.query()
            ),
            "idle" => format!(
                "idle set {}",
                conn.set_idle_timeout(Duration::from_millis(arg.parse().unwrap_or(1000)))
            ),
            "config-text" => format!("{:?}", self.host.config().get(arg)),
            "log" => {
                self.host.warn(&format!("testkit says {arg}"));
                "logged".to_owned()
            }
            "ping" => format!("{:?}", conn.ping(arg.as_bytes())),
            "flood" => {
                // Queue COUNT messages of SIZE bytes as fast as possible; report how far it got.
                let (count, size) = arg.split_once(':').unwrap_or((arg, "1024"));
                let (count, size): (usize, usize) =
                    (count.parse().unwrap_or(100), size.parse().unwrap_or(1024));
                let payload = vec![b'f'; size];
                let mut sent = 0;
                let mut error = None;
                for _ in 0..count {
                    match conn.send_binary(&payload) {
                        Ok(()) => sent += 1,
                        Err(e) => {
                            error = Some(e);
                            break;
                        }
                    }
                }
                self.event(&format!(
                    "flood {} sent={sent} error={error:?} buffered={}",
                    conn.id(),
                    conn.buffered_amount()
                ));
                return;
            }
            "closes" => format!("closes {}", self.closes.load(Ordering::SeqCst)),
            "timer" => {
                // Arm timer TAG to fire after MS milliseconds (`on_timer` says `timer TAG`).
                let (tag, ms) = arg.split_once(':').unwrap_or((arg, "0"));
                format!(
                    "{:?}",
                    conn.set_timer(
                        Duration::from_millis(ms.parse().unwrap_or(0)),
                        tag.parse().unwrap_or(0)
                    )
                )
            }
            "cancel" => format!("{}", conn.cancel_timer(arg.parse().unwrap_or(0))),
            "header" => format!("{:?}", conn.header(arg)),
            "lowwater" => format!("{}", conn.set_low_water(arg.parse().unwrap_or(0))),
            "label" => format!("{}", conn.set_label(arg)),
            "tsend" => {
                // A tracked send of TEXT with tag TAG (`on_sent` says `sent TAG WRITTEN`).
                let (tag, text) = arg.split_once(':').unwrap_or((arg, ""));
                format!(
                    "{:?}",
                    conn.send_text_tracked(text, tag.parse().unwrap_or(0))
                )
            }
            "members" => {
                let labels: Vec<String> = self
                    .host
                    .members(arg)
                    .into_iter()
                    .map(|m| format!("{}={}", m.id, m.label))
                    .collect();
                format!("members {}", labels.join(","))
            }
            // Plugin-level: watch a channel (its events go to the `events` channel), a timer.
            "watch" => format!("{}", self.host.watch(arg)),
            "unwatch" => format!("{}", self.host.unwatch(arg)),
            "ptimer" => {
                let (tag, ms) = arg.split_once(':').unwrap_or((arg, "0"));
                format!(
                    "{}",
                    self.host.set_timer(
                        Duration::from_millis(ms.parse().unwrap_or(0)),
                        tag.parse().unwrap_or(0)
                    )
                )
            }
            "leak" => {
                // A thread that publishes to ARG forever: `shutdown` does not stop it.
                let (host, channel) = (self.host.clone(), arg.to_owned());
                std::thread::spawn(move || {
                    for i in 0u64.. {
                        host.publish_text(&channel, &format!("leak {i}"));
                        std::thread::sleep(Duration::from_millis(2));
                    }
                });
                "leaking".to_owned()
            }
            "send" => {
                // Send one binary message of ARG bytes; report the result.
                let n: usize = arg.parse().unwrap_or(0);
                format!(
                    "send {:?}",
                    conn.send_binary(&vec![b's'; n])
                        .map_err(|e| format!("{e:?}"))
                )
            }
            "stream" => {
                // Send ARG bytes in 64 KiB messages, paced by `on_drain`.
                self.stream_left = arg.parse().unwrap_or(0);
                self.streaming = true;
                self.pump(conn);
                return;
            }
            // Faults a plugin can have; in process isolation each ends only its worker.
            "abort" => std::process::abort(),
            "exit" => std::process::exit(arg.parse().unwrap_or(7)),
            "segv" => {
                #[allow(unsafe_code, reason = "a deliberate null-pointer write")]
                // SAFETY: not safe at all: this writes through a null pointer on purpose, to
                // crash with SIGSEGV as a buggy plugin would.
                unsafe {
                    std::ptr::write_volatile(std::ptr::null_mut::<u64>(), 1);
                }
                "survived".to_owned()
            }
            "overflow" => format!("{}", recurse(u64::MAX)),
            "drop-unwind-panic" => {
                // A panic in a `Drop` while a panic unwinds: Rust aborts the process.
                let _bomb = PanicOnDrop;
                panic!("testkit: the first panic");
            }
            "alloc" => {
                // Allocates ARG MiB and touches every page (a leak the size of it).
                let mib: usize = arg.parse().unwrap_or(1);
                let mut v = vec![0u8; mib << 20];
                for i in (0..v.len()).step_by(4096) {
                    v[i] = 1;
                }
                std::mem::forget(v);
                "allocated".to_owned()
            }
            "pid" => format!("pid {}", std::process::id()),
            "spin" => loop {
                // A callback that never returns.
                std::hint::spin_loop();
            },
            "block" => {
                // Blocks this callback until the file ARG exists.
                wait_for_file(arg);
                "unblocked".to_owned()
            }
            "pausegate" => {
                // Stops reading until the file ARG exists (checked on a thread of the plugin's).
                conn.pause();
                let (conn, gate) = (conn.clone(), arg.to_owned());
                std::thread::spawn(move || {
                    wait_for_file(&gate);
                    conn.resume();
                });
                "paused".to_owned()
            }
            "thread-panic" => {
                std::thread::Builder::new()
                    .name("testkit-worker".into())
                    .spawn(|| panic!("testkit: a plugin thread panics"))
                    .expect("a thread starts");
                "spawned".to_owned()
            }
            "config" => format!("{:?}", self.host.config().get(arg)),
            _ => text.to_owned(),
        };
        let _ = conn.send_text(&reply);
    }

    fn on_binary(&mut self, conn: &Conn, data: &[u8]) {
        let _ = conn.send_binary(data);
    }

    fn on_pong(&mut self, conn: &Conn, payload: &[u8]) {
        // Report pongs to the `ping` command's pings; the host's own pings carry no payload.
        if !payload.is_empty() {
            let _ = conn.send_text(&format!("pong {}", String::from_utf8_lossy(payload)));
        }
    }

    fn on_timer(&mut self, conn: &Conn, tag: u64) {
        let _ = conn.send_text(&format!("timer {tag}"));
    }

    fn on_sent(&mut self, conn: &Conn, tag: u64, written: bool) {
        let _ = conn.send_text(&format!("sent {tag} {written}"));
    }

    fn on_drain(&mut self, conn: &Conn) {
        if self.streaming {
            self.pump(conn);
            return;
        }
        self.event(&format!("drain {}", conn.id()));
    }

    fn on_close(&mut self, conn: &Conn, code: u16, reason: &str) {
        self.closes.fetch_add(1, Ordering::SeqCst);
        self.host.info(&format!(
            "on_close conn={} code={code} reason={reason}",
            conn.id()
        ));
        self.event(&format!("close {} {code} {reason}", conn.id()));
    }
}

impl Drop for Kit {
    fn drop(&mut self) {
        if self.panic_on_drop {
            panic!("testkit: Drop panics on request");
        }
    }
}

export_plugin!(Testkit);

/// Recurses until the stack overflows.
#[inline(never)]
fn recurse(n: u64) -> u64 {
    let frame = std::hint::black_box([n; 64]);
    if n == 0 {
        return frame[0];
    }
    recurse(n - 1).wrapping_add(frame[3])
}

/// Panics when dropped.
struct PanicOnDrop;

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        panic!("testkit: a panic in Drop while unwinding");
    }
}
