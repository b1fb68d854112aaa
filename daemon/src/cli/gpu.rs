//! `kvfetcher gpu info`: the node's GPUs as the daemon sees them (device, driver, NVDEC). The
//! GPU path's fixtures, self-checks and benchmarks are `kvfetcher-bench gpu`.

use anyhow::Context;
use clap::{Args, Subcommand};

use kvfetcher_codec::Chroma;

use crate::gpu::{Cuda, Nvdec};

/// `kvfetcher gpu`.
#[derive(Debug, Args)]
pub struct GpuArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: GpuCommand,
}

/// The `gpu` subcommands.
#[derive(Debug, Subcommand)]
pub enum GpuCommand {
    /// Prints the device, driver and NVDEC capabilities.
    Info(DeviceArgs),
}

/// Device selection.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

/// Runs `kvfetcher gpu ...`.
pub(super) fn run(args: GpuArgs) -> anyhow::Result<()> {
    match args.command {
        GpuCommand::Info(a) => info(a.device),
    }
}

fn info(device: usize) -> anyhow::Result<()> {
    let cuda = Cuda::open(device).context("cuda")?;
    let i = cuda.info();
    println!("device {}: {}", i.ordinal, i.name);
    println!(
        "compute capability {}.{}, {} SMs, {:.1} GiB",
        i.compute_capability.0,
        i.compute_capability.1,
        i.multiprocessors,
        i.total_memory as f64 / (1u64 << 30) as f64
    );
    println!("cuda driver api {}", i.driver_version);
    match Nvdec::open(cuda.clone()) {
        Err(e) => println!("nvdec: unavailable ({e})"),
        Ok(n) => {
            for chroma in [Chroma::Yuv420, Chroma::Yuv444] {
                for bits in [8u8, 10, 12] {
                    let c = n.hevc_caps(chroma, bits)?;
                    println!(
                        "nvdec hevc {} {bits}-bit: supported {} engines {} min {}x{} max {}x{}",
                        chroma.name(),
                        c.supported,
                        c.engines,
                        c.min_size.0,
                        c.min_size.1,
                        c.max_size.0,
                        c.max_size.1
                    );
                }
            }
        }
    }
    Ok(())
}
