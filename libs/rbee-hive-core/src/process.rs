//! Process supervision for one worker process: spawn with a cleared environment, its own
//! process group and death with the hive; output forwarded into tracing with a stderr tail;
//! signals to the group, the stop sequence, and how an exit is described.
//!
//! Only a worker's lifecycle task holds a [`Process`], so nothing else signals its child.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rbee_api::worker::StopOutcome;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tracing::{info, warn};

/// Lines of a worker's stderr kept for its crash report.
const STDERR_TAIL_LINES: usize = 20;
const STDERR_LINE_MAX: usize = 512;

/// Variables a worker inherits from the hive; everything else is cleared.
const ENV_ALLOW: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "RUST_BACKTRACE",
    "RBEE_LOG",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_PATH",
    "NVIDIA_VISIBLE_DEVICES",
];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The last lines a process wrote to stderr, shared between the forwarding task (which
/// writes) and the worker record (which shows them).
#[derive(Clone, Default)]
pub struct StderrTail(Arc<Mutex<VecDeque<String>>>);

impl StderrTail {
    pub fn lines(&self) -> Vec<String> {
        lock(&self.0).iter().cloned().collect()
    }

    fn clear(&self) {
        lock(&self.0).clear();
    }

    fn push(&self, line: &str) {
        let mut t = lock(&self.0);
        if t.len() == STDERR_TAIL_LINES {
            t.pop_front();
        }
        let mut l = line.to_owned();
        if l.len() > STDERR_LINE_MAX {
            let mut cut = STDERR_LINE_MAX;
            while !l.is_char_boundary(cut) {
                cut -= 1;
            }
            l.truncate(cut);
        }
        t.push_back(l);
    }
}

/// What to start: the binary, its arguments, and the variables set on top of the
/// allow-listed ones (secrets go here, never in `args`).
pub struct Launch {
    pub binary: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(&'static str, String)>,
    /// Tags the forwarded output lines.
    pub worker_id: String,
}

/// A running worker process, leader of its own process group.
pub struct Process {
    child: Child,
    pid: u32,
}

/// Starts the process: cleared environment plus an allow-list, its own process group, and
/// death with the hive (`PR_SET_PDEATHSIG`). The tail is cleared for the new process.
pub fn spawn(launch: Launch, tail: &StderrTail) -> Result<Process, String> {
    let mut cmd = Command::new(&launch.binary);
    cmd.env_clear();
    for key in ENV_ALLOW {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    for (key, value) in &launch.env {
        cmd.env(key, value);
    }
    cmd.args(&launch.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    set_parent_death_signal(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", launch.binary.display()))?;
    let Some(pid) = child.id() else {
        return Err("the worker exited at once".into());
    };
    tail.clear();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward_lines(out, launch.worker_id.clone(), "stdout", None));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward_lines(
            err,
            launch.worker_id,
            "stderr",
            Some(tail.clone()),
        ));
    }
    Ok(Process { child, pid })
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the process to exit (cancel-safe).
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Sends `sig` to the process group (the process leads its own group).
    pub fn signal(&self, sig: i32) {
        signal_group(self.pid, sig);
    }

    /// SIGKILL to the group, then the exit status.
    pub async fn kill(&mut self) -> std::io::Result<ExitStatus> {
        self.signal(libc::SIGKILL);
        self.wait().await
    }

    /// Reaps helper processes the worker may have left in its group after it exited.
    pub fn reap_group(&self) {
        self.signal(libc::SIGKILL);
    }

    /// The stop sequence: `ask` (the worker's own stop request) for `ask_for`, then SIGTERM
    /// for `term_for`, then SIGKILL.
    pub async fn stop(
        &mut self,
        ask: impl Future<Output = ()>,
        ask_for: Duration,
        term_for: Duration,
    ) -> StopOutcome {
        let ask = async {
            ask.await;
            tokio::time::sleep(ask_for).await;
        };
        tokio::select! {
            _ = self.child.wait() => return StopOutcome::Graceful,
            _ = tokio::time::timeout(ask_for, ask) => {}
        }
        info!("sending SIGTERM");
        self.signal(libc::SIGTERM);
        if tokio::time::timeout(term_for, self.child.wait())
            .await
            .is_ok()
        {
            self.reap_group();
            return StopOutcome::Graceful;
        }
        warn!(
            waited_s = term_for.as_secs(),
            "still running after SIGTERM; sending SIGKILL"
        );
        let _ = self.kill().await;
        StopOutcome::ForceKilled
    }
}

/// The exit code and the signal of an exit, where known.
pub fn exit_fields(st: &std::io::Result<ExitStatus>) -> (Option<i32>, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match st {
        Ok(s) => (s.code(), s.signal()),
        Err(_) => (None, None),
    }
}

/// An exit in words, for the crash reason.
pub fn describe_exit(st: &std::io::Result<ExitStatus>) -> String {
    match st {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}

fn signal_group(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; a stale pid group fails with ESRCH.
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

#[cfg(target_os = "linux")]
fn set_parent_death_signal(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only the
    // async-signal-safe prctl and getppid.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The hive may have died between fork and prctl; then nobody would kill us.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("the hive exited during spawn"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_cmd: &mut Command) {
    // No PR_SET_PDEATHSIG outside Linux; the hive stops its workers on every orderly exit.
}

/// Forwards a worker's output into our log, tagged with its id; keeps the stderr tail.
async fn forward_lines(
    stream: impl AsyncRead + Unpin,
    worker_id: String,
    which: &'static str,
    tail: Option<StderrTail>,
) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        info!(target: "rbee_hive::worker_output", worker_id = %worker_id, stream = which, "{line}");
        if let Some(tail) = &tail {
            tail.push(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines_cut_at_a_char_boundary() {
        let tail = StderrTail::default();
        for i in 0..25 {
            tail.push(&format!("line {i}"));
        }
        let lines = tail.lines();
        assert_eq!(lines.len(), STDERR_TAIL_LINES);
        assert_eq!(lines[0], "line 5");
        tail.push(&"é".repeat(STDERR_LINE_MAX));
        let last = tail.lines().pop().unwrap_or_default();
        assert!(last.len() <= STDERR_LINE_MAX && last.chars().all(|c| c == 'é'));
    }
}
