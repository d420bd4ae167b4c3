//! The `{name}` wshost plugin: chat rooms at `/{name}/ROOM?name=MEMBER`.
//!
//! A room is one of the host's channels: a member subscribes when it connects, a message is
//! published to the room with the sender's name, and a closing connection leaves by itself, so
//! rooms survive a reload of this plugin. Joins and leaves are announced; `/who` lists the
//! room's members (each connection is labelled with its member name). The upgrade goes through
//! middleware (logging, a per-connection message rate) composed like Ring's.
//!
//! Build with `cargo build --release`, then put `target/release/lib{lib}.so` into the host's
//! plugins directory: it loads without a restart.

use plugin_api::middleware::{Logging, RateLimit, Stack};
use plugin_api::{export_plugin, Conn, Handler, Host, Plugin, PluginError, Request, Response};

/// The longest room or member name, in bytes.
const MAX_NAME: usize = 64;

/// The plugin: one instance per loaded build, shared by all its connections.
pub struct {Type} {
    host: Host,
    stack: Stack,
}

impl Plugin for {Type} {
    const NAME: &'static str = "{name}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const ROUTES: &'static [&'static str] = &["/{name}"];

    fn new(host: Host) -> Result<Self, PluginError> {
        let stack = Stack::new()
            .with(Logging::new(host.clone()))
            .with(RateLimit::per_second(20));
        Ok({Type} { host, stack })
    }

    fn upgrade(&self, req: &Request<'_>) -> Response {
        self.stack.upgrade(req, |req| {
            let Some(room) = valid(req.path_info().trim_start_matches('/')) else {
                return Response::reject(400, "connect to /{name}/ROOM?name=MEMBER\n");
            };
            let Some(name) = req.query_param("name").and_then(|n| valid(&n).map(str::to_owned))
            else {
                return Response::reject(400, "missing or bad ?name=\n");
            };
            Response::accept(Member {
                host: self.host.clone(),
                room: format!("room:{room}"),
                name,
            })
        })
    }
}

/// `s` if it is a usable room or member name.
fn valid(s: &str) -> Option<&str> {
    let ok = !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(s)
}

/// One member of a room.
struct Member {
    host: Host,
    room: String,
    name: String,
}

impl Handler for Member {
    fn on_connect(&mut self, conn: &Conn) {
        // The label member lists show: set before subscribing, so the join carries it.
        conn.set_label(&self.name);
        if conn.subscribe(&self.room).is_err() {
            return;
        }
        self.host
            .publish_text(&self.room, &format!("* {} joined", self.name));
    }

    fn on_text(&mut self, conn: &Conn, text: &str) {
        if text == "/who" {
            let names: Vec<String> = self
                .host
                .members(&self.room)
                .into_iter()
                .map(|m| m.label)
                .collect();
            let _ = conn.send_text(&format!("* here: {}", names.join(", ")));
            return;
        }
        self.host
            .publish_text(&self.room, &format!("{}: {text}", self.name));
    }

    fn on_close(&mut self, _conn: &Conn, _code: u16, _reason: &str) {
        self.host
            .publish_text(&self.room, &format!("* {} left", self.name));
    }
}

export_plugin!({Type});

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testkit::{Sent, TestConn, TestHost, TestRequest};

    #[test]
    fn members_join_a_room_and_their_messages_are_published_to_it() {
        let host = TestHost::new();
        let plugin = {Type}::new(host.host()).unwrap();
        let answer = TestRequest::upgrade("/{name}/lobby?name=ann").decide(|r| plugin.upgrade(r));
        assert_eq!(answer.status(), 101);
        let mut ann = answer.handler().unwrap();
        let conn = TestConn::new(1);
        ann.on_connect(&conn).unwrap();
        assert_eq!(conn.channels(), ["room:lobby"]);
        assert_eq!(conn.label(), "ann");
        ann.on_text(&conn, "hello").unwrap();
        ann.on_close(&conn, 1000, "").unwrap();
        let said: Vec<String> = host
            .published()
            .into_iter()
            .filter_map(|p| match p.message {
                Sent::Text(t) => Some(t),
                _ => None,
            })
            .collect();
        assert_eq!(said, ["* ann joined", "ann: hello", "* ann left"]);
    }

    #[test]
    fn bad_rooms_and_names_are_refused() {
        let plugin = {Type}::new(TestHost::new().host()).unwrap();
        for uri in ["/{name}/?name=ann", "/{name}/lobby", "/{name}/a b?name=x", "/{name}/x?name="] {
            let answer = TestRequest::upgrade(uri).decide(|r| plugin.upgrade(r));
            assert_eq!(answer.status(), 400, "{uri}");
        }
    }
}
