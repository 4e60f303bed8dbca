//! Tokens and SIGHUP: where each token comes from, and applying a changed configuration
//! without a restart (what cannot change live is logged as needing one).

use std::path::Path;

pub use rbee_auth::TokenOrigin;
use rbee_auth::{Token, resolve_token};
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
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

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
    pub load: Box<dyn Fn() -> Result<HiveConfig, String> + Send + Sync>,
    /// Applies a new log filter.
    pub set_log_level: SetLogLevel,
    pub env_tokens: EnvTokens,
}

/// Re-reads configuration and tokens, applies what can change live, logs the rest.
/// A bad new configuration changes nothing.
pub fn reload(hive: &Hive, r: &Reloader) {
    rbee_systemd::reloading();
    let outcome = apply(hive, r);
    rbee_systemd::notify("READY=1\nSTATUS=serving");
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
    let new = (r.load)()?;
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
