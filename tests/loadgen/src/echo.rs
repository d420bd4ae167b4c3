//! Echo workloads: closed loop (C connections × K messages in flight, as fast as the server
//! answers) and open loop (a fixed total rate, latency measured from each message's intended
//! send time, so that a stall shows instead of slowing the sender: no coordinated omission).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{connect, histogram, now_ns, source, Payload, Ws};

/// What one run measured.
#[derive(Debug)]
pub struct Outcome {
    /// Messages echoed back inside the measuring window.
    pub messages: u64,
    /// The window's length.
    pub seconds: f64,
    /// Round trips inside the window.
    pub latency: Histogram<u64>,
    /// Open loop only: messages never answered by the end of the grace period.
    pub lost: u64,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }
}

/// Opens `conns` connections to `url`.
pub async fn open(url: &str, conns: usize) -> anyhow::Result<Vec<Ws>> {
    let mut all = Vec::with_capacity(conns);
    for i in 0..conns {
        all.push(connect(url, source(i)).await?);
    }
    Ok(all)
}

struct Window {
    start: u64,
    end: u64,
}

impl Window {
    fn new(warmup: Duration, measure: Duration) -> Self {
        let start = now_ns() + warmup.as_nanos() as u64;
        Self {
            start,
            end: start + measure.as_nanos() as u64,
        }
    }

    fn contains(&self, t: u64) -> bool {
        t >= self.start && t < self.end
    }

    fn seconds(&self) -> f64 {
        (self.end - self.start) as f64 / 1e9
    }
}

/// Closed loop: every connection keeps `inflight` messages outstanding until the window ends.
pub async fn closed(
    conns: Vec<Ws>,
    inflight: usize,
    payload: &Payload,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Outcome> {
    let window = Arc::new(Window::new(warmup, measure));
    let mut tasks = Vec::new();
    for ws in conns {
        let window = Arc::clone(&window);
        let payload = payload.clone();
        tasks.push(tokio::spawn(closed_conn(ws, inflight, payload, window)));
    }
    let mut latency = histogram();
    let mut messages = 0;
    for t in tasks {
        let (n, h) = t.await??;
        messages += n;
        latency.add(h)?;
    }
    Ok(Outcome {
        messages,
        seconds: window.seconds(),
        latency,
        lost: 0,
    })
}

async fn closed_conn(
    mut ws: Ws,
    inflight: usize,
    payload: Payload,
    window: Arc<Window>,
) -> anyhow::Result<(u64, Histogram<u64>)> {
    let mut hist = histogram();
    let mut count = 0;
    for _ in 0..inflight {
        ws.feed(payload.make(now_ns())).await?;
    }
    ws.flush().await?;
    let mut outstanding = inflight;
    'run: loop {
        let mut next = ws.next().await;
        loop {
            let msg = match next {
                Some(m) => m?,
                None => bail!("the server closed the connection"),
            };
            if let Message::Close(frame) = &msg {
                match frame {
                    Some(f) => bail!(
                        "the server closed the connection: {} {}",
                        u16::from(f.code),
                        f.reason
                    ),
                    None => bail!("the server closed the connection without a code"),
                }
            }
            if !(msg.is_text() || msg.is_binary()) {
                continue 'run;
            }
            outstanding -= 1;
            let now = now_ns();
            let sent = Payload::stamp(&msg, 0).context("a stamped echo")?;
            if window.contains(now) {
                count += 1;
                hist.saturating_record(now.saturating_sub(sent).max(1_000));
            }
            if now < window.end {
                ws.feed(payload.make(now)).await?;
                outstanding += 1;
            } else if outstanding == 0 {
                break 'run;
            }
            // Answer everything already received before flushing once.
            match ws.next().now_or_never() {
                Some(m) => next = m,
                None => break,
            }
        }
        ws.flush().await?;
    }
    let _ = ws.close(None).await;
    Ok((count, hist))
}

/// Open loop: `rate` messages per second in total, spread round-robin over the connections,
/// paced by a spinning thread.
pub async fn open_loop(
    conns: Vec<Ws>,
    rate: u64,
    payload: &Payload,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Outcome> {
    let window = Window::new(warmup, measure);
    let (start, end) = (window.start - warmup.as_nanos() as u64, window.end);
    let latency = Arc::new(Mutex::new(histogram()));
    let mut senders = Vec::new();
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    let window = Arc::new(window);
    let mut expected = Vec::new();
    for ws in conns {
        let (tx, rx) = mpsc::unbounded_channel::<u64>();
        senders.push(tx);
        let (sink, stream) = ws.split();
        let e = Arc::new(AtomicU64::new(u64::MAX));
        expected.push(Arc::clone(&e));
        writers.push(tokio::spawn(open_writer(sink, rx, payload.clone())));
        readers.push(tokio::spawn(open_reader(
            stream,
            Arc::clone(&window),
            Arc::clone(&latency),
            e,
        )));
    }
    // The pacer: intended send times on a fixed grid from `start`; each is handed to a
    // connection when its time comes, however late the connection is.
    let period = 1e9 / rate as f64;
    let pacer = std::thread::spawn(move || {
        crate::common::precise_timers();
        let mut per_conn = vec![0u64; senders.len()];
        let mut i = 0u64;
        loop {
            let intended = start + (i as f64 * period) as u64;
            if intended >= end {
                break;
            }
            crate::common::wait_until(intended);
            let tx = &senders[i as usize % senders.len()];
            if tx.send(intended).is_err() {
                break;
            }
            let n = per_conn.len();
            per_conn[i as usize % n] += 1;
            i += 1;
        }
        per_conn
    });
    let per_conn = tokio::task::spawn_blocking(move || pacer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("pacer panicked"))?;
    let sent: u64 = per_conn.iter().sum();
    for (e, n) in expected.iter().zip(&per_conn) {
        e.store(*n, Ordering::Release);
    }
    let mut received = 0;
    for w in writers {
        w.await??;
    }
    for r in readers {
        received += r.await??;
    }
    let latency = Arc::try_unwrap(latency)
        .map_err(|_| anyhow::anyhow!("readers still hold the histogram"))?
        .into_inner()
        .expect("not poisoned");
    let in_window = latency.len();
    Ok(Outcome {
        messages: in_window,
        seconds: window.seconds(),
        latency,
        lost: sent.saturating_sub(received),
    })
}

async fn open_writer(
    mut sink: futures_util::stream::SplitSink<Ws, Message>,
    mut rx: mpsc::UnboundedReceiver<u64>,
    payload: Payload,
) -> anyhow::Result<()> {
    while let Some(intended) = rx.recv().await {
        sink.feed(payload.make(intended)).await?;
        while let Ok(intended) = rx.try_recv() {
            sink.feed(payload.make(intended)).await?;
        }
        sink.flush().await?;
    }
    Ok(())
}

async fn open_reader(
    mut stream: futures_util::stream::SplitStream<Ws>,
    window: Arc<Window>,
    latency: Arc<Mutex<Histogram<u64>>>,
    expected: Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let mut received = 0;
    // Answers still on their way after the last send are waited for, up to 2 s.
    let grace_end = window.end + 2_000_000_000;
    while received < expected.load(Ordering::Acquire) && now_ns() < grace_end {
        let Ok(msg) = tokio::time::timeout(Duration::from_millis(50), stream.next()).await else {
            continue;
        };
        let Some(msg) = msg else { break };
        let msg = msg?;
        let Some(intended) = Payload::stamp(&msg, 0) else {
            continue;
        };
        received += 1;
        if window.contains(intended) {
            let now = now_ns();
            latency
                .lock()
                .expect("not poisoned")
                .saturating_record(now.saturating_sub(intended).max(1_000));
        }
    }
    Ok(received)
}
