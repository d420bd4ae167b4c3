//! `PluginSection`: what the host's configuration says about one plugin (its `[plugin.NAME]`
//! section in the config file): mounts, limits, where it runs, the table handed to it.

use std::collections::BTreeMap;
use std::time::Duration;

/// Limits and routes for one plugin, from its `[plugin.NAME]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginSection {
    /// Route prefixes that replace the plugin's own.
    pub routes: Option<Vec<String>>,
    /// Limits for its connections (over the host's, under its route's and its 101's).
    pub limits: crate::limits::ConnLimits,
    /// Worker threads of the plugin's own runtime: how many of its calls may run (or block)
    /// at once.
    pub workers: Option<usize>,
    /// Whether it runs in a worker process (`Some(true)`, `isolation = "process"`) or in the
    /// host (`Some(false)`, `"inline"`); `None`: the host's default.
    pub process: Option<bool>,
    /// In a worker process: its resident memory past which the worker is ended and restarted.
    pub memory_limit: Option<u64>,
    /// In a worker process: a call running longer ends the worker.
    pub callback_timeout: Option<Duration>,
    /// The free-form table handed to the plugin, every value as text (`Host::config`; lists
    /// and tables as JSON text).
    pub config: BTreeMap<String, String>,
    /// The same table with its types, as JSON (`Host::config_value`, `Host::config_as`).
    pub config_json: String,
    /// Limits for one of its routes (`[plugin.NAME.route."/path"]`), over the section's own.
    pub route_limits: BTreeMap<String, PluginSection>,
}
