//! The hive's upkeep: refused tokens into the failures log, and failed workers' records
//! dropped after a while.

use std::time::Duration;

use super::Hive;
use crate::worker::WorkerState;

/// Failed workers' records kept at most (see [`Hive::gc_failed`]).
pub const MAX_FAILED_RECORDS: usize = 32;

impl Hive {
    /// A request refused for its token (401) from `peer` for `reason`: counted, and audited
    /// in the failures log, aggregated per source and reason a minute.
    pub fn auth_failure(
        &self,
        peer: Option<std::net::IpAddr>,
        reason: &str,
        details: serde_json::Value,
    ) {
        self.metrics.auth_failures.inc(&[]);
        if let Some(log) = &self.audit_failures {
            let dropped = log.failure(peer, reason, details);
            self.metrics.audit_dropped.inc_by(&[], f64::from(dropped));
        }
    }

    /// Writes the summaries of the failure windows that ended.
    pub fn flush_failures_due(&self) {
        if let Some(log) = &self.audit_failures {
            let dropped = log.flush_due();
            self.metrics.audit_dropped.inc_by(&[], f64::from(dropped));
        }
    }

    /// Drops failed workers' records older than `keep` (by their last exit) and all but the
    /// newest [`MAX_FAILED_RECORDS`], so a model that keeps failing cannot grow the registry
    /// or the per-worker metric series. Returns the ids removed.
    pub(crate) fn gc_failed(&self, now_ms: i64, keep: Duration) -> Vec<String> {
        let mut failed: Vec<(i64, String)> = self
            .all()
            .iter()
            .filter(|w| w.is_done() && w.state() == WorkerState::Failed)
            .map(|w| {
                let at = w.view().last_exit.map_or(0, |e| e.at_unix_ms);
                (at, w.id().to_owned())
            })
            .collect();
        failed.sort_by(|a, b| b.cmp(a));
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let mut removed = Vec::new();
        for (i, (at, id)) in failed.into_iter().enumerate() {
            let old = now_ms.saturating_sub(at) > keep_ms;
            if (old || i >= MAX_FAILED_RECORDS) && self.remove_finished(&id).is_some() {
                removed.push(id);
            }
        }
        removed
    }
}
