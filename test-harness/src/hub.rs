//! A local stand-in for the Hugging Face hub, in its URL layout, so the real download code
//! runs in tests without the network.
//!
//! - `HEAD|GET /{org}/{repo}/resolve/{rev}/{file}`: with [`HubDouble::redirect`] on (the
//!   default, like the real hub for LFS files) a 302 to `/cdn/{org}/{repo}/{file}` carrying
//!   `X-Linked-Size`, `X-Linked-Etag` (quoted SHA-256), `ETag` and `X-Repo-Commit`; off, the
//!   same headers on a 200 (HEAD) or the bytes (GET).
//! - `GET /cdn/{org}/{repo}/{file}`: the bytes; `Range: bytes=N-` (or `N-M`) → 206 with
//!   `Content-Range`, past the end → 416.
//! - `GET /api/models/{org}/{repo}/revision/{rev}`: `{"id", "sha", "siblings": [{"rfilename"}]}`.
//!
//! Unknown repos and files are 404. Any revision is accepted. Fault knobs apply at once.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

/// The commit every file claims to be at.
pub const HUB_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// Body chunk size, so a cut lands mid-stream.
const CHUNK: usize = 64 * 1024;

/// One file the double serves.
#[derive(Debug, Clone)]
pub struct HubFile {
    /// `org/name`.
    pub repo: String,
    /// Path inside the repo, e.g. `model.Q4_0.gguf`.
    pub path: String,
    pub bytes: Vec<u8>,
}

impl HubFile {
    pub fn new(repo: &str, path: &str, bytes: Vec<u8>) -> HubFile {
        HubFile {
            repo: repo.to_owned(),
            path: path.to_owned(),
            bytes,
        }
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Stored {
    bytes: Bytes,
    sha256: String,
}

#[derive(Default)]
struct Knobs {
    cut_after: Option<usize>,
    wrong_checksum: bool,
    require_token: Option<String>,
    forbid: bool,
    no_redirect: bool,
    ignore_range: bool,
    advertise_size: Option<u64>,
    fail_next: usize,
}

struct Shared {
    /// repo → path → file.
    repos: BTreeMap<String, BTreeMap<String, Stored>>,
    knobs: Mutex<Knobs>,
    gets: AtomicUsize,
    heads: AtomicUsize,
    ranges: Mutex<Vec<Option<String>>>,
    authorizations: Mutex<Vec<Option<String>>>,
}

impl Shared {
    fn knobs(&self) -> std::sync::MutexGuard<'_, Knobs> {
        self.knobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running hub double on `127.0.0.1:<ephemeral>`; stops when dropped.
pub struct HubDouble {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HubDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HubDouble {
    /// Starts serving `files` (needs a tokio runtime).
    pub async fn start(files: Vec<HubFile>) -> anyhow::Result<HubDouble> {
        let mut repos: BTreeMap<String, BTreeMap<String, Stored>> = BTreeMap::new();
        for f in files {
            anyhow::ensure!(
                f.repo.split('/').count() == 2,
                "repo `{}` must be org/name",
                f.repo
            );
            let sha256 = sha256_hex(&f.bytes);
            repos.entry(f.repo).or_default().insert(
                f.path,
                Stored {
                    bytes: Bytes::from(f.bytes),
                    sha256,
                },
            );
        }
        let shared = Arc::new(Shared {
            repos,
            knobs: Mutex::new(Knobs::default()),
            gets: AtomicUsize::new(0),
            heads: AtomicUsize::new(0),
            ranges: Mutex::new(Vec::new()),
            authorizations: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/api/models/{org}/{repo}/revision/{rev}", get(listing))
            .route("/{org}/{repo}/resolve/{rev}/{*file}", get(resolve))
            .route("/cdn/{org}/{repo}/{*file}", get(cdn))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(HubDouble { addr, shared, task })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next GET of file bytes sends `bytes` bytes, then drops the connection.
    pub fn cut_after(&self, bytes: usize) {
        self.shared.knobs().cut_after = Some(bytes);
    }

    /// Advertise a wrong SHA-256 in `X-Linked-Etag` / `ETag`.
    pub fn wrong_checksum(&self, on: bool) {
        self.shared.knobs().wrong_checksum = on;
    }

    /// Without `Authorization: Bearer <token>`, resolve and api requests get 401.
    pub fn require_token(&self, token: Option<&str>) {
        self.shared.knobs().require_token = token.map(str::to_owned);
    }

    /// Resolve and api requests get 403 (a gated repo).
    pub fn forbid(&self, on: bool) {
        self.shared.knobs().forbid = on;
    }

    /// Whether resolve answers with a 302 to `/cdn/...` (on by default, like the real hub).
    pub fn redirect(&self, on: bool) {
        self.shared.knobs().no_redirect = !on;
    }

    /// Answer 200 with the whole file even to Range requests.
    pub fn ignore_range(&self, on: bool) {
        self.shared.knobs().ignore_range = on;
    }

    /// Advertise this size in `X-Linked-Size` instead of the real one.
    pub fn advertise_size(&self, size: Option<u64>) {
        self.shared.knobs().advertise_size = size;
    }

    /// The next `n` GETs of file bytes answer 503.
    pub fn fail_next(&self, n: usize) {
        self.shared.knobs().fail_next = n;
    }

    /// GETs of file bytes so far (including ones answered with a fault).
    pub fn gets(&self) -> usize {
        self.shared.gets.load(Ordering::SeqCst)
    }

    /// HEADs of resolve URLs so far.
    pub fn heads(&self) -> usize {
        self.shared.heads.load(Ordering::SeqCst)
    }

    /// The `Range` header of every GET of file bytes, in order.
    pub fn ranges(&self) -> Vec<Option<String>> {
        self.shared
            .ranges
            .lock()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The `Authorization` header of every resolve/api request, in order.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.shared
            .authorizations
            .lock()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        [("x-error-code", "EntryNotFound")],
        format!("{what} not found"),
    )
        .into_response()
}

/// 401/403 per the knobs; records the Authorization header.
fn check_auth(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let auth = text(headers, header::AUTHORIZATION);
    if let Ok(mut a) = shared.authorizations.lock() {
        a.push(auth.clone());
    }
    let knobs = shared.knobs();
    if knobs.forbid {
        return Some((StatusCode::FORBIDDEN, "access to this repo is restricted").into_response());
    }
    if let Some(token) = &knobs.require_token
        && auth.as_deref() != Some(&format!("Bearer {token}"))
    {
        return Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "invalid credentials",
            )
                .into_response(),
        );
    }
    None
}

async fn listing(
    State(shared): State<Arc<Shared>>,
    Path((org, repo, _rev)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = check_auth(&shared, &headers) {
        return denied;
    }
    let id = format!("{org}/{repo}");
    let Some(files) = shared.repos.get(&id) else {
        return not_found(&id);
    };
    let siblings: Vec<_> = files
        .keys()
        .map(|p| serde_json::json!({ "rfilename": p }))
        .collect();
    axum::Json(serde_json::json!({ "id": id, "sha": HUB_COMMIT, "siblings": siblings }))
        .into_response()
}

async fn resolve(
    State(shared): State<Arc<Shared>>,
    Path((org, repo, _rev, file)): Path<(String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = check_auth(&shared, &headers) {
        return denied;
    }
    let id = format!("{org}/{repo}");
    let Some(stored) = shared.repos.get(&id).and_then(|r| r.get(&file)) else {
        return not_found(&format!("{id} {file}"));
    };
    let (redirect, sha, size) = {
        let k = shared.knobs();
        let sha = if k.wrong_checksum {
            sha256_hex(b"not the file")
        } else {
            stored.sha256.clone()
        };
        (
            !k.no_redirect,
            sha,
            k.advertise_size.unwrap_or(stored.bytes.len() as u64),
        )
    };
    let etag = format!("\"{sha}\"");
    let meta = [
        ("x-linked-size", size.to_string()),
        ("x-linked-etag", etag.clone()),
        ("etag", etag),
        ("x-repo-commit", HUB_COMMIT.to_owned()),
    ];
    if method == Method::HEAD {
        shared.heads.fetch_add(1, Ordering::SeqCst);
    }
    if redirect {
        let location = format!("/cdn/{org}/{repo}/{file}");
        return (StatusCode::FOUND, [(header::LOCATION, location)], meta, "").into_response();
    }
    if method == Method::HEAD {
        return (
            StatusCode::OK,
            [(header::CONTENT_LENGTH, size.to_string())],
            meta,
        )
            .into_response();
    }
    serve(&shared, &stored.bytes, &headers)
}

async fn cdn(
    State(shared): State<Arc<Shared>>,
    Path((org, repo, file)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    match shared
        .repos
        .get(&format!("{org}/{repo}"))
        .and_then(|r| r.get(&file))
    {
        Some(stored) => serve(&shared, &stored.bytes, &headers),
        None => not_found(&file),
    }
}

/// The bytes, honouring Range and the fault knobs.
fn serve(shared: &Shared, bytes: &Bytes, headers: &HeaderMap) -> Response {
    shared.gets.fetch_add(1, Ordering::SeqCst);
    let range = text(headers, header::RANGE);
    if let Ok(mut r) = shared.ranges.lock() {
        r.push(range.clone());
    }
    let (cut, ignore_range) = {
        let mut k = shared.knobs();
        if k.fail_next > 0 {
            k.fail_next -= 1;
            return (StatusCode::SERVICE_UNAVAILABLE, "try again later").into_response();
        }
        (k.cut_after.take(), k.ignore_range)
    };
    let len = bytes.len();
    let (status, start, end) = match range.as_deref().filter(|_| !ignore_range) {
        None => (StatusCode::OK, 0, len),
        Some(r) => match parse_range(r, len) {
            Some((s, e)) if s < len => (StatusCode::PARTIAL_CONTENT, s, e),
            _ => {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{len}"))],
                )
                    .into_response();
            }
        },
    };
    let body = bytes.slice(start..end);
    let send = cut.map_or(body.len(), |c| c.min(body.len()));
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..send)
        .step_by(CHUNK)
        .map(|i| Ok(body.slice(i..(i + CHUNK).min(send))))
        .collect();
    let stream = futures_util::stream::iter(chunks);
    let body_stream = match cut {
        None => stream.boxed(),
        // Pause before failing so every byte sent so far is flushed: the client then holds
        // exactly `cut` bytes when the connection drops.
        Some(_) => stream
            .chain(futures_util::stream::once(async {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                Err(std::io::Error::other("connection cut by the hub double"))
            }))
            .boxed(),
    };
    let mut resp = Response::new(Body::from_stream(body_stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, body.len().into());
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = format!("bytes {start}-{}/{len}", end - 1).parse()
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

/// `bytes=N-` or `bytes=N-M` → [N, end).
fn parse_range(r: &str, len: usize) -> Option<(usize, usize)> {
    let (s, e) = r.trim().strip_prefix("bytes=")?.split_once('-')?;
    let start: usize = s.trim().parse().ok()?;
    let end = match e.trim() {
        "" => len,
        e => e.parse::<usize>().ok()?.saturating_add(1).min(len),
    };
    (start < end).then_some((start, end))
}
