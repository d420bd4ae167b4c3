//! `loadgen`: benchmarks for wshost, run against release builds on this machine.
//!
//! `cargo run --release -p loadgen -- reload` measures how long a replaced plugin takes to serve:
//! from the `rename` of a new build into the plugins directory to the first new connection that
//! the new build answers, with and without the probe process, interleaved.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Time from renaming a new plugin build into place to it serving a new connection.
    Reload {
        /// Swaps per configuration.
        #[arg(long, default_value_t = 30)]
        rounds: usize,
    },
    /// Server memory per idle connection: open N echo connections, exchange one message on
    /// each, and compare the host's resident memory before and after.
    Idle {
        /// Connections to open (at most ~19,000 here: 20,000 open files per process).
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/loadgen is two levels down")
        .to_owned()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the release host and two builds of the `variant` plugin tagged A and B (in their own
/// target dir, so that `target/release` keeps only the example plugins).
fn build() -> anyhow::Result<(PathBuf, Vec<u8>, Vec<u8>)> {
    let root = workspace_root();
    let target = root.join("target");
    let status = cargo()
        .current_dir(&root)
        .args(["build", "--release", "-p", "wshost"])
        .status()?;
    if !status.success() {
        bail!("building wshost failed");
    }
    let mut builds = Vec::new();
    for tag in ["A", "B"] {
        let status = cargo()
            .current_dir(&root)
            .args(["build", "--release", "-p", "variant", "--target-dir"])
            .arg(target.join("loadgen"))
            .env("WSHOST_VARIANT_NAME", "bench")
            .env("WSHOST_VARIANT_ROUTE", "/bench")
            .env("WSHOST_VARIANT_TAG", tag)
            .status()?;
        if !status.success() {
            bail!("building the variant plugin failed");
        }
        builds.push(std::fs::read(target.join("loadgen/release/libvariant.so"))?);
    }
    let b = builds.pop().expect("two builds");
    let a = builds.pop().expect("two builds");
    Ok((target.join("release/wshost"), a, b))
}

struct Host {
    child: Child,
    addr: String,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(exe: &Path, plugins: &Path, extra: &[&str]) -> anyhow::Result<Host> {
    let mut child = Command::new(exe)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--plugins",
        ])
        .arg(plugins)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().context("wshost exited before listening")??;
        if let Some(a) = line.strip_prefix("listening on ws://") {
            break a.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(Host { child, addr })
}

fn install(dir: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = dir.join(".libbench.so.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join("libbench.so"))?;
    Ok(())
}

/// Which build answers a new connection right now, if any.
async fn served_by(addr: &str) -> Option<String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/bench"))
        .await
        .ok()?;
    ws.send(Message::text("q")).await.ok()?;
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .ok()??
        .ok()?;
    let _ = ws.close(None).await;
    reply
        .into_text()
        .ok()
        .and_then(|t| t.as_str().split(':').next().map(str::to_owned))
}

/// One swap: rename `bytes` (tagged `tag`) into place and wait until a new connection gets it.
async fn swap(addr: &str, dir: &Path, bytes: &[u8], tag: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    install(dir, bytes)?;
    loop {
        if served_by(addr).await.as_deref() == Some(tag) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the new build never served");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

fn summary(name: &str, mut samples: Vec<Duration>) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let q = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    format!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
        samples.len(),
        ms(q(0.5)),
        ms(q(0.1)),
        ms(q(0.9)),
        ms(samples[samples.len() - 1])
    )
}

async fn reload(rounds: usize) -> anyhow::Result<()> {
    let (exe, a, b) = build()?;
    let configs: [(&str, &[&str]); 2] = [
        ("with probe (default)", &[]),
        ("--no-probe", &["--no-probe"]),
    ];
    let mut hosts = Vec::new();
    for (name, extra) in configs {
        let dir = tempfile::tempdir()?;
        install(dir.path(), &a)?;
        let host = start(&exe, dir.path(), extra)?;
        hosts.push((name, host, dir, Vec::new()));
    }
    // Interleave the configurations so that machine noise hits both alike.
    for round in 0..rounds {
        let (bytes, tag) = if round % 2 == 0 { (&b, "B") } else { (&a, "A") };
        for (_, host, dir, samples) in hosts.iter_mut() {
            samples.push(swap(&host.addr, dir.path(), bytes, tag).await?);
        }
    }
    println!("| reload, rename to serving | swaps | median ms | p10 ms | p90 ms | max ms |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, _, _, samples) in hosts {
        println!("{}", summary(name, samples));
    }
    println!("\n(both include the 100 ms debounce of the directory watcher)");
    Ok(())
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// One echo connection from source address `127.0.0.X`, checked with one message.
async fn open_echo(addr: &str, source: std::net::Ipv4Addr) -> anyhow::Result<impl Sized> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from((source, 0)))?;
    let stream = socket.connect(addr.parse()?).await?;
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{addr}/echo"),
        stream,
        Some(config),
    )
    .await?;
    ws.send(Message::text("x")).await?;
    match ws.next().await {
        Some(Ok(Message::Text(_))) => Ok(ws),
        other => bail!("no echo: {other:?}"),
    }
}

async fn idle(conns: usize) -> anyhow::Result<()> {
    let root = workspace_root();
    let status = cargo()
        .current_dir(&root)
        .args(["build", "--release", "-p", "wshost", "-p", "echo"])
        .status()?;
    if !status.success() {
        bail!("building wshost and echo failed");
    }
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        root.join("target/release/libecho.so"),
        dir.path().join("libecho.so"),
    )?;
    let limit = (conns + 100).to_string();
    let host = start(
        &root.join("target/release/wshost"),
        dir.path(),
        &["--max-connections", &limit, "--max-connections-per-ip", "0"],
    )?;
    let pid = host.child.id();
    // Warm up: one connection, so lazily allocated runtime state is in the baseline.
    let warm = open_echo(&host.addr, std::net::Ipv4Addr::new(127, 0, 0, 1)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss(pid)?;
    let mut held = Vec::with_capacity(conns);
    for i in 0..conns {
        // 127.0.0.2, .3, ...: at most 5,000 connections per source address.
        let source =
            std::net::Ipv4Addr::new(127, 0, (i / 5000 / 250) as u8, 2 + (i / 5000 % 250) as u8);
        held.push(open_echo(&host.addr, source).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss(pid)?;
    let per = (after.saturating_sub(before)) as f64 / conns as f64;
    println!("| idle connections | host RSS before | after | per connection |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| {conns} | {:.1} MiB | {:.1} MiB | {:.0} bytes ({:.2} KiB) |",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        per,
        per / 1024.0
    );
    drop((held, warm));
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Reload { rounds } => reload(rounds).await,
        Bench::Idle { conns } => idle(conns).await,
    }
}
