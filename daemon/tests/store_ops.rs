//! Store operations over real QUIC on loopback: put, get, ranges, sections, exists-prefix,
//! list, delete, stats, concurrent clients, and TLS (pinning, mutual TLS, tokens).

mod store_util;

use bytes::Bytes;
use kvfetcher::store::ServerOptions;
use kvfetcher::transport::{
    generate_dev_pki, SectionCheck, ServerTrust, StoreClient, StoreClientError, TlsClientConfig,
    DEFAULT_SERVER_NAME,
};
use kvfetcher_codec::{ChunkHeader, ChunkKey, ChunkView, ModelFingerprint};
use store_util::{model, real_objects, TestStore};

#[tokio::test]
async fn put_get_exists_list_delete_stats() {
    let objects = real_objects();
    let store = TestStore::start(ServerOptions::default(), false).await;
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    let keys: Vec<ChunkKey> = objects.iter().map(|(k, _)| *k).collect();
    assert_eq!(client.exists_prefix(&keys).await.unwrap(), 0);
    // Store chunks 0 and 1, and 3 (a gap at 2): the prefix chain stops at the gap.
    for i in [0, 1, 3] {
        assert!(client.put(Bytes::from(objects[i].1.clone())).await.unwrap());
    }
    assert!(
        !client.put(Bytes::from(objects[0].1.clone())).await.unwrap(),
        "second put reports present"
    );
    assert_eq!(client.exists_prefix(&keys).await.unwrap(), 2);
    for i in [0, 1, 3] {
        assert_eq!(client.get(&keys[i]).await.unwrap(), objects[i].1);
    }
    let range = client.get_range(&keys[1], 10, 100).await.unwrap();
    assert_eq!(range, objects[1].1[10..110]);
    let mut listed = client.list(&model()).await.unwrap();
    listed.sort();
    let mut want = vec![keys[0], keys[1], keys[3]];
    want.sort();
    assert_eq!(listed, want);
    assert!(client
        .list(&ModelFingerprint([0; 32]))
        .await
        .unwrap()
        .is_empty());
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.objects, 3);
    assert_eq!(
        stats.bytes,
        [0, 1, 3]
            .iter()
            .map(|&i| objects[i].1.len() as u64)
            .sum::<u64>()
    );
    assert_eq!(stats.connections, 1);
    assert!(client.delete(&keys[1]).await.unwrap());
    assert!(!client.delete(&keys[1]).await.unwrap());
    assert_eq!(client.exists_prefix(&keys).await.unwrap(), 1);
    assert!(matches!(
        client.get(&keys[1]).await,
        Err(StoreClientError::NotFound(_))
    ));
    client.close().await;
    store.stop().await;
}

#[tokio::test]
async fn sections_arrive_one_at_a_time_and_verified() {
    let objects = real_objects();
    let store = TestStore::start(ServerOptions::default(), false).await;
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    let (key, bytes) = &objects[2];
    client.put(Bytes::from(bytes.clone())).await.unwrap();
    let view = ChunkView::parse(bytes).unwrap();
    assert!(
        view.header().sections.len() >= 3,
        "test object should have several sections"
    );
    // Stream sections 2 then 0: the header comes first, then each section in request order.
    let mut stream = client.open_sections(key, &[2, 0]).await.unwrap();
    let (header, _) = ChunkHeader::parse_prefix(stream.header()).unwrap();
    assert_eq!(header.key, *key);
    let (i, s) = stream.next_section().await.unwrap().unwrap();
    assert_eq!((i, &s[..]), (2, view.section_bytes(2)));
    let (i, s) = stream.next_section().await.unwrap().unwrap();
    assert_eq!((i, &s[..]), (0, view.section_bytes(0)));
    assert!(stream.next_section().await.unwrap().is_none());
    let all = client.get_sections(key, &[1]).await.unwrap();
    assert_eq!(all.header, bytes[..view.header_len()]);
    assert_eq!(all.sections.len(), 1);
    assert_eq!(&all.sections[0].1[..], view.section_bytes(1));
    // A section index past the end is a typed error, and the connection stays usable.
    let err = client.get_sections(key, &[99]).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreClientError::Server {
                code: kvfetcher::transport::wire::StoreErrorCode::OutOfRange,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(client.get(key).await.unwrap(), *bytes);
    // With the header already held, the store sends the sections alone.
    let check = std::sync::Arc::new(SectionCheck::from_header(&all.header).unwrap());
    let before = client.stats().await.unwrap().bytes_out;
    let mut known = client.open_known_sections(&check, &[1, 2]).await.unwrap();
    assert!(known.header().is_empty());
    for want in [1, 2] {
        let (i, s) = known.next_section().await.unwrap().unwrap();
        assert_eq!((i, &s[..]), (want, view.section_bytes(want)));
    }
    assert!(known.next_section().await.unwrap().is_none());
    let sent = client.stats().await.unwrap().bytes_out - before;
    let sections = (view.section_bytes(1).len() + view.section_bytes(2).len()) as u64;
    assert_eq!(
        sent, sections,
        "payload bytes: the two sections and no header"
    );
    store.stop().await;
}

/// A paced store (whose pacer would otherwise interleave every stream) answers a connection's
/// streams in the order they were opened: sections asked for at once arrive one after another.
#[tokio::test]
async fn a_paced_store_answers_streams_in_order() {
    let objects = real_objects();
    let opts = ServerOptions {
        max_rate: Some(4 << 20),
        ..ServerOptions::default()
    };
    let store = TestStore::start(opts, false).await;
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    let (key, bytes) = &objects[2];
    client.put(Bytes::from(bytes.clone())).await.unwrap();
    let head = client.open_sections(key, &[]).await.unwrap();
    let check = std::sync::Arc::new(SectionCheck::from_header(head.header()).unwrap());
    let n = check.sections().min(4);
    let arrived = std::sync::Mutex::new(Vec::new());
    // join_all polls the futures in order, so the streams open in index order.
    futures::future::join_all((0..n).map(|i| {
        let (client, check, arrived) = (&client, &check, &arrived);
        async move {
            let mut s = client.open_known_sections(check, &[i]).await.unwrap();
            let (got, _) = s.next_section().await.unwrap().unwrap();
            arrived.lock().unwrap().push(got);
        }
    }))
    .await;
    assert_eq!(*arrived.lock().unwrap(), (0..n).collect::<Vec<_>>());
    store.stop().await;
}

#[tokio::test]
async fn concurrent_clients_and_parallel_streams() {
    let objects = real_objects();
    let store = TestStore::start(ServerOptions::default(), false).await;
    let setup = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    for (_, b) in &objects {
        setup.put(Bytes::from(b.clone())).await.unwrap();
    }
    let objects = std::sync::Arc::new(objects);
    let mut tasks = Vec::new();
    for c in 0..6 {
        let tls = store.client_tls();
        let objects = objects.clone();
        let addr = store.addr;
        tasks.push(tokio::spawn(async move {
            let client = StoreClient::connect(addr, tls).await.unwrap();
            // Every object at once on one connection: parallel streams.
            let gets = objects.iter().map(|(k, _)| {
                let client = client.clone();
                let k = *k;
                async move { client.get(&k).await }
            });
            let got = futures::future::join_all(gets).await;
            for (g, (_, want)) in got.into_iter().zip(objects.iter()) {
                assert_eq!(g.unwrap(), *want, "client {c}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        setup.stats().await.unwrap().bytes_out,
        6 * objects.iter().map(|(_, b)| b.len() as u64).sum::<u64>()
    );
    store.stop().await;
}

#[tokio::test]
async fn pinned_certificate_accepted_and_wrong_one_refused() {
    let store = TestStore::start(ServerOptions::default(), false).await;
    let cert = kvfetcher::transport::load_certs(&store.certs.path().join("cert.pem")).unwrap();
    let pinned = TlsClientConfig {
        trust: ServerTrust::Pinned(cert),
        client_identity: None,
        server_name: DEFAULT_SERVER_NAME.into(),
        token: None,
    };
    let client = StoreClient::connect(store.addr, pinned).await.unwrap();
    assert_eq!(client.stats().await.unwrap().objects, 0);
    // Another dev PKI's CA and certificate do not match this server.
    let other = tempfile::tempdir().unwrap();
    kvfetcher::transport::write_dev_pki(other.path()).unwrap();
    let wrong_ca = TlsClientConfig::from_path(other.path()).unwrap();
    assert!(matches!(
        StoreClient::connect(store.addr, wrong_ca).await,
        Err(StoreClientError::Connection(_))
    ));
    let wrong_pin = TlsClientConfig {
        trust: ServerTrust::Pinned(
            kvfetcher::transport::load_certs(&other.path().join("cert.pem")).unwrap(),
        ),
        client_identity: None,
        server_name: DEFAULT_SERVER_NAME.into(),
        token: None,
    };
    assert!(matches!(
        StoreClient::connect(store.addr, wrong_pin).await,
        Err(StoreClientError::Connection(_))
    ));
    // The right CA with a name the certificate does not carry is refused too.
    let mut wrong_name = store.client_tls();
    wrong_name.server_name = "store.example".into();
    assert!(StoreClient::connect(store.addr, wrong_name).await.is_err());
    store.stop().await;
}

#[tokio::test]
async fn mutual_tls_accepts_the_ca_client_and_refuses_others() {
    let store = TestStore::start(ServerOptions::default(), true).await;
    let good = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    assert_eq!(good.stats().await.unwrap().connections, 1);
    // No client certificate: the handshake fails (or the first request does, TLS 1.3 sends
    // the server's refusal after the client thinks it is done).
    let mut none = store.client_tls();
    none.client_identity = None;
    let refused = match StoreClient::connect(store.addr, none).await {
        Err(_) => true,
        Ok(c) => c.stats().await.is_err(),
    };
    assert!(refused, "client without certificate was served");
    // A client certificate from another CA is refused the same way.
    let other = generate_dev_pki().unwrap();
    let mut wrong = store.client_tls();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.pem"), &other.client_cert_pem).unwrap();
    std::fs::write(dir.path().join("k.pem"), &other.client_key_pem).unwrap();
    wrong.client_identity = Some((
        kvfetcher::transport::load_certs(&dir.path().join("c.pem")).unwrap(),
        kvfetcher::transport::load_key(&dir.path().join("k.pem")).unwrap(),
    ));
    let refused = match StoreClient::connect(store.addr, wrong).await {
        Err(_) => true,
        Ok(c) => c.stats().await.is_err(),
    };
    assert!(refused, "client with a foreign certificate was served");
    assert_eq!(
        good.stats().await.unwrap().connections,
        1,
        "refused clients never counted as connected"
    );
    store.stop().await;
}

#[tokio::test]
async fn bearer_token_required_when_configured() {
    let opts = ServerOptions {
        token: Some(b"s3cret".to_vec()),
        ..ServerOptions::default()
    };
    let store = TestStore::start(opts, false).await;
    let mut tls = store.client_tls();
    tls.token = Some(b"s3cret".to_vec());
    let ok = StoreClient::connect(store.addr, tls).await.unwrap();
    assert_eq!(ok.stats().await.unwrap().objects, 0);
    let none = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    let err = none.stats().await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreClientError::Server {
                code: kvfetcher::transport::wire::StoreErrorCode::Unauthorized,
                ..
            }
        ),
        "{err}"
    );
    let mut bad = store.client_tls();
    bad.token = Some(b"guess".to_vec());
    assert!(StoreClient::connect(store.addr, bad).await.is_err());
    store.stop().await;
}
