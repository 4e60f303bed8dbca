//! Heartbeats to the queen: node resources, workers and models every few seconds, with the
//! credential the queen issued to this hive (the join token only until it has one, see
//! [`crate::credential`]). The hive serves on while the queen is away, backing off up to a minute.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rbee_api::{HeartbeatAnswer, HeartbeatWorker, HiveHeartbeat};
use tracing::{info, warn};

use crate::hive::Hive;

const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub async fn build(hive: &Hive) -> HiveHeartbeat {
    let cfg = hive.config();
    let url = if cfg.advertise_url.is_empty() {
        let scheme = if hive.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", hive.address)
    } else {
        cfg.advertise_url.clone()
    };
    let models = hive.models().await;
    HiveHeartbeat {
        hive_id: cfg.hive_id.clone(),
        url,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        resources: hive.resources().await,
        workers: hive
            .list()
            .into_iter()
            .map(|w| HeartbeatWorker {
                id: w.id,
                model: w.model,
                device: w.device,
                state: w.state,
                busy: w.busy,
                slots: w.slots,
            })
            .collect(),
        model_sha256: hive.model_hashes(&models),
        models: models.into_iter().map(|m| m.reference).collect(),
    }
}

pub async fn run(hive: Arc<Hive>) {
    let cred_path = crate::credential::path(&hive.config());
    match &cred_path {
        Some(p) => match crate::credential::load(p, &hive.hive_id()) {
            Ok(Some(c)) => {
                info!(path = %p.display(), credential = %c.credential.fingerprint(), "beating with the credential the queen issued");
                hive.set_queen_credential(c);
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "cannot read the queen credential; joining with the join token")
            }
        },
        None => warn!(
            "neither queen.credential_file nor $STATE_DIRECTORY is set: the credential the queen issues is kept in memory only, so after a restart this hive cannot beat under its id until an admin removes it on the queen"
        ),
    }
    let mut failures: u32 = 0;
    let mut last_note = String::new();
    loop {
        let cfg = hive.config();
        if cfg.queen.url.is_empty() || hive.draining.load(Ordering::SeqCst) {
            return;
        }
        let interval = Duration::from_secs(cfg.queen.heartbeat_seconds);
        let beat = build(&hive).await;
        let issued = hive.queen_credential();
        let token = match &issued {
            Some(c) => Some(c.credential.clone()),
            None => hive
                .tokens
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .join
                .clone(),
        };
        let url = format!("{}/v1/hives/heartbeat", cfg.queen.url.trim_end_matches('/'));
        let mut req = hive
            .http
            .post(&url)
            .json(&beat)
            .timeout(Duration::from_secs(5));
        if let Some(t) = &token {
            req = req.bearer_auth(t.expose());
        }
        let outcome = match req.send().await {
            Ok(r) if r.status().is_success() => match r.json::<HeartbeatAnswer>().await {
                // A queen from before hive identities answers 204 with no body.
                Err(e) if e.is_decode() => Ok(()),
                Ok(answer) => {
                    accept(&hive, &answer, cred_path.as_deref(), &cfg.queen.url);
                    let note = match (&answer.approved, &answer.pending_url) {
                        (false, _) => "waiting for an admin to approve this hive on the queen (POST /v1/admin/hives/{id}/approve)".to_owned(),
                        (true, Some(u)) => format!("the queen holds the new URL {u} for an admin's approval and still calls the old one"),
                        (true, None) => String::new(),
                    };
                    if note != last_note && !note.is_empty() {
                        warn!("{note}");
                    }
                    last_note = note;
                    Ok(())
                }
                Err(e) => Err(format!("unreadable answer: {e}")),
            },
            Ok(r) if r.status() == 401 && issued.is_some() => Err(format!(
                "HTTP 401: the queen refused this hive's credential (removed by an admin?); to join again, delete {} and restart the hive",
                cred_path
                    .as_deref()
                    .map_or("the credential".into(), |p| p.display().to_string())
            )),
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                Err(format!(
                    "HTTP {status}: {}",
                    body.chars().take(300).collect::<String>()
                ))
            }
            Err(e) => Err(e.to_string()),
        };
        let wait = match outcome {
            Ok(()) => {
                hive.metrics.heartbeats.inc(&["ok"]);
                if failures > 0 {
                    info!(after_failures = failures, "queen reachable again");
                }
                failures = 0;
                interval
            }
            Err(e) => {
                hive.metrics.heartbeats.inc(&["failed"]);
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!(%url, error = %e, failures, "heartbeat to the queen failed; serving on");
                }
                let exp = interval
                    .saturating_mul(1 << failures.min(6))
                    .min(MAX_BACKOFF);
                exp.mul_f64(0.5 + 0.5 * rand::random::<f64>()).max(interval)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Keeps a credential the queen just issued: in memory at once, and in the credential file so
/// a restart beats as the same hive.
fn accept(hive: &Hive, answer: &HeartbeatAnswer, path: Option<&std::path::Path>, queen_url: &str) {
    let (Some(credential), Some(queen_token)) = (&answer.credential, &answer.queen_token) else {
        return;
    };
    let token = |v: &str| rbee_auth::Token::new(v, "the queen's heartbeat answer");
    let (credential, queen_token) = match (token(credential), token(queen_token)) {
        (Ok(c), Ok(q)) => (c, q),
        _ => {
            warn!("the queen issued an unusable credential; ignored");
            return;
        }
    };
    let c = crate::credential::QueenCredential {
        hive_id: answer.hive_id.clone(),
        credential,
        queen_token,
    };
    match path.map(|p| (p, crate::credential::save(p, &c, queen_url))) {
        Some((p, Ok(()))) => {
            info!(path = %p.display(), credential = %c.credential.fingerprint(), "joined the queen; its credential for this hive is stored")
        }
        Some((p, Err(e))) => {
            warn!(path = %p.display(), error = %e, "joined the queen but cannot store its credential: after a restart this hive cannot beat under its id until an admin removes it")
        }
        None => {
            info!(credential = %c.credential.fingerprint(), "joined the queen (credential in memory only)")
        }
    }
    hive.set_queen_credential(c);
}
