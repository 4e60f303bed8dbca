//! Hive identity, as Kubernetes' node bootstrap does it: the join token only lets a *new* hive
//! ask to join; the queen then issues that hive its own credential (kept here only as its
//! SHA-256) and a token of its own for the queen's calls to that hive. From then on the id is
//! bound to the credential and to its URL: the join token cannot beat as that id again, a beat
//! with another hive's credential is refused, and a new URL waits for an admin (unless the
//! queen is set to approve URL changes itself). Removing the hive revokes both secrets.

use rbee_api::HiveHeartbeat;
use rbee_auth::Token;

use crate::{BeatOutcome, RegistryError};

/// Prefix of a hive credential (what a hive presents in heartbeats once it joined).
pub const CREDENTIAL_PREFIX: &str = "rbh_";
/// Prefix of the token the queen presents to one joined hive.
pub const QUEEN_TOKEN_PREFIX: &str = "rbq_";
/// Most workers one heartbeat may list.
pub const MAX_WORKERS: usize = 1024;
/// Most models one heartbeat may list.
pub const MAX_MODELS: usize = 4096;
/// Longest worker id, model reference, device or version string accepted in a heartbeat.
pub const MAX_FIELD_LEN: usize = 512;

/// How a heartbeat authenticated.
#[derive(Debug, Clone, Copy)]
pub enum BeatAuth<'a> {
    /// The join token (or dev mode without one): good only for a hive the queen has not bound.
    Join,
    /// A credential the queen issued (verified against the stored hash).
    Credential(&'a str),
}

impl<'a> BeatAuth<'a> {
    /// What a presented bearer value is: an issued credential by its prefix, else the join
    /// token (which the caller has already checked).
    pub fn from_presented(presented: Option<&'a str>) -> Self {
        match presented {
            Some(p) if p.starts_with(CREDENTIAL_PREFIX) => BeatAuth::Credential(p),
            _ => BeatAuth::Join,
        }
    }
}

/// The queen's rules for hives joining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinPolicy {
    /// Most hives in the registry (configured ones included).
    pub max_hives: usize,
    /// New hives are recorded but not routed to until an admin approves them.
    pub require_approval: bool,
    /// A bound hive reporting a new URL moves there at once (labs), instead of waiting for an
    /// admin.
    pub auto_approve_url_change: bool,
}

impl Default for JoinPolicy {
    fn default() -> Self {
        Self {
            max_hives: 100,
            require_approval: false,
            auto_approve_url_change: false,
        }
    }
}

/// The secrets a hive receives once, in the answer to the heartbeat that bound its id.
#[derive(Debug, Clone)]
pub struct Issued {
    /// What the hive presents in every later heartbeat.
    pub credential: Token,
    /// What the queen presents to this hive.
    pub queen_token: Token,
}

impl Issued {
    pub(crate) fn generate() -> Self {
        Self {
            credential: Token::generate(CREDENTIAL_PREFIX),
            queen_token: Token::generate(QUEEN_TOKEN_PREFIX),
        }
    }
}

/// What a heartbeat did.
#[derive(Debug, Clone)]
pub struct Beat {
    pub outcome: BeatOutcome,
    /// Secrets issued by this beat (the id was bound just now).
    pub issued: Option<Issued>,
    /// Whether the hive takes part in routing (false while it waits for approval).
    pub approved: bool,
    /// A URL the hive reported that waits for an admin (routing stays on the old one).
    pub pending_url: Option<String>,
    /// The URL the hive left, when a change was approved automatically.
    pub moved_from: Option<String>,
}

/// What an admin approval changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    /// The hive was waiting to be routed to.
    pub admitted: bool,
    /// `(old, new)` when a held URL change was applied.
    pub moved: Option<(String, String)>,
}

/// Checks what a heartbeat carries beyond its id and URL: worker ids go into URL paths and
/// every string into the registry and metrics, so each is bounded and worker ids are plain.
pub fn validate_heartbeat(hb: &HiveHeartbeat) -> Result<(), RegistryError> {
    let invalid =
        |field: &'static str, reason: String| RegistryError::InvalidHive { field, reason };
    if hb.version.len() > MAX_FIELD_LEN {
        return Err(invalid(
            "version",
            format!("longer than {MAX_FIELD_LEN} bytes"),
        ));
    }
    if hb.workers.len() > MAX_WORKERS {
        return Err(invalid(
            "workers",
            format!("{} listed, at most {MAX_WORKERS}", hb.workers.len()),
        ));
    }
    if hb.models.len() > MAX_MODELS || hb.model_sha256.len() > MAX_MODELS {
        return Err(invalid("models", format!("more than {MAX_MODELS} listed")));
    }
    for w in &hb.workers {
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if w.id.is_empty() || w.id.len() > 128 || !w.id.chars().all(plain) || w.id.starts_with('.')
        {
            return Err(invalid(
                "workers[].id",
                format!(
                    "{:?} is not 1-128 of [A-Za-z0-9._-] (not starting with `.`)",
                    w.id.chars().take(64).collect::<String>()
                ),
            ));
        }
        if w.model.len() > MAX_FIELD_LEN || w.device.len() > MAX_FIELD_LEN {
            return Err(invalid(
                "workers[].model",
                format!(
                    "a model or device longer than {MAX_FIELD_LEN} bytes (worker {})",
                    w.id
                ),
            ));
        }
    }
    let too_long = hb
        .models
        .iter()
        .chain(hb.model_sha256.keys())
        .chain(hb.model_sha256.values())
        .any(|m| m.len() > MAX_FIELD_LEN || m.chars().any(char::is_control));
    if too_long {
        return Err(invalid(
            "models",
            format!(
                "a model reference longer than {MAX_FIELD_LEN} bytes or with control characters"
            ),
        ));
    }
    Ok(())
}
