//! Fuzzes the rANS value stream parser and decoder (docs/FORMAT.md, "rANS value streams").
//!
//! Input: n_values (u16 LE), a context count byte c, c context bytes (each taken mod 66, so
//! out-of-range contexts occur but most are valid), then the stream. Decoding must never panic
//! or allocate beyond n_values; a stream that decodes must be canonical: re-encoding the values
//! with its own tables and block size gives back exactly its bytes.

#![no_main]

use kvfetcher_codec::rans::{decode_values, encode_values, StreamLayout};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let n_values = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let n_ctx = usize::from(data[2]);
    let Some(ctx) = data.get(3..3 + n_ctx) else {
        return;
    };
    let column_ctx: Vec<u8> = ctx.iter().map(|c| c % 66).collect();
    let stream = &data[3 + n_ctx..];
    let layout = StreamLayout::parse(stream, n_values);
    let mut out = vec![0i32; n_values];
    let decoded = decode_values(stream, &column_ctx, &mut out);
    if decoded.is_ok() {
        let layout = layout.expect("decoded, so it parses");
        let again = encode_values(&out, &column_ctx, &layout.tables, layout.block_values)
            .expect("decoded values re-encode");
        assert_eq!(again, stream, "a decodable stream is canonical");
    }
});
