//! Test support for the local server: an in-memory [`Backend`] holding real KV (the codelm
//! safetensors file), and a server running `serve` on a temp socket in a background runtime.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kvfetcher::gpu::{GpuDevices, GpuOptions};
use kvfetcher::server::{
    serve_with, Backend, BoxFuture, FetchEvent, FetchEvents, FetchOutcome, ServeError, ServeOptions,
};
use kvfetcher::Destination;
use kvfetcher::Metrics;
use kvfetcher_kv::{DTypeExt, KvFile};
use kvfetcher_protocol::{KvShape, Paging, TargetLayout, TokenOrder};
use tokio::sync::{oneshot, Semaphore};

/// The model id under which the test KV is stored.
pub const MODEL: &str = "codelm-107m";

/// Real KV as f32 values: `layers[l][kv]` is `[tokens, heads, dim]`.
#[derive(Debug, Clone)]
pub struct Kv {
    pub token_ids: Vec<u32>,
    pub heads: u32,
    pub dim: u32,
    pub layers: Vec<[Vec<f32>; 2]>,
}

/// Loads the first `tokens` tokens of the codelm KV in data/.
pub fn load_kv(tokens: usize) -> Kv {
    let p = kvfetcher_testkit::data_file("codelm-kv-a.safetensors");
    let f = KvFile::read(&p).expect("read safetensors");
    let c = f.cache.slice_tokens(0, tokens).expect("slice");
    let token_ids = c
        .token_ids()
        .map(|t| t.to_vec())
        .unwrap_or_else(|| (1000..1000 + tokens as u32).collect());
    Kv {
        token_ids,
        heads: c.kv_heads() as u32,
        dim: c.head_dim() as u32,
        layers: c
            .layers()
            .iter()
            .map(|l| [l.key.to_f32(), l.value.to_f32()])
            .collect(),
    }
}

/// One save the backend received: (model, token ids, shape, data).
pub type Saved = (String, Vec<u32>, KvShape, Vec<u8>);

/// Sets the drop flag when the fetch future is dropped (finished or cancelled).
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// An in-memory backend. Fetch writes one row per (layer, kv, token, head), logs every write,
/// and announces each layer; layers from `gate_from` on wait for a permit on `gate`.
pub struct MemBackend {
    pub models: Mutex<HashMap<String, Arc<Kv>>>,
    /// Every write of the last fetch: (offset, bytes).
    pub writes: Mutex<Vec<(usize, Vec<u8>)>>,
    /// Every save: (model, token ids, shape, data).
    pub saves: Mutex<Vec<Saved>>,
    pub gate_from: u32,
    pub gate: Semaphore,
    /// When set, each lookup waits for a permit on `lookup_gate` before answering.
    pub hold_lookups: bool,
    pub lookup_gate: Semaphore,
    /// Set when a fetch future is dropped.
    pub fetch_dropped: Arc<AtomicBool>,
    pub fetches: AtomicUsize,
    /// When set, every fetch fails with `ServeError::Corrupt` (a damaged stored object).
    pub corrupt_fetches: AtomicBool,
    /// The `replace` flag of every save, in order.
    pub replaces: Mutex<Vec<bool>>,
    /// When set, a save without `replace` of a model already saved keeps the saved KV, as the
    /// store keeps chunks already stored (write-once).
    pub write_once: bool,
}

impl MemBackend {
    pub fn new(kv: Option<Kv>) -> Self {
        MemBackend {
            models: Mutex::new(
                kv.into_iter()
                    .map(|k| (MODEL.to_string(), Arc::new(k)))
                    .collect(),
            ),
            writes: Mutex::new(Vec::new()),
            saves: Mutex::new(Vec::new()),
            gate_from: u32::MAX,
            gate: Semaphore::new(0),
            hold_lookups: false,
            lookup_gate: Semaphore::new(0),
            fetch_dropped: Arc::new(AtomicBool::new(false)),
            fetches: AtomicUsize::new(0),
            corrupt_fetches: AtomicBool::new(false),
            replaces: Mutex::new(Vec::new()),
            write_once: false,
        }
    }

    fn prefix(&self, model: &str, token_ids: &[u32]) -> Result<(Arc<Kv>, u32), ServeError> {
        let kv = self
            .models
            .lock()
            .unwrap()
            .get(model)
            .cloned()
            .ok_or_else(|| ServeError::NotFound(format!("unknown model {model}")))?;
        let n = kv
            .token_ids
            .iter()
            .zip(token_ids)
            .take_while(|(a, b)| a == b)
            .count();
        Ok((kv, n as u32))
    }
}

impl Backend for MemBackend {
    fn lookup<'a>(
        &'a self,
        model: &'a str,
        token_ids: &'a [u32],
    ) -> BoxFuture<'a, Result<u32, ServeError>> {
        Box::pin(async move {
            if self.hold_lookups {
                self.lookup_gate.acquire().await.expect("gate").forget();
            }
            Ok(self.prefix(model, token_ids)?.1)
        })
    }

    fn fetch<'a>(
        &'a self,
        model: &'a str,
        token_ids: &'a [u32],
        layout: &'a TargetLayout,
        dest: Arc<dyn Destination>,
        events: FetchEvents,
    ) -> BoxFuture<'a, Result<FetchOutcome, ServeError>> {
        Box::pin(async move {
            let _flag = DropFlag(self.fetch_dropped.clone());
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if self.corrupt_fetches.load(Ordering::SeqCst) {
                return Err(ServeError::Corrupt("chunk 00: section 1 damaged".into()));
            }
            let (kv, tokens) = self.prefix(model, token_ids)?;
            if tokens == 0 {
                return Err(ServeError::NotFound("no prefix stored".into()));
            }
            let shape = KvShape {
                num_layers: kv.layers.len() as u32,
                tokens,
                kv_heads: kv.heads,
                head_dim: kv.dim,
            };
            dest.allocate(&shape)?;
            events.report(FetchEvent::Allocated(shape));
            self.writes.lock().unwrap().clear();
            let dt = layout.dtype;
            let d = kv.dim as usize;
            let mut row = Vec::new();
            for l in 0..shape.num_layers {
                if l >= self.gate_from {
                    self.gate.acquire().await.expect("gate").forget();
                }
                for k in 0..2u32 {
                    let vals = &kv.layers[l as usize][k as usize];
                    for t in 0..tokens {
                        for h in 0..kv.heads {
                            let at = (t as usize * kv.heads as usize + h as usize) * d;
                            dt.encode_f32(&vals[at..at + d], &mut row);
                            let off = layout.offset(&shape, l, k, t, h);
                            dest.write(off, &row)?;
                            self.writes.lock().unwrap().push((off, row.clone()));
                        }
                    }
                }
                dest.layers_written(l..l + 1);
                events.report(FetchEvent::LayersReady(l..l + 1));
                tokio::task::yield_now().await;
            }
            Ok(FetchOutcome {
                tokens,
                bytes_on_wire: 1234,
            })
        })
    }

    fn save<'a>(
        &'a self,
        model: &'a str,
        token_ids: &'a [u32],
        layout: &'a TargetLayout,
        shape: &'a KvShape,
        data: &'a [u8],
        replace: bool,
    ) -> BoxFuture<'a, Result<u32, ServeError>> {
        Box::pin(async move {
            // Contiguous NHD saves become fetchable, so a client can check the round trip.
            if layout.paging == Paging::Contiguous && layout.order == TokenOrder::Nhd {
                let dt = layout.dtype;
                let n = layout.tensor_len(shape);
                let mut layers = Vec::new();
                for l in data.chunks_exact(2 * n) {
                    let (mut k, mut v) = (Vec::new(), Vec::new());
                    dt.decode_f32(&l[..n], &mut k);
                    dt.decode_f32(&l[n..], &mut v);
                    layers.push([k, v]);
                }
                let kv = Kv {
                    token_ids: token_ids.to_vec(),
                    heads: shape.kv_heads,
                    dim: shape.head_dim,
                    layers,
                };
                let mut models = self.models.lock().unwrap();
                if replace || !self.write_once || !models.contains_key(model) {
                    models.insert(model.to_string(), Arc::new(kv));
                }
            }
            self.replaces.lock().unwrap().push(replace);
            self.saves.lock().unwrap().push((
                model.to_string(),
                token_ids.to_vec(),
                *shape,
                data.to_vec(),
            ));
            Ok(shape.tokens.div_ceil(256))
        })
    }
}

/// The buffer the logged writes describe: zeros everywhere else.
pub fn expected_buffer(len: usize, writes: &[(usize, Vec<u8>)]) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (o, b) in writes {
        v[*o..*o + b.len()].copy_from_slice(b);
    }
    v
}

/// The buffer `MemBackend` produces for `kv` (its first `tokens` tokens) in `layout`.
pub fn reference_buffer(kv: &Kv, tokens: u32, layout: &TargetLayout) -> (KvShape, Vec<u8>) {
    let shape = KvShape {
        num_layers: kv.layers.len() as u32,
        tokens,
        kv_heads: kv.heads,
        head_dim: kv.dim,
    };
    let mut out = vec![0u8; layout.buffer_len(&shape)];
    let dt = layout.dtype;
    let d = kv.dim as usize;
    let mut row = Vec::new();
    for l in 0..shape.num_layers {
        for k in 0..2u32 {
            for t in 0..tokens {
                for h in 0..kv.heads {
                    let at = (t as usize * kv.heads as usize + h as usize) * d;
                    dt.encode_f32(&kv.layers[l as usize][k as usize][at..at + d], &mut row);
                    let off = layout.offset(&shape, l, k, t, h);
                    out[off..off + row.len()].copy_from_slice(&row);
                }
            }
        }
    }
    (shape, out)
}

/// `serve` running on a temp socket in its own runtime thread; stops when dropped.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub backend: Arc<MemBackend>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(backend: MemBackend) -> TestServer {
        Self::start_with(backend, ServeOptions::default())
    }

    pub fn start_with(backend: MemBackend, opts: ServeOptions) -> TestServer {
        Self::start_gpu(backend, opts, GpuOptions::default())
    }

    /// A server whose GPU requests are served under `gpu` (e.g. disabled).
    pub fn start_gpu(backend: MemBackend, opts: ServeOptions, gpu: GpuOptions) -> TestServer {
        Self::start_gpus(
            backend,
            opts,
            Arc::new(GpuDevices::new(gpu, Metrics::new())),
        )
    }

    /// A server sharing `gpus` (and so its metrics) with the test.
    pub fn start_gpus(
        backend: MemBackend,
        opts: ServeOptions,
        gpus: Arc<GpuDevices>,
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvf.sock");
        let backend = Arc::new(backend);
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (b, p) = (backend.clone(), path.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::bind(&p).unwrap();
                ready_tx.send(()).unwrap();
                serve_with(listener, b, opts, gpus, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        ready_rx.recv().unwrap();
        TestServer {
            dir,
            path,
            backend,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Open fds of this process.
/// A raw connection to the server's socket, reads bounded by `read_timeout`.
pub fn raw_conn(
    srv: &TestServer,
    read_timeout: std::time::Duration,
) -> std::os::unix::net::UnixStream {
    let s = std::os::unix::net::UnixStream::connect(&srv.path).unwrap();
    s.set_read_timeout(Some(read_timeout)).unwrap();
    s
}

/// Does the handshake on `s` (current protocol version, which must be accepted).
pub fn handshake(mut s: std::os::unix::net::UnixStream) -> std::os::unix::net::UnixStream {
    use kvfetcher_protocol::{encode_hello, parse_hello, HELLO_LEN, HELLO_OK, PROTOCOL_VERSION};
    use std::io::{Read, Write};
    s.write_all(&encode_hello(PROTOCOL_VERSION)).unwrap();
    let mut r = [0u8; HELLO_LEN];
    s.read_exact(&mut r).unwrap();
    assert_eq!(parse_hello(&r).unwrap(), (PROTOCOL_VERSION, HELLO_OK));
    s
}

pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits up to 5 s for `f` to hold.
pub fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}
