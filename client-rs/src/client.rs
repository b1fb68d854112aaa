//! The blocking client: one Unix-socket connection, calls that block until the daemon answers,
//! and fetch handles whose `wait_layer` blocks on the socket (no polling).
//!
//! A [`Client`] may be shared between threads; calls on one connection are serialized.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::buffer::{reply_error, save_memfd, MappedBuffer};
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
            Err(TransportError::Closed) => Err(match self.core.fatal() {
                Some((code, message)) => ClientError::Daemon {
                    code: *code,
                    message: message.clone(),
                },
                None => TransportError::Closed.into(),
            }),
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
            return Err(e.into());
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
    /// Nothing available is [`crate::ErrorCode::NotFound`].
    pub fn fetch(
        &self,
        model: &str,
        token_ids: &[u32],
        layout: &TargetLayout,
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
        let buf = MappedBuffer::from_reply(m, fds)?;
        Ok(FetchHandle {
            shared: self.shared.clone(),
            buf,
            released: false,
        })
    }

    /// Hands `data` (KV of `shape` in the host `layout`) to the daemon to store for `model` and
    /// `token_ids`. Returns the number of chunks stored.
    pub fn save(
        &self,
        model: &str,
        token_ids: &[u32],
        layout: &TargetLayout,
        shape: &KvShape,
        data: &[u8],
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
                })
            },
            &[f.as_fd()],
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

/// A fetch in progress or done: its buffer is mapped read-only. Dropping it releases the fetch
/// in the daemon (cancelling it if still running).
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

    /// Blocks until `layer` is restored (reading the socket, no polling).
    pub fn wait_layer(&self, layer: u32) -> Result<(), ClientError> {
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

    /// Blocks until the whole fetch is done and returns the daemon's final report.
    pub fn wait_done(&self) -> Result<FetchDone, ClientError> {
        let mut s = lock(&self.shared);
        loop {
            if let Some(d) = s.core.fetch_done(self.buf.fetch_id) {
                return Ok(d.clone());
            }
            if let LayerStatus::Failed(code, message) = s.core.layer_status(self.buf.fetch_id, 0) {
                return Err(ClientError::Daemon { code, message });
            }
            s.pump()?;
        }
    }

    /// Waits for `layer` and returns its bytes (K tensor, then V tensor).
    pub fn layer(&self, layer: u32) -> Result<&[u8], ClientError> {
        self.wait_layer(layer)?;
        self.buf.layer(layer)
    }

    /// Waits for `layer` and returns one of its tensors (`kv`: 0 = K, 1 = V).
    pub fn tensor(&self, layer: u32, kv: u32) -> Result<&[u8], ClientError> {
        self.wait_layer(layer)?;
        self.buf.tensor(layer, kv)
    }

    /// The whole buffer, ready or not: read only the layers [`FetchHandle::wait_layer`] returned
    /// for.
    pub fn bytes(&self) -> &[u8] {
        self.buf.bytes()
    }

    /// Releases the fetch and waits for the daemon to confirm.
    pub fn release(mut self) -> Result<(), ClientError> {
        self.released = true;
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
        let mut s = lock(&self.shared);
        let req = s.core.new_ignored_request();
        s.core.forget_fetch(self.buf.fetch_id);
        // Best effort: if the connection is gone, the daemon has released everything anyway.
        let _ = s.conn.send(
            &Message::Release(Release {
                req,
                fetch_id: self.buf.fetch_id,
            }),
            &[],
        );
    }
}
