//! Process isolation: a plugin whose code runs in a worker process of its own (`isolation =
//! "process"`), so that its crashes, hangs and memory take down only that process and its own
//! connections. [`proto`] is what crosses, [`worker`] the worker's side, [`supervisor`] the
//! host's.

pub(crate) mod proto;
pub(crate) mod supervisor;
pub mod worker;

pub use supervisor::{all_stats, Isolation, WorkerStats};
pub(crate) use supervisor::{RemoteCallbacks, RemoteHandler, Supervisor};
