//! Starting a `queen-rbee` for a test (config, client, join and hive token files, registry), and
//! waiting for its hives.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use serde_json::Value;

use crate::{Daemon, MODEL_FILE, eventually, temp_dir, toml_path, toml_str, write_secret};

/// How to start a `queen-rbee` for a test.
#[derive(Debug, Clone, Default)]
pub struct QueenOptions {
    /// Client tokens by name (through 0600 files); empty is dev mode.
    pub clients: Vec<(String, String)>,
    /// Names among `clients` whose token may use the admin routes.
    pub admins: Vec<String>,
    /// Extra TOML lines for a client's `[[client_tokens]]` entry (limits), by name.
    pub client_config: Vec<(String, String)>,
    pub join_token: Option<String>,
    pub hive_token: Option<String>,
    /// Extra TOML appended to the config (tables such as `[[models]]`).
    pub config_tail: String,
    pub env: Vec<(String, String)>,
    /// Keep the registry in this SQLite file (default: a fresh one in the queen's directory).
    pub registry_path: Option<PathBuf>,
    /// Queen binary; default: this workspace's `queen-rbee`.
    pub binary: Option<PathBuf>,
}

/// The model alias every cluster test uses (`smollm2` → the test model file) and a 1 s
/// heartbeat, as `QueenOptions::config_tail`; more tables may follow it.
pub const SMOLLM2_CLUSTER_CONFIG: &str = "\n[[models]]\nname = \"smollm2\"\nreference = \"file:SmolLM2-135M-Instruct.Q4_1.gguf\"\n\n[scheduling]\nheartbeat_seconds = 1\n";

impl QueenOptions {
    /// A queen with one client token (`admin` as given), a join and a hive token, and
    /// [`SMOLLM2_CLUSTER_CONFIG`].
    pub fn cluster(client: (&str, &str), admin: bool, join: &str, hive: &str) -> Self {
        Self {
            clients: vec![(client.0.to_owned(), client.1.to_owned())],
            admins: if admin {
                vec![client.0.to_owned()]
            } else {
                Vec::new()
            },
            join_token: Some(join.to_owned()),
            hive_token: Some(hive.to_owned()),
            config_tail: SMOLLM2_CLUSTER_CONFIG.to_owned(),
            ..Self::default()
        }
    }
}

impl Daemon {
    /// Starts a queen on `listen` (e.g. `127.0.0.1:0`; config in `<dir>/queen.toml`, token
    /// files in `<dir>/secrets/`) and waits (up to 20 s) until it listens.
    pub async fn queen(opts: QueenOptions, listen: &str) -> anyhow::Result<Self> {
        let dir = temp_dir("queen");
        let registry_path = opts
            .registry_path
            .clone()
            .unwrap_or_else(|| dir.join("registry.sqlite"));
        let mut toml = format!(
            "listen = {}\nregistry_path = {}\n",
            toml_str(listen),
            toml_path(&registry_path)
        );
        let secrets = dir.join("secrets");
        std::fs::create_dir_all(&secrets)?;
        let mut secret_file = |key: &str, name: &str, secret: &str| {
            let p = write_secret(&secrets.join(name), secret);
            toml.push_str(&format!("{key} = {}\n", toml_path(&p)));
        };
        if let Some(t) = &opts.join_token {
            secret_file("join_token_file", "join", t);
        }
        if let Some(t) = &opts.hive_token {
            secret_file("hive_token_file", "hive", t);
        }
        for (name, secret) in &opts.clients {
            let p = write_secret(&secrets.join(format!("client-{name}")), secret);
            toml.push_str(&format!(
                "\n[[client_tokens]]\nname = {}\nfile = {}\nadmin = {}\n",
                toml_str(name),
                toml_path(&p),
                opts.admins.contains(name)
            ));
            for (_, lines) in opts.client_config.iter().filter(|(n, _)| n == name) {
                toml.push_str(lines);
                toml.push('\n');
            }
        }
        toml.push_str(&opts.config_tail);
        let binary = opts.binary.as_deref();
        Daemon::start_configured("queen-rbee", "queen", binary, dir, &toml, |cmd| {
            cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        })
        .await
    }

    /// Waits (10 s at most) until `depth` requests wait in a queen's queue for the test model.
    pub async fn wait_queue_depth(
        &self,
        client: &reqwest::Client,
        depth: u32,
    ) -> anyhow::Result<()> {
        let series = format!("rbee_queen_queue_depth{{model=\"file:{MODEL_FILE}\"}}");
        let what = format!("{depth} requests waiting");
        eventually(Duration::from_secs(10), &what, || async {
            match self.metric(client, &series).await {
                Ok(now) if now == f64::from(depth) => Ok(Ok(())),
                Ok(now) => Err(now),
                Err(e) => Ok(Err(e)),
            }
        })
        .await?
    }

    /// Waits (up to 30 s) until a queen's `/health` counts `hives` hives that are up.
    pub async fn wait_hives_up(&self, client: &reqwest::Client, hives: u64) -> anyhow::Result<()> {
        let what = format!("{hives} hives up");
        let health = eventually(Duration::from_secs(30), &what, || async {
            // A failed request ends the wait at once; only the count is waited for.
            let health = match client.get(self.url("/health")).send().await {
                Ok(resp) => resp.json::<Value>().await,
                Err(e) => Err(e),
            };
            match health {
                Ok(v) if v["hives_up"].as_u64().unwrap_or(0) >= hives => Ok(Ok(())),
                Ok(v) => Err(v.to_string()),
                Err(e) => Ok(Err(e)),
            }
        })
        .await
        .map_err(|e| anyhow!("{e:#}\n{}", self.stderr()))?;
        Ok(health?)
    }
}
