//! The store logs what it does: connections with the peer's address and each request at debug,
//! a corrupt object at warn with its key. Captured with a tracing subscriber on the test's
//! thread (a current-thread runtime runs the server there too).

mod store_util;

use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kvfetcher::store::ServerOptions;
use kvfetcher::transport::{StoreClient, StoreClientError};
use kvfetcher_codec::ChunkView;
use store_util::{real_objects, TestStore};
use tracing_subscriber::fmt::MakeWriter;

/// Log lines, shared with the subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_store_logs_connections_requests_and_corruption() {
    let objects = real_objects();
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let store = TestStore::start(ServerOptions::default(), false).await;
    let client = StoreClient::connect(store.addr, store.client_tls())
        .await
        .unwrap();
    let (key, bytes) = &objects[0];
    client.put(Bytes::from(bytes.clone())).await.unwrap();
    let view = ChunkView::parse(bytes).unwrap();
    let s = &view.header().sections[1];
    let path = store.backend.object_path(key);
    let mut damaged = std::fs::read(&path).unwrap();
    damaged[(s.offset + s.len / 2) as usize] ^= 0x40;
    std::fs::write(&path, damaged).unwrap();
    let err = client.get_sections(key, &[1]).await.unwrap_err();
    assert!(matches!(err, StoreClientError::Corrupt(_)), "{err}");
    client.close().await;
    // The server sees the close on its connection's task: wait for that task's last line.
    for _ in 0..500 {
        if logs.lines().iter().any(|l| l.contains("connection closed")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    store.stop().await;

    let lines = logs.lines();
    let has = |level: &str, words: &[&str]| {
        lines
            .iter()
            .any(|l| l.contains(level) && words.iter().all(|w| l.contains(w)))
    };
    let key = key.to_string();
    assert!(
        has("DEBUG", &["connection opened", "peer=127.0.0.1:"]),
        "{lines:#?}"
    );
    assert!(has("DEBUG", &["request served", "Put", &key]), "{lines:#?}");
    assert!(
        has("WARN", &["corrupt object not served", "GetSections", &key]),
        "{lines:#?}"
    );
    assert!(
        has("DEBUG", &["connection closed", "peer=127.0.0.1:"]),
        "{lines:#?}"
    );
}
