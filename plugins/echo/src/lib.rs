//! `echo`: answers every text and binary message on `/echo` with the same message.
//!
//! Accepts every upgrade, and picks the first subprotocol the client offers, if any.

use plugin_api::{export_plugin, Conn, Handler, Host, Plugin, PluginError, Request, Response};

/// The echo plugin.
#[derive(Debug)]
pub struct Echo;

impl Plugin for Echo {
    const NAME: &'static str = "echo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const ROUTES: &'static [&'static str] = &["/echo"];

    fn new(_host: Host) -> Result<Self, PluginError> {
        Ok(Echo)
    }

    fn upgrade(&self, req: &Request<'_>) -> Response {
        let response = Response::accept(EchoConn);
        match req.subprotocols().next() {
            Some(p) => response.protocol(p),
            None => response,
        }
    }
}

/// One echo connection.
#[derive(Debug)]
pub struct EchoConn;

impl Handler for EchoConn {
    fn on_text(&mut self, conn: &Conn, text: &str) {
        // A full queue or a closing connection drops the echo: nothing else to do with it.
        let _ = conn.send_text(text);
    }

    fn on_binary(&mut self, conn: &Conn, data: &[u8]) {
        let _ = conn.send_binary(data);
    }
}

export_plugin!(Echo);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testkit::{Sent, TestConn, TestHost, TestRequest};

    #[test]
    fn echoes_text_and_binary_and_picks_the_first_subprotocol() {
        let echo = Echo::new(TestHost::new().host()).unwrap();
        let answer = TestRequest::upgrade("/echo")
            .subprotocol("v2")
            .subprotocol("v1")
            .decide(|r| echo.upgrade(r));
        assert_eq!(answer.status(), 101);
        assert_eq!(answer.header("sec-websocket-protocol"), Some("v2"));
        let mut handler = answer.handler().unwrap();
        let conn = TestConn::new(7);
        handler.on_text(&conn, "hello").unwrap();
        handler.on_binary(&conn, &[1, 2, 3]).unwrap();
        assert_eq!(
            conn.sent(),
            [Sent::Text("hello".into()), Sent::Binary(vec![1, 2, 3])]
        );
    }

    #[test]
    fn a_full_queue_drops_the_echo_without_a_panic() {
        let echo = Echo::new(TestHost::new().host()).unwrap();
        let mut handler = TestRequest::upgrade("/echo")
            .decide(|r| echo.upgrade(r))
            .handler()
            .unwrap();
        let conn = TestConn::new(1);
        conn.set_queue_full(true);
        handler.on_text(&conn, "lost").unwrap();
        assert!(conn.sent().is_empty());
    }
}
