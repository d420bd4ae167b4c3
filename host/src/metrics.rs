//! Prometheus metrics, served by the admin endpoint at `/metrics`. Counters are updated off the
//! per-message path (sessions count locally and add in batches); plugin and connection gauges
//! are read from the registry when scraped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::MetricEncoder;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};

use crate::budget::MemoryBudget;
use crate::plugin::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StatusLabel {
    pub(crate) status: u16,
    /// `http/1.1` or `h2` (a WebSocket over HTTP/2 is accepted with 200).
    pub(crate) protocol: &'static str,
}

/// Why a send was refused, and whose it was.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OverflowLabel {
    /// `send` (the plugin's own send or ping), `publish` (a channel's delivery to a
    /// subscriber, from this host or over the bus) or `keepalive` (the host's ping).
    pub(crate) source: &'static str,
    /// `queue_full` (the connection's send queue), `memory_budget` (the host's
    /// `--max-buffered-total`) or `too_large` (larger than the whole send queue).
    pub(crate) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CodeLabel {
    pub(crate) code: u16,
}

/// The host's metrics.
#[derive(Debug)]
pub struct Metrics {
    prom: prometheus_client::registry::Registry,
    /// Upgrade requests by the status they were answered with (101 = accepted).
    pub(crate) upgrades: Family<StatusLabel, Counter>,
    pub(crate) messages_in: Counter,
    pub(crate) messages_out: Counter,
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
    /// Refused sends by source and reason.
    pub(crate) send_queue_overflows: Family<OverflowLabel, Counter>,
    /// WebSockets that negotiated permessage-deflate.
    pub(crate) deflate_connections: Counter,
    /// Connections parked now (quiet: no stream or buffers of their own).
    pub(crate) parked: prometheus_client::metrics::gauge::Gauge,
    /// Parked connections opened again.
    pub(crate) unparked: Counter,
    /// Sweeps of a publish that wrote a parked subscriber's deliveries without waking it.
    pub(crate) swept: Counter,
    /// Closed connections by the code `on_close` got.
    pub(crate) closes: Family<CodeLabel, Counter>,
    pub(crate) callback_seconds: CallbackHistogram,
}

/// Upper bounds of the callback-duration buckets: 50 µs × 2^i, i < 16 (50 µs to ~1.6 s), then
/// +Inf.
const BUCKETS: usize = 17;
const FIRST_BOUND_NS: u64 = 50_000;

fn bucket_of(d: Duration) -> usize {
    let q = (d.as_nanos() as u64).div_ceil(FIRST_BOUND_NS);
    if q <= 1 {
        0
    } else {
        ((64 - (q - 1).leading_zeros()) as usize).min(BUCKETS - 1)
    }
}

/// Time plugin callbacks took: a Prometheus histogram whose observations are counted by each
/// session and added in batches (prometheus-client's `Histogram` takes a lock per observation).
#[derive(Debug, Clone, Default)]
pub(crate) struct CallbackHistogram(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// Observations a session keeps before it adds them to the shared histogram.
const LOCAL_FLUSH_AT: u16 = 1024;

/// One session's observations since its last flush. Its counts are `u16` (flushed at
/// [`LOCAL_FLUSH_AT`], they cannot overflow): it lives in every connection's task.
#[derive(Debug, Default)]
pub(crate) struct LocalHistogram {
    buckets: [u16; BUCKETS],
    count: u16,
    sum_ns: u64,
}

impl LocalHistogram {
    /// Notes one callback; true when it is time to flush.
    pub(crate) fn observe(&mut self, d: Duration) -> bool {
        self.buckets[bucket_of(d)] += 1;
        self.count += 1;
        self.sum_ns += d.as_nanos() as u64;
        self.count >= LOCAL_FLUSH_AT
    }

    pub(crate) fn flush_into(&mut self, h: &CallbackHistogram) {
        if self.count == 0 {
            return;
        }
        for (shared, local) in h.0.buckets.iter().zip(&mut self.buckets) {
            if *local > 0 {
                shared.fetch_add(u64::from(std::mem::take(local)), Ordering::Relaxed);
            }
        }
        h.0.count.fetch_add(
            u64::from(std::mem::take(&mut self.count)),
            Ordering::Relaxed,
        );
        h.0.sum_ns
            .fetch_add(std::mem::take(&mut self.sum_ns), Ordering::Relaxed);
    }
}

impl TypedMetric for CallbackHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for CallbackHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .0
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let bound = if i == BUCKETS - 1 {
                    f64::INFINITY
                } else {
                    (FIRST_BOUND_NS << i) as f64 / 1e9
                };
                (bound, n.load(Ordering::Relaxed))
            })
            .collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            self.0.count.load(Ordering::Relaxed),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Metrics {
    /// Counts a refused send.
    pub(crate) fn send_refused(&self, source: &'static str, reason: &'static str) {
        self.send_queue_overflows
            .get_or_create(&OverflowLabel { source, reason })
            .inc();
    }

    /// Metrics for a host whose plugins are in `registry`.
    pub(crate) fn new(
        registry: Arc<Registry>,
        budget: Arc<MemoryBudget>,
        bus: Option<crate::bus::BusMetrics>,
    ) -> Self {
        let mut prom = prometheus_client::registry::Registry::with_prefix("wshost");
        let m = Self {
            upgrades: Family::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            send_queue_overflows: Family::default(),
            deflate_connections: Counter::default(),
            parked: Default::default(),
            unparked: Counter::default(),
            swept: Counter::default(),
            closes: Family::default(),
            callback_seconds: CallbackHistogram::default(),
            prom: prometheus_client::registry::Registry::default(),
        };
        prom.register(
            "upgrades",
            "WebSocket upgrade requests by answer status and protocol (accepted: 101 over http/1.1, 200 over h2)",
            m.upgrades.clone(),
        );
        prom.register(
            "websockets_compressed",
            "WebSockets that negotiated permessage-deflate",
            m.deflate_connections.clone(),
        );
        prom.register(
            "connections_parked",
            "WebSocket connections parked: gone quiet, they hold no stream, buffers or writer \
             until something arrives or is sent",
            m.parked.clone(),
        );
        prom.register(
            "connections_unparked",
            "Parked connections opened again: bytes other than a pong arrived, or a close or a \
             tracked send was queued",
            m.unparked.clone(),
        );
        prom.register(
            "deliveries_swept",
            "Publishes written to parked subscribers by the publish's sweep, without waking \
             their sessions (one count per subscriber and sweep)",
            m.swept.clone(),
        );
        prom.register(
            "messages_received",
            "Data messages received",
            m.messages_in.clone(),
        );
        prom.register(
            "messages_sent",
            "Data messages sent",
            m.messages_out.clone(),
        );
        prom.register(
            "bytes_received",
            "Payload bytes received",
            m.bytes_in.clone(),
        );
        prom.register("bytes_sent", "Payload bytes sent", m.bytes_out.clone());
        // Every series that can occur exists from the start, at zero: a rate or an alert on
        // one needs no first refusal to see it.
        for source in ["send", "publish", "keepalive"] {
            for reason in ["queue_full", "memory_budget", "too_large"] {
                if !(source == "keepalive" && reason == "too_large") {
                    let _ = m
                        .send_queue_overflows
                        .get_or_create(&OverflowLabel { source, reason });
                }
            }
        }
        prom.register(
            "send_queue_overflows",
            "Sends refused because a send queue or the memory budget was full, or the message \
             was larger than the whole send queue, by source (send, publish, keepalive) and \
             reason (queue_full, memory_budget, too_large)",
            m.send_queue_overflows.clone(),
        );
        prom.register(
            "closes",
            "Closed connections by close code",
            m.closes.clone(),
        );
        prom.register(
            "callback_duration_seconds",
            "Time plugin callbacks took",
            m.callback_seconds.clone(),
        );
        if let Some(bus) = &bus {
            let bus_reg = prom.sub_registry_with_prefix("bus");
            bus_reg.register(
                "connected",
                "1 while the Redis link (publish, subscribe) is connected",
                bus.connected.clone(),
            );
            bus_reg.register(
                "connects",
                "Successful connections to Redis by link",
                bus.connects.clone(),
            );
            bus_reg.register(
                "published",
                "Publishes written to Redis",
                bus.published.clone(),
            );
            bus_reg.register(
                "received",
                "Publishes from other hosts delivered here",
                bus.received.clone(),
            );
            bus_reg.register(
                "dropped",
                "Publishes not sent to Redis, by reason (queue_full, disconnected, error)",
                bus.dropped.clone(),
            );
            bus_reg.register(
                "channels",
                "Channels this host is subscribed to in Redis",
                bus.channels.clone(),
            );
        }
        prom.register_collector(Box::new(PluginCollector { registry, budget }));
        Self { prom, ..m }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        // Sends that process-isolated plugins' workers refused, reported since the last scrape.
        let (full, large) = crate::plugin::isolate::take_worker_refusals();
        for (reason, n) in [("queue_full", full), ("too_large", large)] {
            if n > 0 {
                self.send_queue_overflows
                    .get_or_create(&OverflowLabel {
                        source: "send",
                        reason,
                    })
                    .inc_by(n);
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.prom)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Reads the registry when scraped.
#[derive(Debug)]
struct PluginCollector {
    registry: Arc<Registry>,
    budget: Arc<MemoryBudget>,
}

impl Collector for PluginCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let generations = self.registry.generations();
        {
            let mut family = encoder.encode_descriptor(
                "connections_open",
                "Open WebSocket connections by plugin and generation",
                None,
                MetricType::Gauge,
            )?;
            for g in &generations {
                let labels = vec![
                    ("plugin", g.name.clone()),
                    ("generation", g.generation.to_string()),
                ];
                let gauge = ConstGauge::new(g.open_connections as i64);
                gauge.encode(family.encode_family(&labels)?)?;
            }
        }
        let gauge = ConstGauge::new(generations.iter().filter(|g| g.current).count() as i64);
        gauge.encode(encoder.encode_descriptor(
            "plugins",
            "Plugins being served",
            None,
            MetricType::Gauge,
        )?)?;
        let gauge = ConstGauge::new(crate::plugin::mapped_libraries() as i64);
        gauge.encode(encoder.encode_descriptor(
            "mapped_libraries",
            "Plugin libraries mapped (never unmapped), replaced generations included",
            None,
            MetricType::Gauge,
        )?)?;
        let gauge = ConstGauge::new(i64::try_from(self.budget.used()).unwrap_or(i64::MAX));
        gauge.encode(encoder.encode_descriptor(
            "buffered_bytes",
            "Bytes buffered across all connections (send queues, partly received messages), \
             against --max-buffered-total",
            None,
            MetricType::Gauge,
        )?)?;
        let stats = crate::plugin::exec::all_stats(crate::plugin::retire::slow());
        type Field = fn(&crate::plugin::exec::ExecutorStats) -> usize;
        let per_plugin: [(&str, &str, Field); 4] = [
            (
                "plugin_workers",
                "Worker threads of each plugin's own runtime (its capacity)",
                |s| s.workers,
            ),
            (
                "plugin_calls_running",
                "Plugin calls running now (busy workers), per plugin",
                |s| s.running,
            ),
            (
                "plugin_calls_stuck",
                "Plugin calls running longer than --slow-callback, per plugin",
                |s| s.stuck,
            ),
            (
                "plugin_queue_depth",
                "Sessions and calls of a plugin waiting for one of its workers",
                |s| s.queue_depth,
            ),
        ];
        for (name, help, field) in per_plugin {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &stats {
                let labels = vec![("plugin", s.plugin.clone())];
                ConstGauge::new(field(s) as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        let workers = crate::plugin::isolate::all_stats();
        type WorkerField = fn(&crate::plugin::isolate::WorkerStats) -> f64;
        let per_worker: [(&str, &str, MetricType, WorkerField); 3] = [
            (
                "plugin_restarts",
                "Worker processes started after one died, per process-isolated plugin generation",
                MetricType::Counter,
                |w| w.restarts as f64,
            ),
            (
                "plugin_rss_bytes",
                "Resident memory of a process-isolated plugin's worker",
                MetricType::Gauge,
                |w| w.rss_bytes as f64,
            ),
            (
                "plugin_cpu_seconds",
                "CPU time (user and system) of a process-isolated plugin's workers, dead ones \
                 included",
                MetricType::Counter,
                |w| w.cpu_seconds,
            ),
        ];
        for (name, help, kind, field) in per_worker {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for w in &workers {
                let labels = vec![
                    ("plugin", w.plugin.clone()),
                    ("generation", w.generation.to_string()),
                ];
                let sample = family.encode_family(&labels)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(field(w)).encode(sample)?,
                    _ => ConstGauge::new(field(w)).encode(sample)?,
                }
            }
        }
        let (ok, refused) = self.registry.load_counts();
        let mut family = encoder.encode_descriptor(
            "plugin_loads",
            "Plugin loads by result",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [("ok", ok), ("refused", refused)] {
            let labels = vec![("result", result)];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert_eq!(bucket_of(Duration::from_micros(50)), 0);
        assert_eq!(bucket_of(Duration::from_micros(51)), 1);
        assert_eq!(bucket_of(Duration::from_micros(100)), 1);
        assert_eq!(bucket_of(Duration::from_micros(101)), 2);
        assert_eq!(bucket_of(Duration::from_secs(1)), 15); // 50 µs × 2^15 = 1.64 s
        assert_eq!(bucket_of(Duration::from_secs(10)), 16);
    }
}
