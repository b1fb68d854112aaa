//! Crash safety: the real `kvfetcher store` process is killed with SIGKILL in the middle of an
//! upload; afterwards no partial object is visible, and a restarted store serves the object
//! once it is uploaded whole.

mod store_util;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfetcher::transport::wire::Request;
use kvfetcher::transport::{StoreClient, StoreClientError, TlsClientConfig};
use store_util::{raw_connection, real_objects, spawn_store};

fn files_in(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for e in walk(dir) {
        out.push((
            e.display().to_string(),
            std::fs::metadata(&e).map(|m| m.len()).unwrap_or(0),
        ));
    }
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn kill_mid_upload_leaves_no_partial_object() {
    let objects = real_objects();
    let (key, bytes) = &objects[0];
    let certs = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_kvfetcher"))
        .args(["store", "--dev-cert"])
        .arg(certs.path())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let data = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_store("127.0.0.1:0", data.path(), certs.path());
    let tls = TlsClientConfig::from_path(certs.path()).unwrap();

    // Send the request and the first half of the object, then hold the stream open.
    let (_ep, conn) = raw_connection(addr, &tls).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(
        &Request::Put {
            key: *key,
            len: bytes.len() as u64,
            replace: false,
        }
        .encode(),
    )
    .await
    .unwrap();
    send.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
    // Wait until the store has written part of the upload to disk: the kill lands mid-upload.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tmp = files_in(&data.path().join("tmp"));
        if tmp.iter().any(|(_, len)| *len > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no partial upload appeared: {tmp:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    assert!(
        files_in(&data.path().join("objects")).is_empty(),
        "an object became visible"
    );
    assert!(
        !files_in(&data.path().join("tmp")).is_empty(),
        "the partial upload should be in tmp/ only"
    );

    // A restarted store does not have the object, has cleaned tmp/, and accepts it whole.
    let (mut child, addr) = spawn_store("127.0.0.1:0", data.path(), certs.path());
    assert!(
        files_in(&data.path().join("tmp")).is_empty(),
        "restart left abandoned uploads"
    );
    let client = StoreClient::connect(addr, tls).await.unwrap();
    assert_eq!(client.exists_prefix(&[*key]).await.unwrap(), 0);
    assert!(matches!(
        client.get(key).await,
        Err(StoreClientError::NotFound(_))
    ));
    assert!(client.put(Bytes::from(bytes.clone())).await.unwrap());
    assert_eq!(client.get(key).await.unwrap(), *bytes);
    child.kill().unwrap();
    child.wait().unwrap();
}
