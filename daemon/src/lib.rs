//! The `kvfetcher` library: everything the binary does, split by concern.
//!
//! - `cli`: argument parsing and the subcommands' entry points.
//!
//! Further modules (store, transport, server, gpu) each own one concern.

pub mod cli;
pub mod config;
pub mod gpu;
pub mod metrics;
pub mod pipeline;
pub mod rlimit;
pub mod server;
pub mod store;
pub mod transport;
