//! `kvfetcher lookup`: asks a running daemon how many leading tokens of a sequence it can fetch,
//! over the local protocol. For smoke tests and operators (scripts/deb-check.sh uses it).

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use kvfetcher_protocol::transport::BlockingConn;
use kvfetcher_protocol::{Lookup, Message, DEFAULT_MAX_FRAME};

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
pub(super) fn run(args: LookupArgs) -> anyhow::Result<()> {
    let stream = UnixStream::connect(&args.socket)
        .with_context(|| format!("cannot connect to {}", args.socket.display()))?;
    let mut conn = BlockingConn::client_handshake(stream, DEFAULT_MAX_FRAME)?;
    let req = 1;
    conn.send(
        &Message::Lookup(Lookup {
            req,
            model: args.model,
            token_ids: args.tokens.clone(),
        }),
        &[],
    )?;
    loop {
        match conn.recv()?.0 {
            Message::LookupReply(r) if r.req == req => {
                println!("{} of {} tokens available", r.tokens, args.tokens.len());
                return Ok(());
            }
            Message::Error(e) if e.req.is_none() || e.req == Some(req) => {
                bail!("daemon refused the lookup ({:?}): {}", e.code, e.message)
            }
            _ => {}
        }
    }
}
