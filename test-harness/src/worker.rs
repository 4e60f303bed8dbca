//! Starting a standalone `llm-worker-rbee`: its options, and the ready call it answers with.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{Daemon, Log, Ready, Start, ready_receiver, temp_dir, write_token_file};

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub binary: PathBuf,
    pub model: PathBuf,
    /// Passed through a 0600 token file.
    pub token: Option<String>,
    pub listen: String,
    pub threads: Option<usize>,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl WorkerOptions {
    pub fn new(binary: PathBuf, model: PathBuf) -> Self {
        Self {
            binary,
            model,
            token: None,
            listen: "127.0.0.1:0".into(),
            threads: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }
}

impl Daemon {
    /// Starts a worker and waits (up to 120 s) for its ready call, whose body is `ready`.
    pub async fn worker(opts: WorkerOptions) -> anyhow::Result<Self> {
        let (ready_url, ready_rx) = ready_receiver().await?;
        let dir = temp_dir("worker");
        let mut cmd = Command::new(&opts.binary);
        cmd.arg("--model")
            .arg(&opts.model)
            .arg("--listen")
            .arg(&opts.listen)
            .arg("--ready-url")
            .arg(&ready_url)
            .arg("--worker-id")
            .arg("test-worker");
        if let Some(t) = &opts.token {
            cmd.arg("--token-file").arg(write_token_file(&dir, t));
        }
        if let Some(n) = opts.threads {
            cmd.arg("--threads").arg(n.to_string());
        }
        cmd.args(&opts.extra_args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)));
        let start = Start {
            name: "llm-worker-rbee",
            dir,
            log: Log::Memory,
            ready: Ready::Call(ready_rx),
            timeout: Duration::from_secs(120),
        };
        let mut worker = Daemon::start(cmd, start).await?;
        worker.token = opts.token;
        Ok(worker)
    }
}
