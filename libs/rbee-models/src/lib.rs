//! Model references, the on-disk catalog, GGUF memory estimates and resumable, verified
//! downloads from a Hugging Face-style hub.
//!
//! - [`ModelRef`]: `hf:org/repo[@revision][:file]` or `file:PATH`, parsed strictly.
//! - [`Catalog`]: the configured model directories; lists `*.gguf`, resolves references
//!   without ever leaving the directories, deletes.
//! - [`GgufSummary`] / [`estimate_memory`]: what a model needs in RAM.
//! - [`HubClient`] / [`download`]: the hub's URL layout, retries with backoff, resume with
//!   `Range`, SHA-256 verification, progress through a `watch` channel.
//!
//! Every fallible call returns [`ModelError`], which carries a wire code and an HTTP status.

mod catalog;
mod download;
mod error;
mod gguf;
mod hub;
mod reference;

pub use catalog::{Catalog, FreeSpaceFn, MAX_DEPTH, ModelEntry, free_space, part_path};
pub use download::{DownloadProgress, DownloadState, ProgressError, download, file_sha256};
pub use error::ModelError;
pub use gguf::{
    GgufSummary, KV_ELEMENT_BYTES, MemoryEstimate, OVERHEAD_FIXED_BYTES, OVERHEAD_WEIGHTS_PERCENT,
    SUPPORTED_ARCHITECTURES, estimate_memory,
};
pub use hub::{
    DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP, DEFAULT_CONNECT_TIMEOUT, DEFAULT_ENDPOINT,
    DEFAULT_READ_TIMEOUT, DEFAULT_RETRIES, HubClient, RemoteFile, token_from_env,
};
pub use reference::{DEFAULT_REVISION, HfRef, ModelRef};
