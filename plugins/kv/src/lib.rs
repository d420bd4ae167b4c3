//! `kv`: a small JSON key-value store over plain HTTP requests (the ring-handler side of a
//! plugin), whose changes are pushed to WebSocket subscribers.
//!
//! - `GET /kv` → `{"keys": [...]}`
//! - `GET /kv/<key>` → `{"key": ..., "value": ...}` or 404
//! - `PUT /kv/<key>` with a JSON body → stores it, answers 200 with the stored entry; 400 if the
//!   body is not JSON, 413 past 64 KiB
//! - `DELETE /kv/<key>` → 204, or 404
//! - a WebSocket to `/kv` receives every change as `{"key": ..., "value": ...}` (value `null`
//!   when deleted), through the host's channel `changes`; any text it sends is answered with
//!   `{"watching":true}`.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use plugin_api::{export_plugin, Conn, Handler, Host, Plugin, PluginError, Request, Response};
use serde_json::{json, Value};

const CHANGES: &str = "changes";
const MAX_VALUE: usize = 64 << 10;

/// The store.
#[derive(Debug)]
pub struct Kv {
    host: Host,
    entries: Mutex<BTreeMap<String, Value>>,
}

fn json_response(status: u16, body: &Value) -> Response {
    Response::status(status)
        .header("content-type", "application/json")
        .body(body.to_string().as_bytes())
}

impl Kv {
    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Value>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn changed(&self, key: &str, value: &Value) {
        let change = json!({ "key": key, "value": value });
        self.host.publish_text(CHANGES, &change.to_string());
    }
}

impl Plugin for Kv {
    const NAME: &'static str = "kv";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const ROUTES: &'static [&'static str] = &["/kv"];

    fn new(host: Host) -> Result<Self, PluginError> {
        Ok(Kv {
            host,
            entries: Mutex::default(),
        })
    }

    fn upgrade(&self, _req: &Request<'_>) -> Response {
        Response::accept(Watcher)
    }

    fn request(&self, req: &Request<'_>) -> Response {
        // The key is the path below the route (`/kv`, or wherever the plugin is mounted).
        let key = req.path_info();
        let key = key.strip_prefix('/').unwrap_or(key);
        match (req.method(), key) {
            ("GET", "") => {
                let keys: Vec<String> = self.entries().keys().cloned().collect();
                json_response(200, &json!({ "keys": keys }))
            }
            ("GET", key) => match self.entries().get(key) {
                Some(v) => json_response(200, &json!({ "key": key, "value": v })),
                None => json_response(404, &json!({ "error": "no such key" })),
            },
            ("PUT", key) if !key.is_empty() => {
                if req.body().len() > MAX_VALUE {
                    return json_response(413, &json!({ "error": "value larger than 64 KiB" }));
                }
                let value: Value = match serde_json::from_slice(req.body()) {
                    Ok(v) => v,
                    Err(e) => {
                        return json_response(400, &json!({ "error": format!("not JSON: {e}") }))
                    }
                };
                self.entries().insert(key.to_owned(), value.clone());
                self.changed(key, &value);
                json_response(200, &json!({ "key": key, "value": value }))
            }
            ("DELETE", key) if !key.is_empty() => match self.entries().remove(key) {
                Some(_) => {
                    self.changed(key, &Value::Null);
                    Response::status(204)
                }
                None => json_response(404, &json!({ "error": "no such key" })),
            },
            _ => json_response(405, &json!({ "error": "use GET, PUT or DELETE" })),
        }
    }
}

/// A WebSocket client that watches the changes.
struct Watcher;

impl Handler for Watcher {
    fn on_connect(&mut self, conn: &Conn) {
        let _ = conn.subscribe(CHANGES);
    }

    /// Any message is answered, so a client can tell that it is watching.
    fn on_text(&mut self, conn: &Conn, _text: &str) {
        let _ = conn.send_text(r#"{"watching":true}"#);
    }
}

export_plugin!(Kv);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testkit::{TestConn, TestHost, TestRequest};

    #[test]
    fn put_get_delete_and_watchers_hear_the_changes() {
        let host = TestHost::new();
        let kv = Kv::new(host.host()).unwrap();
        let put = TestRequest::plain("PUT", "/kv/color")
            .body(br#""blue""#)
            .decide(|r| kv.request(r));
        assert_eq!(put.status(), 200);
        let get = TestRequest::plain("GET", "/kv/color").decide(|r| kv.request(r));
        assert_eq!(get.status(), 200);
        assert!(get.text().contains("blue"), "{}", get.text());
        assert_eq!(
            TestRequest::plain("PUT", "/kv/x")
                .body(b"not json")
                .decide(|r| kv.request(r))
                .status(),
            400
        );
        assert_eq!(
            TestRequest::plain("DELETE", "/kv/color")
                .decide(|r| kv.request(r))
                .status(),
            204
        );
        assert_eq!(
            TestRequest::plain("GET", "/kv/color")
                .decide(|r| kv.request(r))
                .status(),
            404
        );
        // The changes went to the watchers' channel.
        assert_eq!(host.published().len(), 2);
        let mut watcher = TestRequest::upgrade("/kv")
            .decide(|r| kv.upgrade(r))
            .handler()
            .unwrap();
        let conn = TestConn::new(1);
        watcher.on_connect(&conn).unwrap();
        assert_eq!(conn.channels(), [CHANGES]);
    }
}
