//! Transform coding (format version 2, the rans variant) on real KV: profiles, calibration,
//! the transform's inverse, chunk round trips with sinks, allocation and every refusal.

mod common;

use std::sync::Arc;

use kvfetcher_codec::{
    allocate_steps, calibrate, decode_chunk, encode_cache, forward, inverse, uniform_steps,
    BasisKind, Calibration, ChunkHeader, ChunkView, CodecProfile, CodecRegistry, EncodeConfig,
    FormatError, ModelFingerprint, QuantConfig, RatePoint, Rope, RopeStyle, TensorAt,
    TransformConfig, VariantKind,
};
use kvfetcher_kv::KvCache;

const ROPE: Rope = Rope {
    style: RopeStyle::Halves,
    dims: 128,
    base: 10000.0,
    freq_scale: 1.0,
};

fn model() -> ModelFingerprint {
    ModelFingerprint::of_bytes(b"codelm")
}

/// A profile fitted on codelm's tokens 512..1024 (2 layers), judged on tokens 0..512.
fn profile(basis: BasisKind, sinks: u16) -> CodecProfile {
    let cal = common::codelm(2, 1024).slice_tokens(512, 1024).unwrap();
    let cfg = Calibration {
        rope: ROPE,
        sinks,
        basis,
    };
    calibrate(model(), &[cal], &cfg).unwrap()
}

fn with_sensitivities(mut p: CodecProfile) -> CodecProfile {
    for (i, l) in p.layers.iter_mut().enumerate() {
        l.key.sensitivity = 0.01 * (i + 1) as f32;
        l.value.sensitivity = 0.1 * (i + 1) as f32;
    }
    p
}

fn transform_cfg(p: &Arc<CodecProfile>, steps: Vec<(f32, f32)>) -> EncodeConfig {
    EncodeConfig {
        quant: QuantConfig::Transform(Arc::new(TransformConfig {
            profile: p.clone(),
            steps,
        })),
        variant: VariantKind::Rans,
        chunk_tokens: 128,
        ..EncodeConfig::default()
    }
}

#[test]
fn profile_bytes_round_trip_and_every_defect_is_refused() {
    let p = with_sensitivities(profile(BasisKind::Pca, 4));
    let bytes = p.to_bytes();
    let back = CodecProfile::from_bytes(&bytes).unwrap();
    assert_eq!(back, p);
    assert_eq!(back.id(), p.id());
    for cut in [0, 3, 10, 59, 64, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            CodecProfile::from_bytes(&bytes[..cut]).is_err(),
            "cut {cut}"
        );
    }
    let mut flipped = bytes.clone();
    flipped[1000] ^= 1;
    assert!(matches!(
        CodecProfile::from_bytes(&flipped),
        Err(FormatError::Checksum { .. })
    ));
    let mut longer = bytes.clone();
    longer.insert(100, 0);
    assert!(CodecProfile::from_bytes(&longer).is_err());
    // A basis that is not orthonormal is refused even with a valid crc.
    let mut bad = p.clone();
    bad.layers[1].value.heads[0].basis[0] *= 2.0;
    assert!(matches!(
        CodecProfile::from_bytes(&bad.to_bytes()),
        Err(FormatError::BadProfile(m)) if m.contains("orthonormal")
    ));
    let mut bad = p.clone();
    bad.layers[0].key.curve.reverse();
    assert!(CodecProfile::from_bytes(&bad.to_bytes()).is_err());
    let mut bad = p;
    bad.rope.dims = 3;
    assert!(CodecProfile::from_bytes(&bad.to_bytes()).is_err());
}

#[test]
fn pca_undoes_rope_and_the_inverse_transform_restores_the_values() {
    let p = profile(BasisKind::Pca, 0);
    let cache = common::codelm(2, 256);
    let channels = p.channels();
    for (l, layer) in cache.layers().iter().enumerate() {
        for (is_key, t) in [(true, &layer.key), (false, &layer.value)] {
            let values = t.to_f32();
            let at = TensorAt {
                layer: l,
                is_key,
                first_position: 0,
            };
            let (mut y, mut back) = (Vec::new(), Vec::new());
            forward(&p, at, &values, &mut y);
            inverse(&p, at, &y, &mut back);
            let (mut err, mut norm) = (0f64, 0f64);
            for (a, b) in values.iter().zip(&back) {
                err += f64::from(a - b).powi(2);
                norm += f64::from(*a).powi(2);
            }
            assert!(
                err <= 1e-10 * norm,
                "layer {l} key {is_key}: {err} vs {norm}"
            );
            // Energy compaction: the first quarter of components hold far more than a quarter.
            let (mut head, mut all) = (0f64, 0f64);
            for row in y.chunks_exact(channels) {
                for (c, v) in row.iter().enumerate() {
                    let e = f64::from(*v).powi(2);
                    all += e;
                    if c % p.head_dim < p.head_dim / 4 {
                        head += e;
                    }
                }
            }
            assert!(head > 0.4 * all, "layer {l} key {is_key}: {head} of {all}");
        }
    }
}

#[test]
fn transform_chunks_round_trip_within_the_step_with_exact_sinks() {
    let p = Arc::new(profile(BasisKind::Pca, 4));
    let cache = common::codelm(2, 300);
    let ids = common::ids(&cache);
    let steps = uniform_steps(&p, 0.05);
    let cfg = transform_cfg(&p, steps.clone());
    let reg = CodecRegistry::software().with_profile(p.clone());
    let chunks = encode_cache(&cache, &model(), &ids, &cfg, &reg).unwrap();
    assert_eq!(chunks.len(), 3);
    let mut parts = Vec::new();
    for (i, (_, bytes)) in chunks.iter().enumerate() {
        let view = ChunkView::parse(bytes).unwrap();
        let h = view.header();
        assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), 2, "version 2");
        let t = h.transform.as_ref().unwrap();
        assert_eq!(t.profile, p.id());
        assert_eq!(t.sink_tokens, if i == 0 { 4 } else { 0 });
        assert_eq!(t.steps, steps);
        parts.push(decode_chunk(bytes, &reg).unwrap());
    }
    let decoded = KvCache::concat_tokens(&parts).unwrap();
    let channels = p.channels();
    for (l, (a, b)) in cache.layers().iter().zip(decoded.layers()).enumerate() {
        for (is_key, x, y) in [(true, &a.key, &b.key), (false, &a.value, &b.value)] {
            let row = channels * 2;
            assert_eq!(x.data()[..4 * row], y.data()[..4 * row], "sinks are exact");
            let step = if is_key { steps[l].0 } else { steps[l].1 };
            let (xs, ys) = (x.to_f32(), y.to_f32());
            for (t, (rx, ry)) in xs
                .chunks_exact(channels)
                .zip(ys.chunks_exact(channels))
                .enumerate()
                .skip(4)
            {
                for (h, (hx, hy)) in rx
                    .chunks_exact(p.head_dim)
                    .zip(ry.chunks_exact(p.head_dim))
                    .enumerate()
                {
                    // Orthonormal: the head's error is the coefficients' error, <= step/2
                    // each, plus fp16 rounding of the output.
                    let err: f32 = hx.iter().zip(hy).map(|(a, b)| (a - b) * (a - b)).sum();
                    let norm: f32 = hx.iter().map(|a| a * a).sum();
                    let bound = (p.head_dim as f32).sqrt() * step / 2.0 + 2e-3 * norm.sqrt();
                    assert!(
                        err.sqrt() <= bound,
                        "layer {l} key {is_key} token {t} head {h}: {} > {bound}",
                        err.sqrt()
                    );
                }
            }
        }
    }
}

#[test]
fn a_chunk_needs_its_own_profile() {
    let p = Arc::new(profile(BasisKind::Pca, 0));
    let cache = common::codelm(2, 128);
    let ids = common::ids(&cache);
    let cfg = transform_cfg(&p, uniform_steps(&p, 0.1));
    let reg = CodecRegistry::software();
    let chunks = encode_cache(&cache, &model(), &ids, &cfg, &reg).unwrap();
    let bytes = &chunks[0].1;
    // A registered profile's id is reused, a copy's is not known; both name the same bytes.
    let with = reg.clone().with_profile(p.clone());
    assert_eq!(with.registered_id(&p), Some(p.id()));
    assert_eq!(with.registered_id(&Arc::new((*p).clone())), None);
    assert_eq!(
        encode_cache(&cache, &model(), &ids, &cfg, &with).unwrap(),
        chunks,
        "the same objects whether or not the registry knows the profile"
    );
    assert!(matches!(
        decode_chunk(bytes, &reg),
        Err(FormatError::ProfileMissing(id)) if id == p.id()
    ));
    let other = Arc::new(profile(BasisKind::Identity, 0));
    assert!(matches!(
        decode_chunk(bytes, &reg.clone().with_profile(other)),
        Err(FormatError::ProfileMissing(_))
    ));
    // A profile of another shape is refused before encoding.
    let small = Arc::new(profile(BasisKind::Pca, 0));
    let three = common::codelm(3, 128);
    assert!(matches!(
        encode_cache(
            &three,
            &model(),
            &ids,
            &transform_cfg(&small, uniform_steps(&small, 0.1)),
            &reg
        ),
        Err(FormatError::ProfileMismatch(_) | FormatError::InvalidInput(_))
    ));
}

#[test]
fn transform_headers_refuse_forged_fields() {
    let p = Arc::new(profile(BasisKind::Pca, 4));
    let cache = common::codelm(2, 64);
    let ids = common::ids(&cache);
    let reg = CodecRegistry::software().with_profile(p.clone());
    let cfg = transform_cfg(&p, uniform_steps(&p, 0.1));
    let bytes = encode_cache(&cache, &model(), &ids, &cfg, &reg).unwrap()[0]
        .1
        .clone();
    let (h, len) = ChunkHeader::parse_prefix(&bytes).unwrap();
    for cut in 0..len {
        assert!(
            ChunkHeader::parse_prefix(&bytes[..cut]).is_err(),
            "cut {cut}"
        );
    }
    let reserialize = |f: &dyn Fn(&mut ChunkHeader)| {
        let mut h2 = h.clone();
        f(&mut h2);
        h2.to_bytes()
    };
    let nan = |h: &mut ChunkHeader| h.transform.as_mut().unwrap().steps[0].0 = f32::NAN;
    assert!(reserialize(&nan).is_err());
    let sinks = |h: &mut ChunkHeader| h.transform.as_mut().unwrap().sink_tokens = 65;
    assert!(reserialize(&sinks).is_err());
    let short = |h: &mut ChunkHeader| {
        h.transform.as_mut().unwrap().steps.pop();
    };
    assert!(reserialize(&short).is_err());
    let zstd = |h: &mut ChunkHeader| h.variant = VariantKind::Zstd;
    assert!(reserialize(&zstd).is_err());
    let plain_rans = |h: &mut ChunkHeader| h.transform = None;
    assert!(reserialize(&plain_rans).is_err());
    // Version 1 with the transform flag is refused (the crc is fixed up so only that differs).
    let mut v1 = bytes[..len].to_vec();
    v1[4] = 1;
    let crc = crc32c::crc32c(&v1[..len - 4]);
    v1[len - 4..].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        ChunkHeader::parse_prefix(&v1),
        Err(FormatError::Inconsistent(m)) if m.contains("flags")
    ));
    // A corrupt section is refused, never restored.
    let mut corrupt = bytes.clone();
    let last = corrupt.len() - 3;
    corrupt[last] ^= 0x40;
    assert!(decode_chunk(&corrupt, &reg).is_err());
    // The rans variant without a profile cannot encode.
    let bad = EncodeConfig {
        variant: VariantKind::Rans,
        ..EncodeConfig::default()
    };
    assert!(encode_cache(&cache, &model(), &ids, &bad, &reg).is_err());
}

#[test]
fn allocation_meets_its_prediction_and_spends_more_bits_for_less_kl() {
    let p = with_sensitivities(profile(BasisKind::Pca, 4));
    let loose = allocate_steps(&p, 1e-2).unwrap();
    let tight = allocate_steps(&p, 1e-4).unwrap();
    assert!(loose.predicted_kl <= 1e-2 && tight.predicted_kl <= 1e-4);
    assert!(tight.bits_per_value > loose.bits_per_value);
    assert_eq!(loose.steps.len(), 2);
    // More sensitive tensors get finer steps relative to their deviation.
    let rel = |l: usize, k: bool| {
        let s = p.component_std(l, k);
        let rms = (s.iter().map(|x| x * x).sum::<f32>() / s.len() as f32).sqrt();
        let step = if k {
            loose.steps[l].0
        } else {
            loose.steps[l].1
        };
        step / rms
    };
    assert!(rel(1, false) <= rel(1, true));
    assert!(allocate_steps(&p, 0.0).is_err());
    let unmeasured = profile(BasisKind::Pca, 4);
    assert!(matches!(
        allocate_steps(&unmeasured, 1e-2),
        Err(FormatError::BadProfile(_))
    ));
    // Rate curves fall as the step grows and the coded size follows the prediction.
    for l in &p.layers {
        let c: &Vec<RatePoint> = &l.value.curve;
        assert!(c.windows(2).all(|w| w[1].bits >= w[0].bits - 1e-3));
    }
}

/// The quantizer, scalar and vectorized, against a plain reference: `y / step` rounded half to
/// even, clamped to ±MAX_LEVEL, NaN to 0; at ties, at the clamp, for NaN, infinities, signed
/// zeros and subnormals, and across the whole level range.
#[test]
fn quantize_codes_and_quantize_level_round_half_to_even_and_clamp() {
    use kvfetcher_codec::{quantize_codes, quantize_level, MAX_LEVEL};
    let reference = |y: f32, step: f32| -> i32 {
        let v = y / step;
        if v.is_nan() {
            0
        } else {
            v.round_ties_even()
                .clamp(-(MAX_LEVEL as f32), MAX_LEVEL as f32) as i32
        }
    };
    let mut ys = vec![
        0.0,
        -0.0,
        0.5,
        -0.5,
        1.5,
        -1.5,
        2.5,
        -2.5,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE / 4.0,
        f32::MAX,
        f32::MIN,
        MAX_LEVEL as f32 + 0.5,
        -(MAX_LEVEL as f32) - 0.5,
        1e9,
        -1e9,
    ];
    // A sweep across the whole level range, off the grid, with an odd count (a ragged tail).
    ys.extend((0..20_001).map(|i| (i as f32 - 10_000.0) * 3.3371 + 0.25));
    assert_eq!(quantize_level(2.5, 1.0), 2);
    assert_eq!(quantize_level(-3.5, 1.0), -4);
    assert_eq!(quantize_level(f32::NAN, 1.0), 0);
    assert_eq!(quantize_level(f32::NEG_INFINITY, 1.0), -MAX_LEVEL);
    for step in [1.0, 0.37, 1e-3, 7.0] {
        let mut codes = Vec::new();
        quantize_codes(&ys, step, &mut codes);
        assert_eq!(codes.len(), ys.len());
        for (&y, &c) in ys.iter().zip(&codes) {
            let q = reference(y, step);
            assert_eq!(quantize_level(y, step), q, "y {y} step {step}");
            assert_eq!(c, ((q << 1) ^ (q >> 31)) as u16, "y {y} step {step}");
        }
    }
}
