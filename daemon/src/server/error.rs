//! The server's error type: what a backend or the server itself reports, and its protocol code.

use kvfetcher_protocol::ErrorCode;

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

impl From<crate::gpu::DeviceError> for ServeError {
    fn from(e: crate::gpu::DeviceError) -> Self {
        ServeError::GpuUnsupported(e.to_string())
    }
}

/// The buffer length of `layout` for `shape`, refused when it is empty or above `max_bytes`:
/// the checks every destination makes before allocating.
pub(crate) fn checked_buffer_len(
    layout: &kvfetcher_protocol::TargetLayout,
    shape: &kvfetcher_protocol::KvShape,
    max_bytes: u64,
) -> Result<usize, ServeError> {
    let len = layout
        .checked_buffer_len(shape)
        .map_err(|e| ServeError::BadRequest(e.to_string()))?;
    if len == 0 {
        return Err(ServeError::BadRequest("empty shape".into()));
    }
    if len as u64 > max_bytes {
        return Err(ServeError::BadRequest(format!(
            "buffer of {len} bytes exceeds the limit of {max_bytes}"
        )));
    }
    Ok(len)
}

/// The end of a write of `len` bytes at `offset` into a buffer of `buf_len` bytes, refused
/// when it does not fit: the bounds check of every destination's `write`.
pub(crate) fn checked_write_end(
    offset: usize,
    len: usize,
    buf_len: usize,
) -> Result<usize, ServeError> {
    offset
        .checked_add(len)
        .filter(|&e| e <= buf_len)
        .ok_or_else(|| {
            ServeError::BadRequest(format!(
                "write of {len} bytes at {offset} outside a {buf_len} byte buffer"
            ))
        })
}
