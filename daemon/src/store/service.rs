//! The store server: accepts QUIC connections, runs one task per request stream, checks every
//! object on put and on get, and enforces size, stream, idle, rate, connection and upload
//! limits. Failed authentication blocks the source address for a growing backoff
//! ([`super::throttle`]).
//!
//! An upload goes to the backend piece by piece as it arrives and is checked on the way
//! ([`super::upload::UploadCheck`]): the server holds its header and one piece, never the
//! whole object.
//!
//! Protocol parsing is [`crate::transport::wire`]; storage is a [`Storage`]. The socket and the
//! shutdown signal come from outside ([`StoreServer::bind`], [`StoreServer::run`]), so tests
//! bind port 0 on loopback.
//!
//! Logs (tracing, in a `store_conn` span naming the peer's address): connections opened and
//! closed and every request at debug, refusals and corrupt objects at warn (with the key),
//! backend failures at error. A `NotFound` is an answer, logged at debug.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfetcher_codec::{ChunkKey, FormatError};
use quinn::{RecvStream, SendStream, VarInt};
use tracing::Instrument;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::pace::{Pacer, PIECE};
use super::storage::{CommitMode, ObjectReader, ObjectWriter, Storage, StorageError};
use super::throttle::{AuthThrottle, AuthThrottleConfig};
use super::upload::{UploadCheck, UploadError};
use crate::transport::wire::{
    self, Request, Response, SectionSpan, StatsReport, StoreErrorCode, RANGE_TO_END,
};
use crate::transport::{
    is_profile_object, transport_config, verify_stored, Congestion, ObjectError, ObjectInfo,
    SectionCheck, TlsError, TlsServerConfig, TransportTuning,
};

/// QUIC application error code sent when the server stops reading a stream it refused.
pub const STOP_REFUSED: u32 = 1;

/// QUIC application error code of a connection closed because the store is at
/// [`ServerOptions::max_connections`]; the close reason says so.
pub const CLOSE_BUSY: u32 = 2;

/// The close reason sent with [`CLOSE_BUSY`].
pub const CLOSE_BUSY_REASON: &[u8] = b"too many connections";

/// Most bytes read from an upload's stream at once: what the server holds of an upload
/// besides its header (quinn's receive window aside).
const UPLOAD_PIECE: usize = PIECE * 16;

/// Limits and behaviour of a store server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest object accepted by a put.
    pub max_object_bytes: u64,
    /// Concurrent request streams one connection may have open.
    pub max_streams: u32,
    /// A connection with no packets for this long is closed.
    pub idle_timeout: Duration,
    /// A request stream that sends nothing for this long (while the server waits for its
    /// request or its upload) is answered with `Timeout` and cut off.
    pub stream_timeout: Duration,
    /// Shared limit on bytes per second sent to all clients (slow-link emulation).
    pub max_rate: Option<u64>,
    /// When set, each connection must authenticate with this bearer token first.
    pub token: Option<Vec<u8>>,
    /// QUIC congestion controller.
    pub congestion: Congestion,
    /// Use the large flow-control windows of `crate::transport` (off: quinn's defaults).
    pub large_windows: bool,
    /// ACK frequency asked of clients (see `TransportTuning::ack_every`).
    pub ack_every: Option<u32>,
    /// Connections served at once; one more is closed after its handshake with [`CLOSE_BUSY`].
    pub max_connections: usize,
    /// Puts received at once, over all connections; one more is refused with `Busy`.
    pub max_uploads: usize,
    /// How failed authentication (a wrong token, a refused client certificate) is throttled
    /// per source address.
    pub auth_throttle: AuthThrottleConfig,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_object_bytes: 1 << 30,
            max_streams: 256,
            idle_timeout: Duration::from_secs(30),
            stream_timeout: Duration::from_secs(10),
            max_rate: None,
            token: None,
            congestion: Congestion::Cubic,
            large_windows: true,
            ack_every: None,
            max_connections: 1024,
            max_uploads: 32,
            auth_throttle: AuthThrottleConfig::default(),
        }
    }
}

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS configuration is unusable.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The storage backend could not be opened.
    #[error("backend: {0}")]
    Storage(#[from] StorageError),
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    corrupt: AtomicU64,
    auth_failures: AtomicU64,
    auth_throttled: AtomicU64,
}

/// The start of the message of an attempt refused because its address is blocked; such
/// refusals are logged at debug (the block itself at warn), so a flood does not flood the log.
const THROTTLED: &str = "too many failed authentications";

struct Shared {
    backend: Arc<dyn Storage>,
    opts: ServerOptions,
    pacer: Option<Pacer>,
    counters: Counters,
    /// One permit per connection served ([`ServerOptions::max_connections`]).
    connection_slots: Arc<Semaphore>,
    /// One permit per put being received ([`ServerOptions::max_uploads`]).
    upload_slots: Arc<Semaphore>,
    /// Failed authentication by source address ([`ServerOptions::auth_throttle`]).
    throttle: Mutex<AuthThrottle>,
    /// Whether clients must present a certificate (mutual TLS).
    client_certs: bool,
}

impl Shared {
    fn throttle(&self) -> std::sync::MutexGuard<'_, AuthThrottle> {
        self.throttle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err(how long)` while `ip` is blocked for failed authentication.
    fn blocked(&self, ip: IpAddr) -> Result<(), Duration> {
        let r = self.throttle().check(ip, Instant::now());
        if r.is_err() {
            self.counters.auth_throttled.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Counts a failed authentication of `ip` (`what` failed) and blocks the address once it
    /// has failed too often.
    fn auth_failed(&self, ip: IpAddr, what: &str) {
        self.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        if let Some(backoff) = self.throttle().failed(ip, Instant::now()) {
            tracing::warn!(
                peer = %ip,
                backoff_ms = backoff.as_millis() as u64,
                "{what}: address blocked after repeated failed authentication"
            );
        }
    }
}

/// A bound store server; [`StoreServer::run`] serves until shutdown.
pub struct StoreServer {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreServer")
            .field("addr", &self.endpoint.local_addr().ok())
            .finish()
    }
}

impl StoreServer {
    /// Binds a UDP socket at `addr` (port 0 picks one). Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        tls: &TlsServerConfig,
        backend: Arc<dyn Storage>,
        opts: ServerOptions,
    ) -> Result<StoreServer, ServerError> {
        let mut cfg = quinn::ServerConfig::with_crypto(tls.quic()?);
        let tuning = TransportTuning {
            congestion: opts.congestion,
            max_streams: opts.max_streams,
            idle_timeout: opts.idle_timeout,
            keep_alive: None,
            large_windows: opts.large_windows,
            ack_every: opts.ack_every,
        };
        cfg.transport_config(Arc::new(transport_config(&tuning)));
        let endpoint = crate::transport::quic_endpoint(addr, Some(cfg))
            .map_err(|source| ServerError::Bind { addr, source })?;
        let pacer = opts.max_rate.map(Pacer::new);
        let connection_slots = Arc::new(Semaphore::new(opts.max_connections));
        let upload_slots = Arc::new(Semaphore::new(opts.max_uploads));
        let throttle = Mutex::new(AuthThrottle::new(opts.auth_throttle));
        Ok(StoreServer {
            endpoint,
            shared: Arc::new(Shared {
                backend,
                opts,
                pacer,
                counters: Counters::default(),
                connection_slots,
                upload_slots,
                throttle,
                client_certs: tls.client_ca.is_some(),
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        // A bound endpoint always has an address; fall back to unspecified for the type's sake.
        self.endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves connections until `shutdown` completes, then closes them all.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => {
                        let shared = self.shared.clone();
                        let peer = incoming.remote_address();
                        let span = tracing::info_span!("store_conn", %peer);
                        if let Err(wait) = shared.blocked(peer.ip()) {
                            // Refused before the handshake: costs no cryptography.
                            span.in_scope(|| tracing::debug!(
                                "connection refused: {THROTTLED}, blocked for {} ms",
                                wait.as_millis()
                            ));
                            incoming.refuse();
                            continue;
                        }
                        let slot = shared.connection_slots.clone().try_acquire_owned().ok();
                        tokio::spawn(async move {
                            match incoming.await {
                                Ok(conn) => match slot {
                                    Some(slot) => serve_connection(shared, conn, slot).await,
                                    None => refuse_connection(&shared, &conn),
                                },
                                // Refused TLS (no or untrusted client certificate, wrong
                                // ALPN) or a handshake that never completed.
                                Err(e) => {
                                    tracing::warn!("handshake failed: {e}");
                                    if shared.client_certs && client_cert_refused(&e) {
                                        shared.auth_failed(peer.ip(), "client certificate refused");
                                    }
                                }
                            }
                        }.instrument(span));
                    }
                    None => break,
                },
            }
        }
        self.endpoint.close(VarInt::from_u32(0), b"shutdown");
        self.endpoint.wait_idle().await;
    }
}

/// Whether a failed handshake is the store refusing the client's certificate (TLS alerts
/// bad_certificate to access_denied, certificate_required). These need the client to have
/// received the server's handshake, so a spoofed source address cannot cause them.
fn client_cert_refused(e: &quinn::ConnectionError) -> bool {
    let quinn::ConnectionError::TransportError(t) = e else {
        return false;
    };
    let code = u64::from(t.code);
    // QUIC carries a TLS alert as the crypto error 0x100 + alert.
    let crypto = quinn::TransportErrorCode::crypto(0);
    match code.checked_sub(u64::from(crypto)) {
        Some(alert @ 0..=255) => matches!(alert, 42..=46 | 48 | 49 | 116),
        _ => false,
    }
}

struct ConnGuard<'a>(&'a AtomicU64);

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Closes a connection over [`ServerOptions::max_connections`], after its handshake so that
/// the client reads the reason.
fn refuse_connection(shared: &Shared, conn: &quinn::Connection) {
    tracing::warn!(
        max_connections = shared.opts.max_connections,
        "connection refused: too many connections"
    );
    conn.close(VarInt::from_u32(CLOSE_BUSY), CLOSE_BUSY_REASON);
}

/// Serves a connection's streams; `_slot` is its place under the connection limit.
async fn serve_connection(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    _slot: OwnedSemaphorePermit,
) {
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    let _guard = ConnGuard(&shared.counters.connections);
    let authed = Arc::new(AtomicBool::new(shared.opts.token.is_none()));
    let peer = conn.remote_address().ip();
    let mut order = StreamOrder::default();
    tracing::debug!(conn = conn.stable_id(), "connection opened");
    let closed = loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let shared = shared.clone();
                let authed = authed.clone();
                let turn = order.next();
                let client = Client { peer, authed };
                tokio::spawn(
                    async move { serve_stream(&shared, &client, send, recv, turn).await }
                        .in_current_span(),
                );
            }
            Err(e) => break e,
        }
    };
    tracing::debug!(
        conn = conn.stable_id(),
        streams = order.opened,
        "connection closed: {closed}"
    );
}

/// A request that failed: the code and message sent back.
struct Refusal(StoreErrorCode, String);

/// Who sent a request: the connection's address and whether it authenticated.
struct Client {
    peer: IpAddr,
    authed: Arc<AtomicBool>,
}

impl From<StorageError> for Refusal {
    fn from(e: StorageError) -> Self {
        match e {
            // A write-once commit lost to another put of the key.
            StorageError::Exists(key) => exists(&key),
            // Logged at error by `log_request`, as every `Internal`.
            e => Refusal(StoreErrorCode::Internal, format!("backend: {e}")),
        }
    }
}

/// The object a request names, for the log.
fn key_of(req: &Request) -> Option<ChunkKey> {
    match req {
        Request::Put { key, .. }
        | Request::Get { key, .. }
        | Request::GetSections { key, .. }
        | Request::Delete { key } => Some(*key),
        Request::ExistsPrefix { keys } => keys.first().copied(),
        Request::Auth { .. } | Request::List { .. } | Request::Stats => None,
    }
}

/// Logs one answered request: debug when served (or not found), warn when refused (a corrupt
/// object included), error when the store failed.
fn log_request(op: Option<wire::Op>, key: Option<ChunkKey>, result: &Result<(), &Refusal>) {
    let key = key.map(|k| k.to_string());
    let key = key.as_deref().unwrap_or("-");
    // "-": the request did not parse.
    let op = op.map_or_else(|| "-".to_string(), |o| format!("{o:?}"));
    match result {
        Ok(()) => tracing::debug!(%op, key, "request served"),
        Err(Refusal(code @ StoreErrorCode::NotFound, m)) => {
            tracing::debug!(%op, key, ?code, "request answered: {m}")
        }
        Err(Refusal(code @ StoreErrorCode::Internal, m)) => {
            tracing::error!(%op, key, ?code, "request failed: {m}")
        }
        Err(Refusal(code @ StoreErrorCode::Corrupt, m)) => {
            tracing::warn!(%op, key, ?code, "corrupt object not served: {m}")
        }
        Err(Refusal(code @ StoreErrorCode::Unauthorized, m)) if m.starts_with(THROTTLED) => {
            tracing::debug!(%op, key, ?code, "request refused: {m}")
        }
        Err(Refusal(code, m)) => tracing::warn!(%op, key, ?code, "request refused: {m}"),
    }
}

/// What to send after the response frame.
enum Payload {
    None,
    Data(Vec<Bytes>),
}

/// Answers a connection's streams in the order they were opened. A client that asks for many
/// sections at once (the fetch window) then receives them one after another rather than all
/// at the end together, and restores each while the next arrives. quinn sends streams of
/// higher priority first, so each stream gets a lower priority than the one before; and a
/// paced store (`--max-rate`, whose pacer sits above quinn and would interleave the streams)
/// sends a stream's payload only once the previous stream's payload is written.
#[derive(Default)]
struct StreamOrder {
    opened: u32,
    previous: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl StreamOrder {
    /// The turn of the next stream opened.
    fn next(&mut self) -> Turn {
        let (done, next_waits) = tokio::sync::oneshot::channel();
        let turn = Turn {
            priority: -(self.opened.min(i32::MAX as u32) as i32),
            previous: self.previous.replace(next_waits),
            done: Some(done),
        };
        self.opened = self.opened.saturating_add(1);
        turn
    }
}

/// One stream's place in its connection's order. Dropping it (or `finished`) lets the next
/// stream send, whether this one succeeded or not.
struct Turn {
    priority: i32,
    previous: Option<tokio::sync::oneshot::Receiver<()>>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Turn {
    /// Waits until every earlier stream of the connection has written its payload.
    async fn wait(&mut self) {
        if let Some(previous) = self.previous.take() {
            // An error means the previous turn was dropped: it is finished too.
            let _ = previous.await;
        }
    }

    /// This stream's payload is written: the next one may send.
    fn finished(&mut self) {
        self.done.take();
    }
}

async fn serve_stream(
    shared: &Shared,
    client: &Client,
    mut send: SendStream,
    mut recv: RecvStream,
    mut turn: Turn,
) {
    let _ = send.set_priority(turn.priority);
    let timeout = shared.opts.stream_timeout;
    let (op, key, result) = match read_request(&mut recv, timeout).await {
        Ok(req) => {
            let (op, key) = (req.op(), key_of(&req));
            (Some(op), key, handle(shared, client, req, &mut recv).await)
        }
        Err(r) => (None, None, Err(r)),
    };
    log_request(op, key, &result.as_ref().map(|_| ()));
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    let (resp, payload) = match result {
        Ok(pair) => pair,
        Err(Refusal(code, message)) => {
            // Whatever else the client sends on this stream is unwanted.
            let _ = recv.stop(VarInt::from_u32(STOP_REFUSED));
            (Response::Error { code, message }, Payload::None)
        }
    };
    if send.write_all(&resp.encode()).await.is_err() {
        return;
    }
    if let Payload::Data(parts) = payload {
        if shared.pacer.is_some() {
            turn.wait().await;
        }
        for part in parts {
            let n = part.len() as u64;
            if send_paced(shared, &mut send, part).await.is_err() {
                return;
            }
            shared.counters.bytes_out.fetch_add(n, Ordering::Relaxed);
        }
    }
    turn.finished();
    let _ = send.finish();
    // Let the peer read everything before the stream state is dropped.
    let _ = send.stopped().await;
}

async fn send_paced(
    shared: &Shared,
    send: &mut SendStream,
    data: Bytes,
) -> Result<(), quinn::WriteError> {
    match &shared.pacer {
        None => send.write_chunk(data).await,
        Some(p) => {
            let mut off = 0;
            while off < data.len() {
                let end = (off + PIECE).min(data.len());
                p.acquire(end - off).await;
                send.write_chunk(data.slice(off..end)).await?;
                off = end;
            }
            Ok(())
        }
    }
}

async fn read_request(recv: &mut RecvStream, timeout: Duration) -> Result<Request, Refusal> {
    let mut head = [0u8; wire::FRAME_HEADER_LEN];
    read_exact_timed(recv, &mut head, timeout).await?;
    let total =
        wire::frame_len(&head).map_err(|e| Refusal(StoreErrorCode::BadRequest, e.to_string()))?;
    let mut buf = vec![0u8; total];
    buf[..head.len()].copy_from_slice(&head);
    read_exact_timed(recv, &mut buf[wire::FRAME_HEADER_LEN..], timeout).await?;
    match Request::decode(&buf) {
        Ok(Some((req, _))) => Ok(req),
        Ok(None) => Err(Refusal(
            StoreErrorCode::BadRequest,
            "truncated request".into(),
        )),
        Err(e) => Err(Refusal(StoreErrorCode::BadRequest, e.to_string())),
    }
}

async fn read_exact_timed(
    recv: &mut RecvStream,
    buf: &mut [u8],
    timeout: Duration,
) -> Result<(), Refusal> {
    match tokio::time::timeout(timeout, recv.read_exact(buf)).await {
        Err(_) => Err(Refusal(
            StoreErrorCode::Timeout,
            "request not received in time".into(),
        )),
        Ok(Err(quinn::ReadExactError::FinishedEarly(_))) => Err(Refusal(
            StoreErrorCode::BadRequest,
            "truncated request".into(),
        )),
        Ok(Err(e)) => Err(Refusal(StoreErrorCode::BadRequest, e.to_string())),
        Ok(Ok(())) => Ok(()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a bearer token. An address blocked for failed authentication is refused without
/// the token being compared, so a correct guess there is worth nothing.
fn authenticate(shared: &Shared, client: &Client, token: &[u8]) -> Result<(), Refusal> {
    let Some(expected) = &shared.opts.token else {
        return Ok(());
    };
    if let Err(wait) = shared.blocked(client.peer) {
        return Err(Refusal(
            StoreErrorCode::Unauthorized,
            format!(
                "{THROTTLED} from {}: retry in {} ms",
                client.peer,
                wait.as_millis().max(1)
            ),
        ));
    }
    if constant_time_eq(expected, token) {
        client.authed.store(true, Ordering::Relaxed);
        return Ok(());
    }
    shared.auth_failed(client.peer, "bad token");
    Err(Refusal(StoreErrorCode::Unauthorized, "bad token".into()))
}

async fn handle(
    shared: &Shared,
    client: &Client,
    req: Request,
    recv: &mut RecvStream,
) -> Result<(Response, Payload), Refusal> {
    if let Request::Auth { token } = &req {
        authenticate(shared, client, token)?;
        return Ok((Response::Authed, Payload::None));
    }
    if !client.authed.load(Ordering::Relaxed) {
        return Err(Refusal(
            StoreErrorCode::Unauthorized,
            "authenticate first".into(),
        ));
    }
    let backend = &shared.backend;
    match req {
        Request::Auth { .. } => Err(Refusal(
            StoreErrorCode::BadRequest,
            "auth handled above".into(),
        )),
        Request::Put { key, len, replace } => {
            if len > shared.opts.max_object_bytes {
                return Err(Refusal(
                    StoreErrorCode::TooLarge,
                    format!(
                        "object of {len} bytes exceeds the limit of {}",
                        shared.opts.max_object_bytes
                    ),
                ));
            }
            let Ok(_slot) = shared.upload_slots.clone().try_acquire_owned() else {
                return Err(Refusal(
                    StoreErrorCode::Busy,
                    format!(
                        "{} uploads in progress, the limit: try again later",
                        shared.opts.max_uploads
                    ),
                ));
            };
            // Write-once: without `replace`, a put must find the key absent (or corrupt).
            let once = !replace && !refuse_stored(shared, &key).await?;
            let writer = backend.begin_put(&key).await?;
            let created = receive_put(shared, writer, key, len, once, recv).await?;
            Ok((Response::Stored { created }, Payload::None))
        }
        Request::Get { key, offset, len } => {
            let bytes = get_verified(shared, &key).await?;
            let total = bytes.len() as u64;
            if offset > total
                || (len != RANGE_TO_END && offset.checked_add(len).is_none_or(|end| end > total))
            {
                return Err(Refusal(
                    StoreErrorCode::OutOfRange,
                    format!("range {offset}+{len} outside {total} bytes"),
                ));
            }
            let end = if len == RANGE_TO_END {
                total
            } else {
                offset + len
            };
            let part = bytes.slice(offset as usize..end as usize);
            Ok((
                Response::Data {
                    total_len: total,
                    offset,
                    len: end - offset,
                },
                Payload::Data(vec![part]),
            ))
        }
        Request::GetSections {
            key,
            sections,
            header,
        } => {
            // Only the header and the sections asked for are read, not the whole object.
            let object = backend.open(&key).await?.ok_or_else(|| not_found(&key))?;
            let corrupt = |e: String| {
                shared.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                Refusal(StoreErrorCode::Corrupt, format!("object {key}: {e}"))
            };
            let (check, head) = match read_header(&*object).await? {
                Ok(parsed) => parsed,
                // A codec profile object is no chunk: it is fetched whole (`Get`).
                Err(_) if is_profile_object(&object.read(0..object.size().min(4)).await?) => {
                    return Err(Refusal(
                        StoreErrorCode::BadRequest,
                        format!("object {key} is a codec profile: it has no sections"),
                    ))
                }
                Err(e) => return Err(corrupt(e.to_string())),
            };
            if check.key() != key || check.object_len() != object.size() {
                return Err(corrupt("header disagrees with stored object".into()));
            }
            let mut spans = Vec::with_capacity(sections.len());
            let mut parts = Vec::with_capacity(sections.len() + 1);
            if header {
                parts.push(head);
            }
            for &i in &sections {
                let (off, len) = check
                    .span(i as usize)
                    .map_err(|e| Refusal(StoreErrorCode::OutOfRange, e.to_string()))?;
                let part = object.read(off..off + len).await?;
                check
                    .verify(i as usize, &part)
                    .map_err(|e| corrupt(e.to_string()))?;
                spans.push(SectionSpan { index: i, len });
                parts.push(part);
            }
            let header_len = if header {
                u32::try_from(check.header_len()).map_err(|_| corrupt("header too long".into()))?
            } else {
                0
            };
            Ok((
                Response::Sections {
                    header_len,
                    sections: spans,
                },
                Payload::Data(parts),
            ))
        }
        Request::ExistsPrefix { keys } => {
            let mut count = 0u32;
            for k in &keys {
                if !backend.exists(k).await? {
                    break;
                }
                count += 1;
            }
            Ok((Response::Present { count }, Payload::None))
        }
        Request::List { model } => Ok((
            Response::Keys {
                keys: backend.list(&model).await?,
            },
            Payload::None,
        )),
        Request::Delete { key } => Ok((
            Response::Deleted {
                existed: backend.delete(&key).await?,
            },
            Payload::None,
        )),
        Request::Stats => {
            let u = backend.usage().await?;
            let c = &shared.counters;
            Ok((
                Response::Stats(StatsReport {
                    objects: u.objects,
                    bytes: u.bytes,
                    connections: c.connections.load(Ordering::Relaxed),
                    requests: c.requests.load(Ordering::Relaxed),
                    bytes_in: c.bytes_in.load(Ordering::Relaxed),
                    bytes_out: c.bytes_out.load(Ordering::Relaxed),
                    corrupt: c.corrupt.load(Ordering::Relaxed),
                    auth_failures: c.auth_failures.load(Ordering::Relaxed),
                    auth_throttled: c.auth_throttled.load(Ordering::Relaxed),
                }),
                Payload::None,
            ))
        }
    }
}

/// Bytes read first for a header: a header holds every layer's per-channel quantization
/// parameters (16 bytes per channel and layer), so this covers e.g. 8 layers of 512 channels;
/// a longer one says its length in its first bytes and is read again whole.
const HEADER_PROBE: u64 = 64 << 10;

/// Reads and parses the header at the start of `object`: `Ok(Err(_))` when the bytes are no
/// valid header (a corrupt object), `Err` when the backend failed.
async fn read_header(
    object: &dyn ObjectReader,
) -> Result<Result<(SectionCheck, Bytes), ObjectError>, Refusal> {
    let probe = object.read(0..object.size().min(HEADER_PROBE)).await?;
    // The probe is parsed once; only a header longer than the probe is read and parsed again.
    let (parsed, head) = match SectionCheck::from_header(&probe) {
        Err(ObjectError::Format(FormatError::Truncated { needed, .. }))
            if needed as u64 > probe.len() as u64 && needed as u64 <= object.size() =>
        {
            let head = object.read(0..needed as u64).await?;
            (SectionCheck::from_header(&head), head)
        }
        parsed => (parsed, probe),
    };
    Ok(parsed.map(|c| {
        let head = head.slice(..c.header_len());
        (c, head)
    }))
}

fn not_found(key: &kvfetcher_codec::ChunkKey) -> Refusal {
    Refusal(StoreErrorCode::NotFound, format!("no object {key}"))
}

/// Reads the whole object and checks it (a chunk's every checksum and key, a profile object's
/// hash: `verify_stored`); a failure is counted and reported as
/// `Corrupt`, and the bytes are not served.
async fn get_verified(shared: &Shared, key: &kvfetcher_codec::ChunkKey) -> Result<Bytes, Refusal> {
    let bytes = shared
        .backend
        .get(key)
        .await?
        .ok_or_else(|| not_found(key))?;
    let problem = verify_stored(key, &bytes).err().map(|e| e.to_string());
    if let Some(e) = problem {
        shared.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        return Err(Refusal(
            StoreErrorCode::Corrupt,
            format!("object {key}: {e}"),
        ));
    }
    Ok(bytes)
}

/// Stored objects are write-once: refuses with `Exists` a put (without `replace`) of a key
/// whose stored object is valid. A stored object that fails its checksums may be overwritten,
/// so that saving a chunk again heals a damaged copy: returns true when such a copy is there.
async fn refuse_stored(shared: &Shared, key: &ChunkKey) -> Result<bool, Refusal> {
    if !shared.backend.exists(key).await? {
        return Ok(false);
    }
    match get_verified(shared, key).await {
        Ok(_) => Err(exists(key)),
        Err(Refusal(StoreErrorCode::Corrupt, m)) => {
            tracing::warn!(%key, "overwriting a corrupt stored object: {m}");
            Ok(true)
        }
        // Deleted meanwhile: the put may create it.
        Err(Refusal(StoreErrorCode::NotFound, _)) => Ok(false),
        Err(r) => Err(r),
    }
}

fn exists(key: &ChunkKey) -> Refusal {
    Refusal(
        StoreErrorCode::Exists,
        format!("object {key} is already stored (write-once; a put may ask to replace)"),
    )
}

/// Streams a put's bytes into `writer` piece by piece, checking them on the way
/// ([`UploadCheck`]), then commits. With `once` (a write-once put of an absent key) the commit
/// is [`CommitMode::CreateNew`]: when another put of the key committed meanwhile, this one is
/// refused with `Exists` and the stored object is kept. Any failure aborts the writer, so
/// nothing partial becomes visible (and the `LocalDir` temp file is removed).
async fn receive_put(
    shared: &Shared,
    mut writer: Box<dyn ObjectWriter>,
    key: kvfetcher_codec::ChunkKey,
    len: u64,
    once: bool,
    recv: &mut RecvStream,
) -> Result<bool, Refusal> {
    let mut check = UploadCheck::new(key, len);
    let refused = |e: UploadError| {
        let code = if e.is_framing() {
            StoreErrorCode::BadRequest
        } else {
            StoreErrorCode::InvalidObject
        };
        Refusal(code, e.to_string())
    };
    let outcome: Result<ObjectInfo, Refusal> = async {
        loop {
            let chunk = match tokio::time::timeout(
                shared.opts.stream_timeout,
                recv.read_chunk(UPLOAD_PIECE, true),
            )
            .await
            {
                Err(_) => return Err(Refusal(StoreErrorCode::Timeout, "upload stalled".into())),
                Ok(Err(e)) => {
                    return Err(Refusal(
                        StoreErrorCode::BadRequest,
                        format!("upload failed: {e}"),
                    ))
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c.bytes,
            };
            shared
                .counters
                .bytes_in
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            check.feed(&chunk).map_err(refused)?;
            writer.write(chunk).await?;
        }
        tracing::debug!(key = %key, held = check.peak_held(), "upload received");
        check.finish().map_err(refused)
    }
    .await;
    let mode = if once {
        CommitMode::CreateNew
    } else {
        CommitMode::Replace
    };
    match outcome {
        Ok(info) => Ok(writer.commit(info.model, mode).await?),
        Err(r) => {
            writer.abort().await;
            Err(r)
        }
    }
}
