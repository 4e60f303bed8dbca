//! Running cargo from xtask: the workspace root, the target directory, release builds.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Builds `packages` in release mode (one cargo invocation) and returns the directory that
/// holds the binaries.
pub fn build_release(packages: &[&str]) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    eprintln!("building {} (release) ...", packages.join(", "));
    let mut cmd = Command::new(cargo());
    cmd.current_dir(&root)
        // Not --quiet: a cold build takes minutes, and cargo's progress (on stderr) shows it.
        .args(["build", "--release"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    if !cmd.status().context("running cargo build")?.success() {
        bail!("cargo build failed");
    }
    Ok(target_dir().join("release"))
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}
