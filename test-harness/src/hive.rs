//! Starting an `rbee-hive` for a test (config, token file, its own worker port range), and the
//! hive helpers tests share: spawn a worker, wait for its state, read a metric or the audit log.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use crate::{
    Daemon, MODEL_FILE, eventually, temp_dir, test_model, toml_path, workspace_binary,
    write_token_file,
};

/// How to start an `rbee-hive` for a test.
#[derive(Debug, Clone)]
pub struct HiveOptions {
    /// API token (through a 0600 file); None is dev mode.
    pub token: Option<String>,
    /// Model directories; default: the directory of the test model.
    pub model_dirs: Vec<PathBuf>,
    /// Worker binary; default: this workspace's `llm-worker-rbee`.
    pub worker_binary: Option<PathBuf>,
    /// Hive binary; default: this workspace's `rbee-hive`.
    pub binary: Option<PathBuf>,
    /// Extra `RBEE_HIVE_*` (or other) environment.
    pub env: Vec<(String, String)>,
    pub extra_args: Vec<String>,
    /// Written to `hive.toml`, after the harness's own top-level keys (so only tables here).
    pub config_tables: String,
}

impl Default for HiveOptions {
    fn default() -> Self {
        let model = test_model();
        Self {
            token: None,
            model_dirs: vec![model.parent().unwrap().to_path_buf()],
            worker_binary: None,
            binary: None,
            env: Vec::new(),
            extra_args: Vec::new(),
            config_tables: String::new(),
        }
    }
}

impl HiveOptions {
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// Sets `RBEE_HIVE_<key>` (use `__` between table and key).
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env
            .push((format!("RBEE_HIVE_{key}"), value.to_string()));
        self
    }

    /// A hive with API token `token` that joins the queen at `queen_url` as `hive_id` with
    /// `join`, beating every second.
    pub fn joined(queen_url: &str, hive_id: &str, token: &str, join: &str) -> Self {
        Self::default()
            .token(token)
            .env("QUEEN__URL", queen_url)
            .env("QUEEN__HEARTBEAT_SECONDS", 1)
            .env("HIVE_ID", hive_id)
            .env("JOIN_TOKEN", join)
    }
}

/// A port range nobody else in this test run uses (workers of parallel hives must not meet).
fn worker_port_range() -> (u16, u16) {
    static N: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // 64 hives per test process, 16 ports each; processes spread by pid.
    let base = 20_000 + (std::process::id() % 39) as u16 * 1024 + (n % 64) * 16;
    (base, base + 15)
}

impl Daemon {
    /// Starts a hive (config in `<dir>/hive.toml`, audit log in `<dir>/audit.log`) and waits
    /// (up to 20 s) until it listens. Its workers die with it.
    pub async fn hive(opts: HiveOptions) -> anyhow::Result<Self> {
        let dir = temp_dir("hive");
        let worker = opts
            .worker_binary
            .clone()
            .unwrap_or_else(|| workspace_binary("llm-worker-rbee"));
        let (pmin, pmax) = worker_port_range();
        let dirs: Vec<String> = opts.model_dirs.iter().map(|d| toml_path(d)).collect();
        let mut toml = format!(
            "listen = \"127.0.0.1:0\"\nmodel_dirs = [{}]\naudit_log = {}\n",
            dirs.join(", "),
            toml_path(&dir.join("audit.log"))
        );
        if let Some(t) = &opts.token {
            let tf = write_token_file(&dir.join("secrets"), t);
            toml.push_str(&format!("token_file = {}\n", toml_path(&tf)));
        }
        toml.push_str(&format!(
            "\n[workers]\nbinary = {}\nport_min = {pmin}\nport_max = {pmax}\n\n",
            toml_path(&worker)
        ));
        toml.push_str(&opts.config_tables);
        let binary = opts.binary.as_deref();
        // Where a joined hive keeps the credential the queen issues (as systemd's
        // $STATE_DIRECTORY would give it), so a restarted hive beats as itself.
        let credential = dir.join("queen-credential.json");
        let mut hive = Daemon::start_configured("rbee-hive", "hive", binary, dir, &toml, |cmd| {
            cmd.args(&opts.extra_args)
                .env_remove("RBEE_HIVE_TOKEN")
                .env("RBEE_HIVE_QUEEN__CREDENTIAL_FILE", &credential)
                .envs(opts.env.iter().map(|(k, v)| (k, v)));
        })
        .await?;
        hive.token = opts.token;
        Ok(hive)
    }

    /// A hive's audit log.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// Where the hive audits unauthenticated failures, beside its audit log.
    pub fn failures_log(&self) -> PathBuf {
        self.dir.join("audit.auth-failures.log")
    }

    /// The audit log and the failures log, together, once they hold every one of `events`
    /// (records are written by a background thread, so allow it a moment); fails after 10 s.
    pub async fn audit_with(&self, events: &[&str]) -> String {
        let what = format!("the audit logs to hold all of {events:?}");
        eventually(Duration::from_secs(10), &what, || async {
            let text = std::fs::read_to_string(self.audit_log()).unwrap_or_default()
                + &std::fs::read_to_string(self.failures_log()).unwrap_or_default();
            if events.iter().all(|e| text.contains(e)) {
                Ok(text)
            } else {
                Err(format!("\n{text}"))
            }
        })
        .await
        .unwrap()
    }

    /// `POST /v1/workers` on a hive; returns the new worker's id.
    pub async fn spawn_worker(
        &self,
        client: &reqwest::Client,
        model: &str,
    ) -> anyhow::Result<String> {
        let resp = self
            .post(
                client,
                "/v1/workers",
                &serde_json::json!({ "model": model }),
            )
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("spawn answered {status}: {body}");
        }
        Ok(body["id"].as_str().context("spawn without id")?.to_owned())
    }

    /// Polls a hive's `GET /v1/workers/{id}` until `pred` holds (returns that view) or `timeout`.
    pub async fn wait_worker(
        &self,
        client: &reqwest::Client,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let what = format!("worker {id} to reach the expected state");
        let view = eventually(timeout, &what, || async {
            let url = format!("/v1/workers/{id}");
            // A failed request ends the wait at once; only the state is waited for.
            let view = match self.get(client, &url).send().await {
                Ok(resp) => resp.json::<Value>().await,
                Err(e) => Err(e),
            };
            match view {
                Ok(view) if pred(&view) => Ok(Ok(view)),
                Ok(view) => Err(view.to_string()),
                Err(e) => Ok(Err(e)),
            }
        })
        .await
        .map_err(|e| anyhow!("{e:#}\nhive log:\n{}", self.stderr()))?;
        Ok(view?)
    }

    /// Spawns the test model on a hive and waits until it is ready; returns the worker's view.
    pub async fn ready_worker(&self, client: &reqwest::Client) -> anyhow::Result<Value> {
        let id = self
            .spawn_worker(client, &format!("file:{MODEL_FILE}"))
            .await?;
        self.wait_worker(client, &id, Duration::from_secs(120), |v| {
            v["state"] == "ready"
        })
        .await
    }
}
