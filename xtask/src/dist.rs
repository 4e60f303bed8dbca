//! `cargo xtask dist`: the release tarball (binaries, docs, licences, `SHA256SUMS`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::cargo::{build_release, workspace_root};
use crate::model::sha256_file;

/// What goes into the tarball besides `bin/`: paths relative to the workspace root.
const DIST_FILES: &[&str] = &[
    "README.md",
    "ARCHITECTURE.md",
    "LICENSE",
    "LICENSE-APACHE",
    "LICENSE-MIT",
    "docs",
];
const DIST_BINARIES: &[&str] = &["queen-rbee", "rbee-hive", "llm-worker-rbee"];

/// Builds the release binaries and packs `rbee-<version>-<target>.tar.gz` in `out`.
pub fn dist(out: &Path) -> anyhow::Result<PathBuf> {
    let release = build_release(DIST_BINARIES)?;
    let name = format!("rbee-{}-{}", env!("CARGO_PKG_VERSION"), host_target()?);
    let stage = out.join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    std::fs::create_dir_all(stage.join("bin"))?;
    for bin in DIST_BINARIES {
        std::fs::copy(release.join(bin), stage.join("bin").join(bin))
            .with_context(|| format!("copying {bin}"))?;
    }
    let root = workspace_root();
    for item in DIST_FILES {
        copy_tree(&root.join(item), &stage.join(item))?;
    }
    let mut files = Vec::new();
    list_files(&stage, &stage, &mut files)?;
    files.sort();
    let mut sums = String::new();
    for rel in &files {
        sums.push_str(&format!("{}  {rel}\n", sha256_file(&stage.join(rel))?));
    }
    std::fs::write(stage.join("SHA256SUMS"), sums)?;
    let tarball = out.join(format!("{name}.tar.gz"));
    let status = Command::new("tar")
        .current_dir(out)
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-czf",
        ])
        .arg(&tarball)
        .arg(&name)
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar failed ({status})");
    }
    eprintln!(
        "{} files, {} bytes",
        files.len() + 1,
        std::fs::metadata(&tarball)?.len()
    );
    Ok(tarball)
}

/// The host's target triple, as rustc names it.
fn host_target() -> anyhow::Result<String> {
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV printed no host line")
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else {
        std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

/// Every file under `dir`, as paths relative to `base`.
fn list_files(base: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            list_files(base, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(base) {
            out.push(rel.display().to_string());
        }
    }
    Ok(())
}
