//! `loadgen suite`: the side-by-side benchmark. Builds the servers, pins itself and them to
//! different CPUs, and runs every workload against every server interleaved (A B C D, then the
//! next round), reading each server's CPU time from /proc. Prints a Markdown table and writes
//! it, with an SVG plot, to the output directory.
//!
//! Servers: wshost with the `echo` plugin, inline and process-isolated (`--isolation process`:
//! its CPU is the host's and the worker's); `bare-echo` (tokio-tungstenite alone, batched writes:
//! the ceiling of our own stack); with `--peers`, Node.js `ws` and Jetty 9.4.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::common::{
    self, build, cpu_time, cpu_time_tree, median, quantiles_ms, workspace_root, Payload, Server,
};
use crate::{echo, fanout, idle};

#[derive(Debug, clap::Args)]
pub struct SuiteArgs {
    /// Seconds-long run against wshost (inline and process-isolated) and the bare server only,
    /// with debug builds: checks that every mode works, judges nothing (CI runs this).
    #[arg(long)]
    pub smoke: bool,
    /// Also run the Node.js ws and Jetty 9.4 peers (needs node/npm and Debian's
    /// libjetty9-java, libjetty9-extra-java).
    #[arg(long)]
    pub peers: bool,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Measuring window of each run, after a 1 s warm-up.
    #[arg(long, default_value = "4s", value_parser = humantime_secs)]
    pub window: Duration,
    /// Connections for the echo workloads.
    #[arg(long, default_value_t = 50)]
    pub conns: usize,
    /// Subscribers for the fan-out workload.
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// Idle-connection counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "10000,19000")]
    pub idle: Vec<usize>,
    /// Where to write results.md and results.svg.
    #[arg(long, default_value = "docs/bench")]
    pub out: PathBuf,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let secs = s.strip_suffix("ms").map_or_else(
        || s.trim_end_matches('s').parse::<f64>(),
        |ms| ms.parse::<f64>().map(|v| v / 1000.0),
    );
    secs.map(Duration::from_secs_f64)
        .map_err(|e| format!("`{s}`: {e} (e.g. 4s, 300ms)"))
}

/// One closed-loop echo workload.
#[derive(Debug, Clone)]
struct Workload {
    name: &'static str,
    payload: Payload,
    inflight: usize,
}

fn workloads() -> Vec<Workload> {
    let w = |name, size, binary, inflight| Workload {
        name,
        payload: Payload { size, binary },
        inflight,
    };
    vec![
        w("echo 32 B text", 32, false, 8),
        w("echo 32 B binary", 32, true, 8),
        w("echo 16 KiB text", 16 << 10, false, 2),
        w("echo 16 KiB binary", 16 << 10, true, 2),
    ]
}

/// Measurements of one server in one workload, one per round.
#[derive(Debug, Default, Clone)]
struct Samples {
    rate: Vec<f64>,
    per_cpu: Vec<f64>,
    ratio: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
}

struct Servers {
    list: Vec<Server>,
    /// Where the built binaries are.
    dir: PathBuf,
    /// Keeps the plugins directory alive.
    _plugins: tempfile::TempDir,
}

const BARE: &str = "bare tokio-tungstenite";
const WSHOST: &str = "wshost + echo plugin";
const WSHOST_PROCESS: &str = "wshost + echo, --isolation process";
const NODE: &str = "Node.js ws 8";
const JETTY: &str = "Jetty 9.4";

fn taskset(cpu: Option<usize>, program: &str) -> Command {
    match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string(), program]);
            c
        }
        None => Command::new(program),
    }
}

fn start_servers(args: &SuiteArgs, cpu: Option<usize>) -> anyhow::Result<Servers> {
    let release = !args.smoke;
    let dir = build(release, &["wshost", "echo", "pubsub", "bare-echo"])?;
    let plugins = tempfile::tempdir()?;
    for lib in ["libecho.so", "libpubsub.so"] {
        std::fs::copy(dir.join(lib), plugins.path().join(lib))?;
    }
    let mut servers = Servers {
        list: Vec::new(),
        dir,
        _plugins: plugins,
    };
    let mut kinds = vec![WSHOST, WSHOST_PROCESS, BARE];
    if args.peers {
        kinds.extend([NODE, JETTY]);
    }
    for kind in kinds {
        let server = servers.spawn(kind, cpu)?;
        servers.list.push(server);
    }
    Ok(servers)
}

impl Servers {
    /// Starts a server of `kind` (one of the names above) pinned to `cpu`.
    fn spawn(&self, kind: &str, cpu: Option<usize>) -> anyhow::Result<Server> {
        match kind {
            WSHOST => {
                let mut cmd = taskset(cpu, &self.dir.join("wshost").to_string_lossy());
                cmd.args(common::wshost_args(
                    self._plugins.path(),
                    &["--max-connections", "20000"],
                ))
                .env("RUST_LOG", "warn");
                Server::start(WSHOST, cmd)
            }
            WSHOST_PROCESS => {
                let mut cmd = taskset(cpu, &self.dir.join("wshost").to_string_lossy());
                cmd.args(common::wshost_args(
                    self._plugins.path(),
                    &["--max-connections", "20000", "--isolation", "process"],
                ))
                .env("RUST_LOG", "warn");
                Server::start(WSHOST_PROCESS, cmd)
            }
            BARE => Server::start(
                BARE,
                taskset(cpu, &self.dir.join("bare-echo").to_string_lossy()),
            ),
            NODE => node(cpu),
            _ => jetty(cpu),
        }
    }
}

fn node(cpu: Option<usize>) -> anyhow::Result<Server> {
    let dir = workspace_root().join("tests/loadgen/peers/node");
    if !dir.join("node_modules/ws").exists() {
        let ok = Command::new("npm")
            .args(["ci", "--silent", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .context("npm (Node.js) is needed for --peers")?
            .success();
        if !ok {
            bail!("npm ci in {} failed", dir.display());
        }
    }
    let mut cmd = taskset(cpu, "node");
    cmd.arg(dir.join("echo.mjs"));
    Server::start(NODE, cmd)
}

fn jetty(cpu: Option<usize>) -> anyhow::Result<Server> {
    let jars: Vec<PathBuf> = std::fs::read_dir("/usr/share/java")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            // Debian ships each jar under a versioned name and an unversioned link.
            name.starts_with("jetty9-")
                && name.ends_with(".jar")
                && !name
                    .trim_end_matches(".jar")
                    .ends_with(|c: char| c.is_ascii_digit())
        })
        .chain([PathBuf::from("/usr/share/java/servlet-api.jar")])
        .collect();
    if !jars
        .iter()
        .any(|j| j.ends_with("jetty9-websocket-server.jar"))
    {
        bail!("Jetty 9.4 not found: apt-get install libjetty9-java libjetty9-extra-java");
    }
    let classpath = std::env::join_paths(&jars)?;
    let out = workspace_root().join("target/loadgen/jetty");
    std::fs::create_dir_all(&out)?;
    let ok = Command::new("javac")
        .arg("-d")
        .arg(&out)
        .arg("-cp")
        .arg(&classpath)
        .arg(workspace_root().join("tests/loadgen/peers/jetty/EchoServer.java"))
        .status()
        .context("javac is needed for --peers")?
        .success();
    if !ok {
        bail!("compiling the Jetty echo server failed");
    }
    let mut cp = std::ffi::OsString::from(&out);
    cp.push(":");
    cp.push(&classpath);
    let mut cmd = taskset(cpu, "java");
    cmd.arg("-cp").arg(cp).arg("EchoServer");
    Server::start(JETTY, cmd)
}

async fn run_echo(
    server: &Server,
    w: &Workload,
    args: &SuiteArgs,
    warmup: Duration,
) -> anyhow::Result<(echo::Outcome, f64)> {
    let conns = echo::open(&server.url("/echo"), args.conns).await?;
    let cpu0 = cpu_time_tree(server.pid())?;
    let t0 = std::time::Instant::now();
    let outcome = echo::closed(conns, w.inflight, &w.payload, warmup, args.window).await?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time_tree(server.pid())? - cpu0).as_secs_f64();
    // Messages per CPU-second of the server, over the whole run (warm-up included on both
    // sides: its messages are the run's rate times its length).
    let per_cpu = outcome.rate() * wall / cpu.max(0.01);
    Ok((outcome, per_cpu))
}

/// Runs the suite and writes its report.
pub async fn run(args: SuiteArgs) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = cpus >= 2;
    if pin {
        common::pin_self(0)?;
    }
    let servers = start_servers(&args, pin.then_some(1))?;
    let warmup = if args.smoke {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    };
    let rounds = if args.smoke { 1 } else { args.rounds };
    let mut report = String::new();
    writeln!(
        report,
        "Run {} on {cpus} CPUs{}: {rounds} interleaved rounds, {:.1} s windows after {:.1} s of warm-up.\n",
        today(),
        if pin {
            " (generator on CPU 0, server on CPU 1)"
        } else {
            ""
        },
        args.window.as_secs_f64(),
        warmup.as_secs_f64()
    )?;

    // Closed-loop echo throughput.
    let loads = workloads();
    let mut results: BTreeMap<(usize, usize), Samples> = BTreeMap::new();
    for round in 0..rounds {
        for (wi, w) in loads.iter().enumerate() {
            let mut bare_per_cpu = None;
            // Rotate the order so that no server always runs first.
            let n = servers.list.len();
            let mut round_results = Vec::new();
            for k in 0..n {
                let si = (k + round) % n;
                let server = &servers.list[si];
                let (o, per_cpu) = run_echo(server, w, &args, warmup)
                    .await
                    .with_context(|| format!("{} on {}", w.name, server.name))?;
                eprintln!(
                    "round {round} {:>20} {:>24}: {:>9.0} msgs/s {:>9.0} per CPU",
                    w.name,
                    server.name,
                    o.rate(),
                    per_cpu
                );
                if server.name == BARE {
                    bare_per_cpu = Some(per_cpu);
                }
                round_results.push((si, o, per_cpu));
            }
            let bare = bare_per_cpu.context("the bare server ran")?;
            for (si, o, per_cpu) in round_results {
                let s = results.entry((wi, si)).or_default();
                let (p50, p99, p999) = quantiles_ms(&o.latency);
                s.rate.push(o.rate());
                s.per_cpu.push(per_cpu);
                s.ratio.push(per_cpu / bare);
                s.p50.push(p50);
                s.p99.push(p99);
                s.p999.push(p999);
            }
        }
    }
    writeln!(
        report,
        "### Echo throughput (closed loop, {} connections)\n",
        args.conns
    )?;
    writeln!(report, "| workload | server | msgs/s | msgs/s per server CPU | × bare (per CPU) | RTT p50 ms | p99 ms | p99.9 ms |")?;
    writeln!(report, "| --- | --- | --- | --- | --- | --- | --- | --- |")?;
    for (wi, w) in loads.iter().enumerate() {
        for (si, server) in servers.list.iter().enumerate() {
            let s = &results[&(wi, si)];
            writeln!(
                report,
                "| {} ({} in flight each) | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
                w.name,
                w.inflight,
                server.name,
                median(&s.rate),
                median(&s.per_cpu),
                median(&s.ratio),
                median(&s.p50),
                median(&s.p99),
                median(&s.p999)
            )?;
        }
    }

    // Open-loop latency at a fixed rate.
    let rate = if args.smoke { 1_000 } else { 10_000 };
    let mut open: Vec<Samples> = vec![Samples::default(); servers.list.len()];
    let mut lost = vec![0u64; servers.list.len()];
    for round in 0..rounds {
        for k in 0..servers.list.len() {
            let si = (k + round) % servers.list.len();
            let server = &servers.list[si];
            let conns = echo::open(&server.url("/echo"), 100).await?;
            let payload = Payload {
                size: 32,
                binary: false,
            };
            let o = echo::open_loop(conns, rate, &payload, warmup, args.window).await?;
            let (p50, p99, p999) = quantiles_ms(&o.latency);
            eprintln!(
                "round {round} open loop {rate}/s {:>24}: p50 {p50:.3} p99 {p99:.3} p99.9 {p999:.3} ms, {} lost",
                server.name, o.lost
            );
            open[si].rate.push(o.rate());
            open[si].p50.push(p50);
            open[si].p99.push(p99);
            open[si].p999.push(p999);
            lost[si] += o.lost;
        }
    }
    writeln!(
        report,
        "\n### Latency at a fixed rate (open loop, {rate} msgs/s of 32 B text over 100 connections, from the intended send time)\n"
    )?;
    writeln!(
        report,
        "| server | msgs/s | p50 ms | p99 ms | p99.9 ms | unanswered |"
    )?;
    writeln!(report, "| --- | --- | --- | --- | --- | --- |")?;
    for (si, server) in servers.list.iter().enumerate() {
        let s = &open[si];
        writeln!(
            report,
            "| {} | {:.0} | {:.3} | {:.3} | {:.3} | {} |",
            server.name,
            median(&s.rate),
            median(&s.p50),
            median(&s.p99),
            median(&s.p999),
            lost[si]
        )?;
    }

    // Idle connections.
    let counts: Vec<usize> = if args.smoke {
        vec![200]
    } else {
        args.idle.clone()
    };
    writeln!(
        report,
        "\n### Memory per idle connection (a fresh server process for each line)\n"
    )?;
    writeln!(report, "{}", idle::HEADER)?;
    for &n in &counts {
        for kind in servers
            .list
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()
        {
            let server = servers.spawn(&kind, pin.then_some(1))?;
            let (o, held) = idle::measure(&server.url("/echo"), server.pid(), n).await?;
            eprintln!("idle {}", o.row(&server.name));
            writeln!(report, "{}", o.row(&server.name))?;
            drop(held);
            drop(server);
        }
    }

    // Fan-out through wshost's channels.
    let wshost = servers
        .list
        .iter()
        .find(|s| s.name == WSHOST)
        .context("wshost runs")?;
    let subs = if args.smoke { 100 } else { args.subscribers };
    let fan_rate = 10;
    let fan = FanOut {
        subs,
        rate: fan_rate,
        rounds,
        warmup,
        window: args.window,
    };
    let (one, delivered) = fan
        .rounds(
            &[wshost.url("/pubsub/bench")],
            &wshost.url("/pubsub/bench?subscribe=0"),
            &[wshost.pid()],
            "one host",
        )
        .await?;
    writeln!(report, "\n### Broadcast fan-out (`pubsub` plugin, one publisher at {fan_rate} msgs/s of 32 B, {subs} subscribers, one host)\n")?;
    fanout_table(&mut report, &one, delivered)?;

    // The same fan-out across two hosts that share a Redis: subscribers split between them,
    // the publisher on the first.
    let pinned: Vec<String> = if pin {
        vec!["taskset".into(), "-c".into(), "1".into()]
    } else {
        Vec::new()
    };
    let prefix: Vec<&str> = pinned.iter().map(String::as_str).collect();
    match test_support::Redis::available().then(|| test_support::Redis::start_under(&prefix)) {
        None => writeln!(
            report,
            "\n(redis-server not installed: no fan-out across hosts)"
        )?,
        Some(redis) => {
            let mut hosts = Vec::new();
            for _ in 0..2 {
                let exe = servers.dir.join("wshost");
                let mut cmd = taskset(pin.then_some(1), &exe.to_string_lossy());
                cmd.args(common::wshost_args(
                    servers._plugins.path(),
                    &["--bus", &redis.url(), "--max-connections", "20000"],
                ))
                .env("RUST_LOG", "warn");
                hosts.push(Server::start("wshost --bus redis", cmd)?);
            }
            let urls: Vec<String> = hosts.iter().map(|h| h.url("/pubsub/bench")).collect();
            let pids: Vec<u32> = hosts.iter().map(Server::pid).collect();
            let (two, delivered2) = fan
                .rounds(
                    &urls,
                    &hosts[0].url("/pubsub/bench?subscribe=0"),
                    &pids,
                    "two hosts over Redis",
                )
                .await?;
            writeln!(report, "\n### The same across two hosts through Redis (`--bus redis://`, half the subscribers on each, publisher on the first; CPU of both hosts)\n")?;
            fanout_table(&mut report, &two, delivered2)?;
            if delivered2.0 == 0 {
                bail!("the fan-out across hosts delivered nothing");
            }
        }
    }

    println!("{report}");
    if !args.smoke {
        std::fs::create_dir_all(&args.out)?;
        std::fs::write(args.out.join("results.md"), &report)?;
        let names: Vec<&str> = servers.list.iter().map(|s| s.name.as_str()).collect();
        let values: Vec<Vec<f64>> = (0..loads.len())
            .map(|wi| {
                (0..names.len())
                    .map(|si| median(&results[&(wi, si)].per_cpu))
                    .collect()
            })
            .collect();
        let labels: Vec<&str> = loads.iter().map(|w| w.name).collect();
        crate::plot::bars(&args.out.join("results.svg"), &labels, &names, &values)?;
        eprintln!("wrote {}", args.out.join("results.md").display());
    } else {
        check_smoke(&results, &open, delivered)?;
    }
    Ok(())
}

/// One fan-out setup, measured the same way on one host and across hosts.
struct FanOut {
    subs: usize,
    rate: u64,
    rounds: usize,
    warmup: Duration,
    window: Duration,
}

impl FanOut {
    /// Runs the rounds: subscribers spread over `sub_urls`, the publisher on `pub_url`; `pids`
    /// are the server processes whose CPU time is counted. Returns the samples (`per_cpu` holds
    /// how busy the servers were) and (delivered, expected).
    async fn rounds(
        &self,
        sub_urls: &[String],
        pub_url: &str,
        pids: &[u32],
        label: &str,
    ) -> anyhow::Result<(Samples, (u64, u64))> {
        let cpu = |pids: &[u32]| -> anyhow::Result<f64> {
            pids.iter().map(|p| Ok(cpu_time(*p)?.as_secs_f64())).sum()
        };
        let payload = Payload {
            size: 32,
            binary: false,
        };
        let mut samples = Samples::default();
        let mut delivered = (0u64, 0u64);
        for _ in 0..self.rounds {
            let members = fanout::subscribers(sub_urls, self.subs).await?;
            let publisher = common::connect(pub_url, common::source(0)).await?;
            let (cpu0, t0) = (cpu(pids)?, std::time::Instant::now());
            let o = fanout::run(
                publisher,
                members,
                self.rate,
                &payload,
                self.warmup,
                self.window,
            )
            .await?;
            let busy = (cpu(pids)? - cpu0) / t0.elapsed().as_secs_f64();
            let (p50, p99, p999) = quantiles_ms(&o.latency);
            eprintln!(
                "fan-out, {label}, {} subscribers: {:.0} deliveries/s, p99 {p99:.2} ms, {} of {} delivered, server CPU {:.0}%",
                self.subs,
                o.rate(),
                o.deliveries,
                o.expected,
                busy * 100.0
            );
            samples.rate.push(o.rate());
            samples.per_cpu.push(busy);
            samples.p50.push(p50);
            samples.p99.push(p99);
            samples.p999.push(p999);
            delivered.0 += o.deliveries;
            delivered.1 += o.expected;
        }
        Ok((samples, delivered))
    }
}

/// The Markdown table of a fan-out setup.
fn fanout_table(report: &mut String, s: &Samples, delivered: (u64, u64)) -> std::fmt::Result {
    writeln!(
        report,
        "| deliveries/s | p50 ms | p99 ms | p99.9 ms | delivered | server CPU busy |"
    )?;
    writeln!(report, "| --- | --- | --- | --- | --- | --- |")?;
    writeln!(
        report,
        "| {:.0} | {:.2} | {:.2} | {:.2} | {} of {} | {:.0}% |",
        median(&s.rate),
        median(&s.p50),
        median(&s.p99),
        median(&s.p999),
        delivered.0,
        delivered.1,
        median(&s.per_cpu) * 100.0
    )
}

/// The smoke run judges no speed, only that every mode measured something.
fn check_smoke(
    results: &BTreeMap<(usize, usize), Samples>,
    open: &[Samples],
    delivered: (u64, u64),
) -> anyhow::Result<()> {
    if results.values().any(|s| s.rate.iter().any(|r| *r <= 0.0)) {
        bail!("an echo run measured no messages");
    }
    if open.iter().any(|s| s.rate.iter().any(|r| *r <= 0.0)) {
        bail!("an open-loop run measured no messages");
    }
    if delivered.0 == 0 {
        bail!("the fan-out delivered nothing");
    }
    Ok(())
}

fn today() -> String {
    Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "today".into(), |s| s.trim().to_owned())
}
