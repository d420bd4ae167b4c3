//! `wshost new`: writes a new plugin crate that builds on its own and works as it is.

use std::path::{Path, PathBuf};

/// Why a plugin crate could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name cannot be a crate and route name.
    #[error(
        "`{0}` is not a usable plugin name: use lower-case letters, digits, '-' and '_', \
             starting with a letter"
    )]
    BadName(String),
    /// The directory exists already.
    #[error("{} already exists; choose another name or --path", .0.display())]
    Exists(PathBuf),
    /// plugin-api was not found where expected.
    #[error("no plugin-api crate at {}; pass --api-path to the plugin-api folder of a wshost \
             source tree", .0.display())]
    NoApi(PathBuf),
    /// Writing failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The plugin-api folder of the source tree this binary was built from.
pub fn default_api_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|root| root.join("plugin-api"))
        .unwrap_or_else(|| PathBuf::from("plugin-api"))
}

fn valid_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Writes crate `name` into `parent/name`, depending on plugin-api at `api`. Returns its folder.
pub fn new_plugin(name: &str, parent: &Path, api: &Path) -> Result<PathBuf, ScaffoldError> {
    if !valid_name(name) {
        return Err(ScaffoldError::BadName(name.to_owned()));
    }
    let api = api
        .canonicalize()
        .map_err(|_| ScaffoldError::NoApi(api.to_owned()))?;
    if !api.join("Cargo.toml").exists() {
        return Err(ScaffoldError::NoApi(api));
    }
    let dir = parent.join(name);
    if dir.exists() {
        return Err(ScaffoldError::Exists(dir));
    }
    let write = |rel: &str, text: String| {
        let path = dir.join(rel);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(|source| ScaffoldError::Io {
                path: p.to_owned(),
                source,
            })?;
        }
        std::fs::write(&path, text).map_err(|source| ScaffoldError::Io { path, source })
    };
    let ident = name.replace('-', "_");
    let type_name: String = ident
        .split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    write(
        "Cargo.toml",
        CARGO_TOML
            .replace("{name}", name)
            .replace("{api}", &toml_string(&api)),
    )?;
    write(
        "src/lib.rs",
        LIB_RS.replace("{name}", name).replace("{Type}", &type_name),
    )?;
    write(".gitignore", "/target\n".to_owned())?;
    Ok(dir)
}

fn toml_string(p: &Path) -> String {
    p.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
}

const CARGO_TOML: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# cdylib: the .so the host loads; rlib: so unit tests can link the crate.
crate-type = ["cdylib", "rlib"]

[dependencies]
plugin-api = { path = "{api}" }

[dev-dependencies]
# The test kit: a test host, connection and request for the unit tests (src/lib.rs).
plugin-api = { path = "{api}", features = ["testkit"] }

# Keep the default panic = "unwind": the host refuses plugins built with panic = "abort",
# whose panics it could not contain.

# A workspace of its own, so the crate builds wherever it is.
[workspace]
"#;

const LIB_RS: &str = r#"//! The `{name}` wshost plugin: echoes every message on `/{name}`.
//!
//! Build with `cargo build --release`, then put `target/release/lib{name}.so` (renamed as you
//! like, ending in `.so`) into the host's plugins directory: it loads without a restart.

use plugin_api::{export_plugin, Conn, Handler, Host, Plugin, PluginError, Request, Response};

/// The plugin: one instance per loaded build, shared by all its connections.
pub struct {Type} {
    host: Host,
}

impl Plugin for {Type} {
    const NAME: &'static str = "{name}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const ROUTES: &'static [&'static str] = &["/{name}"];

    fn new(host: Host) -> Result<Self, PluginError> {
        host.info("started");
        Ok({Type} { host })
    }

    fn upgrade(&self, _req: &Request<'_>) -> Response {
        // Any other status refuses the upgrade: Response::reject(403, "no").
        Response::accept(Connection)
    }

    fn request(&self, _req: &Request<'_>) -> Response {
        Response::text("this is the {name} plugin; open a WebSocket to talk to it\n")
    }

    fn shutdown(&self) {
        self.host.info("stopped");
    }
}

/// One WebSocket connection's callbacks. They run one at a time, in order, on this plugin's own
/// workers: one that blocks holds a worker meanwhile (long waits belong on your own threads;
/// see `Request::defer` and `Conn::pause`).
struct Connection;

impl Handler for Connection {
    fn on_text(&mut self, conn: &Conn, text: &str) {
        // A send fails only if the connection is closing, its queue is full, or the message is
        // larger than the whole queue.
        let _ = conn.send_text(&reply(text));
    }

    fn on_binary(&mut self, conn: &Conn, data: &[u8]) {
        let _ = conn.send_binary(data);
    }
}

/// What the plugin answers to a text message.
fn reply(text: &str) -> String {
    text.to_owned()
}

export_plugin!({Type});

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testkit::{Sent, TestConn, TestHost, TestRequest};

    #[test]
    fn accepts_and_echoes() {
        let host = TestHost::new();
        let plugin = {Type}::new(host.host()).unwrap();
        assert!(host.logged("started"));
        let answer = TestRequest::upgrade("/{name}").decide(|r| plugin.upgrade(r));
        assert_eq!(answer.status(), 101);
        let mut handler = answer.handler().unwrap();
        let conn = TestConn::new(1);
        handler.on_text(&conn, "hello").unwrap();
        handler.on_binary(&conn, b"bytes").unwrap();
        assert_eq!(
            conn.sent(),
            [Sent::Text("hello".into()), Sent::Binary(b"bytes".to_vec())]
        );
    }

    #[test]
    fn answers_plain_requests() {
        let plugin = {Type}::new(TestHost::new().host()).unwrap();
        let answer = TestRequest::plain("GET", "/{name}").decide(|r| plugin.request(r));
        assert_eq!(answer.status(), 200);
        assert!(answer.text().contains("{name}"));
    }
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("echo"));
        assert!(valid_name("my-plugin_2"));
        assert!(!valid_name("2fast"));
        assert!(!valid_name("Bad"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
    }

    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let api = default_api_path();
        new_plugin("twice", dir.path(), &api).unwrap();
        assert!(matches!(
            new_plugin("twice", dir.path(), &api),
            Err(ScaffoldError::Exists(_))
        ));
    }
}
