//! The hive registry over a real SQLite file: persistence across reopen, heartbeats, validation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rbee_api::{GpuInfo, HeartbeatWorker, HiveHeartbeat, NodeResources};
use rbee_registry::{
    BeatAuth, BeatOutcome, HiveRecord, HiveSource, HiveState, JoinPolicy, Registry, RegistryError,
    SCHEMA_VERSION,
};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "rbee-registry-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("registry.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn heartbeat(id: &str, url: &str) -> HiveHeartbeat {
    HiveHeartbeat {
        hive_id: id.into(),
        url: url.into(),
        version: "0.1.0".into(),
        resources: NodeResources {
            cpu_cores: 16,
            memory_total_bytes: 64 << 30,
            memory_available_bytes: 40 << 30,
            gpus: vec![GpuInfo {
                device: "cuda:0".into(),
                name: "RTX 4090".into(),
                vram_total_bytes: 24 << 30,
                vram_free_bytes: 20 << 30,
            }],
            model_disk_free_bytes: 500 << 30,
        },
        workers: vec![HeartbeatWorker {
            id: "w-1".into(),
            model: "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf".into(),
            device: "cuda:0".into(),
            state: rbee_api::WorkerState::Ready,
            busy: false,
            slots: 1,
        }],
        models: vec!["hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf".into()],
        model_sha256: Default::default(),
    }
}

thread_local! {
    /// Credentials issued in this test, by (registry file, hive id): what each hive keeps.
    static ISSUED: std::cell::RefCell<std::collections::HashMap<(PathBuf, String), String>> =
        Default::default();
}

/// Beats as a real hive does: with the credential it was issued, else the join token; keeps
/// what the queen issues.
trait BeatAsHive {
    fn beat(&self, hb: &HiveHeartbeat, now_ms: i64) -> Result<BeatOutcome, RegistryError>;
}

impl BeatAsHive for Registry {
    fn beat(&self, hb: &HiveHeartbeat, now_ms: i64) -> Result<BeatOutcome, RegistryError> {
        let key = (self.path().to_path_buf(), hb.hive_id.clone());
        let cred = ISSUED.with(|m| m.borrow().get(&key).cloned());
        let auth = match &cred {
            Some(c) => BeatAuth::Credential(c),
            None => BeatAuth::Join,
        };
        let beat = self.heartbeat(hb, now_ms, auth, &JoinPolicy::default())?;
        if let Some(i) = beat.issued {
            // The hive's next beat carries its credential, which makes it routable; taken at
            // once here.
            let credential = i.credential.expose().to_owned();
            self.heartbeat(
                hb,
                now_ms,
                BeatAuth::Credential(&credential),
                &JoinPolicy::default(),
            )?;
            ISSUED.with(|m| m.borrow_mut().insert(key, credential));
        }
        Ok(beat.outcome)
    }
}

fn ids(records: &[HiveRecord]) -> Vec<&str> {
    records.iter().map(|r| r.id.as_str()).collect()
}

fn invalid_field(err: RegistryError) -> &'static str {
    match err {
        RegistryError::InvalidHive { field, .. } => field,
        other => panic!("expected InvalidHive, got {other:?}"),
    }
}

#[test]
fn registry_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Registry>();
}

#[test]
fn hives_persist_across_reopen_and_come_back_down() {
    let dir = TempDir::new("persist");
    let beat_a = heartbeat("alpha", "http://10.0.0.5:7835");
    let beat_b = heartbeat("bravo", "http://10.0.0.6:7835/");
    {
        let reg = Registry::open(&dir.db()).unwrap();
        reg.add_static("alpha", "http://10.0.0.5:7835", 1_000)
            .unwrap();
        assert_eq!(reg.beat(&beat_a, 2_000).unwrap(), BeatOutcome::CameBack);
        assert_eq!(reg.beat(&beat_b, 3_000).unwrap(), BeatOutcome::Joined);
        // A beat that changes only volatile figures is held in memory and flushed on close.
        let mut later_b = beat_b.clone();
        later_b.resources.memory_available_bytes = 30 << 30;
        later_b.workers[0].busy = true;
        assert_eq!(reg.beat(&later_b, 8_000).unwrap(), BeatOutcome::Beat);
        assert_eq!(ids(&reg.up().unwrap()), ["alpha", "bravo"]);
    }

    let reg = Registry::open(&dir.db()).unwrap();
    let mut later_b = beat_b.clone();
    later_b.resources.memory_available_bytes = 30 << 30;
    later_b.workers[0].busy = true;
    let expected = vec![
        HiveRecord {
            id: "alpha".into(),
            url: "http://10.0.0.5:7835".into(),
            source: HiveSource::Config,
            state: HiveState::Down,
            joined_unix_ms: 1_000,
            last_seen_unix_ms: Some(2_000),
            heartbeat: Some(beat_a.clone()),
            approved: true,
            pending_url: None,
            bound: true,
        },
        HiveRecord {
            id: "bravo".into(),
            url: "http://10.0.0.6:7835".into(),
            source: HiveSource::Joined,
            state: HiveState::Down,
            joined_unix_ms: 3_000,
            last_seen_unix_ms: Some(8_000),
            heartbeat: Some(later_b.clone()),
            approved: true,
            pending_url: None,
            bound: true,
        },
    ];
    assert_eq!(reg.list().unwrap(), expected);
    assert_eq!(reg.load().unwrap(), expected);
    assert!(reg.up().unwrap().is_empty(), "nothing routes before a beat");

    // Routing resumes with the next beat; the join time is kept.
    assert_eq!(reg.beat(&beat_b, 20_000).unwrap(), BeatOutcome::CameBack);
    let bravo = reg.get("bravo").unwrap().unwrap();
    assert_eq!(bravo.state, HiveState::Up);
    assert_eq!(bravo.joined_unix_ms, 3_000);
    assert_eq!(bravo.last_seen_unix_ms, Some(20_000));
    assert_eq!(ids(&reg.up().unwrap()), ["bravo"]);
}

#[test]
fn join_beat_sweep_and_come_back() {
    let reg = Registry::open_in_memory().unwrap();
    let interval = 5_000;
    let stale = 3 * interval;
    let hb = heartbeat("h1", "http://node1:7835");

    assert_eq!(reg.beat(&hb, 100_000).unwrap(), BeatOutcome::Joined);
    let rec = reg.get("h1").unwrap().unwrap();
    assert_eq!(rec.source, HiveSource::Joined);
    assert_eq!(rec.state, HiveState::Up);
    assert_eq!(rec.joined_unix_ms, 100_000);
    assert_eq!(rec.last_seen_unix_ms, Some(100_000));
    assert_eq!(rec.heartbeat.as_ref(), Some(&hb));

    assert_eq!(reg.beat(&hb, 105_000).unwrap(), BeatOutcome::Beat);
    assert_eq!(ids(&reg.up().unwrap()), ["h1"]);

    // Exactly 3 intervals since the last beat: still up. One ms more: down.
    assert_eq!(reg.sweep(120_000, stale).unwrap(), Vec::<String>::new());
    assert_eq!(reg.get("h1").unwrap().unwrap().state, HiveState::Up);
    assert_eq!(reg.sweep(120_001, stale).unwrap(), vec!["h1".to_owned()]);
    assert!(reg.up().unwrap().is_empty());
    let rec = reg.get("h1").unwrap().unwrap();
    assert_eq!(rec.state, HiveState::Down);
    assert_eq!(rec.last_seen_unix_ms, Some(105_000));
    // Already down: not reported again.
    assert_eq!(reg.sweep(200_000, stale).unwrap(), Vec::<String>::new());

    assert_eq!(reg.beat(&hb, 210_000).unwrap(), BeatOutcome::CameBack);
    assert_eq!(ids(&reg.up().unwrap()), ["h1"]);
    assert_eq!(reg.get("h1").unwrap().unwrap().joined_unix_ms, 100_000);
    assert_eq!(reg.beat(&hb, 215_000).unwrap(), BeatOutcome::Beat);
}

#[test]
fn sweep_only_takes_the_stale_ones() {
    let reg = Registry::open_in_memory().unwrap();
    reg.beat(&heartbeat("a", "http://a:1"), 0).unwrap();
    reg.beat(&heartbeat("b", "http://b:1"), 10_000).unwrap();
    reg.beat(&heartbeat("c", "http://c:1"), 1_999).unwrap();
    assert_eq!(reg.sweep(17_000, 15_000).unwrap(), vec!["a", "c"]);
    assert_eq!(ids(&reg.up().unwrap()), ["b"]);
    assert_eq!(ids(&reg.list().unwrap()), ["a", "b", "c"]);
}

#[test]
fn static_hives() {
    let reg = Registry::open_in_memory().unwrap();
    reg.add_static("gpu-node-1", "HTTP://GPU-Node-1.lan:7835/", 5)
        .unwrap();
    assert_eq!(
        reg.get("gpu-node-1").unwrap().unwrap(),
        HiveRecord {
            id: "gpu-node-1".into(),
            url: "http://gpu-node-1.lan:7835".into(),
            source: HiveSource::Config,
            state: HiveState::Down,
            joined_unix_ms: 5,
            last_seen_unix_ms: None,
            heartbeat: None,
            approved: true,
            pending_url: None,
            bound: false,
        }
    );
    assert!(
        reg.up().unwrap().is_empty(),
        "a configured hive routes only once it beats"
    );
    // Never beat: a sweep leaves it alone.
    assert!(reg.sweep(1_000_000, 15_000).unwrap().is_empty());

    // Same url in another spelling: accepted.
    let hb = heartbeat("gpu-node-1", "http://gpu-node-1.LAN:7835");
    assert_eq!(reg.beat(&hb, 10).unwrap(), BeatOutcome::CameBack);
    let rec = reg.get("gpu-node-1").unwrap().unwrap();
    assert_eq!(rec.source, HiveSource::Config);
    assert_eq!(rec.state, HiveState::Up);
    assert_eq!(rec.url, "http://gpu-node-1.lan:7835");
    assert_eq!(rec.last_seen_unix_ms, Some(10));

    // Re-adding it unchanged (config reload) keeps it up and its join time.
    reg.add_static("gpu-node-1", "http://gpu-node-1.lan:7835", 99)
        .unwrap();
    let rec = reg.get("gpu-node-1").unwrap().unwrap();
    assert_eq!(rec.state, HiveState::Up);
    assert_eq!(rec.joined_unix_ms, 5);

    // Moving it in the config takes it down until it beats from the new place.
    reg.add_static("gpu-node-1", "http://10.1.1.1:7835", 100)
        .unwrap();
    let rec = reg.get("gpu-node-1").unwrap().unwrap();
    assert_eq!(rec.url, "http://10.1.1.1:7835");
    assert_eq!(rec.state, HiveState::Down);
    assert!(reg.up().unwrap().is_empty());

    // A joined hive listed in the config becomes a config hive.
    reg.beat(&heartbeat("j", "http://j:7835"), 200).unwrap();
    reg.add_static("j", "http://j:7835", 300).unwrap();
    let rec = reg.get("j").unwrap().unwrap();
    assert_eq!(rec.source, HiveSource::Config);
    assert_eq!(rec.state, HiveState::Up);
    assert_eq!(rec.joined_unix_ms, 200);
}

#[test]
fn url_conflict_for_static_hives_keeps_the_configured_url() {
    let reg = Registry::open_in_memory().unwrap();
    reg.add_static("s1", "http://10.0.0.5:7835", 0).unwrap();
    let err = reg
        .beat(&heartbeat("s1", "http://10.0.0.99:7835/"), 1_000)
        .unwrap_err();
    match &err {
        RegistryError::UrlConflict {
            id,
            configured,
            reported,
        } => {
            assert_eq!(id, "s1");
            assert_eq!(configured, "http://10.0.0.5:7835");
            assert_eq!(reported, "http://10.0.0.99:7835");
        }
        other => panic!("expected UrlConflict, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "hive s1 is configured at http://10.0.0.5:7835 but its heartbeat reports \
         http://10.0.0.99:7835; heartbeat ignored"
    );
    let rec = reg.get("s1").unwrap().unwrap();
    assert_eq!(rec.url, "http://10.0.0.5:7835");
    assert_eq!(rec.state, HiveState::Down);
    assert_eq!(rec.last_seen_unix_ms, None);
    assert_eq!(rec.heartbeat, None);
    assert!(reg.up().unwrap().is_empty());
}

#[test]
fn a_joined_hives_new_url_waits_for_an_admin() {
    let reg = Registry::open_in_memory().unwrap();
    reg.beat(&heartbeat("j1", "http://10.0.0.7:7835"), 0)
        .unwrap();
    assert_eq!(
        reg.beat(&heartbeat("j1", "https://10.0.0.8:7836"), 5_000)
            .unwrap(),
        BeatOutcome::Beat
    );
    let rec = reg.get("j1").unwrap().unwrap();
    assert_eq!(
        rec.url, "http://10.0.0.7:7835",
        "routing stays where it was"
    );
    assert_eq!(rec.pending_url.as_deref(), Some("https://10.0.0.8:7836"));
    assert_eq!(rec.source, HiveSource::Joined);
    let approval = reg.approve("j1", 6_000).unwrap().unwrap();
    assert!(!approval.admitted);
    assert_eq!(
        approval.moved,
        Some((
            "http://10.0.0.7:7835".into(),
            "https://10.0.0.8:7836".into()
        ))
    );
    let rec = reg.get("j1").unwrap().unwrap();
    assert_eq!(rec.url, "https://10.0.0.8:7836");
    assert_eq!(rec.pending_url, None);
    assert_eq!(reg.approve("nobody", 0).unwrap(), None);
}

#[test]
fn remove_forgets_a_hive_for_good() {
    let dir = TempDir::new("remove");
    {
        let reg = Registry::open(&dir.db()).unwrap();
        reg.add_static("keep", "http://keep:7835", 0).unwrap();
        reg.beat(&heartbeat("gone", "http://gone:7835"), 0).unwrap();
        assert!(reg.remove("gone").unwrap());
        assert_eq!(reg.get("gone").unwrap(), None);
        assert!(!reg.remove("gone").unwrap());
        assert!(!reg.remove("never-there").unwrap());
        assert_eq!(ids(&reg.list().unwrap()), ["keep"]);
        assert!(reg.up().unwrap().is_empty());
    }
    let reg = Registry::open(&dir.db()).unwrap();
    assert_eq!(ids(&reg.list().unwrap()), ["keep"]);
    // Removal revoked its credential: beating with it is refused, and nothing comes back.
    assert!(matches!(
        reg.beat(&heartbeat("gone", "http://gone:7835"), 50),
        Err(RegistryError::Unauthorized { .. })
    ));
    assert_eq!(ids(&reg.list().unwrap()), ["keep"]);
    // Only a hive that starts over with the join token (its credential file deleted by the
    // operator) joins afresh.
    let beat = reg
        .heartbeat(
            &heartbeat("gone", "http://gone:7835"),
            60,
            BeatAuth::Join,
            &JoinPolicy::default(),
        )
        .unwrap();
    assert_eq!(beat.outcome, BeatOutcome::Joined);
    assert!(beat.issued.is_some());
    assert_eq!(reg.get("gone").unwrap().unwrap().joined_unix_ms, 60);
}

#[test]
fn invalid_ids_are_refused() {
    let reg = Registry::open_in_memory().unwrap();
    let long = "x".repeat(129);
    for id in ["", "a b", "a/b", "hive\n", "é", "a;drop", long.as_str()] {
        assert_eq!(
            invalid_field(reg.add_static(id, "http://h:1", 0).unwrap_err()),
            "id",
            "{id:?}"
        );
        assert_eq!(
            invalid_field(reg.beat(&heartbeat(id, "http://h:1"), 0).unwrap_err()),
            "hive_id",
            "{id:?}"
        );
    }
    for id in [
        "a",
        "node-1.lan",
        "gpu_2:cuda",
        "A.B-c_d:9",
        &"x".repeat(128),
    ] {
        reg.add_static(id, "http://h:1", 0).unwrap();
    }
    assert_eq!(reg.list().unwrap().len(), 5);
    let err = reg.add_static("a b", "http://h:1", 0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid hive id: \"a b\" contains ' '; allowed are A-Z a-z 0-9 . _ : -"
    );
}

#[test]
fn invalid_urls_are_refused() {
    let reg = Registry::open_in_memory().unwrap();
    for url in [
        "",
        "node1:7835",
        "ftp://node1",
        "file:///etc/passwd",
        "http://",
        "http://:7835",
        "http://node1:0",
        "http://node1:70000",
        "http://node1:port",
        "http://user:secret@node1:7835",
        "http://node1:7835/a b",
        "http://node1:7835?x=1",
        "http://node1:7835#top",
        "http://[::1",
    ] {
        assert_eq!(
            invalid_field(reg.add_static("h", url, 0).unwrap_err()),
            "url",
            "{url:?}"
        );
        assert_eq!(
            invalid_field(reg.beat(&heartbeat("h", url), 0).unwrap_err()),
            "url",
            "{url:?}"
        );
    }
    assert!(reg.list().unwrap().is_empty());
    let err = reg.add_static("h", "ftp://node1", 0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid hive url: \"ftp://node1\": scheme must be http or https"
    );
    reg.add_static("v6", "https://[::1]:7835", 0).unwrap();
    assert_eq!(reg.get("v6").unwrap().unwrap().url, "https://[::1]:7835");
}

#[test]
fn newer_schema_is_refused() {
    let dir = TempDir::new("schema");
    drop(Registry::open(&dir.db()).unwrap());
    {
        let conn = rusqlite::Connection::open(dir.db()).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(version, 3);
        conn.pragma_update(None, "user_version", 4).unwrap();
    }
    let err = Registry::open(&dir.db()).unwrap_err();
    match &err {
        RegistryError::SchemaTooNew {
            path,
            found,
            supported,
        } => {
            assert_eq!(path, &dir.db());
            assert_eq!(*found, 4);
            assert_eq!(*supported, 3);
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "hive registry database {}: schema version 4 is newer than this queen supports (3); \
             refusing to open it",
            dir.db().display()
        )
    );
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_naming_the_path() {
    let dir = TempDir::new("garbage");
    std::fs::write(dir.db(), vec![b'x'; 4096]).unwrap();
    let err = Registry::open(&dir.db()).unwrap_err();
    assert!(matches!(err, RegistryError::Open { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&dir.db().display().to_string()), "{msg}");
    assert!(msg.contains("not a database"), "{msg}");
    // The file is left as it was.
    assert_eq!(std::fs::read(dir.db()).unwrap(), vec![b'x'; 4096]);
}

#[test]
fn a_foreign_sqlite_file_is_refused() {
    let dir = TempDir::new("foreign");
    {
        let conn = rusqlite::Connection::open(dir.db()).unwrap();
        conn.execute_batch("CREATE TABLE notes (body TEXT);")
            .unwrap();
    }
    let err = Registry::open(&dir.db()).unwrap_err();
    match &err {
        RegistryError::Corrupt { path, reason } => {
            assert_eq!(path, &dir.db());
            assert!(reason.contains("\"notes\""), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn a_missing_directory_is_an_error_naming_the_path() {
    let dir = TempDir::new("nodir");
    let path = dir.0.join("missing").join("registry.db");
    let err = Registry::open(&path).unwrap_err();
    assert!(matches!(err, RegistryError::Io { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "hive registry database {}: directory {} does not exist",
            path.display(),
            dir.0.join("missing").display()
        )
    );
    assert!(!dir.0.join("missing").exists(), "no directory is created");
}

#[test]
fn a_second_queen_on_the_same_file_is_refused() {
    let dir = TempDir::new("lock");
    let first = Registry::open(&dir.db()).unwrap();
    first.add_static("a", "http://a:1", 0).unwrap();
    let err = Registry::open(&dir.db()).unwrap_err();
    match &err {
        RegistryError::Locked { path } => assert_eq!(path, &dir.db()),
        other => panic!("expected Locked, got {other:?}"),
    }
    // The first one is unharmed and, once closed, the file opens again.
    first.add_static("b", "http://b:1", 0).unwrap();
    drop(first);
    let reg = Registry::open(&dir.db()).unwrap();
    assert_eq!(ids(&reg.list().unwrap()), ["a", "b"]);
}

#[test]
fn in_memory_registry_works() {
    let reg = Registry::open_in_memory().unwrap();
    assert_eq!(reg.path(), Path::new(":memory:"));
    assert!(reg.load().unwrap().is_empty());
    reg.add_static("s", "http://s:7835", 1).unwrap();
    assert_eq!(
        reg.beat(&heartbeat("j", "http://j:7835"), 2).unwrap(),
        BeatOutcome::Joined
    );
    assert_eq!(ids(&reg.list().unwrap()), ["j", "s"]);
    assert_eq!(ids(&reg.up().unwrap()), ["j"]);
    reg.flush().unwrap();
    assert_eq!(reg.flush().unwrap(), 0, "nothing left to write");
    // load() resets to what is stored: all down.
    let loaded = reg.load().unwrap();
    assert_eq!(ids(&loaded), ["j", "s"]);
    assert!(loaded.iter().all(|r| r.state == HiveState::Down));
    assert!(reg.up().unwrap().is_empty());
}

#[test]
fn records_serialize_in_snake_case() {
    let reg = Registry::open_in_memory().unwrap();
    reg.add_static("s", "http://s:7835", 7).unwrap();
    let json = serde_json::to_value(reg.get("s").unwrap().unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "id": "s",
            "url": "http://s:7835",
            "source": "config",
            "state": "down",
            "approved": true,
            "pending_url": null,
            "bound": false,
            "joined_unix_ms": 7,
            "last_seen_unix_ms": null,
            "heartbeat": null,
        })
    );
    assert_eq!(
        serde_json::to_value(BeatOutcome::CameBack).unwrap(),
        "came_back"
    );
    assert_eq!(serde_json::to_value(HiveState::Up).unwrap(), "up");
    assert_eq!(serde_json::to_value(HiveSource::Joined).unwrap(), "joined");
}

#[cfg(unix)]
#[test]
fn database_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("mode");
    let reg = Registry::open(&dir.db()).unwrap();
    reg.beat(&heartbeat("h", "http://h:7835"), 0).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.db()), 0o600);
    let wal = dir.0.join("registry.db-wal");
    assert!(wal.exists());
    assert_eq!(mode(&wal), 0o600);
    // No shared-memory index file: the lock is exclusive.
    assert!(!dir.0.join("registry.db-shm").exists());
}

fn join(
    reg: &Registry,
    id: &str,
    url: &str,
    policy: &JoinPolicy,
) -> Result<rbee_registry::Beat, RegistryError> {
    reg.heartbeat(&heartbeat(id, url), 1_000, BeatAuth::Join, policy)
}

#[test]
fn the_join_token_binds_an_id_once_and_never_again() {
    let reg = Registry::open_in_memory().unwrap();
    let policy = JoinPolicy::default();
    let first = join(&reg, "gpu-1", "http://10.0.0.11:7835", &policy).unwrap();
    let issued = first.issued.expect("a new hive is issued a credential");
    assert!(issued.credential.expose().starts_with("rbh_"));
    assert!(issued.queen_token.expose().starts_with("rbq_"));
    assert!(reg.get("gpu-1").unwrap().unwrap().bound);
    assert!(
        reg.up().unwrap().is_empty(),
        "not routed before it beats with its credential (it may not hold the queen's token yet)"
    );
    assert!(
        reg.queen_token("gpu-1")
            .unwrap()
            .matches(issued.queen_token.expose())
    );
    // The attack: someone else with the join token beats as gpu-1 from their own address.
    let takeover = join(&reg, "gpu-1", "http://203.0.113.9:7835", &policy);
    assert!(
        matches!(takeover, Err(RegistryError::IdTaken { .. })),
        "{takeover:?}"
    );
    // Another hive's credential, or a made-up one, does not open gpu-1 either.
    let other = join(&reg, "gpu-2", "http://10.0.0.12:7835", &policy)
        .unwrap()
        .issued
        .unwrap();
    for wrong in [
        other.credential.expose(),
        "rbh_0000",
        issued.queen_token.expose(),
    ] {
        let r = reg.heartbeat(
            &heartbeat("gpu-1", "http://10.0.0.11:7835"),
            2_000,
            BeatAuth::Credential(wrong),
            &policy,
        );
        assert!(
            matches!(r, Err(RegistryError::Unauthorized { .. })),
            "{r:?}"
        );
    }
    // A credential for an id the registry does not know is refused, not a join.
    let r = reg.heartbeat(
        &heartbeat("gpu-9", "http://10.0.0.19:7835"),
        2_000,
        BeatAuth::Credential(issued.credential.expose()),
        &policy,
    );
    assert!(
        matches!(r, Err(RegistryError::Unauthorized { .. })),
        "{r:?}"
    );
    assert_eq!(ids(&reg.list().unwrap()), ["gpu-1", "gpu-2"]);
    // The right one beats, and the url did not move.
    let ok = reg
        .heartbeat(
            &heartbeat("gpu-1", "http://10.0.0.11:7835"),
            3_000,
            BeatAuth::Credential(issued.credential.expose()),
            &policy,
        )
        .unwrap();
    assert_eq!(ok.outcome, BeatOutcome::Beat);
    assert!(ok.issued.is_none());
    assert_eq!(ids(&reg.up().unwrap()), ["gpu-1"]);
    assert_eq!(
        reg.get("gpu-1").unwrap().unwrap().url,
        "http://10.0.0.11:7835"
    );
}

#[test]
fn identities_survive_a_restart_and_old_registries_bind_on_the_next_join() {
    let dir = TempDir::new("identity");
    let issued = {
        let reg = Registry::open(&dir.db()).unwrap();
        join(&reg, "h", "http://h:7835", &JoinPolicy::default())
            .unwrap()
            .issued
            .unwrap()
    };
    let reg = Registry::open(&dir.db()).unwrap();
    assert!(
        reg.queen_token("h")
            .unwrap()
            .matches(issued.queen_token.expose())
    );
    let back = reg
        .heartbeat(
            &heartbeat("h", "http://h:7835"),
            5_000,
            BeatAuth::Credential(issued.credential.expose()),
            &JoinPolicy::default(),
        )
        .unwrap();
    assert_eq!(back.outcome, BeatOutcome::CameBack);
    assert!(matches!(
        join(&reg, "h", "http://h:7835", &JoinPolicy::default()),
        Err(RegistryError::IdTaken { .. })
    ));
    drop(reg);
    // A version 1 file (before identities): its hives are known, unbound and routed; the next
    // beat with the join token binds them.
    let v1 = TempDir::new("v1");
    {
        let conn = rusqlite::Connection::open(v1.db()).unwrap();
        conn.execute_batch(
            "CREATE TABLE hives (id TEXT PRIMARY KEY NOT NULL, url TEXT NOT NULL,
                 source TEXT NOT NULL CHECK (source IN ('config', 'joined')),
                 joined_unix_ms INTEGER NOT NULL, last_seen_unix_ms INTEGER,
                 heartbeat_json TEXT) STRICT;
             INSERT INTO hives VALUES ('old', 'http://old:7835', 'joined', 1, 2, NULL);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let reg = Registry::open(&v1.db()).unwrap();
    let old = reg.get("old").unwrap().unwrap();
    assert!(old.approved && !old.bound);
    let bound = join(&reg, "old", "http://old:7835", &JoinPolicy::default()).unwrap();
    assert_eq!(bound.outcome, BeatOutcome::CameBack);
    assert!(bound.issued.is_some());
    assert!(reg.get("old").unwrap().unwrap().bound);
    // Upgraded through 2 to 3: the daily token counts work.
    assert_eq!(reg.add_client_tokens("alice", 7, 11).unwrap(), 11);
    drop(reg);
    let reg = Registry::open(&v1.db()).unwrap();
    assert_eq!(
        reg.client_tokens("alice", 7).unwrap(),
        11,
        "kept across a reopen"
    );
}

#[test]
fn new_hives_can_wait_for_approval_and_their_number_is_capped() {
    let reg = Registry::open_in_memory().unwrap();
    let held = JoinPolicy {
        max_hives: 2,
        require_approval: true,
        auto_approve_url_change: false,
    };
    let beat = join(&reg, "a", "http://a:7835", &held).unwrap();
    assert!(!beat.approved);
    let credential = beat.issued.unwrap().credential;
    let confirm = reg
        .heartbeat(
            &heartbeat("a", "http://a:7835"),
            1_500,
            BeatAuth::Credential(credential.expose()),
            &held,
        )
        .unwrap();
    assert!(!confirm.approved);
    assert!(reg.up().unwrap().is_empty(), "not routed before approval");
    assert_eq!(ids(&reg.list().unwrap()), ["a"]);
    let approval = reg.approve("a", 2_000).unwrap().unwrap();
    assert!(approval.admitted);
    assert_eq!(approval.moved, None);
    assert_eq!(ids(&reg.up().unwrap()), ["a"]);
    join(&reg, "b", "http://b:7835", &held).unwrap();
    let full = join(&reg, "c", "http://c:7835", &held);
    assert!(
        matches!(full, Err(RegistryError::Full { max: 2 })),
        "{full:?}"
    );
    assert_eq!(ids(&reg.list().unwrap()), ["a", "b"]);
    // Labs: URL changes apply at once.
    let labs = JoinPolicy {
        auto_approve_url_change: true,
        ..JoinPolicy::default()
    };
    let issued = join(&reg, "lab", "http://lab:1", &labs)
        .unwrap()
        .issued
        .unwrap();
    let moved = reg
        .heartbeat(
            &heartbeat("lab", "http://lab:2"),
            3_000,
            BeatAuth::Credential(issued.credential.expose()),
            &labs,
        )
        .unwrap();
    assert_eq!(moved.moved_from.as_deref(), Some("http://lab:1"));
    assert_eq!(reg.get("lab").unwrap().unwrap().url, "http://lab:2");
}

#[test]
fn heartbeat_fields_are_bounded_and_worker_ids_plain() {
    let reg = Registry::open_in_memory().unwrap();
    for bad in ["../w", "w/1", "", ".hidden", "w?x=1", "w 1"] {
        let mut hb = heartbeat("h", "http://h:7835");
        hb.workers[0].id = bad.into();
        let r = reg.heartbeat(&hb, 0, BeatAuth::Join, &JoinPolicy::default());
        assert_eq!(invalid_field(r.unwrap_err()), "workers[].id", "{bad:?}");
    }
    let mut hb = heartbeat("h", "http://h:7835");
    hb.workers = (0..1025).map(|_| hb.workers[0].clone()).collect();
    let r = reg.heartbeat(&hb, 0, BeatAuth::Join, &JoinPolicy::default());
    assert_eq!(invalid_field(r.unwrap_err()), "workers");
    let mut hb = heartbeat("h", "http://h:7835");
    hb.models.push("x".repeat(600));
    let r = reg.heartbeat(&hb, 0, BeatAuth::Join, &JoinPolicy::default());
    assert_eq!(invalid_field(r.unwrap_err()), "models");
    assert!(
        reg.list().unwrap().is_empty(),
        "nothing refused was recorded"
    );
}
