//! The chunk object format: header, section table and sections, little-endian, versioned.
//!
//! Byte-for-byte description in docs/FORMAT.md. This module parses and writes headers, checks
//! every field against the others and against the limits below (so an attacker-controlled
//! header cannot make a reader allocate or loop beyond them), and verifies section checksums.
//! It does not quantize or decode sections (see `chunk`).

use std::fmt;

use kvfetcher_kv::DType;

use crate::{
    ChunkKey, FormatError, GroupParams, Grouping, LayerQuant, ModelFingerprint, PlaneShape,
    ProfileId, VariantKind,
};

/// The first four bytes of every chunk object.
pub const MAGIC: [u8; 4] = *b"KVFC";
/// The newest format version this build writes and reads: 2 adds transform-coded chunks
/// (flag bit 1 and the transform block). Chunks without a transform are still written as 1, so
/// every reader of version 1 reads them; both versions are read.
pub const FORMAT_VERSION: u16 = 2;
/// The version of chunks without a transform.
const FORMAT_VERSION_PLAIN: u16 = 1;
/// Bytes of the fixed part of the header, before the section table.
pub const FIXED_HEADER_LEN: usize = 104;
/// Bytes of a transform block before its per-layer steps.
const TRANSFORM_FIXED_LEN: usize = 36;
/// Bytes of one section table entry.
pub const SECTION_ENTRY_LEN: usize = 32;
/// Most layers in a chunk (the largest open models have about 130).
pub const MAX_LAYERS: usize = 1024;
/// Most KV heads per layer.
pub const MAX_KV_HEADS: usize = 1024;
/// Largest head dimension (MLA latents are 576).
pub const MAX_HEAD_DIM: usize = 4096;
/// Most channels (kv_heads x head_dim) per layer.
pub const MAX_CHANNELS: usize = 65536;
/// Most tokens in one chunk.
pub const MAX_CHUNK_TOKENS: usize = 65536;
/// Most bytes of variant parameters per section.
pub const MAX_SECTION_PARAMS: usize = 1 << 20;
/// Largest header: bounds what a reader buffers before it can check the header's crc.
pub const MAX_HEADER_LEN: usize = 16 << 20;
/// Most codes in one chunk, over all sections: bounds what decoding a forged header can make a
/// reader allocate (2 bytes per code, plus the restored tensors). A 256-token chunk of a
/// 126-layer model with 8 x 128 channels holds 66 M codes, 132 M in exact bf16.
pub const MAX_CHUNK_CODES: u64 = 1 << 28;
/// Largest object.
pub const MAX_OBJECT_LEN: u64 = 4 << 30;

/// Flag bit: the chunk is bit-exact (codes are byte planes of the raw values).
const FLAG_EXACT: u16 = 1;
/// Flag bit (version 2): the chunk is transform-coded; a transform block ends the header.
const FLAG_TRANSFORM: u16 = 2;
/// Bit width recorded for the sections of a transform-coded chunk: their codes are 16-bit
/// (zigzagged levels, or the raw bits of sink tokens).
pub const TRANSFORM_CODE_BITS: u8 = 16;

/// What a transform-coded chunk needs beyond the plain header: the profile, the sinks it holds
/// and each layer's steps (the allocation).
#[derive(Debug, Clone, PartialEq)]
pub struct TransformInfo {
    /// The profile the chunk was coded with.
    pub profile: ProfileId,
    /// Leading rows of this chunk that are attention sinks, stored exactly.
    pub sink_tokens: u16,
    /// Per layer, the K and V quantizer steps.
    pub steps: Vec<(f32, f32)>,
}

/// One section: the codes of a group of consecutive layers, encoded by the chunk's variant.
#[derive(Debug, Clone, PartialEq)]
pub struct SectionInfo {
    /// First layer.
    pub layer_start: u16,
    /// One past the last layer.
    pub layer_end: u16,
    /// Where the payload starts, from the start of the object.
    pub offset: u64,
    /// Payload bytes.
    pub len: u64,
    /// crc32c of the payload.
    pub crc32c: u32,
    /// The code plane the payload decodes to (derived from the header; `bits` is stored).
    pub shape: PlaneShape,
    /// The variant's parameters (for hevc: layout and frame geometry); empty for packed/zstd.
    pub params: Vec<u8>,
    /// Per layer of the section, K and V quantization parameters; empty in exact mode.
    pub quant: Vec<LayerQuant>,
}

impl SectionInfo {
    /// Number of layers in the section.
    pub fn layers(&self) -> usize {
        usize::from(self.layer_end.saturating_sub(self.layer_start))
    }

    /// Checks that `section_bytes` is this section's payload (length and crc32c).
    pub fn verify(&self, section_bytes: &[u8]) -> Result<(), FormatError> {
        if section_bytes.len() as u64 != self.len {
            return Err(FormatError::Inconsistent(format!(
                "section of layers {}..{} is {} bytes, header says {}",
                self.layer_start,
                self.layer_end,
                section_bytes.len(),
                self.len
            )));
        }
        if crc32c::crc32c(section_bytes) != self.crc32c {
            return Err(FormatError::Checksum {
                what: format!("section of layers {}..{}", self.layer_start, self.layer_end),
            });
        }
        Ok(())
    }
}

/// The header of a chunk object: everything needed to decode and restore its sections.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkHeader {
    /// The chunk's key.
    pub key: ChunkKey,
    /// The model whose KV this is.
    pub model: ModelFingerprint,
    /// Index of the chunk's first token in the sequence.
    pub token_start: u32,
    /// Tokens in the chunk.
    pub token_count: u32,
    /// Layers in the chunk (all of the model's).
    pub num_layers: u16,
    /// KV heads per layer.
    pub kv_heads: u16,
    /// Dimension of one head.
    pub head_dim: u16,
    /// Element type of the original (and restored) tensors.
    pub dtype: DType,
    /// The variant every section is encoded with.
    pub variant: VariantKind,
    /// Bit-exact mode: codes are byte planes and restoring gives the original bytes.
    pub exact: bool,
    /// Grouping of K's quantization parameters (ignored in exact mode).
    pub key_grouping: Grouping,
    /// Grouping of V's quantization parameters (ignored in exact mode).
    pub value_grouping: Grouping,
    /// Sections in layer order, covering layers `0..num_layers`.
    pub sections: Vec<SectionInfo>,
    /// Transform coding (version 2): profile, sinks and steps; `None` for plain chunks.
    pub transform: Option<TransformInfo>,
}

impl ChunkHeader {
    /// Channels per token and layer: kv_heads x head_dim.
    pub fn channels(&self) -> usize {
        usize::from(self.kv_heads) * usize::from(self.head_dim)
    }

    /// Byte planes per value: the dtype's size in exact mode, else 1.
    pub fn planes(&self) -> usize {
        if self.exact {
            self.dtype.size()
        } else {
            1
        }
    }

    /// The shape a section of `layers` layers at `bits` bits must have.
    pub fn section_shape(&self, layers: usize, bits: u8) -> PlaneShape {
        PlaneShape {
            bits,
            tensors: layers * 2 * self.planes(),
            rows: self.token_count as usize,
            cols: self.channels(),
        }
    }

    /// Bytes of the serialized header, crc included.
    pub fn encoded_len(&self) -> usize {
        let mut n = FIXED_HEADER_LEN + SECTION_ENTRY_LEN * self.sections.len() + 4;
        for s in &self.sections {
            n += s.params.len();
            for q in &s.quant {
                n += 8 * (q.key.len() + q.value.len());
            }
        }
        if let Some(t) = &self.transform {
            n += TRANSFORM_FIXED_LEN + 8 * t.steps.len();
        }
        n
    }

    /// The format version this header is written with.
    pub fn version(&self) -> u16 {
        if self.transform.is_some() {
            FORMAT_VERSION
        } else {
            FORMAT_VERSION_PLAIN
        }
    }

    /// Total bytes of the whole object (header and sections).
    pub fn object_len(&self) -> u64 {
        self.sections.last().map_or(self.encoded_len() as u64, |s| {
            s.offset.saturating_add(s.len)
        })
    }

    /// Parses the header from the start of an object (which may be incomplete: streaming).
    ///
    /// `Err(FormatError::Truncated { needed, .. })` says how many bytes are needed to go on:
    /// [`FIXED_HEADER_LEN`] before the header's length is known, then the whole header.
    /// Returns the header and its length in bytes (where the first section starts).
    pub fn parse_prefix(bytes: &[u8]) -> Result<(ChunkHeader, usize), FormatError> {
        let n = bytes.len().min(MAGIC.len());
        if bytes[..n] != MAGIC[..n] {
            return Err(FormatError::BadMagic);
        }
        if bytes.len() < 12 {
            return Err(FormatError::Truncated {
                needed: FIXED_HEADER_LEN,
                got: bytes.len(),
            });
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if !(FORMAT_VERSION_PLAIN..=FORMAT_VERSION).contains(&version) {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let header_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        if header_len > MAX_HEADER_LEN {
            return Err(FormatError::TooLarge {
                what: "header length",
                value: header_len as u64,
                max: MAX_HEADER_LEN as u64,
            });
        }
        if header_len < FIXED_HEADER_LEN + SECTION_ENTRY_LEN + 4 {
            return Err(FormatError::Inconsistent(format!(
                "header length {header_len} is below the minimum"
            )));
        }
        if bytes.len() < header_len {
            return Err(FormatError::Truncated {
                needed: header_len,
                got: bytes.len(),
            });
        }
        let body = &bytes[..header_len - 4];
        let stored = u32::from_le_bytes(
            bytes[header_len - 4..header_len]
                .try_into()
                .expect("4 bytes"),
        );
        if crc32c::crc32c(body) != stored {
            return Err(FormatError::Checksum {
                what: "header".into(),
            });
        }
        let header = parse_body(body)?;
        header.validate(header_len)?;
        Ok((header, header_len))
    }

    /// Serializes the header (its sections' offsets must already be set), checking it first.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FormatError> {
        let header_len = self.encoded_len();
        if header_len > MAX_HEADER_LEN {
            return Err(FormatError::TooLarge {
                what: "header length",
                value: header_len as u64,
                max: MAX_HEADER_LEN as u64,
            });
        }
        self.validate(header_len)?;
        let mut out = Vec::with_capacity(header_len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version().to_le_bytes());
        let flags = if self.exact { FLAG_EXACT } else { 0 }
            | if self.transform.is_some() {
                FLAG_TRANSFORM
            } else {
                0
            };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&(header_len as u32).to_le_bytes());
        out.extend_from_slice(&self.key.0);
        out.extend_from_slice(&self.model.0);
        out.extend_from_slice(&self.token_start.to_le_bytes());
        out.extend_from_slice(&self.token_count.to_le_bytes());
        out.extend_from_slice(&self.num_layers.to_le_bytes());
        out.extend_from_slice(&self.kv_heads.to_le_bytes());
        out.extend_from_slice(&self.head_dim.to_le_bytes());
        out.push(self.dtype.code());
        out.push(self.variant as u8);
        let (kg, vg) = if self.exact {
            (0, 0)
        } else {
            (self.key_grouping.code(), self.value_grouping.code())
        };
        out.push(kg);
        out.push(vg);
        out.extend_from_slice(&(self.sections.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.object_len().to_le_bytes());
        debug_assert_eq!(out.len(), FIXED_HEADER_LEN);
        for s in &self.sections {
            out.extend_from_slice(&s.layer_start.to_le_bytes());
            out.extend_from_slice(&s.layer_end.to_le_bytes());
            out.push(s.shape.bits);
            out.extend_from_slice(&[0; 3]);
            out.extend_from_slice(&s.offset.to_le_bytes());
            out.extend_from_slice(&s.len.to_le_bytes());
            out.extend_from_slice(&s.crc32c.to_le_bytes());
            out.extend_from_slice(&(s.params.len() as u32).to_le_bytes());
        }
        for s in &self.sections {
            out.extend_from_slice(&s.params);
            for q in &s.quant {
                for g in [&q.key, &q.value] {
                    for (m, sc) in g.min.iter().zip(&g.scale) {
                        out.extend_from_slice(&m.to_le_bytes());
                        out.extend_from_slice(&sc.to_le_bytes());
                    }
                }
            }
        }
        if let Some(t) = &self.transform {
            out.extend_from_slice(&t.profile.0);
            out.extend_from_slice(&t.sink_tokens.to_le_bytes());
            out.extend_from_slice(&[0, 0]);
            for (k, v) in &t.steps {
                out.extend_from_slice(&k.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len(), header_len);
        Ok(out)
    }

    /// Checks every field against the others and the limits; `header_len` is where the first
    /// section must start.
    fn validate(&self, header_len: usize) -> Result<(), FormatError> {
        let bad = |m: String| Err(FormatError::Inconsistent(m));
        self.check_dims()?;
        limit(
            "sections",
            self.sections.len(),
            usize::from(self.num_layers),
        )?;
        let (mut next_layer, mut next_offset, mut codes) = (0u16, header_len as u64, 0u64);
        for (i, s) in self.sections.iter().enumerate() {
            if s.layer_start != next_layer || s.layer_end <= s.layer_start {
                return bad(format!(
                    "section {i} covers layers {}..{}, expected to start at {next_layer}",
                    s.layer_start, s.layer_end
                ));
            }
            next_layer = s.layer_end;
            if next_layer > self.num_layers {
                return bad(format!(
                    "section {i} ends at layer {next_layer} of {}",
                    self.num_layers
                ));
            }
            let bits_ok = if self.exact {
                s.shape.bits == 8
            } else if self.transform.is_some() {
                s.shape.bits == TRANSFORM_CODE_BITS
            } else {
                (crate::MIN_BITS..=crate::MAX_BITS).contains(&s.shape.bits)
            };
            if !bits_ok {
                return bad(format!("section {i} has {} bits", s.shape.bits));
            }
            if s.shape != self.section_shape(s.layers(), s.shape.bits) {
                return bad(format!(
                    "section {i} shape {:?} does not match the header",
                    s.shape
                ));
            }
            codes += s.shape.len() as u64;
            if codes > MAX_CHUNK_CODES {
                return Err(FormatError::TooLarge {
                    what: "codes in the chunk",
                    value: codes,
                    max: MAX_CHUNK_CODES,
                });
            }
            limit(
                "section parameter bytes",
                s.params.len(),
                MAX_SECTION_PARAMS,
            )?;
            self.validate_quant(i, s)?;
            if s.offset != next_offset {
                return bad(format!(
                    "section {i} starts at {}, expected {next_offset}",
                    s.offset
                ));
            }
            next_offset = match s.offset.checked_add(s.len) {
                Some(end) if end <= MAX_OBJECT_LEN => end,
                _ => {
                    return Err(FormatError::TooLarge {
                        what: "object length",
                        value: s.offset.saturating_add(s.len),
                        max: MAX_OBJECT_LEN,
                    })
                }
            };
        }
        if next_layer != self.num_layers {
            return bad(format!(
                "sections cover layers 0..{next_layer} of {}",
                self.num_layers
            ));
        }
        self.validate_transform()
    }

    /// A transform block goes with the rans variant and a lossy chunk; its steps cover every
    /// layer and are positive; its sinks fit the chunk.
    fn validate_transform(&self) -> Result<(), FormatError> {
        let bad = |m: String| Err(FormatError::Inconsistent(m));
        let Some(t) = &self.transform else {
            if self.variant == VariantKind::Rans {
                return bad("the rans variant needs a transform block".into());
            }
            return Ok(());
        };
        if self.exact || self.variant != VariantKind::Rans {
            return bad(format!(
                "a transform block in a {} chunk",
                if self.exact {
                    "bit-exact"
                } else {
                    self.variant.name()
                }
            ));
        }
        if self.dtype.size() != 2 {
            return bad(format!(
                "transform coding needs a 16-bit dtype, not {}",
                self.dtype.safetensors_name()
            ));
        }
        if t.steps.len() != usize::from(self.num_layers) {
            return bad(format!(
                "{} layer steps for {} layers",
                t.steps.len(),
                self.num_layers
            ));
        }
        if t.steps
            .iter()
            .any(|&(k, v)| !(k.is_finite() && k > 0.0 && v.is_finite() && v > 0.0))
        {
            return bad("a layer step is not a positive number".into());
        }
        if u32::from(t.sink_tokens) > self.token_count {
            return bad(format!(
                "{} sink tokens in a chunk of {}",
                t.sink_tokens, self.token_count
            ));
        }
        Ok(())
    }

    /// Checks the dimensions against the limits (before anything is sized from them).
    fn check_dims(&self) -> Result<(), FormatError> {
        limit("layers", usize::from(self.num_layers), MAX_LAYERS)?;
        limit("kv heads", usize::from(self.kv_heads), MAX_KV_HEADS)?;
        limit("head dim", usize::from(self.head_dim), MAX_HEAD_DIM)?;
        limit("channels", self.channels(), MAX_CHANNELS)?;
        limit("chunk tokens", self.token_count as usize, MAX_CHUNK_TOKENS)?;
        if self.num_layers == 0 || self.kv_heads == 0 || self.head_dim == 0 || self.token_count == 0
        {
            return Err(FormatError::Inconsistent(
                "layers, kv heads, head dim and tokens must all be nonzero".into(),
            ));
        }
        if self.token_start.checked_add(self.token_count).is_none() {
            return Err(FormatError::Inconsistent(
                "token range overflows u32".into(),
            ));
        }
        Ok(())
    }

    fn validate_quant(&self, i: usize, s: &SectionInfo) -> Result<(), FormatError> {
        let bad = |m: String| Err(FormatError::Inconsistent(format!("section {i}: {m}")));
        if self.exact || self.transform.is_some() {
            if !s.quant.is_empty() {
                return bad(
                    "per-group quantization parameters in an exact or transform chunk".into(),
                );
            }
            return Ok(());
        }
        if s.quant.len() != s.layers() {
            return bad(format!(
                "{} layers of quantization parameters for {} layers",
                s.quant.len(),
                s.layers()
            ));
        }
        let (t, c) = (self.token_count as usize, self.channels());
        for q in &s.quant {
            for (g, grouping) in [(&q.key, self.key_grouping), (&q.value, self.value_grouping)] {
                let want = grouping.groups(t, c);
                if g.min.len() != want || g.scale.len() != want {
                    return bad(format!("{} groups, expected {want}", g.min.len()));
                }
                if !g.min.iter().all(|m| m.is_finite())
                    || !g.scale.iter().all(|s| s.is_finite() && *s >= 0.0)
                {
                    return bad("non-finite minimum or negative scale".into());
                }
            }
        }
        Ok(())
    }
}

fn limit(what: &'static str, value: usize, max: usize) -> Result<(), FormatError> {
    if value > max {
        return Err(FormatError::TooLarge {
            what,
            value: value as u64,
            max: max as u64,
        });
    }
    Ok(())
}

/// Reads little-endian fields from a header whose length and crc were checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                FormatError::Inconsistent(format!(
                    "header fields overrun the header length {}",
                    self.bytes.len() + 4
                ))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn groups(&mut self, n: usize) -> Result<GroupParams, FormatError> {
        let raw = self.take(
            n.checked_mul(8)
                .ok_or_else(|| FormatError::Inconsistent("group count overflows".into()))?,
        )?;
        let f = |b: &[u8]| f32::from_le_bytes(b.try_into().expect("4 bytes"));
        Ok(GroupParams {
            min: raw.chunks_exact(8).map(|p| f(&p[..4])).collect(),
            scale: raw.chunks_exact(8).map(|p| f(&p[4..])).collect(),
        })
    }
}

/// Parses the header body (everything but the trailing crc) into fields; `validate` checks them.
fn parse_body(body: &[u8]) -> Result<ChunkHeader, FormatError> {
    let bad = |m: String| FormatError::Inconsistent(m);
    let mut r = Reader {
        bytes: body,
        pos: 8,
    };
    r.u32()?; // header length, checked by the caller
    let version = u16::from_le_bytes([body[4], body[5]]);
    let flags = u16::from_le_bytes([body[6], body[7]]);
    let known = if version >= 2 {
        FLAG_EXACT | FLAG_TRANSFORM
    } else {
        FLAG_EXACT
    };
    if flags & !known != 0 {
        return Err(bad(format!(
            "unknown flags {flags:#06x} for format version {version}"
        )));
    }
    let exact = flags & FLAG_EXACT != 0;
    let transform = flags & FLAG_TRANSFORM != 0;
    let key = ChunkKey(r.array()?);
    let model = ModelFingerprint(r.array()?);
    let token_start = r.u32()?;
    let token_count = r.u32()?;
    let num_layers = r.u16()?;
    let kv_heads = r.u16()?;
    let head_dim = r.u16()?;
    let dtype = r.u8()?;
    let dtype =
        DType::from_code(dtype).ok_or_else(|| bad(format!("unknown dtype code {dtype}")))?;
    let variant = r.u8()?;
    let variant = VariantKind::from_code(variant)
        .ok_or_else(|| bad(format!("unknown variant code {variant}")))?;
    let (kg, vg) = (r.u8()?, r.u8()?);
    let key_grouping =
        Grouping::from_code(kg).ok_or_else(|| bad(format!("unknown grouping code {kg}")))?;
    let value_grouping =
        Grouping::from_code(vg).ok_or_else(|| bad(format!("unknown grouping code {vg}")))?;
    if exact && (kg, vg) != (0, 0) {
        return Err(bad("grouping set in exact mode".into()));
    }
    let section_count = usize::from(r.u16()?);
    let object_len = r.u64()?;
    let mut header = ChunkHeader {
        key,
        model,
        token_start,
        token_count,
        num_layers,
        kv_heads,
        head_dim,
        dtype,
        variant,
        exact,
        key_grouping,
        value_grouping,
        sections: Vec::new(),
        transform: None,
    };
    header.check_dims()?;
    if section_count == 0 {
        return Err(bad("no sections".into()));
    }
    limit("sections", section_count, usize::from(num_layers))?;
    // The table must fit in the header before anything is allocated for it.
    let table = r.take(section_count * SECTION_ENTRY_LEN)?;
    let mut params_lens = Vec::with_capacity(section_count);
    for e in table.chunks_exact(SECTION_ENTRY_LEN) {
        let mut t = Reader { bytes: e, pos: 0 };
        let layer_start = t.u16()?;
        let layer_end = t.u16()?;
        let bits = t.u8()?;
        if t.take(3)? != [0, 0, 0] {
            return Err(bad("reserved section bytes are not zero".into()));
        }
        let offset = t.u64()?;
        let len = t.u64()?;
        let crc32c = t.u32()?;
        params_lens.push(t.u32()? as usize);
        let layers = usize::from(layer_end.saturating_sub(layer_start));
        header.sections.push(SectionInfo {
            layer_start,
            layer_end,
            offset,
            len,
            crc32c,
            shape: header.section_shape(layers, bits),
            params: Vec::new(),
            quant: Vec::new(),
        });
    }
    let (t, c) = (token_count as usize, header.channels());
    let (kgroups, vgroups) = (key_grouping.groups(t, c), value_grouping.groups(t, c));
    for (s, plen) in header.sections.iter_mut().zip(params_lens) {
        limit("section parameter bytes", plen, MAX_SECTION_PARAMS)?;
        s.params = r.take(plen)?.to_vec();
        if !exact && !transform {
            for _ in 0..s.layers() {
                // Each read is bounded by the bytes actually present in the header.
                let key = r.groups(kgroups)?;
                let value = r.groups(vgroups)?;
                s.quant.push(LayerQuant { key, value });
            }
        }
    }
    if transform {
        let profile = ProfileId(r.array()?);
        let sink_tokens = r.u16()?;
        if r.u16()? != 0 {
            return Err(bad("reserved transform bytes are not zero".into()));
        }
        let raw = r.take(usize::from(num_layers) * 8)?;
        let f = |b: &[u8]| f32::from_le_bytes(b.try_into().expect("4 bytes"));
        let steps = raw
            .chunks_exact(8)
            .map(|p| (f(&p[..4]), f(&p[4..])))
            .collect();
        header.transform = Some(TransformInfo {
            profile,
            sink_tokens,
            steps,
        });
    }
    if r.pos != body.len() {
        return Err(bad(format!(
            "{} unused bytes at the end of the header",
            body.len() - r.pos
        )));
    }
    if header.object_len() != object_len {
        return Err(bad(format!(
            "object length {object_len} does not match its sections ({})",
            header.object_len()
        )));
    }
    Ok(header)
}

/// A whole chunk object in memory, its header parsed and its sizes consistent.
#[derive(Clone)]
pub struct ChunkView<'a> {
    header: ChunkHeader,
    header_len: usize,
    bytes: &'a [u8],
}

impl fmt::Debug for ChunkView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkView")
            .field("header", &self.header)
            .field("header_len", &self.header_len)
            .field("object_len", &self.bytes.len())
            .finish()
    }
}

impl<'a> ChunkView<'a> {
    /// Parses the header and checks that `bytes` is exactly the object it describes.
    pub fn parse(bytes: &'a [u8]) -> Result<ChunkView<'a>, FormatError> {
        let (header, header_len) = ChunkHeader::parse_prefix(bytes)?;
        let total = header.object_len();
        if (bytes.len() as u64) < total {
            return Err(FormatError::Truncated {
                needed: total as usize,
                got: bytes.len(),
            });
        }
        if bytes.len() as u64 > total {
            return Err(FormatError::Inconsistent(format!(
                "{} bytes after the object's end",
                bytes.len() as u64 - total
            )));
        }
        Ok(ChunkView {
            header,
            header_len,
            bytes,
        })
    }

    /// Checks every section's crc32c.
    pub fn verify(&self) -> Result<(), FormatError> {
        for (i, s) in self.header.sections.iter().enumerate() {
            s.verify(self.section_bytes(i))?;
        }
        Ok(())
    }

    /// The parsed header.
    pub fn header(&self) -> &ChunkHeader {
        &self.header
    }

    /// Bytes of the header (where the first section starts).
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The whole object.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The payload of section `i`. Panics if `i >= header().sections.len()`.
    pub fn section_bytes(&self, i: usize) -> &'a [u8] {
        let s = &self.header.sections[i];
        // `parse` checked that every section lies inside `bytes`.
        &self.bytes[s.offset as usize..(s.offset + s.len) as usize]
    }
}
