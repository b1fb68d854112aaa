//! The clients against a scripted fake daemon: GPU (`GpuIpc`) fetch replies are checked before
//! the CUDA driver is touched, a driver-less host gets a typed `ClientError::Gpu`, a buffer the
//! client cannot use is released at once, and host/GPU accessors refuse the other memory.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::mpsc;

use kvfetcher_client::protocol::{
    encode_hello_reply, BufferMemory, FetchBuffer, Message, SaveReply, DEFAULT_MAX_FRAME, HELLO_OK,
    PROTOCOL_VERSION,
};
use kvfetcher_client::transport::{send_async, send_bytes_async, AsyncReceiver};
use kvfetcher_client::{
    AsyncClient, Client, ClientError, DType, GpuError, KvShape, MemoryKind, TargetLayout,
    TokenOrder,
};

const SHAPE: KvShape = KvShape {
    num_layers: 3,
    tokens: 4,
    kv_heads: 1,
    head_dim: 8,
};

fn layout(memory: MemoryKind) -> TargetLayout {
    TargetLayout {
        memory,
        ..TargetLayout::host(DType::F16, TokenOrder::Nhd)
    }
}

/// The answer a fake daemon gives to each fetch: the buffer message (for request `req`, fetch
/// id 7) and whether a memfd of `len` bytes goes with it.
type Script = Box<dyn Fn(u64) -> (Message, bool) + Send>;

/// Starts a fake daemon on a fresh socket: answers the handshake, each `Fetch` with `script`,
/// each `Save` with one chunk, and forwards every request it gets to the returned receiver.
fn fake_daemon(script: Script) -> (tempfile::TempDir, PathBuf, mpsc::Receiver<Message>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvf.sock");
    let std_listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::UnixListener::from_std(std_listener).unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let mut rx = AsyncReceiver::new(DEFAULT_MAX_FRAME);
            rx.recv_hello(&stream).await.unwrap();
            send_bytes_async(
                &stream,
                &encode_hello_reply(PROTOCOL_VERSION, HELLO_OK),
                &[],
            )
            .await
            .unwrap();
            while let Ok((m, _fds)) = rx.recv(&stream).await {
                let answer = match &m {
                    Message::Fetch(f) => Some(script(f.req)),
                    Message::Save(s) => Some((
                        Message::SaveReply(SaveReply {
                            req: s.req,
                            chunks: 1,
                        }),
                        false,
                    )),
                    _ => None,
                };
                if let Some((a, with_fd)) = answer {
                    let memfd = with_fd.then(|| {
                        let mut f = kvfetcher_client::memfd::create("fake", 0).unwrap();
                        f.write_all(&vec![0x5a; SHAPE_LEN]).unwrap();
                        f
                    });
                    let fds: Vec<_> = memfd.iter().map(|f| f.as_fd()).collect();
                    send_async(&stream, &a, &fds, DEFAULT_MAX_FRAME)
                        .await
                        .unwrap();
                }
                if tx.send(m).is_err() {
                    break;
                }
            }
        });
    });
    (dir, path, rx)
}

/// Bytes of the f16 NHD buffer of `SHAPE`.
const SHAPE_LEN: usize = 3 * 2 * 4 * 8 * 2;

fn gpu_reply(req: u64, device: u32, mem: usize, events: Vec<Vec<u8>>, len: u64) -> Message {
    Message::FetchBuffer(FetchBuffer {
        req,
        fetch_id: 7,
        shape: SHAPE,
        layout: layout(MemoryKind::Gpu(device)),
        len,
        memory: BufferMemory::GpuIpc {
            device,
            mem_handle: vec![0; mem],
            event_handles: events,
        },
    })
}

/// Receives requests until a `Release`; returns its fetch id.
fn next_release(rx: &mpsc::Receiver<Message>) -> u64 {
    loop {
        match rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("no Release")
        {
            Message::Release(r) => return r.fetch_id,
            _ => continue,
        }
    }
}

/// Malformed GPU replies are typed errors (nothing mapped, no driver loaded) and the fetch the
/// daemon made is released.
#[test]
fn malformed_gpu_replies_are_refused_and_released() {
    let cases: Vec<(&str, Script)> = vec![
        (
            "63-byte memory handle",
            Box::new(|req| (gpu_reply(req, 0, 63, vec![vec![0; 64]; 3], 384), false)),
        ),
        (
            "2 events for 3 layers",
            Box::new(|req| (gpu_reply(req, 0, 64, vec![vec![0; 64]; 2], 384), false)),
        ),
        (
            "65-byte event handle",
            Box::new(|req| {
                let ev = vec![vec![0; 64], vec![0; 65], vec![0; 64]];
                (gpu_reply(req, 0, 64, ev, 384), false)
            }),
        ),
        (
            "length mismatch",
            Box::new(|req| (gpu_reply(req, 0, 64, vec![vec![0; 64]; 3], 383), false)),
        ),
        (
            "other device",
            Box::new(|req| (gpu_reply(req, 1, 64, vec![vec![0; 64]; 3], 384), false)),
        ),
    ];
    for (what, script) in cases {
        let (_dir, path, rx) = fake_daemon(script);
        let c = Client::connect(&path).unwrap();
        let e = c
            .fetch("m", &[1, 2, 3, 4], &layout(MemoryKind::Gpu(0)))
            .unwrap_err();
        assert!(matches!(e, ClientError::Unexpected(_)), "{what}: {e}");
        assert_eq!(next_release(&rx), 7, "{what}");
    }
}

/// A host buffer for a GPU fetch (and the reverse) is refused.
#[test]
fn memory_kind_must_match_the_request() {
    let (_dir, path, rx) = fake_daemon(Box::new(|req| {
        let mut m = gpu_reply(req, 0, 64, vec![vec![0; 64]; 3], 384);
        if let Message::FetchBuffer(b) = &mut m {
            b.memory = BufferMemory::Host;
        }
        (m, true)
    }));
    let c = Client::connect(&path).unwrap();
    let e = c
        .fetch("m", &[1, 2, 3, 4], &layout(MemoryKind::Gpu(0)))
        .unwrap_err();
    assert!(matches!(e, ClientError::Unexpected(_)), "{e}");
    assert_eq!(next_release(&rx), 7);

    let (_dir, path, rx) = fake_daemon(Box::new(|req| {
        (gpu_reply(req, 0, 64, vec![vec![0; 64]; 3], 384), false)
    }));
    let c = Client::connect(&path).unwrap();
    let e = c
        .fetch("m", &[1, 2, 3, 4], &layout(MemoryKind::Host))
        .unwrap_err();
    assert!(matches!(e, ClientError::Unexpected(_)), "{e}");
    assert_eq!(next_release(&rx), 7);
}

/// A well-formed GPU reply on a host without the driver: `ClientError::Gpu`, fetch released.
/// With a driver, the fake (all-zero) handles cannot be opened: still `ClientError::Gpu`.
#[test]
fn gpu_reply_needs_the_driver() {
    let (_dir, path, rx) = fake_daemon(Box::new(|req| {
        (gpu_reply(req, 0, 64, vec![vec![0; 64]; 3], 384), false)
    }));
    let c = Client::connect(&path).unwrap();
    let e = c
        .fetch("m", &[1, 2, 3, 4], &layout(MemoryKind::Gpu(0)))
        .unwrap_err();
    match kvfetcher_client::driver_available() {
        Err(_) => assert!(
            matches!(e, ClientError::Gpu(GpuError::Unavailable(ref m)) if m.contains("libcuda.so.1")
                || m.contains("CUDA driver")),
            "{e}"
        ),
        Ok(()) => assert!(matches!(e, ClientError::Gpu(_)), "{e}"),
    }
    assert_eq!(next_release(&rx), 7);
}

#[tokio::test]
async fn async_client_checks_gpu_replies_too() {
    let (_dir, path, rx) = fake_daemon(Box::new(|req| {
        (gpu_reply(req, 0, 64, vec![vec![0; 64]; 2], 384), false)
    }));
    let c = AsyncClient::connect(&path).await.unwrap();
    let e = c
        .fetch("m", &[1, 2, 3, 4], &layout(MemoryKind::Gpu(0)))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Unexpected(_)), "{e}");
    let id = tokio::task::spawn_blocking(move || next_release(&rx))
        .await
        .unwrap();
    assert_eq!(id, 7);
}

/// On a host buffer the GPU accessors fail at once (no wait), and saves check their memory.
#[test]
fn host_fetch_refuses_gpu_accessors() {
    let (_dir, path, rx) = fake_daemon(Box::new(|req| {
        let mut m = gpu_reply(req, 0, 64, vec![], SHAPE_LEN as u64);
        if let Message::FetchBuffer(b) = &mut m {
            b.memory = BufferMemory::Host;
            b.layout = layout(MemoryKind::Host);
        }
        (m, true)
    }));
    let c = Client::connect(&path).unwrap();
    let f = c
        .fetch("m", &[1, 2, 3, 4], &layout(MemoryKind::Host))
        .unwrap();
    assert_eq!(f.device_ptr(), None);
    assert_eq!(f.device(), None);
    assert_eq!(f.len(), SHAPE_LEN);
    assert_eq!(f.bytes().unwrap().len(), SHAPE_LEN);
    assert!(matches!(
        f.layer_device_ptr(0),
        Err(ClientError::WrongMemory(_))
    ));
    // SAFETY: the stream is never used: the call fails on the memory kind first.
    let e = unsafe { f.stream_wait_layer(0, std::ptr::null_mut()) }.unwrap_err();
    assert!(matches!(e, ClientError::WrongMemory(_)), "{e}");

    let ids = [1, 2, 3, 4];
    let e = c
        .save(
            "m",
            &ids,
            &layout(MemoryKind::Gpu(0)),
            &SHAPE,
            &[0; SHAPE_LEN],
        )
        .unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
    let e = c
        .save_gpu(
            "m",
            &ids,
            &layout(MemoryKind::Host),
            &SHAPE,
            0x1000,
            SHAPE_LEN,
        )
        .unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
    let e = c
        .save_gpu("m", &ids, &layout(MemoryKind::Gpu(0)), &SHAPE, 0x1000, 7)
        .unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
    if kvfetcher_client::driver_available().is_err() {
        let e = c
            .save_gpu(
                "m",
                &ids,
                &layout(MemoryKind::Gpu(0)),
                &SHAPE,
                0x1000,
                SHAPE_LEN,
            )
            .unwrap_err();
        assert!(
            matches!(e, ClientError::Gpu(GpuError::Unavailable(_))),
            "{e}"
        );
    }
    drop(f);
    assert_eq!(next_release(&rx), 7);
}

/// Handles cross threads (engines wait on one thread and free on another), and the async
/// stream wait can be spawned.
#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<kvfetcher_client::FetchHandle>();
    send_sync::<kvfetcher_client::AsyncFetchHandle>();
}

#[allow(dead_code)]
fn stream_wait_future_is_send(f: &kvfetcher_client::AsyncFetchHandle) {
    fn send<T: Send>(_: T) {}
    // SAFETY: never run: this only checks the future's type.
    send(unsafe { f.stream_wait_layer(0, std::ptr::null_mut()) });
}
