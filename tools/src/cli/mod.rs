//! `kvfetcher-bench`'s command line: one module per group of subcommands.

use clap::{Parser, Subcommand};

pub mod bench_codec;
pub mod bench_fetch;
pub mod bench_fidelity;
pub mod bench_load;
pub mod bench_net;
pub mod demo;
pub mod engine;
pub mod gpu;
pub mod kv;
mod local_stack;
pub mod profile;

/// KVFetcher's benchmarks, GPU self-checks, KV capture and demo (the daemon is `kvfetcher`).
#[derive(Debug, Parser)]
#[command(name = "kvfetcher-bench", version, about, long_about = None)]
pub struct Cli {
    /// The subcommand to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand of `kvfetcher-bench`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Network goodput of the store over emulated links (QUIC cubic/BBR vs TCP).
    Net(bench_net::NetArgs),
    /// One benchmark server (used by `net`).
    NetServe(bench_net::ServeArgs),
    /// One benchmark fetch (used by `net`).
    NetFetch(bench_net::FetchArgs),
    /// Userspace delay line between two interfaces (used by scripts/netns-link.sh).
    DelayBridge(bench_net::BridgeArgs),
    /// Fetch pipeline (CPU or GPU) against raw bf16 and zstd int8 whole objects.
    Fetch(bench_fetch::BenchFetchArgs),
    /// Codec size, speed and error per variant, HEVC layout and bit width.
    Codec(bench_codec::BenchCodecArgs),
    /// How each codec setting changes a model's next-token predictions: a GGUF model in
    /// llama.cpp (--gguf), or a llama2.c toy (--model).
    Fidelity(Box<bench_fidelity::BenchFidelityArgs>),
    /// Many clients against one daemon: fetches/s, p50/p99 latency and RSS.
    Load(bench_load::BenchLoadArgs),
    /// The GPU path: fixtures, bit-exact checks of NVDEC and the restore kernels, benchmarks.
    Gpu(gpu::GpuArgs),
    /// Calibrates a codec profile (transform, sinks, sensitivities) for a GGUF model.
    Profile(profile::ProfileArgs),
    /// Real KV caches: capture from a GGUF model (llama.cpp) or a llama2.c model, describe files.
    Kv(kv::KvArgs),
    /// Store + daemon on loopback, real KV captured, saved (Rust client), fetched (C client),
    /// verified.
    Demo(demo::DemoArgs),
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Net(a) => bench_net::run_net(a),
        Command::NetServe(a) => bench_net::serve(a),
        Command::NetFetch(a) => bench_net::fetch(a),
        Command::DelayBridge(a) => bench_net::run_bridge(a),
        Command::Fetch(a) => bench_fetch::run(a),
        Command::Codec(a) => bench_codec::run(a),
        Command::Fidelity(a) => bench_fidelity::run(*a),
        Command::Load(a) => bench_load::run(a),
        Command::Gpu(a) => gpu::run(a),
        Command::Kv(a) => kv::run(a),
        Command::Profile(a) => profile::run(a),
        Command::Demo(a) => demo::run(a),
    }
}
