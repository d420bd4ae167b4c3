//! The test harness: builds the plugins once, starts real `wshost` processes on 127.0.0.1:0,
//! reads the address they print, watches their logs, and talks to them as clients do.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

pub use test_support::{eventually, eventually_async, workspace_root, PATIENCE};

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Where the harness builds plugins: its own target dir, since a nested cargo on the outer
/// build's target dir would wait for the outer cargo's lock.
pub fn plugin_target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-plugins")
}

fn cargo() -> Command {
    let mut cmd = test_support::cargo();
    cmd.env_remove("CARGO_TARGET_DIR");
    cmd
}

/// The workspace's plugins, built once per test process.
pub fn plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let status = cargo()
            .current_dir(workspace_root())
            .args([
                "build", "-p", "echo", "-p", "chat", "-p", "ticker", "-p", "kv", "-p", "auth",
                "-p", "testkit",
            ])
            .arg("--target-dir")
            .arg(plugin_target_dir())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the plugins failed");
        plugin_target_dir().join("debug")
    });
    let path = dir.join(format!("lib{name}.so"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Builds the `variant` test plugin with an identity set at build time (see its source), against
/// plugin-api `api_version` (a generated copy of plugin-api for any version but this one).
/// `key` names the build; equal keys must mean equal settings.
pub fn variant(key: &str, api_version: &str, env: &[(&str, &str)]) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = workspace_root();
    let base = plugin_target_dir().join("variants");
    let api_dir = api_copy(&root, &base, api_version);
    let crate_dir = base.join(key);
    std::fs::create_dir_all(&crate_dir).unwrap();
    let lib = format!("variant_{}", key.replace('-', "_"));
    std::fs::write(
        crate_dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"variant-{key}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [lib]\nname = \"{lib}\"\npath = \"{src}\"\ncrate-type = [\"cdylib\"]\n\n\
             [dependencies]\nplugin-api = {{ path = \"{api}\" }}\n\n[workspace]\n",
            src = root.join("tests/plugins/variant/src/lib.rs").display(),
            api = api_dir.display(),
        ),
    )
    .unwrap();
    // The workspace's lock file keeps every dependency at the version the host uses, so the
    // build reuses the artifacts in the shared target dir.
    std::fs::copy(root.join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();
    let mut cmd = cargo();
    cmd.current_dir(&crate_dir)
        .arg("build")
        .arg("--target-dir")
        .arg(plugin_target_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "building variant {key} failed");
    let built = plugin_target_dir()
        .join("debug")
        .join(format!("lib{lib}.so"));
    // Keep each build under its own name: a later build of another key must not change it.
    let kept = base.join(format!("{key}.so"));
    std::fs::copy(&built, &kept).unwrap();
    kept
}

/// Like [`variant`], built with `panic = "abort"`.
pub fn variant_panic_abort(key: &str) -> PathBuf {
    variant(
        key,
        &plugin_api_version(),
        &[
            ("CARGO_PROFILE_DEV_PANIC", "abort"),
            ("WSHOST_VARIANT_NAME", "aborter"),
            ("WSHOST_VARIANT_ROUTE", "/aborter"),
        ],
    )
}

/// A shared library built with `cc` from C `source`.
pub fn c_library(name: &str, source: &str) -> PathBuf {
    let dir = plugin_target_dir().join("c");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{name}.c"));
    let out = dir.join(format!("{name}.so"));
    std::fs::write(&src, source).unwrap();
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc runs (gcc is part of this machine kind)");
    assert!(status.success(), "cc failed on {name}");
    out
}

/// Puts `bytes` into `dir/name` the safe way: a temporary name, then a rename.
pub fn install(dir: &Path, name: &str, bytes: &[u8]) {
    test_support::install(dir, name, bytes).unwrap();
}

/// plugin-api as a standalone crate at `version`: the real one for the current version, the
/// released sources kept in `tests/compat` for an earlier release, otherwise a generated copy —
/// for a later 1.x grown the way a real one grows (a method with a default body appended to each
/// object's vtable).
fn api_copy(root: &Path, base: &Path, version: &str) -> PathBuf {
    let real = root.join("plugin-api");
    if version == plugin_api_version() {
        return real;
    }
    let released = root
        .join("tests/compat")
        .join(format!("plugin-api-{version}"));
    if released.is_dir() {
        return released;
    }
    let dir = base.join(format!("plugin-api-{version}"));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    for f in ["lib.rs", "abi.rs", "testkit.rs", "middleware.rs"] {
        std::fs::copy(real.join("src").join(f), dir.join("src").join(f)).unwrap();
    }
    let major = |v: &str| v.split('.').next().map(str::to_owned);
    if major(version) == major(&plugin_api_version()) {
        let abi = dir.join("src/abi.rs");
        let grown = grow_vtables(&std::fs::read_to_string(&abi).unwrap());
        std::fs::write(abi, grown).unwrap();
    }
    // The real manifest's dependencies, spelled out (the copy is outside the workspace).
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"plugin-api\"\nversion = \"{version}\"\nedition = \"2021\"\n\n\
             [dependencies]\nabi_stable = \"0.11\"\nform_urlencoded = \"1\"\nthiserror = \"2\"\n\
             serde = \"1\"\nserde_json = \"1\"\nserde_path_to_error = \"0.1\"\n\n\
             [features]\ntestkit = []\n"
        ),
    )
    .unwrap();
    dir
}

/// `abi.rs` with one more method, with a default body, at the end of every object the host and a
/// plugin hand each other — what a later 1.x does to the interface.
fn grow_vtables(abi: &str) -> String {
    let mut out = abi.to_owned();
    let objects = [
        "HostFfi",
        "ConnFfi",
        "ResponderFfi",
        "RequestFfi",
        "ResponseFfi",
        "HandlerFfi",
        "PluginFfi",
    ];
    for object in objects {
        let start = out
            .find(&format!("pub trait {object} "))
            .or_else(|| out.find(&format!("pub trait {object}:")))
            .unwrap_or_else(|| panic!("abi.rs declares no trait {object}"));
        let end = start + out[start..].find("\n}\n").expect("the trait ends");
        let lower = object.to_lowercase();
        out.insert_str(
            end,
            &format!(
                "\n    /// Added by a later 1.x (a test build).\n    \
                 fn later_{lower}(&self) -> u64 {{\n        7\n    }}"
            ),
        );
    }
    out
}

/// Puts a fresh copy of workspace plugin `name` into `dir` as `lib{name}.so` (a new build
/// deployed, as `install` does it).
pub fn redeploy(dir: &Path, name: &str) {
    install(
        dir,
        &format!("lib{name}.so"),
        &std::fs::read(plugin(name)).unwrap(),
    );
}

/// The plugin-api version of this workspace.
pub fn plugin_api_version() -> String {
    let toml = std::fs::read_to_string(workspace_root().join("plugin-api/Cargo.toml")).unwrap();
    toml.lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("plugin-api/Cargo.toml has a version")
        .to_owned()
}

/// How to start a host.
#[derive(Default)]
pub struct HostBuilder {
    config: Option<String>,
    files: Vec<(String, Vec<u8>)>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl HostBuilder {
    /// Adds a workspace plugin to the plugins dir.
    pub fn plugin(self, name: &str) -> Self {
        let path = plugin(name);
        self.plugin_file(&path, &format!("lib{name}.so"))
    }

    /// Adds a file to the plugins dir under `as_name`.
    pub fn plugin_file(self, path: &Path, as_name: &str) -> Self {
        let bytes = std::fs::read(path).unwrap();
        self.file(as_name, bytes)
    }

    /// Adds raw bytes to the plugins dir.
    pub fn file(mut self, name: &str, bytes: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.to_owned(), bytes.into()));
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Starts the host with a config file holding `toml`.
    pub fn config_file(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_owned());
        self
    }

    /// Serves TLS with the certificate and key in these files (`--tls-cert`, `--tls-key`).
    pub fn tls(self, cert: &Path, key: &Path) -> Self {
        self.arg("--tls-cert")
            .arg(cert.to_str().unwrap())
            .arg("--tls-key")
            .arg(key.to_str().unwrap())
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    pub fn start(self) -> Host {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in &self.files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wshost"));
        let runtime = tempfile::tempdir().unwrap();
        let config = self.config.as_ref().map(|toml| {
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), toml).unwrap();
            file
        });
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--plugins")
        .arg(dir.path())
        .args(&self.args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        // Each host writes its admin address into a runtime folder of its own.
        .env("WSHOST_RUNTIME_DIR", runtime.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(file) = &config {
            cmd.arg("--config").arg(file.path());
        }
        let mut child = cmd.spawn().expect("wshost starts");
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().unwrap();
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log2.push(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut admin = None;
            let addr = test_support::listening(stdout, |line| {
                if let Some(a) = line.strip_prefix("admin on http://") {
                    admin = Some(a.parse::<SocketAddr>().expect("a socket address"));
                }
            });
            if let Some(addr) = addr {
                let _ = tx.send((addr, admin.expect("the admin line comes first")));
            }
        });
        let (addr, admin) = match rx.recv_timeout(PATIENCE) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                panic!("wshost printed no address; its log:\n{}", log.text());
            }
        };
        Host {
            child,
            addr,
            admin,
            log,
            dir,
            config,
            runtime,
        }
    }
}

#[derive(Default)]
struct Log {
    text: Mutex<String>,
    grew: Condvar,
}

impl Log {
    fn push(&self, line: String) {
        let mut t = self.text.lock().unwrap();
        t.push_str(&line);
        t.push('\n');
        self.grew.notify_all();
    }
    fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }
}

/// A running `wshost` process; killed when dropped.
pub struct Host {
    child: Child,
    pub addr: SocketAddr,
    /// The admin endpoint.
    pub admin: SocketAddr,
    log: Arc<Log>,
    dir: tempfile::TempDir,
    config: Option<tempfile::NamedTempFile>,
    /// The host's `WSHOST_RUNTIME_DIR`.
    pub runtime: tempfile::TempDir,
}

impl Host {
    /// The config file the host was started with.
    pub fn config_path(&self) -> &Path {
        self.config
            .as_ref()
            .expect("started with a config file")
            .path()
    }

    /// A scrape of `/metrics`.
    pub fn metrics(&self) -> String {
        let (status, _, body) = get(self.admin, "/metrics");
        assert_eq!(status, 200);
        String::from_utf8(body).unwrap()
    }

    /// The value of the metric line `name` (with labels, if any) in a scrape.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }
    /// The host's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn builder() -> HostBuilder {
        HostBuilder::default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Waits until a log line contains every one of `needles`; returns that line.
    pub fn wait_for_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut text = self.log.text.lock().unwrap();
        loop {
            if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_owned();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "no log line with {needles:?}; the log:\n{}",
                *text
            );
            text = self.log.grew.wait_timeout(text, deadline - now).unwrap().0;
        }
    }

    /// Waits until `n` log lines contain `needle`.
    pub fn wait_for_count(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + PATIENCE;
        let mut text = self.log.text.lock().unwrap();
        loop {
            let seen = text.lines().filter(|l| l.contains(needle)).count();
            if seen >= n {
                return;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "{seen} of {n} log lines with {needle:?}; the log:\n{}",
                *text
            );
            text = self.log.grew.wait_timeout(text, deadline - now).unwrap().0;
        }
    }

    /// The plugins directory.
    pub fn plugins_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `wshost ARGS --admin ADDR` against this host; returns success and stdout.
    pub fn admin_cmd(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_wshost"))
            .args(args)
            .arg("--admin")
            .arg(self.admin.to_string())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// Sends `signal` (e.g. `HUP`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        eventually("wshost exits", || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.expect("it exited")
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.wait_exit()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens a WebSocket to `url`.
pub async fn connect(url: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    ws
}

/// A client of `url` on `host` whose socket's receive buffer is `bytes`: one that stops reading
/// fills up soon, and the host's writes to it meet a full socket.
pub async fn connect_with_recv_buffer(host: &Host, url: &str, bytes: u32) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(bytes).unwrap();
    let stream = socket.connect(host.addr).await.unwrap();
    let (ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    ws
}

/// The next data or close message (over any stream: TCP, TLS).
pub async fn next<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no message arrived")
            .expect("the connection ended")
            .expect("a message");
        if !matches!(msg, Message::Ping(_) | Message::Pong(_)) {
            return msg;
        }
    }
}

/// The next message, which must be text.
pub async fn text<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match next(ws).await {
        Message::Text(t) => t.as_str().to_owned(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Sends `msg` as text and returns the reply.
pub async fn ask(ws: &mut Ws, msg: &str) -> String {
    ws.send(Message::text(msg)).await.unwrap();
    text(ws).await
}

/// Asks `msg` until the answer is `want` (something the host does soon after, not at once).
pub async fn ask_until(ws: &mut Ws, msg: &str, want: &str) {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let answer = ask(ws, msg).await;
        if answer == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{msg}: still {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The id of the testkit connection behind `ws` (asks it `info`).
pub async fn id_of(ws: &mut Ws) -> u64 {
    let info = ask(ws, "info").await;
    info.strip_prefix("id=")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no id in {info}"))
}

/// A testkit observer of `host`: a connection subscribed to the `events` channel. Returns once
/// it is subscribed: `connect` returns at the 101, before the host has run `on_connect`;
/// callbacks run in order, so a reply from `on_text` proves `on_connect` is done.
pub async fn observer(host: &Host) -> Ws {
    let mut ws = connect(&host.url("/testkit/observe")).await;
    ws.send(Message::text("observer ready")).await.unwrap();
    event(&mut ws, "observer ready").await;
    ws
}

/// Reads a testkit observer's events until one starts with `prefix`.
pub async fn event(observer: &mut Ws, prefix: &str) -> String {
    loop {
        let e = text(observer).await;
        if e.starts_with(prefix) {
            return e;
        }
    }
}

/// Reads a testkit `stream` (binary messages up to its `stream done`); returns the bytes.
pub async fn receive_stream(ws: &mut Ws) -> usize {
    let mut bytes = 0;
    loop {
        match next(ws).await {
            Message::Binary(b) => bytes += b.len(),
            Message::Text(t) if t.as_str() == "stream done" => return bytes,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Waits for the server's close frame; returns its code and reason.
pub async fn closed_with(ws: &mut Ws) -> (u16, String) {
    loop {
        match next(ws).await {
            Message::Close(Some(f)) => return (u16::from(f.code), f.reason.as_str().to_owned()),
            Message::Close(None) => return (1005, String::new()),
            _ => {}
        }
    }
}

/// A raw HTTP/1.1 exchange: sends `request` as is, returns status, head and body.
pub fn http(addr: SocketAddr, request: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, head, raw[split + 4..].to_vec())
}

/// A plain GET, with the connection closed after it.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        b"",
    )
}

/// Runs `wshost serve ARGS` (with a config file holding `toml`, if given), which must refuse to
/// start; returns its standard error. A host that starts instead is killed after PATIENCE and
/// fails the test, so a wrong acceptance never hangs it.
pub fn serve_refused(args: &[&str], toml: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wshost"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "off"])
        .arg("--plugins")
        .arg(dir.path())
        .args(args)
        .env("WSHOST_RUNTIME_DIR", dir.path())
        .stdin(std::process::Stdio::null());
    if let Some(toml) = toml {
        let file = dir.path().join("wshost.toml");
        std::fs::write(&file, toml).unwrap();
        cmd.arg("--config").arg(file);
    }
    // A host that starts instead of refusing would serve forever: wait for its exit within
    // PATIENCE, and kill it otherwise.
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap();
    match status {
        Some(s) if !s.success() => stderr,
        _ => panic!("started with {args:?} {toml:?}: {stderr}"),
    }
}

/// A self-signed certificate for `localhost`, written as PEM into `dir`: the certificate (to
/// trust in a client) and the paths of its files (for `--tls-cert` and `--tls-key`).
pub fn self_signed(dir: &Path) -> (rcgen::CertifiedKey, PathBuf, PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    (cert, cert_path, key_path)
}

/// A client's TLS connector that trusts `cert` alone and offers the ALPN protocols `alpn`.
pub fn tls_connector(cert: &rcgen::CertifiedKey, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// A TLS connection through `connector` to the host at `addr`, by the name `localhost`.
pub async fn tls_to(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// A WebSocket over TLS through `connector` to `path` of the host at `addr`.
pub async fn wss_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let url = format!("wss://localhost:{}{path}", addr.port());
    let tls = tls_to(connector, addr).await;
    tokio_tungstenite::client_async(url, tls).await.unwrap().0
}
