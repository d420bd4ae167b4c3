//! `loadgen idle`: server memory per idle connection. Opens N connections, exchanges one
//! message on each (so every lazily allocated buffer exists), waits [`SETTLE`], and compares
//! the server's resident memory before and after; [`measure_more`] then opens more beside
//! them, for what the next connections cost once the first ones have been idle a while.

use std::time::Duration;

use anyhow::bail;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{connect, rss_tree, source, Ws};

/// What one measurement found.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub conns: usize,
    pub before: u64,
    pub after: u64,
}

impl Outcome {
    pub fn per_conn(&self) -> f64 {
        self.after.saturating_sub(self.before) as f64 / self.conns as f64
    }

    pub fn row(&self, server: &str) -> String {
        format!(
            "| {server} | {} | {:.1} MiB | {:.1} MiB | {:.0} B ({:.2} KiB) |",
            self.conns,
            self.before as f64 / 1048576.0,
            self.after as f64 / 1048576.0,
            self.per_conn(),
            self.per_conn() / 1024.0
        )
    }
}

/// How long the connections stay idle before the server's memory is read: wshost parks a
/// connection that exchanged one message within three seconds of opening (it gives up its
/// stream's buffers); a server that does not park is measured after the same wait.
pub const SETTLE: Duration = Duration::from_secs(5);

pub const HEADER: &str = "| server | idle connections | RSS before | after | per connection |\n| --- | --- | --- | --- | --- |";

async fn open_one(url: &str, i: usize) -> anyhow::Result<Ws> {
    let mut ws = connect(url, source(i)).await?;
    ws.send(Message::text("x")).await?;
    match ws.next().await {
        Some(Ok(Message::Text(_))) => Ok(ws),
        other => bail!("no echo: {other:?}"),
    }
}

/// Measures `conns` idle connections to the echo endpoint `url` of process `pid`; the
/// connections stay open until the returned guard is dropped.
pub async fn measure(url: &str, pid: u32, conns: usize) -> anyhow::Result<(Outcome, Vec<Ws>)> {
    // Warm up: one connection, so lazily allocated runtime state is in the baseline.
    // From the address after the others' (each address stays under the per-address cap).
    let warm = open_one(url, conns).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_tree(pid)?;
    let mut held = Vec::with_capacity(conns + 1);
    held.push(warm);
    for i in 0..conns {
        held.push(open_one(url, i).await?);
    }
    tokio::time::sleep(SETTLE).await;
    let after = rss_tree(pid)?;
    Ok((
        Outcome {
            conns,
            before,
            after,
        },
        held,
    ))
}

/// Opens `conns` more idle connections beside `held` (opened by [`measure`], idle since) and
/// measures what they add: memory freed by connections that went idle may be reused by them.
pub async fn measure_more(
    url: &str,
    pid: u32,
    held: &mut Vec<Ws>,
    conns: usize,
) -> anyhow::Result<Outcome> {
    let before = rss_tree(pid)?;
    // From the addresses after those `measure` used (each stays under the per-address cap).
    let first = held.len();
    for i in first..first + conns {
        held.push(open_one(url, i).await?);
    }
    tokio::time::sleep(SETTLE).await;
    let after = rss_tree(pid)?;
    Ok(Outcome {
        conns,
        before,
        after,
    })
}
