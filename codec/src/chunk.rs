//! Whole chunks: a KV cache into chunk objects, and objects (or single sections) back into KV.
//!
//! Encoding: split tokens into chunks, layers into sections (layer groups of equal bit width),
//! quantize (or take byte planes in exact mode) into a [`CodePlane`] per section, encode each with
//! the variant, write the header. Sections and chunks run in parallel on rayon's pool. Decoding
//! runs the same steps backwards; [`decode_section`] and [`restore_section`] let a fetcher
//! restore layer groups as they arrive.

use std::sync::Arc;

use kvfetcher_kv::{DTypeExt, KvCache, LayerKv, Tensor};
use rayon::prelude::*;

use crate::format::{
    TransformInfo, MAX_CHUNK_TOKENS, MAX_HEAD_DIM, MAX_KV_HEADS, MAX_LAYERS, TRANSFORM_CODE_BITS,
};
use crate::transform::{
    context, dequantize_level, forward_with, inverse_with, quantize_codes, RopeTable, TensorAt,
};
use crate::{
    chunk_keys, dequantize, quantize, ChunkHeader, ChunkKey, ChunkView, CodePlane, CodecError,
    CodecProfile, CodecRegistry, FormatError, Grouping, LayerQuant, ModelFingerprint, ProfileId,
    QuantConfig, SectionEncoder, SectionInfo, TransformConfig, VariantKind, DEFAULT_CHUNK_TOKENS,
};

/// How [`encode_cache`] builds chunk objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeConfig {
    /// Quantization (or bit-exact mode).
    pub quant: QuantConfig,
    /// The variant every section is encoded with.
    pub variant: VariantKind,
    /// A layout name for the hevc encoder; `None` uses the registry's hevc encoder as is.
    pub hevc_layout: Option<String>,
    /// Frames per HEVC stream (`None`: the registry's hevc encoder as is). Sections cut into
    /// streams decode on several NVDEC engines at once (see `HevcEncoder::with_stream_frames`).
    pub hevc_stream_frames: Option<usize>,
    /// Tokens per chunk (the last chunk may be shorter).
    pub chunk_tokens: usize,
    /// Layers per section (groups are split further where per-layer bits differ).
    pub layers_per_section: usize,
}

impl Default for EncodeConfig {
    /// 8-bit per-channel quantization, zstd, 256-token chunks, one layer per section.
    fn default() -> Self {
        EncodeConfig {
            quant: QuantConfig::default(),
            variant: VariantKind::Zstd,
            hevc_layout: None,
            hevc_stream_frames: None,
            chunk_tokens: DEFAULT_CHUNK_TOKENS,
            layers_per_section: 1,
        }
    }
}

/// Layer groups `(start, end, bits)`: at most `per_section` layers, equal bits within a group.
pub fn layer_groups(
    num_layers: usize,
    per_section: usize,
    quant: &QuantConfig,
) -> Vec<(usize, usize, u8)> {
    let mut groups: Vec<(usize, usize, u8)> = Vec::new();
    for l in 0..num_layers {
        let bits = quant.bits_for(l);
        match groups.last_mut() {
            Some(g) if g.2 == bits && g.1 - g.0 < per_section.max(1) => g.1 = l + 1,
            _ => groups.push((l, l + 1, bits)),
        }
    }
    groups
}

/// Splits a cache into chunk objects (in token order), quantizing and encoding sections in
/// parallel (rayon). Returns each chunk's key with its object bytes.
pub fn encode_cache(
    cache: &KvCache,
    model: &ModelFingerprint,
    token_ids: &[u32],
    cfg: &EncodeConfig,
    registry: &CodecRegistry,
) -> Result<Vec<(ChunkKey, Vec<u8>)>, FormatError> {
    let invalid = |m: String| Err(FormatError::InvalidInput(m));
    if token_ids.len() != cache.tokens() {
        return invalid(format!(
            "{} token ids for {} tokens",
            token_ids.len(),
            cache.tokens()
        ));
    }
    if cfg.chunk_tokens == 0 || cfg.chunk_tokens > MAX_CHUNK_TOKENS {
        return invalid(format!(
            "chunk tokens {} is outside 1..={MAX_CHUNK_TOKENS}",
            cfg.chunk_tokens
        ));
    }
    if cfg.layers_per_section == 0 {
        return invalid("layers per section must be at least 1".into());
    }
    if cache.num_layers() > MAX_LAYERS
        || cache.kv_heads() > MAX_KV_HEADS
        || cache.head_dim() > MAX_HEAD_DIM
    {
        return invalid(format!(
            "{} layers x {} heads x {} dims exceed the format's limits",
            cache.num_layers(),
            cache.kv_heads(),
            cache.head_dim()
        ));
    }
    cfg.quant.validate(cache.num_layers())?;
    let groups = layer_groups(cache.num_layers(), cfg.layers_per_section, &cfg.quant);
    let keys = chunk_keys(model, token_ids, cfg.chunk_tokens);
    if let QuantConfig::Transform(t) = &cfg.quant {
        if cfg.variant != VariantKind::Rans {
            return invalid(format!(
                "transform coding uses the rans variant, not {}",
                cfg.variant.name()
            ));
        }
        if cache.dtype().size() != 2 {
            return invalid(format!(
                "transform coding needs 16-bit KV, not {}",
                cache.dtype().safetensors_name()
            ));
        }
        t.profile
            .check_shape(cache.num_layers(), cache.kv_heads(), cache.head_dim())?;
        // Hashing a profile costs as much as reading it (MBs): use the id the registry holds.
        let id = registry
            .registered_id(&t.profile)
            .unwrap_or_else(|| t.profile.id());
        return keys
            .into_par_iter()
            .enumerate()
            .map(|(i, key)| {
                let start = i * cfg.chunk_tokens;
                let end = (start + cfg.chunk_tokens).min(cache.tokens());
                let chunk = ChunkSpan { key, start, end };
                let bytes = encode_transform_chunk(cache, &chunk, model, &groups, t, id)?;
                Ok((key, bytes))
            })
            .collect();
    }
    if cfg.variant == VariantKind::Rans {
        return invalid("the rans variant codes with a profile: use transform coding".into());
    }
    let owned: Arc<dyn SectionEncoder>;
    let encoder: &dyn SectionEncoder = match cfg {
        EncodeConfig {
            variant: VariantKind::Hevc,
            hevc_layout,
            hevc_stream_frames,
            ..
        } if hevc_layout.is_some() || hevc_stream_frames.is_some() => {
            owned = crate::registry::hevc_encoder(hevc_layout.as_deref(), *hevc_stream_frames)?;
            owned.as_ref()
        }
        _ => registry.encoder(cfg.variant)?,
    };
    if encoder.is_lossy() && matches!(cfg.quant, QuantConfig::Exact) {
        return invalid("bit-exact mode cannot use a lossy encoder (hevc with a qp)".into());
    }
    if encoder.variant() != cfg.variant {
        return Err(CodecError::Unsupported {
            variant: cfg.variant.name(),
            reason: format!(
                "the registered encoder produces {}",
                encoder.variant().name()
            ),
        }
        .into());
    }
    keys.into_par_iter()
        .enumerate()
        .map(|(i, key)| {
            let start = i * cfg.chunk_tokens;
            let end = (start + cfg.chunk_tokens).min(cache.tokens());
            let bytes = encode_chunk(cache, key, model, start, end, &groups, cfg, encoder)?;
            Ok((key, bytes))
        })
        .collect()
}

/// Encodes tokens `start..end` of `cache` as one object.
#[allow(clippy::too_many_arguments)]
fn encode_chunk(
    cache: &KvCache,
    key: ChunkKey,
    model: &ModelFingerprint,
    start: usize,
    end: usize,
    groups: &[(usize, usize, u8)],
    cfg: &EncodeConfig,
    encoder: &dyn SectionEncoder,
) -> Result<Vec<u8>, FormatError> {
    let (key_grouping, value_grouping) = match &cfg.quant {
        QuantConfig::Exact | QuantConfig::Transform(_) => {
            (Grouping::PerChannel, Grouping::PerChannel)
        }
        QuantConfig::Bits {
            key_grouping,
            value_grouping,
            ..
        } => (*key_grouping, *value_grouping),
    };
    let encoded = groups
        .par_iter()
        .map(|&(l0, l1, bits)| {
            let (plane, quant) = section_plane(cache, l0, l1, bits, start, end, &cfg.quant)?;
            let enc = encoder.encode(&plane)?;
            Ok((l0, l1, plane.shape, quant, enc))
        })
        .collect::<Result<Vec<_>, FormatError>>()?;
    let narrow = |what: &str, v: usize| {
        u16::try_from(v)
            .map_err(|_| FormatError::InvalidInput(format!("{what} {v} does not fit the format")))
    };
    let mut header = ChunkHeader {
        key,
        model: *model,
        token_start: u32::try_from(start)
            .map_err(|_| FormatError::InvalidInput(format!("token {start} is beyond u32")))?,
        token_count: (end - start) as u32,
        num_layers: narrow("layers", cache.num_layers())?,
        kv_heads: narrow("kv heads", cache.kv_heads())?,
        head_dim: narrow("head dim", cache.head_dim())?,
        dtype: cache.dtype(),
        variant: cfg.variant,
        exact: matches!(cfg.quant, QuantConfig::Exact),
        key_grouping,
        value_grouping,
        sections: Vec::with_capacity(encoded.len()),
        transform: None,
    };
    for (l0, l1, shape, quant, enc) in &encoded {
        header.sections.push(SectionInfo {
            layer_start: *l0 as u16,
            layer_end: *l1 as u16,
            offset: 0,
            len: enc.payload.len() as u64,
            crc32c: crc32c::crc32c(&enc.payload),
            shape: *shape,
            params: enc.params.clone(),
            quant: quant.clone(),
        });
    }
    write_object(header, encoded.iter().map(|(.., enc)| &enc.payload[..]))
}

/// Sets the sections' offsets (payloads follow the header in order) and writes the object.
fn write_object<'a>(
    mut header: ChunkHeader,
    payloads: impl Iterator<Item = &'a [u8]>,
) -> Result<Vec<u8>, FormatError> {
    let mut offset = header.encoded_len() as u64;
    for s in &mut header.sections {
        s.offset = offset;
        offset += s.len;
    }
    let mut out = header.to_bytes()?;
    out.reserve(offset as usize - out.len());
    for p in payloads {
        out.extend_from_slice(p);
    }
    Ok(out)
}

/// The code plane of layers `l0..l1`, tokens `start..end`, and its quantization parameters.
fn section_plane(
    cache: &KvCache,
    l0: usize,
    l1: usize,
    bits: u8,
    start: usize,
    end: usize,
    quant: &QuantConfig,
) -> Result<(CodePlane, Vec<LayerQuant>), FormatError> {
    let (tokens, channels, dtype) = (
        end - start,
        cache.kv_heads() * cache.head_dim(),
        cache.dtype(),
    );
    let row = channels * dtype.size();
    let planes = if matches!(quant, QuantConfig::Exact) {
        dtype.size()
    } else {
        1
    };
    let shape = crate::PlaneShape {
        bits,
        tensors: (l1 - l0) * 2 * planes,
        rows: tokens,
        cols: channels,
    };
    let mut codes = Vec::with_capacity(shape.len());
    let mut params = Vec::new();
    let mut values = Vec::new();
    for layer in &cache.layers()[l0..l1] {
        let mut lq = LayerQuant::default();
        for (is_key, t) in [(true, &layer.key), (false, &layer.value)] {
            let bytes = &t.data()[start * row..end * row];
            match quant {
                QuantConfig::Exact => {
                    for b in 0..planes {
                        codes.extend(bytes.iter().skip(b).step_by(planes).map(|&x| u16::from(x)));
                    }
                }
                QuantConfig::Transform(_) => {
                    return Err(FormatError::InvalidInput(
                        "transform-coded sections are built by encode_transform_chunk".into(),
                    ))
                }
                QuantConfig::Bits {
                    key_grouping,
                    value_grouping,
                    ..
                } => {
                    dtype.decode_f32(bytes, &mut values);
                    let grouping = if is_key {
                        *key_grouping
                    } else {
                        *value_grouping
                    };
                    let p = quantize(&values, tokens, channels, bits, grouping, &mut codes)?;
                    if is_key {
                        lq.key = p;
                    } else {
                        lq.value = p;
                    }
                }
            }
        }
        if !matches!(quant, QuantConfig::Exact) {
            params.push(lq);
        }
    }
    Ok((CodePlane { shape, codes }, params))
}

/// Decodes one whole object back to its KV (dequantized to the header's dtype; exact mode gives
/// the original bytes). The cache carries no token ids.
pub fn decode_chunk(bytes: &[u8], registry: &CodecRegistry) -> Result<KvCache, FormatError> {
    let view = ChunkView::parse(bytes)?;
    view.verify()?;
    let header = view.header();
    let parts = (0..header.sections.len())
        .into_par_iter()
        .map(|i| {
            let plane = decode_section(header, i, view.section_bytes(i), registry)?;
            restore_section(header, i, &plane, registry)
        })
        .collect::<Result<Vec<_>, FormatError>>()?;
    let layers: Vec<LayerKv> = parts.into_iter().flatten().collect();
    KvCache::new(layers, None).map_err(|e| FormatError::Inconsistent(e.to_string()))
}

/// Decodes one section (for pipelined restore): checks its crc32c, then returns its codes.
pub fn decode_section(
    header: &ChunkHeader,
    index: usize,
    section_bytes: &[u8],
    registry: &CodecRegistry,
) -> Result<CodePlane, FormatError> {
    let s = section(header, index)?;
    s.verify(section_bytes)?;
    let plane = registry
        .decoder(header.variant)?
        .decode(s.shape, &s.params, section_bytes)?;
    if plane.shape != s.shape || !plane.is_valid() {
        return Err(CodecError::Corrupt {
            variant: header.variant.name(),
            reason: format!("decoded {:?}, header says {:?}", plane.shape, s.shape),
        }
        .into());
    }
    Ok(plane)
}

/// Turns a decoded section's codes into per-layer K/V tensors of `header.dtype` (dequantized, or
/// the exact bytes reassembled from byte planes).
pub fn restore_section(
    header: &ChunkHeader,
    index: usize,
    plane: &CodePlane,
    registry: &CodecRegistry,
) -> Result<Vec<LayerKv>, FormatError> {
    let s = section(header, index)?;
    if let Some(t) = &header.transform {
        let profile = registry.profile(&t.profile)?;
        return restore_transform_section(header, index, plane, profile, t);
    }
    if s.shape != header.section_shape(s.layers(), s.shape.bits) {
        return Err(FormatError::Inconsistent(format!(
            "section {index} shape {:?} does not match the header",
            s.shape
        )));
    }
    if plane.shape != s.shape || plane.codes.len() != s.shape.len() {
        return Err(FormatError::Inconsistent(format!(
            "plane {:?} with {} codes for section {index} of shape {:?}",
            plane.shape,
            plane.codes.len(),
            s.shape
        )));
    }
    let (tokens, channels) = (header.token_count as usize, header.channels());
    let shape = [
        tokens,
        usize::from(header.kv_heads),
        usize::from(header.head_dim),
    ];
    let planes = header.planes();
    let mut values = Vec::new();
    let mut layers = Vec::with_capacity(s.layers());
    for li in 0..s.layers() {
        let mut kv = Vec::with_capacity(2);
        for half in 0..2 {
            let mut bytes = Vec::new();
            if header.exact {
                bytes = vec![0u8; tokens * channels * planes];
                for b in 0..planes {
                    let codes = plane.tensor((li * 2 + half) * planes + b);
                    for (dst, &c) in bytes.iter_mut().skip(b).step_by(planes).zip(codes) {
                        *dst = u8::try_from(c).map_err(|_| {
                            FormatError::Inconsistent(format!("exact-mode code {c} exceeds a byte"))
                        })?;
                    }
                }
            } else {
                let q = s.quant.get(li).ok_or_else(|| {
                    FormatError::Inconsistent(format!("no parameters for layer {li}"))
                })?;
                let (params, grouping) = if half == 0 {
                    (&q.key, header.key_grouping)
                } else {
                    (&q.value, header.value_grouping)
                };
                dequantize(
                    plane.tensor(li * 2 + half),
                    tokens,
                    channels,
                    grouping,
                    params,
                    &mut values,
                )?;
                header.dtype.encode_f32(&values, &mut bytes);
            }
            kv.push(
                Tensor::new(header.dtype, shape, bytes)
                    .map_err(|e| FormatError::Inconsistent(e.to_string()))?,
            );
        }
        let value = kv.pop().expect("two tensors");
        let key = kv.pop().expect("two tensors");
        layers.push(LayerKv { key, value });
    }
    Ok(layers)
}

fn section(header: &ChunkHeader, index: usize) -> Result<&SectionInfo, FormatError> {
    header.sections.get(index).ok_or_else(|| {
        FormatError::Inconsistent(format!("no section {index} of {}", header.sections.len()))
    })
}

/// Tokens `start..end` of a cache, as one chunk with its key.
struct ChunkSpan {
    key: ChunkKey,
    start: usize,
    end: usize,
}

/// Encodes tokens `span` of `cache` as one transform-coded object (format version 2).
fn encode_transform_chunk(
    cache: &KvCache,
    span: &ChunkSpan,
    model: &ModelFingerprint,
    groups: &[(usize, usize, u8)],
    cfg: &TransformConfig,
    profile_id: ProfileId,
) -> Result<Vec<u8>, FormatError> {
    let profile = &cfg.profile;
    let (start, end) = (span.start, span.end);
    let sink_rows = usize::from(profile.sinks).min(end).saturating_sub(start);
    let (tokens, channels) = (end - start, cache.kv_heads() * cache.head_dim());
    let row = channels * 2;
    let first = (start + sink_rows) as u32;
    let angles = RopeTable::new(profile, first, tokens - sink_rows);
    let encoded = groups
        .par_iter()
        .map(|&(l0, l1, _)| {
            let shape = crate::PlaneShape {
                bits: TRANSFORM_CODE_BITS,
                tensors: (l1 - l0) * 2,
                rows: tokens,
                cols: channels,
            };
            let mut codes = Vec::with_capacity(shape.len());
            let mut contexts = Vec::with_capacity(shape.tensors);
            let (mut values, mut coeffs) = (Vec::new(), Vec::new());
            for layer in l0..l1 {
                let kv = &cache.layers()[layer];
                for (is_key, t) in [(true, &kv.key), (false, &kv.value)] {
                    let bytes = &t.data()[start * row..end * row];
                    let step = if is_key {
                        cfg.steps[layer].0
                    } else {
                        cfg.steps[layer].1
                    };
                    codes.extend(
                        bytes[..sink_rows * row]
                            .chunks_exact(2)
                            .map(|b| u16::from_le_bytes([b[0], b[1]])),
                    );
                    cache
                        .dtype()
                        .decode_f32(&bytes[sink_rows * row..], &mut values);
                    let at = TensorAt {
                        layer,
                        is_key,
                        first_position: first,
                    };
                    forward_with(profile, at, &angles, &values, &mut coeffs);
                    quantize_codes(&coeffs, step, &mut codes);
                    contexts.push(
                        profile
                            .component_std(layer, is_key)
                            .iter()
                            .map(|&sd| context(sd, step))
                            .collect(),
                    );
                }
            }
            let plane = CodePlane { shape, codes };
            let enc = crate::rans_variant::encode_rans_section(&plane, sink_rows, &contexts)?;
            Ok((l0, l1, shape, enc))
        })
        .collect::<Result<Vec<_>, FormatError>>()?;
    let mut header = ChunkHeader {
        key: span.key,
        model: *model,
        token_start: u32::try_from(start)
            .map_err(|_| FormatError::InvalidInput(format!("token {start} is beyond u32")))?,
        token_count: tokens as u32,
        num_layers: cache.num_layers() as u16,
        kv_heads: cache.kv_heads() as u16,
        head_dim: cache.head_dim() as u16,
        dtype: cache.dtype(),
        variant: VariantKind::Rans,
        exact: false,
        key_grouping: Grouping::PerChannel,
        value_grouping: Grouping::PerChannel,
        sections: Vec::with_capacity(encoded.len()),
        transform: Some(TransformInfo {
            profile: profile_id,
            sink_tokens: sink_rows as u16,
            steps: cfg.steps.clone(),
        }),
    };
    for (l0, l1, shape, enc) in &encoded {
        header.sections.push(SectionInfo {
            layer_start: *l0 as u16,
            layer_end: *l1 as u16,
            offset: 0,
            len: enc.payload.len() as u64,
            crc32c: crc32c::crc32c(&enc.payload),
            shape: *shape,
            params: enc.params.clone(),
            quant: Vec::new(),
        });
    }
    write_object(header, encoded.iter().map(|(.., enc)| &enc.payload[..]))
}

/// A transform-coded section's codes back to K/V: sink rows as stored, the other rows
/// dequantized, inverse-transformed and RoPE'd again with `profile`.
fn restore_transform_section(
    header: &ChunkHeader,
    index: usize,
    plane: &CodePlane,
    profile: &CodecProfile,
    t: &TransformInfo,
) -> Result<Vec<LayerKv>, FormatError> {
    // The chunk names the profile by the hash of its bytes, so the profile is the one it was
    // coded with; its model fingerprint is the model *file's*, while a chunk's may also name
    // the engine's cache settings (see `profile_model`).
    let s = section(header, index)?;
    profile.check_shape(
        usize::from(header.num_layers),
        usize::from(header.kv_heads),
        usize::from(header.head_dim),
    )?;
    let (sink_rows, _) = crate::rans_variant::parse_rans_params(s.shape, &s.params)?;
    if sink_rows != usize::from(t.sink_tokens) {
        return Err(FormatError::Inconsistent(format!(
            "section {index} has {sink_rows} sink rows, the header {}",
            t.sink_tokens
        )));
    }
    if plane.shape != s.shape || plane.codes.len() != s.shape.len() {
        return Err(FormatError::Inconsistent(format!(
            "plane {:?} for section {index} of shape {:?}",
            plane.shape, s.shape
        )));
    }
    let (tokens, channels) = (header.token_count as usize, header.channels());
    let shape = [
        tokens,
        usize::from(header.kv_heads),
        usize::from(header.head_dim),
    ];
    let (mut coeffs, mut values) = (Vec::new(), Vec::new());
    let first = header.token_start + sink_rows as u32;
    let angles = RopeTable::new(profile, first, tokens - sink_rows);
    let mut layers = Vec::with_capacity(s.layers());
    for li in 0..s.layers() {
        let layer = usize::from(s.layer_start) + li;
        let mut kv = Vec::with_capacity(2);
        for (half, is_key) in [(0, true), (1, false)] {
            let codes = plane.tensor(li * 2 + half);
            let (sinks, rest) = codes.split_at(sink_rows * channels);
            let mut bytes = Vec::with_capacity(tokens * channels * 2);
            for c in sinks {
                bytes.extend_from_slice(&c.to_le_bytes());
            }
            let step = if is_key {
                t.steps[layer].0
            } else {
                t.steps[layer].1
            };
            coeffs.clear();
            coeffs.extend(
                rest.iter()
                    .map(|&z| dequantize_level(crate::rans_variant::unzigzag(z), step)),
            );
            let at = TensorAt {
                layer,
                is_key,
                first_position: first,
            };
            inverse_with(profile, at, &angles, &coeffs, &mut values);
            let mut tail = Vec::new();
            header.dtype.encode_f32(&values, &mut tail);
            bytes.extend_from_slice(&tail);
            kv.push(
                Tensor::new(header.dtype, shape, bytes)
                    .map_err(|e| FormatError::Inconsistent(e.to_string()))?,
            );
        }
        let value = kv.pop().expect("two tensors");
        let key = kv.pop().expect("two tensors");
        layers.push(LayerKv { key, value });
    }
    Ok(layers)
}
