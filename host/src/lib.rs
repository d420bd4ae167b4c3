//! wshost: a WebSocket server whose handlers are plugins.
//!
//! Each WebSocket upgrade request is handed to the plugin serving its path as a ring-style
//! request; the plugin's response decides (101 with callbacks accepts, any other status
//! refuses), and its callbacks receive the connection's events. Plain requests go to the
//! plugin's request handler. See the `plugin-api` crate for the plugin side.
//!
//! # Layout
//!
//! - [`config`]: [`Config`], every limit with its default.
//! - `server`: the accept loop, HTTP/1.1 and HTTP/2 connections (hyper), graceful shutdown.
//! - `http`: routing of plain requests and upgrades to plugins.
//! - `ws`: the handshake, the session (socket events → callbacks, send queue → socket) and
//!   the connection handle plugins hold.
//! - [`channels`]: host-owned publish/subscribe; [`bus`]: sharing channels across hosts
//!   through Redis.
//! - [`plugin`]: loading (the only `unsafe` module), the probe process, the registry and
//!   route table, hot reload, each plugin's own runtime and the watchdog (`plugin::exec`),
//!   retirement of generations off the I/O threads.
//! - [`admin`]: the admin endpoint (`/status`, `/reload`) and its client.
//!
//! The binary (`src/bin/wshost/`: the command line, the config file, the scaffold) parses
//! its settings into a [`Config`], installs logging, binds, and calls
//! [`Server::serve`]. `docs/architecture.md` shows the layers, the threads, and the path of a
//! message and of a reload.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

pub mod admin;
mod budget;
pub mod bus;
pub mod channels;
pub mod config;
mod context;
mod http;
pub mod limits;
pub mod metrics;
pub mod plugin;
mod proxy;
mod server;
pub mod tls;
pub mod units;
mod ws;

pub use config::Config;
pub use plugin::registry::Registry;
pub use plugin::watcher::Reloader;
pub use plugin::LoadError;

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plugins directory could not be read.
    #[error("cannot read the plugins directory {}: {source}", dir.display())]
    PluginsDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// The private directory for mapped plugin copies could not be created.
    #[error("cannot create a private directory for plugin copies: {0}")]
    PrivateDir(std::io::Error),
    /// The channel bus could not be set up.
    #[error("--bus: {0}")]
    Bus(#[from] bus::BusError),
}

/// A host with its plugins loaded, ready to serve.
pub struct Server {
    config: Config,
    registry: Arc<Registry>,
    reloader: Reloader,
    /// The watch on the plugins directory, set up before the first load.
    watcher: Option<plugin::watcher::Watch>,
    reload_rx: tokio::sync::mpsc::UnboundedReceiver<
        Option<tokio::sync::oneshot::Sender<plugin::registry::ReloadReport>>,
    >,
    admin: Option<(admin::AdminListener, admin::AdminGuard)>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    bus: Option<(bus::Pending, bus::BusMetrics)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Loads every plugin of `config.plugins_dir`; a file that is not a valid plugin is logged
    /// and skipped.
    pub fn new(config: Config) -> Result<Self, Error> {
        let http2 = config.http2_max_streams > 0;
        let tls = config
            .tls
            .as_ref()
            .map(|files| tls::acceptor(files, http2))
            .transpose()?;
        let (hub, bus) = match &config.bus {
            bus::BusConfig::Memory => (channels::Hub::default(), None),
            bus::BusConfig::Redis(redis) => {
                let (link, pending) = bus::redis(redis)?;
                let bus_metrics = link.metrics.clone();
                (
                    channels::Hub::with_bus(Box::new(link)),
                    Some((pending, bus_metrics)),
                )
            }
        };
        let hub = Arc::new(hub);
        plugin::retire::set_slow(config.slow_callback);
        let registry = Registry::new(hub, config.probe.clone())
            .map_err(Error::PrivateDir)?
            .with_plugin_sections(config.plugins.clone())
            .with_config_file(
                config
                    .config_file
                    .clone()
                    .zip(config.section_reader.clone()),
            )
            .with_max_plugin_size(config.max_plugin_size)
            .with_plugin_workers(config.plugin_workers)
            .with_isolation(config.isolation.clone())
            .with_replaced_grace(config.replaced_grace);
        // Watch first, then load: a file put in meanwhile is seen by one or the other (the
        // watch's reload waits until serving starts).
        let (reloader, reload_rx) = Reloader::new();
        let watcher = if config.watch {
            match plugin::watcher::watch(&config.plugins_dir, reloader.clone()) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::error!(dir = %config.plugins_dir.display(), error = %e,
                        "cannot watch the plugins directory; reload with SIGHUP or `wshost reload`");
                    None
                }
            }
        } else {
            None
        };
        registry
            .reconcile(&config.plugins_dir)
            .map_err(|source| Error::PluginsDir {
                dir: config.plugins_dir.clone(),
                source,
            })?;
        Ok(Self {
            config,
            registry: Arc::new(registry),
            reloader,
            reload_rx,
            watcher,
            admin: None,
            tls,
            bus,
        })
    }

    /// Also serves the admin endpoint (`/status`, `/reload`, `/metrics`) on `listener`.
    pub fn with_admin(mut self, listener: admin::AdminListener, guard: admin::AdminGuard) -> Self {
        self.admin = Some((listener, guard));
        self
    }

    /// A handle that asks the server to rescan its plugins directory (e.g. on SIGHUP).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Serves `listener` until `shutdown` resolves, then closes every connection with 1001,
    /// waits for their close handshakes (up to `shutdown_timeout`) and shuts the plugins down.
    /// Meanwhile it reloads plugins when the directory changes (if `watch`) or when asked.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let bus_metrics = self.bus.map(|(pending, metrics)| {
            pending.spawn(Arc::downgrade(self.registry.hub()));
            metrics
        });
        let dir = self.config.plugins_dir.clone();
        let reloads = tokio::spawn(plugin::watcher::run(
            Arc::clone(&self.registry),
            dir.clone(),
            self.reload_rx,
        ));
        let stop_watching = tokio_util::sync::CancellationToken::new();
        if self.config.watch {
            tokio::spawn(plugin::watcher::keep_watching(
                dir.clone(),
                self.reloader.clone(),
                self.watcher,
                stop_watching.clone(),
            ));
        }
        let budget = Arc::new(budget::MemoryBudget::new(self.config.max_buffered_total));
        let metrics = Arc::new(metrics::Metrics::new(
            Arc::clone(&self.registry),
            Arc::clone(&budget),
            bus_metrics,
        ));
        let ctx = Arc::new(context::Ctx::new(
            self.config,
            Arc::clone(&self.registry),
            self.tls,
            Arc::clone(&metrics),
            budget,
        ));
        if let Some((admin, guard)) = self.admin {
            tokio::spawn(admin::serve(
                admin,
                guard,
                Arc::clone(&self.registry),
                metrics,
                self.reloader.clone(),
                ctx.shutdown.clone(),
            ));
        }
        server::run(ctx, listener, shutdown).await;
        stop_watching.cancel();
        reloads.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// The crate's top-level modules and which of the others each one names (`crate::x`).
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut files = vec![src.clone()];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            let rel = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let top = rel.split(['/', '.']).next().unwrap().to_owned();
            if matches!(top.as_str(), "lib" | "bin") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let names = graph.entry(top.clone()).or_default();
            for part in text.split("crate::").skip(1) {
                let name: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    names.insert(name);
                }
            }
        }
        graph
    }

    #[test]
    fn top_level_modules_import_each_other_without_cycles() {
        let graph = imports();
        // Depth-first search for a path back to the start.
        fn reaches(
            graph: &BTreeMap<String, BTreeSet<String>>,
            from: &str,
            to: &str,
            seen: &mut BTreeSet<String>,
        ) -> bool {
            for next in graph.get(from).into_iter().flatten() {
                if next == to {
                    return true;
                }
                if seen.insert(next.clone()) && reaches(graph, next, to, seen) {
                    return true;
                }
            }
            false
        }
        for module in graph.keys() {
            assert!(
                !reaches(&graph, module, module, &mut BTreeSet::new()),
                "`{module}` imports itself through others: {graph:?}"
            );
        }
        assert!(
            graph.len() > 10,
            "the crate's modules were not found: {graph:?}"
        );
    }
}
