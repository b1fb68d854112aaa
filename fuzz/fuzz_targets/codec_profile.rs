//! Fuzzes the codec profile parser: arbitrary bytes, and the same bytes with the trailing crc32c
//! recomputed so mutations reach the field checks. Never a panic, never an allocation beyond
//! the bytes given.

#![no_main]

use kvfetcher_codec::CodecProfile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = CodecProfile::from_bytes(data);
    if data.len() >= 8 {
        let mut copy = data.to_vec();
        let n = copy.len();
        let crc = crc32c::crc32c(&copy[..n - 4]);
        copy[n - 4..].copy_from_slice(&crc.to_le_bytes());
        if let Ok(p) = CodecProfile::from_bytes(&copy) {
            // What parses serializes back to the same bytes.
            assert_eq!(p.to_bytes(), copy);
        }
    }
});
