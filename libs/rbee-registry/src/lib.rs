//! The queen's hive registry.
//!
//! Hives are either listed in the queen's config ([`HiveSource::Config`]: id + url) or join by
//! heartbeat ([`HiveSource::Joined`]). A hive whose last beat is older than the stale limit the
//! queen passes to [`Registry::sweep`] (3 heartbeat intervals) goes [`HiveState::Down`] and leaves
//! routing; its next beat brings it back.
//!
//! # Storage
//!
//! An in-memory map is the source of truth for every read ([`Registry::get`], [`Registry::list`],
//! [`Registry::up`] take only a read lock, never touch SQLite). Writes go through to one SQLite
//! file so a queen restart keeps the hives; after a restart every hive counts as down until it
//! beats again, so the up/down state itself is never stored.
//!
//! Heartbeats arrive every few seconds from every hive, so they must not turn into a write (let
//! alone an fsync) each. The file runs in WAL mode with `synchronous=NORMAL` (commits append to
//! the WAL without fsync; only checkpoints sync), and a beat is written only when
//!
//! * the hive is new ([`BeatOutcome::Joined`]) or was down ([`BeatOutcome::CameBack`]),
//! * its *shape* changed: url, version, workers (id, model, device, state), models, or the static
//!   parts of its resources; the volatile fields (free memory, free VRAM, free disk, a worker's
//!   `busy` flag) are left out of that comparison, or
//! * the last write of this hive is [`DEFAULT_HEARTBEAT_PERSIST_INTERVAL_MS`] old (configurable
//!   with [`Registry::with_heartbeat_persist_interval_ms`]).
//!
//! Beats in between only update memory and mark the hive dirty; [`Registry::flush`] (also run on
//! drop) writes the dirty ones. So after a crash the stored `last_seen_unix_ms` and volatile
//! figures may be up to one interval old, which is harmless: a restarted queen treats every hive
//! as down anyway.
//!
//! A failed write while recording a beat does not take a live hive out of routing: the beat is
//! kept in memory, logged at `warn`, and written again on the next beat or flush. Admin writes
//! ([`Registry::add_static`], [`Registry::remove`]) return the error and leave memory unchanged.
//!
//! The file is opened with `locking_mode=EXCLUSIVE`: memory being the source of truth, two queens
//! on one file would silently overwrite each other, so the second one is refused
//! ([`RegistryError::Locked`]). Files are created with mode 0600 on Unix.

use std::collections::{BTreeMap, btree_map};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use rbee_api::HiveHeartbeat;
use rbee_auth::Token;
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// The schema version this crate writes (`PRAGMA user_version`). Files with a higher version
/// are refused rather than guessed at.
pub const SCHEMA_VERSION: i64 = 3;

/// How often an unchanged hive's heartbeat is written at most, by default.
pub const DEFAULT_HEARTBEAT_PERSIST_INTERVAL_MS: i64 = 60_000;

/// How long opening waits for another process's lock on the file before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest hive id accepted.
pub const MAX_ID_LEN: usize = 128;
/// Longest hive url accepted.
pub const MAX_URL_LEN: usize = 2048;

const MEMORY_PATH: &str = ":memory:";

pub mod budgets;
pub mod identity;
pub use identity::{Approval, Beat, BeatAuth, Issued, JoinPolicy};

const SCHEMA_V1: &str = "
CREATE TABLE hives (
    id                TEXT    PRIMARY KEY NOT NULL,
    url               TEXT    NOT NULL,
    source            TEXT    NOT NULL CHECK (source IN ('config', 'joined')),
    joined_unix_ms    INTEGER NOT NULL,
    last_seen_unix_ms INTEGER,
    heartbeat_json    TEXT
) STRICT;
";

/// Version 2: hive identity (see [`identity`]). Hives stored by version 1 are approved and
/// unbound: their next beat with the join token binds them.
const SCHEMA_V2_ADD: &str = "
ALTER TABLE hives ADD COLUMN approved INTEGER NOT NULL DEFAULT 1;
ALTER TABLE hives ADD COLUMN pending_url TEXT;
ALTER TABLE hives ADD COLUMN credential_sha256 TEXT;
ALTER TABLE hives ADD COLUMN queen_token TEXT;
";

/// Version 3: tokens each client used per day (see [`budgets`]).
const SCHEMA_V3_ADD: &str = "
CREATE TABLE client_tokens (
    client TEXT    NOT NULL,
    day    INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (client, day)
) STRICT;
";

const UPSERT: &str = "
INSERT INTO hives (id, url, source, joined_unix_ms, last_seen_unix_ms, heartbeat_json,
                   approved, pending_url, credential_sha256, queen_token)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
ON CONFLICT (id) DO UPDATE SET
    url = excluded.url,
    source = excluded.source,
    joined_unix_ms = excluded.joined_unix_ms,
    last_seen_unix_ms = excluded.last_seen_unix_ms,
    heartbeat_json = excluded.heartbeat_json,
    approved = excluded.approved,
    pending_url = excluded.pending_url,
    credential_sha256 = excluded.credential_sha256,
    queen_token = excluded.queen_token
";

/// Whether a hive takes part in routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiveState {
    Up,
    Down,
}

impl HiveState {
    pub fn as_str(self) -> &'static str {
        match self {
            HiveState::Up => "up",
            HiveState::Down => "down",
        }
    }
}

/// How the queen learnt of a hive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiveSource {
    /// Listed in the queen's config; its url is the configured one.
    Config,
    /// Joined by heartbeat; its url is the one it last reported.
    Joined,
}

impl HiveSource {
    pub fn as_str(self) -> &'static str {
        match self {
            HiveSource::Config => "config",
            HiveSource::Joined => "joined",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "config" => Some(HiveSource::Config),
            "joined" => Some(HiveSource::Joined),
            _ => None,
        }
    }
}

/// One hive as the queen knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveRecord {
    pub id: String,
    /// Normalised: lowercase scheme and host, no trailing `/`.
    pub url: String,
    pub source: HiveSource,
    pub state: HiveState,
    /// When the hive was first added (config) or first beat (joined).
    pub joined_unix_ms: i64,
    pub last_seen_unix_ms: Option<i64>,
    /// The last heartbeat received (after a restart: the last one stored).
    pub heartbeat: Option<HiveHeartbeat>,
    /// Routed to (false: a new hive waiting for an admin's approval).
    pub approved: bool,
    /// A URL the hive reported that waits for an admin; routing stays on `url`.
    pub pending_url: Option<String>,
    /// The id is bound to a credential the queen issued.
    pub bound: bool,
}

/// What a heartbeat changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BeatOutcome {
    /// A hive the registry did not know.
    Joined,
    /// A known hive that was down (missed beats, or the queen restarted).
    CameBack,
    /// A hive that was already up.
    Beat,
}

/// Everything the registry can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A SQLite error after the file was opened.
    #[error("hive registry database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// SQLite refused to open or read the file (e.g. "file is not a database").
    #[error("hive registry database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The file was written by a newer queen.
    #[error(
        "hive registry database {}: schema version {found} is newer than this queen supports ({supported}); refusing to open it",
        path.display()
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// The file is a SQLite database but not a usable registry.
    #[error("hive registry database {}: not a usable hive registry: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// Another process (another queen?) holds the file.
    #[error("hive registry database {} is locked by another process (is another queen running?)", path.display())]
    Locked { path: PathBuf },
    /// A client name the usage table does not take.
    #[error("invalid client name: {0}")]
    InvalidClient(String),
    /// A hive id or url that is not accepted.
    #[error("invalid hive {field}: {reason}")]
    InvalidHive { field: &'static str, reason: String },
    /// A heartbeat for a configured hive reported another url; the beat was not recorded.
    #[error(
        "hive {id} is configured at {configured} but its heartbeat reports {reported}; heartbeat ignored"
    )]
    UrlConflict {
        id: String,
        configured: String,
        reported: String,
    },
    /// A heartbeat's credential is not the one issued for its hive id (or the hive was
    /// removed, which revokes it).
    #[error("hive {id}: the presented credential is not the one issued for this id")]
    Unauthorized { id: String },
    /// The join token was presented for an id already bound to a credential.
    #[error(
        "hive id {id} is already bound to another hive's credential; a hive that lost its \
         credential file must be removed by an admin (DELETE /v1/admin/hives/{id}) before it \
         joins again"
    )]
    IdTaken { id: String },
    /// The registry holds as many hives as the queen allows.
    #[error("the queen already has its limit of {max} hives; remove one or raise join.max_hives")]
    Full { max: usize },
    /// A filesystem error around the database file.
    #[error("hive registry database {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One hive in memory, plus what is known about its stored copy.
#[derive(Debug, Clone)]
struct Slot {
    rec: HiveRecord,
    /// SHA-256 (hex) of the credential issued to this hive.
    credential_sha256: Option<String>,
    /// What the queen presents to this hive.
    queen_token: Option<Token>,
    /// The hive has beaten with its credential since it was issued, so it holds the queen's
    /// token too: only then is it routed to (a call with a token the hive has not received yet
    /// would be refused). Not stored: a reloaded hive was confirmed, or predates identities.
    confirmed: bool,
    /// The shape of the heartbeat last written (see [`shape`]).
    stored_shape: Option<HiveHeartbeat>,
    /// When this hive's row was last written.
    stored_at_ms: Option<i64>,
    /// Memory is newer than the stored row.
    dirty: bool,
}

impl Slot {
    fn new(rec: HiveRecord) -> Self {
        Slot {
            rec,
            credential_sha256: None,
            queen_token: None,
            confirmed: true,
            stored_shape: None,
            stored_at_ms: None,
            dirty: false,
        }
    }

    /// Binds the hive's id to new secrets.
    fn issue(&mut self) -> Issued {
        let issued = Issued::generate();
        self.credential_sha256 = Some(issued.credential.digest_hex());
        self.queen_token = Some(issued.queen_token.clone());
        self.rec.bound = true;
        self.confirmed = false;
        issued
    }

    fn mark_stored(&mut self, now_ms: i64) {
        self.stored_shape = self.rec.heartbeat.as_ref().map(shape);
        self.stored_at_ms = Some(now_ms);
        self.dirty = false;
    }
}

/// The hive registry. Cheap to share behind an `Arc`; every method takes `&self`.
///
/// Lock order: the connection first, then the map. Every write holds the connection lock for
/// its whole length, so writes are serialised and memory and file change in the same order;
/// reads take only the map's read lock.
pub struct Registry {
    path: PathBuf,
    conn: Mutex<Connection>,
    hives: RwLock<BTreeMap<String, Slot>>,
    persist_interval_ms: i64,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("path", &self.path)
            .field("hives", &self.read_map().len())
            .field("persist_interval_ms", &self.persist_interval_ms)
            .finish()
    }
}

impl Registry {
    /// Opens (or creates) the registry file at `path` and loads its hives, all down.
    ///
    /// The parent directory must exist. A new file is created with mode 0600. The schema is
    /// created on a fresh file; a file with a newer schema version, a file that is not SQLite,
    /// and a SQLite file that is not a registry are refused with an error naming the path.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        let path = path.to_path_buf();
        create_private_file(&path)?;
        let open_err = |source: rusqlite::Error| open_error(&path, source);

        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // Must come before the first WAL access: the WAL index then lives in process memory and
        // the file lock is held until the connection closes.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(open_err)?;

        let version = user_version(&conn).map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(RegistryError::SchemaTooNew {
                path,
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(open_err)?;
        if check != "ok" {
            return Err(RegistryError::Corrupt {
                path,
                reason: format!("integrity check failed: {check}"),
            });
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(RegistryError::Corrupt {
                path,
                reason: format!("could not switch to WAL journal mode (got {mode})"),
            });
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        prepare_schema(&mut conn, &path)?;

        let registry = Registry::from_connection(path, conn);
        registry.load()?;
        Ok(registry)
    }

    /// A registry that lives only in memory (tests, or a queen run without persistence).
    pub fn open_in_memory() -> Result<Registry, RegistryError> {
        let path = PathBuf::from(MEMORY_PATH);
        let mut conn = Connection::open_in_memory().map_err(|e| open_error(&path, e))?;
        prepare_schema(&mut conn, &path)?;
        Ok(Registry::from_connection(path, conn))
    }

    fn from_connection(path: PathBuf, conn: Connection) -> Registry {
        Registry {
            path,
            conn: Mutex::new(conn),
            hives: RwLock::new(BTreeMap::new()),
            persist_interval_ms: DEFAULT_HEARTBEAT_PERSIST_INTERVAL_MS,
        }
    }

    /// Sets how often an unchanged hive's heartbeat is written at most (0: every beat).
    #[must_use]
    pub fn with_heartbeat_persist_interval_ms(mut self, interval_ms: i64) -> Registry {
        self.persist_interval_ms = interval_ms.max(0);
        self
    }

    /// The database file (`:memory:` for an in-memory registry).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the persisted hives; every one starts Down until it heartbeats (the queen just
    /// started).
    ///
    /// [`Registry::open`] already does this; calling it again replaces the in-memory state with
    /// what is stored, so it is meant for startup only. Returns the hives sorted by id.
    pub fn load(&self) -> Result<Vec<HiveRecord>, RegistryError> {
        let conn = self.lock_conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, url, source, joined_unix_ms, last_seen_unix_ms, heartbeat_json,
                    approved, pending_url, credential_sha256, queen_token
             FROM hives ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                (
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ),
                (
                    r.get::<_, i64>(6)? != 0,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, Option<String>>(8)?,
                    r.get::<_, Option<String>>(9)?,
                ),
            ))
        })?;
        let mut map = BTreeMap::new();
        for row in rows {
            let row = row?;
            let (id, url, source, joined_unix_ms, last_seen_unix_ms, heartbeat_json) = row.0;
            let (approved, pending_url, credential_sha256, queen_token) = row.1;
            let Some(source) = HiveSource::parse(&source) else {
                return Err(RegistryError::Corrupt {
                    path: self.path.clone(),
                    reason: format!("hive {id:?} has unknown source {source:?}"),
                });
            };
            let heartbeat = heartbeat_json.and_then(|json| {
                serde_json::from_str::<HiveHeartbeat>(&json)
                    .inspect_err(|e| {
                        tracing::warn!(hive = %id, error = %e, "stored heartbeat unreadable; dropped");
                    })
                    .ok()
            });
            let queen_token = match queen_token.map(|t| Token::new(t, "the registry")) {
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => {
                    return Err(RegistryError::Corrupt {
                        path: self.path.clone(),
                        reason: format!("hive {id:?}: stored queen token unusable: {e}"),
                    });
                }
                None => None,
            };
            let mut entry = Slot::new(HiveRecord {
                id: id.clone(),
                url,
                source,
                state: HiveState::Down,
                joined_unix_ms,
                last_seen_unix_ms,
                heartbeat,
                approved,
                pending_url,
                bound: credential_sha256.is_some(),
            });
            entry.credential_sha256 = credential_sha256;
            entry.queen_token = queen_token;
            entry.stored_shape = entry.rec.heartbeat.as_ref().map(shape);
            entry.stored_at_ms = None;
            map.insert(id, entry);
        }
        drop(stmt);
        let records = map.values().map(|e| e.rec.clone()).collect();
        *self.write_map() = map;
        Ok(records)
    }

    /// Adds a hive from the config, or makes a known one a config hive (upsert).
    ///
    /// An unchanged entry is not rewritten, so calling this for every configured hive on each
    /// reload is cheap. If the url changes the hive goes down until a beat from the new url.
    pub fn add_static(&self, id: &str, url: &str, now_ms: i64) -> Result<(), RegistryError> {
        validate_id("id", id)?;
        let url = normalize_url("url", url)?;
        let conn = self.lock_conn();
        let existing = self.read_map().get(id).map(|e| e.rec.clone());
        let rec = match existing {
            Some(rec) if rec.source == HiveSource::Config && rec.url == url && rec.approved => {
                return Ok(());
            }
            Some(mut rec) => {
                if rec.url != url {
                    rec.url = url;
                    rec.state = HiveState::Down;
                }
                rec.source = HiveSource::Config;
                // Listed by the operator: routed, at the configured URL.
                rec.approved = true;
                rec.pending_url = None;
                rec
            }
            None => HiveRecord {
                id: id.to_owned(),
                url,
                source: HiveSource::Config,
                state: HiveState::Down,
                joined_unix_ms: now_ms,
                last_seen_unix_ms: None,
                heartbeat: None,
                approved: true,
                pending_url: None,
                bound: false,
            },
        };
        // The id keeps its credential: the operator listed the hive, it did not change hands.
        let (credential_sha256, queen_token, confirmed) =
            self.read_map().get(id).map_or((None, None, true), |e| {
                (
                    e.credential_sha256.clone(),
                    e.queen_token.clone(),
                    e.confirmed,
                )
            });
        let mut entry = Slot::new(rec);
        entry.credential_sha256 = credential_sha256;
        entry.queen_token = queen_token;
        entry.confirmed = confirmed;
        write_slot(&conn, &entry)?;
        entry.mark_stored(now_ms);
        self.write_map().insert(id.to_owned(), entry);
        Ok(())
    }

    /// Records a heartbeat authenticated by `auth` under the queen's `policy`; returns what
    /// changed: Joined (new), CameBack (was down), Beat (was up), and any secrets issued.
    ///
    /// Identity ([`identity`]): the join token binds an id that has no credential yet (a new
    /// hive, a configured one's first beat, one stored before identities existed) and is
    /// refused for a bound id ([`RegistryError::IdTaken`]); a credential must be the one issued
    /// for the beat's id ([`RegistryError::Unauthorized`]). A configured hive keeps its
    /// configured url ([`RegistryError::UrlConflict`] otherwise; the reporter may be a different
    /// machine claiming the id). A bound joined hive reporting another url keeps being routed at
    /// the old one, the new one held for an admin ([`Registry::approve`]), unless the policy
    /// approves URL changes itself. New hives beyond `max_hives` are refused
    /// ([`RegistryError::Full`]).
    pub fn heartbeat(
        &self,
        hb: &HiveHeartbeat,
        now_ms: i64,
        auth: BeatAuth<'_>,
        policy: &JoinPolicy,
    ) -> Result<Beat, RegistryError> {
        validate_id("hive_id", &hb.hive_id)?;
        let url = normalize_url("url", &hb.url)?;
        identity::validate_heartbeat(hb)?;
        let id = hb.hive_id.clone();
        let conn = self.lock_conn();
        let (beat, to_write) = {
            let mut map = self.write_map();
            let known = map.len();
            let mut issued = None;
            let mut moved_from = None;
            let mut held_before = None;
            let (outcome, entry) = match map.entry(id.clone()) {
                btree_map::Entry::Occupied(occupied) => {
                    let entry = occupied.into_mut();
                    held_before = entry.rec.pending_url.clone();
                    match (auth, &entry.credential_sha256) {
                        (BeatAuth::Credential(c), Some(h))
                            if rbee_auth::digest_hex_matches(h, c) =>
                        {
                            entry.confirmed = true;
                        }
                        (BeatAuth::Credential(_), _) => {
                            return Err(RegistryError::Unauthorized { id });
                        }
                        (BeatAuth::Join, Some(_)) => return Err(RegistryError::IdTaken { id }),
                        (BeatAuth::Join, None) => {
                            if entry.rec.source == HiveSource::Config && entry.rec.url != url {
                                return Err(RegistryError::UrlConflict {
                                    id,
                                    configured: entry.rec.url.clone(),
                                    reported: url,
                                });
                            }
                            // A hive stored before identities existed binds where it is now.
                            entry.rec.url = url.clone();
                            issued = Some(entry.issue());
                        }
                    }
                    if entry.rec.url == url {
                        entry.rec.pending_url = None;
                    } else if entry.rec.source == HiveSource::Config {
                        return Err(RegistryError::UrlConflict {
                            id,
                            configured: entry.rec.url.clone(),
                            reported: url,
                        });
                    } else if policy.auto_approve_url_change {
                        moved_from = Some(std::mem::replace(&mut entry.rec.url, url));
                        entry.rec.pending_url = None;
                    } else {
                        entry.rec.pending_url = Some(url);
                    }
                    let outcome = match entry.rec.state {
                        HiveState::Up => BeatOutcome::Beat,
                        HiveState::Down => BeatOutcome::CameBack,
                    };
                    (outcome, entry)
                }
                btree_map::Entry::Vacant(vacant) => {
                    if let BeatAuth::Credential(_) = auth {
                        return Err(RegistryError::Unauthorized { id });
                    }
                    if known >= policy.max_hives {
                        return Err(RegistryError::Full {
                            max: policy.max_hives,
                        });
                    }
                    let entry = vacant.insert(Slot::new(HiveRecord {
                        id: id.clone(),
                        url,
                        source: HiveSource::Joined,
                        state: HiveState::Up,
                        joined_unix_ms: now_ms,
                        last_seen_unix_ms: Some(now_ms),
                        heartbeat: None,
                        approved: !policy.require_approval,
                        pending_url: None,
                        bound: false,
                    }));
                    issued = Some(entry.issue());
                    (BeatOutcome::Joined, entry)
                }
            };
            entry.rec.state = HiveState::Up;
            entry.rec.last_seen_unix_ms = Some(now_ms);
            entry.rec.heartbeat = Some(hb.clone());
            let beat = Beat {
                outcome,
                approved: entry.rec.approved,
                pending_url: entry.rec.pending_url.clone(),
                moved_from,
                issued,
            };
            let due = outcome != BeatOutcome::Beat
                || beat.issued.is_some()
                || beat.moved_from.is_some()
                || beat.pending_url != held_before
                || entry
                    .stored_at_ms
                    .is_none_or(|at| now_ms < at || now_ms - at >= self.persist_interval_ms)
                || entry.stored_shape.as_ref() != Some(&shape(hb));
            if due {
                entry.mark_stored(now_ms);
                (beat, Some(entry.clone()))
            } else {
                entry.dirty = true;
                (beat, None)
            }
        };
        if let Some(slot) = to_write
            && let Err(error) = write_slot(&conn, &slot)
        {
            if beat.issued.is_some() {
                // The hive would hold secrets a restarted queen does not know: undo the
                // binding, so it asks again with the join token on its next beat.
                let mut map = self.write_map();
                if beat.outcome == BeatOutcome::Joined {
                    map.remove(&slot.rec.id);
                } else if let Some(entry) = map.get_mut(&slot.rec.id) {
                    entry.credential_sha256 = None;
                    entry.queen_token = None;
                    entry.rec.bound = false;
                    entry.confirmed = true;
                    entry.dirty = true;
                }
                return Err(RegistryError::Sqlite(error));
            }
            tracing::warn!(hive = %slot.rec.id, %error, "could not store heartbeat; kept in memory, retried on the next beat");
            if let Some(entry) = self.write_map().get_mut(&slot.rec.id) {
                entry.dirty = true;
                entry.stored_shape = None;
            }
        }
        Ok(beat)
    }

    /// An admin approves a hive: a new one is routed to from now on, a held URL is applied.
    /// `None` for an unknown id.
    pub fn approve(&self, id: &str, now_ms: i64) -> Result<Option<Approval>, RegistryError> {
        let conn = self.lock_conn();
        let Some(mut entry) = self.read_map().get(id).cloned() else {
            return Ok(None);
        };
        let approval = Approval {
            admitted: !entry.rec.approved,
            moved: entry
                .rec
                .pending_url
                .take()
                .map(|new| (std::mem::replace(&mut entry.rec.url, new.clone()), new)),
        };
        entry.rec.approved = true;
        write_slot(&conn, &entry)?;
        entry.mark_stored(now_ms);
        self.write_map().insert(id.to_owned(), entry);
        Ok(Some(approval))
    }

    /// The token the queen presents to hive `id`, once its id is bound.
    pub fn queen_token(&self, id: &str) -> Option<Token> {
        self.read_map().get(id).and_then(|e| e.queen_token.clone())
    }

    /// Marks hives whose last beat is older than `stale_after_ms` down; returns the ids that just
    /// went down, sorted. The queen passes 3 heartbeat intervals. Touches memory only.
    pub fn sweep(&self, now_ms: i64, stale_after_ms: i64) -> Result<Vec<String>, RegistryError> {
        let _conn = self.lock_conn();
        let mut gone = Vec::new();
        for (id, entry) in self.write_map().iter_mut() {
            if entry.rec.state != HiveState::Up {
                continue;
            }
            let stale = entry
                .rec
                .last_seen_unix_ms
                .is_none_or(|seen| now_ms.saturating_sub(seen) > stale_after_ms);
            if stale {
                entry.rec.state = HiveState::Down;
                gone.push(id.clone());
            }
        }
        Ok(gone)
    }

    /// Forgets a hive (memory and file), which revokes its credential and the queen's token for
    /// it: its later beats are refused until it joins again with the join token (a hive does
    /// that only without a stored credential). Returns whether it was known. The queen also
    /// removes hives dropped from its config with this.
    pub fn remove(&self, id: &str) -> Result<bool, RegistryError> {
        let conn = self.lock_conn();
        let deleted = conn
            .prepare_cached("DELETE FROM hives WHERE id = ?1")?
            .execute([id])?;
        let known = self.write_map().remove(id).is_some();
        Ok(known || deleted > 0)
    }

    /// One hive.
    pub fn get(&self, id: &str) -> Result<Option<HiveRecord>, RegistryError> {
        Ok(self.read_map().get(id).map(|e| e.rec.clone()))
    }

    /// Every hive, sorted by id.
    pub fn list(&self) -> Result<Vec<HiveRecord>, RegistryError> {
        Ok(self.read_map().values().map(|e| e.rec.clone()).collect())
    }

    /// The hives that are up, approved and past their first beat with the credential they
    /// were issued, sorted by id: what routing may use.
    pub fn up(&self) -> Result<Vec<HiveRecord>, RegistryError> {
        Ok(self
            .read_map()
            .values()
            .filter(|e| e.rec.state == HiveState::Up && e.rec.approved && e.confirmed)
            .map(|e| e.rec.clone())
            .collect())
    }

    /// Writes every hive whose latest beat was not stored yet, in one transaction. Returns how
    /// many were written. Runs on drop too (errors there are logged).
    pub fn flush(&self) -> Result<usize, RegistryError> {
        let mut conn = self.lock_conn();
        let dirty: Vec<Slot> = self
            .read_map()
            .values()
            .filter(|e| e.dirty)
            .cloned()
            .collect();
        if dirty.is_empty() {
            return Ok(0);
        }
        let tx = conn.transaction()?;
        for slot in &dirty {
            write_slot(&tx, slot)?;
        }
        tx.commit()?;
        let mut map = self.write_map();
        for slot in &dirty {
            let rec = &slot.rec;
            if let Some(entry) = map.get_mut(&rec.id) {
                let at = rec.last_seen_unix_ms.or(entry.stored_at_ms).unwrap_or(0);
                entry.mark_stored(at);
            }
        }
        Ok(dirty.len())
    }

    fn lock_conn(&self) -> MutexGuard<'_, Connection> {
        // Nothing panics while holding the lock; if something ever did, the map and file are
        // still each consistent, so carry on rather than poison every later call.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_map(&self) -> RwLockReadGuard<'_, BTreeMap<String, Slot>> {
        self.hives.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_map(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Slot>> {
        self.hives.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            tracing::warn!(path = %self.path.display(), %error, "could not store the latest heartbeats on close");
        }
    }
}

/// The parts of a heartbeat worth a write when they change: everything but the volatile
/// figures (free memory, VRAM and disk, a worker's `busy`).
fn shape(hb: &HiveHeartbeat) -> HiveHeartbeat {
    let mut s = hb.clone();
    s.resources.memory_available_bytes = 0;
    s.resources.model_disk_free_bytes = 0;
    for gpu in &mut s.resources.gpus {
        gpu.vram_free_bytes = 0;
    }
    for worker in &mut s.workers {
        worker.busy = false;
    }
    s
}

fn write_slot(conn: &Connection, slot: &Slot) -> Result<(), rusqlite::Error> {
    let rec = &slot.rec;
    let heartbeat_json = rec
        .heartbeat
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    conn.prepare_cached(UPSERT)?.execute(params![
        rec.id,
        rec.url,
        rec.source.as_str(),
        rec.joined_unix_ms,
        rec.last_seen_unix_ms,
        heartbeat_json,
        i64::from(rec.approved),
        rec.pending_url,
        slot.credential_sha256,
        slot.queen_token.as_ref().map(Token::expose),
    ])?;
    Ok(())
}

fn user_version(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

fn open_error(path: &Path, source: rusqlite::Error) -> RegistryError {
    let busy = matches!(
        source.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    if busy {
        RegistryError::Locked {
            path: path.to_path_buf(),
        }
    } else {
        RegistryError::Open {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Creates the schema on a fresh database, or checks an existing one, inside one exclusive
/// transaction (which, in exclusive locking mode, also takes the file lock for good).
fn prepare_schema(conn: &mut Connection, path: &Path) -> Result<(), RegistryError> {
    let corrupt = |reason: String| RegistryError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .map_err(|e| open_error(path, e))?;
    let version = user_version(&tx).map_err(|e| open_error(path, e))?;
    match version {
        0 => {
            let foreign: Option<String> = tx
                .query_row(
                    "SELECT name FROM sqlite_schema WHERE type = 'table' LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| open_error(path, e))?;
            if let Some(table) = foreign {
                return Err(corrupt(format!(
                    "it has tables (e.g. {table:?}) but no registry schema version"
                )));
            }
            tx.execute_batch(SCHEMA_V1)
                .map_err(|e| open_error(path, e))?;
            tx.execute_batch(SCHEMA_V2_ADD)
                .map_err(|e| open_error(path, e))?;
            tx.execute_batch(SCHEMA_V3_ADD)
                .map_err(|e| open_error(path, e))?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(|e| open_error(path, e))?;
        }
        1 | 2 => {
            if version == 1 {
                tx.execute_batch(SCHEMA_V2_ADD)
                    .map_err(|e| corrupt(format!("cannot upgrade schema 1 to 2: {e}")))?;
            }
            tx.execute_batch(SCHEMA_V3_ADD)
                .map_err(|e| corrupt(format!("cannot upgrade schema {version} to 3: {e}")))?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(|e| open_error(path, e))?;
        }
        SCHEMA_VERSION => {
            tx.prepare(
                "SELECT id, url, source, joined_unix_ms, last_seen_unix_ms, heartbeat_json,
                        approved, pending_url, credential_sha256, queen_token
                 FROM hives LIMIT 0",
            )
            .map_err(|e| corrupt(format!("the hives table is missing or malformed: {e}")))?;
            tx.prepare("SELECT client, day, tokens FROM client_tokens LIMIT 0")
                .map_err(|e| {
                    corrupt(format!(
                        "the client_tokens table is missing or malformed: {e}"
                    ))
                })?;
        }
        found if found > SCHEMA_VERSION => {
            return Err(RegistryError::SchemaTooNew {
                path: path.to_path_buf(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        other => return Err(corrupt(format!("unknown schema version {other}"))),
    }
    tx.commit().map_err(|e| open_error(path, e))?;
    Ok(())
}

/// Makes sure the database file exists, creating it 0600 so heartbeats (which list models and
/// hosts) are not world-readable. SQLite gives its `-wal` file the same mode.
fn create_private_file(path: &Path) -> Result<(), RegistryError> {
    let io = |source: std::io::Error| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("directory {} does not exist", parent.display()),
        )));
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if path.is_dir() {
                Err(io(std::io::Error::new(
                    std::io::ErrorKind::IsADirectory,
                    "is a directory",
                )))
            } else {
                Ok(())
            }
        }
        Err(e) => Err(io(e)),
    }
}

fn show(value: &str) -> String {
    let mut s: String = value.chars().take(64).collect();
    if s.len() < value.len() {
        s.push('…');
    }
    format!("{s:?}")
}

/// Hive ids: `[A-Za-z0-9._:-]{1,128}`.
fn validate_id(field: &'static str, id: &str) -> Result<(), RegistryError> {
    let reason = if id.is_empty() {
        "is empty".to_owned()
    } else if id.len() > MAX_ID_LEN {
        format!("is longer than {MAX_ID_LEN} characters")
    } else if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        format!(
            "{} contains {c:?}; allowed are A-Z a-z 0-9 . _ : -",
            show(id)
        )
    } else {
        return Ok(());
    };
    Err(RegistryError::InvalidHive { field, reason })
}

/// Checks an http(s) base url and normalises it: lowercase scheme and host, no trailing `/`.
/// No credentials, query or fragment; port 1-65535 when given.
fn normalize_url(field: &'static str, raw: &str) -> Result<String, RegistryError> {
    let bad = |reason: String| RegistryError::InvalidHive { field, reason };
    if raw.is_empty() {
        return Err(bad("is empty".to_owned()));
    }
    if raw.len() > MAX_URL_LEN {
        return Err(bad(format!("is longer than {MAX_URL_LEN} bytes")));
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(format!(
            "{} contains whitespace or control characters",
            show(raw)
        )));
    }
    let Some((scheme, rest)) = raw.split_once("://") else {
        return Err(bad(format!(
            "{} is not an http:// or https:// url",
            show(raw)
        )));
    };
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(bad(format!("{}: scheme must be http or https", show(raw))));
    }
    if rest.contains(['?', '#']) {
        return Err(bad(format!(
            "{} must not have a query or fragment",
            show(raw)
        )));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(bad(format!("{} must not carry credentials", show(raw))));
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let Some((inside, tail)) = after.split_once(']') else {
            return Err(bad(format!("{}: unclosed '[' in host", show(raw))));
        };
        if inside.is_empty()
            || !inside
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err(bad(format!("{}: invalid IPv6 address", show(raw))));
        }
        let port = if tail.is_empty() {
            None
        } else if let Some(port) = tail.strip_prefix(':') {
            Some(port)
        } else {
            return Err(bad(format!("{}: junk after the IPv6 address", show(raw))));
        };
        (format!("[{}]", inside.to_ascii_lowercase()), port)
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err(bad(format!("{} has no host", show(raw))));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(bad(format!(
                "{}: host may hold only A-Z a-z 0-9 . - _",
                show(raw)
            )));
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => String::new(),
        Some(p) => {
            let valid = !p.is_empty()
                && p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n));
            if !valid {
                return Err(bad(format!(
                    "{}: port must be a number from 1 to 65535",
                    show(raw)
                )));
            }
            format!(":{p}")
        }
    };
    let path = path.trim_end_matches('/');
    Ok(format!("{scheme}://{host}{port}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rbee_api::{HeartbeatWorker, NodeResources};

    fn hb(id: &str, free: u64, busy: bool) -> HiveHeartbeat {
        HiveHeartbeat {
            hive_id: id.into(),
            url: "http://127.0.0.1:7835".into(),
            version: "0.1.0".into(),
            resources: NodeResources {
                cpu_cores: 8,
                memory_total_bytes: 16 << 30,
                memory_available_bytes: free,
                gpus: vec![],
                model_disk_free_bytes: 100 << 30,
            },
            workers: vec![HeartbeatWorker {
                id: "w1".into(),
                model: "hf:org/repo:file.gguf".into(),
                device: "cpu".into(),
                state: rbee_api::WorkerState::Ready,
                busy,
                slots: 1,
            }],
            models: vec!["hf:org/repo:file.gguf".into()],
            model_sha256: Default::default(),
        }
    }

    thread_local! {
        static ISSUED: std::cell::RefCell<std::collections::HashMap<String, String>> =
            Default::default();
    }

    /// Beats as a hive does: with its issued credential, else the join token.
    fn beat_as_hive(reg: &Registry, hb: &HiveHeartbeat, now_ms: i64) -> BeatOutcome {
        let cred = ISSUED.with(|m| m.borrow().get(&hb.hive_id).cloned());
        let auth = cred.as_deref().map_or(BeatAuth::Join, BeatAuth::Credential);
        let beat = reg
            .heartbeat(hb, now_ms, auth, &JoinPolicy::default())
            .unwrap();
        if let Some(i) = beat.issued {
            ISSUED.with(|m| {
                m.borrow_mut()
                    .insert(hb.hive_id.clone(), i.credential.expose().to_owned())
            });
        }
        beat.outcome
    }

    fn stored(reg: &Registry, id: &str) -> Option<(Option<i64>, Option<HiveHeartbeat>)> {
        let conn = reg.lock_conn();
        conn.query_row(
            "SELECT last_seen_unix_ms, heartbeat_json FROM hives WHERE id = ?1",
            [id],
            |r| {
                let json: Option<String> = r.get(1)?;
                Ok((r.get(0)?, json.map(|j| serde_json::from_str(&j).unwrap())))
            },
        )
        .optional()
        .unwrap()
    }

    #[test]
    fn unchanged_beats_are_written_once_per_interval() {
        let reg = Registry::open_in_memory()
            .unwrap()
            .with_heartbeat_persist_interval_ms(60_000);
        assert_eq!(
            beat_as_hive(&reg, &hb("h", 100, false), 1_000),
            BeatOutcome::Joined
        );
        assert_eq!(stored(&reg, "h").unwrap().0, Some(1_000));

        // Only volatile fields changed: memory only.
        assert_eq!(
            beat_as_hive(&reg, &hb("h", 50, true), 6_000),
            BeatOutcome::Beat
        );
        let (seen, beat) = stored(&reg, "h").unwrap();
        assert_eq!(seen, Some(1_000));
        assert_eq!(beat.unwrap().resources.memory_available_bytes, 100);
        assert_eq!(
            reg.get("h").unwrap().unwrap().last_seen_unix_ms,
            Some(6_000)
        );

        // A shape change (a worker changed state) is written at once.
        let mut changed = hb("h", 50, true);
        changed.workers[0].state = rbee_api::WorkerState::Stopping;
        beat_as_hive(&reg, &changed, 11_000);
        let (seen, beat) = stored(&reg, "h").unwrap();
        assert_eq!(seen, Some(11_000));
        assert_eq!(
            beat.unwrap().workers[0].state,
            rbee_api::WorkerState::Stopping
        );

        // Unchanged again: not written until the interval has passed.
        beat_as_hive(&reg, &changed, 70_999);
        assert_eq!(stored(&reg, "h").unwrap().0, Some(11_000));
        beat_as_hive(&reg, &changed, 71_000);
        assert_eq!(stored(&reg, "h").unwrap().0, Some(71_000));

        // flush writes what is pending.
        beat_as_hive(&reg, &changed, 76_000);
        assert_eq!(reg.flush().unwrap(), 1);
        assert_eq!(stored(&reg, "h").unwrap().0, Some(76_000));
        assert_eq!(reg.flush().unwrap(), 0);
    }

    #[test]
    fn coming_back_is_always_written() {
        let reg = Registry::open_in_memory().unwrap();
        beat_as_hive(&reg, &hb("h", 100, false), 0);
        assert_eq!(reg.sweep(20_000, 15_000).unwrap(), vec!["h".to_owned()]);
        assert_eq!(
            beat_as_hive(&reg, &hb("h", 100, false), 21_000),
            BeatOutcome::CameBack
        );
        assert_eq!(stored(&reg, "h").unwrap().0, Some(21_000));
    }

    #[test]
    fn urls_are_normalised() {
        let n = |u: &str| normalize_url("url", u).unwrap();
        assert_eq!(n("HTTP://Node-1.LAN:7835/"), "http://node-1.lan:7835");
        assert_eq!(n("https://h/prefix//"), "https://h/prefix");
        assert_eq!(n("http://[::1]:7835"), "http://[::1]:7835");
        assert_eq!(n("http://[FE80::1]"), "http://[fe80::1]");
        for bad in [
            "",
            "127.0.0.1:7835",
            "ftp://h",
            "http://",
            "http://:80",
            "http://h:0",
            "http://h:65536",
            "http://h:x",
            "http://h:",
            "http://u:p@h",
            "http://h/a b",
            "http://h?x=1",
            "http://h#f",
            "http://[::1",
            "http://[::1]x",
            "http://hé",
        ] {
            assert!(normalize_url("url", bad).is_err(), "{bad:?} was accepted");
        }
    }
}
