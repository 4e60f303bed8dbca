//! The hive's configuration: one TOML file, every field overridable as `RBEE_HIVE_<KEY>`
//! (`__` between table and key, e.g. `RBEE_HIVE_RESTART__MAX_ATTEMPTS`), key ones by flags.
//! See `docs/examples/hive.toml` for every field with its default and meaning.

use std::net::SocketAddr;
use std::path::PathBuf;

use rbee_config::{FieldError, Validate};
use serde::{Deserialize, Serialize};

pub const ENV_PREFIX: &str = "RBEE_HIVE_";

/// The most `shutdown.drain_seconds + ask_seconds + term_seconds` may add up to: the rest of
/// the 30 s goes to closing connections and reaping.
pub const MAX_SHUTDOWN_STEPS_SECONDS: u64 = 25;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HiveConfig {
    /// Address of the hive API. Non-loopback needs a token.
    pub listen: SocketAddr,
    /// Name the hive reports to the queen; defaults to the host name.
    pub hive_id: String,
    /// URL the queen uses to reach this hive (sent in heartbeats); default `http://<listen>`.
    pub advertise_url: String,
    /// File with the token the queen (or an operator) presents to this hive (mode 0600).
    /// Empty: `$CREDENTIALS_DIRECTORY/hive-token`, then `RBEE_HIVE_TOKEN` (with a warning).
    pub token_file: String,
    /// Older hive tokens still accepted while the queen moves to the new one (rotation: new
    /// file in `token_file`, old one listed here, SIGHUP; later empty this and SIGHUP again).
    pub token_previous_files: Vec<String>,
    /// Require the token on `/metrics` too.
    pub metrics_require_token: bool,
    /// `trace`, `debug`, `info`, `warn`, `error` or a tracing filter. Reloadable.
    pub log_level: String,
    /// `text` or `json`.
    pub log_format: String,
    /// Directories holding GGUF models; the first receives downloads.
    pub model_dirs: Vec<PathBuf>,
    /// Audit log file (JSON lines, hash-chained). Empty disables auditing.
    pub audit_log: String,
    /// Rotate the audit log beyond this many bytes (0: never).
    pub audit_max_bytes: u64,
    /// Write the final metrics here at exit, for node_exporter's textfile collector.
    pub metrics_textfile: String,
    pub workers: WorkersConfig,
    pub restart: RestartConfig,
    pub resources: ResourcesConfig,
    pub shutdown: ShutdownConfig,
    pub hub: HubConfig,
    pub queen: QueenConfig,
    /// HTTPS for the hive API (the default `advertise_url` becomes `https://<listen>`);
    /// `ca_file` for calling the queen over https.
    pub tls: rbee_http::tls::TlsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Worker binary for `cpu` devices. Empty: `llm-worker-rbee` next to `rbee-hive`.
    pub binary: String,
    /// Worker binary built with `--features cuda`, used for `cuda[:N]` devices.
    pub binary_cuda: String,
    /// Worker binary built with `--features metal`, used for `metal[:N]` devices.
    pub binary_metal: String,
    /// Workers listen on 127.0.0.1 on a port from this range (inclusive).
    pub port_min: u16,
    pub port_max: u16,
    /// Most workers at once. Reloadable.
    pub max_workers: u32,
    /// A worker must report ready this soon after spawn, else it is killed.
    pub load_timeout_seconds: u64,
    /// Stop workers unused this long (0: never). Reloadable.
    pub keep_alive_seconds: u64,
    /// How often ready workers are checked. Reloadable.
    pub health_interval_seconds: u64,
    /// A worker with no successful request for this long gets a 1-token generation as its
    /// health check. Reloadable.
    pub health_probe_idle_seconds: u64,
    /// Inference threads per worker (0: all cores).
    pub threads: u32,
    /// Sequences each worker generates together, passed as its `--parallel` (0: the worker's
    /// default, 8 on CPU and 16 on a GPU). Unless 1, a second worker for a model already on
    /// the same device is refused. Reloadable (applies to workers started after).
    pub parallel: u32,
    /// Each worker's KV pool in positions, shared by its slots, passed as its `--kv-tokens`
    /// and counted in admission (0: one full context of the model). Reloadable (applies to
    /// workers started after).
    pub kv_tokens: u64,
    /// Seconds a worker lets in-flight streams finish after it is asked to stop through the
    /// API (passed as its `--grace-seconds`); at most `shutdown.ask_seconds + term_seconds`.
    pub grace_seconds: u64,
    /// A failed worker's record (with its crash report) is dropped this long after its last
    /// exit; at most 32 are kept in any case. Reloadable.
    pub failed_keep_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    /// Restart crashed workers.
    pub enabled: bool,
    /// Crashes within `window_seconds` that open the circuit breaker (no more restarts).
    pub max_attempts: u32,
    pub window_seconds: u64,
    /// First backoff; doubles per crash up to `backoff_max_ms`, with jitter.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesConfig {
    /// Cap on the memory the CPU and Metal workers may need together (their admission
    /// estimates), in MiB (0: no cap beyond available RAM). CUDA workers are admitted against
    /// free VRAM instead. Reloadable.
    pub max_memory_mb: u64,
    /// RAM left for the system when admitting CPU workers, in MiB. Reloadable.
    pub reserve_memory_mb: u64,
    /// VRAM left free on each GPU, in MiB. Reloadable.
    pub reserve_vram_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long in-flight streams may finish after SIGTERM before they are cut.
    pub drain_seconds: u64,
    /// After asking a worker to stop: seconds before SIGTERM.
    pub ask_seconds: u64,
    /// After SIGTERM: seconds before SIGKILL.
    pub term_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Hugging Face hub (or a mirror with the same URL layout).
    pub endpoint: String,
    /// File with a hub token. Empty: `$CREDENTIALS_DIRECTORY/hf-token`, then `HF_TOKEN`.
    pub token_file: String,
    /// Attempts per download after a dropped connection or a 5xx.
    pub retries: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueenConfig {
    /// Queen base URL; empty runs the hive standalone (no heartbeats).
    pub url: String,
    /// File with the join token presented to the queen. Empty:
    /// `$CREDENTIALS_DIRECTORY/join-token`, then `RBEE_HIVE_JOIN_TOKEN` (with a warning).
    pub join_token_file: String,
    /// Where the credential the queen issues at the first heartbeat is kept (mode 0600; later
    /// heartbeats present it instead of the join token). Empty:
    /// `$STATE_DIRECTORY/queen-credential.json` under systemd, else memory only.
    pub credential_file: String,
    pub heartbeat_seconds: u64,
}

impl Default for HiveConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7835)),
            hive_id: String::new(),
            advertise_url: String::new(),
            token_file: String::new(),
            token_previous_files: Vec::new(),
            metrics_require_token: false,
            log_level: "info".into(),
            log_format: "text".into(),
            model_dirs: Vec::new(),
            audit_log: String::new(),
            audit_max_bytes: 64 * 1024 * 1024,
            metrics_textfile: String::new(),
            workers: WorkersConfig::default(),
            restart: RestartConfig::default(),
            resources: ResourcesConfig::default(),
            shutdown: ShutdownConfig::default(),
            hub: HubConfig::default(),
            queen: QueenConfig::default(),
            tls: Default::default(),
        }
    }
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            binary: String::new(),
            binary_cuda: String::new(),
            binary_metal: String::new(),
            port_min: 9300,
            port_max: 9399,
            max_workers: 4,
            load_timeout_seconds: 120,
            keep_alive_seconds: 300,
            health_interval_seconds: 30,
            health_probe_idle_seconds: 60,
            threads: 0,
            parallel: 0,
            kv_tokens: 0,
            grace_seconds: 10,
            failed_keep_seconds: 3600,
        }
    }
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_attempts: 5,
            window_seconds: 600,
            backoff_initial_ms: 1000,
            backoff_max_ms: 60_000,
        }
    }
}

impl Default for ResourcesConfig {
    fn default() -> Self {
        Self {
            max_memory_mb: 0,
            reserve_memory_mb: 512,
            reserve_vram_mb: 512,
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_seconds: 10,
            ask_seconds: 3,
            term_seconds: 10,
        }
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            endpoint: "https://huggingface.co".into(),
            token_file: String::new(),
            retries: 5,
        }
    }
}

impl Default for QueenConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            join_token_file: String::new(),
            credential_file: String::new(),
            heartbeat_seconds: 5,
        }
    }
}

/// Keys a SIGHUP applies without a restart (prefixes of dotted keys).
pub const RELOADABLE: &[&str] = &[
    "log_level",
    "token_file",
    "token_previous_files",
    "queen.join_token_file",
    "hub.token_file",
    "metrics_require_token",
    "workers.max_workers",
    "workers.keep_alive_seconds",
    "workers.failed_keep_seconds",
    "workers.health_interval_seconds",
    "workers.health_probe_idle_seconds",
    "workers.load_timeout_seconds",
    "workers.threads",
    "workers.parallel",
    "workers.kv_tokens",
    "workers.grace_seconds",
    "restart",
    "resources",
    "shutdown",
    "hub.retries",
    "queen.heartbeat_seconds",
];

pub fn is_reloadable(key: &str) -> bool {
    RELOADABLE
        .iter()
        .any(|r| key == *r || key.starts_with(&format!("{r}.")))
}

fn err(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_owned(),
        message: message.into(),
    }
}

fn valid_url(s: &str) -> bool {
    reqwest::Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
}

impl Validate for HiveConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut e = Vec::new();
        for (field, problem) in self.tls.problems() {
            e.push(err(field, problem));
        }
        if !self.hive_id.is_empty() && !rbee_http::valid_request_id(&self.hive_id) {
            e.push(err(
                "hive_id",
                "use 1-128 letters, digits, `-`, `_`, `.` or `:`",
            ));
        }
        if !self.advertise_url.is_empty() && !valid_url(&self.advertise_url) {
            e.push(err("advertise_url", "must be an http(s) URL"));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            e.push(err("log_format", "must be `text` or `json`"));
        }
        if tracing_filter_invalid(&self.log_level) {
            e.push(err("log_level", "not a level or tracing filter"));
        }
        for (i, d) in self.model_dirs.iter().enumerate() {
            if d.as_os_str().is_empty() {
                e.push(err(&format!("model_dirs[{i}]"), "must not be empty"));
            }
        }
        let w = &self.workers;
        if w.port_min == 0 || w.port_min > w.port_max {
            e.push(err(
                "workers.port_min",
                format!(
                    "port range {}..={} is empty or includes 0",
                    w.port_min, w.port_max
                ),
            ));
        }
        if w.max_workers == 0 {
            e.push(err("workers.max_workers", "must be at least 1"));
        }
        if !(1..=3600).contains(&w.load_timeout_seconds) {
            e.push(err("workers.load_timeout_seconds", "must be 1..=3600"));
        }
        if w.health_interval_seconds == 0 {
            e.push(err("workers.health_interval_seconds", "must be at least 1"));
        }
        if w.grace_seconds > 3600 {
            e.push(err("workers.grace_seconds", "must be at most 3600"));
        }
        let r = &self.restart;
        if r.backoff_initial_ms == 0 || r.backoff_initial_ms > r.backoff_max_ms {
            e.push(err(
                "restart.backoff_initial_ms",
                "must be at least 1 and not above restart.backoff_max_ms",
            ));
        }
        if r.enabled && r.max_attempts == 0 {
            e.push(err("restart.max_attempts", "must be at least 1"));
        }
        let s = &self.shutdown;
        // Drain, ask and SIGTERM wait, plus a few seconds of closing, must fit the 30 s stop.
        let total = s.drain_seconds + s.ask_seconds + s.term_seconds;
        if total > MAX_SHUTDOWN_STEPS_SECONDS {
            e.push(err(
                "shutdown",
                format!(
                    "drain_seconds + ask_seconds + term_seconds = {total} s; keep it at most {MAX_SHUTDOWN_STEPS_SECONDS} s so a shutdown ends within 30 s"
                ),
            ));
        }
        if w.grace_seconds > s.ask_seconds + s.term_seconds {
            e.push(err(
                "workers.grace_seconds",
                format!(
                    "{} s is longer than shutdown.ask_seconds + shutdown.term_seconds = {} s: a worker still finishing streams would be killed",
                    w.grace_seconds,
                    s.ask_seconds + s.term_seconds
                ),
            ));
        }
        if !valid_url(&self.hub.endpoint) {
            e.push(err("hub.endpoint", "must be an http(s) URL"));
        }
        if !self.queen.url.is_empty() && !valid_url(&self.queen.url) {
            e.push(err("queen.url", "must be an http(s) URL"));
        }
        if self.queen.heartbeat_seconds == 0 || self.queen.heartbeat_seconds > 300 {
            e.push(err("queen.heartbeat_seconds", "must be 1..=300"));
        }
        e
    }
}

/// Levels and filters as `tracing_subscriber::EnvFilter` takes them; checked loosely here
/// (the binary builds the real filter and reports its error).
fn tracing_filter_invalid(s: &str) -> bool {
    s.trim().is_empty() || s.chars().any(|c| c.is_whitespace() || c == '"')
}
