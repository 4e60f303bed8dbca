//! The queen's configuration: TOML file < `RBEE_QUEEN_*` environment < flags (the shared
//! loader). See `docs/examples/queen.toml` for every field.

use std::net::SocketAddr;

use rbee_config::{FieldError, Validate};
use serde::{Deserialize, Serialize};

pub const ENV_PREFIX: &str = "RBEE_QUEEN_";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueenConfig {
    /// Address of the client and admin API. Non-loopback needs client tokens.
    pub listen: SocketAddr,
    /// Client tokens, each with a name used in logs, metrics and usage records.
    pub client_tokens: Vec<ClientToken>,
    /// Token hives present in their heartbeats. Empty: `$CREDENTIALS_DIRECTORY/join-token`,
    /// then `RBEE_QUEEN_JOIN_TOKEN`.
    pub join_token_file: String,
    /// Older join tokens still accepted while hives move to the new one (rotation: add the
    /// new file above, list the old one here, SIGHUP; later drop it and SIGHUP again).
    pub join_token_previous_files: Vec<String>,
    /// Token the queen presents to hives. Empty: `$CREDENTIALS_DIRECTORY/hive-token`, then
    /// `RBEE_QUEEN_HIVE_TOKEN`.
    pub hive_token_file: String,
    /// SQLite file for the hive registry. Empty: kept in memory only.
    pub registry_path: String,
    /// Hash-chained audit log (auth failures, hive join/leave, admin actions). Empty: off.
    pub audit_log: String,
    /// Rotate the audit log beyond this many bytes (0: never).
    pub audit_max_bytes: u64,
    /// One JSON line per finished request (who, what, where, tokens, timings) to bill from.
    /// Empty: off.
    pub usage_log: String,
    pub log_level: String,
    pub log_format: String,
    /// Require a client token on `/metrics` too (any client token; default: open).
    pub metrics_require_token: bool,
    /// Hives known without a heartbeat (they still must heartbeat to be routed to).
    pub hives: Vec<StaticHive>,
    /// Model names clients may use, each mapped to a model reference on the hives.
    pub models: Vec<ModelAlias>,
    pub scheduling: SchedulingConfig,
    pub join: JoinConfig,
    pub server: ServerConfig,
    /// HTTPS for the client, admin and heartbeat API; `ca_file` for calling hives over https.
    pub tls: rbee_http::tls::TlsConfig,
}

/// Connection limits of the client and admin API (read at start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// A request head must arrive within this many seconds (also the idle time allowed on a
    /// kept-alive connection).
    pub header_read_timeout_seconds: u64,
    /// Most connections open at once; more are closed on arrival.
    pub max_connections: u32,
    /// Most connections open at once from one IP address.
    pub max_connections_per_peer: u32,
    /// A streaming client that reads nothing for this long while frames wait is cut off, so
    /// it cannot hold a worker's slot.
    pub stream_stall_seconds: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let d = rbee_http::server::ServerLimits::default();
        Self {
            header_read_timeout_seconds: d.header_read_timeout.as_secs(),
            max_connections: d.max_connections as u32,
            max_connections_per_peer: d.max_connections_per_peer as u32,
            stream_stall_seconds: 30,
        }
    }
}

impl ServerConfig {
    pub fn limits(&self) -> rbee_http::server::ServerLimits {
        rbee_http::server::ServerLimits {
            header_read_timeout: std::time::Duration::from_secs(self.header_read_timeout_seconds),
            max_connections: self.max_connections as usize,
            max_connections_per_peer: self.max_connections_per_peer as usize,
        }
    }
}

/// How hives join: the join token lets a new hive ask once; the queen then binds its id to a
/// credential of its own (see `rbee_registry::identity`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinConfig {
    /// Most hives in the registry, configured ones included; more joins get 503 `HIVE_LIMIT`.
    /// Reloadable.
    pub max_hives: u32,
    /// New hives are recorded but not routed to until
    /// `POST /v1/admin/hives/{id}/approve`. Reloadable.
    pub require_approval: bool,
    /// A joined hive that reports a new URL is moved there at once (labs) instead of waiting
    /// for an admin's approval. Reloadable.
    pub auto_approve_url_change: bool,
}

impl Default for JoinConfig {
    fn default() -> Self {
        let p = rbee_registry::JoinPolicy::default();
        Self {
            max_hives: p.max_hives as u32,
            require_approval: p.require_approval,
            auto_approve_url_change: p.auto_approve_url_change,
        }
    }
}

impl JoinConfig {
    pub fn policy(&self) -> rbee_registry::JoinPolicy {
        rbee_registry::JoinPolicy {
            max_hives: self.max_hives as usize,
            require_approval: self.require_approval,
            auto_approve_url_change: self.auto_approve_url_change,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientToken {
    pub name: String,
    /// File holding the token (mode 0600).
    pub file: String,
    /// Most requests this client may have in flight at once (absent: no limit); more get 429.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Most requests this client may start in any 60 s (absent: no limit); more get 429.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Most tokens (prompt + completion) of this client's requests that ended in any 60 s;
    /// once reached, new requests get 429 until enough of them are a minute old.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Most tokens (prompt + completion) per UTC day; once reached, new requests get 429
    /// `BUDGET_EXHAUSTED` until midnight UTC. Kept in the registry across restarts.
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    /// The model names (as clients send them) this client may use; empty: all.
    #[serde(default)]
    pub models: Vec<String>,
    /// May use the `/v1/admin/*` routes (hives, workers, model pulls). Default: no.
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticHive {
    pub id: String,
    pub url: String,
    /// This hive's own token (mode 0600); default: `hive_token_file`.
    #[serde(default)]
    pub token_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelAlias {
    /// What clients send as `model`.
    pub name: String,
    /// `hf:org/repo[:file]` or `file:PATH` as the hives know it.
    pub reference: String,
    /// Sampling temperature for requests to this name that give none (as a model's generation
    /// config or an Ollama Modelfile sets it); else the worker's default, 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// `top_p` for requests to this name that give none; else 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulingConfig {
    /// Seconds between hive heartbeats; a hive silent for 3 of them is down.
    pub heartbeat_seconds: u64,
    /// How long a request waits for a worker to be spawned and ready.
    pub spawn_wait_seconds: u64,
    /// Requests waiting per model before new ones get 429.
    pub queue_length: u32,
    /// How long a request may wait in the queue before 503.
    pub queue_wait_seconds: u64,
    /// Deadline applied when a client sends no `X-Request-Timeout`.
    pub default_timeout_seconds: u64,
}

impl Default for QueenConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7833)),
            client_tokens: Vec::new(),
            join_token_file: String::new(),
            join_token_previous_files: Vec::new(),
            hive_token_file: String::new(),
            registry_path: String::new(),
            audit_log: String::new(),
            audit_max_bytes: 64 * 1024 * 1024,
            usage_log: String::new(),
            log_level: "info".into(),
            log_format: "text".into(),
            metrics_require_token: false,
            hives: Vec::new(),
            models: Vec::new(),
            scheduling: SchedulingConfig::default(),
            join: JoinConfig::default(),
            server: ServerConfig::default(),
            tls: Default::default(),
        }
    }
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        Self {
            heartbeat_seconds: 5,
            spawn_wait_seconds: 120,
            queue_length: 16,
            queue_wait_seconds: 30,
            default_timeout_seconds: 300,
        }
    }
}

fn err(field: &str, message: impl Into<String>) -> FieldError {
    FieldError::new(field, message)
}

impl Validate for QueenConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut e = Vec::new();
        if !matches!(self.log_format.as_str(), "text" | "json") {
            e.push(err("log_format", "must be `text` or `json`"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, t) in self.client_tokens.iter().enumerate() {
            if !rbee_http::valid_request_id(&t.name) {
                e.push(err(
                    &format!("client_tokens[{i}].name"),
                    "use 1-128 letters, digits, `-`, `_`, `.` or `:`",
                ));
            }
            if matches!(t.name.as_str(), "env" | "dev" | "hive") {
                e.push(err(
                    &format!("client_tokens[{i}].name"),
                    "`env`, `dev` and `hive` are reserved (the RBEE_QUEEN_CLIENT_TOKEN token, dev mode, heartbeats)",
                ));
            }
            if !names.insert(t.name.clone()) {
                e.push(err(
                    &format!("client_tokens[{i}].name"),
                    "names must be unique",
                ));
            }
            if t.file.is_empty() {
                e.push(err(
                    &format!("client_tokens[{i}].file"),
                    "must name a token file",
                ));
            }
            let zero = [
                ("max_concurrent", t.max_concurrent.map(u64::from)),
                ("requests_per_minute", t.requests_per_minute.map(u64::from)),
                ("tokens_per_minute", t.tokens_per_minute),
                ("tokens_per_day", t.tokens_per_day),
            ];
            for (field, v) in zero {
                if v == Some(0) {
                    e.push(err(
                        &format!("client_tokens[{i}].{field}"),
                        "must be at least 1 (leave it out for no limit)",
                    ));
                }
            }
            if t.models.iter().any(String::is_empty) {
                e.push(err(
                    &format!("client_tokens[{i}].models"),
                    "model names must not be empty",
                ));
            }
        }
        for (i, m) in self.models.iter().enumerate() {
            if m.name.is_empty() || m.reference.is_empty() {
                e.push(err(
                    &format!("models[{i}]"),
                    "name and reference are required",
                ));
            }
            if m.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
                e.push(err(
                    &format!("models[{i}].temperature"),
                    "must be in [0, 2]",
                ));
            }
            if m.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
                e.push(err(&format!("models[{i}].top_p"), "must be in (0, 1]"));
            }
        }
        let mut hive_ids = std::collections::BTreeSet::new();
        for (i, h) in self.hives.iter().enumerate() {
            if !rbee_http::valid_request_id(&h.id) {
                e.push(err(
                    &format!("hives[{i}].id"),
                    "use 1-128 letters, digits, `-`, `_`, `.` or `:`",
                ));
            }
            if !hive_ids.insert(h.id.clone()) {
                e.push(err(&format!("hives[{i}].id"), "ids must be unique"));
            }
            if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
                e.push(err(&format!("hives[{i}].url"), "must be an http(s) URL"));
            }
        }
        for (i, f) in self.join_token_previous_files.iter().enumerate() {
            if f.is_empty() {
                e.push(err(
                    &format!("join_token_previous_files[{i}]"),
                    "must name a token file",
                ));
            }
        }
        let s = &self.scheduling;
        if s.heartbeat_seconds == 0 {
            e.push(err("scheduling.heartbeat_seconds", "must be at least 1"));
        }
        if s.queue_length == 0 {
            e.push(err("scheduling.queue_length", "must be at least 1"));
        }
        for (field, v) in [
            (
                "scheduling.default_timeout_seconds",
                s.default_timeout_seconds,
            ),
            ("scheduling.queue_wait_seconds", s.queue_wait_seconds),
            ("scheduling.spawn_wait_seconds", s.spawn_wait_seconds),
        ] {
            if v == 0 || v > 86_400 {
                e.push(err(field, "must be 1..=86400 seconds"));
            }
        }
        let sv = &self.server;
        if sv.header_read_timeout_seconds < 3 || sv.header_read_timeout_seconds > 3600 {
            e.push(err(
                "server.header_read_timeout_seconds",
                "must be 3..=3600",
            ));
        }
        if sv.stream_stall_seconds == 0 || sv.stream_stall_seconds > 3600 {
            e.push(err("server.stream_stall_seconds", "must be 1..=3600"));
        }
        if sv.max_connections == 0 {
            e.push(err("server.max_connections", "must be at least 1"));
        }
        if sv.max_connections_per_peer == 0 || sv.max_connections_per_peer > sv.max_connections {
            e.push(err(
                "server.max_connections_per_peer",
                "must be 1..=server.max_connections",
            ));
        }
        for (field, problem) in self.tls.problems() {
            e.push(err(field, problem));
        }
        if self.join.max_hives == 0 || self.join.max_hives > 10_000 {
            e.push(err("join.max_hives", "must be 1..=10000"));
        }
        if s.heartbeat_seconds > 300 {
            e.push(err("scheduling.heartbeat_seconds", "must be at most 300"));
        }
        e
    }
}
