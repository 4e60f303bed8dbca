//! The hive's watch over its ready workers: the keep-alive (idle workers are stopped) and
//! the health checks (`/health`, plus a 1-token generation when idle; probes never count as
//! use). A worker that fails three in a row is handed to its lifecycle task to be killed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{debug, info, warn};

use crate::hive::Hive;
use crate::worker::{StopCause, Worker, WorkerState};

impl Hive {
    /// Stops idle workers (keep-alive) and health-checks ready ones, forever.
    pub async fn supervise_loop(self: Arc<Self>) {
        let mut last_health = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if self.draining.load(Ordering::SeqCst) {
                return;
            }
            self.flush_failures_due();
            let cfg = self.config();
            let keep = Duration::from_secs(cfg.workers.failed_keep_seconds);
            for id in self.gc_failed(rbee_http::unix_ms(), keep) {
                info!(worker_id = %id, "dropped the failed worker's record");
            }
            if cfg.workers.keep_alive_seconds > 0 {
                let keep = Duration::from_secs(cfg.workers.keep_alive_seconds);
                for w in self.all() {
                    if w.idle_for(keep) && !w.stop_requested() {
                        info!(worker_id = %w.id(), keep_alive_s = keep.as_secs(), "unused for the keep-alive; stopping");
                        self.metrics.keep_alive_stops.inc(&[]);
                        w.request_stop(StopCause::Idle);
                    }
                }
            }
            if last_health.elapsed() >= Duration::from_secs(cfg.workers.health_interval_seconds) {
                last_health = Instant::now();
                for w in self.all() {
                    if w.state() == WorkerState::Ready && w.begin_probe() {
                        let hive = self.clone();
                        tokio::spawn(async move {
                            hive.health_check(&w).await;
                            w.end_probe();
                        });
                    }
                }
            }
        }
    }

    /// `/health` must say ready; a worker with no recent success must also generate one
    /// token. Three failures in a row kill it (then the restart policy applies).
    async fn health_check(&self, w: &Worker) {
        let Some((port, token)) = w.endpoint() else {
            return;
        };
        if let Some(pid) = w.pid() {
            self.sample_memory(w, pid).await;
        }
        let base = format!("http://127.0.0.1:{port}");
        let health = self
            .http
            .get(format!("{base}/health"))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let mut ok = matches!(&health, Ok(r) if r.status().is_success());
        self.metrics
            .health_probes
            .inc(&["health", if ok { "ok" } else { "failed" }]);
        let idle = Duration::from_secs(self.config().workers.health_probe_idle_seconds);
        if ok && w.needs_generation_probe(idle) {
            // Only when no client is streaming; a busy worker is evidently alive.
            if w.inflight.load(Ordering::SeqCst) == 0
                && let Ok(permit) = w.slots.clone().try_acquire_owned()
            {
                w.probe_holds.store(true, Ordering::SeqCst);
                let res = self
                    .http
                    .post(format!("{base}/v1/inference"))
                    .bearer_auth(token.expose())
                    .json(&json!({"prompt": "Hi", "max_tokens": 1}))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let body = match res {
                    Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
                    Ok(r) => format!("HTTP {}", r.status()),
                    Err(e) => e.to_string(),
                };
                w.probe_holds.store(false, Ordering::SeqCst);
                drop(permit);
                let mut seen = rbee_api::sse::StreamObserver::default();
                seen.observe(body.as_bytes());
                ok = seen.terminal() == Some(rbee_api::sse::Terminal::End);
                self.metrics
                    .health_probes
                    .inc(&["generate", if ok { "ok" } else { "failed" }]);
                if ok {
                    w.mark_probe_success();
                } else {
                    debug!(worker_id = %w.id(), "generation probe failed");
                }
            }
        }
        if ok {
            w.health_failures.store(0, Ordering::SeqCst);
        } else {
            let n = w.health_failures.fetch_add(1, Ordering::SeqCst) + 1;
            warn!(worker_id = %w.id(), failures = n, "health check failed");
            // The lifecycle task does the killing: it alone touches the process.
            if n >= 3
                && let Some(pid) = w.pid()
                && w.request_kill_unhealthy(pid)
            {
                warn!(worker_id = %w.id(), pid, "three failed health checks; killed");
            }
        }
    }
}
