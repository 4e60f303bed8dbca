//! Model downloads in flight: one per model reference; progress in a watch channel so a late
//! subscriber starts from the current state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rbee_models::{DownloadProgress, DownloadState, HubClient, ModelRef, ProgressError};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::hive::Hive;

pub struct Download {
    pub id: String,
    pub model: String,
    pub progress: watch::Receiver<DownloadProgress>,
    cancel: watch::Sender<bool>,
}

#[derive(Default)]
pub struct Downloads {
    map: Mutex<BTreeMap<String, Arc<Download>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn is_finished(p: &DownloadProgress) -> bool {
    matches!(p.state, DownloadState::Done | DownloadState::Failed)
}

impl Downloads {
    pub fn get(&self, id: &str) -> Option<Arc<Download>> {
        lock(&self.map).get(id).cloned()
    }

    pub fn list(&self) -> Vec<(String, String, DownloadProgress)> {
        lock(&self.map)
            .values()
            .map(|d| (d.id.clone(), d.model.clone(), d.progress.borrow().clone()))
            .collect()
    }

    pub fn cancel_all(&self) {
        for d in lock(&self.map).values() {
            d.cancel.send_replace(true);
        }
    }

    /// Starts a download, or returns the one already running for the same reference.
    /// The bool says whether a new one started.
    pub fn start(&self, hive: &Arc<Hive>, model: ModelRef) -> (Arc<Download>, bool) {
        let key = model.to_string();
        let mut map = lock(&self.map);
        if let Some(d) = map
            .values()
            .find(|d| d.model == key && !is_finished(&d.progress.borrow()))
        {
            return (d.clone(), false);
        }
        // Finished records are kept so a late subscriber learns the outcome; bound them.
        if map.len() >= 64
            && let Some(old) = map
                .iter()
                .find(|(_, d)| is_finished(&d.progress.borrow()))
                .map(|(k, _)| k.clone())
        {
            map.remove(&old);
        }
        let id = format!("d-{:08x}", rand::random::<u32>());
        let (tx, rx) = watch::channel(DownloadProgress {
            reference: key.clone(),
            ..DownloadProgress::default()
        });
        let (cancel, cancel_rx) = watch::channel(false);
        let dl = Arc::new(Download {
            id: id.clone(),
            model: key.clone(),
            progress: rx,
            cancel,
        });
        map.insert(id.clone(), dl.clone());
        drop(map);
        let hive = hive.clone();
        tokio::spawn(async move {
            let cfg = hive.config();
            let token = hive
                .tokens
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .hub
                .clone();
            let client = match HubClient::new(&cfg.hub.endpoint, token) {
                Ok(c) => c.with_retries(cfg.hub.retries),
                Err(e) => {
                    tx.send_modify(|p| {
                        p.state = DownloadState::Failed;
                        p.error = Some(ProgressError {
                            code: e.code().to_owned(),
                            message: e.to_string(),
                        });
                    });
                    return;
                }
            };
            hive.audit(
                "model.download_start",
                json!({"download_id": id, "model": key}),
            );
            info!(download_id = %id, model = %key, "download started");
            let progress = tx.subscribe();
            let result = rbee_models::download(&client, &hive.catalog, &model, tx, cancel_rx).await;
            let p = progress.borrow().clone();
            hive.metrics.download_bytes.inc_by(&[], p.bytes_done as f64);
            match result {
                Ok(path) => {
                    hive.metrics.downloads.inc(&["ok"]);
                    info!(download_id = %id, path = %path.display(), "download finished");
                    hive.audit(
                        "model.download",
                        json!({"download_id": id, "model": key, "path": path, "bytes": p.bytes_total}),
                    );
                }
                Err(e) => {
                    hive.metrics.downloads.inc(&[e.code().as_str()]);
                    warn!(download_id = %id, error = %e, "download failed");
                    hive.audit(
                        "model.download_failed",
                        json!({"download_id": id, "model": key, "code": e.code(), "error": e.to_string()}),
                    );
                }
            }
        });
        (dl, true)
    }
}
