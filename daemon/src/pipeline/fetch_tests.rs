//! Whole fetches against objects in memory ([`MemorySource`]): planning, header checks,
//! decode and restore into a host buffer, and what a missing, corrupt or cut-off object does
//! to a fetch, to later lookups and to the quarantine. No store, network or TLS.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use kvfetcher_codec::{chunk_keys, encode_cache, ChunkKey, CodecRegistry, ModelFingerprint};
use kvfetcher_kv::{DType, KvCache, LayerKv, Tensor};
use kvfetcher_protocol::{KvShape, MemoryKind, Paging, TargetLayout, TokenOrder};

use super::{
    encode_config, place_cache, FetchError, FetchEvents, FetchOutcome, MemorySource, Pipeline,
    StoreError,
};
use crate::buffers::{BufferError, Destination};
use crate::config::{FetchConfig, SaveConfig};
use crate::metrics::Metrics;

const MODEL: &str = "toy-model";
/// Three chunks: 16, 16 and 8 tokens.
const TOKENS: usize = 40;
const CHUNK: u32 = 16;
const LAYERS: usize = 4;
const HEADS: usize = 2;
const DIM: usize = 8;

/// A host buffer standing in for the server's memfd; records the layers reported written.
#[derive(Default)]
struct HostBuf {
    layout: Option<TargetLayout>,
    buf: Mutex<Vec<u8>>,
    shape: Mutex<Option<KvShape>>,
    ready: Mutex<Vec<Range<u32>>>,
}

impl Destination for HostBuf {
    fn allocate(&self, shape: &KvShape) -> Result<(), BufferError> {
        let layout = self.layout.expect("layout set");
        *self.buf.lock().unwrap() = vec![0; layout.buffer_len(shape)];
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

fn layout() -> TargetLayout {
    TargetLayout {
        dtype: DType::F16,
        order: TokenOrder::Hnd,
        paging: Paging::Contiguous,
        memory: MemoryKind::Host,
    }
}

/// Lossless settings (16 bits: no quantization), so a fetch returns the saved bytes exactly.
fn save_config() -> SaveConfig {
    SaveConfig {
        variant: "zstd".into(),
        bits: 16,
        chunk_tokens: CHUNK,
        layers_per_group: 2,
        workers: 1,
        ..SaveConfig::default()
    }
}

/// Deterministic f16 KV of every layer, and its token ids.
fn toy_cache() -> (KvCache, Vec<u32>) {
    let tensor = |seed: usize| {
        let values: Vec<f32> = (0..TOKENS * HEADS * DIM)
            .map(|i| ((i * 37 + seed * 101) % 257) as f32 / 64.0 - 2.0)
            .collect();
        Tensor::from_f32(DType::F16, [TOKENS, HEADS, DIM], &values).unwrap()
    };
    let layers = (0..LAYERS)
        .map(|l| LayerKv {
            key: tensor(2 * l),
            value: tensor(2 * l + 1),
        })
        .collect();
    let ids: Vec<u32> = (0..TOKENS as u32).map(|t| t * 7919 % 32000).collect();
    (KvCache::new(layers, Some(ids.clone())).unwrap(), ids)
}

struct Fixture {
    source: Arc<MemorySource>,
    pipeline: Pipeline,
    metrics: Arc<Metrics>,
    cache: KvCache,
    ids: Vec<u32>,
    keys: Vec<ChunkKey>,
    /// Total bytes of the stored objects.
    stored_bytes: u64,
}

/// The toy KV saved (encoded as the daemon saves it) into a [`MemorySource`], and a pipeline
/// that fetches from it.
fn fixture() -> Fixture {
    let (cache, ids) = toy_cache();
    let save = save_config();
    let registry = CodecRegistry::software();
    let fp = ModelFingerprint::of_bytes(MODEL.as_bytes());
    let cfg = encode_config(&save, &registry, MODEL).unwrap();
    let objects = encode_cache(&cache, &fp, &ids, &cfg, &registry).expect("encode");
    let keys = chunk_keys(&fp, &ids, CHUNK as usize);
    assert_eq!(objects.iter().map(|(k, _)| *k).collect::<Vec<_>>(), keys);
    let source = Arc::new(MemorySource::new());
    let mut stored_bytes = 0;
    for (key, bytes) in objects {
        stored_bytes += bytes.len() as u64;
        source.insert(key, bytes);
    }
    let fetch = FetchConfig {
        max_inflight_sections: 2,
        decode_workers: 1,
        ..FetchConfig::default()
    };
    let metrics = Metrics::new();
    let pipeline =
        Pipeline::with_source(source.clone(), registry, fetch, save, metrics.clone()).unwrap();
    Fixture {
        source,
        pipeline,
        metrics,
        cache,
        ids,
        keys,
        stored_bytes,
    }
}

impl Fixture {
    async fn fetch(&self) -> (Result<FetchOutcome, FetchError>, Arc<HostBuf>) {
        let dest = Arc::new(HostBuf {
            layout: Some(layout()),
            ..HostBuf::default()
        });
        let r = self
            .pipeline
            .fetch_into(
                MODEL,
                &self.ids,
                &layout(),
                dest.clone(),
                FetchEvents::ignored(),
            )
            .await;
        (r, dest)
    }

    async fn lookup(&self) -> u32 {
        self.pipeline.lookup_tokens(MODEL, &self.ids).await.unwrap()
    }

    /// The first `tokens` tokens of the saved KV, placed in the layout as a fetch must.
    fn expected(&self, tokens: usize) -> Vec<u8> {
        let part = self.cache.slice_tokens(0, tokens).unwrap();
        let shape = KvShape {
            num_layers: LAYERS as u32,
            tokens: tokens as u32,
            kv_heads: HEADS as u32,
            head_dim: DIM as u32,
        };
        let mut out = vec![0; layout().buffer_len(&shape)];
        place_cache(&layout(), &shape, 0, 0, part.layers(), &mut |off, b| {
            out[off..off + b.len()].copy_from_slice(b);
            Ok::<(), super::LayoutIoError>(())
        })
        .unwrap();
        out
    }

    /// Flips one byte of the stored object `chunk`, `from_end` bytes before its end.
    fn damage(&self, chunk: usize, from_end: usize) {
        let key = self.keys[chunk];
        let mut bytes = self.source.get(&key).unwrap().to_vec();
        let at = bytes.len() - from_end;
        bytes[at] ^= 0x5a;
        self.source.insert(key, bytes);
    }
}

/// Whether the layers reported ready cover every layer exactly once.
fn all_layers_once(ready: &[Range<u32>]) -> bool {
    let mut seen = [0u32; LAYERS];
    for r in ready {
        for l in r.clone() {
            seen[l as usize] += 1;
        }
    }
    seen.iter().all(|&n| n == 1)
}

#[tokio::test]
async fn a_whole_fetch_restores_every_token_into_host_memory() {
    let f = fixture();
    assert_eq!(f.lookup().await, TOKENS as u32);
    let (r, dest) = f.fetch().await;
    let out = r.unwrap();
    assert_eq!(out.tokens, TOKENS as u32);
    // Every stored byte crossed the "wire" once: each header, then each section.
    assert_eq!(out.bytes_on_wire, f.stored_bytes);
    assert_eq!(dest.shape.lock().unwrap().unwrap().tokens, TOKENS as u32);
    assert!(
        *dest.buf.lock().unwrap() == f.expected(TOKENS),
        "restored bytes differ"
    );
    assert!(all_layers_once(&dest.ready.lock().unwrap()));
    assert_eq!(f.metrics.corrupt_objects.get(), 0);
}

#[tokio::test]
async fn a_missing_chunk_ends_the_prefix() {
    let f = fixture();
    f.source.remove(&f.keys[2]);
    assert_eq!(f.lookup().await, 2 * CHUNK);
    let (r, dest) = f.fetch().await;
    assert_eq!(r.unwrap().tokens, 2 * CHUNK);
    assert!(*dest.buf.lock().unwrap() == f.expected(2 * CHUNK as usize));

    f.source.remove(&f.keys[0]);
    assert_eq!(f.lookup().await, 0);
    let (r, dest) = f.fetch().await;
    assert!(matches!(r, Err(FetchError::NotFound(_))), "{r:?}");
    assert!(dest.shape.lock().unwrap().is_none(), "nothing allocated");
}

#[tokio::test]
async fn a_corrupt_section_fails_the_fetch_and_quarantines_its_chunk() {
    let f = fixture();
    // The last byte of chunk 1 is in its last section's payload: its checksum fails.
    f.damage(1, 1);
    let (r, _) = f.fetch().await;
    assert!(matches!(r, Err(FetchError::Corrupt(_))), "{r:?}");
    assert_eq!(f.metrics.corrupt_objects.get(), 1);
    // Lookups and fetches now stop before the chunk, without asking for it again.
    assert_eq!(f.lookup().await, CHUNK);
    let (r, dest) = f.fetch().await;
    assert_eq!(r.unwrap().tokens, CHUNK);
    assert!(*dest.buf.lock().unwrap() == f.expected(CHUNK as usize));
    assert_eq!(f.metrics.corrupt_objects.get(), 1);
}

#[tokio::test]
async fn a_header_of_another_chunk_is_refused() {
    let f = fixture();
    // Chunk 2's object stored under chunk 1's key: the prefix ends before it.
    let other = f.source.get(&f.keys[2]).unwrap();
    f.source.insert(f.keys[1], other.clone());
    let (r, dest) = f.fetch().await;
    assert_eq!(r.unwrap().tokens, CHUNK);
    assert!(*dest.buf.lock().unwrap() == f.expected(CHUNK as usize));
    assert_eq!(f.metrics.corrupt_objects.get(), 1);

    // Under the first key nothing is left to fetch: the fetch fails as corrupt.
    f.source.insert(f.keys[0], other);
    let (r, _) = f.fetch().await;
    assert!(matches!(r, Err(FetchError::Corrupt(_))), "{r:?}");
}

#[tokio::test]
async fn a_damaged_header_is_corrupt() {
    let f = fixture();
    let mut bytes = f.source.get(&f.keys[0]).unwrap().to_vec();
    bytes[16] ^= 0xff;
    f.source.insert(f.keys[0], bytes);
    let (r, dest) = f.fetch().await;
    assert!(matches!(r, Err(FetchError::Corrupt(_))), "{r:?}");
    assert!(dest.shape.lock().unwrap().is_none(), "nothing allocated");
    assert_eq!(f.lookup().await, 0, "the chunk is quarantined");
}

#[tokio::test]
async fn a_cut_off_stream_fails_the_fetch_without_blaming_the_object() {
    let f = fixture();
    f.source.truncate(f.keys[1]);
    let (r, _) = f.fetch().await;
    assert!(
        matches!(r, Err(FetchError::Store(StoreError::Unavailable(_)))),
        "{r:?}"
    );
    assert_eq!(f.metrics.corrupt_objects.get(), 0);
    assert_eq!(f.lookup().await, TOKENS as u32, "nothing quarantined");
}

#[tokio::test]
async fn a_pipeline_without_stores_refuses_saves() {
    let f = fixture();
    let shape = KvShape {
        num_layers: LAYERS as u32,
        tokens: TOKENS as u32,
        kv_heads: HEADS as u32,
        head_dim: DIM as u32,
    };
    let data = f.expected(TOKENS);
    let r = f
        .pipeline
        .save_kv(MODEL, &f.ids, &layout(), &shape, &data, false)
        .await;
    assert!(
        matches!(r, Err(super::SaveError::Store(StoreError::NoStore))),
        "{r:?}"
    );
}
