//! `kvfetcher-bench load`: many engines against one daemon. Starts a store and a daemon in this
//! process on loopback (temp dir, dev certificates), saves one prefix of synthetic KV, then N
//! clients, each on its own connection and thread, loop lookup + fetch + verify for S seconds;
//! reports fetches per second, p50/p99 latency and the daemon's RSS.
//!
//! Not a network benchmark (`bench net`) nor a one-fetch latency breakdown (`bench fetch`): it
//! measures how the daemon holds up under many clients. Every fetched value is compared with the
//! saved KV as the codec restores it (after quantization), so a wrong byte is a failure.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Args;
use kvfetcher_client::{Client, KvShape, TargetLayout, TokenOrder};
use kvfetcher_codec::{decode_chunk, encode_cache, CodecRegistry, ModelFingerprint};
use kvfetcher_kv::{DType, KvCache, LayerKv, Tensor};
use serde::Serialize;
use tokio::sync::watch;

use super::local_stack::LocalStore;
use kvfetcher::config::{Config, LogFormat, StoreConfig};
use kvfetcher::pipeline::{place_cache, LayoutIoError};

/// Most clients: each is a thread and a connection; the daemon's table is sized to fit.
const MAX_CLIENTS: usize = 1024;
/// Longest run: the loops are bounded.
const MAX_SECONDS: f64 = 600.0;
/// The model id the prefix is saved under.
const MODEL: &str = "kvfetcher-bench-load";

/// Arguments of `kvfetcher-bench load`.
#[derive(Debug, Args)]
pub struct BenchLoadArgs {
    /// Concurrent clients (1..=1024), each a thread with its own connection.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Seconds the clients loop (at most 600).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Tokens of the saved prefix (synthetic KV: 8 layers, 4 KV heads of 64, f16).
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Clients.
    pub clients: usize,
    /// Seconds the clients ran.
    pub seconds: f64,
    /// Tokens per fetch.
    pub tokens: usize,
    /// Fetches done and verified.
    pub fetches: u64,
    /// Fetches that failed or did not verify.
    pub failed: u64,
    /// Verified fetches per second.
    pub fetches_per_s: f64,
    /// Median lookup + fetch + verify time in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile of the same.
    pub p99_ms: f64,
    /// The process's resident memory at the end (store, daemon and clients: one process), MiB.
    pub rss_mib: f64,
    /// Its peak resident memory (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

/// Runs `kvfetcher-bench load`.
pub fn run(args: BenchLoadArgs) -> anyhow::Result<()> {
    kvfetcher::cli::init_logging(LogFormat::Text, "warn");
    let report = measure(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:>8} {:>8} {:>8} {:>7} {:>11} {:>8} {:>8} {:>9} {:>9}",
            "clients",
            "seconds",
            "fetches",
            "failed",
            "fetches/s",
            "p50 ms",
            "p99 ms",
            "RSS MiB",
            "peak MiB"
        );
        println!(
            "{:>8} {:>8.1} {:>8} {:>7} {:>11.1} {:>8.2} {:>8.2} {:>9.1} {:>9.1}",
            report.clients,
            report.seconds,
            report.fetches,
            report.failed,
            report.fetches_per_s,
            report.p50_ms,
            report.p99_ms,
            report.rss_mib,
            report.peak_rss_mib
        );
        if let Some(e) = &report.first_error {
            println!("first error: {e}");
        }
    }
    ensure!(report.failed == 0, "{} fetches failed", report.failed);
    Ok(())
}

/// Starts the stack, saves the prefix and runs the clients: the measurement without printing.
pub fn measure(args: &BenchLoadArgs) -> anyhow::Result<LoadReport> {
    ensure!(
        (1..=MAX_CLIENTS).contains(&args.clients),
        "--clients must be 1..={MAX_CLIENTS}"
    );
    ensure!(
        args.seconds > 0.0 && args.seconds <= MAX_SECONDS,
        "--seconds must be in (0, {MAX_SECONDS}]"
    );
    ensure!(
        (1..=65536).contains(&args.tokens),
        "--tokens must be 1..=65536"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let (stop, stop_rx) = watch::channel(false);
    let (store, daemon) = rt.block_on(async {
        let store = LocalStore::start(dir.path(), "load", None)?;
        let mut config = Config {
            socket: dir.path().join("kvfetcher.sock"),
            stores: vec![StoreConfig::new(store.addr, store.certs.clone())],
            ..Config::default()
        };
        // All clients are this process's uid: the table must fit them all.
        config.server.max_clients = config.server.max_clients.max(args.clients + 2);
        config.server.max_clients_per_uid = config.server.max_clients;
        let daemon = kvfetcher::cli::start(&config, stop_rx).await?;
        anyhow::Ok((store, (daemon, config)))
    })?;
    let (daemon, config) = daemon;
    let (cache, ids) = synthetic_kv(args.tokens)?;
    let shape = KvShape {
        num_layers: cache.num_layers() as u32,
        tokens: cache.tokens() as u32,
        kv_heads: cache.kv_heads() as u32,
        head_dim: cache.head_dim() as u32,
    };
    let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let data: Vec<u8> = cache
        .layers()
        .iter()
        .flat_map(|l| l.key.data().iter().chain(l.value.data()).copied())
        .collect();
    let client = Client::connect(&daemon.socket)?;
    client.save(MODEL, &ids, &layout, &shape, &data)?;
    let want = Arc::new(expected(&cache, &ids, &config, &layout, &shape)?);

    let deadline = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let workers: Vec<_> = (0..args.clients)
        .map(|_| {
            let (socket, ids, want) = (daemon.socket.clone(), ids.clone(), want.clone());
            std::thread::spawn(move || client_loop(&socket, &ids, &layout, &want, start, deadline))
        })
        .collect();
    let mut latencies = Vec::new();
    let mut failed = 0u64;
    let mut first_error = None;
    for w in workers {
        let r = w
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        latencies.extend(r.latencies);
        failed += r.failed;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (rss, peak) = rss_mib().context("reading /proc/self/status")?;
    let _ = stop.send(true);
    drop(store);
    drop(rt);
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Ok(LoadReport {
        clients: args.clients,
        seconds: elapsed,
        tokens: args.tokens,
        fetches: latencies.len() as u64,
        failed,
        fetches_per_s: latencies.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        rss_mib: rss,
        peak_rss_mib: peak,
        first_error,
    })
}

/// What one client thread saw.
struct ClientResult {
    latencies: Vec<Duration>,
    failed: u64,
    first_error: Option<String>,
}

/// One client: connect, then lookup + fetch + verify until `deadline` after `start` (at least
/// once).
fn client_loop(
    socket: &Path,
    ids: &[u32],
    layout: &TargetLayout,
    want: &[u8],
    start: Instant,
    deadline: Duration,
) -> ClientResult {
    let mut r = ClientResult {
        latencies: Vec::new(),
        failed: 0,
        first_error: None,
    };
    let client = match Client::connect(socket) {
        Ok(c) => c,
        Err(e) => {
            r.failed += 1;
            r.first_error = Some(format!("connect: {e}"));
            return r;
        }
    };
    // At least one fetch, however slow the machine; then until the deadline.
    loop {
        let t = Instant::now();
        match one_fetch(&client, ids, layout, want) {
            Ok(()) => r.latencies.push(t.elapsed()),
            Err(e) => {
                r.failed += 1;
                r.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        if start.elapsed() >= deadline {
            return r;
        }
    }
}

fn one_fetch(
    client: &Client,
    ids: &[u32],
    layout: &TargetLayout,
    want: &[u8],
) -> anyhow::Result<()> {
    let found = client.lookup(MODEL, ids)?;
    ensure!(
        found as usize == ids.len(),
        "lookup found {found} of {} tokens",
        ids.len()
    );
    let handle = client.fetch(MODEL, ids, layout)?;
    let done = handle.wait_done()?;
    ensure!(
        done.tokens as usize == ids.len(),
        "fetch restored {} tokens",
        done.tokens
    );
    let got = handle.bytes()?;
    ensure!(
        got.len() == want.len(),
        "fetched {} bytes, expected {}",
        got.len(),
        want.len()
    );
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        anyhow::bail!("byte {i} differs from what was saved");
    }
    handle.release()?;
    Ok(())
}

/// Synthetic KV of `tokens` tokens: 8 layers, 4 KV heads of 64, f16, smooth values with noise.
fn synthetic_kv(tokens: usize) -> anyhow::Result<(KvCache, Vec<u32>)> {
    let (heads, dim) = (4usize, 64usize);
    let tensor = |seed: u64| {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let data: Vec<u8> = (0..tokens * heads * dim)
            .flat_map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let noise = (x % 1000) as f32 / 1000.0 - 0.5;
                let v = ((i % dim) as f32 / dim as f32 - 0.5) * 2.0 + noise * 0.25;
                half::f16::from_f32(v).to_le_bytes()
            })
            .collect();
        Tensor::new(kvfetcher_kv::DType::F16, [tokens, heads, dim], data)
    };
    let layers = (0..8u64)
        .map(|l| {
            Ok(LayerKv {
                key: tensor(2 * l + 1)?,
                value: tensor(2 * l + 2)?,
            })
        })
        .collect::<Result<Vec<_>, kvfetcher_kv::TensorError>>()?;
    let ids: Vec<u32> = (0..tokens as u32)
        .map(|t| t.wrapping_mul(7919) % 32000)
        .collect();
    Ok((
        KvCache::new(layers, Some(ids.clone()))?.to_dtype(DType::F16),
        ids,
    ))
}

/// The bytes a fetch must return: the saved KV encoded as the daemon saves it, decoded by the
/// codec, placed in `layout`.
fn expected(
    cache: &KvCache,
    ids: &[u32],
    config: &Config,
    layout: &TargetLayout,
    shape: &KvShape,
) -> anyhow::Result<Vec<u8>> {
    let reg = CodecRegistry::software();
    let cfg = kvfetcher::pipeline::encode_config(&config.save, &reg, MODEL)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let objects = encode_cache(
        cache,
        &ModelFingerprint::of_bytes(MODEL.as_bytes()),
        ids,
        &cfg,
        &reg,
    )?;
    let parts = objects
        .iter()
        .map(|(_, b)| decode_chunk(b, &reg))
        .collect::<Result<Vec<_>, _>>()?;
    let want = KvCache::concat_tokens(&parts)?;
    let mut buf = vec![0u8; layout.buffer_len(shape)];
    place_cache(layout, shape, 0, 0, want.layers(), &mut |off,
                                                          b|
     -> Result<
        (),
        LayoutIoError,
    > {
        buf[off..off + b.len()].copy_from_slice(b);
        Ok(())
    })?;
    Ok(buf)
}

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn rss_mib() -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name}"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("no value")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
