//! The queen's side of hive identity: heartbeats (binding ids, refusals and their audit
//! records), admin approval, and which token the queen presents to each hive.

use rbee_api::{HeartbeatAnswer, HiveHeartbeat, codes};
use rbee_auth::Token;
use rbee_http::ApiError;
use serde_json::json;
use tracing::{info, warn};

use super::{Queen, lock};

impl Queen {
    /// The token the queen presents to `hive_id`: its `[[hives]] token_file`, else for a
    /// configured hive the shared hive token, else the token issued when its id was bound. A
    /// hive that only joined never receives the shared token, which would open every other
    /// hive configured with it.
    pub fn hive_token(&self, hive_id: &str) -> Option<Token> {
        let tokens = self.tokens();
        if let Some(own) = tokens.per_hive.get(hive_id) {
            return Some(own.clone());
        }
        let configured = self
            .registry
            .get(hive_id)
            .ok()
            .flatten()
            .is_some_and(|h| h.source == rbee_registry::HiveSource::Config);
        if configured && let Some(shared) = tokens.hive {
            return Some(shared);
        }
        self.registry.queen_token(hive_id)
    }

    /// Applies a heartbeat (from the API handler: `auth` is the join token the auth layer
    /// checked, or a credential the registry checks). Refusals are audited: a wrong credential
    /// as an auth failure, the join token for a bound id as a takeover attempt.
    pub fn heartbeat(
        &self,
        hb: &HiveHeartbeat,
        auth: rbee_registry::BeatAuth<'_>,
        peer: Option<std::net::IpAddr>,
        request_id: &str,
    ) -> Result<HeartbeatAnswer, ApiError> {
        let policy = self.config().join.policy();
        let beat = match self
            .registry
            .heartbeat(hb, rbee_http::unix_ms(), auth, &policy)
        {
            Ok(beat) => beat,
            Err(e) => return Err(self.heartbeat_refused(hb, e, peer, request_id)),
        };
        self.metrics.heartbeats.inc(&[&hb.hive_id]);
        info_outcome(hb, &beat.outcome);
        let fp = beat.issued.as_ref().map(|i| i.credential.fingerprint());
        match beat.outcome {
            rbee_registry::BeatOutcome::Joined => self.audit(
                "hive.join",
                &hb.hive_id,
                json!({"hive_id": hb.hive_id, "url": hb.url, "version": hb.version,
                       "approved": beat.approved, "credential": fp}),
            ),
            rbee_registry::BeatOutcome::CameBack => {
                self.audit("hive.back", &hb.hive_id, json!({"hive_id": hb.hive_id}))
            }
            rbee_registry::BeatOutcome::Beat => {}
        }
        if beat.issued.is_some() && beat.outcome != rbee_registry::BeatOutcome::Joined {
            info!(hive = %hb.hive_id, "hive id bound to a credential");
            self.audit(
                "hive.bind",
                &hb.hive_id,
                json!({"hive_id": hb.hive_id, "url": hb.url, "credential": fp}),
            );
        }
        if let Some(from) = &beat.moved_from {
            warn!(hive = %hb.hive_id, %from, to = %hb.url, "hive moved (join.auto_approve_url_change)");
            self.audit(
                "hive.url_change",
                &hb.hive_id,
                json!({"hive_id": hb.hive_id, "from": from, "to": hb.url, "approved_by": "auto"}),
            );
        }
        if let Some(pending) = &beat.pending_url
            && self.note_pending(&hb.hive_id, pending)
        {
            warn!(hive = %hb.hive_id, url = %pending, "hive reports a new URL; held for an admin (POST /v1/admin/hives/{{id}}/approve)");
            self.audit(
                "hive.url_change_held",
                &hb.hive_id,
                json!({"hive_id": hb.hive_id, "url": pending}),
            );
        }
        self.hives_changed();
        Ok(HeartbeatAnswer {
            hive_id: hb.hive_id.clone(),
            approved: beat.approved,
            pending_url: beat.pending_url,
            credential: beat
                .issued
                .as_ref()
                .map(|i| i.credential.expose().to_owned()),
            queen_token: beat
                .issued
                .as_ref()
                .map(|i| i.queen_token.expose().to_owned()),
        })
    }

    /// Whether `url` is news for `hive`'s held URL change (audited once, not every beat).
    fn note_pending(&self, hive: &str, url: &str) -> bool {
        let mut held = lock(&self.held_urls);
        if held.get(hive).is_some_and(|u| u == url) {
            return false;
        }
        held.insert(hive.to_owned(), url.to_owned());
        true
    }

    fn heartbeat_refused(
        &self,
        hb: &HiveHeartbeat,
        e: rbee_registry::RegistryError,
        peer: Option<std::net::IpAddr>,
        request_id: &str,
    ) -> ApiError {
        use rbee_registry::RegistryError as R;
        let id = json!(hb.hive_id.chars().take(128).collect::<String>());
        match e {
            R::Unauthorized { .. } => {
                warn!(hive = %id, "heartbeat with a credential not issued for this hive id");
                self.auth_failure(
                    peer,
                    "hive_credential",
                    json!({"path": "/v1/hives/heartbeat", "request_id": request_id,
                           "hive_id": id}),
                );
                ApiError::unauthorized()
            }
            R::IdTaken { .. } => {
                warn!(hive = %id, url = %hb.url, "the join token was presented for a bound hive id; refused");
                self.audit(
                    "hive.takeover_refused",
                    "anonymous",
                    json!({"hive_id": id, "url": hb.url, "request_id": request_id}),
                );
                ApiError::new(codes::HIVE_ID_TAKEN, e.to_string())
            }
            R::Full { .. } => {
                warn!(hive = %id, "hive limit reached; join refused");
                ApiError::new(codes::HIVE_LIMIT, e.to_string()).retry_after(60)
            }
            R::InvalidHive { .. } | R::UrlConflict { .. } => {
                ApiError::new(codes::INVALID_PARAMETER, e.to_string())
            }
            other => {
                warn!(error = %other, "heartbeat not recorded");
                ApiError::internal("the hive registry could not record the heartbeat")
            }
        }
    }

    /// An admin approves hive `id` (a new hive is routed to, a held URL applied).
    pub fn approve_hive(&self, id: &str, admin: &str, request_id: &str) -> Result<bool, ApiError> {
        let approval = self
            .registry
            .approve(id, rbee_http::unix_ms())
            .map_err(|e| ApiError::internal(format!("the hive registry: {e}")))?;
        let Some(approval) = approval else {
            return Ok(false);
        };
        lock(&self.held_urls).remove(id);
        self.audit(
            "admin.hive_approve",
            admin,
            json!({"hive_id": id, "admitted": approval.admitted,
                   "url_change": approval.moved.as_ref().map(|(from, to)| json!({"from": from, "to": to})),
                   "request_id": request_id}),
        );
        self.hives_changed();
        Ok(true)
    }
}

fn info_outcome(hb: &HiveHeartbeat, outcome: &rbee_registry::BeatOutcome) {
    match outcome {
        rbee_registry::BeatOutcome::Joined => {
            info!(hive = %hb.hive_id, url = %hb.url, "hive joined")
        }
        rbee_registry::BeatOutcome::CameBack => info!(hive = %hb.hive_id, "hive is back"),
        _ => {}
    }
}
