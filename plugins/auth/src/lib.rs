//! `auth`: an echo behind a slow token check, done the right way. The check (a database or an
//! auth service in real life; here a table from the config file and a configurable delay) runs
//! on the plugin's own small pool of lookup threads: `upgrade` defers its decision
//! (`Request::defer`) and returns at once, so no worker of the host waits on the lookup. The
//! pool's queue is bounded: when it is full, the upgrade is refused with 503 at once.
//!
//! Config (`[plugin.auth.config]`): `tokens` (comma-separated; default `letmein`),
//! `lookup_ms` (the lookup's delay; default 50), `lookup_threads` (default 4).
//! Connect with `ws://HOST/auth?token=letmein`.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use plugin_api::{
    export_plugin, Conn, Handler, Host, Plugin, PluginError, Request, Responder, Response,
};

/// A lookup waiting for a thread: the token, and who to answer.
type Job = (String, Responder);

/// Lookups queued beyond the busy threads before upgrades are refused.
const QUEUE: usize = 256;

/// The plugin.
pub struct Auth {
    jobs: Mutex<Option<SyncSender<Job>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

/// The slow check: is `token` one of `tokens`?
fn check(tokens: &[String], delay: Duration, token: &str) -> bool {
    std::thread::sleep(delay);
    tokens.iter().any(|t| t == token)
}

fn lookups(jobs: Arc<Mutex<Receiver<Job>>>, tokens: Arc<Vec<String>>, delay: Duration) {
    loop {
        let job = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok((token, responder)) = job else {
            return; // the plugin shut down
        };
        let answer = if check(&tokens, delay, &token) {
            Response::accept(Echo)
        } else {
            Response::reject(403, "unknown token\n")
        };
        // Err(Expired): the host gave up waiting (the client got 503); nothing to do.
        let _ = responder.respond(answer);
    }
}

impl Plugin for Auth {
    const NAME: &'static str = "auth";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const ROUTES: &'static [&'static str] = &["/auth"];

    fn new(host: Host) -> Result<Self, PluginError> {
        let config = host.config();
        let tokens: Vec<String> = config
            .get("tokens")
            .map_or("letmein", String::as_str)
            .split(',')
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        let number = |key: &str, default: u64| -> Result<u64, PluginError> {
            config.get(key).map_or(Ok(default), |v| {
                v.parse()
                    .map_err(|_| PluginError::new(format!("config `{key}` must be a number")))
            })
        };
        let delay = Duration::from_millis(number("lookup_ms", 50)?);
        let count = number("lookup_threads", 4)?.clamp(1, 64);
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let (rx, tokens) = (Arc::new(Mutex::new(rx)), Arc::new(tokens));
        let threads = (0..count)
            .map(|i| {
                let (rx, tokens) = (Arc::clone(&rx), Arc::clone(&tokens));
                std::thread::Builder::new()
                    .name(format!("auth-lookup-{i}"))
                    .spawn(move || lookups(rx, tokens, delay))
                    .map_err(|e| PluginError::new(format!("cannot start a lookup thread: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Auth {
            jobs: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    fn upgrade(&self, req: &Request<'_>) -> Response {
        let Some(responder) = req.defer() else {
            return Response::reject(503, "this host cannot defer decisions\n");
        };
        let token = req.query_param("token").unwrap_or_default();
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(jobs) = jobs.as_ref() else {
            let _ = responder.respond(Response::reject(503, "shutting down\n"));
            return Response::deferred();
        };
        match jobs.try_send((token, responder)) {
            Ok(()) => {}
            Err(
                TrySendError::Full((_, responder)) | TrySendError::Disconnected((_, responder)),
            ) => {
                let _ = responder.respond(Response::reject(503, "too many logins at once\n"));
            }
        }
        Response::deferred()
    }

    fn shutdown(&self) {
        // Closing the queue ends the lookup threads once they are done; wait for them.
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// An authenticated connection: echoes.
struct Echo;

impl Handler for Echo {
    fn on_text(&mut self, conn: &Conn, text: &str) {
        let _ = conn.send_text(text);
    }
    fn on_binary(&mut self, conn: &Conn, data: &[u8]) {
        let _ = conn.send_binary(data);
    }
}

export_plugin!(Auth);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_knows_its_tokens() {
        let tokens = vec!["a".to_owned(), "b".to_owned()];
        assert!(check(&tokens, Duration::ZERO, "a"));
        assert!(!check(&tokens, Duration::ZERO, "c"));
    }

    use plugin_api::testkit::{TestConn, TestHost, TestRequest};

    fn auth() -> Auth {
        let host = TestHost::new()
            .config("tokens", "letmein,other")
            .config("lookup_ms", "1");
        Auth::new(host.host()).unwrap()
    }

    #[test]
    fn a_known_token_is_accepted_after_the_deferred_lookup() {
        let auth = auth();
        let answer = TestRequest::upgrade("/auth?token=letmein").decide(|r| auth.upgrade(r));
        assert_eq!(answer.status(), 101);
        let mut handler = answer.handler().unwrap();
        let conn = TestConn::new(1);
        handler.on_text(&conn, "ping").unwrap();
        assert_eq!(conn.texts(), ["ping"]);
        auth.shutdown();
    }

    #[test]
    fn an_unknown_or_missing_token_is_refused() {
        let auth = auth();
        let answer = TestRequest::upgrade("/auth?token=nope").decide(|r| auth.upgrade(r));
        assert_eq!(answer.status(), 403);
        let answer = TestRequest::upgrade("/auth").decide(|r| auth.upgrade(r));
        assert_ne!(answer.status(), 101);
        auth.shutdown();
    }
}
