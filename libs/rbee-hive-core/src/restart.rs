//! The restart policy for crashed workers, as a pure function of the crash history, the
//! time, the configuration and a jitter draw: restart after a delay (exponential backoff with
//! jitter, capped), open the circuit breaker, or give up because restarts are disabled.
//!
//! Only exits nobody asked for reach the policy (an exit with code 0 included: a worker is
//! meant to serve until it is stopped); a requested stop never restarts.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::RestartConfig;

/// What to do about a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the worker again after `delay`; `recent_crashes` within the window, this one
    /// included.
    Restart {
        delay: Duration,
        recent_crashes: u32,
    },
    /// Too many crashes within the window: no more restarts.
    BreakerOpen { recent_crashes: u32 },
    /// `restart.enabled` is off.
    Disabled,
}

/// When one worker crashed, as far back as the policy's window reaches.
#[derive(Debug, Default)]
pub struct CrashHistory {
    times: VecDeque<Instant>,
}

impl CrashHistory {
    /// Records a crash at `now` and decides what follows. `jitter` is a draw from [0, 1).
    pub fn crashed(&mut self, policy: &RestartConfig, now: Instant, jitter: f64) -> Decision {
        if !policy.enabled {
            return Decision::Disabled;
        }
        let window = Duration::from_secs(policy.window_seconds);
        self.times.push_back(now);
        while self
            .times
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.times.pop_front();
        }
        let recent_crashes = self.times.len() as u32;
        if recent_crashes >= policy.max_attempts {
            return Decision::BreakerOpen { recent_crashes };
        }
        Decision::Restart {
            delay: backoff_delay(
                recent_crashes,
                policy.backoff_initial_ms,
                policy.backoff_max_ms,
                jitter,
            ),
            recent_crashes,
        }
    }
}

/// Exponential backoff: `initial × 2^(crashes−1)`, capped, then scaled by a jitter factor in
/// [0.5, 1.0) so workers that crashed together do not restart together.
pub fn backoff_delay(crashes: u32, initial_ms: u64, max_ms: u64, jitter: f64) -> Duration {
    let exp = crashes.saturating_sub(1).min(20);
    let base = initial_ms.saturating_mul(1u64 << exp).min(max_ms);
    let factor = 0.5 + 0.5 * jitter.clamp(0.0, 1.0);
    Duration::from_millis(((base as f64) * factor).max(1.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32, window_seconds: u64) -> RestartConfig {
        RestartConfig {
            enabled: true,
            max_attempts,
            window_seconds,
            backoff_initial_ms: 1000,
            backoff_max_ms: 60_000,
        }
    }

    fn restart(ms: u64, recent_crashes: u32) -> Decision {
        Decision::Restart {
            delay: Duration::from_millis(ms),
            recent_crashes,
        }
    }

    /// Each case: earlier crashes (seconds before now), the policy, the jitter draw, and the
    /// decision for a crash now.
    #[test]
    fn decisions() {
        let disabled = RestartConfig {
            enabled: false,
            ..policy(1, 600)
        };
        let capped = RestartConfig {
            backoff_max_ms: 5000,
            ..policy(100, 600)
        };
        let cases: Vec<(&str, Vec<u64>, RestartConfig, f64, Decision)> = vec![
            (
                "first crash: the initial delay",
                vec![],
                policy(5, 600),
                1.0,
                restart(1000, 1),
            ),
            (
                "second crash: doubled",
                vec![10],
                policy(5, 600),
                1.0,
                restart(2000, 2),
            ),
            (
                "fourth crash: doubled again, twice",
                vec![30, 20, 10],
                policy(5, 600),
                1.0,
                restart(8000, 4),
            ),
            (
                "the delay is capped",
                vec![60, 50, 40, 30, 20, 10],
                capped.clone(),
                1.0,
                restart(5000, 7),
            ),
            (
                "the cap holds however many crashes",
                (1..=40).collect(),
                capped,
                1.0,
                restart(5000, 41),
            ),
            (
                "jitter 0 halves the delay",
                vec![10],
                policy(5, 600),
                0.0,
                restart(1000, 2),
            ),
            (
                "jitter 0.5 takes three quarters",
                vec![],
                policy(5, 600),
                0.5,
                restart(750, 1),
            ),
            (
                "the breaker opens at max_attempts crashes within the window",
                vec![30, 20],
                policy(3, 600),
                1.0,
                Decision::BreakerOpen { recent_crashes: 3 },
            ),
            (
                "max_attempts 1: the first crash opens it",
                vec![],
                policy(1, 600),
                1.0,
                Decision::BreakerOpen { recent_crashes: 1 },
            ),
            (
                "crashes outside the window are forgotten",
                vec![700, 650, 20],
                policy(3, 600),
                1.0,
                restart(2000, 2),
            ),
            (
                "a crash exactly at the window's edge still counts",
                vec![600, 20],
                policy(3, 600),
                1.0,
                Decision::BreakerOpen { recent_crashes: 3 },
            ),
            (
                "restarts disabled: give up at once",
                vec![],
                disabled,
                1.0,
                Decision::Disabled,
            ),
        ];
        for (name, earlier, cfg, jitter, want) in cases {
            let now = Instant::now() + Duration::from_secs(10_000);
            let mut h = CrashHistory::default();
            for ago in earlier {
                h.times.push_back(now - Duration::from_secs(ago));
            }
            assert_eq!(h.crashed(&cfg, now, jitter), want, "{name}");
        }
    }

    #[test]
    fn jitter_stays_within_half_to_full_delay() {
        for crashes in 1..10 {
            let full = backoff_delay(crashes, 1000, 60_000, 1.0);
            for i in 0..100 {
                let d = backoff_delay(crashes, 1000, 60_000, f64::from(i) / 100.0);
                assert!(
                    d >= full / 2 && d <= full,
                    "{crashes} crashes, draw {i}: {d:?}"
                );
            }
        }
        // Draws outside [0, 1) are clamped, never beyond the bounds.
        assert_eq!(
            backoff_delay(1, 1000, 60_000, 7.0),
            Duration::from_millis(1000)
        );
        assert_eq!(
            backoff_delay(1, 1000, 60_000, -1.0),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn a_history_forgets_as_time_passes_and_disabled_records_nothing() {
        let t0 = Instant::now();
        let mut h = CrashHistory::default();
        let cfg = policy(2, 60);
        assert_eq!(h.crashed(&cfg, t0, 1.0), restart(1000, 1));
        // Two minutes later the first crash is outside the window: a first crash again.
        let later = t0 + Duration::from_secs(120);
        assert_eq!(h.crashed(&cfg, later, 1.0), restart(1000, 1));
        assert_eq!(
            h.crashed(&cfg, later + Duration::from_secs(1), 1.0),
            Decision::BreakerOpen { recent_crashes: 2 }
        );
        let off = RestartConfig {
            enabled: false,
            ..cfg
        };
        let mut fresh = CrashHistory::default();
        assert_eq!(fresh.crashed(&off, t0, 1.0), Decision::Disabled);
        assert!(fresh.times.is_empty());
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        assert_eq!(
            backoff_delay(1, 1000, 60_000, 1.0),
            Duration::from_millis(1000)
        );
        assert_eq!(
            backoff_delay(2, 1000, 60_000, 1.0),
            Duration::from_millis(2000)
        );
        assert_eq!(
            backoff_delay(3, 1000, 60_000, 0.0),
            Duration::from_millis(2000)
        );
        assert_eq!(
            backoff_delay(30, 1000, 60_000, 1.0),
            Duration::from_millis(60_000)
        );
        assert_eq!(
            backoff_delay(0, 1000, 60_000, 1.0),
            Duration::from_millis(1000)
        );
    }
}
