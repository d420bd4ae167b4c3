//! Where plugin code runs: each plugin has a runtime of its own, with its own worker threads
//! and its own I/O driver. Its connections' sessions (and so every callback), its `upgrade` and
//! `request` calls run there, never on the threads that accept connections or serve other
//! plugins. A plugin that blocks uses up only its own workers (its capacity): its connections
//! stop being read, and TCP pushes back on their clients; nobody else notices.
//!
//! A watchdog thread looks at every worker's current call: a call running past the slow
//! threshold is logged while it runs (plugin, call, connection, elapsed), again at every
//! doubling, and counted in `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The calls a worker can be in, by index (what a [`CallSlot`] stores).
pub(crate) const CALLS: &[&str] = &[
    "",
    "upgrade",
    "request",
    "on_connect",
    "on_text",
    "on_binary",
    "on_ping",
    "on_pong",
    "on_drain",
    "on_error",
    "on_close",
    "drop",
    "create",
    "shutdown",
    "replaced",
    "on_timer",
    "on_channel",
    "on_sent",
];

/// The index of `call` in [`CALLS`] (0 if unknown).
pub(crate) fn call_index(call: &str) -> u8 {
    match call {
        "upgrade" => 1,
        "request" => 2,
        "on_connect" => 3,
        "on_text" => 4,
        "on_binary" => 5,
        "on_ping" => 6,
        "on_pong" => 7,
        "on_drain" => 8,
        "on_error" => 9,
        "on_close" => 10,
        "drop" => 11,
        "create" => 12,
        "shutdown" => 13,
        "replaced" => 14,
        "on_timer" => 15,
        "on_channel" => 16,
        "on_sent" => 17,
        _ => 0,
    }
}

/// One worker thread's current plugin call.
#[derive(Debug, Default)]
pub(crate) struct CallSlot {
    /// When the call started, in microseconds since [`epoch`], plus one; 0 when idle.
    started_us: AtomicU64,
    call: AtomicU8,
    conn: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

thread_local! {
    /// The slot of this thread, if it is a plugin worker.
    static SLOT: std::cell::RefCell<Option<Arc<CallSlot>>> = const { std::cell::RefCell::new(None) };
}

thread_local! {
    /// The connection whose callback this thread is running, if that connection has no span
    /// yet (0: none, or its span is entered): the plugin's log lines name it themselves.
    static UNSPANNED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Notes that the call this thread has [`enter`]ed is a callback of connection `conn`, which
/// has no span yet; [`leave`] ends it.
pub(crate) fn set_unspanned(conn: u64) {
    UNSPANNED.set(conn);
}

/// The connection whose callback this thread runs without its span (0: none).
pub(crate) fn unspanned() -> u64 {
    UNSPANNED.get()
}

/// Notes that this thread starts plugin call `call` (see [`call_index`]) for connection `conn`
/// (0: none) at `at`. A no-op on threads that are not plugin workers.
pub(crate) fn enter(call: u8, conn: u64, at: Instant) {
    SLOT.with(|s| {
        if let Some(slot) = &*s.borrow() {
            let us = at.saturating_duration_since(epoch()).as_micros() as u64 + 1;
            slot.call.store(call, Ordering::Relaxed);
            slot.conn.store(conn, Ordering::Relaxed);
            slot.started_us.store(us, Ordering::Release);
        }
    });
}

/// Notes that this thread's plugin call returned.
pub(crate) fn leave() {
    UNSPANNED.set(0);
    SLOT.with(|s| {
        if let Some(slot) = &*s.borrow() {
            slot.started_us.store(0, Ordering::Release);
        }
    });
}

/// A plugin's runtime: its capacity of workers, and what they are doing.
#[derive(Debug)]
pub struct Executor {
    name: String,
    handle: tokio::runtime::Handle,
    workers: usize,
    slots: Arc<Mutex<Vec<Arc<CallSlot>>>>,
    /// Calls of this plugin that were logged as running long (back-off state per worker).
    logged: Mutex<Vec<(u64, u32)>>,
}

/// What `/metrics` shows of one plugin's executor.
#[derive(Debug, Clone, Default)]
pub struct ExecutorStats {
    /// The plugin's name.
    pub plugin: String,
    /// Worker threads: how many of its calls may run or block at once.
    pub workers: usize,
    /// Calls running now (workers busy in plugin code).
    pub running: usize,
    /// Calls running for longer than the slow threshold.
    pub stuck: usize,
    /// Tasks (sessions, upgrades, requests) waiting for a worker.
    pub queue_depth: usize,
}

static EXECUTORS: Mutex<BTreeMap<String, Arc<Executor>>> = Mutex::new(BTreeMap::new());

/// The executor of plugin `name`, created with `workers` threads the first time; generations
/// of one plugin share it (its capacity is the plugin's, whatever its generation).
pub(crate) fn executor(name: &str, workers: usize) -> std::io::Result<Arc<Executor>> {
    let mut all = EXECUTORS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(e) = all.get(name) {
        if e.workers != workers {
            tracing::warn!(
                plugin = name,
                workers = e.workers,
                asked = workers,
                "a plugin's worker count is set when it first loads; restart the host to change it"
            );
        }
        return Ok(Arc::clone(e));
    }
    let slots: Arc<Mutex<Vec<Arc<CallSlot>>>> = Arc::default();
    let on_start = Arc::clone(&slots);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name(format!("wshost-{name}"))
        .enable_all()
        .on_thread_start(move || {
            let slot = Arc::new(CallSlot::default());
            on_start
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Arc::clone(&slot));
            SLOT.with(|s| *s.borrow_mut() = Some(slot));
        })
        .build()?;
    let executor = Arc::new(Executor {
        name: name.to_owned(),
        handle: runtime.handle().clone(),
        workers: workers.max(1),
        slots,
        logged: Mutex::new(Vec::new()),
    });
    // The runtime lives as long as the process: a worker that plugin code never gives back
    // must not hold up the host's exit, which dropping a runtime would wait for.
    std::mem::forget(runtime);
    all.insert(name.to_owned(), Arc::clone(&executor));
    start_watchdog();
    Ok(executor)
}

impl Executor {
    /// The runtime's handle: spawn the plugin's sessions and calls here.
    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// What this executor is doing now; `slow` is the threshold for "stuck".
    pub(crate) fn stats(&self, slow: Duration) -> ExecutorStats {
        let now_us = epoch().elapsed().as_micros() as u64 + 1;
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut stats = ExecutorStats {
            plugin: self.name.clone(),
            workers: self.workers,
            queue_depth: self.handle.metrics().global_queue_depth(),
            ..ExecutorStats::default()
        };
        for slot in slots.iter() {
            let started = slot.started_us.load(Ordering::Acquire);
            if started != 0 {
                stats.running += 1;
                if now_us.saturating_sub(started) >= slow.as_micros() as u64 {
                    stats.stuck += 1;
                }
            }
        }
        stats
    }

    /// Logs the calls running past `slow`: once past it, again at every doubling. While a call
    /// runs long, nudges the runtime so that its other workers keep polling for I/O.
    fn watch(&self, slow: Duration) {
        let now_us = epoch().elapsed().as_micros() as u64 + 1;
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
        logged.resize(slots.len(), (0, 0));
        let mut nudge = false;
        for (slot, (seen, times)) in slots.iter().zip(logged.iter_mut()) {
            let started = slot.started_us.load(Ordering::Acquire);
            if started == 0 {
                continue;
            }
            nudge |= now_us.saturating_sub(started) >= NUDGE_AFTER.as_micros() as u64;
            if started != *seen {
                *seen = started;
                *times = 0;
            }
            let elapsed = Duration::from_micros(now_us.saturating_sub(started));
            let next = slow.saturating_mul(1u32 << (*times).min(20));
            if elapsed >= next && !slow.is_zero() {
                *times += 1;
                let call = CALLS
                    .get(usize::from(slot.call.load(Ordering::Relaxed)))
                    .copied()
                    .unwrap_or("");
                let conn = slot.conn.load(Ordering::Relaxed);
                tracing::warn!(plugin = %self.name, call, conn_id = conn,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "plugin call still running: it holds one of the plugin's {} workers \
                     (its other connections wait once all are held; other plugins do not)",
                    self.workers);
            }
        }
        drop((slots, logged));
        if nudge {
            // A tokio worker that runs a task does not poll the runtime's I/O driver, and the
            // idle workers wait for it to hand the driver back: a worker held by plugin code
            // would keep every connection of the plugin from being read. Waking an idle worker
            // (with an empty task) makes it take the driver over when it parks again.
            drop(self.handle.spawn(async {}));
        }
    }
}

/// How long a call runs before its runtime is nudged (see [`Executor::watch`]).
const NUDGE_AFTER: Duration = Duration::from_millis(5);

/// Every executor, taken out of the map's lock.
fn executors() -> Vec<Arc<Executor>> {
    EXECUTORS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .cloned()
        .collect()
}

/// Every executor's stats, for `/metrics`.
pub(crate) fn all_stats(slow: Duration) -> Vec<ExecutorStats> {
    executors().iter().map(|e| e.stats(slow)).collect()
}

/// How often the watchdog looks.
const WATCH_EVERY: Duration = Duration::from_millis(10);

fn start_watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("wshost-watchdog".into())
            .spawn(|| loop {
                std::thread::sleep(WATCH_EVERY);
                let slow = super::retire::slow();
                for e in executors() {
                    e.watch(slow);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the watchdog thread; long plugin calls \
                are logged only when they return");
        }
    });
}

/// The default number of workers per plugin: the machine's cores, at least 2.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, std::num::NonZeroUsize::get)
        .max(2)
}
