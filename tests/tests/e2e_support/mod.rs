//! Shared helpers of the `e2e_*` tests: build and locate the `kvfetcher` binary, start a real
//! store and a real daemon as child processes on loopback, and compute the values a fetch must
//! return.
//!
//! Every process is killed when its guard drops, so a failing test leaves nothing running.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvfetcher_client::{KvShape, TargetLayout};
use kvfetcher_codec::{
    decode_chunk, encode_cache, CodecRegistry, EncodeConfig, ModelFingerprint, QuantConfig,
    VariantKind,
};
use kvfetcher_kv::{DType, KvCache, KvFile, Tensor};
use kvfetcher_testkit::data_file;

/// Tokens per chunk in the test daemon config.
pub(crate) const CHUNK_TOKENS: usize = 256;
/// Layers per section in the test daemon config.
pub(crate) const LAYERS_PER_GROUP: usize = 2;
/// Quantization bits in the test daemon config.
pub(crate) const BITS: u8 = 8;

/// The repository root (the workspace).
pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The target directory of this test binary's profile (`target/debug` or `target/release`).
pub(crate) fn profile_dir() -> PathBuf {
    // The test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Builds the workspace (binaries and libkvfetcher included) in the profile this test was built
/// with, so the test uses the current code (a no-op after `cargo test --workspace`).
pub(crate) fn cargo_build() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `--workspace --lib --bins --tests` resolves features exactly as `cargo test --workspace` does, so
    // after that command this build finds everything fresh instead of rebuilding dependencies
    // with a narrower feature set.
    cmd.args([
        "build",
        "--quiet",
        "--workspace",
        "--lib",
        "--bins",
        "--tests",
    ])
    .current_dir(repo_root());
    if profile_dir().file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build --workspace failed");
}

/// Builds `kvfetcher` (once per test binary) and returns its path.
pub(crate) fn kvfetcher_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        cargo_build();
        let bin = profile_dir().join("kvfetcher");
        assert!(bin.exists(), "{} missing", bin.display());
        bin
    })
    .clone()
}

/// A child process killed on drop.
pub(crate) struct Proc {
    /// The process.
    pub(crate) child: Child,
    /// What it is, for messages.
    pub(crate) name: &'static str,
}

impl Proc {
    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub(crate) fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free UDP port on loopback (bound and released; good enough for tests).
pub(crate) fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A free TCP port on loopback.
pub(crate) fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A store and a daemon running as real processes in a temp dir.
pub(crate) struct Stack {
    /// The temp dir (certs, data, config, socket).
    pub(crate) dir: tempfile::TempDir,
    /// The store process.
    pub(crate) store: Proc,
    /// The daemon process.
    pub(crate) daemon: Proc,
    /// The daemon's Unix socket.
    pub(crate) socket: PathBuf,
    /// The daemon's metrics address.
    pub(crate) metrics: SocketAddr,
    /// The store's address.
    pub(crate) store_addr: SocketAddr,
}

/// Starts `kvfetcher store` and `kvfetcher daemon` (with `NOTIFY_SOCKET`, waiting for its
/// `READY=1` exactly as systemd would).
pub(crate) fn start_stack() -> Stack {
    let bin = kvfetcher_bin();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let st = Command::new(&bin)
        .arg("store")
        .arg("--dev-cert")
        .arg(&certs)
        .status()
        .unwrap();
    assert!(st.success(), "kvfetcher store --dev-cert failed");
    let store_addr = free_udp();
    let store = Proc {
        child: Command::new(&bin)
            .arg("store")
            .arg("--listen")
            .arg(store_addr.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--cert-dir")
            .arg(&certs)
            // Mutual TLS: the daemon presents the dev client certificate of `tls = certs`.
            .arg("--client-ca")
            .arg(certs.join("ca.pem"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
        name: "store",
    };
    let socket = dir.path().join("kvfetcher.sock");
    let metrics = free_tcp();
    let config = dir.path().join("kvfetcher.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {socket:?}\nmetrics_addr = \"{metrics}\"\n\n[[stores]]\naddr = \"{store_addr}\"\n\
             tls = {certs:?}\n\n[save]\nvariant = \"zstd\"\nbits = {BITS}\nchunk_tokens = {CHUNK_TOKENS}\n\
             layers_per_group = {LAYERS_PER_GROUP}\nworkers = 1\n"
        ),
    )
    .unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let daemon = Proc {
        child: Command::new(&bin)
            .arg("daemon")
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
        name: "daemon",
    };
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .expect("daemon sends READY=1 within 60 s");
    assert_eq!(&buf[..n], b"READY=1");
    Stack {
        dir,
        store,
        daemon,
        socket,
        metrics,
        store_addr,
    }
}

/// `GET /metrics` from the daemon.
pub(crate) fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of one metric line (`name value`).
pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The first `tokens` tokens of the codelm KV in data/.
pub(crate) fn codelm(tokens: usize) -> KvCache {
    let p = data_file("codelm-kv-a.safetensors");
    KvFile::read(&p)
        .unwrap()
        .cache
        .slice_tokens(0, tokens)
        .unwrap()
}

/// Deterministic token ids for a test sequence (`salt` makes distinct sequences).
pub(crate) fn token_ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ salt) % 32_000)
        .collect()
}

/// The shape of a cache.
pub(crate) fn shape_of(c: &KvCache) -> KvShape {
    KvShape {
        num_layers: c.num_layers() as u32,
        tokens: c.tokens() as u32,
        kv_heads: c.kv_heads() as u32,
        head_dim: c.head_dim() as u32,
    }
}

/// A cache's bytes as a client saves them: each layer's K then V, `[tokens, heads, dim]`.
pub(crate) fn nhd_bytes(c: &KvCache) -> Vec<u8> {
    let mut out = Vec::with_capacity(c.nbytes());
    for l in c.layers() {
        out.extend_from_slice(l.key.data());
        out.extend_from_slice(l.value.data());
    }
    out
}

/// The values a fetch must return: `c` quantized and dequantized as the test daemon saves it.
pub(crate) fn expected(c: &KvCache, model: &str, ids: &[u32]) -> KvCache {
    let cfg = EncodeConfig {
        quant: QuantConfig::bits(BITS),
        variant: VariantKind::Zstd,
        hevc_layout: None,
        hevc_stream_frames: None,
        chunk_tokens: CHUNK_TOKENS,
        layers_per_section: LAYERS_PER_GROUP,
    };
    let reg = CodecRegistry::software();
    let fp = ModelFingerprint::of_bytes(model.as_bytes());
    let parts: Vec<KvCache> = encode_cache(c, &fp, ids, &cfg, &reg)
        .unwrap()
        .iter()
        .map(|(_, b)| decode_chunk(b, &reg).unwrap())
        .collect();
    KvCache::concat_tokens(&parts).unwrap()
}

/// The element type of a layout, as the kv crate names it.
pub(crate) fn dtype_of(layout: &TargetLayout) -> DType {
    match layout.dtype {
        kvfetcher_client::DType::F16 => DType::F16,
        kvfetcher_client::DType::BF16 => DType::BF16,
        kvfetcher_client::DType::F32 => DType::F32,
    }
}

/// Checks every `(layer, K/V, token, head)` row of a fetched buffer against `want`, found
/// through the layout's own offset arithmetic; returns the number of values compared.
pub(crate) fn assert_buffer(buf: &[u8], layout: &TargetLayout, want: &KvCache) -> usize {
    let shape = shape_of(want);
    let row = shape.head_dim as usize * layout.dtype.size();
    assert!(buf.len() >= layout.buffer_len(&shape), "buffer too short");
    let mut compared = 0;
    for (li, l) in want.layers().iter().enumerate() {
        for (kv, t) in [(0u32, &l.key), (1u32, &l.value)] {
            let conv = Tensor::from_f32(dtype_of(layout), t.shape(), &t.to_f32()).unwrap();
            let src = conv.data();
            for tok in 0..shape.tokens {
                for h in 0..shape.kv_heads {
                    let off = layout.offset(&shape, li as u32, kv, tok, h);
                    let s = (tok as usize * shape.kv_heads as usize + h as usize) * row;
                    assert_eq!(
                        &buf[off..off + row],
                        &src[s..s + row],
                        "{layout:?} layer {li} kv {kv} token {tok} head {h}"
                    );
                    compared += shape.head_dim as usize;
                }
            }
        }
    }
    compared
}
