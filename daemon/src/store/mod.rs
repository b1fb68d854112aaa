//! The remote KV store: a QUIC server holding chunk objects, and its storage backends
//! (a local directory by default, any S3-compatible store for scale-out).
//!
//! The client side and the wire protocol live in `crate::transport`.

mod backend;
mod config;
mod local;
mod memory;
mod pace;
mod s3;
mod server;
mod throttle;
mod upload;

pub use backend::{Backend, BackendError, CommitMode, ObjectReader, ObjectWriter, Usage};
pub use config::{StoreConfig, StoreConfigError};
pub use local::LocalDir;
pub use memory::MemoryBackend;
pub use pace::Pacer;
pub use s3::{S3Backend, S3Config};
pub use server::{
    ServerError, ServerOptions, StoreServer, CLOSE_BUSY, CLOSE_BUSY_REASON, STOP_REFUSED,
};
pub use throttle::{AuthThrottle, AuthThrottleConfig};
