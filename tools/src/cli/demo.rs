//! `kvfetcher-bench demo`: the whole path on one machine with embedded defaults. Starts a store and
//! a daemon on loopback (temp dirs, dev certificates), captures real KV from a llama2.c model,
//! saves it through the Rust client, fetches it back through the C client (`libkvfetcher.so`)
//! into host memory, verifies every value against what was saved (after quantization), and
//! prints one summary.

mod cffi;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use clap::Args;
use kvfetcher_client::{Client, KvShape, MemoryKind, Paging, TargetLayout, TokenOrder};
use kvfetcher_codec::{decode_chunk, encode_cache, CodecRegistry, ModelFingerprint};
use kvfetcher_kv::{DType, KvCache, Llama2Model};
use tokio::sync::watch;

use super::local_stack::LocalStore;
use cffi::{CClient, KvfLayout};
use kvfetcher::config::{Config, LogFormat, StoreConfig};
use kvfetcher::pipeline::{place_cache, LayoutIoError};

/// Arguments of `kvfetcher-bench demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// llama2.c checkpoint to capture KV from.
    #[arg(long, default_value = "data/stories260K.bin")]
    pub model: PathBuf,
    /// Tokens to generate (at most the model's context).
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
    /// Sampling seed (the model loops under greedy decoding).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The C client library (default: libkvfetcher.so beside this executable).
    #[arg(long, value_name = "PATH")]
    pub c_lib: Option<PathBuf>,
}

/// Runs `kvfetcher-bench demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    kvfetcher::cli::init_logging(LogFormat::Text, "warn");
    let c_lib = match &args.c_lib {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .join("libkvfetcher.so"),
    };
    let c = CClient::load(&c_lib).context(
        "the demo fetches through the C client; build it with cargo build -p kvfetcher-c",
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(demo(args, c))
}

async fn demo(args: DemoArgs, c: CClient) -> anyhow::Result<()> {
    let total = Instant::now();
    let dir = tempfile::tempdir()?;
    let store = LocalStore::start(dir.path(), "demo", None)?;
    let config = Config {
        socket: dir.path().join("kvfetcher.sock"),
        metrics_addr: Some(([127, 0, 0, 1], 0).into()),
        stores: vec![StoreConfig::new(store.addr, store.certs.clone())],
        ..Config::default()
    };
    let (stop, stop_rx) = watch::channel(false);
    let daemon = kvfetcher::cli::start(&config, stop_rx).await?;
    println!(
        "demo: store on {} and daemon on {} (temp dir {})",
        store.addr,
        daemon.socket.display(),
        dir.path().display()
    );

    // Capture real KV.
    let model = Llama2Model::load(&args.model)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let ctx = model.config().seq_len;
    ensure!(
        args.tokens >= 1 && args.tokens <= ctx,
        "--tokens must be 1..={ctx}"
    );
    let t = Instant::now();
    let generated = tokio::task::spawn_blocking({
        let (tokens, seed) = (args.tokens, args.seed);
        move || {
            model
                .generate(tokens, seed, 1.0)
                .map(|g| (g, model.fingerprint_hex()))
        }
    })
    .await??;
    let (generation, model_id) = generated;
    let cache = generation.cache.to_dtype(DType::F16);
    let ids = generation.token_ids.clone();
    println!(
        "demo: captured {} tokens of KV ({} layers x {} kv heads x {}) in {:.0} ms",
        cache.tokens(),
        cache.num_layers(),
        cache.kv_heads(),
        cache.head_dim(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let shape = KvShape {
        num_layers: cache.num_layers() as u32,
        tokens: cache.tokens() as u32,
        kv_heads: cache.kv_heads() as u32,
        head_dim: cache.head_dim() as u32,
    };

    // Save through the Rust client (blocking API, as an engine thread would).
    let socket = daemon.socket.clone();
    let save_layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let data: Vec<u8> = cache
        .layers()
        .iter()
        .flat_map(|l| l.key.data().iter().chain(l.value.data()).copied())
        .collect();
    let raw_bytes = data.len();
    let (chunks, found) = tokio::task::spawn_blocking({
        let (socket, model_id, ids) = (socket.clone(), model_id.clone(), ids.clone());
        move || -> anyhow::Result<(u32, u32)> {
            let client = Client::connect(&socket)?;
            let chunks = client.save(&model_id, &ids, &save_layout, &shape, &data)?;
            Ok((chunks, client.lookup(&model_id, &ids)?))
        }
    })
    .await??;
    ensure!(
        found as usize == ids.len(),
        "lookup after save found {found} of {} tokens",
        ids.len()
    );
    println!(
        "demo: saved {chunks} chunks through the Rust client; lookup finds all {found} tokens"
    );

    // Fetch through the C client into host memory: f16, NHD, paged in 16-token blocks.
    let wire_before = daemon.metrics.bytes_in.get();
    let layout = TargetLayout {
        dtype: DType::F16,
        order: TokenOrder::Nhd,
        paging: Paging::Paged { block_tokens: 16 },
        memory: MemoryKind::Host,
    };
    let c_layout = KvfLayout {
        dtype: 0,
        order: 0,
        block_tokens: 16,
        memory: 0,
        gpu_device: 0,
    };
    let t = Instant::now();
    let fetched = tokio::task::spawn_blocking({
        let (socket, model_id, ids) = (socket.clone(), model_id.clone(), ids.clone());
        move || c.fetch(&socket, &model_id, &ids, c_layout)
    })
    .await??;
    let fetch_time = t.elapsed();
    let wire = daemon.metrics.bytes_in.get() - wire_before;
    ensure!(
        fetched.tokens as usize == ids.len(),
        "C client restored {} tokens",
        fetched.tokens
    );
    ensure!(
        fetched.shape.num_layers == shape.num_layers && fetched.shape.tokens == shape.tokens,
        "C client got another shape"
    );

    // Verify every value against the saved (quantized) values.
    let want = expected(&cache, &model_id, &ids, &config)?;
    let mut buf = vec![0u8; layout.buffer_len(&shape)];
    place_cache(&layout, &shape, 0, 0, want.layers(), &mut |off,
                                                            b|
     -> Result<
        (),
        LayoutIoError,
    > {
        buf[off..off + b.len()].copy_from_slice(b);
        Ok(())
    })?;
    ensure!(
        fetched.bytes.len() == buf.len(),
        "fetched {} bytes, expected {}",
        fetched.bytes.len(),
        buf.len()
    );
    let values = verify(&fetched.bytes, &buf, &layout, &shape)?;
    let _ = stop.send(true);
    println!(
        "demo: OK  tokens {}  values verified {}  bytes on the wire {} (raw f16 {})  ratio {:.2}x  \
         time to first layer {:.1} ms  fetch {:.1} ms  total {:.2} s",
        fetched.tokens,
        values,
        wire,
        raw_bytes,
        raw_bytes as f64 / wire.max(1) as f64,
        fetched.first_layer.as_secs_f64() * 1e3,
        fetch_time.as_secs_f64() * 1e3,
        total.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The values the daemon saved: the cache quantized and dequantized with its save settings.
fn expected(
    cache: &KvCache,
    model_id: &str,
    ids: &[u32],
    config: &Config,
) -> anyhow::Result<KvCache> {
    let reg = CodecRegistry::software();
    let cfg = kvfetcher::pipeline::encode_config(&config.save, &reg, model_id)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let objects = encode_cache(
        cache,
        &ModelFingerprint::of_bytes(model_id.as_bytes()),
        ids,
        &cfg,
        &reg,
    )?;
    let parts = objects
        .iter()
        .map(|(_, b)| decode_chunk(b, &reg))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KvCache::concat_tokens(&parts)?)
}

/// Compares the fetched buffer with the expected one value by value (padding included);
/// returns the number of KV values compared.
fn verify(
    got: &[u8],
    want: &[u8],
    layout: &TargetLayout,
    shape: &KvShape,
) -> anyhow::Result<usize> {
    let es = layout.dtype.size();
    if let Some(i) =
        (0..got.len() / es).find(|&i| got[i * es..(i + 1) * es] != want[i * es..(i + 1) * es])
    {
        bail!("value {i} (byte {}) differs from what was saved", i * es);
    }
    Ok(shape.num_layers as usize
        * 2
        * shape.tokens as usize
        * shape.kv_heads as usize
        * shape.head_dim as usize)
}
