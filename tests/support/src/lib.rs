//! What wshost's integration tests (`tests/integration`) and its load generator
//! (`tests/loadgen`) share: waiting for an observable event ([`eventually`]), starting a server
//! process and reading the address it prints ([`listening`]), installing plugin files the way a
//! deployment does ([`install`]), a Redis server of a test's own ([`Redis`]), and the load
//! generator's pacer ([`pace`]).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod redis;

pub mod pace;
pub use redis::Redis;

/// How long a test waits for something it expects before failing: a guard against hangs, not
/// a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// How often a condition is looked at again while waiting for it.
const POLL: Duration = Duration::from_millis(10);

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/support is two levels down")
        .to_owned()
}

/// A `cargo` command: the one running this build, if any.
pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Looks at `condition` until it holds or `within` has passed; whether it held.
pub fn poll_until(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until `condition` holds; panics naming `what` after [`PATIENCE`].
pub fn eventually(what: &str, condition: impl FnMut() -> bool) {
    assert!(poll_until(PATIENCE, condition), "never happened: {what}");
}

/// [`eventually`] for async tests: the condition is looked at between timer ticks, so the
/// runtime's other tasks keep running.
pub async fn eventually_async(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Reads a server's stdout until its `listening on ws://ADDR` (or `wss://`) line; the lines
/// before it go to `seen` (e.g. `admin on http://…`). Returns `None` if the output ends first.
/// The rest of the output is drained on a thread, so the server never blocks writing it.
pub fn listening(
    stdout: impl Read + Send + 'static,
    mut seen: impl FnMut(&str),
) -> Option<SocketAddr> {
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next()?.ok()?;
        let at = line
            .strip_prefix("listening on ws://")
            .or_else(|| line.strip_prefix("listening on wss://"));
        match at {
            Some(at) => break at.trim().parse().ok()?,
            None => seen(&line),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Some(addr)
}

/// Puts `bytes` into `dir/name` the way a deployment should: a temporary name in the same
/// folder, then a rename, so the host never sees a half-written file.
pub fn install(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_is_found_after_others() {
        let out = b"admin on http://127.0.0.1:9\nlistening on ws://127.0.0.1:8080\nmore\n";
        let mut seen = Vec::new();
        let addr = listening(&out[..], |l| seen.push(l.to_owned()));
        assert_eq!(addr, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(seen, ["admin on http://127.0.0.1:9"]);
        assert_eq!(listening(&b"nothing\n"[..], |_| {}), None);
    }

    #[test]
    fn polling_ends_when_the_condition_holds_or_time_is_up() {
        let mut n = 0;
        assert!(poll_until(PATIENCE, || {
            n += 1;
            n == 3
        }));
        assert!(!poll_until(Duration::ZERO, || false));
    }

    #[test]
    fn install_renames_into_place() {
        let dir = tempfile::tempdir().unwrap();
        install(dir.path(), "libx.so", b"abc").unwrap();
        assert_eq!(std::fs::read(dir.path().join("libx.so")).unwrap(), b"abc");
        assert!(!dir.path().join(".libx.so.tmp").exists());
    }
}
