//! Malformed objects: every truncation, every single-bit flip, wrong versions, oversized counts
//! and inconsistent offsets give a typed error, never a panic and never wrong values.

mod common;

use kvfetcher_codec::{
    decode_chunk, decode_section, encode_cache, restore_section, ChunkHeader, ChunkView,
    CodecError, CodecRegistry, EncodeConfig, FormatError, Grouping, ModelFingerprint, QuantConfig,
    VariantKind, FIXED_HEADER_LEN,
};
use kvfetcher_kv::DType;

/// Small real objects (stories260K KV, 8 tokens, 5 layers in 3 sections): packed 4-bit,
/// zstd 8-bit with V per token, packed exact.
fn small_objects() -> Vec<Vec<u8>> {
    let (cache, ids) = common::stories(8, DType::F16);
    let reg = CodecRegistry::software();
    let configs = [
        (QuantConfig::bits(4), VariantKind::Packed),
        (
            QuantConfig::Bits {
                default_bits: 8,
                per_layer: vec![],
                key_grouping: Grouping::PerChannel,
                value_grouping: Grouping::PerToken,
            },
            VariantKind::Zstd,
        ),
        (QuantConfig::Exact, VariantKind::Packed),
    ];
    configs
        .into_iter()
        .map(|(quant, variant)| {
            let cfg = EncodeConfig {
                quant,
                variant,
                chunk_tokens: 8,
                layers_per_section: 2,
                hevc_layout: None,
                hevc_stream_frames: None,
            };
            let mut chunks =
                encode_cache(&cache, &ModelFingerprint::of_bytes(b"m"), &ids, &cfg, &reg).unwrap();
            assert_eq!(chunks.len(), 1);
            chunks.remove(0).1
        })
        .collect()
}

/// Rewrites the header crc after an edit, so the edit itself is what gets checked.
fn reseal(bytes: &mut [u8]) {
    let hl = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let crc = crc32c::crc32c(&bytes[..hl - 4]);
    bytes[hl - 4..hl].copy_from_slice(&crc.to_le_bytes());
}

fn header_len(bytes: &[u8]) -> usize {
    ChunkHeader::parse_prefix(bytes).unwrap().1
}

#[test]
fn every_truncation_is_an_error_and_prefixes_stream() {
    let objects = small_objects();
    let reg = CodecRegistry::software();
    for bytes in &objects {
        let hl = header_len(bytes);
        for n in 0..bytes.len() {
            let prefix = &bytes[..n];
            match ChunkHeader::parse_prefix(prefix) {
                Err(FormatError::Truncated { needed, got }) => {
                    assert!(
                        n < hl && needed > n && needed <= hl && got == n,
                        "prefix {n}: needed {needed}"
                    );
                }
                Ok((_, len)) => assert!(n >= hl && len == hl),
                Err(e) => panic!("prefix {n}: {e}"),
            }
            assert!(
                matches!(ChunkView::parse(prefix), Err(FormatError::Truncated { .. })),
                "view of prefix {n}"
            );
            assert!(decode_chunk(prefix, &reg).is_err(), "decode of prefix {n}");
        }
        // A streaming reader: ask, read what is needed, ask again.
        let mut have = 0;
        let header = loop {
            match ChunkHeader::parse_prefix(&bytes[..have]) {
                Ok((h, _)) => break h,
                Err(FormatError::Truncated { needed, .. }) => have = needed,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(have, hl);
        assert_eq!(header.object_len(), bytes.len() as u64);
    }
}

#[test]
fn every_bit_flip_is_detected() {
    let objects = small_objects();
    let reg = CodecRegistry::software();
    for bytes in &objects {
        let hl = header_len(bytes);
        let mut copy = bytes.clone();
        for i in 0..bytes.len() {
            copy[i] ^= 1 << (i % 8);
            match decode_chunk(&copy, &reg) {
                Ok(_) => panic!("flip in byte {i} went unnoticed"),
                Err(FormatError::Checksum { what }) if i >= hl => {
                    assert!(what.starts_with("section"))
                }
                Err(e) if i >= hl => {
                    panic!("flip in section byte {i} gave {e}, not a checksum error")
                }
                Err(_) => {}
            }
            copy[i] = bytes[i];
        }
    }
}

#[test]
fn wrong_version_magic_and_trailing_bytes() {
    let objects = small_objects();
    let mut b = objects[0].clone();
    b[4] = 3;
    assert!(matches!(
        ChunkView::parse(&b),
        Err(FormatError::UnsupportedVersion(3))
    ));
    b[4] = 0;
    assert!(matches!(
        ChunkView::parse(&b),
        Err(FormatError::UnsupportedVersion(0))
    ));
    // A version-1 chunk relabelled as version 2 (crc fixed up) still parses: version 2 only
    // adds the transform flag and block.
    let mut b = objects[0].clone();
    b[4] = 2;
    let hl = u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
    let crc = crc32c::crc32c(&b[..hl - 4]);
    b[hl - 4..hl].copy_from_slice(&crc.to_le_bytes());
    assert!(ChunkView::parse(&b).is_ok());
    let mut b = objects[0].clone();
    b[0] = b'X';
    assert!(matches!(ChunkView::parse(&b), Err(FormatError::BadMagic)));
    assert!(matches!(
        ChunkView::parse(b"KVFX"),
        Err(FormatError::BadMagic)
    ));
    let mut b = objects[0].clone();
    b.push(0);
    assert!(matches!(
        ChunkView::parse(&b),
        Err(FormatError::Inconsistent(_))
    ));
    let mut b = objects[0].clone();
    b[20] ^= 1; // inside the key: only the header crc sees it
    assert!(
        matches!(ChunkView::parse(&b), Err(FormatError::Checksum { what }) if what == "header")
    );
}

/// Sets a little-endian field and reseals the header.
fn edit(bytes: &[u8], at: usize, value: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + value.len()].copy_from_slice(value);
    reseal(&mut b);
    b
}

#[test]
fn oversized_counts_are_refused_before_allocating() {
    let objects = small_objects();
    let o = &objects[0];
    let too_large = |b: &[u8], field: &str| match ChunkView::parse(b) {
        Err(FormatError::TooLarge { what, .. }) => assert_eq!(what, field),
        other => panic!("{field}: {other:?}"),
    };
    too_large(&edit(o, 84, &5000u16.to_le_bytes()), "layers");
    too_large(&edit(o, 86, &60000u16.to_le_bytes()), "kv heads");
    too_large(&edit(o, 88, &60000u16.to_le_bytes()), "head dim");
    too_large(&edit(o, 80, &1_000_000u32.to_le_bytes()), "chunk tokens");
    too_large(&edit(o, 94, &60000u16.to_le_bytes()), "sections");
    let mut b = o.clone();
    b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    too_large(&b, "header length");
    // A section length near u64::MAX (object length to match) must not overflow or allocate.
    let hl = header_len(o) as u64;
    let mut b = edit(
        o,
        FIXED_HEADER_LEN + 2 * 32 + 16,
        &(u64::MAX - hl).to_le_bytes(),
    );
    b[96..104].copy_from_slice(&u64::MAX.to_le_bytes());
    reseal(&mut b);
    assert!(ChunkView::parse(&b).is_err());
}

#[test]
fn inconsistent_fields_are_refused() {
    let objects = small_objects();
    let o = &objects[0];
    let inconsistent = |b: &[u8], what: &str| {
        assert!(
            matches!(ChunkView::parse(b), Err(FormatError::Inconsistent(_))),
            "{what}: {:?}",
            ChunkView::parse(b)
        );
    };
    let entry = |i: usize, field: usize| FIXED_HEADER_LEN + 32 * i + field;
    let off1 = u64::from_le_bytes(o[entry(1, 8)..entry(1, 16)].try_into().unwrap());
    inconsistent(
        &edit(o, entry(1, 8), &(off1 + 1).to_le_bytes()),
        "offset moved",
    );
    let len0 = u64::from_le_bytes(o[entry(0, 16)..entry(0, 24)].try_into().unwrap());
    inconsistent(
        &edit(o, entry(0, 16), &(len0 - 1).to_le_bytes()),
        "length changed",
    );
    inconsistent(&edit(o, entry(0, 2), &1u16.to_le_bytes()), "layer ranges");
    inconsistent(&edit(o, entry(0, 4), &[13]), "bits");
    inconsistent(&edit(o, entry(0, 5), &[1]), "reserved byte");
    inconsistent(&edit(o, 90, &[9]), "dtype code");
    inconsistent(&edit(o, 91, &[0]), "variant code");
    inconsistent(&edit(o, 92, &[7]), "grouping code");
    inconsistent(&edit(o, 6, &[2]), "flags");
    // One more token: per-token parameters no longer fit the header; with per-channel ones
    // the header is coherent but the payload does not decode to the new shape.
    inconsistent(
        &edit(&objects[1], 80, &9u32.to_le_bytes()),
        "token count vs parameters",
    );
    let reg = CodecRegistry::software();
    assert!(matches!(
        decode_chunk(&edit(o, 80, &9u32.to_le_bytes()), &reg),
        Err(FormatError::Codec(_))
    ));
    inconsistent(
        &edit(o, 96, &(o.len() as u64 + 1).to_le_bytes()),
        "object length",
    );
    // The first quantization scale of the first section made NaN.
    let first_scale = entry(3, 0) + 4;
    inconsistent(&edit(o, first_scale, &f32::NAN.to_le_bytes()), "nan scale");
    // Growing the last section (object length to match) leaves the object short.
    let mut b = edit(
        o,
        entry(2, 16),
        &(u64::from_le_bytes(o[entry(2, 16)..entry(2, 24)].try_into().unwrap()) + 1).to_le_bytes(),
    );
    b[96..104].copy_from_slice(&(o.len() as u64 + 1).to_le_bytes());
    reseal(&mut b);
    assert!(matches!(
        ChunkView::parse(&b),
        Err(FormatError::Truncated { .. })
    ));
    b.push(0);
    let view = ChunkView::parse(&b).unwrap();
    assert!(matches!(view.verify(), Err(FormatError::Checksum { .. })));
}

#[test]
fn sections_check_bytes_shapes_and_decoders() {
    let objects = small_objects();
    let reg = CodecRegistry::software();
    let view = ChunkView::parse(&objects[0]).unwrap();
    let h = view.header();
    let s0 = view.section_bytes(0);
    assert!(matches!(
        decode_section(h, 0, view.section_bytes(1), &reg),
        Err(FormatError::Inconsistent(_) | FormatError::Checksum { .. })
    ));
    assert!(decode_section(h, 9, s0, &reg).is_err());
    let plane = decode_section(h, 0, s0, &reg).unwrap();
    assert!(
        restore_section(h, 2, &plane, &reg).is_err(),
        "section 2 has one layer, not two"
    );
    assert_eq!(restore_section(h, 0, &plane, &reg).unwrap().len(), 2);
    let empty = CodecRegistry::empty();
    assert!(matches!(
        decode_chunk(&objects[0], &empty),
        Err(FormatError::Codec(CodecError::Unavailable {
            variant: "packed",
            role: "decoder",
            ..
        }))
    ));
    let (cache, ids) = common::stories(8, DType::F16);
    let m = ModelFingerprint::of_bytes(b"m");
    assert!(matches!(
        encode_cache(&cache, &m, &ids[..7], &EncodeConfig::default(), &reg),
        Err(FormatError::InvalidInput(_))
    ));
    let zero = EncodeConfig {
        chunk_tokens: 0,
        ..EncodeConfig::default()
    };
    assert!(matches!(
        encode_cache(&cache, &m, &ids, &zero, &reg),
        Err(FormatError::InvalidInput(_))
    ));
    let bad_bits = EncodeConfig {
        quant: QuantConfig::bits(13),
        ..EncodeConfig::default()
    };
    assert!(matches!(
        encode_cache(&cache, &m, &ids, &bad_bits, &reg),
        Err(FormatError::InvalidInput(_))
    ));
}
