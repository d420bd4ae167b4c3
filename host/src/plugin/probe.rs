//! The probe: before the host maps a plugin, a short-lived child process (`wshost probe`) loads
//! it completely — abi_stable's checks, the guarded self-test, the constructor, shutdown. A
//! plugin that crashes, aborts (a `panic = "abort"` build) or hangs takes only the child down.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{loader, Candidate, LoadError};

/// How to run the probe.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The `wshost` binary to run as `wshost probe`.
    pub exe: PathBuf,
    /// How long the probe may take before the plugin is refused.
    pub timeout: Duration,
}

/// The line the probe prints when the plugin passed.
const OK: &str = "probe ok";
/// The prefix of the line the probe prints when it refuses the plugin.
const REFUSED: &str = "probe refused: ";

impl Probe {
    /// Loads `private` (a private copy of `file`) in a child process; `Ok` if it passed. The
    /// child creates the plugin with its table from `configs` (by plugin name), as the host
    /// will; the tables go to it on its standard input.
    pub(crate) fn run(
        &self,
        file: &Path,
        private: &Path,
        configs: &BTreeMap<String, super::PluginConfig>,
    ) -> Result<(), LoadError> {
        let refuse = |reason: String| LoadError::Probe {
            file: file.to_owned(),
            reason,
        };
        let mut child = Command::new(&self.exe)
            .arg("probe")
            .arg("--display-name")
            .arg(file)
            .arg(private)
            .env("RUST_LOG", "off")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                refuse(format!(
                    "cannot start the probe {}: {e}",
                    self.exe.display()
                ))
            })?;
        let tables = serde_json::to_vec(configs).unwrap_or_default();
        let mut stdin = child.stdin.take().expect("piped");
        std::thread::spawn(move || {
            use std::io::Write as _;
            // A child that dies early closes its end: nothing to do about that here.
            let _ = stdin.write_all(&tables);
        });
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let out = out.join().unwrap_or_default();
        let err = err.join().unwrap_or_default();
        let last_err = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let Some(status) = status else {
            return Err(refuse(format!(
                "loading it did not finish within {:?} (its constructor hangs?)",
                self.timeout
            )));
        };
        if status.success() && out.lines().any(|l| l == OK) {
            return Ok(());
        }
        if let Some(reason) = out.lines().find_map(|l| l.strip_prefix(REFUSED)) {
            return Err(refuse(reason.to_owned()));
        }
        let how = match status.signal() {
            Some(6) => {
                "aborted (SIGABRT): built with panic = \"abort\", or it called abort()".to_owned()
            }
            Some(sig) => format!("crashed with signal {sig} ({})", signal_name(sig)),
            None => format!("exited with {status}"),
        };
        let detail = if last_err.is_empty() {
            String::new()
        } else {
            format!("; it said: {last_err}")
        };
        Err(refuse(format!(
            "loading it {how} in the probe process, so it would have taken the host down{detail}"
        )))
    }
}

/// The name of signal `sig`, for the ones a crashing plugin dies of.
pub(crate) fn signal_name(sig: i32) -> &'static str {
    match sig {
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        _ => "signal",
    }
}

/// The child's side: loads `path` completely in this process and reports on stdout.
/// `display` is the name the user knows the file by. Returns the exit code.
pub fn probe_main(display: &Path, path: &Path) -> std::process::ExitCode {
    match probe_here(display, path) {
        Ok(()) => {
            println!("{OK}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{REFUSED}{}", strip_file(&e.to_string(), display));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The parent adds the file name itself; keep the child's reason free of it.
fn strip_file(text: &str, display: &Path) -> String {
    let prefix = format!("{}: ", display.display());
    text.strip_prefix(&prefix).unwrap_or(text).to_owned()
}

fn probe_here(display: &Path, path: &Path) -> Result<(), LoadError> {
    let mut input = String::new();
    let _ = std::io::stdin().read_to_string(&mut input);
    let mut configs: BTreeMap<String, super::PluginConfig> =
        serde_json::from_str(&input).unwrap_or_default();
    loader::check_elf(display, path)?;
    let candidate = Candidate::from_mapped(display, loader::map(display, path)?)?;
    candidate.self_test()?;
    let hub = Arc::new(crate::channels::Hub::default());
    let config = configs.remove(&candidate.name).unwrap_or_default();
    let plugin = candidate.create(1, &hub, config, Default::default(), BTreeMap::new())?;
    let shut = plugin.shutdown().map_err(|reason| LoadError::Create {
        name: plugin.name.clone(),
        file: display.to_owned(),
        reason: format!("shutdown panicked: {reason}"),
    });
    drop(plugin);
    // The instance is dropped on a retirement thread: let it finish, as the host would.
    super::retire::wait_idle(Duration::from_secs(5));
    shut
}
