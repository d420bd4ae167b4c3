//! The registry: the loaded plugins and the route table, swapped atomically as one snapshot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{LoadError, LoadedPlugin};
use crate::channels::Hub;

/// One consistent view of which plugin serves what.
#[derive(Debug, Default)]
pub struct RouteTable {
    plugins: BTreeMap<String, Arc<LoadedPlugin>>,
    /// Route prefix → plugin, longest prefix first.
    routes: Vec<(String, Arc<LoadedPlugin>)>,
}

impl RouteTable {
    /// The plugin serving `path`: the longest route prefix that matches on whole segments.
    pub fn route(&self, path: &str) -> Option<&Arc<LoadedPlugin>> {
        self.routes
            .iter()
            .find(|(prefix, _)| LoadedPlugin::route_matches(prefix, path))
            .map(|(_, p)| p)
    }

    /// The loaded plugins, by name.
    pub fn plugins(&self) -> impl Iterator<Item = &Arc<LoadedPlugin>> {
        self.plugins.values()
    }

    /// Adds `plugin` unless its name or a route is taken.
    fn insert(&mut self, plugin: Arc<LoadedPlugin>) -> Result<(), LoadError> {
        let conflict = |reason: String| LoadError::Conflict {
            name: plugin.name.clone(),
            file: plugin.file.clone(),
            reason,
        };
        if let Some(other) = self.plugins.get(&plugin.name) {
            return Err(conflict(format!(
                "a plugin with this name is already loaded from {}; remove one of the files",
                other.file.display()
            )));
        }
        for route in &plugin.routes {
            if let Some((_, other)) = self.routes.iter().find(|(r, _)| r == route) {
                return Err(conflict(format!(
                    "route `{route}` is already served by plugin `{}` ({})",
                    other.name,
                    other.file.display()
                )));
            }
        }
        for route in &plugin.routes {
            self.routes.push((route.clone(), Arc::clone(&plugin)));
        }
        self.routes.sort_by_key(|(r, _)| std::cmp::Reverse(r.len()));
        self.plugins.insert(plugin.name.clone(), plugin);
        Ok(())
    }
}

/// The loaded plugins of a host, and where their private copies live.
#[derive(Debug)]
pub struct Registry {
    table: ArcSwap<RouteTable>,
    hub: Arc<Hub>,
    private_dir: tempfile::TempDir,
}

impl Registry {
    /// An empty registry whose mapped copies go into a new private temporary directory.
    pub fn new(hub: Arc<Hub>) -> std::io::Result<Self> {
        let private_dir = tempfile::Builder::new()
            .prefix("wshost-plugins-")
            .tempdir()?;
        Ok(Self {
            table: ArcSwap::from_pointee(RouteTable::default()),
            hub,
            private_dir,
        })
    }

    /// The current route table.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// The channel hub plugins publish into.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Loads every plugin file of `dir` (see [`plugin_files`]) in file-name order; a file that
    /// fails is logged and skipped. Returns the failures.
    pub fn load_dir(&self, dir: &Path) -> std::io::Result<Vec<LoadError>> {
        let files = plugin_files(dir)?;
        let mut table = RouteTable::default();
        let mut failures = Vec::new();
        for file in files {
            let started = std::time::Instant::now();
            let loaded = LoadedPlugin::load(
                &file,
                self.private_dir.path(),
                1,
                &self.hub,
                BTreeMap::new(),
            )
            .and_then(|p| {
                let p = Arc::new(p);
                table.insert(Arc::clone(&p)).map(|()| p)
            });
            match loaded {
                Ok(p) => tracing::info!(
                    plugin = %p.name, version = %p.version, generation = p.generation,
                    routes = ?p.routes, plugin_api = %p.api_version, file = %file.display(),
                    load_ms = started.elapsed().as_secs_f64() * 1e3, "plugin loaded"),
                Err(e) => {
                    tracing::error!(file = %file.display(), "plugin refused: {e}");
                    failures.push(e);
                }
            }
        }
        self.table.store(Arc::new(table));
        Ok(failures)
    }

    /// Loads one file outside the route table, as `wshost check` does.
    pub fn check_file(&self, file: &Path) -> Result<Arc<LoadedPlugin>, LoadError> {
        LoadedPlugin::load(file, self.private_dir.path(), 1, &self.hub, BTreeMap::new())
            .map(Arc::new)
    }

    /// Calls every plugin's shutdown.
    pub fn shutdown_all(&self) {
        for p in self.table().plugins() {
            if let Err(panic) = p.shutdown() {
                tracing::error!(plugin = %p.name, %panic, "plugin shutdown panicked");
            }
        }
    }
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
}
