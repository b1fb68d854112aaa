//! The S3 backend against a real S3-compatible store (Garage, started by
//! `scripts/garage-start.sh`). Skips unless KVF_S3_ENDPOINT, KVF_S3_BUCKET, KVF_S3_ACCESS_KEY
//! and KVF_S3_SECRET_KEY are set.

mod store_util;

use std::sync::Arc;

use bytes::Bytes;
use kvfetcher::store::{CommitMode, S3Backend, S3Config, ServerOptions, Storage, StoreServer};
use kvfetcher::transport::{
    write_dev_pki, StoreClient, StoreClientError, TlsClientConfig, TlsServerConfig,
};
use kvfetcher_codec::{ChunkKey, ChunkView, ModelFingerprint};
use store_util::real_objects;

fn config() -> Option<S3Config> {
    let c = S3Config::from_env();
    if c.is_none() {
        println!(
            "skipped: KVF_S3_ENDPOINT, KVF_S3_BUCKET, KVF_S3_ACCESS_KEY, KVF_S3_SECRET_KEY not set"
        );
    }
    c
}

fn unique(tag: u8) -> [u8; 32] {
    let mut k: [u8; 32] = rand::random();
    k[0] = tag;
    k
}

#[tokio::test]
async fn s3_backend_operations() {
    let Some(cfg) = config() else { return };
    let s3 = S3Backend::new(&cfg).unwrap();
    let (k1, k2) = (ChunkKey(unique(1)), ChunkKey(unique(2)));
    let model = ModelFingerprint(unique(3));
    let mut w = s3.begin_put(&k1).await.unwrap();
    w.write(Bytes::from_static(b"first half,")).await.unwrap();
    assert!(!s3.exists(&k1).await.unwrap(), "visible before commit");
    w.write(Bytes::from_static(b" second half")).await.unwrap();
    assert!(w.commit(model, CommitMode::CreateNew).await.unwrap());
    let mut w = s3.begin_put(&k2).await.unwrap();
    w.write(Bytes::from_static(b"abandoned")).await.unwrap();
    w.abort().await;
    assert_eq!(
        s3.get(&k1).await.unwrap().unwrap(),
        Bytes::from_static(b"first half, second half")
    );
    assert_eq!(s3.get(&k2).await.unwrap(), None);
    assert_eq!(s3.list(&model).await.unwrap(), vec![k1]);
    assert!(s3.usage().await.unwrap().objects >= 1);
    assert!(s3.delete(&k1).await.unwrap());
    assert!(!s3.exists(&k1).await.unwrap());
    assert!(s3.list(&model).await.unwrap().is_empty());
}

#[tokio::test]
async fn store_server_over_s3() {
    let Some(cfg) = config() else { return };
    let objects = real_objects();
    let certs = tempfile::tempdir().unwrap();
    write_dev_pki(certs.path()).unwrap();
    let backend: Arc<dyn Storage> = Arc::new(S3Backend::new(&cfg).unwrap());
    let server = StoreServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        &TlsServerConfig::from_dir(certs.path()).unwrap(),
        backend,
        ServerOptions::default(),
    )
    .unwrap();
    let addr = server.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let client = StoreClient::connect(addr, TlsClientConfig::from_path(certs.path()).unwrap())
        .await
        .unwrap();
    let keys: Vec<ChunkKey> = objects.iter().map(|(k, _)| *k).collect();
    for (k, _) in &objects {
        client.delete(k).await.unwrap();
    }
    for (_, b) in &objects[..2] {
        client.put(Bytes::from(b.clone())).await.unwrap();
    }
    assert_eq!(client.exists_prefix(&keys).await.unwrap(), 2);
    assert_eq!(client.get(&keys[1]).await.unwrap(), objects[1].1);
    let view = ChunkView::parse(&objects[0].1).unwrap();
    let s = client.get_sections(&keys[0], &[1]).await.unwrap();
    assert_eq!(&s.sections[0].1[..], view.section_bytes(1));
    assert!(client
        .list(&store_util::model())
        .await
        .unwrap()
        .contains(&keys[0]));
    for k in &keys[..2] {
        assert!(client.delete(k).await.unwrap());
    }
    assert!(matches!(
        client.get(&keys[0]).await,
        Err(StoreClientError::NotFound(_))
    ));
    tx.send(()).unwrap();
    task.await.unwrap();
}
