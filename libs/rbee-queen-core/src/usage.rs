//! The usage log: one JSON line per finished request, written by its own thread so serving
//! never waits on the disk.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::time::Duration;

use serde_json::Value;

enum Msg {
    Line(Value),
    Flush(std::sync::mpsc::Sender<()>),
    /// Open the path again (after logrotate moved the file away).
    Reopen,
}

pub struct UsageLog {
    tx: SyncSender<Msg>,
}

impl UsageLog {
    /// Opens (appends to) `path`, created with mode 0600.
    pub fn open(path: &Path) -> std::io::Result<UsageLog> {
        let mut file = open_append(path)?;
        let path = path.to_path_buf();
        let (tx, rx) = sync_channel::<Msg>(8192);
        std::thread::Builder::new()
            .name("usage-writer".into())
            .spawn(move || {
                for msg in rx {
                    match msg {
                        Msg::Line(v) => {
                            let line = format!("{v}\n");
                            if let Err(e) = file.write_all(line.as_bytes()) {
                                tracing::error!(error = %e, "usage log write failed");
                            }
                        }
                        Msg::Flush(done) => {
                            let _ = file.sync_data();
                            let _ = done.send(());
                        }
                        Msg::Reopen => {
                            let _ = file.sync_data();
                            match open_append(&path) {
                                Ok(f) => file = f,
                                Err(e) => {
                                    tracing::error!(error = %e, path = %path.display(), "usage log reopen failed; still writing the old file")
                                }
                            }
                        }
                    }
                }
            })?;
        Ok(UsageLog { tx })
    }

    pub fn write(&self, record: Value) {
        if self.tx.try_send(Msg::Line(record)).is_err() {
            tracing::warn!("usage log queue full; record dropped");
        }
    }

    /// Writes the lines queued so far, then continues in a file opened again at the path.
    pub fn reopen(&self) {
        let _ = self.tx.send(Msg::Reopen);
    }

    pub fn flush(&self, timeout: Duration) {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(timeout);
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}
