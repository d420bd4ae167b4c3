//! Plugins as the host sees them: loading a file into a checked, running instance, and the
//! host-side halves of the ABI (services, requests) that instances call back into.
//!
//! - [`loader`]: maps a file (the only `unsafe` module of the host).
//! - [`registry`]: which plugins are loaded and which routes they serve.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::RRef;
use abi_stable::std_types::{RArc, ROption, RResult, RSlice, RStr, RString, RVec, Tuple2};
use plugin_api::abi::{
    self, HeaderPair, HostFfi, HostFfi_TO, PluginBox, RequestFfi, RequestFfi_TO, ResponderFfi,
    ResponderFfi_TO, ResponseBox,
};
use tokio_tungstenite::tungstenite::Message;

use crate::channels::Hub;
use crate::limits::ConnLimits;

mod elf;
pub(crate) mod events;
pub mod exec;
pub mod isolate;
#[allow(
    unsafe_code,
    reason = "maps plugin libraries; every block has a SAFETY comment"
)]
mod loader;
pub mod probe;
pub mod registry;
mod section;
pub use section::PluginSection;
pub(crate) mod retire;
mod seam;

pub(crate) use seam::{Callbacks, ConnFacts, ConnOps, Handler, RequestMap, SessionConn};
#[cfg(test)]
pub(crate) use seam::{DynConn, FakeEvent, FakeHandler};
pub mod watcher;

/// How many plugin libraries this process has mapped; they are never unmapped.
pub fn mapped_libraries() -> u64 {
    loader::mapped_count()
}

/// Why a plugin file was not loaded. Each message names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read or copied.
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        /// The plugin file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a wshost plugin library.
    #[error("{}: not a wshost plugin: {reason}", file.display())]
    NotAPlugin {
        /// The plugin file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The plugin was built against an incompatible plugin-api.
    #[error(
        "{}: built against plugin-api {plugin_api}; this host speaks {}.x: rebuild it against \
         plugin-api {}.x",
        file.display(), host_major(), host_major()
    )]
    Incompatible {
        /// The plugin file.
        file: PathBuf,
        /// The plugin-api version it was built against.
        plugin_api: String,
    },
    /// abi_stable refused the library (another abi_stable, or a layout mismatch).
    #[error("{}: its interface does not match this host's ({reason}): rebuild it against \
             plugin-api {}.x", file.display(), host_major())]
    Abi {
        /// The plugin file.
        file: PathBuf,
        /// abi_stable's reason.
        reason: String,
    },
    /// The plugin declares an unusable identity.
    #[error("plugin `{name}` ({}): {reason}", file.display())]
    BadIdentity {
        /// The plugin's name.
        name: String,
        /// The plugin file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The plugin's constructor failed or panicked.
    #[error("plugin `{name}` ({}) failed to start: {reason}", file.display())]
    Create {
        /// The plugin's name.
        name: String,
        /// The plugin file.
        file: PathBuf,
        /// The plugin's error or panic message.
        reason: String,
    },
    /// The plugin was built with `panic = "abort"`: its panics cannot be contained.
    #[error("plugin `{name}` ({}) was built with panic = \"abort\": its panics would end the \
             host; build it with panic = \"unwind\" (the default)", file.display())]
    PanicAbort {
        /// The plugin's name.
        name: String,
        /// The plugin file.
        file: PathBuf,
    },
    /// Loading the plugin in the probe process failed or crashed it.
    #[error("{}: {reason}", file.display())]
    Probe {
        /// The plugin file.
        file: PathBuf,
        /// What happened in the probe.
        reason: String,
    },
    /// Another plugin already has this name or one of these routes.
    #[error("plugin `{name}` ({}) refused: {reason}", file.display())]
    Conflict {
        /// The plugin's name.
        name: String,
        /// The plugin file.
        file: PathBuf,
        /// Which name or route clashes, with which file.
        reason: String,
    },
}

fn host_major() -> u64 {
    plugin_api::api_version().0
}

/// A plugin instance, loaded, checked and created.
pub struct LoadedPlugin {
    /// The plugin's name.
    pub name: String,
    /// The same, shared by its connections' handles (their channels' key): not a copy each.
    pub(crate) shared_name: Arc<str>,
    /// The plugin's own version.
    pub version: String,
    /// The route prefixes it serves.
    pub routes: Vec<String>,
    /// The plugin-api version it was built against.
    pub api_version: String,
    /// The file it was loaded from.
    pub file: PathBuf,
    /// Which load of this plugin's name this is (1 for the first).
    pub generation: u64,
    /// The instance; taken by the retirement thread when the generation is dropped. `None`
    /// for a process-isolated generation.
    instance: Option<PluginBox>,
    /// The host services this generation was handed (refused once it has shut down).
    services: Option<Arc<HostInner>>,
    /// The worker processes of a process-isolated generation.
    remote: Option<Arc<isolate::Supervisor>>,
    /// Where its code runs (the plugin's own runtime); `None` for a plugin loaded only to be
    /// checked.
    exec: Option<Arc<exec::Executor>>,
    /// Limits for this plugin's connections from the config file.
    pub(crate) limits: ConnLimits,
    /// Limits for connections on one of its routes, from the config file, over `limits`.
    pub(crate) route_limits: BTreeMap<String, ConnLimits>,
    /// Its life since it loaded: connections, shutdown, closing.
    life: Life,
}

/// A generation's life after it loaded, the same whatever runs its code.
#[derive(Debug, Default)]
struct Life {
    open_conns: AtomicU64,
    shut_down: AtomicBool,
    /// Cancelled when its connections must close: the host shuts down, or (with `restart`
    /// set) the generation was replaced and its grace passed.
    closing: tokio_util::sync::CancellationToken,
    restart: AtomicBool,
}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("routes", &self.routes)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// How a plugin decided a request.
#[allow(
    clippy::large_enum_variant,
    reason = "one per request, moved once: boxing the answer would only add an allocation"
)]
pub(crate) enum Decision {
    /// Its answer.
    Answer(Answer),
    /// It panicked (the message).
    Panicked(String),
    /// No answer within the decision timeout.
    TimedOut,
    /// It deferred the decision and dropped the responder without answering.
    Dropped,
    /// Its worker process is not running (restarting after a crash) or ended while deciding.
    Unavailable(String),
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Answer")
            .field("status", &self.status)
            .field("accepts", &self.handler.is_some())
            .finish_non_exhaustive()
    }
}

/// What a plugin answered to a request.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) handler: Option<Handler>,
    pub(crate) limits: ConnLimits,
    /// Request headers (lowercase names) the connection keeps (`Response::keep_header`).
    pub(crate) kept_headers: Vec<String>,
}

/// A plugin library, mapped and checked, whose instance is not created yet.
pub(crate) struct Candidate {
    file: PathBuf,
    mapped: loader::Mapped,
    pub(crate) name: String,
    version: String,
    pub(crate) routes: Vec<String>,
}

impl Candidate {
    /// Checks `file`'s size and ELF header, copies it privately, checks the copy is a complete
    /// library, loads it in a probe process first if `probe` is set (creating the plugin with
    /// its table of `configs`, as the host will), and maps it. The private copy is removed once
    /// mapped: the mapping keeps its inode alive, and nothing piles up on disk.
    pub(crate) fn open(
        file: &Path,
        private_dir: &Path,
        probe: Option<&probe::Probe>,
        max_size: u64,
        configs: &BTreeMap<String, PluginConfig>,
    ) -> Result<Self, LoadError> {
        loader::check_original(file, max_size)?;
        let private = loader::private_copy(file, private_dir)?;
        let opened = (|| {
            loader::check_elf(file, &private)?;
            if let Some(probe) = probe {
                probe.run(file, &private, configs)?;
            }
            Self::from_mapped(file, loader::map(file, &private)?)
        })();
        let _ = std::fs::remove_file(&private);
        opened
    }

    /// Reads and checks the identity of a mapped plugin.
    fn from_mapped(file: &Path, mapped: loader::Mapped) -> Result<Self, LoadError> {
        let module = mapped.module;
        let name = module.name()().as_str().to_owned();
        let version = module.version()().as_str().to_owned();
        let routes: Vec<String> = module.routes()()
            .iter()
            .map(|r| r.as_str().to_owned())
            .collect();
        let bad = |reason: String| LoadError::BadIdentity {
            name: name.clone(),
            file: file.to_owned(),
            reason,
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("the name must be non-empty printable ASCII".into()));
        }
        if routes.is_empty() {
            return Err(bad("it declares no routes".into()));
        }
        for r in &routes {
            if !valid_route(r) {
                return Err(bad(format!(
                    "route `{r}` must start with `/`, not end with `/` (except `/` itself) \
                     and have no `?` or `#`"
                )));
            }
        }
        if !module.panic_unwinds()() {
            return Err(LoadError::PanicAbort {
                name,
                file: file.to_owned(),
            });
        }
        Ok(Self {
            file: file.to_owned(),
            mapped,
            name,
            version,
            routes,
        })
    }

    /// Replaces the plugin's route prefixes with the config file's mounts.
    pub(crate) fn mount(&mut self, routes: &[String]) -> Result<(), LoadError> {
        check_mounts(&self.name, &self.file, routes)?;
        self.routes = routes.to_vec();
        Ok(())
    }

    /// Runs the plugin's guarded self-test: a panic that must be caught inside the plugin.
    /// Only for the probe process: a plugin built with `panic = "abort"` ends the process here.
    pub(crate) fn self_test(&self) -> Result<(), LoadError> {
        self.mapped.module.self_test()()
            .into_result()
            .map_err(|reason| LoadError::Create {
                name: self.name.clone(),
                file: self.file.clone(),
                reason: format!("self-test failed: {reason}"),
            })
    }

    /// Creates the plugin instance as generation `generation`.
    pub(crate) fn create(
        self,
        generation: u64,
        hub: &Arc<Hub>,
        config: PluginConfig,
        limits: ConnLimits,
        route_limits: BTreeMap<String, ConnLimits>,
    ) -> Result<LoadedPlugin, LoadError> {
        let inner = Arc::new(HostInner {
            plugin: self.name.clone(),
            generation,
            events: events::Events::new(&self.name),
            hub: Arc::clone(hub),
            config: config.table.into_iter().collect(),
            config_json: config.json,
            retired: AtomicBool::new(false),
            warned: AtomicBool::new(false),
            logs_in_callbacks: AtomicBool::new(false),
        });
        let services = HostServices(Arc::clone(&inner));
        let handle = HostFfi_TO::from_ptr(RArc::new(services), TD_Opaque);
        let instance = self.create_instance(handle)?;
        Ok(LoadedPlugin {
            shared_name: Arc::from(self.name.as_str()),
            name: self.name,
            version: self.version,
            routes: self.routes,
            api_version: self.mapped.api_version,
            file: self.file,
            generation,
            instance: Some(instance),
            services: Some(inner),
            remote: None,
            exec: None,
            limits,
            route_limits,
            life: Life::default(),
        })
    }
}

impl Candidate {
    /// Runs the plugin's constructor with `handle` as its host.
    pub(crate) fn create_instance(&self, handle: abi::HostHandle) -> Result<PluginBox, LoadError> {
        match self.mapped.module.create()(handle) {
            RResult::ROk(instance) => Ok(instance),
            RResult::RErr(reason) => Err(LoadError::Create {
                name: self.name.clone(),
                file: self.file.clone(),
                reason: reason.into_string(),
            }),
        }
    }
}

/// Asks `instance` to decide an upgrade; `Err` carries its panic message.
pub(crate) fn upgrade_on(instance: &PluginBox, req: &HostRequest) -> Result<Answer, String> {
    let req = RequestFfi_TO::from_ptr(RRef::new(req), TD_Opaque);
    into_answer(instance.upgrade(req))
}

/// Asks `instance` to answer a plain request; `Err` carries its panic message.
pub(crate) fn request_on(instance: &PluginBox, req: &HostRequest) -> Result<Answer, String> {
    let req = RequestFfi_TO::from_ptr(RRef::new(req), TD_Opaque);
    into_answer(instance.request(req))
}

impl LoadedPlugin {
    /// A generation whose code runs in worker processes under `supervisor`.
    #[allow(clippy::too_many_arguments, reason = "the fields of a generation")]
    pub(crate) fn isolated(
        supervisor: Arc<isolate::Supervisor>,
        identity: isolate::proto::Identity,
        routes: Vec<String>,
        file: PathBuf,
        generation: u64,
        limits: ConnLimits,
        route_limits: BTreeMap<String, ConnLimits>,
    ) -> Self {
        Self {
            shared_name: Arc::from(identity.name.as_str()),
            name: identity.name,
            version: identity.version,
            routes,
            api_version: identity.api_version,
            file,
            generation,
            instance: None,
            services: None,
            remote: Some(supervisor),
            exec: None,
            limits,
            route_limits,
            life: Life::default(),
        }
    }

    /// A generation with no code behind it, for in-process session tests (their handlers are
    /// [`Handler::Fake`]).
    #[cfg(test)]
    pub(crate) fn fake(name: &str) -> Self {
        Self {
            shared_name: Arc::from(name),
            name: name.to_owned(),
            version: "0".into(),
            routes: vec![format!("/{name}")],
            api_version: plugin_api::API_VERSION.into(),
            file: PathBuf::from(format!("lib{name}.so")),
            generation: 1,
            instance: None,
            services: None,
            remote: None,
            exec: None,
            limits: ConnLimits::default(),
            route_limits: BTreeMap::new(),
            life: Life::default(),
        }
    }

    /// Whether this generation runs in worker processes.
    pub fn is_isolated(&self) -> bool {
        self.remote.is_some()
    }

    /// Asks the plugin to decide an upgrade; `Err` carries its panic message.
    pub(crate) fn upgrade(&self, req: &HostRequest) -> Result<Answer, String> {
        upgrade_on(self.instance(), req)
    }

    /// Runs this generation's code on `exec` (the plugin's runtime) from now on.
    pub(crate) fn with_executor(mut self, exec: Arc<exec::Executor>) -> Self {
        self.exec = Some(exec);
        self
    }

    /// The plugin's runtime, if it has one.
    pub(crate) fn executor(&self) -> Option<&Arc<exec::Executor>> {
        self.exec.as_ref()
    }

    /// Starts the task that runs this generation's timers and channel events, one at a time, on
    /// its runtime. It holds the generation weakly: it ends when the generation does.
    pub(crate) fn start_events(self: &Arc<Self>) {
        let Some(services) = &self.services else {
            return;
        };
        let Some(rx) = services.events.take_receiver() else {
            return;
        };
        let handle = match &self.exec {
            Some(e) => e.handle().clone(),
            None => match tokio::runtime::Handle::try_current() {
                Ok(h) => h,
                Err(_) => return,
            },
        };
        let weak = Arc::downgrade(self);
        let events = Arc::clone(&services.events);
        handle.spawn(events::run(rx, events, move |call| {
            let Some(plugin) = weak.upgrade() else {
                return false;
            };
            plugin.plugin_event(call)
        }));
    }

    /// Runs one timer or channel event in the plugin; false once the generation has shut down.
    fn plugin_event(&self, call: events::Call<'_>) -> bool {
        let (Some(instance), Some(services)) = (&self.instance, &self.services) else {
            return false;
        };
        if services.retired.load(Ordering::Acquire) {
            return false;
        }
        exec::enter(exec::call_index(call.name()), 0, std::time::Instant::now());
        let result = match call {
            events::Call::Timer(tag) => instance.on_timer(tag),
            events::Call::Channel {
                channel,
                kind,
                data,
            } => instance.on_channel(RStr::from_str(channel), kind, RSlice::from_slice(data)),
        };
        exec::leave();
        if let RResult::RErr(panic) = result {
            tracing::error!(plugin = %self.name, generation = self.generation, call = call.name(),
                %panic, "plugin panicked; it goes on");
        }
        true
    }

    /// Drops `value` (which holds plugin code: a handler, a response) on the plugin's own
    /// runtime, not on the calling thread.
    pub(crate) fn drop_there<T: Send + 'static>(&self, value: T) {
        match &self.exec {
            Some(e) => drop(e.handle().spawn(async move { drop(value) })),
            None => drop(value),
        }
    }

    /// Asks the plugin to decide `req` (its `upgrade`, or its `request` for a plain request) on
    /// the plugin's own runtime, and waits for the decision, deferred or not, at most `timeout`.
    pub(crate) async fn decide(
        self: &Arc<Self>,
        req: RequestMap,
        timeout: std::time::Duration,
    ) -> Decision {
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(remote) = &self.remote {
            return remote.decide(req, deadline).await;
        }
        let req = HostRequest::from(req);
        let plugin = Arc::clone(self);
        let call = move || {
            let upgrade = req.is_upgrade;
            exec::enter(
                exec::call_index(if upgrade { "upgrade" } else { "request" }),
                0,
                std::time::Instant::now(),
            );
            let result = if upgrade {
                plugin.upgrade(&req)
            } else {
                plugin.request(&req)
            };
            exec::leave();
            let deferred = req
                .deferred
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            (req, result, deferred)
        };
        let called = match &self.exec {
            Some(e) => {
                match tokio::time::timeout_at(deadline, e.handle().spawn(async move { call() }))
                    .await
                {
                    Ok(Ok(done)) => done,
                    Ok(Err(join)) => return Decision::Panicked(join.to_string()),
                    Err(_) => return Decision::TimedOut,
                }
            }
            None => call(),
        };
        let (req, result, deferred) = called;
        // Nothing of the plugin's is in the request any more.
        drop(req);
        let answer = match result {
            Err(panic) => return Decision::Panicked(panic),
            Ok(answer) => answer,
        };
        let Some(rx) = deferred else {
            return Decision::Answer(answer);
        };
        // The returned response only stood in for the deferred one.
        self.drop_there(answer);
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(answer))) => Decision::Answer(answer),
            Ok(Ok(Err(panic))) => Decision::Panicked(panic),
            Ok(Err(_)) => Decision::Dropped,
            Err(_) => Decision::TimedOut,
        }
    }

    fn instance(&self) -> &PluginBox {
        self.instance
            .as_ref()
            .expect("the instance is taken only when the generation is dropped")
    }

    /// Asks the plugin to answer a plain request; `Err` carries its panic message.
    pub(crate) fn request(&self, req: &HostRequest) -> Result<Answer, String> {
        request_on(self.instance(), req)
    }

    /// Tells the plugin it gets no more calls; runs once, on the calling thread. From then on
    /// the generation's host services are refused. `Err` carries its panic message.
    pub(crate) fn shutdown(&self) -> Result<(), String> {
        if self.life.shut_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if let Some(remote) = &self.remote {
            // The worker runs `shutdown` and exits; its panic, if any, is logged there.
            remote.stop(std::time::Duration::from_secs(10));
            return Ok(());
        }
        let result = self
            .instance()
            .shutdown()
            .into_result()
            .map_err(RString::into_string);
        if let Some(s) = &self.services {
            s.retired.store(true, Ordering::Release);
        }
        result
    }

    /// Runs this generation's `shutdown` on a retirement thread (not an I/O thread), and logs
    /// it. The host's stop waits for it ([`retire::wait_idle`]).
    pub(crate) fn retire(self: &Arc<Self>) {
        if self.life.shut_down.load(Ordering::Acquire) {
            return;
        }
        let this = Arc::clone(self);
        retire::submit(&self.name, self.generation, "shutdown", move || {
            this.shutdown_logged();
        });
    }

    fn shutdown_logged(&self) {
        if self.life.shut_down.load(Ordering::Acquire) {
            return;
        }
        if let Err(panic) = self.shutdown() {
            tracing::error!(plugin = %self.name, generation = self.generation, %panic,
                "plugin shutdown panicked");
        }
        tracing::info!(plugin = %self.name, generation = self.generation,
            "generation shut down; its code stays mapped");
    }

    /// Fires when this generation's connections must close (shutdown, or the end of its grace
    /// after a replacement).
    pub(crate) fn closing(&self) -> &tokio_util::sync::CancellationToken {
        &self.life.closing
    }

    /// Whether its connections close because it was replaced (1012), not for shutdown.
    pub(crate) fn restarting(&self) -> &AtomicBool {
        &self.life.restart
    }

    /// Ties this generation's closing to `parent` (the registry's, cancelled at shutdown).
    pub(crate) fn with_closing(mut self, parent: &tokio_util::sync::CancellationToken) -> Self {
        self.life.closing = parent.child_token();
        self
    }

    /// A newer generation took over: tells the plugin (`Plugin::replaced`, off the I/O
    /// threads), and after `grace` (if any) closes this generation's connections with 1012.
    pub(crate) fn replaced(self: &Arc<Self>, grace: Option<std::time::Duration>) {
        if let Some(remote) = &self.remote {
            remote.replaced();
        } else if self.instance.is_some() {
            let this = Arc::clone(self);
            retire::submit(&self.name, self.generation, "replaced", move || {
                if let RResult::RErr(panic) = this.instance().replaced() {
                    tracing::error!(plugin = %this.name, generation = this.generation, %panic,
                        "plugin replaced() panicked");
                }
            });
        }
        let Some(grace) = grace else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(old) = weak.upgrade() {
                let open = old.open_connections();
                if open > 0 {
                    tracing::info!(plugin = %old.name, generation = old.generation, open,
                        ?grace, "replaced generation's grace passed: closing its connections \
                        with 1012 so they reconnect to the new one");
                }
                old.life.restart.store(true, Ordering::Release);
                old.life.closing.cancel();
            }
        });
    }

    /// Connections open on this instance.
    pub fn open_connections(&self) -> u64 {
        self.life.open_conns.load(Ordering::Acquire)
    }

    /// Whether the plugin has logged from a callback of a connection that had no span: its
    /// connections then make their spans before their callbacks, so that its lines carry the
    /// connection's fields. (A connection's span is otherwise made only when something of the
    /// connection is logged: most never log anything, and each span is ~500 B of the
    /// subscriber's memory.)
    pub(crate) fn logs_in_callbacks(&self) -> bool {
        self.services
            .as_ref()
            .is_some_and(|s| s.logs_in_callbacks.load(Ordering::Relaxed))
    }

    pub(crate) fn connection_opened(&self) {
        self.life.open_conns.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn connection_closed(&self) {
        self.life.open_conns.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether this plugin serves `path` through route `route`: whole segments only.
    pub(crate) fn route_matches(route: &str, path: &str) -> bool {
        route == "/"
            || path
                .strip_prefix(route)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

/// Checks the config file's mounts of plugin `name` (of `file`).
pub(crate) fn check_mounts(name: &str, file: &Path, routes: &[String]) -> Result<(), LoadError> {
    if let Some(bad) = routes.iter().find(|r| !valid_route(r)) {
        return Err(LoadError::BadIdentity {
            name: name.to_owned(),
            file: file.to_owned(),
            reason: format!(
                "the config file mounts it at `{bad}`: a route must start with `/`, not end \
                 with `/` (except `/` itself) and have no `?` or `#`"
            ),
        });
    }
    if routes.is_empty() {
        return Err(LoadError::BadIdentity {
            name: name.to_owned(),
            file: file.to_owned(),
            reason: "the config file mounts it at no route".into(),
        });
    }
    Ok(())
}

/// A plugin's `[plugin.NAME.config]` table: as text (`Host::config`) and with its types, as
/// JSON (`Host::config_value`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct PluginConfig {
    pub(crate) table: BTreeMap<String, String>,
    pub(crate) json: String,
}

impl PluginConfig {
    /// The config of a config file section.
    pub(crate) fn of(section: &crate::plugin::PluginSection) -> Self {
        Self {
            table: section.config.clone(),
            json: section.config_json.clone(),
        }
    }
}

/// A plugin's config table as its `Host::config` returns it.
pub(crate) fn config_table(config: &[(String, String)]) -> RVec<Tuple2<RString, RString>> {
    config
        .iter()
        .map(|(k, v)| Tuple2(RString::from(k.as_str()), RString::from(v.as_str())))
        .collect()
}

fn valid_route(r: &str) -> bool {
    r.starts_with('/') && (r == "/" || !r.ends_with('/')) && !r.contains(['?', '#'])
}

fn into_answer(result: RResult<ResponseBox, RString>) -> Result<Answer, String> {
    let mut resp = result.into_result().map_err(RString::into_string)?;
    let setting = |key: &str| match resp.setting(RStr::from_str(key)) {
        ROption::RSome(v) => Some(v),
        ROption::RNone => None,
    };
    let ms = |key: &str| setting(key).map(std::time::Duration::from_millis);
    let settings = ConnLimits {
        max_message_size: setting(abi::setting::MAX_MESSAGE_SIZE),
        max_frame_size: setting(abi::setting::MAX_FRAME_SIZE),
        max_send_queue: setting(abi::setting::MAX_SEND_QUEUE),
        ping_interval: ms(abi::setting::PING_INTERVAL_MS),
        pong_timeout: ms(abi::setting::PONG_TIMEOUT_MS),
        idle_timeout: ms(abi::setting::IDLE_TIMEOUT_MS),
        compression: setting(abi::setting::COMPRESSION).map(|v| v != 0),
        compression_min_size: None,
    };
    Ok(Answer {
        status: resp.status(),
        headers: resp
            .take_headers()
            .into_iter()
            .map(|Tuple2(k, v)| (k.into_string(), v.into_string()))
            .collect(),
        body: resp.take_body().into_vec(),
        handler: resp.take_handler().into_option().map(Handler::Inline),
        limits: settings,
        kept_headers: resp
            .kept_headers()
            .into_iter()
            .map(|h| h.into_string().to_ascii_lowercase())
            .collect(),
    })
}

impl Drop for LoadedPlugin {
    /// The last reference is gone: no route and no connection uses this generation any more.
    /// Its `shutdown` (unless it already ran) and the drop of its instance run plugin code, so
    /// they go to a retirement thread: this may be the I/O thread of its last connection.
    fn drop(&mut self) {
        if let Some(remote) = self.remote.take() {
            if !self.life.shut_down.swap(true, Ordering::AcqRel) {
                retire::submit(&self.name, self.generation, "shutdown", move || {
                    remote.stop(std::time::Duration::from_secs(10));
                });
            }
            return;
        }
        let Some(instance) = self.instance.take() else {
            return;
        };
        if let Some(s) = &self.services {
            // Its watches end with it (its timers end with its events task).
            s.hub.unwatch_all(&self.name, self.generation);
        }
        let shut_down = self.life.shut_down.swap(true, Ordering::AcqRel);
        let (name, generation) = (self.name.clone(), self.generation);
        let Some(services) = self.services.clone() else {
            return;
        };
        let what = if shut_down { "drop" } else { "shutdown" };
        retire::submit(&self.name, self.generation, what, move || {
            if !shut_down {
                if let RResult::RErr(panic) = instance.shutdown() {
                    tracing::error!(plugin = %name, generation, %panic, "plugin shutdown panicked");
                }
                services.retired.store(true, Ordering::Release);
                tracing::info!(plugin = %name, generation,
                    "generation shut down; its code stays mapped");
            }
            drop(instance);
        });
    }
}

// ----------------------------------------------------------------------------------------------
// Host services, as a plugin instance calls them.

#[derive(Debug)]
struct HostInner {
    plugin: String,
    generation: u64,
    /// The generation's timers and watched channels, run by [`LoadedPlugin::start_events`].
    events: Arc<events::Events>,
    hub: Arc<Hub>,
    config: Vec<(String, String)>,
    config_json: String,
    /// The generation's `shutdown` has run: its calls are refused.
    retired: AtomicBool,
    /// A refused call was logged.
    warned: AtomicBool,
    /// The plugin logged from a callback of a connection that had no span: its connections
    /// make their spans before their callbacks from now on ([`LoadedPlugin::logs_in_callbacks`]).
    logs_in_callbacks: AtomicBool,
}

impl HostInner {
    /// Whether `call` is refused because the generation has shut down (logged once).
    fn refused(&self, call: &str) -> bool {
        if !self.retired.load(Ordering::Acquire) {
            return false;
        }
        if !self.warned.swap(true, Ordering::AcqRel) {
            tracing::warn!(plugin = %self.plugin, generation = self.generation, call,
                "refused a host call from a generation that has shut down (a thread it did not \
                 stop in `shutdown`?); its calls are refused from now on");
        }
        true
    }
}

#[derive(Debug, Clone)]
struct HostServices(Arc<HostInner>);

/// A plugin's log line; `conn_id` is written only when it is `Some`.
macro_rules! plugin_event {
    ($level:expr, $inner:expr, $msg:expr, $conn:expr) => {
        tracing::event!(target: "plugin", $level, plugin = %$inner.plugin,
            generation = $inner.generation, conn_id = $conn, "{}", $msg)
    };
}

impl HostFfi for HostServices {
    fn log(&self, level: u8, message: RStr<'_>) {
        if self.0.refused("log") {
            return;
        }
        let m = message.as_str();
        let i = &self.0;
        // In a callback of a connection without its span (made only when something of the
        // connection is logged), the line names the connection itself, and the plugin's
        // connections make their spans before their callbacks from now on.
        let conn = Some(exec::unspanned()).filter(|&id| id != 0);
        if conn.is_some() && self.log_enabled(level) {
            i.logs_in_callbacks.store(true, Ordering::Relaxed);
        }
        match level {
            abi::level::ERROR => plugin_event!(tracing::Level::ERROR, i, m, conn),
            abi::level::WARN => plugin_event!(tracing::Level::WARN, i, m, conn),
            abi::level::INFO => plugin_event!(tracing::Level::INFO, i, m, conn),
            abi::level::DEBUG => plugin_event!(tracing::Level::DEBUG, i, m, conn),
            _ => plugin_event!(tracing::Level::TRACE, i, m, conn),
        }
    }

    fn log_enabled(&self, level: u8) -> bool {
        match level {
            abi::level::ERROR => tracing::enabled!(target: "plugin", tracing::Level::ERROR),
            abi::level::WARN => tracing::enabled!(target: "plugin", tracing::Level::WARN),
            abi::level::INFO => tracing::enabled!(target: "plugin", tracing::Level::INFO),
            abi::level::DEBUG => tracing::enabled!(target: "plugin", tracing::Level::DEBUG),
            _ => tracing::enabled!(target: "plugin", tracing::Level::TRACE),
        }
    }

    fn config(&self) -> RVec<Tuple2<RString, RString>> {
        config_table(&self.0.config)
    }

    fn config_json(&self) -> RString {
        RString::from(self.0.config_json.as_str())
    }

    fn publish_text(&self, channel: RStr<'_>, text: RStr<'_>) -> u64 {
        if self.0.refused("publish_text") {
            return 0;
        }
        let msg = Message::text(text.as_str());
        self.0.hub.publish(&self.0.plugin, channel.as_str(), &msg)
    }

    fn publish_binary(&self, channel: RStr<'_>, data: RSlice<'_, u8>) -> u64 {
        if self.0.refused("publish_binary") {
            return 0;
        }
        let msg = Message::Binary(bytes::Bytes::copy_from_slice(data.as_slice()));
        self.0.hub.publish(&self.0.plugin, channel.as_str(), &msg)
    }

    fn subscribers(&self, channel: RStr<'_>) -> u64 {
        if self.0.refused("subscribers") {
            return 0;
        }
        self.0.hub.subscribers(&self.0.plugin, channel.as_str())
    }

    fn host_version(&self) -> RString {
        RString::from(env!("CARGO_PKG_VERSION"))
    }

    fn set_timer(&self, tag: u64, after_ms: u64) -> bool {
        !self.0.refused("set_timer")
            && self
                .0
                .events
                .set_timer(tag, std::time::Duration::from_millis(after_ms))
    }

    fn cancel_timer(&self, tag: u64) -> bool {
        self.0.events.cancel_timer(tag)
    }

    fn members_json(&self, channel: RStr<'_>) -> RString {
        if self.0.refused("members") {
            return RString::from("[]");
        }
        let members = self.0.hub.members(&self.0.plugin, channel.as_str());
        RString::from(serde_json::to_string(&members).unwrap_or_else(|_| "[]".into()))
    }

    fn watch(&self, channel: RStr<'_>) -> bool {
        if self.0.refused("watch") {
            return false;
        }
        let watcher: Arc<dyn crate::channels::Watcher> = self.0.events.clone();
        self.0
            .hub
            .watch(&self.0.plugin, channel.as_str(), self.0.generation, watcher);
        true
    }

    fn unwatch(&self, channel: RStr<'_>) -> bool {
        self.0
            .hub
            .unwatch(&self.0.plugin, channel.as_str(), self.0.generation)
    }
}

// ----------------------------------------------------------------------------------------------
// Requests, as a plugin reads them.

/// A request as handed to a plugin (the ring request map).
#[derive(Debug, Default)]
pub(crate) struct HostRequest {
    pub(crate) method: RString,
    pub(crate) protocol: RString,
    pub(crate) path: RString,
    pub(crate) query: RString,
    pub(crate) scheme: RString,
    pub(crate) server_name: RString,
    pub(crate) server_port: u16,
    pub(crate) remote_addr: RString,
    pub(crate) headers: RVec<HeaderPair>,
    pub(crate) subprotocols: RVec<RString>,
    pub(crate) body: RVec<u8>,
    pub(crate) is_upgrade: bool,
    /// The route prefix that matched.
    pub(crate) route: RString,
    /// Where a deferred decision arrives, once the plugin deferred it.
    pub(crate) deferred: std::sync::Mutex<Option<Deferred>>,
}

/// The receiving end of a deferred decision.
pub(crate) type Deferred = tokio::sync::oneshot::Receiver<Result<Answer, String>>;

/// The host's responder for a deferred decision: converts the plugin's response on the
/// plugin's own thread and sends it to the waiting request.
struct HostResponder {
    tx: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Result<Answer, String>>>>,
}

impl ResponderFfi for HostResponder {
    fn respond(&self, response: ResponseBox) -> bool {
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let answer = into_answer(RResult::ROk(response));
        match tx {
            Some(tx) => tx.send(answer).is_ok(),
            None => false,
        }
    }

    fn is_waiting(&self) -> bool {
        self.tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|tx| !tx.is_closed())
    }
}

impl RequestFfi for HostRequest {
    fn method(&self) -> RStr<'_> {
        self.method.as_rstr()
    }
    fn path(&self) -> RStr<'_> {
        self.path.as_rstr()
    }
    fn query(&self) -> RStr<'_> {
        self.query.as_rstr()
    }
    fn protocol(&self) -> RStr<'_> {
        self.protocol.as_rstr()
    }
    fn scheme(&self) -> RStr<'_> {
        self.scheme.as_rstr()
    }
    fn server_name(&self) -> RStr<'_> {
        self.server_name.as_rstr()
    }
    fn server_port(&self) -> u16 {
        self.server_port
    }
    fn remote_addr(&self) -> RStr<'_> {
        self.remote_addr.as_rstr()
    }
    fn headers(&self) -> RSlice<'_, HeaderPair> {
        self.headers.as_rslice()
    }
    fn subprotocols(&self) -> RSlice<'_, RString> {
        self.subprotocols.as_rslice()
    }
    fn body(&self) -> RSlice<'_, u8> {
        self.body.as_rslice()
    }
    fn is_upgrade(&self) -> bool {
        self.is_upgrade
    }
    fn route(&self) -> RStr<'_> {
        self.route.as_rstr()
    }
    fn defer(&self) -> ROption<abi::ResponderHandle> {
        let mut deferred = self
            .deferred
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if deferred.is_some() {
            return ROption::RNone;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        *deferred = Some(rx);
        ROption::RSome(ResponderFfi_TO::from_value(
            HostResponder {
                tx: std::sync::Mutex::new(Some(tx)),
            },
            TD_Opaque,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_whole_segments() {
        assert!(LoadedPlugin::route_matches("/echo", "/echo"));
        assert!(LoadedPlugin::route_matches("/echo", "/echo/x"));
        assert!(!LoadedPlugin::route_matches("/echo", "/echoes"));
        assert!(!LoadedPlugin::route_matches("/echo", "/ech"));
        assert!(LoadedPlugin::route_matches("/", "/anything"));
    }

    #[test]
    fn route_syntax() {
        assert!(valid_route("/"));
        assert!(valid_route("/chat"));
        assert!(valid_route("/a/b"));
        assert!(!valid_route("chat"));
        assert!(!valid_route("/chat/"));
        assert!(!valid_route("/chat?x"));
    }
}
