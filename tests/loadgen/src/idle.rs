//! `loadgen idle`: server memory per idle connection. Opens N connections, exchanges one
//! message on each (so every lazily allocated buffer exists), waits [`SETTLE`], and compares
//! the server's resident memory before and after; [`measure_more`] then opens more beside
//! them, for what the next connections cost once the first ones have been idle a while.
//! Optionally it reads the memory once more [`LATER`] after that: an allocator that hands
//! freed pages back to the system does so over seconds (wshost's jemalloc: about 10 s).

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
    /// The memory read [`LATER`] after `after`, if it was.
    pub later: Option<u64>,
}

impl Outcome {
    pub fn per_conn(&self) -> f64 {
        self.after.saturating_sub(self.before) as f64 / self.conns as f64
    }

    /// Per connection by the memory read [`LATER`], if it was.
    pub fn per_conn_later(&self) -> Option<f64> {
        self.later
            .map(|l| l.saturating_sub(self.before) as f64 / self.conns as f64)
    }

    /// A row of [`HEADER`], or of [`HEADER_LATER`] if the memory was read again later.
    pub fn row(&self, server: &str) -> String {
        let mut row = format!(
            "| {server} | {} | {:.1} MiB | {:.1} MiB | {:.0} B ({:.2} KiB) |",
            self.conns,
            self.before as f64 / 1048576.0,
            self.after as f64 / 1048576.0,
            self.per_conn(),
            self.per_conn() / 1024.0
        );
        if let (Some(later), Some(per)) = (self.later, self.per_conn_later()) {
            row += &format!(
                " {:.1} MiB | {per:.0} B ({:.2} KiB) |",
                later as f64 / 1048576.0,
                per / 1024.0
            );
        }
        row
    }
}

/// How long the connections stay idle before the server's memory is read: wshost parks a
/// connection that exchanged one message within three seconds of opening (it gives up its
/// stream's buffers); a server that does not park is measured after the same wait.
pub const SETTLE: Duration = Duration::from_secs(5);

/// How much later [`measure`] reads the memory again when asked to.
pub const LATER: Duration = Duration::from_secs(25);

pub const HEADER: &str = "| server | idle connections | RSS before | after | per connection |\n| --- | --- | --- | --- | --- |";

/// [`HEADER`] with the memory read again [`LATER`].
pub const HEADER_LATER: &str = "| server | idle connections | RSS before | after | per connection | 25 s later | per connection then |\n| --- | --- | --- | --- | --- | --- | --- |";

async fn open_one(url: &str, i: usize) -> anyhow::Result<Ws> {
    let mut ws = connect(url, source(i)).await?;
    ws.send(Message::text("x")).await?;
    match ws.next().await {
        Some(Ok(Message::Text(_))) => Ok(ws),
        other => bail!("no echo: {other:?}"),
    }
}

/// Measures `conns` idle connections to the echo endpoint `url` of process `pid` (and again
/// [`LATER`] if `later`); the connections stay open until the returned guard is dropped.
pub async fn measure(
    url: &str,
    pid: u32,
    conns: usize,
    later: bool,
) -> anyhow::Result<(Outcome, Vec<Ws>)> {
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
    let later = if later {
        tokio::time::sleep(LATER).await;
        Some(rss_tree(pid)?)
    } else {
        None
    };
    Ok((
        Outcome {
            conns,
            before,
            after,
            later,
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
        later: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_reading_adds_its_columns_and_its_own_per_connection_figure() {
        let mib = 1 << 20;
        let mut o = Outcome {
            conns: 1024,
            before: 10 * mib,
            after: 13 * mib,
            later: None,
        };
        let columns = |row: &str| row.matches('|').count() - 1;
        assert_eq!(
            columns(&o.row("s")),
            columns(HEADER.lines().next().unwrap())
        );
        o.later = Some(12 * mib);
        let row = o.row("s");
        assert_eq!(columns(&row), columns(HEADER_LATER.lines().next().unwrap()));
        assert!(
            row.ends_with("| 3072 B (3.00 KiB) | 12.0 MiB | 2048 B (2.00 KiB) |"),
            "{row}"
        );
    }
}
