//! The `kvfetcher` library: everything the binary does, split by concern.
//!
//! - `cli`: argument parsing and the subcommands' entry points.
//!
//! Further modules (store, transport, server, gpu) each own one concern.

pub mod cli;
