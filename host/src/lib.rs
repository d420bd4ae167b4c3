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
//! - `server`: the accept loop, HTTP/1.1 connections (hyper), graceful shutdown.
//! - `http`: routing of plain requests and upgrades to plugins.
//! - `ws`: the handshake, the session (socket events → callbacks, send queue → socket) and
//!   the connection handle plugins hold.
//! - [`channels`]: host-owned publish/subscribe.
//! - [`plugin`]: loading (the only `unsafe` module), the registry and route table.
//!
//! The binary (`main.rs`) parses the command line, installs logging, binds, and calls
//! [`Server::serve`].

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

pub mod channels;
pub mod cli;
pub mod config;
mod http;
pub mod plugin;
mod server;
mod ws;

pub use config::Config;
pub use plugin::registry::Registry;
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
    /// The private directory for mapped plugin copies could not be created.
    #[error("cannot create a private directory for plugin copies: {0}")]
    PrivateDir(std::io::Error),
}

/// A host with its plugins loaded, ready to serve.
#[derive(Debug)]
pub struct Server {
    config: Config,
    registry: Arc<Registry>,
}

impl Server {
    /// Loads every plugin of `config.plugins_dir`; a file that is not a valid plugin is logged
    /// and skipped.
    pub fn new(config: Config) -> Result<Self, Error> {
        let hub = Arc::new(channels::Hub::default());
        let registry = Registry::new(hub).map_err(Error::PrivateDir)?;
        registry
            .load_dir(&config.plugins_dir)
            .map_err(|source| Error::PluginsDir {
                dir: config.plugins_dir.clone(),
                source,
            })?;
        Ok(Self {
            config,
            registry: Arc::new(registry),
        })
    }

    /// The loaded plugins.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Serves `listener` until `shutdown` resolves, then closes every connection with 1001,
    /// waits for their close handshakes (up to `shutdown_timeout`) and shuts the plugins down.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let ctx = Arc::new(server::Ctx::new(self.config, self.registry));
        server::run(ctx, listener, shutdown).await;
    }
}

/// Loads the plugins of `config` and serves `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    Server::new(config)?.serve(listener, shutdown).await;
    Ok(())
}
