//! Round trips on real KV: every variant x bit width x exact mode returns exactly the values
//! that quantizing and dequantizing the input directly gives (or the original bytes).

mod common;

use kvfetcher_codec::{
    chunk_keys, decode_chunk, decode_section, dequantize, encode_cache, quantize, restore_section,
    ChunkView, CodecRegistry, EncodeConfig, Grouping, ModelFingerprint, QuantConfig, VariantKind,
};
use kvfetcher_kv::{DType, DTypeExt, KvCache, Tensor};
use kvfetcher_testkit::{skip, Missing};

const BITS: [u8; 7] = [2, 3, 4, 6, 8, 10, 12];

/// What decoding must give for `t` (one chunk's rows) at `bits` bits with `grouping`.
fn expected(t: &Tensor, bits: u8, grouping: Grouping) -> Vec<u8> {
    let (tokens, channels) = (t.tokens(), t.channels());
    let mut codes = Vec::new();
    let p = quantize(&t.to_f32(), tokens, channels, bits, grouping, &mut codes).unwrap();
    let mut vals = Vec::new();
    dequantize(&codes, tokens, channels, grouping, &p, &mut vals).unwrap();
    let mut out = Vec::new();
    t.dtype().encode_f32(&vals, &mut out);
    out
}

/// The variants this build can encode and decode (hevc only when x265 and libde265 load).
fn variants(reg: &CodecRegistry) -> Vec<VariantKind> {
    let mut v = vec![VariantKind::Packed, VariantKind::Zstd];
    match (
        reg.encoder(VariantKind::Hevc),
        reg.decoder(VariantKind::Hevc),
    ) {
        (Ok(_), Ok(_)) => v.push(VariantKind::Hevc),
        (Err(e), _) | (_, Err(e)) => eprintln!("hevc not tested: {e}"),
    }
    v
}

/// Encodes `cache` and checks every chunk against the direct quantization.
fn check(cache: &KvCache, ids: &[u32], cfg: &EncodeConfig, reg: &CodecRegistry) {
    let model = ModelFingerprint::of_bytes(b"roundtrip");
    let chunks = encode_cache(cache, &model, ids, cfg, reg).unwrap();
    let keys = chunk_keys(&model, ids, cfg.chunk_tokens);
    assert_eq!(chunks.iter().map(|c| c.0).collect::<Vec<_>>(), keys);
    let mut parts = Vec::new();
    for (i, (key, bytes)) in chunks.iter().enumerate() {
        let view = ChunkView::parse(bytes).unwrap();
        view.verify().unwrap();
        let h = view.header();
        assert_eq!((h.key, h.model, h.variant), (*key, model, cfg.variant));
        assert_eq!(h.token_start as usize, i * cfg.chunk_tokens);
        let start = i * cfg.chunk_tokens;
        let end = (start + cfg.chunk_tokens).min(cache.tokens());
        let decoded = decode_chunk(bytes, reg).unwrap();
        assert_eq!(decoded.tokens(), end - start);
        let original = cache.slice_tokens(start, end).unwrap();
        for (l, (got, want)) in decoded.layers().iter().zip(original.layers()).enumerate() {
            match &cfg.quant {
                QuantConfig::Exact => {
                    assert_eq!(got.key, want.key, "exact K layer {l}");
                    assert_eq!(got.value, want.value, "exact V layer {l}");
                }
                QuantConfig::Bits {
                    key_grouping,
                    value_grouping,
                    ..
                } => {
                    let bits = cfg.quant.bits_for(l);
                    let what = format!("{:?} {bits} bits layer {l} chunk {i}", cfg.variant);
                    assert_eq!(
                        got.key.data(),
                        expected(&want.key, bits, *key_grouping),
                        "K {what}"
                    );
                    assert_eq!(
                        got.value.data(),
                        expected(&want.value, bits, *value_grouping),
                        "V {what}"
                    );
                }
                QuantConfig::Transform(_) => {
                    unreachable!("transform coding is tested in tests/transform.rs")
                }
            }
        }
        // Section-wise restore gives the same layers.
        let mut layers = Vec::new();
        for s in 0..h.sections.len() {
            let plane = decode_section(h, s, view.section_bytes(s), reg).unwrap();
            layers.extend(restore_section(h, s, &plane, reg).unwrap());
        }
        assert_eq!(layers, decoded.layers());
        parts.push(decoded);
    }
    if matches!(cfg.quant, QuantConfig::Exact) {
        let whole = KvCache::concat_tokens(&parts).unwrap();
        assert_eq!(whole.layers(), cache.layers());
    }
}

fn sweep(cache: &KvCache, ids: &[u32], chunk_tokens: usize) {
    let reg = CodecRegistry::default();
    for variant in variants(&reg) {
        for bits in BITS {
            let cfg = EncodeConfig {
                quant: QuantConfig::bits(bits),
                variant,
                chunk_tokens,
                ..EncodeConfig::default()
            };
            check(cache, ids, &cfg, &reg);
        }
        let cfg = EncodeConfig {
            quant: QuantConfig::Exact,
            variant,
            chunk_tokens,
            ..EncodeConfig::default()
        };
        check(cache, ids, &cfg, &reg);
    }
}

#[test]
fn codelm_every_variant_and_width() {
    // 2 layers x 72 tokens: chunks of 48 and 24 tokens.
    let cache = common::codelm(2, 72);
    sweep(&cache, &common::ids(&cache), 48);
}

#[test]
fn stories_every_variant_and_width() {
    let (cache, ids) = common::stories(72, DType::F16);
    sweep(&cache, &ids, 48);
}

#[test]
fn bf16_and_f32_exact_and_mixed_configs() {
    let (cache32, ids) = common::stories(40, DType::F32);
    let cache16 = common::convert(&cache32, DType::BF16);
    let reg = CodecRegistry::software();
    let mixed = QuantConfig::Bits {
        default_bits: 6,
        per_layer: vec![(1, 3), (4, 12)],
        key_grouping: Grouping::PerChannel,
        value_grouping: Grouping::PerToken,
    };
    for cache in [&cache32, &cache16] {
        for quant in [QuantConfig::Exact, mixed.clone()] {
            for variant in [VariantKind::Packed, VariantKind::Zstd] {
                let cfg = EncodeConfig {
                    quant: quant.clone(),
                    variant,
                    chunk_tokens: 16,
                    layers_per_section: 3,
                    hevc_layout: None,
                    hevc_stream_frames: None,
                };
                check(cache, &ids, &cfg, &reg);
            }
        }
    }
    // Per-layer bits split layer groups: 6,3,6,6,12 with 3 per section -> 0..1, 1..2, 2..4, 4..5.
    let cfg = EncodeConfig {
        quant: mixed,
        chunk_tokens: 40,
        layers_per_section: 3,
        ..EncodeConfig::default()
    };
    let chunks = encode_cache(
        &cache16,
        &ModelFingerprint::of_bytes(b"m"),
        &ids,
        &cfg,
        &reg,
    )
    .unwrap();
    let h = ChunkView::parse(&chunks[0].1).unwrap().header().clone();
    let ranges: Vec<_> = h
        .sections
        .iter()
        .map(|s| (s.layer_start, s.layer_end, s.shape.bits))
        .collect();
    assert_eq!(ranges, vec![(0, 1, 6), (1, 2, 3), (2, 4, 6), (4, 5, 12)]);
}

#[test]
fn quantization_error_shrinks_with_bits() {
    let cache = common::codelm(1, 64);
    let reg = CodecRegistry::software();
    let orig = cache.layers()[0].key.to_f32();
    let mut last = f64::INFINITY;
    for bits in [2u8, 4, 8, 12] {
        let cfg = EncodeConfig {
            quant: QuantConfig::bits(bits),
            chunk_tokens: 64,
            ..EncodeConfig::default()
        };
        let chunks = encode_cache(
            &cache,
            &ModelFingerprint::of_bytes(b"m"),
            &common::ids(&cache),
            &cfg,
            &reg,
        )
        .unwrap();
        let got = decode_chunk(&chunks[0].1, &reg).unwrap().layers()[0]
            .key
            .to_f32();
        let err: f64 = orig
            .iter()
            .zip(&got)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = orig
            .iter()
            .map(|a| f64::from(*a).powi(2))
            .sum::<f64>()
            .sqrt();
        let rel = err / norm;
        assert!(
            rel < last,
            "{bits} bits: relative error {rel} not below {last}"
        );
        last = rel;
    }
    assert!(last < 0.002, "12-bit relative error {last}");
}

#[test]
fn hevc_layout_is_passed_to_the_encoder() {
    let reg = CodecRegistry::default();
    if let Err(e) = reg
        .encoder(VariantKind::Hevc)
        .and(reg.decoder(VariantKind::Hevc).map(|_| ()))
    {
        skip(Missing::Tool, format!("hevc unavailable: {e}"));
        return;
    }
    let cache = common::codelm(1, 32);
    let ids = common::ids(&cache);
    for layout in ["rows", "frames"] {
        let cfg = EncodeConfig {
            quant: QuantConfig::bits(6),
            variant: VariantKind::Hevc,
            hevc_layout: Some(layout.into()),
            hevc_stream_frames: None,
            chunk_tokens: 32,
            layers_per_section: 1,
        };
        check(&cache, &ids, &cfg, &reg);
    }
    let bad = EncodeConfig {
        variant: VariantKind::Hevc,
        hevc_layout: Some("no-such-layout".into()),
        ..EncodeConfig::default()
    };
    let model = ModelFingerprint::of_bytes(b"m");
    assert!(encode_cache(&cache, &model, &ids, &bad, &reg).is_err());
}
