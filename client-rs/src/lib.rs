//! Client of the KVFetcher node daemon.
//!
//! - [`protocol`], [`transport`], [`memfd`]: the local protocol, re-exported from the
//!   `kvfetcher-protocol` crate that the daemon shares.
//! - [`model_id`]: a model's id from its file's content (the key namespace).
//! - [`Client`] / [`FetchHandle`]: the blocking API; [`AsyncClient`] / [`AsyncFetchHandle`]:
//!   the async one. Buffers are in host memory (a memfd) or, with [`MemoryKind::Gpu`], in the
//!   daemon's GPU memory opened over CUDA IPC (`libcuda.so.1` is loaded on first use).

mod async_client;
mod buffer;
mod client;
mod core;
mod cuda;
mod error;
mod gpu;
pub mod model_id;

pub use kvfetcher_protocol as protocol;
pub use kvfetcher_protocol::{memfd, transport};

pub use async_client::{AsyncClient, AsyncFetchHandle};
pub use buffer::HostMapping;
pub use client::{Client, FetchHandle};
pub use cuda::driver_available;
pub use error::{ClientError, CudaError, GpuError};
pub use protocol::{
    DType, DaemonStats, ErrorCode, FetchDone, KvShape, LayoutError, MemoryKind, Paging, PeerCred,
    TargetLayout, TokenOrder,
};
