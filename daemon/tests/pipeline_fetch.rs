//! The fetch/save pipeline against a real in-process QUIC store and real KV: save through the
//! pipeline, fetch back into every target layout, and compare with the quantized values.

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvfetcher::config::{CodecConfig, FetchConfig, SaveConfig};
use kvfetcher::pipeline::{Pipeline, StoreTarget};
use kvfetcher::server::{Backend, FetchEvents, ServeError};
use kvfetcher::store::{LocalDir, ServerOptions, StoreServer};
use kvfetcher::transport::{
    write_dev_pki, ClientOptions, StoreClient, TlsClientConfig, TlsServerConfig,
};
use kvfetcher::Metrics;
use kvfetcher::{BufferError, Destination};
use kvfetcher_codec::{
    allocate_steps, calibrate, BasisKind, Calibration, CodecProfile, Rope, RopeStyle,
    TransformConfig,
};
use kvfetcher_codec::{
    chunk_keys, decode_chunk, encode_cache, Chroma, ChunkHeader, CodecRegistry, EncodeConfig,
    HevcLayout, HevcParams, ModelFingerprint, QuantConfig, VariantKind,
};
use kvfetcher_kv::{KvCache, KvFile, Tensor};
use kvfetcher_protocol::{DType, KvShape, MemoryKind, Paging, TargetLayout, TokenOrder};
use kvfetcher_testkit::{skip, Missing};

const MODEL: &str = "codelm-107m";
const TOKENS: usize = 600;

/// A host buffer standing in for the server's memfd.
#[derive(Default)]
struct MemDest {
    buf: Mutex<Vec<u8>>,
    layout: Mutex<Option<TargetLayout>>,
    shape: Mutex<Option<KvShape>>,
    ready: Mutex<Vec<Range<u32>>>,
}

impl MemDest {
    fn new(layout: TargetLayout) -> Arc<MemDest> {
        let d = MemDest::default();
        *d.layout.lock().unwrap() = Some(layout);
        Arc::new(d)
    }
}

impl Destination for MemDest {
    fn allocate(&self, shape: &KvShape) -> Result<(), BufferError> {
        let layout = self.layout.lock().unwrap().expect("layout set");
        *self.buf.lock().unwrap() = vec![0u8; layout.buffer_len(shape)];
        *self.shape.lock().unwrap() = Some(*shape);
        Ok(())
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), BufferError> {
        let mut buf = self.buf.lock().unwrap();
        let end = offset.checked_add(bytes.len()).filter(|&e| e <= buf.len());
        let end = end.ok_or_else(|| BufferError::Invalid("write out of bounds".into()))?;
        buf[offset..end].copy_from_slice(bytes);
        Ok(())
    }

    fn layers_written(&self, layers: Range<u32>) {
        self.ready.lock().unwrap().push(layers);
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The store, for more pipelines and clients.
    target: StoreTarget,
    pipeline: Arc<Pipeline>,
    cache: KvCache,
    ids: Vec<u32>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn real_cache() -> KvCache {
    let path = kvfetcher_testkit::data_file("codelm-kv-a.safetensors");
    KvFile::read(&path)
        .unwrap()
        .cache
        .slice_tokens(0, TOKENS)
        .unwrap()
}

fn save_config(bits: u8, variant: &str) -> SaveConfig {
    SaveConfig {
        variant: variant.into(),
        bits,
        chunk_tokens: 256,
        layers_per_group: 2,
        hevc_stream_frames: 0,
        hevc_layout: None,
        workers: 1,
        ..SaveConfig::default()
    }
}

async fn fixture(save: SaveConfig, fetch: FetchConfig) -> Option<Fixture> {
    fixture_with(save, fetch, CodecRegistry::software()).await
}

async fn fixture_with(
    save: SaveConfig,
    fetch: FetchConfig,
    registry: CodecRegistry,
) -> Option<Fixture> {
    let cache = real_cache();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    write_dev_pki(&certs).unwrap();
    let tls = TlsServerConfig::from_dir(&certs).unwrap();
    let backend = Arc::new(LocalDir::open(&dir.path().join("data")).unwrap());
    let server = StoreServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        &tls,
        backend,
        ServerOptions::default(),
    )
    .unwrap();
    let addr = server.local_addr();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    let target = StoreTarget {
        addr,
        tls: TlsClientConfig::from_path(&certs).unwrap(),
        options: ClientOptions::default(),
    };
    let pipeline =
        Pipeline::new(vec![target.clone()], registry, fetch, save, Metrics::new()).unwrap();
    // Token ids: a fixed pseudo-random sequence (any ids work; they only name the chunks).
    let ids = (0..TOKENS as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 32_000)
        .collect();
    Some(Fixture {
        _dir: dir,
        stop: Some(stop),
        target,
        pipeline: Arc::new(pipeline),
        cache,
        ids,
    })
}

impl Fixture {
    /// Saves the whole cache through the pipeline from a client buffer; returns the buffer's
    /// layout and the number of chunks stored.
    async fn save_all(&self) -> (TargetLayout, u32) {
        let (layout, data) = client_bytes(&self.cache);
        let stored = self
            .pipeline
            .save(
                MODEL,
                &self.ids,
                &layout,
                &shape_of(&self.cache),
                &data,
                false,
            )
            .await
            .unwrap();
        (layout, stored)
    }
}

fn shape_of(c: &KvCache) -> KvShape {
    KvShape {
        num_layers: c.num_layers() as u32,
        tokens: c.tokens() as u32,
        kv_heads: c.kv_heads() as u32,
        head_dim: c.head_dim() as u32,
    }
}

/// The cache as a client hands it over: f16 NHD contiguous.
fn client_bytes(c: &KvCache) -> (TargetLayout, Vec<u8>) {
    let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let mut out = Vec::new();
    for l in c.layers() {
        out.extend_from_slice(l.key.data());
        out.extend_from_slice(l.value.data());
    }
    (layout, out)
}

/// What a fetch must return: the cache quantized and dequantized exactly as the pipeline saves it.
fn expected(c: &KvCache, ids: &[u32], save: &SaveConfig) -> KvCache {
    let variant = match save.variant.as_str() {
        "packed" => VariantKind::Packed,
        _ => VariantKind::Zstd,
    };
    let cfg = EncodeConfig {
        quant: if save.bits == 16 {
            QuantConfig::Exact
        } else {
            QuantConfig::bits(save.bits)
        },
        variant,
        hevc_layout: None,
        hevc_stream_frames: None,
        chunk_tokens: save.chunk_tokens as usize,
        layers_per_section: save.layers_per_group as usize,
    };
    let reg = CodecRegistry::software();
    let fp = ModelFingerprint::of_bytes(MODEL.as_bytes());
    let parts: Vec<KvCache> = encode_cache(c, &fp, ids, &cfg, &reg)
        .unwrap()
        .iter()
        .map(|(_, bytes)| decode_chunk(bytes, &reg).unwrap())
        .collect();
    KvCache::concat_tokens(&parts).unwrap()
}

/// Checks every (layer, K/V, token, head) row of `buf` against `want` through `layout.offset`.
fn assert_matches(buf: &[u8], layout: &TargetLayout, want: &KvCache) {
    let shape = shape_of(want);
    let dtype = layout.dtype;
    let row = shape.head_dim as usize * layout.dtype.size();
    for (li, l) in want.layers().iter().enumerate() {
        for (kv, t) in [(0u32, &l.key), (1u32, &l.value)] {
            let f = t.to_f32();
            let converted = Tensor::from_f32(dtype, t.shape(), &f).unwrap();
            let src = converted.data();
            for tok in 0..shape.tokens {
                for h in 0..shape.kv_heads {
                    let off = layout.offset(&shape, li as u32, kv, tok, h);
                    let s = (tok as usize * shape.kv_heads as usize + h as usize) * row;
                    assert_eq!(
                        &buf[off..off + row],
                        &src[s..s + row],
                        "{layout:?} layer {li} kv {kv} token {tok} head {h}"
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_then_fetch_returns_quantized_values_in_every_layout() {
    let save = save_config(8, "zstd");
    let Some(f) = fixture(save.clone(), FetchConfig::default()).await else {
        return;
    };
    let shape = shape_of(&f.cache);
    let (client_layout, data) = client_bytes(&f.cache);
    let stored = f
        .pipeline
        .save(MODEL, &f.ids, &client_layout, &shape, &data, false)
        .await
        .unwrap();
    assert_eq!(stored, 3, "600 tokens in 256-token chunks");
    assert_eq!(
        f.pipeline.lookup(MODEL, &f.ids).await.unwrap(),
        TOKENS as u32
    );
    assert_eq!(f.pipeline.lookup("another-model", &f.ids).await.unwrap(), 0);
    let want = expected(&f.cache, &f.ids, &save);
    // Every dtype, order and paging at least once (the full matrix of placements is covered by
    // the layout unit tests; here the point is the whole path, so keep the debug build fast).
    let layouts = [
        (DType::F16, TokenOrder::Nhd, Paging::Contiguous),
        (
            DType::BF16,
            TokenOrder::Hnd,
            Paging::Paged { block_tokens: 16 },
        ),
        (
            DType::F32,
            TokenOrder::Nhd,
            Paging::Paged { block_tokens: 100 },
        ),
        (DType::F16, TokenOrder::Hnd, Paging::Contiguous),
    ];
    for (dtype, order, paging) in layouts {
        let layout = TargetLayout {
            dtype,
            order,
            paging,
            memory: MemoryKind::Host,
        };
        let dest = MemDest::new(layout);
        let out = f
            .pipeline
            .fetch(MODEL, &f.ids, &layout, dest.clone(), FetchEvents::ignored())
            .await
            .unwrap();
        assert_eq!(out.tokens, TOKENS as u32);
        assert!(out.bytes_on_wire > 0);
        assert_matches(&dest.buf.lock().unwrap(), &layout, &want);
        let mut ready = dest.ready.lock().unwrap().clone();
        ready.sort_by_key(|r| r.start);
        let covered: Vec<u32> = ready.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(
            covered,
            (0..8).collect::<Vec<_>>(),
            "each layer ready exactly once"
        );
    }
    let m = f.pipeline.metrics();
    assert_eq!(m.fetch_seconds.count(), 4);
    assert!(
        m.compression_ratio() > 1.5,
        "ratio {}",
        m.compression_ratio()
    );
    assert_eq!(m.fetches_active.get(), 0);
    assert_eq!(m.sections_in_flight.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_lookup_and_partial_fetch() {
    let save = save_config(4, "packed");
    let Some(f) = fixture(save.clone(), FetchConfig::default()).await else {
        return;
    };
    // Save only the first 512 tokens (two whole chunks).
    let head = f.cache.slice_tokens(0, 512).unwrap();
    let (layout, data) = client_bytes(&head);
    let stored = f
        .pipeline
        .save(
            MODEL,
            &f.ids[..512],
            &layout,
            &shape_of(&head),
            &data,
            false,
        )
        .await
        .unwrap();
    assert_eq!(stored, 2);
    // A longer request finds the 512-token prefix; one that diverges in chunk 1 finds 256.
    assert_eq!(f.pipeline.lookup(MODEL, &f.ids).await.unwrap(), 512);
    let mut diverged = f.ids.clone();
    diverged[300] += 1;
    assert_eq!(f.pipeline.lookup(MODEL, &diverged).await.unwrap(), 256);
    let mut other = f.ids.clone();
    other[0] += 1;
    assert_eq!(f.pipeline.lookup(MODEL, &other).await.unwrap(), 0);
    // A fetch of the diverged sequence restores just the common first chunk.
    let dest = MemDest::new(layout);
    let out = f
        .pipeline
        .fetch(
            MODEL,
            &diverged,
            &layout,
            dest.clone(),
            FetchEvents::ignored(),
        )
        .await
        .unwrap();
    assert_eq!(out.tokens, 256);
    let want = expected(&head, &f.ids[..512], &save)
        .slice_tokens(0, 256)
        .unwrap();
    assert_matches(&dest.buf.lock().unwrap(), &layout, &want);
    // Nothing stored: NotFound, and the destination is never allocated.
    let dest = MemDest::new(layout);
    let err = f
        .pipeline
        .fetch(MODEL, &other, &layout, dest.clone(), FetchEvents::ignored())
        .await
        .unwrap_err();
    assert!(matches!(err, ServeError::NotFound(_)), "{err}");
    assert!(dest.shape.lock().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_and_cancelled_fetches_share_the_pipeline() {
    let save = save_config(8, "zstd");
    // A tiny window and byte budget: fetches must wait on each other and still finish.
    let fetch = FetchConfig {
        max_inflight_sections: 2,
        max_inflight_bytes: 64 << 10,
        decode_workers: 1,
        connect_timeout_ms: 3000,
        ..FetchConfig::default()
    };
    let Some(f) = fixture(save.clone(), fetch).await else {
        return;
    };
    let (layout, _) = f.save_all().await;
    // A fetch dropped part-way (cancelled client) must leave no permits or gauges held.
    {
        let dest = MemDest::new(layout);
        let fut = f
            .pipeline
            .fetch(MODEL, &f.ids, &layout, dest, FetchEvents::ignored());
        let _ = tokio::time::timeout(std::time::Duration::from_millis(5), fut).await;
    }
    let want = expected(&f.cache, &f.ids, &save);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let p = f.pipeline.clone();
            let ids = f.ids.clone();
            tokio::spawn(async move {
                let dest = MemDest::new(layout);
                let out = p
                    .fetch(MODEL, &ids, &layout, dest.clone(), FetchEvents::ignored())
                    .await
                    .unwrap();
                (out, dest)
            })
        })
        .collect();
    for t in tasks {
        let (out, dest) = t.await.unwrap();
        assert_eq!(out.tokens, TOKENS as u32);
        assert_matches(&dest.buf.lock().unwrap(), &layout, &want);
    }
    let m = f.pipeline.metrics();
    assert_eq!(m.fetches_active.get(), 0);
    assert_eq!(m.sections_in_flight.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_is_unavailable_and_bad_input_is_rejected() {
    let Some(f) = fixture(save_config(8, "zstd"), FetchConfig::default()).await else {
        return;
    };
    let shape = shape_of(&f.cache);
    let (layout, data) = client_bytes(&f.cache);
    // Wrong token count and a short buffer are bad requests.
    let err = f
        .pipeline
        .save(MODEL, &f.ids[..10], &layout, &shape, &data, false)
        .await
        .unwrap_err();
    assert!(matches!(err, ServeError::BadRequest(_)), "{err}");
    let err = f
        .pipeline
        .save(MODEL, &f.ids, &layout, &shape, &data[..100], false)
        .await
        .unwrap_err();
    assert!(matches!(err, ServeError::BadRequest(_)), "{err}");
    // A pipeline pointed at a port with no store reports the store as unavailable.
    let dir = tempfile::tempdir().unwrap();
    write_dev_pki(dir.path()).unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    drop(sock);
    let target = StoreTarget {
        addr,
        tls: TlsClientConfig::from_path(dir.path()).unwrap(),
        options: ClientOptions::default(),
    };
    let fetch = FetchConfig {
        connect_timeout_ms: 300,
        ..FetchConfig::default()
    };
    let p = Pipeline::new(
        vec![target],
        CodecRegistry::software(),
        fetch,
        save_config(8, "zstd"),
        Metrics::new(),
    )
    .unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(20), p.lookup(MODEL, &f.ids)).await;
    let err = r.expect("lookup gives up").unwrap_err();
    assert!(matches!(err, ServeError::Unavailable(_)), "{err}");
}

/// `fetch.connections_per_store`: a pipeline keeps that many QUIC connections to a store and
/// spreads its requests over them, while lookups reuse one, observed through the real store's
/// count of open connections (the observer's own included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_connections_per_store() {
    let save = save_config(8, "zstd");
    let Some(f) = fixture(save.clone(), FetchConfig::default()).await else {
        return;
    };
    let pipeline = |connections| {
        let fetch = FetchConfig {
            connections_per_store: connections,
            ..FetchConfig::default()
        };
        let reg = CodecRegistry::software();
        Pipeline::new(
            vec![f.target.clone()],
            reg,
            fetch,
            save.clone(),
            Metrics::new(),
        )
        .unwrap()
    };
    let observer = StoreClient::connect(f.target.addr, f.target.tls.clone())
        .await
        .unwrap();
    let open_connections = || async { observer.stats().await.unwrap().connections };
    assert_eq!(open_connections().await, 1);
    let shape = shape_of(&f.cache);
    let (layout, data) = client_bytes(&f.cache);

    // Lookups take whichever connection is open: repeated ones open no more than one.
    let saver = pipeline(3);
    for _ in 0..3 {
        assert_eq!(saver.lookup(MODEL, &f.ids).await.unwrap(), 0);
    }
    assert_eq!(open_connections().await, 2);
    // The three chunk puts go round robin over all three connections.
    let stored = saver
        .save(MODEL, &f.ids, &layout, &shape, &data, false)
        .await
        .unwrap();
    assert_eq!(stored, 3);
    assert_eq!(open_connections().await, 4);

    // A fresh pipeline's fetch alone opens its three connections, and gets the data right:
    // a one-connection pipeline fetches the same bytes.
    let ids: &[u32] = &f.ids;
    let fetch_into = |p: Pipeline| async move {
        let dest = MemDest::new(layout);
        let out = p
            .fetch(MODEL, ids, &layout, dest.clone(), FetchEvents::ignored())
            .await
            .unwrap();
        assert_eq!(out.tokens, TOKENS as u32);
        let bytes = dest.buf.lock().unwrap().clone();
        (p, bytes)
    };
    let (three, got3) = fetch_into(pipeline(3)).await;
    assert_eq!(open_connections().await, 7);
    let (one, got1) = fetch_into(pipeline(1)).await;
    assert_eq!(open_connections().await, 8);
    assert_eq!(got3.len(), data.len());
    assert!(
        got3 == got1,
        "three connections fetched other bytes than one"
    );
    // 8-bit quantization keeps every value close: the fetch restored the cache, not zeros.
    let nonzero = got3.iter().filter(|&&b| b != 0).count();
    assert!(nonzero > got3.len() / 4, "{nonzero} nonzero bytes");
    drop((saver, three, one));
}

/// Store requests a fetch makes and bytes the store sends for it, measured with an observer
/// connection (whose own stats request is counted once per call).
async fn fetch_cost(f: &Fixture, pipeline: &Pipeline, layout: TargetLayout) -> (u64, u64, u64) {
    let observer = StoreClient::connect(f.target.addr, f.target.tls.clone())
        .await
        .unwrap();
    let a = observer.stats().await.unwrap();
    let b = observer.stats().await.unwrap();
    let per_stats = b.requests - a.requests;
    let dest = MemDest::new(layout);
    let out = pipeline
        .fetch(MODEL, &f.ids, &layout, dest.clone(), FetchEvents::ignored())
        .await
        .unwrap();
    let c = observer.stats().await.unwrap();
    assert_eq!(out.tokens, TOKENS as u32);
    let save = save_config(8, "packed");
    assert_matches(
        &dest.buf.lock().unwrap(),
        &layout,
        &expected(&f.cache, &f.ids, &save),
    );
    (
        c.requests - b.requests - per_stats,
        c.bytes_out - b.bytes_out,
        out.bytes_on_wire,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_per_header_and_section_and_no_lookup() {
    let save = save_config(8, "packed");
    let Some(f) = fixture(save.clone(), FetchConfig::default()).await else {
        return;
    };
    let shape = shape_of(&f.cache);
    let (layout, stored) = f.save_all().await;
    assert_eq!(stored, 3);
    let groups = shape.num_layers.div_ceil(save.layers_per_group) as u64;
    let objects = StoreClient::connect(f.target.addr, f.target.tls.clone())
        .await
        .unwrap()
        .stats()
        .await
        .unwrap()
        .bytes;

    // No lookup round: one request per header (carrying the chunk's first section) and one per
    // other section, and every stored byte sent once (and counted as received).
    let (requests, sent, wire) = fetch_cost(&f, &f.pipeline, layout).await;
    assert_eq!(
        requests,
        3 * groups,
        "one request per header with its first section, one per other section"
    );
    assert_eq!(sent, objects, "each header and section sent once");
    assert_eq!(
        wire, objects,
        "bytes on the wire count headers and sections"
    );

    // A byte budget too small for two sections: at most one first section is received early
    // (whichever header arrives first takes the budget; kept only if it is the first chunk's);
    // the other header streams are dropped, each chunk's first section is asked for again at
    // most once, in the planner's order, and the fetch completes.
    let tight = Pipeline::new(
        vec![f.target.clone()],
        CodecRegistry::software(),
        FetchConfig {
            max_inflight_bytes: 4096,
            ..FetchConfig::default()
        },
        save.clone(),
        Metrics::new(),
    )
    .unwrap();
    let (requests, _, wire) = fetch_cost(&f, &tight, layout).await;
    assert!(
        (3 * groups..=3 * groups + 3).contains(&requests),
        "{requests} requests for 3 headers and {} sections",
        3 * groups
    );
    assert_eq!(
        wire, objects,
        "a dropped first section is not counted twice"
    );
}

/// A destination whose first write waits until the test opens its gate: the fetch's one
/// decode worker is held there while the other sections arrive and queue.
struct GatedDest {
    inner: Arc<MemDest>,
    entered: std::sync::atomic::AtomicBool,
    open: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl GatedDest {
    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl Destination for GatedDest {
    fn allocate(&self, shape: &KvShape) -> Result<(), BufferError> {
        self.inner.allocate(shape)
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), BufferError> {
        if !self.entered.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
        self.inner.write(offset, bytes)
    }

    fn layers_written(&self, layers: Range<u32>) {
        self.inner.layers_written(layers)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_fetch_leaves_its_queued_sections_undecoded() {
    let save = save_config(8, "zstd");
    // One decode worker and a window as large as the fetch: sections queue behind the held one.
    let fetch = FetchConfig {
        max_inflight_sections: 256,
        decode_workers: 1,
        ..FetchConfig::default()
    };
    let Some(f) = fixture(save.clone(), fetch).await else {
        return;
    };
    let (layout, _) = f.save_all().await;
    let m = f.pipeline.metrics().clone();
    let dest = Arc::new(GatedDest {
        inner: MemDest::new(layout),
        entered: Default::default(),
        open: Mutex::new(false),
        opened: Default::default(),
    });
    let task = tokio::spawn({
        let (p, ids, dest) = (f.pipeline.clone(), f.ids.clone(), dest.clone());
        async move {
            p.fetch(MODEL, &ids, &layout, dest, FetchEvents::ignored())
                .await
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !dest.entered.load(std::sync::atomic::Ordering::SeqCst) || m.sections_in_flight.get() < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the fetch never queued sections"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Let the rest arrive and queue, then drop the fetch (a client gone) and free the worker.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    dest.open_gate();
    while m.decoders_busy.get() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the held section never finished"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // Only the section already on the worker ran; the queued ones were skipped.
    assert_eq!(m.sections_restored.get(), 1);
    assert_eq!(m.sections_in_flight.get(), 0);
    // The pipeline is whole: the next fetch restores every section.
    let dest = MemDest::new(layout);
    let out = f
        .pipeline
        .fetch(MODEL, &f.ids, &layout, dest.clone(), FetchEvents::ignored())
        .await
        .unwrap();
    assert_eq!(out.tokens, TOKENS as u32);
    assert_matches(
        &dest.buf.lock().unwrap(),
        &layout,
        &expected(&f.cache, &f.ids, &save),
    );
    assert!(
        m.sections_restored.get() > 3,
        "{}",
        m.sections_restored.get()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_take_the_configured_hevc_layout() {
    if let Err(e) = kvfetcher_codec::HevcEncoder::new(None).and(kvfetcher_codec::HevcDecoder::new())
    {
        skip(Missing::Tool, format!("no x265 / libde265 here ({e})"));
        return;
    }
    let save = SaveConfig {
        hevc_layout: Some("rows".into()),
        ..save_config(8, "hevc")
    };
    let Some(f) = fixture(save.clone(), FetchConfig::default()).await else {
        return;
    };
    let pipeline = Pipeline::new(
        vec![f.target.clone()],
        CodecRegistry::standard(),
        FetchConfig::default(),
        save.clone(),
        Metrics::new(),
    )
    .unwrap();
    let (layout, data) = client_bytes(&f.cache);
    let shape = shape_of(&f.cache);
    assert_eq!(
        pipeline
            .save(MODEL, &f.ids, &layout, &shape, &data, false)
            .await
            .unwrap(),
        3
    );
    // Every stored section is laid out as configured, not in the codec's default.
    let client = StoreClient::connect(f.target.addr, f.target.tls.clone())
        .await
        .unwrap();
    let fp = ModelFingerprint::of_bytes(MODEL.as_bytes());
    for key in chunk_keys(&fp, &f.ids, save.chunk_tokens as usize) {
        let object = client.get(&key).await.unwrap();
        let (header, _) = ChunkHeader::parse_prefix(&object).unwrap();
        assert_eq!(header.variant, VariantKind::Hevc);
        for s in &header.sections {
            let g = HevcParams::from_bytes(&s.params).unwrap().geometry;
            assert_eq!((g.layout, g.chroma), (HevcLayout::Rows, Chroma::Yuv444));
        }
    }
    // And they fetch back to the quantized values.
    let dest = MemDest::new(layout);
    pipeline
        .fetch(MODEL, &f.ids, &layout, dest.clone(), FetchEvents::ignored())
        .await
        .unwrap();
    assert_matches(
        &dest.buf.lock().unwrap(),
        &layout,
        &expected(&f.cache, &f.ids, &save),
    );
}

/// Every stored object of a `LocalDir` under `data`, by path.
fn stored_objects(data: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(data.join("objects")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            out.push((p, b));
        }
    }
    out.sort();
    out
}

/// Stored chunks are write-once (issue 18 item 5a): saving a stored prefix again, even with
/// other values (all 1.0, as a poisoning client would), succeeds and keeps the stored chunks;
/// a save with `replace` overwrites them.
#[tokio::test]
async fn saving_a_stored_prefix_again_keeps_the_stored_chunks() {
    let Some(f) = fixture(save_config(8, "zstd"), FetchConfig::default()).await else {
        return;
    };
    let (layout, stored) = f.save_all().await;
    let data = f._dir.path().join("data");
    let before = stored_objects(&data);
    assert_eq!(before.len(), stored as usize);
    let (_, bytes) = client_bytes(&f.cache);
    let ones: Vec<u8> = bytes
        .chunks_exact(2)
        .flat_map(|_| half::f16::from_f32(1.0).to_le_bytes())
        .collect();
    let shape = shape_of(&f.cache);
    let again = f
        .pipeline
        .save(MODEL, &f.ids, &layout, &shape, &ones, false)
        .await
        .unwrap();
    assert_eq!(again, stored, "already stored counts as stored");
    assert!(stored_objects(&data) == before, "stored chunks rewritten");
    f.pipeline
        .save(MODEL, &f.ids, &layout, &shape, &ones, true)
        .await
        .unwrap();
    let after = stored_objects(&data);
    assert_eq!(after.len(), before.len());
    assert!(after != before, "replace overwrites");
}

/// A codec profile for MODEL fitted on codelm tokens the fixture does not save.
fn codelm_profile() -> Arc<CodecProfile> {
    let path = kvfetcher_testkit::data_file("codelm-kv-a.safetensors");
    let cal = KvFile::read(&path)
        .unwrap()
        .cache
        .slice_tokens(600, 1024)
        .unwrap();
    let cfg = Calibration {
        rope: Rope {
            style: RopeStyle::Halves,
            dims: cal.head_dim() as u16,
            base: 10000.0,
            freq_scale: 1.0,
        },
        sinks: 4,
        basis: BasisKind::Pca,
    };
    let mut p = calibrate(ModelFingerprint::of_bytes(MODEL.as_bytes()), &[cal], &cfg).unwrap();
    for (i, l) in p.layers.iter_mut().enumerate() {
        l.key.sensitivity = 0.01 * (1 + i % 3) as f32;
        l.value.sensitivity = 0.05;
    }
    Arc::new(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rans_saves_share_their_profile_through_the_store() {
    let profile = codelm_profile();
    let save = SaveConfig {
        target_kl: 0.02,
        ..save_config(8, "rans")
    };
    let registry = CodecRegistry::software().with_profile(profile.clone());
    let Some(f) = fixture_with(save.clone(), FetchConfig::default(), registry).await else {
        return;
    };
    let (client_layout, stored) = f.save_all().await;
    assert_eq!(stored, 3);
    // What the fetch must return: the pipeline's own transform coding, decoded on the CPU.
    let steps = allocate_steps(&profile, save.target_kl).unwrap().steps;
    let cfg = EncodeConfig {
        quant: QuantConfig::Transform(Arc::new(TransformConfig {
            profile: profile.clone(),
            steps,
        })),
        variant: VariantKind::Rans,
        hevc_layout: None,
        hevc_stream_frames: None,
        chunk_tokens: 256,
        layers_per_section: 2,
    };
    let reg = CodecRegistry::software().with_profile(profile.clone());
    let fp = ModelFingerprint::of_bytes(MODEL.as_bytes());
    let objects = encode_cache(&f.cache, &fp, &f.ids, &cfg, &reg).unwrap();
    assert!(objects.iter().all(|(_, b)| b[4] == 2), "format version 2");
    let parts: Vec<KvCache> = objects
        .iter()
        .map(|(_, b)| decode_chunk(b, &reg).unwrap())
        .collect();
    let want = KvCache::concat_tokens(&parts).unwrap();
    let dest = MemDest::new(client_layout);
    let out = f
        .pipeline
        .fetch(
            MODEL,
            &f.ids,
            &client_layout,
            dest.clone(),
            FetchEvents::ignored(),
        )
        .await
        .unwrap();
    assert_eq!(out.tokens, TOKENS as u32);
    assert_matches(&dest.buf.lock().unwrap(), &client_layout, &want);
    // Far smaller than 8-bit zstd would be, on the wire.
    let raw16 = (f.cache.nbytes()) as u64;
    assert!(
        out.bytes_on_wire * 3 < raw16,
        "{} of {raw16}",
        out.bytes_on_wire
    );

    // The save put the profile in the store once, under its profile key, as it is.
    let id = profile.id();
    let store = StoreClient::connect(f.target.addr, f.target.tls.clone())
        .await
        .unwrap();
    let stored_profile = store.get_profile(&id, u64::MAX).await.unwrap();
    assert_eq!(stored_profile, profile.to_bytes());
    let data = f._dir.path().join("data");
    let profile_file = LocalDir::open(&data).unwrap().object_path(&id.object_key());
    assert!(profile_file.exists());
    // Saving again puts the 3 chunks (answered `Exists`) and not the profile: 4 requests with
    // the first `Stats` (the store counts a request once it is answered).
    let before = store.stats().await.unwrap().requests;
    f.save_all().await;
    let after = store.stats().await.unwrap().requests;
    assert_eq!(after - before, 4, "the profile is put once per daemon run");

    // Node B has no profile_dir: it fetches the profile from the store, caches it, and restores
    // the same values as node A.
    let cache = tempfile::tempdir().unwrap();
    let codec = CodecConfig {
        profile_cache_dir: Some(cache.path().join("profiles")),
        ..CodecConfig::default()
    };
    let node_b = || {
        Pipeline::new(
            vec![f.target.clone()],
            CodecRegistry::software(),
            FetchConfig::default(),
            save_config(8, "zstd"),
            Metrics::new(),
        )
        .unwrap()
    };
    let b = node_b().with_codec_config(&codec).unwrap();
    let dest = MemDest::new(client_layout);
    let out = b
        .fetch(
            MODEL,
            &f.ids,
            &client_layout,
            dest.clone(),
            FetchEvents::ignored(),
        )
        .await
        .unwrap();
    assert_eq!(out.tokens, TOKENS as u32);
    assert_matches(&dest.buf.lock().unwrap(), &client_layout, &want);
    let cached = cache.path().join("profiles").join(format!("{id}.kvfp"));
    assert_eq!(std::fs::read(&cached).unwrap(), profile.to_bytes());

    // The profile is gone from the store: a restarted node B restores from its disk cache; a
    // node without the cache fails with an error naming the profile, before any allocation.
    assert!(store.delete(&id.object_key()).await.unwrap());
    let b = node_b().with_codec_config(&codec).unwrap();
    let dest = MemDest::new(client_layout);
    b.fetch(
        MODEL,
        &f.ids,
        &client_layout,
        dest.clone(),
        FetchEvents::ignored(),
    )
    .await
    .unwrap();
    assert_matches(&dest.buf.lock().unwrap(), &client_layout, &want);
    let dest = MemDest::new(client_layout);
    let err = node_b()
        .fetch(
            MODEL,
            &f.ids,
            &client_layout,
            dest.clone(),
            FetchEvents::ignored(),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("neither loaded nor in the store"),
        "{err}"
    );
    assert!(err.to_string().contains(&id.to_hex()), "{err}");
    assert!(dest.shape.lock().unwrap().is_none(), "nothing allocated");

    // A profile object changed in the store (a bit flipped on disk): the store refuses it as
    // corrupt, the fetch fails with that, and nothing is allocated or written.
    let mut bad = profile.to_bytes();
    bad[100] ^= 0x04;
    std::fs::write(&profile_file, &bad).unwrap();
    let dest = MemDest::new(client_layout);
    let err = node_b()
        .fetch(
            MODEL,
            &f.ids,
            &client_layout,
            dest.clone(),
            FetchEvents::ignored(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ServeError::Corrupt(m) if m.contains("codec profile")),
        "{err:?}"
    );
    assert!(dest.shape.lock().unwrap().is_none(), "nothing allocated");
    // Nor can such bytes be put under the profile's key.
    std::fs::remove_file(&profile_file).unwrap();
    let refused = store
        .put_raw(id.object_key(), bad.into())
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("hashes to"), "{refused}");
    // The chunks were not quarantined: with the profile back, the fetch works.
    assert!(store.put_profile(profile.to_bytes().into()).await.unwrap());
    let dest = MemDest::new(client_layout);
    node_b()
        .fetch(
            MODEL,
            &f.ids,
            &client_layout,
            dest.clone(),
            FetchEvents::ignored(),
        )
        .await
        .unwrap();
    assert_matches(&dest.buf.lock().unwrap(), &client_layout, &want);

    // A model without a profile is saved as zstd (at save.bits), not refused.
    let (layout, data) = client_bytes(&f.cache);
    let stored = f
        .pipeline
        .save(
            "model-without-profile",
            &f.ids,
            &layout,
            &shape_of(&f.cache),
            &data,
            false,
        )
        .await
        .unwrap();
    assert_eq!(stored, 3);
}
