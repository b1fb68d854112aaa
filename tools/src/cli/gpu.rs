//! `kvfetcher-bench gpu ...`: fixture encoding, bit-exact self-checks and benchmarks of the
//! daemon's GPU path (`kvfetcher gpu info` describes the devices).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use kvfetcher::gpu::Cuda;

use crate::gpu::{bench, check, fixture, ipc_check, sections, transform_bench, transform_check};

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
    /// Encodes real-KV HEVC fixtures with the x265 tool (on a host that has it).
    Fixtures(StreamFixtureArgs),
    /// Checks NVDEC and the restore kernels against CPU results, bit for bit.
    Check(RunArgs),
    /// Benchmarks NVDEC sessions and restore bandwidth.
    Bench(BenchArgs),
    /// Decodes a real-KV fixture stream on N NVDEC sessions for S seconds, flat out or paced to
    /// a link rate: the background load of `scripts/gpu-interference.py`. Quiet until the end;
    /// says "load: ready" on stderr once every decoder exists.
    Load(LoadArgs),
    /// Encodes chunk objects with the codec's HEVC encoder (every layout and bit width) and
    /// records libde265's codes, for `gpu check` (needs libx265 and libde265).
    SectionFixtures(FixtureArgs),
    /// The transform-coded (rANS) route alone: its checks against the CPU restore (also part
    /// of `check`) and its benchmark (also part of `bench`).
    Transform(TransformArgs),
    /// Restores transform-coded (rANS) sections through the daemon's GPU route for S seconds,
    /// flat out or paced to a link rate: the rans tenant of `scripts/gpu-interference.py`.
    /// Says "load: ready" on stderr once warmed up.
    TransformLoad(TransformLoadArgs),
    /// Proves CUDA IPC across processes: a child maps the restored KV and waits on IPC events.
    IpcCheck(IpcArgs),
    /// The child side of `ipc-check` (reads handles on stdin).
    #[command(hide = true)]
    IpcChild(IpcChildArgs),
}

/// Inputs of transform.
#[derive(Debug, Args)]
pub struct TransformArgs {
    /// CUDA device ordinal (the daemon-route rows and the benchmark use device 0).
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// The safetensors KV file to code (at least 512 tokens).
    #[arg(long)]
    pub kv: PathBuf,
    /// Skip the benchmark.
    #[arg(long)]
    pub no_bench: bool,
    /// Host threads restoring sections at once in the benchmark (it also runs half and twice).
    #[arg(long, default_value_t = 32)]
    pub threads: usize,
    /// Layers per section of the benchmark's chunks (`[save] layers_per_group`): bigger
    /// sections spread the fixed cost of each section (uploads, launches, a wait) over more KV.
    #[arg(long, default_value_t = 1)]
    pub layers_per_section: usize,
}

/// Inputs of transform-load.
#[derive(Debug, Args)]
pub struct TransformLoadArgs {
    /// Seconds to restore (counted from the end of the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Pace the compressed input to this many Gbit/s; flat out when absent.
    #[arg(long)]
    pub rate_gbps: Option<f64>,
    /// Host threads restoring sections at once (a fetch's decode workers).
    #[arg(long, default_value_t = 16)]
    pub threads: usize,
    /// Layers per section (4 gives the 4 MB sections saves write for an 8 x 128 model).
    #[arg(long, default_value_t = 4)]
    pub layers_per_section: usize,
}

/// Inputs of ipc-check.
#[derive(Debug, Args)]
pub struct IpcArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// The safetensors KV file to restore.
    #[arg(long)]
    pub kv: PathBuf,
}

/// Inputs of the ipc-check child.
#[derive(Debug, Args)]
pub struct IpcChildArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// The safetensors KV file the parent restores.
    #[arg(long)]
    pub kv: PathBuf,
    /// "verify" or "hold".
    #[arg(long)]
    pub mode: String,
}

fn print_rows(rows: &[check::CheckRow]) -> anyhow::Result<()> {
    let failed = rows.iter().filter(|r| !r.exact).count();
    println!("| check | values | bit-exact |");
    println!("|---|---|---|");
    for r in rows {
        let ok = if r.exact {
            "yes".to_string()
        } else {
            format!("NO: {}", r.detail)
        };
        println!("| {} | {} | {ok} |", r.name, r.values);
    }
    println!("{} checks, {failed} failed", rows.len());
    anyhow::ensure!(failed == 0, "{failed} gpu checks failed");
    Ok(())
}

/// Fixture encoding.
#[derive(Debug, Args)]
pub struct FixtureArgs {
    /// The safetensors KV file.
    #[arg(long)]
    pub kv: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// Fixture encoding, lossless or at a constant QP.
#[derive(Debug, Args)]
pub struct StreamFixtureArgs {
    /// KV file and output directory.
    #[command(flatten)]
    pub files: FixtureArgs,
    /// Encode at this constant QP (lossy: the interference benchmark's lossy NVDEC tenant,
    /// `load --qp`) instead of losslessly; files are named `kv-<chroma>-<bits>-qp<QP>.hevc`.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=51))]
    pub qp: Option<u8>,
}

/// Inputs of check.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// The safetensors KV file the fixtures came from.
    #[arg(long)]
    pub kv: PathBuf,
    /// Directory of fixture streams (`kvfetcher-bench gpu fixtures`).
    #[arg(long)]
    pub fixtures: PathBuf,
}

/// Inputs of bench.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Device, KV file and fixtures.
    #[command(flatten)]
    pub run: RunArgs,
    /// Session counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,7,8,12,16")]
    pub sessions: Vec<usize>,
    /// Seconds per NVDEC point.
    #[arg(long, default_value_t = 0.6)]
    pub seconds: f64,
    /// Copies of the real KV codes in the restore benchmark (64: 134M codes, 268 MB of bf16
    /// out; smaller launches are dominated by launch and tail time).
    #[arg(long, default_value_t = 64)]
    pub copies: usize,
}

/// Inputs of load.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Device, KV file and fixtures.
    #[command(flatten)]
    pub run: RunArgs,
    /// Seconds to decode (counted from when every decoder exists).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Concurrent sessions [default: the card's NVDEC engine count].
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Pace the total compressed input to this many Gbit/s (a token bucket per session);
    /// flat out when absent.
    #[arg(long)]
    pub rate_gbps: Option<f64>,
    /// Fixture stream, chroma-bits: 420-8, 420-10, 420-12, 444-8, 444-10 or 444-12.
    #[arg(long, default_value = "444-8")]
    pub stream: String,
    /// Decode the lossy fixture of this constant QP (`gpu fixtures --qp`) instead of the
    /// lossless one.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=51))]
    pub qp: Option<u8>,
    /// What happens to each decoded frame: `copy` (map, copy to device memory, unmap: the
    /// real path), `map` (map and unmap only) or `none` (never mapped: NVDEC's decode alone).
    /// The last two measure which step costs a co-tenant its compute.
    #[arg(long, default_value = "copy")]
    pub frames: String,
}

/// Runs the transform-route benchmark and prints its table (an error is printed, not fatal:
/// the other benchmarks still run).
fn print_transform_bench(spec: &transform_bench::TransformBenchSpec) {
    match transform_bench::bench_transform(spec) {
        Ok(r) => {
            // KV GB/s: fp16 bytes restored into the engine's buffer per second of wall time
            // (host parsing, uploads, decode, inverse transform, sync), sections from many
            // threads at once as a fetch runs them; target >= 20 GB/s.
            println!("| transform restore | MB out | MB payload | ms | KV GB/s | D2D copy GB/s |");
            println!("|---|---|---|---|---|---|");
            for p in &r {
                println!(
                    "| {} | {:.0} | {:.0} | {:.2} | {:.1} | {:.0} |",
                    p.name,
                    p.bytes as f64 / 1e6,
                    p.payload_bytes as f64 / 1e6,
                    p.ms,
                    p.gbps,
                    p.copy_gbps
                );
            }
        }
        Err(e) => println!("transform restore benchmark failed: {e}"),
    }
}

/// Runs `kvfetcher-bench gpu ...`.
pub fn run(args: GpuArgs) -> anyhow::Result<()> {
    match args.command {
        GpuCommand::Fixtures(a) => {
            for p in fixture::write_fixtures(&a.files.kv, &a.files.out, a.qp)? {
                let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                println!("{} {len} bytes", p.display());
            }
            Ok(())
        }
        GpuCommand::Check(a) => {
            let cuda = Cuda::open(a.device)?;
            let mut rows = check::run_checks(&cuda, &a.kv, &a.fixtures)?;
            // A transform-route error is a failed row, not the end of the other checks.
            match transform_check::run_transform_checks(&cuda, &a.kv) {
                Ok(r) => rows.extend(r),
                Err(e) => rows.push(check::CheckRow {
                    name: "transform (rANS) route".into(),
                    exact: false,
                    values: 0,
                    detail: format!("error: {e}"),
                }),
            }
            let dir = a.fixtures.join("sections");
            if dir.is_dir() {
                rows.extend(sections::run_section_checks(&cuda, &dir)?);
            } else {
                println!("section checks skipped: no {}", dir.display());
            }
            print_rows(&rows)
        }
        GpuCommand::SectionFixtures(a) => {
            for p in sections::write_section_fixtures(&a.kv, &a.out)? {
                let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                println!("{} {len} bytes", p.display());
            }
            Ok(())
        }
        GpuCommand::Transform(a) => {
            let cuda = Cuda::open(a.device)?;
            println!("device: {}", cuda.info().name);
            let rows = transform_check::run_transform_checks(&cuda, &a.kv)?;
            if !a.no_bench {
                print_transform_bench(&transform_bench::TransformBenchSpec {
                    threads: a.threads,
                    layers_per_section: a.layers_per_section,
                    ..Default::default()
                });
            }
            print_rows(&rows)
        }
        GpuCommand::IpcCheck(a) => {
            let cuda = Cuda::open(a.device)?;
            println!("device: {}", cuda.info().name);
            print_rows(&ipc_check::run_ipc_check(&cuda, a.device, &a.kv)?)
        }
        GpuCommand::IpcChild(a) => Ok(ipc_check::run_ipc_child(a.device, &a.kv, &a.mode)?),
        GpuCommand::Load(a) => load(a),
        GpuCommand::TransformLoad(a) => transform_load(a),
        GpuCommand::Bench(a) => {
            let cuda = Cuda::open(a.run.device)?;
            println!(
                "device: {} (driver {})",
                cuda.info().name,
                cuda.info().driver_version
            );
            let r = bench::bench_restore(&cuda, &a.run.kv, a.copies)?;
            // "% of copy": GB/s read + written against the copy's; "copy time / ms": how long
            // a D2D copy of the restored bytes takes against the restore (both put the same
            // KV bytes in place); "fill time / ms": the same for a memset of those bytes, the
            // write-only ceiling.
            println!(
                "| restore | MB moved | ms | GB/s | D2D copy GB/s | % of copy | copy time / ms \
                 | fill time / ms |"
            );
            println!("|---|---|---|---|---|---|---|---|");
            for p in &r {
                println!(
                    "| {} | {:.0} | {:.3} | {:.0} | {:.0} | {:.0}% | {:.0}% | {:.0}% |",
                    p.name,
                    p.bytes as f64 / 1e6,
                    p.ms,
                    p.gbps,
                    p.copy_gbps,
                    100.0 * p.gbps / p.copy_gbps,
                    100.0 * p.copy_ms / p.ms,
                    100.0 * p.fill_ms / p.ms
                );
            }
            print_transform_bench(&transform_bench::TransformBenchSpec::default());
            let pts =
                bench::bench_nvdec(&cuda, &a.run.kv, &a.run.fixtures, &a.sessions, a.seconds)?;
            println!(
                "| nvdec stream | ratio vs fp16 | sessions | bitstream in GB/s | KV out GB/s |"
            );
            println!("|---|---|---|---|---|");
            for p in &pts {
                println!(
                    "| {} {}-bit | {:.2}x | {} | {:.3} | {:.3} |",
                    p.chroma.name(),
                    p.bits,
                    p.ratio_vs_fp16,
                    p.sessions,
                    p.in_gbps,
                    p.kv_out_gbps
                );
            }
            Ok(())
        }
    }
}

fn transform_load(a: TransformLoadArgs) -> anyhow::Result<()> {
    let spec = transform_bench::TransformBenchSpec {
        threads: a.threads,
        layers_per_section: a.layers_per_section,
        ..Default::default()
    };
    let pace = match a.rate_gbps {
        Some(r) => format!("paced to {r} Gbit/s"),
        None => "flat out".into(),
    };
    let r = transform_bench::transform_load(&spec, a.seconds, a.rate_gbps, &mut |n| {
        eprintln!(
            "load: ready, {n} rans sections of {} layers, {} threads, {pace}, {} s",
            a.layers_per_section, a.threads, a.seconds
        );
    })?;
    // The same words as `load`, so the interference script parses both.
    println!(
        "load: rans sections {}, in {:.3} GB/s bitstream, out {:.3} GB/s samples",
        r.sections, r.in_gbps, r.out_gbps
    );
    Ok(())
}

fn load(a: LoadArgs) -> anyhow::Result<()> {
    let (chroma, bits) = bench::parse_stream(&a.stream)?;
    let spec = bench::LoadSpec {
        chroma,
        bits,
        qp: a.qp,
        sessions: a.sessions,
        seconds: a.seconds,
        rate_gbit: a.rate_gbps,
        frames: a.frames.parse()?,
    };
    let cuda = Cuda::open(a.run.device)?;
    let pace = match a.rate_gbps {
        Some(r) => format!("paced to {r} Gbit/s"),
        None => "flat out".into(),
    };
    let r = bench::nvdec_load(&cuda, &a.run.kv, &a.run.fixtures, &spec, &mut |n| {
        eprintln!(
            "load: ready, {n} sessions, stream {}{}, frames {}, {pace}, {} s on {}",
            a.stream,
            a.qp.map(|q| format!(" qp {q}")).unwrap_or_default(),
            a.frames,
            a.seconds,
            cuda.info().name
        );
    })?;
    println!(
        "load: sessions {}, in {:.3} GB/s bitstream, out {:.3} GB/s samples, decoded frames {}",
        r.sessions, r.in_gbps, r.out_gbps, r.frames
    );
    Ok(())
}
