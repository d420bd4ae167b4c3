//! `ticker`: pushes `tick N` to every connection on `/ticker` from a plugin thread.
//!
//! Shows connection handles stored and used from another thread. The interval is the config
//! key `interval_ms` (default 1000).

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use plugin_api::{export_plugin, Conn, Handler, Host, Plugin, PluginError, Request, Response};

#[derive(Debug, Default)]
struct Shared {
    conns: Mutex<Vec<Conn>>,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// The ticker plugin: one thread, any number of listeners.
#[derive(Debug)]
pub struct Ticker {
    shared: Arc<Shared>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl Plugin for Ticker {
    const NAME: &'static str = "ticker";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const ROUTES: &'static [&'static str] = &["/ticker"];

    fn new(host: Host) -> Result<Self, PluginError> {
        let every = match host.config().get("interval_ms") {
            Some(v) => v
                .parse()
                .map_err(|_| PluginError::new(format!("interval_ms: `{v}` is not a number")))?,
            None => 1000,
        };
        let shared = Arc::new(Shared::default());
        let worker = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("ticker".into())
            .spawn(move || tick(&worker, Duration::from_millis(every)))
            .map_err(|e| PluginError::new(format!("cannot start the ticker thread: {e}")))?;
        Ok(Ticker {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn upgrade(&self, _req: &Request<'_>) -> Response {
        Response::accept(Listener {
            shared: Arc::clone(&self.shared),
        })
    }

    fn shutdown(&self) {
        *self
            .shared
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.wake.notify_all();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

fn tick(shared: &Shared, every: Duration) {
    let mut n: u64 = 0;
    loop {
        let stop = shared.stop.lock().unwrap_or_else(PoisonError::into_inner);
        let (stop, _) = shared
            .wake
            .wait_timeout_while(stop, every, |stop| !*stop)
            .unwrap_or_else(PoisonError::into_inner);
        if *stop {
            return;
        }
        drop(stop);
        n += 1;
        let msg = format!("tick {n}");
        let mut conns = shared.conns.lock().unwrap_or_else(PoisonError::into_inner);
        // Sends never block; a connection that is gone is forgotten.
        conns.retain(|c| c.send_text(&msg).is_ok());
    }
}

struct Listener {
    shared: Arc<Shared>,
}

impl Handler for Listener {
    fn on_connect(&mut self, conn: &Conn) {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn.clone());
    }

    fn on_close(&mut self, conn: &Conn, _code: u16, _reason: &str) {
        let id = conn.id();
        self.shared
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|c| c.id() != id);
    }
}

export_plugin!(Ticker);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testkit::{TestConn, TestHost, TestRequest};

    #[test]
    fn listeners_get_ticks_and_shutdown_stops_the_thread() {
        let host = TestHost::new().config("interval_ms", "5");
        let ticker = Ticker::new(host.host()).unwrap();
        let mut listener = TestRequest::upgrade("/ticker")
            .decide(|r| ticker.upgrade(r))
            .handler()
            .unwrap();
        let conn = TestConn::new(1);
        listener.on_connect(&conn).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while conn.texts().len() < 2 {
            assert!(std::time::Instant::now() < deadline, "no ticks");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(conn.texts()[0].starts_with("tick "));
        ticker.shutdown();
        assert!(
            ticker.thread.lock().unwrap().is_none(),
            "the thread was joined"
        );
    }

    #[test]
    fn a_bad_interval_refuses_the_plugin() {
        let host = TestHost::new().config("interval_ms", "soon");
        assert!(Ticker::new(host.host()).is_err());
    }
}
