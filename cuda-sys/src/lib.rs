//! Raw bindings to the NVIDIA driver libraries, loaded at run time with libloading: the CUDA
//! driver API (`libcuda.so.1`, [`cuda`]) and NVDEC (`libnvcuvid.so.1`, [`nvcuvid`]).
//!
//! The only CUDA FFI of the workspace, shared by the engine-side client (`kvfetcher-client`:
//! IPC handles, events) and the daemon (`kvfetcher`: memory, kernels, NVDEC). Nothing links
//! against the driver, so every crate builds and its CPU tests run on hosts without one: a
//! missing library or symbol is a [`LoadError`]. Hand-written from the SDK headers (CUDA 12/13
//! driver API, Video Codec SDK; 64-bit layouts), with only the entry points the two sides use;
//! add entry points as they are needed. Not a safe API: each side keeps its own safe wrappers
//! (`client-rs/src/cuda.rs`, `daemon/src/gpu/cuda.rs` and `nvdec.rs`), and nothing else calls
//! these pointers.

pub mod cuda;
pub mod nvcuvid;

pub use cuda::{CudaApi, CudaError};
pub use nvcuvid::NvcuvidApi;

use libloading::Library;

/// Why a driver library could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The library is not on this host (no NVIDIA driver, or no NVDEC).
    #[error("{reason}")]
    Library {
        /// The library's file name, e.g. `libcuda.so.1`.
        library: &'static str,
        /// The loader's message.
        reason: String,
    },
    /// The library lacks an entry point these bindings need (a driver too old).
    #[error("{symbol}: {reason}")]
    Symbol {
        /// The library's file name.
        library: &'static str,
        /// The missing symbol.
        symbol: &'static str,
        /// The loader's message.
        reason: String,
    },
}

/// Opens `name`.
fn open(name: &'static str) -> Result<Library, LoadError> {
    // SAFETY: loading an NVIDIA driver library runs its initialisers, which have no
    // preconditions on our side.
    unsafe { Library::new(name) }.map_err(|e| LoadError::Library {
        library: name,
        reason: e.to_string(),
    })
}

/// Resolves `symbol` of `lib` (file `library`) into a plain function pointer.
///
/// # Safety
/// `T` must be the C signature of `symbol`, and the pointer must only be called while `lib`
/// stays loaded (each API table owns its `Library`).
unsafe fn sym<T: Copy>(
    lib: &Library,
    library: &'static str,
    symbol: &'static str,
) -> Result<T, LoadError> {
    // SAFETY: the caller guarantees that T matches the symbol's C signature and keeps `lib`
    // loaded while the pointer is used.
    unsafe {
        lib.get::<T>(symbol.as_bytes())
            .map(|s| *s)
            .map_err(|e| LoadError::Symbol {
                library,
                symbol,
                reason: e.to_string(),
            })
    }
}
