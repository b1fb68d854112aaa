//! One client connection: handshake and admission (`hello`, `admission`), then a read loop that turns each request into a task, and
//! a writer task that sends answers and readiness events in order. When the client goes away
//! (cleanly or not) every task and handle of the connection is dropped.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use kvfetcher_protocol::memfd;
use kvfetcher_protocol::transport::{send_async, AsyncReceiver, TransportError};
use kvfetcher_protocol::{
    ErrorCode, Fetch, FetchBuffer as BufferMessage, FetchDone, FetchFailed, FrameError,
    LayersReady, LookupReply, MemoryKind, Message, PeerCred, Released, Save, SaveReply, StatsReply,
};
use memmap2::Mmap;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::admission::HandshakeSlot;
use super::hello;
use super::outbox::{CloseReason, Closer, Outbox, Queued};
use super::registry::{FetchLimit, Handle, Registry};
use super::{Backend, FetchEvent, FetchEvents, ServeError, ServeOptions};
use crate::buffers::{Buffers, FetchBuffer};

/// The state one connection's request handlers share.
struct Ctx {
    conn: u64,
    peer: PeerCred,
    backend: Arc<dyn Backend>,
    registry: Arc<Registry>,
    opts: ServeOptions,
    buffers: Arc<Buffers>,
    out: Outbox,
}

/// Serves one accepted connection until the client leaves or the task is aborted. `slot` is
/// the connection's place among pending handshakes, held until it is a client (or refused).
pub(crate) async fn run(
    stream: UnixStream,
    backend: Arc<dyn Backend>,
    registry: Arc<Registry>,
    opts: ServeOptions,
    buffers: Arc<Buffers>,
    mut slot: HandshakeSlot,
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
    let metrics = buffers.metrics().clone();
    let stream = Arc::new(stream);
    let mut rx = AsyncReceiver::new(opts.max_frame);
    let Some(peer_flags) = hello::handshake(
        &stream,
        &mut rx,
        &mut slot,
        opts.handshake_timeout,
        &metrics,
    )
    .await
    else {
        return;
    };
    let conn = registry.new_conn_id();
    let place = registry
        .clients
        .admit(peer.uid, opts.max_clients, opts.max_clients_per_uid);
    if !hello::accept(&stream).await {
        return;
    }
    let _place = match place {
        Ok(p) => p,
        Err(r) => {
            r.count(&metrics);
            tracing::warn!(conn, pid = ?peer.pid, uid = peer.uid, "local client refused: {}", r.message());
            hello::refuse(&stream, &mut slot, r.message()).await;
            return;
        }
    };
    drop(slot);
    tracing::info!(conn, pid = ?peer.pid, uid = peer.uid, gid = peer.gid, "local client connected");
    let closer = Closer::new();
    let (out, queue) = Outbox::new(
        opts.max_queued_replies,
        closer.clone(),
        metrics.clone(),
        peer_flags,
    );
    let writer = tokio::spawn(write_loop(stream.clone(), queue, opts.max_frame));
    let ctx = Arc::new(Ctx {
        conn,
        peer,
        backend,
        registry: registry.clone(),
        opts,
        buffers,
        out: out.clone(),
    });
    let cut = read_loop(&stream, &mut rx, &ctx, &closer).await;
    // Cancel the connection's fetches first: their tasks hold the outbox open.
    registry.disconnect(conn);
    drop(ctx);
    if let Some(reason) = cut {
        reason.count(&metrics);
        tracing::warn!(conn, pid = ?peer.pid, uid = peer.uid, "local client disconnected: {}", reason.describe());
        if reason.tells_client() {
            out.error(None, ErrorCode::Busy, reason.describe());
        }
    }
    drop(out);
    if cut.is_some_and(|r| !r.tells_client()) {
        // The client does not read: drop what is queued for it unsent.
        writer.abort();
    } else {
        // Drain what is queued (a final error, say), but never wait long on a client that
        // stopped reading.
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    }
    tracing::info!(conn, "local client disconnected");
}

async fn write_loop(stream: Arc<UnixStream>, mut queue: mpsc::Receiver<Queued>, max_frame: usize) {
    while let Some(q) = queue.recv().await {
        let borrowed: Vec<_> = q.fds.iter().map(|f| f.as_fd()).collect();
        if let Err(e) = send_async(&stream, &q.msg, &borrowed, max_frame).await {
            tracing::debug!("local client write failed: {e}");
            return;
        }
    }
}

/// Reads and dispatches requests until the client leaves (`None`) or the connection is cut
/// off (the reason).
async fn read_loop(
    stream: &UnixStream,
    rx: &mut AsyncReceiver,
    ctx: &Arc<Ctx>,
    closer: &Closer,
) -> Option<CloseReason> {
    // Request tasks of this connection: dropped (aborted) when the loop ends.
    let mut tasks = JoinSet::new();
    let idle = ctx.opts.idle_timeout;
    let mut idle_at = idle.map(|d| Instant::now() + d);
    loop {
        // `recv` keeps a partial frame in `rx` across cancellation, and the connection ends
        // when the closer or the idle timer wins anyway.
        let received = tokio::select! {
            biased;
            reason = closer.closed() => return Some(reason),
            () = sleep_until(idle_at) => {
                while tasks.try_join_next().is_some() {}
                if tasks.is_empty() && ctx.registry.count_owned(ctx.conn) == 0 {
                    return Some(CloseReason::Idle);
                }
                // Waiting for its own requests or holding fetches is not idle.
                idle_at = idle.map(|d| Instant::now() + d);
                continue;
            }
            r = rx.recv(stream) => r,
        };
        idle_at = idle.map(|d| Instant::now() + d);
        let (msg, fds) = match received {
            Ok(m) => m,
            Err(TransportError::Closed) => return None,
            Err(TransportError::Io(e)) => {
                tracing::debug!("local client read failed: {e}");
                return None;
            }
            Err(TransportError::Frame(e)) => {
                let code = match e {
                    FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                    _ => ErrorCode::Malformed,
                };
                tracing::warn!(conn = ctx.conn, "protocol violation: {e}");
                ctx.out.error(None, code, e.to_string());
                return None;
            }
        };
        while tasks.try_join_next().is_some() {}
        if tasks.len() >= ctx.opts.max_pending_requests && spawns_task(&msg) {
            return Some(CloseReason::TooManyRequests);
        }
        dispatch(ctx, msg, fds, &mut tasks);
    }
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Whether `dispatch` answers `msg` from a task of the connection's set (rather than at once,
/// or from a fetch task that `max_fetches_per_client` bounds).
fn spawns_task(msg: &Message) -> bool {
    matches!(msg, Message::Lookup(_) | Message::Save(_))
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
            Ok(dest) => match buffer_message(r.req, r.fetch_id, &dest) {
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
    if f.token_ids.is_empty() {
        return refuse(ErrorCode::BadRequest, "no token ids".into());
    }
    if let Err(e) = f.layout.checked_buffer_len(&kvfetcher_protocol::KvShape {
        num_layers: 1,
        tokens: 1,
        kv_heads: 1,
        head_dim: 1,
    }) {
        return refuse(ErrorCode::BadRequest, e.to_string());
    }
    let fetch_id = ctx.registry.new_fetch_id();
    let dest = match ctx.buffers.for_fetch(fetch_id, f.layout) {
        Ok(d) => d,
        Err(e) => return ctx.out.serve_error(req, &e.into()),
    };
    let handle = Handle {
        owner: ctx.conn,
        peer: ctx.peer,
        dest: dest.clone(),
        task: None,
    };
    let (per_client, total) = (ctx.opts.max_fetches_per_client, ctx.opts.max_fetches);
    if let Err(limit) = ctx.registry.try_insert(fetch_id, handle, per_client, total) {
        if let FetchLimit::Total { .. } = limit {
            ctx.buffers.metrics().local_refusals.max_fetches.add(1);
            tracing::warn!(conn = ctx.conn, pid = ?ctx.peer.pid, uid = ctx.peer.uid, "fetch refused: {limit}");
        }
        return refuse(ErrorCode::Busy, limit.to_string());
    }
    let c = ctx.clone();
    // Not in the connection's JoinSet: the registry owns the task's abort handle, so a release
    // or the disconnect cancels it.
    let task = tokio::spawn(async move {
        let (events, mut reported) = FetchEvents::channel();
        let fetch = c.backend.fetch(
            &f.model,
            &f.token_ids,
            &f.layout,
            dest.destination(),
            events,
        );
        tokio::pin!(fetch);
        // Events first, so every one the fetch reported is told before its end.
        let res = loop {
            tokio::select! {
                biased;
                Some(e) = reported.recv() => announce(&c, req, fetch_id, &dest, e),
                res = &mut fetch => break res,
            }
        };
        while let Ok(e) = reported.try_recv() {
            announce(&c, req, fetch_id, &dest, e);
        }
        let end = match res {
            Ok(o) if dest.shape().is_some() => {
                c.registry.record_done(o.tokens);
                Message::FetchDone(FetchDone {
                    req,
                    fetch_id,
                    tokens: o.tokens,
                    bytes_on_wire: o.bytes_on_wire,
                })
            }
            Ok(o) => {
                c.registry.finish_failed(fetch_id);
                let (code, message) = if o.tokens == 0 {
                    (ErrorCode::NotFound, "no tokens available".to_string())
                } else {
                    (ErrorCode::Internal, "backend wrote no buffer".to_string())
                };
                Message::FetchFailed(FetchFailed {
                    req,
                    fetch_id,
                    code,
                    message,
                })
            }
            Err(e) => {
                c.registry.finish_failed(fetch_id);
                Message::FetchFailed(FetchFailed {
                    req,
                    fetch_id,
                    code: e.code(),
                    message: e.to_string(),
                })
            }
        };
        c.out.send(end, vec![]);
    });
    ctx.registry.set_task(fetch_id, task.abort_handle());
}

/// Tells the client what a fetch reported: where its buffer is, which layers are ready.
fn announce(ctx: &Ctx, req: u64, fetch_id: u64, dest: &FetchBuffer, event: FetchEvent) {
    match event {
        FetchEvent::Allocated(_) => match buffer_message(req, fetch_id, dest) {
            Some((m, fds)) => ctx.out.send(m, fds),
            None => tracing::warn!(fetch_id, "an allocated buffer could not be shared"),
        },
        FetchEvent::LayersReady(layers) => {
            let Some(shape) = dest.shape() else { return };
            let end = layers.end.min(shape.num_layers);
            if layers.start < end {
                ctx.out.send(
                    Message::LayersReady(LayersReady {
                        fetch_id,
                        start: layers.start,
                        end,
                    }),
                    vec![],
                );
            }
        }
    }
}

/// The `FetchBuffer` message that lets the client map `dest`, with its fds, once allocated.
fn buffer_message(req: u64, fetch_id: u64, dest: &FetchBuffer) -> Option<(Message, Vec<OwnedFd>)> {
    let s = dest.shared()?;
    let layout = dest.layout();
    let msg = Message::FetchBuffer(BufferMessage {
        req,
        fetch_id,
        shape: s.shape,
        layout,
        len: s.len,
        memory: s.memory,
    });
    Some((msg, s.fds))
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
    if let Some(why) = ctx.opts.save_access.refusal(&ctx.peer, s.replace) {
        tracing::warn!(conn = ctx.conn, pid = ?ctx.peer.pid, uid = ctx.peer.uid, "save refused: {why}");
        return Err(ServeError::Forbidden(why));
    }
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
        .save(
            &s.model,
            &s.token_ids,
            &s.layout,
            &s.shape,
            data.bytes(),
            s.replace,
        )
        .await
}

/// A save whose bytes are in the client's GPU memory: the daemon opens the client's CUDA IPC
/// handle, copies the bytes to the host, and saves them like a host buffer. The client must
/// have finished writing them (synchronised its stream) before sending the request.
async fn gpu_save(ctx: &Ctx, s: &Save, n: u32, fd: Option<OwnedFd>) -> Result<u32, ServeError> {
    let Some(src) = &s.gpu else {
        return Err(ServeError::BadRequest(
            "a gpu save needs a gpu source".into(),
        ));
    };
    if fd.is_some() {
        return Err(ServeError::BadRequest("a gpu save carries no fd".into()));
    }
    let len = save_len(ctx, s)?;
    let data = ctx.buffers.read_gpu_save(n, src, len).await?;
    let host = kvfetcher_protocol::TargetLayout {
        memory: MemoryKind::Host,
        ..s.layout
    };
    ctx.backend
        .save(&s.model, &s.token_ids, &host, &s.shape, &data, s.replace)
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
