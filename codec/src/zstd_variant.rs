//! The `zstd` variant: codes as bytes (`bits <= 8`) or u16 little-endian, one zstd frame.
//!
//! The frame records its content size; the decoder checks it against the shape from the chunk
//! header before allocating, and never trusts any other length from the payload. No parameters.

use crate::variant::check_plain_section;
use crate::{
    CodePlane, CodecError, EncodedSection, PlaneShape, SectionDecoder, SectionEncoder, VariantKind,
};

/// The default compression level. Measured on codelm-kv-a (docs/FORMAT.md has the table): level 1
/// gives 4.72x vs fp16 at 4 bits and 2.13x at 8 bits; levels 3-12 are slower and no smaller
/// (4.15-4.39x at 4 bits); 15-19 gain about 2% at 50-100x the encode time. Offline encoders that
/// want those 2% register `ZstdCodec::new(19)`.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

const NAME: &str = "zstd";

/// Encoder and decoder of [`VariantKind::Zstd`].
#[derive(Debug, Clone, Copy)]
pub struct ZstdCodec {
    level: i32,
}

impl Default for ZstdCodec {
    fn default() -> Self {
        ZstdCodec {
            level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

impl ZstdCodec {
    /// An encoder at compression `level` (clamped to zstd's range, 1..=22 for positive levels).
    pub fn new(level: i32) -> ZstdCodec {
        let range = zstd::compression_level_range();
        ZstdCodec {
            level: level.clamp(*range.start(), *range.end()),
        }
    }

    /// The compression level.
    pub fn level(&self) -> i32 {
        self.level
    }
}

/// Bytes per code in the uncompressed stream.
fn width(bits: u8) -> usize {
    if bits <= 8 {
        1
    } else {
        2
    }
}

impl SectionEncoder for ZstdCodec {
    fn variant(&self) -> VariantKind {
        VariantKind::Zstd
    }

    fn encode(&self, plane: &CodePlane) -> Result<EncodedSection, CodecError> {
        if !plane.is_valid() {
            return Err(CodecError::InvalidCodes(format!(
                "codes do not fit {:?}",
                plane.shape
            )));
        }
        let raw: Vec<u8> = if width(plane.shape.bits) == 1 {
            plane.codes.iter().map(|&c| c as u8).collect()
        } else {
            plane.codes.iter().flat_map(|c| c.to_le_bytes()).collect()
        };
        let payload = zstd::bulk::compress(&raw, self.level).map_err(|e| CodecError::Library {
            library: "zstd",
            reason: e.to_string(),
        })?;
        Ok(EncodedSection {
            params: Vec::new(),
            payload,
        })
    }
}

impl SectionDecoder for ZstdCodec {
    fn variant(&self) -> VariantKind {
        VariantKind::Zstd
    }

    fn decode(
        &self,
        shape: PlaneShape,
        params: &[u8],
        payload: &[u8],
    ) -> Result<CodePlane, CodecError> {
        let corrupt = |reason: String| CodecError::Corrupt {
            variant: NAME,
            reason,
        };
        check_plain_section(NAME, shape, params)?;
        let want = shape
            .len()
            .checked_mul(width(shape.bits))
            .ok_or_else(|| corrupt("shape overflows".into()))?;
        match zstd::zstd_safe::get_frame_content_size(payload) {
            Ok(Some(n)) if n == want as u64 => {}
            Ok(Some(n)) => {
                return Err(corrupt(format!(
                    "frame holds {n} bytes, shape needs {want}"
                )))
            }
            Ok(None) => return Err(corrupt("frame does not record its size".into())),
            Err(_) => return Err(corrupt("not a zstd frame".into())),
        }
        let raw = zstd::bulk::decompress(payload, want).map_err(|e| corrupt(e.to_string()))?;
        if raw.len() != want {
            return Err(corrupt(format!(
                "decoded {} bytes, shape needs {want}",
                raw.len()
            )));
        }
        let codes: Vec<u16> = if width(shape.bits) == 1 {
            raw.iter().map(|&b| u16::from(b)).collect()
        } else {
            raw.chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect()
        };
        let plane = CodePlane { shape, codes };
        if !plane.is_valid() {
            return Err(corrupt(format!("codes exceed {} bits", shape.bits)));
        }
        Ok(plane)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks_sizes() {
        for bits in [2u8, 8, 10, 12, 16] {
            let shape = PlaneShape {
                bits,
                tensors: 2,
                rows: 16,
                cols: 8,
            };
            let max = if bits == 16 {
                u16::MAX as u32
            } else {
                (1u32 << bits) - 1
            };
            let codes = (0..shape.len() as u32)
                .map(|i| ((i * 40503) % (max + 1)) as u16)
                .collect();
            let plane = CodePlane { shape, codes };
            let enc = ZstdCodec::new(3).encode(&plane).unwrap();
            assert_eq!(
                ZstdCodec::default()
                    .decode(shape, &[], &enc.payload)
                    .unwrap(),
                plane
            );
            let other = PlaneShape { rows: 15, ..shape };
            assert!(ZstdCodec::default()
                .decode(other, &[], &enc.payload)
                .is_err());
            assert!(ZstdCodec::default()
                .decode(shape, &[], &enc.payload[..enc.payload.len() - 1])
                .is_err());
            assert!(ZstdCodec::default()
                .decode(shape, &[0], &enc.payload)
                .is_err());
        }
        let shape = PlaneShape {
            bits: 8,
            tensors: 1,
            rows: 1,
            cols: 4,
        };
        assert!(ZstdCodec::default()
            .decode(shape, &[], b"garbage!")
            .is_err());
        // 4 bytes of 0xFF claim 4-bit codes but exceed them.
        let raw = zstd::bulk::compress(&[0xFF; 4], 3).unwrap();
        let shape4 = PlaneShape { bits: 4, ..shape };
        assert!(ZstdCodec::default().decode(shape4, &[], &raw).is_err());
    }
}
