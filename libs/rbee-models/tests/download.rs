//! Downloads against the local hub double (`rbee_test_harness::hub`); no real network.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rbee_models::{
    Catalog, DownloadProgress, DownloadState, HubClient, ModelError, ModelRef, download,
};
use rbee_test_harness::hub::{HubDouble, HubFile, sha256_hex};
use rbee_test_harness::temp_dir;
use tokio::sync::watch;

const REPO: &str = "TestOrg/Tiny-GGUF";
const FILE: &str = "tiny.Q4_0.gguf";
const LEN: usize = 3 * 1024 * 1024 + 123;

/// Deterministic pseudo-random bytes (xorshift64).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct Setup {
    hub: HubDouble,
    catalog: Catalog,
    dir: PathBuf,
    bytes: Vec<u8>,
}

impl Setup {
    async fn new(tag: &str) -> Setup {
        let bytes = random_bytes(LEN, 42);
        let hub = HubDouble::start(vec![
            HubFile::new(REPO, FILE, bytes.clone()),
            HubFile::new(REPO, "README.md", b"# tiny".to_vec()),
            HubFile::new("TestOrg/Two-GGUF", "a.Q4_0.gguf", vec![1; 10]),
            HubFile::new("TestOrg/Two-GGUF", "b.Q8_0.gguf", vec![2; 10]),
        ])
        .await
        .unwrap();
        let dir = temp_dir(tag).join("models");
        let catalog = Catalog::new(vec![dir.clone()]).unwrap();
        Setup {
            hub,
            catalog,
            dir,
            bytes,
        }
    }

    fn client(&self) -> HubClient {
        HubClient::new(&self.hub.endpoint(), None)
            .unwrap()
            .with_backoff(Duration::from_millis(1), Duration::from_millis(5))
    }

    fn final_path(&self) -> PathBuf {
        self.dir.join(REPO).join(FILE)
    }

    fn part_path(&self) -> PathBuf {
        rbee_models::part_path(&self.final_path())
    }

    async fn get(
        &self,
        client: &HubClient,
        reference: &str,
    ) -> (Result<PathBuf, ModelError>, DownloadProgress) {
        let (tx, rx) = watch::channel(DownloadProgress::default());
        let (_cancel_tx, cancel_rx) = watch::channel(false);
        let r: ModelRef = reference.parse().unwrap();
        let res = download(client, &self.catalog, &r, tx, cancel_rx).await;
        let last = rx.borrow().clone();
        (res, last)
    }
}

fn file_sha(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).unwrap())
}

#[tokio::test]
async fn happy_path_follows_the_redirect_and_reports_done() {
    let s = Setup::new("dl-happy").await;
    let reference = format!("hf:{REPO}:{FILE}");
    let (res, p) = s.get(&s.client(), &reference).await;
    let path = res.unwrap();
    assert_eq!(path, s.final_path());
    assert_eq!(std::fs::read(&path).unwrap(), s.bytes);
    assert!(!s.part_path().exists());
    assert_eq!(
        p,
        DownloadProgress {
            state: DownloadState::Done,
            reference: reference.clone(),
            file: Some(FILE.into()),
            bytes_done: LEN as u64,
            bytes_total: Some(LEN as u64),
            attempt: 1,
            error: None,
            path: Some(path.clone()),
        }
    );
    assert_eq!(s.hub.heads(), 1);
    assert_eq!(s.hub.gets(), 1);
    assert_eq!(s.hub.ranges(), vec![None]);
    // The catalog sees it under its hub reference.
    let listed = s.catalog.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "TestOrg--Tiny-GGUF--tiny.Q4_0.gguf");
    assert_eq!(listed[0].reference, reference);
    assert_eq!(listed[0].bytes, LEN as u64);
    assert_eq!(
        s.catalog
            .resolve(&reference.parse().unwrap())
            .unwrap()
            .file_name()
            .unwrap(),
        FILE
    );

    // A second download finds the file in place and fetches nothing.
    let (res, p) = s.get(&s.client(), &reference).await;
    assert_eq!(res.unwrap(), path);
    assert_eq!(p.state, DownloadState::Done);
    assert_eq!(p.bytes_done, LEN as u64);
    assert_eq!(p.attempt, 0);
    assert_eq!(s.hub.gets(), 1);
    // Progress serialises for the hive's SSE stream.
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["state"], "done");
    assert_eq!(json["bytes_total"], LEN as u64);
}

#[tokio::test]
async fn a_ref_without_file_picks_the_single_gguf_without_redirects() {
    let s = Setup::new("dl-pick").await;
    s.hub.redirect(false);
    let (res, p) = s.get(&s.client(), &format!("hf:{REPO}")).await;
    assert_eq!(res.unwrap(), s.final_path());
    assert_eq!(file_sha(&s.final_path()), sha256_hex(&s.bytes));
    assert_eq!(p.file.as_deref(), Some(FILE));
    assert_eq!(p.bytes_total, Some(LEN as u64));
    assert_eq!(s.hub.gets(), 1);
}

#[tokio::test]
async fn a_cut_connection_resumes_with_range() {
    let s = Setup::new("dl-resume").await;
    s.hub.cut_after(1_000_000);
    let (res, p) = s.get(&s.client(), &format!("hf:{REPO}:{FILE}")).await;
    let path = res.unwrap();
    assert_eq!(s.hub.gets(), 2);
    assert_eq!(
        s.hub.ranges(),
        vec![None, Some("bytes=1000000-".to_owned())]
    );
    assert_eq!(file_sha(&path), sha256_hex(&s.bytes));
    assert_eq!(p.state, DownloadState::Done);
    assert_eq!(p.attempt, 2);
    assert_eq!(p.bytes_done, LEN as u64);
}

#[tokio::test]
async fn a_part_left_by_an_earlier_run_is_rehashed_and_resumed() {
    let s = Setup::new("dl-part").await;
    std::fs::create_dir_all(s.final_path().parent().unwrap()).unwrap();
    std::fs::write(s.part_path(), &s.bytes[..777_777]).unwrap();
    let (res, _) = s.get(&s.client(), &format!("hf:{REPO}:{FILE}")).await;
    assert_eq!(file_sha(&res.unwrap()), sha256_hex(&s.bytes));
    assert_eq!(s.hub.ranges(), vec![Some("bytes=777777-".to_owned())]);
}

#[tokio::test]
async fn a_server_ignoring_range_restarts_from_zero() {
    let s = Setup::new("dl-norange").await;
    s.hub.ignore_range(true);
    std::fs::create_dir_all(s.final_path().parent().unwrap()).unwrap();
    std::fs::write(s.part_path(), &s.bytes[..500_000]).unwrap();
    let (res, p) = s.get(&s.client(), &format!("hf:{REPO}:{FILE}")).await;
    assert_eq!(file_sha(&res.unwrap()), sha256_hex(&s.bytes));
    assert_eq!(s.hub.ranges(), vec![Some("bytes=500000-".to_owned())]);
    assert_eq!(p.bytes_done, LEN as u64);
}

#[tokio::test]
async fn server_errors_are_retried_then_reported() {
    let s = Setup::new("dl-503").await;
    s.hub.fail_next(2);
    let (res, p) = s.get(&s.client(), &format!("hf:{REPO}:{FILE}")).await;
    assert_eq!(file_sha(&res.unwrap()), sha256_hex(&s.bytes));
    assert_eq!(s.hub.gets(), 3);
    assert_eq!(p.attempt, 3);

    let s = Setup::new("dl-503-fail").await;
    s.hub.fail_next(10);
    let client = s.client().with_retries(2);
    let (res, p) = s.get(&client, &format!("hf:{REPO}:{FILE}")).await;
    let err = res.unwrap_err();
    assert_eq!(err.code().as_str(), "HUB_UNAVAILABLE");
    assert_eq!(err.status(), 502);
    assert_eq!(
        err.to_string(),
        "the hub is unavailable: gave up on TestOrg/Tiny-GGUF tiny.Q4_0.gguf after 3 attempts: \
         the hub answered HTTP 503 Service Unavailable"
    );
    assert_eq!(s.hub.gets(), 3);
    assert_eq!(p.state, DownloadState::Failed);
    assert_eq!(p.error.unwrap().code.as_str(), "HUB_UNAVAILABLE");
}

#[tokio::test]
async fn a_wrong_checksum_deletes_the_part() {
    let s = Setup::new("dl-sha").await;
    s.hub.wrong_checksum(true);
    let (res, p) = s.get(&s.client(), &format!("hf:{REPO}:{FILE}")).await;
    let err = res.unwrap_err();
    assert_eq!(err.code().as_str(), "CHECKSUM_MISMATCH");
    assert_eq!(err.status(), 502);
    let expected = sha256_hex(b"not the file");
    assert_eq!(
        err.to_string(),
        format!(
            "checksum mismatch for {REPO} {FILE}: expected sha256 {expected}, got {}",
            sha256_hex(&s.bytes)
        )
    );
    assert!(!s.part_path().exists());
    assert!(!s.final_path().exists());
    assert_eq!(p.state, DownloadState::Failed);
    assert_eq!(p.error.unwrap().code.as_str(), "CHECKSUM_MISMATCH");
}

#[tokio::test]
async fn unknown_files_and_repos_are_not_found() {
    let s = Setup::new("dl-404").await;
    let (res, _) = s.get(&s.client(), &format!("hf:{REPO}:missing.gguf")).await;
    let err = res.unwrap_err();
    assert_eq!(err.code().as_str(), "MODEL_NOT_FOUND");
    assert_eq!(err.status(), 404);
    assert_eq!(
        err.to_string(),
        "model not found on the hub: TestOrg/Tiny-GGUF missing.gguf"
    );
    let (res, _) = s.get(&s.client(), "hf:TestOrg/Nope").await;
    assert_eq!(
        res.unwrap_err().to_string(),
        "model not found on the hub: TestOrg/Nope"
    );
    assert_eq!(s.hub.gets(), 0);
    assert!(s.catalog.list().is_empty());
}

#[tokio::test]
async fn forbidden_and_unauthorized_ask_for_hf_token() {
    let s = Setup::new("dl-auth").await;
    s.hub.forbid(true);
    let (res, _) = s.get(&s.client(), &format!("hf:{REPO}:{FILE}")).await;
    let err = res.unwrap_err();
    assert_eq!(err.code().as_str(), "HUB_UNAUTHORIZED");
    assert_eq!(err.status(), 502);
    assert!(err.to_string().contains("HTTP 403"), "{err}");
    assert!(err.to_string().contains("set HF_TOKEN"), "{err}");

    s.hub.forbid(false);
    s.hub.require_token(Some("hf_right_token"));
    let wrong = HubClient::new(&s.hub.endpoint(), Some("hf_wrong_token".into())).unwrap();
    for client in [s.client(), wrong] {
        let (res, p) = s.get(&client, &format!("hf:{REPO}")).await;
        let err = res.unwrap_err();
        assert_eq!(err.code().as_str(), "HUB_UNAUTHORIZED");
        assert!(err.to_string().contains("HTTP 401"), "{err}");
        assert!(err.to_string().contains("set HF_TOKEN"), "{err}");
        assert!(!err.to_string().contains("hf_wrong_token"));
        assert!(!p.error.unwrap().message.contains("hf_wrong_token"));
    }
    assert_eq!(s.hub.gets(), 0);
}

#[tokio::test]
async fn the_token_is_sent_when_configured() {
    let s = Setup::new("dl-token").await;
    s.hub.require_token(Some("hf_secret_123"));
    let client = HubClient::new(&s.hub.endpoint(), Some("hf_secret_123".into())).unwrap();
    assert!(!format!("{client:?}").contains("hf_secret_123"));
    let (res, _) = s.get(&client, &format!("hf:{REPO}")).await;
    assert_eq!(file_sha(&res.unwrap()), sha256_hex(&s.bytes));
    // Listing and HEAD both carried it.
    assert_eq!(
        s.hub.authorizations(),
        vec![Some("Bearer hf_secret_123".to_owned()); 3]
    );
}

#[tokio::test]
async fn a_repo_with_several_gguf_files_is_ambiguous() {
    let s = Setup::new("dl-ambiguous").await;
    let (res, p) = s.get(&s.client(), "hf:TestOrg/Two-GGUF").await;
    let err = res.unwrap_err();
    assert_eq!(err.code().as_str(), "AMBIGUOUS_MODEL_FILE");
    assert_eq!(err.status(), 400);
    assert_eq!(
        err.to_string(),
        "TestOrg/Two-GGUF holds several .gguf files, name one (hf:TestOrg/Two-GGUF:FILE): \
         a.Q4_0.gguf, b.Q8_0.gguf"
    );
    assert_eq!(p.state, DownloadState::Failed);
    // Naming one works.
    let (res, _) = s.get(&s.client(), "hf:TestOrg/Two-GGUF:b.Q8_0.gguf").await;
    assert_eq!(std::fs::read(res.unwrap()).unwrap(), vec![2; 10]);
}

#[tokio::test]
async fn insufficient_disk_is_refused_before_downloading() {
    let s = Setup::new("dl-disk").await;
    s.hub.advertise_size(Some(1_000_000_000_000_000));
    let (res, _) = s.get(&s.client(), &format!("hf:{REPO}:{FILE}")).await;
    let err = res.unwrap_err();
    assert_eq!(err.code().as_str(), "INSUFFICIENT_DISK");
    assert_eq!(err.status(), 507);
    assert!(
        err.to_string().contains("1000000000000000 bytes needed, "),
        "{err}"
    );
    assert_eq!(s.hub.gets(), 0);

    // Needed = total − what the .part already holds (free space injected).
    s.hub.advertise_size(None);
    std::fs::write(s.part_path(), &s.bytes[..LEN - 500]).unwrap();
    let tight = s
        .catalog
        .clone()
        .with_free_space(Arc::new(|_: &Path| Ok(499)));
    let (tx, _rx) = watch::channel(DownloadProgress::default());
    let (_c, cancel) = watch::channel(false);
    let r: ModelRef = format!("hf:{REPO}:{FILE}").parse().unwrap();
    let err = download(&s.client(), &tight, &r, tx, cancel)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "insufficient disk space in {}: 500 bytes needed, 499 bytes available",
            s.final_path().parent().unwrap().display()
        )
    );
    let enough = s
        .catalog
        .clone()
        .with_free_space(Arc::new(|_: &Path| Ok(500)));
    let (tx, _rx) = watch::channel(DownloadProgress::default());
    let (_c, cancel) = watch::channel(false);
    let path = download(&s.client(), &enough, &r, tx, cancel)
        .await
        .unwrap();
    assert_eq!(file_sha(&path), sha256_hex(&s.bytes));
    assert_eq!(s.hub.ranges(), vec![Some(format!("bytes={}-", LEN - 500))]);
}

#[tokio::test]
async fn cancel_stops_the_download_and_removes_the_part() {
    let s = Setup::new("dl-cancel").await;
    // Keep the download busy retrying 503s with long backoffs.
    s.hub.fail_next(1000);
    let client = s
        .client()
        .with_retries(1000)
        .with_backoff(Duration::from_millis(200), Duration::from_millis(200));
    let (tx, mut rx) = watch::channel(DownloadProgress::default());
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let r: ModelRef = format!("hf:{REPO}:{FILE}").parse().unwrap();
    let catalog = s.catalog.clone();
    let c2 = client.clone();
    let r2 = r.clone();
    let task = tokio::spawn(async move { download(&c2, &catalog, &r2, tx, cancel_rx).await });
    rx.wait_for(|p| p.state == DownloadState::Downloading)
        .await
        .unwrap();
    assert!(s.part_path().exists());

    // A second download of the same file is refused while the first holds the .part.
    let (res, _) = s.get(&client, &format!("hf:{REPO}:{FILE}")).await;
    let err = res.unwrap_err();
    assert_eq!(err.code().as_str(), "DOWNLOAD_IN_PROGRESS");
    assert_eq!(err.status(), 409);

    cancel_tx.send(true).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code().as_str(), "CANCELLED");
    assert!(!s.part_path().exists());
    assert!(!s.final_path().exists());
    let last = rx.borrow().clone();
    assert_eq!(last.state, DownloadState::Failed);
    assert_eq!(last.error.unwrap().code.as_str(), "CANCELLED");

    // Already cancelled: nothing is fetched.
    let gets = s.hub.gets();
    let (tx, _rx) = watch::channel(DownloadProgress::default());
    let (_c, cancel) = watch::channel(true);
    let err = download(&client, &s.catalog, &r, tx, cancel)
        .await
        .unwrap_err();
    assert_eq!(err.code().as_str(), "CANCELLED");
    assert_eq!(s.hub.gets(), gets);
}

#[tokio::test]
async fn file_refs_are_not_downloadable() {
    let s = Setup::new("dl-fileref").await;
    let (res, _) = s.get(&s.client(), "file:x.gguf").await;
    let err = res.unwrap_err();
    assert_eq!(err.code().as_str(), "INVALID_MODEL_REF");
    assert!(err.to_string().contains("only hf: references"), "{err}");
    assert_eq!(
        HubClient::new("ftp://example", None)
            .unwrap_err()
            .code()
            .as_str(),
        "INVALID_CONFIG"
    );
}
