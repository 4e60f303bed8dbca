//! The `llm-worker-rbee` daemon as a library: HTTP API over one loaded model.
//!
//! [`serve`] takes a bound listener, loads the model off the async runtime (the port answers
//! `/health` with `loading` meanwhile), reports readiness to the hive's ready URL, and serves
//! generations (continuous batching over `--parallel` slots) as SSE streams until shutdown. The binary only parses flags,
//! sets up logging and signals ([`TokenReload`] on SIGHUP), and calls [`serve`].

pub mod confine;
mod metrics;
pub mod reload;
mod server;
mod stream;
pub mod tools;
pub mod validate;

pub use metrics::WorkerMetrics;
pub use rbee_http::ApiError;
pub use rbee_lifecycle::Shutdown;
pub use reload::{SharedToken, TokenReload};
pub use server::{WorkerConfig, router_routes, serve};

/// Errors that stop the worker (exit non-zero).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("loading the model failed: {0}")]
    Load(#[from] rbee_engine::EngineError),
    #[error("the ready call to {url} failed: {reason}")]
    Ready { url: String, reason: String },
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
}
