//! Sans-IO framing: the handshake, `[u32 LE length][u16 LE type][JSON payload]` frames, and the
//! pairing of frames with the fds that travel beside them (SCM_RIGHTS).
//!
//! Feed received bytes with [`FrameDecoder::handle_bytes`] and received fds with
//! [`FrameDecoder::handle_fds`], then take complete messages with [`FrameDecoder::poll_message`]
//! until it returns `None`. Encode with [`encode_message`]. Nothing here touches a socket.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use super::message::{self as m, ty, Message};

/// The 4 bytes that open both sides of the handshake.
pub const MAGIC: [u8; 4] = *b"KVFP";
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Length of the handshake in each direction: magic, u16 LE version, u16 LE status/flags.
pub const HELLO_LEN: usize = 8;
/// Length of a frame header: u32 LE payload length, u16 LE type.
pub const FRAME_HEADER_LEN: usize = 6;
/// Default cap on a frame's payload: a 100k-token request in JSON is under 1.2 MiB, so 16 MiB
/// leaves room for a million tokens while bounding what a bad peer can make us buffer.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;
/// Cap on fds received but not yet claimed by a frame; a peer sending more is misbehaving.
pub const MAX_PENDING_FDS: usize = 16;

/// Handshake status: the daemon speaks the client's version.
pub const HELLO_OK: u16 = 0;
/// Handshake status: the daemon does not speak the client's version (it sends its own).
pub const HELLO_VERSION_UNSUPPORTED: u16 = 1;
/// Client hello flag: the client parses the `corrupt` error code. A daemon sends `internal`
/// instead to a client without it (clients before this flag fail on an unknown code).
pub const HELLO_FLAG_CORRUPT: u16 = 1;
/// The hello flags this crate's clients send.
pub const CLIENT_HELLO_FLAGS: u16 = HELLO_FLAG_CORRUPT;

/// Why bytes could not be turned into messages (or messages into bytes).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The handshake did not start with [`MAGIC`].
    #[error("bad handshake magic")]
    BadMagic,
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: ours {ours}, theirs {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// A frame's payload exceeds the cap.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// An unknown frame type.
    #[error("unknown frame type {0:#06x}")]
    UnknownType(u16),
    /// The payload is not valid JSON for its type.
    #[error("bad payload for frame type {ty:#06x}: {source}")]
    BadPayload {
        /// The frame type.
        ty: u16,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A frame needs fds that did not arrive with it.
    #[error("frame type {0:#06x} is missing its fd")]
    MissingFd(u16),
    /// More unclaimed fds than [`MAX_PENDING_FDS`].
    #[error("too many unclaimed fds")]
    TooManyFds,
}

/// Encodes the client's side of the handshake, with the flags of this crate's clients
/// ([`CLIENT_HELLO_FLAGS`]).
pub fn encode_hello(version: u16) -> [u8; HELLO_LEN] {
    hello(version, CLIENT_HELLO_FLAGS)
}

/// Encodes the client's side of the handshake with explicit `flags` (tests of older clients).
pub fn encode_hello_with_flags(version: u16, flags: u16) -> [u8; HELLO_LEN] {
    hello(version, flags)
}

/// Encodes the daemon's answer to a handshake: its version and [`HELLO_OK`] or
/// [`HELLO_VERSION_UNSUPPORTED`].
pub fn encode_hello_reply(version: u16, status: u16) -> [u8; HELLO_LEN] {
    hello(version, status)
}

fn hello(version: u16, word: u16) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[6..8].copy_from_slice(&word.to_le_bytes());
    b
}

/// Parses either side of the handshake into (version, status/flags word).
pub fn parse_hello(b: &[u8; HELLO_LEN]) -> Result<(u16, u16), FrameError> {
    if b[..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    Ok((
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
    ))
}

/// Encodes one message as a frame (the fds it needs travel separately with the frame's bytes).
pub fn encode_message(msg: &Message, max_frame: usize) -> Result<Vec<u8>, FrameError> {
    let t = msg.type_id();
    let mut out = vec![0u8; FRAME_HEADER_LEN];
    let res = match msg {
        Message::Lookup(x) => serde_json::to_writer(&mut out, x),
        Message::Fetch(x) => serde_json::to_writer(&mut out, x),
        Message::Save(x) => serde_json::to_writer(&mut out, x),
        Message::Release(x) => serde_json::to_writer(&mut out, x),
        Message::Reopen(x) => serde_json::to_writer(&mut out, x),
        Message::Stats(x) => serde_json::to_writer(&mut out, x),
        Message::LookupReply(x) => serde_json::to_writer(&mut out, x),
        Message::FetchBuffer(x) => serde_json::to_writer(&mut out, x),
        Message::LayersReady(x) => serde_json::to_writer(&mut out, x),
        Message::FetchDone(x) => serde_json::to_writer(&mut out, x),
        Message::FetchFailed(x) => serde_json::to_writer(&mut out, x),
        Message::SaveReply(x) => serde_json::to_writer(&mut out, x),
        Message::Released(x) => serde_json::to_writer(&mut out, x),
        Message::StatsReply(x) => serde_json::to_writer(&mut out, x),
        Message::Error(x) => serde_json::to_writer(&mut out, x),
    };
    res.map_err(|source| FrameError::BadPayload { ty: t, source })?;
    let len = out.len() - FRAME_HEADER_LEN;
    if len > max_frame || len > u32::MAX as usize {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    out[4..6].copy_from_slice(&t.to_le_bytes());
    Ok(out)
}

fn decode_payload(t: u16, p: &[u8]) -> Result<Message, FrameError> {
    fn de<T: serde::de::DeserializeOwned>(t: u16, p: &[u8]) -> Result<T, FrameError> {
        serde_json::from_slice(p).map_err(|source| FrameError::BadPayload { ty: t, source })
    }
    Ok(match t {
        ty::LOOKUP => Message::Lookup(de::<m::Lookup>(t, p)?),
        ty::FETCH => Message::Fetch(de::<m::Fetch>(t, p)?),
        ty::SAVE => Message::Save(de::<m::Save>(t, p)?),
        ty::RELEASE => Message::Release(de::<m::Release>(t, p)?),
        ty::REOPEN => Message::Reopen(de::<m::Reopen>(t, p)?),
        ty::STATS => Message::Stats(de::<m::Stats>(t, p)?),
        ty::LOOKUP_REPLY => Message::LookupReply(de::<m::LookupReply>(t, p)?),
        ty::FETCH_BUFFER => Message::FetchBuffer(de::<m::FetchBuffer>(t, p)?),
        ty::LAYERS_READY => Message::LayersReady(de::<m::LayersReady>(t, p)?),
        ty::FETCH_DONE => Message::FetchDone(de::<m::FetchDone>(t, p)?),
        ty::FETCH_FAILED => Message::FetchFailed(de::<m::FetchFailed>(t, p)?),
        ty::SAVE_REPLY => Message::SaveReply(de::<m::SaveReply>(t, p)?),
        ty::RELEASED => Message::Released(de::<m::Released>(t, p)?),
        ty::STATS_REPLY => Message::StatsReply(de::<m::StatsReply>(t, p)?),
        ty::ERROR => Message::Error(de::<m::Error>(t, p)?),
        other => return Err(FrameError::UnknownType(other)),
    })
}

/// Turns a byte stream plus received fds into messages. See the module docs for the call order.
///
/// Fds are claimed in arrival order by the frames that need them: a sender passes a frame's fds
/// in the same `sendmsg` as the frame's first byte, so they are always here when the frame is.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    fds: VecDeque<OwnedFd>,
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            fds: VecDeque::new(),
            max_frame,
        }
    }

    /// Feeds received bytes.
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Feeds received fds.
    pub fn handle_fds(&mut self, fds: impl IntoIterator<Item = OwnedFd>) -> Result<(), FrameError> {
        self.fds.extend(fds);
        if self.fds.len() > MAX_PENDING_FDS {
            self.fds.clear();
            return Err(FrameError::TooManyFds);
        }
        Ok(())
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Takes the next complete message and its fds, `None` if more bytes are needed.
    /// After an error the stream is out of sync: drop the connection.
    pub fn poll_message(&mut self) -> Result<Option<(Message, Vec<OwnedFd>)>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        let t = u16::from_le_bytes([avail[4], avail[5]]);
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        if avail.len() < FRAME_HEADER_LEN + len {
            self.buf.reserve(FRAME_HEADER_LEN + len - avail.len());
            return Ok(None);
        }
        let msg = decode_payload(t, &avail[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len])?;
        self.start += FRAME_HEADER_LEN + len;
        if self.start > (1 << 20) && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let n = msg.fd_count();
        if self.fds.len() < n {
            return Err(FrameError::MissingFd(t));
        }
        let fds = self.fds.drain(..n).collect();
        Ok(Some((msg, fds)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;
    use crate::{DType, ErrorCode, TargetLayout, TokenOrder};

    fn fetch(n: u32) -> Message {
        Message::Fetch(Fetch {
            req: 7,
            model: "m".into(),
            token_ids: (0..n).collect(),
            layout: TargetLayout::host(DType::BF16, TokenOrder::Hnd),
        })
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let msgs = vec![
            fetch(100_000),
            Message::LayersReady(LayersReady {
                fetch_id: 3,
                start: 0,
                end: 2,
            }),
            Message::Error(Error {
                req: None,
                code: ErrorCode::Malformed,
                message: "x".into(),
            }),
        ];
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(encode_message(m, DEFAULT_MAX_FRAME).unwrap());
        }
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        // Odd-sized pieces so frames straddle every boundary.
        for piece in bytes.chunks(7919) {
            d.handle_bytes(piece);
            while let Some((m, fds)) = d.poll_message().unwrap() {
                assert!(fds.is_empty());
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn huge_length_is_refused_before_buffering() {
        let mut d = FrameDecoder::new(1024);
        let mut hdr = (u32::MAX).to_le_bytes().to_vec();
        hdr.extend(0x0001u16.to_le_bytes());
        d.handle_bytes(&hdr);
        assert!(matches!(
            d.poll_message(),
            Err(FrameError::TooLarge { len, max: 1024 }) if len == u32::MAX as usize
        ));
        assert!(matches!(
            encode_message(&fetch(1000), 100),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn malformed_frames_are_typed_errors() {
        let mut d = FrameDecoder::new(1024);
        d.handle_bytes(&[2, 0, 0, 0, 0x34, 0x12, b'{', b'}']);
        assert!(matches!(
            d.poll_message(),
            Err(FrameError::UnknownType(0x1234))
        ));
        let mut d = FrameDecoder::new(1024);
        d.handle_bytes(&[3, 0, 0, 0, 1, 0, b'[', b'1', b']']);
        assert!(matches!(
            d.poll_message(),
            Err(FrameError::BadPayload { ty: 1, .. })
        ));
    }

    #[test]
    fn fds_are_claimed_by_the_frames_that_need_them() {
        let save = Message::Save(Save {
            req: 1,
            model: "m".into(),
            token_ids: vec![1, 2],
            layout: TargetLayout::host(DType::F16, TokenOrder::Nhd),
            shape: crate::KvShape {
                num_layers: 1,
                tokens: 2,
                kv_heads: 1,
                head_dim: 2,
            },
            gpu: None,
            replace: false,
        });
        let bytes = encode_message(&save, DEFAULT_MAX_FRAME).unwrap();
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        d.handle_bytes(&bytes);
        assert!(matches!(
            d.poll_message(),
            Err(FrameError::MissingFd(0x0003))
        ));

        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let f = std::fs::File::open("/dev/null").unwrap();
        d.handle_fds([OwnedFd::from(f)]).unwrap();
        d.handle_bytes(&bytes);
        let (m, fds) = d.poll_message().unwrap().unwrap();
        assert_eq!(m, save);
        assert_eq!(fds.len(), 1);

        let many =
            (0..=MAX_PENDING_FDS).map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        assert!(matches!(d.handle_fds(many), Err(FrameError::TooManyFds)));
    }

    #[test]
    fn handshake() {
        let h = encode_hello(PROTOCOL_VERSION);
        assert_eq!(
            parse_hello(&h).unwrap(),
            (PROTOCOL_VERSION, HELLO_FLAG_CORRUPT)
        );
        let old = encode_hello_with_flags(PROTOCOL_VERSION, 0);
        assert_eq!(parse_hello(&old).unwrap(), (PROTOCOL_VERSION, 0));
        let r = encode_hello_reply(1, HELLO_VERSION_UNSUPPORTED);
        assert_eq!(parse_hello(&r).unwrap(), (1, HELLO_VERSION_UNSUPPORTED));
        assert!(matches!(
            parse_hello(b"HTTP/1.1"),
            Err(FrameError::BadMagic)
        ));
    }
}
