//! A fetch trusts a chunk object only as far as it is the chunk asked for: objects whose
//! header names another chunk, model or token range are refused before anything is sized from
//! them. The objects are small synthetic ones, forged with the codec and stored through the
//! store's own client (the store checks checksums and the key, not what the chunk holds).

mod store_util;

use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kvfetcher::config::{FetchConfig, SaveConfig};
use kvfetcher::pipeline::{Pipeline, StoreTarget};
use kvfetcher::server::{Backend, FetchEvents, ServeError};
use kvfetcher::store::ServerOptions;
use kvfetcher::transport::{ClientOptions, StoreClient};
use kvfetcher::Metrics;
use kvfetcher::{BufferError, Destination};
use kvfetcher_codec::{
    encode_cache, ChunkHeader, ChunkKey, ChunkView, CodecRegistry, EncodeConfig, ModelFingerprint,
};
use kvfetcher_kv::{DType, KvCache, LayerKv, Tensor};
use kvfetcher_protocol::{KvShape, TargetLayout, TokenOrder};
use store_util::TestStore;

const MODEL: &str = "tiny-model";
const TOKENS: usize = 1024;
const CHUNK: u32 = 256;

/// A destination that records the shapes it was asked to allocate.
#[derive(Default)]
struct Recorder {
    allocated: Mutex<Vec<KvShape>>,
    buf: Mutex<Vec<u8>>,
}

impl Destination for Recorder {
    fn allocate(&self, shape: &KvShape) -> Result<(), BufferError> {
        self.allocated.lock().unwrap().push(*shape);
        *self.buf.lock().unwrap() = vec![0; layout().buffer_len(shape)];
        Ok(())
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), BufferError> {
        let mut buf = self.buf.lock().unwrap();
        let end = offset + bytes.len();
        buf.get_mut(offset..end)
            .ok_or_else(|| BufferError::Invalid("write out of bounds".into()))?
            .copy_from_slice(bytes);
        Ok(())
    }

    fn layers_written(&self, _: Range<u32>) {}
}

fn layout() -> TargetLayout {
    TargetLayout::host(DType::F16, TokenOrder::Nhd)
}

/// 4 layers x 2 heads x 16 dims of pseudo-random f16 KV.
fn cache() -> KvCache {
    let mut x = 1u32;
    let mut tensor = || {
        let v: Vec<f32> = (0..TOKENS * 2 * 16)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::from_f32(DType::F16, [TOKENS, 2, 16], &v).unwrap()
    };
    let layers = (0..4)
        .map(|_| LayerKv {
            key: tensor(),
            value: tensor(),
        })
        .collect();
    KvCache::new(layers, None).unwrap()
}

fn ids() -> Vec<u32> {
    (0..TOKENS as u32).map(|i| i * 7 + 3).collect()
}

/// The request's chunk objects, in chain order, as the daemon's save would write them.
fn objects() -> Vec<(ChunkKey, Vec<u8>)> {
    let cfg = EncodeConfig {
        chunk_tokens: CHUNK as usize,
        layers_per_section: 2,
        ..EncodeConfig::default()
    };
    let fp = ModelFingerprint::of_bytes(MODEL.as_bytes());
    encode_cache(&cache(), &fp, &ids(), &cfg, &CodecRegistry::software()).unwrap()
}

/// `object` with its header changed by `edit` (checksums recomputed: a well-formed object).
fn forge(object: &[u8], edit: impl FnOnce(&mut ChunkHeader)) -> Vec<u8> {
    let view = ChunkView::parse(object).unwrap();
    let mut h = view.header().clone();
    edit(&mut h);
    let shapes: Vec<_> = h
        .sections
        .iter()
        .map(|s| h.section_shape(s.layers(), s.shape.bits))
        .collect();
    for (s, shape) in h.sections.iter_mut().zip(shapes) {
        s.shape = shape;
    }
    let mut out = h.to_bytes().unwrap();
    assert_eq!(
        out.len(),
        view.header_len(),
        "the forged header keeps its length"
    );
    out.extend_from_slice(&object[view.header_len()..]);
    out
}

struct Fixture {
    store: TestStore,
    client: StoreClient,
    pipeline: Pipeline,
    objects: Vec<(ChunkKey, Vec<u8>)>,
}

impl Fixture {
    /// A store holding the request's chunks, and a daemon pipeline in front of it.
    async fn new() -> Fixture {
        let store = TestStore::start(ServerOptions::default(), false).await;
        let client = StoreClient::connect(store.addr, store.client_tls())
            .await
            .unwrap();
        let objects = objects();
        assert_eq!(objects.len(), 4);
        for (_, o) in &objects {
            client.put(Bytes::from(o.clone())).await.unwrap();
        }
        let target = StoreTarget {
            addr: store.addr,
            tls: store.client_tls(),
            options: ClientOptions::default(),
        };
        let save = SaveConfig {
            chunk_tokens: CHUNK,
            ..SaveConfig::default()
        };
        let pipeline = Pipeline::new(
            vec![target],
            CodecRegistry::software(),
            FetchConfig::default(),
            save,
            Metrics::new(),
        )
        .unwrap();
        Fixture {
            store,
            client,
            pipeline,
            objects,
        }
    }

    /// Stores `bytes` (whatever key its header carries), replacing the stored object: stored
    /// objects are write-once, and a forger holding a store credential may replace.
    async fn put(&self, bytes: Vec<u8>) {
        self.client
            .put_object(Bytes::from(bytes), true)
            .await
            .unwrap();
    }

    /// Fetches the whole request; the result and the shapes allocated.
    async fn fetch(&self) -> (Result<u32, ServeError>, Vec<KvShape>) {
        let dest = Arc::new(Recorder::default());
        let r = self
            .pipeline
            .fetch(
                MODEL,
                &ids(),
                &layout(),
                dest.clone(),
                FetchEvents::ignored(),
            )
            .await
            .map(|o| o.tokens);
        let shapes = dest.allocated.lock().unwrap().clone();
        (r, shapes)
    }
}

#[tokio::test]
async fn good_objects_fetch() {
    let f = Fixture::new().await;
    let (r, shapes) = f.fetch().await;
    assert_eq!(r.unwrap(), TOKENS as u32);
    assert_eq!(shapes.len(), 1);
    assert_eq!(shapes[0].tokens, TOKENS as u32);
    f.store.stop().await;
}

fn is_corrupt(r: &Result<u32, ServeError>) -> bool {
    matches!(r, Err(ServeError::Corrupt(_)))
}

#[tokio::test]
async fn an_object_stored_under_another_chunks_key_is_refused() {
    let f = Fixture::new().await;
    let (k0, _) = f.objects[0];
    // Chunk 1's KV relabelled as chunk 0 (its header now carries chunk 0's key, so the store
    // accepts it under that key).
    f.put(forge(&f.objects[1].1, |h| h.key = k0)).await;
    let (r, shapes) = f.fetch().await;
    assert!(is_corrupt(&r), "{r:?}");
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("tokens 256..+256") && e.contains(&k0.to_string()),
        "{e}"
    );
    assert!(shapes.is_empty(), "allocated {shapes:?}");
    assert_eq!(f.pipeline.metrics().corrupt_objects.get(), 1);
    // No good prefix before it: lookup and fetch agree on none.
    assert_eq!(f.pipeline.lookup(MODEL, &ids()).await.unwrap(), 0);
    let (r, shapes) = f.fetch().await;
    assert!(matches!(r, Err(ServeError::NotFound(_))), "{r:?}");
    assert!(shapes.is_empty());
    assert_eq!(f.pipeline.metrics().corrupt_objects.get(), 1);
    f.store.stop().await;
}

#[tokio::test]
async fn another_models_chunk_under_this_models_key_is_refused() {
    let f = Fixture::new().await;
    f.put(forge(&f.objects[0].1, |h| {
        h.model = ModelFingerprint::of_bytes(b"another model")
    }))
    .await;
    let (r, shapes) = f.fetch().await;
    assert!(is_corrupt(&r), "{r:?}");
    assert!(r.unwrap_err().to_string().contains("model"));
    assert!(shapes.is_empty(), "allocated {shapes:?}");
    f.store.stop().await;
}

#[tokio::test]
async fn an_oversize_token_count_is_refused_before_any_allocation() {
    let f = Fixture::new().await;
    // Chunk 0's header claims 65,536 tokens (the format's limit): 543 MB of buffer for this
    // 1,024-token request if it were believed.
    f.put(forge(&f.objects[0].1, |h| h.token_count = 65536))
        .await;
    let (r, shapes) = f.fetch().await;
    assert!(is_corrupt(&r), "{r:?}");
    assert!(r.unwrap_err().to_string().contains("65536"));
    assert!(shapes.is_empty(), "allocated {shapes:?}");
    f.store.stop().await;
}

#[tokio::test]
async fn a_corrupt_later_header_leaves_the_good_prefix() {
    let f = Fixture::new().await;
    f.put(forge(&f.objects[2].1, |h| h.token_count = 65536))
        .await;
    // The store holds all four keys: a lookup cannot tell before a fetch read the header.
    assert_eq!(f.pipeline.lookup(MODEL, &ids()).await.unwrap(), 1024);
    let (r, shapes) = f.fetch().await;
    assert_eq!(r.unwrap(), 512);
    assert_eq!(shapes.len(), 1);
    assert_eq!(shapes[0].tokens, 512);
    assert_eq!(f.pipeline.metrics().corrupt_objects.get(), 1);
    assert!(f
        .pipeline
        .metrics()
        .render()
        .contains("kvfetcher_corrupt_objects_total 1"));
    // From now on lookup and fetch agree on the good prefix.
    assert_eq!(f.pipeline.lookup(MODEL, &ids()).await.unwrap(), 512);
    let (r, _) = f.fetch().await;
    assert_eq!(r.unwrap(), 512);
    assert_eq!(f.pipeline.metrics().corrupt_objects.get(), 1);
    f.store.stop().await;
}

#[tokio::test]
async fn a_damaged_section_fails_the_fetch_and_later_fetches_stop_before_it() {
    let f = Fixture::new().await;
    let (k2, o2) = &f.objects[2];
    let view = ChunkView::parse(o2).unwrap();
    let s1 = &view.header().sections[1];
    let path = f.store.backend.object_path(k2);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(s1.offset + s1.len / 2) as usize] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    // The buffer is sized and announced before section 1 of chunk 2 arrives: the fetch fails.
    let (r, shapes) = f.fetch().await;
    assert!(is_corrupt(&r), "{r:?}");
    assert!(r.unwrap_err().to_string().contains(&k2.to_string()));
    assert_eq!(shapes.len(), 1);
    assert_eq!(f.pipeline.metrics().corrupt_objects.get(), 1);
    assert_eq!(f.pipeline.lookup(MODEL, &ids()).await.unwrap(), 512);
    let (r, shapes) = f.fetch().await;
    assert_eq!(r.unwrap(), 512);
    assert_eq!(shapes[0].tokens, 512);
    f.store.stop().await;
}
