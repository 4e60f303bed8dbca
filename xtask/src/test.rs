//! `cargo xtask test`: what the tests need, the release tarball, then every test with one
//! closing `N passed, M failed` line.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use rbee_test_harness::model_dir;

use crate::cargo::{cargo, target_dir, workspace_root};
use crate::dist::dist;
use crate::model::{fetch, fetch_model};

/// Commands the tests run, with the apt package that has each.
const SYSTEM_TOOLS: &[(&str, &str)] = &[
    ("promtool", "prometheus"),
    ("systemd-analyze", "systemd"),
    ("jq", "jq"),
    ("curl", "curl"),
];

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs the system packages the tests need (apt, as root or with passwordless sudo) when
/// their commands are missing; where it cannot, fails naming the one command to run.
fn ensure_system_packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = SYSTEM_TOOLS
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(_, package)| *package)
        .collect();
    if !succeeds("python3", &["-m", "pip", "--version"]) {
        missing.push("python3-pip");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let packages = missing.join(" ");
    let command = format!(
        "sudo apt-get update && sudo apt-get install -y --no-install-recommends {packages}"
    );
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let sudo: &[&str] = if root {
        &[]
    } else if succeeds("sudo", &["-n", "true"]) {
        &["sudo", "-n"]
    } else {
        bail!("the tests need the packages {packages}; run:\n  {command}");
    };
    if !on_path("apt-get") {
        bail!(
            "the tests need the packages {packages} (Debian names; no apt-get here to install them)"
        );
    }
    eprintln!("installing {packages} (apt-get) for the tests ...");
    // `env` carries the variable through sudo's cleared environment.
    let mut argv: Vec<&str> = sudo.to_vec();
    argv.extend(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
    let apt = |args: &[&str]| -> anyhow::Result<bool> {
        let full = [&argv[..], args].concat();
        Ok(Command::new(full[0])
            .args(&full[1..])
            .status()
            .with_context(|| format!("running {}", full.join(" ")))?
            .success())
    };
    let installed = apt(&["update", "-qq"])?
        && apt(&[
            &["install", "-y", "-qq", "--no-install-recommends"][..],
            &missing[..],
        ]
        .concat())?;
    let still: Vec<&str> = SYSTEM_TOOLS
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(command, _)| *command)
        .collect();
    if !installed || !still.is_empty() {
        bail!("installing {packages} failed (still missing: {still:?}); run:\n  {command}");
    }
    Ok(())
}

/// Python packages the tests drive: the stock OpenAI SDK as a client, and an OpenAPI
/// validator for the queen's `/openapi.json`.
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("openai", "openai"),
    ("openapi_spec_validator", "openapi-spec-validator"),
    ("jsonschema", "jsonschema"),
    ("llm_comply", "llm-comply"),
    ("schemathesis", "schemathesis"),
];

fn ensure_python_packages() -> anyhow::Result<()> {
    for (module, package) in PYTHON_PACKAGES {
        let have = || {
            Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if have() {
            continue;
        }
        eprintln!("installing the {package} Python package (pip)");
        let mut installed = false;
        for extra in [&[][..], &["--break-system-packages"][..]] {
            let ok = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", package])
                .args(extra)
                .status()
                .is_ok_and(|s| s.success());
            if ok && have() {
                installed = true;
                break;
            }
        }
        if !installed {
            bail!(
                "cannot install the `{package}` Python package: run `python3 -m pip install {package}`"
            );
        }
    }
    Ok(())
}

/// Installs what the tests need, then `cargo test --workspace --no-fail-fast`, echoed, then one closing line that sums the
/// libtest results and the cucumber scenarios.
pub fn test(extra: &[String]) -> anyhow::Result<()> {
    // Everything the tests need first, so that a missing piece stops the run before the
    // long builds, naming the command that installs it.
    ensure_system_packages()?;
    ensure_python_packages()?;
    fetch_model(&model_dir())?;
    fetch(&model_dir(), &rbee_test_harness::GEMMA3_270M)?;
    // The dist test runs the single-node stack from this tarball.
    let tarball = dist(&target_dir().join("dist"))?;
    let mut child = Command::new(cargo())
        .current_dir(workspace_root())
        .env("RBEE_DIST_TARBALL", &tarball)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            let (p, f) = count_results(&strip_ansi(&line));
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    println!("\n{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Drops ANSI colour sequences (cucumber colours its summary on some terminals).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// (passed, failed) from a libtest `test result:` line or a cucumber `N scenarios (...)` line.
fn count_results(line: &str) -> (u64, u64) {
    let number_before = |text: &str, word: &str| -> u64 {
        text.split([';', ',', '('])
            .filter_map(|part| part.trim().strip_suffix(word))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum()
    };
    let line = line.trim().trim_end_matches(')');
    if let Some(rest) = line.strip_prefix("test result: ") {
        let rest = rest.trim_start_matches("ok.").trim_start_matches("FAILED.");
        return (number_before(rest, "passed"), number_before(rest, "failed"));
    }
    if line.contains(" scenario") && line.contains('(') {
        let inner = line.split_once('(').map_or("", |(_, r)| r);
        return (
            number_before(inner, "passed"),
            number_before(inner, "failed"),
        );
    }
    (0, 0)
}

#[cfg(test)]
mod tests {
    use super::{count_results, strip_ansi};

    #[test]
    fn libtest_and_cucumber_summaries_are_counted() {
        assert_eq!(
            count_results("test result: ok. 16 passed; 0 failed; 0 ignored; 0 measured"),
            (16, 0)
        );
        assert_eq!(
            count_results("test result: FAILED. 14 passed; 2 failed; 0 ignored"),
            (14, 2)
        );
        assert_eq!(count_results("6 scenarios (6 passed)"), (6, 0));
        assert_eq!(count_results("7 scenarios (5 passed, 2 failed)"), (5, 2));
        assert_eq!(count_results("29 steps (29 passed)"), (0, 0));
        assert_eq!(count_results("running 3 tests"), (0, 0));
        assert_eq!(
            count_results(&strip_ansi("\u{1b}[32m6 scenarios (6 passed)\u{1b}[0m")),
            (6, 0)
        );
    }
}
