//! `llm-worker-rbee`: serves one GGUF model over HTTP/SSE. Usually spawned by `rbee-hive`.
//!
//! Thin on purpose: flags (each also an environment variable), logging, the token, signals,
//! then `rbee_worker::serve`. Exit codes: 0 after a clean shutdown, 64 for bad configuration
//! (before binding), 1 for runtime failures (model load, ready call).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rbee_auth::Token;
use rbee_engine::{DeviceSpec, LoadOptions};
use rbee_worker::{Shutdown, WorkerConfig};
use tracing::{error, info, warn};

/// Environment variable through which the hive hands over the per-worker token (never argv).
const TOKEN_ENV: &str = "RBEE_WORKER_TOKEN";
/// sysexits' EX_USAGE: the configuration is wrong; retrying will not help.
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(version, about = "Serves one GGUF model and streams tokens over SSE")]
struct Args {
    /// GGUF model file.
    #[arg(long, env = "RBEE_WORKER_MODEL")]
    model: PathBuf,
    /// Address to listen on; port 0 picks a free port (the bound address is logged and sent
    /// in the ready call).
    #[arg(long, env = "RBEE_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// cpu, cuda[:N] or metal[:N] (cuda and metal need builds with those features).
    #[arg(long, env = "RBEE_WORKER_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// Identifier used in logs, /health and the ready call.
    #[arg(long, env = "RBEE_WORKER_ID", default_value = "worker")]
    worker_id: String,
    /// File holding the bearer token (mode 0600). Without it the token is taken from
    /// RBEE_WORKER_TOKEN, which the hive sets; with neither, loopback-only dev mode.
    #[arg(long, env = "RBEE_WORKER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// URL POSTed once the model is loaded and the port is open.
    #[arg(long, env = "RBEE_WORKER_READY_URL")]
    ready_url: Option<String>,
    /// Inference threads (default: all cores).
    #[arg(long, env = "RBEE_WORKER_THREADS")]
    threads: Option<usize>,
    /// Seconds in-flight streams may run on after SIGTERM/SIGINT before they are cancelled.
    #[arg(long, env = "RBEE_WORKER_GRACE_SECONDS", default_value_t = 10.0)]
    grace_seconds: f64,
    /// Lower the context limit below what the model declares.
    #[arg(long, env = "RBEE_WORKER_MAX_CONTEXT")]
    max_context: Option<usize>,
    /// Log format: text or json.
    #[arg(long, env = "RBEE_LOG_FORMAT", default_value = "text")]
    log_format: String,
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
    init_logging(&args.log_format);
    let token = match resolve_token(&args) {
        Ok(t) => t,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = check_config(&args, token.as_ref()) {
        error!("{e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Some(n) = args.threads {
        // SAFETY: set before any other thread exists (no runtime, no engine yet); candle and
        // rayon size their pools from this variable.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
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
    let result = runtime.block_on(run(args, token));
    // A model still loading on a blocking thread must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RBEE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
}

/// The token from --token-file, else from the hive's environment variable (then removed from
/// our environment so it is not inherited or visible in /proc/<pid>/environ of children).
fn resolve_token(args: &Args) -> anyhow::Result<Option<Token>> {
    if let Some(path) = &args.token_file {
        let t = rbee_auth::load_token_file(path)?;
        info!(fingerprint = %t.fingerprint(), "token loaded from file");
        return Ok(Some(t));
    }
    if let Ok(secret) = std::env::var(TOKEN_ENV) {
        // SAFETY: single-threaded at this point (before the runtime starts).
        unsafe { std::env::remove_var(TOKEN_ENV) };
        let t = Token::new(secret, TOKEN_ENV)?;
        info!(fingerprint = %t.fingerprint(), "token taken from {TOKEN_ENV}");
        return Ok(Some(t));
    }
    Ok(None)
}

fn check_config(args: &Args, token: Option<&Token>) -> anyhow::Result<()> {
    if token.is_none() {
        if !args.listen.ip().is_loopback() {
            anyhow::bail!(
                "refusing to listen on {} without a token: set --token-file or {TOKEN_ENV}",
                args.listen
            );
        }
        warn!(
            "DEV MODE: no token configured; every request is accepted. Only loopback ({}) is served",
            args.listen
        );
    }
    if !args.model.is_file() {
        anyhow::bail!("--model {}: no such file", args.model.display());
    }
    if args.threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    if !(0.0..=3600.0).contains(&args.grace_seconds) {
        anyhow::bail!("--grace-seconds must be between 0 and 3600");
    }
    if !matches!(args.log_format.as_str(), "text" | "json") {
        anyhow::bail!("--log-format must be text or json");
    }
    if let Some(url) = &args.ready_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        anyhow::bail!("--ready-url must be an http(s) URL");
    }
    Ok(())
}

async fn run(args: Args, token: Option<Token>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let shutdown = Shutdown::new();
    tokio::spawn(on_signals(shutdown.clone()));
    let cfg = WorkerConfig {
        worker_id: args.worker_id,
        model: args.model,
        load: LoadOptions {
            device: args.device,
            max_context: args.max_context,
            ..LoadOptions::default()
        },
        token,
        token_file: args.token_file,
        ready_url: args.ready_url,
        grace: Duration::from_secs_f64(args.grace_seconds),
    };
    rbee_worker::serve(cfg, listener, shutdown).await?;
    Ok(())
}

async fn on_signals(shutdown: Shutdown) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    shutdown.trigger();
}
