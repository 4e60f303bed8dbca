//! The worker's token and SIGHUP: the token file is read again so tokens rotate without a
//! restart; a file that cannot be read keeps the old token.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rbee_auth::Token;
use tracing::{error, info};

/// The token from `file`, else `env` (the secret the hive passed in `env_name`).
pub fn resolve_token(
    file: Option<&Path>,
    env: Option<(&str, String)>,
) -> Result<Option<Token>, rbee_auth::AuthError> {
    if let Some(path) = file {
        let t = rbee_auth::load_token_file(path)?;
        info!(fingerprint = %t.fingerprint(), "token loaded from file");
        return Ok(Some(t));
    }
    if let Some((env_name, secret)) = env {
        let t = Token::new(secret, env_name)?;
        info!(fingerprint = %t.fingerprint(), "token taken from {env_name}");
        return Ok(Some(t));
    }
    Ok(None)
}

/// The bearer token every protected route checks, replaceable while serving.
#[derive(Clone, Debug, Default)]
pub struct SharedToken(Arc<RwLock<Option<Token>>>);

impl SharedToken {
    /// `None` is dev mode (loopback only; the binary enforces that).
    pub fn new(token: Option<Token>) -> Self {
        Self(Arc::new(RwLock::new(token)))
    }

    pub fn get(&self) -> Option<Token> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, token: Token) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(token);
    }
}

/// What the worker does on SIGHUP: re-read `file` into `token`.
pub struct TokenReload {
    pub file: Option<PathBuf>,
    pub token: SharedToken,
}

impl rbee_lifecycle::Reload for TokenReload {
    fn reload(&mut self) {
        let Some(path) = &self.file else {
            info!("SIGHUP: no token file configured, nothing to reload");
            return;
        };
        match rbee_auth::load_token_file(path) {
            Ok(t) => {
                info!(fingerprint = %t.fingerprint(), "SIGHUP: token reloaded");
                self.token.set(t);
            }
            Err(e) => error!(error = %e, "SIGHUP: token reload failed, keeping the old token"),
        }
    }

    /// The worker is its hive's child, not a systemd unit of its own.
    fn notifies_systemd(&self) -> bool {
        false
    }
}
