//! `cargo xtask test`: what the tests need, the release tarball, then every test with one
//! closing `N passed, M failed` line.

use std::process::Command;

use anyhow::{Context, bail};
use rbee_test_harness::model_dir;

use crate::cargo::{cargo, target_dir, workspace_root};
use crate::dist::dist;
use crate::model::fetch_model;

/// Python packages the tests drive: the stock OpenAI SDK as a client, and an OpenAPI
/// validator for the queen's `/openapi.json`.
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("openai", "openai"),
    ("openapi_spec_validator", "openapi-spec-validator"),
];

fn ensure_python_packages() -> anyhow::Result<()> {
    for (module, package) in PYTHON_PACKAGES {
        let have = || {
            Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .stderr(std::process::Stdio::null())
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

/// `cargo test --workspace --no-fail-fast`, echoed, then one closing line that sums the
/// libtest results and the cucumber scenarios.
pub fn test(extra: &[String]) -> anyhow::Result<()> {
    fetch_model(&model_dir())?;
    ensure_python_packages()?;
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
