//! `Config`: every limit and interval of the host, with the default and the reason for it.

use std::path::PathBuf;

use crate::plugin::probe::Probe;
use std::time::Duration;

pub use crate::units::MAX_DURATION;

/// How the host runs. `Default` gives values that are safe on the open internet.
#[derive(Debug, Clone)]
pub struct Config {
    /// The directory whose `*.so` files are loaded as plugins.
    pub plugins_dir: PathBuf,
    /// Largest plain-request body (413 past it). Default 1 MiB: plugins answer small requests;
    /// bulk uploads do not belong in a WebSocket host.
    pub max_body_size: usize,
    /// How long a plain request's body may take to arrive (408 past it). Default 30 s.
    pub body_timeout: Duration,
    /// How long a client may take to send its request head; a client that trickles it byte by
    /// byte is dropped. Default 10 s.
    pub header_read_timeout: Duration,
    /// The host's per-connection limits (every one set), under a plugin's config file section,
    /// its route's, and its 101: message and frame size (1 MiB), send queue (1 MiB), ping
    /// interval (30 s), pong timeout (10 s), idle timeout (300 s, like Jetty's). See
    /// [`crate::limits`].
    pub limits: crate::limits::ConnLimits,
    /// Bytes tungstenite takes per read call: a buffer each connection holds while it is busy
    /// (a quiet connection parks and frees it). Socket reads themselves go through a 64 KiB
    /// read-ahead buffer per worker thread, so this costs no system calls. Default 512 B: a
    /// size class of the allocator that no allocation a connection keeps for its life uses.
    /// (At 256 B, tungstenite's buffers were laid out in the same slabs as tokio's 256-byte
    /// socket registrations, and when the connections parked the freed buffers left those
    /// slabs half empty: ~230 B an idle connection. 384 B is `ConnShared`'s class.) Larger is
    /// not faster: 16 KiB echoes per server CPU-second were the same at 4 KiB.
    pub read_buffer_size: usize,
    /// A callback that runs longer than this is logged as blocking the connection. Default 50 ms.
    pub slow_callback: Duration,
    /// After a close frame is sent, how long to wait for the peer's before dropping the TCP
    /// connection. Default 5 s.
    pub close_timeout: Duration,
    /// On shutdown, how long to wait for connections to finish their close handshakes.
    /// Default 10 s.
    pub shutdown_timeout: Duration,
    /// Messages a connection may send per second, with a burst of as many: data messages,
    /// pings and pongs (each a callback), and each continuation frame of a fragmented message
    /// (so that empty fragments cost a client what messages would). Past it the connection is
    /// closed with 1008, and dropped if the client still sends past it after the close. Zero
    /// disables the limit. Default 10,000.
    pub max_message_rate: u32,
    /// A message must arrive whole within this time of its first byte; past it the connection
    /// is closed with 1008 (checked at least this often). Zero disables it. Default 60 s.
    pub message_timeout: Duration,
    /// Streams (requests and WebSockets) one HTTP/2 connection may have open at once; each
    /// WebSocket counts against the connection caps like any other. Zero turns HTTP/2 off
    /// (HTTP/1.1 only). Default 100. HTTP/2 is served on the same port: by ALPN `h2` with TLS,
    /// by prior knowledge without.
    pub http2_max_streams: u32,
    /// Largest request head (request line and headers) a client may send; 431 past it.
    /// Default 16 KiB (hyper's floor is 8 KiB).
    pub max_header_size: usize,
    /// Most WebSocket connections at once; upgrades past it get 503. Default: the process's
    /// open-file limit less 512 (for plugin files, the admin endpoint and connections still in
    /// their HTTP phase), 19,488 where the limit is 20,000.
    pub max_connections: usize,
    /// Most WebSocket connections from one client IP; upgrades past it get 429. Default 1,000
    /// (clients behind one NAT share an address); zero disables the cap.
    pub max_connections_per_ip: usize,
    /// Bytes buffered across all connections: send queues and partly received messages. Past
    /// it sends fail with `QueueFull` and a connection whose incoming data does not fit is
    /// closed with 1013 (both logged), so that many connections at their limits cannot exhaust
    /// memory. Default 1 GiB.
    pub max_buffered_total: u64,
    /// Origins allowed to open WebSockets (`https://example.com`); empty allows every origin.
    pub allowed_origins: Vec<String>,
    /// Refuse upgrades without an `Origin` header (non-browser clients) with 403.
    pub require_origin: bool,
    /// Reverse proxies whose `Forwarded` / `X-Forwarded-For` headers are believed: requests from
    /// them take the client address from those headers.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The config file the `plugins` sections came from: read again on every reload (SIGHUP,
    /// `wshost reload`, a change in the plugins directory).
    pub config_file: Option<PathBuf>,
    /// How `config_file`'s `[plugin.NAME]` sections are read again on a reload (the binary's
    /// config file reader); without one a reload keeps `plugins`.
    pub section_reader: Option<crate::plugin::registry::SectionReader>,
    /// Plugin files larger than this are refused without being read. Default 256 MiB.
    pub max_plugin_size: u64,
    /// Worker threads of each plugin's own runtime (a plugin's config file section may set its
    /// own `workers`): how many of its calls may run, or block, at once. Its connections,
    /// callbacks, upgrades and requests run there and nowhere else, so a plugin that blocks
    /// holds up only its own connections. Default: the machine's cores, at least 2. Zero runs
    /// plugins on the host's own runtime (only for embedding the library in tests).
    pub plugin_workers: usize,
    /// How long an upgrade or a plain request may wait for its plugin's decision (a blocked
    /// `upgrade`, or a deferred one not completed); past it the client gets 503. Default 10 s.
    pub decision_timeout: Duration,
    /// After a reload replaced a plugin, its old generation's connections are closed with 1012
    /// this long after (zero: never). Default: never.
    pub replaced_grace: Duration,
    /// Where plugins run: in the host, or each in a worker process of its own.
    pub isolation: crate::plugin::isolate::IsolationConfig,
    /// Per-plugin route mounts, limits and configuration tables (the config file's
    /// `[plugin.NAME]` sections), by plugin name.
    pub plugins: std::collections::BTreeMap<String, crate::plugin::PluginSection>,
    /// Serve https/wss with this certificate and key; `None` serves http/ws.
    pub tls: Option<crate::tls::TlsFiles>,
    /// How channels reach other hosts: in memory only (the default), or through Redis.
    pub bus: crate::bus::BusConfig,
    /// Watch the plugins directory and reload on changes. Default on; turn it off where file
    /// events are unreliable (network filesystems) and reload with SIGHUP or `wshost reload`.
    pub watch: bool,
    /// Load each plugin in a short-lived child process before mapping it, so that a plugin that
    /// crashes or aborts while loading cannot take the host down. The binary sets this to
    /// itself; `None` (the library's default) maps plugins directly.
    pub probe: Option<Probe>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            plugins_dir: PathBuf::from("plugins"),
            max_body_size: 1 << 20,
            body_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            limits: crate::limits::ConnLimits::host_defaults(),
            read_buffer_size: 512,
            slow_callback: Duration::from_millis(50),
            close_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            message_timeout: Duration::from_secs(60),
            max_header_size: 16 << 10,
            http2_max_streams: 100,
            max_connections: default_max_connections(),
            max_connections_per_ip: 1000,
            max_buffered_total: 1 << 30,
            allowed_origins: Vec::new(),
            require_origin: false,
            trusted_proxies: Vec::new(),
            plugins: Default::default(),
            config_file: None,
            section_reader: None,
            max_plugin_size: crate::plugin::registry::DEFAULT_MAX_PLUGIN_SIZE,
            plugin_workers: crate::plugin::exec::default_workers(),
            decision_timeout: Duration::from_secs(10),
            replaced_grace: Duration::ZERO,
            isolation: crate::plugin::isolate::IsolationConfig::default(),
            tls: None,
            max_message_rate: 10_000,
            watch: true,
            bus: crate::bus::BusConfig::Memory,
            probe: None,
        }
    }
}

/// The process's soft limit of open files, from `/proc/self/limits`.
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn default_max_connections() -> usize {
    let limit = open_file_limit().unwrap_or(1024);
    usize::try_from(limit.saturating_sub(512).max(64)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_connections_stays_below_the_open_file_limit() {
        let limit = open_file_limit().expect("Linux has /proc/self/limits");
        assert!((Config::default().max_connections as u64) < limit);
    }
}
