//! End-to-end fetches through `serve` with the in-memory backend: every layout returns exactly
//! the bytes the backend wrote, readiness is per layer, and the async client works too.

mod server_support;

use kvfetcher::server::{SaveAccess, ServeOptions};
use kvfetcher_client::{AsyncClient, Client, ClientError};
use kvfetcher_kv::DTypeExt;
use kvfetcher_protocol::{DType, MemoryKind, Paging, TargetLayout, TokenOrder};
use kvfetcher_protocol::{ErrorCode, KvShape};
use server_support::*;

fn layouts() -> Vec<TargetLayout> {
    let mut v = Vec::new();
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for order in [TokenOrder::Nhd, TokenOrder::Hnd] {
            for paging in [
                Paging::Contiguous,
                Paging::Paged { block_tokens: 16 },
                Paging::Paged { block_tokens: 100 },
            ] {
                v.push(TargetLayout {
                    dtype,
                    order,
                    paging,
                    memory: MemoryKind::Host,
                });
            }
        }
    }
    v
}

#[test]
fn every_layout_returns_exactly_the_backend_bytes() {
    let kv = load_kv(130);
    let srv = TestServer::start(MemBackend::new(Some(kv.clone())));
    let c = Client::connect(&srv.path).unwrap();
    assert_eq!(c.lookup(MODEL, &kv.token_ids).unwrap(), 130);
    // A longer request whose tail is unknown: the prefix is what comes back.
    let mut asked = kv.token_ids.clone();
    asked.extend([7, 7, 7]);
    for layout in layouts() {
        let f = c.fetch(MODEL, &asked, &layout).unwrap();
        let done = f.wait_done().unwrap();
        assert_eq!(done.tokens, 130);
        assert_eq!(done.bytes_on_wire, 1234);
        let shape = *f.shape();
        assert_eq!(shape.tokens, 130);
        assert_eq!(shape.num_layers, 8);
        let writes = srv.backend.writes.lock().unwrap().clone();
        let expect = expected_buffer(layout.buffer_len(&shape), &writes);
        assert!(f.bytes().unwrap() == &expect[..], "{layout:?}");
        // Spot check against the source: layer 3, V, token 129, head 1, every dim.
        let dt = layout.dtype;
        let off = layout.offset(&shape, 3, 1, 129, 1);
        let mut got = Vec::new();
        dt.decode_f32(&f.bytes().unwrap()[off..off + 128 * dt.size()], &mut got);
        let src = &kv.layers[3][1][(129 * 2 + 1) * 128..(129 * 2 + 2) * 128];
        for (g, s) in got.iter().zip(src) {
            let tol = if layout.dtype == DType::BF16 {
                s.abs() / 128.0
            } else {
                0.0
            };
            assert!((g - s).abs() <= tol, "{layout:?}: {g} vs {s}");
        }
        // Tensor slices line up with the layout.
        let k7 = f.tensor(7, 0).unwrap();
        assert_eq!(k7.len(), layout.tensor_len(&shape));
        assert_eq!(
            &k7[..128 * dt.size()],
            &f.bytes().unwrap()[layout.offset(&shape, 7, 0, 0, 0)..][..128 * dt.size()]
        );
        f.release().unwrap();
    }
    assert_eq!(c.stats().unwrap().fetches_active, 0);
}

#[test]
fn layer_zero_is_usable_while_later_layers_still_arrive() {
    let kv = load_kv(64);
    let mut b = MemBackend::new(Some(kv.clone()));
    b.gate_from = 1;
    let srv = TestServer::start(b);
    let c = Client::connect(&srv.path).unwrap();
    let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let f = c.fetch(MODEL, &kv.token_ids, &layout).unwrap();
    f.wait_layer(0).unwrap();
    let l0 = f.layer(0).unwrap();
    assert!(l0.iter().any(|&b| b != 0));
    // Layer 7 is not written yet: the daemon has not been let past layer 0.
    assert!(f.bytes().unwrap()[layout.offset(f.shape(), 7, 0, 0, 0)..]
        .iter()
        .all(|&b| b == 0));
    assert!(matches!(
        f.wait_layer(8),
        Err(ClientError::LayerOutOfRange {
            layer: 8,
            layers: 8
        })
    ));
    srv.backend.gate.add_permits(7);
    f.wait_layer(7).unwrap();
    assert!(f.tensor(7, 1).unwrap().iter().any(|&b| b != 0));
    assert_eq!(f.wait_done().unwrap().tokens, 64);
}

#[test]
fn unknown_models_and_gpu_memory_are_clear_errors() {
    let kv = load_kv(16);
    let srv = TestServer::start(MemBackend::new(Some(kv)));
    let c = Client::connect(&srv.path).unwrap();
    let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let e = c.lookup("no-such-model", &[1, 2, 3]).unwrap_err();
    assert_eq!(e.daemon_code(), Some(ErrorCode::NotFound), "{e}");
    let e = c.fetch("no-such-model", &[1, 2, 3], &layout).unwrap_err();
    assert_eq!(e.daemon_code(), Some(ErrorCode::NotFound), "{e}");
    let gpu = TargetLayout {
        memory: MemoryKind::Gpu(0),
        ..layout
    };
    let e = c.fetch(MODEL, &[1], &gpu).unwrap_err();
    assert_eq!(e.daemon_code(), Some(ErrorCode::GpuUnsupported));
    assert!(e.to_string().contains("gpu memory not supported"), "{e}");
    let e = c.fetch(MODEL, &[], &layout).unwrap_err();
    assert_eq!(e.daemon_code(), Some(ErrorCode::BadRequest));
    let bad = TargetLayout {
        paging: Paging::Paged { block_tokens: 0 },
        ..layout
    };
    let e = c.fetch(MODEL, &[1], &bad).unwrap_err();
    assert_eq!(e.daemon_code(), Some(ErrorCode::BadRequest));
    // The connection still serves.
    assert_eq!(c.stats().unwrap().clients, 1);
}

#[test]
fn save_hands_the_backend_the_clients_bytes() {
    let kv = load_kv(40);
    let srv = TestServer::start(MemBackend::new(None));
    let c = Client::connect(&srv.path).unwrap();
    let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let shape = KvShape {
        num_layers: 8,
        tokens: 40,
        kv_heads: kv.heads,
        head_dim: kv.dim,
    };
    let mut data = Vec::new();
    let mut row = Vec::new();
    for l in &kv.layers {
        for t in l {
            kvfetcher_kv::DType::F16.encode_f32(t, &mut row);
            data.extend_from_slice(&row);
        }
    }
    assert_eq!(data.len(), layout.buffer_len(&shape));
    assert_eq!(
        c.save("m", &kv.token_ids, &layout, &shape, &data).unwrap(),
        1
    );
    let saves = srv.backend.saves.lock().unwrap().clone();
    assert_eq!(saves.len(), 1);
    assert_eq!(saves[0].0, "m");
    assert_eq!(saves[0].1, kv.token_ids);
    assert_eq!(saves[0].2, shape);
    assert!(saves[0].3 == data);
    let e = c
        .save("m", &kv.token_ids, &layout, &shape, &data[1..])
        .unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
    assert_eq!(c.stats().unwrap().saves_total, 1);
    assert_eq!(*srv.backend.replaces.lock().unwrap(), [false]);
}

/// A uid/gid allowed by nothing: the test never runs as it.
const NOBODY: u32 = 4_000_000_000;

fn save_kv(kv: &Kv) -> (TargetLayout, KvShape, Vec<u8>) {
    let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let shape = KvShape {
        num_layers: 8,
        tokens: kv.token_ids.len() as u32,
        kv_heads: kv.heads,
        head_dim: kv.dim,
    };
    let mut data = Vec::new();
    let mut row = Vec::new();
    for l in &kv.layers {
        for t in l {
            kvfetcher_kv::DType::F16.encode_f32(t, &mut row);
            data.extend_from_slice(&row);
        }
    }
    (layout, shape, data)
}

#[test]
fn replace_is_refused_unless_the_uid_or_gid_is_allowed() {
    let kv = load_kv(40);
    let (layout, shape, data) = save_kv(&kv);
    // Default lists: everyone saves, nobody replaces.
    let srv = TestServer::start(MemBackend::new(None));
    let c = Client::connect(&srv.path).unwrap();
    let e = c
        .save_replacing("m", &kv.token_ids, &layout, &shape, &data, true)
        .unwrap_err();
    assert_eq!(e.daemon_code(), Some(ErrorCode::BadRequest), "{e}");
    assert!(e.to_string().contains("may not replace"), "{e}");
    assert!(srv.backend.saves.lock().unwrap().is_empty());
    c.save("m", &kv.token_ids, &layout, &shape, &data).unwrap();
    assert_eq!(*srv.backend.replaces.lock().unwrap(), [false]);
    drop(c);
    // This process's uid is allowed to replace.
    let uid = nix::unistd::getuid().as_raw();
    let opts = ServeOptions {
        save_access: SaveAccess {
            replace_uids: vec![uid],
            ..SaveAccess::default()
        },
        ..ServeOptions::default()
    };
    let srv = TestServer::start_with(MemBackend::new(None), opts);
    let c = Client::connect(&srv.path).unwrap();
    c.save_replacing("m", &kv.token_ids, &layout, &shape, &data, true)
        .unwrap();
    assert_eq!(*srv.backend.replaces.lock().unwrap(), [true]);
    drop(c);
    // A save list that does not name this process refuses even a plain save.
    let opts = ServeOptions {
        save_access: SaveAccess {
            save_uids: vec![NOBODY],
            save_gids: vec![NOBODY],
            replace_uids: vec![uid],
            ..SaveAccess::default()
        },
        ..ServeOptions::default()
    };
    let srv = TestServer::start_with(MemBackend::new(None), opts);
    let c = Client::connect(&srv.path).unwrap();
    let e = c
        .save("m", &kv.token_ids, &layout, &shape, &data)
        .unwrap_err();
    assert!(e.to_string().contains("may not save"), "{e}");
    assert!(srv.backend.saves.lock().unwrap().is_empty());
}

#[test]
fn async_client_fetches_and_waits_per_layer() {
    let kv = load_kv(50);
    let srv = TestServer::start(MemBackend::new(Some(kv.clone())));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = AsyncClient::connect(&srv.path).await.unwrap();
        assert_eq!(c.lookup(MODEL, &kv.token_ids[..20]).await.unwrap(), 20);
        let layout = TargetLayout {
            paging: Paging::Paged { block_tokens: 16 },
            ..TargetLayout::host(DType::BF16, TokenOrder::Hnd)
        };
        let f = c.fetch(MODEL, &kv.token_ids, &layout).await.unwrap();
        for l in 0..8 {
            f.wait_layer(l).await.unwrap();
        }
        assert_eq!(f.wait_done().await.unwrap().tokens, 50);
        let writes = srv.backend.writes.lock().unwrap().clone();
        let expect = expected_buffer(layout.buffer_len(f.shape()), &writes);
        assert!(f.bytes().unwrap() == &expect[..]);
        let stats = c.stats().await.unwrap();
        assert_eq!(stats.fetches_active, 1);
        f.release().await.unwrap();
        assert_eq!(c.stats().await.unwrap().fetches_active, 0);
    });
}

#[test]
fn shutdown_cancels_running_fetches_and_closes_clients() {
    let kv = load_kv(16);
    let mut b = MemBackend::new(Some(kv.clone()));
    b.gate_from = 1;
    let srv = TestServer::start(b);
    let backend = srv.backend.clone();
    let c = Client::connect(&srv.path).unwrap();
    let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let f = c.fetch(MODEL, &kv.token_ids, &layout).unwrap();
    f.wait_layer(0).unwrap();
    assert!(!backend
        .fetch_dropped
        .load(std::sync::atomic::Ordering::SeqCst));
    drop(srv); // serve's shutdown future completes; the call returns once all is torn down
    assert!(backend
        .fetch_dropped
        .load(std::sync::atomic::Ordering::SeqCst));
    assert!(f.wait_layer(1).is_err());
}
