//! The host's side of a process-isolated plugin: one [`Supervisor`] per generation starts its
//! worker process, hands it requests and connection events, applies its sends, publishes and
//! log lines, watches its memory, and when the worker dies — a signal, an exit, the callback
//! timeout, the memory limit — closes its connections with 1011, logs why with the worker's
//! last words, and starts another after a back-off. The host itself never runs the plugin's
//! code and never maps its library.

use std::collections::{HashMap, VecDeque};
use std::io::Read as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;

use super::proto::{self, AnswerMsg, Identity};
use crate::channels::Hub;
use crate::plugin::seam::DynConn;
use crate::plugin::{Answer, Decision, LoadError, RequestMap};

/// How process-isolated plugins run (the host's settings).
#[derive(Debug, Clone)]
pub struct Isolation {
    /// The `wshost` binary, run as `wshost worker`.
    pub exe: PathBuf,
    /// End a worker whose plugin call runs longer than this.
    pub callback_timeout: Option<Duration>,
    /// How long a worker may take to start and create its instance.
    pub start_timeout: Duration,
}

/// Lines of a worker's standard error kept for the log line of its death.
const LAST_LINES: usize = 12;
/// The most a worker's outbox may hold before the host gives up on it (it does not read).
const MAX_OUTBOX: usize = 256 << 20;
/// How often a worker's memory and CPU are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The delay before restart number `n` (1 for the first) of a worker that keeps dying:
/// at once the first time, then 50 ms doubling up to 30 s.
pub(crate) fn backoff(n: u32) -> Duration {
    if n <= 1 {
        return Duration::ZERO;
    }
    let ms = 50u64.saturating_mul(1u64 << (n - 2).min(20));
    Duration::from_millis(ms).min(Duration::from_secs(30))
}

/// A worker that lived this long before it died starts the back-off again from zero.
const STABLE: Duration = Duration::from_secs(30);

/// What `/metrics` shows of one process-isolated generation.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    /// The plugin.
    pub plugin: String,
    /// Its generation.
    pub generation: u64,
    /// Workers started after one died.
    pub restarts: u64,
    /// The live worker's resident memory, bytes (0 while none runs).
    pub rss_bytes: u64,
    /// CPU seconds used by this generation's workers, dead ones included.
    pub cpu_seconds: f64,
}

static SUPERVISORS: Mutex<Vec<Weak<Supervisor>>> = Mutex::new(Vec::new());

/// Every live process-isolated generation's figures.
pub fn all_stats() -> Vec<WorkerStats> {
    let mut all = SUPERVISORS.lock().unwrap_or_else(PoisonError::into_inner);
    all.retain(|w| w.strong_count() > 0);
    all.iter()
        .filter_map(Weak::upgrade)
        .map(|s| s.stats())
        .collect()
}

/// One generation of a process-isolated plugin.
#[derive(Debug)]
pub(crate) struct Supervisor {
    pub(crate) name: String,
    generation: u64,
    /// The file as the user knows it.
    file: PathBuf,
    /// The private copy each worker maps; removed with the supervisor.
    private: PathBuf,
    iso: Isolation,
    threads: usize,
    create: proto::Create,
    memory_limit: Option<u64>,
    hub: Arc<Hub>,
    rt: tokio::runtime::Handle,
    current: tokio::sync::watch::Sender<Option<Arc<WorkerLink>>>,
    restarts: AtomicU64,
    /// No more restarts: the generation is being retired.
    stopped: AtomicBool,
    rss: AtomicU64,
    /// CPU of dead workers, in clock ticks; and of the live one.
    cpu_dead: AtomicU64,
    cpu_live: AtomicU64,
    /// Signalled when the live worker exits.
    exited: tokio::sync::Notify,
}

/// A worker that has reported its identity, not yet told to create its instance.
pub(crate) struct Started {
    pub(crate) identity: Identity,
    child: std::process::Child,
    stream: std::os::unix::net::UnixStream,
    lines: Arc<Mutex<VecDeque<String>>>,
    stderr_done: std::sync::mpsc::Receiver<()>,
    /// Channels the constructor began watching, registered once the worker is live.
    watches: std::collections::BTreeSet<String>,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("identity", &self.identity)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

/// Starts a worker for `private` (a private copy of `file`) and waits for the identity of the
/// library it mapped. Blocking.
pub(crate) fn start(
    iso: &Isolation,
    file: &Path,
    private: &Path,
    threads: usize,
) -> Result<Started, LoadError> {
    static SOCKETS: AtomicU64 = AtomicU64::new(0);
    let refuse = |reason: String| LoadError::Probe {
        file: file.to_owned(),
        reason,
    };
    let dir = private.parent().unwrap_or(Path::new("/tmp"));
    let socket = dir.join(format!(
        "w{}-{}.sock",
        std::process::id(),
        SOCKETS.fetch_add(1, Ordering::Relaxed)
    ));
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .map_err(|e| refuse(format!("cannot make the worker's socket: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| refuse(format!("cannot make the worker's socket: {e}")))?;
    let mut cmd = std::process::Command::new(&iso.exe);
    cmd.arg("worker")
        .arg("--socket")
        .arg(&socket)
        .arg("--display-name")
        .arg(file)
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--callback-timeout-ms")
        .arg(
            iso.callback_timeout
                .map_or(0, |d| d.as_millis() as u64)
                .to_string(),
        )
        .arg(private)
        .env("RUST_LOG", "off")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let spawned = cmd.spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(refuse(format!(
                "cannot start the worker {}: {e}",
                iso.exe.display()
            )));
        }
    };
    // Standard output and error: kept as the worker's last words, and logged.
    let lines = Arc::new(Mutex::new(VecDeque::new()));
    let (done_tx, stderr_done) = std::sync::mpsc::channel();
    for (pipe, name) in [
        (
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            "stdout",
        ),
        (
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            "stderr",
        ),
    ] {
        let Some(pipe) = pipe else { continue };
        let (lines, done) = (Arc::clone(&lines), done_tx.clone());
        let pid = child.id();
        let _ = std::thread::Builder::new()
            .name("wshost-worker-log".into())
            .spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    tracing::info!(target: "plugin", worker_pid = pid, stream = name, "{line}");
                    let mut l = lines.lock().unwrap_or_else(PoisonError::into_inner);
                    if l.len() == LAST_LINES {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
                let _ = done.send(());
            });
    }
    let deadline = Instant::now() + iso.start_timeout;
    let accepted = loop {
        match listener.accept() {
            Ok((s, _)) => break Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => break Err(format!("cannot accept the worker's connection: {e}")),
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("the worker {}", describe(status)));
        }
        if Instant::now() >= deadline {
            break Err(format!(
                "the worker did not start within {:?}",
                iso.start_timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = std::fs::remove_file(&socket);
    let fail = |mut child: std::process::Child, why: String| {
        let _ = child.kill();
        let _ = child.wait();
        let _ = stderr_done.recv_timeout(Duration::from_millis(500));
        let _ = stderr_done.recv_timeout(Duration::from_millis(100));
        refuse(format!("{why}{}", last_words(&lines)))
    };
    let mut stream = match accepted {
        Ok(s) => s,
        Err(why) => return Err(fail(child, why)),
    };
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10)),
    ));
    match read_frame_blocking(&mut stream) {
        Ok((proto::IDENTITY, body)) => match serde_json::from_slice::<Identity>(&body) {
            Ok(identity) => {
                let _ = stream.set_read_timeout(None);
                Ok(Started {
                    identity,
                    child,
                    stream,
                    lines,
                    stderr_done,
                    watches: Default::default(),
                })
            }
            Err(e) => Err(fail(child, format!("the worker sent a bad identity: {e}"))),
        },
        Ok((proto::FAILED, body)) => {
            let _ = child.wait();
            Err(LoadError::NotAPlugin {
                file: file.to_owned(),
                reason: String::from_utf8_lossy(&body).into_owned(),
            })
        }
        Ok(_) => Err(fail(child, "the worker sent an unexpected frame".into())),
        Err(e) => {
            // It died (or hung) while mapping the library.
            let status = wait_briefly(&mut child);
            let why = match status {
                Some(s) => format!("the worker {} while loading it", describe(s)),
                None => format!(
                    "the worker did not report within {:?} ({e})",
                    iso.start_timeout
                ),
            };
            Err(fail(child, why))
        }
    }
}

impl Started {
    /// Tells the worker to create the instance and waits until it has. Blocking.
    fn create(
        mut self,
        create: &proto::Create,
        file: &Path,
        timeout: Duration,
    ) -> Result<Self, LoadError> {
        use std::io::Write as _;
        let mut buf = Vec::new();
        proto::put(
            &mut buf,
            proto::CREATE,
            0,
            &[&serde_json::to_vec(create).unwrap_or_default()],
        );
        let refuse = |reason: String| LoadError::Create {
            name: self.identity.name.clone(),
            file: file.to_owned(),
            reason,
        };
        let deadline = Instant::now() + timeout;
        let mut reply = self.stream.write_all(&buf).map(|()| (0, Vec::new()));
        // The constructor may log, publish or count subscribers before it returns.
        while reply.is_ok() {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = self
                .stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            reply = read_frame_blocking_id(&mut self.stream).map(|(kind, id, body)| {
                match kind {
                    proto::LOG => {
                        tracing::info!(target: "plugin", plugin = %self.identity.name,
                            "{}", String::from_utf8_lossy(&body));
                    }
                    proto::WATCH => {
                        self.watches
                            .insert(String::from_utf8_lossy(&body).into_owned());
                    }
                    proto::UNWATCH => {
                        self.watches.remove(String::from_utf8_lossy(&body).as_ref());
                    }
                    proto::PUBLISH
                    | proto::SUBSCRIBERS
                    | proto::SUBSCRIBE
                    | proto::UNSUBSCRIBE
                    | proto::MEMBERS => {
                        // Nothing subscribes to a generation that does not exist yet.
                        let mut r = Vec::new();
                        proto::put(&mut r, proto::REPLY, id, &[&0u64.to_le_bytes()]);
                        let _ = self.stream.write_all(&r);
                    }
                    _ => {}
                }
                (kind, body)
            });
            if reply
                .as_ref()
                .is_ok_and(|(k, _)| *k == proto::READY || *k == proto::FAILED)
            {
                break;
            }
        }
        let _ = self.stream.set_read_timeout(None);
        match reply {
            Ok((proto::READY, _)) => Ok(self),
            Ok((proto::FAILED, body)) => {
                let _ = self.child.wait();
                let reason = String::from_utf8_lossy(&body).into_owned();
                // The worker's reason is a whole load error; keep its plugin-specific part.
                let reason = reason
                    .split_once("failed to start: ")
                    .map_or(reason.clone(), |(_, r)| r.to_owned());
                Err(refuse(reason))
            }
            Ok(_) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(refuse("the worker sent an unexpected frame".into()))
            }
            Err(e) => {
                let status = wait_briefly(&mut self.child);
                let _ = self.child.kill();
                let _ = self.child.wait();
                let _ = self.stderr_done.recv_timeout(Duration::from_millis(500));
                let _ = self.stderr_done.recv_timeout(Duration::from_millis(100));
                let why = match status {
                    Some(s) => format!("its worker process {} in the constructor", describe(s)),
                    None => format!("its constructor did not return within {timeout:?} ({e})"),
                };
                Err(refuse(format!("{why}{}", last_words(&self.lines))))
            }
        }
    }

    /// Kills a worker that will not be used.
    pub(crate) fn discard(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_briefly(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + Duration::from_millis(500);
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn read_frame_blocking(s: &mut std::os::unix::net::UnixStream) -> std::io::Result<(u8, Vec<u8>)> {
    read_frame_blocking_id(s).map(|(kind, _, body)| (kind, body))
}

fn read_frame_blocking_id(
    s: &mut std::os::unix::net::UnixStream,
) -> std::io::Result<(u8, u64, Vec<u8>)> {
    let mut h = [0u8; proto::HEADER];
    s.read_exact(&mut h)?;
    let (kind, id, len) =
        proto::header(&h).ok_or_else(|| std::io::Error::other("corrupt frame"))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((kind, id, body))
}

/// How a worker ended, in words.
pub(crate) fn describe(status: std::process::ExitStatus) -> String {
    match (status.signal(), status.code()) {
        (Some(sig), _) => format!(
            "was killed by signal {sig} ({})",
            super::super::probe::signal_name(sig)
        ),
        (None, Some(code)) => format!("exited with code {code}"),
        _ => format!("ended ({status})"),
    }
}

fn last_words(lines: &Mutex<VecDeque<String>>) -> String {
    let l = lines.lock().unwrap_or_else(PoisonError::into_inner);
    if l.is_empty() {
        String::new()
    } else {
        format!(
            "; its last output: {}",
            l.iter().cloned().collect::<Vec<_>>().join(" | ")
        )
    }
}

impl Supervisor {
    /// Creates the instance in `started` (the worker that reported the identity) and starts
    /// supervising it. Blocking; call from a thread that may block, inside the runtime.
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site, every argument distinct"
    )]
    pub(crate) fn create(
        started: Started,
        iso: Isolation,
        file: &Path,
        private: PathBuf,
        threads: usize,
        generation: u64,
        config: crate::plugin::PluginConfig,
        memory_limit: Option<u64>,
        hub: Arc<Hub>,
    ) -> Result<Arc<Self>, LoadError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| LoadError::Create {
            name: started.identity.name.clone(),
            file: file.to_owned(),
            reason: "process isolation needs the host's runtime".into(),
        })?;
        let create = proto::Create {
            generation,
            config: config.table.into_iter().collect(),
            config_json: config.json,
            log_level: log_level(),
            slow_ms: super::super::retire::slow().as_millis() as u64,
        };
        let started = started.create(&create, file, iso.start_timeout)?;
        let (current, _) = tokio::sync::watch::channel(None);
        let this = Arc::new(Self {
            name: started.identity.name.clone(),
            generation,
            file: file.to_owned(),
            private,
            iso,
            threads,
            create,
            memory_limit,
            hub,
            rt,
            current,
            restarts: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            rss: AtomicU64::new(0),
            cpu_dead: AtomicU64::new(0),
            cpu_live: AtomicU64::new(0),
            exited: tokio::sync::Notify::new(),
        });
        {
            // Pruned here too, not only when scraped: a `Weak` keeps its allocation.
            let mut all = SUPERVISORS.lock().unwrap_or_else(PoisonError::into_inner);
            all.retain(|w| w.strong_count() > 0);
            all.push(Arc::downgrade(&this));
        }
        let me = Arc::clone(&this);
        std::thread::Builder::new()
            .name(format!("wshost-sv-{}", this.name))
            .spawn(move || me.supervise(started))
            .map_err(|e| LoadError::Create {
                name: this.name.clone(),
                file: this.file.clone(),
                reason: format!("cannot start its supervisor thread: {e}"),
            })?;
        Ok(this)
    }

    fn stats(&self) -> WorkerStats {
        WorkerStats {
            plugin: self.name.clone(),
            generation: self.generation,
            restarts: self.restarts.load(Ordering::Relaxed),
            rss_bytes: self.rss.load(Ordering::Relaxed),
            cpu_seconds: (self.cpu_dead.load(Ordering::Relaxed)
                + self.cpu_live.load(Ordering::Relaxed)) as f64
                / 100.0,
        }
    }

    /// Serves through `started`, and keeps a worker serving until the generation stops: on a
    /// worker's death its connections close with 1011 and another starts after a back-off.
    /// Runs on a thread of its own.
    fn supervise(self: Arc<Self>, mut started: Started) {
        let mut crashes = 0u32;
        loop {
            let began = Instant::now();
            let Started {
                identity: _,
                mut child,
                stream,
                lines,
                stderr_done,
                watches,
            } = started;
            let pid = child.id();
            let (dead_tx, dead_rx) = std::sync::mpsc::channel();
            let link = self.go_live(stream, pid, dead_tx);
            if let Some(link) = &link {
                for channel in &watches {
                    link.watch(channel);
                }
            }
            let (status, why) = self.watch(&mut child, pid, &dead_rx, link.as_ref());
            let closed = link.as_ref().map_or(0, |l| l.die());
            self.current.send_if_modified(|c| {
                if c.as_ref()
                    .is_some_and(|c| link.as_ref().is_some_and(|l| Arc::ptr_eq(c, l)))
                {
                    *c = None;
                    true
                } else {
                    false
                }
            });
            self.cpu_dead
                .fetch_add(self.cpu_live.swap(0, Ordering::Relaxed), Ordering::Relaxed);
            self.rss.store(0, Ordering::Relaxed);
            let _ = stderr_done.recv_timeout(Duration::from_millis(300));
            let _ = stderr_done.recv_timeout(Duration::from_millis(50));
            let how = status.map_or_else(|| "was lost".to_owned(), describe);
            if self.stopped.load(Ordering::Acquire) {
                tracing::info!(plugin = %self.name, generation = self.generation, worker_pid = pid,
                    "worker process {how}; the generation's code is unmapped with it");
                let _ = std::fs::remove_file(&self.private);
                self.exited.notify_waiters();
                return;
            }
            tracing::error!(plugin = %self.name, generation = self.generation, worker_pid = pid,
                connections_closed = closed,
                "plugin worker process {how}{}{}; its connections were closed with 1011 and a new \
                 worker starts", why.map(|w| format!(" ({w})")).unwrap_or_default(),
                last_words(&lines));
            crashes = if began.elapsed() >= STABLE {
                1
            } else {
                crashes + 1
            };
            loop {
                std::thread::sleep(backoff(crashes));
                if self.stopped.load(Ordering::Acquire) {
                    let _ = std::fs::remove_file(&self.private);
                    self.exited.notify_waiters();
                    return;
                }
                self.restarts.fetch_add(1, Ordering::Relaxed);
                let attempt = start(&self.iso, &self.file, &self.private, self.threads)
                    .and_then(|s| s.create(&self.create, &self.file, self.iso.start_timeout));
                match attempt {
                    Ok(s) => {
                        tracing::info!(plugin = %self.name, generation = self.generation,
                            worker_pid = s.child.id(), restarts = self.restarts.load(Ordering::Relaxed),
                            "plugin worker restarted");
                        started = s;
                        break;
                    }
                    Err(e) => {
                        crashes += 1;
                        tracing::error!(plugin = %self.name, generation = self.generation,
                            next_attempt_ms = backoff(crashes).as_millis() as u64,
                            "plugin worker did not restart: {e}");
                    }
                }
            }
        }
    }

    /// Starts the reader and writer of a worker's socket and routes new decisions to it.
    fn go_live(
        &self,
        stream: std::os::unix::net::UnixStream,
        pid: u32,
        dead: std::sync::mpsc::Sender<()>,
    ) -> Option<Arc<WorkerLink>> {
        let _guard = self.rt.enter();
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(stream));
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(plugin = %self.name, error = %e, "cannot use the worker's socket");
                return None;
            }
        };
        let (read, write) = stream.into_split();
        let link = Arc::new(WorkerLink {
            plugin: self.name.clone(),
            generation: self.generation,
            pid,
            out: Arc::new(Outbox::default()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            closed_at_death: Default::default(),
            hub: Arc::clone(&self.hub),
        });
        self.rt.spawn(writer(Arc::clone(&link.out), write));
        self.rt.spawn(reader(Arc::clone(&link), read, dead));
        self.current.send_replace(Some(Arc::clone(&link)));
        Some(link)
    }

    /// Waits for the worker to end; meanwhile samples its memory and CPU, and ends it when it
    /// passes the memory limit or outlives a stop. Returns its status and, if the host ended
    /// it, why.
    fn watch(
        &self,
        child: &mut std::process::Child,
        pid: u32,
        dead: &std::sync::mpsc::Receiver<()>,
        link: Option<&Arc<WorkerLink>>,
    ) -> (Option<std::process::ExitStatus>, Option<String>) {
        let mut why = None;
        let mut stop_deadline: Option<Instant> = None;
        if link.is_none() {
            let _ = child.kill();
        }
        loop {
            let gone = !matches!(
                dead.recv_timeout(SAMPLE_EVERY),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if let Ok(Some(status)) = child.try_wait() {
                return (Some(status), why);
            }
            if gone {
                // The socket closed: the worker is ending; give it a moment, then make sure.
                let until = Instant::now() + Duration::from_secs(1);
                while Instant::now() < until {
                    if let Ok(Some(status)) = child.try_wait() {
                        return (Some(status), why);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let _ = child.kill();
                return (child.wait().ok(), why.or(Some("its socket closed".into())));
            }
            let (rss, cpu) = sample(pid);
            self.rss.store(rss, Ordering::Relaxed);
            self.cpu_live.store(cpu, Ordering::Relaxed);
            if let Some(limit) = self.memory_limit {
                if rss > limit && why.is_none() {
                    why = Some(format!(
                        "it used {} MiB, past its memory_limit of {} MiB",
                        rss >> 20,
                        limit >> 20
                    ));
                    let _ = child.kill();
                }
            }
            if link.is_some_and(|l| l.out.overflowed.load(Ordering::Relaxed)) && why.is_none() {
                why = Some("it stopped reading the host's messages".into());
                let _ = child.kill();
            }
            if self.stopped.load(Ordering::Acquire) {
                let d =
                    *stop_deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(10));
                if Instant::now() >= d {
                    why = Some("its shutdown took longer than 10 s".into());
                    let _ = child.kill();
                }
            }
        }
    }

    /// Decides `req` in the live worker (waiting for one to start, until `deadline`).
    pub(crate) async fn decide(&self, req: RequestMap, deadline: tokio::time::Instant) -> Decision {
        let mut rx = self.current.subscribe();
        let link = match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(l)) => l.clone().expect("waited for Some"),
            Ok(Err(_)) | Err(_) => {
                return Decision::Unavailable(
                    "no worker process of the plugin is running (it is \
                    restarting after a crash)"
                        .into(),
                )
            }
        };
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, answer) = tokio::sync::oneshot::channel();
        link.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        if !link.alive.load(Ordering::Acquire) {
            link.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            return Decision::Unavailable("the plugin's worker process ended".into());
        }
        link.out.push(
            proto::DECIDE,
            id,
            &[&serde_json::to_vec(&req).unwrap_or_default()],
        );
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(msg)) => {
                if let Some(panic) = msg.panic {
                    return Decision::Panicked(panic);
                }
                if msg.dropped {
                    return Decision::Dropped;
                }
                Decision::Answer(Answer {
                    status: msg.status,
                    headers: msg.headers,
                    body: msg.body,
                    handler: msg.handler.map(|token| {
                        crate::plugin::Handler::Remote(RemoteHandler {
                            link: Arc::clone(&link),
                            token,
                            bound: false,
                        })
                    }),
                    limits: msg.limits,
                    kept_headers: msg.kept_headers,
                })
            }
            Ok(Err(_)) => {
                Decision::Unavailable("the plugin's worker process ended while deciding".into())
            }
            Err(_) => {
                link.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                // A deferred decision's responder learns nobody waits any more.
                link.out.push(proto::DISCARD, id, &[]);
                Decision::TimedOut
            }
        }
    }

    /// Tells the live worker's plugin that a newer generation took over.
    pub(crate) fn replaced(&self) {
        if let Some(link) = self.current.borrow().as_ref() {
            link.out.push(proto::REPLACED, 0, &[]);
        }
    }

    /// Stops the generation: the worker runs `shutdown` and exits (ended after 10 s); no more
    /// restarts. Blocks until the worker is gone or `timeout` passed.
    pub(crate) fn stop(&self, timeout: Duration) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let link = self.current.borrow().clone();
        let Some(link) = link else { return };
        link.out.push(proto::SHUTDOWN, 0, &[]);
        if tokio::runtime::Handle::try_current().is_ok() {
            // On a runtime thread: do not block it (the supervisor ends the worker if it
            // lingers).
            return;
        }
        let rt = self.rt.clone();
        rt.block_on(async {
            let notified = self.exited.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.current.borrow().is_none() {
                return;
            }
            let _ = tokio::time::timeout(timeout, notified).await;
        });
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.private);
    }
}

/// Reads a process's resident memory (bytes) and CPU time (clock ticks, user and system).
fn sample(pid: u32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    (rss, cpu)
}

/// One live worker process: its socket's two directions, the decisions it owes, and the
/// connections whose handlers it holds.
#[derive(Debug)]
pub(crate) struct WorkerLink {
    plugin: String,
    generation: u64,
    pid: u32,
    out: Arc<Outbox>,
    pending: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<AnswerMsg>>>,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<RemoteConn>>>,
    alive: AtomicBool,
    /// Connections closed because the worker died.
    closed_at_death: std::sync::atomic::AtomicUsize,
    hub: Arc<Hub>,
}

/// A watch of a worker's plugin: the channel's events cross to the worker as frames.
#[derive(Debug)]
struct RemoteWatcher {
    out: Arc<Outbox>,
}

impl crate::channels::Watcher for RemoteWatcher {
    fn event(&self, channel: &str, event: crate::channels::WatchEvent<'_>) {
        use crate::channels::WatchEvent;
        use plugin_api::abi::channel_event;
        let body = match event {
            WatchEvent::Joined(m) => proto::channel_event_body(
                channel_event::JOINED,
                channel,
                &serde_json::to_vec(m).unwrap_or_default(),
            ),
            WatchEvent::Left(m) => proto::channel_event_body(
                channel_event::LEFT,
                channel,
                &serde_json::to_vec(m).unwrap_or_default(),
            ),
            WatchEvent::Message(Message::Text(t)) => {
                proto::channel_event_body(channel_event::TEXT, channel, t.as_bytes())
            }
            WatchEvent::Message(Message::Binary(b)) => {
                proto::channel_event_body(channel_event::BINARY, channel, b)
            }
            WatchEvent::Message(_) => return,
        };
        self.out.push(proto::CHANNEL_EVENT, 0, &[&body]);
    }
}

/// A connection whose callbacks run in a worker.
struct RemoteConn {
    ops: Box<dyn DynConn>,
    /// Bytes of the worker's sends the host has taken, and the part reported back as credit.
    total: AtomicU64,
    reported: AtomicU64,
    drain_wanted: AtomicBool,
    threshold: u64,
}

impl std::fmt::Debug for RemoteConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteConn").finish_non_exhaustive()
    }
}

impl RemoteConn {
    /// The host's queue is empty: give the worker its credit back if it waits for it or a
    /// quarter of its queue is outstanding.
    fn credit(&self, id: u64, out: &Outbox) {
        let total = self.total.load(Ordering::Acquire);
        let want = self.drain_wanted.load(Ordering::Acquire);
        if !want && total - self.reported.load(Ordering::Acquire) < self.threshold {
            return;
        }
        let drain = want && self.drain_wanted.swap(false, Ordering::AcqRel);
        self.reported.fetch_max(total, Ordering::AcqRel);
        out.push(
            proto::CREDIT,
            id,
            &[&total.to_le_bytes(), &[u8::from(drain)]],
        );
    }
}

impl WorkerLink {
    /// The worker is gone: decisions it owed fail, its connections close with 1011. Called by
    /// the socket's reader and by the supervisor, whichever sees it first; returns how many
    /// connections the worker had, whoever closed them.
    fn die(&self) -> usize {
        self.alive.store(false, Ordering::Release);
        self.out.close();
        // The worker's watches end with it (a new worker's constructor watches again).
        self.hub.unwatch_all(&self.plugin, self.generation);
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        let conns: Vec<_> = self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        for (_, c) in &conns {
            c.ops.fail(true);
        }
        self.closed_at_death
            .fetch_add(conns.len(), Ordering::AcqRel)
            + conns.len()
    }

    /// Binds the handler `token` to a connection.
    fn open(self: &Arc<Self>, token: u64, ops: Box<dyn DynConn>) -> u64 {
        let id = ops.id();
        let max = ops.max_send_queue();
        let conn = Arc::new(RemoteConn {
            ops,
            total: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            drain_wanted: AtomicBool::new(false),
            threshold: (max / 4).max(1),
        });
        let open = proto::Open {
            token,
            remote: conn.ops.remote_addr().to_owned(),
            max_send_queue: max,
            facts: conn.ops.facts().clone(),
        };
        let (weak, out) = (Arc::downgrade(&conn), Arc::clone(&self.out));
        conn.ops.on_queue_empty(Box::new(move || {
            if let Some(c) = weak.upgrade() {
                c.credit(id, &out);
            }
        }));
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&conn));
        self.out.push(
            proto::OPEN,
            id,
            &[&serde_json::to_vec(&open).unwrap_or_default()],
        );
        if !self.alive.load(Ordering::Acquire) {
            self.conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            conn.ops.fail(true);
        }
        id
    }

    fn conn(&self, id: u64) -> Option<Arc<RemoteConn>> {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    fn reply(&self, id: u64, value: u64) {
        self.out.push(proto::REPLY, id, &[&value.to_le_bytes()]);
    }

    /// The worker's plugin watches `channel`: its events go to the worker as frames.
    fn watch(&self, channel: &str) {
        let watcher: Arc<dyn crate::channels::Watcher> = Arc::new(RemoteWatcher {
            out: Arc::clone(&self.out),
        });
        self.hub
            .watch(&self.plugin, channel, self.generation, watcher);
    }

    /// One frame from the worker.
    fn dispatch(&self, kind: u8, id: u64, body: Bytes) {
        match kind {
            proto::ANSWER => {
                let Ok(msg) = serde_json::from_slice::<AnswerMsg>(&body) else {
                    return;
                };
                let tx = self
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                match tx {
                    Some(tx) => {
                        if let Err(msg) = tx.send(msg) {
                            if let Some(token) = msg.handler {
                                self.out.push(proto::DISCARD, token, &[]);
                            }
                        }
                    }
                    // The host stopped waiting (the decision timeout): drop what it accepted.
                    None => {
                        if let Some(token) = msg.handler {
                            self.out.push(proto::DISCARD, token, &[]);
                        }
                    }
                }
            }
            proto::SEND_TEXT
            | proto::SEND_BINARY
            | proto::SEND_TEXT_TRACKED
            | proto::SEND_BINARY_TRACKED => {
                let Some(c) = self.conn(id) else { return };
                let tracked = matches!(kind, proto::SEND_TEXT_TRACKED | proto::SEND_BINARY_TRACKED);
                let (tag, body) = if tracked {
                    let tag = proto::split_u64(&body).0;
                    (Some(tag), body.slice(8.min(body.len())..))
                } else {
                    (None, body)
                };
                c.total.fetch_add(body.len() as u64, Ordering::AcqRel);
                let msg = if matches!(kind, proto::SEND_TEXT | proto::SEND_TEXT_TRACKED) {
                    match tokio_tungstenite::tungstenite::Utf8Bytes::try_from(body) {
                        Ok(t) => Message::Text(t),
                        Err(_) => return,
                    }
                } else {
                    Message::Binary(body)
                };
                c.ops.send_from_worker_tracked(msg, tag);
            }
            proto::SEND_PING => {
                if let Some(c) = self.conn(id) {
                    c.ops.send_from_worker(Message::Ping(body));
                }
            }
            proto::SEND_CLOSE => {
                if let Some(c) = self.conn(id) {
                    let (code, reason) = proto::read_close(&body);
                    let _ = c.ops.close(code, &reason);
                }
            }
            proto::REFUSED => {
                let (full, rest) = proto::split_u64(&body);
                let large = proto::split_u64(rest).0;
                WORKER_REFUSED[0].fetch_add(full, Ordering::AcqRel);
                WORKER_REFUSED[1].fetch_add(large, Ordering::AcqRel);
            }
            proto::WANT_DRAIN => {
                if let Some(c) = self.conn(id) {
                    c.drain_wanted.store(true, Ordering::Release);
                    if c.ops.buffered() == 0 {
                        c.credit(id, &self.out);
                    }
                }
            }
            proto::SET_IDLE => {
                if let Some(c) = self.conn(id) {
                    let ms = proto::split_u64(&body).0;
                    c.ops.set_idle_timeout(Duration::from_millis(ms));
                }
            }
            proto::SET_TIMER => {
                if let Some(c) = self.conn(id) {
                    let (tag, rest) = proto::split_u64(&body);
                    let ms = proto::split_u64(rest).0;
                    // The worker checked the limit and the state; a refusal here (the
                    // connection closed meanwhile) means the timer could never fire anyway.
                    let _ = c.ops.set_timer(tag, Duration::from_millis(ms));
                }
            }
            proto::CANCEL_TIMER => {
                if let Some(c) = self.conn(id) {
                    c.ops.cancel_timer(proto::split_u64(&body).0);
                }
            }
            proto::SET_LOW_WATER => {
                if let Some(c) = self.conn(id) {
                    c.ops.set_low_water(proto::split_u64(&body).0);
                }
            }
            proto::SET_LABEL => {
                if let Some(c) = self.conn(id) {
                    c.ops.set_label(&String::from_utf8_lossy(&body));
                }
            }
            proto::PAUSE => {
                if let Some(c) = self.conn(id) {
                    c.ops.set_paused(body.first() == Some(&1));
                }
            }
            proto::SUBSCRIBE | proto::UNSUBSCRIBE => {
                let (conn, channel) = proto::split_u64(&body);
                let channel = String::from_utf8_lossy(channel);
                let value = match (self.conn(conn), kind) {
                    (None, _) => u64::from(plugin_api::SendError::Closed.code()),
                    (Some(c), proto::SUBSCRIBE) => match c.ops.subscribe(&channel) {
                        Ok(()) => 0,
                        Err(e) => u64::from(e.code()),
                    },
                    (Some(c), _) => u64::from(c.ops.unsubscribe(&channel)),
                };
                self.reply(id, value);
            }
            proto::PUBLISH => {
                let n = match proto::read_publish(&body) {
                    Some((binary, channel, at)) => {
                        let data = body.slice(at..);
                        let msg = if binary {
                            Message::Binary(data)
                        } else {
                            match tokio_tungstenite::tungstenite::Utf8Bytes::try_from(data) {
                                Ok(t) => Message::Text(t),
                                Err(_) => return self.reply(id, 0),
                            }
                        };
                        self.hub.publish(&self.plugin, channel, &msg)
                    }
                    None => 0,
                };
                self.reply(id, n);
            }
            proto::MEMBERS => {
                let members = self
                    .hub
                    .members(&self.plugin, &String::from_utf8_lossy(&body));
                let json = serde_json::to_vec(&members).unwrap_or_default();
                self.out
                    .push(proto::REPLY, id, &[&0u64.to_le_bytes(), &json]);
            }
            proto::WATCH => self.watch(&String::from_utf8_lossy(&body)),
            proto::UNWATCH => {
                self.hub.unwatch(
                    &self.plugin,
                    &String::from_utf8_lossy(&body),
                    self.generation,
                );
            }
            proto::SUBSCRIBERS => {
                let n = self
                    .hub
                    .subscribers(&self.plugin, &String::from_utf8_lossy(&body));
                self.reply(id, n);
            }
            proto::LOG => {
                let m = String::from_utf8_lossy(&body);
                let (p, g) = (&self.plugin, self.generation);
                use plugin_api::abi::level;
                match id as u8 {
                    level::ERROR => {
                        tracing::error!(target: "plugin", plugin = %p, generation = g, "{m}")
                    }
                    level::WARN => {
                        tracing::warn!(target: "plugin", plugin = %p, generation = g, "{m}")
                    }
                    level::INFO => {
                        tracing::info!(target: "plugin", plugin = %p, generation = g, "{m}")
                    }
                    level::DEBUG => {
                        tracing::debug!(target: "plugin", plugin = %p, generation = g, "{m}")
                    }
                    _ => tracing::trace!(target: "plugin", plugin = %p, generation = g, "{m}"),
                }
            }
            proto::CALL_FAILED => {
                let Ok(f) = serde_json::from_slice::<proto::Failed>(&body) else {
                    return;
                };
                tracing::error!(plugin = %self.plugin, generation = self.generation, conn_id = id,
                    callback = %f.callback, panic = %f.panic,
                    "plugin callback panicked; closing the connection with 1011");
                if let Some(c) = self.conn(id) {
                    c.ops.fail(false);
                }
            }
            proto::SHUT_DOWN => {
                if !body.is_empty() {
                    tracing::error!(plugin = %self.plugin, generation = self.generation,
                        panic = %String::from_utf8_lossy(&body), "plugin shutdown panicked");
                }
                tracing::info!(plugin = %self.plugin, generation = self.generation,
                    worker_pid = self.pid, "generation shut down");
            }
            _ => {}
        }
    }
}

/// Reads the worker's frames until its socket closes.
async fn reader(
    link: Arc<WorkerLink>,
    mut read: tokio::net::unix::OwnedReadHalf,
    dead: std::sync::mpsc::Sender<()>,
) {
    let mut buf = BytesMut::with_capacity(256 << 10);
    'read: loop {
        while buf.len() >= proto::HEADER {
            let h: [u8; proto::HEADER] = buf[..proto::HEADER].try_into().expect("header");
            let Some((kind, id, len)) = proto::header(&h) else {
                tracing::error!(plugin = %link.plugin, "corrupt frame from the worker");
                break 'read;
            };
            if buf.len() < proto::HEADER + len {
                // Room for what is missing, at most 1 MiB at a time: a worker's claimed length
                // reserves nothing it does not send.
                buf.reserve((proto::HEADER + len - buf.len()).min(1 << 20));
                break;
            }
            buf.advance(proto::HEADER);
            let body = buf.split_to(len).freeze();
            link.dispatch(kind, id, body);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 << 10);
        }
        match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    link.die();
    let _ = dead.send(());
}

/// Frames to a worker (or, in a worker, to the host): appended to one buffer, written by one
/// task.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    buf: Mutex<Vec<u8>>,
    ready: tokio::sync::Notify,
    closed: AtomicBool,
    overflowed: AtomicBool,
    /// Sends refused (queue full, too large) and not yet reported: a worker's writer reports
    /// them in one [`proto::REFUSED`] frame with what it writes next, so a plugin that retries
    /// a refused send in a loop costs one frame per write, not one per refusal.
    refused: [AtomicU64; 2],
}

/// Why a worker refused a send, as [`Outbox::note_refused`] counts it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refused {
    QueueFull = 0,
    TooLarge = 1,
}

/// Sends refused in worker processes and reported to this host, not yet counted in `/metrics`:
/// queue full, too large.
static WORKER_REFUSED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Takes the counts of sends refused in worker processes since last asked: (queue full, too
/// large).
pub fn take_worker_refusals() -> (u64, u64) {
    (
        WORKER_REFUSED[0].swap(0, Ordering::AcqRel),
        WORKER_REFUSED[1].swap(0, Ordering::AcqRel),
    )
}

impl Outbox {
    pub(crate) fn push(&self, kind: u8, id: u64, parts: &[&[u8]]) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut b = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        if b.len() > MAX_OUTBOX {
            self.overflowed.store(true, Ordering::Relaxed);
            return;
        }
        let was_empty = b.is_empty();
        proto::put(&mut b, kind, id, parts);
        drop(b);
        if was_empty {
            self.ready.notify_one();
        }
    }

    /// Counts a send refused for `why`, to be reported with the next write.
    pub(crate) fn note_refused(&self, why: Refused) {
        if self.refused[why as usize].fetch_add(1, Ordering::AcqRel) == 0 {
            // The first since the writer last looked: make sure it looks again.
            self.ready.notify_one();
        }
    }

    /// Appends a [`proto::REFUSED`] frame to `buf` if any refusal is unreported.
    fn report_refused(&self, buf: &mut Vec<u8>) {
        let full = self.refused[0].swap(0, Ordering::AcqRel);
        let large = self.refused[1].swap(0, Ordering::AcqRel);
        if full == 0 && large == 0 {
            return;
        }
        proto::put(
            buf,
            proto::REFUSED,
            0,
            &[&full.to_le_bytes(), &large.to_le_bytes()],
        );
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Whether nothing waits to be written.
    pub(crate) fn is_empty(&self) -> bool {
        self.buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }
}

/// Writes what is pushed to `out` until the socket fails or `out` is closed.
pub(crate) async fn writer(out: Arc<Outbox>, mut write: tokio::net::unix::OwnedWriteHalf) {
    let mut spare = Vec::new();
    loop {
        out.ready.notified().await;
        loop {
            let mut data = {
                let mut b = out.buf.lock().unwrap_or_else(PoisonError::into_inner);
                std::mem::replace(&mut *b, std::mem::take(&mut spare))
            };
            out.report_refused(&mut data);
            if data.is_empty() {
                spare = data;
                break;
            }
            if write.write_all(&data).await.is_err() {
                return;
            }
            data.clear();
            if data.capacity() <= 1 << 20 {
                spare = data;
            }
        }
        if out.closed.load(Ordering::Acquire) {
            return;
        }
    }
}

/// An accepted handler that lives in a worker, until a connection binds it.
#[derive(Debug)]
pub(crate) struct RemoteHandler {
    link: Arc<WorkerLink>,
    token: u64,
    bound: bool,
}

impl Drop for RemoteHandler {
    fn drop(&mut self) {
        if !self.bound {
            self.link.out.push(proto::DISCARD, self.token, &[]);
        }
    }
}

/// A connection's callbacks, as frames to the worker that holds its handler. They return at
/// once; a panic in the worker comes back as a failure of the connection.
#[derive(Debug)]
pub(crate) struct RemoteCallbacks {
    link: Arc<WorkerLink>,
    id: u64,
}

impl RemoteCallbacks {
    pub(crate) fn bind(mut handler: RemoteHandler, conn: Box<dyn DynConn>) -> Self {
        handler.bound = true;
        let id = handler.link.open(handler.token, conn);
        Self {
            link: Arc::clone(&handler.link),
            id,
        }
    }

    /// Sends one event; its callback's outcome comes back later (see [`SessionConn::fail`]).
    ///
    /// [`SessionConn::fail`]: crate::plugin::SessionConn::fail
    pub(crate) fn event(&self, kind: u8, parts: &[&[u8]]) -> Result<(), String> {
        self.link.out.push(kind, self.id, parts);
        Ok(())
    }

    /// The host's queue fell to the connection's low-water mark: the worker gets its credit
    /// back with an `on_drain`.
    pub(crate) fn drain(&self) {
        let conn = self
            .link
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&self.id)
            .cloned();
        if let Some(c) = conn {
            // What the host has written of the worker's sends: taken, less still queued.
            let written = c
                .total
                .load(Ordering::Acquire)
                .saturating_sub(c.ops.buffered());
            c.reported.fetch_max(written, Ordering::AcqRel);
            self.link
                .out
                .push(proto::CREDIT, self.id, &[&written.to_le_bytes(), &[1]]);
        }
    }
}

impl Drop for RemoteCallbacks {
    fn drop(&mut self) {
        self.link
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// The most verbose plugin log level the host's filter lets through.
fn log_level() -> u8 {
    use plugin_api::abi::level;
    let on = |l: tracing::Level| match l {
        tracing::Level::ERROR => tracing::enabled!(target: "plugin", tracing::Level::ERROR),
        tracing::Level::WARN => tracing::enabled!(target: "plugin", tracing::Level::WARN),
        tracing::Level::INFO => tracing::enabled!(target: "plugin", tracing::Level::INFO),
        tracing::Level::DEBUG => tracing::enabled!(target: "plugin", tracing::Level::DEBUG),
        tracing::Level::TRACE => tracing::enabled!(target: "plugin", tracing::Level::TRACE),
    };
    if on(tracing::Level::TRACE) {
        level::TRACE
    } else if on(tracing::Level::DEBUG) {
        level::DEBUG
    } else if on(tracing::Level::INFO) {
        level::INFO
    } else if on(tracing::Level::WARN) {
        level::WARN
    } else {
        level::ERROR
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_to_thirty_seconds() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(50));
        assert_eq!(backoff(3), Duration::from_millis(100));
        assert_eq!(backoff(7), Duration::from_millis(1600));
        assert_eq!(backoff(12), Duration::from_secs(30));
        assert_eq!(backoff(1000), Duration::from_secs(30));
    }

    #[test]
    fn refusals_are_reported_in_one_frame_per_write() {
        let out = Outbox::default();
        for _ in 0..3 {
            out.note_refused(Refused::QueueFull);
        }
        out.note_refused(Refused::TooLarge);
        let mut buf = Vec::new();
        out.report_refused(&mut buf);
        let header: &[u8; proto::HEADER] = buf[..proto::HEADER].try_into().unwrap();
        assert_eq!(
            proto::header(header).map(|(kind, id, _)| (kind, id)),
            Some((proto::REFUSED, 0))
        );
        let (full, rest) = proto::split_u64(&buf[proto::HEADER..]);
        assert_eq!((full, proto::split_u64(rest).0), (3, 1));
        // Reported once: nothing is left for the next write.
        let before = buf.len();
        out.report_refused(&mut buf);
        assert_eq!(buf.len(), before);
    }
}
