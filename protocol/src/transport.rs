//! Moving protocol frames and their fds over a Unix stream socket, blocking (std) or async
//! (tokio). Framing itself is the sans-IO [`crate::FrameDecoder`]; this module only
//! feeds it and writes encoded frames. The daemon's server uses the async half too.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;

use tokio::io::Interest;
use tokio::net::UnixStream as TokioUnixStream;

use crate::sys;
use crate::{
    encode_hello, encode_message, parse_hello, FrameDecoder, FrameError, Message, HELLO_LEN,
    HELLO_OK, PROTOCOL_VERSION,
};

/// Size of one socket read: large enough that a 100k-token request takes a few reads.
const READ_CHUNK: usize = 64 << 10;

/// Why a connection could not carry a message.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The peer sent bytes that are not the protocol (or we tried to send an oversized frame).
    #[error("protocol error: {0}")]
    Frame(#[from] FrameError),
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
}

/// Writes all of `bytes` with `fds` attached to the first byte (blocking socket).
fn write_all_blocking(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut off = 0;
    while off < bytes.len() {
        let attach = if off == 0 { fds } else { &[] };
        match sys::send_with_fds(sock, &bytes[off..], attach) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Decodes every whole message already waiting on `sock`, without waiting for more: reads until
/// the socket is empty, closed or failing. After a write failed because the daemon closed the
/// connection, this finds the reason it sent first (a `busy` refusal, say).
fn recv_ready(
    sock: BorrowedFd<'_>,
    decoder: &mut FrameDecoder,
    buf: &mut [u8],
) -> Vec<(Message, Vec<OwnedFd>)> {
    loop {
        let mut fds = Vec::new();
        match sys::recv_with_fds_nowait(sock, buf, &mut fds) {
            Ok(0) => break,
            Ok(n) => {
                if decoder.handle_fds(fds).is_err() {
                    break;
                }
                decoder.handle_bytes(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let mut got = Vec::new();
    while let Ok(Some(m)) = decoder.poll_message() {
        got.push(m);
    }
    got
}

/// A blocking connection: a std Unix stream plus its frame decoder.
#[derive(Debug)]
pub struct BlockingConn {
    stream: StdUnixStream,
    decoder: FrameDecoder,
    max_frame: usize,
    buf: Vec<u8>,
}

impl BlockingConn {
    /// Performs the client side of the handshake on `stream`.
    pub fn client_handshake(
        stream: StdUnixStream,
        max_frame: usize,
    ) -> Result<Self, TransportError> {
        write_all_blocking(stream.as_fd(), &encode_hello(PROTOCOL_VERSION), &[])?;
        let conn = BlockingConn {
            stream,
            decoder: FrameDecoder::new(max_frame),
            max_frame,
            buf: vec![0; READ_CHUNK],
        };
        let mut hello = [0u8; HELLO_LEN];
        let mut got = 0;
        while got < HELLO_LEN {
            let mut fds = Vec::new();
            let n = sys::recv_with_fds(conn.stream.as_fd(), &mut hello[got..], &mut fds)?;
            if n == 0 {
                return Err(TransportError::Closed);
            }
            got += n;
        }
        let (theirs, status) = parse_hello(&hello)?;
        if status != HELLO_OK || theirs != PROTOCOL_VERSION {
            return Err(FrameError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs,
            }
            .into());
        }
        Ok(conn)
    }

    /// Sends one message with its fds.
    pub fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), TransportError> {
        let bytes = encode_message(msg, self.max_frame)?;
        write_all_blocking(self.stream.as_fd(), &bytes, fds)?;
        Ok(())
    }

    /// The whole messages already received, without blocking (see [`recv_ready`]).
    pub fn recv_ready(&mut self) -> Vec<(Message, Vec<OwnedFd>)> {
        recv_ready(self.stream.as_fd(), &mut self.decoder, &mut self.buf)
    }

    /// Blocks until one whole message arrives.
    pub fn recv(&mut self) -> Result<(Message, Vec<OwnedFd>), TransportError> {
        loop {
            if let Some(m) = self.decoder.poll_message()? {
                return Ok(m);
            }
            let mut fds = Vec::new();
            let n = match sys::recv_with_fds(self.stream.as_fd(), &mut self.buf, &mut fds) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.decoder.handle_fds(fds)?;
            if n == 0 {
                return Err(TransportError::Closed);
            }
            self.decoder.handle_bytes(&self.buf[..n]);
        }
    }
}

/// Sends one message with its fds on a tokio Unix stream (usable from several tasks, one at a
/// time per stream: concurrent senders would interleave frames).
pub async fn send_async(
    stream: &TokioUnixStream,
    msg: &Message,
    fds: &[BorrowedFd<'_>],
    max_frame: usize,
) -> Result<(), TransportError> {
    let bytes = encode_message(msg, max_frame)?;
    send_bytes_async(stream, &bytes, fds).await?;
    Ok(())
}

/// Writes raw bytes (a handshake, an encoded frame) with `fds` on the first byte.
pub async fn send_bytes_async(
    stream: &TokioUnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut off = 0;
    while off < bytes.len() {
        let attach = if off == 0 { fds } else { &[] };
        let n = stream
            .async_io(Interest::WRITABLE, || {
                sys::send_with_fds(stream.as_fd(), &bytes[off..], attach)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        off += n;
    }
    Ok(())
}

/// The receiving half of an async connection: decodes frames from a tokio Unix stream.
#[derive(Debug)]
pub struct AsyncReceiver {
    decoder: FrameDecoder,
    buf: Vec<u8>,
}

impl AsyncReceiver {
    /// A receiver refusing frames over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        AsyncReceiver {
            decoder: FrameDecoder::new(max_frame),
            buf: vec![0; READ_CHUNK],
        }
    }

    /// Reads exactly one handshake (8 bytes) from `stream` and parses it into (version, word).
    /// Fds sent during the handshake are a protocol violation and are closed.
    pub async fn recv_hello(
        &mut self,
        stream: &TokioUnixStream,
    ) -> Result<(u16, u16), TransportError> {
        let mut hello = [0u8; HELLO_LEN];
        let mut got = 0;
        while got < HELLO_LEN {
            let mut fds = Vec::new();
            let n = stream
                .async_io(Interest::READABLE, || {
                    sys::recv_with_fds(stream.as_fd(), &mut hello[got..], &mut fds)
                })
                .await?;
            if n == 0 {
                return Err(TransportError::Closed);
            }
            got += n;
        }
        Ok(parse_hello(&hello)?)
    }

    /// The whole messages already received on `stream`, without waiting (see [`recv_ready`]).
    pub fn recv_ready(&mut self, stream: &TokioUnixStream) -> Vec<(Message, Vec<OwnedFd>)> {
        recv_ready(stream.as_fd(), &mut self.decoder, &mut self.buf)
    }

    /// Waits for one whole message from `stream`.
    pub async fn recv(
        &mut self,
        stream: &TokioUnixStream,
    ) -> Result<(Message, Vec<OwnedFd>), TransportError> {
        loop {
            if let Some(m) = self.decoder.poll_message()? {
                return Ok(m);
            }
            let mut fds = Vec::new();
            let buf = &mut self.buf;
            let n = stream
                .async_io(Interest::READABLE, || {
                    sys::recv_with_fds(stream.as_fd(), buf, &mut fds)
                })
                .await?;
            self.decoder.handle_fds(fds)?;
            if n == 0 {
                return Err(TransportError::Closed);
            }
            self.decoder.handle_bytes(&self.buf[..n]);
        }
    }
}
