//! The daemon's GPU error: a driver call's [`CudaError`] plus what only the daemon's side can
//! fail at (NVDEC, decoding, the restore kernels). The client has its own `GpuError` for its
//! side (IPC import and events); both carry the same [`CudaError`] from `kvfetcher-cuda-sys`.

use kvfetcher_cuda_sys::CudaError;

/// Why a GPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// `libcuda.so.1` could not be loaded or initialised (no NVIDIA driver on this host).
    #[error("no cuda driver: {0}")]
    NoDriver(String),
    /// `libnvcuvid.so.1` could not be loaded (no NVDEC on this host).
    #[error("no nvdec: {0}")]
    NoNvdec(String),
    /// The requested device ordinal does not exist.
    #[error("no cuda device {ordinal} (found {count})")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },
    /// A driver call returned an error.
    #[error("{call} failed: {} (code {})", error.text, error.code)]
    Cuda {
        /// The driver function.
        call: &'static str,
        /// The driver's result, named and described.
        error: CudaError,
    },
    /// NVDEC cannot decode this stream (format, size or bit depth out of its range).
    #[error("nvdec cannot decode this stream: {0}")]
    Unsupported(String),
    /// The bitstream did not decode to what the caller declared.
    #[error("nvdec decode failed: {0}")]
    Decode(String),
    /// An argument is out of range (sizes, layouts, buffer capacities).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The section's bytes are invalid the way the CPU restore would report them (corrupt
    /// stream, missing or mismatched profile): the fetch fails as it does on the CPU path.
    #[error("{0}")]
    Format(kvfetcher_codec::FormatError),
    /// The restore kernels' PTX failed to load.
    #[error("restore kernels: {0}")]
    Kernels(String),
}

impl GpuError {
    /// Whether a driver call ran out of device memory (`CUDA_ERROR_OUT_OF_MEMORY`).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, GpuError::Cuda { error, .. } if error.code == CudaError::OUT_OF_MEMORY)
    }
}
