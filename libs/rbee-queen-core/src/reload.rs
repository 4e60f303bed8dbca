//! Tokens, start-up checks and SIGHUP: where each token comes from, what the queen refuses to
//! start (or reload) without, and applying a changed configuration without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rbee_auth::{Token, TokenSet, resolve_token};
use rbee_config::Loader;
use tracing::{info, warn};

use crate::config::QueenConfig;
use crate::queen::{Queen, Tokens};

pub const CLIENT_TOKEN_ENV: &str = "RBEE_QUEEN_CLIENT_TOKEN";
pub const JOIN_TOKEN_ENV: &str = "RBEE_QUEEN_JOIN_TOKEN";
pub const HIVE_TOKEN_ENV: &str = "RBEE_QUEEN_HIVE_TOKEN";

/// Settings read once at start; a SIGHUP that changes them says so.
const NEEDS_RESTART: &[&str] = &[
    "listen",
    "registry_path",
    "audit_log",
    "audit_max_bytes",
    "usage_log",
    "log_level",
    "log_format",
    "server",
    "tls",
];

/// A configuration the queen will not run with; the message names the setting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Environment tokens, read once at start.
#[derive(Clone, Default)]
pub struct EnvTokens {
    pub client: Option<String>,
    pub join: Option<String>,
    pub hive: Option<String>,
}

impl EnvTokens {
    /// The token variables as they are (`check-config` leaves them in place).
    pub fn read() -> Self {
        let var = |name: &str| std::env::var(name).ok();
        Self {
            client: var(CLIENT_TOKEN_ENV),
            join: var(JOIN_TOKEN_ENV),
            hive: var(HIVE_TOKEN_ENV),
        }
    }

    /// The token variables, removed from the environment so no child inherits them.
    ///
    /// # Safety
    /// No other thread may read or write the environment meanwhile (call it before the
    /// runtime starts).
    pub unsafe fn take() -> Self {
        let env = Self::read();
        for name in [CLIENT_TOKEN_ENV, JOIN_TOKEN_ENV, HIVE_TOKEN_ENV] {
            // SAFETY: the caller guarantees no other thread touches the environment.
            unsafe { std::env::remove_var(name) };
        }
        env
    }
}

/// What the daemon checks before it binds: tokens, the security rules, the registry and the
/// configured hives. Every failure here exits 64.
pub fn prepare(
    cfg: &QueenConfig,
    env: &EnvTokens,
) -> Result<(Tokens, rbee_registry::Registry), ConfigError> {
    let tokens = load_tokens(cfg, env)?;
    check_security(cfg, &tokens)?;
    if tokens.clients.is_empty() {
        warn!(
            "DEV MODE: no client tokens; every request is accepted. Only loopback ({}) is served",
            cfg.listen
        );
    }
    let registry = if cfg.registry_path.is_empty() {
        rbee_registry::Registry::open_in_memory()
    } else {
        rbee_registry::Registry::open(Path::new(&cfg.registry_path))
    };
    let registry = registry.map_err(|e| ConfigError(format!("registry_path: {e}")))?;
    for h in &cfg.hives {
        registry
            .add_static(&h.id, &h.url, now_ms())
            .map_err(|e| ConfigError(format!("hives: {e}")))?;
    }
    Ok((tokens, registry))
}

/// What the queen refuses to start without: client and join tokens beyond loopback.
pub fn check_security(cfg: &QueenConfig, tokens: &Tokens) -> Result<(), ConfigError> {
    if tokens.clients.is_empty() && !cfg.listen.ip().is_loopback() {
        return Err(ConfigError(format!(
            "refusing to listen on {} without client tokens: set client_tokens or {CLIENT_TOKEN_ENV}",
            cfg.listen
        )));
    }
    if tokens.join.is_none() && !cfg.listen.ip().is_loopback() {
        return Err(ConfigError(format!(
            "refusing to listen on {} without a join token: set join_token_file, the systemd credential `join-token`, or {JOIN_TOKEN_ENV}",
            cfg.listen
        )));
    }
    Ok(())
}

/// Reads every token the configuration names, logging each by fingerprint.
pub fn load_tokens(cfg: &QueenConfig, env: &EnvTokens) -> Result<Tokens, ConfigError> {
    let mut clients = TokenSet::new();
    for t in &cfg.client_tokens {
        let token = rbee_auth::load_token_file(Path::new(&t.file))
            .map_err(|e| ConfigError(format!("client_tokens `{}`: {e}", t.name)))?;
        info!(client = %t.name, fingerprint = %token.fingerprint(), "client token loaded");
        clients.insert(t.name.clone(), token);
    }
    if let Some(secret) = &env.client {
        let token =
            Token::new(secret.clone(), CLIENT_TOKEN_ENV).map_err(|e| ConfigError(e.to_string()))?;
        warn!(fingerprint = %token.fingerprint(), "client token `env` taken from {CLIENT_TOKEN_ENV}; prefer a file");
        clients.insert("env", token);
    }
    let opt = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
    let join_file = opt(&cfg.join_token_file);
    let join = resolve_token(
        join_file.as_deref(),
        "join-token",
        env.join.as_deref().map(|v| (JOIN_TOKEN_ENV, v)),
    )
    .map_err(|e| ConfigError(format!("join token: {e}")))?
    .map(|(t, origin)| warn_env("join", t, origin));
    let mut join_previous = Vec::new();
    for f in &cfg.join_token_previous_files {
        let t = rbee_auth::load_token_file(Path::new(f))
            .map_err(|e| ConfigError(format!("join_token_previous_files `{f}`: {e}")))?;
        info!(fingerprint = %t.fingerprint(), "previous join token still accepted");
        join_previous.push(t);
    }
    let hive_file = opt(&cfg.hive_token_file);
    let hive = resolve_token(
        hive_file.as_deref(),
        "hive-token",
        env.hive.as_deref().map(|v| (HIVE_TOKEN_ENV, v)),
    )
    .map_err(|e| ConfigError(format!("hive token: {e}")))?
    .map(|(t, origin)| warn_env("hive", t, origin));
    let mut per_hive = std::collections::HashMap::new();
    for h in &cfg.hives {
        if let Some(f) = &h.token_file {
            let t = rbee_auth::load_token_file(Path::new(f))
                .map_err(|e| ConfigError(format!("hives `{}` token_file: {e}", h.id)))?;
            info!(hive = %h.id, fingerprint = %t.fingerprint(), "hive token loaded");
            per_hive.insert(h.id.clone(), t);
        }
    }
    Ok(Tokens {
        clients,
        join,
        join_previous,
        hive,
        per_hive,
    })
}

/// Logs where a token came from (by fingerprint), warning when it was the environment.
fn warn_env(which: &str, token: Token, origin: rbee_auth::TokenOrigin) -> Token {
    match origin {
        rbee_auth::TokenOrigin::Env(var) => warn!(
            fingerprint = %token.fingerprint(),
            "{which} token taken from {var}; prefer a file or a systemd credential"
        ),
        other => info!(fingerprint = %token.fingerprint(), source = %other, "{which} token loaded"),
    }
    token
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The queen's SIGHUP: the usage log follows logrotate; configuration, tokens and static
/// hives are read again (same file, environment and flags as at start) and applied, unless
/// the new set is refused. A bad new configuration changes nothing.
pub struct Reloader {
    pub queen: Arc<Queen>,
    pub loader: Loader,
    pub env: EnvTokens,
}

impl rbee_lifecycle::Reload for Reloader {
    fn reload(&mut self) {
        reload(&self.queen, &self.loader, &self.env);
    }
}

/// One reload (see [`Reloader`]).
pub fn reload(queen: &Queen, loader: &Loader, env: &EnvTokens) {
    // Whatever else the reload does, the usage log follows logrotate and a renewed
    // certificate is served.
    queen.reopen_usage();
    if let Some(tls) = &queen.tls {
        match tls.reload() {
            Ok(()) => info!("SIGHUP: TLS certificate and key re-read"),
            Err(e) => {
                warn!(error = %e, "SIGHUP: TLS certificate not reloaded; serving the previous one")
            }
        }
    }
    let outcome = loader
        .load::<QueenConfig>()
        .map_err(|e| e.to_string())
        .and_then(|c| load_tokens(&c, env).map(|t| (c, t)).map_err(|e| e.0))
        .map(|(c, t)| {
            let insecure = check_security(&c, &t).err();
            (c, t, insecure)
        });
    match outcome {
        Ok((_, t, _)) if t.clients.is_empty() && !queen.tokens().clients.is_empty() => {
            warn!("SIGHUP: the new configuration has no client tokens; keeping the current ones");
        }
        Ok((_, t, _)) if t.join.is_none() && queen.tokens().join.is_some() => {
            warn!(
                "SIGHUP: the new configuration has no join token; keeping the running configuration (restart to run without one)"
            );
        }
        Ok((_, _, Some(e))) => {
            warn!(error = %e, "SIGHUP: reload refused; keeping the running configuration");
        }
        Ok((c, t, None)) => apply(queen, c, t),
        Err(e) => {
            warn!(error = %e, "SIGHUP: reload failed; keeping the running configuration")
        }
    }
}

fn apply(queen: &Queen, c: QueenConfig, t: Tokens) {
    let changed = rbee_config::changed_keys(&queen.config(), &c);
    let needs_restart: Vec<&String> = changed
        .iter()
        .filter(|k| NEEDS_RESTART.contains(&k.as_str()))
        .collect();
    if !needs_restart.is_empty() {
        warn!(
            ?needs_restart,
            "SIGHUP: these settings change only after a restart"
        );
    }
    let names: Vec<String> = t
        .clients
        .fingerprints()
        .into_iter()
        .map(|(n, f)| format!("{n}={f}"))
        .collect();
    queen.set_config(c);
    *queen.tokens.write().unwrap_or_else(|e| e.into_inner()) = t;
    let (added, removed) = queen.apply_static_hives(now_ms());
    info!(clients = ?names, ?changed, ?added, ?removed, "SIGHUP: configuration, tokens and hives reloaded");
    queen.audit(
        "config.reload",
        "queen",
        serde_json::json!({"clients": names, "hives_added": added, "hives_removed": removed}),
    );
}
