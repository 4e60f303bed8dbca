//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong with model references, the catalog, GGUF files and downloads.
///
/// Each variant has a stable [`code`](ModelError::code) for the wire and a suggested HTTP
/// [`status`](ModelError::status). Messages never contain the hub token.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model reference (or a file name the hub listed) is malformed.
    #[error("invalid model reference `{input}`: {reason}")]
    InvalidModelRef {
        /// What was given (control characters escaped).
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A local model or a hub repo/file does not exist.
    #[error("{0}")]
    ModelNotFound(String),
    /// A `file:` reference (or a delete) points outside the configured model directories.
    #[error("{} is outside the configured model directories", path.display())]
    OutsideModelDirs {
        /// The offending path, as given.
        path: PathBuf,
    },
    /// A `hf:` reference without a file matches several `.gguf` files.
    #[error("{repo} holds several .gguf files, name one (hf:{repo}:FILE): {}", candidates.join(", "))]
    AmbiguousModelFile {
        /// `org/name`.
        repo: String,
        /// The `.gguf` files found.
        candidates: Vec<String>,
    },
    /// The hub refused our credentials (401/403).
    #[error(
        "the hub refused access to {what} (HTTP {status}): the repo may be gated or private; set HF_TOKEN to a Hugging Face token that can read it"
    )]
    HubUnauthorized {
        /// `org/name file`.
        what: String,
        /// 401 or 403.
        status: u16,
    },
    /// The hub could not be reached or kept failing after every retry.
    #[error("the hub is unavailable: {0}")]
    HubUnavailable(String),
    /// The downloaded bytes do not hash to what the hub advertised.
    #[error("checksum mismatch for {file}: expected sha256 {expected}, got {got}")]
    ChecksumMismatch {
        /// The file downloaded.
        file: String,
        /// SHA-256 the hub advertised.
        expected: String,
        /// SHA-256 of what arrived.
        got: String,
    },
    /// Not enough free space for the download.
    #[error(
        "insufficient disk space in {}: {needed} bytes needed, {available} bytes available",
        dir.display()
    )]
    InsufficientDisk {
        /// Where the file would go.
        dir: PathBuf,
        /// Bytes still to download.
        needed: u64,
        /// Bytes free for an unprivileged user.
        available: u64,
    },
    /// Another download of the same file holds its `.part`.
    #[error("a download of {} is already in progress", path.display())]
    DownloadInProgress {
        /// The final path of that download.
        path: PathBuf,
    },
    /// The download was cancelled.
    #[error("download cancelled")]
    Cancelled,
    /// A file is not a usable GGUF model.
    #[error("invalid GGUF file {}: {reason}", path.display())]
    InvalidGguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The hub client configuration is unusable (bad endpoint, TLS setup).
    #[error("invalid hub configuration: {0}")]
    InvalidConfig(String),
    /// A filesystem operation failed.
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What we were doing ("cannot read", "cannot rename to", ...).
        context: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

use rbee_api::{ErrorCode, codes};

impl ModelError {
    /// Stable SCREAMING_SNAKE code for the wire.
    pub fn code(&self) -> ErrorCode {
        match self {
            ModelError::InvalidModelRef { .. } => codes::INVALID_MODEL_REF,
            ModelError::ModelNotFound(_) => codes::MODEL_NOT_FOUND,
            ModelError::OutsideModelDirs { .. } => codes::OUTSIDE_MODEL_DIRS,
            ModelError::AmbiguousModelFile { .. } => codes::AMBIGUOUS_MODEL_FILE,
            ModelError::HubUnauthorized { .. } => codes::HUB_UNAUTHORIZED,
            ModelError::HubUnavailable(_) => codes::HUB_UNAVAILABLE,
            ModelError::ChecksumMismatch { .. } => codes::CHECKSUM_MISMATCH,
            ModelError::InsufficientDisk { .. } => codes::INSUFFICIENT_DISK,
            ModelError::DownloadInProgress { .. } => codes::DOWNLOAD_IN_PROGRESS,
            ModelError::Cancelled => codes::CANCELLED,
            ModelError::InvalidGguf { .. } => codes::INVALID_GGUF,
            ModelError::InvalidConfig(_) => codes::INVALID_CONFIG,
            ModelError::Io { .. } => codes::IO,
        }
    }

    /// The HTTP status an API answers this error with: the code's own.
    pub fn status(&self) -> u16 {
        self.code().status()
    }

    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ModelError::Io {
            context,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid_ref(input: &str, reason: impl Into<String>) -> Self {
        ModelError::InvalidModelRef {
            input: input.escape_debug().to_string(),
            reason: reason.into(),
        }
    }
}
