//! Stored chunks are write-once (issue 18 item 5a, KV poisoning): a second put of a stored key
//! is refused with `Exists` and leaves the object as it was, unless the put asks to replace.

mod store_util;

use bytes::Bytes;
use kvfetcher::store::ServerOptions;
use kvfetcher::transport::wire::{Op, Request, Response, StoreErrorCode};
use kvfetcher::transport::StoreClient;
use kvfetcher_codec::{encode_cache, ChunkKey, CodecRegistry, EncodeConfig, VariantKind};
use kvfetcher_kv::KvFile;
use kvfetcher_testkit::data_file;
use store_util::{model, raw_connection, real_objects, TestStore};

/// Another object under the first real object's key: the same tokens, encoded otherwise.
fn other_object() -> (ChunkKey, Vec<u8>) {
    other_objects().into_iter().next().expect("an object")
}

/// Other objects under the real objects' keys, in the same order.
fn other_objects() -> Vec<(ChunkKey, Vec<u8>)> {
    let cache = KvFile::read(&data_file("codelm-kv-a.safetensors"))
        .expect("read kv")
        .cache;
    let ids: Vec<u32> = cache
        .token_ids()
        .map(|t| t.to_vec())
        .unwrap_or_else(|| (0..cache.tokens() as u32).collect());
    let cfg = EncodeConfig {
        layers_per_section: 2,
        variant: VariantKind::Packed,
        ..EncodeConfig::default()
    };
    encode_cache(&cache, &model(), &ids, &cfg, &CodecRegistry::software()).unwrap()
}

/// Sends a put of `bytes` whose last byte waits for `go`, and returns the store's answer.
async fn held_put(
    conn: &quinn::Connection,
    key: ChunkKey,
    bytes: &[u8],
    go: &tokio::sync::Barrier,
) -> Response {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let req = Request::Put {
        key,
        len: bytes.len() as u64,
        replace: false,
    };
    send.write_all(&req.encode()).await.unwrap();
    let (head, last) = bytes.split_at(bytes.len() - 1);
    send.write_all(head).await.unwrap();
    go.wait().await;
    let _ = send.write_all(last).await;
    let _ = send.finish();
    let buf = recv.read_to_end(1 << 20).await.unwrap();
    Response::decode(Op::Put, &buf).unwrap().unwrap().0
}

/// Sends one raw put and returns the store's answer.
async fn raw_put(conn: &quinn::Connection, key: ChunkKey, bytes: &[u8], replace: bool) -> Response {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let req = Request::Put {
        key,
        len: bytes.len() as u64,
        replace,
    };
    send.write_all(&req.encode()).await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let buf = recv.read_to_end(1 << 20).await.unwrap();
    Response::decode(Op::Put, &buf).unwrap().unwrap().0
}

#[tokio::test]
async fn a_stored_key_is_refused_without_replace_and_kept() {
    let (objects, (key, poison)) = (real_objects(), other_object());
    let (k0, original) = &objects[0];
    assert_eq!(key, *k0, "same tokens, same key");
    assert_ne!(&poison, original);
    let store = TestStore::start(ServerOptions::default(), false).await;
    let (_ep, conn) = raw_connection(store.addr, &store.client_tls()).await;
    assert_eq!(
        raw_put(&conn, key, original, false).await,
        Response::Stored { created: true }
    );
    match raw_put(&conn, key, &poison, false).await {
        Response::Error { code, message } => {
            assert_eq!(code, StoreErrorCode::Exists);
            assert!(message.contains("already stored"), "{message}");
        }
        other => panic!("second put accepted: {other:?}"),
    }
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    assert_eq!(
        &client.get(&key).await.unwrap(),
        original,
        "object unchanged"
    );
    // The client reports "already stored" as success, not created, and changes nothing.
    assert!(!client.put(Bytes::from(poison.clone())).await.unwrap());
    assert_eq!(&client.get(&key).await.unwrap(), original);
    // An explicit replace overwrites.
    assert!(!client
        .put_object(Bytes::from(poison.clone()), true)
        .await
        .unwrap());
    assert_eq!(client.get(&key).await.unwrap(), poison);
    client.close().await;
    store.stop().await;
}

#[tokio::test]
async fn a_corrupt_stored_object_may_be_saved_again() {
    let objects = real_objects();
    let (key, bytes) = &objects[0];
    let store = TestStore::start(ServerOptions::default(), false).await;
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    assert!(client.put(Bytes::from(bytes.clone())).await.unwrap());
    let path = store.backend.object_path(key);
    let mut damaged = std::fs::read(&path).unwrap();
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    std::fs::write(&path, &damaged).unwrap();
    assert!(!client.put(Bytes::from(bytes.clone())).await.unwrap());
    assert_eq!(&client.get(key).await.unwrap(), bytes, "healed");
    client.close().await;
    store.stop().await;
}

/// Two puts of one key with different objects, both received before either commits: exactly
/// one is stored, the other is refused with `Exists`, and the stored object is the winner's,
/// intact. Before, both passed the "exists" checks and the second rename overwrote the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_of_one_key_store_exactly_one() {
    let (objects, others) = (real_objects(), other_objects());
    for _ in 0..3 {
        let store = TestStore::start(ServerOptions::default(), false).await;
        let (_ea, a) = raw_connection(store.addr, &store.client_tls()).await;
        let (_eb, b) = raw_connection(store.addr, &store.client_tls()).await;
        for ((key, first), (other_key, second)) in objects.iter().zip(&others) {
            assert_eq!(key, other_key);
            assert_ne!(first, second);
            let go = tokio::sync::Barrier::new(3);
            let (ra, rb, ()) = tokio::join!(
                held_put(&a, *key, first, &go),
                held_put(&b, *key, second, &go),
                async {
                    // Both uploads are past the store's first "exists" check by now.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    go.wait().await;
                }
            );
            let created = Response::Stored { created: true };
            let winner = match (&ra, &rb) {
                (r, Response::Error { code, .. }) if *r == created => {
                    assert_eq!(*code, StoreErrorCode::Exists);
                    first
                }
                (Response::Error { code, .. }, r) if *r == created => {
                    assert_eq!(*code, StoreErrorCode::Exists);
                    second
                }
                _ => panic!("not exactly one put stored: {ra:?} and {rb:?}"),
            };
            let stored = std::fs::read(store.backend.object_path(key)).unwrap();
            assert!(stored == *winner, "the stored object is not the winner's");
        }
        store.stop().await;
    }
}

/// A small valid codec profile's bytes, for `model`.
fn profile_bytes(model: kvfetcher_codec::ModelFingerprint) -> Vec<u8> {
    use kvfetcher_codec::{CodecProfile, HeadBasis, LayerProfile, Rope, TensorProfile};
    let tensor = || TensorProfile {
        heads: vec![HeadBasis::identity(vec![0.0; 8], vec![1.0; 8])],
        sensitivity: 1.0,
        curve: Vec::new(),
    };
    CodecProfile {
        model,
        kv_heads: 1,
        head_dim: 8,
        sinks: 0,
        rope: Rope::NONE,
        layers: vec![LayerProfile {
            key: tensor(),
            value: tensor(),
        }],
    }
    .to_bytes()
}

/// Codec profile objects (issue 16 item 3): stored under the hash of their id, checked by
/// their hash on put and get, write-once, listed under their model's profile index, and never
/// served as sections.
#[tokio::test]
async fn profile_objects_are_content_addressed_write_once_and_listed_by_model() {
    use kvfetcher_codec::ProfileId;
    let m = model();
    let bytes = profile_bytes(m);
    let id = ProfileId::of_bytes(&bytes);
    let key = id.object_key();
    let store = TestStore::start(ServerOptions::default(), false).await;
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    assert!(client
        .put_profile(Bytes::from(bytes.clone()))
        .await
        .unwrap());
    assert!(!client
        .put_profile(Bytes::from(bytes.clone()))
        .await
        .unwrap());
    assert_eq!(client.get_profile(&id, u64::MAX).await.unwrap(), bytes);
    let err = client.get_profile(&id, 16).await.unwrap_err();
    assert!(
        err.to_string().contains("more than the 16 accepted"),
        "{err}"
    );
    assert_eq!(client.list(&m.profile_index()).await.unwrap(), vec![key]);
    assert!(
        client.list(&m).await.unwrap().is_empty(),
        "not among chunks"
    );
    let err = client.open_sections(&key, &[0]).await.unwrap_err();
    assert!(err.to_string().contains("has no sections"), "{err}");
    // Changed bytes under the key are refused on put, and found corrupt when stored.
    let mut bad = bytes.clone();
    bad[60] ^= 1;
    let other = ProfileId::of_bytes(b"x").object_key();
    let err = client
        .put_raw(other, Bytes::from(bad.clone()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("hashes to"), "{err}");
    std::fs::write(store.backend.object_path(&key), &bad).unwrap();
    let err = client.get_profile(&id, u64::MAX).await.unwrap_err();
    assert!(
        matches!(err, kvfetcher::transport::StoreClientError::Corrupt(_)),
        "{err}"
    );
    // Putting the profile again heals it.
    assert!(!client
        .put_profile(Bytes::from(bytes.clone()))
        .await
        .unwrap());
    assert_eq!(client.get_profile(&id, u64::MAX).await.unwrap(), bytes);
    store.stop().await;
}
