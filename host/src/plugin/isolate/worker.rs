//! The worker process (`wshost worker`): maps one plugin library and runs its code, and only
//! its code, for the host. It connects back to the host over a Unix socket, reports the
//! library's identity, creates the instance when told, and then turns the host's frames into
//! plugin calls — each connection's callbacks in order on a task of its own, on a runtime of
//! its own threads — and the plugin's `Conn`/`Host` calls into frames. A crash here ends this
//! process only; the host closes its connections and starts another.
//!
//! With a callback timeout, a watchdog thread ends the process when one plugin call runs
//! longer (an infinite loop, a deadlock), after saying which call on standard error.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RSlice, RStr, RString, RVec, Tuple2};
use plugin_api::abi::{HostFfi, HostFfi_TO, PluginBox};
use plugin_api::SendError;

use super::super::{loader, Candidate, ConnOps, Handler, HostRequest, LoadError};
use super::proto::{self, AnswerMsg};
use super::supervisor::{Outbox, Refused};
use crate::plugin::seam::InlineCallbacks;

/// What `wshost worker` is told on its command line.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The Unix socket the host listens on for this worker.
    pub socket: std::path::PathBuf,
    /// The file's name as the user knows it.
    pub display_name: std::path::PathBuf,
    /// The private copy to map.
    pub file: std::path::PathBuf,
    /// Threads that run the plugin's calls.
    pub threads: usize,
    /// End the process when one plugin call runs longer (0: never).
    pub callback_timeout_ms: u64,
}

/// The worker's side: runs until the host says stop or goes away. Returns the exit code.
pub fn worker_main(args: &WorkerArgs) -> std::process::ExitCode {
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wshost worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &WorkerArgs) -> std::io::Result<()> {
    // Hardening: no privileges gained through exec (setuid binaries, file capabilities).
    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        eprintln!("wshost worker: cannot set no_new_privs: {e}");
    }
    let mut stream = UnixStream::connect(&args.socket)?;
    let write_now = |stream: &mut UnixStream, kind: u8, body: &[u8]| {
        let mut buf = Vec::new();
        proto::put(&mut buf, kind, 0, &[body]);
        stream.write_all(&buf)
    };

    // Load and report the identity (blocking: nothing else runs yet).
    let candidate = match load(&args.display_name, &args.file) {
        Ok(c) => c,
        Err(e) => {
            let why = strip_file(&e, &args.display_name);
            return write_now(&mut stream, proto::FAILED, why.as_bytes());
        }
    };
    let identity = proto::Identity {
        name: candidate.name.clone(),
        version: candidate.version.clone(),
        routes: candidate.routes.clone(),
        api_version: candidate.mapped.api_version.clone(),
    };
    write_now(
        &mut stream,
        proto::IDENTITY,
        &serde_json::to_vec(&identity).unwrap_or_default(),
    )?;
    let Some((kind, _, body)) = read_frame(&mut stream)? else {
        return Ok(());
    };
    if kind != proto::CREATE {
        return Ok(());
    }
    let create: proto::Create = serde_json::from_slice(&body).unwrap_or_default();

    // From here the socket is the runtime's: one task reads it, one writes it, and each
    // connection's callbacks run as a task of their own, so that an event usually goes from the
    // socket to its callback and the callback's sends back to the socket on one thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .thread_name(format!("wshost-{}", identity.name))
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    stream.set_nonblocking(true)?;
    let (read, write) = tokio::net::UnixStream::from_std(stream)?.into_split();
    let out = Arc::new(Outbox::default());
    runtime.spawn({
        let out = Arc::clone(&out);
        async move {
            super::supervisor::writer(out, write).await;
            // The host is gone, or stopped reading: so is this worker.
            std::process::exit(0);
        }
    });
    let watch = Watch::start(args.callback_timeout_ms, Arc::clone(&out));
    watch.slow_ms.store(create.slow_ms, Ordering::Relaxed);
    let calls = Arc::new(Calls::default());
    let state = Arc::new(HostState {
        out: Arc::clone(&out),
        calls: Arc::clone(&calls),
        config: create.config,
        config_json: create.config_json,
        log_level: create.log_level,
        retired: AtomicBool::new(false),
        events: crate::plugin::events::Events::new(&identity.name),
        watched: Mutex::default(),
    });
    let shared = Arc::new(Shared {
        instance: std::sync::OnceLock::new(),
        state: Arc::clone(&state),
        out: Arc::clone(&out),
        calls,
        watch: Arc::clone(&watch),
        handlers: Mutex::new(HashMap::new()),
        cancels: Mutex::new(HashMap::new()),
    });
    // The reader runs before the instance exists: a constructor that publishes gets its reply.
    let reader = runtime.spawn(reader(Arc::clone(&shared), read));
    let handle = HostFfi_TO::from_ptr(RArc::new(WorkerHost(Arc::clone(&state))), TD_Opaque);
    let instance = {
        let _call = watch.enter("create", 0);
        candidate.create_instance(handle)
    };
    match instance {
        Ok(i) => {
            let instance = Arc::new(i);
            let _ = shared.instance.set(Arc::clone(&instance));
            // The plugin's timers and watched channels, one at a time, in order.
            if let Some(rx) = state.events.take_receiver() {
                let (state, watch) = (Arc::clone(&state), Arc::clone(&watch));
                runtime.spawn(crate::plugin::events::run(
                    rx,
                    Arc::clone(&state.events),
                    move |call| {
                        if state.retired.load(Ordering::Acquire) {
                            return false;
                        }
                        let result = tokio::task::block_in_place(|| {
                            let _call = watch.enter(call.name(), 0);
                            match call {
                                crate::plugin::events::Call::Timer(tag) => instance.on_timer(tag),
                                crate::plugin::events::Call::Channel {
                                    channel,
                                    kind,
                                    data,
                                } => instance.on_channel(
                                    RStr::from_str(channel),
                                    kind,
                                    RSlice::from_slice(data),
                                ),
                            }
                        });
                        if let Some(panic) = result.into_result().err() {
                            let text = format!("plugin {} panicked: {panic}", call.name());
                            state.out.push(
                                proto::LOG,
                                u64::from(plugin_api::abi::level::ERROR),
                                &[text.as_bytes()],
                            );
                        }
                        true
                    },
                ));
            }
            out.push(proto::READY, 0, &[]);
        }
        Err(e) => {
            let why = strip_file(&e, &args.display_name);
            out.push(proto::FAILED, 0, &[why.as_bytes()]);
            runtime.block_on(flushed(&out));
            return Ok(());
        }
    }
    let _ = runtime.block_on(reader);
    // The host closed the socket: it stopped, or ended this worker.
    std::process::exit(0);
}

/// Waits until everything pushed to `out` so far is written.
async fn flushed(out: &Outbox) {
    while !out.is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The writer may still hold the last batch: give it a moment to finish the write.
    tokio::time::sleep(Duration::from_millis(5)).await;
}

/// Reads the host's frames until the socket closes, and hands each to whom it is for.
async fn reader(shared: Arc<Shared>, mut read: tokio::net::unix::OwnedReadHalf) {
    use bytes::Buf as _;
    use tokio::io::AsyncReadExt as _;
    let mut buf = bytes::BytesMut::with_capacity(256 << 10);
    let mut conns: HashMap<u64, (tokio::sync::mpsc::UnboundedSender<Event>, Arc<WorkerConn>)> =
        HashMap::new();
    loop {
        while buf.len() >= proto::HEADER {
            let h: [u8; proto::HEADER] = buf[..proto::HEADER].try_into().expect("header");
            let Some((kind, id, len)) = proto::header(&h) else {
                eprintln!("wshost worker: corrupt frame from the host");
                return;
            };
            if buf.len() < proto::HEADER + len {
                buf.reserve((proto::HEADER + len - buf.len()).min(1 << 20));
                break;
            }
            buf.advance(proto::HEADER);
            let body = buf.split_to(len).freeze();
            shared.dispatch(kind, id, body, &mut conns).await;
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 << 10);
        }
        match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

impl Shared {
    /// One frame from the host.
    async fn dispatch(
        self: &Arc<Self>,
        kind: u8,
        id: u64,
        body: bytes::Bytes,
        conns: &mut HashMap<u64, (tokio::sync::mpsc::UnboundedSender<Event>, Arc<WorkerConn>)>,
    ) {
        if kind == proto::REPLY {
            let (value, rest) = proto::split_u64(&body);
            let rest = body.slice(body.len() - rest.len()..);
            self.calls.complete(id, value, rest);
            return;
        }
        let Some(instance) = self.instance.get() else {
            return;
        };
        if kind == proto::CHANNEL_EVENT {
            if let Some((event_kind, channel, data)) = proto::read_channel_event(&body) {
                self.state.events.channel(&channel, event_kind, data);
            }
            return;
        }
        match kind {
            proto::DECIDE => {
                let Ok(map) = serde_json::from_slice::<proto::RequestMsg>(&body) else {
                    return;
                };
                let shared = Arc::clone(self);
                tokio::spawn(async move { shared.decide(id, map).await });
            }
            proto::OPEN => {
                let Ok(open) = serde_json::from_slice::<proto::Open>(&body) else {
                    return;
                };
                let handler = self
                    .handlers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&open.token);
                let Some(Handler::Inline(handler)) = handler else {
                    return;
                };
                let conn = Arc::new(WorkerConn {
                    id,
                    remote: open.remote,
                    facts: open.facts,
                    max_send_queue: open.max_send_queue,
                    state: AtomicU8::new(OPEN),
                    sent: AtomicU64::new(0),
                    acked: AtomicU64::new(0),
                    drain_asked: AtomicBool::new(false),
                    out: Arc::clone(&self.out),
                    calls: Arc::clone(&self.calls),
                    timers: Mutex::default(),
                });
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let callbacks = InlineCallbacks::new(handler, Arc::clone(&conn));
                tokio::spawn(connection(
                    Arc::clone(self),
                    Arc::clone(&conn),
                    callbacks,
                    rx,
                ));
                conns.insert(id, (tx, conn));
            }
            proto::DISCARD => {
                let cancel = self
                    .cancels
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                if let Some(cancel) = cancel {
                    let _ = cancel.send(());
                }
                let handler = self
                    .handlers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                if let Some(h) = handler {
                    tokio::spawn(async move { drop(h) });
                }
            }
            proto::CREDIT => {
                let (acked, rest) = proto::split_u64(&body);
                if let Some((tx, conn)) = conns.get(&id) {
                    conn.acked.fetch_max(acked, Ordering::AcqRel);
                    if rest.first() == Some(&1) {
                        conn.drain_asked.store(false, Ordering::Release);
                        let _ = tx.send(Event::Drain);
                    }
                }
            }
            proto::REPLACED => {
                let instance = Arc::clone(instance);
                let (out, watch) = (Arc::clone(&self.out), Arc::clone(&self.watch));
                // Plugin code that may block: off the reader.
                tokio::task::spawn_blocking(move || {
                    let panic = {
                        let _call = watch.enter("replaced", 0);
                        instance.replaced().into_result().err()
                    };
                    if let Some(panic) = panic {
                        let text = format!("plugin replaced() panicked: {panic}");
                        out.push(
                            proto::LOG,
                            u64::from(plugin_api::abi::level::ERROR),
                            &[text.as_bytes()],
                        );
                    }
                });
            }
            proto::SHUTDOWN => {
                let panic = tokio::task::block_in_place(|| {
                    let _call = self.watch.enter("shutdown", 0);
                    instance.shutdown().into_result().err()
                });
                self.state.retired.store(true, Ordering::Release);
                let text = panic.map(RString::into_string).unwrap_or_default();
                self.out.push(proto::SHUT_DOWN, 0, &[text.as_bytes()]);
                flushed(&self.out).await;
                // Nothing more runs: threads the plugin left behind end with the process.
                std::process::exit(0);
            }
            _ => {
                let event = match kind {
                    proto::CONNECT => Event::Connect,
                    proto::TEXT => Event::Text(body),
                    proto::BINARY => Event::Binary(body),
                    proto::PING => Event::Ping(body),
                    proto::PONG => Event::Pong(body),
                    proto::ERROR => Event::Error(String::from_utf8_lossy(&body).into_owned()),
                    proto::TIMER => Event::Timer(proto::split_u64(&body).0),
                    proto::SENT => {
                        let (tag, rest) = proto::split_u64(&body);
                        Event::Sent(tag, rest.first() == Some(&1))
                    }
                    proto::CLOSE => {
                        let (code, reason) = proto::read_close(&body);
                        Event::Close(code, reason)
                    }
                    _ => return,
                };
                let last = matches!(event, Event::Close(..));
                if let Some((tx, _)) = conns.get(&id) {
                    let _ = tx.send(event);
                }
                if last {
                    conns.remove(&id);
                }
            }
        }
    }
}

/// Maps and checks the library, and runs its guarded self-test.
fn load(display: &Path, path: &Path) -> Result<Candidate, LoadError> {
    loader::check_elf(display, path)?;
    let candidate = Candidate::from_mapped(display, loader::map(display, path)?)?;
    candidate.self_test()?;
    Ok(candidate)
}

/// The host adds the file name itself; keep the worker's reason free of it.
fn strip_file(e: &LoadError, display: &Path) -> String {
    let text = e.to_string();
    let prefix = format!("{}: ", display.display());
    text.strip_prefix(&prefix).unwrap_or(&text).to_owned()
}

/// Reads one frame; `None` at the end of the stream.
fn read_frame(r: &mut impl Read) -> std::io::Result<Option<(u8, u64, Vec<u8>)>> {
    let mut h = [0u8; proto::HEADER];
    match r.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let Some((kind, id, len)) = proto::header(&h) else {
        return Err(std::io::Error::other("corrupt frame from the host"));
    };
    // Read into spare capacity: no zeroing of a buffer about to be overwritten.
    let mut body = Vec::with_capacity(len);
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some((kind, id, body)))
}

/// One event of a connection, in order.
#[derive(Debug)]
enum Event {
    Connect,
    Text(bytes::Bytes),
    Binary(bytes::Bytes),
    Ping(bytes::Bytes),
    Pong(bytes::Bytes),
    Error(String),
    Drain,
    Timer(u64),
    Sent(u64, bool),
    Close(u16, String),
}

/// What every task of the worker shares.
struct Shared {
    /// Set once the constructor returned.
    instance: std::sync::OnceLock<Arc<PluginBox>>,
    state: Arc<HostState>,
    out: Arc<Outbox>,
    calls: Arc<Calls>,
    watch: Arc<Watch>,
    /// Accepted handlers waiting for their connection, by token (the request's id).
    handlers: Mutex<HashMap<u64, Handler>>,
    /// Deferred decisions the host still waits for, by request id: firing one tells the
    /// plugin's responder nobody waits any more.
    cancels: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<()>>>,
}

impl Shared {
    /// Decides request `id` and sends the answer.
    async fn decide(&self, id: u64, map: proto::RequestMsg) {
        let upgrade = map.is_upgrade;
        let req = HostRequest::from(map);
        let result = {
            let _call = self
                .watch
                .enter(if upgrade { "upgrade" } else { "request" }, 0);
            let Some(instance) = self.instance.get() else {
                return;
            };
            if upgrade {
                super::super::upgrade_on(instance, &req)
            } else {
                super::super::request_on(instance, &req)
            }
        };
        let deferred = req
            .deferred
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(req);
        let result = match deferred {
            None => result,
            Some(rx) => {
                drop(result);
                let (cancel, cancelled) = tokio::sync::oneshot::channel();
                self.cancels
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(id, cancel);
                let decided = tokio::select! {
                    r = rx => Some(r),
                    _ = cancelled => None,
                };
                self.cancels
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                let Some(decided) = decided else {
                    // The host answered 503 already; dropping the receiver tells the plugin.
                    return;
                };
                match decided {
                    Ok(r) => r,
                    Err(_) => {
                        self.answer(
                            id,
                            &AnswerMsg {
                                dropped: true,
                                ..AnswerMsg::default()
                            },
                        );
                        return;
                    }
                }
            }
        };
        let msg = match result {
            Err(panic) => AnswerMsg {
                panic: Some(panic),
                ..AnswerMsg::default()
            },
            Ok(mut answer) => {
                let handler = answer.handler.take().map(|h| {
                    self.handlers
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(id, h);
                    id
                });
                AnswerMsg {
                    panic: None,
                    dropped: false,
                    status: answer.status,
                    headers: std::mem::take(&mut answer.headers),
                    body: std::mem::take(&mut answer.body),
                    handler,
                    limits: answer.limits,
                    kept_headers: std::mem::take(&mut answer.kept_headers),
                }
            }
        };
        self.answer(id, &msg);
    }

    fn answer(&self, id: u64, msg: &AnswerMsg) {
        self.out.push(
            proto::ANSWER,
            id,
            &[&serde_json::to_vec(msg).unwrap_or_default()],
        );
    }
}

/// A connection's task: its callbacks, one at a time, in the order the host sent them.
async fn connection(
    shared: Arc<Shared>,
    conn: Arc<WorkerConn>,
    mut callbacks: InlineCallbacks,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    let mut failed = false;
    while let Some(event) = rx.recv().await {
        let last = matches!(event, Event::Close(..));
        if failed && !last {
            continue;
        }
        if last {
            conn.state.store(CLOSED, Ordering::Release);
        }
        let (name, result) = {
            let name = match &event {
                Event::Connect => "on_connect",
                Event::Text(_) => "on_text",
                Event::Binary(_) => "on_binary",
                Event::Ping(_) => "on_ping",
                Event::Pong(_) => "on_pong",
                Event::Error(_) => "on_error",
                Event::Drain => "on_drain",
                Event::Timer(_) => "on_timer",
                Event::Sent(..) => "on_sent",
                Event::Close(..) => "on_close",
            };
            let _call = shared.watch.enter(name, conn.id);
            let result = match &event {
                Event::Connect => callbacks.on_connect(),
                Event::Text(t) => match std::str::from_utf8(t) {
                    Ok(t) => callbacks.on_text(t),
                    Err(_) => Ok(()),
                },
                Event::Binary(b) => callbacks.on_binary(b),
                Event::Ping(p) => callbacks.on_ping(p),
                Event::Pong(p) => callbacks.on_pong(p),
                Event::Error(e) => callbacks.on_error(e),
                Event::Drain => callbacks.on_drain(),
                Event::Timer(tag) => {
                    // Fired: no longer armed (unless the plugin arms it again in the callback).
                    conn.timers
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(tag);
                    callbacks.on_timer(*tag)
                }
                Event::Sent(tag, written) => callbacks.on_sent(*tag, *written),
                Event::Close(code, reason) => callbacks.on_close(*code, reason),
            };
            (name, result)
        };
        if let Err(panic) = result {
            if !last {
                failed = true;
                let msg = proto::Failed {
                    callback: name.to_owned(),
                    panic,
                };
                shared.out.push(
                    proto::CALL_FAILED,
                    conn.id,
                    &[&serde_json::to_vec(&msg).unwrap_or_default()],
                );
            }
        }
        if last {
            break;
        }
    }
    let _call = shared.watch.enter("drop", conn.id);
    drop(callbacks);
}

const OPEN: u8 = 0;
const CLOSING: u8 = 1;
const CLOSED: u8 = 2;

/// A connection as the plugin in the worker sees it: its calls become frames to the host.
///
/// The send queue is the host's; the worker keeps credit: bytes it sent minus bytes the host
/// said it wrote. A send past `max_send_queue` of credit is refused with `QueueFull`, and the
/// host is asked to run `on_drain` once its queue has emptied.
#[derive(Debug)]
struct WorkerConn {
    id: u64,
    remote: String,
    facts: crate::plugin::ConnFacts,
    max_send_queue: u64,
    state: AtomicU8,
    sent: AtomicU64,
    acked: AtomicU64,
    drain_asked: AtomicBool,
    out: Arc<Outbox>,
    calls: Arc<Calls>,
    /// The tags of the timers armed (the host keeps their deadlines).
    timers: Mutex<std::collections::HashSet<u64>>,
}

impl WorkerConn {
    fn send(&self, kind: u8, data: &[u8]) -> Result<(), SendError> {
        self.send_parts(kind, data, &[])
    }

    /// Sends `data` as a frame of `kind`, after `prefix` (a tracked send's tag), within credit.
    fn send_parts(&self, kind: u8, data: &[u8], prefix: &[u8]) -> Result<(), SendError> {
        if self.state.load(Ordering::Acquire) != OPEN {
            return Err(SendError::Closed);
        }
        let n = data.len() as u64;
        if n > self.max_send_queue {
            self.out.note_refused(Refused::TooLarge);
            return Err(SendError::MessageTooLarge);
        }
        let outstanding = self
            .sent
            .load(Ordering::Acquire)
            .saturating_sub(self.acked.load(Ordering::Acquire));
        if outstanding + n > self.max_send_queue {
            if !self.drain_asked.swap(true, Ordering::AcqRel) {
                self.out.push(proto::WANT_DRAIN, self.id, &[]);
            }
            self.out.note_refused(Refused::QueueFull);
            return Err(SendError::QueueFull);
        }
        self.sent.fetch_add(n, Ordering::AcqRel);
        self.out.push(kind, self.id, &[prefix, data]);
        Ok(())
    }
}

impl ConnOps for WorkerConn {
    fn id(&self) -> u64 {
        self.id
    }
    fn remote_addr(&self) -> &str {
        &self.remote
    }
    fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) == OPEN
    }
    fn send_text(&self, text: &str) -> Result<(), SendError> {
        self.send(proto::SEND_TEXT, text.as_bytes())
    }
    fn send_binary(&self, data: &[u8]) -> Result<(), SendError> {
        self.send(proto::SEND_BINARY, data)
    }
    fn ping(&self, payload: &[u8]) -> Result<(), SendError> {
        if payload.len() > 125 {
            return Err(SendError::PayloadTooLong);
        }
        if !self.is_open() {
            return Err(SendError::Closed);
        }
        self.out.push(proto::SEND_PING, self.id, &[payload]);
        Ok(())
    }
    fn close(&self, code: u16, reason: &str) -> Result<(), SendError> {
        if !plugin_api::is_sendable_close_code(code) {
            return Err(SendError::InvalidCloseCode);
        }
        if reason.len() > plugin_api::MAX_CLOSE_REASON {
            return Err(SendError::ReasonTooLong);
        }
        if self
            .state
            .compare_exchange(OPEN, CLOSING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(SendError::Closed);
        }
        self.out.push(
            proto::SEND_CLOSE,
            self.id,
            &[&proto::close_body(code, reason)],
        );
        Ok(())
    }
    fn buffered_amount(&self) -> u64 {
        self.sent
            .load(Ordering::Acquire)
            .saturating_sub(self.acked.load(Ordering::Acquire))
    }
    fn subscribe(self: &Arc<Self>, channel: &str) -> Result<(), SendError> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Err(SendError::Closed);
        }
        let code = self.calls.call(
            &self.out,
            proto::SUBSCRIBE,
            &[&self.id.to_le_bytes(), channel.as_bytes()],
        );
        SendError::from_code(code.unwrap_or(SendError::Closed.code() as u64) as u32)
    }
    fn unsubscribe(&self, channel: &str) -> bool {
        self.calls
            .call(
                &self.out,
                proto::UNSUBSCRIBE,
                &[&self.id.to_le_bytes(), channel.as_bytes()],
            )
            .is_some_and(|v| v == 1)
    }
    fn set_paused(&self, paused: bool) {
        self.out.push(proto::PAUSE, self.id, &[&[u8::from(paused)]]);
    }
    fn facts(&self) -> &crate::plugin::ConnFacts {
        &self.facts
    }
    fn set_idle_timeout(&self, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.out
            .push(proto::SET_IDLE, self.id, &[&ms.to_le_bytes()]);
    }
    fn set_timer(&self, tag: u64, after: Duration) -> Result<(), SendError> {
        if !self.is_open() {
            return Err(SendError::Closed);
        }
        {
            // The armed tags are kept here too, so that the limit answers at once.
            let mut timers = self.timers.lock().unwrap_or_else(PoisonError::into_inner);
            if !timers.contains(&tag) && timers.len() >= plugin_api::MAX_TIMERS {
                return Err(SendError::Limit);
            }
            timers.insert(tag);
        }
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self.out.push(
            proto::SET_TIMER,
            self.id,
            &[&tag.to_le_bytes(), &ms.to_le_bytes()],
        );
        Ok(())
    }
    fn cancel_timer(&self, tag: u64) -> bool {
        let armed = self
            .timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&tag);
        if armed {
            self.out
                .push(proto::CANCEL_TIMER, self.id, &[&tag.to_le_bytes()]);
        }
        armed
    }
    fn set_low_water(&self, bytes: u64) {
        self.out
            .push(proto::SET_LOW_WATER, self.id, &[&bytes.to_le_bytes()]);
    }
    fn set_label(&self, label: &str) {
        self.out
            .push(proto::SET_LABEL, self.id, &[label.as_bytes()]);
    }
    fn send_tracked(
        &self,
        msg: tokio_tungstenite::tungstenite::Message,
        tag: u64,
    ) -> Result<(), SendError> {
        use tokio_tungstenite::tungstenite::Message;
        let tag = tag.to_le_bytes();
        match msg {
            Message::Text(t) => self.send_parts(proto::SEND_TEXT_TRACKED, t.as_bytes(), &tag),
            Message::Binary(b) => self.send_parts(proto::SEND_BINARY_TRACKED, &b, &tag),
            _ => Err(SendError::Other(100)),
        }
    }
}

/// The plugin's `Host` in the worker.
#[derive(Debug, Clone)]
struct WorkerHost(Arc<HostState>);

#[derive(Debug)]
struct HostState {
    out: Arc<Outbox>,
    calls: Arc<Calls>,
    config: Vec<(String, String)>,
    config_json: String,
    log_level: u8,
    /// `shutdown` has run: calls are refused.
    retired: AtomicBool,
    /// The plugin's timers and watched channels.
    events: Arc<crate::plugin::events::Events>,
    /// The channels it watches (the host keeps the watch itself).
    watched: Mutex<std::collections::BTreeSet<String>>,
}

impl HostFfi for WorkerHost {
    fn log(&self, level: u8, message: RStr<'_>) {
        if level <= self.0.log_level && !self.0.retired.load(Ordering::Acquire) {
            self.0
                .out
                .push(proto::LOG, u64::from(level), &[message.as_str().as_bytes()]);
        }
    }
    fn log_enabled(&self, level: u8) -> bool {
        level <= self.0.log_level
    }
    fn config(&self) -> RVec<Tuple2<RString, RString>> {
        super::super::config_table(&self.0.config)
    }
    fn config_json(&self) -> RString {
        RString::from(self.0.config_json.as_str())
    }
    fn publish_text(&self, channel: RStr<'_>, text: RStr<'_>) -> u64 {
        self.publish(false, channel.as_str(), text.as_str().as_bytes())
    }
    fn publish_binary(&self, channel: RStr<'_>, data: RSlice<'_, u8>) -> u64 {
        self.publish(true, channel.as_str(), data.as_slice())
    }
    fn subscribers(&self, channel: RStr<'_>) -> u64 {
        if self.0.retired.load(Ordering::Acquire) {
            return 0;
        }
        self.0
            .calls
            .call(
                &self.0.out,
                proto::SUBSCRIBERS,
                &[channel.as_str().as_bytes()],
            )
            .unwrap_or(0)
    }
    fn host_version(&self) -> RString {
        RString::from(env!("CARGO_PKG_VERSION"))
    }
    fn set_timer(&self, tag: u64, after_ms: u64) -> bool {
        !self.0.retired.load(Ordering::Acquire)
            && self
                .0
                .events
                .set_timer(tag, Duration::from_millis(after_ms))
    }
    fn cancel_timer(&self, tag: u64) -> bool {
        self.0.events.cancel_timer(tag)
    }
    fn members_json(&self, channel: RStr<'_>) -> RString {
        if self.0.retired.load(Ordering::Acquire) {
            return RString::from("[]");
        }
        let reply = self.0.calls.call_with_body(
            &self.0.out,
            proto::MEMBERS,
            &[channel.as_str().as_bytes()],
        );
        match reply {
            Some((_, json)) if !json.is_empty() => {
                RString::from(String::from_utf8_lossy(&json).as_ref())
            }
            _ => RString::from("[]"),
        }
    }
    fn watch(&self, channel: RStr<'_>) -> bool {
        if self.0.retired.load(Ordering::Acquire) {
            return false;
        }
        let new = self
            .0
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(channel.as_str().to_owned());
        if new {
            self.0
                .out
                .push(proto::WATCH, 0, &[channel.as_str().as_bytes()]);
        }
        true
    }
    fn unwatch(&self, channel: RStr<'_>) -> bool {
        let was = self
            .0
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(channel.as_str());
        if was {
            self.0
                .out
                .push(proto::UNWATCH, 0, &[channel.as_str().as_bytes()]);
        }
        was
    }
}

impl WorkerHost {
    fn publish(&self, binary: bool, channel: &str, data: &[u8]) -> u64 {
        if self.0.retired.load(Ordering::Acquire) {
            return 0;
        }
        let body = proto::publish_body(binary, channel, data);
        self.0
            .calls
            .call(&self.0.out, proto::PUBLISH, &[&body])
            .unwrap_or(0)
    }
}

/// Calls of the plugin's that wait for the host's reply (publish, subscribe, counts).
#[derive(Debug, Default)]
struct Calls {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, std::sync::mpsc::SyncSender<(u64, bytes::Bytes)>>>,
}

impl Calls {
    /// Sends a call and waits for its reply; `None` if the host did not answer in time.
    fn call(&self, out: &Outbox, kind: u8, parts: &[&[u8]]) -> Option<u64> {
        self.call_with_body(out, kind, parts).map(|(v, _)| v)
    }

    /// As [`Calls::call`], with the bytes the reply carries after its value.
    fn call_with_body(
        &self,
        out: &Outbox,
        kind: u8,
        parts: &[&[u8]],
    ) -> Option<(u64, bytes::Bytes)> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        out.push(kind, id, parts);
        // On one of the runtime's threads, hand its other tasks (the socket's reader among
        // them) to another thread while this one waits.
        let wait = || rx.recv_timeout(Duration::from_secs(30)).ok();
        let r = if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(wait)
        } else {
            wait()
        };
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        r
    }

    fn complete(&self, id: u64, value: u64, body: bytes::Bytes) {
        let tx = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        if let Some(tx) = tx {
            let _ = tx.try_send((value, body));
        }
    }
}

/// The plugin calls running now: for the callback timeout, and to log calls that run long (as
/// the host's watchdog does for inline plugins). Each thread that runs plugin code has a slot of
/// its own (a few atomics, no lock on the call path); the watch thread scans them.
#[derive(Debug)]
struct Watch {
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Log calls running longer than this (milliseconds; set by `Create`).
    slow_ms: AtomicU64,
    out: Arc<Outbox>,
    epoch: Instant,
}

/// One thread's current plugin call.
#[derive(Debug, Default)]
struct Slot {
    /// When it started, in microseconds since the watch's epoch, plus one; 0 when idle.
    started_us: AtomicU64,
    call: AtomicU8,
    conn: AtomicU64,
    /// When it was last logged as still running, in microseconds of its run (a doubling
    /// back-off); reset per call.
    logged_us: AtomicU64,
}

thread_local! {
    static SLOT: std::cell::OnceCell<Arc<Slot>> = const { std::cell::OnceCell::new() };
}

use crate::plugin::exec::{call_index, CALLS};

/// A running call; it leaves its slot when dropped.
struct Running<'a> {
    watch: &'a Watch,
    slot: Arc<Slot>,
    at: Instant,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.slot.started_us.store(0, Ordering::Release);
        let elapsed = self.at.elapsed();
        if elapsed.as_millis() as u64 >= self.watch.slow_ms.load(Ordering::Relaxed) {
            let call = CALLS[usize::from(self.slot.call.load(Ordering::Relaxed))];
            self.watch.log(
                plugin_api::abi::level::WARN,
                &format!(
                    "slow callback: {call} on connection {} took {:.1} ms; callbacks must not \
                     block: move blocking work to a plugin thread",
                    self.slot.conn.load(Ordering::Relaxed),
                    elapsed.as_secs_f64() * 1e3
                ),
            );
        }
    }
}

impl Watch {
    fn start(timeout_ms: u64, out: Arc<Outbox>) -> Arc<Self> {
        let this = Arc::new(Self {
            slots: Mutex::new(Vec::new()),
            slow_ms: AtomicU64::new(u64::MAX),
            out,
            epoch: Instant::now(),
        });
        let me = Arc::clone(&this);
        let limit = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
        let tick = limit.map_or(Duration::from_millis(100), |l| {
            (l / 10).clamp(Duration::from_millis(5), Duration::from_millis(100))
        });
        let host = std::os::unix::process::parent_id();
        let _ = std::thread::Builder::new()
            .name("wshost-worker-watch".into())
            .spawn(move || loop {
                std::thread::sleep(tick);
                // The host is gone (killed outright; a plugin call that never returns keeps
                // the socket's end from being noticed): so is this worker.
                if std::os::unix::process::parent_id() != host {
                    std::process::exit(0);
                }
                let slow_us = me.slow_ms.load(Ordering::Relaxed).saturating_mul(1000);
                let now_us = me.epoch.elapsed().as_micros() as u64 + 1;
                let slots = me
                    .slots
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                for slot in slots {
                    let started = slot.started_us.load(Ordering::Acquire);
                    if started == 0 {
                        continue;
                    }
                    let ran_us = now_us.saturating_sub(started);
                    let call = CALLS[usize::from(slot.call.load(Ordering::Relaxed))];
                    let conn = slot.conn.load(Ordering::Relaxed);
                    if let Some(limit) = limit.filter(|l| ran_us > l.as_micros() as u64) {
                        eprintln!(
                            "wshost worker: plugin call {call} (connection {conn}) has run for \
                             {:.1} s, past the callback timeout of {limit:?}; ending the worker",
                            ran_us as f64 / 1e6,
                        );
                        std::process::abort();
                    }
                    let logged = slot.logged_us.load(Ordering::Relaxed);
                    if ran_us >= slow_us && ran_us >= logged.saturating_mul(2) {
                        slot.logged_us.store(ran_us.max(slow_us), Ordering::Relaxed);
                        me.log(
                            plugin_api::abi::level::WARN,
                            &format!(
                                "plugin call still running: {call} on connection {conn} for \
                                 {:.0} ms",
                                ran_us as f64 / 1e3
                            ),
                        );
                    }
                }
            });
        this
    }

    fn log(&self, level: u8, text: &str) {
        self.out
            .push(proto::LOG, u64::from(level), &[text.as_bytes()]);
    }

    /// Notes that this thread starts plugin call `name` for connection `conn` (0: none).
    fn enter(&self, name: &'static str, conn: u64) -> Running<'_> {
        let slot = SLOT.with(|s| {
            Arc::clone(s.get_or_init(|| {
                let slot = Arc::new(Slot::default());
                self.slots
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Arc::clone(&slot));
                slot
            }))
        });
        let at = Instant::now();
        slot.call.store(call_index(name), Ordering::Relaxed);
        slot.conn.store(conn, Ordering::Relaxed);
        slot.logged_us.store(0, Ordering::Relaxed);
        slot.started_us.store(
            at.saturating_duration_since(self.epoch).as_micros() as u64 + 1,
            Ordering::Release,
        );
        Running {
            watch: self,
            slot,
            at,
        }
    }
}
