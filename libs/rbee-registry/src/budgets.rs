//! Tokens each client used per day, kept so a daily budget survives a queen restart.
//!
//! A day is a UTC day number (days since 1970-01-01). Rows older than [`KEEP_DAYS`] are
//! dropped as new days are written, so the table stays small.

use rusqlite::{OptionalExtension, params};

use crate::{Registry, RegistryError};

/// Days of per-client token counts kept.
pub const KEEP_DAYS: i64 = 35;

/// Longest client name stored (client names come from the queen's config, not from requests).
const MAX_CLIENT_LEN: usize = 128;

impl Registry {
    /// Tokens `client` used on UTC day `day` (0 when none were recorded).
    pub fn client_tokens(&self, client: &str, day: i64) -> Result<u64, RegistryError> {
        let conn = self.lock_conn();
        let n: Option<i64> = conn
            .query_row(
                "SELECT tokens FROM client_tokens WHERE client = ?1 AND day = ?2",
                params![client, day],
                |r| r.get(0),
            )
            .optional()?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Adds `tokens` to what `client` used on `day` and returns the new total for that day.
    pub fn add_client_tokens(
        &self,
        client: &str,
        day: i64,
        tokens: u64,
    ) -> Result<u64, RegistryError> {
        if client.is_empty() || client.len() > MAX_CLIENT_LEN {
            return Err(RegistryError::InvalidClient(format!(
                "a client name is 1-{MAX_CLIENT_LEN} bytes"
            )));
        }
        let add = i64::try_from(tokens).unwrap_or(i64::MAX);
        let conn = self.lock_conn();
        let total: i64 = conn.query_row(
            "INSERT INTO client_tokens (client, day, tokens) VALUES (?1, ?2, ?3)
             ON CONFLICT (client, day) DO UPDATE SET tokens = min(tokens + excluded.tokens, 9223372036854775807)
             RETURNING tokens",
            params![client, day, add],
            |r| r.get(0),
        )?;
        conn.execute(
            "DELETE FROM client_tokens WHERE day < ?1",
            params![day - KEEP_DAYS],
        )?;
        Ok(total.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_per_client_and_day_and_old_days_go() {
        let reg = Registry::open_in_memory().unwrap();
        assert_eq!(reg.client_tokens("alice", 100).unwrap(), 0);
        assert_eq!(reg.add_client_tokens("alice", 100, 30).unwrap(), 30);
        assert_eq!(reg.add_client_tokens("alice", 100, 12).unwrap(), 42);
        assert_eq!(reg.add_client_tokens("bob", 100, 5).unwrap(), 5);
        assert_eq!(reg.client_tokens("alice", 100).unwrap(), 42);
        assert_eq!(reg.client_tokens("alice", 101).unwrap(), 0);
        assert_eq!(
            reg.add_client_tokens("alice", 100 + KEEP_DAYS + 1, 1)
                .unwrap(),
            1
        );
        assert_eq!(reg.client_tokens("alice", 100).unwrap(), 0, "pruned");
        assert!(reg.add_client_tokens("", 100, 1).is_err());
    }
}
