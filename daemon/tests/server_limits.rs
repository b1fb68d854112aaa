//! The local server under abuse: clients that never read their replies, pile up requests,
//! never finish their handshake, sit idle, or open too many connections. Each is cut off or
//! refused (with a reason the client can read, where it still reads), counted in the metrics,
//! and the daemon keeps serving others.

mod server_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use kvfetcher::gpu::{GpuDevices, GpuOptions};
use kvfetcher::server::ServeOptions;
use kvfetcher::Metrics;
use kvfetcher_client::Client;
use kvfetcher_protocol::{
    encode_hello, encode_message, ErrorCode, FrameDecoder, Lookup, Message, Stats,
    DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use server_support::*;

/// A server with `opts` whose metrics the test reads.
fn start(backend: MemBackend, opts: ServeOptions) -> (TestServer, Arc<Metrics>) {
    let metrics = Metrics::new();
    let gpus = Arc::new(GpuDevices::new(GpuOptions::default(), metrics.clone()));
    (TestServer::start_gpus(backend, opts, gpus), metrics)
}

fn raw(srv: &TestServer) -> UnixStream {
    let s = raw_conn(srv, Duration::from_secs(20));
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Connects and completes the handshake.
fn hello(srv: &TestServer) -> UnixStream {
    handshake(raw(srv))
}

/// Reads messages until the daemon closes the connection; returns them all.
fn read_to_close(s: &mut UnixStream) -> Vec<Message> {
    let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some((m, _)) = d.poll_message().unwrap() {
            got.push(m);
        }
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => d.handle_bytes(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the daemon did not close the connection: {e}"),
        }
    }
}

fn still_serving(srv: &TestServer) {
    let c = Client::connect(&srv.path).unwrap();
    assert_eq!(
        c.lookup("nope", &[1]).unwrap_err().daemon_code(),
        Some(ErrorCode::NotFound)
    );
}

#[test]
fn a_client_that_never_reads_is_cut_off_with_its_queue_bounded() {
    let opts = ServeOptions {
        max_queued_replies: 16,
        ..ServeOptions::default()
    };
    let (srv, m) = start(MemBackend::new(None), opts);
    let mut s = hello(&srv);
    // Stats requests, 256 per write, never reading an answer. The daemon answers each at once;
    // once the socket buffer and the 16-message queue are full it must hang up.
    let frame = encode_message(&Message::Stats(Stats { req: 1 }), DEFAULT_MAX_FRAME).unwrap();
    let batch = frame.repeat(256);
    let mut sent = 0usize;
    let cut = loop {
        if sent >= 1_000_000 {
            break false;
        }
        if s.write_all(&batch).is_err() {
            break true;
        }
        sent += 256;
    };
    assert!(cut, "{sent} requests sent without reading, still connected");
    assert!(
        eventually(|| m.local_refusals.queue_full.get() == 1),
        "not counted"
    );
    // Everything queued for the dead client is dropped.
    assert!(eventually(|| m.local_queued_replies.get() == 0));
    assert_eq!(m.local_refusals.too_many_requests.get(), 0);
    still_serving(&srv);
}

#[test]
fn a_client_reading_its_replies_is_never_cut_off() {
    let opts = ServeOptions {
        max_queued_replies: 4,
        ..ServeOptions::default()
    };
    let (srv, m) = start(MemBackend::new(None), opts);
    let c = Client::connect(&srv.path).unwrap();
    for _ in 0..2000 {
        c.stats().unwrap();
    }
    assert_eq!(m.local_refusals.queue_full.get(), 0);
}

#[test]
fn too_many_requests_in_progress_cut_the_client_off_with_a_reason() {
    let mut b = MemBackend::new(None);
    b.hold_lookups = true;
    let opts = ServeOptions {
        max_pending_requests: 4,
        ..ServeOptions::default()
    };
    let (srv, m) = start(b, opts);
    let mut s = hello(&srv);
    for req in 0..5 {
        let l = Message::Lookup(Lookup {
            req,
            model: "m".into(),
            token_ids: vec![1, 2, 3],
        });
        s.write_all(&encode_message(&l, DEFAULT_MAX_FRAME).unwrap())
            .unwrap();
    }
    let got = read_to_close(&mut s);
    match got.as_slice() {
        [Message::Error(e)] => {
            assert_eq!((e.req, e.code), (None, ErrorCode::Busy));
            assert!(e.message.contains("too many requests"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(eventually(|| m.local_refusals.too_many_requests.get() == 1));
    srv.backend.lookup_gate.add_permits(1000);
    still_serving(&srv);
}

#[test]
fn silent_connections_neither_fill_the_client_table_nor_keep_clients_out() {
    let opts = ServeOptions {
        max_clients: 2,
        max_handshakes: 4,
        // Far longer than the test: only eviction can let the real client in.
        handshake_timeout: Duration::from_secs(600),
        ..ServeOptions::default()
    };
    let (srv, m) = start(MemBackend::new(None), opts);
    let mut silent: Vec<UnixStream> = (0..10).map(|_| raw(&srv)).collect();
    still_serving(&srv);
    let c = Client::connect(&srv.path).unwrap();
    assert!(eventually(|| c.stats().unwrap().clients == 1));
    // Each silent connection beyond the fourth, and the first client, closed the oldest
    // pending handshake (6 + 1); the second client found a free place. The oldest silent one
    // was closed without a word.
    assert!(eventually(|| m.local_refusals.handshake_evicted.get() == 7));
    assert!(read_to_close(&mut silent[0]).is_empty());
    assert_eq!(m.local_refusals.max_clients.get(), 0);
}

#[test]
fn a_connection_that_never_says_hello_is_closed_after_the_handshake_timeout() {
    let opts = ServeOptions {
        handshake_timeout: Duration::from_millis(100),
        ..ServeOptions::default()
    };
    let (srv, m) = start(MemBackend::new(None), opts);
    let mut s = raw(&srv);
    // Half a hello, then nothing.
    s.write_all(&encode_hello(PROTOCOL_VERSION)[..4]).unwrap();
    assert!(read_to_close(&mut s).is_empty());
    assert_eq!(m.local_refusals.handshake_timeout.get(), 1);
    still_serving(&srv);
}

#[test]
fn clients_over_the_limit_get_busy_with_the_reason() {
    let opts = ServeOptions {
        max_clients: 1,
        ..ServeOptions::default()
    };
    let (srv, m) = start(MemBackend::new(None), opts);
    let first = Client::connect(&srv.path).unwrap();
    // The refused client's handshake succeeds; its first call reads the refusal.
    let second = Client::connect(&srv.path).unwrap();
    let e = second.lookup("nope", &[1]).unwrap_err();
    assert_eq!(e.daemon_code(), Some(ErrorCode::Busy), "{e}");
    assert!(e.to_string().contains("too many clients"), "{e}");
    assert_eq!(m.local_refusals.max_clients.get(), 1);
    drop(first);
    assert!(eventually(|| Client::connect(&srv.path)
        .and_then(|c| c.stats())
        .is_ok()));
}

#[test]
fn a_refused_client_can_still_send_its_first_request_after_reading_why() {
    let opts = ServeOptions {
        max_clients: 1,
        ..ServeOptions::default()
    };
    let (srv, _m) = start(MemBackend::new(None), opts);
    let _first = Client::connect(&srv.path).unwrap();
    let mut s = hello(&srv);
    // The refusal, then end of stream: the daemon has stopped sending ...
    match read_to_close(&mut s).as_slice() {
        [Message::Error(e)] => assert_eq!((e.req, e.code), (None, ErrorCode::Busy)),
        other => panic!("{other:?}"),
    }
    // ... but still takes what the client sends (a closed socket would refuse it: EPIPE), so
    // a client that writes before reading does not fail before it can read the refusal.
    let stats = encode_message(&Message::Stats(Stats { req: 1 }), DEFAULT_MAX_FRAME).unwrap();
    s.write_all(&stats).unwrap();
}

#[test]
fn one_uid_cannot_take_every_place() {
    let opts = ServeOptions {
        max_clients: 10,
        max_clients_per_uid: 2,
        ..ServeOptions::default()
    };
    let (srv, m) = start(MemBackend::new(None), opts);
    let a = Client::connect(&srv.path).unwrap();
    let _b = Client::connect(&srv.path).unwrap();
    let c = Client::connect(&srv.path).unwrap();
    let e = c.stats().unwrap_err();
    assert_eq!(e.daemon_code(), Some(ErrorCode::Busy), "{e}");
    let uid = nix::unistd::getuid().as_raw();
    assert!(e.to_string().contains(&format!("uid {uid}")), "{e}");
    assert_eq!(m.local_refusals.max_clients_per_uid.get(), 1);
    assert_eq!(a.stats().unwrap().clients, 2);
}

#[test]
fn an_idle_client_is_told_and_disconnected() {
    let opts = ServeOptions {
        idle_timeout: Some(Duration::from_millis(100)),
        ..ServeOptions::default()
    };
    let (srv, m) = start(MemBackend::new(None), opts);
    let mut s = hello(&srv);
    match read_to_close(&mut s).as_slice() {
        [Message::Error(e)] => {
            assert_eq!((e.req, e.code), (None, ErrorCode::Busy));
            assert!(e.message.contains("idle"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.local_refusals.idle.get(), 1);
}

#[test]
fn a_client_waiting_for_its_fetch_is_not_idle() {
    let kv = load_kv(16);
    let mut b = MemBackend::new(Some(kv.clone()));
    b.gate_from = 1;
    let opts = ServeOptions {
        idle_timeout: Some(Duration::from_millis(50)),
        ..ServeOptions::default()
    };
    let (srv, m) = start(b, opts);
    let c = Client::connect(&srv.path).unwrap();
    let layout = kvfetcher_protocol::TargetLayout::host(
        kvfetcher_protocol::DType::F16,
        kvfetcher_protocol::TokenOrder::Nhd,
    );
    let f = c.fetch(MODEL, &kv.token_ids, &layout).unwrap();
    // Many idle timeouts pass while the fetch waits between its layers (this can only make
    // the test pass wrongly on a slow machine, never fail wrongly).
    std::thread::sleep(Duration::from_millis(500));
    srv.backend.gate.add_permits(64);
    f.wait_done().unwrap();
    assert_eq!(m.local_refusals.idle.get(), 0);
}

#[test]
fn fetches_are_capped_in_total_across_clients() {
    let kv = load_kv(16);
    let ids = kv.token_ids.clone();
    let opts = ServeOptions {
        max_fetches: 3,
        max_fetches_per_client: 2,
        ..ServeOptions::default()
    };
    let (srv, m) = start(MemBackend::new(Some(kv)), opts);
    let layout = kvfetcher_protocol::TargetLayout::host(
        kvfetcher_protocol::DType::F16,
        kvfetcher_protocol::TokenOrder::Nhd,
    );
    let (a, b) = (
        Client::connect(&srv.path).unwrap(),
        Client::connect(&srv.path).unwrap(),
    );
    // A finished fetch keeps its handle (and buffer) until released.
    let a1 = a.fetch(MODEL, &ids, &layout).unwrap();
    let _a2 = a.fetch(MODEL, &ids, &layout).unwrap();
    let e = a.fetch(MODEL, &ids, &layout).unwrap_err();
    assert_eq!(e.daemon_code(), Some(ErrorCode::Busy), "{e}");
    assert!(e.to_string().contains("on this connection"), "{e}");
    let _b1 = b.fetch(MODEL, &ids, &layout).unwrap();
    // B holds one of its two, but the daemon holds three.
    let e = b.fetch(MODEL, &ids, &layout).unwrap_err();
    assert_eq!(e.daemon_code(), Some(ErrorCode::Busy), "{e}");
    assert!(e.to_string().contains("in the daemon (limit 3)"), "{e}");
    assert_eq!(m.local_refusals.max_fetches.get(), 1);
    // The connection stays; a released handle makes room.
    a1.release().unwrap();
    let b2 = b.fetch(MODEL, &ids, &layout).unwrap();
    b2.wait_done().unwrap();
    assert_eq!(b.stats().unwrap().fetches_active, 3);
}
