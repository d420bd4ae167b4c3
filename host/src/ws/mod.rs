//! WebSocket connections: the handshake ([`upgrade`]), the session that drives a plugin's
//! callbacks ([`session`]), and the handle plugins send through ([`conn`]).

pub(crate) mod conn;
pub(crate) mod counted;
pub(crate) mod deflate;
pub(crate) mod rebind;
pub(crate) mod session;
pub(crate) mod upgrade;
pub(crate) mod utf8_watch;
