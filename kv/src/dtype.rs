//! Conversions of KV elements to and from `f32`; the element type itself ([`DType`]) lives in
//! `kvfetcher-types`.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use kvfetcher_types::DType;

/// Conversions between a [`DType`]'s little-endian bytes and `f32`. They need the `half` crate,
/// so they live here rather than with the type in `kvfetcher-types`.
pub trait DTypeExt {
    /// Decodes little-endian elements of this type into `out` (cleared first).
    fn decode_f32(self, bytes: &[u8], out: &mut Vec<f32>);

    /// Encodes `values` as little-endian elements of this type (round to nearest even).
    fn encode_f32(self, values: &[f32], out: &mut Vec<u8>);
}

impl DTypeExt for DType {
    fn decode_f32(self, bytes: &[u8], out: &mut Vec<f32>) {
        out.clear();
        out.reserve(bytes.len() / self.size());
        match self {
            DType::F16 => decode_f16(bytes, out),
            DType::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            DType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
        }
    }

    fn encode_f32(self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(values.len() * self.size());
        match self {
            DType::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            DType::BF16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
            DType::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        }
    }
}

/// Little-endian f16 values appended to `out`, converted a block at a time by `half`'s slice
/// conversion (F16C instructions when the CPU has them, chosen at run time: one element at a
/// time it is several times slower).
fn decode_f16(bytes: &[u8], out: &mut Vec<f32>) {
    const BLOCK: usize = 256;
    let mut halves = [f16::ZERO; BLOCK];
    for src in bytes.chunks(2 * BLOCK) {
        let n = src.len() / 2;
        for (h, b) in halves.iter_mut().zip(src.chunks_exact(2)) {
            *h = f16::from_le_bytes([b[0], b[1]]);
        }
        let start = out.len();
        out.resize(start + n, 0.0);
        halves[..n].convert_to_f32_slice(&mut out[start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_blocks_decode_like_single_values() {
        // Every f16 bit pattern, plus a trailing odd byte (ignored), in blocks of 256.
        let mut bytes: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        bytes.push(7);
        let mut out = vec![1.0];
        DType::F16.decode_f32(&bytes, &mut out);
        assert_eq!(out.len(), 1 << 16);
        for (i, v) in out.iter().enumerate() {
            let want = f16::from_bits(i as u16).to_f32();
            assert!(
                v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                "{i:#06x}"
            );
        }
    }

    #[test]
    fn f32_conversion_round_trips_representable_values() {
        let vals = [0.0f32, 1.0, -2.5, 0.125, 65504.0];
        for d in DType::ALL {
            let mut bytes = Vec::new();
            d.encode_f32(&vals, &mut bytes);
            assert_eq!(bytes.len(), vals.len() * d.size());
            let mut back = Vec::new();
            d.decode_f32(&bytes, &mut back);
            if d == DType::BF16 {
                // 65504 is not representable in bf16; the rest are.
                assert_eq!(&back[..4], &vals[..4]);
            } else {
                assert_eq!(back, vals);
            }
        }
    }
}
