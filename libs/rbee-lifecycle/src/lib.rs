//! One lifecycle for every rbee daemon: the signals it answers, the shutdown token, the drain
//! tracker for in-flight work, and the SIGHUP reload around systemd's notifications.
//!
//! - [`Shutdown`]: a cloneable token; SIGTERM/SIGINT (or an API call) cancels it.
//! - [`Drain`]: in-flight work holds a [`DrainGuard`]; [`Drain::drain`] waits for the last
//!   one to go, or for the grace window to end.
//! - [`Signals`] / [`spawn_signal_handler`]: TERM/INT → shutdown, HUP → [`Reload::reload`].
//! - [`block_on`], [`not_dumpable`], [`init_logging`], [`EXIT_CONFIG`]: what every `main`
//!   does around that.

mod drain;
mod logging;
mod process;
mod shutdown;
mod signals;

pub use drain::{Drain, DrainGuard};
pub use logging::{SetLogLevel, init_logging};
pub use process::{EXIT_CONFIG, block_on, config_error, exit_code, not_dumpable};
pub use shutdown::Shutdown;
pub use signals::{Reload, Signal, Signals, handle_signals, spawn_signal_handler};
