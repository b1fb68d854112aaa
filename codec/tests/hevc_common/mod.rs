//! Helpers shared by the hevc tests: real KV from codelm-kv-a, quantized per channel.

#![allow(dead_code, unreachable_pub)]

use kvfetcher_codec::{CodePlane, HevcDecoder, HevcEncoder, PlaneShape};
use kvfetcher_kv::{KvCache, KvFile};
use kvfetcher_testkit::{skip, Missing};

/// The codelm-kv-a cache.
pub fn codelm() -> KvCache {
    let path = kvfetcher_testkit::data_file("codelm-kv-a.safetensors");
    KvFile::read(&path).expect("codelm-kv-a reads").cache
}

/// An x265 encoder for `layout`, or `None` (with a printed reason) when x265 is missing.
pub fn encoder(layout: &str) -> Option<HevcEncoder> {
    match HevcEncoder::new(Some(layout)) {
        Ok(e) => Some(e),
        Err(e) => {
            skip(Missing::Tool, &e);
            None
        }
    }
}

/// A libde265 decoder, or `None` (with a printed reason) when libde265 is missing.
pub fn decoder() -> Option<HevcDecoder> {
    match HevcDecoder::new() {
        Ok(d) => Some(d),
        Err(e) => {
            skip(Missing::Tool, &e);
            None
        }
    }
}

/// The K and V of `layers` over `tokens`, each a `tokens x channels` f32 matrix.
fn tensors(
    cache: &KvCache,
    layers: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
) -> Vec<Vec<f32>> {
    let cache = cache
        .slice_tokens(tokens.start, tokens.end)
        .expect("token range");
    cache.layers()[layers]
        .iter()
        .flat_map(|l| [l.key.to_f32(), l.value.to_f32()])
        .collect()
}

/// Codes of `layers` x {K, V} over `tokens`, quantized per channel to `bits` with the min and
/// max over those tokens.
pub fn quantized(
    cache: &KvCache,
    layers: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
    bits: u8,
) -> CodePlane {
    let cols = cache.kv_heads() * cache.head_dim();
    let rows = tokens.len();
    let ts = tensors(cache, layers, tokens);
    let levels = ((1u32 << bits) - 1) as f32;
    let mut codes = Vec::with_capacity(ts.len() * rows * cols);
    for t in &ts {
        let mut lo = vec![f32::INFINITY; cols];
        let mut hi = vec![f32::NEG_INFINITY; cols];
        for r in 0..rows {
            for c in 0..cols {
                lo[c] = lo[c].min(t[r * cols + c]);
                hi[c] = hi[c].max(t[r * cols + c]);
            }
        }
        for r in 0..rows {
            for c in 0..cols {
                let span = (hi[c] - lo[c]).max(f32::MIN_POSITIVE);
                codes.push(((t[r * cols + c] - lo[c]) / span * levels).round() as u16);
            }
        }
    }
    CodePlane {
        shape: PlaneShape {
            bits,
            tensors: ts.len(),
            rows,
            cols,
        },
        codes,
    }
}

/// The exact mode's shape: each fp16 tensor split into its high and low byte planes (8 bits).
pub fn byte_planes(
    cache: &KvCache,
    layers: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
) -> CodePlane {
    let cols = cache.kv_heads() * cache.head_dim();
    let sliced = cache
        .slice_tokens(tokens.start, tokens.end)
        .expect("token range");
    let mut codes = Vec::new();
    let mut tensors = 0;
    for l in &sliced.layers()[layers] {
        for t in [&l.key, &l.value] {
            let data = t.data();
            for byte in [1, 0] {
                codes.extend(data.chunks_exact(2).map(|b| u16::from(b[byte])));
                tensors += 1;
            }
        }
    }
    CodePlane {
        shape: PlaneShape {
            bits: 8,
            tensors,
            rows: tokens.len(),
            cols,
        },
        codes,
    }
}
