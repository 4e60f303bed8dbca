//! How the hive takes in what runs on its own: each worker's lifecycle reports and each
//! download's reports become the state the API shows, metrics and audit records. The tasks
//! that report know nothing of the hive.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;

use crate::downloads::{Download, DownloadReport, Hub};
use crate::hive::Hive;
use crate::lifecycle::Report;
use crate::worker::{StopOutcome, Worker, WorkerState};

impl Hive {
    /// Takes in a worker's lifecycle reports until its task ends; then the worker is done.
    pub(crate) async fn follow(
        self: Arc<Self>,
        worker: Arc<Worker>,
        mut reports: mpsc::UnboundedReceiver<Report>,
    ) {
        while let Some(report) = reports.recv().await {
            self.take_in(&worker, report);
        }
        worker.mark_done();
        self.worker_finished(&worker);
    }

    /// One lifecycle report: the state the API shows, metrics and audit records.
    fn take_in(self: &Arc<Self>, worker: &Arc<Worker>, report: Report) {
        let id = worker.id();
        let m = &self.metrics;
        match report {
            Report::State(state) => {
                worker.set_state(state);
                self.announce(worker);
            }
            Report::Spawned => m.spawns.inc(&[]),
            Report::SpawnFailed { error } => self.audit(
                "worker.spawn_failed",
                json!({"worker_id": id, "error": error}),
            ),
            Report::Ready {
                pid,
                spawn_to_ready_seconds: secs,
            } => {
                m.spawn_to_ready.observe(&[], secs);
                worker.set_state(WorkerState::Ready);
                self.announce(worker);
                // nvidia-smi can take seconds; never hold the reports up for it.
                let (h, w) = (self.clone(), worker.clone());
                tokio::spawn(async move { h.sample_memory(&w, pid).await });
                self.audit(
                    "worker.ready",
                    json!({"worker_id": id, "pid": pid, "spawn_to_ready_seconds": secs}),
                );
            }
            Report::ForceKilled => m.force_kills.inc(&[]),
            Report::Crashed {
                code,
                signal,
                reason,
                stderr_tail,
            } => {
                m.worker_exit_code.set(&[id], code.map_or(-1.0, f64::from));
                m.worker_exit_signal
                    .set(&[id], signal.map_or(0.0, f64::from));
                m.crashes.inc(&[]);
                self.audit(
                    "worker.crash",
                    json!({
                        "worker_id": id, "model": worker.spec.model_ref, "exit_code": code,
                        "signal": signal, "reason": reason,
                        "stderr_tail": stderr_tail.iter().rev().take(5).rev().collect::<Vec<_>>(),
                    }),
                );
            }
            Report::BreakerOpen { recent_crashes } => {
                m.breaker_open.inc(&[]);
                m.worker_breaker.set(&[id], 1.0);
                self.audit(
                    "worker.breaker_open",
                    json!({"worker_id": id, "recent_crashes": recent_crashes}),
                );
            }
            Report::Backoff { delay } => m.worker_backoff.set(&[id], delay.as_secs_f64()),
            Report::Restarted { restart_count } => {
                m.worker_backoff.set(&[id], 0.0);
                m.restarts.inc(&[]);
                m.worker_restart_count.set(&[id], f64::from(restart_count));
                self.audit(
                    "worker.restart",
                    json!({"worker_id": id, "restart_count": restart_count}),
                );
            }
            Report::Stopped {
                cause,
                outcome,
                seconds,
            } => {
                match outcome {
                    StopOutcome::Graceful => m.graceful_stops.inc(&[]),
                    StopOutcome::ForceKilled => m.force_kills.inc(&[]),
                    StopOutcome::NotRunning => {}
                }
                let event = if outcome == StopOutcome::ForceKilled {
                    "worker.kill"
                } else {
                    "worker.stop"
                };
                self.audit(
                    event,
                    json!({"worker_id": id, "cause": cause, "outcome": outcome, "seconds": seconds}),
                );
            }
        }
    }

    /// Starts a download (or finds the one running for the same model); the bool says
    /// whether a new one started.
    pub fn start_download(self: &Arc<Self>, model: rbee_models::ModelRef) -> (Arc<Download>, bool) {
        let cfg = self.config();
        let hub = Hub {
            endpoint: cfg.hub.endpoint,
            token: self
                .tokens
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .hub
                .clone(),
            retries: cfg.hub.retries,
        };
        let (download, reports) = self.downloads.start(hub, &self.catalog, model);
        let Some(mut reports) = reports else {
            return (download, false);
        };
        let hive = self.clone();
        tokio::spawn(async move {
            while let Some(report) = reports.recv().await {
                hive.take_in_download(report);
            }
        });
        (download, true)
    }

    fn take_in_download(&self, report: DownloadReport) {
        match report {
            DownloadReport::Started { id, model } => self.audit(
                "model.download_start",
                json!({"download_id": id, "model": model}),
            ),
            DownloadReport::Finished {
                id,
                model,
                bytes_done,
                bytes_total,
                result,
            } => {
                self.metrics.download_bytes.inc_by(&[], bytes_done as f64);
                match result {
                    Ok(path) => {
                        self.metrics.downloads.inc(&["ok"]);
                        self.audit(
                            "model.download",
                            json!({"download_id": id, "model": model, "path": path, "bytes": bytes_total}),
                        );
                    }
                    Err(e) => {
                        self.metrics.downloads.inc(&[e.code().as_str()]);
                        self.audit(
                            "model.download_failed",
                            json!({"download_id": id, "model": model, "code": e.code(), "error": e.to_string()}),
                        );
                    }
                }
            }
        }
    }
}
