//! Store restarts: the real `kvfetcher store` process is killed with SIGKILL (no QUIC close
//! reaches the daemon), so the daemon must notice the dead connection by itself. A request
//! on it fails within seconds rather than at quinn's 30 s idle timeout, and once a store is
//! listening again on the same port the next request reconnects and succeeds.

mod store_util;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvfetcher::config::{FetchConfig, SaveConfig};
use kvfetcher::pipeline::{Pipeline, StoreTarget};
use kvfetcher::server::Backend;
use kvfetcher::transport::{ClientOptions, TlsClientConfig};
use kvfetcher::Metrics;
use kvfetcher_codec::CodecRegistry;
use store_util::spawn_store;

fn kill(mut child: Child) {
    child.kill().unwrap(); // SIGKILL: the store sends no CONNECTION_CLOSE
    child.wait().unwrap();
}

#[tokio::test]
async fn killed_store_fails_fast_and_reconnects_after_restart() {
    let certs = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_kvfetcher"))
        .args(["store", "--dev-cert"])
        .arg(certs.path())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let data = tempfile::tempdir().unwrap();
    let (child, addr) = spawn_store("127.0.0.1:0", data.path(), certs.path());

    let target = StoreTarget {
        addr,
        tls: TlsClientConfig::from_path(certs.path()).unwrap(),
        options: ClientOptions::default(),
    };
    let fetch = FetchConfig {
        connections_per_store: 1,
        ..FetchConfig::default()
    };
    let save = SaveConfig {
        chunk_tokens: 16,
        workers: 1,
        ..SaveConfig::default()
    };
    let pipeline = Pipeline::new(
        vec![target],
        CodecRegistry::software(),
        fetch,
        save,
        Metrics::new(),
    )
    .unwrap();
    let ids: Vec<u32> = (0..64).collect();
    assert_eq!(pipeline.lookup("m", &ids).await.unwrap(), 0);

    kill(child);
    // A request on the dead connection fails, well before the old 30 s idle timeout.
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), pipeline.lookup("m", &ids)).await;
    let took = start.elapsed();
    assert!(
        matches!(r, Ok(Err(_))),
        "lookup on a killed store: {r:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(8), "failure took {took:?}");

    // The store comes back on the same port: the next request dials it and succeeds.
    let (child, again) = spawn_store(&addr.to_string(), data.path(), certs.path());
    assert_eq!(again, addr);
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), pipeline.lookup("m", &ids)).await;
    let took = start.elapsed();
    assert!(
        matches!(r, Ok(Ok(0))),
        "lookup after restart: {r:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(3), "reconnect took {took:?}");
    kill(child);
}
