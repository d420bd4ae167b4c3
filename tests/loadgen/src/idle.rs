//! `loadgen idle`: server memory per idle connection. Opens N connections, exchanges one
//! message on each (so every lazily allocated buffer exists), waits [`SETTLE`], and compares
//! the server's resident memory before and after; [`measure_more`] then opens more beside
//! them, for what the next connections cost once the first ones have been idle a while.
//! Optionally it then reads the memory every second for [`LATER`] and reports the lowest and
//! highest: an allocator that hands freed pages back to the system does so over seconds
//! (wshost's jemalloc: over 10-20 s), and the host's pings (every 30 s by default) open parked
//! connections again for a moment.

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
    /// The lowest and highest memory read each second over [`LATER`] after `after`, if it was.
    pub later: Option<(u64, u64)>,
}

impl Outcome {
    pub fn per_conn(&self) -> f64 {
        self.per(self.after)
    }

    /// Per connection by the lowest and the highest memory read over [`LATER`], if it was.
    pub fn per_conn_later(&self) -> Option<(f64, f64)> {
        self.later.map(|(lo, hi)| (self.per(lo), self.per(hi)))
    }

    /// What the connections added, per connection, by the memory `rss`.
    fn per(&self, rss: u64) -> f64 {
        rss.saturating_sub(self.before) as f64 / self.conns as f64
    }

    /// A row of [`HEADER`], or of [`HEADER_LATER`] if the memory was read over [`LATER`] too.
    pub fn row(&self, server: &str) -> String {
        let mut row = format!(
            "| {server} | {} | {:.1} MiB | {:.1} MiB | {:.0} B ({:.2} KiB) |",
            self.conns,
            self.before as f64 / 1048576.0,
            self.after as f64 / 1048576.0,
            self.per_conn(),
            self.per_conn() / 1024.0
        );
        if let Some((lo, hi)) = self.per_conn_later() {
            row += &format!(" {lo:.0} B | {hi:.0} B |");
        }
        row
    }
}

/// How long the connections stay idle before the server's memory is read: wshost parks a
/// connection that exchanged one message within three seconds of opening (it gives up its
/// stream's buffers); a server that does not park is measured after the same wait.
pub const SETTLE: Duration = Duration::from_secs(5);

/// How long [`measure`] goes on reading the memory when asked to (past the first of the
/// host's pings at its default 30 s interval).
pub const LATER: Duration = Duration::from_secs(40);

pub const HEADER: &str = "| server | idle connections | RSS before | after | per connection |\n| --- | --- | --- | --- | --- |";

/// The header of rows of outcomes measured with `later` or without.
pub fn header(later: bool) -> &'static str {
    if later {
        HEADER_LATER
    } else {
        HEADER
    }
}

/// [`HEADER`] with the memory read over [`LATER`].
pub const HEADER_LATER: &str = "| server | idle connections | RSS before | after | per connection | the next 40 s, per connection: lowest | highest |\n| --- | --- | --- | --- | --- | --- | --- |";

async fn open_one(url: &str, i: usize) -> anyhow::Result<Ws> {
    let mut ws = connect(url, source(i)).await?;
    ws.send(Message::text("x")).await?;
    match ws.next().await {
        Some(Ok(Message::Text(_))) => Ok(ws),
        other => bail!("no echo: {other:?}"),
    }
}

/// Measures `conns` idle connections to the echo endpoint `url` of process `pid` (and again
/// each second over [`LATER`] if `later`); the connections stay open until the returned guard is dropped.
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
        let (mut lo, mut hi) = (u64::MAX, 0);
        for _ in 0..LATER.as_secs() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss = rss_tree(pid)?;
            (lo, hi) = (lo.min(rss), hi.max(rss));
        }
        Some((lo, hi))
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
    fn later_readings_add_their_lowest_and_highest_per_connection() {
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
        o.later = Some((12 * mib, 14 * mib));
        let row = o.row("s");
        assert_eq!(columns(&row), columns(HEADER_LATER.lines().next().unwrap()));
        assert!(
            row.ends_with("| 3072 B (3.00 KiB) | 2048 B | 4096 B |"),
            "{row}"
        );
    }
}
