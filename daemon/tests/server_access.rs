//! Access control: the daemon records each client's SO_PEERCRED, and a client can neither
//! release nor reopen (read) another client's fetch.

mod server_support;

use std::fs::File;
use std::os::unix::net::UnixStream;

use kvfetcher_client::Client;
use kvfetcher_protocol::transport::BlockingConn;
use kvfetcher_protocol::{
    DType, ErrorCode, Message, Release, Reopen, TargetLayout, TokenOrder, DEFAULT_MAX_FRAME,
};
use server_support::*;

fn conn(srv: &TestServer) -> BlockingConn {
    BlockingConn::client_handshake(UnixStream::connect(&srv.path).unwrap(), DEFAULT_MAX_FRAME)
        .unwrap()
}

fn error_code(m: Message) -> ErrorCode {
    match m {
        Message::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn peer_credentials_are_recorded() {
    let srv = TestServer::start(MemBackend::new(None));
    let c = Client::connect(&srv.path).unwrap();
    let s = c.stats().unwrap();
    assert_eq!(s.peer.pid, Some(std::process::id() as i32));
    assert_eq!(s.peer.uid, nix::unistd::getuid().as_raw());
    assert_eq!(s.peer.gid, nix::unistd::getgid().as_raw());
}

#[test]
fn a_client_cannot_touch_another_clients_fetch() {
    let kv = load_kv(32);
    let srv = TestServer::start(MemBackend::new(Some(kv.clone())));
    let owner = Client::connect(&srv.path).unwrap();
    let layout = TargetLayout::host(DType::F32, TokenOrder::Hnd);
    let f = owner.fetch(MODEL, &kv.token_ids, &layout).unwrap();
    f.wait_done().unwrap();
    let id = f.id();

    let mut thief = conn(&srv);
    thief
        .send(
            &Message::Reopen(Reopen {
                req: 1,
                fetch_id: id,
            }),
            &[],
        )
        .unwrap();
    let (m, fds) = thief.recv().unwrap();
    assert!(fds.is_empty(), "no fd may reach another client");
    assert_eq!(error_code(m), ErrorCode::PermissionDenied);
    thief
        .send(
            &Message::Release(Release {
                req: 2,
                fetch_id: id,
            }),
            &[],
        )
        .unwrap();
    assert_eq!(
        error_code(thief.recv().unwrap().0),
        ErrorCode::PermissionDenied
    );

    // The owner's fetch is untouched, and the owner may reopen it.
    assert_eq!(owner.stats().unwrap().fetches_active, 1);
    let mut own = conn(&srv);
    own.send(
        &Message::Reopen(Reopen {
            req: 3,
            fetch_id: id,
        }),
        &[],
    )
    .unwrap();
    // `own` is a different connection of the same process: still refused, handles belong to
    // connections, not to users.
    assert_eq!(
        error_code(own.recv().unwrap().0),
        ErrorCode::PermissionDenied
    );
    let writes = srv.backend.writes.lock().unwrap().clone();
    let expect = expected_buffer(layout.buffer_len(f.shape()), &writes);
    assert!(f.bytes().unwrap() == &expect[..]);
    f.release().unwrap();
    assert_eq!(owner.stats().unwrap().fetches_active, 0);
    // Released means gone, for everyone.
    thief
        .send(
            &Message::Release(Release {
                req: 4,
                fetch_id: id,
            }),
            &[],
        )
        .unwrap();
    assert_eq!(
        error_code(thief.recv().unwrap().0),
        ErrorCode::UnknownHandle
    );
}

#[test]
fn the_owner_can_reopen_its_buffer() {
    let kv = load_kv(16);
    let srv = TestServer::start(MemBackend::new(Some(kv.clone())));
    let mut c = conn(&srv);
    let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    c.send(
        &Message::Fetch(kvfetcher_protocol::Fetch {
            req: 1,
            model: MODEL.into(),
            token_ids: kv.token_ids.clone(),
            layout,
        }),
        &[],
    )
    .unwrap();
    let (id, len) = match c.recv().unwrap() {
        (Message::FetchBuffer(b), fds) => {
            assert_eq!(fds.len(), 1);
            (b.fetch_id, b.len)
        }
        (other, _) => panic!("{other:?}"),
    };
    loop {
        if let (Message::FetchDone(_), _) = c.recv().unwrap() {
            break;
        }
    }
    c.send(
        &Message::Reopen(Reopen {
            req: 2,
            fetch_id: id,
        }),
        &[],
    )
    .unwrap();
    let (m, mut fds) = c.recv().unwrap();
    assert!(matches!(m, Message::FetchBuffer(b) if b.req == 2 && b.len == len));
    let f = File::from(fds.pop().unwrap());
    let bytes = std::fs::read(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&f)
    ))
    .unwrap();
    let writes = srv.backend.writes.lock().unwrap().clone();
    assert!(bytes == expected_buffer(len as usize, &writes));
}
