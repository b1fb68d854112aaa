//! Element types of KV tensors and their conversions to and from `f32`.

use half::{bf16, f16};

/// The element type of a KV tensor, stored little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE 754 single precision.
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    /// The safetensors name (`F16`, `BF16`, `F32`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
        }
    }

    /// Parses a safetensors dtype name.
    pub fn from_name(name: &str) -> Option<DType> {
        match name {
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            "F32" => Some(DType::F32),
            _ => None,
        }
    }

    /// A stable one-byte code for binary formats.
    pub fn code(self) -> u8 {
        match self {
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::F32 => 3,
        }
    }

    /// Inverse of [`DType::code`].
    pub fn from_code(code: u8) -> Option<DType> {
        match code {
            1 => Some(DType::F16),
            2 => Some(DType::BF16),
            3 => Some(DType::F32),
            _ => None,
        }
    }

    /// Decodes little-endian elements of this type into `out` (cleared first).
    pub fn decode_f32(self, bytes: &[u8], out: &mut Vec<f32>) {
        out.clear();
        out.reserve(bytes.len() / self.size());
        match self {
            DType::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
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

    /// Encodes `values` as little-endian elements of this type (round to nearest even).
    pub fn encode_f32(self, values: &[f32], out: &mut Vec<u8>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_round_trip() {
        for d in [DType::F16, DType::BF16, DType::F32] {
            assert_eq!(DType::from_code(d.code()), Some(d));
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        assert_eq!(DType::from_code(0), None);
        assert_eq!(DType::from_name("I8"), None);
    }

    #[test]
    fn f32_conversion_round_trips_representable_values() {
        let vals = [0.0f32, 1.0, -2.5, 0.125, 65504.0];
        for d in [DType::F16, DType::BF16, DType::F32] {
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
