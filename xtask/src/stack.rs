//! The demo's stack: a queen and one hive on loopback ports with fresh tokens and configs in
//! a temporary directory, started and stopped in order; used by `demo` and `bench stack`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use rbee_test_harness::{
    Daemon, Log, Ready, Start, config_command, eventually, process_alive, toml_path, toml_str,
};
use serde_json::Value;

/// The name clients use for the default model (a `[[models]]` alias in the queen's config).
pub const DEMO_MODEL: &str = "smollm2";

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// SIGINT and SIGTERM to xtask, handled instead of the default exit.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    pub async fn recv(&mut self) -> &'static str {
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
pub fn write_secret(path: &Path) -> anyhow::Result<String> {
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
pub struct Stack {
    // The hive first: on an error path it is dropped (killed) before the queen.
    pub hive: Daemon,
    pub queen: Daemon,
    pub dir: PathBuf,
    pub url: String,
    pub client_token: String,
    pub client_token_file: PathBuf,
    pub hive_url: String,
    pub hive_token: String,
    /// What clients send as `model`.
    pub model_name: String,
}

impl Stack {
    /// The stack serving `model` to clients as `model_name`.
    pub async fn start(bin: &Path, model: &Path, model_name: &str) -> anyhow::Result<Self> {
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
            toml_str(model_name),
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
                 [queen]\nurl = {}\njoin_token_file = {}\ncredential_file = {}\nheartbeat_seconds = 1\n",
            toml_path(&hive_token_file),
            toml_path(model_dir),
            toml_path(&bin.join("llm-worker-rbee")),
            toml_str(&url),
            toml_path(&join_token_file),
            toml_path(&dir.join("queen-credential.json")),
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
            model_name: model_name.to_owned(),
        };
        stack.wait_hive_up().await?;
        eprintln!(
            "queen at {} with one hive at {}, up\n",
            stack.url, stack.hive_url
        );
        Ok(stack)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub async fn admin(&self, client: &reqwest::Client, path: &str) -> anyhow::Result<Value> {
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

    /// Polls the queen's `/health` until the hive is routable (30 s at most).
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
                // Routable: joined, and beating with the credential the queen issued it.
                let health = client.get(format!("{}/health", self.url)).send().await?;
                let v: serde_json::Value = health.json().await?;
                if v["hives_up"].as_u64().unwrap_or(0) >= 1 {
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
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for d in [&mut self.queen, &mut self.hive] {
            if let Some(status) = d.exited() {
                bail!("{} exited ({status}); {}", d.name(), d.log_excerpt());
            }
        }
        Ok(())
    }

    /// SIGTERM to the hive (which stops its workers), then to the queen; waits for both. The
    /// directory is removed after a clean stop and kept (with the logs) otherwise.
    pub async fn stop(mut self) -> anyhow::Result<()> {
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
