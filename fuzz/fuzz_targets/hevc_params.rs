//! Fuzzes the hevc section parameter parser (`HevcParams`, lossless `KVH1` and lossy `KVH2`):
//! arbitrary bytes, and the same bytes behind each magic (and a QP byte), so mutations reach the
//! geometry, QP, checksum and stream-table checks. Nothing may panic; parameters that parse
//! serialize back to exactly the same bytes, keep the lossy rules (QP 1..=51, codes as wide as
//! their samples, no codes checksum), and split a payload only of their streams' total length.

#![no_main]

use kvfetcher_codec::{HevcParams, HEVC_MAX_QP};
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    let Ok(p) = HevcParams::from_bytes(data) else {
        return;
    };
    assert_eq!(p.to_bytes().expect("parsed params serialize"), data);
    if p.is_lossy() {
        assert!(p.qp <= HEVC_MAX_QP);
        assert_eq!(p.geometry.shape.bits, p.geometry.bit_depth);
        assert_eq!(p.crc32c, 0);
    }
    let total: usize = p.streams.iter().map(|s| s.bytes).sum();
    if total <= 1 << 16 {
        let payload = vec![0u8; total];
        assert_eq!(p.split(&payload).expect("exact length splits").len(), p.streams.len());
        if total > 0 {
            assert!(p.split(&payload[1..]).is_err());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut lossless = b"KVH1".to_vec();
    lossless.extend_from_slice(data);
    check(&lossless);
    if let Some((&qp, rest)) = data.split_first() {
        let mut lossy = b"KVH2".to_vec();
        lossy.push(qp % (HEVC_MAX_QP + 2));
        lossy.extend_from_slice(rest);
        check(&lossy);
    }
});
