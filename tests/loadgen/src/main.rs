//! `loadgen`: benchmarks for wshost, run against builds on this machine.
//!
//! - `suite`: the side-by-side benchmark (wshost, a bare tokio-tungstenite server, and with
//!   `--peers` Node.js ws and Jetty 9.4): echo throughput, latency at a fixed rate, memory per
//!   idle connection, broadcast fan-out. `--smoke` is the seconds-long check CI runs.
//! - `echo`, `rate`, `idle`, `fanout`: one workload against a server already running.
//! - `reload`: how long a replaced plugin takes to serve.

use std::time::Duration;

use clap::{Parser, Subcommand};

mod common;
mod echo;
mod fanout;
mod idle;
mod plot;
mod reload;
mod suite;

use common::{quantiles_ms, Payload};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, clap::Args)]
struct Load {
    /// The server's echo endpoint, e.g. ws://127.0.0.1:8080/echo.
    #[arg(long)]
    url: String,
    /// Connections.
    #[arg(long, default_value_t = 50)]
    conns: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Binary messages instead of text.
    #[arg(long)]
    binary: bool,
    /// Measuring window (after a 1 s warm-up), in seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
}

impl Load {
    /// The connections, the payload and the measuring window these flags describe.
    async fn open(&self) -> anyhow::Result<(Vec<common::Ws>, Payload, Duration)> {
        let conns = echo::open(&self.url, self.conns).await?;
        let payload = Payload {
            size: self.size,
            binary: self.binary,
        };
        Ok((conns, payload, Duration::from_secs_f64(self.seconds)))
    }
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The side-by-side benchmark; writes docs/bench/results.{md,svg}.
    Suite(suite::SuiteArgs),
    /// Closed-loop echo against a running server: msgs/s and round-trip quantiles.
    Echo {
        #[command(flatten)]
        load: Load,
        /// Messages in flight per connection.
        #[arg(long, default_value_t = 8)]
        inflight: usize,
    },
    /// Open-loop echo at a fixed total rate against a running server: latency quantiles from
    /// each message's intended send time.
    Rate {
        #[command(flatten)]
        load: Load,
        /// Messages per second, in total.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
    },
    /// Memory per idle connection of a running echo server.
    Idle {
        /// The server's echo endpoint.
        #[arg(long)]
        url: String,
        /// The server's process id (for its RSS).
        #[arg(long)]
        pid: u32,
        /// Connections to open (at most ~19,900 here: 20,000 open files per process).
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// Keep the connections open until interrupted (for profiling the server).
        #[arg(long)]
        hold: bool,
        /// Go on reading the server's memory each second for 40 s after the first reading, and
        /// report the lowest and highest (an allocator returns freed pages over seconds).
        #[arg(long)]
        later: bool,
    },
    /// One publisher, N subscribers of the `pubsub` plugin on running hosts.
    Fanout {
        /// Where the publisher connects, e.g. ws://127.0.0.1:8080/pubsub/bench?subscribe=0.
        #[arg(long)]
        publish: String,
        /// Where subscribers connect (repeatable: spread round-robin).
        #[arg(long = "subscribe", required = true)]
        subscribe: Vec<String>,
        /// Subscribers.
        #[arg(long, default_value_t = 10_000)]
        subs: usize,
        /// Publishes per second.
        #[arg(long, default_value_t = 20)]
        rate: u64,
        /// Measuring window (after a 2 s warm-up), in seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Steady open-loop echo load for minutes against a running server, sampling its RSS every
    /// 10 s: memory must stay flat.
    Soak {
        /// The server's echo endpoint.
        #[arg(long)]
        url: String,
        /// The server's process id (for its RSS).
        #[arg(long)]
        pid: u32,
        /// Minutes of load.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Messages per second, in total.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        /// Connections.
        #[arg(long, default_value_t = 100)]
        conns: usize,
    },
    /// Time from renaming a new plugin build into place to it serving a new connection.
    Reload {
        /// Swaps per configuration.
        #[arg(long, default_value_t = 30)]
        rounds: usize,
    },
}

fn print(o: &echo::Outcome) {
    let (p50, p99, p999) = quantiles_ms(&o.latency);
    println!(
        "{:.0} msgs/s, round trip p50 {p50:.3} ms, p99 {p99:.3} ms, p99.9 {p999:.3} ms{}",
        o.rate(),
        if o.lost > 0 {
            format!(", {} unanswered", o.lost)
        } else {
            String::new()
        }
    );
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One thread: the generator is pinned to one CPU and must not compete with itself.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let warmup = Duration::from_secs(1);
        match cli.bench {
            Bench::Suite(args) => suite::run(args).await,
            Bench::Echo { load, inflight } => {
                let (conns, payload, window) = load.open().await?;
                print(&echo::closed(conns, inflight, &payload, warmup, window).await?);
                Ok(())
            }
            Bench::Rate { load, rate } => {
                let (conns, payload, window) = load.open().await?;
                print(&echo::open_loop(conns, rate, &payload, warmup, window).await?);
                Ok(())
            }
            Bench::Idle {
                url,
                pid,
                conns,
                hold,
                later,
            } => {
                let (o, held) = idle::measure(&url, pid, conns, later).await?;
                println!("{}\n{}", idle::header(later), o.row("server"));
                if hold {
                    eprintln!("holding {} connections; interrupt to end", held.len());
                    tokio::signal::ctrl_c().await?;
                }
                Ok(())
            }
            Bench::Fanout {
                publish,
                subscribe,
                subs,
                rate,
                seconds,
            } => {
                let members = fanout::subscribers(&subscribe, subs).await?;
                let publisher = common::connect(&publish, common::source(0)).await?;
                let payload = Payload {
                    size: 32,
                    binary: false,
                };
                let o = fanout::run(
                    publisher,
                    members,
                    rate,
                    &payload,
                    Duration::from_secs(2),
                    Duration::from_secs_f64(seconds),
                )
                .await?;
                let (p50, p99, p999) = quantiles_ms(&o.latency);
                println!(
                    "{:.0} deliveries/s, p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms, publish to last delivery {:.2} ms (median), {} of {} delivered",
                    o.rate(),
                    o.sweep.value_at_quantile(0.5) as f64 / 1e6,
                    o.deliveries,
                    o.expected
                );
                Ok(())
            }
            Bench::Soak {
                url,
                pid,
                minutes,
                rate,
                conns,
            } => soak(&url, pid, minutes, rate, conns).await,
            Bench::Reload { rounds } => reload::run(rounds).await,
        }
    })
}

async fn soak(url: &str, pid: u32, minutes: u64, rate: u64, conns: usize) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let ws = echo::open(url, conns).await?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (samples, stop) = (Arc::clone(&samples), Arc::clone(&stop));
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = common::rss(pid) {
                    samples
                        .lock()
                        .expect("not poisoned")
                        .push((start.elapsed().as_secs_f64(), r));
                }
                for _ in 0..100 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };
    let payload = Payload {
        size: 32,
        binary: false,
    };
    let o = echo::open_loop(
        ws,
        rate,
        &payload,
        Duration::from_secs(1),
        Duration::from_secs(minutes * 60),
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let samples = samples.lock().expect("not poisoned").clone();
    println!("| minute | server RSS |\n| --- | --- |");
    let mut next_minute = 0.0;
    for (t, r) in &samples {
        if *t >= next_minute {
            println!("| {:.0} | {:.1} MiB |", t / 60.0, *r as f64 / 1048576.0);
            next_minute += 60.0;
        }
    }
    let after_1 = samples.iter().find(|(t, _)| *t >= 60.0).map_or(0, |s| s.1);
    let last = samples.last().map_or(0, |s| s.1);
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    println!(
        "\nRSS after 1 min {:.1} MiB, at the end {:.1} MiB, highest {:.1} MiB; {} messages, {} unanswered",
        after_1 as f64 / 1048576.0,
        last as f64 / 1048576.0,
        max as f64 / 1048576.0,
        o.latency.len(),
        o.lost
    );
    print(&o);
    Ok(())
}
