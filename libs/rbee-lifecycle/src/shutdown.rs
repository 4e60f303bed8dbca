//! The shutdown token: cancelled once, seen by everyone holding a clone.

use std::sync::Arc;

use tokio::sync::watch;

/// A graceful-shutdown trigger shared by signal handlers, API routes and serving loops.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Starts the shutdown; later calls change nothing.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_cancelled(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once [`Shutdown::trigger`] has been called (at once if it already was).
    pub async fn cancelled(&self) {
        let mut rx = self.tx.subscribe();
        // An Err means the sender is gone, which cannot happen while `self` holds it.
        let _ = rx.wait_for(|v| *v).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn trigger_wakes_every_waiter() {
        let s = Shutdown::new();
        assert!(!s.is_cancelled());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.cancelled().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        s.clone().trigger();
        for w in waiters {
            tokio::time::timeout(Duration::from_millis(1), w)
                .await
                .expect("woken")
                .expect("joined");
        }
        assert!(s.is_cancelled());
        // A waiter that comes late returns at once.
        tokio::time::timeout(Duration::from_millis(1), s.cancelled())
            .await
            .expect("already cancelled");
    }
}
