//! The `kvfetcher` binary: parses the command line and runs one subcommand.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = kvfetcher::cli::Cli::parse();
    match kvfetcher::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvfetcher: error: {e:#}");
            ExitCode::from(kvfetcher::cli::exit_code(&e))
        }
    }
}
