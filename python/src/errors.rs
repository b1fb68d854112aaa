//! Client errors as Python exceptions: every `ClientError` becomes an instance of a class of
//! `kvfetcher.errors` (a `KvFetcherError`) carrying `.code` (the protocol's snake_case code for
//! errors the daemon reported, a client-side code otherwise) and `.message`.

use kvfetcher_client::transport::TransportError;
use kvfetcher_client::{ClientError, ErrorCode, GpuError};
use pyo3::prelude::*;
use pyo3::types::PyModule;

/// The protocol's name of a code (as it travels, `docs/PROTOCOL.md`).
pub(crate) fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::NotFound => "not_found",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::Internal => "internal",
        ErrorCode::VersionMismatch => "version_mismatch",
        ErrorCode::FrameTooLarge => "frame_too_large",
        ErrorCode::Malformed => "malformed",
        ErrorCode::UnexpectedMessage => "unexpected_message",
        ErrorCode::PermissionDenied => "permission_denied",
        ErrorCode::UnknownHandle => "unknown_handle",
        ErrorCode::GpuUnsupported => "gpu_unsupported",
        ErrorCode::Busy => "busy",
        ErrorCode::Corrupt => "corrupt",
    }
}

/// The `kvfetcher.errors` class and the code of an error.
fn classify(e: &ClientError) -> (&'static str, &'static str) {
    match e {
        ClientError::Daemon { code, .. } => {
            let class = match code {
                ErrorCode::NotFound => "NotFoundError",
                ErrorCode::Busy => "BusyError",
                ErrorCode::Unavailable => "UnavailableError",
                ErrorCode::BadRequest => "BadRequestError",
                ErrorCode::Corrupt => "CorruptError",
                ErrorCode::GpuUnsupported => "GpuUnsupportedError",
                _ => "DaemonError",
            };
            (class, code_name(*code))
        }
        ClientError::Connect { .. } => ("ConnectError", "connect"),
        ClientError::Transport(TransportError::Closed) => ("ConnectionLostError", "closed"),
        ClientError::Transport(TransportError::Io(_)) => ("ConnectionLostError", "io"),
        ClientError::Transport(TransportError::Frame(
            kvfetcher_client::protocol::FrameError::VersionMismatch { .. },
        )) => ("ProtocolError", "version_mismatch"),
        ClientError::Transport(_) | ClientError::Unexpected(_) => ("ProtocolError", "protocol"),
        ClientError::LayerOutOfRange { .. } => ("LayerOutOfRangeError", "layer_out_of_range"),
        ClientError::Layout(_) | ClientError::InvalidArgument(_) => {
            ("InvalidArgumentError", "invalid_argument")
        }
        ClientError::Memory(_) => ("SharedMemoryError", "shared_memory"),
        ClientError::Gpu(GpuError::Driver { .. }) => ("GpuDriverError", "gpu_driver"),
        ClientError::Gpu(_) => ("GpuUnsupportedError", "gpu_unsupported"),
        ClientError::WrongMemory(_) => ("WrongMemoryError", "wrong_memory"),
    }
}

/// The message of an error: the daemon's own words for daemon errors, else the client's.
fn message(e: &ClientError) -> String {
    match e {
        ClientError::Daemon { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Raises an instance of `kvfetcher.errors.<class>(code, message)`.
pub(crate) fn raise(py: Python<'_>, class: &str, code: &str, message: String) -> PyErr {
    let made = PyModule::import(py, "kvfetcher.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1((code, message)));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// The Python exception for a client error.
pub(crate) fn to_py(py: Python<'_>, e: ClientError) -> PyErr {
    let (class, code) = classify(&e);
    raise(py, class, code, message(&e))
}

/// A bad argument, raised as `kvfetcher.errors.InvalidArgumentError`.
pub(crate) fn invalid(py: Python<'_>, message: impl Into<String>) -> PyErr {
    raise(
        py,
        "InvalidArgumentError",
        "invalid_argument",
        message.into(),
    )
}

/// Converts a client result, raising the error as its Python exception.
pub(crate) trait IntoPy<T> {
    /// The value, or the error raised as a `kvfetcher.errors` exception.
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, ClientError> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
