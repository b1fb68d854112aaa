//! The store's wire protocol, sans I/O: request and response framing, encoding and parsing.
//!
//! Every operation runs on its own bidirectional QUIC stream: the client writes one request
//! frame (and, for a put, the object bytes after it, then finishes the stream); the server
//! answers with one response frame, followed for `Get` and `GetSections` by raw data bytes.
//! This module only turns values into bytes and bytes into values: it opens no sockets, keeps
//! no clocks and never blocks, so every rule of the protocol is tested without a network
//! (the quinn-proto split). The byte layout is documented in `docs/STORE.md`.
//!
//! Parsers take a byte prefix and return `Ok(None)` when more bytes are needed, so a caller
//! feeds whatever arrived so far and retries with more.

use kvfetcher_codec::{ChunkKey, ModelFingerprint};

/// First four bytes of every request frame.
pub const REQUEST_MAGIC: [u8; 4] = *b"KVFQ";
/// First four bytes of every response frame.
pub const RESPONSE_MAGIC: [u8; 4] = *b"KVFR";
/// The protocol version this module speaks; a peer with another version is refused.
pub const VERSION: u8 = 1;
/// Bytes of the fixed part of a frame (magic, version/status, op/reserved, flags, body length).
pub const FRAME_HEADER_LEN: usize = 12;
/// Largest request or response body accepted (object data is not part of a body).
/// 1 MiB holds an `ExistsPrefix` of 32 768 keys, far beyond any real prefix chain.
pub const MAX_BODY_LEN: usize = 1 << 20;
/// Largest number of keys or sections in one request or listing, so a peer cannot make the
/// other side allocate without bound.
pub const MAX_ITEMS: usize = 32_768;
/// Largest error message carried in an error response.
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// `Get` range length that means "to the end of the object".
pub const RANGE_TO_END: u64 = u64::MAX;

/// Why bytes could not be parsed as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame does not start with the expected magic bytes.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// The operation code is unknown.
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    /// The status code of a response is unknown.
    #[error("unknown status {0}")]
    UnknownStatus(u8),
    /// The declared body length exceeds [`MAX_BODY_LEN`].
    #[error("body of {0} bytes exceeds the limit")]
    BodyTooLarge(usize),
    /// The body is shorter or longer than its fields need.
    #[error("malformed {op} body: {reason}")]
    Malformed {
        /// The operation whose body is malformed.
        op: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A list holds more than [`MAX_ITEMS`] entries.
    #[error("{0} items exceed the limit")]
    TooManyItems(usize),
    /// Reserved flags are set.
    #[error("reserved flags {0:#x} set")]
    Flags(u16),
}

/// Operation codes, one per request kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Present a bearer token for this connection.
    Auth = 1,
    /// Upload one chunk object.
    Put = 2,
    /// Download a byte range of one object.
    Get = 3,
    /// Download the header and chosen sections of one object.
    GetSections = 4,
    /// Count how many leading keys of a list are present.
    ExistsPrefix = 5,
    /// List the keys stored for one model.
    List = 6,
    /// Delete one object.
    Delete = 7,
    /// Report store statistics.
    Stats = 8,
    /// Download chosen sections of one object without its header (the client holds it).
    GetSectionsOnly = 9,
}

impl Op {
    /// Parses an operation code.
    pub fn from_code(code: u8) -> Result<Op, WireError> {
        Ok(match code {
            1 => Op::Auth,
            2 => Op::Put,
            3 => Op::Get,
            4 => Op::GetSections,
            5 => Op::ExistsPrefix,
            6 => Op::List,
            7 => Op::Delete,
            8 => Op::Stats,
            9 => Op::GetSectionsOnly,
            other => return Err(WireError::UnknownOp(other)),
        })
    }

    /// A short lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Op::Auth => "auth",
            Op::Put => "put",
            Op::Get => "get",
            Op::GetSections => "get-sections",
            Op::ExistsPrefix => "exists-prefix",
            Op::List => "list",
            Op::Delete => "delete",
            Op::Stats => "stats",
            Op::GetSectionsOnly => "get-sections-only",
        }
    }
}

/// One request, as the client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Authenticate the connection with a bearer token.
    Auth {
        /// The token bytes.
        token: Vec<u8>,
    },
    /// Upload an object of `len` bytes, which follow the frame on the same stream.
    Put {
        /// The key the object's header must carry.
        key: ChunkKey,
        /// Exact number of object bytes that follow.
        len: u64,
        /// Overwrite an object already stored under `key`. Without it a stored key is
        /// write-once: the put is refused with [`StoreErrorCode::Exists`]. Encoded as one optional
        /// trailing body byte (absent: false), so older clients' puts parse unchanged.
        replace: bool,
    },
    /// Download `len` bytes from `offset` ([`RANGE_TO_END`] for the rest).
    Get {
        /// The object.
        key: ChunkKey,
        /// First byte.
        offset: u64,
        /// Number of bytes, or [`RANGE_TO_END`].
        len: u64,
    },
    /// Download the listed sections of one object, in the order given, after its header
    /// when `header` is set (op `GetSections`); without it (op `GetSectionsOnly`, for a client
    /// that fetched the header before) the answer's `header_len` is 0.
    GetSections {
        /// The object.
        key: ChunkKey,
        /// Section indices, as in the object header.
        sections: Vec<u32>,
        /// Whether the header comes first.
        header: bool,
    },
    /// How many leading keys of `keys` are stored.
    ExistsPrefix {
        /// A prefix chain of chunk keys, oldest first.
        keys: Vec<ChunkKey>,
    },
    /// List every key stored for `model`.
    List {
        /// The model fingerprint.
        model: ModelFingerprint,
    },
    /// Delete one object.
    Delete {
        /// The object.
        key: ChunkKey,
    },
    /// Report statistics.
    Stats,
}

impl Request {
    /// The request's operation code.
    pub fn op(&self) -> Op {
        match self {
            Request::Auth { .. } => Op::Auth,
            Request::Put { .. } => Op::Put,
            Request::Get { .. } => Op::Get,
            Request::GetSections { header: true, .. } => Op::GetSections,
            Request::GetSections { header: false, .. } => Op::GetSectionsOnly,
            Request::ExistsPrefix { .. } => Op::ExistsPrefix,
            Request::List { .. } => Op::List,
            Request::Delete { .. } => Op::Delete,
            Request::Stats => Op::Stats,
        }
    }

    /// Encodes the request frame (without any object bytes that follow a put).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            Request::Auth { token } => body.extend_from_slice(token),
            Request::Put { key, len, replace } => {
                body.extend_from_slice(&key.0);
                body.extend_from_slice(&len.to_le_bytes());
                if *replace {
                    body.push(1);
                }
            }
            Request::Get { key, offset, len } => {
                body.extend_from_slice(&key.0);
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&len.to_le_bytes());
            }
            Request::GetSections { key, sections, .. } => {
                body.extend_from_slice(&key.0);
                put_u32(&mut body, sections.len());
                for s in sections {
                    body.extend_from_slice(&s.to_le_bytes());
                }
            }
            Request::ExistsPrefix { keys } => {
                put_u32(&mut body, keys.len());
                for k in keys {
                    body.extend_from_slice(&k.0);
                }
            }
            Request::List { model } => body.extend_from_slice(&model.0),
            Request::Delete { key } => body.extend_from_slice(&key.0),
            Request::Stats => {}
        }
        frame(REQUEST_MAGIC, VERSION, self.op() as u8, &body)
    }

    /// Parses one request frame from the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds only part of the frame, else the request and the
    /// number of bytes it used (object bytes of a put start right after).
    pub fn decode(buf: &[u8]) -> Result<Option<(Request, usize)>, WireError> {
        let Some((magic, version, op, body, used)) = split_frame(buf)? else {
            return Ok(None);
        };
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let op = Op::from_code(op)?;
        let mut r = Reader::new(op.name(), body);
        let req = match op {
            Op::Auth => Request::Auth {
                token: body.to_vec(),
            },
            Op::Put => {
                let key = r.key()?;
                let len = r.u64()?;
                let replace = if r.buf.is_empty() { false } else { r.bool()? };
                r.finish()?;
                Request::Put { key, len, replace }
            }
            Op::Get => {
                let key = r.key()?;
                let offset = r.u64()?;
                let len = r.u64()?;
                r.finish()?;
                Request::Get { key, offset, len }
            }
            Op::GetSections | Op::GetSectionsOnly => {
                let key = r.key()?;
                let n = r.count(4)?;
                let sections = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
                r.finish()?;
                Request::GetSections {
                    key,
                    sections,
                    header: op == Op::GetSections,
                }
            }
            Op::ExistsPrefix => {
                let n = r.count(32)?;
                let keys = (0..n).map(|_| r.key()).collect::<Result<_, _>>()?;
                r.finish()?;
                Request::ExistsPrefix { keys }
            }
            Op::List => {
                let model = ModelFingerprint(r.bytes32()?);
                r.finish()?;
                Request::List { model }
            }
            Op::Delete => {
                let key = r.key()?;
                r.finish()?;
                Request::Delete { key }
            }
            Op::Stats => {
                r.finish()?;
                Request::Stats
            }
        };
        Ok(Some((req, used)))
    }
}

/// Why the server refused or failed a request; carried in the response status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StoreErrorCode {
    /// The request could not be parsed or breaks a protocol rule.
    BadRequest = 1,
    /// The key is not stored.
    NotFound = 2,
    /// The upload exceeds the server's object size limit.
    TooLarge = 3,
    /// The stored object failed its checksums: it was not served.
    Corrupt = 4,
    /// The connection has not presented a valid token.
    Unauthorized = 5,
    /// The server failed internally (storage I/O).
    Internal = 6,
    /// The uploaded object is not a valid chunk object or its key does not match.
    InvalidObject = 7,
    /// The stream sat idle past the server's limit.
    Timeout = 8,
    /// A byte range or section index lies outside the object.
    OutOfRange = 9,
    /// The server is at its limit of concurrent uploads: try again later.
    Busy = 10,
    /// The key is already stored and the put did not ask to replace it (stored objects are
    /// write-once): the stored object is unchanged.
    Exists = 11,
}

impl StoreErrorCode {
    /// Parses a status byte (0 is success and not an error code).
    pub fn from_code(code: u8) -> Result<StoreErrorCode, WireError> {
        Ok(match code {
            1 => StoreErrorCode::BadRequest,
            2 => StoreErrorCode::NotFound,
            3 => StoreErrorCode::TooLarge,
            4 => StoreErrorCode::Corrupt,
            5 => StoreErrorCode::Unauthorized,
            6 => StoreErrorCode::Internal,
            7 => StoreErrorCode::InvalidObject,
            8 => StoreErrorCode::Timeout,
            9 => StoreErrorCode::OutOfRange,
            10 => StoreErrorCode::Busy,
            11 => StoreErrorCode::Exists,
            other => return Err(WireError::UnknownStatus(other)),
        })
    }
}

/// Store statistics, as reported by `Stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsReport {
    /// Objects stored.
    pub objects: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Connections open now.
    pub connections: u64,
    /// Requests answered since start (successes and errors).
    pub requests: u64,
    /// Object bytes received by puts since start.
    pub bytes_in: u64,
    /// Object bytes sent by gets since start.
    pub bytes_out: u64,
    /// Stored objects found corrupt since start.
    pub corrupt: u64,
    /// Failed authentications since start (wrong tokens, refused client certificates).
    pub auth_failures: u64,
    /// Connections and authentications refused since start because their address was blocked
    /// after failed authentication. 0 from a store older than these two counters.
    pub auth_throttled: u64,
}

/// The location and size of one section in a `GetSections` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionSpan {
    /// Section index in the object header.
    pub index: u32,
    /// Bytes of the section, sent in request order after the header bytes.
    pub len: u64,
}

/// One response frame, as the server sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The request failed.
    Error {
        /// Why.
        code: StoreErrorCode,
        /// A short human-readable message.
        message: String,
    },
    /// Authentication accepted.
    Authed,
    /// The object is stored; `created` is false when it was already there.
    Stored {
        /// Whether this put created the object.
        created: bool,
    },
    /// `len` object bytes from `offset` follow the frame.
    Data {
        /// Size of the whole object.
        total_len: u64,
        /// First byte sent.
        offset: u64,
        /// Bytes that follow.
        len: u64,
    },
    /// `header_len` header bytes follow, then each section's bytes in the order listed.
    Sections {
        /// Bytes of the object header that follow first.
        header_len: u32,
        /// The sections that follow, in order.
        sections: Vec<SectionSpan>,
    },
    /// How many leading keys are present.
    Present {
        /// The count.
        count: u32,
    },
    /// Keys stored for a model.
    Keys {
        /// The keys, in no particular order.
        keys: Vec<ChunkKey>,
    },
    /// Delete result; `existed` is false when there was nothing to delete.
    Deleted {
        /// Whether an object was removed.
        existed: bool,
    },
    /// Statistics.
    Stats(StatsReport),
}

impl Response {
    /// Encodes the response frame (without the data bytes that follow `Data` and `Sections`).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let status = match self {
            Response::Error { code, message } => {
                let mut end = message.len().min(MAX_ERROR_MESSAGE);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                body.extend_from_slice(&message.as_bytes()[..end]);
                *code as u8
            }
            Response::Authed => 0,
            Response::Stored { created } => {
                body.push(u8::from(*created));
                0
            }
            Response::Data {
                total_len,
                offset,
                len,
            } => {
                body.extend_from_slice(&total_len.to_le_bytes());
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&len.to_le_bytes());
                0
            }
            Response::Sections {
                header_len,
                sections,
            } => {
                body.extend_from_slice(&header_len.to_le_bytes());
                put_u32(&mut body, sections.len());
                for s in sections {
                    body.extend_from_slice(&s.index.to_le_bytes());
                    body.extend_from_slice(&s.len.to_le_bytes());
                }
                0
            }
            Response::Present { count } => {
                body.extend_from_slice(&count.to_le_bytes());
                0
            }
            Response::Keys { keys } => {
                put_u32(&mut body, keys.len());
                for k in keys {
                    body.extend_from_slice(&k.0);
                }
                0
            }
            Response::Deleted { existed } => {
                body.push(u8::from(*existed));
                0
            }
            Response::Stats(s) => {
                for v in [
                    s.objects,
                    s.bytes,
                    s.connections,
                    s.requests,
                    s.bytes_in,
                    s.bytes_out,
                    s.corrupt,
                    s.auth_failures,
                    s.auth_throttled,
                ] {
                    body.extend_from_slice(&v.to_le_bytes());
                }
                0
            }
        };
        frame(RESPONSE_MAGIC, status, 0, &body)
    }

    /// Parses one response to a request of kind `op` from the front of `buf`.
    ///
    /// Returns `Ok(None)` when more bytes are needed, else the response and the bytes it used
    /// (data bytes of `Data` and `Sections` start right after).
    pub fn decode(op: Op, buf: &[u8]) -> Result<Option<(Response, usize)>, WireError> {
        let Some((magic, status, _reserved, body, used)) = split_frame(buf)? else {
            return Ok(None);
        };
        if magic != RESPONSE_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if status != 0 {
            let code = StoreErrorCode::from_code(status)?;
            let message = String::from_utf8_lossy(body).into_owned();
            return Ok(Some((Response::Error { code, message }, used)));
        }
        let mut r = Reader::new(op.name(), body);
        let resp = match op {
            Op::Auth => Response::Authed,
            Op::Put => Response::Stored { created: r.bool()? },
            Op::Get => {
                let total_len = r.u64()?;
                let offset = r.u64()?;
                let len = r.u64()?;
                Response::Data {
                    total_len,
                    offset,
                    len,
                }
            }
            Op::GetSections | Op::GetSectionsOnly => {
                let header_len = r.u32()?;
                let n = r.count(12)?;
                let sections = (0..n)
                    .map(|_| {
                        Ok(SectionSpan {
                            index: r.u32()?,
                            len: r.u64()?,
                        })
                    })
                    .collect::<Result<_, WireError>>()?;
                Response::Sections {
                    header_len,
                    sections,
                }
            }
            Op::ExistsPrefix => Response::Present { count: r.u32()? },
            Op::List => {
                let n = r.count(32)?;
                let keys = (0..n).map(|_| r.key()).collect::<Result<_, _>>()?;
                Response::Keys { keys }
            }
            Op::Delete => Response::Deleted { existed: r.bool()? },
            Op::Stats => Response::Stats(StatsReport {
                objects: r.u64()?,
                bytes: r.u64()?,
                connections: r.u64()?,
                requests: r.u64()?,
                bytes_in: r.u64()?,
                bytes_out: r.u64()?,
                corrupt: r.u64()?,
                // Absent from older stores.
                auth_failures: if r.buf.is_empty() { 0 } else { r.u64()? },
                auth_throttled: if r.buf.is_empty() { 0 } else { r.u64()? },
            }),
        };
        r.finish()?;
        Ok(Some((resp, used)))
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // Lists are bounded by MAX_ITEMS, far below u32::MAX.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn frame(magic: [u8; 4], b4: u8, b5: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&magic);
    out.push(b4);
    out.push(b5);
    out.extend_from_slice(&0u16.to_le_bytes());
    put_u32(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// The total frame length (header plus body) declared by a frame's first
/// [`FRAME_HEADER_LEN`] bytes, checked against [`MAX_BODY_LEN`], so an I/O layer knows how
/// many bytes to read before calling a `decode`.
pub fn frame_len(header: &[u8; FRAME_HEADER_LEN]) -> Result<usize, WireError> {
    let body_len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if body_len > MAX_BODY_LEN {
        return Err(WireError::BodyTooLarge(body_len));
    }
    Ok(FRAME_HEADER_LEN + body_len)
}

type FrameParts<'a> = ([u8; 4], u8, u8, &'a [u8], usize);

fn split_frame(buf: &[u8]) -> Result<Option<FrameParts<'_>>, WireError> {
    if buf.len() >= 4 && buf[..4] != REQUEST_MAGIC && buf[..4] != RESPONSE_MAGIC {
        let mut m = [0u8; 4];
        m.copy_from_slice(&buf[..4]);
        return Err(WireError::BadMagic(m));
    }
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&buf[..4]);
    let flags = u16::from_le_bytes([buf[6], buf[7]]);
    if flags != 0 {
        return Err(WireError::Flags(flags));
    }
    let body_len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if body_len > MAX_BODY_LEN {
        return Err(WireError::BodyTooLarge(body_len));
    }
    let end = FRAME_HEADER_LEN + body_len;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((
        magic,
        buf[4],
        buf[5],
        &buf[FRAME_HEADER_LEN..end],
        end,
    )))
}

/// A cursor over a body that reports short or long bodies as [`WireError::Malformed`].
struct Reader<'a> {
    op: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(op: &'static str, buf: &'a [u8]) -> Self {
        Reader { op, buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Malformed {
                op: self.op,
                reason: "body too short",
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn bool(&mut self) -> Result<bool, WireError> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Malformed {
                op: self.op,
                reason: "flag is not 0 or 1",
            }),
        }
    }

    fn bytes32(&mut self) -> Result<[u8; 32], WireError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }

    fn key(&mut self) -> Result<ChunkKey, WireError> {
        Ok(ChunkKey(self.bytes32()?))
    }

    /// Reads a list length and checks that the body can hold that many `item`-byte entries.
    fn count(&mut self, item: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n > MAX_ITEMS {
            return Err(WireError::TooManyItems(n));
        }
        if self.buf.len() < n * item {
            return Err(WireError::Malformed {
                op: self.op,
                reason: "list longer than body",
            });
        }
        Ok(n)
    }

    fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed {
                op: self.op,
                reason: "trailing bytes",
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> ChunkKey {
        ChunkKey([b; 32])
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Auth {
                token: b"secret".to_vec(),
            },
            Request::Put {
                key: key(1),
                len: 12345,
                replace: false,
            },
            Request::Put {
                key: key(1),
                len: 12345,
                replace: true,
            },
            Request::Get {
                key: key(2),
                offset: 7,
                len: RANGE_TO_END,
            },
            Request::GetSections {
                key: key(3),
                sections: vec![0, 2, 5],
                header: true,
            },
            Request::GetSections {
                key: key(3),
                sections: vec![1],
                header: false,
            },
            Request::ExistsPrefix {
                keys: vec![key(4), key(5), key(6)],
            },
            Request::List {
                model: ModelFingerprint([9; 32]),
            },
            Request::Delete { key: key(7) },
            Request::Stats,
        ]
    }

    #[test]
    fn requests_round_trip_byte_by_byte() {
        for req in all_requests() {
            let bytes = req.encode();
            // Every strict prefix asks for more bytes; the whole frame parses back exactly.
            for cut in 0..bytes.len() {
                assert_eq!(
                    Request::decode(&bytes[..cut]),
                    Ok(None),
                    "{req:?} cut at {cut}"
                );
            }
            let mut with_tail = bytes.clone();
            with_tail.extend_from_slice(b"object bytes");
            let (back, used) = Request::decode(&with_tail).unwrap().unwrap();
            assert_eq!(back, req);
            assert_eq!(used, bytes.len());
        }
    }

    #[test]
    fn responses_round_trip() {
        let cases = vec![
            (Op::Auth, Response::Authed),
            (Op::Put, Response::Stored { created: true }),
            (
                Op::Get,
                Response::Data {
                    total_len: 100,
                    offset: 10,
                    len: 90,
                },
            ),
            (
                Op::GetSections,
                Response::Sections {
                    header_len: 300,
                    sections: vec![
                        SectionSpan { index: 1, len: 5 },
                        SectionSpan { index: 3, len: 9 },
                    ],
                },
            ),
            (
                Op::GetSectionsOnly,
                Response::Sections {
                    header_len: 0,
                    sections: vec![SectionSpan { index: 2, len: 7 }],
                },
            ),
            (Op::ExistsPrefix, Response::Present { count: 2 }),
            (
                Op::List,
                Response::Keys {
                    keys: vec![key(1), key(2)],
                },
            ),
            (Op::Delete, Response::Deleted { existed: false }),
            (
                Op::Stats,
                Response::Stats(StatsReport {
                    objects: 1,
                    bytes: 2,
                    connections: 3,
                    requests: 4,
                    bytes_in: 5,
                    bytes_out: 6,
                    corrupt: 7,
                    auth_failures: 8,
                    auth_throttled: 9,
                }),
            ),
            (
                Op::Get,
                Response::Error {
                    code: StoreErrorCode::NotFound,
                    message: "no such key".into(),
                },
            ),
        ];
        for (op, resp) in cases {
            let bytes = resp.encode();
            for cut in 0..bytes.len() {
                assert_eq!(Response::decode(op, &bytes[..cut]), Ok(None));
            }
            assert_eq!(Response::decode(op, &bytes), Ok(Some((resp, bytes.len()))));
        }
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        assert!(matches!(
            Request::decode(b"GET / HTTP/1.1\r\n"),
            Err(WireError::BadMagic(_))
        ));
        let mut v = Request::Stats.encode();
        v[4] = 9;
        assert_eq!(Request::decode(&v), Err(WireError::Version(9)));
        let mut v = Request::Stats.encode();
        v[5] = 200;
        assert_eq!(Request::decode(&v), Err(WireError::UnknownOp(200)));
        let mut v = Request::Stats.encode();
        v[6] = 1;
        assert_eq!(Request::decode(&v), Err(WireError::Flags(1)));
        // A huge declared body is refused before any of it arrives.
        let mut v = Request::Stats.encode();
        v[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Request::decode(&v),
            Err(WireError::BodyTooLarge(_))
        ));
        // A put body one byte short, and one with a trailing byte.
        let put = Request::Put {
            key: key(1),
            len: 5,
            replace: false,
        }
        .encode();
        // An old client's put (no replace byte) is 40 bytes and means "do not replace".
        assert_eq!(put.len(), FRAME_HEADER_LEN + 40);
        let mut short = put.clone();
        short.pop();
        short[8..12].copy_from_slice(&39u32.to_le_bytes());
        assert!(matches!(
            Request::decode(&short),
            Err(WireError::Malformed { op: "put", .. })
        ));
        let mut long = put.clone();
        long.extend_from_slice(&[1, 0]);
        long[8..12].copy_from_slice(&42u32.to_le_bytes());
        assert!(matches!(
            Request::decode(&long),
            Err(WireError::Malformed { op: "put", .. })
        ));
        let mut long = put;
        long.push(2);
        long[8..12].copy_from_slice(&41u32.to_le_bytes());
        assert!(matches!(
            Request::decode(&long),
            Err(WireError::Malformed { op: "put", .. })
        ));
        // A list count larger than the body (an allocation bomb) is refused.
        let mut v = Request::ExistsPrefix { keys: vec![key(1)] }.encode();
        v[12..16].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            Request::decode(&v),
            Err(WireError::Malformed { .. })
        ));
        let mut v = Request::ExistsPrefix { keys: vec![] }.encode();
        v[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Request::decode(&v),
            Err(WireError::TooManyItems(_))
        ));
    }

    #[test]
    fn error_messages_are_bounded_and_unknown_status_refused() {
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let bytes = Response::Error {
            code: StoreErrorCode::Internal,
            message: long,
        }
        .encode();
        let (resp, _) = Response::decode(Op::Get, &bytes).unwrap().unwrap();
        let Response::Error { message, .. } = resp else {
            panic!("not an error")
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE && message.chars().all(|c| c == 'é'));
        let mut bytes = Response::Authed.encode();
        bytes[4] = 77;
        assert_eq!(
            Response::decode(Op::Auth, &bytes),
            Err(WireError::UnknownStatus(77))
        );
    }

    /// A store older than the auth counters sends 7 counters: they decode with both at 0.
    #[test]
    fn stats_of_an_older_store_decode_without_auth_counters() {
        let body: Vec<u8> = (1..=7u64).flat_map(u64::to_le_bytes).collect();
        let bytes = frame(RESPONSE_MAGIC, 0, 0, &body);
        let (resp, _) = Response::decode(Op::Stats, &bytes).unwrap().unwrap();
        let Response::Stats(s) = resp else {
            panic!("not stats: {resp:?}")
        };
        assert_eq!((s.corrupt, s.auth_failures, s.auth_throttled), (7, 0, 0));
    }
}
