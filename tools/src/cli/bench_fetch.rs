//! `kvfetcher-bench fetch`: time to first layer and total fetch time of real KV through the
//! pipeline, against fetching the same KV as raw bf16 and as zstd-compressed int8 whole objects
//! over the same link. `--memory gpu:N` restores into GPU memory (the daemon's GPU path: packed
//! sections and NVDEC surfaces restored by the kernels); the baselines then copy their host
//! result to the GPU, as an engine without kvfetcher would.
//!
//! On a limited link the pipeline's total is also compared with its lower bound,
//! max(transfer time of its bytes at the link rate, its own total on unlimited loopback): the
//! "vs bound" column (the target is at most 1.15).
//!
//! Everything runs in one process on loopback: one embedded store per link rate, paced by the
//! store's own rate limit (`--max-rate`; no RTT). The baselines fetch every chunk object whole
//! (in parallel), then decode and restore: their first layer is ready only when everything is.
//! The pipeline requests layer group 0 of every chunk first and restores while receiving.
//!
//! `--route` runs the pipeline once per restore-route policy (`[fetch] restore_route`) and
//! shows which decoder restored how many sections: each route forced, and `auto`'s choice
//! at each link rate.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use kvfetcher_client::{KvShape, MemoryKind, TargetLayout, TokenOrder};
use kvfetcher_codec::{
    calibrate, decode_chunk, encode_cache, uniform_steps, BasisKind, Calibration, ChunkHeader,
    ChunkView, CodecProfile, CodecRegistry, EncodeConfig, HevcParams, ModelFingerprint,
    QuantConfig, Rope, TransformConfig, VariantKind,
};
use kvfetcher_kv::{DType, KvCache, KvFile};

use super::local_stack::LocalStore;
use kvfetcher::config::{FetchConfig, SaveConfig};
use kvfetcher::gpu::{DeviceBuffer, FrameFormat, GpuDevice, GpuDevices, GpuOptions, HostWait};
use kvfetcher::pipeline::{
    encode_config, place_cache, rans_section_layers, restore_section_into, Pipeline, RestoreTarget,
    RoutePolicy, Router, SectionJob,
};
use kvfetcher::server::{Backend, FetchEvents};
use kvfetcher::transport::StoreClient;
use kvfetcher::Metrics;
use kvfetcher::{BufferError, Destination, DeviceRegion};

/// Arguments of `kvfetcher-bench fetch`.
#[derive(Debug, Args)]
pub struct BenchFetchArgs {
    /// Real KV (safetensors) to fetch.
    #[arg(long, default_value = "data/codelm-kv-a.safetensors")]
    pub kv: PathBuf,
    /// Link rates in Gbit/s, comma separated; 0 is loopback without a limit.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    pub rates: Vec<f64>,
    /// Variant the pipeline's chunks are saved with (zstd, packed, hevc, rans). `rans`: a codec
    /// profile (per-head PCA, 4 sinks, no RoPE) is fitted on the KV's first 512 tokens and
    /// every tensor coded at `--relative-step`; the chunks are put in the store directly (a
    /// save would need the engine-measured sensitivities of `kvfetcher-bench profile`), with
    /// the daemon's section grouping (at least 4 MiB of KV per section).
    #[arg(long, default_value = "zstd")]
    pub variant: String,
    /// `rans`: quantizer step relative to each component's deviation.
    #[arg(long, default_value_t = 0.25)]
    pub relative_step: f32,
    /// Quantization bits of the pipeline's chunks (16: bit-exact).
    #[arg(long, default_value_t = 8)]
    pub bits: u8,
    /// Layers per section of the pipeline's chunks.
    #[arg(long, default_value_t = 1)]
    pub layers_per_group: u32,
    /// `hevc`: frames per HEVC stream (`[save] hevc_stream_frames`; 0: one stream per section).
    #[arg(long, default_value_t = 0)]
    pub hevc_stream_frames: u32,
    /// `hevc`: how codes become frames (`[save] hevc_layout`: frames, rows, frames420, rows420,
    /// frames:N; default: the codec's, `frames`).
    #[arg(long)]
    pub hevc_layout: Option<String>,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: u32,
    /// Runs per method and rate; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Repeat the KV's tokens this many times (real values, a longer prefix): a KV large enough
    /// to keep every decoder busy when measuring decode throughput.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub tile: u32,
    /// Where the KV is restored: `host`, or `gpu:N` (CUDA device N, f16 as the KV file).
    #[arg(long, default_value = "host", value_parser = parse_memory)]
    pub memory: MemoryKind,
    /// QUIC connections the pipeline opens to the store (`[fetch] connections_per_store`;
    /// default: the daemon's default).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub connections: Option<u32>,
    /// NVDEC sessions per GPU (`[gpu] nvdec_sessions`; 0: one per NVDEC engine).
    #[arg(long, default_value_t = 0)]
    pub nvdec_sessions: usize,
    /// How host threads wait for the GPU (`[gpu] host_wait`).
    #[arg(long, value_enum, default_value_t = HostWait::Auto)]
    pub host_wait: HostWait,
    /// Sections one fetch keeps requested but not restored (`[fetch] max_inflight_sections`;
    /// default: the daemon's default).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_inflight_sections: Option<u32>,
    /// Restore-route policies the pipeline runs with, comma separated (`[fetch]
    /// restore_route`: auto, fastest, gpu, nvdec, cpu); each gets its own row, with the
    /// sections each decoder restored. Only GPU memory has a choice.
    #[arg(long, value_delimiter = ',', default_value = "auto", value_parser = RoutePolicy::parse)]
    pub route: Vec<RoutePolicy>,
}

fn parse_memory(s: &str) -> Result<MemoryKind, String> {
    match s.strip_prefix("gpu:") {
        _ if s == "host" => Ok(MemoryKind::Host),
        Some(n) => n
            .parse()
            .map(MemoryKind::Gpu)
            .map_err(|_| format!("bad GPU ordinal in {s:?}")),
        None => Err(format!("memory must be host or gpu:N, not {s:?}")),
    }
}

/// Where a timed fetch writes: a host vector, or a device buffer the pipeline restores into.
enum Memory {
    Host(Mutex<Vec<u8>>),
    Gpu(Arc<GpuDevice>, OnceLock<DeviceBuffer>),
}

/// Records when layer 0 became ready.
struct TimedDest {
    start: Instant,
    layout: TargetLayout,
    memory: Memory,
    first: Mutex<Option<Duration>>,
}

fn poisoned<T>(_: T) -> BufferError {
    BufferError::Internal("poisoned".into())
}

fn gpu_error(e: kvfetcher::gpu::GpuError) -> BufferError {
    BufferError::Internal(e.to_string())
}

impl Destination for TimedDest {
    fn allocate(&self, shape: &KvShape) -> Result<(), BufferError> {
        let len = self.layout.buffer_len(shape);
        match &self.memory {
            Memory::Host(buf) => *buf.lock().map_err(poisoned)? = vec![0u8; len],
            Memory::Gpu(dev, buf) => {
                let b = dev.cuda().alloc(len).map_err(gpu_error)?;
                b.fill(0).map_err(gpu_error)?;
                buf.set(b)
                    .map_err(|_| BufferError::Internal("allocated twice".into()))?;
            }
        }
        Ok(())
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), BufferError> {
        match &self.memory {
            Memory::Host(buf) => {
                let mut buf = buf.lock().map_err(poisoned)?;
                let end = offset
                    .checked_add(bytes.len())
                    .filter(|&e| e <= buf.len())
                    .ok_or_else(|| BufferError::Invalid("write out of bounds".into()))?;
                buf[offset..end].copy_from_slice(bytes);
                Ok(())
            }
            Memory::Gpu(_, buf) => buf
                .get()
                .ok_or_else(|| BufferError::Internal("write before allocate".into()))?
                .write_at(offset, bytes)
                .map_err(gpu_error),
        }
    }

    fn layers_written(&self, layers: Range<u32>) {
        if layers.start == 0 {
            if let Ok(mut f) = self.first.lock() {
                f.get_or_insert(self.start.elapsed());
            }
        }
    }

    fn device(&self) -> Option<DeviceRegion<'_>> {
        match &self.memory {
            Memory::Host(_) => None,
            Memory::Gpu(device, buf) => Some(DeviceRegion {
                device,
                buffer: buf.get()?,
            }),
        }
    }
}

/// One measured fetch.
#[derive(Debug, Clone, Copy)]
struct Timing {
    first_layer: Duration,
    total: Duration,
    wire: u64,
}

/// Runs `kvfetcher-bench fetch`.
pub fn run(args: BenchFetchArgs) -> anyhow::Result<()> {
    // Quiet by default (the table is the output); RUST_LOG=kvfetcher=debug shows each
    // fetch's phases (lookup, headers, first section).
    if std::env::var_os("RUST_LOG").is_some() {
        kvfetcher::cli::init_logging(kvfetcher::config::LogFormat::Text, "warn");
    }
    let file = KvFile::read(&args.kv).with_context(|| format!("reading {}", args.kv.display()))?;
    let cache = tiled(file.cache, args.tile as usize)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args, cache))
}

/// `cache` with its tokens repeated `n` times (tensors are `[tokens, heads, dim]`).
fn tiled(cache: KvCache, n: usize) -> anyhow::Result<KvCache> {
    if n == 1 {
        return Ok(cache);
    }
    let tile = |t: &kvfetcher_kv::Tensor| {
        let [tokens, heads, dim] = t.shape();
        kvfetcher_kv::Tensor::new(t.dtype(), [tokens * n, heads, dim], t.data().repeat(n))
    };
    let layers = cache
        .layers()
        .iter()
        .map(|l| {
            Ok(kvfetcher_kv::LayerKv {
                key: tile(&l.key)?,
                value: tile(&l.value)?,
            })
        })
        .collect::<Result<Vec<_>, kvfetcher_kv::TensorError>>()?;
    Ok(KvCache::new(layers, None)?)
}

/// The `rans` variant's profile (fitted on the KV's first 512 tokens under the pipeline's
/// model id) and chunk objects.
#[allow(clippy::type_complexity)]
fn rans_objects(
    args: &BenchFetchArgs,
    cache: &KvCache,
    ids: &[u32],
    shape: &KvShape,
) -> anyhow::Result<(Arc<CodecProfile>, Vec<(kvfetcher_codec::ChunkKey, Vec<u8>)>)> {
    let sample = cache.slice_tokens(0, cache.tokens().min(512))?;
    let fp = ModelFingerprint::of_bytes(b"bench-pipeline");
    let cal = Calibration {
        rope: Rope::NONE,
        sinks: 4,
        basis: BasisKind::Pca,
    };
    let profile = Arc::new(calibrate(fp, &[sample], &cal)?);
    let reg = CodecRegistry::default().with_profile(profile.clone());
    let cfg = EncodeConfig {
        quant: QuantConfig::Transform(Arc::new(TransformConfig {
            profile: profile.clone(),
            steps: uniform_steps(&profile, args.relative_step),
        })),
        variant: VariantKind::Rans,
        hevc_layout: None,
        hevc_stream_frames: None,
        chunk_tokens: args.chunk_tokens as usize,
        layers_per_section: rans_section_layers(
            args.layers_per_group as usize,
            args.chunk_tokens as usize,
            shape,
        ),
    };
    let objects = encode_cache(cache, &fp, ids, &cfg, &reg)?;
    Ok((profile, objects))
}

fn median(mut v: Vec<Timing>) -> Timing {
    v.sort_by_key(|t| t.total);
    v[v.len() / 2]
}

async fn bench(args: BenchFetchArgs, cache: KvCache) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tokens = cache.tokens();
    let ids: Vec<u32> = (0..tokens as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 32_000)
        .collect();
    let shape = KvShape {
        num_layers: cache.num_layers() as u32,
        tokens: tokens as u32,
        kv_heads: cache.kv_heads() as u32,
        head_dim: cache.head_dim() as u32,
    };
    let raw_bf16 =
        (tokens * cache.kv_heads() * cache.head_dim() * 2 * 2 * cache.num_layers()) as u64;
    // On the GPU, restore into the KV's own dtype (f16): the kernels then round once, exactly
    // as the CPU path does (see gpu::section_restore).
    let gpu = match args.memory {
        MemoryKind::Host => None,
        MemoryKind::Gpu(n) => {
            let opts = GpuOptions {
                nvdec_sessions: args.nvdec_sessions,
                host_wait: args.host_wait,
                ..GpuOptions::default()
            };
            let gpus = GpuDevices::new(opts, Metrics::new());
            Some(
                gpus.device(n as usize)
                    .map_err(|e| anyhow::anyhow!("gpu:{n}: {e}"))?,
            )
        }
    };
    let target = TargetLayout {
        memory: args.memory,
        ..TargetLayout::host(
            if gpu.is_some() {
                DType::F16
            } else {
                DType::BF16
            },
            TokenOrder::Nhd,
        )
    };
    let rans = (args.variant == "rans")
        .then(|| rans_objects(&args, &cache, &ids, &shape))
        .transpose()?;
    let reg = match &rans {
        Some((profile, _)) => CodecRegistry::default().with_profile(profile.clone()),
        None => CodecRegistry::default(),
    };
    let bf16 = cache.to_dtype(DType::BF16);
    let baseline_cfg = |quant: QuantConfig, variant| EncodeConfig {
        quant,
        variant,
        hevc_layout: None,
        hevc_stream_frames: None,
        chunk_tokens: args.chunk_tokens as usize,
        layers_per_section: cache.num_layers(),
    };
    let raw_objects = encode_cache(
        &bf16,
        &ModelFingerprint::of_bytes(b"bench-raw-bf16"),
        &ids,
        &baseline_cfg(QuantConfig::Exact, VariantKind::Packed),
        &reg,
    )?;
    let int8_objects = encode_cache(
        &cache,
        &ModelFingerprint::of_bytes(b"bench-zstd-int8"),
        &ids,
        &baseline_cfg(QuantConfig::bits(8), VariantKind::Zstd),
        &reg,
    )?;
    let save = SaveConfig {
        variant: args.variant.clone(),
        bits: args.bits,
        chunk_tokens: args.chunk_tokens,
        layers_per_group: args.layers_per_group,
        hevc_stream_frames: args.hevc_stream_frames,
        hevc_layout: args.hevc_layout.clone(),
        ..SaveConfig::default()
    };
    let client_bytes: Vec<u8> = cache
        .layers()
        .iter()
        .flat_map(|l| l.key.data().iter().chain(l.value.data()).copied())
        .collect();
    let client_layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    anyhow::ensure!(cache.dtype() == DType::F16, "bench fetch expects fp16 KV");
    let into = match &gpu {
        Some(d) => format!("gpu:{} ({}), f16 NHD", d.ordinal(), d.cuda().info().name),
        None => "host memory, bf16 NHD".into(),
    };
    println!(
        "bench fetch: {} ({} layers, {tokens} tokens, {} kv heads x {}), raw bf16 {:.2} MB, into {into}, median of {}",
        args.kv.display(),
        cache.num_layers(),
        cache.kv_heads(),
        cache.head_dim(),
        raw_bf16 as f64 / 1e6,
        args.repeat
    );
    println!(
        "{:<10} {:<52} {:>10} {:>7} {:>12} {:>10} {:>9}",
        "link", "method", "wire MB", "ratio", "first layer", "total", "vs bound"
    );
    let mut fetch = FetchConfig::default();
    if let Some(c) = args.connections {
        fetch.connections_per_store = c as usize;
    }
    if let Some(n) = args.max_inflight_sections {
        fetch.max_inflight_sections = n as usize;
    }
    // The decode stage alone: what the network must keep up with.
    let objects = encode_cache(
        &cache,
        &ModelFingerprint::of_bytes(b"bench-decode-stage"),
        &ids,
        &encode_config(&save, &reg, "bench-decode-stage")?,
        &reg,
    )?;
    // One pass to warm up and size the runs: each timed run repeats the sections for at
    // least a second, so the decoders reach their steady rate (as the bare loop's does).
    let threads = fetch.decode_workers;
    // The decode stage has no link to keep up with: its router takes the fastest decoders.
    let router = Router::new(RoutePolicy::Fastest, threads);
    let probe = decode_stage(
        &objects,
        &reg,
        (&target, &shape),
        gpu.as_ref(),
        &router,
        threads,
        1,
    )?;
    let passes = (1.0 / probe.total.as_secs_f64()).ceil().clamp(1.0, 64.0) as usize;
    let mut runs = Vec::new();
    for _ in 0..args.repeat.max(1) {
        runs.push(decode_stage(
            &objects,
            &reg,
            (&target, &shape),
            gpu.as_ref(),
            &router,
            threads,
            passes,
        )?);
    }
    let t = median(runs);
    let per_pass = Timing {
        first_layer: t.total / passes as u32,
        total: t.total / passes as u32,
        wire: t.wire / passes as u64,
    };
    report(
        "memory",
        &format!("decode stage only, {threads} threads"),
        per_pass,
        raw_bf16,
        None,
    );
    println!(
        "decode stage: {:.3} GB/s of sections in, {:.3} GB/s of raw bf16 out ({} sections, {passes} passes)",
        t.wire as f64 / t.total.as_secs_f64() / 1e9,
        (raw_bf16 * passes as u64) as f64 / t.total.as_secs_f64() / 1e9,
        objects
            .iter()
            .map(|(_, o)| ChunkHeader::parse_prefix(o).map_or(0, |(h, _)| h.sections.len()))
            .sum::<usize>()
    );
    if let (Some(dev), "hevc") = (&gpu, args.variant.as_str()) {
        // The bare loop on the very streams the decode stage restored: the decode stage's
        // share of it is the daemon's efficiency, independent of the streams' geometry.
        let (secs, bytes) = nvdec_alone(dev, &objects, passes)?;
        let bare = bytes as f64 / secs / 1e9;
        println!(
            "nvdec alone on the same streams ({} sessions, one thread each): {bare:.3} GB/s in; the decode stage reaches {:.0}% of it",
            dev.nvdec_sessions(),
            100.0 * (t.wire as f64 / t.total.as_secs_f64() / 1e9) / bare
        );
    }
    // The pipeline's total on unlimited loopback, per route policy: its decode + restore time.
    let mut unlimited: Vec<(RoutePolicy, Duration)> = Vec::new();
    for &rate in &args.rates {
        let max_rate = (rate > 0.0).then(|| (rate * 1e9 / 8.0) as u64);
        let store = LocalStore::start(dir.path(), &format!("{rate}"), max_rate)?;
        let client = StoreClient::connect(store.addr, store.target()?.tls).await?;
        let pipeline_objects = rans.as_ref().map(|(_, o)| &o[..]).unwrap_or(&[]);
        for (_, bytes) in raw_objects
            .iter()
            .chain(&int8_objects)
            .chain(pipeline_objects)
        {
            client.put(Bytes::from(bytes.clone())).await?;
        }
        if rans.is_none() {
            let pipeline = Pipeline::new(
                vec![store.target()?],
                reg.clone(),
                fetch.clone(),
                save.clone(),
                Metrics::new(),
            )?;
            pipeline
                .save(
                    "bench-pipeline",
                    &ids,
                    &client_layout,
                    &shape,
                    &client_bytes,
                    false,
                )
                .await?;
        }
        let link = if rate > 0.0 {
            format!("{rate} Gbit/s")
        } else {
            "loopback".into()
        };
        let baselines = [
            ("raw bf16, whole objects", &raw_objects),
            ("zstd int8, whole objects", &int8_objects),
        ];
        for (name, objects) in baselines {
            let mut runs = Vec::new();
            for _ in 0..args.repeat.max(1) {
                runs.push(
                    whole_objects(&client, objects, &reg, &target, &shape, gpu.as_ref()).await?,
                );
            }
            report(&link, name, median(runs), raw_bf16, None);
        }
        let routes = if gpu.is_some() {
            args.route.clone()
        } else {
            vec![RoutePolicy::Auto]
        };
        for policy in routes {
            let pipeline = Pipeline::new(
                vec![store.target()?],
                reg.clone(),
                FetchConfig {
                    restore_route: policy,
                    ..fetch.clone()
                },
                save.clone(),
                Metrics::new(),
            )?;
            let mut runs = Vec::new();
            let mut used = RouteCounts::default();
            for _ in 0..args.repeat.max(1) {
                let before = RouteCounts::of(pipeline.metrics());
                runs.push(timed_fetch(&pipeline, &ids, &target, gpu.as_ref()).await?);
                used = RouteCounts::of(pipeline.metrics()).since(&before);
            }
            let method = match rans {
                Some(_) => format!("kvfetcher rans, step {}", args.relative_step),
                None => format!("kvfetcher {} {}-bit", args.variant, args.bits),
            };
            let name = match &gpu {
                Some(_) => format!("{method}, {}: {used}", policy.name()),
                None => method,
            };
            let t = median(runs);
            let bound = if rate > 0.0 {
                let transfer = Duration::from_secs_f64(t.wire as f64 * 8.0 / (rate * 1e9));
                let own = unlimited.iter().find(|(p, _)| *p == policy);
                own.map(|&(_, u)| transfer.max(u))
            } else {
                unlimited.push((policy, t.total));
                None
            };
            report(&link, &name, t, raw_bf16, bound);
            if let (Some(_), Some(r)) = (&gpu, pipeline.router().link_rate()) {
                println!(
                    "{:<10} (the router measured the link at {:.2} Gbit/s)",
                    "",
                    r * 8e-9
                );
            }
        }
        client.close().await;
    }
    Ok(())
}

/// One pipeline fetch of the bench's prefix into a fresh destination, timed.
async fn timed_fetch(
    pipeline: &Pipeline,
    ids: &[u32],
    target: &TargetLayout,
    gpu: Option<&Arc<GpuDevice>>,
) -> anyhow::Result<Timing> {
    let start = Instant::now();
    let memory = match gpu {
        Some(d) => Memory::Gpu(d.clone(), OnceLock::new()),
        None => Memory::Host(Mutex::new(Vec::new())),
    };
    let dest = Arc::new(TimedDest {
        start,
        layout: *target,
        memory,
        first: Mutex::new(None),
    });
    let out = pipeline
        .fetch(
            "bench-pipeline",
            ids,
            target,
            dest.clone(),
            FetchEvents::ignored(),
        )
        .await?;
    let total = start.elapsed();
    let first_layer = dest.first.lock().ok().and_then(|f| *f).unwrap_or(total);
    Ok(Timing {
        first_layer,
        total,
        wire: out.bytes_on_wire,
    })
}

/// Sections restored into GPU memory per decoder (the pipeline's `gpu_sections` counters).
#[derive(Debug, Default, Clone, Copy)]
struct RouteCounts {
    /// GPU kernels: packed and rans.
    gpu: u64,
    nvdec: u64,
    /// The CPU: decoded for the dequantizing kernel, or restored whole and copied.
    cpu: u64,
}

impl RouteCounts {
    fn of(m: &Metrics) -> RouteCounts {
        let g = &m.gpu_sections;
        RouteCounts {
            gpu: g.packed.get() + g.rans.get(),
            nvdec: g.nvdec.get(),
            cpu: g.cpu_decode.get() + g.cpu_restore.get(),
        }
    }

    fn since(&self, before: &RouteCounts) -> RouteCounts {
        RouteCounts {
            gpu: self.gpu - before.gpu,
            nvdec: self.nvdec - before.nvdec,
            cpu: self.cpu - before.cpu,
        }
    }
}

impl std::fmt::Display for RouteCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gpu {} nvdec {} cpu {}", self.gpu, self.nvdec, self.cpu)
    }
}

/// The pipeline's decode stage alone on chunk `objects` already in memory: every section
/// restored `passes` times into a fresh destination by `threads` threads (as the fetch's
/// decode slots do), through the fetch's own per-section code. `first_layer` is the total (no
/// ordering); `wire` counts every pass.
fn decode_stage(
    objects: &[(kvfetcher_codec::ChunkKey, Vec<u8>)],
    reg: &CodecRegistry,
    (layout, shape): (&TargetLayout, &KvShape),
    gpu: Option<&Arc<GpuDevice>>,
    router: &Router,
    threads: usize,
    passes: usize,
) -> anyhow::Result<Timing> {
    let mut jobs = Vec::new();
    let mut views = Vec::new();
    for (_, o) in objects {
        views.push(ChunkView::parse(o)?);
    }
    let mut token_start = 0u32;
    for v in &views {
        for index in 0..v.header().sections.len() {
            jobs.push(SectionJob {
                header: v.header(),
                index,
                payload: v.section_bytes(index),
                token_start,
            });
        }
        token_start += v.header().token_count;
    }
    let wire = jobs.iter().map(|j| j.payload.len() as u64).sum::<u64>() * passes as u64;
    let start = Instant::now();
    let dest = TimedDest {
        start,
        layout: *layout,
        memory: match gpu {
            Some(d) => Memory::Gpu(d.clone(), OnceLock::new()),
            None => Memory::Host(Mutex::new(Vec::new())),
        },
        first: Mutex::new(None),
    };
    dest.allocate(shape)?;
    let metrics = Metrics::new();
    on_threads(
        threads,
        jobs.len() * passes,
        || Ok(()),
        |_, i| {
            let job = &jobs[i % jobs.len()];
            let target = RestoreTarget {
                dest: &dest,
                layout,
                shape,
            };
            Ok(restore_section_into(&target, job, reg, router, &metrics)?)
        },
    )?;
    let total = start.elapsed();
    Ok(Timing {
        first_layer: total,
        total,
        wire,
    })
}

/// NVDEC alone on the HEVC streams of `objects`, `passes` times, one thread per session of
/// `dev`, frames left in device memory: returns (seconds, bitstream bytes).
fn nvdec_alone(
    dev: &GpuDevice,
    objects: &[(kvfetcher_codec::ChunkKey, Vec<u8>)],
    passes: usize,
) -> anyhow::Result<(f64, u64)> {
    let pool = dev
        .nvdec()
        .ok_or_else(|| anyhow::anyhow!("no NVDEC on gpu:{}", dev.ordinal()))?;
    let mut streams: Vec<&[u8]> = Vec::new();
    let mut surface = 0;
    for (_, o) in objects {
        let view = ChunkView::parse(o)?;
        for (i, s) in view.header().sections.iter().enumerate() {
            let p = HevcParams::from_bytes(&s.params)?;
            let fmt = FrameFormat::of_geometry(&p.geometry);
            surface = surface.max(p.geometry.frames * fmt.surface_bytes_per_frame());
            streams.extend(p.split(view.section_bytes(i))?);
        }
    }
    let bytes = streams.iter().map(|s| s.len() as u64).sum::<u64>() * passes as u64;
    let start = Instant::now();
    on_threads(
        pool.len(),
        streams.len() * passes,
        || Ok(dev.cuda().alloc(surface)?),
        |buf, i| {
            let stream = streams[i % streams.len()];
            pool.with(|s| s.decode_to_device(stream, buf, 0))??;
            Ok(())
        },
    )?;
    Ok((start.elapsed().as_secs_f64(), bytes))
}

/// Runs `work(&mut state, i)` for every `i` in `0..n` on `threads` scoped threads, each taking
/// the next index and holding its own `state` from `init()`. A thread stops at its first
/// error, which is returned once every thread has ended.
fn on_threads<S>(
    threads: usize,
    n: usize,
    init: impl Fn() -> anyhow::Result<S> + Sync,
    work: impl Fn(&mut S, usize) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    let mut state = init()?;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        work(&mut state, i)?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("worker thread panicked"))??;
        }
        Ok(())
    })
}

fn report(link: &str, method: &str, t: Timing, raw: u64, bound: Option<Duration>) {
    let vs = bound.map_or_else(
        || "-".to_string(),
        |b| format!("{:.2}x", t.total.as_secs_f64() / b.as_secs_f64().max(1e-9)),
    );
    println!(
        "{link:<10} {method:<52} {:>10.2} {:>6.2}x {:>10.1}ms {:>8.1}ms {vs:>9}",
        t.wire as f64 / 1e6,
        raw as f64 / t.wire.max(1) as f64,
        t.first_layer.as_secs_f64() * 1e3,
        t.total.as_secs_f64() * 1e3
    );
}

/// The baseline: get every object whole (all in flight at once), decode each when it arrives,
/// restore it (and copy the result to `gpu` when set); layer 0 is complete only when every
/// chunk is.
async fn whole_objects(
    client: &StoreClient,
    objects: &[(kvfetcher_codec::ChunkKey, Vec<u8>)],
    reg: &CodecRegistry,
    layout: &TargetLayout,
    shape: &KvShape,
    gpu: Option<&Arc<GpuDevice>>,
) -> anyhow::Result<Timing> {
    let start = Instant::now();
    let mut buf = vec![0u8; layout.buffer_len(shape)];
    let mut wire = 0u64;
    let mut token_start = 0u32;
    let mut gets = futures::stream::iter(objects.iter().map(|(k, _)| client.get(k)))
        .buffered(objects.len().max(1));
    while let Some(bytes) = gets.next().await {
        let bytes = bytes?;
        wire += bytes.len() as u64;
        let reg = reg.clone();
        let part = tokio::task::spawn_blocking(move || decode_chunk(&bytes, &reg)).await??;
        let mut write = |off: usize, b: &[u8]| -> Result<(), kvfetcher::pipeline::LayoutIoError> {
            buf[off..off + b.len()].copy_from_slice(b);
            Ok(())
        };
        place_cache(layout, shape, 0, token_start, part.layers(), &mut write)?;
        token_start += part.tokens() as u32;
    }
    if let Some(d) = gpu {
        d.cuda().alloc(buf.len())?.write(&buf)?;
    }
    let total = start.elapsed();
    Ok(Timing {
        first_layer: total,
        total,
        wire,
    })
}
