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
use rbee_lifecycle::config_error;
use rbee_worker::confine::Confinement;
use rbee_worker::{SharedToken, Shutdown, TokenReload, WorkerConfig};
use tracing::{info, warn};

/// Environment variable through which the hive hands over the per-worker token (never argv).
const TOKEN_ENV: &str = "RBEE_WORKER_TOKEN";

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
    /// Sequences generated together (default: 8 on CPU, 16 on a GPU).
    #[arg(long, env = "RBEE_WORKER_PARALLEL")]
    parallel: Option<usize>,
    /// KV pool size in positions, shared by all slots (default: the context length, or 1024
    /// per slot if that is more).
    #[arg(long, env = "RBEE_WORKER_KV_TOKENS")]
    kv_tokens: Option<usize>,
    /// Log format: text or json.
    #[arg(long, env = "RBEE_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Apply the worker's confinement, try to read PATH, say whether it was refused, and exit
    /// (0: refused, the confinement holds; 1: readable; 2: it failed otherwise). Checks that
    /// this kernel confines workers, e.g. against the hive's token file.
    #[arg(long, value_name = "PATH")]
    check_confinement: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    rbee_lifecycle::not_dumpable();
    let level = std::env::var("RBEE_LOG").unwrap_or_else(|_| "info".into());
    let _ = rbee_lifecycle::init_logging(&level, args.log_format == "json");
    let token = match resolve_token(&args) {
        Ok(t) => t,
        Err(e) => return config_error(e),
    };
    if let Err(e) = check_config(&args, token.as_ref()) {
        return config_error(e);
    }
    // Before any thread exists (Landlock binds this thread and those it starts) and before
    // the model is parsed.
    let allowed = rbee_worker::confine::Allowed {
        model: args.model.clone(),
        token_file: args.token_file.clone(),
    };
    let confinement = rbee_worker::confine::confine(&allowed, args.device == DeviceSpec::Cpu);
    match &confinement {
        Confinement::Files => info!(
            "confined: reads only the model and its token file; no writes, no exec, no new privileges"
        ),
        Confinement::NoNewPrivsOnly(why) => {
            warn!(reason = %why, "file access not confined (no new privileges only)")
        }
    }
    if let Some(path) = &args.check_confinement {
        return rbee_worker::confine::check(path);
    }
    if let Some(n) = args.threads {
        // SAFETY: set before any other thread exists (no runtime, no engine yet); candle and
        // rayon size their pools from this variable.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    rbee_lifecycle::exit_code(rbee_lifecycle::block_on(run(args, token)))
}

/// The token from --token-file, else from the hive's environment variable (then removed from
/// our environment so it is not inherited or visible in /proc/<pid>/environ of children).
fn resolve_token(args: &Args) -> Result<Option<Token>, rbee_auth::AuthError> {
    let env = match args.token_file {
        Some(_) => None,
        None => std::env::var(TOKEN_ENV).ok(),
    };
    if env.is_some() {
        // SAFETY: single-threaded at this point (before the runtime starts).
        unsafe { std::env::remove_var(TOKEN_ENV) };
    }
    rbee_worker::reload::resolve_token(args.token_file.as_deref(), env.map(|s| (TOKEN_ENV, s)))
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
    if args.parallel == Some(0) || args.parallel.is_some_and(|n| n > 256) {
        anyhow::bail!("--parallel must be between 1 and 256");
    }
    if args.kv_tokens == Some(0) {
        anyhow::bail!("--kv-tokens must be at least 1");
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
    let shutdown = Shutdown::new();
    let token = SharedToken::new(token);
    let reload = TokenReload {
        file: args.token_file,
        token: token.clone(),
    };
    rbee_lifecycle::spawn_signal_handler(shutdown.clone(), reload);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let cfg = WorkerConfig {
        worker_id: args.worker_id,
        model: args.model,
        load: LoadOptions {
            device: args.device,
            max_context: args.max_context,
            parallel: args.parallel,
            kv_tokens: args.kv_tokens,
            ..LoadOptions::default()
        },
        token,
        ready_url: args.ready_url,
        grace: Duration::from_secs_f64(args.grace_seconds),
    };
    rbee_worker::serve(cfg, listener, shutdown).await?;
    Ok(())
}
