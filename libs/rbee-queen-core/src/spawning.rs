//! Starting a worker for the scheduler: ask the ranked hives in turn, then follow the worker
//! the hive started until it is ready or failed, and report each outcome back as an event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{info, warn};

use crate::hive_client::HiveCallError;
use crate::queen::Queen;
use crate::sched::WorkerKey;

impl Queen {
    /// Asks `hives` in order to start a worker for `model` (a refusal ranks that hive last for
    /// the model and the next is asked), then reports the outcome to the scheduler.
    pub(crate) async fn spawn_worker(self: Arc<Self>, model: String, hives: Vec<(String, String)>) {
        let client = self.hive_client();
        let mut last = String::new();
        for (hive_id, url) in hives {
            match client.spawn_worker(&hive_id, &url, &model).await {
                Ok(view) => {
                    info!(hive = %hive_id, worker = %view.id, model = %model, "spawned a worker");
                    self.metrics.spawns.inc(&[&hive_id]);
                    let key = WorkerKey::new(&hive_id, &view.id);
                    self.event(|s, _| s.spawn_accepted(&model, key));
                    return;
                }
                Err(e) => {
                    last = e.to_string();
                    warn!("{last}");
                    self.event(|s, now| {
                        s.spawn_refused(&model, &hive_id, now);
                        Vec::new()
                    });
                }
            }
        }
        self.event(|s, now| s.spawn_exhausted(&model, &last, now));
    }

    /// Follows a spawned worker until the hive says it is ready or failed. One failed look (a
    /// timeout, a 5xx, a token mid-rotation) is not a failed worker: only a hive that no
    /// longer knows it, a hive that went down, or a failed state is.
    pub(crate) async fn watch_spawned(self: Arc<Self>, model: String, key: WorkerKey) {
        let client = self.hive_client();
        let give_up =
            Instant::now() + Duration::from_secs(self.config().scheduling.spawn_wait_seconds);
        loop {
            let hive = self.registry.get(&key.hive).ok().flatten();
            let failed = match &hive {
                None => Some(format!(
                    "worker {} on hive {} could not be inspected: the hive is gone",
                    key.worker, key.hive
                )),
                Some(h) => match client.worker(&h.id, &h.url, &key.worker).await {
                    Ok(view) if view.state.is_ready() => {
                        if let Some(secs) = view.spawn_to_ready_seconds {
                            self.metrics.stage.observe(&["load"], secs);
                        }
                        self.event(|s, now| s.worker_ready(&model, key.clone(), now));
                        return;
                    }
                    Ok(view) if view.state.may_come_up() => None,
                    Ok(view) => Some(failure_reason(&key, &view)),
                    Err(HiveCallError::Status(404, _)) => Some(format!(
                        "worker {} on hive {} is gone: the hive no longer has this worker",
                        key.worker, key.hive
                    )),
                    Err(_) if h.state == rbee_registry::HiveState::Down => Some(format!(
                        "worker {} on hive {} is unreachable: the hive went down",
                        key.worker, key.hive
                    )),
                    Err(_) => None,
                },
            };
            if let Some(reason) = failed {
                warn!(hive = %key.hive, worker = %key.worker, %reason, "a spawned worker did not come up");
                self.event(|s, now| s.worker_failed(&model, &key, reason, now));
                return;
            }
            if Instant::now() >= give_up {
                // Its heartbeat will tell when (if) it comes up.
                self.event(|s, now| s.watch_ended(&model, &key, now));
                return;
            }
            tokio::time::sleep(SPAWN_WATCH_INTERVAL).await;
        }
    }
}

/// What the hive says about a worker that failed to start: its failure, last exit and the
/// last line it wrote to stderr.
fn failure_reason(key: &WorkerKey, view: &rbee_api::worker::WorkerView) -> String {
    let mut reason = format!(
        "worker {} on hive {} is {}",
        key.worker, key.hive, view.state
    );
    if let Some(f) = &view.failure {
        reason.push_str(&format!(": {f}"));
    }
    if let Some(exit) = &view.last_exit {
        reason.push_str(&format!("; last exit {}", json!(exit)));
    }
    if let Some(line) = view.stderr_tail.last() {
        reason.push_str(&format!("; stderr: {line}"));
    }
    reason
}

/// How often a spawned worker's state is asked for while it loads.
const SPAWN_WATCH_INTERVAL: Duration = Duration::from_millis(100);
