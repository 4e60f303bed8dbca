//! The config loader end to end: defaults, file < environment < flags, and errors naming the field and layer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use rbee_config::{ConfigError, FieldError, Loader, Source, Validate, changed_keys};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct Hive {
    listen: String,
    max_workers: u32,
    keep_alive_seconds: u64,
    name: String,
    model_dirs: Vec<PathBuf>,
    ports: Vec<u16>,
    ratio: f64,
    dev: bool,
    queen_url: Option<String>,
    restart: Restart,
    workers: Workers,
}

impl Default for Hive {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7835".into(),
            max_workers: 4,
            keep_alive_seconds: 30,
            name: "hive".into(),
            model_dirs: Vec::new(),
            ports: Vec::new(),
            ratio: 1.0,
            dev: false,
            queen_url: None,
            restart: Restart::default(),
            workers: Workers::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct Restart {
    max_attempts: u32,
    backoff_ms: u64,
}

impl Default for Restart {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff_ms: 500,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct Workers {
    port_min: u16,
    port_max: u16,
}

impl Default for Workers {
    fn default() -> Self {
        Self {
            port_min: 9000,
            port_max: 9100,
        }
    }
}

impl Validate for Hive {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.max_workers == 0 {
            errors.push(FieldError::new("max_workers", "must be at least 1"));
        }
        if self.workers.port_min > self.workers.port_max {
            errors.push(FieldError::new(
                "workers.port_min",
                format!(
                    "must not exceed workers.port_max ({} > {})",
                    self.workers.port_min, self.workers.port_max
                ),
            ));
        }
        errors
    }
}

/// A temp file that removes itself.
struct TempToml(PathBuf);

impl TempToml {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "rbee-config-test-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempToml {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn hive() -> Loader {
    Loader::new("RBEE_HIVE_")
}

fn err(loader: Loader) -> ConfigError {
    match loader.load::<Hive>() {
        Ok(config) => panic!("expected an error, loaded {config:?}"),
        Err(e) => e,
    }
}

#[test]
fn no_file_and_no_overrides_gives_defaults() {
    assert_eq!(hive().file(None).load::<Hive>().unwrap(), Hive::default());
    // An empty --config value means "no file" too.
    assert_eq!(
        hive().file(Some(Path::new(""))).load::<Hive>().unwrap(),
        Hive::default()
    );
}

#[test]
fn precedence_is_file_then_env_then_flag() {
    let f = TempToml::new(
        "precedence",
        "listen = \"0.0.0.0:7835\"\nmax_workers = 2\nkeep_alive_seconds = 10\nname = \"from-file\"\n",
    );
    let config: Hive = hive()
        .file(Some(f.path()))
        .env_vars(env(&[
            ("RBEE_HIVE_MAX_WORKERS", "3"),
            ("RBEE_HIVE_KEEP_ALIVE_SECONDS", "60"),
        ]))
        .set("max_workers", "8", "--max-workers")
        .load()
        .unwrap();
    assert_eq!(config.listen, "0.0.0.0:7835"); // file only
    assert_eq!(config.name, "from-file"); // file only
    assert_eq!(config.keep_alive_seconds, 60); // env beats file
    assert_eq!(config.max_workers, 8); // flag beats env and file
    assert_eq!(config.ratio, 1.0); // default
}

#[test]
fn later_flag_wins() {
    let config: Hive = hive()
        .set("max_workers", "2", "--max-workers")
        .set("max_workers", "6", "--set")
        .load()
        .unwrap();
    assert_eq!(config.max_workers, 6);
}

#[test]
fn nested_keys_via_double_underscore_merge_with_file() {
    let f = TempToml::new(
        "nested",
        "[workers]\nport_max = 9500\n[restart]\nbackoff_ms = 250\n",
    );
    let config: Hive = hive()
        .file(Some(f.path()))
        .env_vars(env(&[
            ("RBEE_HIVE_RESTART__MAX_ATTEMPTS", "3"),
            ("RBEE_HIVE_WORKERS__PORT_MIN", "9400"),
        ]))
        .set("workers.port_max", "9450", "--port-max")
        .load()
        .unwrap();
    assert_eq!(
        config.restart,
        Restart {
            max_attempts: 3,
            backoff_ms: 250
        }
    );
    assert_eq!(
        config.workers,
        Workers {
            port_min: 9400,
            port_max: 9450
        }
    );
}

#[test]
fn values_are_typed_as_toml_or_else_strings() {
    let config: Hive = hive()
        .env_vars(env(&[
            ("RBEE_HIVE_MODEL_DIRS", r#"["/a", "/b"]"#),
            ("RBEE_HIVE_RATIO", "0.5"),
            ("RBEE_HIVE_DEV", "true"),
            ("RBEE_HIVE_LISTEN", "127.0.0.1:9999"),
            ("RBEE_HIVE_QUEEN_URL", "http://queen:7833"),
        ]))
        .set("ports", "[9000, 9100]", "--ports")
        .load()
        .unwrap();
    assert_eq!(
        config.model_dirs,
        vec![PathBuf::from("/a"), PathBuf::from("/b")]
    );
    assert_eq!(config.ports, vec![9000, 9100]);
    assert_eq!(config.ratio, 0.5);
    assert!(config.dev);
    assert_eq!(config.listen, "127.0.0.1:9999");
    assert_eq!(config.queen_url.as_deref(), Some("http://queen:7833"));
}

#[test]
fn string_fields_accept_numeric_and_boolean_text() {
    let config: Hive = hive()
        .env_vars(env(&[
            ("RBEE_HIVE_NAME", "1234"),
            ("RBEE_HIVE_QUEEN_URL", "2024-01-01"),
        ]))
        .set("listen", "true", "--listen")
        .load()
        .unwrap();
    assert_eq!(config.name, "1234");
    assert_eq!(config.queen_url.as_deref(), Some("2024-01-01"));
    assert_eq!(config.listen, "true");
}

#[test]
fn unknown_field_in_file_names_field_file_and_line() {
    let f = TempToml::new("unknown", "max_workers = 2\n\n[workers]\nkeep_alive = 5\n");
    let e = err(hive().file(Some(f.path())));
    let ConfigError::Field {
        field,
        origin,
        line,
        message,
    } = &e
    else {
        panic!("expected Field, got {e:?}");
    };
    assert_eq!(field, "workers.keep_alive");
    assert_eq!(origin, &Source::File(f.path().to_path_buf()));
    assert_eq!(*line, Some(4));
    assert_eq!(
        message,
        "unknown field `keep_alive`, expected `port_min` or `port_max`"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "config file {}:4: workers.keep_alive: unknown field `keep_alive`, expected `port_min` or `port_max`",
            f.path().display()
        )
    );
}

#[test]
fn wrong_type_in_file_names_field_and_line() {
    let f = TempToml::new("wrongtype", "name = \"n\"\nmax_workers = \"many\"\n");
    let e = err(hive().file(Some(f.path())));
    assert_eq!(
        e.to_string(),
        format!(
            "config file {}:2: max_workers: invalid type: string \"many\", expected u32",
            f.path().display()
        )
    );
}

#[test]
fn unknown_env_var_is_reported_by_name() {
    let e = err(hive().env_vars(env(&[("RBEE_HIVE_KEEP_ALIVE", "60")])));
    let ConfigError::UnknownEnv { name, key, message } = &e else {
        panic!("expected UnknownEnv, got {e:?}");
    };
    assert_eq!(name, "RBEE_HIVE_KEEP_ALIVE");
    assert_eq!(key, "keep_alive");
    assert!(
        message.starts_with("unknown field `keep_alive`, expected one of `listen`"),
        "{message}"
    );
    assert!(
        e.to_string().starts_with(
            "config: env RBEE_HIVE_KEEP_ALIVE is not a config setting: unknown field `keep_alive`"
        ),
        "{e}"
    );

    // A typo one level down, and a whole unknown section.
    let e = err(hive().env_vars(env(&[("RBEE_HIVE_RESTART__MAX_ATEMPTS", "3")])));
    assert!(
        matches!(&e, ConfigError::UnknownEnv { name, key, .. }
            if name == "RBEE_HIVE_RESTART__MAX_ATEMPTS" && key == "restart.max_atempts"),
        "{e:?}"
    );
    let e = err(hive().env_vars(env(&[("RBEE_HIVE_TYPO__X", "1")])));
    assert!(
        matches!(&e, ConfigError::UnknownEnv { name, key, .. } if name == "RBEE_HIVE_TYPO__X" && key == "typo"),
        "{e:?}"
    );
    // Empty segment: three underscores in a row leave nothing between levels.
    let e = err(hive().env_vars(env(&[("RBEE_HIVE_RESTART____X", "1")])));
    assert!(
        matches!(&e, ConfigError::UnknownEnv { name, key, .. } if name == "RBEE_HIVE_RESTART____X" && key == "restart..x"),
        "{e:?}"
    );
}

#[test]
fn ignored_and_unprefixed_env_vars_are_skipped() {
    let config: Hive = hive()
        .env_vars(env(&[
            ("RBEE_HIVE_CONFIG", "/etc/rbee/hive.toml"),
            ("RBEE_HIVE_TOKEN", "secret"),
            ("RBEE_QUEEN_MAX_WORKERS", "abc"),
            ("PATH", "/usr/bin"),
            ("RBEE_HIVE_MAX_WORKERS", "7"),
        ]))
        .ignore_env(&["RBEE_HIVE_CONFIG", "RBEE_HIVE_TOKEN"])
        .load()
        .unwrap();
    assert_eq!(config.max_workers, 7);
}

#[test]
fn wrong_type_from_env_names_the_variable() {
    let e = err(hive().env_vars(env(&[("RBEE_HIVE_MAX_WORKERS", "abc")])));
    assert_eq!(
        e.to_string(),
        "config: max_workers (env RBEE_HIVE_MAX_WORKERS): invalid type: string \"abc\", expected u32"
    );
    let e = err(hive().env_vars(env(&[("RBEE_HIVE_WORKERS__PORT_MIN", "70000")])));
    assert_eq!(
        e.to_string(),
        "config: workers.port_min (env RBEE_HIVE_WORKERS__PORT_MIN): invalid value: integer `70000`, expected u16"
    );
    let e = err(hive().env_vars(env(&[("RBEE_HIVE_PORTS", r#"[9000, "x"]"#)])));
    assert_eq!(
        e.to_string(),
        "config: ports[1] (env RBEE_HIVE_PORTS): invalid type: string \"x\", expected u16"
    );
}

#[test]
fn env_replacing_a_file_scalar_with_a_table_is_blamed_on_the_env() {
    let f = TempToml::new("replace", "max_workers = 2\n");
    let e = err(hive()
        .file(Some(f.path()))
        .env_vars(env(&[("RBEE_HIVE_MAX_WORKERS__X", "1")])));
    assert_eq!(
        e.to_string(),
        "config: max_workers (env RBEE_HIVE_MAX_WORKERS__X): invalid type: map, expected u32"
    );
}

#[test]
fn flag_errors_name_the_flag() {
    let e = err(hive().set("workers.port_min", "low", "--port-min"));
    assert_eq!(
        e.to_string(),
        "config: workers.port_min (flag --port-min): invalid type: string \"low\", expected u16"
    );
    let e = err(hive().set("workers.colour", "1", "--set"));
    let ConfigError::Field { field, origin, .. } = &e else {
        panic!("expected Field, got {e:?}");
    };
    assert_eq!(field, "workers.colour");
    assert_eq!(origin, &Source::Flag("--set".into()));
    let e = err(hive().set("workers..port_min", "1", "--set"));
    assert_eq!(
        e.to_string(),
        "config: workers..port_min (flag --set): not a valid config key (empty segment)"
    );
}

#[test]
fn toml_syntax_error_reports_line_and_column() {
    let f = TempToml::new("syntax", "listen = \"x\"\nmax_workers = = 3\n");
    let e = err(hive().file(Some(f.path())));
    let ConfigError::Parse {
        path,
        line,
        column,
        message,
    } = &e
    else {
        panic!("expected Parse, got {e:?}");
    };
    assert_eq!(path, f.path());
    assert_eq!((*line, *column), (Some(2), Some(15)));
    assert_eq!(message, "extra `=`, expected nothing");
    assert_eq!(
        e.to_string(),
        format!(
            "config file {}:2:15: TOML syntax error: extra `=`, expected nothing",
            f.path().display()
        )
    );
}

#[test]
fn validation_errors_are_all_collected() {
    let e = err(hive().set("max_workers", "0", "--max-workers").set(
        "workers.port_min",
        "9200",
        "--port-min",
    ));
    let ConfigError::Invalid(errors) = &e else {
        panic!("expected Invalid, got {e:?}");
    };
    assert_eq!(
        errors,
        &vec![
            FieldError::new("max_workers", "must be at least 1"),
            FieldError::new(
                "workers.port_min",
                "must not exceed workers.port_max (9200 > 9100)"
            ),
        ]
    );
    assert_eq!(
        e.to_string(),
        "invalid config (2 problems):\n  max_workers: must be at least 1\n  workers.port_min: must not exceed workers.port_max (9200 > 9100)"
    );
    let e = err(hive().set("max_workers", "0", "--max-workers"));
    assert_eq!(
        e.to_string(),
        "invalid config: max_workers: must be at least 1"
    );
}

#[test]
fn missing_required_field_without_default() {
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Strict {
        #[allow(dead_code)]
        listen: String,
    }
    impl Validate for Strict {}
    let e = Loader::new("RBEE_QUEEN").load::<Strict>().unwrap_err();
    assert_eq!(e.to_string(), "config (default): missing field `listen`");
    // The prefix gains its trailing underscore.
    let s: Strict = Loader::new("RBEE_QUEEN")
        .env_vars(env(&[("RBEE_QUEEN_LISTEN", "0.0.0.0:7833")]))
        .load()
        .unwrap();
    assert_eq!(s.listen, "0.0.0.0:7833");
}

#[test]
fn missing_file_is_a_read_error_naming_the_path() {
    let path = std::env::temp_dir().join("rbee-config-test-does-not-exist.toml");
    let e = err(hive().file(Some(&path)));
    let ConfigError::Read { path: p, source } = &e else {
        panic!("expected Read, got {e:?}");
    };
    assert_eq!(p, &path);
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    assert!(
        e.to_string()
            .starts_with(&format!("config file {}: cannot read: ", path.display())),
        "{e}"
    );
}

#[test]
fn origins_report_the_winning_layer() {
    let f = TempToml::new(
        "origins",
        "name = \"n\"\nmax_workers = 2\n[workers]\nport_max = 9500\n",
    );
    let origins = hive()
        .file(Some(f.path()))
        .env_vars(env(&[
            ("RBEE_HIVE_MAX_WORKERS", "3"),
            ("RBEE_HIVE_RESTART__MAX_ATTEMPTS", "1"),
        ]))
        .set("name", "x", "--name")
        .origins()
        .unwrap();
    let got: Vec<(&str, &Source)> = origins.iter().map(|(k, v)| (k.as_str(), v)).collect();
    assert_eq!(
        got,
        vec![
            ("max_workers", &Source::Env("RBEE_HIVE_MAX_WORKERS".into())),
            ("name", &Source::Flag("--name".into())),
            (
                "restart.max_attempts",
                &Source::Env("RBEE_HIVE_RESTART__MAX_ATTEMPTS".into())
            ),
            ("workers.port_max", &Source::File(f.path().to_path_buf())),
        ]
    );
}

#[test]
fn changed_keys_lists_nested_differences() {
    let old = Hive::default();
    let mut new = old.clone();
    assert!(changed_keys(&old, &new).is_empty());
    new.max_workers = 9;
    new.workers.port_max = 9999;
    new.restart.backoff_ms = 1;
    new.model_dirs.push("/m".into());
    new.queen_url = Some("http://q".into());
    assert_eq!(
        changed_keys(&old, &new),
        vec![
            "max_workers",
            "model_dirs",
            "queen_url",
            "restart.backoff_ms",
            "workers.port_max"
        ]
    );
    assert_eq!(changed_keys(&1, &2), vec!["."]);
}

#[test]
fn env_from_process_reads_prefixed_variables() {
    // A prefix no other test or process uses; std serialises its own env access.
    unsafe {
        std::env::set_var("RBEE_CFGTEST_MAX_WORKERS", "11");
        std::env::set_var("RBEE_CFGTEST_WORKERS__PORT_MIN", "100");
        std::env::set_var("RBEE_CFGTEST_TOKEN", "secret");
    }
    let config: Hive = Loader::new("RBEE_CFGTEST_")
        .env_from_process()
        .ignore_env(&["RBEE_CFGTEST_TOKEN"])
        .load()
        .unwrap();
    assert_eq!(config.max_workers, 11);
    assert_eq!(config.workers.port_min, 100);
}

#[test]
fn source_display() {
    assert_eq!(Source::Default.to_string(), "default");
    assert_eq!(
        Source::File("/etc/rbee/hive.toml".into()).to_string(),
        "file /etc/rbee/hive.toml"
    );
    assert_eq!(
        Source::Env("RBEE_HIVE_X".into()).to_string(),
        "env RBEE_HIVE_X"
    );
    assert_eq!(Source::Flag("--listen".into()).to_string(), "flag --listen");
}
