//! Fuzzes the chunk object parser and the packed/zstd/rans decoders (with the seeds' codec
//! profile registered, so transform-coded chunks reach the restore step) with arbitrary bytes.
//!
//! Each input runs twice: as is (almost every mutation then fails a crc32c), and "resealed",
//! with the header and section crc32cs recomputed, so mutations reach the field checks, the
//! variant decoders and the restore step. Neither may panic, hang or allocate beyond the
//! format's limits.

#![no_main]

use std::sync::OnceLock;

use kvfetcher_codec::{
    decode_chunk, ChunkHeader, ChunkView, CodecRegistry, FIXED_HEADER_LEN, SECTION_ENTRY_LEN,
};
use libfuzzer_sys::fuzz_target;

include!("../common/seed_profile.rs");

fn registry() -> &'static CodecRegistry {
    static REG: OnceLock<CodecRegistry> = OnceLock::new();
    REG.get_or_init(|| CodecRegistry::software().with_profile(std::sync::Arc::new(seed_profile())))
}

fn run(data: &[u8]) {
    let _ = ChunkHeader::parse_prefix(data);
    if let Ok(view) = ChunkView::parse(data) {
        let _ = view.verify();
    }
    if let Ok(cache) = decode_chunk(data, registry()) {
        // A decoded chunk is exactly as big as its header says.
        let view = ChunkView::parse(data).expect("decoded, so it parses");
        assert_eq!(cache.num_layers(), usize::from(view.header().num_layers));
        assert_eq!(cache.tokens(), view.header().token_count as usize);
    }
}

/// Recomputes the header crc32c in place, if the header length field fits the data.
fn reseal_header(data: &mut [u8]) -> bool {
    if data.len() < 12 {
        return false;
    }
    let hl = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes")) as usize;
    if hl < 4 || hl > data.len() {
        return false;
    }
    let crc = crc32c::crc32c(&data[..hl - 4]);
    data[hl - 4..hl].copy_from_slice(&crc.to_le_bytes());
    true
}

fuzz_target!(|data: &[u8]| {
    run(data);
    let mut copy = data.to_vec();
    if !reseal_header(&mut copy) {
        return;
    }
    if let Ok(view) = ChunkView::parse(&copy) {
        let crcs: Vec<u32> = (0..view.header().sections.len())
            .map(|i| crc32c::crc32c(view.section_bytes(i)))
            .collect();
        for (i, crc) in crcs.into_iter().enumerate() {
            let at = FIXED_HEADER_LEN + i * SECTION_ENTRY_LEN + 24;
            copy[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        }
        reseal_header(&mut copy);
    }
    run(&copy);
});
