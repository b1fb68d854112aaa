//! `kvfetcher._native`: the native half of the `kvfetcher` Python package, a thin layer over
//! `kvfetcher-client` (the one implementation of the local protocol). Tensors cross as DLPack
//! capsules; the pure-Python half (`kvfetcher/__init__.py`) turns them into torch tensors, picks
//! the caller's CUDA stream and checks arguments with messages in Python's terms.
//!
//! Blocking calls release the GIL. Client errors become `kvfetcher.errors` exceptions; nothing
//! here panics on input (PyO3 would turn a panic into `PanicException` anyway).

mod dlpack;
mod errors;

use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use kvfetcher_client::{
    Client, ClientError, DType, FetchHandle, HostMapping, KvShape, MemoryKind, Paging,
    TargetLayout, TokenOrder,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use dlpack::{DlDevice, Imported, TensorSpec, DEVICE_CPU, DEVICE_CUDA};
use errors::{invalid, raise, IntoPy};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single take or clone: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse_dtype(py: Python<'_>, s: &str) -> PyResult<DType> {
    match s {
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f32" | "float32" => Ok(DType::F32),
        other => Err(invalid(
            py,
            format!("dtype must be float16, bfloat16 or float32, not {other:?}"),
        )),
    }
}

fn dtype_str(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F32 => "float32",
    }
}

fn parse_order(py: Python<'_>, s: &str) -> PyResult<TokenOrder> {
    match s {
        "nhd" => Ok(TokenOrder::Nhd),
        "hnd" => Ok(TokenOrder::Hnd),
        other => Err(invalid(
            py,
            format!("order must be \"nhd\" or \"hnd\", not {other:?}"),
        )),
    }
}

/// A layout from its Python parts (`block_tokens` 0: contiguous; `gpu`: a CUDA ordinal).
fn layout(
    py: Python<'_>,
    dtype: &str,
    order: &str,
    block_tokens: u32,
    gpu: Option<u32>,
) -> PyResult<TargetLayout> {
    Ok(TargetLayout {
        dtype: parse_dtype(py, dtype)?,
        order: parse_order(py, order)?,
        paging: match block_tokens {
            0 => Paging::Contiguous,
            n => Paging::Paged { block_tokens: n },
        },
        memory: gpu.map_or(MemoryKind::Host, MemoryKind::Gpu),
    })
}

/// A blocking connection to the daemon (`kvfetcher.Client` wraps it).
#[pyclass(module = "kvfetcher._native", name = "Client", frozen)]
struct PyClient {
    client: Mutex<Option<Client>>,
    socket_path: String,
}

impl PyClient {
    fn client(&self, py: Python<'_>) -> PyResult<Client> {
        lock(&self.client).clone().ok_or_else(|| {
            raise(
                py,
                "ClientClosedError",
                "client_closed",
                "the client was closed".into(),
            )
        })
    }
}

#[pymethods]
impl PyClient {
    /// Connects to the daemon's socket and performs the handshake.
    #[new]
    fn new(py: Python<'_>, socket_path: PathBuf) -> PyResult<Self> {
        let path = socket_path.clone();
        let client = py.detach(move || Client::connect(&path)).py_err(py)?;
        Ok(PyClient {
            client: Mutex::new(Some(client)),
            socket_path: socket_path.display().to_string(),
        })
    }

    /// The socket path.
    #[getter]
    fn socket_path(&self) -> String {
        self.socket_path.clone()
    }

    /// Whether `close` was called.
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.client).is_none()
    }

    /// Drops this object's hold on the connection; it closes once no fetch handle or tensor
    /// uses it either. Calls made after it raise `ClientClosedError`. Idempotent.
    fn close(&self) {
        lock(&self.client).take();
    }

    /// How many leading tokens of `tokens` the daemon can fetch for `model`.
    fn lookup(&self, py: Python<'_>, model: &str, tokens: Vec<u32>) -> PyResult<u32> {
        let c = self.client(py)?;
        let model = model.to_owned();
        py.detach(move || c.lookup(&model, &tokens)).py_err(py)
    }

    /// Starts a fetch and maps its buffer (host: copy-on-write; GPU: CUDA IPC).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (model, tokens, dtype, order, block_tokens, gpu))]
    fn fetch(
        &self,
        py: Python<'_>,
        model: &str,
        tokens: Vec<u32>,
        dtype: &str,
        order: &str,
        block_tokens: u32,
        gpu: Option<u32>,
    ) -> PyResult<PyFetch> {
        let layout = layout(py, dtype, order, block_tokens, gpu)?;
        let c = self.client(py)?;
        let model = model.to_owned();
        let h = py
            .detach(move || c.fetch_mapped(&model, &tokens, &layout, HostMapping::CopyOnWrite))
            .py_err(py)?;
        Ok(PyFetch {
            id: h.id(),
            shape: *h.shape(),
            layout: *h.layout(),
            nbytes: h.len(),
            handle: Mutex::new(Some(Arc::new(h))),
        })
    }

    /// Saves KV: `data` is a DLPack capsule of one compact tensor holding the whole buffer in
    /// the layout (per layer K then V), in host or CUDA memory. Returns the chunks stored.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (model, tokens, dtype, order, block_tokens, num_layers, kv_heads, head_dim, data, replace=false))]
    fn save(
        &self,
        py: Python<'_>,
        model: &str,
        tokens: Vec<u32>,
        dtype: &str,
        order: &str,
        block_tokens: u32,
        num_layers: u32,
        kv_heads: u32,
        head_dim: u32,
        data: &Bound<'_, PyAny>,
        replace: bool,
    ) -> PyResult<u32> {
        let shape = KvShape {
            num_layers,
            tokens: u32::try_from(tokens.len())
                .map_err(|_| invalid(py, "too many tokens for one save"))?,
            kv_heads,
            head_dim,
        };
        let t = Imported::take(py, data)?;
        let dev = t.device();
        let gpu = match dev.device_type {
            DEVICE_CPU => None,
            DEVICE_CUDA => Some(dev.device_id as u32),
            other => {
                return Err(invalid(
                    py,
                    format!(
                    "tensors must be in host (cpu) or CUDA memory, not DLPack device type {other}"
                ),
                ))
            }
        };
        let layout = layout(py, dtype, order, block_tokens, gpu)?;
        match t.kv_dtype() {
            Ok(d) if d == layout.dtype => {}
            Ok(d) => {
                return Err(invalid(
                    py,
                    format!(
                        "tensors are {}, the layout is {}",
                        dtype_str(d),
                        dtype_str(layout.dtype)
                    ),
                ))
            }
            Err(name) => {
                return Err(invalid(
                    py,
                    format!("tensors are {name}: KV must be float16, bfloat16 or float32"),
                ))
            }
        }
        if !t.is_compact() {
            return Err(invalid(py, "the KV tensor is not contiguous"));
        }
        let len = t.numel() * layout.dtype.size();
        let want = layout
            .checked_buffer_len(&shape)
            .map_err(ClientError::from)
            .py_err(py)?;
        if len != want {
            return Err(invalid(
                py,
                format!("the KV tensor holds {len} bytes, the layout of {shape:?} needs {want}"),
            ));
        }
        let c = self.client(py)?;
        let model = model.to_owned();
        let ptr = t.data();
        let r = match gpu {
            None => {
                // Carried as an address so that the closure is Send.
                let addr = ptr as usize;
                py.detach(move || {
                    // SAFETY: `t` (the producer's tensor) stays alive until after this closure
                    // returns (it is dropped below, under the GIL); it is compact, on the host,
                    // and `len` bytes long (checked above).
                    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                    c.save_replacing(&model, &tokens, &layout, &shape, bytes, replace)
                })
            }
            Some(_) if replace => Err(ClientError::InvalidArgument(
                "replace is not supported for saves from GPU memory".into(),
            )),
            Some(_) => py.detach(move || c.save_gpu(&model, &tokens, &layout, &shape, ptr, len)),
        };
        drop(t);
        r.py_err(py)
    }

    /// The daemon's counters and the credentials it recorded for this connection.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.client(py)?;
        let s = py.detach(move || c.stats()).py_err(py)?;
        let d = PyDict::new(py);
        d.set_item("clients", s.clients)?;
        d.set_item("fetches_active", s.fetches_active)?;
        d.set_item("fetches_total", s.fetches_total)?;
        d.set_item("tokens_restored", s.tokens_restored)?;
        d.set_item("saves_total", s.saves_total)?;
        d.set_item("pid", s.peer.pid)?;
        d.set_item("uid", s.peer.uid)?;
        d.set_item("gid", s.peer.gid)?;
        Ok(d)
    }
}

/// A fetch: its buffer stays mapped (and the daemon's fetch alive) while this object or any
/// tensor exported from it lives.
#[pyclass(module = "kvfetcher._native", name = "Fetch", frozen)]
struct PyFetch {
    handle: Mutex<Option<Arc<FetchHandle>>>,
    id: u64,
    shape: KvShape,
    layout: TargetLayout,
    nbytes: usize,
}

impl PyFetch {
    fn handle(&self, py: Python<'_>) -> PyResult<Arc<FetchHandle>> {
        lock(&self.handle).clone().ok_or_else(|| {
            raise(
                py,
                "ReleasedError",
                "released",
                format!("fetch {} was released", self.id),
            )
        })
    }

    fn check_layer(&self, py: Python<'_>, layer: u32) -> PyResult<()> {
        if layer >= self.shape.num_layers {
            return Err(ClientError::LayerOutOfRange {
                layer,
                layers: self.shape.num_layers,
            })
            .py_err(py);
        }
        Ok(())
    }

    /// The shape of one K (or V) tensor of a layer.
    fn tensor_shape(&self) -> Vec<i64> {
        let s = &self.shape;
        let (h, d) = (i64::from(s.kv_heads), i64::from(s.head_dim));
        match (self.layout.paging, self.layout.order) {
            (Paging::Contiguous, TokenOrder::Nhd) => vec![i64::from(s.tokens), h, d],
            (Paging::Contiguous, TokenOrder::Hnd) => vec![h, i64::from(s.tokens), d],
            (Paging::Paged { block_tokens }, order) => {
                let bt = i64::from(block_tokens);
                let blocks = (self.layout.slots(s) as i64) / bt.max(1);
                match order {
                    TokenOrder::Nhd => vec![blocks, bt, h, d],
                    TokenOrder::Hnd => vec![blocks, h, bt, d],
                }
            }
        }
    }
}

#[pymethods]
impl PyFetch {
    /// The daemon's id of this fetch.
    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    /// `(num_layers, tokens, kv_heads, head_dim)`; `tokens` is the prefix fetched.
    #[getter]
    fn shape(&self) -> (u32, u32, u32, u32) {
        let s = &self.shape;
        (s.num_layers, s.tokens, s.kv_heads, s.head_dim)
    }

    /// The element type's name (`float16`, `bfloat16`, `float32`).
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_str(self.layout.dtype)
    }

    /// `nhd` or `hnd`.
    #[getter]
    fn order(&self) -> &'static str {
        match self.layout.order {
            TokenOrder::Nhd => "nhd",
            TokenOrder::Hnd => "hnd",
        }
    }

    /// Tokens per block of a paged layout, 0 for a contiguous one.
    #[getter]
    fn block_tokens(&self) -> u32 {
        match self.layout.paging {
            Paging::Contiguous => 0,
            Paging::Paged { block_tokens } => block_tokens,
        }
    }

    /// The CUDA ordinal of a GPU buffer, None for host memory.
    #[getter]
    fn gpu(&self) -> Option<u32> {
        match self.layout.memory {
            MemoryKind::Host => None,
            MemoryKind::Gpu(n) => Some(n),
        }
    }

    /// The buffer's length in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }

    /// The shape of one K (or V) tensor of a layer.
    #[getter(tensor_shape)]
    fn py_tensor_shape(&self) -> Vec<i64> {
        self.tensor_shape()
    }

    /// Whether `release` was called.
    #[getter]
    fn released(&self) -> bool {
        lock(&self.handle).is_none()
    }

    /// Blocks (GIL released) until `layer` is restored; for a GPU buffer also until the GPU
    /// finished writing it.
    fn wait_layer(&self, py: Python<'_>, layer: u32) -> PyResult<()> {
        self.check_layer(py, layer)?;
        let h = self.handle(py)?;
        py.detach(move || h.wait_layer(layer)).py_err(py)
    }

    /// Blocks (GIL released) until the daemon announced `layer` of a GPU buffer, then makes
    /// work queued later on `stream` wait for its restore. `stream` must be 0 (the legacy
    /// default stream) or a live `cudaStream_t` of this process (`torch.cuda.Stream.cuda_stream`).
    fn stream_wait_layer(&self, py: Python<'_>, layer: u32, stream: usize) -> PyResult<()> {
        self.check_layer(py, layer)?;
        let h = self.handle(py)?;
        py.detach(move || {
            // SAFETY: the caller's contract (documented above and in _native.pyi): `stream` is
            // 0 or a live CUDA stream of this process.
            unsafe { h.stream_wait_layer(layer, stream as *mut c_void) }
        })
        .py_err(py)
    }

    /// Waits (GIL released) for the whole fetch; returns `(tokens, bytes_on_wire)`.
    fn wait_done(&self, py: Python<'_>) -> PyResult<(u32, u64)> {
        let h = self.handle(py)?;
        let d = py.detach(move || h.wait_done()).py_err(py)?;
        Ok((d.tokens, d.bytes_on_wire))
    }

    /// DLPack capsules `(K, V)` over `layer` of the buffer, without waiting: call `wait_layer`
    /// (host) or `stream_wait_layer` (GPU) first. Each keeps the buffer alive.
    fn layer_dlpack<'py>(
        &self,
        py: Python<'py>,
        layer: u32,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        self.check_layer(py, layer)?;
        let h = self.handle(py)?;
        let (base, device) = match self.layout.memory {
            MemoryKind::Host => (
                h.host_mut_ptr().py_err(py)? as u64,
                DlDevice {
                    device_type: DEVICE_CPU,
                    device_id: 0,
                },
            ),
            MemoryKind::Gpu(n) => (
                h.device_ptr()
                    .ok_or_else(|| invalid(py, "the buffer is not in GPU memory"))?,
                DlDevice {
                    device_type: DEVICE_CUDA,
                    device_id: n as i32,
                },
            ),
        };
        let layer_at = (layer as usize * self.layout.layer_len(&self.shape)) as u64;
        let tensor_len = self.layout.tensor_len(&self.shape) as u64;
        let shape = self.tensor_shape();
        let mut out = Vec::with_capacity(2);
        for kv in 0..2u64 {
            let spec = TensorSpec {
                data: base + layer_at + kv * tensor_len,
                device,
                dtype: self.layout.dtype,
                shape: shape.clone(),
            };
            // SAFETY: the tensor lies inside the fetch's buffer (layer < num_layers, checked;
            // the layout's arithmetic), which is writable (copy-on-write host mapping or device
            // memory) and stays mapped while the handle lives; the capsule owns a reference to
            // the handle.
            out.push(unsafe { dlpack::export(py, spec, Box::new(h.clone()))? });
        }
        let v = out.pop().expect("two tensors");
        let k = out.pop().expect("two tensors");
        Ok((k, v))
    }

    /// Lets go of the buffer. With no tensor over it left, the fetch is released now and the
    /// daemon's confirmation awaited (returns True); otherwise the release happens when the last
    /// tensor is freed (returns False). Idempotent: a second call returns False.
    fn release(&self, py: Python<'_>) -> PyResult<bool> {
        let Some(h) = lock(&self.handle).take() else {
            return Ok(false);
        };
        match Arc::try_unwrap(h) {
            Ok(h) => {
                py.detach(move || h.release()).py_err(py)?;
                Ok(true)
            }
            Err(shared) => {
                drop(shared);
                Ok(false)
            }
        }
    }
}

/// The model id of a model file: `sha256:` and the hex SHA-256 of its bytes (cached per path).
#[pyfunction]
fn model_id_from_file(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    Ok(py.detach(move || kvfetcher_client::model_id::model_id_from_file(&path))?)
}

/// None when the CUDA driver can be used for GPU buffers, else the reason it cannot.
#[pyfunction]
fn gpu_unavailable_reason(py: Python<'_>) -> Option<String> {
    py.detach(|| {
        kvfetcher_client::driver_available()
            .err()
            .map(|e| e.to_string())
    })
}

/// The buffer length of a layout in bytes (the reference arithmetic of client-rs).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn buffer_len(
    py: Python<'_>,
    dtype: &str,
    order: &str,
    block_tokens: u32,
    num_layers: u32,
    tokens: u32,
    kv_heads: u32,
    head_dim: u32,
) -> PyResult<usize> {
    let l = layout(py, dtype, order, block_tokens, None)?;
    l.checked_buffer_len(&KvShape {
        num_layers,
        tokens,
        kv_heads,
        head_dim,
    })
    .map_err(ClientError::from)
    .py_err(py)
}

/// The module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyClient>()?;
    m.add_class::<PyFetch>()?;
    m.add_function(wrap_pyfunction!(model_id_from_file, m)?)?;
    m.add_function(wrap_pyfunction!(gpu_unavailable_reason, m)?)?;
    m.add_function(wrap_pyfunction!(buffer_len, m)?)?;
    Ok(())
}
