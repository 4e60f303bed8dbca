//! A client for a Hugging Face-style hub (huggingface.co's URL layout).
//!
//! - file: `GET {endpoint}/{org}/{repo}/resolve/{revision}/{file}` (redirects followed);
//! - metadata: `HEAD` on that URL without following redirects, reading `X-Linked-Size` /
//!   `Content-Length`, `X-Linked-Etag` / `ETag` and `X-Repo-Commit`;
//! - listing: `GET {endpoint}/api/models/{org}/{repo}/revision/{revision}` → `siblings`.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Response, StatusCode};
use serde::Deserialize;

use crate::reference::validate_file;
use crate::{HfRef, ModelError};

/// huggingface.co.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Retries after the first try of each request (and of each download without progress).
pub const DEFAULT_RETRIES: u32 = 5;
/// First backoff delay; doubled per retry, jittered, capped at [`DEFAULT_BACKOFF_CAP`].
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest backoff delay.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// TCP/TLS connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for any read (headers or the next body chunk).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The hub token from `HF_TOKEN` (else `HUGGING_FACE_HUB_TOKEN`), if set and non-empty.
pub fn token_from_env() -> Option<String> {
    ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .map(|t| t.trim().to_owned())
        .find(|t| !t.is_empty())
}

/// Talks to the hub. Cheap to clone. `Debug` never shows the token.
#[derive(Clone)]
pub struct HubClient {
    endpoint: String,
    auth: Option<HeaderValue>,
    http: reqwest::Client,
    head_http: reqwest::Client,
    pub(crate) retries: u32,
    backoff_base: Duration,
    backoff_cap: Duration,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("endpoint", &self.endpoint)
            .field("token", &self.auth.as_ref().map(|_| "<set>"))
            .field("retries", &self.retries)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_cap", &self.backoff_cap)
            .finish()
    }
}

/// What a HEAD on a hub file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// `X-Linked-Size`, else `Content-Length` of a 2xx.
    pub size: Option<u64>,
    /// The etag (`X-Linked-Etag`, else `ETag`), unquoted.
    pub etag: Option<String>,
    /// The etag when it is a SHA-256 (64 hex digits, lower-cased): LFS files.
    pub sha256: Option<String>,
    /// `X-Repo-Commit`.
    pub commit: Option<String>,
}

/// One failed try: whether another may succeed, and what happened.
#[derive(Debug)]
pub(crate) enum Failure {
    Retry(String),
    Fatal(ModelError),
}

#[derive(Deserialize)]
struct RepoInfo {
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

impl HubClient {
    /// A client for `endpoint` (e.g. [`DEFAULT_ENDPOINT`]), sending `Authorization: Bearer
    /// <token>` when a token is given, with the default retries, backoff and timeouts.
    pub fn new(endpoint: &str, token: Option<String>) -> Result<HubClient, ModelError> {
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&endpoint)
            .map_err(|e| ModelError::InvalidConfig(format!("hub endpoint `{endpoint}`: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ModelError::InvalidConfig(format!(
                "hub endpoint `{endpoint}` must be http(s)"
            )));
        }
        let auth = match token.filter(|t| !t.is_empty()) {
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    ModelError::InvalidConfig("the hub token has invalid characters".into())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let (http, head_http) = build_clients(DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT)?;
        Ok(HubClient {
            endpoint,
            auth,
            http,
            head_http,
            retries: DEFAULT_RETRIES,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_cap: DEFAULT_BACKOFF_CAP,
        })
    }

    /// Sets the number of retries after a first failed try.
    pub fn with_retries(mut self, retries: u32) -> HubClient {
        self.retries = retries;
        self
    }

    /// Sets the backoff: `base × 2^(retry−1)`, capped at `cap`, then jittered to 50–100 %.
    pub fn with_backoff(mut self, base: Duration, cap: Duration) -> HubClient {
        self.backoff_base = base;
        self.backoff_cap = cap.max(base);
        self
    }

    /// Sets the connect timeout and the per-read timeout.
    pub fn with_timeouts(
        mut self,
        connect: Duration,
        read: Duration,
    ) -> Result<HubClient, ModelError> {
        (self.http, self.head_http) = build_clients(connect, read)?;
        Ok(self)
    }

    /// The endpoint, without a trailing `/`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `{endpoint}/{org}/{repo}/resolve/{revision}/{file}`.
    pub fn file_url(&self, r: &HfRef, file: &str) -> String {
        format!(
            "{}/{}/{}/resolve/{}/{}",
            self.endpoint, r.org, r.name, r.revision, file
        )
    }

    /// Metadata of `file` in the repo (HEAD, no redirects followed, retried).
    pub async fn file_info(&self, r: &HfRef, file: &str) -> Result<RemoteFile, ModelError> {
        let url = self.file_url(r, file);
        let what = format!("{} {file}", r.repo());
        self.retrying(|| async {
            let resp = self
                .authorized(self.head_http.head(&url))
                .send()
                .await
                .map_err(|e| classify_transport(&e))?;
            let status = resp.status();
            if !(status.is_success() || status.is_redirection()) {
                return Err(classify_status(status, &what));
            }
            Ok(remote_file(resp.headers(), status))
        })
        .await
    }

    /// Every file in the repo at its revision (retried).
    pub async fn list_files(&self, r: &HfRef) -> Result<Vec<String>, ModelError> {
        let url = format!(
            "{}/api/models/{}/{}/revision/{}",
            self.endpoint, r.org, r.name, r.revision
        );
        let what = r.repo();
        self.retrying(|| async {
            let resp = self
                .authorized(self.http.get(&url))
                .send()
                .await
                .map_err(|e| classify_transport(&e))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(classify_status(status, &what));
            }
            let info: RepoInfo = resp.json().await.map_err(|e| {
                if e.is_decode() {
                    Failure::Fatal(ModelError::HubUnavailable(format!(
                        "the hub's file listing for {what} is not valid JSON: {e}"
                    )))
                } else {
                    classify_transport(&e)
                }
            })?;
            Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
        })
        .await
    }

    /// The one `.gguf` in the repo (files with names we would not accept are ignored).
    pub async fn pick_gguf(&self, r: &HfRef) -> Result<String, ModelError> {
        let mut ggufs: Vec<String> = self
            .list_files(r)
            .await?
            .into_iter()
            .filter(|f| f.to_ascii_lowercase().ends_with(".gguf") && validate_file(f).is_ok())
            .collect();
        ggufs.sort();
        match ggufs.len() {
            1 => Ok(ggufs.remove(0)),
            0 => Err(ModelError::ModelNotFound(format!(
                "model not found on the hub: {} has no .gguf file",
                r.repo()
            ))),
            _ => Err(ModelError::AmbiguousModelFile {
                repo: r.repo(),
                candidates: ggufs,
            }),
        }
    }

    /// Starts a GET of `url` (redirects followed), from byte `offset` when > 0.
    pub(crate) async fn get_from(
        &self,
        url: &str,
        offset: u64,
        what: &str,
    ) -> Result<Response, Failure> {
        let mut req = self.authorized(self.http.get(url));
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let resp = req.send().await.map_err(|e| classify_transport(&e))?;
        let status = resp.status();
        if status.is_success() || status == StatusCode::RANGE_NOT_SATISFIABLE {
            Ok(resp)
        } else {
            Err(classify_status(status, what))
        }
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some(v) => req.header(AUTHORIZATION, v.clone()),
            None => req,
        }
    }

    /// Delay before retry number `retry` (1-based).
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)));
        let delay = exp.min(self.backoff_cap);
        // Jitter to 50–100 % so clients that failed together do not retry together.
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let frac = 0.5 + (r % 1000) as f64 / 2000.0;
        delay.mul_f64(frac)
    }

    async fn retrying<T, F, Fut>(&self, mut f: F) -> Result<T, ModelError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut retry = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(msg)) => {
                    retry += 1;
                    if retry > self.retries {
                        return Err(ModelError::HubUnavailable(format!(
                            "gave up after {} tries: {msg}",
                            retry
                        )));
                    }
                    tracing::warn!(retry, error = %msg, "hub request failed, retrying");
                    tokio::time::sleep(self.backoff(retry)).await;
                }
            }
        }
    }
}

fn build_clients(
    connect: Duration,
    read: Duration,
) -> Result<(reqwest::Client, reqwest::Client), ModelError> {
    let base = || {
        reqwest::Client::builder()
            .user_agent(concat!("rbee/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(connect)
            .read_timeout(read)
    };
    let build_err = |e: reqwest::Error| ModelError::InvalidConfig(format!("HTTP client: {e}"));
    let http = base().build().map_err(build_err)?;
    let head = base()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(build_err)?;
    Ok((http, head))
}

/// Transport errors (connect, timeout, a body cut short) are worth retrying.
pub(crate) fn classify_transport(e: &reqwest::Error) -> Failure {
    // Without the URL: it is ours anyway, and keeps messages short.
    let msg = error_chain(e);
    if e.is_builder() || e.is_redirect() {
        Failure::Fatal(ModelError::HubUnavailable(msg))
    } else {
        Failure::Retry(msg)
    }
}

fn error_chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// 404 → not found, 401/403 → unauthorized, 408/429/5xx → retry, others fatal.
pub(crate) fn classify_status(status: StatusCode, what: &str) -> Failure {
    match status.as_u16() {
        404 => Failure::Fatal(ModelError::ModelNotFound(format!(
            "model not found on the hub: {what}"
        ))),
        401 | 403 => Failure::Fatal(ModelError::HubUnauthorized {
            what: what.to_owned(),
            status: status.as_u16(),
        }),
        408 | 429 | 500..=599 => Failure::Retry(format!("the hub answered HTTP {status}")),
        _ => Failure::Fatal(ModelError::HubUnavailable(format!(
            "the hub answered HTTP {status} for {what}"
        ))),
    }
}

fn remote_file(h: &HeaderMap, status: StatusCode) -> RemoteFile {
    let text = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let size = text("x-linked-size")
        .and_then(|v| v.parse().ok())
        .or_else(|| {
            // A redirect's Content-Length is that of the redirect body, not the file.
            status
                .is_success()
                .then(|| text("content-length").and_then(|v| v.parse().ok()))
                .flatten()
        });
    let etag = text("x-linked-etag")
        .or_else(|| text("etag"))
        .map(|v| v.trim_start_matches("W/").trim_matches('"').to_owned());
    let sha256 = etag
        .as_deref()
        .filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_ascii_lowercase);
    RemoteFile {
        size,
        etag,
        sha256,
        commit: text("x-repo-commit").map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let c = HubClient::new("http://127.0.0.1:1", None)
            .unwrap()
            .with_backoff(Duration::from_millis(100), Duration::from_millis(1000));
        for (retry, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (30, 1000),
        ] {
            let d = c.backoff(retry).as_millis();
            assert!(d >= full / 2 && d <= full, "retry {retry}: {d} ms");
        }
    }

    #[test]
    fn metadata_comes_from_linked_headers_and_never_a_redirect_length() {
        let mut h = HeaderMap::new();
        let sha = "AB".repeat(32);
        h.insert("content-length", HeaderValue::from_static("0"));
        h.insert(
            "etag",
            HeaderValue::from_str(&format!("W/\"{sha}\"")).unwrap(),
        );
        h.insert("x-repo-commit", HeaderValue::from_static("abc"));
        let r = remote_file(&h, StatusCode::FOUND);
        assert_eq!(r.size, None);
        assert_eq!(r.sha256.as_deref(), Some("ab".repeat(32).as_str()));
        assert_eq!(r.commit.as_deref(), Some("abc"));
        let r = remote_file(&h, StatusCode::OK);
        assert_eq!(r.size, Some(0));
        h.insert("x-linked-size", HeaderValue::from_static("12345"));
        h.insert("x-linked-etag", HeaderValue::from_static("\"not-a-sha\""));
        let r = remote_file(&h, StatusCode::FOUND);
        assert_eq!(r.size, Some(12345));
        assert_eq!(r.etag.as_deref(), Some("not-a-sha"));
        assert_eq!(r.sha256, None);
    }
}
