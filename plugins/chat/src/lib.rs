//! `chat`: chat rooms at `/chat/<room>?name=NAME`, and the page that uses them at `GET /chat/`.
//!
//! Room membership is the host's channels (room = channel): a member subscribes on connect, a
//! text message is published to the room with the sender's name, and a closing connection leaves
//! by itself, so rooms survive plugin reloads. The last messages of each room are kept in a
//! `Mutex` that is recovered after a panic (`unwrap_or_else(PoisonError::into_inner)`), the
//! pattern that keeps a plugin usable after one of its callbacks panicked.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use plugin_api::{export_plugin, Conn, Handler, Host, Plugin, PluginError, Request, Response};

/// How many recent messages a new member of a room is sent.
const HISTORY: usize = 20;
/// The longest room or member name, in bytes.
const MAX_NAME: usize = 64;
/// Set to `1` in the host's environment to enable `/panic`, which panics while holding the
/// history lock (used by the tests to show that the room stays usable).
const TEST_HOOKS_ENV: &str = "WSHOST_CHAT_TEST_HOOKS";

type History = Arc<Mutex<HashMap<String, VecDeque<String>>>>;

/// The chat plugin.
#[derive(Debug)]
pub struct Chat {
    host: Host,
    history: History,
    test_hooks: bool,
}

impl Plugin for Chat {
    const NAME: &'static str = "chat";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const ROUTES: &'static [&'static str] = &["/chat"];

    fn new(host: Host) -> Result<Self, PluginError> {
        let test_hooks = std::env::var(TEST_HOOKS_ENV).is_ok_and(|v| v == "1");
        Ok(Chat {
            host,
            history: History::default(),
            test_hooks,
        })
    }

    fn upgrade(&self, req: &Request<'_>) -> Response {
        let Some(room) = room_of(req.path_info()) else {
            return Response::reject(400, "room names are 1-64 letters, digits, '-' or '_'\n");
        };
        let name = match req.query_param("name") {
            Some(n) if valid_member(&n) => n,
            Some(_) => return Response::reject(400, "name must be 1-64 printable characters\n"),
            None => return Response::reject(400, "missing ?name=\n"),
        };
        Response::accept(Member {
            host: self.host.clone(),
            history: Arc::clone(&self.history),
            room: room.to_owned(),
            name,
            test_hooks: self.test_hooks,
        })
    }

    fn request(&self, req: &Request<'_>) -> Response {
        match (req.method(), req.path_info()) {
            ("GET", "" | "/") => Response::html(PAGE),
            _ => Response::not_found(),
        }
    }
}

/// The room of `/<room>` (the path below the plugin's route, `/chat` or wherever it is
/// mounted), if it names a valid one.
fn room_of(path_info: &str) -> Option<&str> {
    let room = path_info.strip_prefix('/')?;
    let valid = !room.is_empty()
        && room.len() <= MAX_NAME
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then_some(room)
}

fn valid_member(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && !name.chars().any(char::is_control)
}

struct Member {
    host: Host,
    history: History,
    room: String,
    name: String,
    test_hooks: bool,
}

impl Member {
    fn say(&self, line: String) {
        {
            let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
            let room = history.entry(self.room.clone()).or_default();
            if room.len() == HISTORY {
                room.pop_front();
            }
            room.push_back(line.clone());
        }
        self.host.publish_text(&self.room, &line);
    }
}

impl Handler for Member {
    fn on_connect(&mut self, conn: &Conn) {
        let recent: Vec<String> = self
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&self.room)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default();
        for line in &recent {
            let _ = conn.send_text(line);
        }
        if conn.subscribe(&self.room).is_ok() {
            self.say(format!("* {} joined", self.name));
        }
    }

    fn on_text(&mut self, _conn: &Conn, text: &str) {
        if self.test_hooks && text == "/panic" {
            let _held = self.history.lock().unwrap_or_else(PoisonError::into_inner);
            panic!("chat test hook: panic while holding the history lock");
        }
        self.say(format!("{}: {}", self.name, text));
    }

    fn on_close(&mut self, _conn: &Conn, _code: u16, _reason: &str) {
        self.say(format!("* {} left", self.name));
    }
}

const PAGE: &str = include_str!("chat.html");

export_plugin!(Chat);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testkit::{TestConn, TestHost, TestRequest};

    #[test]
    fn a_member_joins_speaks_and_leaves_through_the_rooms_channel() {
        let host = TestHost::new();
        let chat = Chat::new(host.host()).unwrap();
        let answer = TestRequest::upgrade("/chat/lobby?name=Ann").decide(|r| chat.upgrade(r));
        assert_eq!(answer.status(), 101);
        let mut ann = answer.handler().unwrap();
        let conn = TestConn::new(1);
        ann.on_connect(&conn).unwrap();
        assert_eq!(conn.channels(), ["lobby"]);
        ann.on_text(&conn, "hi").unwrap();
        ann.on_close(&conn, 1000, "").unwrap();
        let lines: Vec<_> = host
            .published()
            .into_iter()
            .map(|p| (p.channel, p.message))
            .collect();
        use plugin_api::testkit::Sent::Text;
        assert_eq!(
            lines,
            [
                ("lobby".to_owned(), Text("* Ann joined".into())),
                ("lobby".to_owned(), Text("Ann: hi".into())),
                ("lobby".to_owned(), Text("* Ann left".into())),
            ]
        );
        // A later member gets the room's recent history first.
        let mut bob = TestRequest::upgrade("/chat/lobby?name=Bob")
            .decide(|r| chat.upgrade(r))
            .handler()
            .unwrap();
        let bob_conn = TestConn::new(2);
        bob.on_connect(&bob_conn).unwrap();
        assert_eq!(bob_conn.texts(), ["* Ann joined", "Ann: hi", "* Ann left"]);
    }

    #[test]
    fn bad_rooms_and_names_are_refused_with_400() {
        let chat = Chat::new(TestHost::new().host()).unwrap();
        for uri in ["/chat/?name=Ann", "/chat/lobby", "/chat/a%20b?name=Ann"] {
            let answer = TestRequest::upgrade(uri).decide(|r| chat.upgrade(r));
            assert_eq!(answer.status(), 400, "{uri}: {}", answer.text());
        }
        let page = TestRequest::plain("GET", "/chat/").decide(|r| chat.request(r));
        assert_eq!(page.status(), 200);
        assert!(page.text().contains("<html"));
    }

    #[test]
    fn rooms() {
        assert_eq!(room_of("/lobby"), Some("lobby"));
        assert_eq!(room_of("/a-b_9"), Some("a-b_9"));
        assert_eq!(room_of("/"), None);
        assert_eq!(room_of(""), None);
        assert_eq!(room_of("/a/b"), None);
        assert_eq!(room_of("/a%20b"), None);
    }

    #[test]
    fn member_names() {
        assert!(valid_member("Ann"));
        assert!(valid_member("Zoë ☕"));
        assert!(!valid_member(""));
        assert!(!valid_member("a\nb"));
        assert!(!valid_member(&"x".repeat(65)));
    }
}
