//! The store client: one QUIC connection, reused for every request, each request on its own
//! stream so callers can run many in parallel (`StoreClient` is cheap to clone and `Sync`).
//!
//! Received data is checked: whole objects against every section checksum, fetched sections
//! against their own. A failed check is [`StoreClientError::Corrupt`], never data.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvfetcher_codec::{ChunkKey, ModelFingerprint, ProfileId};
use quinn::RecvStream;

use super::object::{self, ObjectError, SectionCheck};
use super::tls::{TlsClientConfig, TlsError};
use super::tuning::{transport_config, TransportTuning};
use super::wire::{
    self, Op, Request, Response, SectionSpan, StatsReport, StoreErrorCode, WireError, RANGE_TO_END,
};

/// Why a store operation failed on the client side.
#[derive(Debug, thiserror::Error)]
pub enum StoreClientError {
    /// The TLS configuration could not be built.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The local UDP endpoint could not be created.
    #[error("endpoint: {0}")]
    Endpoint(std::io::Error),
    /// The connection could not be started.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (handshake refused, idle timeout, peer gone).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// The server's stream ended before the announced bytes arrived.
    #[error("stream ended early")]
    Truncated,
    /// The server's bytes are not a valid response.
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
    /// The server answered with a response of the wrong kind.
    #[error("unexpected {0} response")]
    Unexpected(&'static str),
    /// The key is not stored.
    #[error("not found: {0}")]
    NotFound(String),
    /// The stored object (or what arrived) failed its checksums; the caller must not use it.
    #[error("corrupt object: {0}")]
    Corrupt(String),
    /// The object is larger than the caller accepts; it was not read.
    #[error("object of {len} bytes, more than the {max} accepted")]
    TooLarge {
        /// The object's length.
        len: u64,
        /// The most the caller accepts.
        max: u64,
    },
    /// The object to upload is not a valid chunk object.
    #[error("invalid object: {0}")]
    InvalidObject(#[from] ObjectError),
    /// The server refused or failed the request.
    #[error("server: {code:?}: {message}")]
    Server {
        /// The server's error code.
        code: StoreErrorCode,
        /// The server's message.
        message: String,
    },
}

impl StoreClientError {
    fn from_server(code: StoreErrorCode, message: String) -> StoreClientError {
        match code {
            StoreErrorCode::NotFound => StoreClientError::NotFound(message),
            StoreErrorCode::Corrupt => StoreClientError::Corrupt(message),
            code => StoreClientError::Server { code, message },
        }
    }
}

/// Keep-alive interval of a store connection by default: an idle connection still carries a
/// packet each second, so a store that vanished (killed, host down) is noticed quickly.
pub(crate) const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Idle timeout of a store connection by default: three unanswered keep-alives close it, so a
/// request on a dead store fails in about 3 s (not quinn's 30 s) and the next one redials.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// Options of a client connection beyond TLS.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// QUIC transport tuning (congestion controller, windows, keep-alive, idle timeout).
    pub tuning: TransportTuning,
}

impl ClientOptions {
    /// Default options with the given keep-alive interval and idle timeout: a connection
    /// whose peer stops answering closes `idle_timeout` after its last packet.
    pub fn liveness(keep_alive: Duration, idle_timeout: Duration) -> ClientOptions {
        let mut o = ClientOptions::default();
        o.tuning.keep_alive = Some(keep_alive);
        o.tuning.idle_timeout = idle_timeout;
        o
    }
}

impl Default for ClientOptions {
    /// [`TransportTuning`]'s defaults with this module's keep-alive (1 s) and idle timeout (3 s).
    fn default() -> Self {
        ClientOptions {
            tuning: TransportTuning {
                keep_alive: Some(DEFAULT_KEEP_ALIVE),
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
                ..TransportTuning::default()
            },
        }
    }
}

/// A connection to one store.
#[derive(Debug, Clone)]
pub struct StoreClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

/// The header and sections of one `get_sections` call, in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sections {
    /// The object's header bytes (parse with the codec's `ChunkHeader::parse_prefix`).
    pub header: Vec<u8>,
    /// `(section index, verified section bytes)`, in the order requested.
    pub sections: Vec<(usize, Bytes)>,
}

/// A `get_sections` answer being received: the header first, then one section at a time, so a
/// caller can restore each layer group as soon as it arrives.
///
/// Call [`SectionStream::header`] any time, then [`SectionStream::next_section`] until `None`.
#[derive(Debug)]
pub struct SectionStream {
    recv: RecvStream,
    header: Vec<u8>,
    check: Arc<SectionCheck>,
    spans: std::vec::IntoIter<SectionSpan>,
}

impl SectionStream {
    /// The object's header bytes, already checked to parse and match the requested key
    /// (empty for [`StoreClient::open_known_sections`], whose caller holds the header).
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// The parsed header the sections are checked against.
    pub fn check(&self) -> &Arc<SectionCheck> {
        &self.check
    }

    /// Receives the next section: `(index, bytes)`, checksum verified; `None` after the last.
    pub async fn next_section(&mut self) -> Result<Option<(usize, Bytes)>, StoreClientError> {
        let Some(span) = self.spans.next() else {
            return Ok(None);
        };
        let len =
            usize::try_from(span.len).map_err(|_| StoreClientError::Unexpected("get-sections"))?;
        let bytes = read_exactly(&mut self.recv, len).await?;
        let index = span.index as usize;
        self.check
            .verify(index, &bytes)
            .map_err(|e| StoreClientError::Corrupt(e.to_string()))?;
        Ok(Some((index, bytes)))
    }
}

impl StoreClient {
    /// Connects to the store at `addr` with default options, and authenticates when `tls`
    /// carries a token.
    pub async fn connect(
        addr: SocketAddr,
        tls: TlsClientConfig,
    ) -> Result<StoreClient, StoreClientError> {
        Self::connect_with(addr, tls, ClientOptions::default()).await
    }

    /// Connects with explicit transport options.
    pub async fn connect_with(
        addr: SocketAddr,
        tls: TlsClientConfig,
        options: ClientOptions,
    ) -> Result<StoreClient, StoreClientError> {
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|_| StoreClientError::Unexpected("bind address"))?;
        let mut endpoint =
            super::tuning::quic_endpoint(bind, None).map_err(StoreClientError::Endpoint)?;
        let mut cfg = quinn::ClientConfig::new(tls.quic()?);
        let mut tuning = options.tuning;
        if tuning.keep_alive.is_none() {
            // Below the server's default idle timeout (30 s) by a wide margin.
            tuning.keep_alive = Some((tuning.idle_timeout / 3).min(Duration::from_secs(5)));
        }
        cfg.transport_config(Arc::new(transport_config(&tuning)));
        endpoint.set_default_client_config(cfg);
        let conn = endpoint.connect(addr, &tls.server_name)?.await?;
        let client = StoreClient { endpoint, conn };
        if let Some(token) = tls.token {
            match client.simple(Request::Auth { token }).await? {
                Response::Authed => {}
                _ => return Err(StoreClientError::Unexpected("auth")),
            }
        }
        Ok(client)
    }

    /// Uploads a chunk object under the key in its header; true when the store did not have it.
    /// The object is checked locally first, so a corrupt file is never sent.
    /// A key already stored is left as it is (stored objects are write-once) and answers false.
    pub async fn put(&self, object: Bytes) -> Result<bool, StoreClientError> {
        self.put_object(object, false).await
    }

    /// [`StoreClient::put`], overwriting a stored object when `replace` is set.
    pub async fn put_object(&self, object: Bytes, replace: bool) -> Result<bool, StoreClientError> {
        let key = object::verify_object(&object)?.key;
        self.put_with(key, object, replace).await
    }

    /// Uploads bytes under `key` without checking them locally (the server still checks).
    pub async fn put_raw(&self, key: ChunkKey, object: Bytes) -> Result<bool, StoreClientError> {
        self.put_with(key, object, false).await
    }

    async fn put_with(
        &self,
        key: ChunkKey,
        object: Bytes,
        replace: bool,
    ) -> Result<bool, StoreClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.write_all(
            &Request::Put {
                key,
                len: object.len() as u64,
                replace,
            }
            .encode(),
        )
        .await?;
        // The server may answer (and stop our stream) before all bytes are sent, e.g. when
        // the object is too large: prefer its answer to our write error.
        let written = send.write_chunk(object).await;
        let _ = send.finish();
        match (read_response(&mut recv, Op::Put).await, written) {
            (Ok(Response::Stored { created }), Ok(())) => Ok(created),
            // Already stored and not replaced: the store keeps its copy, as asked.
            (
                Ok(Response::Error {
                    code: StoreErrorCode::Exists,
                    ..
                }),
                _,
            ) if !replace => Ok(false),
            (Ok(Response::Error { code, message }), _) => {
                Err(StoreClientError::from_server(code, message))
            }
            (Ok(_), _) => Err(StoreClientError::Unexpected("put")),
            (Err(_), Err(w)) => Err(w.into()),
            (Err(e), Ok(())) => Err(e),
        }
    }

    /// Downloads a whole object, verified against its checksums.
    pub async fn get(&self, key: &ChunkKey) -> Result<Vec<u8>, StoreClientError> {
        let bytes = self.get_range(key, 0, RANGE_TO_END).await?;
        let info =
            object::verify_object(&bytes).map_err(|e| StoreClientError::Corrupt(e.to_string()))?;
        if info.key != *key {
            return Err(StoreClientError::Corrupt(format!(
                "object carries key {}",
                info.key
            )));
        }
        Ok(bytes)
    }

    /// Uploads serialized codec profile bytes under their profile key
    /// (`ProfileId::object_key`); true when the store did not have them. Write-once: a profile
    /// already stored (by this node earlier or any other) answers false, which is success.
    pub async fn put_profile(&self, profile: Bytes) -> Result<bool, StoreClientError> {
        let key = ProfileId::of_bytes(&profile).object_key();
        object::verify_profile_object(&key, &profile)?;
        self.put_with(key, profile, false).await
    }

    /// Downloads the bytes of codec profile `id` (the object under `id.object_key()`),
    /// refusing an object over `max_len` bytes before reading it, and checks that they hash to
    /// `id` ([`StoreClientError::Corrupt`] if not). Whether they parse is the caller's check.
    pub async fn get_profile(
        &self,
        id: &ProfileId,
        max_len: u64,
    ) -> Result<Vec<u8>, StoreClientError> {
        let bytes = self
            .get_bounded(&id.object_key(), 0, RANGE_TO_END, max_len)
            .await?;
        let found = ProfileId::of_bytes(&bytes);
        if found != *id {
            return Err(StoreClientError::Corrupt(format!(
                "profile object {id} hashes to {found}"
            )));
        }
        Ok(bytes)
    }

    /// Downloads `len` bytes from `offset` ([`RANGE_TO_END`] for the rest). The server checks
    /// the whole object before sending; the range itself is not re-checked here.
    pub async fn get_range(
        &self,
        key: &ChunkKey,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StoreClientError> {
        self.get_bounded(key, offset, len, u64::MAX).await
    }

    /// [`StoreClient::get_range`], refusing (unread) an answer of more than `max` bytes.
    async fn get_bounded(
        &self,
        key: &ChunkKey,
        offset: u64,
        len: u64,
        max: u64,
    ) -> Result<Vec<u8>, StoreClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.write_all(
            &Request::Get {
                key: *key,
                offset,
                len,
            }
            .encode(),
        )
        .await?;
        let _ = send.finish();
        match read_response(&mut recv, Op::Get).await? {
            Response::Data { len, .. } if len > max => Err(StoreClientError::TooLarge { len, max }),
            Response::Data { len, .. } => {
                let len = usize::try_from(len).map_err(|_| StoreClientError::Unexpected("get"))?;
                Ok(read_exactly(&mut recv, len).await?.into())
            }
            Response::Error { code, message } => Err(StoreClientError::from_server(code, message)),
            _ => Err(StoreClientError::Unexpected("get")),
        }
    }

    /// Starts fetching the header and the listed sections of one object; see [`SectionStream`].
    pub async fn open_sections(
        &self,
        key: &ChunkKey,
        sections: &[usize],
    ) -> Result<SectionStream, StoreClientError> {
        self.request_sections(key, None, sections).await
    }

    /// Starts fetching the listed sections of the object whose header `check` holds (from an
    /// earlier [`StoreClient::open_sections`]): the store sends the sections alone, which
    /// saves the header's bytes (the quantization parameters of every layer) on each request.
    pub async fn open_known_sections(
        &self,
        check: &Arc<SectionCheck>,
        sections: &[usize],
    ) -> Result<SectionStream, StoreClientError> {
        self.request_sections(&check.key(), Some(check), sections)
            .await
    }

    async fn request_sections(
        &self,
        key: &ChunkKey,
        known: Option<&Arc<SectionCheck>>,
        sections: &[usize],
    ) -> Result<SectionStream, StoreClientError> {
        let indices = sections
            .iter()
            .map(|&s| u32::try_from(s).map_err(|_| StoreClientError::Unexpected("section index")))
            .collect::<Result<Vec<_>, _>>()?;
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let request = Request::GetSections {
            key: *key,
            sections: indices.clone(),
            header: known.is_none(),
        };
        send.write_all(&request.encode()).await?;
        let _ = send.finish();
        match read_response(&mut recv, request.op()).await? {
            Response::Sections {
                header_len,
                sections: spans,
            } => {
                if spans.iter().map(|s| s.index).ne(indices.iter().copied()) {
                    return Err(StoreClientError::Unexpected("get-sections"));
                }
                let (header, check) = match known {
                    Some(check) if header_len == 0 => (Vec::new(), check.clone()),
                    Some(_) => return Err(StoreClientError::Unexpected("get-sections-only")),
                    None => {
                        let header = read_exactly(&mut recv, header_len as usize).await?.to_vec();
                        let check = SectionCheck::from_header(&header)
                            .map_err(|e| StoreClientError::Corrupt(e.to_string()))?;
                        if check.key() != *key {
                            return Err(StoreClientError::Corrupt(format!(
                                "header carries key {}",
                                check.key()
                            )));
                        }
                        (header, Arc::new(check))
                    }
                };
                for s in &spans {
                    if check.section_len(s.index as usize) != Some(s.len) {
                        return Err(StoreClientError::Corrupt(format!(
                            "section {} length disagrees",
                            s.index
                        )));
                    }
                }
                Ok(SectionStream {
                    recv,
                    header,
                    check,
                    spans: spans.into_iter(),
                })
            }
            Response::Error { code, message } => Err(StoreClientError::from_server(code, message)),
            _ => Err(StoreClientError::Unexpected("get-sections")),
        }
    }

    /// Fetches the header and the listed sections, all verified, in the order requested.
    pub async fn get_sections(
        &self,
        key: &ChunkKey,
        sections: &[usize],
    ) -> Result<Sections, StoreClientError> {
        let mut stream = self.open_sections(key, sections).await?;
        let mut out = Vec::with_capacity(sections.len());
        while let Some(s) = stream.next_section().await? {
            out.push(s);
        }
        Ok(Sections {
            header: stream.header,
            sections: out,
        })
    }

    /// How many leading keys of `keys` (a prefix chain) the store holds, in one round trip.
    pub async fn exists_prefix(&self, keys: &[ChunkKey]) -> Result<usize, StoreClientError> {
        match self
            .simple(Request::ExistsPrefix {
                keys: keys.to_vec(),
            })
            .await?
        {
            Response::Present { count } => Ok(count as usize),
            _ => Err(StoreClientError::Unexpected("exists-prefix")),
        }
    }

    /// Every key stored for `model`.
    pub async fn list(&self, model: &ModelFingerprint) -> Result<Vec<ChunkKey>, StoreClientError> {
        match self.simple(Request::List { model: *model }).await? {
            Response::Keys { keys } => Ok(keys),
            _ => Err(StoreClientError::Unexpected("list")),
        }
    }

    /// Deletes one object; true when it existed.
    pub async fn delete(&self, key: &ChunkKey) -> Result<bool, StoreClientError> {
        match self.simple(Request::Delete { key: *key }).await? {
            Response::Deleted { existed } => Ok(existed),
            _ => Err(StoreClientError::Unexpected("delete")),
        }
    }

    /// The store's statistics.
    pub async fn stats(&self) -> Result<StatsReport, StoreClientError> {
        match self.simple(Request::Stats).await? {
            Response::Stats(s) => Ok(s),
            _ => Err(StoreClientError::Unexpected("stats")),
        }
    }

    /// The underlying QUIC connection (for its statistics: RTT, congestion window, bytes).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Closes the connection and waits until the peer has been told.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.endpoint.wait_idle().await;
    }

    /// Sends a request without data and reads a response without data; server errors become
    /// typed errors.
    async fn simple(&self, req: Request) -> Result<Response, StoreClientError> {
        let op = req.op();
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.write_all(&req.encode()).await?;
        let _ = send.finish();
        match read_response(&mut recv, op).await? {
            Response::Error { code, message } => Err(StoreClientError::from_server(code, message)),
            r => Ok(r),
        }
    }
}

/// Reads one response frame.
async fn read_response(recv: &mut RecvStream, op: Op) -> Result<Response, StoreClientError> {
    let mut head = [0u8; wire::FRAME_HEADER_LEN];
    read_into(recv, &mut head).await?;
    let total = wire::frame_len(&head)?;
    let mut buf = vec![0u8; total];
    buf[..head.len()].copy_from_slice(&head);
    read_into(recv, &mut buf[wire::FRAME_HEADER_LEN..]).await?;
    match Response::decode(op, &buf)? {
        Some((resp, _)) => Ok(resp),
        None => Err(StoreClientError::Truncated),
    }
}

async fn read_into(recv: &mut RecvStream, buf: &mut [u8]) -> Result<(), StoreClientError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => StoreClientError::Truncated,
        quinn::ReadExactError::ReadError(e) => StoreClientError::Read(e),
    })
}

/// Reads exactly `len` bytes, in the chunks quinn hands out (one copy into the result).
async fn read_exactly(recv: &mut RecvStream, len: usize) -> Result<Bytes, StoreClientError> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        match recv.read_chunk(len - out.len(), true).await? {
            Some(chunk) => out.extend_from_slice(&chunk.bytes),
            None => return Err(StoreClientError::Truncated),
        }
    }
    Ok(out.into())
}
