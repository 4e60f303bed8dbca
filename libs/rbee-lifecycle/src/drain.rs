//! The drain tracker: in-flight work holds a guard; shutdown waits for the last guard to drop
//! (woken by the drop itself, no polling) or for the grace window to end.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Counts in-flight work. Clones share the count.
#[derive(Clone, Debug)]
pub struct Drain {
    active: Arc<watch::Sender<usize>>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        Self {
            active: Arc::new(watch::channel(0).0),
        }
    }

    /// Counts one piece of work as in flight until the guard is dropped.
    pub fn guard(&self) -> DrainGuard {
        self.active.send_modify(|n| *n += 1);
        DrainGuard {
            active: self.active.clone(),
        }
    }

    /// Guards held now.
    pub fn active(&self) -> usize {
        *self.active.borrow()
    }

    /// Waits until no guard is held, at most `grace`. True when everything finished in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        let mut rx = self.active.subscribe();
        // The sender lives in `self`, so `wait_for` only ends by the predicate.
        tokio::time::timeout(grace, rx.wait_for(|n| *n == 0))
            .await
            .is_ok()
    }
}

impl Drain {
    /// Waits until `done()` holds, at most `grace`; `done` is checked now and whenever a
    /// guard is taken or dropped. For work counted elsewhere whose holders live inside
    /// guarded scopes (a request's counter inside its guarded HTTP exchange): the guard's
    /// drop is the wake-up, the daemon's own count the answer. True when it held in time.
    pub async fn drain_until(&self, grace: Duration, done: impl Fn() -> bool) -> bool {
        let mut rx = self.active.subscribe();
        tokio::time::timeout(grace, rx.wait_for(|_| done()))
            .await
            .is_ok()
    }
}

/// One piece of in-flight work; dropping it may finish a [`Drain::drain`].
#[derive(Debug)]
#[must_use = "the work counts as in flight only while the guard is held"]
pub struct DrainGuard {
    active: Arc<watch::Sender<usize>>,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        self.active.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn drain_finishes_when_the_last_guard_drops() {
        let d = Drain::new();
        let a = d.guard();
        let b = d.guard();
        assert_eq!(d.active(), 2);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(a);
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(b);
        });
        let t0 = Instant::now();
        assert!(d.drain(Duration::from_secs(10)).await);
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
        assert_eq!(d.active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_times_out_at_the_grace_window() {
        let d = Drain::new();
        let _held = d.guard();
        let t0 = Instant::now();
        assert!(!d.drain(Duration::from_secs(5)).await);
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        assert_eq!(d.active(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_until_rechecks_the_outside_count_when_a_guard_drops() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let d = Drain::new();
        let counted = Arc::new(AtomicUsize::new(1));
        // A long-lived guard (an event stream) that the outside count does not include.
        let _stream = d.guard();
        let request = d.guard();
        let c = counted.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            // The count drops first, then the guard around it.
            c.fetch_sub(1, Ordering::SeqCst);
            drop(request);
        });
        let t0 = Instant::now();
        assert!(
            d.drain_until(Duration::from_secs(10), || counted.load(Ordering::SeqCst)
                == 0)
                .await
        );
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
        assert_eq!(d.active(), 1);
        // Already true: at once. Never true: the grace window.
        assert!(d.drain_until(Duration::from_secs(10), || true).await);
        let t0 = Instant::now();
        assert!(!d.drain_until(Duration::from_secs(3), || false).await);
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_with_nothing_in_flight_returns_at_once() {
        let d = Drain::new();
        drop(d.guard());
        let t0 = Instant::now();
        assert!(d.clone().drain(Duration::from_secs(5)).await);
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }
}
