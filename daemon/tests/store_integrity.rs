//! Integrity: objects are checked on put and on get; damaged bytes on disk are reported as
//! `Corrupt`, never served.

mod store_util;

use bytes::Bytes;
use kvfetcher::store::ServerOptions;
use kvfetcher::transport::wire::StoreErrorCode;
use kvfetcher::transport::{StoreClient, StoreClientError};
use kvfetcher_codec::ChunkView;
use store_util::{real_objects, TestStore};

fn flip(path: &std::path::Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

#[tokio::test]
async fn corrupt_file_on_disk_is_reported_not_served() {
    let objects = real_objects();
    let store = TestStore::start(ServerOptions::default(), false).await;
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    let (key, bytes) = &objects[0];
    client.put(Bytes::from(bytes.clone())).await.unwrap();
    let view = ChunkView::parse(bytes).unwrap();
    let damaged = &view.header().sections[1];
    // One bit flipped in the middle of section 1.
    flip(
        &store.backend.object_path(key),
        (damaged.offset + damaged.len / 2) as usize,
    );
    let err = client.get(key).await.unwrap_err();
    assert!(matches!(err, StoreClientError::Corrupt(_)), "{err}");
    let err = client.get_range(key, 0, 16).await.unwrap_err();
    assert!(
        matches!(err, StoreClientError::Corrupt(_)),
        "a range of a corrupt object: {err}"
    );
    let err = client.get_sections(key, &[0, 1]).await.unwrap_err();
    assert!(matches!(err, StoreClientError::Corrupt(_)), "{err}");
    // The intact sections of the same object are still served, and verified.
    let ok = client.get_sections(key, &[0, 2]).await.unwrap();
    assert_eq!(&ok.sections[1].1[..], view.section_bytes(2));
    assert_eq!(client.stats().await.unwrap().corrupt, 3);
    // A damaged header makes every read of the object corrupt.
    flip(&store.backend.object_path(key), 20);
    let err = client.get_sections(key, &[0]).await.unwrap_err();
    assert!(matches!(err, StoreClientError::Corrupt(_)), "{err}");
    // Putting the good object again heals it.
    client.put(Bytes::from(bytes.clone())).await.unwrap();
    assert_eq!(client.get(key).await.unwrap(), *bytes);
    store.stop().await;
}

#[tokio::test]
async fn invalid_uploads_are_refused_and_leave_nothing() {
    let objects = real_objects();
    let store = TestStore::start(ServerOptions::default(), false).await;
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    let (k0, b0) = &objects[0];
    let (k1, _) = &objects[1];
    // Valid bytes under another key.
    let err = client
        .put_raw(*k1, Bytes::from(b0.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreClientError::Server {
                code: StoreErrorCode::InvalidObject,
                ..
            }
        ),
        "{err}"
    );
    // A damaged section: the client refuses to send it, the server refuses to store it.
    let mut bad = b0.clone();
    let last = bad.len() - 3;
    bad[last] ^= 1;
    assert!(matches!(
        client.put(Bytes::from(bad.clone())).await,
        Err(StoreClientError::InvalidObject(_))
    ));
    let err = client.put_raw(*k0, Bytes::from(bad)).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreClientError::Server {
                code: StoreErrorCode::InvalidObject,
                ..
            }
        ),
        "{err}"
    );
    // Not a chunk object at all.
    let err = client
        .put_raw(*k0, Bytes::from_static(b"hello, store"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreClientError::Server {
                code: StoreErrorCode::InvalidObject,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(client.exists_prefix(&[*k0]).await.unwrap(), 0);
    assert_eq!(client.exists_prefix(&[*k1]).await.unwrap(), 0);
    assert_eq!(client.stats().await.unwrap().objects, 0);
    assert_eq!(
        std::fs::read_dir(store.data.path().join("tmp"))
            .unwrap()
            .count(),
        0,
        "temp files left"
    );
    store.stop().await;
}

/// The KV of `cache` with `n` times the heads (each head repeated): a wider model.
fn widen(cache: &kvfetcher_kv::KvCache, n: usize) -> kvfetcher_kv::KvCache {
    use kvfetcher_kv::{LayerKv, Tensor};
    let wide = |t: &Tensor| {
        let [tokens, heads, dim] = t.shape();
        let v = t.to_f32();
        let rows: Vec<f32> = v
            .chunks(heads * dim)
            .flat_map(|row| (0..n).flat_map(move |_| row.iter().copied()))
            .collect();
        Tensor::from_f32(t.dtype(), [tokens, heads * n, dim], &rows).unwrap()
    };
    let layers = cache
        .layers()
        .iter()
        .map(|l| LayerKv {
            key: wide(&l.key),
            value: wide(&l.value),
        })
        .collect();
    kvfetcher_kv::KvCache::new(layers, None).unwrap()
}

/// A section request reads the header and the sections asked for, not the whole object: a
/// header longer than the server's first read (a wide model's per-channel parameters) is read
/// again whole, and a file shorter than its header says is reported corrupt.
#[tokio::test]
async fn wide_headers_are_read_whole_and_short_files_are_corrupt() {
    let path = kvfetcher_testkit::data_file("codelm-kv-a.safetensors");
    let cache = kvfetcher_kv::KvFile::read(&path)
        .unwrap()
        .cache
        .slice_tokens(0, 64)
        .unwrap();
    let wide = widen(&cache, 4);
    let cfg = kvfetcher_codec::EncodeConfig {
        variant: kvfetcher_codec::VariantKind::Packed,
        chunk_tokens: 64,
        layers_per_section: 2,
        ..kvfetcher_codec::EncodeConfig::default()
    };
    let ids: Vec<u32> = (0..64).collect();
    let objects = kvfetcher_codec::encode_cache(
        &wide,
        &store_util::model(),
        &ids,
        &cfg,
        &kvfetcher_codec::CodecRegistry::software(),
    )
    .unwrap();
    let (key, bytes) = &objects[0];
    let view = ChunkView::parse(bytes).unwrap();
    assert!(
        view.header_len() > 64 << 10,
        "{} header bytes",
        view.header_len()
    );
    let store = TestStore::start(ServerOptions::default(), false).await;
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    client.put(Bytes::from(bytes.clone())).await.unwrap();
    let got = client.get_sections(key, &[3, 0]).await.unwrap();
    assert_eq!(got.header, &bytes[..view.header_len()]);
    assert_eq!(&got.sections[0].1[..], view.section_bytes(3));
    assert_eq!(&got.sections[1].1[..], view.section_bytes(0));
    // One byte short: every section request is refused as corrupt, nothing is served.
    std::fs::write(store.backend.object_path(key), &bytes[..bytes.len() - 1]).unwrap();
    let err = client.get_sections(key, &[0]).await.unwrap_err();
    assert!(matches!(err, StoreClientError::Corrupt(_)), "{err}");
    assert_eq!(client.stats().await.unwrap().corrupt, 1);
    store.stop().await;
}
