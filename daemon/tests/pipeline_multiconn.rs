//! `fetch.connections_per_store`: a pipeline keeps that many QUIC connections to a store and
//! spreads its requests over them, while lookups reuse one, observed through the real store's
//! count of open connections.

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvfetcher::config::{FetchConfig, SaveConfig};
use kvfetcher::metrics::Metrics;
use kvfetcher::pipeline::{Pipeline, StoreTarget};
use kvfetcher::server::{Backend, Destination, ServeError};
use kvfetcher::store::{LocalDir, ServerOptions, StoreServer};
use kvfetcher::transport::{write_dev_pki, StoreClient, TlsClientConfig, TlsServerConfig};
use kvfetcher_client::{KvDType, KvShape, TargetLayout, TokenOrder};
use kvfetcher_codec::CodecRegistry;
use kvfetcher_kv::{KvCache, KvFile};

const MODEL: &str = "codelm-107m";
const TOKENS: usize = 600;

/// A host buffer standing in for the server's memfd.
struct MemDest {
    buf: Mutex<Vec<u8>>,
    layout: TargetLayout,
}

impl Destination for MemDest {
    fn allocate(&self, shape: &KvShape) -> Result<(), ServeError> {
        *self.buf.lock().unwrap() = vec![0u8; self.layout.buffer_len(shape)];
        Ok(())
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), ServeError> {
        let mut buf = self.buf.lock().unwrap();
        let end = offset.checked_add(bytes.len()).filter(|&e| e <= buf.len());
        let end = end.ok_or_else(|| ServeError::BadRequest("write out of bounds".into()))?;
        buf[offset..end].copy_from_slice(bytes);
        Ok(())
    }

    fn layers_ready(&self, _layers: Range<u32>) {}
}

fn real_cache() -> Option<KvCache> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/codelm-kv-a.safetensors");
    if !path.exists() {
        println!("skipped: {} is absent", path.display());
        return None;
    }
    Some(
        KvFile::read(&path)
            .unwrap()
            .cache
            .slice_tokens(0, TOKENS)
            .unwrap(),
    )
}

fn pipeline(target: &StoreTarget, connections: usize) -> Pipeline {
    let fetch = FetchConfig {
        connections_per_store: connections,
        ..FetchConfig::default()
    };
    let save = SaveConfig {
        variant: "zstd".into(),
        bits: 8,
        chunk_tokens: 256,
        layers_per_group: 2,
        workers: 1,
    };
    Pipeline::new(
        vec![target.clone()],
        CodecRegistry::software(),
        fetch,
        save,
        Metrics::new(),
    )
    .unwrap()
}

/// Connections the store has open now (the observer's own included).
async fn open_connections(observer: &StoreClient) -> u64 {
    observer.stats().await.unwrap().connections
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_connections_per_store() {
    let Some(cache) = real_cache() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    write_dev_pki(&certs).unwrap();
    let server = StoreServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        &TlsServerConfig::from_dir(&certs).unwrap(),
        Arc::new(LocalDir::open(&dir.path().join("data")).unwrap()),
        ServerOptions::default(),
    )
    .unwrap();
    let target = StoreTarget {
        addr: server.local_addr(),
        tls: TlsClientConfig::from_path(&certs).unwrap(),
    };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    let observer = StoreClient::connect(target.addr, target.tls.clone())
        .await
        .unwrap();
    assert_eq!(open_connections(&observer).await, 1);

    let ids: Vec<u32> = (0..TOKENS as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 32_000)
        .collect();
    let shape = KvShape {
        num_layers: cache.num_layers() as u32,
        tokens: cache.tokens() as u32,
        kv_heads: cache.kv_heads() as u32,
        head_dim: cache.head_dim() as u32,
    };
    let layout = TargetLayout::host(KvDType::F16, TokenOrder::Nhd);
    let mut data = Vec::new();
    for l in cache.layers() {
        data.extend_from_slice(l.key.data());
        data.extend_from_slice(l.value.data());
    }

    // Lookups take whichever connection is open: repeated ones open no more than one.
    let saver = pipeline(&target, 3);
    for _ in 0..3 {
        assert_eq!(saver.lookup(MODEL, &ids).await.unwrap(), 0);
    }
    assert_eq!(open_connections(&observer).await, 2);
    // The three chunk puts go round robin over all three connections.
    let stored = saver
        .save(MODEL, &ids, &layout, &shape, &data)
        .await
        .unwrap();
    assert_eq!(stored, 3);
    assert_eq!(open_connections(&observer).await, 4);

    // A fresh pipeline's fetch alone opens its three connections, and gets the data right:
    // a one-connection pipeline fetches the same bytes.
    let fetch_into = |p: Pipeline| {
        let ids = ids.clone();
        async move {
            let dest = Arc::new(MemDest {
                buf: Mutex::new(Vec::new()),
                layout,
            });
            let out = p.fetch(MODEL, &ids, &layout, dest.clone()).await.unwrap();
            assert_eq!(out.tokens, TOKENS as u32);
            let bytes = dest.buf.lock().unwrap().clone();
            (p, bytes)
        }
    };
    let (three, got3) = fetch_into(pipeline(&target, 3)).await;
    assert_eq!(open_connections(&observer).await, 7);
    let (one, got1) = fetch_into(pipeline(&target, 1)).await;
    assert_eq!(open_connections(&observer).await, 8);
    assert_eq!(got3.len(), data.len());
    assert!(
        got3 == got1,
        "three connections fetched other bytes than one"
    );
    // 8-bit quantization keeps every value close: the fetch restored the cache, not zeros.
    let nonzero = got3.iter().filter(|&&b| b != 0).count();
    assert!(nonzero > got3.len() / 4, "{nonzero} nonzero bytes");

    drop((saver, three, one));
    let _ = stop.send(());
    served.await.unwrap();
}
