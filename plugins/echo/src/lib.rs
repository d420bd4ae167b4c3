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
