//! The server's error type: what a backend or the server itself reports, and its protocol code.

use kvfetcher_protocol::ErrorCode;

use crate::buffers::BufferError;

/// An error of the local server or of a [`crate::server::Backend`] call.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model or the tokens are not available remotely.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is invalid (bad layout, shape mismatch, out-of-bounds write...).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The store or another dependency is down; retrying later may work.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// An unexpected failure.
    #[error("internal error: {0}")]
    Internal(String),
    /// A stored object is damaged, or is not the chunk asked for: a store fault.
    #[error("corrupt object: {0}")]
    Corrupt(String),
    /// GPU memory was asked for and this host or configuration cannot provide it (why: no
    /// driver, no such device, disabled in config...).
    #[error("gpu memory not supported: {0}")]
    GpuUnsupported(String),
    /// The client's credentials do not allow the request (`[save]` allow-lists).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// An I/O error of the server's socket or memory.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl ServeError {
    /// The protocol code this error is reported to clients with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ServeError::NotFound(_) => ErrorCode::NotFound,
            ServeError::BadRequest(_) | ServeError::Forbidden(_) => ErrorCode::BadRequest,
            ServeError::Unavailable(_) => ErrorCode::Unavailable,
            ServeError::Internal(_) | ServeError::Io(_) => ErrorCode::Internal,
            ServeError::Corrupt(_) => ErrorCode::Corrupt,
            ServeError::GpuUnsupported(_) => ErrorCode::GpuUnsupported,
        }
    }
}

impl From<BufferError> for ServeError {
    fn from(e: BufferError) -> Self {
        match e {
            BufferError::Invalid(m) => ServeError::BadRequest(m),
            BufferError::GpuUnsupported(m) => ServeError::GpuUnsupported(m),
            BufferError::Exhausted(m) => ServeError::Unavailable(m),
            BufferError::Io(e) => ServeError::Io(e),
            e @ (BufferError::Gpu { .. } | BufferError::Internal(_)) => {
                ServeError::Internal(e.to_string())
            }
        }
    }
}
