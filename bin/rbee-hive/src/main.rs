//! `rbee-hive`: the per-node daemon. Thin on purpose: flags, configuration, logging, tokens,
//! signals; the work is in `rbee_hive_core`.
//!
//! Exit codes: 0 after a clean shutdown, 64 for bad configuration (before binding), 1 for
//! runtime failures. `check-config` exits 0 or 64; `audit verify` exits 0 (intact), 1 (broken)
//! or 2 (unreadable).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rbee_config::Loader;
use rbee_hive_core::config::{ENV_PREFIX, HiveConfig};
use rbee_hive_core::reload::{
    API_TOKEN_ENV, EnvTokens, HUB_TOKEN_ENV, JOIN_TOKEN_ENV, Reloader, load_tokens,
};
use rbee_hive_core::{Hive, HiveError};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// sysexits' EX_USAGE: the configuration is wrong; retrying will not help.
const EXIT_CONFIG: u8 = 64;

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
    // Tokens pass through this process's environment: keep /proc/<pid>/environ (and core
    // dumps, ptrace) away from other processes of the same user, workers included.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_DUMPABLE has no memory-safety preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    match &args.command {
        Some(Cmd::CheckConfig { file }) => return check_config(&args, file),
        Some(Cmd::Audit {
            cmd: AuditCmd::Verify { file, from_genesis },
        }) => return audit_verify(file, *from_genesis),
        None => {}
    }
    let env_tokens = take_env_tokens();
    let loader = loader(&args, args.config.as_deref());
    let mut cfg: HiveConfig = match loader.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rbee-hive: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let log = init_logging(&cfg);
    if let Err(e) = complete_defaults(&mut cfg) {
        error!("{e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let (tokens, seen) = match load_tokens(&cfg, &env_tokens) {
        Ok(t) => t,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for (what, origin, fp) in &seen {
        info!(token = what, fingerprint = %fp, "token loaded from {origin}");
        if matches!(origin, rbee_hive_core::reload::TokenOrigin::Env(_)) {
            warn!(
                token = what,
                "token taken from the environment; prefer a file or a systemd credential"
            );
        }
    }
    if let Err(e) = check_security(&cfg, &tokens) {
        error!("{e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let catalog = match rbee_models::Catalog::new(cfg.model_dirs.clone()) {
        Ok(c) => c,
        Err(e) => {
            error!("model_dirs: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reloader = Reloader {
        load: {
            let loader = loader.clone();
            Box::new(move || {
                let mut c: HiveConfig = loader.load().map_err(|e| e.to_string())?;
                complete_defaults(&mut c).map_err(|e| e.to_string())?;
                Ok(c)
            })
        },
        set_log_level: Box::new(move |level| log(level)),
        env_tokens,
    };
    let textfile = cfg.metrics_textfile.clone();
    let result = runtime.block_on(serve(cfg, tokens, catalog, reloader));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(hive) => {
            if !textfile.is_empty()
                && let Err(e) = hive.write_metrics_textfile(Path::new(&textfile))
            {
                error!(path = %textfile, error = %e, "cannot write the metrics textfile");
            }
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
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
    {
        let hive = hive.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                warn!("cannot listen for SIGHUP; reload disabled");
                return;
            };
            while hup.recv().await.is_some() {
                info!("SIGHUP: reloading");
                rbee_hive_core::reload::reload(&hive, &reloader);
            }
        });
    }
    let took = rbee_hive_core::run(hive.clone(), listener, stop_signal()).await?;
    info!(seconds = took.as_secs_f64(), "shutdown complete");
    Ok(hive)
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot listen for SIGTERM/SIGINT");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

/// Reads the token variables once and removes them, so no child inherits them.
fn take_env_tokens() -> EnvTokens {
    let take = |name: &str| {
        let v = std::env::var(name).ok();
        if v.is_some() {
            // SAFETY: single-threaded here (before the runtime starts).
            unsafe { std::env::remove_var(name) };
        }
        v
    };
    EnvTokens {
        api: take(API_TOKEN_ENV),
        join: take(JOIN_TOKEN_ENV),
        hub: take(HUB_TOKEN_ENV),
    }
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

/// Defaults that depend on the machine: host name, model directory.
fn complete_defaults(cfg: &mut HiveConfig) -> anyhow::Result<()> {
    if cfg.hive_id.is_empty() {
        cfg.hive_id = hostname().unwrap_or_else(|| "hive".into());
    }
    if cfg.model_dirs.is_empty() {
        let dir = if let Some(state) = std::env::var_os("STATE_DIRECTORY") {
            // systemd StateDirectory=; the first entry when several are given.
            let first = state
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            PathBuf::from(first).join("models")
        } else if let Some(cache) = std::env::var_os("XDG_CACHE_HOME") {
            PathBuf::from(cache).join("rbee/models")
        } else if let Some(home) = std::env::var_os("HOME") {
            PathBuf::from(home).join(".cache/rbee/models")
        } else {
            anyhow::bail!("model_dirs: not set, and neither STATE_DIRECTORY nor HOME is");
        };
        cfg.model_dirs = vec![dir];
    }
    Ok(())
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name: String = String::from_utf8_lossy(&buf[..end])
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .collect();
    (!name.is_empty()).then_some(name)
}

fn check_security(cfg: &HiveConfig, tokens: &rbee_hive_core::Tokens) -> anyhow::Result<()> {
    if tokens.api.is_none() {
        if !cfg.listen.ip().is_loopback() {
            anyhow::bail!(
                "refusing to listen on {} without a token: set token_file (--token-file), the systemd credential `hive-token`, or {API_TOKEN_ENV}",
                cfg.listen
            );
        }
        warn!(
            "DEV MODE: no hive token configured; every request is accepted. Only loopback ({}) is served",
            cfg.listen
        );
    }
    if !cfg.queen.url.is_empty() && tokens.join.is_none() {
        let host = cfg
            .queen
            .url
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or(""))
            .unwrap_or("");
        let loopback = ["127.0.0.1", "localhost", "[::1]"]
            .iter()
            .any(|h| host == *h || host.starts_with(&format!("{h}:")));
        if !loopback {
            anyhow::bail!(
                "queen.url is set but no join token is: set queen.join_token_file, the systemd credential `join-token`, or {JOIN_TOKEN_ENV}"
            );
        }
        warn!("no join token for the queen on loopback: heartbeats go unauthenticated (dev mode)");
    }
    Ok(())
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
    if let Err(e) = complete_defaults(&mut cfg) {
        eprintln!("{e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let env_tokens = EnvTokens {
        api: std::env::var(API_TOKEN_ENV).ok(),
        join: std::env::var(JOIN_TOKEN_ENV).ok(),
        hub: std::env::var(HUB_TOKEN_ENV).ok(),
    };
    match load_tokens(&cfg, &env_tokens) {
        // The same checks the daemon makes before it binds.
        Ok((tokens, _)) => {
            if let Err(e) = check_security(&cfg, &tokens) {
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
