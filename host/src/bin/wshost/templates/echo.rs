//! The `{name}` wshost plugin: echoes every message on `/{name}`.
//!
//! Build with `cargo build --release`, then put `target/release/lib{lib}.so` (renamed as you
//! like, ending in `.so`) into the host's plugins directory: it loads without a restart.

use plugin_api::{export_plugin, Conn, Handler, Host, Plugin, PluginError, Request, Response};

/// The plugin: one instance per loaded build, shared by all its connections.
pub struct {Type} {
    host: Host,
}

impl Plugin for {Type} {
    const NAME: &'static str = "{name}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const ROUTES: &'static [&'static str] = &["/{name}"];

    fn new(host: Host) -> Result<Self, PluginError> {
        host.info("started");
        Ok({Type} { host })
    }

    fn upgrade(&self, _req: &Request<'_>) -> Response {
        // Any other status refuses the upgrade: Response::reject(403, "no").
        Response::accept(Connection)
    }

    fn request(&self, _req: &Request<'_>) -> Response {
        Response::text("this is the {name} plugin; open a WebSocket to talk to it\n")
    }

    fn shutdown(&self) {
        self.host.info("stopped");
    }
}

/// One WebSocket connection's callbacks. They run one at a time, in order, on this plugin's own
/// workers: one that blocks holds a worker meanwhile (long waits belong on your own threads;
/// see `Request::defer` and `Conn::pause`).
struct Connection;

impl Handler for Connection {
    fn on_text(&mut self, conn: &Conn, text: &str) {
        // A send fails only if the connection is closing, its queue is full, or the message is
        // larger than the whole queue.
        let _ = conn.send_text(&reply(text));
    }

    fn on_binary(&mut self, conn: &Conn, data: &[u8]) {
        let _ = conn.send_binary(data);
    }
}

/// What the plugin answers to a text message.
fn reply(text: &str) -> String {
    text.to_owned()
}

export_plugin!({Type});

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testkit::{Sent, TestConn, TestHost, TestRequest};

    #[test]
    fn accepts_and_echoes() {
        let host = TestHost::new();
        let plugin = {Type}::new(host.host()).unwrap();
        assert!(host.logged("started"));
        let answer = TestRequest::upgrade("/{name}").decide(|r| plugin.upgrade(r));
        assert_eq!(answer.status(), 101);
        let mut handler = answer.handler().unwrap();
        let conn = TestConn::new(1);
        handler.on_text(&conn, "hello").unwrap();
        handler.on_binary(&conn, b"bytes").unwrap();
        assert_eq!(
            conn.sent(),
            [Sent::Text("hello".into()), Sent::Binary(b"bytes".to_vec())]
        );
    }

    #[test]
    fn answers_plain_requests() {
        let plugin = {Type}::new(TestHost::new().host()).unwrap();
        let answer = TestRequest::plain("GET", "/{name}").decide(|r| plugin.request(r));
        assert_eq!(answer.status(), 200);
        assert!(answer.text().contains("{name}"));
    }
}
