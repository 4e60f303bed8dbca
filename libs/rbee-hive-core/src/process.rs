//! Process supervision for one worker process: spawn with a cleared environment, its own
//! process group and death with the hive; output forwarded into tracing with a stderr tail;
//! signals to the group, the stop sequence, and how an exit is described.
//!
//! Only a worker's lifecycle task holds a [`Process`], so nothing else signals its child.
//!
//! No signal can reach a process that reused the worker's pid: signals go through a pidfd
//! (to the group, Linux 6.9+; to the worker alone, else with the group by pid while the worker
//! is unreaped, which keeps its pid taken), and none is sent after the worker is reaped. The
//! exit is seen on the pidfd first, so helpers left in its group are killed while its pid
//! still names the group, and only then is it reaped.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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
    /// Readable once the worker exits, before it is reaped (Linux 5.3+).
    pidfd: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
    /// Reaped: its pid and group id may name other processes now.
    reaped: bool,
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
    let pidfd = pidfd_open(pid).and_then(|fd| {
        // SAFETY: an OwnedFd is open and returns the same descriptor until it is dropped with
        // the AsyncFd that owns it.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .ok()
    });
    Ok(Process {
        child,
        pid,
        pidfd,
        reaped: false,
    })
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the process to exit, kills what it left in its group, and reaps it
    /// (cancel-safe).
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if !self.reaped
            && let Some(fd) = &self.pidfd
        {
            if let Ok(mut ready) = fd.readable().await {
                ready.retain_ready();
            }
            // Exited, not reaped: its pid still names its group.
            self.signal(libc::SIGKILL);
        }
        let st = self.child.wait().await;
        if st.is_ok() {
            self.reaped = true;
        }
        st
    }

    /// Sends `sig` to the process group (the process leads its own group); nothing once the
    /// process is reaped.
    pub fn signal(&self, sig: i32) {
        if self.reaped {
            return;
        }
        if let Some(fd) = &self.pidfd {
            if pidfd_signal(fd.get_ref(), sig, PIDFD_SIGNAL_PROCESS_GROUP) {
                return;
            }
            // Before Linux 6.9 no group flag: the worker through its pidfd, then the group by
            // id, which its unreaped pid keeps from being reused.
            pidfd_signal(fd.get_ref(), sig, 0);
        }
        signal_group(self.pid, sig);
    }

    /// SIGKILL to the group, then the exit status.
    pub async fn kill(&mut self) -> std::io::Result<ExitStatus> {
        self.signal(libc::SIGKILL);
        self.wait().await
    }

    /// Without a pidfd (Linux before 5.3), kills helper processes the worker may have left in
    /// its group after it was reaped (its group id could name another group by then: the
    /// small risk pidfds remove). With one, [`Process::wait`] already did it safely.
    pub fn reap_group(&self) {
        if self.pidfd.is_none() {
            signal_group(self.pid, libc::SIGKILL);
        }
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

/// `pidfd_send_signal` flag: the whole process group of the pidfd's process (Linux 6.9+).
const PIDFD_SIGNAL_PROCESS_GROUP: libc::c_uint = 1 << 2;

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether the signal was sent.
fn pidfd_signal(fd: &OwnedFd, sig: i32, flags: libc::c_uint) -> bool {
    // SAFETY: pidfd_send_signal with a valid descriptor and a null siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            flags,
        )
    };
    r == 0
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

    #[tokio::test]
    async fn helpers_left_in_the_group_are_killed_before_the_worker_is_reaped() {
        let dir = std::env::temp_dir().join(format!("rbee-process-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let helper_pid = dir.join("helper.pid");
        let launch = Launch {
            binary: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                format!("sleep 60 & echo $! > {}; exit 3", helper_pid.display()).into(),
            ],
            env: Vec::new(),
            worker_id: "w-test".into(),
        };
        let mut p = spawn(launch, &StderrTail::default()).unwrap();
        assert!(p.pidfd.is_some(), "this kernel has pidfds");
        let st = p.wait().await.unwrap();
        assert_eq!(st.code(), Some(3));
        let helper: i32 = std::fs::read_to_string(&helper_pid)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The helper was killed while the worker's pid still named the group (it is reaped
        // by init, so allow it a moment to go).
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            let stat = std::fs::read_to_string(format!("/proc/{helper}/stat")).unwrap_or_default();
            stat.is_empty() || stat.contains(") Z ")
        });
        assert!(gone, "the helper outlived the worker");
        assert!(p.reaped);
        // Reaped: signals go nowhere (a reused pid is never hit).
        p.signal(libc::SIGKILL);
        p.reap_group();
    }
}
