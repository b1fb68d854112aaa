//! Clients that die: mid-fetch, with stray fds, or after releasing. The daemon cancels their
//! work, closes every fd it held for them, and keeps serving. One test in its own binary so the
//! process's fd count is not disturbed by other tests.

mod server_support;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;

use kvfetcher_client::Client;
use kvfetcher_protocol::transport::BlockingConn;
use kvfetcher_protocol::{
    encode_hello, encode_message, DType, ErrorCode, Fetch, FrameDecoder, Lookup, Message,
    TargetLayout, TokenOrder, DEFAULT_MAX_FRAME, HELLO_LEN, MAX_PENDING_FDS,
};
use nix::sys::socket::{ControlMessage, MsgFlags};
use server_support::*;

#[test]
fn dying_clients_leak_nothing_and_the_daemon_keeps_serving() {
    let kv = load_kv(64);
    let mut b = MemBackend::new(Some(kv.clone()));
    b.gate_from = 2;
    let srv = TestServer::start(b);
    let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    // Warm up the runtime's and the allocator's fds (epoll, eventfds) before counting. The
    // warm-up client stays connected: both ends of its socket are in `base`, so no count below
    // depends on when the server notices a closed connection.
    let warm = Client::connect(&srv.path).unwrap();
    warm.stats().unwrap();
    let base = open_fds();

    // 1. A client dies (no Release, the socket just closes) while its fetch waits between
    //    layers 1 and 2.
    {
        let mut c = BlockingConn::client_handshake(
            UnixStream::connect(&srv.path).unwrap(),
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        c.send(
            &Message::Fetch(Fetch {
                req: 1,
                model: MODEL.into(),
                token_ids: kv.token_ids.clone(),
                layout,
            }),
            &[],
        )
        .unwrap();
        loop {
            match c.recv().unwrap() {
                (Message::FetchBuffer(_), fds) => assert_eq!(fds.len(), 1),
                (Message::LayersReady(r), _) if r.end == 2 => break,
                (Message::LayersReady(_), _) => {}
                (other, _) => panic!("{other:?}"),
            }
        }
        assert!(!srv.backend.fetch_dropped.load(Ordering::SeqCst));
    }
    assert!(
        eventually(|| srv.backend.fetch_dropped.load(Ordering::SeqCst)),
        "the dead client's fetch was not cancelled"
    );

    // 2. A client attaches an fd to every byte of a frame that needs none: the daemon refuses
    //    the pile of unclaimed fds, says why, and closes them all.
    {
        let mut s = UnixStream::connect(&srv.path).unwrap();
        s.write_all(&encode_hello(1)).unwrap();
        let mut r = [0u8; HELLO_LEN];
        s.read_exact(&mut r).unwrap();
        let frame = encode_message(
            &Message::Lookup(Lookup {
                req: 1,
                model: "some-model".into(),
                token_ids: vec![1, 2, 3],
            }),
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        assert!(frame.len() > MAX_PENDING_FDS + 1);
        let null = std::fs::File::open("/dev/null").unwrap();
        for byte in &frame {
            let sent = nix::sys::socket::sendmsg::<()>(
                s.as_raw_fd(),
                &[std::io::IoSlice::new(std::slice::from_ref(byte))],
                &[ControlMessage::ScmRights(&[null.as_raw_fd()])],
                MsgFlags::MSG_NOSIGNAL,
                None,
            );
            if sent.is_err() {
                break;
            }
        }
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut buf = [0u8; 4096];
        let msg = loop {
            if let Some((m, _)) = d.poll_message().unwrap() {
                break m;
            }
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed without an error message");
            d.handle_bytes(&buf[..n]);
        };
        match msg {
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::Malformed);
                assert!(e.message.contains("fds"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }

    // 3. A client releases properly, then leaves.
    {
        let c = Client::connect(&srv.path).unwrap();
        srv.backend.gate.add_permits(64);
        let f = c.fetch(MODEL, &kv.token_ids, &layout).unwrap();
        f.wait_done().unwrap();
        f.release().unwrap();
    }

    let c = Client::connect(&srv.path).unwrap();
    assert!(
        eventually(|| c.stats().unwrap().clients == 2 && open_fds() == base + 2),
        "fds: {} now, {} before (+2 for both ends of this client's socket)",
        open_fds(),
        base
    );
    let s = c.stats().unwrap();
    assert_eq!(s.fetches_active, 0);
    assert_eq!(s.fetches_total, 2);
    drop(warm);
}
