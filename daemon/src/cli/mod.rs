//! Command-line interface: one module per group of subcommands, each with its `Args` and `run`.

use clap::{Parser, Subcommand};

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
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
    }
}
