//! The daemon's local server (`kvfetcher::server::serve`) over an in-memory backend holding the
//! first 130 tokens of the codelm KV in data/: what `tests/c/run.sh` runs the C tests against.
//! Not a test by itself (ignored); run.sh starts it as
//! `server_c_harness --ignored --exact serve_for_c_tests` with `KVF_C_SOCKET` and `KVF_C_REFDIR`.
//!
//! Writes into REFDIR `tokens.bin` (the token ids, u32
//! LE) and the exact buffers a fetch must return: `ref-f16-nhd.bin` (contiguous) and
//! `ref-bf16-hnd-p16.bin` (paged, 16 tokens per block). Prints `ready` once listening and runs
//! until SIGTERM or SIGINT. It serves at most 4 clients at once, so that the C test can see a refused client's `busy`.
//!
//! Saves keep a model already saved unless they ask to replace (as the store keeps stored
//! chunks). With `KVF_C_REPLACE_SOCKET` it also serves the same backend on that socket with
//! `[save] replace_uids` listing this process's uid, so that the C test's replace is refused
//! on the first socket and allowed on this one.

mod server_support;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use kvfetcher_protocol::{DType, MemoryKind, Paging, TargetLayout, TokenOrder};
use server_support::{load_kv, reference_buffer, MemBackend};
use tokio::signal::unix::{signal, SignalKind};

/// Tokens served: not a multiple of the 16-token block, so paged buffers carry padding.
const TOKENS: usize = 130;

/// Clients served at once; tests/c/test_client.c opens one more than this (keep them equal).
const C_TEST_MAX_CLIENTS: usize = 4;

#[test]
#[ignore = "a server for tests/c/run.sh, not a test"]
fn serve_for_c_tests() {
    let (Some(sock), Some(dir)) = (
        std::env::var_os("KVF_C_SOCKET"),
        std::env::var_os("KVF_C_REFDIR"),
    ) else {
        println!("skipped: KVF_C_SOCKET and KVF_C_REFDIR not set (run by tests/c/run.sh)");
        return;
    };
    let (sock, dir) = (PathBuf::from(sock), PathBuf::from(dir));
    let kv = load_kv(TOKENS);
    let ids: Vec<u8> = kv.token_ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(dir.join("tokens.bin"), ids).expect("write tokens.bin");
    let f16 = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let bf16 = TargetLayout {
        dtype: DType::BF16,
        order: TokenOrder::Hnd,
        paging: Paging::Paged { block_tokens: 16 },
        memory: MemoryKind::Host,
    };
    for (name, layout) in [("ref-f16-nhd.bin", f16), ("ref-bf16-hnd-p16.bin", bf16)] {
        let (_, buf) = reference_buffer(&kv, TOKENS as u32, &layout);
        std::fs::write(dir.join(name), buf).expect("write reference");
    }
    let backend = Arc::new(MemBackend {
        write_once: true,
        ..MemBackend::new(Some(kv))
    });
    let replace_sock = std::env::var_os("KVF_C_REPLACE_SOCKET").map(PathBuf::from);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        // The replace socket first: run.sh waits for the main socket.
        let replace_listener =
            replace_sock.map(|p| tokio::net::UnixListener::bind(p).expect("bind replace"));
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        println!("ready");
        std::io::stdout().flush().expect("stdout");
        let mut term = signal(SignalKind::terminate()).expect("sigterm");
        let mut int = signal(SignalKind::interrupt()).expect("sigint");
        // A small client table, so that tests/c sees the daemon's `busy` refusal.
        let opts = kvfetcher::server::ServeOptions {
            max_clients: C_TEST_MAX_CLIENTS,
            ..Default::default()
        };
        let gpus = Arc::new(kvfetcher::gpu::GpuDevices::new(
            kvfetcher::gpu::GpuOptions::default(),
            kvfetcher::Metrics::new(),
        ));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.changed().await;
        };
        let replacing = replace_listener.map(|l| {
            let opts = kvfetcher::server::ServeOptions {
                save_access: kvfetcher::server::SaveAccess {
                    replace_uids: vec![nix::unistd::geteuid().as_raw()],
                    ..Default::default()
                },
                ..Default::default()
            };
            let serve = kvfetcher::server::serve_with(
                l,
                backend.clone(),
                opts,
                gpus.clone(),
                until_stopped(stopped.clone()),
            );
            tokio::spawn(serve)
        });
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = stop.send(true);
        });
        kvfetcher::server::serve_with(listener, backend, opts, gpus, until_stopped(stopped))
            .await
            .expect("serve");
        if let Some(r) = replacing {
            r.await.expect("join").expect("serve replace");
        }
    });
}
