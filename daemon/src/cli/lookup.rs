//! `kvfetcher lookup`: asks a running daemon, through the Rust client, how many leading tokens
//! of a sequence it can fetch. For smoke tests and operators (scripts/deb-check.sh uses it).

use std::path::PathBuf;

use clap::Args;
use kvfetcher_client::Client;

use crate::config::DEFAULT_SOCKET;

/// Arguments of `kvfetcher lookup`.
#[derive(Debug, Args)]
pub struct LookupArgs {
    /// The daemon's Unix socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Model id.
    #[arg(long)]
    pub model: String,
    /// Token ids, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<u32>,
}

/// Runs `kvfetcher lookup`: prints `<found> of <asked> tokens available`.
pub fn run(args: LookupArgs) -> anyhow::Result<()> {
    let client = Client::connect(&args.socket)?;
    let found = client.lookup(&args.model, &args.tokens)?;
    println!("{found} of {} tokens available", args.tokens.len());
    Ok(())
}
