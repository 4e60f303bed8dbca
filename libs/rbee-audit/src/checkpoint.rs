//! The chain head, checkpointed outside the log in `<path>.head`, so that cutting records off
//! the end or deleting the current file (which leaves a chain that verifies on its own) is
//! caught: [`crate::verify_chain`] checks the files against it, and [`crate::AuditLog::open`]
//! records `audit.tail_missing` when the log it resumes ends before its checkpoint.
//!
//! It is written (to a temporary file, fsync'd, renamed over the old one) on rotation, every
//! [`CHECKPOINT_EVERY`] records, and whenever the [`crate::AuditWriter`]'s queue runs empty. A
//! copy of it kept elsewhere (a backup, a log shipper) also survives someone who deletes the
//! whole directory.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{AuditError, io_err};

/// Records appended between two checkpoints at most (while appends keep coming).
pub const CHECKPOINT_EVERY: u64 = 64;

/// The last record known to be on disk: its seq and hash, and when that was checkpointed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub ts: String,
}

/// Where the checkpoint of the log at `path` lives: `<path>.head`.
pub fn checkpoint_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}

/// Reads the checkpoint of the log at `path`, if there is one.
pub fn read_checkpoint(path: &Path) -> Result<Option<Checkpoint>, AuditError> {
    let file = checkpoint_path(path);
    let text = match fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&file)(e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| AuditError::Corrupt {
            path: file,
            line: 1,
            reason: format!("not a checkpoint: {e}"),
        })
}

/// Replaces the checkpoint of the log at `path` with `cp`, atomically (mode 0600).
pub(crate) fn write_checkpoint(path: &Path, cp: &Checkpoint) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = checkpoint_path(path);
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let body = serde_json::to_string(cp).map_err(io::Error::other)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(body.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_data()?;
    fs::rename(&tmp, &file)
}

/// Why the chain that ends at `last` (seq and hash, or nothing at all) does not reach `cp`;
/// `None` when it does (it may go on past it).
pub(crate) fn shortfall(cp: &Checkpoint, last: Option<(u64, &str)>) -> Option<String> {
    match last {
        None => Some(format!(
            "no records, but the checkpoint says seq {} was written: the log was deleted",
            cp.seq
        )),
        Some((seq, _)) if seq < cp.seq => Some(format!(
            "the log ends at seq {seq}, but the checkpoint says seq {} was written: records were cut from the end or the current file was deleted",
            cp.seq
        )),
        Some((seq, hash)) if seq == cp.seq && hash != cp.hash => Some(format!(
            "the last record (seq {seq}) is not the one the checkpoint holds: it was replaced"
        )),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::{AuditLog, AuditWriter, verify_chain};

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "rbee-audit-checkpoint-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn log_with(path: &Path, n: u64, max_bytes: Option<u64>) {
        let log = AuditLog::open(path, max_bytes).unwrap();
        let writer = AuditWriter::spawn(log, 64).unwrap();
        for i in 0..n {
            assert!(writer.record("admin.test", "alice", json!({"n": i})));
        }
        writer.flush(std::time::Duration::from_secs(5));
    }

    fn reason(path: &Path) -> String {
        let report = verify_chain(path).unwrap();
        report.first_break.map(|b| b.reason).unwrap_or_default()
    }

    #[test]
    fn the_head_is_checkpointed_when_the_writer_goes_idle() {
        let dir = temp_dir("idle");
        let path = dir.join("audit.jsonl");
        log_with(&path, 3, None);
        let cp = read_checkpoint(&path).unwrap().unwrap();
        assert_eq!(cp.seq, 2);
        assert!(verify_chain(&path).unwrap().is_ok());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(checkpoint_path(&path))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_cut_tail_a_deleted_file_and_a_replaced_record_are_caught() {
        let dir = temp_dir("attacks");
        let path = dir.join("audit.jsonl");
        log_with(&path, 5, None);
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Cut the last two records: the rest still chains, but not to the checkpoint.
        fs::write(&path, format!("{}\n", lines[..3].join("\n"))).unwrap();
        assert!(
            reason(&path).contains("cut from the end"),
            "{}",
            reason(&path)
        );
        // A head that is not the checkpointed one (as after rewriting the last record and
        // recomputing its hash).
        fs::write(&path, format!("{}\n", lines.join("\n"))).unwrap();
        assert!(verify_chain(&path).unwrap().is_ok());
        let mut cp = read_checkpoint(&path).unwrap().unwrap();
        cp.hash = "f".repeat(64);
        write_checkpoint(&path, &cp).unwrap();
        assert!(reason(&path).contains("replaced"), "{}", reason(&path));
        // Delete the log: the checkpoint says it existed.
        fs::remove_file(&path).unwrap();
        assert!(reason(&path).contains("deleted"), "{}", reason(&path));
    }

    #[test]
    fn deleting_the_current_file_after_a_rotation_is_caught() {
        let dir = temp_dir("rotated");
        let path = dir.join("audit.jsonl");
        log_with(&path, 20, Some(1_000));
        assert!(crate::rotated_path(&path, 1).exists());
        assert!(verify_chain(&path).unwrap().is_ok());
        fs::remove_file(&path).unwrap();
        assert!(
            reason(&path).contains("cut from the end"),
            "{}",
            reason(&path)
        );
    }

    #[test]
    fn reopening_a_log_cut_short_records_that_it_was() {
        let dir = temp_dir("reopen");
        let path = dir.join("audit.jsonl");
        log_with(&path, 4, None);
        let text = fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text.lines().take(2).collect();
        fs::write(&path, format!("{}\n", kept.join("\n"))).unwrap();
        log_with(&path, 1, None);
        let text = fs::read_to_string(&path).unwrap();
        let note: serde_json::Value = serde_json::from_str(text.lines().nth(2).unwrap()).unwrap();
        assert_eq!(note["event"], "audit.tail_missing");
        assert_eq!(note["details"]["checkpoint_seq"], 3);
        // The chain now holds the note, and the checkpoint follows it.
        assert!(verify_chain(&path).unwrap().is_ok());
    }
}
