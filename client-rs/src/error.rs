//! The clients' error type.

use std::io;

pub use kvfetcher_cuda_sys::CudaError;

use crate::protocol::{ErrorCode, LayoutError};
use crate::transport::TransportError;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon's socket could not be reached.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The connect error.
        source: io::Error,
    },
    /// The connection failed (socket error, protocol violation, version mismatch, closed).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The daemon refused or failed the request.
    #[error("daemon error ({code:?}): {message}")]
    Daemon {
        /// The daemon's code.
        code: ErrorCode,
        /// The daemon's message.
        message: String,
    },
    /// The daemon answered with a message that does not fit the request.
    #[error("unexpected message from daemon: {0}")]
    Unexpected(String),
    /// A layer index beyond the fetched shape.
    #[error("layer {layer} out of range ({layers} layers)")]
    LayerOutOfRange {
        /// The layer asked for.
        layer: u32,
        /// Layers in the fetch.
        layers: u32,
    },
    /// The layout cannot describe the shape.
    #[error("bad layout: {0}")]
    Layout(#[from] LayoutError),
    /// An argument is invalid (size mismatch, bad kv index...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A memfd could not be created, written or mapped.
    #[error("shared memory error: {0}")]
    Memory(io::Error),
    /// GPU memory could not be opened, exported or waited on (no driver, no such device, or a
    /// failed driver call).
    #[error("gpu: {0}")]
    Gpu(#[from] GpuError),
    /// A host accessor on a GPU buffer, or a GPU accessor on a host buffer.
    #[error("{0}")]
    WrongMemory(&'static str),
}

/// Why the CUDA side of a GPU buffer failed, on the client's side (opening IPC handles,
/// waiting on events, exporting a save's buffer). The daemon's `GpuError` covers its own side
/// (NVDEC, kernels); both carry a driver call's result as the shared [`CudaError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// No usable driver: `libcuda.so.1` is missing or too old, or `cuInit` failed.
    #[error("{0}")]
    Unavailable(String),
    /// The device ordinal does not exist on this host.
    #[error("CUDA device {device} not present ({count} devices)")]
    NoDevice {
        /// The ordinal asked for.
        device: u32,
        /// Devices the driver sees.
        count: u32,
    },
    /// A driver call failed.
    #[error("{call} failed: {error}")]
    Driver {
        /// The driver entry point.
        call: &'static str,
        /// Its `CUresult`, named and described by the driver.
        error: CudaError,
    },
}

impl ClientError {
    /// The daemon's error code, for errors the daemon reported.
    pub fn daemon_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Daemon { code, .. } => Some(*code),
            _ => None,
        }
    }
}
