//! The rANS value streams (docs/FORMAT.md, "rANS value streams"): round trips, compression
//! against the empirical entropy, a pinned tiny stream for the CUDA decoder, an independent
//! spec-literal reference encoder/decoder, and every error path.

#![allow(missing_docs)]

use kvfetcher_codec::rans::{
    decode_values, encode_tensor, encode_values, entropy_bits, histogram, FreqTable, StreamLayout,
    TableForm, DEFAULT_BLOCK_VALUES, RANS_L,
};
use kvfetcher_codec::RansError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A discretized Laplace sample with scale `b`, clamped to the codable range.
fn laplace(rng: &mut StdRng, b: f64) -> i32 {
    let u: f64 = rng.gen_range(-0.5..0.5);
    let x = -b * u.signum() * (1.0 - 2.0 * u.abs()).max(1e-300).ln();
    x.round().clamp(-32768.0, 32767.0) as i32
}

/// A discretized Gaussian sample with standard deviation `sigma`.
fn gaussian(rng: &mut StdRng, sigma: f64) -> i32 {
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen_range(0.0..1.0);
    let x = sigma * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    x.round().clamp(-32768.0, 32767.0) as i32
}

/// `n` values where column c (of `column_ctx`) has context `column_ctx[c]` and context k has
/// Laplace scale `scales[k]`.
fn tensor(rng: &mut StdRng, n: usize, column_ctx: &[u8], scales: &[f64]) -> Vec<i32> {
    (0..n)
        .map(|i| laplace(rng, scales[usize::from(column_ctx[i % column_ctx.len()])]))
        .collect()
}

fn round_trip(values: &[i32], column_ctx: &[u8], n_ctx: usize, block_values: usize) -> Vec<u8> {
    let stream = encode_tensor(values, column_ctx, n_ctx, block_values).expect("encodes");
    let mut out = vec![0i32; values.len()];
    decode_values(&stream, column_ctx, &mut out).expect("decodes");
    assert_eq!(out, values, "n {} block {block_values}", values.len());
    assert_eq!(
        reference_decode(&stream, column_ctx, values.len()).as_deref(),
        Some(values)
    );
    stream
}

// ---- an independent, spec-literal implementation (division form, no shortcuts) ----

fn zz(q: i32) -> u32 {
    ((q << 1) ^ (q >> 31)) as u32
}

fn unzz(z: u32) -> i32 {
    ((z >> 1) as i32) ^ -((z & 1) as i32)
}

/// Encodes straight from the spec's text, for comparing bytes with the fast encoder.
fn reference_encode(
    values: &[i32],
    column_ctx: &[u8],
    freqs: &[[u16; 256]],
    block_values: usize,
) -> Vec<u8> {
    let cums: Vec<[u32; 256]> = freqs
        .iter()
        .map(|f| {
            let mut c = [0u32; 256];
            for s in 1..256 {
                c[s] = c[s - 1] + u32::from(f[s - 1]);
            }
            c
        })
        .collect();
    let mut out = vec![freqs.len() as u8];
    for f in freqs {
        let top = (0..256).rev().find(|&s| f[s] > 0).unwrap();
        out.push(top as u8);
        for &v in &f[..=top] {
            let mut v = u32::from(v);
            loop {
                let b = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    out.push(b);
                    break;
                }
                out.push(b | 0x80);
            }
        }
    }
    let n_blocks = values.len().div_ceil(block_values);
    out.extend_from_slice(&(block_values as u32).to_le_bytes());
    out.extend_from_slice(&(n_blocks as u32).to_le_bytes());
    let mut all_words = Vec::new();
    for b in 0..n_blocks {
        let start = b * block_values;
        let n = block_values.min(values.len() - start);
        let mut x = [1u32 << 16; 32];
        let mut emitted: Vec<u16> = Vec::new();
        let steps = n.div_ceil(32);
        for k in (0..steps).rev() {
            let lanes: Vec<usize> = (0..32).filter(|l| 32 * k + l < n).collect();
            for &l in lanes.iter().rev() {
                let z = zz(values[start + 32 * k + l]);
                if z >= 255 {
                    emitted.push(z as u16);
                }
            }
            for &l in lanes.iter().rev() {
                let i = start + 32 * k + l;
                let ctx = usize::from(column_ctx[i % column_ctx.len()]);
                let s = zz(values[i]).min(255) as usize;
                let f = u32::from(freqs[ctx][s]);
                let x_max = ((1u64 << 16 >> 12) << 16) * u64::from(f);
                let mut v = x[l];
                while u64::from(v) >= x_max {
                    emitted.push((v & 0xffff) as u16);
                    v >>= 16;
                }
                x[l] = ((v / f) << 12) + (v % f) + cums[ctx][s];
            }
        }
        emitted.reverse();
        for s in x {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(&(emitted.len() as u32).to_le_bytes());
        all_words.extend(emitted);
    }
    for w in all_words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

/// Decodes straight from the spec's text (using the parsed layout); None on any failure.
fn reference_decode(stream: &[u8], column_ctx: &[u8], n_values: usize) -> Option<Vec<i32>> {
    let layout = StreamLayout::parse(stream, n_values).ok()?;
    let mut out = vec![0i32; n_values];
    for (b, info) in layout.blocks.iter().enumerate() {
        let words: Vec<u16> = layout
            .block_words(stream, b)
            .chunks_exact(2)
            .map(|w| u16::from_le_bytes([w[0], w[1]]))
            .collect();
        let mut next = words.into_iter();
        let start = b * layout.block_values;
        let n = layout.block_values.min(n_values - start);
        let mut x = info.states;
        for k in 0..n.div_ceil(32) {
            let lanes: Vec<usize> = (0..32).filter(|l| 32 * k + l < n).collect();
            let mut syms = [0usize; 32];
            for &l in &lanes {
                let i = start + 32 * k + l;
                let t = &layout.tables[usize::from(column_ctx[i % column_ctx.len()])];
                let slot = x[l] & 4095;
                let s = (0..256)
                    .find(|&s| {
                        let c = u32::from(t.cum()[s]);
                        c <= slot && slot < c + u32::from(t.freqs()[s])
                    })
                    .unwrap();
                syms[l] = s;
                x[l] = u32::from(t.freqs()[s]) * (x[l] >> 12) + slot - u32::from(t.cum()[s]);
            }
            for &l in &lanes {
                if x[l] < 1 << 16 {
                    x[l] = (x[l] << 16) | u32::from(next.next()?);
                }
            }
            for &l in &lanes {
                let z = if syms[l] == 255 {
                    u32::from(next.next()?)
                } else {
                    syms[l] as u32
                };
                out[start + 32 * k + l] = unzz(z);
            }
        }
        if x.iter().any(|&s| s != 1 << 16) || next.next().is_some() {
            return None;
        }
    }
    Some(out)
}

// ---- round trips ----

#[test]
fn round_trips_sizes_blocks_and_contexts() {
    let mut rng = StdRng::seed_from_u64(1);
    let ctx_sets: [&[u8]; 4] = [&[0], &[0, 1], &[0, 1, 2, 1, 0, 3, 2], &[3, 2, 1, 0, 0, 1]];
    for block_values in [32, 64, 96, 1024, DEFAULT_BLOCK_VALUES] {
        for n in [
            0,
            1,
            31,
            32,
            33,
            63,
            64,
            65,
            1000,
            block_values - 1,
            block_values,
            block_values + 1,
            2 * block_values + 31,
        ] {
            for column_ctx in ctx_sets {
                let n_ctx = usize::from(*column_ctx.iter().max().unwrap()) + 1;
                let scales = [0.3, 2.0, 9.0, 400.0];
                let values = tensor(&mut rng, n, column_ctx, &scales);
                round_trip(&values, column_ctx, n_ctx, block_values);
            }
        }
    }
}

#[test]
fn round_trips_distributions() {
    let mut rng = StdRng::seed_from_u64(2);
    let column_ctx: Vec<u8> = (0..128).map(|c| (c % 4) as u8).collect();
    for scale in [0.0, 0.1, 1.0, 4.0, 30.0, 127.0, 1000.0, 20000.0] {
        let n = 50_000;
        let lap = tensor(&mut rng, n, &column_ctx, &[scale; 4]);
        round_trip(&lap, &column_ctx, 4, 4096);
        let gau: Vec<i32> = (0..n).map(|_| gaussian(&mut rng, scale)).collect();
        round_trip(&gau, &column_ctx, 4, DEFAULT_BLOCK_VALUES);
    }
    // Uniform over the whole range: almost everything escapes.
    let uni: Vec<i32> = (0..40_000).map(|_| rng.gen_range(-32768..=32767)).collect();
    round_trip(&uni, &column_ctx, 4, 1024);
}

#[test]
fn extremes_and_escape_boundary() {
    // z = 254 (127) is the last direct symbol; z = 255 (-128) the first escape.
    let special = [
        -32768, 32767, -32767, 32766, 127, -128, 128, -127, 0, -1, 1, 255, -255, 256,
    ];
    let values: Vec<i32> = (0..5000).map(|i| special[(i * 7 + i / 13) % 14]).collect();
    for block_values in [32, 64, 4096] {
        round_trip(&values, &[0, 1, 2], 3, block_values);
        round_trip(&values, &[0], 1, block_values);
    }
    // Every zigzag value once.
    let all: Vec<i32> = (-32768..=32767).collect();
    round_trip(&all, &[0, 1], 2, 1024);
}

#[test]
fn one_symbol_tables_cost_zero_bits() {
    let n = 100_000;
    let values = vec![-3; n];
    let stream = round_trip(&values, &[0, 1], 2, DEFAULT_BLOCK_VALUES);
    let layout = StreamLayout::parse(&stream, n).unwrap();
    assert!(layout.blocks.iter().all(|b| b.n_words == 0));
    assert!(layout.blocks.iter().all(|b| b.states == [RANS_L; 32]));
    // Tables: n_tables, then per table top = 5 and 5 zeros and 4096 as LEB128 (8 bytes).
    assert_eq!(stream.len(), 1 + 2 * 8 + 8 + 4 * (32 * 4 + 4));
}

#[test]
fn matches_the_reference_encoder() {
    let mut rng = StdRng::seed_from_u64(3);
    for trial in 0..40 {
        let n = rng.gen_range(0..3000);
        let ctx_len = rng.gen_range(1..9);
        let n_ctx = rng.gen_range(1..5);
        let column_ctx: Vec<u8> = (0..ctx_len)
            .map(|_| rng.gen_range(0..n_ctx) as u8)
            .collect();
        let scale = [0.5, 3.0, 60.0, 3000.0][trial % 4];
        let values: Vec<i32> = (0..n).map(|_| laplace(&mut rng, scale)).collect();
        let tables: Vec<FreqTable> = histogram(&values, &column_ctx, n_ctx)
            .unwrap()
            .iter()
            .map(FreqTable::from_counts)
            .collect();
        let freqs: Vec<[u16; 256]> = tables.iter().map(|t| *t.freqs()).collect();
        let block_values = [32, 64, 256, 1024][trial % 4];
        let fast = encode_values(&values, &column_ctx, &tables, block_values).unwrap();
        assert_eq!(
            fast,
            reference_encode(&values, &column_ctx, &freqs, block_values),
            "trial {trial}"
        );
    }
}

// ---- compression ----

#[test]
fn size_within_three_percent_of_entropy() {
    let mut rng = StdRng::seed_from_u64(4);
    let column_ctx: Vec<u8> = (0..128).map(|c| (c % 4) as u8).collect();
    // Laplace scales giving roughly 2, 3 and 4 bits per value, and a per-context mix.
    for scales in [[0.9; 4], [2.0; 4], [3.8; 4], [0.8, 1.5, 3.0, 5.0]] {
        let n = 1 << 20;
        let values = tensor(&mut rng, n, &column_ctx, &scales);
        let stream = encode_tensor(&values, &column_ctx, 4, DEFAULT_BLOCK_VALUES).unwrap();
        let h = entropy_bits(&values, &column_ctx, 4).unwrap();
        let bits = 8.0 * stream.len() as f64;
        let overhead = bits / h - 1.0;
        eprintln!(
            "scales {scales:?}: entropy {:.3} bits/value, stream {:.3} bits/value, +{:.2}%",
            h / n as f64,
            bits / n as f64,
            100.0 * overhead
        );
        assert!((2.0..=4.5).contains(&(h / n as f64)), "{scales:?}");
        assert!(overhead < 0.03, "overhead {overhead}");
        let mut out = vec![0; n];
        decode_values(&stream, &column_ctx, &mut out).unwrap();
        assert_eq!(out, values);
    }
}

// ---- the pinned tiny stream (for the CUDA decoder's tests) ----

/// 72 values, 2 contexts (even columns context 0, odd columns context 1), block size 64: two
/// blocks, the first with two steps, the second with 8 values (lanes 8..31 unused, their
/// states stay 2^16). Includes escapes (-128 -> z 255, 300 -> z 600, -32768 -> z 65535,
/// 32767 -> z 65534), the last direct symbol (127 -> z 254) and rare symbols (frequency 16,
/// 8 bits each) twice in one lane, so lanes 2, 3, 6 and 10 renormalize. Explicit tables:
///   table 0: freqs[0] = 2048, [1] = 1024, [2] = 512, [3] = 480, [254] = 16, [255] = 16
///   table 1: freqs[0] = 2048, [1] = 1024, [2] = 1008, [3] = 16
const TINY_VALUES: [i32; 72] = [
    0, 0, 127, -2, -1, 1, 300, 0, 1, -1, -32768, 0, 0, 1, -1, 0, 1, -1, -2, 0, 0, 1, -1, 0, 127, 0,
    1, -1, 0, 0, -128, 1, // block 0, step 0
    1, 0, -128, -2, 0, -1, 127, 1, -1, 0, 32767, 0, 0, -1, 1, 0, -1, 0, 0, 1, -2, 0, 1, -1, 0, 0,
    -1, 1, 0, 0, 1, 0, // block 0, step 1
    0, -1, 127, 1, -128, 0, 1, -2, // block 1
];

fn tiny_tables() -> Vec<FreqTable> {
    let mut f0 = [0u16; 256];
    f0[0] = 2048;
    f0[1] = 1024;
    f0[2] = 512;
    f0[3] = 480;
    f0[254] = 16;
    f0[255] = 16;
    let mut f1 = [0u16; 256];
    f1[0] = 2048;
    f1[1] = 1024;
    f1[2] = 1008;
    f1[3] = 16;
    vec![
        FreqTable::from_freqs(f0).unwrap(),
        FreqTable::from_freqs(f1).unwrap(),
    ]
}

/// The exact bytes of the tiny stream (hex), pinned. A decoder (the CUDA kernel included)
/// must decode it to TINY_VALUES with column_ctx = [0, 1] and n_values = 72.
const TINY_HEX: &str = concat!(
    // n_tables = 2
    "02",
    // table 0: top = 255, then 256 LEB128 freqs
    "ff801080088004e00300000000000000000000000000000000000000000000000000000000000000",
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "000000000000000000000000000000000000001010",
    // table 1: top = 3, then 4 LEB128 freqs
    "0380108008f00710",
    // block_values = 64, n_blocks = 2
    "4000000002000000",
    // block 0: 32 initial states (u32), n_words = 9
    "0014100000000400e00f0100f00f010000080800606c1000f00f010010340800004c200000080800",
    "f00f01000000040000000400606c10000038200000000400004c200000080800201e110010340800",
    "00171100202c08000038200000100800e00f000200000400004c2000107810000000040000000400",
    "f00f0c08202c080009000000",
    // block 1: 32 initial states (u32), n_words = 1
    "0000020000080400e00f0001101c0400f00f000100000200000c0800f00f00010000010000000100",
    "00000100000001000000010000000100000001000000010000000100000001000000010000000100",
    "00000100000001000000010000000100000001000000010000000100000001000000010000000100",
    "000001000000010001000000",
    // block 0: 9 words (u16)
    "f00ff00fe00ff00f5802ffffff00ff00feff",
    // block 1: 1 words (u16)
    "ff00",
);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn tiny_stream_is_pinned() {
    let tables = tiny_tables();
    let stream = encode_values(&TINY_VALUES, &[0, 1], &tables, 64).unwrap();
    let freqs: Vec<[u16; 256]> = tables.iter().map(|t| *t.freqs()).collect();
    assert_eq!(stream, reference_encode(&TINY_VALUES, &[0, 1], &freqs, 64));
    assert_eq!(
        stream,
        encode_values(&TINY_VALUES, &[0, 1], &tables, 64).unwrap()
    );
    eprintln!("tiny stream ({} bytes): {}", stream.len(), hex(&stream));
    assert_eq!(hex(&stream), TINY_HEX);
    let mut out = [0i32; 72];
    decode_values(&stream, &[0, 1], &mut out).unwrap();
    assert_eq!(out, TINY_VALUES);
}

// ---- errors ----

/// A stream of the first layout (listed tables), with many escapes in context 1.
fn small_stream() -> (Vec<i32>, Vec<u8>) {
    let mut rng = StdRng::seed_from_u64(5);
    let values = tensor(&mut rng, 150, &[0, 1], &[1.0, 200.0]);
    let tables: Vec<FreqTable> = histogram(&values, &[0, 1], 2)
        .unwrap()
        .iter()
        .map(FreqTable::from_counts)
        .collect();
    let stream = encode_values(&values, &[0, 1], &tables, 64).unwrap();
    (values, stream)
}

#[test]
fn every_truncation_fails() {
    let (values, stream) = small_stream();
    let mut out = vec![0; values.len()];
    for len in 0..stream.len() {
        assert!(
            decode_values(&stream[..len], &[0, 1], &mut out).is_err(),
            "len {len}"
        );
    }
    // And extension.
    let mut longer = stream.clone();
    longer.push(0);
    assert_eq!(
        decode_values(&longer, &[0, 1], &mut out),
        Err(RansError::TrailingBytes(1))
    );
}

#[test]
fn flipped_bytes_never_panic() {
    let (values, stream) = small_stream();
    let mut rng = StdRng::seed_from_u64(6);
    let mut out = vec![0; values.len()];
    let mut ok = 0;
    for at in 0..stream.len() {
        for _ in 0..8 {
            let mut bad = stream.clone();
            bad[at] ^= 1 << rng.gen_range(0..8);
            if decode_values(&bad, &[0, 1], &mut out).is_ok() {
                // A stream that decodes is canonical: it is what the encoder makes of the values.
                let layout = StreamLayout::parse(&bad, out.len()).unwrap();
                let again = encode_values(&out, &[0, 1], &layout.tables, layout.block_values);
                assert_eq!(again.unwrap(), bad);
                ok += 1;
            }
        }
        let mut bad = stream.clone();
        bad[at] = rng.gen();
        let _ = decode_values(&bad, &[0, 1], &mut out);
    }
    // Integrity checks catch almost every flip.
    assert!(ok < stream.len(), "{ok} flips decoded");
    // Other value counts and contexts.
    for n in [0, 1, 64, 128, 149, 151, 10_000] {
        let mut out = vec![0; n];
        assert!(decode_values(&stream, &[0, 1], &mut out).is_err(), "n {n}");
    }
}

#[test]
fn header_errors_are_typed() {
    let (values, stream) = small_stream();
    let mut out = vec![0; values.len()];
    let layout = StreamLayout::parse(&stream, values.len()).unwrap();
    let hdr = layout.words_offset - layout.blocks.len() * (32 * 4 + 4) - 8;
    let decode = |s: &[u8], out: &mut [i32]| decode_values(s, &[0, 1], out);

    // Table count.
    let mut bad = stream.clone();
    bad[0] = 0;
    assert_eq!(decode(&bad, &mut out), Err(RansError::BadTableCount(0)));
    bad[0] = 65;
    assert_eq!(decode(&bad, &mut out), Err(RansError::BadTableCount(65)));
    // Table sum: bump table 0's first frequency.
    let mut bad = stream.clone();
    bad[2] ^= 1;
    assert!(matches!(
        decode(&bad, &mut out),
        Err(RansError::BadTable { table: 0, .. })
    ));
    // Block size.
    let mut bad = stream.clone();
    bad[hdr..hdr + 4].copy_from_slice(&33u32.to_le_bytes());
    assert_eq!(decode(&bad, &mut out), Err(RansError::BadBlockValues(33)));
    bad[hdr..hdr + 4].copy_from_slice(&(2u32 << 20).to_le_bytes());
    assert!(matches!(
        decode(&bad, &mut out),
        Err(RansError::BadBlockValues(_))
    ));
    // Block count.
    let mut bad = stream.clone();
    bad[hdr + 4..hdr + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&bad, &mut out),
        Err(RansError::BadBlockCount { expected: 3, .. })
    ));
    // A state below 2^16.
    let mut bad = stream.clone();
    bad[hdr + 8 + 4 * 5..hdr + 8 + 4 * 6].copy_from_slice(&0xffffu32.to_le_bytes());
    assert!(matches!(
        decode(&bad, &mut out),
        Err(RansError::StateOutOfRange {
            block: 0,
            lane: 5,
            ..
        })
    ));
    // A word count beyond two per value.
    let mut bad = stream.clone();
    bad[hdr + 8 + 128..hdr + 8 + 132].copy_from_slice(&129u32.to_le_bytes());
    assert!(matches!(
        decode(&bad, &mut out),
        Err(RansError::BadWordCount { block: 0, .. })
    ));
    // A wrong but in-range state or word: the integrity check.
    let mut bad = stream.clone();
    bad[hdr + 8] ^= 0x10;
    assert!(matches!(
        decode(&bad, &mut out),
        Err(RansError::Corrupt { block: 0, .. })
    ));
    // Contexts.
    assert!(matches!(
        decode_values(&stream, &[0, 2], &mut out),
        Err(RansError::ContextOutOfRange { ctx: 2, .. })
    ));
    assert!(matches!(
        decode_values(&stream, &[], &mut out),
        Err(RansError::ContextOutOfRange { .. })
    ));
}

#[test]
fn encoder_errors_are_typed() {
    let t = vec![FreqTable::from_counts(&[1; 256])];
    assert_eq!(
        encode_values(&[0, 32768], &[0], &t, 32),
        Err(RansError::ValueOutOfRange {
            index: 1,
            value: 32768
        })
    );
    assert!(matches!(
        encode_values(&[-32769], &[0], &t, 32),
        Err(RansError::ValueOutOfRange { index: 0, .. })
    ));
    assert!(matches!(
        encode_values(&[0], &[1], &t, 32),
        Err(RansError::ContextOutOfRange { ctx: 1, .. })
    ));
    for bv in [0, 31, 33, 1 << 21] {
        assert!(matches!(
            encode_values(&[0], &[0], &t, bv),
            Err(RansError::InvalidInput(_))
        ));
    }
    assert!(matches!(
        encode_values(&[0], &[0], &[], 32),
        Err(RansError::InvalidInput(_))
    ));
    assert!(matches!(
        encode_tensor(&[0], &[0], 65, 32),
        Err(RansError::InvalidInput(_))
    ));
    let only_zero = vec![FreqTable::from_counts(
        &histogram(&[0], &[0], 1).unwrap()[0],
    )];
    assert_eq!(
        encode_values(&[0, 0, 5], &[0], &only_zero, 32),
        Err(RansError::SymbolNotInTable {
            index: 2,
            ctx: 0,
            symbol: 10
        })
    );
    // Empty input with an empty context list is fine.
    let s = encode_values(&[], &[], &t, 32).unwrap();
    decode_values(&s, &[], &mut []).unwrap();
}

#[test]
fn table_and_escape_errors() {
    // The smallest valid stream: one table (all on symbol 0), block size 32, no blocks.
    let empty = [1u8, 0, 0x80, 0x20, 32, 0, 0, 0, 0, 0, 0, 0];
    decode_values(&empty, &[], &mut []).unwrap();
    let bad_table = |s: &[u8]| {
        matches!(
            decode_values(s, &[0], &mut []),
            Err(RansError::BadTable { table: 0, .. })
        )
    };
    // Overlong LEB128, a zero top frequency, a frequency above 4096, a short sum.
    assert!(bad_table(&[
        1, 0, 0x80, 0xa0, 0x00, 32, 0, 0, 0, 0, 0, 0, 0
    ]));
    assert!(bad_table(&[
        1, 1, 0x80, 0x20, 0x00, 32, 0, 0, 0, 0, 0, 0, 0
    ]));
    assert!(bad_table(&[1, 0, 0x81, 0x20, 32, 0, 0, 0, 0, 0, 0, 0]));
    assert!(bad_table(&[
        1, 1, 0x80, 0x10, 0x7f, 32, 0, 0, 0, 0, 0, 0, 0
    ]));
    // n_values = 1 needs one block.
    assert!(matches!(
        decode_values(&empty, &[0], &mut [0]),
        Err(RansError::BadBlockCount {
            expected: 1,
            got: 0
        })
    ));

    // An escape word below 255 (the tiny stream's 300 -> z 600, block 0's fifth word).
    let stream = encode_values(&TINY_VALUES, &[0, 1], &tiny_tables(), 64).unwrap();
    let layout = StreamLayout::parse(&stream, 72).unwrap();
    let at = layout.words_offset + 2 * 4;
    assert_eq!(stream[at..at + 2], 600u16.to_le_bytes());
    let mut bad = stream.clone();
    bad[at..at + 2].copy_from_slice(&16u16.to_le_bytes());
    let mut out = [0i32; 72];
    assert_eq!(
        decode_values(&bad, &[0, 1], &mut out),
        Err(RansError::Corrupt {
            block: 0,
            reason: "escaped value below 255"
        })
    );
    // Typed errors convert to the crate's CodecError.
    let e = kvfetcher_codec::CodecError::from(RansError::TrailingBytes(3));
    assert!(e.to_string().contains("rans"), "{e}");
}

#[test]
fn layout_describes_blocks() {
    let stream = encode_values(&TINY_VALUES, &[0, 1], &tiny_tables(), 64).unwrap();
    let layout = StreamLayout::parse(&stream, 72).unwrap();
    assert_eq!(layout.tables, tiny_tables());
    assert_eq!(layout.block_values, 64);
    assert_eq!(layout.blocks.len(), 2);
    assert_eq!(layout.blocks[0].n_words, 9);
    assert_eq!(layout.blocks[1].word_offset, 9);
    assert_eq!(layout.words_offset + 2 * 10, stream.len());
    // Unused lanes of the short block keep 2^16.
    assert!(layout.blocks[1].states[8..].iter().all(|&s| s == RANS_L));
    // The slot -> symbol table agrees with cum/freqs.
    let t = &layout.tables[0];
    let lut = t.slot_symbols();
    for s in [0usize, 1, 2, 3, 254, 255] {
        let c = usize::from(t.cum()[s]);
        let f = usize::from(t.freqs()[s]);
        assert!(lut[c..c + f].iter().all(|&x| usize::from(x) == s));
    }
}

#[test]
fn unused_context_entries_are_not_checked() {
    // Two values with a four-column context list whose unused entries name no table.
    let t = vec![FreqTable::from_counts(&[1; 256])];
    let stream = encode_values(&[3, -4], &[0, 0, 9, 9], &t, 32).unwrap();
    let mut out = [0; 2];
    decode_values(&stream, &[0, 0, 9, 9], &mut out).unwrap();
    assert_eq!(out, [3, -4]);
}

#[test]
fn decode_entries_are_packed_as_documented() {
    for t in tiny_tables() {
        let e = t.decode_entries();
        assert_eq!(e.len(), 4096);
        for (slot, &v) in e.iter().enumerate() {
            let s = (v & 0xff) as usize;
            let f = ((v >> 8) & 0xfff) + 1;
            let bias = v >> 20;
            assert_eq!(f, u32::from(t.freqs()[s]));
            assert_eq!(bias as usize, slot - usize::from(t.cum()[s]));
            assert_eq!(t.slot_symbols()[slot] as usize, s);
        }
    }
}

// ---- table forms ----

/// docs/FORMAT.md's geometric table, written out literally.
fn spec_geometric(top: usize, param: u64) -> [u16; 256] {
    let w: Vec<u64> = (0..=top)
        .scan(1u64 << 32, |w, z| {
            if z % 2 == 1 {
                *w = *w * param / 256;
            }
            Some(*w)
        })
        .collect();
    let total: u64 = w.iter().sum();
    let mut f = [0u16; 256];
    for z in 0..=top {
        f[z] = (1 + w[z] * (4095 - top as u64) / total) as u16;
    }
    let sum: u32 = f.iter().map(|&x| u32::from(x)).sum();
    f[0] += (4096 - sum) as u16;
    f
}

#[test]
fn geometric_tables_follow_the_spec() {
    for top in 0..=255u8 {
        for param in (1..=255u8).step_by(if top % 17 == 0 { 1 } else { 23 }) {
            let t = FreqTable::geometric(top, param);
            assert_eq!(
                *t.freqs(),
                spec_geometric(usize::from(top), u64::from(param))
            );
            assert_eq!(t.form(), TableForm::Geometric(param));
            assert!(t.freqs()[..=usize::from(top)].iter().all(|&f| f >= 1));
            assert!(t.freqs()[usize::from(top) + 1..].iter().all(|&f| f == 0));
        }
    }
}

#[test]
fn fitted_tables_shrink_laplacian_streams() {
    let mut rng = StdRng::seed_from_u64(11);
    let column_ctx: Vec<u8> = (0..64).map(|c| (c % 4) as u8).collect();
    let values = tensor(&mut rng, 64 * 300, &column_ctx, &[0.3, 2.0, 9.0, 40.0]);
    let stream = encode_tensor(&values, &column_ctx, 4, DEFAULT_BLOCK_VALUES).unwrap();
    assert_ne!(stream[0] & 0x80, 0, "a stream with table forms");
    let layout = StreamLayout::parse(&stream, values.len()).unwrap();
    assert!(layout
        .tables
        .iter()
        .all(|t| matches!(t.form(), TableForm::Geometric(_))));
    assert_eq!(
        round_trip(&values, &column_ctx, 4, DEFAULT_BLOCK_VALUES),
        stream
    );
    let listed: Vec<FreqTable> = histogram(&values, &column_ctx, 4)
        .unwrap()
        .iter()
        .map(FreqTable::from_counts)
        .collect();
    let first_layout = encode_values(&values, &column_ctx, &listed, DEFAULT_BLOCK_VALUES).unwrap();
    assert_eq!(first_layout[0], 4, "listed tables keep the first layout");
    assert!(
        stream.len() < first_layout.len(),
        "{} >= {}",
        stream.len(),
        first_layout.len()
    );
}

#[test]
fn fit_keeps_listed_tables_where_they_pay() {
    // Two far-apart peaks: no geometric table comes close.
    let mut counts = [0u64; 256];
    counts[0] = 5000;
    counts[40] = 5000;
    counts[41] = 5000;
    let t = FreqTable::fit(&counts);
    assert_eq!(t.form(), TableForm::Listed);
    assert_eq!(t, FreqTable::from_counts(&counts));
    // An unused context costs two bytes.
    assert!(matches!(
        FreqTable::fit(&[0; 256]).form(),
        TableForm::Geometric(_)
    ));
}

#[test]
fn mixed_forms_round_trip_and_resist_damage() {
    let mut rng = StdRng::seed_from_u64(12);
    let column_ctx = [0u8, 1, 2];
    let mut values = tensor(&mut rng, 3 * 200, &column_ctx, &[1.5, 6.0, 1.0]);
    for v in values.iter_mut().skip(2).step_by(3) {
        *v = if rng.gen_bool(0.5) { 0 } else { 20 }; // context 2: two peaks, a listed table
    }
    let stream = encode_tensor(&values, &column_ctx, 3, 128).unwrap();
    let layout = StreamLayout::parse(&stream, values.len()).unwrap();
    let forms: Vec<TableForm> = layout.tables.iter().map(|t| t.form()).collect();
    assert!(matches!(forms[0], TableForm::Geometric(_)), "{forms:?}");
    assert_eq!(forms[2], TableForm::Listed, "{forms:?}");
    assert_eq!(
        reference_decode(&stream, &column_ctx, values.len()).unwrap(),
        values
    );
    let mut out = vec![0; values.len()];
    for cut in 0..stream.len() {
        assert!(decode_values(&stream[..cut], &column_ctx, &mut out).is_err());
    }
    let mut decoded = 0;
    for at in 0..stream.len() {
        for bit in 0..8 {
            let mut bad = stream.clone();
            bad[at] ^= 1 << bit;
            if decode_values(&bad, &column_ctx, &mut out).is_ok() {
                decoded += 1;
            }
        }
    }
    assert!(decoded < stream.len(), "{decoded} flips decoded");
}

/// The tiny stream with geometric tables, pinned like [`TINY_HEX`].
const TINY_GEOMETRIC_HEX: &str = concat!(
    // 2 tables, with forms
    "82",
    // table 0: top 255, geometric 250; table 1: top 3, geometric 100
    "fffa0364",
    // block_values = 64, n_blocks = 2
    "4000000002000000",
    // block 0: 32 initial states (u32), n_words = 9
    "6a209e0798a70300fa7f1c00f2eea000dcf09d07c6ab1800fd7f1c0097a109001011a91d636b0900",
    "fd7f1c0098a703000bd0f401c6ab1800e120a91d98a703001011a91d636b09001761c80797a10900",
    "4720c8079e6e0900e120a91da3960900fccf557798a703001011a91d8bb818000bd0f40198a70300",
    "fddf01009e6e090009000000",
    // block 1: 32 initial states (u32), n_words = 1
    "1660160012f90400fb5f55054dfc0400fe5f5505aee70100f8205700dfaf0c000000010000000100",
    "00000100000001000000010000000100000001000000010000000100000001000000010000000100",
    "00000100000001000000010000000100000001000000010000000100000001000000010000000100",
    "000001000000010001000000",
    // block 0: 9 words (u16)
    "fe5ffb5ffe5ff8205802ffffff00ff00feff",
    // block 1: 1 words (u16)
    "ff00",
);

#[test]
fn tiny_geometric_stream_is_pinned() {
    let tables = [FreqTable::geometric(255, 250), FreqTable::geometric(3, 100)];
    let stream = encode_values(&TINY_VALUES, &[0, 1], &tables, 64).unwrap();
    eprintln!("tiny geometric stream: {}", hex(&stream));
    assert_eq!(hex(&stream), TINY_GEOMETRIC_HEX);
    let mut out = [0i32; 72];
    decode_values(&stream, &[0, 1], &mut out).unwrap();
    assert_eq!(out, TINY_VALUES);
}

#[test]
fn flagged_forms_need_a_geometric_table() {
    let tail = [32u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
    // One listed table (all 4096 slots on symbol 0), no values: the first layout...
    let first_layout = [&[0x01, 0x00, 0x80, 0x20][..], &tail].concat();
    assert!(decode_values(&first_layout, &[0], &mut []).is_ok());
    // ...and the same table behind the forms flag, which the encoder never writes.
    let flagged = [&[0x81, 0x00, 0x00, 0x80, 0x20][..], &tail].concat();
    assert!(matches!(
        decode_values(&flagged, &[0], &mut []),
        Err(RansError::BadTable { table: 0, .. })
    ));
    // A geometric table behind the flag is fine.
    let geometric = [&[0x81, 0x00, 0x01][..], &tail].concat();
    assert!(decode_values(&geometric, &[0], &mut []).is_ok());
}
