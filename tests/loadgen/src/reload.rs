//! `loadgen reload`: how long a replaced plugin takes to serve, from the `rename` of a new
//! build into the plugins directory to the first new connection that the new build answers,
//! with and without the probe process, interleaved.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{cargo, workspace_root, Server};

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

fn install(dir: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    Ok(test_support::install(dir, "libbench.so", bytes)?)
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

pub async fn run(rounds: usize) -> anyhow::Result<()> {
    let (exe, a, b) = build()?;
    let configs: [(&str, &[&str]); 2] = [
        ("with probe (default)", &[]),
        ("--no-probe", &["--no-probe"]),
    ];
    let mut hosts = Vec::new();
    for (name, extra) in configs {
        let dir = tempfile::tempdir()?;
        install(dir.path(), &a)?;
        let host = Server::start("wshost", crate::common::wshost(&exe, dir.path(), extra))?;
        hosts.push((name, host, dir, Vec::new()));
    }
    // Interleave the configurations so that machine noise hits both alike.
    for round in 0..rounds {
        let (bytes, tag) = if round % 2 == 0 { (&b, "B") } else { (&a, "A") };
        for (_, host, dir, samples) in hosts.iter_mut() {
            samples.push(swap(&host.addr.to_string(), dir.path(), bytes, tag).await?);
        }
    }
    println!("| reload, rename to serving | swaps | median ms | p10 ms | p90 ms | max ms |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, _, _, samples) in hosts {
        println!("{}", summary(name, samples));
    }
    println!(
        "\n(a rename reloads at once; other changes wait for the directory to be quiet for 100 ms)"
    );
    Ok(())
}
