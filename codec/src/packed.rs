//! The `packed` variant: codes bit-packed LSB-first at their width, nothing else.
//!
//! Code `i` occupies stream bits `i*bits .. (i+1)*bits`, least significant bit first; stream bit
//! `j` is bit `j % 8` of byte `j / 8`. Unused bits of the last byte are zero. No parameters. Its
//! decoder is trivial on any processor (a GPU kernel unpacks it at memory speed).

use crate::variant::check_plain_section;
use crate::{
    CodePlane, CodecError, EncodedSection, PlaneShape, SectionDecoder, SectionEncoder, VariantKind,
};

/// Encoder and decoder of [`VariantKind::Packed`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PackedCodec;

const NAME: &str = "packed";

/// Packs codes LSB-first at `bits` bits each.
pub fn pack_codes(codes: &[u16], bits: u8) -> Vec<u8> {
    let bits = u32::from(bits);
    let mut out = Vec::with_capacity((codes.len() * bits as usize).div_ceil(8));
    let (mut acc, mut n) = (0u64, 0u32);
    for &c in codes {
        acc |= u64::from(c) << n;
        n += bits;
        while n >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            n -= 8;
        }
    }
    if n > 0 {
        out.push(acc as u8);
    }
    out
}

/// Unpacks `count` codes of `bits` bits; the caller checked the length.
fn unpack(bytes: &[u8], bits: u8, count: usize) -> Vec<u16> {
    let bits = u32::from(bits);
    let mask = (1u64 << bits) - 1;
    let mut out = Vec::with_capacity(count);
    let (mut acc, mut n) = (0u64, 0u32);
    let mut it = bytes.iter();
    for _ in 0..count {
        while n < bits {
            acc |= u64::from(*it.next().unwrap_or(&0)) << n;
            n += 8;
        }
        out.push((acc & mask) as u16);
        acc >>= bits;
        n -= bits;
    }
    out
}

impl SectionEncoder for PackedCodec {
    fn variant(&self) -> VariantKind {
        VariantKind::Packed
    }

    fn encode(&self, plane: &CodePlane) -> Result<EncodedSection, CodecError> {
        if !plane.is_valid() {
            return Err(CodecError::InvalidCodes(format!(
                "codes do not fit {:?}",
                plane.shape
            )));
        }
        Ok(EncodedSection {
            params: Vec::new(),
            payload: pack_codes(&plane.codes, plane.shape.bits),
        })
    }
}

impl SectionDecoder for PackedCodec {
    fn variant(&self) -> VariantKind {
        VariantKind::Packed
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
        let total_bits = (shape.len() as u128) * u128::from(shape.bits);
        let want = total_bits.div_ceil(8);
        if payload.len() as u128 != want {
            return Err(corrupt(format!(
                "payload is {} bytes, shape needs {want}",
                payload.len()
            )));
        }
        let pad = (want * 8 - total_bits) as u32;
        if pad > 0 && payload[payload.len() - 1] >> (8 - pad) != 0 {
            return Err(corrupt("nonzero padding bits".into()));
        }
        Ok(CodePlane {
            shape,
            codes: unpack(payload, shape.bits, shape.len()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_lsb_first() {
        assert_eq!(pack_codes(&[1, 2, 3], 2), vec![0b0011_1001]);
        assert_eq!(pack_codes(&[0xABC, 0x123], 12), vec![0xBC, 0x3A, 0x12]);
        assert_eq!(pack_codes(&[7, 1, 0], 3), vec![0b0000_1111, 0]);
    }

    #[test]
    fn round_trips_every_width_and_rejects_wrong_lengths() {
        for bits in 1..=16u8 {
            let shape = PlaneShape {
                bits,
                tensors: 2,
                rows: 3,
                cols: 5,
            };
            let max = if bits == 16 {
                u16::MAX as u32
            } else {
                (1u32 << bits) - 1
            };
            let codes = (0..shape.len() as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) % (max + 1)) as u16)
                .collect();
            let plane = CodePlane { shape, codes };
            let enc = PackedCodec.encode(&plane).unwrap();
            assert_eq!(enc.payload.len(), shape.packed_bytes());
            assert_eq!(PackedCodec.decode(shape, &[], &enc.payload).unwrap(), plane);
            let short = &enc.payload[..enc.payload.len() - 1];
            assert!(PackedCodec.decode(shape, &[], short).is_err());
            let mut long = enc.payload.clone();
            long.push(0);
            assert!(PackedCodec.decode(shape, &[], &long).is_err());
            assert!(PackedCodec.decode(shape, &[1], &enc.payload).is_err());
        }
        let shape = PlaneShape {
            bits: 3,
            tensors: 1,
            rows: 1,
            cols: 3,
        };
        assert!(
            PackedCodec.decode(shape, &[], &[0xFF, 0x80]).is_err(),
            "padding bit set"
        );
        let bad = CodePlane {
            shape,
            codes: vec![8, 0, 0],
        };
        assert!(PackedCodec.encode(&bad).is_err());
    }
}
