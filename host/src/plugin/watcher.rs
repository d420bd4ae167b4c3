//! Hot reload triggers: the [`Reloader`] handle (used by the directory watcher, SIGHUP and the
//! admin endpoint) and the task that runs one reconciliation at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use tokio::sync::{mpsc, oneshot};

use super::registry::{is_plugin_file_name, Registry, ReloadReport};

/// How long the directory must be quiet before a reload after a change that may still be under
/// way (a file being written, removed, created): a file still being written is not loaded
/// half-way (and if it is, the ELF check refuses it until it changes again). A file renamed into
/// place or closed after writing is complete: that reloads at once.
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
        let pass = tokio::task::spawn_blocking(move || {
            let config = reg.reload_config();
            reg.reconcile(&d).map(|mut report| {
                report.config_error = config.err();
                report
            })
        });
        match pass.await {
            Ok(Ok(report)) => {
                if let Some(e) = &report.config_error {
                    tracing::error!(error = %e,
                        "config file not re-read: the running plugin sections stay");
                }
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

/// How often the watcher looks at whether the plugins directory itself was replaced.
const DIR_CHECK: Duration = Duration::from_secs(1);

/// The identity of a directory: a removed and recreated directory has another.
fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(dir)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

/// Watches `dir` until `stop` is cancelled, starting with `first` (the watch set up at start).
/// An inotify watch ends with its directory: when the directory is removed and created again
/// (a deploy that swaps it), the watch is set up again, logged, and a reload asked for.
pub(crate) async fn keep_watching(
    dir: PathBuf,
    reloader: Reloader,
    first: Option<Watch>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut current = first.map(|w| (dir_identity(&dir), w));
    let mut missing = false;
    let mut tick = tokio::time::interval(DIR_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let id = dir_identity(&dir);
        if id.is_none() {
            if !missing {
                tracing::warn!(dir = %dir.display(),
                    "the plugins directory is gone; watching for it to come back");
                missing = true;
            }
            current = None;
            continue;
        }
        if current.as_ref().is_some_and(|(known, _)| *known == id) {
            continue;
        }
        let again = missing || current.is_some();
        current = None;
        match watch(&dir, reloader.clone()) {
            Ok(w) => {
                if again {
                    tracing::info!(dir = %dir.display(),
                        "the plugins directory was replaced; watching it again and reloading");
                    reloader.request();
                }
                current = Some((id, w));
                missing = false;
            }
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e,
                    "cannot watch the plugins directory; trying again");
            }
        }
    }
}

/// A watch on a directory: it lasts as long as this value (its debounce thread ends with it).
#[derive(Debug)]
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
}

/// What an event in the plugins directory asks for.
#[derive(Debug, PartialEq, Eq)]
enum Reaction {
    /// A plugin file is complete (renamed into place, closed after writing): reload now.
    Now,
    /// A plugin file changed and may still be changing (created, written, removed): reload once
    /// the directory has been quiet for [`DEBOUNCE`].
    WhenQuiet,
    /// Nothing to do: not a plugin file, or only read (the host reads the files it loads).
    Nothing,
}

fn reaction(event: &notify::Event) -> Reaction {
    use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
    use notify::EventKind;
    if !event.paths.iter().any(|p| is_plugin_file_name(p)) {
        return Reaction::Nothing;
    }
    match event.kind {
        EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
        | EventKind::Access(AccessKind::Close(AccessMode::Write)) => Reaction::Now,
        EventKind::Access(_) => Reaction::Nothing,
        _ => Reaction::WhenQuiet,
    }
}

/// Watches `dir`; keep the returned value alive to keep watching.
pub(crate) fn watch(dir: &Path, reloader: Reloader) -> notify::Result<Watch> {
    let (changed, quiet) = std::sync::mpsc::channel::<()>();
    let debounced = reloader.clone();
    std::thread::Builder::new()
        .name("wshost-watch".into())
        .spawn(move || {
            use std::sync::mpsc::RecvTimeoutError;
            // Each change restarts the wait; the watcher's end (its sender dropped) ends this.
            while quiet.recv().is_ok() {
                loop {
                    match quiet.recv_timeout(DEBOUNCE) {
                        Ok(()) => {}
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                debounced.request();
            }
        })
        .map_err(notify::Error::io)?;
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) => match reaction(&event) {
                Reaction::Now => reloader.request(),
                Reaction::WhenQuiet => {
                    let _ = changed.send(());
                }
                Reaction::Nothing => {}
            },
            Err(e) => tracing::warn!(error = %e, "watching the plugins directory failed"),
        })?;
    notify::Watcher::watch(&mut watcher, dir, RecursiveMode::NonRecursive)?;
    Ok(Watch { _watcher: watcher })
}

#[cfg(test)]
mod tests {
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode,
    };
    use notify::{Event, EventKind};

    use super::{reaction, Reaction};

    fn event(kind: EventKind, paths: &[&str]) -> Event {
        paths
            .iter()
            .fold(Event::new(kind), |e, p| e.add_path(p.into()))
    }

    #[test]
    fn a_plugin_file_renamed_into_place_or_closed_after_writing_reloads_at_once() {
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        let both = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(reaction(&event(renamed, &["/p/libecho.so"])), Reaction::Now);
        assert_eq!(
            reaction(&event(both, &["/p/.libecho.so.tmp", "/p/libecho.so"])),
            Reaction::Now
        );
        assert_eq!(reaction(&event(closed, &["/p/libecho.so"])), Reaction::Now);
    }

    #[test]
    fn changes_that_may_still_be_under_way_wait_for_the_debounce() {
        for kind in [
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Create(CreateKind::File),
            EventKind::Remove(RemoveKind::File),
        ] {
            assert_eq!(
                reaction(&event(kind, &["/p/libecho.so"])),
                Reaction::WhenQuiet
            );
        }
    }

    #[test]
    fn reads_and_other_files_change_nothing() {
        // The host reading a plugin (to copy it) is no change.
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
        ] {
            assert_eq!(
                reaction(&event(kind, &["/p/libecho.so"])),
                Reaction::Nothing
            );
        }
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert_eq!(
            reaction(&event(renamed, &["/p/.libecho.so.tmp"])),
            Reaction::Nothing
        );
        assert_eq!(
            reaction(&event(renamed, &["/p/notes.txt"])),
            Reaction::Nothing
        );
    }
}
