//! The C-visible value types: the error enum, and plain structs for layouts and shapes.
//! Enum-like inputs are `uint32_t` fields validated on entry (a C caller can pass any value, and
//! an out-of-range Rust enum would be undefined behaviour).
#![allow(non_camel_case_types)]

use kvfetcher_client::protocol::{DType, MemoryKind, Paging, TargetLayout, TokenOrder};
use kvfetcher_client::{ClientError, ErrorCode, KvShape};

/// Result of every fallible `kvf_` function. Values are grouped by kind and never renumbered.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kvf_error {
    /// Success.
    KVF_OK = 0,
    /// A required pointer argument was NULL.
    KVF_ERR_NULL_ARGUMENT = 100,
    /// A string argument was not valid UTF-8.
    KVF_ERR_INVALID_UTF8 = 101,
    /// An argument was out of range or inconsistent (sizes, enum values).
    KVF_ERR_INVALID_ARGUMENT = 102,
    /// A layer index beyond the fetched shape.
    KVF_ERR_LAYER_OUT_OF_RANGE = 103,
    /// A host accessor on a fetch in GPU memory, or a GPU accessor on a fetch in host memory.
    KVF_ERR_WRONG_MEMORY = 104,
    /// The daemon's socket could not be reached.
    KVF_ERR_CONNECT = 200,
    /// A socket error on an established connection.
    KVF_ERR_IO = 201,
    /// The daemon sent something that is not the protocol.
    KVF_ERR_PROTOCOL = 202,
    /// The daemon speaks another protocol version.
    KVF_ERR_VERSION_MISMATCH = 203,
    /// The daemon closed the connection.
    KVF_ERR_CLOSED = 204,
    /// Shared memory could not be created or mapped.
    KVF_ERR_SHARED_MEMORY = 205,
    /// A CUDA driver call failed (opening the daemon's GPU buffer, waiting on it, exporting a
    /// device pointer); the detail names the call and the `CUresult`.
    KVF_ERR_GPU_DRIVER = 206,
    /// A local file (a model file given to `kvf_model_id_from_file`) could not be read.
    KVF_ERR_FILE = 207,
    /// The daemon found the request invalid.
    KVF_ERR_BAD_REQUEST = 300,
    /// The model or the tokens are not available.
    KVF_ERR_NOT_FOUND = 301,
    /// The remote store is unavailable; retrying later may work.
    KVF_ERR_UNAVAILABLE = 302,
    /// The daemon failed internally.
    KVF_ERR_INTERNAL = 303,
    /// The handle belongs to another client.
    KVF_ERR_PERMISSION_DENIED = 304,
    /// No such handle (released, or never existed).
    KVF_ERR_UNKNOWN_HANDLE = 305,
    /// GPU memory is not supported by this daemon build or host, or this process has no
    /// usable CUDA driver (`libcuda.so.1`) or no such device.
    KVF_ERR_GPU_UNSUPPORTED = 306,
    /// The daemon is at its limit of clients or fetches.
    KVF_ERR_BUSY = 307,
    /// A stored object is damaged or is not the chunk asked for (a store fault, logged and
    /// counted by the daemon); a later fetch gets the good prefix before it.
    KVF_ERR_CORRUPT = 308,
    /// A bug: a panic was caught at the library boundary.
    KVF_ERR_PANIC = 900,
}

impl kvf_error {
    /// Every code, for lookups by value.
    pub(crate) const ALL: [kvf_error; 24] = [
        kvf_error::KVF_OK,
        kvf_error::KVF_ERR_NULL_ARGUMENT,
        kvf_error::KVF_ERR_INVALID_UTF8,
        kvf_error::KVF_ERR_INVALID_ARGUMENT,
        kvf_error::KVF_ERR_LAYER_OUT_OF_RANGE,
        kvf_error::KVF_ERR_WRONG_MEMORY,
        kvf_error::KVF_ERR_CONNECT,
        kvf_error::KVF_ERR_IO,
        kvf_error::KVF_ERR_PROTOCOL,
        kvf_error::KVF_ERR_VERSION_MISMATCH,
        kvf_error::KVF_ERR_CLOSED,
        kvf_error::KVF_ERR_SHARED_MEMORY,
        kvf_error::KVF_ERR_GPU_DRIVER,
        kvf_error::KVF_ERR_FILE,
        kvf_error::KVF_ERR_BAD_REQUEST,
        kvf_error::KVF_ERR_NOT_FOUND,
        kvf_error::KVF_ERR_UNAVAILABLE,
        kvf_error::KVF_ERR_INTERNAL,
        kvf_error::KVF_ERR_PERMISSION_DENIED,
        kvf_error::KVF_ERR_UNKNOWN_HANDLE,
        kvf_error::KVF_ERR_GPU_UNSUPPORTED,
        kvf_error::KVF_ERR_BUSY,
        kvf_error::KVF_ERR_CORRUPT,
        kvf_error::KVF_ERR_PANIC,
    ];

    /// The static message of this code.
    pub(crate) fn message(self) -> &'static str {
        use kvf_error::*;
        match self {
            KVF_OK => "ok",
            KVF_ERR_NULL_ARGUMENT => "a required pointer argument was null",
            KVF_ERR_INVALID_UTF8 => "a string argument was not valid utf-8",
            KVF_ERR_INVALID_ARGUMENT => "invalid argument",
            KVF_ERR_LAYER_OUT_OF_RANGE => "layer out of range",
            KVF_ERR_WRONG_MEMORY => "wrong memory kind for this accessor (host vs gpu)",
            KVF_ERR_CONNECT => "cannot connect to the daemon",
            KVF_ERR_IO => "socket error",
            KVF_ERR_PROTOCOL => "protocol error",
            KVF_ERR_VERSION_MISMATCH => "protocol version mismatch",
            KVF_ERR_CLOSED => "connection closed by the daemon",
            KVF_ERR_SHARED_MEMORY => "shared memory error",
            KVF_ERR_GPU_DRIVER => "cuda driver call failed",
            KVF_ERR_FILE => "cannot read the file",
            KVF_ERR_BAD_REQUEST => "bad request",
            KVF_ERR_NOT_FOUND => "not found",
            KVF_ERR_UNAVAILABLE => "remote store unavailable",
            KVF_ERR_INTERNAL => "daemon internal error",
            KVF_ERR_PERMISSION_DENIED => "permission denied",
            KVF_ERR_UNKNOWN_HANDLE => "unknown handle",
            KVF_ERR_GPU_UNSUPPORTED => {
                "gpu memory not supported by this daemon build/host or no cuda driver"
            }
            KVF_ERR_BUSY => "daemon busy",
            KVF_ERR_CORRUPT => "corrupt object in the remote store",
            KVF_ERR_PANIC => "internal panic in libkvfetcher",
        }
    }

    /// The code of a client error.
    pub(crate) fn of(e: &ClientError) -> kvf_error {
        use kvfetcher_client::protocol::FrameError;
        use kvfetcher_client::transport::TransportError;
        use kvfetcher_client::GpuError;
        match e {
            ClientError::Connect { .. } => kvf_error::KVF_ERR_CONNECT,
            ClientError::Transport(TransportError::Io(_)) => kvf_error::KVF_ERR_IO,
            ClientError::Transport(TransportError::Closed) => kvf_error::KVF_ERR_CLOSED,
            ClientError::Transport(TransportError::Frame(FrameError::VersionMismatch {
                ..
            })) => kvf_error::KVF_ERR_VERSION_MISMATCH,
            ClientError::Transport(TransportError::Frame(_)) | ClientError::Unexpected(_) => {
                kvf_error::KVF_ERR_PROTOCOL
            }
            ClientError::Daemon { code, .. } => match code {
                ErrorCode::BadRequest => kvf_error::KVF_ERR_BAD_REQUEST,
                ErrorCode::NotFound => kvf_error::KVF_ERR_NOT_FOUND,
                ErrorCode::Unavailable => kvf_error::KVF_ERR_UNAVAILABLE,
                ErrorCode::Internal => kvf_error::KVF_ERR_INTERNAL,
                ErrorCode::VersionMismatch => kvf_error::KVF_ERR_VERSION_MISMATCH,
                ErrorCode::FrameTooLarge | ErrorCode::Malformed | ErrorCode::UnexpectedMessage => {
                    kvf_error::KVF_ERR_PROTOCOL
                }
                ErrorCode::PermissionDenied => kvf_error::KVF_ERR_PERMISSION_DENIED,
                ErrorCode::UnknownHandle => kvf_error::KVF_ERR_UNKNOWN_HANDLE,
                ErrorCode::GpuUnsupported => kvf_error::KVF_ERR_GPU_UNSUPPORTED,
                ErrorCode::Busy => kvf_error::KVF_ERR_BUSY,
                ErrorCode::Corrupt => kvf_error::KVF_ERR_CORRUPT,
            },
            ClientError::LayerOutOfRange { .. } => kvf_error::KVF_ERR_LAYER_OUT_OF_RANGE,
            ClientError::Layout(_) | ClientError::InvalidArgument(_) => {
                kvf_error::KVF_ERR_INVALID_ARGUMENT
            }
            ClientError::Memory(_) => kvf_error::KVF_ERR_SHARED_MEMORY,
            ClientError::Gpu(GpuError::Unavailable(_) | GpuError::NoDevice { .. }) => {
                kvf_error::KVF_ERR_GPU_UNSUPPORTED
            }
            ClientError::Gpu(GpuError::Driver { .. }) => kvf_error::KVF_ERR_GPU_DRIVER,
            ClientError::WrongMemory(_) => kvf_error::KVF_ERR_WRONG_MEMORY,
        }
    }
}

/// `kvf_layout.dtype`: IEEE half precision.
pub const KVF_DTYPE_F16: u32 = 0;
/// `kvf_layout.dtype`: bfloat16.
pub const KVF_DTYPE_BF16: u32 = 1;
/// `kvf_layout.dtype`: IEEE single precision.
pub const KVF_DTYPE_F32: u32 = 2;
/// `kvf_layout.order`: `[tokens, heads, dim]`.
pub const KVF_ORDER_NHD: u32 = 0;
/// `kvf_layout.order`: `[heads, tokens, dim]`.
pub const KVF_ORDER_HND: u32 = 1;
/// `kvf_layout.memory`: host memory (a memfd mapped into the caller).
pub const KVF_MEMORY_HOST: u32 = 0;
/// `kvf_layout.memory`: memory of GPU `gpu_device` (a CUDA ordinal). A fetch's buffer is then
/// the daemon's device memory opened in this process over CUDA IPC (the NVIDIA driver is loaded
/// at run time; without it the fetch fails with `KVF_ERR_GPU_UNSUPPORTED`): use
/// `kvf_fetch_device_ptr` / `kvf_fetch_layer_device_ptr` and `kvf_fetch_stream_wait_layer`
/// instead of the host pointer accessors. A save in GPU memory goes through
/// `kvf_client_save_gpu`.
pub const KVF_MEMORY_GPU: u32 = 1;

/// `kvf_client_save_with_flags` flag: overwrite chunks already stored (stored chunks are
/// otherwise write-once). The daemon refuses it with `KVF_ERR_BAD_REQUEST` (detail "forbidden:
/// ... may not replace") unless its `[save] replace_uids` / `replace_gids` lists this process's
/// uid or primary gid; a daemon older than write-once ignores it.
pub const KVF_SAVE_REPLACE: u32 = 1;

/// How restored KV is laid out. For each layer: the K tensor, then the V tensor, each in
/// `order`; paged layouts split each tensor into blocks of `block_tokens` tokens (the last one
/// zero-padded).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvf_layout {
    /// `KVF_DTYPE_F16`, `KVF_DTYPE_BF16` or `KVF_DTYPE_F32`.
    pub dtype: u32,
    /// `KVF_ORDER_NHD` or `KVF_ORDER_HND`.
    pub order: u32,
    /// 0 for one contiguous tensor, otherwise tokens per block.
    pub block_tokens: u32,
    /// `KVF_MEMORY_HOST` or `KVF_MEMORY_GPU`.
    pub memory: u32,
    /// CUDA ordinal when `memory` is `KVF_MEMORY_GPU`; ignored otherwise.
    pub gpu_device: u32,
}

/// The shape of a KV cache.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvf_shape {
    /// Transformer layers.
    pub num_layers: u32,
    /// Tokens.
    pub tokens: u32,
    /// KV heads.
    pub kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
}

impl kvf_layout {
    /// The Rust layout, or `KVF_ERR_INVALID_ARGUMENT` for values out of range.
    pub(crate) fn to_rust(self) -> Result<TargetLayout, kvf_error> {
        let bad = kvf_error::KVF_ERR_INVALID_ARGUMENT;
        Ok(TargetLayout {
            dtype: match self.dtype {
                KVF_DTYPE_F16 => DType::F16,
                KVF_DTYPE_BF16 => DType::BF16,
                KVF_DTYPE_F32 => DType::F32,
                _ => return Err(bad),
            },
            order: match self.order {
                KVF_ORDER_NHD => TokenOrder::Nhd,
                KVF_ORDER_HND => TokenOrder::Hnd,
                _ => return Err(bad),
            },
            paging: match self.block_tokens {
                0 => Paging::Contiguous,
                n => Paging::Paged { block_tokens: n },
            },
            memory: match self.memory {
                KVF_MEMORY_HOST => MemoryKind::Host,
                KVF_MEMORY_GPU => MemoryKind::Gpu(self.gpu_device),
                _ => return Err(bad),
            },
        })
    }
}

impl From<kvf_shape> for KvShape {
    fn from(s: kvf_shape) -> KvShape {
        KvShape {
            num_layers: s.num_layers,
            tokens: s.tokens,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
        }
    }
}

impl From<KvShape> for kvf_shape {
    fn from(s: KvShape) -> kvf_shape {
        kvf_shape {
            num_layers: s.num_layers,
            tokens: s.tokens,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
        }
    }
}
