//! A `redis-server` of a test's own on a free loopback port: started, killed, restarted on the
//! same port, asked simple commands.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use crate::{poll_until, PATIENCE};

/// A `redis-server` on a free loopback port; killed when dropped.
#[derive(Debug)]
pub struct Redis {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    dir: tempfile::TempDir,
    prefix: Vec<String>,
}

impl Redis {
    /// Whether `redis-server` can be run here.
    pub fn available() -> bool {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .output()
            .is_ok()
    }

    /// Starts one; panics if it cannot (the message says how to install it).
    pub fn start() -> Self {
        Self::start_under(&[])
    }

    /// Starts one under `prefix` (e.g. `["taskset", "-c", "1"]`).
    pub fn start_under(prefix: &[&str]) -> Self {
        let mut redis = Redis {
            child: None,
            port: 0,
            dir: tempfile::tempdir().expect("a temporary folder"),
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
        };
        for _ in 0..10 {
            redis.port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            if redis.run() {
                return redis;
            }
        }
        panic!("redis-server did not start on any of 10 free ports");
    }

    /// Starts the server on `self.port`; false if it exited (the port was taken meanwhile).
    fn run(&mut self) -> bool {
        let mut cmd = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg("redis-server");
                c
            }
            None => Command::new("redis-server"),
        };
        let child = cmd
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server not found: the bus tests and benchmarks need it (apt-get install \
                 redis-server; .ci/run installs it)"
            ),
            Err(e) => panic!("cannot run redis-server: {e}"),
        };
        let mut exited = false;
        let answered = poll_until(PATIENCE, || {
            exited = child.try_wait().ok().flatten().is_some();
            exited || self.command(&["PING"]).is_some_and(|r| r == "+PONG")
        });
        if exited {
            return false;
        }
        assert!(
            answered,
            "redis-server did not answer PING on port {}",
            self.port
        );
        self.child = Some(child);
        true
    }

    /// Its URL for `wshost serve --bus`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills it (the port stays this fixture's for [`Redis::restart`]).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it and starts it again on the same port: clients reconnect to the address they
    /// were given.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.run(), "redis-server did not restart on its port");
    }

    /// Sends one command; the reply's text (`None` if Redis did not answer).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(PATIENCE)).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 512];
        // Replies here are small and end with CRLF.
        loop {
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            if reply.ends_with(b"\r\n") && complete(&reply) {
                break;
            }
        }
        Some(String::from_utf8_lossy(&reply).trim_end().to_owned())
    }

    /// How many clients are subscribed to `channel` (`PUBSUB NUMSUB`).
    pub fn numsub(&self, channel: &str) -> i64 {
        let reply = self
            .command(&["PUBSUB", "NUMSUB", channel])
            .expect("redis answers");
        let last = reply.lines().last().unwrap_or("");
        last.strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected NUMSUB reply {reply:?}"))
    }
}

/// Whether a reply (a simple one, or a `*2` array of a bulk string and an integer) is whole.
fn complete(reply: &[u8]) -> bool {
    let text = String::from_utf8_lossy(reply);
    if text.starts_with("*2") {
        text.lines().count() >= 4
    } else {
        true
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
