//! Resumable, verified downloads from the hub into the catalog's first directory.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::catalog::part_path;
use crate::hub::{Failure, RemoteFile, classify_transport};
use crate::{Catalog, HubClient, ModelError, ModelRef};

/// Least time between two progress updates while bytes flow.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Where a download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DownloadState {
    /// Listing the repo / reading the file's metadata.
    #[default]
    Resolving,
    /// Bytes are flowing (or waiting to retry).
    Downloading,
    /// Hashing and checking the result.
    Verifying,
    /// The file is in place: see `path`.
    Done,
    /// See `error`.
    Failed,
}

/// An error as it appears in [`DownloadProgress`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgressError {
    /// [`ModelError::code`].
    pub code: rbee_api::ErrorCode,
    /// The error's message.
    pub message: String,
}

/// A download's current state, published through a `watch` channel (a late subscriber sees
/// the latest value). Updated on every state change and at most every 100 ms while bytes flow.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct DownloadProgress {
    /// The phase.
    pub state: DownloadState,
    /// The reference being downloaded, as given.
    pub reference: String,
    /// The file in the repo, once known.
    pub file: Option<String>,
    /// Bytes on disk so far (including a resumed `.part`).
    pub bytes_done: u64,
    /// File size, when the hub said.
    pub bytes_total: Option<u64>,
    /// 1-based number of the current GET (0 before the first).
    pub attempt: u32,
    /// Set when `state` is `failed`.
    pub error: Option<ProgressError>,
    /// The final path, when `done`.
    pub path: Option<PathBuf>,
}

/// Downloads a `hf:` reference into `<dir0>/<org>/<repo>/<file>` and returns that path.
///
/// Resolves the file (the repo's single `.gguf` when the reference names none), HEADs it for
/// size and SHA-256, returns at once if the final file is already there with that size (and
/// hash, when known), checks free disk space, then GETs into `<final>.part`, resuming with
/// `Range` after dropped connections, timeouts and 5xx (retries with backoff; the count
/// resets whenever an attempt made progress). The SHA-256 is checked against the hub's etag
/// when that is one; on success the file is fsynced and renamed into place.
///
/// `progress` ends in `done` or `failed`. Setting `cancel` to `true` stops the download with
/// [`ModelError::Cancelled`] and removes its `.part`; dropping the future instead keeps the
/// `.part` for a later resume. A second concurrent download of the same file fails with
/// [`ModelError::DownloadInProgress`] (advisory lock on the `.part`).
pub async fn download(
    client: &HubClient,
    catalog: &Catalog,
    reference: &ModelRef,
    progress: watch::Sender<DownloadProgress>,
    mut cancel: watch::Receiver<bool>,
) -> Result<PathBuf, ModelError> {
    progress.send_replace(DownloadProgress {
        reference: reference.to_string(),
        ..DownloadProgress::default()
    });
    let mut part: Option<PathBuf> = None;
    let result = if *cancel.borrow_and_update() {
        Err(ModelError::Cancelled)
    } else {
        let job = Job {
            client,
            catalog,
            progress: &progress,
        };
        tokio::select! {
            r = job.run(reference, &mut part) => r,
            () = cancelled(&mut cancel) => Err(ModelError::Cancelled),
        }
    };
    match &result {
        Ok(path) => {
            tracing::info!(reference = %reference, path = %path.display(), "model downloaded");
            progress.send_modify(|p| {
                p.state = DownloadState::Done;
                p.path = Some(path.clone());
                p.error = None;
            });
        }
        Err(e) => {
            if let (ModelError::Cancelled, Some(part)) = (e, &part) {
                let _ = tokio::fs::remove_file(part).await;
            }
            tracing::warn!(reference = %reference, code = %e.code(), error = %e, "model download failed");
            progress.send_modify(|p| {
                p.state = DownloadState::Failed;
                p.error = Some(ProgressError {
                    code: e.code(),
                    message: e.to_string(),
                });
            });
        }
    }
    result
}

/// Resolves when `cancel` becomes true; never if its sender goes away first.
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

struct Job<'a> {
    client: &'a HubClient,
    catalog: &'a Catalog,
    progress: &'a watch::Sender<DownloadProgress>,
}

/// The `.part` being written and the hash of what it holds.
struct Partial {
    file: tokio::fs::File,
    path: PathBuf,
    hasher: Sha256,
    have: u64,
}

impl Partial {
    async fn reset(&mut self) -> Result<(), ModelError> {
        self.truncate_to(0).await?;
        self.hasher = Sha256::new();
        Ok(())
    }

    /// Drops anything past `len` (bytes written but not hashed) and seeks there.
    async fn truncate_to(&mut self, len: u64) -> Result<(), ModelError> {
        let io = |e| ModelError::io("cannot truncate", &self.path, e);
        self.file.flush().await.map_err(io)?;
        self.file.set_len(len).await.map_err(io)?;
        self.file.seek(io::SeekFrom::Start(len)).await.map_err(io)?;
        self.have = len;
        Ok(())
    }
}

impl Job<'_> {
    fn update(&self, f: impl FnOnce(&mut DownloadProgress)) {
        self.progress.send_modify(f);
    }

    async fn run(
        &self,
        reference: &ModelRef,
        part_slot: &mut Option<PathBuf>,
    ) -> Result<PathBuf, ModelError> {
        let ModelRef::Hf(h) = reference else {
            return Err(ModelError::invalid_ref(
                &reference.to_string(),
                "only hf: references can be downloaded",
            ));
        };
        let file = match &h.file {
            Some(f) => f.clone(),
            None => self.client.pick_gguf(h).await?,
        };
        self.update(|p| p.file = Some(file.clone()));
        let remote = self.client.file_info(h, &file).await?;
        let final_path = self.catalog.hub_path(&h.repo(), &file)?;
        self.update(|p| p.bytes_total = remote.size);

        if self.already_there(&final_path, &remote).await? {
            self.update(|p| p.bytes_done = remote.size.unwrap_or(p.bytes_done));
            return Ok(final_path);
        }

        let dir = final_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.catalog.dirs()[0].clone());
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| ModelError::io("cannot create", &dir, e))?;
        let part_path = part_path(&final_path);
        let mut part_len = match tokio::fs::metadata(&part_path).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(ModelError::io("cannot inspect", &part_path, e)),
        };
        if let Some(total) = remote.size {
            let needed = total.saturating_sub(part_len);
            let available = self
                .catalog
                .free_bytes(&dir)
                .map_err(|e| ModelError::io("cannot read free space of", &dir, e))?;
            if needed > available {
                return Err(ModelError::InsufficientDisk {
                    dir,
                    needed,
                    available,
                });
            }
        }

        let file_handle = open_locked(&part_path, &final_path).await?;
        *part_slot = Some(part_path.clone());
        let mut partial = Partial {
            file: file_handle,
            path: part_path.clone(),
            hasher: Sha256::new(),
            have: 0,
        };
        if remote.size.is_some_and(|total| part_len > total) {
            partial.reset().await?;
            part_len = 0;
        }
        if part_len > 0 {
            tracing::info!(bytes = part_len, path = %part_path.display(), "resuming a partial download");
            let (hasher, len) = hash_file(&part_path, part_len).await?;
            partial.hasher = hasher;
            partial.truncate_to(len).await?;
        }
        self.update(|p| {
            p.state = DownloadState::Downloading;
            p.bytes_done = partial.have;
        });

        let url = self.client.file_url(h, &file);
        let what = format!("{} {file}", h.repo());
        self.transfer(&url, &what, remote.size, &mut partial)
            .await?;

        self.update(|p| p.state = DownloadState::Verifying);
        let io_err = |e| ModelError::io("cannot write", &part_path, e);
        partial.file.flush().await.map_err(io_err)?;
        partial.file.sync_all().await.map_err(io_err)?;
        let got = hex(&partial.hasher.finalize_reset());
        if let Some(expected) = &remote.sha256
            && *expected != got
        {
            drop(partial);
            let _ = tokio::fs::remove_file(&part_path).await;
            return Err(ModelError::ChecksumMismatch {
                file: what,
                expected: expected.clone(),
                got,
            });
        }
        tokio::fs::rename(&part_path, &final_path)
            .await
            .map_err(|e| ModelError::io("cannot rename into place", &final_path, e))?;
        drop(partial);
        if let Ok(d) = tokio::fs::File::open(&dir).await {
            let _ = d.sync_all().await;
        }
        Ok(final_path)
    }

    /// Whether the final file exists with the advertised size and (when known) hash.
    async fn already_there(&self, path: &Path, remote: &RemoteFile) -> Result<bool, ModelError> {
        let Ok(meta) = tokio::fs::metadata(path).await else {
            return Ok(false);
        };
        if !meta.is_file() || remote.size.is_some_and(|s| s != meta.len()) {
            return Ok(false);
        }
        match &remote.sha256 {
            Some(expected) => {
                self.update(|p| p.state = DownloadState::Verifying);
                let (hasher, _) = hash_file(path, meta.len()).await?;
                let ok = hex(&hasher.finalize()) == *expected;
                if !ok {
                    tracing::warn!(path = %path.display(), "existing model has the wrong checksum, downloading again");
                }
                Ok(ok)
            }
            None => Ok(remote.size.is_some()),
        }
    }

    /// GETs until the `.part` holds the whole file, retrying and resuming.
    async fn transfer(
        &self,
        url: &str,
        what: &str,
        size: Option<u64>,
        partial: &mut Partial,
    ) -> Result<(), ModelError> {
        let mut failures = 0u32;
        let mut attempt = 0u32;
        loop {
            if size.is_some_and(|total| partial.have == total) {
                return Ok(());
            }
            attempt += 1;
            self.update(|p| {
                p.attempt = attempt;
                p.state = DownloadState::Downloading;
            });
            let before = partial.have;
            match self.get_once(url, what, size, partial).await {
                Ok(()) => return Ok(()),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(msg)) => {
                    if partial.have > before {
                        failures = 0;
                    }
                    failures += 1;
                    let have = partial.have;
                    partial.truncate_to(have).await?;
                    if failures > self.client.retries {
                        return Err(ModelError::HubUnavailable(format!(
                            "gave up on {what} after {attempt} attempts: {msg}"
                        )));
                    }
                    let delay = self.client.backoff(failures);
                    tracing::warn!(attempt, bytes_done = have, error = %msg, ?delay, "download interrupted, retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One GET from `partial.have`, appending what arrives.
    async fn get_once(
        &self,
        url: &str,
        what: &str,
        size: Option<u64>,
        partial: &mut Partial,
    ) -> Result<(), Failure> {
        let resp = self.client.get_from(url, partial.have, what).await?;
        let fatal = Failure::Fatal;
        let mut total = size;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let range = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range);
                match range {
                    Some((start, len)) if start == partial.have => {
                        total = total.or(len);
                    }
                    _ => {
                        partial.reset().await.map_err(fatal)?;
                        return Err(Failure::Retry(
                            "the hub resumed at an unexpected offset; restarting".into(),
                        ));
                    }
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                partial.reset().await.map_err(fatal)?;
                return Err(Failure::Retry(
                    "the hub refused to resume (416); restarting".into(),
                ));
            }
            _ => {
                if partial.have > 0 {
                    tracing::info!("the hub ignored the Range request; restarting from 0");
                    partial.reset().await.map_err(fatal)?;
                    self.update(|p| p.bytes_done = 0);
                }
                total = total.or(resp.content_length());
            }
        }
        if size.is_none() && total.is_some() {
            self.update(|p| p.bytes_total = total);
        }
        let mut stream = resp.bytes_stream();
        let mut last = Instant::now();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| classify_transport(&e))?;
            if total.is_some_and(|t| partial.have + chunk.len() as u64 > t) {
                partial.reset().await.map_err(fatal)?;
                return Err(Failure::Fatal(ModelError::HubUnavailable(format!(
                    "the hub sent more bytes than the advertised size of {what}"
                ))));
            }
            partial
                .file
                .write_all(&chunk)
                .await
                .map_err(|e| Failure::Fatal(ModelError::io("cannot write", &partial.path, e)))?;
            partial.hasher.update(&chunk);
            partial.have += chunk.len() as u64;
            if last.elapsed() >= PROGRESS_EVERY {
                last = Instant::now();
                let have = partial.have;
                self.update(|p| p.bytes_done = have);
            }
        }
        let have = partial.have;
        self.update(|p| p.bytes_done = have);
        match total {
            Some(t) if have < t => Err(Failure::Retry(format!(
                "the connection closed after {have} of {t} bytes"
            ))),
            _ => Ok(()),
        }
    }
}

/// Opens (creating) the `.part` without truncating it and takes an exclusive advisory lock.
async fn open_locked(part: &Path, final_path: &Path) -> Result<tokio::fs::File, ModelError> {
    use std::os::fd::AsRawFd;
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(part)
        .await
        .map_err(|e| ModelError::io("cannot open", part, e))?;
    // SAFETY: flock on a descriptor we own and keep open; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(ModelError::DownloadInProgress {
                path: final_path.to_path_buf(),
            });
        }
        return Err(ModelError::io("cannot lock", part, err));
    }
    Ok(file)
}

/// SHA-256 of the first `limit` bytes of `path` (fewer if the file is shorter), off the
/// async runtime. Returns the hasher and the bytes hashed.
async fn hash_file(path: &Path, limit: u64) -> Result<(Sha256, u64), ModelError> {
    let owned = path.to_path_buf();
    let res = tokio::task::spawn_blocking(move || -> io::Result<(Sha256, u64)> {
        let mut f = std::fs::File::open(&owned)?.take(limit);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let r = f.read(&mut buf)?;
            if r == 0 {
                return Ok((hasher, n));
            }
            hasher.update(&buf[..r]);
            n += r as u64;
        }
    })
    .await
    .map_err(|e| ModelError::io("cannot hash", path, io::Error::other(e.to_string())))?;
    res.map_err(|e| ModelError::io("cannot hash", path, e))
}

/// SHA-256 of a whole file as lowercase hex (off the async runtime), as the hub reports it
/// for LFS files; the hive reports it per model so usage records can name the exact file.
pub async fn file_sha256(path: &Path) -> Result<String, ModelError> {
    let (hasher, _) = hash_file(path, u64::MAX).await?;
    Ok(hex(&hasher.finalize()))
}

/// `bytes START-END/TOTAL` → (START, TOTAL unless `*`).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
