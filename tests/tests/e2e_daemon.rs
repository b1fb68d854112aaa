//! End to end with real processes: `kvfetcher store` + `kvfetcher daemon` (started the way
//! systemd starts it, readiness included) + the Rust client. Save real KV, look it up from a
//! second client, fetch it back in every target layout and compare with the saved (quantized)
//! values; scrape the metrics; stop the daemon with SIGTERM.

mod e2e_support;

use std::time::Duration;

use e2e_support::*;
use kvfetcher_client::{Client, DType, ErrorCode, MemoryKind, Paging, TargetLayout, TokenOrder};

const MODEL: &str = "codelm-107m";

#[test]
fn store_daemon_and_rust_client() {
    let cache = codelm(300);
    let mut stack = start_stack();
    let ids = token_ids(300, 0);
    let shape = shape_of(&cache);
    let client = Client::connect(&stack.socket).expect("connect");
    assert_eq!(client.lookup(MODEL, &ids).unwrap(), 0, "nothing saved yet");
    let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let chunks = client
        .save(MODEL, &ids, &layout, &shape, &nhd_bytes(&cache))
        .unwrap();
    assert_eq!(chunks, 2);
    assert_eq!(client.lookup(MODEL, &ids).unwrap(), 300);
    // A second client (another connection) sees the same prefix, and only the prefix.
    let other = Client::connect(&stack.socket).expect("second client");
    assert_eq!(other.lookup(MODEL, &ids).unwrap(), 300);
    let mut longer = ids.clone();
    longer.extend(token_ids(100, 7));
    assert_eq!(
        other.lookup(MODEL, &longer).unwrap(),
        256,
        "the partial second chunk does not match"
    );
    assert_eq!(other.lookup("other-model", &ids).unwrap(), 0);

    let want = expected(&cache, MODEL, &ids);
    let mut wire = 0;
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for order in [TokenOrder::Nhd, TokenOrder::Hnd] {
            for paging in [Paging::Contiguous, Paging::Paged { block_tokens: 16 }] {
                let layout = TargetLayout {
                    dtype,
                    order,
                    paging,
                    memory: MemoryKind::Host,
                };
                let h = other.fetch(MODEL, &ids, &layout).expect("fetch");
                assert_eq!(h.shape(), &shape);
                h.wait_layer(0).unwrap();
                let done = h.wait_done().unwrap();
                assert_eq!(done.tokens, 300);
                wire = done.bytes_on_wire;
                assert_buffer(h.bytes().unwrap(), &layout, &want);
                h.release().unwrap();
            }
        }
    }
    let raw = shape.num_layers as u64 * 2 * 300 * 256 * 2;
    assert!(
        wire > 0 && wire < raw / 3 * 2,
        "{wire} bytes on the wire for {raw} bytes of f16"
    );

    let err = other
        .fetch(MODEL, &token_ids(200, 99), &layout)
        .unwrap_err();
    assert_eq!(err.daemon_code(), Some(ErrorCode::NotFound), "{err}");

    let text = scrape(stack.metrics);
    assert!(text.starts_with("HTTP/1.1 200"));
    assert_eq!(
        metric(&text, "kvfetcher_fetch_duration_seconds_count"),
        Some(12.0)
    );
    assert!(metric(&text, "kvfetcher_bytes_in_total").unwrap() > 0.0);
    assert!(metric(&text, "kvfetcher_bytes_out_total").unwrap() > 0.0);
    assert!(metric(&text, "kvfetcher_compression_ratio").unwrap() > 1.5);
    assert_eq!(metric(&text, "kvfetcher_fetches_active"), Some(0.0));

    drop((client, other));
    let status = stack
        .daemon
        .terminate(Duration::from_secs(10))
        .expect("daemon exits on SIGTERM");
    assert!(status.success(), "daemon exit {status}");
    assert!(!stack.socket.exists(), "socket removed on shutdown");
}
