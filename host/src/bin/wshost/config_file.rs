//! The TOML config file (`wshost serve --config FILE`): every `serve` setting by its name
//! (deserialized into [`Settings`], the type the command line fills too), and a `[plugin.NAME]`
//! section per plugin. Flags given on the command line or in the environment override the file.
//!
//! ```toml
//! listen = "0.0.0.0:8080"
//! max_message_size = 65536
//! allowed_origins = ["https://example.com"]
//!
//! [plugin.chat]
//! routes = ["/rooms"]          # mounts that replace the plugin's own route prefixes
//! max_message_size = 4096      # limits for this plugin's connections
//! idle_timeout = "10m"
//!
//! [plugin.chat.route."/rooms"] # limits for one route, over the section's
//! max_message_size = 1024
//!
//! [plugin.chat.config]        # handed to the plugin (`Host::config`)
//! room_size = 50
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use wshost::plugin::PluginSection;

use crate::cli::Settings;

/// Why the config file was refused; every message names the file, the line and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{}: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// A key is unknown or its value is of the wrong kind.
    #[error("{}:{line}: `{key}`: {problem}", file.display())]
    Key {
        /// The file.
        file: PathBuf,
        /// The line the key is on (1-based; 0 if not found).
        line: usize,
        /// The key, dotted for sections (`plugin.chat.routes`).
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// A parsed config file.
#[derive(Debug, Default)]
pub struct ConfigFile {
    /// The top-level settings (under the command line's and the environment's).
    pub settings: Settings,
    /// The per-plugin sections.
    pub plugins: BTreeMap<String, PluginSection>,
}

/// The line of `key` in `text`, in `section` (`None`: the top level), 1-based; 0 if not found.
/// A dotted key (`config.size`) is looked up in the subsection.
fn line_of(text: &str, section: Option<&str>, key: &str) -> usize {
    let (section, key) = match key.rsplit_once('.') {
        Some((sub, last)) => (Some(format!("{}.{sub}", section.unwrap_or(""))), last),
        None => (section.map(str::to_owned), key),
    };
    let mut current: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            current = Some(t.trim_matches(['[', ']']).trim().to_owned());
            continue;
        }
        if current == section && t.split('=').next().map(str::trim) == Some(key) {
            return i + 1;
        }
    }
    0
}

/// Reads `file`: its top-level settings (deserialized into [`Settings`]) and its
/// `[plugin.NAME]` sections.
pub fn load(file: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_owned(),
        source,
    })?;
    let mut table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                file: file.to_owned(),
                message: e.to_string(),
            })?;
    let key_error = |section: Option<&str>, key: &str, problem: String| ConfigError::Key {
        file: file.to_owned(),
        line: line_of(&text, section, key),
        key: match section {
            Some(s) => format!("{s}.{key}"),
            None => key.to_owned(),
        },
        problem,
    };
    let mut out = ConfigFile::default();
    if let Some(value) = table.remove("plugin") {
        let Some(plugins) = value.as_table() else {
            return Err(key_error(
                None,
                "plugin",
                "must be a table of [plugin.NAME]".into(),
            ));
        };
        for (name, section) in plugins {
            let s = format!("plugin.{name}");
            let Some(section) = section.as_table() else {
                return Err(key_error(Some("plugin"), name, "must be a table".into()));
            };
            let parsed =
                plugin_section(section).map_err(|(k, problem)| key_error(Some(&s), &k, problem))?;
            out.plugins.insert(name.clone(), parsed);
        }
    }
    out.settings = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(
        |e: serde_path_to_error::Error<toml::de::Error>| {
            let key = e.path().to_string();
            let key = key.split(['.', '[']).next().unwrap_or("").to_owned();
            let inner = e.into_inner();
            let message = inner.message().trim().to_owned();
            let problem = if message.starts_with("unknown field") {
                "no such setting (see `wshost config --print-defaults`)".to_owned()
            } else {
                message
            };
            // An unknown key is named by the message, not the path.
            let key = if key.is_empty() || key == "?" {
                message_key(inner.message()).unwrap_or_default()
            } else {
                key
            };
            key_error(None, &key, problem)
        },
    )?;
    Ok(out)
}

/// The key a serde message names in backquotes (`unknown field `x``).
fn message_key(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let end = message[start..].find('`')? + start;
    Some(message[start..end].to_owned())
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn plugin_section(t: &toml::Table) -> Result<PluginSection, (String, String)> {
    plugin_or_route_section(t, true)
}

/// A `[plugin.NAME]` section, or (`top` false) a `[plugin.NAME.route."/path"]` one, which holds
/// limits only.
fn plugin_or_route_section(t: &toml::Table, top: bool) -> Result<PluginSection, (String, String)> {
    let mut p = PluginSection::default();
    let size = |k: &str, v: &toml::Value| match v.as_integer() {
        Some(n) if n > 0 => Ok(n as u64),
        _ => Err((
            k.to_owned(),
            "must be a positive number of bytes".to_owned(),
        )),
    };
    let time = |k: &str, v: &toml::Value| match v.as_str() {
        Some(s) => wshost::units::duration(s).map_err(|e| (k.to_owned(), e)),
        None => Err((
            k.to_owned(),
            "must be a duration like \"30s\" or \"500ms\"".to_owned(),
        )),
    };
    for (k, v) in t {
        match k.as_str() {
            "routes" if top => {
                let routes = v
                    .as_array()
                    .and_then(|a| a.iter().map(|r| r.as_str().map(str::to_owned)).collect())
                    .ok_or_else(|| (k.clone(), "must be a list of paths".to_owned()))?;
                p.routes = Some(routes);
            }
            "route" if top => {
                let routes = v.as_table().ok_or_else(|| {
                    (k.clone(), "must be a table of [route.\"/path\"]".to_owned())
                })?;
                for (route, limits) in routes {
                    let limits = limits
                        .as_table()
                        .ok_or_else(|| (format!("route.{route}"), "must be a table".to_owned()))?;
                    let parsed = plugin_or_route_section(limits, false)
                        .map_err(|(key, problem)| (format!("route.{route}.{key}"), problem))?;
                    p.route_limits.insert(route.clone(), parsed);
                }
            }
            "workers" if top => match v.as_integer() {
                Some(n) if (1..=1024).contains(&n) => p.workers = Some(n as usize),
                _ => {
                    return Err((
                        k.clone(),
                        "must be a number of threads from 1 to 1024".to_owned(),
                    ))
                }
            },
            "isolation" if top => match v.as_str() {
                Some("process") => p.process = Some(true),
                Some("inline") => p.process = Some(false),
                _ => return Err((k.clone(), "must be \"inline\" or \"process\"".to_owned())),
            },
            "memory_limit" if top => match v.as_str() {
                Some(s) => {
                    p.memory_limit = Some(wshost::units::bytes(s).map_err(|e| (k.clone(), e))?)
                }
                None => p.memory_limit = Some(size(k, v)?),
            },
            "callback_timeout" if top => p.callback_timeout = Some(time(k, v)?),
            "max_message_size" => p.limits.max_message_size = Some(size(k, v)?),
            "max_frame_size" => p.limits.max_frame_size = Some(size(k, v)?),
            "max_send_queue" => p.limits.max_send_queue = Some(size(k, v)?),
            "ping_interval" => p.limits.ping_interval = Some(time(k, v)?),
            "pong_timeout" => p.limits.pong_timeout = Some(time(k, v)?),
            "idle_timeout" => p.limits.idle_timeout = Some(time(k, v)?),
            "compression" => {
                p.limits.compression = Some(match v.as_str() {
                    Some("on") => true,
                    Some("off") => false,
                    _ => return Err((k.clone(), "must be \"on\" or \"off\"".to_owned())),
                })
            }
            "compression_min_size" => p.limits.compression_min_size = Some(size(k, v)?),
            "config" if top => {
                let table = v
                    .as_table()
                    .ok_or_else(|| (k.clone(), "must be a table".to_owned()))?;
                let typed = serde_json::to_value(table)
                    .map_err(|e| (k.clone(), format!("cannot be handed to the plugin: {e}")))?;
                for (ck, cv) in table {
                    let text = match scalar(cv) {
                        Some(text) => text,
                        None => typed[ck.as_str()].to_string(),
                    };
                    p.config.insert(ck.clone(), text);
                }
                p.config_json = typed.to_string();
            }
            _ => {
                return Err((
                    k.clone(),
                    "no such plugin setting (routes, workers, isolation, memory_limit, \
                     callback_timeout, max_message_size, max_frame_size, \
                     max_send_queue, ping_interval, pong_timeout, idle_timeout, compression, \
                     compression_min_size, config, route; \
                     a route section takes the limits only)"
                        .to_owned(),
                ))
            }
        }
    }
    Ok(p)
}

/// A commented config file with every `serve` setting at its default, in the order and with
/// the help of `serve --help`.
pub fn print_defaults(serve: &clap::Command) -> String {
    let mut out = String::from(
        "# wshost config file: every setting at its default.\n\
         # Use it with `wshost serve --config FILE`; flags and WSHOST_* variables override it.\n\n",
    );
    let defaults = default_values();
    for arg in serve.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.get_long().is_none() || matches!(id, "config" | "help") {
            continue;
        }
        if let Some(help) = arg.get_help() {
            for line in help.to_string().lines() {
                out.push_str(&format!("# {line}\n"));
            }
        }
        let line = match defaults.get(id) {
            Some(value) => format!("{id} = {value}"),
            None => format!("# {id} = \"\""),
        };
        out.push_str(&line);
        out.push_str("\n\n");
    }
    out.push_str(
        "# Per plugin: route mounts that replace its own, limits for its connections, and a\n\
         # table handed to it.\n\
         # [plugin.chat]\n\
         # routes = [\"/rooms\"]\n\
         # workers = 4\n\
         # isolation = \"process\"\n\
         # memory_limit = \"256MiB\"\n\
         # callback_timeout = \"3s\"\n\
         # max_message_size = 65536\n\
         # idle_timeout = \"10m\"\n\
         # compression = \"off\"\n\
         # [plugin.chat.route.\"/rooms\"]\n\
         # max_message_size = 1024\n\
         # [plugin.chat.config]\n\
         # room_size = 50\n",
    );
    out
}

/// Each setting's default as it is written in a config file, by key.
pub fn default_values() -> toml::Table {
    toml::Table::try_from(Settings::defaults()).expect("the defaults serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn load_text(text: &str) -> Result<ConfigFile, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wshost.toml");
        std::fs::write(&file, text).unwrap();
        load(&file)
    }

    fn key_error(text: &str) -> (usize, String, String) {
        match load_text(text).unwrap_err() {
            ConfigError::Key {
                line, key, problem, ..
            } => (line, key, problem),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn settings_deserialize_with_units() {
        let f = load_text(
            "max_message_size = \"64KiB\"\nmax_send_queue = 100\nidle_timeout = \"10m\"\n\
             no_watch = true\nisolation = \"process\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
             bus = \"memory\"\nadmin_listen = \"off\"\n[plugin.echo]\nroutes = [\"/e\"]\n",
        )
        .unwrap();
        let s = f.settings;
        assert_eq!(s.max_message_size, Some(64 << 10));
        assert_eq!(s.max_send_queue, Some(100));
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(s.no_watch, Some(true));
        assert_eq!(s.isolation, Some(crate::cli::Isolation::Process));
        assert_eq!(s.trusted_proxies.unwrap().len(), 1);
        assert_eq!(s.admin_listen, Some(crate::cli::AdminListen::Off));
        assert_eq!(s.listen, None);
        assert_eq!(f.plugins["echo"].routes, Some(vec!["/e".to_owned()]));
    }

    #[test]
    fn value_errors_name_line_and_key() {
        let (line, key, problem) = key_error("listen = \"127.0.0.1:0\"\n\nidle_timeout = 5\n");
        assert_eq!((line, key.as_str()), (3, "idle_timeout"));
        assert!(problem.contains("needs a unit"), "{problem}");
        let (line, key, _) = key_error("a = 1\nmax_mesage_size = 5\n");
        assert_eq!((line, key.as_str()), (1, "a"));
        let (line, key, problem) = key_error("\nmax_send_queue = 0\n");
        assert_eq!((line, key.as_str()), (2, "max_send_queue"));
        assert!(problem.contains("at least 1"), "{problem}");
        let (line, key, _) = key_error("trusted_proxies = [\"nope\"]\n");
        assert_eq!((line, key.as_str()), (1, "trusted_proxies"));
    }

    #[test]
    fn printed_defaults_read_back_as_the_defaults() {
        use clap::CommandFactory as _;
        let cli = crate::cli::Cli::command();
        let serve = cli.find_subcommand("serve").unwrap();
        let printed = print_defaults(serve);
        let read = load_text(&printed).unwrap().settings;
        let config = |s: crate::cli::Settings| format!("{:?}", s.resolved().config(None, None));
        assert_eq!(
            config(read.clone()),
            config(crate::cli::Settings::default())
        );
        // Every setting with a default is written out, not left to the reader's defaults.
        let written = toml::Table::try_from(&read).unwrap();
        assert_eq!(written, default_values());
        for arg in serve.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.get_long().is_some() && !matches!(id, "config" | "help") {
                assert!(printed.contains(&format!("{id} = ")), "{id} missing");
            }
        }
    }

    #[test]
    fn lines_are_found_in_their_section() {
        let text = "a = 1\n[plugin.chat]\nroutes = []\n[plugin.kv]\nroutes = []\n";
        assert_eq!(line_of(text, None, "a"), 1);
        assert_eq!(line_of(text, Some("plugin.kv"), "routes"), 5);
        assert_eq!(line_of(text, Some("plugin.chat"), "routes"), 3);
    }

    #[test]
    fn plugin_sections_parse() {
        let t: toml::Table = "routes = [\"/r\"]\nmax_message_size = 10\nidle_timeout = \"1m\"\n\
                              [config]\nsize = 5\nname = \"x\"\n"
            .parse()
            .unwrap();
        let p = plugin_section(&t).unwrap();
        assert_eq!(p.routes, Some(vec!["/r".to_owned()]));
        assert_eq!(p.limits.max_message_size, Some(10));
        assert_eq!(p.limits.idle_timeout, Some(Duration::from_secs(60)));
        assert_eq!(p.config["size"], "5");
        let routed: toml::Table = "[route.\"/a\"]\nmax_message_size = 3\n".parse().unwrap();
        assert_eq!(
            plugin_section(&routed).unwrap().route_limits["/a"]
                .limits
                .max_message_size,
            Some(3)
        );
        let nested: toml::Table = "[route.\"/a\"]\nroutes = []\n".parse().unwrap();
        assert_eq!(plugin_section(&nested).unwrap_err().0, "route./a.routes");
        let bad: toml::Table = "max_message_size = \"big\"".parse().unwrap();
        assert_eq!(plugin_section(&bad).unwrap_err().0, "max_message_size");
    }
}
