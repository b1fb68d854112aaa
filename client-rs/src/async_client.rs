//! The async (tokio) client: the same calls as [`crate::Client`], awaiting instead of blocking.
//! `wait_layer` awaits the socket's readiness (no polling).

use std::ffi::c_void;
use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixStream;
use tokio::sync::Mutex;

use crate::buffer::{
    announced_fetch, reply_error, save_gpu_source, save_memfd, HostMapping, MappedBuffer,
};
use crate::client::fatal_or;
use crate::core::{ClientCore, LayerStatus};
use crate::protocol::{
    encode_hello, DaemonStats, Fetch, FetchDone, FrameError, KvShape, Lookup, Message, Release,
    Save, Stats, TargetLayout, DEFAULT_MAX_FRAME, HELLO_OK, PROTOCOL_VERSION,
};
use crate::transport::{send_async, send_bytes_async, AsyncReceiver, TransportError};
use crate::ClientError;

#[derive(Debug)]
struct Shared {
    stream: UnixStream,
    rx: AsyncReceiver,
    core: ClientCore,
}

impl Shared {
    async fn pump(&mut self) -> Result<(), ClientError> {
        match self.rx.recv(&self.stream).await {
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

    async fn call(
        &mut self,
        build: impl FnOnce(u64) -> Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Message, Vec<OwnedFd>), ClientError> {
        let req = self.core.new_request();
        if let Err(e) = send_async(&self.stream, &build(req), fds, DEFAULT_MAX_FRAME).await {
            self.core.abandon(req);
            // The reason the daemon gave before closing (a `busy` refusal), if unread.
            if matches!(e, TransportError::Io(_)) {
                for (m, fds) in self.rx.recv_ready(&self.stream) {
                    self.core.handle_message(m, fds);
                }
            }
            return Err(fatal_or(&self.core, e));
        }
        loop {
            if let Some(r) = self.core.take_reply(req) {
                return Ok(r);
            }
            if let Err(e) = self.pump().await {
                self.core.abandon(req);
                return Err(e);
            }
        }
    }

    /// Releases `fetch_id` without waiting for the answer (best effort: a dead connection has
    /// released everything already).
    async fn release_quietly(&mut self, fetch_id: u64) {
        let req = self.core.new_ignored_request();
        self.core.forget_fetch(fetch_id);
        let msg = Message::Release(Release { req, fetch_id });
        let _ = send_async(&self.stream, &msg, &[], DEFAULT_MAX_FRAME).await;
    }
}

/// An async connection to the daemon. Cheap to clone; calls on one connection are serialized.
#[derive(Debug, Clone)]
pub struct AsyncClient {
    shared: Arc<Mutex<Shared>>,
}

impl AsyncClient {
    /// Connects to the daemon's socket at `path` and performs the handshake.
    pub async fn connect(path: impl AsRef<Path>) -> Result<AsyncClient, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        send_bytes_async(&stream, &encode_hello(PROTOCOL_VERSION), &[])
            .await
            .map_err(TransportError::from)?;
        let mut rx = AsyncReceiver::new(DEFAULT_MAX_FRAME);
        let (theirs, status) = rx.recv_hello(&stream).await?;
        if status != HELLO_OK || theirs != PROTOCOL_VERSION {
            return Err(TransportError::from(FrameError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs,
            })
            .into());
        }
        Ok(AsyncClient {
            shared: Arc::new(Mutex::new(Shared {
                stream,
                rx,
                core: ClientCore::default(),
            })),
        })
    }

    /// How many leading tokens of `token_ids` the daemon can fetch for `model`.
    pub async fn lookup(&self, model: &str, token_ids: &[u32]) -> Result<u32, ClientError> {
        let mk = |req| {
            Message::Lookup(Lookup {
                req,
                model: model.into(),
                token_ids: token_ids.to_vec(),
            })
        };
        match self.shared.lock().await.call(mk, &[]).await?.0 {
            Message::LookupReply(r) => Ok(r.tokens),
            other => Err(reply_error(other)),
        }
    }

    /// Starts a fetch; returns once the buffer is mapped (see [`crate::Client::fetch`]).
    pub async fn fetch(
        &self,
        model: &str,
        token_ids: &[u32],
        layout: &TargetLayout,
    ) -> Result<AsyncFetchHandle, ClientError> {
        let mk = |req| {
            Message::Fetch(Fetch {
                req,
                model: model.into(),
                token_ids: token_ids.to_vec(),
                layout: *layout,
            })
        };
        let (m, fds) = self.shared.lock().await.call(mk, &[]).await?;
        let id = announced_fetch(&m);
        let buf = match MappedBuffer::from_reply(m, fds, layout.memory, HostMapping::ReadOnly) {
            Ok(b) => b,
            Err(e) => {
                // The daemon made a fetch this client cannot use: release it now.
                if let Some(id) = id {
                    self.shared.lock().await.release_quietly(id).await;
                }
                return Err(e);
            }
        };
        Ok(AsyncFetchHandle {
            shared: self.shared.clone(),
            buf,
            released: false,
        })
    }

    /// Hands `data` to the daemon to store (see [`crate::Client::save`]).
    pub async fn save(
        &self,
        model: &str,
        token_ids: &[u32],
        layout: &TargetLayout,
        shape: &KvShape,
        data: &[u8],
    ) -> Result<u32, ClientError> {
        let f = save_memfd(token_ids, layout, shape, data)?;
        let mk = |req| {
            Message::Save(Save {
                req,
                model: model.into(),
                token_ids: token_ids.to_vec(),
                layout: *layout,
                shape: *shape,
                gpu: None,
                replace: false,
            })
        };
        match self.shared.lock().await.call(mk, &[f.as_fd()]).await?.0 {
            Message::SaveReply(r) => Ok(r.chunks),
            other => Err(reply_error(other)),
        }
    }

    /// Hands GPU memory to the daemon to store (see [`crate::Client::save_gpu`]).
    pub async fn save_gpu(
        &self,
        model: &str,
        token_ids: &[u32],
        layout: &TargetLayout,
        shape: &KvShape,
        device_ptr: u64,
        len: usize,
    ) -> Result<u32, ClientError> {
        let gpu = save_gpu_source(token_ids, layout, shape, device_ptr, len)?;
        let mk = |req| {
            Message::Save(Save {
                req,
                model: model.into(),
                token_ids: token_ids.to_vec(),
                layout: *layout,
                shape: *shape,
                gpu: Some(gpu),
                replace: false,
            })
        };
        match self.shared.lock().await.call(mk, &[]).await?.0 {
            Message::SaveReply(r) => Ok(r.chunks),
            other => Err(reply_error(other)),
        }
    }

    /// The daemon's counters (and the credentials it recorded for this connection).
    pub async fn stats(&self) -> Result<DaemonStats, ClientError> {
        let mk = |req| Message::Stats(Stats { req });
        match self.shared.lock().await.call(mk, &[]).await?.0 {
            Message::StatsReply(r) => Ok(r.stats),
            other => Err(reply_error(other)),
        }
    }
}

/// An async fetch handle (see [`crate::FetchHandle`]). Dropping it inside a tokio runtime
/// releases the fetch in the background; otherwise the daemon releases it at disconnect.
#[derive(Debug)]
pub struct AsyncFetchHandle {
    shared: Arc<Mutex<Shared>>,
    buf: MappedBuffer,
    released: bool,
}

impl AsyncFetchHandle {
    /// The daemon's id of this fetch.
    pub fn id(&self) -> u64 {
        self.buf.fetch_id
    }

    /// The shape being restored.
    pub fn shape(&self) -> &KvShape {
        &self.buf.shape
    }

    /// The layout of the buffer.
    pub fn layout(&self) -> &TargetLayout {
        &self.buf.layout
    }

    /// Waits until the daemon announced `layer`.
    async fn wait_announced(&self, layer: u32) -> Result<(), ClientError> {
        self.buf.check_layer(layer)?;
        let mut s = self.shared.lock().await;
        loop {
            match s.core.layer_status(self.buf.fetch_id, layer) {
                LayerStatus::Ready => return Ok(()),
                LayerStatus::Failed(code, message) => {
                    return Err(ClientError::Daemon { code, message })
                }
                LayerStatus::Pending => s.pump().await?,
            }
        }
    }

    /// Waits until `layer` is restored. For a GPU buffer this then blocks the thread until the
    /// GPU finished writing the layer (`cuEventSynchronize`; see
    /// [`crate::FetchHandle::wait_layer`]).
    pub async fn wait_layer(&self, layer: u32) -> Result<(), ClientError> {
        self.wait_announced(layer).await?;
        self.buf.host_wait_announced(layer)
    }

    /// Waits for the announcement of `layer` of a GPU buffer, then orders work queued on
    /// `stream` after this call behind its restore (see
    /// [`crate::FetchHandle::stream_wait_layer`]).
    ///
    /// # Safety
    /// `stream` is NULL or a live `CUstream`/`cudaStream_t` of this process until the returned
    /// future completes.
    pub unsafe fn stream_wait_layer(
        &self,
        layer: u32,
        stream: *mut c_void,
    ) -> impl Future<Output = Result<(), ClientError>> + Send + '_ {
        // Carried as an address so that the future stays Send.
        let stream = stream as usize;
        async move {
            self.buf.check_stream_wait(layer)?;
            self.wait_announced(layer).await?;
            // SAFETY: forwarded caller guarantee (the stream outlives the future).
            unsafe { self.buf.stream_wait_announced(layer, stream as *mut c_void) }
        }
    }

    /// The device address of a GPU buffer's first byte (see [`crate::FetchHandle::device_ptr`]).
    pub fn device_ptr(&self) -> Option<u64> {
        self.buf.device_ptr()
    }

    /// The CUDA ordinal of a GPU buffer.
    pub fn device(&self) -> Option<u32> {
        self.buf.device()
    }

    /// The device address of `layer` of a GPU buffer. Does not wait.
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

    /// Waits until the whole fetch is done and returns the daemon's final report (for a GPU
    /// buffer, after the GPU finished every layer).
    pub async fn wait_done(&self) -> Result<FetchDone, ClientError> {
        let mut s = self.shared.lock().await;
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
            s.pump().await?;
        }
    }

    /// Waits for `layer` and returns its bytes (K tensor, then V tensor).
    pub async fn layer(&self, layer: u32) -> Result<&[u8], ClientError> {
        self.buf.check_host()?;
        self.wait_layer(layer).await?;
        self.buf.layer(layer)
    }

    /// Waits for `layer` and returns one of its tensors (`kv`: 0 = K, 1 = V).
    pub async fn tensor(&self, layer: u32, kv: u32) -> Result<&[u8], ClientError> {
        self.buf.check_host()?;
        self.wait_layer(layer).await?;
        self.buf.tensor(layer, kv)
    }

    /// The whole buffer, ready or not (host buffers only).
    pub fn bytes(&self) -> Result<&[u8], ClientError> {
        self.buf.bytes()
    }

    /// Closes the buffer, releases the fetch and waits for the daemon to confirm.
    pub async fn release(mut self) -> Result<(), ClientError> {
        self.released = true;
        self.buf.close();
        let id = self.buf.fetch_id;
        let mut s = self.shared.lock().await;
        s.core.forget_fetch(id);
        let mk = |req| Message::Release(Release { req, fetch_id: id });
        match s.call(mk, &[]).await?.0 {
            Message::Released(_) => Ok(()),
            other => Err(reply_error(other)),
        }
    }
}

impl Drop for AsyncFetchHandle {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.buf.close();
        let (shared, id) = (self.shared.clone(), self.buf.fetch_id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { shared.lock().await.release_quietly(id).await });
        }
    }
}
