//! The command line: `wshost serve`, `check`, `config`, `status`, `reload`, `new` (and the
//! hidden `probe`), every flag also read from a `WSHOST_*` environment variable, and the
//! parsers that bound every size and duration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use wshost::plugin::probe::Probe;
use wshost::Config;

use crate::values;

/// Environment variable for `--listen`.
pub const ENV_LISTEN: &str = "WSHOST_LISTEN";
/// Environment variable for `--plugins`.
pub const ENV_PLUGINS: &str = "WSHOST_PLUGINS";
/// Environment variable for `--admin-listen` (serve) and `--admin` (status, reload).
pub const ENV_ADMIN: &str = "WSHOST_ADMIN_LISTEN";
/// The admin endpoint's default address: loopback only.
pub use wshost::admin::DEFAULT_ADMIN;

/// wshost: a WebSocket server whose handlers are plugins.
#[derive(Debug, Parser)]
#[command(name = "wshost", args_override_self = true)]
pub struct Cli {
    /// Log format: human-readable lines, or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "WSHOST_LOG_FORMAT",
        default_value = "human"
    )]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve WebSocket upgrades and plain requests with the plugins of a directory.
    Serve(Box<ServeArgs>),
    /// Load plugin files as the host would and report each one; exits non-zero if any is refused.
    Check(CheckArgs),
    /// Print a config file with every setting at its default (`--print-defaults`).
    Config(ConfigArgs),
    /// Show a running host's plugins, generations and connections (asks its admin endpoint).
    Status(AdminArgs),
    /// Make a running host rescan its plugins directory now (asks its admin endpoint).
    Reload(AdminArgs),
    /// Write a new plugin crate (an echo skeleton with a unit test) that builds on its own.
    New(NewArgs),
    /// Load one plugin file completely in this process and report; the host runs this in a
    /// child process before it maps a plugin.
    #[command(hide = true)]
    Probe(ProbeArgs),
    /// Runs one process-isolated plugin for the host (internal).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// `wshost status` and `wshost reload`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The host's admin address: HOST:PORT, http://HOST:PORT or unix:PATH. Default: the
    /// address a running host wrote to its runtime file (`$WSHOST_RUNTIME_DIR/admin`,
    /// `$XDG_RUNTIME_DIR/wshost/admin` or `/tmp/wshost-UID/admin`), else 127.0.0.1:8181.
    #[arg(long, env = ENV_ADMIN)]
    pub admin: Option<wshost::admin::AdminAddr>,
    /// Give up when the host has not answered within this time.
    #[arg(long, default_value = "10s", value_parser = nonzero_duration)]
    pub timeout: Duration,
    /// A file holding the bearer token the host was started with (`--admin-token-file`).
    #[arg(long, env = "WSHOST_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the raw JSON answer.
    #[arg(long)]
    pub json: bool,
}

/// `wshost config`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Print a commented config file with every default.
    #[arg(long, required = true)]
    pub print_defaults: bool,
}

/// `wshost new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The plugin's name: its crate, library and route (`/NAME`).
    pub name: String,
    /// The folder to create the crate in.
    #[arg(long, default_value = ".")]
    pub path: PathBuf,
    /// The plugin-api folder to depend on. Default: the one of the source tree this wshost was
    /// built from.
    #[arg(long)]
    pub api_path: Option<PathBuf>,
    /// What the plugin starts as: `echo`, `chat` (rooms on the host's channels, behind
    /// middleware) or `stream` (a stream paced by the client's reading).
    #[arg(long, value_enum, default_value = "echo")]
    pub template: crate::scaffold::Template,
}

/// `wshost worker` (started by the host for a process-isolated plugin).
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The host's socket for this worker.
    #[arg(long)]
    pub socket: PathBuf,
    /// The file name to use in messages.
    #[arg(long)]
    pub display_name: PathBuf,
    /// Threads that run the plugin's calls.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// End the worker when a plugin call runs longer (milliseconds; 0: never).
    #[arg(long, default_value_t = 0)]
    pub callback_timeout_ms: u64,
    /// The private copy of the library to map.
    pub file: PathBuf,
}

/// `wshost probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The file name to use in messages (the file the user put in the plugins directory).
    #[arg(long)]
    pub display_name: PathBuf,
    /// The file to load.
    pub file: PathBuf,
}

/// `wshost serve`: a config file, and the settings over it.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML config file: every setting below by its name, and `[plugin.NAME]` sections.
    /// Flags and environment variables override it.
    #[arg(long, env = "WSHOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// The settings given on the command line or in the environment.
    #[command(flatten)]
    pub settings: Settings,
}

/// Every `serve` setting, each optional: the command line and the environment fill one (clap),
/// the config file another (serde, the same names), and [`Settings::overlay`] lays them over
/// [`Settings::defaults`], which come from [`Config::default`]: defaults live in one place.
#[derive(Debug, Default, Clone, Args, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on; port 0 picks a free port (the real address is printed).
    #[arg(long, env = ENV_LISTEN)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Directory of plugin files (`*.so`).
    #[arg(long, env = ENV_PLUGINS)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugins: Option<PathBuf>,
    /// Largest message accepted from a client, in bytes (close 1009 past it).
    #[arg(long, env = "WSHOST_MAX_MESSAGE_SIZE", value_parser = bytes)]
    #[serde(
        default,
        with = "values::bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_message_size: Option<u64>,
    /// Largest frame accepted from a client, in bytes.
    #[arg(long, env = "WSHOST_MAX_FRAME_SIZE", value_parser = bytes)]
    #[serde(
        default,
        with = "values::bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_frame_size: Option<u64>,
    /// Most bytes queued for sending to one connection.
    #[arg(long, env = "WSHOST_MAX_SEND_QUEUE", value_parser = bytes)]
    #[serde(
        default,
        with = "values::bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_send_queue: Option<u64>,
    /// Bytes tungstenite reads per call, held by a connection while it is busy (socket reads
    /// go through a 64 KiB buffer per thread whatever this is).
    #[arg(long, env = "WSHOST_READ_BUFFER_SIZE", value_parser = bytes)]
    #[serde(
        default,
        with = "values::bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub read_buffer_size: Option<u64>,
    /// Largest plain-request body, in bytes (413 past it).
    #[arg(long, env = "WSHOST_MAX_BODY_SIZE", value_parser = bytes)]
    #[serde(
        default,
        with = "values::bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_body_size: Option<u64>,
    /// How long a plain request's body may take (408 past it).
    #[arg(long, env = "WSHOST_BODY_TIMEOUT", value_parser = nonzero_duration)]
    #[serde(
        default,
        with = "values::nonzero_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub body_timeout: Option<Duration>,
    /// How long a client may take to send its request head.
    #[arg(long, env = "WSHOST_HEADER_READ_TIMEOUT", value_parser = nonzero_duration)]
    #[serde(
        default,
        with = "values::nonzero_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub header_read_timeout: Option<Duration>,
    /// Log a warning when a plugin callback runs longer than this.
    #[arg(long, env = "WSHOST_SLOW_CALLBACK", value_parser = duration)]
    #[serde(
        default,
        with = "values::duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub slow_callback: Option<Duration>,
    /// How long to wait for the peer's close frame after sending ours.
    #[arg(long, env = "WSHOST_CLOSE_TIMEOUT", value_parser = nonzero_duration)]
    #[serde(
        default,
        with = "values::nonzero_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub close_timeout: Option<Duration>,
    /// On shutdown, how long to wait for connections to close.
    #[arg(long, env = "WSHOST_SHUTDOWN_TIMEOUT", value_parser = duration)]
    #[serde(
        default,
        with = "values::duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub shutdown_timeout: Option<Duration>,
    /// Interval of the host's pings to each connection; 0 disables them.
    #[arg(long, env = "WSHOST_PING_INTERVAL", value_parser = duration)]
    #[serde(
        default,
        with = "values::duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub ping_interval: Option<Duration>,
    /// Drop a connection whose pong does not arrive within this time after a ping.
    #[arg(long, env = "WSHOST_PONG_TIMEOUT", value_parser = nonzero_duration)]
    #[serde(
        default,
        with = "values::nonzero_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub pong_timeout: Option<Duration>,
    /// Close (1001) a connection without data messages either way for this long; 0 disables it.
    #[arg(long, env = "WSHOST_IDLE_TIMEOUT", value_parser = duration)]
    #[serde(
        default,
        with = "values::duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
    /// Messages per second a connection may send (burst as many): data messages, pings, pongs,
    /// and each continuation frame of a fragmented message; past it, close 1008 (and a client
    /// that keeps sending is dropped without waiting for its close). 0 disables the limit.
    #[arg(long, env = "WSHOST_MAX_MESSAGE_RATE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_rate: Option<u32>,
    /// A message must arrive whole within this time of its first byte (close 1008); 0 disables.
    #[arg(long, env = "WSHOST_MESSAGE_TIMEOUT", value_parser = duration)]
    #[serde(
        default,
        with = "values::duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub message_timeout: Option<Duration>,
    /// Largest request head (request line and headers), in bytes; 431 past it.
    #[arg(long, env = "WSHOST_MAX_HEADER_SIZE", value_parser = bytes)]
    #[serde(
        default,
        with = "values::bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_header_size: Option<u64>,
    /// Streams (requests and WebSockets) one HTTP/2 connection may have open at once; 0 serves
    /// HTTP/1.1 only. HTTP/2 shares the port: ALPN `h2` with TLS, prior knowledge without.
    #[arg(long, env = "WSHOST_HTTP2_MAX_STREAMS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http2_max_streams: Option<u32>,
    /// permessage-deflate for clients that offer it (browsers do): `on` or `off`.
    /// `[plugin.NAME] compression` and its routes' set their own; a plugin can refuse it per
    /// connection in its 101.
    #[arg(long, env = "WSHOST_COMPRESSION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<Switch>,
    /// Messages smaller than this many bytes are sent uncompressed.
    #[arg(long, env = "WSHOST_COMPRESSION_MIN_SIZE", value_parser = bytes)]
    #[serde(
        default,
        with = "values::bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub compression_min_size: Option<u64>,
    /// Most WebSocket connections at once; 503 past it. Default: the open-file limit less 512.
    #[arg(long, env = "WSHOST_MAX_CONNECTIONS", value_parser = size)]
    #[serde(
        default,
        with = "values::count",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_connections: Option<usize>,
    /// Most WebSocket connections from one client IP; 429 past it. 0 disables the cap.
    #[arg(long, env = "WSHOST_MAX_CONNECTIONS_PER_IP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_ip: Option<usize>,
    /// Bytes buffered across all connections (send queues, partly received messages); past it
    /// sends fail with QueueFull and incoming data that does not fit closes with 1013.
    #[arg(long, env = "WSHOST_MAX_BUFFERED_TOTAL", value_parser = bytes)]
    #[serde(
        default,
        with = "values::bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_buffered_total: Option<u64>,
    /// An origin allowed to open WebSockets (repeatable; e.g. https://example.com). None set:
    /// every origin is allowed.
    #[arg(
        long = "allowed-origin",
        env = "WSHOST_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<Vec<String>>,
    /// Refuse upgrades that carry no Origin header (non-browser clients) with 403.
    #[arg(long, env = "WSHOST_REQUIRE_ORIGIN", num_args = 0..=1, default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new())]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_origin: Option<bool>,
    /// A reverse proxy (IP or CIDR, repeatable) whose Forwarded / X-Forwarded-For headers
    /// give the client's address.
    #[arg(
        long = "trusted-proxy",
        env = "WSHOST_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    #[serde(
        default,
        with = "values::from_str_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub trusted_proxies: Option<Vec<ipnet::IpNet>>,
    /// PEM certificate chain: serve https/wss (with --tls-key).
    #[arg(long, env = "WSHOST_TLS_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "WSHOST_TLS_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Address of the admin endpoint (`wshost status`, `wshost reload`, `/metrics`): a
    /// loopback HOST:PORT, `unix:PATH` (a socket only this user can open), or `off`.
    #[arg(long, env = ENV_ADMIN)]
    #[serde(
        default,
        with = "values::from_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub admin_listen: Option<AdminListen>,
    /// A file holding a token the admin endpoint requires as `Authorization: Bearer TOKEN`
    /// (all but /healthz and /readyz).
    #[arg(long, env = "WSHOST_ADMIN_TOKEN_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Do not watch the plugins directory (reload with SIGHUP or `wshost reload` instead).
    #[arg(long, env = "WSHOST_NO_WATCH", num_args = 0..=1, default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new())]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_watch: Option<bool>,
    /// Map plugins without loading them in a probe process first (faster, not crash-safe).
    #[arg(long, env = "WSHOST_NO_PROBE", num_args = 0..=1, default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new())]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_probe: Option<bool>,
    /// Where channels are shared: `memory` (this host only) or `redis://HOST:PORT/` (every host
    /// on that Redis with the same --bus-prefix).
    #[arg(long, env = "WSHOST_BUS")]
    #[serde(
        default,
        with = "values::from_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub bus: Option<wshost::bus::BusConfig>,
    /// Redis channel names are PREFIX:PLUGIN:CHANNEL (with --bus redis://).
    #[arg(long, env = "WSHOST_BUS_PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bus_prefix: Option<String>,
    /// First wait before reconnecting to Redis; doubles up to --bus-reconnect-max.
    #[arg(long, env = "WSHOST_BUS_RECONNECT_MIN", value_parser = nonzero_duration)]
    #[serde(
        default,
        with = "values::nonzero_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub bus_reconnect_min: Option<Duration>,
    /// Longest wait between attempts to reconnect to Redis.
    #[arg(long, env = "WSHOST_BUS_RECONNECT_MAX", value_parser = nonzero_duration)]
    #[serde(
        default,
        with = "values::nonzero_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub bus_reconnect_max: Option<Duration>,
    /// Publishes waiting to be written to Redis; past it they are dropped (and counted).
    #[arg(long, env = "WSHOST_BUS_QUEUE", value_parser = size)]
    #[serde(
        default,
        with = "values::count",
        skip_serializing_if = "Option::is_none"
    )]
    pub bus_queue: Option<usize>,
    /// How long the probe process may take to load a plugin.
    #[arg(long, env = "WSHOST_PROBE_TIMEOUT", value_parser = nonzero_duration)]
    #[serde(
        default,
        with = "values::nonzero_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub probe_timeout: Option<Duration>,
    /// Plugin files larger than this many bytes are refused without being read.
    #[arg(long, env = "WSHOST_MAX_PLUGIN_SIZE", value_parser = bytes)]
    #[serde(
        default,
        with = "values::bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_plugin_size: Option<u64>,
    /// Worker threads of each plugin's own runtime (default: the machine's cores, at least 2):
    /// how many of a plugin's calls may run or block at once. `[plugin.NAME] workers` sets one
    /// plugin's.
    #[arg(long, env = "WSHOST_PLUGIN_WORKERS", value_parser = size)]
    #[serde(
        default,
        with = "values::count",
        skip_serializing_if = "Option::is_none"
    )]
    pub plugin_workers: Option<usize>,
    /// How long an upgrade or plain request waits for its plugin's decision (deferred ones
    /// included); past it the client gets 503.
    #[arg(long, env = "WSHOST_DECISION_TIMEOUT", value_parser = nonzero_duration)]
    #[serde(
        default,
        with = "values::nonzero_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub decision_timeout: Option<Duration>,
    /// Where plugins run by default: `inline` (mapped in the host: fastest, but a crash in a
    /// plugin ends the host) or `process` (each plugin in a worker process of its own: a crash,
    /// hang or leak ends only that worker, which restarts). `[plugin.NAME] isolation` sets
    /// one plugin's.
    #[arg(long, env = "WSHOST_ISOLATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
    /// In process isolation: a plugin call (callback, upgrade, request) running longer than this
    /// ends its worker, which restarts; "0s" never. `[plugin.NAME] callback_timeout` sets one
    /// plugin's.
    #[arg(long, env = "WSHOST_CALLBACK_TIMEOUT", value_parser = duration)]
    #[serde(
        default,
        with = "values::duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub callback_timeout: Option<Duration>,
    /// After a reload replaced a plugin, close the old generation's remaining connections with
    /// 1012 (Service Restart) this long after, so clients reconnect to the new build; "0s"
    /// never (they stay on the old build until they close).
    #[arg(long, env = "WSHOST_REPLACED_GRACE", value_parser = duration)]
    #[serde(
        default,
        with = "values::duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub replaced_grace: Option<Duration>,
}

/// A setting that is on or off.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// Where plugins run.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Mapped into the host.
    Inline,
    /// In a worker process of its own.
    Process,
}

/// `overlay!(a, b; f1, f2, ..)`: a `Settings` with each field from `a`, else from `b`. Every
/// field must be named (the struct literal has no `..`), so a new setting cannot be forgotten.
macro_rules! overlay {
    ($a:ident, $b:ident; $($f:ident),* $(,)?) => {
        Settings { $($f: $a.$f.or($b.$f)),* }
    };
}

impl Settings {
    /// Every setting at its default (those without one, like `tls_cert`, unset), taken from
    /// [`Config::default`] and the library's other defaults.
    pub fn defaults() -> Self {
        let c = Config::default();
        let redis = wshost::bus::RedisConfig::new("");
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            plugins: Some(c.plugins_dir),
            max_message_size: c.limits.max_message_size,
            max_frame_size: c.limits.max_frame_size,
            max_send_queue: c.limits.max_send_queue,
            read_buffer_size: Some(c.read_buffer_size as u64),
            max_body_size: Some(c.max_body_size as u64),
            body_timeout: Some(c.body_timeout),
            header_read_timeout: Some(c.header_read_timeout),
            slow_callback: Some(c.slow_callback),
            close_timeout: Some(c.close_timeout),
            shutdown_timeout: Some(c.shutdown_timeout),
            ping_interval: c.limits.ping_interval,
            pong_timeout: c.limits.pong_timeout,
            idle_timeout: c.limits.idle_timeout,
            max_message_rate: Some(c.max_message_rate),
            message_timeout: Some(c.message_timeout),
            max_header_size: Some(c.max_header_size as u64),
            http2_max_streams: Some(c.http2_max_streams),
            compression: c
                .limits
                .compression
                .map(|on| if on { Switch::On } else { Switch::Off }),
            compression_min_size: c.limits.compression_min_size,
            max_connections: Some(c.max_connections),
            max_connections_per_ip: Some(c.max_connections_per_ip),
            max_buffered_total: Some(c.max_buffered_total),
            allowed_origins: Some(c.allowed_origins),
            require_origin: Some(c.require_origin),
            trusted_proxies: Some(c.trusted_proxies),
            tls_cert: None,
            tls_key: None,
            admin_listen: Some(
                DEFAULT_ADMIN
                    .parse()
                    .expect("the default admin address parses"),
            ),
            admin_token_file: None,
            no_watch: Some(!c.watch),
            no_probe: Some(false),
            bus: Some(c.bus),
            bus_prefix: Some(redis.prefix),
            bus_reconnect_min: Some(redis.reconnect_min),
            bus_reconnect_max: Some(redis.reconnect_max),
            bus_queue: Some(redis.queue),
            probe_timeout: Some(c.isolation.start_timeout),
            max_plugin_size: Some(c.max_plugin_size),
            plugin_workers: Some(c.plugin_workers),
            decision_timeout: Some(c.decision_timeout),
            isolation: Some(if c.isolation.process {
                Isolation::Process
            } else {
                Isolation::Inline
            }),
            callback_timeout: Some(c.isolation.callback_timeout),
            replaced_grace: Some(c.replaced_grace),
        }
    }

    /// These settings where set, else `under`'s.
    pub fn overlay(self, under: Settings) -> Settings {
        let (a, b) = (self, under);
        overlay!(a, b;
            listen, plugins, max_message_size, max_frame_size, max_send_queue, read_buffer_size,
            max_body_size, body_timeout, header_read_timeout, slow_callback, close_timeout,
            shutdown_timeout, ping_interval, pong_timeout, idle_timeout, max_message_rate,
            message_timeout, max_header_size, http2_max_streams, compression,
            compression_min_size, max_connections,
            max_connections_per_ip,
            max_buffered_total, allowed_origins, require_origin, trusted_proxies, tls_cert,
            tls_key, admin_listen, admin_token_file, no_watch, no_probe, bus, bus_prefix,
            bus_reconnect_min, bus_reconnect_max, bus_queue, probe_timeout, max_plugin_size,
            plugin_workers, decision_timeout, isolation, callback_timeout, replaced_grace,
        )
    }

    /// The settings over the defaults: every one with a value (those without a default may
    /// still be unset).
    pub fn resolved(self) -> Resolved {
        Resolved(self.overlay(Settings::defaults()))
    }
}

/// [`Settings`] laid over the defaults.
#[derive(Debug, Clone)]
pub struct Resolved(Settings);

impl Resolved {
    /// The settings.
    pub fn get(&self) -> &Settings {
        &self.0
    }

    /// Where to listen.
    pub fn listen(&self) -> SocketAddr {
        self.0.listen.expect("resolved")
    }

    /// Where the admin endpoint listens.
    pub fn admin_listen(&self) -> &AdminListen {
        self.0.admin_listen.as_ref().expect("resolved")
    }

    /// The host configuration these settings describe; `exe` is the binary to probe plugins
    /// with, `config_file` the file they came from.
    pub fn config(&self, exe: Option<PathBuf>, config_file: Option<PathBuf>) -> Config {
        let s = &self.0;
        const SET: &str = "every setting with a default is set once resolved";
        let probe_timeout = s.probe_timeout.expect(SET);
        Config {
            plugins_dir: s.plugins.clone().expect(SET),
            max_body_size: s.max_body_size.expect(SET) as usize,
            body_timeout: s.body_timeout.expect(SET),
            header_read_timeout: s.header_read_timeout.expect(SET),
            limits: wshost::limits::ConnLimits {
                max_message_size: s.max_message_size,
                max_frame_size: s.max_frame_size,
                max_send_queue: s.max_send_queue,
                ping_interval: s.ping_interval,
                pong_timeout: s.pong_timeout,
                idle_timeout: s.idle_timeout,
                compression: s.compression.map(|c| c == Switch::On),
                compression_min_size: s.compression_min_size,
            },
            read_buffer_size: (s.read_buffer_size.expect(SET) as usize).max(64),
            slow_callback: s.slow_callback.expect(SET),
            close_timeout: s.close_timeout.expect(SET),
            shutdown_timeout: s.shutdown_timeout.expect(SET),
            max_message_rate: s.max_message_rate.expect(SET),
            message_timeout: s.message_timeout.expect(SET),
            max_header_size: s.max_header_size.expect(SET) as usize,
            http2_max_streams: s.http2_max_streams.expect(SET),
            max_connections: s.max_connections.expect(SET),
            max_connections_per_ip: s.max_connections_per_ip.expect(SET),
            max_buffered_total: s.max_buffered_total.expect(SET),
            allowed_origins: s.allowed_origins.clone().expect(SET),
            require_origin: s.require_origin.expect(SET),
            trusted_proxies: s.trusted_proxies.clone().expect(SET),
            tls: match (&s.tls_cert, &s.tls_key) {
                (Some(cert), Some(key)) => Some(wshost::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
            watch: !s.no_watch.expect(SET),
            bus: match s.bus.clone().expect(SET) {
                wshost::bus::BusConfig::Memory => wshost::bus::BusConfig::Memory,
                wshost::bus::BusConfig::Redis(r) => {
                    wshost::bus::BusConfig::Redis(wshost::bus::RedisConfig {
                        url: r.url,
                        prefix: s.bus_prefix.clone().expect(SET),
                        reconnect_min: s.bus_reconnect_min.expect(SET),
                        reconnect_max: s.bus_reconnect_max.expect(SET),
                        queue: s.bus_queue.expect(SET),
                    })
                }
            },
            section_reader: config_file.as_ref().map(|_| {
                wshost::plugin::registry::SectionReader(std::sync::Arc::new(|file| {
                    crate::config_file::load(file)
                        .map(|f| f.plugins)
                        .map_err(|e| e.to_string())
                }))
            }),
            config_file,
            max_plugin_size: s.max_plugin_size.expect(SET),
            plugin_workers: s.plugin_workers.expect(SET),
            decision_timeout: s.decision_timeout.expect(SET),
            replaced_grace: s.replaced_grace.expect(SET),
            isolation: wshost::plugin::isolate::IsolationConfig {
                process: s.isolation.expect(SET) == Isolation::Process,
                exe: exe.clone(),
                callback_timeout: s.callback_timeout.expect(SET),
                start_timeout: probe_timeout,
            },
            probe: exe.filter(|_| !s.no_probe.expect(SET)).map(|exe| Probe {
                exe,
                timeout: probe_timeout,
            }),
            ..Config::default()
        }
    }
}

/// Where the admin endpoint listens, if anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminListen {
    /// No admin endpoint.
    Off,
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket at this path.
    Unix(PathBuf),
}

impl std::fmt::Display for AdminListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl std::str::FromStr for AdminListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self::Off);
        }
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse().map(Self::Tcp).map_err(|e| {
            format!("`{s}`: {e} (an address like 127.0.0.1:8181, unix:/path/admin.sock, or off)")
        })
    }
}

/// Reads a token file: its first line, trimmed; an empty token is an error.
pub fn read_token_file(file: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read the token file {}: {e}", file.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(format!("the token file {} is empty", file.display()));
    }
    Ok(token)
}

/// `wshost check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// A config file whose `[plugin.NAME]` sections apply (the plugin's config table, its
    /// mounts), as `wshost serve --config FILE` would apply them.
    #[arg(long, env = "WSHOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Plugin files to check.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub use wshost::units::{bytes, duration, nonzero_duration, size};

/// `serve --help` with each setting's default, from [`Settings::defaults`].
pub fn with_default_help(serve: clap::Command) -> clap::Command {
    let defaults = crate::config_file::default_values();
    let ids: Vec<String> = serve
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    ids.into_iter().fold(serve, |serve, id| {
        let Some(value) = defaults.get(&id) else {
            return serve;
        };
        let shown = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Array(a) if a.is_empty() => return serve,
            other => other.to_string(),
        };
        serve.mut_arg(&id, |arg| {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            arg.help(format!("{help} [default: {shown}]"))
        })
    })
}

/// The version line: the host's and the plugin interface's.
pub fn version() -> String {
    format!(
        "{} (plugin-api {})",
        env!("CARGO_PKG_VERSION"),
        plugin_api::API_VERSION
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn resolved_defaults_are_the_config_defaults() {
        let cli = Cli::try_parse_from(["wshost", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve expected")
        };
        let config = args.settings.resolved().config(None, None);
        assert_eq!(format!("{config:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn the_command_line_overlays_what_is_under_it() {
        let cli = Cli::try_parse_from([
            "wshost",
            "serve",
            "--max-message-size",
            "64KiB",
            "--no-watch",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve expected")
        };
        let file = Settings {
            max_message_size: Some(5),
            max_frame_size: Some(7),
            no_watch: Some(false),
            ..Settings::default()
        };
        let s = args.settings.overlay(file).resolved();
        assert_eq!(s.get().max_message_size, Some(64 << 10));
        assert_eq!(s.get().max_frame_size, Some(7));
        assert_eq!(s.get().no_watch, Some(true));
        assert_eq!(
            s.get().ping_interval,
            Config::default().limits.ping_interval
        );
    }
}
