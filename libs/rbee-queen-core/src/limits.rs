//! Per-client rate limits and budgets: requests and tokens in any 60 s, tokens per UTC day.
//! Pure bookkeeping over times the caller passes in (unix ms); the queen feeds it and keeps the
//! daily totals in the registry (`Queen::client_slot`, `Queen::client_tokens_used`).
//!
//! Requests count when admitted; tokens count when a request ends (prompt + completion), so a
//! request already running is never cut by the limits, and the next one waits instead.

use std::collections::{HashMap, VecDeque};

use rbee_api::codes;
use rbee_http::ApiError;

use crate::config::ClientToken;

pub const WINDOW_MS: u64 = 60_000;
pub const DAY_MS: u64 = 86_400_000;

/// Why a client's request was refused (the `reason` label of
/// `rbee_queen_client_refusals_total` and of the `client.limited` audit record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitReason {
    Concurrent,
    RequestsPerMinute,
    TokensPerMinute,
    TokensPerDay,
    Model,
}

impl LimitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitReason::Concurrent => "max_concurrent",
            LimitReason::RequestsPerMinute => "requests_per_minute",
            LimitReason::TokensPerMinute => "tokens_per_minute",
            LimitReason::TokensPerDay => "tokens_per_day",
            LimitReason::Model => "model",
        }
    }

    /// How long one audit record covers: a day for the daily budget, else a minute.
    fn audit_window_ms(self) -> u64 {
        match self {
            LimitReason::TokensPerDay => DAY_MS,
            _ => WINDOW_MS,
        }
    }
}

/// A refused request: why, and the error (with `Retry-After` where waiting helps).
#[derive(Debug)]
pub struct Refusal {
    pub reason: LimitReason,
    pub error: ApiError,
}

#[derive(Debug, Default)]
struct ClientState {
    /// When admitted requests started, the last minute's.
    requests: VecDeque<u64>,
    /// Tokens of requests that ended, by when, the last minute's.
    tokens: VecDeque<(u64, u64)>,
    /// The UTC day the daily total is for, and the total (as the registry has it).
    day: Option<(i64, u64)>,
    /// Per reason: when the current audit window started.
    audited: HashMap<LimitReason, u64>,
}

/// The limits' state for every client that sent a request.
#[derive(Debug, Default)]
pub struct Limiter {
    clients: HashMap<String, ClientState>,
}

/// The UTC day number of a unix time in ms.
pub fn day_of(now_ms: u64) -> i64 {
    (now_ms / DAY_MS) as i64
}

/// Whole seconds from `now_ms` until `at_ms`, at least 1.
fn secs_until(at_ms: u64, now_ms: u64) -> u32 {
    (at_ms.saturating_sub(now_ms).div_ceil(1000)).clamp(1, 86_400) as u32
}

impl Limiter {
    /// Whether the daily total for `client` must be read (from the registry) before
    /// [`Limiter::admit`]: the limiter has none for today.
    pub fn needs_day(&self, client: &str, now_ms: u64) -> bool {
        let today = day_of(now_ms);
        self.clients
            .get(client)
            .and_then(|c| c.day)
            .is_none_or(|(d, _)| d != today)
    }

    /// Sets what `client` used today (read from the registry).
    pub fn set_day(&mut self, client: &str, now_ms: u64, used: u64) {
        self.state(client).day = Some((day_of(now_ms), used));
    }

    /// Admits a request of `client` under `limits` at `now_ms` (and counts it), or says why
    /// not.
    pub fn admit(&mut self, limits: &ClientToken, now_ms: u64) -> Result<(), Refusal> {
        let name = limits.name.as_str();
        let c = self.state(name);
        let since = now_ms.saturating_sub(WINDOW_MS);
        while c.requests.front().is_some_and(|t| *t <= since) {
            c.requests.pop_front();
        }
        while c.tokens.front().is_some_and(|(t, _)| *t <= since) {
            c.tokens.pop_front();
        }
        if let Some(limit) = limits.requests_per_minute
            && c.requests.len() >= limit as usize
        {
            let oldest = c.requests.front().copied().unwrap_or(now_ms);
            let retry = secs_until(oldest + WINDOW_MS, now_ms);
            return Err(Refusal {
                reason: LimitReason::RequestsPerMinute,
                error: ApiError::new(
                    codes::CLIENT_LIMIT,
                    format!(
                        "client `{name}` started {limit} requests in the last minute (its requests_per_minute); retry in {retry} s"
                    ),
                )
                .retry_after(retry),
            });
        }
        if let Some(limit) = limits.tokens_per_minute {
            let used: u64 = c.tokens.iter().map(|(_, n)| n).sum();
            if used >= limit {
                // The first moment enough of them are a minute old.
                let mut left = used;
                let mut at = now_ms;
                for (t, n) in &c.tokens {
                    left -= n;
                    at = t + WINDOW_MS;
                    if left < limit {
                        break;
                    }
                }
                let retry = secs_until(at, now_ms);
                return Err(Refusal {
                    reason: LimitReason::TokensPerMinute,
                    error: ApiError::new(
                        codes::CLIENT_LIMIT,
                        format!(
                            "client `{name}` used {used} tokens in the last minute (its tokens_per_minute is {limit}); retry in {retry} s"
                        ),
                    )
                    .retry_after(retry),
                });
            }
        }
        if let Some(limit) = limits.tokens_per_day {
            let today = day_of(now_ms);
            let used = c.day.filter(|(d, _)| *d == today).map_or(0, |(_, n)| n);
            if used >= limit {
                let retry = secs_until((today as u64 + 1) * DAY_MS, now_ms);
                return Err(Refusal {
                    reason: LimitReason::TokensPerDay,
                    error: ApiError::new(
                        codes::BUDGET_EXHAUSTED,
                        format!(
                            "client `{name}` used {used} of its {limit} tokens for today (UTC); the budget renews at midnight UTC, in {retry} s"
                        ),
                    )
                    .retry_after(retry),
                });
            }
        }
        c.requests.push_back(now_ms);
        Ok(())
    }

    /// A request of `client` ended having used `tokens`; `day_total` is the registry's new
    /// total for today.
    pub fn used(&mut self, client: &str, now_ms: u64, tokens: u64, day_total: u64) {
        let c = self.state(client);
        if tokens > 0 {
            c.tokens.push_back((now_ms, tokens));
        }
        c.day = Some((day_of(now_ms), day_total));
    }

    /// Whether this refusal is the first of its window (then it is audited).
    pub fn first_in_window(&mut self, client: &str, reason: LimitReason, now_ms: u64) -> bool {
        let c = self.state(client);
        let window = reason.audit_window_ms();
        match c.audited.get(&reason) {
            Some(start) if now_ms.saturating_sub(*start) < window => false,
            _ => {
                c.audited.insert(reason, now_ms);
                true
            }
        }
    }

    fn state(&mut self, client: &str) -> &mut ClientState {
        self.clients.entry(client.to_owned()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(rpm: Option<u32>, tpm: Option<u64>, tpd: Option<u64>) -> ClientToken {
        ClientToken {
            name: "bob".into(),
            file: "/dev/null".into(),
            max_concurrent: None,
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            tokens_per_day: tpd,
            models: Vec::new(),
            admin: false,
        }
    }

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn requests_per_minute_slide_and_say_when_to_retry() {
        let mut l = Limiter::default();
        let bob = client(Some(2), None, None);
        l.admit(&bob, T0).unwrap();
        l.admit(&bob, T0 + 10_000).unwrap();
        let r = l.admit(&bob, T0 + 20_000).unwrap_err();
        assert_eq!(r.reason, LimitReason::RequestsPerMinute);
        assert_eq!(r.error.code, codes::CLIENT_LIMIT);
        assert_eq!(
            r.error.retry_after,
            Some(40),
            "the first one leaves the window then"
        );
        // A refused request does not count.
        l.admit(&bob, T0 + 60_001).unwrap();
        assert!(l.admit(&bob, T0 + 60_002).is_err());
        l.admit(&bob, T0 + 70_001).unwrap();
    }

    #[test]
    fn tokens_per_minute_count_what_ended() {
        let mut l = Limiter::default();
        let bob = client(None, Some(100), None);
        l.admit(&bob, T0).unwrap();
        l.used("bob", T0 + 1_000, 60, 60);
        l.admit(&bob, T0 + 2_000).unwrap();
        l.used("bob", T0 + 3_000, 50, 110);
        let r = l.admit(&bob, T0 + 4_000).unwrap_err();
        assert_eq!(r.reason, LimitReason::TokensPerMinute);
        // 110 - 60 < 100 once the first request's tokens are a minute old.
        assert_eq!(r.error.retry_after, Some(57));
        l.admit(&bob, T0 + 61_001).unwrap();
    }

    #[test]
    fn the_daily_budget_renews_at_midnight_utc() {
        let mut l = Limiter::default();
        let bob = client(None, None, Some(500));
        let midnight = (T0 / DAY_MS + 1) * DAY_MS;
        let now = midnight - 3_600_000;
        assert!(l.needs_day("bob", now));
        l.set_day("bob", now, 480);
        assert!(!l.needs_day("bob", now));
        l.admit(&bob, now).unwrap();
        l.used("bob", now + 1, 30, 510);
        let r = l.admit(&bob, now + 1_000).unwrap_err();
        assert_eq!(r.reason, LimitReason::TokensPerDay);
        assert_eq!(r.error.code, codes::BUDGET_EXHAUSTED);
        assert_eq!(r.error.retry_after, Some(3_599));
        assert!(l.needs_day("bob", midnight));
        l.set_day("bob", midnight, 0);
        l.admit(&bob, midnight).unwrap();
    }

    #[test]
    fn one_audit_record_per_reason_and_window() {
        let mut l = Limiter::default();
        let rpm = LimitReason::RequestsPerMinute;
        assert!(l.first_in_window("bob", rpm, T0));
        assert!(!l.first_in_window("bob", rpm, T0 + 59_999));
        assert!(l.first_in_window("bob", LimitReason::Model, T0 + 1));
        assert!(l.first_in_window("carol", rpm, T0 + 1));
        assert!(l.first_in_window("bob", rpm, T0 + 60_000));
        assert!(l.first_in_window("bob", LimitReason::TokensPerDay, T0));
        assert!(!l.first_in_window("bob", LimitReason::TokensPerDay, T0 + 3_600_000));
    }
}
