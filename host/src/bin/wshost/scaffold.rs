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

/// Writes crate `name` from `template` into `parent/name`, depending on plugin-api at `api`.
/// Returns its folder.
pub fn new_plugin(
    name: &str,
    template: Template,
    parent: &Path,
    api: &Path,
) -> Result<PathBuf, ScaffoldError> {
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
        template
            .source()
            .replace("{name}", name)
            .replace("{lib}", &ident)
            .replace("{Type}", &type_name),
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

/// What a new plugin starts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Template {
    /// Echoes every message (the smallest plugin).
    #[default]
    Echo,
    /// Chat rooms at `/NAME/ROOM?name=MEMBER` on the host's channels, behind middleware.
    Chat,
    /// A stream paced by the client's reading (high and low water, `on_drain`, a timer).
    Stream,
}

impl Template {
    fn source(self) -> &'static str {
        match self {
            Template::Echo => include_str!("templates/echo.rs"),
            Template::Chat => include_str!("templates/chat.rs"),
            Template::Stream => include_str!("templates/stream.rs"),
        }
    }
}

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
    fn templates_name_the_real_library_file() {
        let dir = tempfile::tempdir().unwrap();
        for (i, t) in [Template::Echo, Template::Chat, Template::Stream]
            .into_iter()
            .enumerate()
        {
            let name = format!("my-plugin-{i}");
            let made = new_plugin(&name, t, dir.path(), &default_api_path()).unwrap();
            let lib = std::fs::read_to_string(made.join("src/lib.rs")).unwrap();
            assert!(
                lib.contains(&format!("target/release/libmy_plugin_{i}.so")),
                "{t:?}"
            );
            for placeholder in ["{name}", "{lib}", "{Type}"] {
                assert!(!lib.contains(placeholder), "{t:?}: {placeholder} left");
            }
            assert!(lib.contains(&format!("\"/{name}\"")), "{t:?}");
        }
    }

    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let api = default_api_path();
        new_plugin("twice", Template::Echo, dir.path(), &api).unwrap();
        assert!(matches!(
            new_plugin("twice", Template::Echo, dir.path(), &api),
            Err(ScaffoldError::Exists(_))
        ));
    }
}
