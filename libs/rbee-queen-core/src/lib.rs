//! `queen-rbee`: the cluster's front door. OpenAI-compatible and native inference routes,
//! the hive registry fed by heartbeats, scheduling (reuse a ready worker, else spawn one on
//! the best hive, else wait in a bounded per-model queue) and the relay down to the worker.
//!
//! - [`config`]: [`config::QueenConfig`] for the shared loader.
//! - [`queen`]: state, scheduling and leases; [`relay`]: one request's trip down the chain.
//! - [`api`]: routes and handlers; [`metrics`]; [`openapi`]: the API document built from the
//!   route table.
//! - [`reload`]: tokens, the checks before binding, and SIGHUP; [`run`]: serve, then drain;
//!   [`cli`]: `check-config`.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod hive_client;
pub mod inference;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod queen;
pub mod relay;
pub mod reload;
pub mod respond;
pub mod sched;
mod spawning;
pub mod usage;

use std::sync::Arc;
use std::time::Duration;

use rbee_lifecycle::{Drain, Shutdown};
use tracing::{info, warn};

pub use queen::{Queen, Tokens};

/// Serves until `shutdown` is triggered, then lets in-flight requests finish (up to `drain`).
/// Hives and workers keep running.
pub async fn run(
    queen: Arc<Queen>,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
    drain: Duration,
) -> std::io::Result<()> {
    // Hives dropped from `[[hives]]` while the queen was stopped leave the registry too.
    let (_, removed) = queen.apply_static_hives(reload::now_ms());
    if !removed.is_empty() {
        info!(
            ?removed,
            "hives no longer configured were removed from the registry"
        );
    }
    tokio::spawn(queen.clone().sweep_loop());
    let address = listener.local_addr()?;
    queen.audit(
        "queen.start",
        "queen",
        serde_json::json!({"address": address.to_string(), "version": env!("CARGO_PKG_VERSION")}),
    );
    info!(%address, "queen listening");
    rbee_systemd::notify("READY=1\nSTATUS=serving");
    // Every exchange holds a guard, so the drain below wakes when one ends.
    let exchanges = Drain::new();
    let app = rbee_http::drain::hold_drain(api::router(queen.clone()), exchanges.clone());
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = queen.config().server.limits();
    let tls = queen.tls.clone();
    let server = rbee_http::server::serve(listener, app, limits, tls, async move {
        let _ = shutdown_rx.await;
    });
    let mut server = tokio::spawn(server);
    tokio::select! {
        r = &mut server => return r.map_err(|e| std::io::Error::other(e.to_string()))?,
        _ = shutdown.cancelled() => {}
    }
    // Still listening: new requests get 503 SHUTTING_DOWN (and /health 503) while the
    // running ones finish.
    queen.start_draining();
    rbee_systemd::notify("STOPPING=1\nSTATUS=draining");
    info!(
        drain_s = drain.as_secs(),
        active = queen.active_requests(),
        "shutting down: refusing new requests; finishing running ones"
    );
    exchanges
        .drain_until(drain, || queen.active_requests() == 0)
        .await;
    if queen.active_requests() > 0 {
        warn!(
            active = queen.active_requests(),
            "requests still running after the drain window; cutting them"
        );
        queen.cut_streams();
    }
    let _ = shutdown_tx.send(());
    if tokio::time::timeout(Duration::from_secs(2), &mut server)
        .await
        .is_err()
    {
        server.abort();
    }
    queen.audit("queen.stop", "queen", serde_json::json!({}));
    tokio::task::block_in_place(|| queen.flush());
    Ok(())
}
