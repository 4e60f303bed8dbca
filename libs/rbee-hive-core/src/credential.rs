//! The identity the queen issued to this hive: a credential the hive presents in heartbeats
//! instead of the join token, and the token the queen presents to this hive. Both arrive once,
//! in the answer to the heartbeat that bound the hive's id, and are kept in
//! `queen.credential_file` (mode 0600) so a restarted hive beats as itself; the queen refuses
//! the join token for a bound id, so a hive that lost the file must be removed by an admin
//! before it can join again.

use std::path::{Path, PathBuf};

use rbee_auth::Token;
use serde::{Deserialize, Serialize};

use crate::HiveError;
use crate::config::HiveConfig;

/// The file name under `$STATE_DIRECTORY` when `queen.credential_file` is empty.
pub const DEFAULT_FILE: &str = "queen-credential.json";

/// What the queen issued.
#[derive(Clone, Debug)]
pub struct QueenCredential {
    /// The hive id it was issued for.
    pub hive_id: String,
    /// What this hive presents in heartbeats.
    pub credential: Token,
    /// What the queen presents to this hive.
    pub queen_token: Token,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    hive_id: String,
    queen_url: String,
    credential: String,
    queen_token: String,
}

/// Where the credential is kept: `queen.credential_file`, else
/// `$STATE_DIRECTORY/queen-credential.json` under systemd, else nowhere (memory only).
pub fn path(cfg: &HiveConfig) -> Option<PathBuf> {
    if !cfg.queen.credential_file.is_empty() {
        return Some(PathBuf::from(&cfg.queen.credential_file));
    }
    let state = std::env::var_os("STATE_DIRECTORY")?;
    // systemd may pass several directories separated by `:`; the first is ours.
    let first = state.to_string_lossy().split(':').next()?.to_owned();
    (!first.is_empty()).then(|| Path::new(&first).join(DEFAULT_FILE))
}

/// Reads a stored credential for `hive_id`. `Ok(None)` when there is no file, or when it was
/// issued for another hive id (the operator renamed the hive: it joins anew).
pub fn load(path: &Path, hive_id: &str) -> Result<Option<QueenCredential>, HiveError> {
    let text = match rbee_auth::read_private_file(path) {
        Ok(t) => t,
        Err(rbee_auth::AuthError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(None);
        }
        Err(e) => return Err(HiveError::Config(e.to_string())),
    };
    let s: Stored = serde_json::from_str(&text).map_err(|e| {
        HiveError::Config(format!("{}: not a queen credential: {e}", path.display()))
    })?;
    if s.hive_id != hive_id {
        tracing::warn!(path = %path.display(), stored = %s.hive_id, hive_id, "the stored queen credential is for another hive id; joining anew with the join token");
        return Ok(None);
    }
    let origin = path.display().to_string();
    let token = |v: String| Token::new(v, &origin).map_err(|e| HiveError::Config(e.to_string()));
    Ok(Some(QueenCredential {
        hive_id: s.hive_id,
        credential: token(s.credential)?,
        queen_token: token(s.queen_token)?,
    }))
}

/// Writes the credential (0600, through a temporary file and a rename, so a crash never leaves
/// half a file).
pub fn save(path: &Path, c: &QueenCredential, queen_url: &str) -> Result<(), HiveError> {
    let stored = Stored {
        hive_id: c.hive_id.clone(),
        queen_url: queen_url.to_owned(),
        credential: c.credential.expose().to_owned(),
        queen_token: c.queen_token.expose().to_owned(),
    };
    let text = serde_json::to_string_pretty(&stored)
        .map_err(|e| HiveError::Config(format!("queen credential: {e}")))?;
    let tmp = path.with_extension("tmp");
    let io = |e: std::io::Error| HiveError::Config(format!("{}: {e}", path.display()));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_credential_loads_back_only_for_its_hive_id() {
        let dir = std::env::temp_dir().join(format!("rbee-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("queen-credential.json");
        let c = QueenCredential {
            hive_id: "gpu-1".into(),
            credential: Token::generate("rbh_"),
            queen_token: Token::generate("rbq_"),
        };
        save(&path, &c, "http://127.0.0.1:7833").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = load(&path, "gpu-1").unwrap().unwrap();
        assert!(back.credential.matches(c.credential.expose()));
        assert!(back.queen_token.matches(c.queen_token.expose()));
        assert!(load(&path, "gpu-2").unwrap().is_none());
        assert!(load(&dir.join("missing.json"), "gpu-1").unwrap().is_none());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&path, "gpu-1").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
