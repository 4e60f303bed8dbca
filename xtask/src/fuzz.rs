//! `cargo xtask fuzz [--seconds N] [TARGET ...]`: runs the cargo-fuzz targets in `fuzz/` (GGUF
//! reader, chat template, SSE decoder) for a fixed time each, on the stable toolchain through
//! `RUSTC_BOOTSTRAP=1`, starting from the committed corpus in `fuzz/corpus/<target>/`. Installs
//! cargo-fuzz first when it is missing. A crash leaves its input in `fuzz/artifacts/<target>/`
//! and fails the command; each one becomes a regression test of the crate it found the bug in.

use std::process::Command;

use anyhow::{Context, bail};

use crate::cargo::{cargo, workspace_root};
use crate::cli::flag;

pub const TARGETS: &[&str] = &["gguf", "template", "sse"];

pub fn fuzz(args: &[String]) -> anyhow::Result<()> {
    let seconds: u64 = flag(args, "--seconds")?
        .map(|s| s.parse().context("--seconds takes a number"))
        .transpose()?
        .unwrap_or(60);
    let mut chosen: Vec<&str> = Vec::new();
    let mut skip_value = false;
    for a in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        if a == "--seconds" {
            skip_value = true;
            continue;
        }
        match TARGETS.iter().find(|t| **t == a.as_str()) {
            Some(t) => chosen.push(t),
            None => bail!("unknown fuzz target `{a}` (have: {})", TARGETS.join(", ")),
        }
    }
    if chosen.is_empty() {
        chosen = TARGETS.to_vec();
    }
    ensure_cargo_fuzz()?;
    let dir = workspace_root().join("fuzz");
    let mut failed = Vec::new();
    for target in chosen {
        eprintln!("fuzzing `{target}` for {seconds} s ...");
        let corpus = dir.join("corpus").join(target);
        let status = Command::new(cargo())
            .current_dir(&dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", "--fuzz-dir", "."])
            .arg(target)
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                // Bigger inputs than libFuzzer's 4 KiB default: GGUF headers run long.
                "-max_len=65536",
                // What the run learns stays in the corpus directory; commit what is worth it.
                "-rss_limit_mb=4096",
            ])
            .status()
            .context("running cargo fuzz")?;
        if !status.success() {
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing found crashes in {}: see fuzz/artifacts/ (each input becomes a regression test)",
            failed.join(", ")
        );
    }
    eprintln!("no crashes");
    Ok(())
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let have = Command::new(cargo())
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if have {
        return Ok(());
    }
    eprintln!("installing cargo-fuzz ...");
    let ok = Command::new(cargo())
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("running cargo install cargo-fuzz")?
        .success();
    if !ok {
        bail!("cargo install cargo-fuzz failed");
    }
    Ok(())
}
