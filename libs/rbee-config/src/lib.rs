//! Layered configuration loader shared by the rbee daemons.
//!
//! A daemon describes its configuration as a plain serde struct (use
//! `#[serde(deny_unknown_fields, default)]` so typos are caught and every key is optional),
//! implements [`Validate`] for cross-field checks, and builds a [`Loader`]:
//!
//! ```
//! use rbee_config::{FieldError, Loader, Validate};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize, Default)]
//! #[serde(deny_unknown_fields, default)]
//! struct HiveConfig {
//!     listen: String,
//!     max_workers: u32,
//! }
//!
//! impl Validate for HiveConfig {
//!     fn validate(&self) -> Vec<FieldError> {
//!         let mut errors = Vec::new();
//!         if self.max_workers == 0 {
//!             errors.push(FieldError::new("max_workers", "must be at least 1"));
//!         }
//!         errors
//!     }
//! }
//!
//! # fn main() -> Result<(), rbee_config::ConfigError> {
//! let config: HiveConfig = Loader::new("RBEE_HIVE_")
//!     .file(None) // e.g. the --config path, if any
//!     .env_vars([("RBEE_HIVE_MAX_WORKERS".to_string(), "4".to_string())]) // or .env_from_process()
//!     .ignore_env(&["RBEE_HIVE_CONFIG", "RBEE_HIVE_TOKEN"])
//!     .set("listen", "127.0.0.1:7835", "--listen")
//!     .load()?;
//! assert_eq!(config.max_workers, 4);
//! assert_eq!(config.listen, "127.0.0.1:7835");
//! # Ok(())
//! # }
//! ```
//!
//! # Layers
//!
//! Later layers win, key by key: struct defaults < TOML file < environment < flags.
//! An override replaces the value at its key (an array or inline table is not merged).
//!
//! # Environment mapping
//!
//! With prefix `RBEE_HIVE_`, the rest of the variable name is lowercased and `__` separates
//! nesting levels; a single `_` stays part of the key: `RBEE_HIVE_KEEP_ALIVE_SECONDS` sets
//! `keep_alive_seconds`, `RBEE_HIVE_RESTART__MAX_ATTEMPTS` sets `restart.max_attempts`.
//! Variables named with [`Loader::ignore_env`] (full names) are skipped; any other variable with
//! the prefix that maps to no key is an error ([`ConfigError::UnknownEnv`]), so typos don't go
//! unnoticed.
//!
//! # Value typing (env and flags)
//!
//! The raw text is read as a TOML value (`v = <raw>`): `60` is an integer, `1.5` a float,
//! `true` a boolean, `["/a", "/b"]` or `[9000, 9100]` an array, `"x"` the string `x`.
//! Anything that isn't a TOML value (`127.0.0.1:7835`, `/var/lib/rbee`, `json`, `2024-01-01`)
//! is taken as a string. When a string field rejects a typed value (`name = 1234`), the raw text
//! is retried as a string, so `RBEE_HIVE_NAME=1234` works.
//!
//! # Errors
//!
//! Every [`ConfigError`] displays as a short message naming the field (dotted path) and the
//! layer that set it, ready to show an operator, e.g.
//! `config: max_workers (env RBEE_HIVE_MAX_WORKERS): invalid type: string "abc", expected u32`
//! or `config file /etc/rbee/hive.toml:7: workers.keep_alive: unknown field `keep_alive`, ...`.
//!
//! # Reloads
//!
//! [`changed_keys`] lists the dotted keys that differ between two loaded configs, for logging
//! what a SIGHUP reload changed. [`Loader::origins`] tells which layer set each key, for
//! `--check-config` style reports.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// Where a value came from, for error messages and for `--check-config` style reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Not set by any layer: the struct's serde default.
    Default,
    /// The TOML file at this path.
    File(PathBuf),
    /// This environment variable (full name).
    Env(String),
    /// This command-line flag (as passed to [`Loader::set`]).
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(name) => write!(f, "env {name}"),
            Self::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// Cross-field checks that serde can't express. Return every problem at once; empty = valid.
pub trait Validate {
    /// Default: nothing to check.
    fn validate(&self) -> Vec<FieldError> {
        Vec::new()
    }
}

/// One validation problem: the dotted key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    /// `FieldError::new("workers.port_min", "must not exceed workers.port_max")`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a configuration could not be loaded. `Display` is meant for operators.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (missing, unreadable, not UTF-8).
    #[error("config file {}: cannot read: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML. `line`/`column` are 1-based.
    #[error("{}", fmt_parse(.path, *.line, *.column, .message))]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// A value has the wrong type or shape, or a file/flag key is unknown.
    /// `field` is the dotted path (`workers.port_min`, `model_dirs[1]`; empty for the top level),
    /// `origin` the layer that set it, `line` the file line when `origin` is the file.
    #[error("{}", fmt_field(.field, .origin, *.line, .message))]
    Field {
        field: String,
        origin: Source,
        line: Option<usize>,
        message: String,
    },
    /// An environment variable with the prefix maps to no config key (likely a typo).
    /// Needs `#[serde(deny_unknown_fields)]` on the structs; without it such keys are ignored.
    #[error("config: env {name} is not a config setting: {message}")]
    UnknownEnv {
        name: String,
        /// The dotted key the variable maps to.
        key: String,
        message: String,
    },
    /// [`Validate::validate`] found problems; all of them, in its order.
    #[error("{}", fmt_invalid(.0))]
    Invalid(Vec<FieldError>),
}

fn fmt_parse(path: &Path, line: Option<usize>, column: Option<usize>, message: &str) -> String {
    let at = match (line, column) {
        (Some(line), Some(column)) => format!(":{line}:{column}"),
        (Some(line), None) => format!(":{line}"),
        _ => String::new(),
    };
    format!(
        "config file {}{at}: TOML syntax error: {message}",
        path.display()
    )
}

fn fmt_field(field: &str, origin: &Source, line: Option<usize>, message: &str) -> String {
    // An empty field is the top level (e.g. a missing required key).
    match (origin, field.is_empty()) {
        (Source::File(path), top) => {
            let at = line.map(|l| format!(":{l}")).unwrap_or_default();
            let field = if top {
                String::new()
            } else {
                format!("{field}: ")
            };
            format!("config file {}{at}: {field}{message}", path.display())
        }
        (other, true) => format!("config ({other}): {message}"),
        (other, false) => format!("config: {field} ({other}): {message}"),
    }
}

fn fmt_invalid(errors: &[FieldError]) -> String {
    match errors {
        [one] => format!("invalid config: {one}"),
        many => {
            let mut out = format!("invalid config ({} problems):", many.len());
            for e in many {
                out.push_str("\n  ");
                out.push_str(&e.to_string());
            }
            out
        }
    }
}

/// Builds a configuration from file, environment and flags. See the crate docs.
#[derive(Debug, Clone)]
pub struct Loader {
    prefix: String,
    file: Option<PathBuf>,
    /// Variables with the prefix, in the order given; `None` value = not UTF-8.
    env: Vec<(String, Option<String>)>,
    ignored: BTreeSet<String>,
    flags: Vec<(String, String, String)>,
}

/// One env or flag override, ready to merge.
#[derive(Debug, Clone)]
struct Override {
    key: Vec<String>,
    raw: String,
    origin: Source,
    /// Set after a string field rejected the typed reading of `raw`.
    as_string: bool,
}

impl Loader {
    /// `env_prefix` like `"RBEE_HIVE_"` (a trailing `_` is added if missing).
    pub fn new(env_prefix: &str) -> Self {
        let mut prefix = env_prefix.to_string();
        if !prefix.is_empty() && !prefix.ends_with('_') {
            prefix.push('_');
        }
        Self {
            prefix,
            file: None,
            env: Vec::new(),
            ignored: BTreeSet::new(),
            flags: Vec::new(),
        }
    }

    /// Optional TOML file. `None` or an empty path means no file: defaults apply.
    pub fn file(mut self, path: Option<&Path>) -> Self {
        self.file = path
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf);
        self
    }

    /// Take every process environment variable whose name starts with the prefix.
    pub fn env_from_process(mut self) -> Self {
        // vars_os: std::env::vars() panics on a non-UTF-8 variable anywhere in the environment.
        for (name, value) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with(&self.prefix) {
                self.env.push((name, value.into_string().ok()));
            }
        }
        self
    }

    /// Same as [`Loader::env_from_process`] from an explicit list (tests, or a captured env).
    pub fn env_vars(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        for (name, value) in vars {
            if name.starts_with(&self.prefix) {
                self.env.push((name, Some(value)));
            }
        }
        self
    }

    /// Full names of variables with the prefix that are not config keys
    /// (e.g. `RBEE_HIVE_CONFIG`, `RBEE_HIVE_TOKEN`) and must be skipped.
    pub fn ignore_env(mut self, names: &[&str]) -> Self {
        self.ignored.extend(names.iter().map(|n| n.to_string()));
        self
    }

    /// Flag override: dotted `key` (`"listen"`, `"workers.port_min"`), raw text value, and the
    /// flag name for messages (`"--listen"`). Later calls win over earlier ones.
    pub fn set(mut self, key: &str, raw: impl Into<String>, flag: &str) -> Self {
        self.flags
            .push((key.to_string(), raw.into(), flag.to_string()));
        self
    }

    /// Merge file < env < flags, deserialize into `T`, then run [`Validate::validate`].
    pub fn load<T: DeserializeOwned + Validate>(&self) -> Result<T, ConfigError> {
        let file = self.read_file()?;
        let mut overrides = self.overrides()?;
        let base = file.as_ref().map(|f| f.table.clone()).unwrap_or_default();
        // Each retry turns one override into a string, so this ends.
        loop {
            let (merged, created) = merge(base.clone(), &overrides);
            let err = match serde_path_to_error::deserialize::<_, T>(Value::Table(merged)) {
                Ok(config) => {
                    let errors = config.validate();
                    return if errors.is_empty() {
                        Ok(config)
                    } else {
                        Err(ConfigError::Invalid(errors))
                    };
                }
                Err(err) => err,
            };
            let path = segments(err.path());
            let message = err.inner().message().to_string();
            let winner = attribute(&overrides, &created, &path);
            if let Some(i) = winner {
                let o = &mut overrides[i];
                // A string field given "1234" or "true": use the text as written.
                if o.key == path
                    && !o.as_string
                    && message.starts_with("invalid type:")
                    && !matches!(typed(&o.raw), Value::String(_))
                {
                    o.as_string = true;
                    continue;
                }
            }
            return Err(self.field_error::<T>(file.as_ref(), &overrides, winner, &path, message));
        }
    }

    /// Every leaf key set by the file, env or flags (dotted, sorted), with the layer that won.
    /// Keys not listed come from [`Source::Default`]. Doesn't check keys against a type.
    pub fn origins(&self) -> Result<BTreeMap<String, Source>, ConfigError> {
        let file = self.read_file()?;
        let overrides = self.overrides()?;
        let base = file.as_ref().map(|f| f.table.clone()).unwrap_or_default();
        let (merged, created) = merge(base, &overrides);
        let mut leaves = Vec::new();
        collect_leaves(&merged, &mut Vec::new(), &mut leaves);
        Ok(leaves
            .into_iter()
            .map(|key| {
                let origin = match attribute(&overrides, &created, &key) {
                    Some(i) => overrides[i].origin.clone(),
                    None => file
                        .as_ref()
                        .map_or(Source::Default, |f| Source::File(f.path.clone())),
                };
                (key.join("."), origin)
            })
            .collect())
    }

    fn read_file(&self) -> Result<Option<LoadedFile>, ConfigError> {
        let Some(path) = &self.file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let table = text.parse::<Table>().map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(&text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            ConfigError::Parse {
                path: path.clone(),
                line,
                column,
                message: e.message().trim_end().to_string(),
            }
        })?;
        Ok(Some(LoadedFile {
            path: path.clone(),
            text,
            table,
        }))
    }

    /// Env overrides (sorted by name, so the process env order doesn't matter), then flags.
    fn overrides(&self) -> Result<Vec<Override>, ConfigError> {
        let mut env: Vec<&(String, Option<String>)> = self
            .env
            .iter()
            .filter(|(name, _)| !self.ignored.contains(name))
            .collect();
        // Stable: for a repeated name the later entry still wins.
        env.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::with_capacity(env.len() + self.flags.len());
        for (name, value) in env {
            let rest = name[self.prefix.len()..].to_lowercase();
            let key: Vec<String> = rest.split("__").map(str::to_string).collect();
            if key.iter().any(String::is_empty) {
                return Err(ConfigError::UnknownEnv {
                    name: name.clone(),
                    key: key.join("."),
                    message: "empty key segment (nested keys are separated by `__`)".to_string(),
                });
            }
            let Some(raw) = value else {
                return Err(ConfigError::Field {
                    field: key.join("."),
                    origin: Source::Env(name.clone()),
                    line: None,
                    message: "value is not valid UTF-8".to_string(),
                });
            };
            out.push(Override {
                key,
                raw: raw.clone(),
                origin: Source::Env(name.clone()),
                as_string: false,
            });
        }
        for (key_text, raw, flag) in &self.flags {
            let key: Vec<String> = key_text.split('.').map(str::to_string).collect();
            if key.iter().any(String::is_empty) {
                return Err(ConfigError::Field {
                    field: key_text.clone(),
                    origin: Source::Flag(flag.clone()),
                    line: None,
                    message: "not a valid config key (empty segment)".to_string(),
                });
            }
            out.push(Override {
                key,
                raw: raw.clone(),
                origin: Source::Flag(flag.clone()),
                as_string: false,
            });
        }
        Ok(out)
    }

    fn field_error<T: DeserializeOwned>(
        &self,
        file: Option<&LoadedFile>,
        overrides: &[Override],
        winner: Option<usize>,
        path: &[String],
        message: String,
    ) -> ConfigError {
        let field = display_path(path);
        if let Some(i) = winner {
            let origin = overrides[i].origin.clone();
            if let Source::Env(name) = &origin
                && message.starts_with("unknown field")
            {
                return ConfigError::UnknownEnv {
                    name: name.clone(),
                    key: field,
                    message,
                };
            }
            return ConfigError::Field {
                field,
                origin,
                line: None,
                message,
            };
        }
        match file {
            Some(file) => ConfigError::Field {
                field,
                origin: Source::File(file.path.clone()),
                line: file_line::<T>(&file.text, path),
                message,
            },
            None => ConfigError::Field {
                field,
                origin: Source::Default,
                line: None,
                message,
            },
        }
    }
}

struct LoadedFile {
    path: PathBuf,
    text: String,
    table: Table,
}

/// The TOML reading of `raw`, or `raw` as a string when it isn't a single TOML value.
fn typed(raw: &str) -> Value {
    let parsed = format!("v = {raw}")
        .parse::<Table>()
        .ok()
        .filter(|t| t.len() == 1)
        .and_then(|mut t| t.remove("v"));
    match parsed {
        // A date is far more likely meant as text than as a TOML datetime.
        Some(Value::Datetime(_)) | None => Value::String(raw.to_string()),
        Some(v) => v,
    }
}

/// Apply overrides in order. Also returns, per override, how many leading segments of its key
/// lie in the subtree it created or replaced: errors inside that subtree are its doing.
fn merge(mut table: Table, overrides: &[Override]) -> (Table, Vec<usize>) {
    let created = overrides
        .iter()
        .map(|o| {
            let value = if o.as_string {
                Value::String(o.raw.clone())
            } else {
                typed(&o.raw)
            };
            insert(&mut table, &o.key, value)
        })
        .collect();
    (table, created)
}

fn insert(table: &mut Table, key: &[String], value: Value) -> usize {
    let Some((last, parents)) = key.split_last() else {
        return 0;
    };
    let mut created = None;
    let mut cur = table;
    for (i, seg) in parents.iter().enumerate() {
        if !cur.get(seg).is_some_and(Value::is_table) {
            // A higher layer wins: a scalar in the way is replaced by a table.
            cur.insert(seg.clone(), Value::Table(Table::new()));
            created.get_or_insert(i + 1);
        }
        match cur.get_mut(seg) {
            Some(Value::Table(next)) => cur = next,
            _ => return created.unwrap_or(i + 1),
        }
    }
    cur.insert(last.clone(), value);
    created.unwrap_or(key.len())
}

/// The override responsible for a value at `path`: the one whose created subtree holds it most
/// narrowly; among equals, the last applied (it won).
fn attribute(overrides: &[Override], created: &[usize], path: &[String]) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, (o, &n)) in overrides.iter().zip(created).enumerate() {
        let inside = n > 0 && o.key.get(..n).is_some_and(|root| path.starts_with(root));
        // `>=`: a later override of the same subtree won the merge.
        if inside && best.is_none_or(|(_, best_n)| n >= best_n) {
            best = Some((i, n));
        }
    }
    best.map(|(i, _)| i)
}

fn segments(path: &serde_path_to_error::Path) -> Vec<String> {
    path.iter()
        .map(|seg| match seg {
            serde_path_to_error::Segment::Seq { index } => format!("[{index}]"),
            serde_path_to_error::Segment::Map { key } => key.clone(),
            serde_path_to_error::Segment::Enum { variant } => variant.clone(),
            serde_path_to_error::Segment::Unknown => "?".to_string(),
        })
        .collect()
}

/// `workers.port_min`, `model_dirs[1]`.
fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if !out.is_empty() && !seg.starts_with('[') {
            out.push('.');
        }
        out.push_str(seg);
    }
    out
}

/// Find the line of a file error by deserializing the file alone with spans; only trusted
/// when that run fails at the same path.
fn file_line<T: DeserializeOwned>(text: &str, path: &[String]) -> Option<usize> {
    let de = toml::de::Deserializer::parse(text).ok()?;
    let err = serde_path_to_error::deserialize::<_, T>(de).err()?;
    if segments(err.path()) != path {
        return None;
    }
    let span = err.inner().span()?;
    Some(line_col(text, span.start).0)
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn collect_leaves(table: &Table, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for (k, v) in table {
        prefix.push(k.clone());
        match v {
            Value::Table(t) => collect_leaves(t, prefix, out),
            _ => out.push(prefix.clone()),
        }
        prefix.pop();
    }
}

/// Dotted keys whose values differ between two configs, sorted; for logging what a reload
/// changed. Arrays count as one value. `"."` means the whole value (also reported if either
/// side can't be represented as JSON).
pub fn changed_keys<T: serde::Serialize>(old: &T, new: &T) -> Vec<String> {
    let (Ok(old), Ok(new)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return vec![".".to_string()];
    };
    let mut out = Vec::new();
    diff(String::new(), &old, &new, &mut out);
    out.sort();
    out
}

fn diff(prefix: String, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value as J;
    match (old, new) {
        (J::Object(a), J::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(key, x, y, out),
                    _ => out.push(key),
                }
            }
        }
        (a, b) if a == b => {}
        _ => out.push(if prefix.is_empty() {
            ".".to_string()
        } else {
            prefix
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_reads_toml_values_and_falls_back_to_text() {
        assert_eq!(typed("60"), Value::Integer(60));
        assert_eq!(typed("-1.5"), Value::Float(-1.5));
        assert_eq!(typed("false"), Value::Boolean(false));
        assert_eq!(typed("\"quoted\""), Value::String("quoted".into()));
        assert_eq!(
            typed("[1, 2]"),
            Value::Array(vec![Value::Integer(1), Value::Integer(2)])
        );
        for text in [
            "127.0.0.1:7835",
            "/var/lib/rbee",
            "",
            "json",
            "1979-05-27",
            "1\nx = 2",
        ] {
            assert_eq!(typed(text), Value::String(text.into()), "{text:?}");
        }
    }

    #[test]
    fn line_col_is_one_based_in_characters() {
        let text = "a = 1\nbé = = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, text.find("= =").unwrap_or(0)), (2, 4));
    }

    #[test]
    fn insert_reports_the_created_subtree() {
        let mut t: Table = "[workers]\nport_max = 1\nscalar = 2"
            .parse()
            .unwrap_or_default();
        let key = |k: &str| k.split('.').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            insert(&mut t, &key("workers.port_min"), Value::Integer(1)),
            2
        );
        assert_eq!(insert(&mut t, &key("restart.a.b"), Value::Integer(1)), 1);
        assert_eq!(insert(&mut t, &key("scalar.x"), Value::Integer(1)), 1);
        assert_eq!(
            t.get("scalar").and_then(|v| v.get("x")),
            Some(&Value::Integer(1))
        );
    }
}
