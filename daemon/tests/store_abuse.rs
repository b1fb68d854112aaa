//! Bad input: malformed requests, unknown keys, oversized uploads and idle (slowloris) streams
//! get clear errors and are cut off, while other clients carry on.

mod store_util;

use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfetcher::store::{ServerOptions, CLOSE_BUSY, CLOSE_BUSY_REASON};
use kvfetcher::transport::wire::{Op, Request, Response, StoreErrorCode};
use kvfetcher::transport::{ClientOptions, StoreClient, StoreClientError, TransportTuning};
use kvfetcher_codec::ChunkKey;
use store_util::{raw_connection, real_objects, TestStore};

/// Sends raw bytes on a fresh stream (finishing it when `finish`) and reads the answer.
async fn raw_exchange(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> Response {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let buf = recv.read_to_end(1 << 20).await.unwrap();
    Response::decode(Op::Stats, &buf).unwrap().unwrap().0
}

/// Like `raw_exchange`, but the server may stop reading before everything is sent (it refused
/// the request early): write errors are ignored, the answer is what counts.
async fn raw_exchange_refused(conn: &quinn::Connection, bytes: &[u8]) -> Response {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let buf = recv.read_to_end(1 << 20).await.unwrap();
    Response::decode(Op::Put, &buf).unwrap().unwrap().0
}

fn code(r: &Response) -> Option<StoreErrorCode> {
    match r {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn malformed_requests_get_bad_request_and_the_connection_survives() {
    let store = TestStore::start(ServerOptions::default(), false).await;
    let tls = store.client_tls();
    let (_ep, conn) = raw_connection(store.addr, &tls).await;
    let r = raw_exchange(&conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", true).await;
    assert_eq!(code(&r), Some(StoreErrorCode::BadRequest), "{r:?}");
    let mut unknown_op = Request::Stats.encode();
    unknown_op[5] = 99;
    assert_eq!(
        code(&raw_exchange(&conn, &unknown_op, true).await),
        Some(StoreErrorCode::BadRequest)
    );
    let mut huge = Request::Stats.encode();
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        code(&raw_exchange(&conn, &huge, true).await),
        Some(StoreErrorCode::BadRequest)
    );
    // A request cut short by the end of the stream.
    let full = Request::Delete {
        key: ChunkKey([1; 32]),
    }
    .encode();
    assert_eq!(
        code(&raw_exchange(&conn, &full[..20], true).await),
        Some(StoreErrorCode::BadRequest)
    );
    // The same connection still serves good requests.
    let r = raw_exchange(&conn, &Request::Stats.encode(), true).await;
    assert!(matches!(r, Response::Stats(_)), "{r:?}");
    store.stop().await;
}

#[tokio::test]
async fn unknown_keys_are_not_found() {
    let store = TestStore::start(ServerOptions::default(), false).await;
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    let k = ChunkKey([0xab; 32]);
    assert!(matches!(
        client.get(&k).await,
        Err(StoreClientError::NotFound(_))
    ));
    assert!(matches!(
        client.get_sections(&k, &[0]).await,
        Err(StoreClientError::NotFound(_))
    ));
    assert!(!client.delete(&k).await.unwrap());
    assert_eq!(client.exists_prefix(&[k]).await.unwrap(), 0);
    store.stop().await;
}

#[tokio::test]
async fn oversized_and_overlong_uploads_are_refused() {
    let objects = real_objects();
    let (key, bytes) = &objects[0];
    let limit = bytes.len() as u64 / 2;
    let store = TestStore::start(
        ServerOptions {
            max_object_bytes: limit,
            ..ServerOptions::default()
        },
        false,
    )
    .await;
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    let t = Instant::now();
    let err = client.put(Bytes::from(bytes.clone())).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreClientError::Server {
                code: StoreErrorCode::TooLarge,
                ..
            }
        ),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    // Declaring a small length and sending more is refused too.
    let tls = store.client_tls();
    let (_ep, conn) = raw_connection(store.addr, &tls).await;
    let mut msg = Request::Put {
        key: *key,
        len: 100,
        replace: false,
    }
    .encode();
    msg.extend_from_slice(&bytes[..1000]);
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(&msg).await;
    let _ = send.finish();
    let buf = recv.read_to_end(1 << 20).await.unwrap();
    let (r, _) = Response::decode(Op::Put, &buf).unwrap().unwrap();
    assert_eq!(code(&r), Some(StoreErrorCode::BadRequest), "{r:?}");
    assert_eq!(client.exists_prefix(&[*key]).await.unwrap(), 0);
    store.stop().await;
}

#[tokio::test]
async fn idle_streams_and_connections_are_cut_off_without_hurting_others() {
    let objects = real_objects();
    let opts = ServerOptions {
        stream_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(800),
        ..ServerOptions::default()
    };
    let store = TestStore::start(opts, false).await;
    let keep_alive = ClientOptions {
        tuning: TransportTuning {
            keep_alive: Some(Duration::from_millis(200)),
            ..TransportTuning::default()
        },
    };
    let good = StoreClient::connect_with(store.addr, store.client_tls(), keep_alive)
        .await
        .unwrap();
    let (key, bytes) = &objects[0];
    good.put(Bytes::from(bytes.clone())).await.unwrap();

    let tls = store.client_tls();
    let (_ep, slow) = raw_connection(store.addr, &tls).await;
    // Slowloris 1: half a request header, then nothing.
    let (mut s1, mut r1) = slow.open_bi().await.unwrap();
    s1.write_all(&Request::Stats.encode()[..5]).await.unwrap();
    // Slowloris 2: a put that stalls halfway through its object.
    let (stalled_key, stalled) = &objects[1];
    let (mut s2, mut r2) = slow.open_bi().await.unwrap();
    s2.write_all(
        &Request::Put {
            key: *stalled_key,
            len: stalled.len() as u64,
            replace: false,
        }
        .encode(),
    )
    .await
    .unwrap();
    s2.write_all(&stalled[..stalled.len() / 2]).await.unwrap();
    // Meanwhile the good client is served normally.
    let t = Instant::now();
    for _ in 0..5 {
        assert_eq!(good.get(key).await.unwrap(), *bytes);
    }
    let b1 = r1.read_to_end(1 << 20).await.unwrap();
    let b2 = r2.read_to_end(1 << 20).await.unwrap();
    assert_eq!(
        code(&Response::decode(Op::Stats, &b1).unwrap().unwrap().0),
        Some(StoreErrorCode::Timeout)
    );
    assert_eq!(
        code(&Response::decode(Op::Put, &b2).unwrap().unwrap().0),
        Some(StoreErrorCode::Timeout)
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(good.exists_prefix(&[*stalled_key]).await.unwrap(), 0);
    // The silent raw connection (no keep-alive) is closed by the server's idle timeout;
    // the good client keeps alive and stays connected.
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.closed()).await;
    assert!(
        matches!(closed, Ok(quinn::ConnectionError::TimedOut)),
        "{closed:?}"
    );
    assert_eq!(good.get(key).await.unwrap(), *bytes);
    store.stop().await;
}

/// A put of `bytes` under `key`, as encoded on the wire (request, then the object).
fn put_message(key: ChunkKey, declared: usize, bytes: &[u8]) -> Vec<u8> {
    let mut msg = Request::Put {
        key,
        len: declared as u64,
        replace: false,
    }
    .encode();
    msg.extend_from_slice(bytes);
    msg
}

/// Puts over `max_uploads` are refused as `Busy` while the first goes on, and connections over
/// `max_connections` are closed with a reason; both are served again once a slot is free.
#[tokio::test]
async fn uploads_and_connections_over_the_caps_are_refused() {
    let objects = real_objects();
    let opts = ServerOptions {
        max_uploads: 1,
        max_connections: 2,
        ..ServerOptions::default()
    };
    let store = TestStore::start(opts, false).await;
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    let tls = store.client_tls();
    let (_ep, raw) = raw_connection(store.addr, &tls).await;
    // The first upload takes the only slot: half its object, then it waits.
    let (k0, b0) = &objects[0];
    let (mut send, mut recv) = raw.open_bi().await.unwrap();
    let half = b0.len() / 2;
    send.write_all(&put_message(*k0, b0.len(), &b0[..half]))
        .await
        .unwrap();
    // The server counts an upload's bytes once it holds the slot.
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.stats().await.unwrap().bytes_in == 0 {
        assert!(Instant::now() < deadline, "the first upload never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (k1, b1) = &objects[1];
    let err = client.put(Bytes::from(b1.clone())).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreClientError::Server {
                code: StoreErrorCode::Busy,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(client.exists_prefix(&[*k1]).await.unwrap(), 0);
    // The first upload completes, and frees its slot.
    send.write_all(&b0[half..]).await.unwrap();
    send.finish().unwrap();
    let buf = recv.read_to_end(1 << 20).await.unwrap();
    let (r, _) = Response::decode(Op::Put, &buf).unwrap().unwrap();
    assert!(matches!(r, Response::Stored { created: true }), "{r:?}");
    assert!(client.put(Bytes::from(b1.clone())).await.unwrap());

    // A third connection is closed after its handshake, with the reason.
    let connect = || async {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(tls.quic().unwrap()));
        let conn = ep.connect(store.addr, "localhost").unwrap().await;
        (ep, conn)
    };
    let (_ep3, third) = connect().await;
    let closed = match third {
        Ok(conn) => tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("the connection over the cap stays open"),
        Err(e) => e,
    };
    match &closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(CLOSE_BUSY));
            assert_eq!(&c.reason[..], CLOSE_BUSY_REASON);
        }
        other => panic!("expected a busy close, got {other:?}"),
    }
    // Once the raw connection is gone, a new one is served (the server notices the close
    // within a round trip; bounded retries).
    raw.close(quinn::VarInt::from_u32(0), b"done");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_ep, conn) = connect().await;
        if let Ok(conn) = conn {
            let (mut s, mut r) = conn.open_bi().await.unwrap();
            let _ = s.write_all(&Request::Stats.encode()).await;
            let _ = s.finish();
            if let Ok(buf) = r.read_to_end(1 << 20).await {
                if let Ok(Some((Response::Stats(_), _))) = Response::decode(Op::Stats, &buf) {
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "no connection slot came free");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.stop().await;
}

/// An upload cut short, reset, or damaged anywhere is refused, and leaves neither an object
/// nor a temporary file in the data directory.
#[tokio::test]
async fn cut_or_damaged_uploads_leave_no_object_and_no_temp_file() {
    let objects = real_objects();
    let store = TestStore::start(ServerOptions::default(), false).await;
    let tls = store.client_tls();
    let (_ep, conn) = raw_connection(store.addr, &tls).await;
    let (key, bytes) = &objects[0];
    let leftovers = || {
        let tmp = std::fs::read_dir(store.data.path().join("tmp"))
            .unwrap()
            .count();
        (tmp, store.backend.object_path(key).exists())
    };
    // The stream ends halfway.
    let r = raw_exchange_refused(
        &conn,
        &put_message(*key, bytes.len(), &bytes[..bytes.len() / 2]),
    )
    .await;
    assert_eq!(code(&r), Some(StoreErrorCode::BadRequest), "{r:?}");
    assert_eq!(leftovers(), (0, false));
    // Damaged in the header, the first section, the last byte: refused as soon as seen.
    let header_len = kvfetcher::transport::verify_object(bytes)
        .unwrap()
        .header_len;
    for at in [40, header_len + 5, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x01;
        let r = raw_exchange_refused(&conn, &put_message(*key, bad.len(), &bad)).await;
        assert_eq!(
            code(&r),
            Some(StoreErrorCode::InvalidObject),
            "byte {at}: {r:?}"
        );
        assert_eq!(leftovers(), (0, false), "byte {at}");
    }
    // The client resets the stream mid-upload.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&put_message(*key, bytes.len(), &bytes[..bytes.len() / 2]))
        .await
        .unwrap();
    send.reset(quinn::VarInt::from_u32(7)).unwrap();
    let buf = recv.read_to_end(1 << 20).await.unwrap();
    let (r, _) = Response::decode(Op::Put, &buf).unwrap().unwrap();
    assert_eq!(code(&r), Some(StoreErrorCode::BadRequest), "{r:?}");
    assert_eq!(leftovers(), (0, false));
    // The same bytes, whole, are stored.
    let r = raw_exchange_refused(&conn, &put_message(*key, bytes.len(), bytes)).await;
    assert!(matches!(r, Response::Stored { created: true }), "{r:?}");
    assert_eq!(leftovers(), (0, true));
    store.stop().await;
}
