//! The remote KV store: a QUIC server holding chunk objects, and its storage backends
//! (a local directory by default, any S3-compatible store for scale-out).
//!
//! The client side and the wire protocol live in `crate::transport`.

mod config;
mod local;
mod memory;
mod pace;
mod s3;
mod service;
mod storage;
mod throttle;
mod upload;

pub use config::{StoreConfig, StoreConfigError};
pub use local::LocalDir;
pub use memory::MemoryBackend;
pub use pace::Pacer;
pub use s3::{S3Backend, S3Config};
pub use service::{
    ServerError, ServerOptions, StoreServer, CLOSE_BUSY, CLOSE_BUSY_REASON, STOP_REFUSED,
};
pub use storage::{CommitMode, ObjectReader, ObjectWriter, Storage, StorageError, Usage};
pub use throttle::{AuthThrottle, AuthThrottleConfig};
