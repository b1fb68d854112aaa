//! GPU fetches end to end (self-skipping without a CUDA driver): real KV saved through the
//! pipeline into an in-process QUIC store with the packed, zstd and hevc variants (and a chunk
//! with K per-channel, V per-token), fetched into device memory and compared byte for byte with
//! the same fetch into host memory, for several layouts; and the server's GPU buffer protocol
//! (GpuIpc handles, one event per layer, readiness, release) on a raw socket.
//!
//! The daemon cannot IPC-open its own handles, so the pipeline part uses a test destination
//! that owns a `DeviceBuffer` and reads it back; the cross-process check is the C example's.
//! Run on a GPU host with `cargo test -p kvfetcher --test gpu_fetch -- --nocapture`, or run
//! its binary from any directory (scripts/gpu-prep.sh --tests carries it): the KV is found at
//! run time in the checkout's `data/` above the binary (`kvfetcher_testkit::data_file`; or in
//! `KVF_DATA_DIR`), not at a path baked in at build time. `KVF_GPU_TEST_KV` names another
//! safetensors KV file.

mod server_support;

use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use kvfetcher::config::{FetchConfig, SaveConfig};
use kvfetcher::gpu::{
    CodecHevcLayout, DeviceBuffer, GpuDevice, GpuDevices, GpuOptions, NvdecHevcDecoder,
};
use kvfetcher::pipeline::{Pipeline, StoreTarget};
use kvfetcher::server::{Backend, FetchEvents, ServeOptions};
use kvfetcher::store::{CommitMode, LocalDir, ServerOptions, Storage as _, StoreServer};
use kvfetcher::transport::{write_dev_pki, ClientOptions, TlsClientConfig, TlsServerConfig};
use kvfetcher::Metrics;
use kvfetcher::{BufferError, Destination, DeviceRegion};
use kvfetcher_codec::{
    encode_cache, ChunkKey, ChunkView, CodecRegistry, EncodeConfig, FormatError, Grouping,
    ModelFingerprint, QuantConfig, VariantKind,
};
use kvfetcher_kv::{KvCache, KvFile};
use kvfetcher_protocol::{
    encode_hello, encode_message, parse_hello, BufferMemory, Fetch, FrameDecoder, Message, Release,
    Reopen, DEFAULT_MAX_FRAME, HELLO_LEN, HELLO_OK, PROTOCOL_VERSION,
};
use kvfetcher_protocol::{DType, KvShape, MemoryKind, Paging, TargetLayout, TokenOrder};
use kvfetcher_testkit::{skip, Missing};
use server_support::{eventually, Kv, MemBackend, TestServer, MODEL};

/// Device 0, or `None` (printed) on a host without a driver or GPU.
fn device() -> Option<Arc<GpuDevice>> {
    let gpus = GpuDevices::new(GpuOptions::default(), Metrics::new());
    match gpus.device(0) {
        Ok(d) => Some(d),
        Err(e) => {
            skip(Missing::Gpu, format!("no CUDA driver or device ({e})"));
            None
        }
    }
}

fn real_cache() -> KvCache {
    let path = std::env::var_os("KVF_GPU_TEST_KV")
        .map(PathBuf::from)
        .unwrap_or_else(|| kvfetcher_testkit::data_file("minilm-kv.safetensors"));
    let c = KvFile::read(&path).expect("read kv").cache;
    let tokens = c.tokens().min(300);
    c.slice_tokens(0, tokens).expect("slice")
}

/// A fetch buffer in device memory owned by the test, read back after the fetch.
struct GpuDest {
    dev: Arc<GpuDevice>,
    layout: TargetLayout,
    buf: OnceLock<DeviceBuffer>,
    ready: Mutex<Vec<Range<u32>>>,
}

impl Destination for GpuDest {
    fn allocate(&self, shape: &KvShape) -> Result<(), BufferError> {
        let b = self
            .dev
            .cuda()
            .alloc(self.layout.buffer_len(shape))
            .map_err(|e| BufferError::Internal(e.to_string()))?;
        b.fill(0)
            .map_err(|e| BufferError::Internal(e.to_string()))?;
        self.buf
            .set(b)
            .map_err(|_| BufferError::Internal("allocated twice".into()))
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), BufferError> {
        let b = self.buf.get().expect("allocated");
        b.write_at(offset, bytes)
            .map_err(|e| BufferError::Invalid(e.to_string()))
    }

    fn layers_written(&self, layers: Range<u32>) {
        self.ready.lock().unwrap().push(layers);
    }

    fn device(&self) -> Option<DeviceRegion<'_>> {
        Some(DeviceRegion {
            device: &self.dev,
            buffer: self.buf.get()?,
        })
    }
}

/// A host buffer, as the server's memfd.
#[derive(Default)]
struct HostDest {
    buf: Mutex<Vec<u8>>,
    layout: Mutex<Option<TargetLayout>>,
}

impl Destination for HostDest {
    fn allocate(&self, shape: &KvShape) -> Result<(), BufferError> {
        let l = self.layout.lock().unwrap().expect("layout");
        *self.buf.lock().unwrap() = vec![0u8; l.buffer_len(shape)];
        Ok(())
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), BufferError> {
        self.buf.lock().unwrap()[offset..offset + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn layers_written(&self, _: Range<u32>) {}
}

struct Store {
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
    local: Arc<LocalDir>,
    target: StoreTarget,
}

async fn store() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    write_dev_pki(&certs).unwrap();
    let tls = TlsServerConfig::from_dir(&certs).unwrap();
    let local = Arc::new(LocalDir::open(&dir.path().join("data")).unwrap());
    let server = StoreServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        &tls,
        local.clone(),
        ServerOptions::default(),
    )
    .unwrap();
    let target = StoreTarget {
        addr: server.local_addr(),
        tls: TlsClientConfig::from_path(&certs).unwrap(),
        options: ClientOptions::default(),
    };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Store {
        _dir: dir,
        _stop: stop,
        local,
        target,
    }
}

fn save_config(variant: &str) -> SaveConfig {
    SaveConfig {
        variant: variant.into(),
        bits: 8,
        chunk_tokens: 128,
        layers_per_group: 2,
        hevc_stream_frames: 0,
        hevc_layout: None,
        workers: 2,
        ..SaveConfig::default()
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

fn client_dtype(c: &KvCache) -> DType {
    match c.dtype() {
        kvfetcher_kv::DType::F16 => DType::F16,
        kvfetcher_kv::DType::BF16 => DType::BF16,
        _ => DType::F32,
    }
}

/// The cache as a client hands it over: its own dtype, NHD contiguous.
fn client_bytes(c: &KvCache) -> (TargetLayout, Vec<u8>) {
    let mut out = Vec::new();
    for l in c.layers() {
        out.extend_from_slice(l.key.data());
        out.extend_from_slice(l.value.data());
    }
    (TargetLayout::host(client_dtype(c), TokenOrder::Nhd), out)
}

fn layouts() -> Vec<TargetLayout> {
    [
        (DType::BF16, TokenOrder::Nhd, Paging::Contiguous),
        (
            DType::BF16,
            TokenOrder::Hnd,
            Paging::Paged { block_tokens: 16 },
        ),
        (
            DType::F16,
            TokenOrder::Nhd,
            Paging::Paged { block_tokens: 100 },
        ),
        (DType::F32, TokenOrder::Hnd, Paging::Contiguous),
    ]
    .into_iter()
    .map(|(dtype, order, paging)| TargetLayout {
        dtype,
        order,
        paging,
        memory: MemoryKind::Gpu(0),
    })
    .collect()
}

/// Fetches `ids` into host memory and into device memory for every layout and compares.
async fn compare_host_and_gpu(p: &Pipeline, dev: &Arc<GpuDevice>, ids: &[u32], label: &str) {
    for layout in layouts() {
        let host_layout = TargetLayout {
            memory: MemoryKind::Host,
            ..layout
        };
        let host = Arc::new(HostDest::default());
        *host.layout.lock().unwrap() = Some(host_layout);
        let h = p
            .fetch(
                MODEL,
                ids,
                &host_layout,
                host.clone(),
                FetchEvents::ignored(),
            )
            .await
            .unwrap();
        let gpu = Arc::new(GpuDest {
            dev: dev.clone(),
            layout,
            buf: OnceLock::new(),
            ready: Mutex::new(Vec::new()),
        });
        let g = p
            .fetch(MODEL, ids, &layout, gpu.clone(), FetchEvents::ignored())
            .await
            .unwrap();
        assert_eq!(h.tokens, g.tokens, "{label} {layout:?}");
        dev.cuda().synchronize().unwrap();
        let buf = gpu.buf.get().unwrap();
        let mut got = vec![0u8; buf.len()];
        buf.read_at(0, &mut got).unwrap();
        let want = host.buf.lock().unwrap().clone();
        assert_eq!(got.len(), want.len(), "{label} {layout:?}");
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!(
                "{label} {layout:?}: byte {i} gpu {} host {}",
                got[i], want[i]
            );
        }
        let mut ready = gpu.ready.lock().unwrap().clone();
        ready.sort_by_key(|r| r.start);
        let layers: Vec<u32> = ready.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(layers.len(), layers.last().map_or(0, |l| *l as usize + 1));
        println!("{label} {layout:?}: {} bytes identical", got.len());
    }
    let c = &p.metrics().gpu_sections;
    println!(
        "{label}: sections packed {} nvdec {} cpu-decode {} cpu-restore {}",
        c.packed.get(),
        c.nvdec.get(),
        c.cpu_decode.get(),
        c.cpu_restore.get()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_fetches_equal_host_fetches_for_every_variant() {
    let Some(dev) = device() else { return };
    let cache = real_cache();
    println!(
        "kv: {:?} {:?} on {:?}",
        shape_of(&cache),
        cache.dtype(),
        dev
    );
    let ids = test_ids(&cache);
    // The chunk's own dtype, and f32 (so every target dtype takes the kernels, not only the
    // chunk's: the CPU path rounds twice otherwise and the daemon restores those on the CPU).
    let f32_cache = cache.to_dtype(kvfetcher_kv::DType::F32);
    for (variant, source) in [
        ("packed", &cache),
        ("zstd", &cache),
        ("packed-f32", &f32_cache),
        ("zstd-f32", &f32_cache),
    ] {
        let (client_layout, data) = client_bytes(source);
        let s = store().await;
        let p = Pipeline::new(
            vec![s.target.clone()],
            CodecRegistry::default(),
            FetchConfig::default(),
            save_config(variant.trim_end_matches("-f32")),
            Metrics::new(),
        )
        .unwrap();
        if let Err(e) = p
            .save(MODEL, &ids, &client_layout, &shape_of(&cache), &data, false)
            .await
        {
            skip(Missing::Tool, format!("{variant}: save failed ({e})"));
            continue;
        }
        compare_host_and_gpu(&p, &dev, &ids, variant).await;
        let c = &p.metrics().gpu_sections;
        match variant {
            "packed" => assert!(c.packed.get() > 0),
            "zstd" => assert!(c.cpu_decode.get() > 0),
            "packed-f32" => assert!(c.packed.get() > 0 && c.cpu_restore.get() == 0),
            _ => assert!(c.cpu_decode.get() > 0 && c.cpu_restore.get() == 0),
        }
    }

    // HEVC: encoded here when libx265 loads, else read from KVF_GPU_TEST_HEVC_DIR (GPU hosts
    // often lack x265); decoded by NVDEC for the host fetch too when libde265 is missing.
    match hevc_objects(&cache, &ids) {
        Some(objects) => {
            let s = store().await;
            put_all(&s, objects).await;
            let registry = match NvdecHevcDecoder::new(dev.cuda().clone(), CodecHevcLayout, None) {
                Ok(d) => CodecRegistry::software().with_decoder(VariantKind::Hevc, Arc::new(d)),
                Err(_) => CodecRegistry::default(),
            };
            let p = Pipeline::new(
                vec![s.target.clone()],
                registry,
                FetchConfig::default(),
                save_config("zstd"),
                Metrics::new(),
            )
            .unwrap();
            compare_host_and_gpu(&p, &dev, &ids, "hevc").await;
            // Every section, one stream or several, went through NVDEC when the card has it.
            let c = &p.metrics().gpu_sections;
            if dev.nvdec_sessions() > 0 {
                assert!(c.nvdec.get() > 0 && c.cpu_decode.get() == 0, "hevc routes");
            }
        }
        None => println!("skipped hevc: no encoder and no KVF_GPU_TEST_HEVC_DIR"),
    }

    // K per channel, V per token: encoded here and put straight into the store.
    let s = store().await;
    let p = Pipeline::new(
        vec![s.target.clone()],
        CodecRegistry::default(),
        FetchConfig::default(),
        save_config("zstd"),
        Metrics::new(),
    )
    .unwrap();
    let cfg = EncodeConfig {
        quant: QuantConfig::Bits {
            default_bits: 6,
            per_layer: Vec::new(),
            key_grouping: Grouping::PerChannel,
            value_grouping: Grouping::PerToken,
        },
        variant: VariantKind::Packed,
        hevc_layout: None,
        hevc_stream_frames: None,
        chunk_tokens: 128,
        layers_per_section: 2,
    };
    let fp = ModelFingerprint::of_bytes(MODEL.as_bytes());
    let objects = encode_cache(&cache, &fp, &ids, &cfg, &CodecRegistry::software()).unwrap();
    put_all(&s, objects).await;
    compare_host_and_gpu(&p, &dev, &ids, "mixed-grouping packed").await;
}

fn test_ids(cache: &KvCache) -> Vec<u32> {
    (0..cache.tokens() as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 32_000)
        .collect()
}

async fn put_all(s: &Store, objects: Vec<(ChunkKey, Vec<u8>)>) {
    let fp = ModelFingerprint::of_bytes(MODEL.as_bytes());
    for (key, bytes) in objects {
        let mut w = s.local.begin_put(&key).await.unwrap();
        w.write(Bytes::from(bytes)).await.unwrap();
        w.commit(fp, CommitMode::Replace).await.unwrap();
    }
}

/// HEVC chunk objects of the test KV: every other chunk cut into one-frame streams (decoded
/// on several NVDEC sessions at once), the others one stream per section. Fails without libx265.
fn encode_hevc(cache: &KvCache, ids: &[u32]) -> Result<Vec<(ChunkKey, Vec<u8>)>, FormatError> {
    let fp = ModelFingerprint::of_bytes(MODEL.as_bytes());
    let encode = |stream_frames| {
        let cfg = EncodeConfig {
            quant: QuantConfig::bits(8),
            variant: VariantKind::Hevc,
            hevc_layout: None,
            hevc_stream_frames: stream_frames,
            chunk_tokens: 128,
            layers_per_section: 2,
        };
        encode_cache(cache, &fp, ids, &cfg, &CodecRegistry::standard())
    };
    let (one, cut) = (encode(None)?, encode(Some(1))?);
    Ok(one
        .into_iter()
        .zip(cut)
        .enumerate()
        .map(|(i, (a, b))| if i % 2 == 0 { a } else { b })
        .collect())
}

/// HEVC chunk objects of the test KV: read from `KVF_GPU_TEST_HEVC_DIR`, else encoded here.
fn hevc_objects(cache: &KvCache, ids: &[u32]) -> Option<Vec<(ChunkKey, Vec<u8>)>> {
    if let Some(dir) = std::env::var_os("KVF_GPU_TEST_HEVC_DIR") {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(e.unwrap().path()).unwrap();
            let key = ChunkView::parse(&bytes).unwrap().header().key;
            v.push((key, bytes));
        }
        return Some(v);
    }
    encode_hevc(cache, ids).ok()
}

/// Writes the HEVC objects [`hevc_objects`] reads into `KVF_GPU_TEST_WRITE_HEVC` (on a host
/// with libx265, for a GPU host without it). Does nothing unless that variable is set.
#[test]
fn write_hevc_objects_for_a_gpu_host() {
    let Some(dir) = std::env::var_os("KVF_GPU_TEST_WRITE_HEVC") else {
        println!("skipped: KVF_GPU_TEST_WRITE_HEVC not set");
        return;
    };
    let cache = real_cache();
    let objects = encode_hevc(&cache, &test_ids(&cache)).expect("hevc encode (needs libx265)");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (_, bytes)) in objects.iter().enumerate() {
        std::fs::write(PathBuf::from(&dir).join(format!("chunk-{i}.kvc")), bytes).unwrap();
    }
}

fn hello(path: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&encode_hello(PROTOCOL_VERSION)).unwrap();
    let mut r = [0u8; HELLO_LEN];
    s.read_exact(&mut r).unwrap();
    assert_eq!(parse_hello(&r).unwrap(), (PROTOCOL_VERSION, HELLO_OK));
    s
}

fn next(s: &mut UnixStream, d: &mut FrameDecoder) -> Message {
    loop {
        if let Some((m, _)) = d.poll_message().unwrap() {
            return m;
        }
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "daemon closed the connection");
        d.handle_bytes(&buf[..n]);
    }
}

/// The server side of a GPU fetch on a raw socket: FetchBuffer with a 64-byte memory handle
/// and one 64-byte event handle per layer, LayersReady for every layer, FetchDone; Reopen
/// re-sends the handles; Release frees the fetch.
#[test]
fn gpu_fetch_buffer_carries_ipc_handles_and_per_layer_events() {
    if device().is_none() {
        return;
    }
    let layers = 3;
    let kv = Kv {
        token_ids: (1..=20).collect(),
        heads: 2,
        dim: 8,
        layers: (0..layers)
            .map(|l| {
                let v: Vec<f32> = (0..20 * 16).map(|i| (i + 1000 * l) as f32 * 0.01).collect();
                [v.clone(), v.iter().map(|x| -x).collect()]
            })
            .collect(),
    };
    let gpus = Arc::new(GpuDevices::new(GpuOptions::default(), Metrics::new()));
    let mut backend = MemBackend::new(Some(kv.clone()));
    // Layer 2 waits for a permit: the second fetch below is still running when its client goes.
    backend.gate_from = 2;
    backend.gate.add_permits(1);
    let srv = TestServer::start_gpus(backend, ServeOptions::default(), gpus.clone());
    let bytes = &gpus.metrics().gpu_buffer_bytes;
    let mut s = hello(&srv.path);
    let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let layout = TargetLayout {
        dtype: DType::BF16,
        order: TokenOrder::Hnd,
        paging: Paging::Paged { block_tokens: 16 },
        memory: MemoryKind::Gpu(0),
    };
    let send = |s: &mut UnixStream, m: Message| {
        s.write_all(&encode_message(&m, DEFAULT_MAX_FRAME).unwrap())
            .unwrap()
    };
    send(
        &mut s,
        Message::Fetch(Fetch {
            req: 1,
            model: MODEL.into(),
            token_ids: kv.token_ids.clone(),
            layout,
        }),
    );
    let fetch_id = match next(&mut s, &mut d) {
        Message::FetchBuffer(b) => {
            assert_eq!(b.req, 1);
            assert_eq!(b.shape.num_layers, layers as u32);
            assert_eq!(b.len as usize, layout.buffer_len(&b.shape));
            match &b.memory {
                BufferMemory::GpuIpc {
                    device,
                    mem_handle,
                    event_handles,
                } => {
                    assert_eq!(*device, 0);
                    assert_eq!(mem_handle.len(), 64);
                    assert_eq!(event_handles.len(), layers);
                    assert!(event_handles.iter().all(|h| h.len() == 64));
                }
                other => panic!("host memory for a gpu fetch: {other:?}"),
            }
            b.fetch_id
        }
        other => panic!("expected FetchBuffer, got {other:?}"),
    };
    let mut ready = vec![false; layers];
    loop {
        match next(&mut s, &mut d) {
            Message::LayersReady(r) => {
                assert_eq!(r.fetch_id, fetch_id);
                for l in r.start..r.end {
                    ready[l as usize] = true;
                }
            }
            Message::FetchDone(done) => {
                assert_eq!(done.tokens, 20);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(ready.iter().all(|r| *r), "every layer announced");
    send(&mut s, Message::Reopen(Reopen { req: 2, fetch_id }));
    match next(&mut s, &mut d) {
        Message::FetchBuffer(b) => {
            assert_eq!((b.req, b.fetch_id), (2, fetch_id));
            assert!(matches!(b.memory, BufferMemory::GpuIpc { .. }));
        }
        other => panic!("expected FetchBuffer, got {other:?}"),
    }
    assert_eq!(
        bytes.get() as usize,
        layout.buffer_len(&KvShape {
            num_layers: layers as u32,
            tokens: 20,
            kv_heads: 2,
            head_dim: 8,
        })
    );
    send(&mut s, Message::Release(Release { req: 3, fetch_id }));
    match next(&mut s, &mut d) {
        Message::Released(r) => assert_eq!(r.fetch_id, fetch_id),
        other => panic!("expected Released, got {other:?}"),
    }
    assert!(eventually(|| bytes.get() == 0), "released buffer freed");
    // A client that disconnects mid-fetch leaks nothing either.
    send(
        &mut s,
        Message::Fetch(Fetch {
            req: 4,
            model: MODEL.into(),
            token_ids: kv.token_ids.clone(),
            layout,
        }),
    );
    assert!(matches!(next(&mut s, &mut d), Message::FetchBuffer(_)));
    assert!(bytes.get() > 0);
    drop(s);
    assert!(eventually(|| bytes.get() == 0), "disconnected fetch freed");
}
