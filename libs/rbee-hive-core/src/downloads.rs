//! Model downloads in flight: one per model reference; progress in a watch channel so a late
//! subscriber starts from the current state. Each download reports its start and its end
//! over a channel; the hive turns those into metrics and audit records.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use rbee_models::{
    Catalog, DownloadProgress, DownloadState, HubClient, ModelError, ModelRef, ProgressError,
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// The hub a download comes from, as configured when it starts.
pub struct Hub {
    pub endpoint: String,
    pub token: Option<String>,
    pub retries: u32,
}

/// What a download task reports, in order; the channel closes when it ends.
#[derive(Debug)]
pub enum DownloadReport {
    /// The transfer begins (the hub client is set up).
    Started { id: String, model: String },
    /// The transfer is over, with the bytes moved and the file or the error.
    Finished {
        id: String,
        model: String,
        bytes_done: u64,
        bytes_total: Option<u64>,
        result: Result<PathBuf, ModelError>,
    },
}

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

    /// Starts a download into `catalog`'s first directory, or returns the one already running
    /// for the same reference. A new one comes with the receiver of its reports.
    pub fn start(
        &self,
        hub: Hub,
        catalog: &Catalog,
        model: ModelRef,
    ) -> (
        Arc<Download>,
        Option<mpsc::UnboundedReceiver<DownloadReport>>,
    ) {
        let key = model.to_string();
        let mut map = lock(&self.map);
        if let Some(d) = map
            .values()
            .find(|d| d.model == key && !is_finished(&d.progress.borrow()))
        {
            return (d.clone(), None);
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
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let catalog = catalog.clone();
        tokio::spawn(async move {
            let client = match HubClient::new(&hub.endpoint, hub.token) {
                Ok(c) => c.with_retries(hub.retries),
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
            // A send fails only when the hive is gone; the download goes on regardless.
            let _ = reports.send(DownloadReport::Started {
                id: id.clone(),
                model: key.clone(),
            });
            info!(download_id = %id, model = %key, "download started");
            let progress = tx.subscribe();
            let result = rbee_models::download(&client, &catalog, &model, tx, cancel_rx).await;
            let p = progress.borrow().clone();
            match &result {
                Ok(path) => {
                    info!(download_id = %id, path = %path.display(), "download finished");
                }
                Err(e) => {
                    warn!(download_id = %id, error = %e, "download failed");
                }
            }
            let _ = reports.send(DownloadReport::Finished {
                id,
                model: key,
                bytes_done: p.bytes_done,
                bytes_total: p.bytes_total,
                result,
            });
        });
        (dl, Some(reports_rx))
    }
}
