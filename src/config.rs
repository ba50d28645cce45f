//! The optional TOML configuration file, named by `--config PATH` or
//! `HERALD_CONFIG`.
//!
//! Keys are the long option names that `herald <role> --help` lists. A
//! top-level key applies to every role that has that option; keys under
//! `[broker]`, `[ws]`, `[http]` or `[standalone]` apply to that role only.
//! The file's values become the options' defaults, so clap validates them
//! like flags, and the precedence is: flags, then `HERALD_*` environment,
//! then the file, then the built-in defaults. A key no role knows is an
//! error that names it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Command;

/// Why the configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: unknown key {key:?}{where_}")]
    UnknownKey { path: PathBuf, key: String, where_: String },
    #[error("config file {path}: key {key:?} must be a string, number, boolean or list of them")]
    BadValue { path: PathBuf, key: String },
    #[error("config file {path}: {key} = {value:?} is not valid: {reason}")]
    InvalidValue { path: PathBuf, key: String, value: String, reason: String },
}

/// The values a config file set, to name them when one turns out invalid.
#[derive(Debug)]
pub struct FileValues {
    path: PathBuf,
    /// (where, as `[table] key` or `key`; long option name; value as given to clap).
    values: Vec<(String, String, String)>,
}

impl FileValues {
    /// The error to report instead of clap's, when clap refused a value
    /// that came from this file.
    pub fn explain(&self, e: &clap::Error) -> Option<ConfigError> {
        use clap::error::{ContextKind, ErrorKind};
        if !matches!(e.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) {
            return None;
        }
        let arg = e.get(ContextKind::InvalidArg)?.to_string();
        let long = arg.split_whitespace().next()?.strip_prefix("--")?.to_owned();
        let value = e.get(ContextKind::InvalidValue)?.to_string();
        let (key, _, value) = self.values.iter().find(|(_, l, v)| *l == long && *v == value)?;
        let reason = std::error::Error::source(e).map_or_else(|| "not accepted".to_owned(), |s| s.to_string());
        Some(ConfigError::InvalidValue { path: self.path.clone(), key: key.clone(), value: value.clone(), reason })
    }
}

/// The config file named on the command line (`--config PATH`,
/// `--config=PATH`) or in `HERALD_CONFIG`; the command line wins.
pub fn path_from(args: &[OsString]) -> Option<PathBuf> {
    let mut args = args.iter().skip(1);
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy();
        if arg == "--" {
            break;
        }
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("HERALD_CONFIG").filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// Reads `path` and installs its values as defaults of `command`'s options.
pub fn apply_file(command: Command, path: &Path) -> Result<(Command, FileValues), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    apply(command, &text, path)
}

fn apply(mut command: Command, text: &str, path: &Path) -> Result<(Command, FileValues), ConfigError> {
    let mut set = FileValues { path: path.to_owned(), values: Vec::new() };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
    let roles: Vec<String> = command.get_subcommands().map(|c| c.get_name().to_owned()).collect();
    let unknown =
        |key: &str, where_: String| ConfigError::UnknownKey { path: path.to_owned(), key: key.to_owned(), where_ };
    for (key, value) in &table {
        match value {
            toml::Value::Table(section) if roles.iter().any(|r| r == key) => {
                let mut role = command.find_subcommand(key).cloned().ok_or_else(|| unknown(key, String::new()))?;
                for (option, value) in section {
                    let id = arg_id(&role, option)
                        .ok_or_else(|| unknown(option, format!(" in [{key}]: herald {key} has no --{option}")))?;
                    let value = render(value, delimiter(&role, option))
                        .ok_or_else(|| ConfigError::BadValue { path: path.to_owned(), key: option.clone() })?;
                    set.values.push((format!("[{key}] {option}"), option.clone(), value.clone()));
                    role = role.mut_arg(id, |a| a.default_value(value));
                }
                command = command.mut_subcommand(key, |_| role);
            }
            _ => {
                let value = render(value, delimiter(&command, key))
                    .ok_or_else(|| ConfigError::BadValue { path: path.to_owned(), key: key.clone() })?;
                set.values.push((key.clone(), key.clone(), value.clone()));
                let mut known = false;
                if key != "config"
                    && let Some(id) = arg_id(&command, key)
                {
                    known = true;
                    command = command.mut_arg(id, |a| a.default_value(value.clone()));
                }
                for role in &roles {
                    let sub = command.find_subcommand(role).cloned();
                    if let Some(id) = sub.as_ref().and_then(|s| arg_id(s, key)) {
                        known = true;
                        let value = value.clone();
                        command = command.mut_subcommand(role, |s| s.mut_arg(id, |a| a.default_value(value)));
                    }
                }
                if !known {
                    return Err(unknown(key, ": no role has this option".to_owned()));
                }
            }
        }
    }
    Ok((command, set))
}

/// The id of the option whose long name is `long`.
fn arg_id(command: &Command, long: &str) -> Option<String> {
    command.get_arguments().find(|a| a.get_long() == Some(long)).map(|a| a.get_id().to_string())
}

/// The character that separates the values of option `long` (of `command`
/// or of any of its roles): its value delimiter, or a comma.
fn delimiter(command: &Command, long: &str) -> char {
    std::iter::once(command)
        .chain(command.get_subcommands())
        .flat_map(Command::get_arguments)
        .find(|a| a.get_long() == Some(long))
        .and_then(clap::Arg::get_value_delimiter)
        .unwrap_or(',')
}

/// A TOML value as the text a flag would carry; lists become separated by
/// the option's own `delimiter`.
fn render(value: &toml::Value, delimiter: char) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(|item| render(item, delimiter))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(&delimiter.to_string())),
        toml::Value::Datetime(_) | toml::Value::Table(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::cli::{Cli, Role};

    fn parse(file: &str, args: &[&str]) -> Result<Cli, String> {
        let (command, values) = apply(Cli::command(), file, Path::new("test.toml")).map_err(|e| e.to_string())?;
        let matches = command
            .try_get_matches_from(args)
            .map_err(|e| values.explain(&e).map_or_else(|| e.to_string(), |e| e.to_string()))?;
        Cli::from_arg_matches(&matches).map_err(|e| e.to_string())
    }

    #[test]
    fn top_level_keys_reach_every_role_and_sections_only_theirs() {
        let file =
            "max-content-bytes = 1000\n[ws]\nmax-connections = 7\nallowed-origins = [\"https://a\", \"https://b\"]\n";
        let Cli { role: Role::Ws(ws), .. } = parse(file, &["herald", "ws"]).unwrap() else { panic!() };
        assert_eq!(ws.ws.max_connections, 7);
        assert_eq!(ws.ws.allowed_origins, ["https://a", "https://b"]);
        let namespaced = "namespace = [\"chat:subscribe=anyone,presence=on\", \"news\"]\n";
        let Cli { role: Role::Ws(ws), .. } = parse(namespaced, &["herald", "ws"]).unwrap() else { panic!() };
        let namespaces: Vec<String> = ws.namespaces.namespaces.iter().map(ToString::to_string).collect();
        assert_eq!(
            namespaces,
            ["chat:subscribe=anyone,publish=nobody,presence=on", "news:subscribe=users,publish=nobody,presence=off"]
        );
        let Cli { role: Role::Broker(broker), .. } = parse(namespaced, &["herald", "broker"]).unwrap() else {
            panic!()
        };
        assert_eq!(broker.namespaces.namespaces.len(), 2, "brokers read the same namespaces, for their history");
        let Cli { role: Role::Http(http), .. } = parse(file, &["herald", "http"]).unwrap() else { panic!() };
        assert_eq!(http.content.max_content_bytes, 1000);
        let Cli { role: Role::Standalone(sa), .. } = parse(file, &["herald", "standalone"]).unwrap() else { panic!() };
        assert_eq!(sa.ws.max_connections, 100_000, "[ws] does not apply to standalone");
    }

    #[test]
    fn flags_win_over_the_file() {
        let Cli { role: Role::Ws(ws), .. } =
            parse("[ws]\nmax-connections = 7\n", &["herald", "ws", "--max-connections", "9"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(ws.ws.max_connections, 9);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = parse("max-conections = 7\n", &["herald", "ws"]).unwrap_err();
        assert!(err.contains("unknown key \"max-conections\""), "{err}");
        let err = parse("[http]\nworker-id = \"w\"\n", &["herald", "http"]).unwrap_err();
        assert!(err.contains("in [http]: herald http has no --worker-id"), "{err}");
        let err = parse("[ws]\nmax-connections = \"many\"\n", &["herald", "ws"]).unwrap_err();
        assert!(err.starts_with("config file test.toml: [ws] max-connections = \"many\" is not valid: "), "{err}");
        let err = parse("[broker]\nlisten = \"nope\"\n", &["herald", "broker"]).unwrap_err();
        assert!(err.contains("[broker] listen = \"nope\" is not valid: invalid socket address"), "{err}");
        let err = parse("write-timeout = \"soon\"\n", &["herald", "ws"]).unwrap_err();
        assert!(err.contains("write-timeout = \"soon\" is not valid"), "{err}");
        let err = parse("listen = { a = 1 }\n", &["herald", "ws"]).unwrap_err();
        assert!(err.contains("key \"listen\" must be"), "{err}");
        let err = parse("not toml", &["herald", "ws"]).unwrap_err();
        assert!(err.contains("not valid TOML"), "{err}");
    }

    #[test]
    fn the_config_path_comes_from_the_command_line_first() {
        let args: Vec<OsString> = ["herald", "ws", "--config", "a.toml"].iter().map(OsString::from).collect();
        assert_eq!(path_from(&args), Some(PathBuf::from("a.toml")));
        let args: Vec<OsString> = ["herald", "--config=b.toml", "ws"].iter().map(OsString::from).collect();
        assert_eq!(path_from(&args), Some(PathBuf::from("b.toml")));
    }
}
