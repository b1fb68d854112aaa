//! Lossy HEVC (x265 at a constant QP on the quantized codes): sections decode to codes close to
//! the encoded ones, with an error that grows with QP and a size that shrinks; QP 0 is the old
//! lossless format byte for byte; objects written before lossy HEVC existed still decode and
//! re-encode identically; malformed lossy settings and parameters are refused.

mod hevc_common;

use hevc_common::{codelm, decoder, encoder, quantized};
use kvfetcher_codec::{
    decode_chunk, encode_cache, ChunkView, CodePlane, CodecError, CodecRegistry, EncodeConfig,
    Grouping, HevcDecoder, HevcParams, ModelFingerprint, PlaneShape, QuantConfig, SectionDecoder,
    SectionEncoder, VariantKind,
};
use kvfetcher_kv::KvFile;

/// RMS and largest absolute difference between two planes' codes.
fn code_error(a: &CodePlane, b: &CodePlane) -> (f64, u16) {
    assert_eq!(a.codes.len(), b.codes.len());
    let (mut sq, mut max) = (0f64, 0u16);
    for (&x, &y) in a.codes.iter().zip(&b.codes) {
        let d = x.abs_diff(y);
        sq += f64::from(d) * f64::from(d);
        max = max.max(d);
    }
    ((sq / a.codes.len() as f64).sqrt(), max)
}

fn bits8(bits: u8) -> QuantConfig {
    QuantConfig::Bits {
        default_bits: bits,
        per_layer: Vec::new(),
        key_grouping: Grouping::PerChannel,
        value_grouping: Grouping::PerChannel,
    }
}

#[test]
fn lossy_sections_decode_close_with_error_growing_and_size_shrinking_with_qp() {
    let cache = codelm();
    let (Some(enc), Some(dec)) = (encoder("frames"), decoder()) else {
        return;
    };
    let plane = quantized(&cache, 0..2, 0..256, 8);
    let lossless = enc.encode(&plane).expect("lossless").payload.len();
    let single = HevcDecoder::with_threads(0).expect("libde265 loaded once already");
    let mut rows = Vec::new();
    for qp in [4u8, 12, 24, 36] {
        let lossy = enc.clone().with_qp(qp).expect("qp in range");
        assert!(lossy.is_lossy());
        let s = lossy.encode(&plane).expect("lossy encode");
        let p = HevcParams::from_bytes(&s.params).expect("params");
        assert_eq!((p.qp, p.crc32c), (qp, 0));
        let back = dec
            .decode(plane.shape, &s.params, &s.payload)
            .expect("lossy decode");
        assert!(back.is_valid(), "qp {qp}: decoded codes out of range");
        // The decoded codes do not depend on how the decoder runs (threads or not).
        let again = single
            .decode(plane.shape, &s.params, &s.payload)
            .expect("decode");
        assert!(again == back, "qp {qp}: decoders disagree");
        let (rms, max) = code_error(&plane, &back);
        println!(
            "qp {qp}: {} bytes (lossless {lossless}), rms {rms:.3}, max {max}",
            s.payload.len()
        );
        rows.push((qp, s.payload.len(), rms, max));
    }
    // QP 4 is a quantizer step of about one code: close to lossless (and about as large:
    // measured 1% larger); from QP 12 on the sections are smaller than lossless ones.
    let (_, _, rms4, max4) = rows[0];
    assert!(rms4 < 1.0 && max4 <= 8, "qp 4: rms {rms4}, max {max4}");
    assert!(
        rows[1].1 < lossless,
        "qp 12: {} >= lossless {lossless}",
        rows[1].1
    );
    for w in rows.windows(2) {
        let ((q0, b0, e0, _), (q1, b1, e1, _)) = (w[0], w[1]);
        assert!(
            b1 < b0,
            "qp {q1} ({b1} bytes) not smaller than qp {q0} ({b0})"
        );
        assert!(
            e1 > e0,
            "qp {q1} (rms {e1}) not worse than qp {q0} (rms {e0})"
        );
    }
    // Even QP 36 keeps codes near their values (a step of ~40 codes, rms well below it;
    // measured 14).
    let rms36 = rows[3].2;
    assert!(rms36 > 1.0 && rms36 < 24.0, "qp 36: rms {rms36}");
}

#[test]
fn qp_zero_is_the_lossless_format_byte_for_byte() {
    let cache = codelm();
    let Some(enc) = encoder("rows") else { return };
    let plane = quantized(&cache, 1..2, 0..100, 8);
    let plain = enc.encode(&plane).expect("encodes");
    let zero = enc.clone().with_qp(0).unwrap().encode(&plane).unwrap();
    assert_eq!(zero.params, plain.params);
    assert_eq!(zero.payload, plain.payload);
    assert_eq!(&plain.params[..4], b"KVH1");
    assert!(!HevcParams::from_bytes(&plain.params).unwrap().is_lossy());
}

/// `data/hevc-lossless-v1.kvc` is tokens 0..32 of `data/stories-kv.safetensors` as
/// `kvfetcher encode --variant hevc --bits 4 --chunk-tokens 32 --model-id golden` wrote it before
/// lossy HEVC existed (one frame per section, so x265's thread count cannot change the bytes).
#[test]
fn objects_written_before_lossy_hevc_decode_and_reencode_identically() {
    if encoder("frames").is_none() || decoder().is_none() {
        return;
    }
    let old = std::fs::read(kvfetcher_testkit::data_file("hevc-lossless-v1.kvc")).unwrap();
    let registry = CodecRegistry::standard();
    let decoded = decode_chunk(&old, &registry).expect("an old hevc object decodes");
    assert_eq!(decoded.tokens(), 32);
    let view = ChunkView::parse(&old).unwrap();
    for s in &view.header().sections {
        let p = HevcParams::from_bytes(&s.params).expect("old params parse");
        assert!(!p.is_lossy() && p.crc32c != 0);
    }
    let file = KvFile::read(&kvfetcher_testkit::data_file("stories-kv.safetensors")).unwrap();
    let ids = file.cache.token_ids().expect("token ids")[..32].to_vec();
    let cache = file.cache.slice_tokens(0, 32).unwrap();
    let cfg = EncodeConfig {
        quant: bits8(4),
        variant: VariantKind::Hevc,
        chunk_tokens: 32,
        ..EncodeConfig::default()
    };
    let model = ModelFingerprint::of_bytes(b"golden");
    let now = encode_cache(&cache, &model, &ids, &cfg, &registry).expect("encodes");
    assert_eq!(now.len(), 1);
    assert!(
        now[0].1 == old,
        "today's lossless encoder changed the bytes"
    );
}

#[test]
fn lossy_chunks_round_trip_and_keep_their_payload_checksums() {
    let (Some(enc), Some(_)) = (encoder("frames"), decoder()) else {
        return;
    };
    let cache = codelm().slice_tokens(0, 256).unwrap();
    let ids: Vec<u32> = (0..256).collect();
    let model = ModelFingerprint::of_bytes(b"lossy");
    let cfg = EncodeConfig {
        quant: bits8(8),
        variant: VariantKind::Hevc,
        ..EncodeConfig::default()
    };
    let rel_l2 = |decoded: &kvfetcher_kv::KvCache| {
        let (mut d2, mut o2) = (0f64, 0f64);
        for (a, b) in cache.layers().iter().zip(decoded.layers()) {
            for (x, y) in [(&a.key, &b.key), (&a.value, &b.value)] {
                for (u, v) in x.to_f32().iter().zip(y.to_f32()) {
                    d2 += f64::from(u - v).powi(2);
                    o2 += f64::from(*u).powi(2);
                }
            }
        }
        (d2 / o2).sqrt()
    };
    let lossless = encode_cache(&cache, &model, &ids, &cfg, &CodecRegistry::standard()).unwrap();
    let exact8 = rel_l2(&decode_chunk(&lossless[0].1, &CodecRegistry::standard()).unwrap());
    let mut last = (exact8, lossless[0].1.len());
    for qp in [8u8, 20, 32] {
        let reg = CodecRegistry::standard().with(
            VariantKind::Hevc,
            std::sync::Arc::new(enc.clone().with_qp(qp).unwrap()),
        );
        let chunks = encode_cache(&cache, &model, &ids, &cfg, &reg).expect("lossy chunk");
        let bytes = &chunks[0].1;
        let err = rel_l2(&decode_chunk(bytes, &reg).expect("lossy chunk decodes"));
        println!(
            "qp {qp}: {} bytes, rel L2 {err:.4} (8-bit lossless {exact8:.4})",
            bytes.len()
        );
        assert!(err > last.0 && bytes.len() < last.1, "qp {qp}");
        // Measured 0.037 at QP 20, 0.144 at QP 32 (8-bit lossless: 0.005).
        assert!(err < 0.25, "qp {qp}: rel L2 {err}");
        last = (err, bytes.len());
        // A flipped payload byte is caught by the section's crc32c, lossy or not.
        let mut bad = bytes.clone();
        let at = bad.len() - 7;
        bad[at] ^= 0x10;
        assert!(
            decode_chunk(&bad, &reg).is_err(),
            "qp {qp}: corrupt payload"
        );
    }
    // Bit-exact mode's byte planes are never coded lossily.
    let reg = CodecRegistry::standard().with(
        VariantKind::Hevc,
        std::sync::Arc::new(enc.with_qp(8).unwrap()),
    );
    let exact = EncodeConfig {
        quant: QuantConfig::Exact,
        ..cfg
    };
    assert!(encode_cache(&cache, &model, &ids, &exact, &reg).is_err());
}

#[test]
fn malformed_lossy_settings_and_parameters_are_refused() {
    let cache = codelm();
    let (Some(enc), Some(dec)) = (encoder("frames"), decoder()) else {
        return;
    };
    assert!(matches!(
        enc.clone().with_qp(52),
        Err(CodecError::Unsupported { .. })
    ));
    // Codes narrower than their samples: a decoder could output samples above the codes' range.
    let narrow = quantized(&cache, 0..1, 0..64, 6);
    let lossy = enc.with_qp(20).unwrap();
    assert!(matches!(
        lossy.encode(&narrow),
        Err(CodecError::Unsupported { .. })
    ));
    let plane = quantized(&cache, 0..1, 0..64, 8);
    let s = lossy.encode(&plane).unwrap();
    let corrupt = |params: &[u8]| {
        matches!(
            dec.decode(plane.shape, params, &s.payload),
            Err(CodecError::Corrupt { .. })
        )
    };
    // QP 0 or 52 under the lossy magic, a checksum in a lossy section, truncation.
    for (at, v) in [(4usize, 0u8), (4, 52), (45, 1)] {
        let mut bad = s.params.clone();
        bad[at] = v;
        assert!(corrupt(&bad), "byte {at} = {v} accepted");
    }
    assert!(corrupt(&s.params[..5]));
    // A lossy section claiming 6-bit codes (forged: geometry and shape say 6 bits).
    let mut p = HevcParams::from_bytes(&s.params).unwrap();
    p.qp = 0;
    let mut forged = p.to_bytes().unwrap();
    forged[7] = 6;
    forged.splice(0..4, b"KVH2\x14".iter().copied());
    let six = PlaneShape {
        bits: 6,
        ..plane.shape
    };
    assert!(matches!(
        dec.decode(six, &forged, &s.payload),
        Err(CodecError::Corrupt { .. })
    ));
    // The decoder still decodes the real section.
    assert!(dec.decode(plane.shape, &s.params, &s.payload).is_ok());
}
