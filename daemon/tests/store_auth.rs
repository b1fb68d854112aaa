//! Failed authentication is throttled per source address (issue 18 item 5): a client sending
//! wrong tokens (or no client certificate to a mutual-TLS store) is blocked for a growing
//! backoff, so 2,000 guesses get only a handful checked, while a client of another address is
//! served meanwhile. The attacker binds 127.0.0.2, the honest client 127.0.0.1 (both loopback).

mod store_util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfetcher::store::{AuthThrottleConfig, ServerOptions};
use kvfetcher::transport::wire::{Request, Response, StoreErrorCode};
use kvfetcher::transport::{StoreClient, TlsClientConfig};
use store_util::{real_objects, TestStore};

const TOKEN: &[u8] = b"the-right-token";
/// Where the attacker connects from.
const ATTACKER: &str = "127.0.0.2:0";

fn throttle() -> AuthThrottleConfig {
    AuthThrottleConfig {
        free_failures: 3,
        base_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        ..AuthThrottleConfig::default()
    }
}

/// A QUIC connection to `addr` from the local address `from`.
async fn connect_from(
    from: &str,
    addr: SocketAddr,
    tls: &TlsClientConfig,
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let mut ep = quinn::Endpoint::client(from.parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(tls.quic().unwrap()));
    let conn = ep.connect(addr, "localhost").unwrap().await?;
    Ok((ep, conn))
}

/// Sends one request on a new stream and returns the answer (None: the connection failed).
async fn ask(conn: &quinn::Connection, req: Request) -> Option<Response> {
    let op = req.op();
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    send.write_all(&req.encode()).await.ok()?;
    let _ = send.finish();
    let buf = recv.read_to_end(1 << 16).await.ok()?;
    Some(Response::decode(op, &buf).unwrap().unwrap().0)
}

fn auth(token: &[u8]) -> Request {
    Request::Auth {
        token: token.to_vec(),
    }
}

/// The wait a throttled refusal names ("retry in N ms"), or None for another answer.
fn throttled_for(r: &Response) -> Option<Duration> {
    let Response::Error {
        code: StoreErrorCode::Unauthorized,
        message,
    } = r
    else {
        return None;
    };
    let ms = message
        .strip_prefix("too many failed authentications")?
        .rsplit_once("retry in ")?
        .1
        .strip_suffix(" ms")?;
    Some(Duration::from_millis(ms.parse().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_are_throttled_and_other_addresses_served() {
    let opts = ServerOptions {
        token: Some(TOKEN.to_vec()),
        auth_throttle: throttle(),
        ..ServerOptions::default()
    };
    let store = TestStore::start(opts, false).await;
    let mut anyone = store.client_tls();
    anyone.client_identity = None;
    let (_ep, conn) = connect_from(ATTACKER, store.addr, &anyone).await.unwrap();

    // 2,000 wrong tokens as fast as the store answers.
    let started = Instant::now();
    let (mut checked, mut throttled) = (0u32, 0u32);
    for i in 0..2000u32 {
        let r = ask(&conn, auth(format!("guess-{i}").as_bytes()))
            .await
            .unwrap();
        match throttled_for(&r) {
            Some(_) => throttled += 1,
            None => {
                assert_eq!(
                    r,
                    Response::Error {
                        code: StoreErrorCode::Unauthorized,
                        message: "bad token".into()
                    }
                );
                checked += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{checked} of 2000 wrong tokens checked in {elapsed:?}, {throttled} refused unchecked"
    );
    // Checked: the free failures, one per backoff step up to the cap (100 ms doubling to 1 s:
    // 5 steps), then one per second of the attack, plus one for rounding.
    let c = throttle();
    let bound = c.free_failures + 1 + 4 + elapsed.as_secs() as u32 + 1;
    assert!(
        checked <= bound,
        "{checked} of 2000 wrong tokens checked in {elapsed:?} (bound {bound})"
    );
    assert_eq!(checked + throttled, 2000);

    // While blocked, the attacker's address gets no check even for the right token, and no
    // new connection. Wrong tokens until one is checked: a block of at least 0.4 s starts.
    loop {
        let r = ask(&conn, auth(b"one-more-guess")).await.unwrap();
        match throttled_for(&r) {
            Some(wait) => tokio::time::sleep(wait).await,
            None => break,
        }
    }
    let r = ask(&conn, auth(TOKEN)).await.unwrap();
    let wait =
        throttled_for(&r).unwrap_or_else(|| panic!("right token checked while blocked: {r:?}"));
    assert!(
        wait > Duration::from_millis(200) && wait <= c.max_backoff,
        "{wait:?}"
    );
    assert!(
        connect_from(ATTACKER, store.addr, &anyone).await.is_err(),
        "a blocked address connected"
    );

    // Another address is served meanwhile, with the right token.
    let mut honest = store.client_tls();
    honest.token = Some(TOKEN.to_vec());
    let client = StoreClient::connect(store.addr, honest.clone())
        .await
        .unwrap();
    let (key, bytes) = &real_objects()[0];
    assert!(client.put(Bytes::from(bytes.clone())).await.unwrap());
    assert_eq!(&client.get(key).await.unwrap(), bytes);
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.auth_failures, u64::from(checked) + 1);
    // The attack's refusals, the right token's, and the refused connection.
    assert!(
        stats.auth_throttled >= u64::from(throttled) + 2,
        "{stats:?}"
    );

    // Once the block ends, the right token from that address is served.
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    assert_eq!(ask(&conn, auth(TOKEN)).await, Some(Response::Authed));
    assert!(matches!(
        ask(&conn, Request::Stats).await,
        Some(Response::Stats(_))
    ));
    client.close().await;
    store.stop().await;
}

/// Mutual TLS: a client without a certificate fails its handshakes; after the free failures
/// its address's connections are refused before any handshake, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_client_certificates_are_throttled() {
    let opts = ServerOptions {
        auth_throttle: throttle(),
        ..ServerOptions::default()
    };
    let store = TestStore::start(opts, true).await;
    let mut no_cert = store.client_tls();
    no_cert.client_identity = None;
    let c = throttle();
    for _ in 0..(c.free_failures + 6) {
        // A handshake may look complete to the client before the store checks its
        // certificate: the first request then fails.
        if let Ok((_ep, conn)) = connect_from(ATTACKER, store.addr, &no_cert).await {
            assert_eq!(
                ask(&conn, Request::Stats).await,
                None,
                "served without a certificate"
            );
        }
    }
    // The store counts failed handshakes as they end: give the last ones a moment.
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    let mut stats = client.stats().await.unwrap();
    for _ in 0..50 {
        if stats.auth_failures > u64::from(c.free_failures) && stats.auth_throttled > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = client.stats().await.unwrap();
    }
    assert!(
        stats.auth_failures > u64::from(c.free_failures),
        "{stats:?}"
    );
    assert!(stats.auth_throttled > 0, "no connection refused: {stats:?}");
    // Fewer handshakes failed than were tried: the rest were refused before the handshake.
    assert!(
        stats.auth_failures < u64::from(c.free_failures + 6),
        "{stats:?}"
    );
    client.close().await;
    store.stop().await;
}
