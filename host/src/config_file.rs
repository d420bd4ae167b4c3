//! The TOML config file (`wshost serve --config FILE`): every `serve` flag by its name, and a
//! `[plugin.NAME]` section per plugin. Flags given on the command line or in the environment
//! override the file.
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
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Limits and routes for one plugin, from its `[plugin.NAME]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginSection {
    /// Route prefixes that replace the plugin's own.
    pub routes: Option<Vec<String>>,
    /// Limits for its connections (over the host's, under its route's and its 101's).
    pub limits: crate::limits::ConnLimits,
    /// Worker threads of the plugin's own runtime: how many of its calls may run (or block)
    /// at once.
    pub workers: Option<usize>,
    /// Whether it runs in a worker process (`Some(true)`, `isolation = "process"`) or in the
    /// host (`Some(false)`, `"inline"`); `None`: the host's default.
    pub process: Option<bool>,
    /// In a worker process: its resident memory past which the worker is ended and restarted.
    pub memory_limit: Option<u64>,
    /// In a worker process: a call running longer ends the worker.
    pub callback_timeout: Option<Duration>,
    /// The free-form table handed to the plugin, every value as text (`Host::config`; lists
    /// and tables as JSON text).
    pub config: BTreeMap<String, String>,
    /// The same table with its types, as JSON (`Host::config_value`, `Host::config_as`).
    pub config_json: String,
    /// Limits for one of its routes (`[plugin.NAME.route."/path"]`), over the section's own.
    pub route_limits: BTreeMap<String, PluginSection>,
}

/// A parsed config file.
#[derive(Debug, Default)]
pub struct ConfigFile {
    /// The `serve` arguments the top-level keys stand for (put before the command line's).
    pub args: Vec<OsString>,
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

/// Reads `file` against the arguments of the `serve` command.
pub fn load(file: &Path, serve: &clap::Command) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_owned(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
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
    for (key, value) in &table {
        if key == "plugin" {
            let Some(plugins) = value.as_table() else {
                return Err(key_error(
                    None,
                    key,
                    "must be a table of [plugin.NAME]".into(),
                ));
            };
            for (name, section) in plugins {
                let s = format!("plugin.{name}");
                let Some(section) = section.as_table() else {
                    return Err(key_error(Some("plugin"), name, "must be a table".into()));
                };
                let parsed = plugin_section(section)
                    .map_err(|(k, problem)| key_error(Some(&s), &k, problem))?;
                out.plugins.insert(name.clone(), parsed);
            }
            continue;
        }
        let arg = serve
            .get_arguments()
            .find(|a| a.get_id() == key.as_str() && a.get_long().is_some() && key != "config")
            .ok_or_else(|| {
                key_error(
                    None,
                    key,
                    "no such setting (see `wshost config --print-defaults`)".into(),
                )
            })?;
        if arg
            .get_env()
            .is_some_and(|env| std::env::var_os(env).is_some())
        {
            continue; // the environment overrides the file
        }
        let flag = format!("--{}", arg.get_long().expect("checked above"));
        let is_switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        let is_list = matches!(arg.get_action(), clap::ArgAction::Append);
        // Each value is checked here with the flag's own parser, so that a bad value is
        // reported with the file, line and key; it then goes on as `--flag=value` (a value
        // like `-1` is never taken for a flag).
        let mut push = |v: &toml::Value, what: &str| -> Result<(), ConfigError> {
            let text = scalar(v).ok_or_else(|| key_error(None, key, what.to_owned()))?;
            let arg_text = format!("{flag}={text}");
            if let Err(e) = serve
                .clone()
                .try_get_matches_from(["serve", arg_text.as_str()])
            {
                return Err(key_error(None, key, value_problem(&e)));
            }
            out.args.push(arg_text.into());
            Ok(())
        };
        match value {
            toml::Value::Boolean(b) if is_switch => {
                if *b {
                    out.args.push(flag.into());
                }
            }
            toml::Value::Array(items) if is_list => {
                for item in items {
                    push(item, "list items must be strings or numbers")?;
                }
            }
            toml::Value::Array(_) | toml::Value::Table(_) if !is_switch => {
                return Err(key_error(
                    None,
                    key,
                    "must be a single value, not a list or table".into(),
                ))
            }
            v if !is_switch => push(v, "must be a string or a number")?,
            _ => return Err(key_error(None, key, "must be true or false".into())),
        }
    }
    Ok(out)
}

/// clap's complaint about a value, without the flag's name (the file's key names it).
fn value_problem(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    // "invalid value 'X' for '--flag <FLAG>': why" → "invalid value 'X': why"
    match first.find(" for '--") {
        Some(at) => match first[at + 7..].find('\'') {
            Some(end) => format!("{}{}", &first[..at], &first[at + 7 + end + 1..]),
            None => first.to_owned(),
        },
        None => first.to_owned(),
    }
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
        Some(s) => crate::units::duration(s).map_err(|e| (k.to_owned(), e)),
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
                    p.memory_limit = Some(crate::units::bytes(s).map_err(|e| (k.clone(), e))?)
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
                     max_send_queue, ping_interval, pong_timeout, idle_timeout, config, route; \
                     a route section takes the limits only)"
                        .to_owned(),
                ))
            }
        }
    }
    Ok(p)
}

/// A commented config file with every `serve` setting at its default.
pub fn print_defaults(serve: &clap::Command) -> String {
    let mut out = String::from(
        "# wshost config file: every setting at its default.\n\
         # Use it with `wshost serve --config FILE`; flags and WSHOST_* variables override it.\n\n",
    );
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
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let line = match (arg.get_action(), defaults.first()) {
            (clap::ArgAction::SetTrue, _) => format!("{id} = false"),
            (clap::ArgAction::Append, _) => format!("{id} = []"),
            (_, Some(d)) if d.parse::<i64>().is_ok() => format!("{id} = {d}"),
            (_, Some(d)) => format!("{id} = {}", toml::Value::String(d.clone())),
            (_, None) => format!("# {id} = \"\""),
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
         # [plugin.chat.route.\"/rooms\"]\n\
         # max_message_size = 1024\n\
         # [plugin.chat.config]\n\
         # room_size = 50\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
