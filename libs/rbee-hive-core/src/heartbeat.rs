//! Heartbeats to the queen: node resources, workers and models every few seconds, with the
//! join token. The hive serves on while the queen is away, backing off up to a minute.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rbee_api::{HeartbeatWorker, HiveHeartbeat};
use tracing::{info, warn};

use crate::hive::Hive;

const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub async fn build(hive: &Hive) -> HiveHeartbeat {
    let cfg = hive.config();
    let url = if cfg.advertise_url.is_empty() {
        format!("http://{}", hive.address)
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
    let mut failures: u32 = 0;
    loop {
        let cfg = hive.config();
        if cfg.queen.url.is_empty() || hive.draining.load(Ordering::SeqCst) {
            return;
        }
        let interval = Duration::from_secs(cfg.queen.heartbeat_seconds);
        let beat = build(&hive).await;
        let token = hive
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .join
            .clone();
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
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("HTTP {}", r.status())),
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
