//! The `kvfetcher` library: the node daemon and the store service, split by concern (see
//! docs/ARCHITECTURE.md for who may import whom).
//!
//! Its API is what the binary (`main.rs`), `kvfetcher-bench` (crate `tools`) and the tests use:
//! a module is private unless listed here, and each public module names its items with explicit
//! `pub use` over private submodules, so a new public item is a decision made in one place.
//!
//! - [`server`]: the Unix-socket server engines talk to, and the [`server::Backend`] it serves.
//! - [`pipeline`]: fetch and save: plan, verify, decode, restore, encode, upload.
//! - [`gpu`]: CUDA and NVDEC loaded at run time, the restore kernels, IPC (the tools' GPU
//!   self-checks and benchmarks drive these directly).
//! - [`transport`]: QUIC + TLS to stores; [`transport::wire`], the stores' sans-IO wire
//!   protocol, is public whole so that tests and the fuzzer can speak it raw.
//! - [`store`]: the store service and its storage backends.
//! - [`config`]: the TOML configuration (public whole: it is the schema).
//! - [`cli`]: the subcommands ([`cli::run`], [`cli::exit_code`]) and what the tools reuse of
//!   them (starting a daemon, logging, codec options).
//! - At the root, from private modules: the fetch memory a [`server::Backend`] writes
//!   ([`Destination`], [`DeviceRegion`], [`BufferError`]), [`Metrics`] and [`raise_nofile`].
//!
//! Benchmarks, GPU self-checks and the demo use this library from the `kvfetcher-tools` crate.

mod buffers;
pub mod cli;
pub mod config;
pub mod gpu;
mod metrics;
pub mod pipeline;
mod rlimit;
pub mod server;
pub mod store;
pub mod transport;

pub use buffers::{BufferError, Destination, DeviceRegion};
pub use metrics::Metrics;
pub use rlimit::raise_nofile;
