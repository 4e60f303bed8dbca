//! Authentication failures, aggregated so that a flood of bad requests costs a few records, not
//! one fsync'd record each: per (source, reason) and window, the first failure is recorded at
//! once and the rest are counted into one summary when the window ends. Past
//! [`MAX_SOURCES`] sources in a window, new sources share the source `other`, so spraying from
//! many addresses cannot grow the table or the records either.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{AuditError, AuditLog, AuditWriter};

/// How long one summary covers.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Distinct (source, reason) pairs tracked at once; more share the source `other`.
pub const MAX_SOURCES: usize = 256;

/// What to record for failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureRecord {
    /// The first failure of `source` for `reason` in a window: record it with its details.
    First { source: String, reason: String },
    /// The failures after the first in a window that ended: one record with their count.
    Summary {
        source: String,
        reason: String,
        count: u64,
        window_seconds: u64,
    },
}

impl FailureRecord {
    fn key(&self) -> (&str, &str) {
        match self {
            FailureRecord::First { source, reason }
            | FailureRecord::Summary { source, reason, .. } => (source, reason),
        }
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// Failures after the first.
    more: u64,
}

/// Open windows per (source, reason).
#[derive(Debug, Default)]
pub struct FailureAggregator {
    windows: HashMap<(String, String), Window>,
}

impl FailureAggregator {
    /// A failure from `source` (an address) for `reason` at `now`: what to record now.
    pub fn failure(&mut self, source: &str, reason: &str, now: Instant) -> Vec<FailureRecord> {
        let mut out = self.due(now);
        let mut key = (source.to_owned(), reason.to_owned());
        if !self.windows.contains_key(&key) && self.windows.len() >= MAX_SOURCES {
            key.0 = "other".to_owned();
        }
        match self.windows.get_mut(&key) {
            Some(w) => w.more = w.more.saturating_add(1),
            None => {
                out.push(FailureRecord::First {
                    source: key.0.clone(),
                    reason: key.1.clone(),
                });
                self.windows.insert(
                    key,
                    Window {
                        started: now,
                        more: 0,
                    },
                );
            }
        }
        out
    }

    /// Summaries of the windows that ended by `now` (call it every few seconds).
    pub fn due(&mut self, now: Instant) -> Vec<FailureRecord> {
        self.end(now, false)
    }

    /// Summaries of every open window, ended early (at shutdown).
    pub fn end_all(&mut self, now: Instant) -> Vec<FailureRecord> {
        self.end(now, true)
    }

    fn end(&mut self, now: Instant, all: bool) -> Vec<FailureRecord> {
        let mut out = Vec::new();
        self.windows.retain(|(source, reason), w| {
            let took = now.saturating_duration_since(w.started);
            if took < FAILURE_WINDOW && !all {
                return true;
            }
            if w.more > 0 {
                out.push(FailureRecord::Summary {
                    source: source.clone(),
                    reason: reason.clone(),
                    count: w.more,
                    window_seconds: took.as_secs(),
                });
            }
            false
        });
        // In a stable order (the map's is not).
        out.sort_by(|a, b| a.key().cmp(&b.key()));
        out
    }
}

/// Where a daemon's failures log lives, beside its audit log `main`:
/// `/var/log/rbee/queen-audit.jsonl` → `/var/log/rbee/queen-audit.auth-failures.jsonl`.
pub fn failures_path(main: &Path) -> PathBuf {
    let stem = main
        .file_stem()
        .map_or_else(|| "audit".into(), |s| s.to_string_lossy());
    let name = match main.extension() {
        Some(ext) => format!("{stem}.auth-failures.{}", ext.to_string_lossy()),
        None => format!("{stem}.auth-failures"),
    };
    main.with_file_name(name)
}

/// A daemon's record of unauthenticated failures: its own chain (so a flood can never rotate
/// the main audit log's history out), written through an [`AuditWriter`], aggregated by a
/// [`FailureAggregator`]. Records: `auth.failure` (the first of a window, with the caller's
/// details) and `auth.failures` (the count of the rest), actor `anonymous`.
pub struct FailureLog {
    writer: AuditWriter,
    windows: Mutex<FailureAggregator>,
}

impl FailureLog {
    /// Opens the failures log beside the audit log `main` ([`failures_path`]).
    pub fn open(main: &Path, max_bytes: Option<u64>) -> Result<FailureLog, AuditError> {
        let path = failures_path(main);
        let log = AuditLog::open(&path, max_bytes)?;
        let writer = AuditWriter::spawn(log, 1024).map_err(|source| AuditError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(FailureLog {
            writer,
            windows: Mutex::default(),
        })
    }

    /// A failure from `peer` (`unknown` when the address is not known) for `reason`; returns
    /// how many records were dropped (the writer's queue was full).
    pub fn failure(&self, peer: Option<std::net::IpAddr>, reason: &str, details: Value) -> u32 {
        let source = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        let records = self.lock().failure(&source, reason, Instant::now());
        self.write(records, details)
    }

    /// Writes the summaries of the windows that ended (call it every few seconds).
    pub fn flush_due(&self) -> u32 {
        let records = self.lock().due(Instant::now());
        self.write(records, Value::Null)
    }

    /// Ends every window and waits (up to `timeout`) until the records are on disk.
    pub fn finish(&self, timeout: Duration) {
        let records = self.lock().end_all(Instant::now());
        self.write(records, Value::Null);
        self.writer.flush(timeout);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FailureAggregator> {
        self.windows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, records: Vec<FailureRecord>, details: Value) -> u32 {
        let mut dropped = 0;
        for r in records {
            let (event, body) = match r {
                FailureRecord::First { source, reason } => {
                    let mut body = json!({"source": source, "reason": reason});
                    if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), &details) {
                        b.extend(extra.clone());
                    }
                    ("auth.failure", body)
                }
                FailureRecord::Summary {
                    source,
                    reason,
                    count,
                    window_seconds,
                } => (
                    "auth.failures",
                    json!({"source": source, "reason": reason, "count": count,
                           "window_seconds": window_seconds}),
                ),
            };
            if !self.writer.record(event, "anonymous", body) {
                dropped += 1;
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_one_record_then_one_summary_per_source_and_reason() {
        let mut agg = FailureAggregator::default();
        let t0 = Instant::now();
        let mut records = Vec::new();
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i);
            records.extend(agg.failure("10.0.0.1", "wrong_token", now));
            records.extend(agg.failure("10.0.0.2", "no_token", now));
        }
        assert_eq!(records.len(), 2);
        let later = agg.due(t0 + FAILURE_WINDOW + Duration::from_secs(1));
        assert_eq!(
            later,
            vec![
                FailureRecord::Summary {
                    source: "10.0.0.1".into(),
                    reason: "wrong_token".into(),
                    count: 9_999,
                    window_seconds: 61,
                },
                FailureRecord::Summary {
                    source: "10.0.0.2".into(),
                    reason: "no_token".into(),
                    count: 9_999,
                    window_seconds: 61,
                },
            ]
        );
        // A new window starts with a record of its own.
        let next = agg.failure("10.0.0.1", "wrong_token", t0 + Duration::from_secs(70));
        assert!(matches!(next.as_slice(), [FailureRecord::First { .. }]));
    }

    #[test]
    fn the_failures_log_sits_beside_the_audit_log() {
        let p = |s: &str| failures_path(Path::new(s)).display().to_string();
        assert_eq!(
            p("/var/log/rbee/queen-audit.jsonl"),
            "/var/log/rbee/queen-audit.auth-failures.jsonl"
        );
        assert_eq!(p("/var/log/audit"), "/var/log/audit.auth-failures");
    }

    #[test]
    fn many_sources_share_one_window_past_the_cap() {
        let mut agg = FailureAggregator::default();
        let now = Instant::now();
        let mut firsts = 0;
        for i in 0..10_000 {
            firsts += agg
                .failure(&format!("10.1.{}.{}", i / 256, i % 256), "no_token", now)
                .len();
        }
        assert_eq!(firsts, MAX_SOURCES + 1, "the cap, then `other` once");
        let summaries = agg.due(now + FAILURE_WINDOW);
        assert_eq!(
            summaries,
            vec![FailureRecord::Summary {
                source: "other".into(),
                reason: "no_token".into(),
                count: 10_000 - MAX_SOURCES as u64 - 1,
                window_seconds: 60,
            }]
        );
    }
}
