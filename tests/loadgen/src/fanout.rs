//! Broadcast fan-out: one publisher at a fixed rate, N subscribers of one channel of the
//! `pubsub` plugin (on one host, or spread over several hosts that share a Redis). Latency is
//! from each publish's intended send time to its delivery; a publish's sweep is the time from
//! its intended send time to its last delivery.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;

use crate::common::{connect, histogram, now_ns, source, Payload, Ws};

#[derive(Debug)]
pub struct Outcome {
    /// Deliveries of publishes made inside the window.
    pub deliveries: u64,
    /// Publishes made inside the window times subscribers: what should have been delivered.
    pub expected: u64,
    pub seconds: f64,
    pub latency: Histogram<u64>,
    /// For each publish inside the window, the time to its last delivery (ns).
    pub sweep: Histogram<u64>,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.deliveries as f64 / self.seconds
    }
}

/// Opens `subs` subscribers, spread round-robin over `sub_urls`.
pub async fn subscribers(sub_urls: &[String], subs: usize) -> anyhow::Result<Vec<Ws>> {
    let mut all = Vec::with_capacity(subs);
    for i in 0..subs {
        all.push(connect(&sub_urls[i % sub_urls.len()], source(i + 1)).await?);
    }
    Ok(all)
}

pub async fn run(
    publisher: Ws,
    members: Vec<Ws>,
    rate: u64,
    payload: &Payload,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Outcome> {
    let start = now_ns();
    let (w_start, w_end) = (
        start + warmup.as_nanos() as u64,
        start + (warmup + measure).as_nanos() as u64,
    );
    let seen = Arc::new(Mutex::new(Seen {
        latency: histogram(),
        last_delivery: std::collections::HashMap::new(),
    }));
    let deliveries = Arc::new(AtomicU64::new(0));
    // The last intended publish time, once the publisher is done.
    let last = Arc::new(AtomicU64::new(u64::MAX));
    let subs = members.len() as u64;
    let mut readers = Vec::new();
    for ws in members {
        let (seen, deliveries, last) = (
            Arc::clone(&seen),
            Arc::clone(&deliveries),
            Arc::clone(&last),
        );
        readers.push(tokio::spawn(async move {
            let mut ws = ws;
            let grace_end = w_end + 2_000_000_000;
            let mut newest = 0;
            while newest < last.load(Ordering::Acquire) && now_ns() < grace_end {
                let Ok(msg) = tokio::time::timeout(Duration::from_millis(50), ws.next()).await
                else {
                    continue;
                };
                let Some(Ok(msg)) = msg else { break };
                let Some(intended) = Payload::stamp(&msg, 0) else {
                    continue;
                };
                if intended >= w_start && intended < w_end {
                    deliveries.fetch_add(1, Ordering::Relaxed);
                    let took = now_ns().saturating_sub(intended).max(1_000);
                    let mut seen = seen.lock().expect("not poisoned");
                    seen.latency.saturating_record(took);
                    let last = seen.last_delivery.entry(intended).or_default();
                    *last = (*last).max(took);
                }
                newest = newest.max(intended);
            }
        }));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let payload = payload.clone();
    let writer = tokio::spawn(async move {
        let mut ws = publisher;
        while let Some(t) = rx.recv().await {
            ws.feed(payload.make(t)).await?;
            while let Ok(t) = rx.try_recv() {
                ws.feed(payload.make(t)).await?;
            }
            ws.flush().await?;
        }
        anyhow::Ok(ws)
    });
    let period = 1e9 / rate as f64;
    let pacer = std::thread::spawn(move || {
        crate::common::precise_timers();
        let (mut i, mut published, mut last_t) = (0u64, 0u64, 0u64);
        loop {
            let intended = start + (i as f64 * period) as u64;
            if intended >= w_end {
                break;
            }
            crate::common::wait_until(intended);
            if tx.send(intended).is_err() {
                break;
            }
            if intended >= w_start {
                published += 1;
            }
            last_t = intended;
            i += 1;
        }
        (published, last_t)
    });
    let (published, last_t) = tokio::task::spawn_blocking(move || pacer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("pacer panicked"))?;
    last.store(last_t, Ordering::Release);
    let _publisher = writer.await??;
    for r in readers {
        r.await?;
    }
    let seen = Arc::try_unwrap(seen)
        .map_err(|_| anyhow::anyhow!("readers still hold the histogram"))?
        .into_inner()
        .expect("not poisoned");
    let mut sweep = histogram();
    for took in seen.last_delivery.values() {
        sweep.saturating_record(*took);
    }
    Ok(Outcome {
        deliveries: deliveries.load(Ordering::Relaxed),
        expected: published * subs,
        seconds: measure.as_secs_f64(),
        latency: seen.latency,
        sweep,
    })
}

/// What the subscribers saw of the publishes made inside the window.
struct Seen {
    latency: Histogram<u64>,
    /// Each publish (by its intended send time) and the latency of its last delivery so far.
    last_delivery: std::collections::HashMap<u64, u64>,
}
