//! Append-only, hash-chained audit log shared by the rbee hive and queen daemons.
//!
//! # Format
//!
//! The log is a file of JSON lines, one record per line, each line ending in
//! `\n`. A record's fields always appear in this order:
//!
//! ```text
//! {"seq":0,"ts":"2026-11-27T03:55:01.123Z","event":"worker.spawn","actor":"hive","details":{...},"prev":"000…000","hash":"9f2c…"}
//! ```
//!
//! - `seq`: sequence number, 0 for the genesis record, then +1 per record,
//!   continuing across restarts and across rotated files.
//! - `ts`: wall-clock time of the append, RFC 3339 in UTC with milliseconds.
//! - `event`, `actor`: what happened and who did it (free-form strings).
//! - `details`: any JSON value the caller supplies.
//! - `prev`: the `hash` of the previous record, as 64 lowercase hex digits;
//!   64 zeros ([`GENESIS_PREV`]) for the genesis record.
//! - `hash`: lowercase hex SHA-256 of the record *without* its `hash` field.
//!
//! # What is hashed
//!
//! Exactly the bytes of the line as written, minus its trailing
//! `,"hash":"<64 hex>"` member and its `\n`: that is, the compact
//! (`serde_json::to_string`) serialization of
//! `{"seq":…,"ts":…,"event":…,"actor":…,"details":…,"prev":…}` with the
//! fields in that fixed order. A writer produces a line by hashing that text
//! and then inserting `,"hash":"<hex>"` before its closing `}`. A verifier
//! strips the final `,"hash":"<hex>"}` off the line, appends `}`, and hashes
//! the result. Because the raw bytes are hashed (not a re-serialization of
//! the parsed JSON), verification does not depend on how a JSON library
//! orders object keys or round-trips floats, and any byte-level edit to a
//! line, even a cosmetic one, is detected.
//!
//! # Guarantees
//!
//! - Every [`AuditLog::append`] writes one whole line and `fsync`s it
//!   (`sync_data`) before returning the record's `seq`. A failed write is
//!   rolled back (the file is truncated to its previous length); the sequence
//!   number is only consumed by a record that reached the disk.
//! - Appends are serialized by a mutex inside [`AuditLog`], which is `Send +
//!   Sync`; share it behind an `Arc`. Only one `AuditLog` (one process) may
//!   write a given file at a time; this is not enforced.
//! - [`AuditLog::open`] resumes the chain from the last record on disk (or
//!   from the last record of `<path>.1` when the current file is empty after
//!   a rotation) and refuses to start when that record is corrupt, so a
//!   restart never silently forks the chain. A torn last line (a write cut off
//!   before its `\n`, never acknowledged) is cut away instead, and an
//!   `audit.recovered` record says how many bytes went.
//! - Files are created with mode 0600.
//! - With a size limit, the file is rotated before a record would push it
//!   past the limit: `<path>.4` → `<path>.5`, …, `<path>` → `<path>.1`
//!   (at most [`MAX_ROTATED`] old files are kept; the oldest is deleted).
//!   The chain continues across files: the first record of the new file has
//!   `prev` equal to the last hash of `<path>.1`.
//! - [`verify_file`] and [`verify_chain`] never panic on any input: a
//!   truncated, garbage or non-UTF-8 line is reported as a [`Break`].
//!
//! - The chain head (seq and hash) is checkpointed in `<path>.head` on
//!   rotation, every [`CHECKPOINT_EVERY`] records and when the writer's queue
//!   runs empty; [`verify_chain`] checks the files reach it, so cutting records
//!   off the end or deleting the current file is caught, and reopening a log
//!   that ends before its checkpoint appends `audit.tail_missing`.
//!
//! The chain is tamper-*evident*, not tamper-proof: it detects edits,
//! deletions, insertions and reordering of records, but someone who can
//! write the files (the checkpoint included) can also recompute every hash
//! after the point they edited. Keep a copy of `<path>.head` elsewhere (a
//! backup, a log shipper; rotations also log the head hash) when that
//! matters.
//!
//! # Secrets
//!
//! Tokens, passwords and other secrets are never the audit log's business:
//! it writes whatever it is given, in clear, to a file that is kept for a
//! long time. Callers must pass identifiers and fingerprints only (for
//! example a token's SHA-256 fingerprint from `rbee-auth`), never the secret.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod checkpoint;
pub mod failures;
pub use checkpoint::{CHECKPOINT_EVERY, Checkpoint, checkpoint_path, read_checkpoint};
pub use failures::{FailureAggregator, FailureLog, FailureRecord, failures_path};

/// The `prev` of the genesis record: 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How many rotated files (`<path>.1` … `<path>.5`) are kept.
pub const MAX_ROTATED: u32 = 5;

/// Why the audit log could not be opened, written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file operation failed.
    #[error("audit log I/O error on {}: {source}", path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The record the chain would resume from is damaged, so the log refuses
    /// to continue it.
    #[error("audit log {} is corrupt at line {line}: {reason}", path.display())]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// 1-based line number of the damaged record.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// The outcome of [`verify_file`] or [`verify_chain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records that verified before the first break (all of them when there
    /// is none).
    pub records: u64,
    /// The first place where the chain does not hold, if any.
    pub first_break: Option<Break>,
}

impl VerifyReport {
    /// Whether the whole chain verified.
    pub fn is_ok(&self) -> bool {
        self.first_break.is_none()
    }
}

/// Where and why a chain stops verifying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// 1-based line number within the file (for [`verify_chain`], the
    /// reason names the file).
    pub line: usize,
    /// The record's `seq`, when the line was readable enough to tell.
    pub seq: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// A record as hashed: everything but `hash`, in the fixed field order.
#[derive(Serialize)]
struct UnhashedRecord<'a> {
    seq: u64,
    ts: &'a str,
    event: &'a str,
    actor: &'a str,
    details: &'a serde_json::Value,
    prev: &'a str,
}

/// A record as read back. Every field is parsed so that its type is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // `event`, `actor` and `details` are parsed only to type-check them
struct StoredRecord {
    seq: u64,
    ts: String,
    event: String,
    actor: String,
    details: serde_json::Value,
    prev: String,
    hash: String,
}

/// The parts of a self-consistent record that link it into the chain.
#[derive(Debug)]
struct Checked {
    seq: u64,
    prev: String,
    hash: String,
}

/// An append-only audit log file. Appends are serialized by an internal
/// mutex; share it behind an `Arc`.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    max_bytes: Option<u64>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    file: File,
    size: u64,
    next_seq: u64,
    prev_hash: String,
    /// Records appended since the last checkpoint of the head.
    since_checkpoint: u64,
    /// Set when a failure left the file in an unknown state; appends are
    /// refused until the log is reopened (which re-reads the file).
    broken: Option<String>,
}

impl AuditLog {
    /// Opens (creating) the file and resumes the chain from its last record
    /// (seq and hash), so restarts continue the chain. If the file is empty
    /// but a rotated predecessor `<path>.1` exists, resumes from that file's
    /// last record. A corrupt last line is an error: the log refuses to start
    /// rather than fork the chain; a torn one (no trailing newline) is cut
    /// away and the cut recorded as `audit.recovered`.
    ///
    /// `max_bytes`, when set, is the size past which the file is rotated
    /// before the next append (a single record larger than the limit is still
    /// written, alone, into a fresh file).
    pub fn open(path: &Path, max_bytes: Option<u64>) -> Result<Self, AuditError> {
        let file = open_append(path).map_err(io_err(path))?;
        let torn = drop_torn_tail(path, &file)?;
        let size = file.metadata().map_err(io_err(path))?.len();
        let resume = if size > 0 {
            last_record(path)?
        } else {
            let previous = rotated_path(path, 1);
            match fs::metadata(&previous) {
                Ok(_) => match last_record(&previous)? {
                    Some(record) => Some(record),
                    None => {
                        return Err(AuditError::Corrupt {
                            path: previous,
                            line: 1,
                            reason: "rotated audit file is empty, so the chain cannot be resumed"
                                .to_owned(),
                        });
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err(&previous)(e)),
            }
        };
        let (next_seq, prev_hash) = match resume {
            Some(last) => {
                let Some(next) = last.seq.checked_add(1) else {
                    return Err(AuditError::Corrupt {
                        path: path.to_owned(),
                        line: 0,
                        reason: "sequence numbers are exhausted".to_owned(),
                    });
                };
                (next, last.hash)
            }
            None => (0, GENESIS_PREV.to_owned()),
        };
        tracing::info!(path = %path.display(), next_seq, size, "audit log opened");
        let checkpoint = read_checkpoint(path)?;
        let last = next_seq.checked_sub(1).map(|seq| (seq, prev_hash.as_str()));
        let missing = checkpoint
            .as_ref()
            .and_then(|cp| checkpoint::shortfall(cp, last).map(|why| (cp.clone(), why)));
        let log = Self {
            path: path.to_owned(),
            max_bytes,
            state: Mutex::new(State {
                file,
                size,
                next_seq,
                prev_hash,
                // Without a checkpoint matching the head, the next chance writes one.
                since_checkpoint: u64::from(checkpoint.is_none() || missing.is_some()),
                broken: None,
            }),
        };
        if let Some((cp, why)) = missing {
            tracing::error!(path = %path.display(), checkpoint_seq = cp.seq, reason = %why, "the audit log ends before its checkpoint; recording that and going on");
            log.append(
                "audit.tail_missing",
                "audit",
                serde_json::json!({"checkpoint_seq": cp.seq, "checkpoint_hash": cp.hash,
                                   "checkpoint_ts": cp.ts, "reason": why}),
            )?;
        }
        if let Some(dropped) = torn {
            tracing::warn!(path = %path.display(), dropped_bytes = dropped, "the audit log ended in a torn line (a write cut off, e.g. by a power loss); dropped it and recorded that");
            log.append(
                "audit.recovered",
                "audit",
                serde_json::json!({"dropped_bytes": dropped,
                                   "reason": "the last line was incomplete (no trailing newline)"}),
            )?;
        }
        Ok(log)
    }

    /// The file this log appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record (fsync'd with `sync_data`) and returns its seq.
    ///
    /// When `max_bytes` is set and the file would exceed it, rotates first:
    /// existing `<path>.N` are shifted up (keeping at most [`MAX_ROTATED`]
    /// old files), the current file becomes `<path>.1`, and a new, empty file
    /// continues the chain (its first record's `prev` is the last hash of the
    /// rotated file).
    ///
    /// `details` must not contain secrets; pass fingerprints only. Its object keys are written
    /// sorted, however the caller built it.
    pub fn append(
        &self,
        event: &str,
        actor: &str,
        details: serde_json::Value,
    ) -> Result<u64, AuditError> {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let st = &mut *guard;
        if let Some(why) = &st.broken {
            return Err(self.io(io::Error::other(format!(
                "refusing to append after an earlier failure ({why}); reopen the audit log"
            ))));
        }
        let seq = st.next_seq;
        let Some(next_seq) = seq.checked_add(1) else {
            return Err(self.io(io::Error::other("sequence numbers are exhausted")));
        };
        let ts = now_rfc3339();
        let details = sorted_keys(details);
        let body = serde_json::to_string(&UnhashedRecord {
            seq,
            ts: &ts,
            event,
            actor,
            details: &details,
            prev: &st.prev_hash,
        })
        .map_err(|e| self.io(io::Error::other(e)))?;
        let hash = sha256_hex(&[body.as_bytes()]);
        let Some(open_body) = body.strip_suffix('}') else {
            return Err(self.io(io::Error::other(
                "serialized audit record does not end with '}'",
            )));
        };
        let line = format!("{open_body},\"hash\":\"{hash}\"}}\n");
        let line_len = u64::try_from(line.len()).unwrap_or(u64::MAX);

        let over_limit = self
            .max_bytes
            .is_some_and(|max| st.size.saturating_add(line_len) > max);
        if st.size > 0 && over_limit {
            self.rotate(st)?;
        }

        let old_size = st.size;
        if let Err(e) = st
            .file
            .write_all(line.as_bytes())
            .and_then(|()| st.file.sync_data())
        {
            // Roll back a partial line so the file stays a valid chain.
            if let Err(e2) = st.file.set_len(old_size) {
                tracing::error!(
                    path = %self.path.display(),
                    error = %e2,
                    "could not roll back a failed audit append"
                );
                st.broken = Some(format!("append failed ({e}) and rollback failed ({e2})"));
            }
            return Err(self.io(e));
        }
        st.size = old_size.saturating_add(line_len);
        st.next_seq = next_seq;
        st.prev_hash = hash;
        st.since_checkpoint += 1;
        if st.since_checkpoint >= CHECKPOINT_EVERY {
            self.write_checkpoint(st);
        }
        Ok(seq)
    }

    /// Writes the checkpoint of the chain head (`<path>.head`) if records were appended since
    /// the last one. Failures are logged, not returned: the records themselves are on disk.
    pub fn checkpoint(&self) {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.since_checkpoint > 0 {
            self.write_checkpoint(&mut guard);
        }
    }

    fn write_checkpoint(&self, st: &mut State) {
        let Some(seq) = st.next_seq.checked_sub(1) else {
            return;
        };
        let cp = Checkpoint {
            seq,
            hash: st.prev_hash.clone(),
            ts: now_rfc3339(),
        };
        match checkpoint::write_checkpoint(&self.path, &cp) {
            Ok(()) => st.since_checkpoint = 0,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "could not write the audit checkpoint");
            }
        }
    }

    /// Shifts `<path>.N` up, moves the current file to `<path>.1` and starts
    /// a new, empty current file.
    fn rotate(&self, st: &mut State) -> Result<(), AuditError> {
        if st.since_checkpoint > 0 {
            self.write_checkpoint(st);
        }
        let oldest = rotated_path(&self.path, MAX_ROTATED);
        match fs::remove_file(&oldest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&oldest)(e)),
        }
        for n in (1..MAX_ROTATED).rev() {
            let from = rotated_path(&self.path, n);
            match fs::rename(&from, rotated_path(&self.path, n + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&from)(e)),
            }
        }
        let first = rotated_path(&self.path, 1);
        fs::rename(&self.path, &first).map_err(io_err(&self.path))?;
        // From here on `st.file` is `<path>.1`: it must be replaced or the
        // log must stop, or records would land in the rotated file.
        match open_append(&self.path) {
            Ok(file) => {
                st.file = file;
                st.size = 0;
            }
            Err(e) => {
                st.broken = Some(format!("could not create a new file after rotation ({e})"));
                return Err(self.io(e));
            }
        }
        sync_parent_dir(&self.path);
        tracing::info!(
            path = %self.path.display(),
            rotated_to = %first.display(),
            next_seq = st.next_seq,
            head_hash = %st.prev_hash,
            "audit log rotated"
        );
        Ok(())
    }

    fn io(&self, source: io::Error) -> AuditError {
        AuditError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

/// Verifies one file: every line parses, seq increments by 1, each hash
/// recomputes, each prev equals the previous hash. The first record's prev
/// is accepted as-is (it may link to a rotated file) unless `expect_genesis`
/// is true, in which case it must be 64 zeros and seq 0.
///
/// An empty file verifies with zero records. Only I/O failures are errors;
/// every defect in the content is reported as [`VerifyReport::first_break`].
pub fn verify_file(path: &Path, expect_genesis: bool) -> Result<VerifyReport, AuditError> {
    let mut verifier = Verifier::new(expect_genesis);
    let first_break = verifier.feed(path, false)?;
    Ok(VerifyReport {
        records: verifier.records,
        first_break,
    })
}

/// Verifies a rotated set oldest first (`<path>.5` … `<path>.1`, `<path>`),
/// checking links across files: the first record of each file must follow
/// the last record of the file before it. Missing files are skipped (the
/// links between the remaining ones are still checked); the oldest file's
/// first `prev` is accepted as-is, since its predecessor may have been
/// rotated away. A break's reason names the file it is in.
///
/// Returns an error when none of the files exists.
pub fn verify_chain(path: &Path) -> Result<VerifyReport, AuditError> {
    let checkpoint = read_checkpoint(path)?;
    let mut verifier = Verifier::new(false);
    verifier.watch = checkpoint.as_ref().map(|cp| (cp.seq, None));
    let mut found = false;
    let files = (1..=MAX_ROTATED)
        .rev()
        .map(|n| rotated_path(path, n))
        .chain(std::iter::once(path.to_owned()));
    for file in files {
        match fs::metadata(&file) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&file)(e)),
        }
        found = true;
        if let Some(first_break) = verifier.feed(&file, true)? {
            return Ok(VerifyReport {
                records: verifier.records,
                first_break: Some(first_break),
            });
        }
    }
    if !found && checkpoint.is_none() {
        return Err(io_err(path)(io::Error::new(
            io::ErrorKind::NotFound,
            "neither the audit log nor any rotated file exists",
        )));
    }
    let first_break = checkpoint.and_then(|cp| {
        let last = verifier.last.as_ref().map(|(s, h)| (*s, h.as_str()));
        let replaced = verifier
            .watch
            .as_ref()
            .and_then(|(_, seen)| seen.as_ref())
            .filter(|h| **h != cp.hash)
            .map(|_| {
                format!(
                    "the record at seq {} is not the one the checkpoint holds: it was replaced",
                    cp.seq
                )
            });
        let why = checkpoint::shortfall(&cp, last).or(replaced)?;
        Some(Break {
            line: 0,
            seq: Some(cp.seq),
            reason: format!("{}: {why}", checkpoint_path(path).display()),
        })
    });
    Ok(VerifyReport {
        records: verifier.records,
        first_break,
    })
}

/// Chain state carried across lines and files.
struct Verifier {
    records: u64,
    last: Option<(u64, String)>,
    expect_genesis: bool,
    /// A checkpoint's seq, and the hash of the record with that seq once seen.
    watch: Option<(u64, Option<String>)>,
}

impl Verifier {
    fn new(expect_genesis: bool) -> Self {
        Self {
            records: 0,
            last: None,
            expect_genesis,
            watch: None,
        }
    }

    /// Verifies `path` line by line, continuing the chain from earlier
    /// files. Returns the first break, if any.
    fn feed(&mut self, path: &Path, name_file: bool) -> Result<Option<Break>, AuditError> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        let mut line = 0usize;
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf).map_err(io_err(path))?;
            if n == 0 {
                return Ok(None);
            }
            line = line.saturating_add(1);
            let brk = |seq: Option<u64>, reason: String| {
                let reason = if name_file {
                    format!("{}: {reason}", path.display())
                } else {
                    reason
                };
                Some(Break { line, seq, reason })
            };
            let Some(raw) = buf.strip_suffix(b"\n") else {
                return Ok(brk(
                    seq_hint(&buf),
                    "truncated line (no trailing newline; torn write?)".to_owned(),
                ));
            };
            let record = match check_record(raw) {
                Ok(record) => record,
                Err((seq, reason)) => return Ok(brk(seq, reason)),
            };
            match &self.last {
                Some((last_seq, last_hash)) => {
                    if last_seq.checked_add(1) != Some(record.seq) {
                        return Ok(brk(
                            Some(record.seq),
                            format!(
                                "seq {} does not follow seq {last_seq} (record missing, inserted or out of order)",
                                record.seq
                            ),
                        ));
                    }
                    if record.prev != *last_hash {
                        return Ok(brk(
                            Some(record.seq),
                            "prev does not match the hash of the previous record".to_owned(),
                        ));
                    }
                }
                None if self.expect_genesis => {
                    if record.seq != 0 {
                        return Ok(brk(
                            Some(record.seq),
                            format!("genesis record has seq {}, expected 0", record.seq),
                        ));
                    }
                    if record.prev != GENESIS_PREV {
                        return Ok(brk(
                            Some(record.seq),
                            "genesis record's prev is not 64 zeros".to_owned(),
                        ));
                    }
                }
                None => {}
            }
            self.records = self.records.saturating_add(1);
            if let Some((seq, seen)) = &mut self.watch
                && *seq == record.seq
            {
                *seen = Some(record.hash.clone());
            }
            self.last = Some((record.seq, record.hash));
        }
    }
}

/// Checks that one line (without its `\n`) is a well-formed record whose
/// hash recomputes. On failure returns the seq if it could be read, and why.
fn check_record(raw: &[u8]) -> Result<Checked, (Option<u64>, String)> {
    if raw.is_empty() {
        return Err((None, "empty line".to_owned()));
    }
    let text = std::str::from_utf8(raw).map_err(|e| (None, format!("line is not UTF-8: {e}")))?;
    let record: StoredRecord = serde_json::from_str(text)
        .map_err(|e| (seq_hint(raw), format!("not a valid audit record: {e}")))?;
    let seq = Some(record.seq);
    if !is_valid_ts(&record.ts) {
        return Err((seq, format!("malformed timestamp {:?}", record.ts)));
    }
    if !is_hex64(&record.prev) {
        return Err((seq, "prev is not 64 lowercase hex digits".to_owned()));
    }
    if !is_hex64(&record.hash) {
        return Err((seq, "hash is not 64 lowercase hex digits".to_owned()));
    }
    let suffix = format!(",\"hash\":\"{}\"}}", record.hash);
    let Some(body) = text.strip_suffix(suffix.as_str()) else {
        return Err((
            seq,
            "hash is not the last field of the line (line was not written by the audit log)"
                .to_owned(),
        ));
    };
    if sha256_hex(&[body.as_bytes(), b"}"]) != record.hash {
        return Err((
            seq,
            "hash mismatch: the record's content does not match its hash".to_owned(),
        ));
    }
    Ok(Checked {
        seq: record.seq,
        prev: record.prev,
        hash: record.hash,
    })
}

/// Best-effort `seq` of a line that failed to parse as a record.
fn seq_hint(raw: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(raw)
        .ok()?
        .get("seq")?
        .as_u64()
}

/// Reads and checks the last record of `path`; `None` when the file is empty.
/// Opens `path` for appending, creating it 0600: audit records name clients, hives and
/// addresses.
fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// A last line without its `\n` is a write that was cut off (power loss, a full disk): it was
/// never acknowledged, so it is cut away and the chain resumes from the record before it.
/// Returns how many bytes were dropped. A complete line that does not verify is left alone
/// (that is an edit, and [`AuditLog::open`] refuses it).
fn drop_torn_tail(path: &Path, file: &File) -> Result<Option<u64>, AuditError> {
    let Some(tail) = read_last_line(path).map_err(io_err(path))? else {
        return Ok(None);
    };
    if tail.terminated {
        return Ok(None);
    }
    let len = file.metadata().map_err(io_err(path))?.len();
    file.set_len(tail.start).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(Some(len - tail.start))
}

fn last_record(path: &Path) -> Result<Option<Checked>, AuditError> {
    let Some(tail) = read_last_line(path).map_err(io_err(path))? else {
        return Ok(None);
    };
    let failure = if !tail.terminated {
        Some("last line is truncated (no trailing newline; torn write?)".to_owned())
    } else {
        match check_record(&tail.bytes) {
            Ok(record) => return Ok(Some(record)),
            Err((_, reason)) => Some(reason),
        }
    };
    let line = count_newlines(path, tail.start)
        .unwrap_or(0)
        .saturating_add(1);
    Err(AuditError::Corrupt {
        path: path.to_owned(),
        line,
        reason: failure.unwrap_or_default(),
    })
}

struct TailLine {
    /// Byte offset where the line starts.
    start: u64,
    /// The line without its `\n`.
    bytes: Vec<u8>,
    /// Whether the line ended in `\n`.
    terminated: bool,
}

/// Reads the last line of a file by scanning backwards from its end, so
/// opening a large log does not read all of it.
fn read_last_line(path: &Path) -> io::Result<Option<TailLine>> {
    const CHUNK: u64 = 8192;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    let terminated = last == [b'\n'];
    let end = if terminated { len - 1 } else { len };
    let mut start = 0;
    let mut pos = end;
    while pos > 0 {
        let n = pos.min(CHUNK);
        pos -= n;
        let mut chunk = vec![0u8; usize::try_from(n).map_err(io::Error::other)?];
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            start = pos + u64::try_from(i).map_err(io::Error::other)? + 1;
            break;
        }
    }
    let mut bytes = vec![0u8; usize::try_from(end - start).map_err(io::Error::other)?];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut bytes)?;
    Ok(Some(TailLine {
        start,
        bytes,
        terminated,
    }))
}

/// How many `\n` bytes lie before `offset` (for error messages only).
fn count_newlines(path: &Path, offset: u64) -> io::Result<usize> {
    let mut reader = BufReader::new(File::open(path)?.take(offset));
    let mut count = 0usize;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(count);
        }
        count = count.saturating_add(buf.iter().filter(|&&b| b == b'\n').count());
        let n = buf.len();
        reader.consume(n);
    }
}

/// `<path>.<n>`.
fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Makes renames in the log's directory durable (best effort).
fn sync_parent_dir(path: &Path) {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not fsync the audit log directory");
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Lowercase hex SHA-256 of the concatenation of `parts`.
fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut out = String::with_capacity(64);
    for byte in digest {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `s` has the shape `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn is_valid_ts(s: &str) -> bool {
    const PATTERN: &[u8; 24] = b"dddd-dd-ddTdd:dd:dd.dddZ";
    s.len() == PATTERN.len()
        && s.bytes().zip(PATTERN.iter()).all(|(b, &p)| {
            if p == b'd' {
                b.is_ascii_digit()
            } else {
                b == p
            }
        })
}

/// The current time as RFC 3339 UTC with milliseconds.
/// A JSON value with every object's keys in sorted order (serde_json may keep insertion order,
/// which would make the same details read differently from call to call).
fn sorted_keys(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(String, serde_json::Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sorted_keys(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(sorted_keys).collect())
        }
        other => other,
    }
}

fn now_rfc3339() -> String {
    let unix_ms = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    };
    format_rfc3339_millis(unix_ms)
}

/// Formats milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn format_rfc3339_millis(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day); Howard
/// Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh, empty directory unique to this test run.
    fn temp_dir(name: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rbee-audit-test-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn append_n(log: &AuditLog, range: std::ops::Range<u64>) {
        for n in range {
            let seq = log
                .append("worker.spawn", "hive", json!({"n": n, "model": "tiny"}))
                .unwrap();
            assert_eq!(seq, n);
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        fs::write(path, text).unwrap();
    }

    #[test]
    fn audit_log_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<AuditLog>();
    }

    #[test]
    fn append_then_verify() {
        let dir = temp_dir("append");
        let path = dir.join("audit.log");
        let log = AuditLog::open(&path, None).unwrap();
        append_n(&log, 0..3);

        let report = verify_file(&path, true).unwrap();
        assert_eq!(
            report,
            VerifyReport {
                records: 3,
                first_break: None
            }
        );
        assert!(report.is_ok());

        // The documented format: fixed field order, genesis prev, and the
        // hash over the line with its hash member removed.
        let all = lines(&path);
        assert_eq!(all.len(), 3);
        let first = &all[0];
        assert!(first.starts_with("{\"seq\":0,\"ts\":\""), "{first}");
        assert!(
            first.contains(&format!(
                ",\"event\":\"worker.spawn\",\"actor\":\"hive\",\"details\":{{\"model\":\"tiny\",\"n\":0}},\"prev\":\"{GENESIS_PREV}\",\"hash\":\""
            )),
            "{first}"
        );
        for (i, line) in all.iter().enumerate() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            let hash = value["hash"].as_str().unwrap();
            let unhashed = line
                .strip_suffix(&format!(",\"hash\":\"{hash}\"}}"))
                .unwrap()
                .to_owned()
                + "}";
            assert_eq!(sha256_hex(&[unhashed.as_bytes()]), hash);
            assert!(is_valid_ts(value["ts"].as_str().unwrap()));
            if i > 0 {
                let before: serde_json::Value = serde_json::from_str(&all[i - 1]).unwrap();
                assert_eq!(value["prev"], before["hash"]);
            }
        }
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reopen_continues_seq_and_chain() {
        let dir = temp_dir("reopen");
        let path = dir.join("audit.log");
        append_n(&AuditLog::open(&path, None).unwrap(), 0..2);
        append_n(&AuditLog::open(&path, None).unwrap(), 2..4);
        let log = AuditLog::open(&path, None).unwrap();
        assert_eq!(log.append("queen.start", "queen", json!(null)).unwrap(), 4);
        assert_eq!(
            verify_file(&path, true).unwrap(),
            VerifyReport {
                records: 5,
                first_break: None
            }
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tampered_details_break_at_that_line() {
        let dir = temp_dir("tamper");
        let path = dir.join("audit.log");
        append_n(&AuditLog::open(&path, None).unwrap(), 0..5);
        let mut all = lines(&path);
        assert!(all[2].contains("\"n\":2"));
        all[2] = all[2].replace("\"n\":2", "\"n\":9");
        write_lines(&path, &all);

        let report = verify_file(&path, true).unwrap();
        assert_eq!(report.records, 2);
        let brk = report.first_break.unwrap();
        assert_eq!((brk.line, brk.seq), (3, Some(2)));
        assert!(brk.reason.contains("hash mismatch"), "{}", brk.reason);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn deleted_line_breaks() {
        let dir = temp_dir("delete");
        let path = dir.join("audit.log");
        append_n(&AuditLog::open(&path, None).unwrap(), 0..5);
        let mut all = lines(&path);
        all.remove(2);
        write_lines(&path, &all);

        let brk = verify_file(&path, true).unwrap().first_break.unwrap();
        assert_eq!((brk.line, brk.seq), (3, Some(3)));
        assert!(brk.reason.contains("does not follow"), "{}", brk.reason);

        // Deleting the genesis record is caught when genesis is expected.
        let mut all = lines(&path);
        all.remove(0);
        write_lines(&path, &all);
        let brk = verify_file(&path, true).unwrap().first_break.unwrap();
        assert_eq!((brk.line, brk.seq), (1, Some(1)));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reordered_lines_break() {
        let dir = temp_dir("reorder");
        let path = dir.join("audit.log");
        append_n(&AuditLog::open(&path, None).unwrap(), 0..5);
        let mut all = lines(&path);
        all.swap(1, 2);
        write_lines(&path, &all);

        let report = verify_file(&path, true).unwrap();
        assert_eq!(report.records, 1);
        let brk = report.first_break.unwrap();
        assert_eq!((brk.line, brk.seq), (2, Some(2)));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn garbage_line_breaks_without_panicking() {
        let dir = temp_dir("garbage");
        let path = dir.join("audit.log");
        append_n(&AuditLog::open(&path, None).unwrap(), 0..3);
        let original = fs::read(&path).unwrap();
        let second_line = original.iter().position(|&b| b == b'\n').unwrap() + 1;

        let garbage: [&[u8]; 6] = [
            b"\x00\xff\xfenot json {{{",
            b"",
            b"{\"seq\":1}",
            b"[1,2,3]",
            b"{\"seq\":18446744073709551616,\"hash\":\"x\"}",
            "{\"seq\":1,\"ts\":\"\u{1F41D}\"}".as_bytes(),
        ];
        for junk in garbage {
            let mut bytes = original[..second_line].to_vec();
            bytes.extend_from_slice(junk);
            bytes.push(b'\n');
            bytes.extend_from_slice(&original[second_line..]);
            fs::write(&path, &bytes).unwrap();
            let report = verify_file(&path, true).unwrap();
            assert_eq!(report.records, 1);
            assert_eq!(report.first_break.unwrap().line, 2);
        }

        // Every truncation and every single-bit flip of a valid file is
        // handled without a panic; flips are always detected.
        for len in 0..original.len() {
            fs::write(&path, &original[..len]).unwrap();
            let report = verify_file(&path, true).unwrap();
            let at_boundary = len == 0 || original[len - 1] == b'\n';
            assert_eq!(report.is_ok(), at_boundary, "truncated to {len} bytes");
        }
        for i in 0..original.len() {
            let mut bytes = original.clone();
            bytes[i] ^= 0x01;
            fs::write(&path, &bytes).unwrap();
            let report = verify_file(&path, true).unwrap();
            assert!(!report.is_ok(), "bit flip at byte {i} went undetected");
        }
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn open_recovers_a_torn_last_line_and_refuses_a_corrupt_one() {
        let dir = temp_dir("corrupt-open");
        let path = dir.join("audit.log");
        append_n(&AuditLog::open(&path, None).unwrap(), 0..3);
        let original = fs::read(&path).unwrap();

        // Torn write: the last line lost its tail. It is dropped, the chain resumes from the
        // record before it, and the recovery is itself recorded.
        fs::write(&path, &original[..original.len() - 10]).unwrap();
        let log = AuditLog::open(&path, None).unwrap();
        assert_eq!(log.append("x", "y", json!({})).unwrap(), 3);
        drop(log);
        let all = lines(&path);
        assert_eq!(all.len(), 4);
        assert!(
            all[2].contains("\"event\":\"audit.recovered\""),
            "{}",
            all[2]
        );
        assert!(verify_file(&path, true).unwrap().is_ok());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // Garbage last line.
        let mut bytes = original.clone();
        bytes.extend_from_slice(b"garbage\n");
        fs::write(&path, &bytes).unwrap();
        match AuditLog::open(&path, None) {
            Err(AuditError::Corrupt { line, .. }) => assert_eq!(line, 4),
            other => panic!("expected Corrupt, got {other:?}"),
        }

        // Tampered last record.
        let mut all = lines(&path);
        all.pop();
        all[2] = all[2].replace("\"n\":2", "\"n\":3");
        write_lines(&path, &all);
        assert!(matches!(
            AuditLog::open(&path, None),
            Err(AuditError::Corrupt { line: 3, .. })
        ));

        // Restoring the file lets it open and continue.
        fs::write(&path, &original).unwrap();
        let log = AuditLog::open(&path, None).unwrap();
        assert_eq!(log.append("x", "y", json!({})).unwrap(), 3);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotation_chains_across_files_and_reopen_continues() {
        let dir = temp_dir("rotate");
        let path = dir.join("audit.log");
        let record_len = {
            let probe = dir.join("probe.log");
            append_n(&AuditLog::open(&probe, None).unwrap(), 0..1);
            fs::metadata(&probe).unwrap().len()
        };
        // Room for two records per file (records with larger `n` are a
        // byte or so longer, hence the slack).
        let max = record_len * 2 + 8;
        let log = AuditLog::open(&path, Some(max)).unwrap();
        append_n(&log, 0..7);
        drop(log);

        assert_eq!(lines(&path).len(), 1);
        assert_eq!(lines(&rotated_path(&path, 1)).len(), 2);
        assert_eq!(lines(&rotated_path(&path, 2)).len(), 2);
        assert_eq!(lines(&rotated_path(&path, 3)).len(), 2);
        assert!(!rotated_path(&path, 4).exists());
        for file in [path.clone(), rotated_path(&path, 1), rotated_path(&path, 2)] {
            assert!(fs::metadata(file).unwrap().len() <= max);
        }

        assert_eq!(
            verify_chain(&path).unwrap(),
            VerifyReport {
                records: 7,
                first_break: None
            }
        );
        assert!(verify_file(&rotated_path(&path, 3), true).unwrap().is_ok());
        assert!(verify_file(&rotated_path(&path, 1), false).unwrap().is_ok());
        // The newest file does not start the chain.
        assert!(!verify_file(&path, true).unwrap().is_ok());

        // Reopening after rotation continues the chain.
        let log = AuditLog::open(&path, Some(max)).unwrap();
        assert_eq!(log.append("worker.stop", "hive", json!({})).unwrap(), 7);
        drop(log);
        assert_eq!(verify_chain(&path).unwrap().records, 8);

        // A record removed from a rotated file breaks the chain there.
        let middle = rotated_path(&path, 2);
        let mut all = lines(&middle);
        all.remove(0);
        write_lines(&middle, &all);
        let brk = verify_chain(&path).unwrap().first_break.unwrap();
        assert_eq!(brk.line, 1);
        assert!(brk.reason.contains("audit.log.2"), "{}", brk.reason);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotation_keeps_at_most_five_old_files() {
        let dir = temp_dir("rotate-keep");
        let path = dir.join("audit.log");
        // Every record gets a file of its own.
        let log = AuditLog::open(&path, Some(1)).unwrap();
        append_n(&log, 0..10);
        drop(log);

        for n in 1..=MAX_ROTATED {
            assert_eq!(lines(&rotated_path(&path, n)).len(), 1);
        }
        assert!(!rotated_path(&path, MAX_ROTATED + 1).exists());
        // Records 0..4 were rotated away; the oldest kept file links to a
        // deleted one, which verify_chain accepts.
        assert_eq!(
            verify_chain(&path).unwrap(),
            VerifyReport {
                records: 6,
                first_break: None
            }
        );
        let oldest = lines(&rotated_path(&path, MAX_ROTATED));
        assert!(oldest[0].starts_with("{\"seq\":4,"));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn open_resumes_from_rotated_file_when_current_is_empty() {
        let dir = temp_dir("resume-rotated");
        let path = dir.join("audit.log");
        append_n(&AuditLog::open(&path, None).unwrap(), 0..3);
        // As if the process died right after moving the file to `.1`.
        fs::rename(&path, rotated_path(&path, 1)).unwrap();

        let log = AuditLog::open(&path, None).unwrap();
        assert_eq!(log.append("queen.start", "queen", json!({})).unwrap(), 3);
        drop(log);
        assert_eq!(
            verify_chain(&path).unwrap(),
            VerifyReport {
                records: 4,
                first_break: None
            }
        );

        // An empty `.1` cannot be resumed from.
        fs::write(&path, b"").unwrap();
        fs::write(rotated_path(&path, 1), b"").unwrap();
        assert!(matches!(
            AuditLog::open(&path, None),
            Err(AuditError::Corrupt { .. })
        ));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn concurrent_appends_form_one_chain() {
        let dir = temp_dir("threads");
        let path = dir.join("audit.log");
        let log = Arc::new(AuditLog::open(&path, None).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    (0..25)
                        .map(|i| {
                            log.append("job.submit", &format!("t{t}"), json!({ "i": i }))
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seqs: Vec<u64> = threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..100).collect::<Vec<_>>());
        assert_eq!(verify_file(&path, true).unwrap().records, 100);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn verify_edge_cases() {
        let dir = temp_dir("verify-edge");
        let path = dir.join("audit.log");
        assert!(matches!(verify_chain(&path), Err(AuditError::Io { .. })));
        assert!(matches!(
            verify_file(&path, false),
            Err(AuditError::Io { .. })
        ));
        fs::write(&path, b"").unwrap();
        assert_eq!(
            verify_file(&path, true).unwrap(),
            VerifyReport {
                records: 0,
                first_break: None
            }
        );
        // Secrets-free strings with quotes, newlines and unicode survive.
        let log = AuditLog::open(&path, None).unwrap();
        log.append(
            "auth.denied",
            "client \"a\"\nb",
            json!({"fingerprint": "sha256:ab12", "note": "\u{1F41D}", "f": 0.1}),
        )
        .unwrap();
        assert!(verify_file(&path, true).unwrap().is_ok());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn timestamps_are_rfc3339_utc_millis() {
        assert_eq!(
            format_rfc3339_millis(1_795_751_701_123),
            "2026-11-27T03:55:01.123Z"
        );
        assert_eq!(format_rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_millis(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            format_rfc3339_millis(4_102_444_799_999),
            "2099-12-31T23:59:59.999Z"
        );
        assert_eq!(
            format_rfc3339_millis(4_107_542_400_000),
            "2100-03-01T00:00:00.000Z"
        );
        assert_eq!(format_rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
        let now = now_rfc3339();
        assert!(is_valid_ts(&now), "{now}");
        assert!(now.as_str() > "2024-01-01T00:00:00.000Z");
    }
}

enum WriterMsg {
    Record {
        event: String,
        actor: String,
        details: serde_json::Value,
    },
    Flush(std::sync::mpsc::Sender<()>),
}

/// An [`AuditLog`] written by its own thread, so a daemon's async threads never wait on the
/// fsync of each record. Records queue in a bounded channel; when it is full (a flood of
/// events) [`AuditWriter::record`] drops the record and says so.
#[derive(Clone)]
pub struct AuditWriter {
    tx: std::sync::mpsc::SyncSender<WriterMsg>,
}

impl AuditWriter {
    /// Starts the writer thread for `log`, with room for `queue` records in flight.
    pub fn spawn(log: AuditLog, queue: usize) -> io::Result<AuditWriter> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<WriterMsg>(queue.max(1));
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                let write = |msg: WriterMsg| match msg {
                    WriterMsg::Record {
                        event,
                        actor,
                        details,
                    } => {
                        if let Err(e) = log.append(&event, &actor, details) {
                            tracing::error!(error = %e, event, "audit log append failed");
                        }
                    }
                    WriterMsg::Flush(done) => {
                        log.checkpoint();
                        let _ = done.send(());
                    }
                };
                while let Ok(msg) = rx.recv() {
                    write(msg);
                    while let Ok(msg) = rx.try_recv() {
                        write(msg);
                    }
                    // The queue is idle: the head on disk is checkpointed.
                    log.checkpoint();
                }
            })?;
        Ok(AuditWriter { tx })
    }

    /// Queues one record; false when the queue was full and the record was dropped.
    pub fn record(&self, event: &str, actor: &str, details: serde_json::Value) -> bool {
        self.tx
            .try_send(WriterMsg::Record {
                event: event.to_owned(),
                actor: actor.to_owned(),
                details,
            })
            .is_ok()
    }

    /// Blocks until every record queued before this call is on disk, or `timeout` passed.
    pub fn flush(&self, timeout: std::time::Duration) {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        if self.tx.send(WriterMsg::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(timeout);
        }
    }
}
