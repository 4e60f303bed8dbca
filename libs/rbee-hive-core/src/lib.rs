//! `rbee-hive`: the per-node daemon. It spawns and supervises `llm-worker-rbee` processes,
//! keeps the model catalog and downloads, admits workers against the node's memory, proxies
//! inference to its workers, heartbeats to the queen and shuts everything down in order.
//!
//! - [`config`]: the configuration file, environment and flags ([`config::HiveConfig`]).
//! - [`hive`]: shared state, admission, shutdown; `health`: the keep-alive and health loop;
//!   `reports`: lifecycle and download reports taken in (state, metrics, audit).
//! - [`worker`]: one worker's record and handle; [`lifecycle`]: its task (spawn, ready, crash,
//!   restart, stop), over [`process`] (spawn, signals, reaping) and [`restart`] (the policy).
//! - [`server`]: the HTTP API; [`proxy`]: inference streams passed through.
//! - [`downloads`], [`resources`], [`heartbeat`]; systemd notifications via `rbee-systemd`.
//! - [`reload`]: tokens, the checks before binding, and SIGHUP; [`run`]: serve, then shut down.
//! - [`cli`]: the one-shot commands (`check-config`, `audit verify`).

pub mod cli;
pub mod config;
pub mod credential;
pub mod downloads;
mod health;
pub mod heartbeat;
pub mod hive;
pub mod lifecycle;
pub mod metrics;
pub mod ports;
pub mod process;
pub mod proxy;
pub mod reload;
mod reports;
pub mod resources;
pub mod restart;
pub mod server;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use rbee_lifecycle::{Drain, Shutdown};
use tracing::{info, warn};

pub use hive::{Hive, Tokens};

#[derive(Debug, thiserror::Error)]
pub enum HiveError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no worker `{0}` on this hive")]
    WorkerNotFound(String),
    #[error("no model `{0}` on this hive")]
    ModelNotFound(String),
    #[error("insufficient resources: {0}")]
    Insufficient(String),
    #[error("the hive is shutting down and takes no new work")]
    ShuttingDown,
    #[error("{0}")]
    Model(#[from] rbee_models::ModelError),
    #[error("audit log: {0}")]
    Audit(#[from] rbee_audit::AuditError),
    #[error("http client: {0}")]
    Http(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// Serves the API until `shutdown` is triggered, then shuts down in order (drain, cut, stop
/// workers) and returns how long the shutdown took.
pub async fn run(
    hive: Arc<Hive>,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> Result<Duration, HiveError> {
    tokio::spawn(hive.clone().supervise_loop());
    tokio::spawn(heartbeat::run(hive.clone()));
    tokio::spawn(hive.clone().hash_loop());
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    // Every exchange holds a guard, so the drain wakes when one ends.
    let exchanges = Drain::new();
    let app = rbee_http::drain::hold_drain(server::router(hive.clone()), exchanges.clone());
    // The same server loop as the queen's: header timeout, connection caps, peer addresses.
    let limits = rbee_http::server::ServerLimits::default();
    let done = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|d| *d).await.map(|_| ());
    };
    if hive.tls.is_some() {
        // Workers call back over loopback without TLS (they hold no CA for the hive's
        // certificate): a second, loopback-only listener with the same routes and tokens.
        let callback = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let _ = hive.worker_callback.set(callback.local_addr()?);
        let plain =
            rbee_http::server::serve(callback, app.clone(), limits, None, done(done_rx.clone()));
        tokio::spawn(plain);
    }
    let server = rbee_http::server::serve(listener, app, limits, hive.tls.clone(), done(done_rx));
    let mut server = tokio::spawn(server);
    hive.audit(
        "hive.start",
        serde_json::json!({"address": hive.address.to_string(), "hive_id": hive.hive_id(),
                           "version": env!("CARGO_PKG_VERSION")}),
    );
    info!(address = %hive.address, hive_id = %hive.hive_id(), "hive listening");
    rbee_systemd::notify("READY=1\nSTATUS=serving");
    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = &mut server => {
            // The listener failed; still stop the workers before reporting it.
            let e = match r {
                Ok(Ok(())) => std::io::Error::other("the server stopped unexpectedly"),
                Ok(Err(e)) => e,
                Err(e) => std::io::Error::other(e.to_string()),
            };
            hive.shutdown(&exchanges).await;
            return Err(HiveError::Io(e));
        }
    }
    rbee_systemd::notify("STOPPING=1\nSTATUS=stopping workers");
    let took = hive.shutdown(&exchanges).await;
    let _ = done_tx.send(true);
    // Event streams (worker events, download progress) never end by themselves.
    if tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .is_err()
    {
        warn!("connections still open after shutdown; closing them");
    }
    Ok(took)
}
