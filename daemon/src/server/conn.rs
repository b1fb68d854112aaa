//! One client connection: handshake, then a read loop that turns each request into a task, and
//! a writer task that sends answers and readiness events in order. When the client goes away
//! (cleanly or not) every task and handle of the connection is dropped.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use kvfetcher_client::memfd;
use kvfetcher_client::protocol::{
    encode_hello_reply, ErrorCode, Fetch, FetchDone, FetchFailed, FrameError, LookupReply,
    MemoryKind, Message, PeerCred, Released, Save, SaveReply, StatsReply, HELLO_OK,
    HELLO_VERSION_UNSUPPORTED, PROTOCOL_VERSION,
};
use kvfetcher_client::transport::{send_async, send_bytes_async, AsyncReceiver, TransportError};
use memmap2::Mmap;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::gpu_buffer::GpuDestination;
use super::host_buffer::HostDestination;
use super::registry::{FetchDest, Handle, Registry};
use super::{Backend, ServeError, ServeOptions};
use crate::gpu::ipc::ImportedBuffer;
use crate::gpu::{GpuDevice, GpuDevices};

/// How long a client may take to send its handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The queue of messages (with their fds) to send to one client, in order.
#[derive(Debug, Clone)]
pub(crate) struct Outbox(mpsc::UnboundedSender<(Message, Vec<OwnedFd>)>);

impl Outbox {
    /// Queues `msg`; a gone client drops it (its fds are closed).
    pub(crate) fn send(&self, msg: Message, fds: Vec<OwnedFd>) {
        let _ = self.0.send((msg, fds));
    }

    fn error(&self, req: Option<u64>, code: ErrorCode, message: impl Into<String>) {
        self.send(
            Message::Error(kvfetcher_client::protocol::Error {
                req,
                code,
                message: message.into(),
            }),
            vec![],
        );
    }

    fn serve_error(&self, req: u64, e: &ServeError) {
        self.error(Some(req), e.code(), e.to_string());
    }
}

/// The state one connection's request handlers share.
struct Ctx {
    conn: u64,
    peer: PeerCred,
    backend: Arc<dyn Backend>,
    registry: Arc<Registry>,
    opts: ServeOptions,
    gpus: Arc<GpuDevices>,
    out: Outbox,
}

/// Serves one accepted connection until the client leaves or the task is aborted.
pub(crate) async fn run(
    stream: UnixStream,
    backend: Arc<dyn Backend>,
    registry: Arc<Registry>,
    opts: ServeOptions,
    gpus: Arc<GpuDevices>,
) {
    let peer = match stream.peer_cred() {
        Ok(c) => PeerCred {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        },
        Err(e) => {
            tracing::warn!("local client without credentials refused: {e}");
            return;
        }
    };
    let conn = registry.connect();
    tracing::info!(conn, pid = ?peer.pid, uid = peer.uid, gid = peer.gid, "local client connected");
    let busy = registry.clients() > opts.max_clients as u64;
    let stream = Arc::new(stream);
    let mut rx = AsyncReceiver::new(opts.max_frame);
    if handshake(&stream, &mut rx, busy).await {
        let (tx, queue) = mpsc::unbounded_channel();
        let out = Outbox(tx);
        let writer = tokio::spawn(write_loop(stream.clone(), queue, opts.max_frame));
        let ctx = Arc::new(Ctx {
            conn,
            peer,
            backend,
            registry: registry.clone(),
            opts,
            gpus,
            out: out.clone(),
        });
        read_loop(&stream, &mut rx, &ctx).await;
        // Cancel the connection's fetches first: their tasks hold the outbox open.
        registry.disconnect(conn);
        drop(ctx);
        drop(out);
        // Drain what is queued (a final error, say), but never wait long on a client that
        // stopped reading.
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    } else {
        registry.disconnect(conn);
    }
    tracing::info!(conn, "local client disconnected");
}

/// Answers the client's hello; false if the connection must close.
async fn handshake(stream: &UnixStream, rx: &mut AsyncReceiver, busy: bool) -> bool {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, rx.recv_hello(stream)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::warn!("bad handshake: {e}");
            return false;
        }
        Err(_) => {
            tracing::warn!("handshake timed out");
            return false;
        }
    };
    let ok = hello.0 == PROTOCOL_VERSION;
    let status = if ok {
        HELLO_OK
    } else {
        HELLO_VERSION_UNSUPPORTED
    };
    let sent = send_bytes_async(stream, &encode_hello_reply(PROTOCOL_VERSION, status), &[]).await;
    if !ok {
        tracing::warn!(theirs = hello.0, "client protocol version unsupported");
        return false;
    }
    if busy {
        let msg = Message::Error(kvfetcher_client::protocol::Error {
            req: None,
            code: ErrorCode::Busy,
            message: "too many clients".into(),
        });
        let _ = send_async(stream, &msg, &[], usize::MAX).await;
        return false;
    }
    sent.is_ok()
}

async fn write_loop(
    stream: Arc<UnixStream>,
    mut queue: mpsc::UnboundedReceiver<(Message, Vec<OwnedFd>)>,
    max_frame: usize,
) {
    while let Some((msg, fds)) = queue.recv().await {
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        if let Err(e) = send_async(&stream, &msg, &borrowed, max_frame).await {
            tracing::debug!("local client write failed: {e}");
            return;
        }
    }
}

async fn read_loop(stream: &UnixStream, rx: &mut AsyncReceiver, ctx: &Arc<Ctx>) {
    // Request tasks of this connection: dropped (aborted) when the loop ends.
    let mut tasks = JoinSet::new();
    loop {
        let (msg, fds) = match rx.recv(stream).await {
            Ok(m) => m,
            Err(TransportError::Closed) => return,
            Err(TransportError::Io(e)) => {
                tracing::debug!("local client read failed: {e}");
                return;
            }
            Err(TransportError::Frame(e)) => {
                let code = match e {
                    FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                    _ => ErrorCode::Malformed,
                };
                tracing::warn!(conn = ctx.conn, "protocol violation: {e}");
                ctx.out.error(None, code, e.to_string());
                return;
            }
        };
        while tasks.try_join_next().is_some() {}
        dispatch(ctx, msg, fds, &mut tasks);
    }
}

fn dispatch(ctx: &Arc<Ctx>, msg: Message, fds: Vec<OwnedFd>, tasks: &mut JoinSet<()>) {
    match msg {
        Message::Lookup(l) => {
            let ctx = ctx.clone();
            tasks.spawn(async move {
                match ctx.backend.lookup(&l.model, &l.token_ids).await {
                    Ok(tokens) => ctx.out.send(
                        Message::LookupReply(LookupReply { req: l.req, tokens }),
                        vec![],
                    ),
                    Err(e) => ctx.out.serve_error(l.req, &e),
                }
            });
        }
        Message::Fetch(f) => start_fetch(ctx, f),
        Message::Save(s) => {
            let ctx = ctx.clone();
            let fd = fds.into_iter().next();
            tasks.spawn(async move {
                let req = s.req;
                match save(&ctx, s, fd).await {
                    Ok(chunks) => {
                        ctx.registry.record_save();
                        ctx.out
                            .send(Message::SaveReply(SaveReply { req, chunks }), vec![]);
                    }
                    Err(e) => ctx.out.serve_error(req, &e),
                }
            });
        }
        Message::Release(r) => match ctx.registry.release(ctx.conn, r.fetch_id) {
            Ok(()) => ctx.out.send(
                Message::Released(Released {
                    req: r.req,
                    fetch_id: r.fetch_id,
                }),
                vec![],
            ),
            Err(a) => {
                let (code, m) = a.report(r.fetch_id);
                ctx.out.error(Some(r.req), code, m);
            }
        },
        Message::Reopen(r) => match ctx.registry.get(ctx.conn, r.fetch_id) {
            Ok(dest) => match dest.buffer_message(r.req) {
                Some((m, fds)) => ctx.out.send(m, fds),
                None => ctx.out.error(
                    Some(r.req),
                    ErrorCode::BadRequest,
                    "buffer not allocated yet",
                ),
            },
            Err(a) => {
                let (code, m) = a.report(r.fetch_id);
                ctx.out.error(Some(r.req), code, m);
            }
        },
        Message::Stats(s) => ctx.out.send(
            Message::StatsReply(StatsReply {
                req: s.req,
                stats: ctx.registry.stats(ctx.peer),
            }),
            vec![],
        ),
        other => ctx.out.error(
            other.req(),
            ErrorCode::UnexpectedMessage,
            format!("message type {:#06x} is not a request", other.type_id()),
        ),
    }
}

fn start_fetch(ctx: &Arc<Ctx>, f: Fetch) {
    let req = f.req;
    let refuse = |code, m: String| ctx.out.error(Some(req), code, m);
    let device = match f.layout.memory {
        MemoryKind::Host => None,
        MemoryKind::Gpu(n) => match open_device(&ctx.gpus, n) {
            Ok(d) => Some(d),
            Err(e) => return ctx.out.serve_error(req, &e),
        },
    };
    if f.token_ids.is_empty() {
        return refuse(ErrorCode::BadRequest, "no token ids".into());
    }
    if let Err(e) = f.layout.checked_buffer_len(&kvfetcher_client::KvShape {
        num_layers: 1,
        tokens: 1,
        kv_heads: 1,
        head_dim: 1,
    }) {
        return refuse(ErrorCode::BadRequest, e.to_string());
    }
    if ctx.registry.count_owned(ctx.conn) >= ctx.opts.max_fetches_per_client {
        return refuse(
            ErrorCode::Busy,
            "too many fetches on this connection".into(),
        );
    }
    let fetch_id = ctx.registry.new_fetch_id();
    let dest = match device {
        None => FetchDest::Host(Arc::new(HostDestination::new(
            req,
            fetch_id,
            f.layout,
            ctx.opts.max_buffer_bytes,
            ctx.out.clone(),
        ))),
        Some(device) => FetchDest::Gpu(Arc::new(GpuDestination::new(
            req,
            fetch_id,
            f.layout,
            ctx.opts.max_buffer_bytes,
            ctx.out.clone(),
            device,
        ))),
    };
    ctx.registry.insert(
        fetch_id,
        Handle {
            owner: ctx.conn,
            peer: ctx.peer,
            dest: dest.clone(),
            task: None,
        },
    );
    let c = ctx.clone();
    // Not in the connection's JoinSet: the registry owns the task's abort handle, so a release
    // or the disconnect cancels it.
    let task = tokio::spawn(async move {
        let d = dest.as_dyn();
        let res = c.backend.fetch(&f.model, &f.token_ids, &f.layout, d).await;
        match res {
            Ok(o) if dest.is_allocated() => {
                c.registry.record_done(o.tokens);
                c.out.send(
                    Message::FetchDone(FetchDone {
                        req,
                        fetch_id,
                        tokens: o.tokens,
                        bytes_on_wire: o.bytes_on_wire,
                    }),
                    vec![],
                );
            }
            Ok(o) => {
                c.registry.finish_failed(fetch_id);
                let (code, message) = if o.tokens == 0 {
                    (ErrorCode::NotFound, "no tokens available".to_string())
                } else {
                    (ErrorCode::Internal, "backend wrote no buffer".to_string())
                };
                c.out.send(
                    Message::FetchFailed(FetchFailed {
                        req,
                        fetch_id,
                        code,
                        message,
                    }),
                    vec![],
                );
            }
            Err(e) => {
                c.registry.finish_failed(fetch_id);
                c.out.send(
                    Message::FetchFailed(FetchFailed {
                        req,
                        fetch_id,
                        code: e.code(),
                        message: e.to_string(),
                    }),
                    vec![],
                );
            }
        }
    });
    ctx.registry.set_task(fetch_id, task.abort_handle());
}

/// The bytes of a save: the client's sealed memfd mapped in place, or a private copy.
enum SaveData {
    Mapped(Mmap),
    Copied(Vec<u8>),
}

impl SaveData {
    fn bytes(&self) -> &[u8] {
        match self {
            SaveData::Mapped(m) => m,
            SaveData::Copied(v) => v,
        }
    }
}

/// Device `n`, opened on first use. Opening loads the driver and JITs the kernels once per
/// device, so on a multi-threaded runtime it runs in place of a worker rather than stalling one.
fn open_device(gpus: &GpuDevices, n: u32) -> Result<Arc<GpuDevice>, ServeError> {
    let open = || gpus.device(n as usize).map_err(ServeError::from);
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(open),
        _ => open(),
    }
}

/// Checks a save's token count against its shape and returns the buffer length it names.
fn save_len(ctx: &Ctx, s: &Save) -> Result<usize, ServeError> {
    if s.shape.tokens as usize != s.token_ids.len() {
        return Err(ServeError::BadRequest(format!(
            "shape has {} tokens but {} token ids were given",
            s.shape.tokens,
            s.token_ids.len()
        )));
    }
    let len = s
        .layout
        .checked_buffer_len(&s.shape)
        .map_err(|e| ServeError::BadRequest(e.to_string()))?;
    if len == 0 || len as u64 > ctx.opts.max_buffer_bytes {
        return Err(ServeError::BadRequest(format!("bad save size {len}")));
    }
    Ok(len)
}

async fn save(ctx: &Ctx, s: Save, fd: Option<OwnedFd>) -> Result<u32, ServeError> {
    match (s.layout.memory, &s.gpu) {
        (MemoryKind::Host, Some(_)) => {
            return Err(ServeError::BadRequest(
                "a host save carries no gpu source".into(),
            ))
        }
        (MemoryKind::Gpu(_), None) => {
            return Err(ServeError::BadRequest(
                "a gpu save needs a gpu source (cuda ipc handle)".into(),
            ))
        }
        (MemoryKind::Gpu(n), Some(_)) => return gpu_save(ctx, &s, n, fd).await,
        (MemoryKind::Host, None) => {}
    }
    let fd = fd.ok_or_else(|| ServeError::BadRequest("save without a buffer fd".into()))?;
    let len = save_len(ctx, &s)?;
    let file = File::from(fd);
    let size = file.metadata()?.len();
    if size != len as u64 {
        return Err(ServeError::BadRequest(format!(
            "buffer is {size} bytes, layout needs {len}"
        )));
    }
    let data = tokio::task::spawn_blocking(move || read_save(file, len))
        .await
        .map_err(|e| ServeError::Internal(e.to_string()))??;
    ctx.backend
        .save(&s.model, &s.token_ids, &s.layout, &s.shape, data.bytes())
        .await
}

/// A save whose bytes are in the client's GPU memory: the daemon opens the client's CUDA IPC
/// handle, copies the bytes to the host, and saves them like a host buffer. The client must
/// have finished writing them (synchronised its stream) before sending the request.
async fn gpu_save(ctx: &Ctx, s: &Save, n: u32, fd: Option<OwnedFd>) -> Result<u32, ServeError> {
    let bad = |m: String| Err(ServeError::BadRequest(m));
    let Some(src) = &s.gpu else {
        return bad("a gpu save needs a gpu source".into());
    };
    if fd.is_some() {
        return bad("a gpu save carries no fd".into());
    }
    if src.device != n {
        return bad(format!(
            "gpu source is on gpu:{}, layout says gpu:{n}",
            src.device
        ));
    }
    let Ok(handle) = <[u8; 64]>::try_from(src.mem_handle.as_slice()) else {
        return bad(format!(
            "mem_handle is {} bytes, a cuda ipc handle is 64",
            src.mem_handle.len()
        ));
    };
    let len = save_len(ctx, s)?;
    if src.len != len as u64 {
        return bad(format!(
            "gpu source is {} bytes, layout needs {len}",
            src.len
        ));
    }
    let Some(end) = usize::try_from(src.offset)
        .ok()
        .and_then(|o| o.checked_add(len))
    else {
        return bad("gpu source offset overflows".into());
    };
    let offset = end - len;
    let device = open_device(&ctx.gpus, n)?;
    let data = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ServeError> {
        let unreadable = |e: crate::gpu::GpuError| {
            ServeError::BadRequest(format!("cannot read the gpu source: {e}"))
        };
        let imported = ImportedBuffer::open(device.cuda(), handle, end).map_err(unreadable)?;
        // Check the range against the real allocation before allocating the copy.
        let real = imported.allocation_len().map_err(unreadable)?;
        if end > real {
            return Err(ServeError::BadRequest(format!(
                "gpu source range ends at {end}, the allocation holds {real} bytes"
            )));
        }
        let mut v = vec![0u8; len];
        imported.read_at(offset, &mut v).map_err(unreadable)?;
        Ok(v)
    })
    .await
    .map_err(|e| ServeError::Internal(e.to_string()))??;
    let host = kvfetcher_client::protocol::TargetLayout {
        memory: MemoryKind::Host,
        ..s.layout
    };
    ctx.backend
        .save(&s.model, &s.token_ids, &host, &s.shape, &data)
        .await
}

fn read_save(mut file: File, len: usize) -> Result<SaveData, ServeError> {
    if memfd::is_sealed_readonly(&file) {
        // SAFETY: the memfd is sealed against writes, shrinking and growing (checked above), so
        // nobody can change or truncate the bytes while they are mapped.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(&file) }?;
        return Ok(SaveData::Mapped(map));
    }
    let mut v = Vec::with_capacity(len);
    (&mut file).take(len as u64).read_to_end(&mut v)?;
    if v.len() != len {
        return Err(ServeError::BadRequest("buffer shrank while read".into()));
    }
    Ok(SaveData::Copied(v))
}
