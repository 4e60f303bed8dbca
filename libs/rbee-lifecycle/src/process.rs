//! What every daemon's `main` does around its work: process hardening, the async runtime,
//! the exit codes.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use tracing::error;

/// sysexits' EX_USAGE: the configuration is wrong (found before binding); retrying will not
/// help.
pub const EXIT_CONFIG: u8 = 64;

/// Logs a configuration problem and gives the exit code for it.
pub fn config_error(e: impl std::fmt::Display) -> ExitCode {
    error!("{e:#}");
    ExitCode::from(EXIT_CONFIG)
}

/// Tokens pass through the daemons' environments: keep /proc/<pid>/environ (and core dumps,
/// ptrace) away from other processes of the same user, workers included.
pub fn not_dumpable() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_DUMPABLE has no memory-safety preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// Runs `main` on the runtime every daemon uses (two worker threads), then gives blocking
/// tasks one second (a model still loading must not hold the exit up). `None` (logged)
/// when the runtime cannot start.
pub fn block_on<T>(main: impl Future<Output = T>) -> Option<T> {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return None;
        }
    };
    let out = runtime.block_on(main);
    runtime.shutdown_timeout(Duration::from_secs(1));
    Some(out)
}

/// Exit code of a daemon's run: 0, or 1 with the error logged.
pub fn exit_code<E: std::fmt::Display>(result: Option<Result<(), E>>) -> ExitCode {
    match result {
        Some(Ok(())) => ExitCode::SUCCESS,
        Some(Err(e)) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
        None => ExitCode::FAILURE,
    }
}
