//! `eventually`: poll a check until it holds or time runs out, the one wait loop every test,
//! the daemon start-up and xtask use instead of hand-written deadlines.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`eventually`] checks: fast enough to see short states, light on a loopback daemon.
const POLL: Duration = Duration::from_millis(20);

/// What a check passed to [`eventually`] returns. `Some(v)` / `Ok(v)`: done with `v`.
/// `None`: not yet. `Err(e)`: not yet, and `e` is what it saw, quoted when time runs out.
pub trait Outcome {
    type Value;
    /// `Ok(value)` when done, else what was seen (if anything).
    fn into_outcome(self) -> Result<Self::Value, Option<String>>;
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn into_outcome(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: std::fmt::Display> Outcome for Result<T, E> {
    type Value = T;
    fn into_outcome(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(format!("{e:#}")))
    }
}

/// Runs `check` (at least once, then every 20 ms) until it returns `Some`/`Ok`, and returns
/// that value; after `timeout`, an error naming `what` was awaited and the last `Err` seen.
///
/// A check that must stop the wait at once (a daemon exited) returns `Some(Err(..))` / `Ok(Err(..))`
/// and the caller propagates it; in tests a failed assertion inside the check does the same.
pub async fn eventually<F, Fut>(
    timeout: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<<Fut::Output as Outcome>::Value>
where
    F: FnMut() -> Fut,
    Fut: Future,
    Fut::Output: Outcome,
{
    let start = Instant::now();
    loop {
        let last = match check().await.into_outcome() {
            Ok(value) => return Ok(value),
            Err(last) => last,
        };
        if start.elapsed() >= timeout {
            match last {
                Some(last) => anyhow::bail!("{what}: not within {timeout:?}; last: {last}"),
                None => anyhow::bail!("{what}: not within {timeout:?}"),
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_first_value_that_holds() {
        let mut n = 0;
        let got = eventually(Duration::from_secs(5), "n to reach 3", || {
            n += 1;
            let n = n;
            async move { (n >= 3).then_some(n) }
        })
        .await
        .unwrap();
        assert_eq!(got, 3);
    }

    #[tokio::test]
    async fn names_what_was_awaited_and_the_last_state() {
        let err = eventually(Duration::from_millis(50), "the answer", || async {
            Err::<(), _>("still 41")
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("the answer: not within 50ms"), "{err}");
        assert!(err.ends_with("last: still 41"), "{err}");
        let err = eventually(Duration::ZERO, "nothing", || async { None::<()> })
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(err, "nothing: not within 0ns");
    }
}
