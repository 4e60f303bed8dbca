//! The hive's one-shot commands: `check-config` (the checks the daemon makes before it binds)
//! and `audit verify`. They print for a person and give the exit code.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use rbee_config::Loader;

use crate::config::HiveConfig;
use crate::reload::{EnvTokens, check_security, complete_defaults, load_tokens};

/// sysexits' EX_USAGE, as the daemon exits for a bad configuration.
const EXIT_CONFIG: u8 = 64;

/// `check-config FILE`: 0 and where each setting came from, or 64 and the first problem.
pub fn check_config(loader: &Loader, file: &Path) -> ExitCode {
    let mut cfg: HiveConfig = match loader.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The same checks the daemon makes before it binds.
    if let Err(e) = complete_defaults(&mut cfg) {
        eprintln!("{e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match load_tokens(&cfg, &EnvTokens::read()) {
        Ok((tokens, _)) => {
            if let Err(e) = check_security(&cfg, &tokens) {
                eprintln!("{}: {e:#}", file.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    // A closed pipe (`check-config ... | head`) is not an error worth a panic.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}: ok", file.display());
    if let Ok(origins) = loader.origins() {
        for (key, source) in origins {
            let _ = writeln!(out, "  {key} <- {source}");
        }
    }
    ExitCode::SUCCESS
}

/// `audit verify FILE`: 0 (intact), 1 (broken, with the first broken link) or 2 (unreadable).
pub fn audit_verify(file: &Path, from_genesis: bool) -> ExitCode {
    let report = if from_genesis {
        rbee_audit::verify_file(file, true)
    } else {
        rbee_audit::verify_chain(file)
    };
    let mut out = std::io::stdout().lock();
    match report {
        Ok(r) => match &r.first_break {
            None => {
                let anchored = match rbee_audit::read_checkpoint(file) {
                    Ok(Some(cp)) if !from_genesis => {
                        format!(", up to its checkpoint (seq {})", cp.seq)
                    }
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "{}: intact, {} records{anchored}",
                    file.display(),
                    r.records
                );
                ExitCode::SUCCESS
            }
            Some(b) => {
                let _ = writeln!(
                    out,
                    "{}: BROKEN at line {} (seq {:?}): {}",
                    file.display(),
                    b.line,
                    b.seq,
                    b.reason
                );
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}
