//! The connection handle: what a plugin's `Conn` calls into. Sends queue and never block; the
//! connection's session task writes the queue out.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::task::AtomicWaker;
use plugin_api::SendError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::budget::MemoryBudget;
use crate::channels::{Delivery, Hub};

thread_local! {
    /// The connection whose callback this thread is running (its address; 0: none).
    static IN_CALLBACK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

const OPEN: u8 = 0;
const CLOSING: u8 = 1;
const CLOSED: u8 = 2;

/// A queued frame, with the bytes it counts against the send queue ([`TRACKED`] set if the
/// plugin asked to hear when it is written).
pub(crate) type Outgoing = (Message, u64);

/// The bit of an [`Outgoing`]'s count that marks a tracked send (`Conn::send_text_tracked`).
pub(crate) const TRACKED: u64 = 1 << 63;

/// A send queue whose first frame is stored inline: a connection that has one frame queued at a
/// time (a fan-out delivery, an answer) never allocates for queueing, and an idle one holds no
/// queue memory.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    head: Option<Outgoing>,
    rest: VecDeque<Outgoing>,
}

impl Queue {
    fn push_back(&mut self, item: Outgoing) {
        if self.head.is_none() && self.rest.is_empty() {
            self.head = Some(item);
        } else {
            self.rest.push_back(item);
        }
    }

    /// The frame queued first.
    fn front(&self) -> Option<&Outgoing> {
        self.head.as_ref().or_else(|| self.rest.front())
    }

    pub(crate) fn pop_front(&mut self) -> Option<Outgoing> {
        self.head.take().or_else(|| self.rest.pop_front())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.head.is_none() && self.rest.is_empty()
    }

    /// Gives back the memory of an empty queue.
    pub(crate) fn shrink_if_empty(&mut self) {
        if self.rest.is_empty() && self.rest.capacity() > 0 {
            self.rest = VecDeque::new();
        }
    }
}

/// The state a connection shares between its session task, the hub and plugin handles.
#[derive(Debug)]
pub(crate) struct ConnShared {
    pub(crate) id: u64,
    pub(crate) remote: String,
    plugin: Arc<str>,
    hub: Arc<Hub>,
    budget: Arc<MemoryBudget>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Frames waiting for the session task. Allocates nothing until the first send (tokio's
    /// channels allocate a block of slots up front, per connection).
    queue: Mutex<Queue>,
    /// Whether `queue` has frames (changed under its lock): the session looks at this before
    /// it takes the lock.
    queued: AtomicBool,
    /// The session task, woken when a frame is queued.
    waker: AtomicWaker,
    state: AtomicU8,
    buffered: AtomicU64,
    max_send_queue: u64,
    drain_wanted: AtomicBool,
    /// The queue emptied after a send was refused as full: the session runs `on_drain`.
    drained: AtomicBool,
    /// A close was queued: the session starts its close timeout.
    closing: AtomicBool,
    /// The plugin paused reading (`Conn::pause`).
    paused: AtomicBool,
    started: tokio::time::Instant,
    /// When the session last sent a data message, in milliseconds since `started`.
    last_out_ms: AtomicU64,
    /// The plugin failed the connection: 1 a callback panicked, 2 its worker process died.
    failed: AtomicU8,
    /// What the upgrade was (local address, TLS, path, query).
    facts: crate::plugin::ConnFacts,
    /// An idle timeout the plugin set, in milliseconds (`u64::MAX`: none set since last
    /// taken).
    idle_change: AtomicU64,
    /// A timer was armed since the session last looked: its wake-up may be earlier.
    timers_changed: AtomicBool,
    /// The send queue's low-water mark (`Conn::set_low_water`; 0: none).
    low_water: AtomicU64,
    /// The queue is above the low-water mark: `on_drain` runs when it falls to it.
    above_low: AtomicBool,
    /// What few connections use (channels, timers, a label, tracked sends, a worker's hook),
    /// allocated on first use: an idle connection that uses none of it does not pay for it.
    rare: std::sync::OnceLock<Box<Rare>>,
    /// Tracked sends were written: the session reports them.
    sent_ready: AtomicBool,
}

/// The parts of a connection's state that most connections never use (see `ConnShared::rare`).
#[derive(Debug, Default)]
struct Rare {
    channels: Mutex<Vec<String>>,
    /// The plugin's armed timers (`Conn::set_timer`): tag and when it is due.
    timers: Mutex<Vec<(u64, tokio::time::Instant)>>,
    /// The label member lists show (`Conn::set_label`).
    label: Mutex<Option<Box<str>>>,
    /// Tags of tracked sends queued and not yet written, in queue order; and those written,
    /// for the session to report (`on_sent`).
    tracked: Mutex<TrackedSends>,
    /// Runs whenever the send queue empties (a worker's credit).
    on_empty: std::sync::OnceLock<EmptyHook>,
    /// A subscriber's parked socket, lent here so that a publish's sweep writes what it
    /// queued without waking the session ([`LentSocket`]).
    lent: Mutex<Option<Box<dyn LentSocket>>>,
    /// Whether `lent` holds the socket (changed under its lock): deliveries then leave the
    /// session asleep for the sweep.
    is_lent: AtomicBool,
}

/// A parked subscriber's socket as its connection's shared state holds it: a publish queues
/// to the subscribers and then sweeps them, and a sweep writes each lent socket's queue out
/// itself, without waking its session task (10,000 subscribers are 10,000 writes, not 10,000
/// wake-ups and polls). The session takes the socket back whenever it needs the stream.
pub(crate) trait LentSocket: Send + std::any::Any {
    /// Writes what is queued to the connection that the parked socket writes itself; true if
    /// all of it is out (nothing left queued, nothing part-way), false if the session must
    /// look (a frame that needs the stream, a full socket, an error). `now` is the clock
    /// for the idle timeout.
    fn write_queued(&mut self, conn: &ConnShared, now: tokio::time::Instant) -> bool;
}

impl std::fmt::Debug for dyn LentSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LentSocket")
    }
}

/// Tracked sends of a connection.
#[derive(Debug, Default)]
struct TrackedSends {
    queued: VecDeque<u64>,
    written: Vec<u64>,
}

/// What runs when a connection's send queue empties.
struct EmptyHook(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for EmptyHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmptyHook")
    }
}

impl ConnShared {
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site; the connection's parts"
    )]
    pub(crate) fn new(
        id: u64,
        remote: String,
        plugin: Arc<str>,
        hub: Arc<Hub>,
        budget: Arc<MemoryBudget>,
        metrics: Arc<crate::metrics::Metrics>,
        max_send_queue: u64,
        facts: crate::plugin::ConnFacts,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            remote,
            plugin,
            hub,
            budget,
            metrics,
            queue: Mutex::new(Queue::default()),
            queued: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            state: AtomicU8::new(OPEN),
            buffered: AtomicU64::new(0),
            max_send_queue,
            drain_wanted: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            started: tokio::time::Instant::now(),
            last_out_ms: AtomicU64::new(0),
            failed: AtomicU8::new(0),
            facts,
            idle_change: AtomicU64::new(u64::MAX),
            timers_changed: AtomicBool::new(false),
            low_water: AtomicU64::new(0),
            above_low: AtomicBool::new(false),
            rare: std::sync::OnceLock::new(),
            sent_ready: AtomicBool::new(false),
        })
    }

    /// The host's metrics.
    pub(crate) fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The rarely used parts, allocated now if they were not.
    fn rare(&self) -> &Rare {
        self.rare.get_or_init(Box::default)
    }

    fn push(&self, item: Outgoing) {
        self.push_tracked(item, None, true);
    }

    /// Queues `item`; with a tag, as a tracked send (its tag noted in queue order). Wakes the
    /// session if `wake` (a quiet delivery leaves that to its sweep).
    fn push_tracked(&self, mut item: Outgoing, tag: Option<u64>, wake: bool) {
        {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(tag) = tag {
                item.1 |= TRACKED;
                self.rare()
                    .tracked
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .queued
                    .push_back(tag);
            }
            queue.push_back(item);
            self.queued.store(true, Ordering::SeqCst);
        }
        // From this connection's own callback the session looks at the queue right after;
        // from anywhere else this wakes it.
        if wake && !self.in_own_callback() {
            self.waker.wake();
        }
    }

    /// Moves every queued frame to the end of `into` (the session task's own queue).
    pub(crate) fn take_queued(&self, into: &mut Queue) {
        if !self.queued.load(Ordering::SeqCst) {
            return;
        }
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        self.queued.store(false, Ordering::SeqCst);
        if into.is_empty() {
            std::mem::swap(into, &mut *queue);
            queue.shrink_if_empty();
        } else {
            while let Some(item) = queue.pop_front() {
                into.push_back(item);
            }
        }
    }

    /// Takes the first queued frame if `eligible` says so (a parked connection writes such
    /// frames on its bare socket; the others wait for the stream).
    pub(crate) fn pop_queued_if(
        &self,
        eligible: impl FnOnce(&Outgoing) -> bool,
    ) -> Option<Outgoing> {
        if !self.queued.load(Ordering::SeqCst) {
            return None;
        }
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if !queue.front().is_some_and(eligible) {
            return None;
        }
        let item = queue.pop_front();
        if queue.is_empty() {
            self.queued.store(false, Ordering::SeqCst);
            queue.shrink_if_empty();
        }
        item
    }

    /// Whether the first queued frame is one `f` says yes to (false if none is queued).
    pub(crate) fn queued_front_is(&self, f: impl FnOnce(&Outgoing) -> bool) -> bool {
        self.queued.load(Ordering::SeqCst)
            && self
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .front()
                .is_some_and(f)
    }

    /// Whether frames are waiting in the queue.
    pub(crate) fn has_queued(&self) -> bool {
        self.queued.load(Ordering::SeqCst)
    }

    /// Whether the queue drained since the last call (after a refused send).
    pub(crate) fn take_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire) && self.drained.swap(false, Ordering::AcqRel)
    }

    /// Whether a flag for the session is set (drained, closing): it then looks at them.
    pub(crate) fn has_flags(&self) -> bool {
        self.drained.load(Ordering::Acquire)
            || self.closing.load(Ordering::Acquire)
            || self.failed.load(Ordering::Acquire) != 0
            || self.idle_change.load(Ordering::Acquire) != u64::MAX
            || self.timers_changed.load(Ordering::Acquire)
            || self.sent_ready.load(Ordering::Acquire)
    }

    /// The writer wrote `n` tracked frames: the first `n` queued tags go to the session.
    pub(crate) fn tracked_written(&self, n: usize) {
        let mut t = self
            .rare()
            .tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = n.min(t.queued.len());
        let done: Vec<u64> = t.queued.drain(..n).collect();
        t.written.extend(done);
        drop(t);
        self.sent_ready.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Tracked sends written since the last call, in order.
    pub(crate) fn take_sent(&self) -> Vec<u64> {
        if !self.sent_ready.load(Ordering::Acquire)
            || !self.sent_ready.swap(false, Ordering::AcqRel)
        {
            return Vec::new();
        }
        std::mem::take(
            &mut self
                .rare()
                .tracked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .written,
        )
    }

    /// At the end: tracked sends written and not yet reported, and those never written.
    pub(crate) fn take_all_tracked(&self) -> (Vec<u64>, Vec<u64>) {
        let Some(rare) = self.rare.get() else {
            return (Vec::new(), Vec::new());
        };
        let mut t = rare.tracked.lock().unwrap_or_else(PoisonError::into_inner);
        (
            std::mem::take(&mut t.written),
            std::mem::take(&mut t.queued).into(),
        )
    }

    /// Whether a timer was armed since the last call (the session's wake-up may move).
    pub(crate) fn take_timers_changed(&self) -> bool {
        self.timers_changed.load(Ordering::Acquire)
            && self.timers_changed.swap(false, Ordering::AcqRel)
    }

    /// When the next timer is due, if one is armed.
    pub(crate) fn next_timer(&self) -> Option<tokio::time::Instant> {
        let timers = self
            .rare
            .get()?
            .timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        timers.iter().map(|(_, at)| *at).min()
    }

    /// Disarms and returns the timers due at `now`, earliest first.
    pub(crate) fn take_due_timers(&self, now: tokio::time::Instant) -> Vec<u64> {
        let Some(rare) = self.rare.get() else {
            return Vec::new();
        };
        let mut timers = rare.timers.lock().unwrap_or_else(PoisonError::into_inner);
        if !timers.iter().any(|(_, at)| *at <= now) {
            return Vec::new();
        }
        let mut due: Vec<(u64, tokio::time::Instant)> = timers
            .iter()
            .copied()
            .filter(|(_, at)| *at <= now)
            .collect();
        timers.retain(|(_, at)| *at > now);
        if timers.is_empty() {
            *timers = Vec::new();
        }
        due.sort_by_key(|(_, at)| *at);
        due.into_iter().map(|(tag, _)| tag).collect()
    }

    /// Notes that `queued` bytes are in the queue now: above the low-water mark, `on_drain`
    /// will run once it falls back to it.
    fn note_level(&self, queued: u64) {
        let low = self.low_water.load(Ordering::Relaxed);
        if low != 0 && queued > low && !self.above_low.load(Ordering::Relaxed) {
            self.above_low.store(true, Ordering::Release);
        }
    }

    /// An idle timeout the plugin set since last asked.
    pub(crate) fn take_idle_change(&self) -> Option<std::time::Duration> {
        // A load first, as in `take_failed`.
        if self.idle_change.load(Ordering::Acquire) == u64::MAX {
            return None;
        }
        match self.idle_change.swap(u64::MAX, Ordering::AcqRel) {
            u64::MAX => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }

    /// Whether the plugin failed the connection since last asked, and if so whether its worker
    /// process died (`Some(true)`) or a callback panicked (`Some(false)`).
    pub(crate) fn take_failed(&self) -> Option<bool> {
        // A load first: this runs on every pass of the session loop, and an atomic swap would
        // take the cache line exclusively each time.
        if self.failed.load(Ordering::Acquire) == 0 {
            return None;
        }
        match self.failed.swap(0, Ordering::AcqRel) {
            0 => None,
            n => Some(n == 2),
        }
    }

    /// Whether a close was queued since the last call.
    pub(crate) fn take_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire) && self.closing.swap(false, Ordering::AcqRel)
    }

    /// Whether the connection is subscribed to a channel (its parked socket is then lent).
    pub(crate) fn is_subscriber(&self) -> bool {
        self.rare.get().is_some_and(|r| {
            !r.channels
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
        })
    }

    /// The lent socket's place (see [`LentSocket`]); the session holds it locked while it
    /// uses the socket, a sweep while it writes.
    pub(crate) fn lent(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn LentSocket>>> {
        self.rare()
            .lent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Lends the parked socket (see [`LentSocket`]).
    pub(crate) fn lend(&self, socket: Box<dyn LentSocket>) {
        let mut slot = self.lent();
        *slot = Some(socket);
        self.rare().is_lent.store(true, Ordering::SeqCst);
    }

    /// Takes the lent socket back, if it is lent.
    pub(crate) fn take_lent(&self) -> Option<Box<dyn LentSocket>> {
        let rare = self.rare.get()?;
        let mut slot = rare.lent.lock().unwrap_or_else(PoisonError::into_inner);
        rare.is_lent.store(false, Ordering::SeqCst);
        slot.take()
    }

    /// Writes what quiet deliveries queued, on the lent socket (no wake-up), or wakes the
    /// session if the socket is not lent any more, is in use, or did not take it all.
    pub(crate) fn sweep(&self, now: tokio::time::Instant) {
        let written = self
            .rare
            .get()
            .is_some_and(|rare| match rare.lent.try_lock() {
                Ok(mut slot) => slot
                    .as_mut()
                    .is_some_and(|socket| socket.write_queued(self, now)),
                Err(_) => false,
            });
        if written {
            self.metrics.swept.inc();
        } else {
            self.waker.wake();
        }
    }

    /// Registers the session task to be woken by sends.
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// The session task starts (`true`) or ends (`false`) a callback of this connection, on
    /// this thread.
    pub(crate) fn set_in_callback(&self, running: bool) {
        IN_CALLBACK.set(if running { self.address() } else { 0 });
    }

    /// Whether this thread is running one of this connection's callbacks: the session task
    /// looks at the queue, the flags and the timers right after it, so what the callback does
    /// need not wake it. (Another thread's send always wakes it.)
    fn in_own_callback(&self) -> bool {
        IN_CALLBACK.get() == self.address()
    }

    fn address(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// Whether the plugin paused reading.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Pauses or resumes reading; a resume wakes the session.
    fn set_paused(&self, paused: bool) {
        if self.paused.swap(paused, Ordering::AcqRel) && !paused {
            self.waker.wake();
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) == OPEN
    }

    /// Queues a data or ping frame of the plugin's, counting it against the send queue: a
    /// message larger than the whole queue is refused with `MessageTooLarge`, one that does not
    /// fit now with `QueueFull` (and `on_drain` follows once the queue has emptied).
    pub(crate) fn enqueue(&self, msg: Message) -> Result<(), SendError> {
        self.enqueue_tracked(msg, None)
    }

    /// As [`ConnShared::enqueue`]; with a tag, the session reports the frame's fate
    /// (`on_sent`).
    pub(crate) fn enqueue_tracked(&self, msg: Message, tag: Option<u64>) -> Result<(), SendError> {
        self.enqueue_with(msg, tag, true, Source::Send)
    }

    /// As [`ConnShared::enqueue`], for the host's own keepalive ping.
    pub(crate) fn enqueue_keepalive(&self, msg: Message) -> Result<(), SendError> {
        self.enqueue_with(msg, None, true, Source::Keepalive)
    }

    fn enqueue_with(
        &self,
        msg: Message,
        tag: Option<u64>,
        wake: bool,
        source: Source,
    ) -> Result<(), SendError> {
        if !self.is_open() {
            return Err(SendError::Closed);
        }
        let n = msg.len() as u64;
        if n > self.max_send_queue {
            self.metrics.send_refused(source.label(), "too_large");
            return Err(SendError::MessageTooLarge);
        }
        let before = self.buffered.fetch_add(n, Ordering::AcqRel);
        let queue_full = before + n > self.max_send_queue;
        if queue_full || !self.budget.take(n) {
            // Ask for on_drain before undoing: whoever brings the count to zero (this undo or
            // the session task) then sees the request, so the wake-up cannot be lost between them.
            self.drain_wanted.store(true, Ordering::Release);
            let left = self.release(n);
            self.drained_if_empty(left);
            let reason = if queue_full {
                "queue_full"
            } else {
                "memory_budget"
            };
            self.metrics.send_refused(source.label(), reason);
            return Err(SendError::QueueFull);
        }
        self.note_level(before + n);
        self.push_tracked((msg, n), tag, wake);
        Ok(())
    }

    /// Takes `n` bytes off this connection's queue count.
    fn release(&self, n: u64) -> u64 {
        let before = self
            .buffered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(n))
            })
            .unwrap_or_default();
        before.saturating_sub(n)
    }

    /// The session task wrote `n` queued bytes to the socket.
    pub(crate) fn written(&self, n: u64) {
        let left = self.release(n);
        self.budget.give(n);
        self.drained_if_empty(left);
    }

    fn drained_if_empty(&self, left: u64) {
        if self.above_low.load(Ordering::Acquire)
            && left <= self.low_water.load(Ordering::Acquire)
            && self.above_low.swap(false, Ordering::AcqRel)
        {
            self.drained.store(true, Ordering::Release);
            self.waker.wake();
        }
        if left == 0 {
            if let Some(hook) = self.rare.get().and_then(|r| r.on_empty.get()) {
                (hook.0)();
            }
        }
        if left == 0 && self.drain_wanted.swap(false, Ordering::AcqRel) {
            self.drained.store(true, Ordering::Release);
            self.waker.wake();
        }
    }

    /// A data message went out, at `now` if the caller has the time (else the clock is read).
    pub(crate) fn sent_data(&self, now: Option<tokio::time::Instant>) {
        let ms = now
            .map_or_else(
                || self.started.elapsed(),
                |now| now.saturating_duration_since(self.started),
            )
            .as_millis() as u64;
        self.last_out_ms.store(ms, Ordering::Relaxed);
    }

    /// When the session task last sent a data message (the connection's start if never).
    pub(crate) fn last_data_out(&self) -> tokio::time::Instant {
        self.started + std::time::Duration::from_millis(self.last_out_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn buffered(&self) -> u64 {
        self.buffered.load(Ordering::Acquire)
    }

    /// Starts the close handshake: no sends after this one.
    pub(crate) fn close(&self, code: u16, reason: &str) -> Result<(), SendError> {
        if !plugin_api::is_sendable_close_code(code) {
            return Err(SendError::InvalidCloseCode);
        }
        if reason.len() > plugin_api::MAX_CLOSE_REASON {
            return Err(SendError::ReasonTooLong);
        }
        self.close_unchecked(code, reason)
    }

    /// As `close`, for codes the host itself chooses.
    pub(crate) fn close_unchecked(&self, code: u16, reason: &str) -> Result<(), SendError> {
        if self
            .state
            .compare_exchange(OPEN, CLOSING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(SendError::Closed);
        }
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_owned().into(),
        };
        self.closing.store(true, Ordering::Release);
        self.push((Message::Close(Some(frame)), 0));
        self.waker.wake();
        // No publish can reach it now: it is no member any more, while its close handshake
        // runs (up to `--close-timeout` with a peer that does not answer).
        self.leave_channels();
        Ok(())
    }

    /// The peer sent its close frame: no more sends, and it leaves its channels.
    pub(crate) fn peer_closed(&self) {
        if self
            .state
            .compare_exchange(OPEN, CLOSING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.leave_channels();
        }
    }

    /// Gives back to the budget what is still counted as queued: after the session's last
    /// write, queued frames that were not written are dropped. (Frames written before are
    /// given back by [`ConnShared::written`], so nothing is given back twice.)
    pub(crate) fn release_queued(&self) {
        let queued = self.buffered.swap(0, Ordering::AcqRel);
        self.budget.give(queued);
    }

    /// The connection is over: no more sends, and it leaves all its channels (if it did not
    /// when its close began). What is still queued stays counted until the final write
    /// ([`ConnShared::release_queued`]).
    pub(crate) fn finish(&self) {
        self.state.store(CLOSED, Ordering::Release);
        self.leave_channels();
    }

    /// Leaves every channel (the state is past open: no `subscribe` adds one after this).
    fn leave_channels(&self) {
        // `rare()`, not `rare.get()`: a `subscribe` racing with this must meet it under the
        // channels' lock (it checks the state there), whichever thread allocates the part.
        let channels = std::mem::take(
            &mut *self
                .rare()
                .channels
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for channel in channels {
            self.hub.unsubscribe(&self.plugin, &channel, self.id);
        }
    }

    fn subscribe(self: &Arc<Self>, channel: &str) -> Result<(), SendError> {
        let mut channels = self
            .rare()
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Checked under the lock that leaving takes, so a closing or closed connection never
        // stays subscribed.
        if self.state.load(Ordering::Acquire) != OPEN {
            return Err(SendError::Closed);
        }
        let me: Arc<dyn crate::channels::Subscriber> = Arc::clone(self) as _;
        if self.hub.subscribe(&self.plugin, channel, self.id, me) {
            channels.push(channel.to_owned());
        }
        Ok(())
    }

    fn unsubscribe(&self, channel: &str) -> bool {
        let Some(rare) = self.rare.get() else {
            return false;
        };
        let mut channels = rare.channels.lock().unwrap_or_else(PoisonError::into_inner);
        channels.retain(|c| c != channel);
        self.hub.unsubscribe(&self.plugin, channel, self.id)
    }
}

/// Whose send it is, as `wshost_send_queue_overflows_total` labels a refused one.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// The plugin's own send or ping.
    Send,
    /// A channel's delivery to a subscriber.
    Publish,
    /// The host's keepalive ping.
    Keepalive,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::Publish => "publish",
            Self::Keepalive => "keepalive",
        }
    }
}

impl crate::channels::Subscriber for ConnShared {
    fn deliver(&self, msg: Message) -> bool {
        self.enqueue_with(msg, None, true, Source::Publish).is_ok()
    }
    fn deliver_quietly(&self, msg: Message) -> Delivery {
        let lent = self
            .rare
            .get()
            .is_some_and(|r| r.is_lent.load(Ordering::SeqCst));
        match self.enqueue_with(msg, None, !lent, Source::Publish) {
            Ok(()) if lent => Delivery::Deferred,
            Ok(()) => Delivery::Queued,
            Err(_) => Delivery::Refused,
        }
    }
    fn sweep(&self, now: tokio::time::Instant) {
        ConnShared::sweep(self, now);
    }
    fn member(&self) -> crate::channels::Member {
        crate::channels::Member {
            id: self.id,
            remote_addr: self.remote.clone(),
            label: self
                .rare
                .get()
                .and_then(|r| {
                    r.label
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .as_deref()
                        .map(str::to_owned)
                })
                .unwrap_or_default(),
        }
    }
}

impl crate::plugin::ConnOps for ConnShared {
    fn id(&self) -> u64 {
        self.id
    }
    fn remote_addr(&self) -> &str {
        &self.remote
    }
    fn is_open(&self) -> bool {
        ConnShared::is_open(self)
    }
    fn send_text(&self, text: &str) -> Result<(), SendError> {
        self.enqueue(Message::text(text))
    }
    fn send_tracked(&self, msg: Message, tag: u64) -> Result<(), SendError> {
        self.enqueue_tracked(msg, Some(tag))
    }
    fn send_binary(&self, data: &[u8]) -> Result<(), SendError> {
        self.enqueue(Message::Binary(bytes::Bytes::copy_from_slice(data)))
    }
    fn ping(&self, payload: &[u8]) -> Result<(), SendError> {
        if payload.len() > 125 {
            return Err(SendError::PayloadTooLong);
        }
        self.enqueue(Message::Ping(bytes::Bytes::copy_from_slice(payload)))
    }
    fn close(&self, code: u16, reason: &str) -> Result<(), SendError> {
        ConnShared::close(self, code, reason)
    }
    fn buffered_amount(&self) -> u64 {
        self.buffered()
    }
    fn subscribe(self: &Arc<Self>, channel: &str) -> Result<(), SendError> {
        ConnShared::subscribe(self, channel)
    }
    fn unsubscribe(&self, channel: &str) -> bool {
        ConnShared::unsubscribe(self, channel)
    }
    fn set_paused(&self, paused: bool) {
        ConnShared::set_paused(self, paused);
    }
    fn facts(&self) -> &crate::plugin::ConnFacts {
        &self.facts
    }
    fn set_idle_timeout(&self, timeout: std::time::Duration) {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX - 1);
        self.idle_change
            .store(ms.min(u64::MAX - 1), Ordering::Release);
        self.waker.wake();
    }
    fn set_timer(&self, tag: u64, after: std::time::Duration) -> Result<(), SendError> {
        if !self.is_open() {
            return Err(SendError::Closed);
        }
        let at = tokio::time::Instant::now() + after.min(crate::config::MAX_DURATION);
        {
            let mut timers = self
                .rare()
                .timers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            timers.retain(|(t, _)| *t != tag);
            if timers.len() >= plugin_api::MAX_TIMERS {
                return Err(SendError::Limit);
            }
            timers.push((tag, at));
        }
        self.timers_changed.store(true, Ordering::SeqCst);
        if !self.in_own_callback() {
            self.waker.wake();
        }
        Ok(())
    }
    fn cancel_timer(&self, tag: u64) -> bool {
        let Some(rare) = self.rare.get() else {
            return false;
        };
        let mut timers = rare.timers.lock().unwrap_or_else(PoisonError::into_inner);
        let before = timers.len();
        timers.retain(|(t, _)| *t != tag);
        timers.len() != before
    }
    fn set_low_water(&self, bytes: u64) {
        self.low_water.store(bytes, Ordering::Release);
        self.note_level(self.buffered());
    }
    fn set_label(&self, label: &str) {
        // Bounded: a label is for a member list, not a store.
        let label: String = label.chars().take(256).collect();
        *self
            .rare()
            .label
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            (!label.is_empty()).then(|| label.into_boxed_str());
    }
}

impl crate::plugin::SessionConn for ConnShared {
    fn send_from_worker(&self, msg: Message) {
        self.send_from_worker_tracked(msg, None);
    }
    fn send_from_worker_tracked(&self, msg: Message, tag: Option<u64>) {
        if !self.is_open() {
            if let Some(tag) = tag {
                // Never written: reported as such with the connection's end.
                self.rare()
                    .tracked
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .queued
                    .push_back(tag);
            }
            return;
        }
        let n = msg.len() as u64;
        if !self.budget.take(n) {
            self.metrics
                .send_refused(Source::Send.label(), "memory_budget");
            tracing::warn!(
                conn_id = self.id,
                "a worker's send does not fit --max-buffered-total; \
                closing with 1013"
            );
            let _ = self.close_unchecked(1013, "server memory budget exhausted");
            return;
        }
        let before = self.buffered.fetch_add(n, Ordering::AcqRel);
        self.note_level(before + n);
        self.push_tracked((msg, n), tag, true);
    }
    fn fail(&self, crashed: bool) {
        self.failed
            .store(if crashed { 2 } else { 1 }, Ordering::Release);
        self.waker.wake();
    }
    fn on_queue_empty(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.rare().on_empty.set(EmptyHook(hook));
    }
    fn max_send_queue(&self) -> u64 {
        self.max_send_queue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: u64) -> Outgoing {
        (Message::text(i.to_string()), i)
    }

    #[test]
    fn queue_keeps_order_and_its_first_frame_inline() {
        let mut q = Queue::default();
        q.push_back(item(1));
        assert_eq!(q.rest.capacity(), 0, "one frame needs no allocation");
        q.push_back(item(2));
        assert_eq!(q.pop_front().map(|i| i.1), Some(1));
        q.push_back(item(3));
        assert_eq!(q.pop_front().map(|i| i.1), Some(2));
        assert_eq!(q.pop_front().map(|i| i.1), Some(3));
        assert!(q.is_empty());
        q.shrink_if_empty();
        assert_eq!(q.rest.capacity(), 0, "an empty queue holds no memory");
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    fn conn(max_send_queue: u64, budget: &Arc<MemoryBudget>) -> Arc<ConnShared> {
        let hub = Arc::new(Hub::default());
        let registry = Arc::new(
            crate::plugin::registry::Registry::new(Arc::clone(&hub), None).expect("a temp dir"),
        );
        let metrics = Arc::new(crate::metrics::Metrics::new(
            registry,
            Arc::clone(budget),
            None,
        ));
        ConnShared::new(
            1,
            "peer".into(),
            Arc::from("p"),
            hub,
            Arc::clone(budget),
            metrics,
            max_send_queue,
            Default::default(),
        )
    }

    #[test]
    fn sends_past_the_queue_are_too_large_or_full() {
        let budget = Arc::new(MemoryBudget::new(1 << 30));
        let c = conn(1000, &budget);
        assert_eq!(
            c.enqueue(Message::binary(vec![0u8; 1001])),
            Err(SendError::MessageTooLarge)
        );
        assert_eq!(c.enqueue(Message::binary(vec![0u8; 600])), Ok(()));
        assert_eq!(
            c.enqueue(Message::binary(vec![0u8; 600])),
            Err(SendError::QueueFull)
        );
        assert_eq!(c.enqueue(Message::binary(vec![0u8; 400])), Ok(()));
        assert_eq!(budget.used(), 1000);
        let text = c.metrics().encode();
        for (labels, n) in [
            (r#"source="send",reason="too_large""#, 1),
            (r#"source="send",reason="queue_full""#, 1),
            (r#"source="publish",reason="queue_full""#, 0),
            (r#"source="keepalive",reason="memory_budget""#, 0),
        ] {
            let line = format!("wshost_send_queue_overflows_total{{{labels}}} {n}");
            assert!(text.contains(&line), "{line} in:\n{text}");
        }
    }

    #[test]
    fn refusals_are_counted_by_source_and_reason() {
        use crate::channels::Subscriber as _;
        let budget = Arc::new(MemoryBudget::new(1500));
        let c = conn(1000, &budget);
        // A publish past the queue, a keepalive ping past it, then the budget.
        assert!(c.deliver(Message::binary(vec![0u8; 900])));
        assert!(!c.deliver(Message::binary(vec![0u8; 200])));
        assert_eq!(
            c.enqueue_keepalive(Message::Ping(bytes::Bytes::from_static(&[0; 125]))),
            Err(SendError::QueueFull)
        );
        let d = conn(1000, &budget);
        assert_eq!(
            d.enqueue(Message::binary(vec![0u8; 700])),
            Err(SendError::QueueFull)
        );
        assert!(!d.deliver(Message::binary(vec![0u8; 700])));
        let (ct, dt) = (c.metrics().encode(), d.metrics().encode());
        for (text, labels) in [
            (&ct, r#"source="publish",reason="queue_full""#),
            (&ct, r#"source="keepalive",reason="queue_full""#),
            (&dt, r#"source="send",reason="memory_budget""#),
            (&dt, r#"source="publish",reason="memory_budget""#),
        ] {
            let line = format!("wshost_send_queue_overflows_total{{{labels}}} 1");
            assert!(text.contains(&line), "{line} in:\n{text}");
        }
    }

    #[test]
    fn a_closing_connection_gives_its_bytes_back_once() {
        let budget = Arc::new(MemoryBudget::new(1 << 30));
        let c = conn(1 << 20, &budget);
        for _ in 0..4 {
            c.enqueue(Message::binary(vec![0u8; 1000])).unwrap();
        }
        assert_eq!(budget.used(), 4000);
        // The session ends with 4,000 bytes queued, writes 1,000 of them on its way out, and
        // drops the rest.
        c.finish();
        c.written(1000);
        c.release_queued();
        assert_eq!(budget.used(), 0);
        // Another holder's bytes are untouched by it.
        assert!(budget.take(500));
        let d = conn(1 << 20, &budget);
        d.enqueue(Message::binary(vec![0u8; 100])).unwrap();
        d.finish();
        d.written(100);
        d.release_queued();
        assert_eq!(budget.used(), 500);
    }
}
