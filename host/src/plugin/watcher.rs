//! Hot reload triggers: the [`Reloader`] handle (used by the directory watcher, SIGHUP and the
//! admin endpoint) and the task that runs one reconciliation at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_mini::{new_debouncer, DebounceEventResult, Debouncer};
use tokio::sync::{mpsc, oneshot};

use super::registry::{is_plugin_file_name, Registry, ReloadReport};

/// How long the directory must be quiet before a reload: a file still being written is not
/// loaded half-way (and if it is, the ELF check refuses it until it changes again).
pub const DEBOUNCE: Duration = Duration::from_millis(100);

type Request = Option<oneshot::Sender<ReloadReport>>;

/// Asks the host to rescan its plugins directory.
#[derive(Debug, Clone)]
pub struct Reloader {
    tx: mpsc::UnboundedSender<Request>,
}

impl Reloader {
    /// Creates a reloader and the receiver [`run`] consumes.
    pub(crate) fn new() -> (Self, mpsc::UnboundedReceiver<Request>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Asks for a rescan and returns at once.
    pub fn request(&self) {
        let _ = self.tx.send(None);
    }

    /// Asks for a rescan and waits for what it changed.
    pub async fn reload(&self) -> Option<ReloadReport> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Some(tx)).ok()?;
        rx.await.ok()
    }
}

/// Runs reconciliations as they are asked for; requests that pile up meanwhile share one.
pub(crate) async fn run(
    registry: Arc<Registry>,
    dir: PathBuf,
    mut rx: mpsc::UnboundedReceiver<Request>,
) {
    while let Some(first) = rx.recv().await {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let (reg, d) = (Arc::clone(&registry), dir.clone());
        match tokio::task::spawn_blocking(move || reg.reconcile(&d)).await {
            Ok(Ok(report)) => {
                for tx in waiting.into_iter().flatten() {
                    let _ = tx.send(report.clone());
                }
            }
            Ok(Err(e)) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot read the plugins directory")
            }
            Err(e) => tracing::error!(error = %e, "plugin reload task failed"),
        }
    }
}

/// Watches `dir`; keep the returned value alive to keep watching.
pub(crate) fn watch(
    dir: &Path,
    reloader: Reloader,
) -> notify::Result<Debouncer<notify::RecommendedWatcher>> {
    let mut debouncer = new_debouncer(DEBOUNCE, move |res: DebounceEventResult| match res {
        Ok(events) => {
            if events.iter().any(|e| is_plugin_file_name(&e.path)) {
                reloader.request();
            }
        }
        Err(e) => tracing::warn!(error = %e, "watching the plugins directory failed"),
    })?;
    debouncer
        .watcher()
        .watch(dir, RecursiveMode::NonRecursive)?;
    Ok(debouncer)
}
