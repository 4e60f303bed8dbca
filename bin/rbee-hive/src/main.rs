//! `rbee-hive`: the per-node daemon. Thin on purpose: flags, configuration, logging, wiring;
//! tokens, checks, reload and the work are in `rbee_hive_core`, signals in `rbee_lifecycle`.
//!
//! Exit codes: 0 after a clean shutdown, 64 for bad configuration (before binding), 1 for
//! runtime failures. `check-config` exits 0 or 64; `audit verify` exits 0 (intact), 1 (broken)
//! or 2 (unreadable).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rbee_config::Loader;
use rbee_hive_core::config::{ENV_PREFIX, HiveConfig};
use rbee_hive_core::reload::{self, API_TOKEN_ENV, EnvTokens, JOIN_TOKEN_ENV, Reloader};
use rbee_hive_core::{Hive, HiveError};
use rbee_lifecycle::{EXIT_CONFIG, Shutdown, config_error};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

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
        Some(Cmd::CheckConfig { file }) => return check_config(&args, file),
        Some(Cmd::Audit {
            cmd: AuditCmd::Verify { file, from_genesis },
        }) => return audit_verify(file, *from_genesis),
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
    let set_log_level = init_logging(&cfg);
    let (tokens, catalog) = match rbee_hive_core::reload::prepare(&mut cfg, &env_tokens) {
        Ok(t) => t,
        Err(e) => return config_error(e),
    };
    let reloader = Reloader {
        loader,
        set_log_level,
        env_tokens,
    };
    let textfile = cfg.metrics_textfile.clone();
    let result = rbee_lifecycle::block_on(serve(cfg, tokens, catalog, reloader));
    if let Some(Ok(hive)) = &result {
        if !textfile.is_empty()
            && let Err(e) = hive.write_metrics_textfile(Path::new(&textfile))
        {
            error!(path = %textfile, error = %e, "cannot write the metrics textfile");
        }
        info!("stopped");
    }
    rbee_lifecycle::exit_code(result.map(|r| r.map(drop)))
}

async fn serve(
    cfg: HiveConfig,
    tokens: rbee_hive_core::Tokens,
    catalog: rbee_models::Catalog,
    reloader: Reloader,
) -> anyhow::Result<Arc<Hive>> {
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
    Ok(hive)
}

fn loader(args: &Args, file: Option<&Path>) -> Loader {
    let mut l = Loader::new(ENV_PREFIX)
        .file(file)
        .env_from_process()
        .ignore_env(&["RBEE_HIVE_CONFIG", API_TOKEN_ENV, JOIN_TOKEN_ENV]);
    if let Some(v) = args.listen {
        l = l.set("listen", v.to_string(), "--listen");
    }
    if let Some(v) = &args.hive_id {
        l = l.set("hive_id", v.clone(), "--hive-id");
    }
    if !args.model_dirs.is_empty() {
        let list: Vec<String> = args
            .model_dirs
            .iter()
            .map(|d| toml_string(&d.display().to_string()))
            .collect();
        l = l.set(
            "model_dirs",
            format!("[{}]", list.join(", ")),
            "--model-dir",
        );
    }
    if let Some(v) = &args.token_file {
        l = l.set("token_file", v.display().to_string(), "--token-file");
    }
    if let Some(v) = &args.queen_url {
        l = l.set("queen.url", v.clone(), "--queen-url");
    }
    if let Some(v) = args.max_workers {
        l = l.set("workers.max_workers", v.to_string(), "--max-workers");
    }
    if let Some(v) = &args.worker_binary {
        l = l.set("workers.binary", v.display().to_string(), "--worker-binary");
    }
    if let Some(v) = &args.audit_log {
        l = l.set("audit_log", v.display().to_string(), "--audit-log");
    }
    if let Some(v) = &args.metrics_textfile {
        l = l.set(
            "metrics_textfile",
            v.display().to_string(),
            "--metrics-textfile",
        );
    }
    if let Some(v) = &args.log_format {
        l = l.set("log_format", v.clone(), "--log-format");
    }
    l
}

fn toml_string(s: &str) -> String {
    let escaped: String = s
        .chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c => vec![c],
        })
        .collect();
    format!("\"{escaped}\"")
}

type LogReload = rbee_hive_core::reload::SetLogLevel;

/// Logging to stderr (journald picks it up) with a filter a SIGHUP can change.
fn init_logging(cfg: &HiveConfig) -> LogReload {
    let filter = || EnvFilter::try_new(&cfg.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    fn reloader<S: 'static>(handle: tracing_subscriber::reload::Handle<EnvFilter, S>) -> LogReload {
        Box::new(move |level| {
            let f = EnvFilter::try_new(level).map_err(|e| format!("log_level `{level}`: {e}"))?;
            handle.reload(f).map_err(|e| e.to_string())
        })
    }
    if cfg.log_format == "json" {
        let b = tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter())
            .with_filter_reloading();
        let handle = b.reload_handle();
        b.init();
        reloader(handle)
    } else {
        let b = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .with_env_filter(filter())
            .with_filter_reloading();
        let handle = b.reload_handle();
        b.init();
        reloader(handle)
    }
}

fn check_config(args: &Args, file: &Path) -> ExitCode {
    let loader = loader(args, Some(file));
    let mut cfg: HiveConfig = match loader.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The same checks the daemon makes before it binds.
    if let Err(e) = reload::complete_defaults(&mut cfg) {
        eprintln!("{e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match reload::load_tokens(&cfg, &EnvTokens::read()) {
        Ok((tokens, _)) => {
            if let Err(e) = reload::check_security(&cfg, &tokens) {
                eprintln!("{}: {e:#}", file.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    // A closed pipe (`check-config ... | head`) is not an error worth a panic.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}: ok", file.display());
    if let Ok(origins) = loader.origins() {
        for (key, source) in origins {
            let _ = writeln!(out, "  {key} <- {source}");
        }
    }
    ExitCode::SUCCESS
}

fn audit_verify(file: &Path, from_genesis: bool) -> ExitCode {
    let report = if from_genesis {
        rbee_audit::verify_file(file, true)
    } else {
        rbee_audit::verify_chain(file)
    };
    match report {
        Ok(r) => match &r.first_break {
            None => {
                println!("{}: intact, {} records", file.display(), r.records);
                ExitCode::SUCCESS
            }
            Some(b) => {
                println!(
                    "{}: BROKEN at line {} (seq {:?}): {}",
                    file.display(),
                    b.line,
                    b.seq,
                    b.reason
                );
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}
