//! The `{name}` wshost plugin: streams data at `/{name}`, paced by the client's reading.
//!
//! Send a number N and the plugin streams N bytes in chunks, then `done`. Sends never block: it
//! stops at its own high-water mark and resumes in `on_drain` once the queue has fallen to its
//! low-water mark (`Conn::set_low_water`), so a slow client costs at most the high-water mark
//! of memory. A heartbeat timer says the stream is alive while it waits.
//!
//! Build with `cargo build --release`, then put `target/release/lib{lib}.so` into the host's
//! plugins directory: it loads without a restart.

use std::time::Duration;

use plugin_api::{export_plugin, Conn, Handler, Host, Plugin, PluginError, Request, Response};

/// Queued bytes past which the plugin stops sending.
const HIGH_WATER: u64 = 256 << 10;
/// Queued bytes at which it resumes.
const LOW_WATER: usize = 64 << 10;
/// One message of the stream.
const CHUNK: usize = 16 << 10;
/// The heartbeat timer's tag and interval.
const HEARTBEAT: u64 = 1;
const EVERY: Duration = Duration::from_secs(15);

/// The plugin.
pub struct {Type};

impl Plugin for {Type} {
    const NAME: &'static str = "{name}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const ROUTES: &'static [&'static str] = &["/{name}"];

    fn new(_host: Host) -> Result<Self, PluginError> {
        Ok({Type})
    }

    fn upgrade(&self, _req: &Request<'_>) -> Response {
        Response::accept(Stream { left: 0 })
    }
}

/// One connection's stream.
struct Stream {
    /// Bytes still to send.
    left: usize,
}

impl Stream {
    /// Sends until the stream is done or the queue is at the high-water mark.
    fn pump(&mut self, conn: &Conn) {
        while self.left > 0 && conn.buffered_amount() < HIGH_WATER {
            let n = self.left.min(CHUNK);
            if conn.send_binary(&vec![b'x'; n]).is_err() {
                return; // full (on_drain follows) or closing
            }
            self.left -= n;
        }
        if self.left == 0 {
            let _ = conn.send_text("done");
        }
    }
}

impl Handler for Stream {
    fn on_connect(&mut self, conn: &Conn) {
        conn.set_low_water(LOW_WATER);
        let _ = conn.set_timer(EVERY, HEARTBEAT);
    }

    fn on_text(&mut self, conn: &Conn, text: &str) {
        match text.trim().parse::<usize>() {
            Ok(n) if self.left == 0 => {
                self.left = n;
                self.pump(conn);
            }
            Ok(_) => {
                let _ = conn.send_text("busy: one stream at a time");
            }
            Err(_) => {
                let _ = conn.send_text("send a number of bytes");
            }
        }
    }

    fn on_drain(&mut self, conn: &Conn) {
        if self.left > 0 {
            self.pump(conn);
        }
    }

    fn on_timer(&mut self, conn: &Conn, tag: u64) {
        if tag == HEARTBEAT {
            let _ = conn.send_text("alive");
            let _ = conn.set_timer(EVERY, HEARTBEAT);
        }
    }
}

export_plugin!({Type});

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testkit::{Sent, TestConn, TestHost, TestRequest};

    #[test]
    fn streams_what_was_asked_for_and_says_done() {
        let plugin = {Type}::new(TestHost::new().host()).unwrap();
        let mut h = TestRequest::upgrade("/{name}")
            .decide(|r| plugin.upgrade(r))
            .handler()
            .unwrap();
        let conn = TestConn::new(1);
        h.on_connect(&conn).unwrap();
        assert_eq!(conn.low_water(), Some(LOW_WATER as u64));
        h.on_text(&conn, "40000").unwrap();
        let bytes: usize = conn
            .sent()
            .iter()
            .map(|s| match s {
                Sent::Binary(b) => b.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(bytes, 40000);
        assert_eq!(conn.texts(), ["done"]);
    }

    #[test]
    fn a_full_queue_pauses_the_stream_until_on_drain() {
        let plugin = {Type}::new(TestHost::new().host()).unwrap();
        let mut h = TestRequest::upgrade("/{name}")
            .decide(|r| plugin.upgrade(r))
            .handler()
            .unwrap();
        let conn = TestConn::new(1);
        conn.set_queue_full(true);
        h.on_text(&conn, "100").unwrap();
        assert!(conn.sent().is_empty());
        conn.set_queue_full(false);
        h.on_drain(&conn).unwrap();
        assert_eq!(conn.texts(), ["done"]);
    }

    #[test]
    fn the_heartbeat_rearms_itself() {
        let plugin = {Type}::new(TestHost::new().host()).unwrap();
        let mut h = TestRequest::upgrade("/{name}")
            .decide(|r| plugin.upgrade(r))
            .handler()
            .unwrap();
        let conn = TestConn::new(1);
        h.on_connect(&conn).unwrap();
        assert!(h.fire_timer(&conn, HEARTBEAT).unwrap());
        assert_eq!(conn.texts(), ["alive"]);
        assert_eq!(conn.timers(), [(HEARTBEAT, EVERY)]);
    }
}
