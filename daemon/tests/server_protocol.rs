//! Bad input on a raw socket: wrong magic or version, huge lengths, malformed and out-of-order
//! messages, stray fds. Each gets a clear error, and the daemon keeps serving other clients.

mod server_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use kvfetcher_client::Client;
use kvfetcher_protocol::{
    encode_hello, encode_hello_with_flags, encode_message, parse_hello, DType, ErrorCode, Fetch,
    FrameDecoder, GpuSource, KvShape, LookupReply, MemoryKind, Message, Release, Save, Stats,
    TargetLayout, TokenOrder, DEFAULT_MAX_FRAME, HELLO_LEN, HELLO_OK, HELLO_VERSION_UNSUPPORTED,
    PROTOCOL_VERSION,
};
use server_support::*;

fn raw(srv: &TestServer) -> UnixStream {
    raw_conn(srv, Duration::from_secs(5))
}

/// Connects and completes the handshake.
fn hello(srv: &TestServer) -> UnixStream {
    handshake(raw(srv))
}

/// Reads the next message (blocking), or `None` once the daemon closed the connection.
fn next(s: &mut UnixStream, d: &mut FrameDecoder) -> Option<Message> {
    loop {
        if let Some((m, _)) = d.poll_message().unwrap() {
            return Some(m);
        }
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            return None;
        }
        d.handle_bytes(&buf[..n]);
    }
}

fn error_of(m: Option<Message>) -> (Option<u64>, ErrorCode) {
    match m {
        Some(Message::Error(e)) => (e.req, e.code),
        other => panic!("expected an error, got {other:?}"),
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
fn wrong_magic_is_dropped_without_answer() {
    let srv = TestServer::start(MemBackend::new(None));
    let mut s = raw(&srv);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = [0u8; 16];
    // Closed without a word: end of stream, or a reset since our extra bytes were never read.
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection closed, got {other:?}"),
    }
    still_serving(&srv);
}

#[test]
fn wrong_version_is_told_ours_then_closed() {
    let srv = TestServer::start(MemBackend::new(None));
    let mut s = raw(&srv);
    s.write_all(&encode_hello(PROTOCOL_VERSION + 41)).unwrap();
    let mut r = [0u8; HELLO_LEN];
    s.read_exact(&mut r).unwrap();
    assert_eq!(
        parse_hello(&r).unwrap(),
        (PROTOCOL_VERSION, HELLO_VERSION_UNSUPPORTED)
    );
    assert_eq!(s.read(&mut r).unwrap(), 0);
    still_serving(&srv);
}

#[test]
fn huge_length_is_refused_and_the_connection_closed() {
    let srv = TestServer::start(MemBackend::new(None));
    let mut s = hello(&srv);
    let mut hdr = u32::MAX.to_le_bytes().to_vec();
    hdr.extend(1u16.to_le_bytes());
    s.write_all(&hdr).unwrap();
    let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
    assert_eq!(
        error_of(next(&mut s, &mut d)),
        (None, ErrorCode::FrameTooLarge)
    );
    assert!(next(&mut s, &mut d).is_none());
    still_serving(&srv);
}

#[test]
fn malformed_payloads_and_unknown_types_close_the_connection() {
    let srv = TestServer::start(MemBackend::new(None));
    for frame in [
        // A Lookup whose payload is not JSON.
        [&5u32.to_le_bytes()[..], &1u16.to_le_bytes(), b"{{{{{"].concat(),
        // A Lookup missing fields.
        [&2u32.to_le_bytes()[..], &1u16.to_le_bytes(), b"{}"].concat(),
        // An unknown type.
        [&2u32.to_le_bytes()[..], &0x7777u16.to_le_bytes(), b"{}"].concat(),
    ] {
        let mut s = hello(&srv);
        s.write_all(&frame).unwrap();
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        assert_eq!(error_of(next(&mut s, &mut d)), (None, ErrorCode::Malformed));
        assert!(next(&mut s, &mut d).is_none());
    }
    // A frame cut short by the client dying: nothing to answer, the daemon carries on.
    let mut s = hello(&srv);
    s.write_all(&[100, 0, 0, 0, 1, 0, b'{']).unwrap();
    drop(s);
    still_serving(&srv);
}

#[test]
fn out_of_order_messages_are_refused_but_the_connection_lives() {
    let srv = TestServer::start(MemBackend::new(None));
    let mut s = hello(&srv);
    let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
    // A daemon-to-client message sent by a client.
    let bogus = Message::LookupReply(LookupReply { req: 5, tokens: 3 });
    s.write_all(&encode_message(&bogus, DEFAULT_MAX_FRAME).unwrap())
        .unwrap();
    assert_eq!(
        error_of(next(&mut s, &mut d)),
        (Some(5), ErrorCode::UnexpectedMessage)
    );
    // Releasing a handle that never existed.
    let rel = Message::Release(Release {
        req: 6,
        fetch_id: 999,
    });
    s.write_all(&encode_message(&rel, DEFAULT_MAX_FRAME).unwrap())
        .unwrap();
    assert_eq!(
        error_of(next(&mut s, &mut d)),
        (Some(6), ErrorCode::UnknownHandle)
    );
    // A second handshake in the middle of the stream reads as a frame of absurd length.
    s.write_all(&encode_hello(PROTOCOL_VERSION)).unwrap();
    assert_eq!(
        error_of(next(&mut s, &mut d)),
        (None, ErrorCode::FrameTooLarge)
    );
    assert!(next(&mut s, &mut d).is_none());

    // A well-formed save without its fd: the frame cannot be completed.
    let mut s = hello(&srv);
    let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let save = Message::Save(Save {
        req: 7,
        model: "m".into(),
        token_ids: vec![1],
        layout: TargetLayout::host(DType::F16, TokenOrder::Nhd),
        shape: KvShape {
            num_layers: 1,
            tokens: 1,
            kv_heads: 1,
            head_dim: 1,
        },
        gpu: None,
        replace: false,
    });
    s.write_all(&encode_message(&save, DEFAULT_MAX_FRAME).unwrap())
        .unwrap();
    assert_eq!(error_of(next(&mut s, &mut d)), (None, ErrorCode::Malformed));
    assert!(next(&mut s, &mut d).is_none());
    still_serving(&srv);
}

#[test]
fn stats_answer_on_a_raw_connection() {
    let srv = TestServer::start(MemBackend::new(None));
    let mut s = hello(&srv);
    let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let m = Message::Stats(Stats { req: 42 });
    s.write_all(&encode_message(&m, DEFAULT_MAX_FRAME).unwrap())
        .unwrap();
    match next(&mut s, &mut d) {
        Some(Message::StatsReply(r)) => {
            assert_eq!(r.req, 42);
            assert_eq!(r.stats.clients, 1);
            assert_eq!(r.stats.peer.pid, Some(std::process::id() as i32));
        }
        other => panic!("{other:?}"),
    }
}

/// GPU saves are checked before any device is touched: a host save naming a GPU source, a
/// handle that is not 64 bytes, a length other than the layout's, a device mismatch; a
/// well-formed one on a host without a driver is `gpu_unsupported` (with a driver, the bogus
/// handle cannot be opened: `bad_request`). None of them stops the daemon.
#[test]
fn gpu_saves_are_validated_and_never_panic() {
    let srv = TestServer::start(MemBackend::new(None));
    let mut s = hello(&srv);
    let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let shape = KvShape {
        num_layers: 2,
        tokens: 3,
        kv_heads: 1,
        head_dim: 8,
    };
    let host = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let gpu = TargetLayout {
        memory: MemoryKind::Gpu(0),
        ..host
    };
    let len = gpu.buffer_len(&shape) as u64;
    let source = |mem_handle: Vec<u8>, len: u64| GpuSource {
        device: 0,
        mem_handle,
        offset: 0,
        len,
    };
    let mut send = |req: u64, layout: TargetLayout, src: GpuSource| {
        let save = Message::Save(Save {
            req,
            model: "m".into(),
            token_ids: vec![1, 2, 3],
            layout,
            shape,
            gpu: Some(src),
            replace: false,
        });
        s.write_all(&encode_message(&save, DEFAULT_MAX_FRAME).unwrap())
            .unwrap();
        error_of(next(&mut s, &mut d))
    };
    assert_eq!(
        send(1, host, source(vec![0; 64], len)),
        (Some(1), ErrorCode::BadRequest)
    );
    assert_eq!(
        send(2, gpu, source(vec![0; 63], len)),
        (Some(2), ErrorCode::BadRequest)
    );
    assert_eq!(
        send(3, gpu, source(vec![0; 64], len - 2)),
        (Some(3), ErrorCode::BadRequest)
    );
    let other = GpuSource {
        device: 1,
        ..source(vec![0; 64], len)
    };
    assert_eq!(send(4, gpu, other), (Some(4), ErrorCode::BadRequest));
    let (req, code) = send(5, gpu, source(vec![0; 64], len));
    assert_eq!(req, Some(5));
    assert!(
        matches!(code, ErrorCode::GpuUnsupported | ErrorCode::BadRequest),
        "{code:?}"
    );
    still_serving(&srv);
}

/// `[gpu] enabled = false` refuses GPU fetches with a message that says so.
#[test]
fn gpu_disabled_in_config_is_refused_clearly() {
    let srv = TestServer::start_gpu(
        MemBackend::new(None),
        kvfetcher::server::ServeOptions::default(),
        kvfetcher::gpu::GpuOptions {
            enabled: false,
            ..Default::default()
        },
    );
    let c = Client::connect(&srv.path).unwrap();
    let gpu = TargetLayout {
        memory: MemoryKind::Gpu(0),
        ..TargetLayout::host(DType::BF16, TokenOrder::Nhd)
    };
    let e = c.fetch(MODEL, &[1], &gpu).unwrap_err();
    assert_eq!(e.daemon_code(), Some(ErrorCode::GpuUnsupported));
    assert!(e.to_string().contains("disabled in config"), "{e}");
    still_serving(&srv);
}

/// `corrupt` is a code added after the first list: a client that announced it in its hello
/// gets it, a client of before (hello flags 0, which fails on an unknown code) gets `internal`.
#[test]
fn corrupt_objects_are_reported_to_clients_that_parse_the_code() {
    let backend = MemBackend::new(None);
    backend
        .corrupt_fetches
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let srv = TestServer::start(backend);
    let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let c = Client::connect(&srv.path).unwrap();
    let e = c.fetch(MODEL, &[1, 2], &layout).unwrap_err();
    assert_eq!(e.daemon_code(), Some(ErrorCode::Corrupt), "{e}");

    let mut s = raw(&srv);
    s.write_all(&encode_hello_with_flags(PROTOCOL_VERSION, 0))
        .unwrap();
    let mut r = [0u8; HELLO_LEN];
    s.read_exact(&mut r).unwrap();
    assert_eq!(parse_hello(&r).unwrap(), (PROTOCOL_VERSION, HELLO_OK));
    let fetch = Message::Fetch(Fetch {
        req: 9,
        model: MODEL.into(),
        token_ids: vec![1, 2],
        layout,
    });
    s.write_all(&encode_message(&fetch, DEFAULT_MAX_FRAME).unwrap())
        .unwrap();
    match next(&mut s, &mut FrameDecoder::new(DEFAULT_MAX_FRAME)) {
        Some(Message::FetchFailed(f)) => {
            assert_eq!((f.req, f.code), (9, ErrorCode::Internal));
            assert!(f.message.contains("corrupt"), "{}", f.message);
        }
        other => panic!("expected FetchFailed, got {other:?}"),
    }
}
