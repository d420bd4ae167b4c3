//! Process isolation: a plugin whose code runs in a worker process of its own (`isolation =
//! "process"`), so that its crashes, hangs and memory take down only that process and its own
//! connections. [`proto`] is what crosses, [`worker`] the worker's side, [`supervisor`] the
//! host's.

pub(crate) mod proto;
pub(crate) mod supervisor;
pub mod worker;

pub use supervisor::{all_stats, take_worker_refusals, Isolation, WorkerStats};
pub(crate) use supervisor::{RemoteCallbacks, RemoteHandler, Supervisor};

use std::time::Duration;

/// Where plugins run: mapped in the host (inline), or each in a worker process of its own.
#[derive(Debug, Clone)]
pub struct IsolationConfig {
    /// Plugins without an `isolation` setting of their own run in worker processes.
    pub process: bool,
    /// The `wshost` binary to start workers with (`None`: process isolation is unavailable).
    pub exe: Option<std::path::PathBuf>,
    /// A worker whose plugin call runs longer than this is ended and restarted (zero: never).
    pub callback_timeout: Duration,
    /// How long a worker may take to start and create its instance.
    pub start_timeout: Duration,
}

impl Default for IsolationConfig {
    fn default() -> Self {
        Self {
            process: false,
            exe: None,
            callback_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(10),
        }
    }
}
