//! Command-line interface: one module per group of subcommands, each with its `Args` and `run`.
//! Benchmarks, GPU self-checks, KV capture and the demo are `kvfetcher-bench` (crate `tools`).

use clap::{Parser, Subcommand};

mod codec;
mod daemon;
mod gpu;
mod lookup;
mod store;

pub use codec::{bytes_16bit, progress, registry_for, GroupingArg, VariantArg};
pub use daemon::{init_logging, start, Running, SocketLock};

/// KVFetcher: fetch compressed KV caches from remote storage and restore them for local engines.
#[derive(Debug, Parser)]
#[command(name = "kvfetcher", version, about, long_about = None)]
pub struct Cli {
    /// The subcommand to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand of `kvfetcher`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon (Unix socket for engines, QUIC to stores); for systemd.
    Daemon(daemon::DaemonArgs),
    /// Ask a running daemon how many leading tokens of a sequence it can fetch.
    Lookup(lookup::LookupArgs),
    /// The node's GPUs: device, driver and NVDEC capabilities.
    Gpu(gpu::GpuArgs),
    /// Run the remote chunk store (QUIC), or write dev certificates with --dev-cert.
    ///
    /// Clients must authenticate: give --client-ca (mutual TLS) or --token-file (bearer
    /// token); --insecure-open-writes starts without, open to anyone who reaches the port.
    /// Failed authentication blocks the client's address for a growing backoff.
    Store(store::StoreArgs),
    /// Encode a KV safetensors file into chunk object files (one per chunk, named by key).
    Encode(codec::EncodeArgs),
    /// Decode a directory of chunk object files into one KV safetensors file.
    Decode(codec::DecodeArgs),
    /// Describe one chunk object (header, sections, sizes); optionally extract HEVC streams.
    Inspect(codec::InspectArgs),
    /// Upload chunk object files to a store.
    Put(store::PutArgs),
    /// Download one chunk object from a store.
    Get(store::GetArgs),
}

/// The process exit status for an error `run` returned: `EX_CONFIG` (78) for a configuration
/// error, 1 for anything else (usage errors exit 2 from the argument parser).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain()
        .any(|c| c.downcast_ref::<crate::config::ConfigError>().is_some())
    {
        daemon::EX_CONFIG as u8
    } else {
        1
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Daemon(args) => daemon::run(args),
        Command::Lookup(args) => lookup::run(args),
        Command::Gpu(args) => gpu::run(args),
        Command::Store(args) => store::run_store(args),
        Command::Encode(args) => codec::run_encode(args),
        Command::Decode(args) => codec::run_decode(args),
        Command::Inspect(args) => codec::run_inspect(args),
        Command::Put(args) => store::run_put(args),
        Command::Get(args) => store::run_get(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_errors_exit_with_ex_config() {
        let config = crate::config::ConfigError::Invalid("x".into());
        assert_eq!(exit_code(&anyhow::Error::from(config)), 78);
        let wrapped = anyhow::Error::from(crate::config::ConfigError::Invalid("x".into()))
            .context("starting the daemon");
        assert_eq!(exit_code(&wrapped), 78);
        assert_eq!(exit_code(&anyhow::anyhow!("store unreachable")), 1);
    }
}
