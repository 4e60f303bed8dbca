//! The queen's one-shot command: `check-config` (the checks the daemon makes before it binds).
//! It prints for a person and gives the exit code.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use rbee_config::Loader;

use crate::config::QueenConfig;
use crate::reload::{EnvTokens, check_security, load_tokens};

/// sysexits' EX_USAGE, as the daemon exits for a bad configuration.
const EXIT_CONFIG: u8 = 64;

/// `check-config FILE`: 0 and where each setting came from, or 64 and the first problem.
pub fn check_config(loader: &Loader, file: &Path) -> ExitCode {
    let cfg: QueenConfig = match loader.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The same checks the daemon makes before it binds (the token variables stay in place).
    let checked = load_tokens(&cfg, &EnvTokens::read()).and_then(|t| check_security(&cfg, &t));
    if let Err(e) = checked {
        eprintln!("{e}");
        return ExitCode::from(EXIT_CONFIG);
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
