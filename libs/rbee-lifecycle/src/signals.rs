//! The signals every daemon answers, as one handler: SIGTERM/SIGINT start the shutdown,
//! SIGHUP runs the daemon's reload between systemd's `RELOADING=1` and `READY=1`.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::Shutdown;

/// A signal the daemons act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Terminate,
    Interrupt,
    Hangup,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
            Signal::Hangup => "SIGHUP",
        }
    }
}

/// What a daemon does on SIGHUP. Closures are reloads too.
pub trait Reload: Send + 'static {
    /// Re-reads configuration and tokens and applies them; logs its own outcome.
    fn reload(&mut self);

    /// Whether systemd hears `RELOADING=1` before and `READY=1` after (daemons run as
    /// `Type=notify` units; the worker, a child of its hive, is not one).
    fn notifies_systemd(&self) -> bool {
        true
    }
}

impl<F: FnMut() + Send + 'static> Reload for F {
    fn reload(&mut self) {
        self()
    }
}

enum Source {
    Os {
        /// Dropped after the first SIGTERM/SIGINT: the shutdown is under way, and the
        /// handler stays installed, so later ones are ignored rather than fatal.
        stop: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
        hup: Option<tokio::signal::unix::Signal>,
    },
    Channel(mpsc::UnboundedReceiver<Signal>),
}

/// The daemon's signals as one stream.
pub struct Signals {
    source: Source,
}

impl Signals {
    /// Installs the handlers now, so a signal sent from here on is never fatal. Needs the
    /// tokio runtime.
    pub fn install() -> Self {
        let stop = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some((term, int)),
            _ => {
                error!("cannot listen for SIGTERM/SIGINT");
                None
            }
        };
        let hup = match signal(SignalKind::hangup()) {
            Ok(h) => Some(h),
            Err(_) => {
                warn!("cannot listen for SIGHUP; reload disabled");
                None
            }
        };
        Self {
            source: Source::Os { stop, hup },
        }
    }

    /// Signals fed by hand (tests, embedding).
    pub fn channel() -> (mpsc::UnboundedSender<Signal>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            tx,
            Self {
                source: Source::Channel(rx),
            },
        )
    }

    /// The next signal; `None` when none can come any more.
    pub async fn recv(&mut self) -> Option<Signal> {
        match &mut self.source {
            Source::Channel(rx) => rx.recv().await,
            Source::Os { stop, hup } => {
                if stop.is_none() && hup.is_none() {
                    return None;
                }
                let got = tokio::select! {
                    Some(s) = next_stop(stop) => s,
                    Some(()) = next(hup) => Signal::Hangup,
                    else => return None,
                };
                if got != Signal::Hangup {
                    *stop = None;
                }
                Some(got)
            }
        }
    }
}

async fn next_stop(
    stop: &mut Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
) -> Option<Signal> {
    let (term, int) = stop.as_mut()?;
    tokio::select! {
        Some(()) = term.recv() => Some(Signal::Terminate),
        Some(()) = int.recv() => Some(Signal::Interrupt),
        else => None,
    }
}

async fn next(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    s.as_mut()?.recv().await
}

/// Acts on `signals` until none can come: the first SIGTERM/SIGINT triggers `shutdown`,
/// every SIGHUP runs `reload`. Reloads go on while the daemon drains.
pub async fn handle_signals(mut signals: Signals, shutdown: Shutdown, mut reload: impl Reload) {
    while let Some(s) = signals.recv().await {
        match s {
            Signal::Hangup => {
                let notify = reload.notifies_systemd();
                if notify {
                    rbee_systemd::reloading();
                }
                reload.reload();
                if notify {
                    rbee_systemd::notify("READY=1\nSTATUS=serving");
                }
            }
            Signal::Terminate | Signal::Interrupt => {
                info!("{} received", s.name());
                shutdown.trigger();
            }
        }
    }
}

/// Installs the signal handlers now and answers them on a task of their own.
pub fn spawn_signal_handler(shutdown: Shutdown, reload: impl Reload) -> JoinHandle<()> {
    let signals = Signals::install();
    tokio::spawn(handle_signals(signals, shutdown, reload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn counter() -> (Arc<AtomicUsize>, impl Reload) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        (n, move || {
            m.fetch_add(1, Ordering::SeqCst);
        })
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reload_runs_once_per_hangup_and_terminate_shuts_down() {
        let (tx, signals) = Signals::channel();
        let shutdown = Shutdown::new();
        let (reloads, reload) = counter();
        let task = tokio::spawn(handle_signals(signals, shutdown.clone(), reload));
        for _ in 0..3 {
            tx.send(Signal::Hangup).ok();
        }
        settle().await;
        assert_eq!(reloads.load(Ordering::SeqCst), 3);
        assert!(!shutdown.is_cancelled());
        tx.send(Signal::Terminate).ok();
        tokio::time::timeout(Duration::from_secs(1), shutdown.cancelled())
            .await
            .expect("shut down");
        // Reloads still work while draining.
        tx.send(Signal::Hangup).ok();
        settle().await;
        assert_eq!(reloads.load(Ordering::SeqCst), 4);
        drop(tx);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the handler ends with its source")
            .expect("joined");
    }

    #[tokio::test(start_paused = true)]
    async fn interrupt_shuts_down_too() {
        let (tx, signals) = Signals::channel();
        let shutdown = Shutdown::new();
        tokio::spawn(handle_signals(signals, shutdown.clone(), || {}));
        tx.send(Signal::Interrupt).ok();
        tokio::time::timeout(Duration::from_secs(1), shutdown.cancelled())
            .await
            .expect("shut down");
    }

    /// The one test that raises a real signal (SIGHUP only: a test process must not
    /// receive SIGTERM from a sibling test).
    #[tokio::test]
    async fn a_real_sighup_reaches_the_reload() {
        let shutdown = Shutdown::new();
        let (reloads, reload) = counter();
        spawn_signal_handler(shutdown.clone(), reload);
        // SAFETY: raise has no memory-safety preconditions; the handler is installed.
        unsafe { libc::raise(libc::SIGHUP) };
        let t0 = std::time::Instant::now();
        while reloads.load(Ordering::SeqCst) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(5), "no reload");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!shutdown.is_cancelled());
    }
}
