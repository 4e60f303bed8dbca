//! Tokens, start-up checks and SIGHUP: where each token comes from, what the hive refuses to
//! start without, and applying a changed configuration without a restart (what cannot change
//! live is logged as needing one).

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rbee_auth::TokenOrigin;
use rbee_auth::{Token, resolve_token};
use rbee_config::Loader;
use serde_json::json;
use tracing::{info, warn};

use crate::HiveError;
use crate::config::{HiveConfig, is_reloadable};
use crate::hive::{Hive, Tokens};

/// Token values taken from the environment at start (and removed from it, so workers and
/// other children never inherit them).
#[derive(Default, Clone)]
pub struct EnvTokens {
    pub api: Option<String>,
    pub join: Option<String>,
    pub hub: Option<String>,
}

pub const API_TOKEN_ENV: &str = "RBEE_HIVE_TOKEN";
pub const JOIN_TOKEN_ENV: &str = "RBEE_HIVE_JOIN_TOKEN";
pub const HUB_TOKEN_ENV: &str = "HF_TOKEN";

impl EnvTokens {
    /// The token variables as they are (`check-config` leaves them in place).
    pub fn read() -> Self {
        let var = |name: &str| std::env::var(name).ok();
        Self {
            api: var(API_TOKEN_ENV),
            join: var(JOIN_TOKEN_ENV),
            hub: var(HUB_TOKEN_ENV),
        }
    }

    /// The token variables, removed from the environment so no child inherits them.
    ///
    /// # Safety
    /// No other thread may read or write the environment meanwhile (call it before the
    /// runtime starts).
    pub unsafe fn take() -> Self {
        let env = Self::read();
        for name in [API_TOKEN_ENV, JOIN_TOKEN_ENV, HUB_TOKEN_ENV] {
            // SAFETY: the caller guarantees no other thread touches the environment.
            unsafe { std::env::remove_var(name) };
        }
        env
    }
}

/// What the daemon checks before it binds: machine defaults, tokens, the security rules and
/// the model directories. Every failure here exits 64.
pub fn prepare(
    cfg: &mut HiveConfig,
    env: &EnvTokens,
) -> Result<(Tokens, rbee_models::Catalog), HiveError> {
    complete_defaults(cfg)?;
    let (tokens, seen) = load_tokens(cfg, env)?;
    for (what, origin, fp) in &seen {
        info!(token = what, fingerprint = %fp, "token loaded from {origin}");
        if matches!(origin, TokenOrigin::Env(_)) {
            warn!(
                token = what,
                "token taken from the environment; prefer a file or a systemd credential"
            );
        }
    }
    check_security(cfg, &tokens)?;
    let catalog = rbee_models::Catalog::new(cfg.model_dirs.clone())
        .map_err(|e| HiveError::Config(format!("model_dirs: {e}")))?;
    Ok((tokens, catalog))
}

/// Defaults that depend on the machine: host name, model directory.
pub fn complete_defaults(cfg: &mut HiveConfig) -> Result<(), HiveError> {
    if cfg.hive_id.is_empty() {
        cfg.hive_id = hostname().unwrap_or_else(|| "hive".into());
    }
    if cfg.model_dirs.is_empty() {
        let dir = if let Some(state) = std::env::var_os("STATE_DIRECTORY") {
            // systemd StateDirectory=; the first entry when several are given.
            let first = state
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            PathBuf::from(first).join("models")
        } else if let Some(cache) = std::env::var_os("XDG_CACHE_HOME") {
            PathBuf::from(cache).join("rbee/models")
        } else if let Some(home) = std::env::var_os("HOME") {
            PathBuf::from(home).join(".cache/rbee/models")
        } else {
            return Err(HiveError::Config(
                "model_dirs: not set, and neither STATE_DIRECTORY nor HOME is".into(),
            ));
        };
        cfg.model_dirs = vec![dir];
    }
    Ok(())
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name: String = String::from_utf8_lossy(&buf[..end])
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .collect();
    (!name.is_empty()).then_some(name)
}

/// What the hive refuses to start without: a token beyond loopback, a join token for a queen
/// beyond loopback. Dev mode on loopback says so.
pub fn check_security(cfg: &HiveConfig, tokens: &Tokens) -> Result<(), HiveError> {
    if tokens.api.is_none() {
        if !cfg.listen.ip().is_loopback() {
            return Err(HiveError::Config(format!(
                "refusing to listen on {} without a token: set token_file (--token-file), the systemd credential `hive-token`, or {API_TOKEN_ENV}",
                cfg.listen
            )));
        }
        warn!(
            "DEV MODE: no hive token configured; every request is accepted. Only loopback ({}) is served",
            cfg.listen
        );
    }
    if !cfg.queen.url.is_empty() && tokens.join.is_none() {
        let host = cfg
            .queen
            .url
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or(""))
            .unwrap_or("");
        let loopback = ["127.0.0.1", "localhost", "[::1]"]
            .iter()
            .any(|h| host == *h || host.starts_with(&format!("{h}:")));
        if !loopback {
            return Err(HiveError::Config(format!(
                "queen.url is set but no join token is: set queen.join_token_file, the systemd credential `join-token`, or {JOIN_TOKEN_ENV}"
            )));
        }
        warn!("no join token for the queen on loopback: heartbeats go unauthenticated (dev mode)");
    }
    Ok(())
}

fn opt_path(s: &str) -> Option<&Path> {
    (!s.is_empty()).then(|| Path::new(s))
}

fn resolve(
    file: &str,
    credential: &str,
    env_name: &str,
    env_value: Option<&String>,
) -> Result<Option<(Token, TokenOrigin)>, HiveError> {
    resolve_token(
        opt_path(file),
        credential,
        env_value.map(|v| (env_name, v.as_str())),
    )
    .map_err(|e| HiveError::Config(e.to_string()))
}

/// Which token (api, join, hub), where it came from, and its fingerprint: safe to log.
pub type TokenNote = (&'static str, TokenOrigin, String);

/// A callback that applies a new log filter.
pub use rbee_lifecycle::SetLogLevel;

/// Resolves the hive's three tokens from the configuration, with notes for the log.
pub fn load_tokens(
    cfg: &HiveConfig,
    env: &EnvTokens,
) -> Result<(Tokens, Vec<TokenNote>), HiveError> {
    let mut seen = Vec::new();
    let mut api_previous = Vec::new();
    for f in &cfg.token_previous_files {
        let t = rbee_auth::load_token_file(Path::new(f))
            .map_err(|e| HiveError::Config(format!("token_previous_files `{f}`: {e}")))?;
        seen.push(("api_previous", TokenOrigin::File(f.into()), t.fingerprint()));
        api_previous.push(t);
    }
    let api = resolve(
        &cfg.token_file,
        "hive-token",
        API_TOKEN_ENV,
        env.api.as_ref(),
    )?;
    let join = resolve(
        &cfg.queen.join_token_file,
        "join-token",
        JOIN_TOKEN_ENV,
        env.join.as_ref(),
    )?;
    // A hub token file follows the same rules as every token file (mode 0600, 16+ bytes);
    // HF_TOKEN from the environment is passed on as given.
    let hub = if !cfg.hub.token_file.is_empty() || rbee_auth::credential_path("hf-token").is_some()
    {
        resolve(&cfg.hub.token_file, "hf-token", HUB_TOKEN_ENV, None)?
    } else {
        None
    };
    let mut note = |what, t: &Option<(Token, TokenOrigin)>| {
        if let Some((tok, origin)) = t {
            seen.push((what, origin.clone(), tok.fingerprint()));
        }
    };
    note("api", &api);
    note("join", &join);
    note("hub", &hub);
    let hub_secret = hub
        .map(|(t, _)| t.expose().to_owned())
        .or_else(|| env.hub.clone().filter(|s| !s.trim().is_empty()));
    Ok((
        Tokens {
            api: api.map(|(t, _)| t),
            api_previous,
            join: join.map(|(t, _)| t),
            hub: hub_secret,
        },
        seen,
    ))
}

/// What a reload needs from the binary.
pub struct Reloader {
    /// Reads the configuration again (same file, environment and flags as at start).
    pub loader: Loader,
    /// Applies a new log filter.
    pub set_log_level: SetLogLevel,
    pub env_tokens: EnvTokens,
}

impl Reloader {
    /// The hive's SIGHUP, for `rbee_lifecycle` (which tells systemd around it).
    pub fn for_hive(self, hive: Arc<Hive>) -> impl rbee_lifecycle::Reload {
        move || {
            info!("SIGHUP: reloading");
            reload(&hive, &self);
        }
    }
}

/// Re-reads configuration and tokens, applies what can change live, logs the rest.
/// A bad new configuration changes nothing.
pub fn reload(hive: &Hive, r: &Reloader) {
    // A renewed certificate is served whatever else the reload does.
    if let Some(tls) = &hive.tls {
        match tls.reload() {
            Ok(()) => info!("SIGHUP: TLS certificate and key re-read"),
            Err(e) => {
                warn!(error = %e, "SIGHUP: TLS certificate not reloaded; serving the previous one")
            }
        }
    }
    let outcome = apply(hive, r);
    match outcome {
        Ok(()) => hive.metrics.config_reloads.inc(&["ok"]),
        Err(e) => {
            hive.metrics.config_reloads.inc(&["failed"]);
            warn!(error = %e, "SIGHUP: reload failed; keeping the running configuration");
            hive.audit("config.reload_failed", json!({"error": e}));
        }
    }
}

fn apply(hive: &Hive, r: &Reloader) -> Result<(), String> {
    let mut new: HiveConfig = r.loader.load().map_err(|e| e.to_string())?;
    complete_defaults(&mut new).map_err(|e| e.to_string())?;
    let (tokens, seen) = load_tokens(&new, &r.env_tokens).map_err(|e| e.to_string())?;
    if tokens.api.is_none() && hive.api_token().is_some() {
        // Dropping the token would silently turn authentication off.
        return Err(
            "the new configuration has no hive token; keeping the current one (restart to run without one)"
                .to_owned(),
        );
    }
    let old = hive.config();
    let changed = rbee_config::changed_keys(&old, &new);
    let (live, restart): (Vec<String>, Vec<String>) =
        changed.into_iter().partition(|k| is_reloadable(k));
    if new.log_level != old.log_level {
        (r.set_log_level)(&new.log_level)?;
    }
    // Keep what needs a restart as it runs now.
    let mut applied = new.clone();
    applied.listen = old.listen;
    applied.hive_id = old.hive_id.clone();
    applied.advertise_url = old.advertise_url.clone();
    applied.tls = old.tls.clone();
    applied.model_dirs = old.model_dirs.clone();
    applied.audit_log = old.audit_log.clone();
    applied.audit_max_bytes = old.audit_max_bytes;
    applied.metrics_textfile = old.metrics_textfile.clone();
    applied.log_format = old.log_format.clone();
    applied.workers.binary = old.workers.binary.clone();
    applied.workers.binary_cuda = old.workers.binary_cuda.clone();
    applied.workers.binary_metal = old.workers.binary_metal.clone();
    applied.workers.port_min = old.workers.port_min;
    applied.workers.port_max = old.workers.port_max;
    applied.hub.endpoint = old.hub.endpoint.clone();
    applied.queen.url = old.queen.url.clone();
    hive.set_config(applied);
    let fingerprints: Vec<String> = seen
        .iter()
        .map(|(what, origin, fp)| format!("{what}={fp} ({origin})"))
        .collect();
    {
        let mut t = hive.tokens.write().unwrap_or_else(|e| e.into_inner());
        *t = tokens;
    }
    info!(
        applied = ?live,
        needs_restart = ?restart,
        tokens = ?fingerprints,
        "SIGHUP: configuration and tokens reloaded"
    );
    if !restart.is_empty() {
        warn!(keys = ?restart, "SIGHUP: these settings change only after a restart");
    }
    hive.audit(
        "config.reload",
        json!({"applied": live, "needs_restart": restart, "tokens": fingerprints}),
    );
    Ok(())
}
