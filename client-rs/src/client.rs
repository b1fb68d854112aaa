//! The blocking client: one Unix-socket connection, calls that block until the daemon answers,
//! and fetch handles whose `wait_layer` blocks on the socket (no polling).
//!
//! A [`Client`] may be shared between threads; calls on one connection are serialized.

use std::ffi::c_void;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::buffer::{
    announced_fetch, reply_error, save_gpu_source, save_memfd, HostMapping, MappedBuffer,
};
use crate::core::{ClientCore, LayerStatus};
use crate::protocol::{
    DaemonStats, Fetch, FetchDone, KvShape, Lookup, Message, Release, Save, Stats, TargetLayout,
    DEFAULT_MAX_FRAME,
};
use crate::transport::{BlockingConn, TransportError};
use crate::ClientError;

#[derive(Debug)]
struct Shared {
    conn: BlockingConn,
    core: ClientCore,
}

impl Shared {
    /// Reads one message and files it; a closed connection reports the daemon's last word.
    fn pump(&mut self) -> Result<(), ClientError> {
        match self.conn.recv() {
            Ok((m, fds)) => {
                self.core.handle_message(m, fds);
                Ok(())
            }
            Err(e @ (TransportError::Closed | TransportError::Io(_))) => {
                Err(fatal_or(&self.core, e))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `msg` (built from a fresh request id) and blocks until its answer.
    fn call(
        &mut self,
        build: impl FnOnce(u64) -> Message,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(Message, Vec<std::os::fd::OwnedFd>), ClientError> {
        let req = self.core.new_request();
        if let Err(e) = self.conn.send(&build(req), fds) {
            self.core.abandon(req);
            return Err(self.send_failed(e));
        }
        loop {
            if let Some(r) = self.core.take_reply(req) {
                return Ok(r);
            }
            if let Err(e) = self.pump() {
                self.core.abandon(req);
                return Err(e);
            }
        }
    }

    /// The error for a failed send: the reason the daemon gave before it closed the
    /// connection (a `busy` refusal is sent before the client's first request), if one is
    /// waiting unread, else the send's error.
    fn send_failed(&mut self, e: TransportError) -> ClientError {
        if matches!(e, TransportError::Io(_)) {
            for (m, fds) in self.conn.recv_ready() {
                self.core.handle_message(m, fds);
            }
        }
        fatal_or(&self.core, e)
    }

    /// Releases `fetch_id` without waiting for the answer (best effort: if the connection is
    /// gone, the daemon has released everything anyway).
    fn release_quietly(&mut self, fetch_id: u64) {
        let req = self.core.new_ignored_request();
        self.core.forget_fetch(fetch_id);
        let _ = self
            .conn
            .send(&Message::Release(Release { req, fetch_id }), &[]);
    }
}

/// The daemon's last word before it closed the connection, if it sent one, else `e`.
pub(crate) fn fatal_or(core: &ClientCore, e: TransportError) -> ClientError {
    match core.fatal() {
        Some((code, message)) => ClientError::Daemon {
            code: *code,
            message: message.clone(),
        },
        None => e.into(),
    }
}

fn lock(s: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding the lock leaves the state consistent enough to keep using: every
    // mutation is a single insert or remove.
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// A blocking connection to the daemon.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Mutex<Shared>>,
}

impl Client {
    /// Connects to the daemon's socket at `path` and performs the handshake.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let conn = BlockingConn::client_handshake(stream, DEFAULT_MAX_FRAME)?;
        Ok(Client {
            shared: Arc::new(Mutex::new(Shared {
                conn,
                core: ClientCore::default(),
            })),
        })
    }

    /// How many leading tokens of `token_ids` the daemon can fetch for `model`.
    pub fn lookup(&self, model: &str, token_ids: &[u32]) -> Result<u32, ClientError> {
        let (m, _) = lock(&self.shared).call(
            |req| {
                Message::Lookup(Lookup {
                    req,
                    model: model.into(),
                    token_ids: token_ids.to_vec(),
                })
            },
            &[],
        )?;
        match m {
            Message::LookupReply(r) => Ok(r.tokens),
            other => Err(reply_error(other)),
        }
    }

    /// Starts fetching the longest available prefix of `token_ids` in `layout`; returns once the
    /// buffer is mapped, before the layers are ready (see [`FetchHandle::wait_layer`]).
    /// Nothing available is [`crate::ErrorCode::NotFound`]. With `layout.memory` =
    /// [`crate::MemoryKind::Gpu`] the buffer is the daemon's device memory opened over CUDA IPC
    /// (see [`FetchHandle::device_ptr`]); a host without the NVIDIA driver gets
    /// [`ClientError::Gpu`].
    pub fn fetch(
        &self,
        model: &str,
        token_ids: &[u32],
        layout: &TargetLayout,
    ) -> Result<FetchHandle, ClientError> {
        self.fetch_mapped(model, token_ids, layout, HostMapping::ReadOnly)
    }

    /// [`Client::fetch`], mapping a host buffer as `host_mapping` says (GPU buffers ignore it).
    pub fn fetch_mapped(
        &self,
        model: &str,
        token_ids: &[u32],
        layout: &TargetLayout,
        host_mapping: HostMapping,
    ) -> Result<FetchHandle, ClientError> {
        let (m, fds) = lock(&self.shared).call(
            |req| {
                Message::Fetch(Fetch {
                    req,
                    model: model.into(),
                    token_ids: token_ids.to_vec(),
                    layout: *layout,
                })
            },
            &[],
        )?;
        let id = announced_fetch(&m);
        let buf = match MappedBuffer::from_reply(m, fds, layout.memory, host_mapping) {
            Ok(b) => b,
            Err(e) => {
                // The daemon made a fetch this client cannot use: release it now.
                if let Some(id) = id {
                    lock(&self.shared).release_quietly(id);
                }
                return Err(e);
            }
        };
        Ok(FetchHandle {
            shared: self.shared.clone(),
            buf,
            released: false,
        })
    }

    /// Hands `data` (KV of `shape` in the host `layout`) to the daemon to store for `model` and
    /// `token_ids`. Returns the number of chunks stored; chunks already stored count as stored
    /// and are kept as they are (stored chunks are write-once).
    pub fn save(
        &self,
        model: &str,
        token_ids: &[u32],
        layout: &TargetLayout,
        shape: &KvShape,
        data: &[u8],
    ) -> Result<u32, ClientError> {
        self.save_replacing(model, token_ids, layout, shape, data, false)
    }

    /// [`Client::save`], overwriting chunks already stored when `replace` is set; the daemon
    /// refuses that (`BadRequest`, "forbidden") unless its `[save] replace_uids` or
    /// `replace_gids` lists this process's uid or gid.
    pub fn save_replacing(
        &self,
        model: &str,
        token_ids: &[u32],
        layout: &TargetLayout,
        shape: &KvShape,
        data: &[u8],
        replace: bool,
    ) -> Result<u32, ClientError> {
        let f = save_memfd(token_ids, layout, shape, data)?;
        let (m, _) = lock(&self.shared).call(
            |req| {
                Message::Save(Save {
                    req,
                    model: model.into(),
                    token_ids: token_ids.to_vec(),
                    layout: *layout,
                    shape: *shape,
                    gpu: None,
                    replace,
                })
            },
            &[f.as_fd()],
        )?;
        match m {
            Message::SaveReply(r) => Ok(r.chunks),
            other => Err(reply_error(other)),
        }
    }

    /// Hands `len` bytes of GPU memory at `device_ptr` (KV of `shape` in `layout`, whose memory
    /// is `Gpu(device)` and names the device holding the pointer) to the daemon to store. The
    /// allocation containing the pointer is exported over CUDA IPC and the daemon copies the
    /// bytes out before it answers: the memory may be reused once this returns. Make sure the
    /// bytes are written (synchronize the writing stream) before calling. Returns the number
    /// of chunks stored.
    pub fn save_gpu(
        &self,
        model: &str,
        token_ids: &[u32],
        layout: &TargetLayout,
        shape: &KvShape,
        device_ptr: u64,
        len: usize,
    ) -> Result<u32, ClientError> {
        let gpu = save_gpu_source(token_ids, layout, shape, device_ptr, len)?;
        let (m, _) = lock(&self.shared).call(
            |req| {
                Message::Save(Save {
                    req,
                    model: model.into(),
                    token_ids: token_ids.to_vec(),
                    layout: *layout,
                    shape: *shape,
                    gpu: Some(gpu),
                    replace: false,
                })
            },
            &[],
        )?;
        match m {
            Message::SaveReply(r) => Ok(r.chunks),
            other => Err(reply_error(other)),
        }
    }

    /// The daemon's counters (and the credentials it recorded for this connection).
    pub fn stats(&self) -> Result<DaemonStats, ClientError> {
        let (m, _) = lock(&self.shared).call(|req| Message::Stats(Stats { req }), &[])?;
        match m {
            Message::StatsReply(r) => Ok(r.stats),
            other => Err(reply_error(other)),
        }
    }
}

/// A fetch in progress or done: its buffer is mapped read-only (host memory) or opened over
/// CUDA IPC (GPU memory). Dropping it closes the buffer, then releases the fetch in the daemon
/// (cancelling it if still running).
#[derive(Debug)]
pub struct FetchHandle {
    shared: Arc<Mutex<Shared>>,
    buf: MappedBuffer,
    released: bool,
}

impl FetchHandle {
    /// The daemon's id of this fetch.
    pub fn id(&self) -> u64 {
        self.buf.fetch_id
    }

    /// The shape being restored (its `tokens` is the prefix the daemon found).
    pub fn shape(&self) -> &KvShape {
        &self.buf.shape
    }

    /// The layout of the buffer.
    pub fn layout(&self) -> &TargetLayout {
        &self.buf.layout
    }

    /// Blocks until the daemon announced `layer` (reading the socket, no polling).
    fn wait_announced(&self, layer: u32) -> Result<(), ClientError> {
        self.buf.check_layer(layer)?;
        let mut s = lock(&self.shared);
        loop {
            match s.core.layer_status(self.buf.fetch_id, layer) {
                LayerStatus::Ready => return Ok(()),
                LayerStatus::Failed(code, message) => {
                    return Err(ClientError::Daemon { code, message })
                }
                LayerStatus::Pending => s.pump()?,
            }
        }
    }

    /// Blocks until `layer` is restored (reading the socket, no polling). For a GPU buffer this
    /// also waits until the GPU finished writing the layer (`cuEventSynchronize`), so the host
    /// may then copy it; an engine should rather use [`FetchHandle::stream_wait_layer`].
    pub fn wait_layer(&self, layer: u32) -> Result<(), ClientError> {
        self.wait_announced(layer)?;
        self.buf.host_wait_announced(layer)
    }

    /// Waits (on the socket, no polling) until the daemon announced `layer` of a GPU buffer,
    /// then makes the work queued on `stream` after this call wait for the layer's restore on
    /// the GPU (`cuStreamWaitEvent`), without blocking the thread on the GPU. Work queued
    /// before the call is not ordered.
    ///
    /// # Safety
    /// `stream` is NULL (the legacy default stream of the device's primary context, i.e. the
    /// CUDA runtime's default stream) or a live `CUstream`/`cudaStream_t` of this process.
    pub unsafe fn stream_wait_layer(
        &self,
        layer: u32,
        stream: *mut c_void,
    ) -> Result<(), ClientError> {
        self.buf.check_stream_wait(layer)?;
        self.wait_announced(layer)?;
        // SAFETY: forwarded caller guarantee.
        unsafe { self.buf.stream_wait_announced(layer, stream) }
    }

    /// The device address (`CUdeviceptr`) of the buffer's first byte in this process, for a
    /// GPU buffer. Valid until the handle is released or dropped; read a layer only after
    /// [`FetchHandle::stream_wait_layer`] (or [`FetchHandle::wait_layer`]) for it.
    pub fn device_ptr(&self) -> Option<u64> {
        self.buf.device_ptr()
    }

    /// The CUDA ordinal of a GPU buffer.
    pub fn device(&self) -> Option<u32> {
        self.buf.device()
    }

    /// The device address of `layer` (K, then V: `layout().layer_len(shape())` bytes) of a GPU
    /// buffer. Does not wait.
    pub fn layer_device_ptr(&self, layer: u32) -> Result<u64, ClientError> {
        self.buf.layer_device_ptr(layer)
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the buffer is empty (never, for a live fetch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blocks until the whole fetch is done and returns the daemon's final report (for a GPU
    /// buffer, after the GPU finished every layer).
    pub fn wait_done(&self) -> Result<FetchDone, ClientError> {
        let mut s = lock(&self.shared);
        loop {
            if let Some(d) = s.core.fetch_done(self.buf.fetch_id) {
                let d = d.clone();
                drop(s);
                self.buf.host_wait_done()?;
                return Ok(d);
            }
            if let LayerStatus::Failed(code, message) = s.core.layer_status(self.buf.fetch_id, 0) {
                return Err(ClientError::Daemon { code, message });
            }
            s.pump()?;
        }
    }

    /// Waits for `layer` and returns its bytes (K tensor, then V tensor). Host buffers only.
    pub fn layer(&self, layer: u32) -> Result<&[u8], ClientError> {
        self.buf.check_host()?;
        self.wait_layer(layer)?;
        self.buf.layer(layer)
    }

    /// Waits for `layer` and returns one of its tensors (`kv`: 0 = K, 1 = V).
    pub fn tensor(&self, layer: u32, kv: u32) -> Result<&[u8], ClientError> {
        self.buf.check_host()?;
        self.wait_layer(layer)?;
        self.buf.tensor(layer, kv)
    }

    /// The whole buffer, ready or not: read only the layers [`FetchHandle::wait_layer`] returned
    /// for. Host buffers only ([`ClientError::WrongMemory`] for a GPU buffer).
    pub fn bytes(&self) -> Result<&[u8], ClientError> {
        self.buf.bytes()
    }

    /// The writable address of the first byte of a host buffer fetched with
    /// [`HostMapping::CopyOnWrite`] ([`ClientError::WrongMemory`] otherwise); valid until the
    /// handle is released or dropped. Writes stay in this process. Does not wait.
    pub fn host_mut_ptr(&self) -> Result<*mut u8, ClientError> {
        self.buf.host_mut_ptr()
    }

    /// Closes the buffer, releases the fetch and waits for the daemon to confirm.
    pub fn release(mut self) -> Result<(), ClientError> {
        self.released = true;
        self.buf.close();
        let id = self.buf.fetch_id;
        let mut s = lock(&self.shared);
        s.core.forget_fetch(id);
        let (m, _) = s.call(|req| Message::Release(Release { req, fetch_id: id }), &[])?;
        match m {
            Message::Released(_) => Ok(()),
            other => Err(reply_error(other)),
        }
    }
}

impl Drop for FetchHandle {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.buf.close();
        lock(&self.shared).release_quietly(self.buf.fetch_id);
    }
}
