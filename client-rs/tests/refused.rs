//! A daemon that refuses a client sends `Error{req: null, code: busy}` and closes, possibly
//! before the client's first request: the client's write then fails (`EPIPE`), and the client
//! must report the daemon's reason, not the socket error (which the C client turned into
//! `KVF_ERR_IO`).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use kvfetcher_client::protocol::{
    encode_hello_reply, encode_message, Error, ErrorCode, Message, DEFAULT_MAX_FRAME, HELLO_LEN,
    HELLO_OK, PROTOCOL_VERSION,
};
use kvfetcher_client::{AsyncClient, Client, ClientError};

const REASON: &str = "too many clients (limit 1)";

/// A fake daemon that accepts one connection, answers its hello, refuses it as busy and closes
/// it at once; `connect` runs while it serves, and `call` after the socket is closed.
fn refused_by_a_fast_closer<C, T>(
    connect: impl FnOnce(PathBuf) -> C,
    call: impl FnOnce(C) -> T,
) -> T {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvf.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let daemon = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; HELLO_LEN];
        s.read_exact(&mut hello).unwrap();
        s.write_all(&encode_hello_reply(PROTOCOL_VERSION, HELLO_OK))
            .unwrap();
        let busy = Message::Error(Error {
            req: None,
            code: ErrorCode::Busy,
            message: REASON.into(),
        });
        s.write_all(&encode_message(&busy, DEFAULT_MAX_FRAME).unwrap())
            .unwrap();
        // Dropped: closed before the client sends anything more.
    });
    let client = connect(path);
    daemon.join().unwrap();
    call(client)
}

fn assert_busy<T: std::fmt::Debug>(r: Result<T, ClientError>) {
    match r {
        Err(ClientError::Daemon { code, message }) => {
            assert_eq!(code, ErrorCode::Busy);
            assert_eq!(message, REASON);
        }
        other => panic!("expected the daemon's busy refusal, got {other:?}"),
    }
}

#[test]
fn the_blocking_client_reports_busy_when_its_first_write_fails() {
    let r = refused_by_a_fast_closer(
        |p| Client::connect(p).unwrap(),
        |c| c.lookup("m", &[1, 2, 3]),
    );
    assert_busy(r);
}

#[test]
fn the_async_client_reports_busy_when_its_first_write_fails() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = refused_by_a_fast_closer(
        |p| rt.block_on(AsyncClient::connect(p)).unwrap(),
        |c| rt.block_on(c.stats()),
    );
    assert_busy(r);
}
