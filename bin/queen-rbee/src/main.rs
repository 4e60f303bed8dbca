//! `queen-rbee`: the cluster's front door. Thin on purpose: flags, configuration, logging,
//! wiring; tokens, checks, reload and the work are in `rbee_queen_core`, signals in
//! `rbee_lifecycle`.
//!
//! Exit codes: 0 after a clean shutdown, 64 for bad configuration (before binding), 1 for
//! runtime failures.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rbee_config::Loader;
use rbee_lifecycle::{EXIT_CONFIG, Shutdown, config_error};
use rbee_queen_core::config::{ENV_PREFIX, QueenConfig};
use rbee_queen_core::reload::{
    CLIENT_TOKEN_ENV, EnvTokens, HIVE_TOKEN_ENV, JOIN_TOKEN_ENV, Reloader,
};
use rbee_queen_core::{Queen, Tokens};
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "rbee's cluster front door: one OpenAI-compatible endpoint over every hive",
    after_help = "Every config field can also be set as RBEE_QUEEN_<KEY> (RBEE_QUEEN_<TABLE>__<KEY> for tables)."
)]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "RBEE_QUEEN_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the API (config: listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// SQLite file for the hive registry (config: registry_path).
    #[arg(long)]
    registry_path: Option<PathBuf>,
    /// text or json (config: log_format).
    #[arg(long)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Validate a configuration file (with the environment and flags applied), its token
    /// files included, and exit: 0 when it is good, 64 otherwise.
    CheckConfig { file: PathBuf },
}

fn main() -> ExitCode {
    rbee_lifecycle::not_dumpable();
    let args = Args::parse();
    if let Some(Cmd::CheckConfig { file }) = &args.command {
        return rbee_queen_core::cli::check_config(&loader(&args).file(Some(file)), file);
    }
    // SAFETY: single-threaded here (before the runtime starts).
    let env = unsafe { EnvTokens::take() };
    let loader = loader(&args);
    let cfg: QueenConfig = match loader.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("queen-rbee: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The filter is read once: log_level needs a restart (NEEDS_RESTART).
    let _ = rbee_lifecycle::init_logging(&cfg.log_level, cfg.log_format == "json");
    let (tokens, registry) = match rbee_queen_core::reload::prepare(&cfg, &env) {
        Ok(t) => t,
        Err(e) => return config_error(e),
    };
    let result = rbee_lifecycle::block_on(serve(cfg, tokens, registry, loader, env));
    if matches!(result, Some(Ok(()))) {
        info!("stopped");
    }
    rbee_lifecycle::exit_code(result)
}

async fn serve(
    cfg: QueenConfig,
    tokens: Tokens,
    registry: rbee_registry::Registry,
    loader: Loader,
    env: EnvTokens,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let queen = Queen::new(cfg, tokens, registry).map_err(anyhow::Error::msg)?;
    let shutdown = Shutdown::new();
    let reload = Reloader {
        queen: queen.clone(),
        loader,
        env,
    };
    rbee_lifecycle::spawn_signal_handler(shutdown.clone(), reload);
    rbee_queen_core::run(queen, listener, shutdown, Duration::from_secs(10)).await?;
    Ok(())
}

fn loader(args: &Args) -> Loader {
    let mut l = Loader::new(ENV_PREFIX)
        .file(args.config.as_deref())
        .env_from_process()
        .ignore_env(&[
            "RBEE_QUEEN_CONFIG",
            CLIENT_TOKEN_ENV,
            JOIN_TOKEN_ENV,
            HIVE_TOKEN_ENV,
        ]);
    if let Some(v) = args.listen {
        l = l.set("listen", v.to_string(), "--listen");
    }
    if let Some(v) = &args.registry_path {
        l = l.set("registry_path", v.display().to_string(), "--registry-path");
    }
    if let Some(v) = &args.log_format {
        l = l.set("log_format", v.clone(), "--log-format");
    }
    l
}
