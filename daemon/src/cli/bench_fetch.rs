//! `kvfetcher bench fetch`: time to first layer and total fetch time of real KV through the
//! pipeline (CPU decode path), against fetching the same KV as raw bf16 and as zstd-compressed
//! int8 whole objects over the same link.
//!
//! Everything runs in one process on loopback: one embedded store per link rate, paced by the
//! store's own rate limit (`--max-rate`; no RTT). The baselines fetch every chunk object whole
//! (in parallel), then decode and restore: their first layer is ready only when everything is.
//! The pipeline requests layer group 0 of every chunk first and restores while receiving.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use kvfetcher_client::{KvDType, KvShape, TargetLayout, TokenOrder};
use kvfetcher_codec::{
    decode_chunk, encode_cache, CodecRegistry, EncodeConfig, ModelFingerprint, QuantConfig,
    VariantKind,
};
use kvfetcher_kv::{DType, KvCache, KvFile, LayerKv, Tensor};

use super::local_stack::LocalStore;
use crate::config::{FetchConfig, SaveConfig};
use crate::metrics::Metrics;
use crate::pipeline::{place_cache, Pipeline};
use crate::server::{Backend, Destination, ServeError};
use crate::transport::StoreClient;

/// Arguments of `kvfetcher bench fetch`.
#[derive(Debug, Args)]
pub struct BenchFetchArgs {
    /// Real KV (safetensors) to fetch.
    #[arg(long, default_value = "../shared/data/codelm-kv-a.safetensors")]
    pub kv: PathBuf,
    /// Link rates in Gbit/s, comma separated; 0 is loopback without a limit.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    pub rates: Vec<f64>,
    /// Variant the pipeline's chunks are saved with (zstd, packed, hevc).
    #[arg(long, default_value = "zstd")]
    pub variant: String,
    /// Quantization bits of the pipeline's chunks (16: bit-exact).
    #[arg(long, default_value_t = 8)]
    pub bits: u8,
    /// Layers per section of the pipeline's chunks.
    #[arg(long, default_value_t = 1)]
    pub layers_per_group: u32,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: u32,
    /// Runs per method and rate; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

/// Records when layer 0 became ready.
struct TimedDest {
    start: Instant,
    layout: TargetLayout,
    buf: Mutex<Vec<u8>>,
    first: Mutex<Option<Duration>>,
}

impl Destination for TimedDest {
    fn allocate(&self, shape: &KvShape) -> Result<(), ServeError> {
        *self
            .buf
            .lock()
            .map_err(|_| ServeError::Internal("poisoned".into()))? =
            vec![0u8; self.layout.buffer_len(shape)];
        Ok(())
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), ServeError> {
        let mut buf = self
            .buf
            .lock()
            .map_err(|_| ServeError::Internal("poisoned".into()))?;
        let end = offset
            .checked_add(bytes.len())
            .filter(|&e| e <= buf.len())
            .ok_or_else(|| ServeError::BadRequest("write out of bounds".into()))?;
        buf[offset..end].copy_from_slice(bytes);
        Ok(())
    }

    fn layers_ready(&self, layers: Range<u32>) {
        if layers.start == 0 {
            if let Ok(mut f) = self.first.lock() {
                f.get_or_insert(self.start.elapsed());
            }
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

/// Runs `kvfetcher bench fetch`.
pub fn run(args: BenchFetchArgs) -> anyhow::Result<()> {
    let file = KvFile::read(&args.kv).with_context(|| format!("reading {}", args.kv.display()))?;
    let cache = file.cache;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args, cache))
}

fn to_dtype(cache: &KvCache, dtype: DType) -> anyhow::Result<KvCache> {
    let conv = |t: &Tensor| Tensor::from_f32(dtype, t.shape(), &t.to_f32());
    let layers = cache
        .layers()
        .iter()
        .map(|l| {
            Ok(LayerKv {
                key: conv(&l.key)?,
                value: conv(&l.value)?,
            })
        })
        .collect::<Result<Vec<_>, kvfetcher_kv::TensorError>>()?;
    Ok(KvCache::new(layers, None)?)
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
    let target = TargetLayout::host(KvDType::BF16, TokenOrder::Nhd);
    let reg = CodecRegistry::default();
    let bf16 = to_dtype(&cache, DType::BF16)?;
    let baseline_cfg = |quant: QuantConfig, variant| EncodeConfig {
        quant,
        variant,
        hevc_layout: None,
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
        workers: SaveConfig::default().workers,
    };
    let client_bytes: Vec<u8> = cache
        .layers()
        .iter()
        .flat_map(|l| l.key.data().iter().chain(l.value.data()).copied())
        .collect();
    let client_layout = TargetLayout::host(KvDType::F16, TokenOrder::Nhd);
    anyhow::ensure!(cache.dtype() == DType::F16, "bench fetch expects fp16 KV");
    println!(
        "bench fetch: {} ({} layers, {tokens} tokens, {} kv heads x {}), raw bf16 {:.2} MB, median of {}",
        args.kv.display(),
        cache.num_layers(),
        cache.kv_heads(),
        cache.head_dim(),
        raw_bf16 as f64 / 1e6,
        args.repeat
    );
    println!(
        "{:<10} {:<34} {:>10} {:>7} {:>12} {:>10}",
        "link", "method", "wire MB", "ratio", "first layer", "total"
    );
    for &rate in &args.rates {
        let max_rate = (rate > 0.0).then(|| (rate * 1e9 / 8.0) as u64);
        let store = LocalStore::start(dir.path(), &format!("{rate}"), max_rate)?;
        let client = StoreClient::connect(store.addr, store.target()?.tls).await?;
        for (_, bytes) in raw_objects.iter().chain(&int8_objects) {
            client.put(Bytes::from(bytes.clone())).await?;
        }
        let pipeline = Pipeline::new(
            vec![store.target()?],
            reg.clone(),
            FetchConfig::default(),
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
            )
            .await?;
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
                runs.push(whole_objects(&client, objects, &reg, &target, &shape).await?);
            }
            report(&link, name, median(runs), raw_bf16);
        }
        let mut runs = Vec::new();
        for _ in 0..args.repeat.max(1) {
            let start = Instant::now();
            let dest = Arc::new(TimedDest {
                start,
                layout: target,
                buf: Mutex::new(Vec::new()),
                first: Mutex::new(None),
            });
            let out = pipeline
                .fetch("bench-pipeline", &ids, &target, dest.clone())
                .await?;
            let total = start.elapsed();
            let first_layer = dest.first.lock().ok().and_then(|f| *f).unwrap_or(total);
            runs.push(Timing {
                first_layer,
                total,
                wire: out.bytes_on_wire,
            });
        }
        let name = format!("kvfetcher {} {}-bit, layer groups", args.variant, args.bits);
        report(&link, &name, median(runs), raw_bf16);
        client.close().await;
    }
    Ok(())
}

fn report(link: &str, method: &str, t: Timing, raw: u64) {
    println!(
        "{link:<10} {method:<34} {:>10.2} {:>6.2}x {:>10.1}ms {:>8.1}ms",
        t.wire as f64 / 1e6,
        raw as f64 / t.wire.max(1) as f64,
        t.first_layer.as_secs_f64() * 1e3,
        t.total.as_secs_f64() * 1e3
    );
}

/// The baseline: get every object whole (all in flight at once), decode each when it arrives,
/// restore it; layer 0 is complete only when every chunk is.
async fn whole_objects(
    client: &StoreClient,
    objects: &[(kvfetcher_codec::ChunkKey, Vec<u8>)],
    reg: &CodecRegistry,
    layout: &TargetLayout,
    shape: &KvShape,
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
        let mut write = |off: usize, b: &[u8]| -> Result<(), crate::pipeline::LayoutIoError> {
            buf[off..off + b.len()].copy_from_slice(b);
            Ok(())
        };
        place_cache(layout, shape, 0, token_start, part.layers(), &mut write)?;
        token_start += part.tokens() as u32;
    }
    let total = start.elapsed();
    Ok(Timing {
        first_layer: total,
        total,
        wire,
    })
}
