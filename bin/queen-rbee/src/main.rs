//! `queen-rbee`: the cluster's front door. Thin on purpose: flags, configuration, logging,
//! tokens, signals; the work is in `rbee_queen_core`.
//!
//! Exit codes: 0 after a clean shutdown, 64 for bad configuration (before binding), 1 for
//! runtime failures.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rbee_auth::{Token, TokenSet, resolve_token};
use rbee_config::Loader;
use rbee_queen_core::config::{ENV_PREFIX, QueenConfig};
use rbee_queen_core::{Queen, Tokens};
use tracing::{error, info, warn};

const EXIT_CONFIG: u8 = 64;
/// Settings read once at start; a SIGHUP that changes them says so.
const NEEDS_RESTART: &[&str] = &[
    "listen",
    "registry_path",
    "audit_log",
    "audit_max_bytes",
    "usage_log",
    "log_level",
    "log_format",
];
const CLIENT_TOKEN_ENV: &str = "RBEE_QUEEN_CLIENT_TOKEN";
const JOIN_TOKEN_ENV: &str = "RBEE_QUEEN_JOIN_TOKEN";
const HIVE_TOKEN_ENV: &str = "RBEE_QUEEN_HIVE_TOKEN";

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

/// Environment tokens, read once and removed so no child inherits them.
#[derive(Clone, Default)]
struct EnvTokens {
    client: Option<String>,
    join: Option<String>,
    hive: Option<String>,
}

fn main() -> ExitCode {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_DUMPABLE has no memory-safety preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let args = Args::parse();
    if let Some(Cmd::CheckConfig { file }) = &args.command {
        return check_config(&args, file);
    }
    let env = take_env_tokens();
    let loader = loader(&args);
    let cfg: QueenConfig = match loader.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("queen-rbee: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(&cfg);
    let tokens = match load_tokens(&cfg, &env) {
        Ok(t) => t,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = check_security(&cfg, &tokens) {
        error!("{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if tokens.clients.is_empty() {
        warn!(
            "DEV MODE: no client tokens; every request is accepted. Only loopback ({}) is served",
            cfg.listen
        );
    }
    let registry = if cfg.registry_path.is_empty() {
        rbee_registry::Registry::open_in_memory()
    } else {
        rbee_registry::Registry::open(Path::new(&cfg.registry_path))
    };
    let registry = match registry {
        Ok(r) => r,
        Err(e) => {
            error!("registry_path: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for h in &cfg.hives {
        if let Err(e) = registry.add_static(&h.id, &h.url, now_ms()) {
            error!("hives: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
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
    let result = runtime.block_on(serve(cfg, tokens, registry, loader, env));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
    // Hives dropped from `[[hives]]` while the queen was stopped leave the registry too.
    let (_, removed) = queen.apply_static_hives(now_ms());
    if !removed.is_empty() {
        info!(
            ?removed,
            "hives no longer configured were removed from the registry"
        );
    }
    {
        let queen = queen.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                rbee_systemd::reloading();
                // Whatever else the reload does, the usage log follows logrotate.
                queen.reopen_usage();
                let outcome = loader
                    .load::<QueenConfig>()
                    .map_err(|e| e.to_string())
                    .and_then(|c| load_tokens(&c, &env).map(|t| (c, t)))
                    .map(|(c, t)| {
                        let insecure = check_security(&c, &t).err();
                        (c, t, insecure)
                    });
                match outcome {
                    Ok((_, t, _)) if t.clients.is_empty() && !queen.tokens().clients.is_empty() => {
                        warn!(
                            "SIGHUP: the new configuration has no client tokens; keeping the current ones"
                        );
                    }
                    Ok((_, t, _)) if t.join.is_none() && queen.tokens().join.is_some() => {
                        warn!(
                            "SIGHUP: the new configuration has no join token; keeping the running configuration (restart to run without one)"
                        );
                    }
                    Ok((_, _, Some(e))) => {
                        warn!(error = %e, "SIGHUP: reload refused; keeping the running configuration");
                    }
                    Ok((c, t, None)) => {
                        let changed = rbee_config::changed_keys(&queen.config(), &c);
                        let needs_restart: Vec<&String> = changed
                            .iter()
                            .filter(|k| NEEDS_RESTART.contains(&k.as_str()))
                            .collect();
                        if !needs_restart.is_empty() {
                            warn!(
                                ?needs_restart,
                                "SIGHUP: these settings change only after a restart"
                            );
                        }
                        let names: Vec<String> = t
                            .clients
                            .fingerprints()
                            .into_iter()
                            .map(|(n, f)| format!("{n}={f}"))
                            .collect();
                        queen.set_config(c);
                        *queen.tokens.write().unwrap_or_else(|e| e.into_inner()) = t;
                        let (added, removed) = queen.apply_static_hives(now_ms());
                        info!(clients = ?names, ?changed, ?added, ?removed, "SIGHUP: configuration, tokens and hives reloaded");
                        queen.audit(
                            "config.reload",
                            "queen",
                            serde_json::json!({"clients": names, "hives_added": added, "hives_removed": removed}),
                        );
                    }
                    Err(e) => {
                        warn!(error = %e, "SIGHUP: reload failed; keeping the running configuration")
                    }
                }
                rbee_systemd::notify("READY=1\nSTATUS=serving");
            }
        });
    }
    rbee_queen_core::run(queen, listener, stop_signal(), Duration::from_secs(10)).await?;
    Ok(())
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

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
        client: take(CLIENT_TOKEN_ENV),
        join: take(JOIN_TOKEN_ENV),
        hive: take(HIVE_TOKEN_ENV),
    }
}

fn check_config(args: &Args, file: &Path) -> ExitCode {
    let loader = loader(args).file(Some(file));
    let cfg: QueenConfig = match loader.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let env = EnvTokens {
        client: std::env::var(CLIENT_TOKEN_ENV).ok(),
        join: std::env::var(JOIN_TOKEN_ENV).ok(),
        hive: std::env::var(HIVE_TOKEN_ENV).ok(),
    };
    // The same checks the daemon makes before it binds.
    match load_tokens(&cfg, &env).and_then(|t| check_security(&cfg, &t)) {
        Ok(()) => {
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
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// What the queen refuses to start without: client and join tokens beyond loopback.
fn check_security(cfg: &QueenConfig, tokens: &Tokens) -> Result<(), String> {
    if tokens.clients.is_empty() && !cfg.listen.ip().is_loopback() {
        return Err(format!(
            "refusing to listen on {} without client tokens: set client_tokens or {CLIENT_TOKEN_ENV}",
            cfg.listen
        ));
    }
    if tokens.join.is_none() && !cfg.listen.ip().is_loopback() {
        return Err(format!(
            "refusing to listen on {} without a join token: set join_token_file, the systemd credential `join-token`, or {JOIN_TOKEN_ENV}",
            cfg.listen
        ));
    }
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

fn load_tokens(cfg: &QueenConfig, env: &EnvTokens) -> Result<Tokens, String> {
    let mut clients = TokenSet::new();
    for t in &cfg.client_tokens {
        let token = rbee_auth::load_token_file(Path::new(&t.file))
            .map_err(|e| format!("client_tokens `{}`: {e}", t.name))?;
        info!(client = %t.name, fingerprint = %token.fingerprint(), "client token loaded");
        clients.insert(t.name.clone(), token);
    }
    if let Some(secret) = &env.client {
        let token = Token::new(secret.clone(), CLIENT_TOKEN_ENV).map_err(|e| e.to_string())?;
        warn!(fingerprint = %token.fingerprint(), "client token `env` taken from {CLIENT_TOKEN_ENV}; prefer a file");
        clients.insert("env", token);
    }
    let opt = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
    let join_file = opt(&cfg.join_token_file);
    let join = resolve_token(
        join_file.as_deref(),
        "join-token",
        env.join.as_deref().map(|v| (JOIN_TOKEN_ENV, v)),
    )
    .map_err(|e| format!("join token: {e}"))?
    .map(|(t, origin)| warn_env("join", t, origin));
    let mut join_previous = Vec::new();
    for f in &cfg.join_token_previous_files {
        let t = rbee_auth::load_token_file(Path::new(f))
            .map_err(|e| format!("join_token_previous_files `{f}`: {e}"))?;
        info!(fingerprint = %t.fingerprint(), "previous join token still accepted");
        join_previous.push(t);
    }
    let hive_file = opt(&cfg.hive_token_file);
    let hive = resolve_token(
        hive_file.as_deref(),
        "hive-token",
        env.hive.as_deref().map(|v| (HIVE_TOKEN_ENV, v)),
    )
    .map_err(|e| format!("hive token: {e}"))?
    .map(|(t, origin)| warn_env("hive", t, origin));
    let mut per_hive = std::collections::HashMap::new();
    for h in &cfg.hives {
        if let Some(f) = &h.token_file {
            let t = rbee_auth::load_token_file(Path::new(f))
                .map_err(|e| format!("hives `{}` token_file: {e}", h.id))?;
            info!(hive = %h.id, fingerprint = %t.fingerprint(), "hive token loaded");
            per_hive.insert(h.id.clone(), t);
        }
    }
    Ok(Tokens {
        clients,
        join,
        join_previous,
        hive,
        per_hive,
    })
}

/// Logs where a token came from (by fingerprint), warning when it was the environment.
fn warn_env(which: &str, token: Token, origin: rbee_auth::TokenOrigin) -> Token {
    match origin {
        rbee_auth::TokenOrigin::Env(var) => warn!(
            fingerprint = %token.fingerprint(),
            "{which} token taken from {var}; prefer a file or a systemd credential"
        ),
        other => info!(fingerprint = %token.fingerprint(), source = %other, "{which} token loaded"),
    }
    token
}

fn init_logging(cfg: &QueenConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log_format == "json" {
        b.json().init();
    } else {
        b.with_ansi(false).init();
    }
}
