//! The queen's side of per-client limits: admitting a request (its id, `max_concurrent`, the
//! per-minute rates, the daily budget), the models a client may use, counting each request's
//! tokens, and one metric series and one audit record per refusal window.

use std::sync::Arc;

use axum::http::StatusCode;
use rbee_api::codes;
use rbee_http::ApiError;
use serde_json::json;
use tracing::warn;

use super::{Queen, lock};
use crate::config::ClientToken;
use crate::limits::{LimitReason, day_of};

fn now_ms() -> u64 {
    rbee_http::unix_ms().max(0) as u64
}

impl Queen {
    /// Admits a request of `client`: records who sent it, so only that client (or an admin)
    /// can cancel it, and checks the client's limits (429, with `Retry-After`). A request id
    /// another client has in flight is refused (409): cancelling by id must not reach
    /// someone else's.
    pub fn client_slot(
        self: &Arc<Self>,
        client: &str,
        request_id: &str,
    ) -> Result<ClientSlot, ApiError> {
        {
            let mut owners = lock(&self.owners);
            match owners.get_mut(request_id) {
                Some((owner, _)) if owner != client => {
                    return Err(ApiError::new(
                        codes::INVALID_PARAMETER,
                        format!(
                            "request id `{request_id}` is in use by another client; send another X-Request-Id"
                        ),
                    )
                    .with_status(StatusCode::CONFLICT));
                }
                Some((_, n)) => *n += 1,
                None => {
                    owners.insert(request_id.to_owned(), (client.to_owned(), 1));
                }
            }
        }
        let owned = OwnedId {
            queen: self.clone(),
            request_id: request_id.to_owned(),
        };
        let limits = self
            .config()
            .client_tokens
            .into_iter()
            .find(|t| t.name == client);
        let concurrent = limits.as_ref().and_then(|t| t.max_concurrent);
        if let Err(e) = lock(&self.sched).admit_client(client, concurrent) {
            self.client_refused(client, LimitReason::Concurrent, &e);
            return Err(e);
        }
        self.active
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // From here a refusal drops the slot, which gives the place back.
        let slot = ClientSlot {
            queen: self.clone(),
            client: client.to_owned(),
            _owned: owned,
        };
        if let Some(limits) = limits {
            self.admit_rates(&limits)?;
        }
        Ok(slot)
    }

    fn admit_rates(&self, limits: &ClientToken) -> Result<(), ApiError> {
        let now = now_ms();
        let verdict = {
            let mut l = lock(&self.limiter);
            if limits.tokens_per_day.is_some() && l.needs_day(&limits.name, now) {
                let used = self
                    .registry
                    .client_tokens(&limits.name, day_of(now))
                    .unwrap_or_else(|e| {
                        warn!(client = %limits.name, error = %e, "reading today's token count failed; counting from 0");
                        0
                    });
                l.set_day(&limits.name, now, used);
            }
            l.admit(limits, now)
        };
        verdict.map_err(|r| {
            self.client_refused(&limits.name, r.reason, &r.error);
            r.error
        })
    }

    /// Whether `client` may use `model_ref` (what its `model` resolved to). Its `models` list
    /// names models as clients do (aliases or references); empty allows all.
    pub(crate) fn client_may_use(
        &self,
        client: &str,
        model: &str,
        model_ref: &str,
    ) -> Result<(), ApiError> {
        let cfg = self.config();
        let Some(t) = cfg.client_tokens.iter().find(|t| t.name == client) else {
            return Ok(());
        };
        if t.models.is_empty() {
            return Ok(());
        }
        let allowed = t.models.iter().any(|m| {
            let reference = cfg
                .models
                .iter()
                .find(|a| &a.name == m)
                .map_or(m.as_str(), |a| a.reference.as_str());
            m == model || reference == model_ref
        });
        if allowed {
            return Ok(());
        }
        let e = ApiError::new(
            codes::MODEL_NOT_ALLOWED,
            format!(
                "client `{client}` may not use model `{model}`; its token allows: {}",
                t.models.join(", ")
            ),
        );
        self.client_refused(client, LimitReason::Model, &e);
        Err(e)
    }

    /// A request of `client` ended having used `tokens` (prompt + completion): counted against
    /// its per-minute rate and today's total (kept in the registry for budgets).
    pub(crate) fn client_tokens_used(&self, client: &str, tokens: u64) {
        if tokens == 0 {
            return;
        }
        self.metrics.client_tokens.inc_by(&[client], tokens as f64);
        let now = now_ms();
        let total = match self.registry.add_client_tokens(client, day_of(now), tokens) {
            Ok(t) => t,
            Err(e) => {
                warn!(client, error = %e, "recording the client's tokens failed");
                return;
            }
        };
        lock(&self.limiter).used(client, now, tokens, total);
    }

    /// Counts a refusal by the client's own limits; audits the first of each window.
    fn client_refused(&self, client: &str, reason: LimitReason, e: &ApiError) {
        self.metrics.client_refusals.inc(&[client, reason.as_str()]);
        let first = lock(&self.limiter).first_in_window(client, reason, now_ms());
        if first {
            self.audit(
                "client.limited",
                client,
                json!({"reason": reason.as_str(), "code": e.code.as_str(),
                       "message": e.message, "retry_after_s": e.retry_after}),
            );
        }
    }
}

/// One request counted against its client's limit until dropped.
pub struct ClientSlot {
    queen: Arc<Queen>,
    client: String,
    _owned: OwnedId,
}

/// A request id recorded as in flight until dropped.
struct OwnedId {
    queen: Arc<Queen>,
    request_id: String,
}

impl Drop for OwnedId {
    fn drop(&mut self) {
        let mut owners = lock(&self.queen.owners);
        if let Some((_, n)) = owners.get_mut(&self.request_id) {
            *n -= 1;
            if *n == 0 {
                owners.remove(&self.request_id);
            }
        }
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        lock(&self.queen.sched).client_done(&self.client);
        self.queen
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
