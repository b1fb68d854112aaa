//! The `kvfetcher` library: the node daemon and the store service, split by concern (see
//! docs/ARCHITECTURE.md for who may import whom).
//!
//! - [`server`]: the Unix-socket server engines talk to (the local protocol).
//! - [`pipeline`]: fetch and save: plan, verify, decode, restore, encode, upload.
//! - [`buffers`]: fetch buffers in host (memfd) or GPU (CUDA IPC) memory.
//! - [`gpu`]: CUDA and NVDEC loaded at run time, the restore kernels, IPC.
//! - [`transport`]: QUIC + TLS to stores, the store wire protocol.
//! - [`store`]: the store service.
//! - [`config`], [`metrics`], [`rlimit`]: configuration, Prometheus metrics, fd limits.
//! - [`cli`]: the `kvfetcher` subcommands.
//!
//! Benchmarks, GPU self-checks and the demo use this library from the `kvfetcher-tools` crate.

pub mod buffers;
pub mod cli;
pub mod config;
pub mod gpu;
pub mod metrics;
pub mod pipeline;
pub mod rlimit;
pub mod server;
pub mod store;
pub mod transport;
