//! Client of the KVFetcher node daemon, and the one definition of its local protocol.
//!
//! - [`protocol`]: messages, layouts and framing (sans-IO), shared with the daemon.
//! - [`transport`]: frames and fds over Unix sockets, blocking and async.
//! - [`memfd`]: the shared host memory.
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
pub mod memfd;
pub mod model_id;
pub mod protocol;
mod sys;
pub mod transport;

pub use async_client::{AsyncClient, AsyncFetchHandle};
pub use buffer::HostMapping;
pub use client::{Client, FetchHandle};
pub use cuda::driver_available;
pub use error::{ClientError, GpuError};
pub use protocol::{
    DaemonStats, ErrorCode, FetchDone, KvDType, KvShape, LayoutError, MemoryKind, Paging, PeerCred,
    TargetLayout, TokenOrder,
};
