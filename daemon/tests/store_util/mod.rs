//! Shared helpers of the store integration tests: real chunk objects, a store on loopback
//! port 0, and raw QUIC connections for sending malformed input.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use kvfetcher::store::{LocalDir, ServerOptions, Storage, StoreServer};
use kvfetcher::transport::{write_dev_pki, TlsClientConfig, TlsServerConfig};
use kvfetcher_codec::{encode_cache, ChunkKey, CodecRegistry, EncodeConfig, ModelFingerprint};
use kvfetcher_kv::KvFile;
use kvfetcher_testkit::data_file;

/// The model fingerprint used for test objects.
pub fn model() -> ModelFingerprint {
    ModelFingerprint::of_bytes(b"codelm-107M")
}

/// Chunk objects with their keys.
pub type Objects = Vec<(ChunkKey, Vec<u8>)>;

/// Real chunk objects of the codelm KV (4 chunks of 256 tokens, 4 sections of 2 layers each),
/// encoded once per test binary.
pub fn real_objects() -> Objects {
    static OBJECTS: std::sync::OnceLock<Objects> = std::sync::OnceLock::new();
    OBJECTS.get_or_init(encode_objects).clone()
}

fn encode_objects() -> Objects {
    let file = KvFile::read(&data_file("codelm-kv-a.safetensors")).expect("read kv");
    let cache = file.cache;
    let ids: Vec<u32> = cache
        .token_ids()
        .map(|t| t.to_vec())
        .unwrap_or_else(|| (0..cache.tokens() as u32).collect());
    let cfg = EncodeConfig {
        layers_per_section: 2,
        ..EncodeConfig::default()
    };
    encode_cache(&cache, &model(), &ids, &cfg, &CodecRegistry::software()).expect("encode")
}

/// A running store on loopback, with its dev certificates and data directory.
pub struct TestStore {
    pub addr: SocketAddr,
    pub certs: tempfile::TempDir,
    pub data: tempfile::TempDir,
    pub backend: LocalDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestStore {
    /// Starts a store with `opts`; `mtls` requires client certificates from the dev CA.
    pub async fn start(opts: ServerOptions, mtls: bool) -> TestStore {
        let certs = tempfile::tempdir().unwrap();
        write_dev_pki(certs.path()).unwrap();
        let data = tempfile::tempdir().unwrap();
        let backend = LocalDir::open(data.path()).unwrap();
        let mut tls = TlsServerConfig::from_dir(certs.path()).unwrap();
        if mtls {
            tls.client_ca =
                Some(kvfetcher::transport::load_certs(&certs.path().join("ca.pem")).unwrap());
        }
        let b: Arc<dyn Storage> = Arc::new(backend.clone());
        let server = StoreServer::bind("127.0.0.1:0".parse().unwrap(), &tls, b, opts).unwrap();
        let addr = server.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        TestStore {
            addr,
            certs,
            data,
            backend,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Client TLS settings trusting this store's dev CA (with the dev client certificate).
    pub fn client_tls(&self) -> TlsClientConfig {
        TlsClientConfig::from_path(self.certs.path()).unwrap()
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

/// A raw QUIC connection to the store, for sending bytes the real client never would.
pub async fn raw_connection(
    addr: SocketAddr,
    tls: &TlsClientConfig,
) -> (quinn::Endpoint, quinn::Connection) {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(tls.quic().unwrap()));
    let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
    (ep, conn)
}

/// Starts `kvfetcher store` as a process on `listen` (port 0 for any; no client credentials)
/// and returns it with the address it printed.
pub fn spawn_store(listen: &str, data: &Path, certs: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvfetcher"))
        .args(["store", "--listen", listen, "--data-dir"])
        .arg(data)
        .arg("--cert-dir")
        .arg(certs)
        .arg("--insecure-open-writes")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn kvfetcher store");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected {line:?}"));
    (child, addr.parse().unwrap())
}
