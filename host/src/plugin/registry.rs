//! The registry: the loaded plugins and the route table, swapped atomically as one snapshot;
//! reconciling them with the plugins directory (add, replace as a new generation, remove).

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use super::probe::Probe;
use super::{Candidate, LoadError, LoadedPlugin};
use crate::channels::Hub;

/// One consistent view of which plugin serves what.
#[derive(Debug, Default)]
pub struct RouteTable {
    plugins: BTreeMap<String, Arc<LoadedPlugin>>,
    /// Route prefix → plugin, longest prefix first.
    routes: Vec<(String, Arc<LoadedPlugin>)>,
}

impl RouteTable {
    fn new(plugins: BTreeMap<String, Arc<LoadedPlugin>>) -> Self {
        let mut routes: Vec<(String, Arc<LoadedPlugin>)> = plugins
            .values()
            .flat_map(|p| p.routes.iter().map(move |r| (r.clone(), Arc::clone(p))))
            .collect();
        routes.sort_by_key(|(r, _)| std::cmp::Reverse(r.len()));
        Self { plugins, routes }
    }

    /// The plugin serving `path`: the longest route prefix that matches on whole segments.
    pub fn route(&self, path: &str) -> Option<&Arc<LoadedPlugin>> {
        self.route_prefix(path).map(|(_, p)| p)
    }

    /// As [`RouteTable::route`], with the route prefix that matched.
    pub fn route_prefix(&self, path: &str) -> Option<(&str, &Arc<LoadedPlugin>)> {
        self.routes
            .iter()
            .find(|(prefix, _)| LoadedPlugin::route_matches(prefix, path))
            .map(|(prefix, p)| (prefix.as_str(), p))
    }

    /// The loaded plugins, by name.
    pub fn plugins(&self) -> impl Iterator<Item = &Arc<LoadedPlugin>> {
        self.plugins.values()
    }
}

/// What identifies one version of a file: a change of any of these is a new build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Fingerprint {
    fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

#[derive(Debug)]
struct FileRecord {
    fingerprint: Fingerprint,
    /// The plugin this file last loaded successfully, if any.
    plugin: Option<String>,
    /// Load it again even if unchanged (its plugin's config file section changed).
    stale: bool,
}

/// What only reconciliations use; its lock is held for a whole pass (probes included), and
/// nothing that serves requests, status or metrics ever takes it.
#[derive(Debug, Default)]
struct State {
    files: BTreeMap<PathBuf, FileRecord>,
    /// The last generation number given to each plugin name.
    generations: BTreeMap<String, u64>,
}

/// What one reconciliation with the plugins directory changed.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Plugins loaded or replaced: `name generation N`.
    pub loaded: Vec<String>,
    /// Plugins unrouted because their file was removed.
    pub unloaded: Vec<String>,
    /// Files refused, with the reason.
    pub refused: Vec<String>,
    /// The config file could not be read again: the running plugin sections stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
}

/// One generation of a plugin being served (the current one, or a replaced one with open
/// connections): what `/status` and `/metrics` report.
#[derive(Debug, Clone)]
pub struct GenerationInfo {
    /// The plugin's name.
    pub name: String,
    /// The generation number.
    pub generation: u64,
    /// The plugin's version in this generation.
    pub version: String,
    /// Whether new connections go to it.
    pub current: bool,
    /// Connections open on it.
    pub open_connections: u64,
    /// The file it was loaded from.
    pub file: PathBuf,
    /// Its routes.
    pub routes: Vec<String>,
    /// The plugin-api version it was built against.
    pub api_version: String,
}

/// The loaded plugins of a host, and where their private copies live.
#[derive(Debug)]
pub struct Registry {
    table: ArcSwap<RouteTable>,
    hub: Arc<Hub>,
    private_dir: tempfile::TempDir,
    /// Held while this host runs: a later host sweeps the folder only once it is free.
    _private_lock: std::fs::File,
    probe: Option<Probe>,
    state: Mutex<State>,
    /// Replaced generations that may still serve open connections (locked only briefly).
    retired: Mutex<Vec<Weak<LoadedPlugin>>>,
    loads_ok: std::sync::atomic::AtomicU64,
    loads_refused: std::sync::atomic::AtomicU64,
    sections: Mutex<BTreeMap<String, crate::plugin::PluginSection>>,
    /// The config file the sections come from, read again on every reload, and its reader.
    config_file: Option<(PathBuf, SectionReader)>,
    max_plugin_size: u64,
    /// Workers of a plugin's runtime unless its section sets its own; 0: plugins run on the
    /// calling runtime (a registry that only checks files).
    plugin_workers: usize,
    /// Where plugins run, and how worker processes start.
    isolation: crate::plugin::isolate::IsolationConfig,
    /// Cancelled at shutdown; every generation's closing token is a child of it.
    root: tokio_util::sync::CancellationToken,
    /// After a replacement, how long the old generation keeps its connections before they are
    /// closed with 1012; `None`: until they close.
    replaced_grace: Option<std::time::Duration>,
}

/// The plugin sections of a config file, by plugin name.
pub type Sections = BTreeMap<String, crate::plugin::PluginSection>;

/// Reads the `[plugin.NAME]` sections of a config file (the command line's reader: the
/// registry does not parse config files itself).
#[derive(Clone)]
pub struct SectionReader(pub Arc<ReadSections>);

/// What a [`SectionReader`] calls: the file in, its sections or why not out.
pub type ReadSections = dyn Fn(&Path) -> Result<Sections, String> + Send + Sync;

impl std::fmt::Debug for SectionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectionReader")
    }
}

/// The start of a host's private folder's name (its copies of the plugin files).
const PRIVATE_PREFIX: &str = "wshost-plugins-";

/// The file in a private folder its host holds locked while it runs.
const PRIVATE_LOCK: &str = ".host.lock";

/// Locks the private folder `dir` as this host's for as long as the returned file is open.
fn lock_private_dir(dir: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::File::create(dir.join(PRIVATE_LOCK))?;
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::Error(e) => e,
        std::fs::TryLockError::WouldBlock => std::io::Error::other("locked by another process"),
    })?;
    Ok(file)
}

/// Removes the private folders in `temp` of hosts that no longer run (killed with SIGKILL, a
/// host cannot remove its own); returns how many. A folder is stale when its lock file can be
/// locked: a running host holds it (a lock, unlike a pid, means the same across containers
/// that share the folder). A folder without a lock file is left alone.
fn sweep_stale_private_dirs(temp: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return 0;
    };
    let mut swept = 0;
    for entry in entries.flatten() {
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(PRIVATE_PREFIX));
        if !ours || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(lock) = std::fs::File::open(entry.path().join(PRIVATE_LOCK)) else {
            continue;
        };
        if lock.try_lock().is_ok() && std::fs::remove_dir_all(entry.path()).is_ok() {
            swept += 1;
        }
    }
    swept
}

/// The default of `--max-plugin-size`: 256 MiB.
pub const DEFAULT_MAX_PLUGIN_SIZE: u64 = 256 << 20;

impl Registry {
    /// An empty registry whose mapped copies go into a new private temporary directory. With
    /// `probe`, each file is loaded in a child process before the host maps it.
    pub fn new(hub: Arc<Hub>, probe: Option<Probe>) -> std::io::Result<Self> {
        let private_dir = tempfile::Builder::new().prefix(PRIVATE_PREFIX).tempdir()?;
        let private_lock = lock_private_dir(private_dir.path())?;
        if let Some(parent) = private_dir.path().parent() {
            let swept = sweep_stale_private_dirs(parent);
            if swept > 0 {
                tracing::info!(count = swept, dir = %parent.display(),
                    "removed private plugin folders of hosts that are gone");
            }
        }
        Ok(Self {
            table: ArcSwap::from_pointee(RouteTable::default()),
            hub,
            private_dir,
            _private_lock: private_lock,
            probe,
            state: Mutex::new(State::default()),
            retired: Mutex::new(Vec::new()),
            loads_ok: Default::default(),
            loads_refused: Default::default(),
            sections: Mutex::new(BTreeMap::new()),
            config_file: None,
            max_plugin_size: DEFAULT_MAX_PLUGIN_SIZE,
            plugin_workers: 0,
            isolation: crate::plugin::isolate::IsolationConfig::default(),
            root: Default::default(),
            replaced_grace: None,
        })
    }

    /// After a replacement, closes the old generation's connections with 1012 once `grace`
    /// has passed (zero: never; they close on their own).
    pub fn with_replaced_grace(mut self, grace: std::time::Duration) -> Self {
        self.replaced_grace = (!grace.is_zero()).then_some(grace);
        self
    }

    /// Closes every generation's connections (shutdown).
    pub fn close_all(&self) {
        self.root.cancel();
    }

    /// Runs plugins in worker processes as `isolation` says (by default, or per plugin).
    pub fn with_isolation(mut self, isolation: crate::plugin::isolate::IsolationConfig) -> Self {
        self.isolation = isolation;
        self
    }

    /// Applies the config file's `[plugin.NAME]` sections to the plugins loaded from now on.
    pub fn with_plugin_sections(
        self,
        sections: BTreeMap<String, crate::plugin::PluginSection>,
    ) -> Self {
        *self.sections.lock().unwrap_or_else(PoisonError::into_inner) = sections;
        self
    }

    /// Reads the plugin sections from the file with its reader again on every
    /// [`Registry::reload_config`].
    pub fn with_config_file(mut self, file: Option<(PathBuf, SectionReader)>) -> Self {
        self.config_file = file;
        self
    }

    /// Runs each plugin on a runtime of its own with `workers` threads (unless its config file
    /// section sets `workers`).
    pub fn with_plugin_workers(mut self, workers: usize) -> Self {
        self.plugin_workers = workers;
        self
    }

    /// Refuses plugin files larger than `bytes` without reading them.
    pub fn with_max_plugin_size(mut self, bytes: u64) -> Self {
        self.max_plugin_size = bytes;
        self
    }

    /// Reads the config file's plugin sections again (if the host has a config file). Plugins
    /// whose section changed load again as a new generation at the next reconciliation. On
    /// error the running sections stay.
    pub fn reload_config(&self) -> Result<(), String> {
        let Some((file, read)) = &self.config_file else {
            return Ok(());
        };
        let fresh = (read.0)(file)?;
        let changed: Vec<String> = {
            let mut sections = self.sections.lock().unwrap_or_else(PoisonError::into_inner);
            let names: HashSet<&String> = sections.keys().chain(fresh.keys()).collect();
            let changed = names
                .into_iter()
                .filter(|n| sections.get(*n) != fresh.get(*n))
                .cloned()
                .collect();
            *sections = fresh;
            changed
        };
        if !changed.is_empty() {
            tracing::info!(plugins = ?changed, file = %file.display(),
                "config file re-read: these plugins load again with their new sections");
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            for record in state.files.values_mut() {
                if record.plugin.as_ref().is_some_and(|p| changed.contains(p)) {
                    record.stale = true;
                }
            }
        }
        Ok(())
    }

    /// The `[plugin.NAME.config]` tables, by plugin name (what the probe creates plugins with).
    fn config_tables(&self) -> BTreeMap<String, super::PluginConfig> {
        self.sections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, s)| (name.clone(), super::PluginConfig::of(s)))
            .collect()
    }

    fn section(&self, name: &str) -> crate::plugin::PluginSection {
        self.sections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// The current route table.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// The channel hub plugins publish into.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Brings the loaded plugins in line with `dir` (see [`plugin_files`]): new files are
    /// loaded, changed files are loaded as a new generation of their plugin, and plugins whose
    /// file is gone are unrouted. Connections keep the generation they opened on. A file that
    /// fails is logged and skipped, and tried again once it changes; a failed replacement
    /// leaves the current generation serving.
    ///
    /// Within one pass files load in name order: a second file with a plugin name or a route
    /// that an earlier file of the same pass took is refused. Across passes, a new or changed
    /// file of an already loaded plugin replaces it.
    pub fn reconcile(&self, dir: &Path) -> std::io::Result<ReloadReport> {
        let files = plugin_files(dir)?;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut current = self.table.load().plugins.clone();
        let mut report = ReloadReport::default();
        let mut retired = Vec::new();
        let mut unrouted: Vec<Arc<LoadedPlugin>> = Vec::new();
        let mut replaced_generations: Vec<Arc<LoadedPlugin>> = Vec::new();

        let present: HashSet<&PathBuf> = files.iter().collect();
        let gone: Vec<PathBuf> = state
            .files
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in gone {
            let record = state.files.remove(&path).expect("listed above");
            let Some(name) = record.plugin else { continue };
            if current.get(&name).is_some_and(|p| p.file == path) {
                let old = current.remove(&name).expect("checked above");
                report.unloaded.push(name);
                unrouted.push(Arc::clone(&old));
                retired.push(old);
            }
        }

        let mut loaded_this_pass: HashSet<String> = HashSet::new();
        let mut announcements = Vec::new();
        for file in files {
            let Ok(fingerprint) = Fingerprint::of(&file) else {
                continue;
            };
            let previous = state.files.get(&file);
            if previous.is_some_and(|r| r.fingerprint == fingerprint && !r.stale) {
                continue;
            }
            let previous_plugin = previous.and_then(|r| r.plugin.clone());
            let started = Instant::now();
            let isolated = self.load_isolated(&file, &current, &loaded_this_pass, &mut state);
            let loaded = if let Some(isolated) = isolated {
                isolated
            } else {
                Candidate::open(
                    &file,
                    self.private_dir.path(),
                    self.probe.as_ref(),
                    self.max_plugin_size,
                    &self.config_tables(),
                )
                .and_then(|mut candidate| {
                    let section = self.section(&candidate.name);
                    if section.memory_limit.is_some() || section.callback_timeout.is_some() {
                        tracing::warn!(plugin = %candidate.name,
                            "memory_limit and callback_timeout apply only to a plugin with \
                             isolation = \"process\"; this one runs inline, without them");
                    }
                    if let Some(routes) = &section.routes {
                        candidate.mount(routes)?;
                    }
                    self.admit(&candidate, &current, &loaded_this_pass)?;
                    let generation = state
                        .generations
                        .entry(candidate.name.clone())
                        .and_modify(|g| *g += 1)
                        .or_insert(1);
                    let limits = section.limits;
                    let route_limits = route_limits(&section, &candidate.name, &candidate.routes);
                    let name = candidate.name.clone();
                    let plugin = candidate.create(
                        *generation,
                        &self.hub,
                        super::PluginConfig::of(&section),
                        limits,
                        route_limits,
                    )?;
                    if self.plugin_workers == 0 {
                        return Ok(plugin);
                    }
                    let workers = section.workers.unwrap_or(self.plugin_workers);
                    let exec =
                        super::exec::executor(&name, workers).map_err(|e| LoadError::Create {
                            name: name.clone(),
                            file: file.clone(),
                            reason: format!("cannot start its {workers} worker threads: {e}"),
                        })?;
                    Ok(plugin.with_executor(exec))
                })
            };
            match loaded {
                Ok(plugin) => {
                    let plugin = Arc::new(plugin.with_closing(&self.root));
                    plugin.start_events();
                    let load_ms = crate::units::log_ms(started.elapsed());
                    let replaced = current.insert(plugin.name.clone(), Arc::clone(&plugin));
                    if let Some(old) = replaced.as_ref() {
                        retired.push(Arc::clone(old));
                        replaced_generations.push(Arc::clone(old));
                    }
                    report
                        .loaded
                        .push(format!("{} generation {}", plugin.name, plugin.generation));
                    loaded_this_pass.insert(plugin.name.clone());
                    state.files.insert(
                        file,
                        FileRecord {
                            fingerprint,
                            plugin: Some(plugin.name.clone()),
                            stale: false,
                        },
                    );
                    announcements.push((plugin, replaced.is_some(), load_ms));
                    self.loads_ok
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(file = %file.display(), "plugin refused: {e}");
                    self.loads_refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    report.refused.push(e.to_string());
                    state.files.insert(
                        file,
                        FileRecord {
                            fingerprint,
                            plugin: previous_plugin,
                            stale: false,
                        },
                    );
                }
            }
        }

        drop(state);
        // Swap first, then say so: whoever reads the log line finds the new table in place.
        self.table.store(Arc::new(RouteTable::new(current)));
        for old in unrouted {
            tracing::info!(plugin = %old.name, generation = old.generation,
                file = %old.file.display(), "plugin unrouted: its file was removed");
        }
        for (plugin, replaced, load_ms) in announcements {
            tracing::info!(
                plugin = %plugin.name, version = %plugin.version,
                generation = plugin.generation, routes = ?plugin.routes,
                plugin_api = %plugin.api_version, file = %plugin.file.display(), load_ms,
                mapped_libraries = super::mapped_libraries(),
                "{}", if replaced { "plugin reloaded" } else { "plugin loaded" });
        }
        let mut retired_list = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        for old in &replaced_generations {
            old.replaced(self.replaced_grace);
        }
        for old in retired {
            let open = old.open_connections();
            tracing::info!(plugin = %old.name, generation = old.generation, open_connections = open,
                "previous generation retired; it serves its open connections until they close");
            retired_list.push(Arc::downgrade(&old));
        }
        retired_list.retain(|w| w.strong_count() > 0);
        Ok(report)
    }

    /// Loads `file` as a process-isolated plugin if its section (or the host's default) says
    /// so: a worker process maps it and reports its identity; the host never maps it. `None`
    /// if the plugin runs inline (the worker only read its name).
    fn load_isolated(
        &self,
        file: &Path,
        current: &BTreeMap<String, Arc<LoadedPlugin>>,
        loaded_this_pass: &HashSet<String>,
        state: &mut State,
    ) -> Option<Result<LoadedPlugin, LoadError>> {
        let iso = &self.isolation;
        let exe = iso.exe.clone()?;
        let any = iso.process
            || self
                .sections
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .any(|s| s.process == Some(true));
        if !any {
            return None;
        }
        if let Err(e) = super::loader::check_original(file, self.max_plugin_size) {
            return Some(Err(e));
        }
        let private = match super::loader::private_copy(file, self.private_dir.path()) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let remove = |r: LoadError| {
            let _ = std::fs::remove_file(&private);
            Some(Err(r))
        };
        if let Err(e) = super::loader::check_elf(file, &private) {
            return remove(e);
        }
        let settings = |callback_timeout: Option<std::time::Duration>| super::isolate::Isolation {
            exe: exe.clone(),
            callback_timeout: Some(callback_timeout.unwrap_or(iso.callback_timeout))
                .filter(|d| !d.is_zero()),
            start_timeout: iso.start_timeout,
        };
        let threads = self.plugin_workers.max(2);
        let started =
            match super::isolate::supervisor::start(&settings(None), file, &private, threads) {
                Ok(s) => s,
                Err(e) => return remove(e),
            };
        let name = started.identity.name.clone();
        let section = self.section(&name);
        if !section.process.unwrap_or(iso.process) {
            started.discard();
            let _ = std::fs::remove_file(&private);
            return None;
        }
        let mut routes = started.identity.routes.clone();
        if let Some(mounts) = &section.routes {
            if let Err(e) = super::check_mounts(&name, file, mounts) {
                started.discard();
                return remove(e);
            }
            routes = mounts.clone();
        }
        if let Err(e) = self.admit_named(&name, &routes, file, current, loaded_this_pass) {
            started.discard();
            return remove(e);
        }
        // Counted only once it loads: a refused file takes no generation number.
        let generation = state.generations.get(&name).copied().unwrap_or(0) + 1;
        let limits = section.limits;
        let route_limits = route_limits(&section, &name, &routes);
        let identity = started.identity.clone();
        let threads = section.workers.unwrap_or(threads).max(1);
        let supervisor = super::isolate::Supervisor::create(
            started,
            settings(section.callback_timeout),
            file,
            private.clone(),
            threads,
            generation,
            super::PluginConfig::of(&section),
            section.memory_limit,
            Arc::clone(&self.hub),
        );
        match supervisor {
            Ok(sv) => Some(Ok({
                state.generations.insert(name, generation);
                LoadedPlugin::isolated(
                    sv,
                    identity,
                    routes,
                    file.to_owned(),
                    generation,
                    limits,
                    route_limits,
                )
            })),
            Err(e) => remove(e),
        }
    }

    /// Whether `candidate` may join the plugins in `current`.
    fn admit(
        &self,
        candidate: &Candidate,
        current: &BTreeMap<String, Arc<LoadedPlugin>>,
        loaded_this_pass: &HashSet<String>,
    ) -> Result<(), LoadError> {
        self.admit_named(
            &candidate.name,
            &candidate.routes,
            &candidate.file,
            current,
            loaded_this_pass,
        )
    }

    /// Whether plugin `name` of `file` with `routes` may join the plugins in `current`.
    fn admit_named(
        &self,
        name: &str,
        routes: &[String],
        file: &Path,
        current: &BTreeMap<String, Arc<LoadedPlugin>>,
        loaded_this_pass: &HashSet<String>,
    ) -> Result<(), LoadError> {
        let conflict = |reason: String| LoadError::Conflict {
            name: name.to_owned(),
            file: file.to_owned(),
            reason,
        };
        if loaded_this_pass.contains(name) {
            let other = &current[name];
            return Err(conflict(format!(
                "a plugin with this name is already loaded from {}; remove one of the files",
                other.file.display()
            )));
        }
        for route in routes {
            let taken = current
                .values()
                .find(|p| p.name != name && p.routes.contains(route));
            if let Some(other) = taken {
                return Err(conflict(format!(
                    "route `{route}` is already served by plugin `{}` ({})",
                    other.name,
                    other.file.display()
                )));
            }
        }
        Ok(())
    }

    /// Plugin loads so far: succeeded, refused.
    pub fn load_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.loads_ok.load(Relaxed),
            self.loads_refused.load(Relaxed),
        )
    }

    /// Loads one file outside the route table, as `wshost check` does.
    /// Its config file section (`with_plugin_sections`) applies, as it would in the host.
    pub fn check_file(&self, file: &Path) -> Result<Arc<LoadedPlugin>, LoadError> {
        let mut candidate = Candidate::open(
            file,
            self.private_dir.path(),
            self.probe.as_ref(),
            self.max_plugin_size,
            &self.config_tables(),
        )?;
        let section = self.section(&candidate.name);
        if let Some(routes) = &section.routes {
            candidate.mount(routes)?;
        }
        candidate
            .create(
                1,
                &self.hub,
                super::PluginConfig::of(&section),
                Default::default(),
                BTreeMap::new(),
            )
            .map(Arc::new)
    }

    /// Every generation being served: the current one of each plugin, and replaced ones
    /// still alive (by plugin name, then generation).
    pub fn generations(&self) -> Vec<GenerationInfo> {
        let table = self.table();
        let old = self.retired_alive();
        let info = |p: &LoadedPlugin, current: bool| GenerationInfo {
            name: p.name.clone(),
            generation: p.generation,
            version: p.version.clone(),
            current,
            open_connections: p.open_connections(),
            file: p.file.clone(),
            routes: p.routes.clone(),
            api_version: p.api_version.clone(),
        };
        let mut all: Vec<GenerationInfo> = table
            .plugins()
            .map(|p| info(p, true))
            .chain(old.iter().map(|o| info(o, false)))
            .collect();
        all.sort_by(|a, b| (&a.name, a.generation).cmp(&(&b.name, b.generation)));
        all
    }

    /// Replaced generations still alive (serving connections, or held by a plugin thread).
    fn retired_alive(&self) -> Vec<Arc<LoadedPlugin>> {
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        retired.retain(|w| w.strong_count() > 0);
        retired.iter().filter_map(Weak::upgrade).collect()
    }

    /// Retires every generation, current and replaced: each `shutdown` runs on a retirement
    /// thread; waits up to `timeout` for them. Removes the private directory.
    pub fn shutdown_all(&self, timeout: std::time::Duration) {
        let (table, old) = (self.table(), self.retired_alive());
        for p in table.plugins().chain(old.iter()) {
            p.retire();
        }
        let left = super::retire::wait_idle(timeout);
        if left > 0 {
            tracing::warn!(
                running = left,
                "plugin shutdowns still running after the shutdown timeout; exiting without them"
            );
        }
        let _ = std::fs::remove_dir_all(self.private_dir.path());
    }
}

/// The limits a plugin's section sets for each of its routes; a route it does not serve is
/// logged (the limits would never apply).
fn route_limits(
    section: &crate::plugin::PluginSection,
    plugin: &str,
    routes: &[String],
) -> BTreeMap<String, crate::limits::ConnLimits> {
    let mut out = BTreeMap::new();
    for (route, l) in &section.route_limits {
        if !routes.contains(route) {
            tracing::warn!(plugin, %route, ?routes,
                "the config file sets limits for a route this plugin does not serve");
        }
        out.insert(route.clone(), l.limits);
    }
    out
}

/// The plugin files of `dir`, sorted by name: `*.so`, not starting with `.`.
pub fn plugin_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_plugin_file_name(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Whether a path names a plugin file: ends in `.so` and does not start with `.` (editors'
/// and copy tools' temporary files do).
pub fn is_plugin_file_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| !n.starts_with('.') && n.ends_with(".so") && n.len() > 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_file_names() {
        assert!(is_plugin_file_name(Path::new("plugins/libecho.so")));
        assert!(!is_plugin_file_name(Path::new("plugins/.libecho.so")));
        assert!(!is_plugin_file_name(Path::new("plugins/libecho.so.tmp")));
        assert!(!is_plugin_file_name(Path::new("plugins/README")));
        assert!(!is_plugin_file_name(Path::new("plugins/.so")));
    }

    #[test]
    fn private_folders_of_hosts_that_are_gone_are_swept() {
        let temp = tempfile::tempdir().unwrap();
        let dir = |name: &str| {
            let p = temp.path().join(name);
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("libecho.so"), b"copy").unwrap();
            p
        };
        let gone = dir("wshost-plugins-gone01");
        drop(lock_private_dir(&gone).unwrap()); // its host ended
        let running = dir("wshost-plugins-live01");
        let _held = lock_private_dir(&running).unwrap();
        let unlocked = dir("wshost-plugins-old001"); // no lock file: an older host's
        let other = dir("something-else");
        std::fs::write(other.join(PRIVATE_LOCK), b"").unwrap();
        assert_eq!(sweep_stale_private_dirs(temp.path()), 1);
        assert!(!gone.exists());
        assert!(running.exists() && unlocked.exists() && other.exists());
    }
}
