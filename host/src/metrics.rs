//! Prometheus metrics, served by the admin endpoint at `/metrics`. Counters are updated off the
//! per-message path (sessions count locally and add in batches); plugin and connection gauges
//! are read from the registry when scraped.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;

use crate::plugin::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StatusLabel {
    pub(crate) status: u16,
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
    pub(crate) send_queue_overflows: Counter,
    /// Closed connections by the code `on_close` got.
    pub(crate) closes: Family<CodeLabel, Counter>,
    pub(crate) callback_seconds: Histogram,
}

impl Metrics {
    /// Metrics for a host whose plugins are in `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        let mut prom = prometheus_client::registry::Registry::with_prefix("wshost");
        let m = Self {
            upgrades: Family::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            send_queue_overflows: Counter::default(),
            closes: Family::default(),
            // 50 µs to ~1.6 s.
            callback_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            prom: prometheus_client::registry::Registry::default(),
        };
        prom.register(
            "upgrades",
            "WebSocket upgrade requests by answer status (101 accepted)",
            m.upgrades.clone(),
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
        prom.register(
            "send_queue_overflows",
            "Sends refused because a send queue or the memory budget was full",
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
        if let Some(bus) = registry.hub().bus_metrics() {
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
        prom.register_collector(Box::new(PluginCollector { registry }));
        Self { prom, ..m }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
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
}

impl Collector for PluginCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let status = self.registry.status();
        {
            let mut family = encoder.encode_descriptor(
                "wshost_connections_open",
                "Open WebSocket connections by plugin and generation",
                None,
                MetricType::Gauge,
            )?;
            for p in &status.plugins {
                for g in &p.generations {
                    let labels = vec![
                        ("plugin", p.name.clone()),
                        ("generation", g.generation.to_string()),
                    ];
                    let gauge = ConstGauge::new(g.open_connections as i64);
                    gauge.encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let gauge = ConstGauge::new(status.plugins.len() as i64);
        gauge.encode(encoder.encode_descriptor(
            "wshost_plugins",
            "Plugins being served",
            None,
            MetricType::Gauge,
        )?)?;
        let gauge = ConstGauge::new(status.mapped_libraries as i64);
        gauge.encode(encoder.encode_descriptor(
            "wshost_mapped_libraries",
            "Plugin libraries mapped (never unmapped), replaced generations included",
            None,
            MetricType::Gauge,
        )?)?;
        let (ok, refused) = self.registry.load_counts();
        let mut family = encoder.encode_descriptor(
            "wshost_plugin_loads",
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
