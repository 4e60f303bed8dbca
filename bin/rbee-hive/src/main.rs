//! `rbee-hive`: the per-node daemon. Thin on purpose: flags, configuration, logging, wiring;
//! tokens, checks, reload and the work are in `rbee_hive_core`, signals in `rbee_lifecycle`.
//!
//! Exit codes: 0 after a clean shutdown, 64 for bad configuration (before binding), 1 for
//! runtime failures. `check-config` exits 0 or 64; `audit verify` exits 0 (intact), 1 (broken)
//! or 2 (unreadable).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rbee_config::Loader;
use rbee_hive_core::cli;
use rbee_hive_core::config::{ENV_PREFIX, HiveConfig};
use rbee_hive_core::reload::{API_TOKEN_ENV, EnvTokens, JOIN_TOKEN_ENV, Reloader};
use rbee_hive_core::{Hive, HiveError};
use rbee_lifecycle::{EXIT_CONFIG, Shutdown, config_error};
use tracing::{error, info};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Per-node rbee daemon: supervises llm-worker-rbee processes, provisions models, heartbeats to the queen",
    after_help = "Every config field can also be set as RBEE_HIVE_<KEY> (RBEE_HIVE_<TABLE>__<KEY> for tables); flags win over the environment, which wins over the file."
)]
struct Args {
    /// TOML configuration file (see docs/examples/hive.toml).
    #[arg(long, env = "RBEE_HIVE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address of the hive API (config: listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Name reported to the queen (config: hive_id).
    #[arg(long)]
    hive_id: Option<String>,
    /// Model directory; repeat for several, the first receives downloads (config: model_dirs).
    #[arg(long = "model-dir")]
    model_dirs: Vec<PathBuf>,
    /// File with the hive API token, mode 0600 (config: token_file).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Queen base URL to heartbeat to (config: queen.url).
    #[arg(long)]
    queen_url: Option<String>,
    /// Most workers at once (config: workers.max_workers).
    #[arg(long)]
    max_workers: Option<u32>,
    /// Worker binary for cpu devices (config: workers.binary).
    #[arg(long)]
    worker_binary: Option<PathBuf>,
    /// Audit log file (config: audit_log).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Write the final metrics here at exit, for node_exporter (config: metrics_textfile).
    #[arg(long)]
    metrics_textfile: Option<PathBuf>,
    /// text or json (config: log_format).
    #[arg(long)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Validate a configuration file (with the environment and flags applied) and exit.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Verify a file's hash chain and report the first broken link.
    Verify {
        file: PathBuf,
        /// Expect the chain to start at its genesis record (not a rotated-out continuation).
        #[arg(long)]
        from_genesis: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    rbee_lifecycle::not_dumpable();
    match &args.command {
        Some(Cmd::CheckConfig { file }) => {
            return cli::check_config(&loader(&args, Some(file)), file);
        }
        Some(Cmd::Audit {
            cmd: AuditCmd::Verify { file, from_genesis },
        }) => return cli::audit_verify(file, *from_genesis),
        None => {}
    }
    // SAFETY: single-threaded here (before the runtime starts).
    let env_tokens = unsafe { EnvTokens::take() };
    let loader = loader(&args, args.config.as_deref());
    let mut cfg: HiveConfig = match loader.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rbee-hive: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let set_log_level = rbee_lifecycle::init_logging(&cfg.log_level, cfg.log_format == "json");
    let (tokens, catalog) = match rbee_hive_core::reload::prepare(&mut cfg, &env_tokens) {
        Ok(t) => t,
        Err(e) => return config_error(e),
    };
    let reloader = Reloader {
        loader,
        set_log_level,
        env_tokens,
    };
    let result = rbee_lifecycle::block_on(serve(cfg, tokens, catalog, reloader));
    if matches!(result, Some(Ok(()))) {
        info!("stopped");
    }
    rbee_lifecycle::exit_code(result)
}

async fn serve(
    cfg: HiveConfig,
    tokens: rbee_hive_core::Tokens,
    catalog: rbee_models::Catalog,
    reloader: Reloader,
) -> anyhow::Result<()> {
    let textfile = cfg.metrics_textfile.clone();
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let address = listener.local_addr()?;
    let hive =
        Hive::new(cfg, address, tokens, catalog).map_err(|e: HiveError| anyhow::anyhow!(e))?;
    let shutdown = Shutdown::new();
    rbee_lifecycle::spawn_signal_handler(shutdown.clone(), reloader.for_hive(hive.clone()));
    let took = rbee_hive_core::run(hive.clone(), listener, shutdown).await?;
    info!(seconds = took.as_secs_f64(), "shutdown complete");
    if !textfile.is_empty()
        && let Err(e) = hive.write_metrics_textfile(Path::new(&textfile))
    {
        error!(path = %textfile, error = %e, "cannot write the metrics textfile");
    }
    Ok(())
}

fn loader(args: &Args, file: Option<&Path>) -> Loader {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let dirs = (!args.model_dirs.is_empty()).then(|| {
        let list = args.model_dirs.iter();
        let list = list.map(|d| toml::Value::String(d.display().to_string()));
        toml::Value::Array(list.collect()).to_string()
    });
    let flags = [
        ("listen", args.listen.map(|v| v.to_string()), "--listen"),
        ("hive_id", args.hive_id.clone(), "--hive-id"),
        ("model_dirs", dirs, "--model-dir"),
        ("token_file", path(&args.token_file), "--token-file"),
        ("queen.url", args.queen_url.clone(), "--queen-url"),
        (
            "workers.max_workers",
            args.max_workers.map(|v| v.to_string()),
            "--max-workers",
        ),
        (
            "workers.binary",
            path(&args.worker_binary),
            "--worker-binary",
        ),
        ("audit_log", path(&args.audit_log), "--audit-log"),
        (
            "metrics_textfile",
            path(&args.metrics_textfile),
            "--metrics-textfile",
        ),
        ("log_format", args.log_format.clone(), "--log-format"),
    ];
    let base = Loader::new(ENV_PREFIX)
        .file(file)
        .env_from_process()
        .ignore_env(&["RBEE_HIVE_CONFIG", API_TOKEN_ENV, JOIN_TOKEN_ENV]);
    flags
        .into_iter()
        .fold(base, |l, (key, value, flag)| match value {
            Some(v) => l.set(key, v, flag),
            None => l,
        })
}
