//! What every benchmark shares: server processes, /proc readings, client connections, payloads
//! that carry their send time, latency summaries.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};

pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

pub use test_support::pace::{now_ns, precise_timers, wait_until};
pub use test_support::{cargo, workspace_root};

/// `cargo build [--release] -p …` in the workspace.
pub fn build(release: bool, packages: &[&str]) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let mut cmd = cargo();
    cmd.current_dir(&root).arg("build");
    if release {
        cmd.arg("--release");
    }
    for p in packages {
        cmd.args(["-p", p]);
    }
    if !cmd.status()?.success() {
        bail!("cargo build {packages:?} failed");
    }
    Ok(root
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

/// A server process that prints `listening on ws://ADDR`; killed when dropped.
pub struct Server {
    pub name: String,
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `cmd` (stdout piped) and waits for its `listening on ws://` line.
    pub fn start(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().expect("piped");
        let addr = test_support::listening(stdout, |_| {})
            .with_context(|| format!("{name} exited before listening"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            addr,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// `wshost serve` arguments at the defaults: a free port, `plugins`, and no admin endpoint (its
/// default port would clash between hosts running side by side; it serves no traffic). Every
/// limit stays at its default: the load generator spreads its connections over source addresses
/// so that no address passes the per-address cap ([`source`]).
pub fn wshost_args(plugins: &Path, extra: &[&str]) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        "--plugins",
    ]
    .iter()
    .map(Into::into)
    .collect();
    args.push(plugins.into());
    args.extend(extra.iter().map(Into::into));
    args
}

/// A `wshost serve` command (see [`wshost_args`]), logging at its default level.
pub fn wshost(exe: &Path, plugins: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args(wshost_args(plugins, extra));
    cmd
}

/// How a command runs, for a report: program (file name only) and arguments, with temporary
/// paths shortened and the environment it sets in front.
pub fn describe(cmd: &Command) -> String {
    let short = |s: &std::ffi::OsStr| {
        let s = s.to_string_lossy();
        if s.starts_with('/') {
            std::path::Path::new(&*s)
                .file_name()
                .map_or_else(|| s.to_string(), |f| f.to_string_lossy().into_owned())
        } else {
            s.into_owned()
        }
    };
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    parts.push(short(cmd.get_program()));
    parts.extend(cmd.get_args().map(short));
    parts.join(" ")
}

/// Resident memory of process `pid`, in bytes.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// CPU time (user + system, all threads) process `pid` has used.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').context("bad stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[11].parse()?;
    let stime: u64 = fields[12].parse()?;
    Ok(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks_per_second(),
    ))
}

/// Resident memory of `pid` and its live children (a host and its plugin worker processes).
pub fn rss_tree(pid: u32) -> anyhow::Result<u64> {
    let mut total = rss(pid)?;
    for child in children(pid) {
        total += rss(child).unwrap_or_default();
    }
    Ok(total)
}

/// The live children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// CPU time of `pid` and its live children (a host and its plugin worker processes).
pub fn cpu_time_tree(pid: u32) -> anyhow::Result<Duration> {
    let mut total = cpu_time(pid)?;
    for child in children(pid) {
        // A child that just exited (a probe) has no CPU to add any more.
        total += cpu_time(child).unwrap_or_default();
    }
    Ok(total)
}

fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Pins this process (all its threads) to `cpu`.
pub fn pin_self(cpu: usize) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-c", "-p", &cpu.to_string()])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("taskset failed");
    }
    Ok(())
}

/// The `i`th client source address: 127.0.0.2, .3, …, a new one every 5,000 connections, so
/// that ~20k connections do not exhaust one address's ephemeral ports.
pub fn source(i: usize) -> Ipv4Addr {
    // 900 per address: under wshost's default cap per client address (1,000,
    // `--max-connections-per-ip`), with room for connections of a previous run still closing.
    let n = i / 900;
    Ipv4Addr::new(127, 0, (n / 250) as u8, 2 + (n % 250) as u8)
}

/// Opens a WebSocket to `url` from `source`, with a 4 KiB read buffer.
pub async fn connect(url: &str, source: Ipv4Addr) -> anyhow::Result<Ws> {
    let host = url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .context("a ws:// URL")?;
    let addr: SocketAddr = host.parse()?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .with_context(|| format!("handshake with {url}"))?;
    Ok(ws)
}

/// Message payloads of a fixed size whose first bytes carry a timestamp: 16 hex digits for
/// text, 8 little-endian bytes for binary.
#[derive(Debug, Clone)]
pub struct Payload {
    pub size: usize,
    pub binary: bool,
}

impl Payload {
    pub fn make(&self, ts: u64) -> Message {
        if self.binary {
            let mut v = vec![b'x'; self.size.max(8)];
            v[..8].copy_from_slice(&ts.to_le_bytes());
            Message::Binary(Bytes::from(v))
        } else {
            let mut s = format!("{ts:016x}");
            s.extend(std::iter::repeat_n('x', self.size.saturating_sub(16)));
            Message::text(s)
        }
    }

    /// The timestamp `make` put in a message (after `skip` bytes of a text prefix).
    pub fn stamp(msg: &Message, skip: usize) -> Option<u64> {
        match msg {
            Message::Binary(b) => Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?)),
            Message::Text(t) => u64::from_str_radix(t.as_str().get(skip..skip + 16)?, 16).ok(),
            _ => None,
        }
    }
}

/// A latency histogram in nanoseconds (1 µs to 60 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid bounds")
}

/// p50 / p99 / p99.9 in milliseconds.
pub fn quantiles_ms(h: &Histogram<u64>) -> (f64, f64, f64) {
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1e6;
    (q(0.5), q(0.99), q(0.999))
}

/// The median of `v` (which must not be empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
