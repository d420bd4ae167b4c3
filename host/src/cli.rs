//! The command line: `wshost serve`, `check`, `config`, `status`, `reload`, `new` (and the
//! hidden `probe`), every flag also read from a `WSHOST_*` environment variable, and the
//! parsers that bound every size and duration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::plugin::probe::Probe;
use crate::Config;

/// Environment variable for `--listen`.
pub const ENV_LISTEN: &str = "WSHOST_LISTEN";
/// Environment variable for `--plugins`.
pub const ENV_PLUGINS: &str = "WSHOST_PLUGINS";
/// Environment variable for `--admin-listen` (serve) and `--admin` (status, reload).
pub const ENV_ADMIN: &str = "WSHOST_ADMIN_LISTEN";
/// The admin endpoint's default address: loopback only.
pub use crate::admin::DEFAULT_ADMIN;

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
    pub admin: Option<crate::admin::AdminAddr>,
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

/// `wshost serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML config file: every setting below by its name, and `[plugin.NAME]` sections.
    /// Flags and environment variables override it.
    #[arg(long, env = "WSHOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port (the real address is printed).
    #[arg(long, env = ENV_LISTEN, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory of plugin files (`*.so`).
    #[arg(long, env = ENV_PLUGINS, default_value = "plugins")]
    pub plugins: PathBuf,
    /// Largest message accepted from a client, in bytes (close 1009 past it).
    #[arg(long, env = "WSHOST_MAX_MESSAGE_SIZE", value_parser = size_u64, default_value_t = crate::limits::DEFAULT_MAX_MESSAGE_SIZE)]
    pub max_message_size: u64,
    /// Largest frame accepted from a client, in bytes.
    #[arg(long, env = "WSHOST_MAX_FRAME_SIZE", value_parser = size_u64, default_value_t = crate::limits::DEFAULT_MAX_FRAME_SIZE)]
    pub max_frame_size: u64,
    /// Most bytes queued for sending to one connection.
    #[arg(long, env = "WSHOST_MAX_SEND_QUEUE", value_parser = size_u64, default_value_t = crate::limits::DEFAULT_MAX_SEND_QUEUE)]
    pub max_send_queue: u64,
    /// Bytes tungstenite reads per call, kept per connection for its lifetime (socket reads go
    /// through a 64 KiB buffer per thread whatever this is).
    #[arg(long, env = "WSHOST_READ_BUFFER_SIZE", value_parser = size, default_value_t = Config::default().read_buffer_size)]
    pub read_buffer_size: usize,
    /// Largest plain-request body, in bytes (413 past it).
    #[arg(long, env = "WSHOST_MAX_BODY_SIZE", value_parser = size, default_value_t = Config::default().max_body_size)]
    pub max_body_size: usize,
    /// How long a plain request's body may take (408 past it).
    #[arg(long, env = "WSHOST_BODY_TIMEOUT", default_value = "30s", value_parser = nonzero_duration)]
    pub body_timeout: Duration,
    /// How long a client may take to send its request head.
    #[arg(long, env = "WSHOST_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = nonzero_duration)]
    pub header_read_timeout: Duration,
    /// Log a warning when a plugin callback runs longer than this.
    #[arg(long, env = "WSHOST_SLOW_CALLBACK", default_value = "50ms", value_parser = duration)]
    pub slow_callback: Duration,
    /// How long to wait for the peer's close frame after sending ours.
    #[arg(long, env = "WSHOST_CLOSE_TIMEOUT", default_value = "5s", value_parser = nonzero_duration)]
    pub close_timeout: Duration,
    /// On shutdown, how long to wait for connections to close.
    #[arg(long, env = "WSHOST_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub shutdown_timeout: Duration,
    /// Interval of the host's pings to each connection; 0 disables them.
    #[arg(long, env = "WSHOST_PING_INTERVAL", default_value = "30s", value_parser = duration)]
    pub ping_interval: Duration,
    /// Drop a connection whose pong does not arrive within this time after a ping.
    #[arg(long, env = "WSHOST_PONG_TIMEOUT", default_value = "10s", value_parser = nonzero_duration)]
    pub pong_timeout: Duration,
    /// Close (1001) a connection without data messages either way for this long; 0 disables it.
    #[arg(long, env = "WSHOST_IDLE_TIMEOUT", default_value = "300s", value_parser = duration)]
    pub idle_timeout: Duration,
    /// Data messages per second a connection may send (burst as many); past it, close 1008.
    /// 0 disables the limit.
    #[arg(long, env = "WSHOST_MAX_MESSAGE_RATE", default_value_t = Config::default().max_message_rate)]
    pub max_message_rate: u32,
    /// A message must arrive whole within this time of its first byte (close 1008); 0 disables.
    #[arg(long, env = "WSHOST_MESSAGE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub message_timeout: Duration,
    /// Largest request head (request line and headers), in bytes; 431 past it.
    #[arg(long, env = "WSHOST_MAX_HEADER_SIZE", value_parser = size, default_value_t = Config::default().max_header_size)]
    pub max_header_size: usize,
    /// Most WebSocket connections at once; 503 past it. Default: the open-file limit less 512.
    #[arg(long, env = "WSHOST_MAX_CONNECTIONS", value_parser = size, default_value_t = Config::default().max_connections)]
    pub max_connections: usize,
    /// Most WebSocket connections from one client IP; 429 past it. 0 disables the cap.
    #[arg(long, env = "WSHOST_MAX_CONNECTIONS_PER_IP",
        default_value_t = Config::default().max_connections_per_ip)]
    pub max_connections_per_ip: usize,
    /// Bytes buffered across all connections (send queues, partly received messages); past it
    /// sends fail with QueueFull and incoming data that does not fit closes with 1013.
    #[arg(long, env = "WSHOST_MAX_BUFFERED_TOTAL",
        value_parser = size_u64, default_value_t = Config::default().max_buffered_total)]
    pub max_buffered_total: u64,
    /// An origin allowed to open WebSockets (repeatable; e.g. https://example.com). None set:
    /// every origin is allowed.
    #[arg(
        long = "allowed-origin",
        env = "WSHOST_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// Refuse upgrades that carry no Origin header (non-browser clients) with 403.
    #[arg(long, env = "WSHOST_REQUIRE_ORIGIN")]
    pub require_origin: bool,
    /// A reverse proxy (IP or CIDR, repeatable) whose Forwarded / X-Forwarded-For headers
    /// give the client's address.
    #[arg(
        long = "trusted-proxy",
        env = "WSHOST_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// PEM certificate chain: serve https/wss (with --tls-key).
    #[arg(long, env = "WSHOST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "WSHOST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Address of the admin endpoint (`wshost status`, `wshost reload`, `/metrics`): a
    /// loopback HOST:PORT, `unix:PATH` (a socket only this user can open), or `off`.
    #[arg(long, env = ENV_ADMIN, default_value = DEFAULT_ADMIN)]
    pub admin_listen: AdminListen,
    /// A file holding a token the admin endpoint requires as `Authorization: Bearer TOKEN`
    /// (all but /healthz and /readyz).
    #[arg(long, env = "WSHOST_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Do not watch the plugins directory (reload with SIGHUP or `wshost reload` instead).
    #[arg(long, env = "WSHOST_NO_WATCH")]
    pub no_watch: bool,
    /// Map plugins without loading them in a probe process first (faster, not crash-safe).
    #[arg(long, env = "WSHOST_NO_PROBE")]
    pub no_probe: bool,
    /// Where channels are shared: `memory` (this host only) or `redis://HOST:PORT/` (every host
    /// on that Redis with the same --bus-prefix).
    #[arg(long, env = "WSHOST_BUS", default_value = "memory")]
    pub bus: crate::bus::BusConfig,
    /// Redis channel names are PREFIX:PLUGIN:CHANNEL (with --bus redis://).
    #[arg(long, env = "WSHOST_BUS_PREFIX", default_value = "wshost")]
    pub bus_prefix: String,
    /// First wait before reconnecting to Redis; doubles up to --bus-reconnect-max.
    #[arg(long, env = "WSHOST_BUS_RECONNECT_MIN", default_value = "100ms", value_parser = nonzero_duration)]
    pub bus_reconnect_min: Duration,
    /// Longest wait between attempts to reconnect to Redis.
    #[arg(long, env = "WSHOST_BUS_RECONNECT_MAX", default_value = "5s", value_parser = nonzero_duration)]
    pub bus_reconnect_max: Duration,
    /// Publishes waiting to be written to Redis; past it they are dropped (and counted).
    #[arg(long, env = "WSHOST_BUS_QUEUE", value_parser = size, default_value_t = 65_536)]
    pub bus_queue: usize,
    /// How long the probe process may take to load a plugin.
    #[arg(long, env = "WSHOST_PROBE_TIMEOUT", default_value = "10s", value_parser = nonzero_duration)]
    pub probe_timeout: Duration,
    /// Plugin files larger than this many bytes are refused without being read.
    #[arg(long, env = "WSHOST_MAX_PLUGIN_SIZE", value_parser = size_u64,
        default_value_t = crate::plugin::registry::DEFAULT_MAX_PLUGIN_SIZE)]
    pub max_plugin_size: u64,
    /// Worker threads of each plugin's own runtime (default: the machine's cores, at least 2):
    /// how many of a plugin's calls may run or block at once. `[plugin.NAME] workers` sets one
    /// plugin's.
    #[arg(long, env = "WSHOST_PLUGIN_WORKERS", value_parser = size,
        default_value_t = crate::plugin::exec::default_workers())]
    pub plugin_workers: usize,
    /// How long an upgrade or plain request waits for its plugin's decision (deferred ones
    /// included); past it the client gets 503.
    #[arg(long, env = "WSHOST_DECISION_TIMEOUT", default_value = "10s", value_parser = nonzero_duration)]
    pub decision_timeout: Duration,
    /// Where plugins run by default: `inline` (mapped in the host: fastest, but a crash in a
    /// plugin ends the host) or `process` (each plugin in a worker process of its own: a crash,
    /// hang or leak ends only that worker, which restarts). `[plugin.NAME] isolation` sets
    /// one plugin's.
    #[arg(long, env = "WSHOST_ISOLATION", default_value = "inline",
        value_parser = ["inline", "process"])]
    pub isolation: String,
    /// In process isolation: a plugin call (callback, upgrade, request) running longer than this
    /// ends its worker, which restarts; "0s" never. `[plugin.NAME] callback_timeout` sets one
    /// plugin's.
    #[arg(long, env = "WSHOST_CALLBACK_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub callback_timeout: Duration,
    /// After a reload replaced a plugin, close the old generation's remaining connections with
    /// 1012 (Service Restart) this long after, so clients reconnect to the new build; "0s"
    /// never (they stay on the old build until they close).
    #[arg(long, env = "WSHOST_REPLACED_GRACE", default_value = "0s", value_parser = duration)]
    pub replaced_grace: Duration,
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

impl ServeArgs {
    /// The host configuration these flags describe; `exe` is the binary to probe plugins with.
    pub fn config(&self, exe: Option<PathBuf>) -> Config {
        Config {
            plugins_dir: self.plugins.clone(),
            max_body_size: self.max_body_size,
            body_timeout: self.body_timeout,
            header_read_timeout: self.header_read_timeout,
            limits: crate::limits::ConnLimits {
                max_message_size: Some(self.max_message_size),
                max_frame_size: Some(self.max_frame_size),
                max_send_queue: Some(self.max_send_queue),
                ping_interval: Some(self.ping_interval),
                pong_timeout: Some(self.pong_timeout),
                idle_timeout: Some(self.idle_timeout),
            },
            read_buffer_size: self.read_buffer_size.max(64),
            slow_callback: self.slow_callback,
            close_timeout: self.close_timeout,
            shutdown_timeout: self.shutdown_timeout,
            max_message_rate: self.max_message_rate,
            message_timeout: self.message_timeout,
            max_header_size: self.max_header_size,
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_buffered_total: self.max_buffered_total,
            allowed_origins: self.allowed_origins.clone(),
            require_origin: self.require_origin,
            trusted_proxies: self.trusted_proxies.clone(),
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
            watch: !self.no_watch,
            bus: match &self.bus {
                crate::bus::BusConfig::Memory => crate::bus::BusConfig::Memory,
                crate::bus::BusConfig::Redis(r) => {
                    crate::bus::BusConfig::Redis(crate::bus::RedisConfig {
                        url: r.url.clone(),
                        prefix: self.bus_prefix.clone(),
                        reconnect_min: self.bus_reconnect_min,
                        reconnect_max: self.bus_reconnect_max,
                        queue: self.bus_queue,
                    })
                }
            },
            config_file: self.config.clone(),
            max_plugin_size: self.max_plugin_size,
            plugin_workers: self.plugin_workers,
            decision_timeout: self.decision_timeout,
            replaced_grace: self.replaced_grace,
            isolation: crate::plugin::isolate::IsolationConfig {
                process: self.isolation == "process",
                exe: exe.clone(),
                callback_timeout: self.callback_timeout,
                start_timeout: self.probe_timeout,
            },
            probe: exe.filter(|_| !self.no_probe).map(|exe| Probe {
                exe,
                timeout: self.probe_timeout,
            }),
            ..Config::default()
        }
    }
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

pub use crate::units::{duration, nonzero_duration, size, size_u64};

/// Reads only the `[plugin.NAME]` sections of `file` (after checking all of it), as a reload
/// does.
pub fn load_plugin_sections(
    file: &std::path::Path,
) -> Result<
    std::collections::BTreeMap<String, crate::config_file::PluginSection>,
    crate::config_file::ConfigError,
> {
    use clap::CommandFactory as _;
    let cli = Cli::command();
    let serve = cli.find_subcommand("serve").expect("serve is a subcommand");
    crate::config_file::load(file, serve).map(|f| f.plugins)
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
    fn serve_defaults_match_config_defaults() {
        let cli = Cli::try_parse_from(["wshost", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve expected")
        };
        let (a, b) = (args.config(None), Config::default());
        assert_eq!(a.body_timeout, b.body_timeout);
        assert_eq!(a.header_read_timeout, b.header_read_timeout);
        assert_eq!(a.slow_callback, b.slow_callback);
        assert_eq!(a.close_timeout, b.close_timeout);
        assert_eq!(a.shutdown_timeout, b.shutdown_timeout);
        assert_eq!(a.watch, b.watch);
        assert_eq!(a.limits, b.limits);
        assert_eq!(a.isolation.process, b.isolation.process);
        assert_eq!(a.isolation.callback_timeout, b.isolation.callback_timeout);
        assert_eq!(a.isolation.start_timeout, b.isolation.start_timeout);
        assert_eq!(a.replaced_grace, b.replaced_grace);
    }
}
