//! `kvfetcher-bench`: KVFetcher's benchmarks, GPU checks, KV capture and demo.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = kvfetcher_tools::cli::Cli::parse();
    match kvfetcher_tools::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvfetcher-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
