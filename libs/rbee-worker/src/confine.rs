//! Confinement of the worker process, applied first thing (before any thread, before the model
//! is parsed): workers parse GGUF files and run chat templates from any hub repository, so a
//! hostile file must not reach the hive's secrets.
//!
//! - `no_new_privs`: nothing the worker runs can gain privileges (setuid binaries, file caps).
//! - Landlock (Linux 5.13+, CPU workers): the file system is closed except for reading the model
//!   file (and a `tokenizer.json` beside it), the worker's own token file, and `/proc/self` and
//!   `/sys` (thread counts, cgroup limits, memory figures). No writes, no execution. The hive's
//!   token, join token and credential files, other processes' `/proc` entries and everything
//!   else are refused. GPU workers keep `no_new_privs` only (drivers load libraries and open
//!   device files lazily).
//! - Resource limits: no core dumps (`RLIMIT_CORE` 0: memory holds tokens and prompts); with
//!   the file system closed also `RLIMIT_FSIZE` 0 (no file may be written at all).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use landlock::{
    ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    path_beneath_rules,
};

/// How far the confinement went on this kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confinement {
    /// File access limited (Landlock enforced) and `no_new_privs`.
    Files,
    /// `no_new_privs` only; the reason the file system is open.
    NoNewPrivsOnly(String),
}

/// What the confined worker may read.
#[derive(Debug, Clone)]
pub struct Allowed {
    pub model: PathBuf,
    pub token_file: Option<PathBuf>,
}

/// Confines this process (and the threads it starts later). `files`: limit file access too
/// (CPU workers).
pub fn confine(allowed: &Allowed, files: bool) -> Confinement {
    set_limit(libc::RLIMIT_CORE, 0);
    if files {
        set_limit(libc::RLIMIT_FSIZE, 0);
    }
    if !files {
        set_no_new_privs();
        return Confinement::NoNewPrivsOnly(
            "GPU workers keep file access for their drivers".into(),
        );
    }
    match landlock(allowed) {
        Ok(RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced) => Confinement::Files,
        Ok(RulesetStatus::NotEnforced) => {
            set_no_new_privs();
            Confinement::NoNewPrivsOnly("this kernel does not enforce Landlock".into())
        }
        Err(e) => {
            set_no_new_privs();
            Confinement::NoNewPrivsOnly(format!("Landlock failed: {e}"))
        }
    }
}

fn landlock(allowed: &Allowed) -> Result<RulesetStatus, landlock::RulesetError> {
    let abi = ABI::V5;
    let mut files: Vec<&Path> = vec![&allowed.model];
    let tokenizer = allowed.model.with_file_name("tokenizer.json");
    if tokenizer.is_file() {
        files.push(&tokenizer);
    }
    if let Some(t) = &allowed.token_file {
        files.push(t);
    }
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .create()?
        .add_rules(path_beneath_rules(files, AccessFs::from_read(abi)))?
        .add_rules(path_beneath_rules(
            ["/proc/self", "/sys"],
            AccessFs::from_read(abi),
        ))?
        .restrict_self()?;
    Ok(status.ruleset)
}

/// `llm-worker-rbee --check-confinement PATH`: tries to read PATH (under the confinement
/// already applied) and says whether it was refused: 0 refused, 1 readable, 2 other failure.
pub fn check(path: &Path) -> ExitCode {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            println!("confined: reading {} was refused ({e})", path.display());
            ExitCode::SUCCESS
        }
        Ok(_) => {
            println!("NOT confined: {} was readable", path.display());
            ExitCode::from(1)
        }
        Err(e) => {
            println!(
                "could not tell: reading {} failed otherwise ({e})",
                path.display()
            );
            ExitCode::from(2)
        }
    }
}

fn set_limit(resource: libc::__rlimit_resource_t, value: libc::rlim_t) {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct we pass; lowering a limit needs no privilege.
    unsafe {
        libc::setrlimit(resource, &limit);
    }
}

fn set_no_new_privs() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS has no memory-safety preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    }
}
