//! A connection's first moments: the handshake, bounded in time and giving way to newer
//! connections at the handshake cap, and the refusal of a client that gets no place.
//!
//! A refused client must be able to read why. Closing right after the `busy` error made the
//! client's next write fail (`EPIPE`) before it read the error, so the C client reported a
//! socket error. A refusal therefore sends the error, shuts down the sending side (the client
//! reads the error, then end of stream), and keeps reading and discarding what the client
//! sends for a moment, so that its first request is accepted by the socket rather than refused.

use std::os::fd::AsRawFd;
use std::time::Duration;

use kvfetcher_protocol::transport::{send_async, send_bytes_async, AsyncReceiver};
use kvfetcher_protocol::{
    encode_hello_reply, ErrorCode, Message, HELLO_OK, HELLO_VERSION_UNSUPPORTED, PROTOCOL_VERSION,
};
use nix::sys::socket::{shutdown, Shutdown};
use tokio::net::UnixStream;

use super::admission::HandshakeSlot;
use crate::metrics::Metrics;

/// How long a refused connection is kept open for the client to send its first request and
/// read the refusal: a client sends right after its handshake.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Bytes of a refused client's requests read and discarded at most (a 100k-token lookup is
/// about 1.2 MiB; a longer request finds the connection closed, and the client reads the
/// refusal already queued for it).
const REFUSAL_DRAIN_BYTES: usize = 2 << 20;

/// Reads the client's hello; its flags (which error codes it parses: `HELLO_FLAG_*`) if the
/// client speaks our version, and the caller then answers with [`accept`]. `None` if the
/// connection must close (bad hello, other version: answered here, timeout, or a newer
/// connection took this one's place).
pub(crate) async fn handshake(
    stream: &UnixStream,
    rx: &mut AsyncReceiver,
    slot: &mut HandshakeSlot,
    timeout: Duration,
    metrics: &Metrics,
) -> Option<u16> {
    let hello = tokio::select! {
        r = tokio::time::timeout(timeout, rx.recv_hello(stream)) => r,
        () = slot.evicted() => {
            tracing::debug!("pending handshake closed to make room for a newer connection");
            return None;
        }
    };
    let hello = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::warn!("bad handshake: {e}");
            return None;
        }
        Err(_) => {
            metrics.local_refusals.handshake_timeout.add(1);
            tracing::warn!("handshake timed out");
            return None;
        }
    };
    if hello.0 != PROTOCOL_VERSION {
        let reply = encode_hello_reply(PROTOCOL_VERSION, HELLO_VERSION_UNSUPPORTED);
        let _ = send_bytes_async(stream, &reply, &[]).await;
        tracing::warn!(theirs = hello.0, "client protocol version unsupported");
        return None;
    }
    Some(hello.1)
}

/// Answers a good hello; false if the client is gone. The caller decides on the client's
/// place first, so that a client whose handshake completed is counted (or refused).
pub(crate) async fn accept(stream: &UnixStream) -> bool {
    let reply = encode_hello_reply(PROTOCOL_VERSION, HELLO_OK);
    send_bytes_async(stream, &reply, &[]).await.is_ok()
}

/// Tells a client that completed its handshake that it gets no place (`busy`, `message`), so
/// that it can read the refusal; returns when the connection may be closed.
pub(crate) async fn refuse(stream: &UnixStream, slot: &mut HandshakeSlot, message: String) {
    let msg = Message::Error(kvfetcher_protocol::Error {
        req: None,
        code: ErrorCode::Busy,
        message,
    });
    let linger = async {
        if send_async(stream, &msg, &[], usize::MAX).await.is_err() {
            return;
        }
        // The client reads the error, then end of stream.
        if shutdown(stream.as_raw_fd(), Shutdown::Write).is_err() {
            return;
        }
        drain(stream).await;
    };
    tokio::select! {
        _ = tokio::time::timeout(REFUSAL_LINGER, linger) => {}
        () = slot.evicted() => {}
    }
}

/// Reads and discards what the client sends (fds passed with it are closed by the kernel,
/// which delivers none to a plain read) until it closes, fails, or sent too much.
async fn drain(stream: &UnixStream) {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    while total < REFUSAL_DRAIN_BYTES {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}
