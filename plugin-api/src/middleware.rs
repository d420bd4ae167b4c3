//! Ring-style middleware for upgrades: a [`Middleware`] gets the request and the rest of the
//! chain ([`Next`]); it may answer by itself (refuse), call the rest and change its
//! [`Response`], or put a [`Layer`] around the handler of an accepted upgrade. A [`Stack`]
//! composes them, outermost first, around the plugin's own decision.
//!
//! ```
//! use plugin_api::middleware::{Auth, Logging, RateLimit, Stack};
//! use plugin_api::{Conn, Handler, Host, Plugin, PluginError, Request, Response};
//!
//! struct Chat {
//!     stack: Stack,
//! }
//!
//! impl Plugin for Chat {
//!     const NAME: &'static str = "chat";
//!     const VERSION: &'static str = "1.0.0";
//!     const ROUTES: &'static [&'static str] = &["/chat"];
//!
//!     fn new(host: Host) -> Result<Self, PluginError> {
//!         let stack = Stack::new()
//!             .with(Logging::new(host))
//!             .with(Auth::new(|token: &str| token == "let-me-in"))
//!             .with(RateLimit::per_second(20));
//!         Ok(Chat { stack })
//!     }
//!
//!     fn upgrade(&self, req: &Request<'_>) -> Response {
//!         self.stack.upgrade(req, |_req| Response::accept(Room))
//!     }
//! }
//!
//! struct Room;
//! impl Handler for Room {
//!     fn on_text(&mut self, conn: &Conn, text: &str) {
//!         let _ = conn.send_text(text);
//!     }
//! }
//! # plugin_api::export_plugin!(Chat);
//! ```

use std::fmt;
use std::time::Instant;

use crate::{Conn, Event, Handler, Host, Layer, Request, Response};

/// One link of the chain around a plugin's upgrade decision.
pub trait Middleware: Send + Sync + 'static {
    /// Decides `req`: answer alone, or `next.run(req)` and return (or change) its answer.
    fn upgrade(&self, req: &Request<'_>, next: Next<'_>) -> Response;
}

/// The rest of the chain, for one request.
pub struct Next<'a> {
    run: &'a dyn Fn(&Request<'_>) -> Response,
}

impl Next<'_> {
    /// Runs the rest of the chain (and, at its end, the plugin's own decision).
    pub fn run(self, req: &Request<'_>) -> Response {
        (self.run)(req)
    }
}

impl fmt::Debug for Next<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Next")
    }
}

/// Middleware, outermost first.
#[derive(Default)]
pub struct Stack {
    links: Vec<Box<dyn Middleware>>,
}

impl fmt::Debug for Stack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stack")
            .field("links", &self.links.len())
            .finish()
    }
}

impl Stack {
    /// No middleware: [`Stack::upgrade`] is the plugin's own decision.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `m` inside the ones added before (the first added sees a request first).
    pub fn with(mut self, m: impl Middleware) -> Self {
        self.links.push(Box::new(m));
        self
    }

    /// Decides `req` through the chain, with `decide` (the plugin's own decision) at its end.
    pub fn upgrade(
        &self,
        req: &Request<'_>,
        decide: impl Fn(&Request<'_>) -> Response,
    ) -> Response {
        run(&self.links, req, &decide)
    }
}

fn run(
    links: &[Box<dyn Middleware>],
    req: &Request<'_>,
    decide: &dyn Fn(&Request<'_>) -> Response,
) -> Response {
    match links.split_first() {
        None => decide(req),
        Some((first, rest)) => first.upgrade(
            req,
            Next {
                run: &|r: &Request<'_>| run(rest, r, decide),
            },
        ),
    }
}

// ----------------------------------------------------------------------------------------------
// Authentication.

/// Where a client's token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `?token=…` in the query.
    Query,
    /// A `Sec-WebSocket-Protocol` entry `bearer.TOKEN` (browsers cannot set other headers).
    Subprotocol,
    /// `Authorization: Bearer TOKEN`.
    Header,
}

/// The request's bearer token and where it was: the query's `token`, a `bearer.TOKEN`
/// subprotocol, or an `Authorization: Bearer` header (in that order).
pub fn bearer_token(req: &Request<'_>) -> Option<(String, TokenSource)> {
    if let Some(t) = req.query_param("token").filter(|t| !t.is_empty()) {
        return Some((t, TokenSource::Query));
    }
    if let Some(t) = req
        .subprotocols()
        .find_map(|p| p.strip_prefix("bearer."))
        .filter(|t| !t.is_empty())
    {
        return Some((t.to_owned(), TokenSource::Subprotocol));
    }
    let auth = req.header("authorization")?;
    let (scheme, token) = auth.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| (token.trim().to_owned(), TokenSource::Header))
}

/// Refuses upgrades without a token `check` accepts, with 401 and `WWW-Authenticate: Bearer`.
/// The token comes from [`bearer_token`]. A token sent as a subprotocol is chosen as the
/// connection's subprotocol when the plugin chose none (a browser fails a handshake that
/// offered subprotocols and got none back).
pub struct Auth<F> {
    check: F,
}

impl<F: Fn(&str) -> bool + Send + Sync + 'static> Auth<F> {
    /// Accepts a token when `check(token)` is true.
    pub fn new(check: F) -> Self {
        Self { check }
    }
}

impl<F> fmt::Debug for Auth<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Auth")
    }
}

impl<F: Fn(&str) -> bool + Send + Sync + 'static> Middleware for Auth<F> {
    fn upgrade(&self, req: &Request<'_>, next: Next<'_>) -> Response {
        match bearer_token(req) {
            Some((token, source)) if (self.check)(&token) => {
                let mut resp = next.run(req);
                if source == TokenSource::Subprotocol
                    && resp.is_accept()
                    && resp.header_value("sec-websocket-protocol").is_none()
                {
                    resp.set_header("sec-websocket-protocol", &format!("bearer.{token}"));
                }
                resp
            }
            _ => Response::reject(401, "a valid bearer token is required\n")
                .header("www-authenticate", "Bearer"),
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Logging.

/// Logs every upgrade's outcome (path, client, status) and, for accepted ones, the
/// connection's open and close (code, reason, messages received) through the host's log.
#[derive(Debug, Clone)]
pub struct Logging {
    host: Host,
}

impl Logging {
    /// Logs through `host`.
    pub fn new(host: Host) -> Self {
        Self { host }
    }
}

impl Middleware for Logging {
    fn upgrade(&self, req: &Request<'_>, next: Next<'_>) -> Response {
        let resp = next.run(req);
        self.host.info(&format!(
            "upgrade {} from {}: {}",
            req.path(),
            req.remote_addr(),
            resp.status_code()
        ));
        resp.layer(LogLayer {
            host: self.host.clone(),
            path: req.path().to_owned(),
            messages: 0,
        })
    }
}

struct LogLayer {
    host: Host,
    path: String,
    messages: u64,
}

impl Layer for LogLayer {
    fn on_event(&mut self, inner: &mut dyn Handler, conn: &Conn, event: Event<'_>) {
        match event {
            Event::Connect => {
                self.host
                    .info(&format!("connection {} open on {}", conn.id(), self.path))
            }
            Event::Text(_) | Event::Binary(_) => self.messages += 1,
            Event::Close { code, reason } => self.host.info(&format!(
                "connection {} closed: {code} {reason:?} after {} messages",
                conn.id(),
                self.messages
            )),
            _ => {}
        }
        event.deliver(inner, conn);
    }
}

// ----------------------------------------------------------------------------------------------
// Rate limit.

/// Closes a connection that sends more than `per_second` data messages a second (a burst of as
/// many), with 1008; the message past the limit is not delivered. The host has a limit of its
/// own (`--max-message-rate`); this one is the plugin's, per route or per user.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    per_second: u32,
}

impl RateLimit {
    /// At most `per_second` messages a second (0: no limit).
    pub fn per_second(per_second: u32) -> Self {
        Self { per_second }
    }
}

impl Middleware for RateLimit {
    fn upgrade(&self, req: &Request<'_>, next: Next<'_>) -> Response {
        let resp = next.run(req);
        if self.per_second == 0 {
            return resp;
        }
        resp.layer(RateLayer {
            per_second: f64::from(self.per_second),
            tokens: f64::from(self.per_second),
            last: Instant::now(),
        })
    }
}

struct RateLayer {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl RateLayer {
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.per_second);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Layer for RateLayer {
    fn on_event(&mut self, inner: &mut dyn Handler, conn: &Conn, event: Event<'_>) {
        if matches!(event, Event::Text(_) | Event::Binary(_)) && !self.take(Instant::now()) {
            let _ = conn.close(1008, "message rate exceeded");
            return;
        }
        event.deliver(inner, conn);
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::{TestConn, TestHost, TestRequest};

    struct Echo;
    impl Handler for Echo {
        fn on_text(&mut self, conn: &Conn, text: &str) {
            let _ = conn.send_text(text);
        }
        fn on_timer(&mut self, conn: &Conn, tag: u64) {
            let _ = conn.send_text(&format!("timer {tag}"));
        }
    }

    fn auth_stack() -> Stack {
        Stack::new().with(Auth::new(|t: &str| t == "good"))
    }

    #[test]
    fn auth_refuses_without_a_good_token_and_finds_it_in_three_places() {
        let stack = auth_stack();
        let decide =
            |req: &TestRequest| req.decide(|r| stack.upgrade(r, |_| Response::accept(Echo)));
        let none = decide(&TestRequest::upgrade("/chat"));
        assert_eq!(none.status(), 401);
        assert_eq!(none.header("www-authenticate"), Some("Bearer"));
        assert_eq!(
            decide(&TestRequest::upgrade("/chat?token=bad")).status(),
            401
        );
        assert_eq!(
            decide(&TestRequest::upgrade("/chat?token=good")).status(),
            101
        );
        let header = TestRequest::upgrade("/chat").header("authorization", "Bearer good");
        assert_eq!(decide(&header).status(), 101);
        let proto = decide(&TestRequest::upgrade("/chat").subprotocol("bearer.good"));
        assert_eq!(proto.status(), 101);
        assert_eq!(proto.header("sec-websocket-protocol"), Some("bearer.good"));
    }

    #[test]
    fn the_first_middleware_added_sees_the_request_first() {
        struct Tag(&'static str);
        impl Middleware for Tag {
            fn upgrade(&self, req: &Request<'_>, next: Next<'_>) -> Response {
                let mut resp = next.run(req);
                let seen = resp.header_value("x-order").unwrap_or("").to_owned();
                resp.set_header("x-order", &format!("{seen}{}", self.0));
                resp
            }
        }
        let stack = Stack::new().with(Tag("outer")).with(Tag("inner,"));
        let resp = TestRequest::upgrade("/").decide(|r| stack.upgrade(r, |_| Response::text("x")));
        // The inner one changed the answer first, the outer one last.
        assert_eq!(resp.header("x-order"), Some("inner,outer"));
    }

    #[test]
    fn the_rate_limit_closes_with_1008_and_drops_the_message_past_it() {
        let stack = Stack::new().with(RateLimit::per_second(2));
        let resp =
            TestRequest::upgrade("/").decide(|r| stack.upgrade(r, |_| Response::accept(Echo)));
        let mut h = resp.handler().unwrap();
        let conn = TestConn::new(1);
        h.on_connect(&conn).unwrap();
        for m in ["a", "b", "c"] {
            h.on_text(&conn, m).unwrap();
        }
        assert_eq!(conn.texts(), ["a", "b"]);
        assert_eq!(conn.closed().map(|c| c.0), Some(1008));
    }

    #[test]
    fn a_layer_forwards_callbacks_it_does_not_know() {
        struct Nothing;
        impl Layer for Nothing {}
        let resp = TestRequest::upgrade("/").decide(|_| Response::accept(Echo).layer(Nothing));
        let mut h = resp.handler().unwrap();
        let conn = TestConn::new(1);
        conn.conn()
            .set_timer(std::time::Duration::from_secs(1), 7)
            .unwrap();
        assert!(h.fire_timer(&conn, 7).unwrap());
        assert_eq!(conn.texts(), ["timer 7"]);
    }

    #[test]
    fn logging_logs_the_upgrade_and_the_close() {
        let host = TestHost::new();
        let stack = Stack::new().with(Logging::new(host.host()));
        let resp =
            TestRequest::upgrade("/chat").decide(|r| stack.upgrade(r, |_| Response::accept(Echo)));
        let mut h = resp.handler().unwrap();
        let conn = TestConn::new(4);
        h.on_connect(&conn).unwrap();
        h.on_text(&conn, "x").unwrap();
        h.on_close(&conn, 1000, "bye").unwrap();
        assert!(host.logged("upgrade /chat from"), "{:?}", host.log());
        assert!(
            host.logged("connection 4 closed: 1000 \"bye\" after 1 messages"),
            "{:?}",
            host.log()
        );
    }

    #[test]
    fn a_response_can_be_read_and_changed() {
        let mut r = Response::accept(Echo).header("a", "1").header("A", "2");
        assert!(r.is_accept());
        assert_eq!(r.header_value("a"), Some("1"));
        r.set_header("a", "3");
        assert_eq!(r.headers().collect::<Vec<_>>(), [("a", "3")]);
        r.set_body(b"hi");
        assert_eq!(r.body_bytes(), b"hi");
        r.set_status(403);
        assert!(!r.is_accept(), "a refused upgrade has no handler");
        let kept = TestRequest::upgrade("/").decide(|_| {
            Response::accept(Echo)
                .keep_header("X-User")
                .keep_header("x-user")
        });
        assert_eq!(kept.kept_headers(), ["x-user"]);
    }
}
