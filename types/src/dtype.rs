//! The element type of KV tensors and its names and codes in every format that stores one.

use serde::{Deserialize, Serialize};

/// The element type of a KV tensor (stored little-endian wherever bytes are stored).
///
/// Its spellings are fixed by formats already written: [`DType::safetensors_name`] in KV files,
/// [`DType::code`] in chunk object headers, and serde (the local protocol's JSON) as `"f16"`,
/// `"b_f16"`, `"f32"`. The odd `"b_f16"` is what serde's `snake_case` made of `BF16` when the
/// protocol was first released; it stays so that daemons and clients keep understanding each
/// other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// IEEE 754 half precision (2 bytes).
    #[serde(rename = "f16")]
    F16,
    /// bfloat16 (2 bytes).
    #[serde(rename = "b_f16")]
    BF16,
    /// IEEE 754 single precision (4 bytes).
    #[serde(rename = "f32")]
    F32,
}

impl DType {
    /// Every dtype, in code order.
    pub const ALL: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    /// The short lower-case name (`f16`, `bf16`, `f32`), as CLI flags, logs and the Python
    /// package write it.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
        }
    }

    /// Parses a short lower-case name ([`DType::name`]).
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The safetensors name (`F16`, `BF16`, `F32`): the `dtype` of a tensor in a KV file's
    /// header, and how the tools print a KV file's dtype.
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
        }
    }

    /// Parses a safetensors dtype name ([`DType::safetensors_name`]).
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }

    /// The stable one-byte code of binary formats (the chunk header's dtype byte); never
    /// renumbered.
    pub const fn code(self) -> u8 {
        match self {
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::F32 => 3,
        }
    }

    /// Inverse of [`DType::code`].
    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.code() == code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every spelling of every dtype, pinned: these are bytes on disk and on the wire.
    #[test]
    fn representations_are_pinned() {
        let want = [
            (DType::F16, 2, "f16", "F16", 1, "\"f16\""),
            (DType::BF16, 2, "bf16", "BF16", 2, "\"b_f16\""),
            (DType::F32, 4, "f32", "F32", 3, "\"f32\""),
        ];
        for (d, size, name, st, code, json) in want {
            assert_eq!(d.size(), size);
            assert_eq!(d.name(), name);
            assert_eq!(d.safetensors_name(), st);
            assert_eq!(d.code(), code);
            assert_eq!(serde_json::to_string(&d).unwrap(), json);
        }
        assert_eq!(DType::ALL.map(DType::code), [1, 2, 3]);
    }

    #[test]
    fn every_spelling_parses_back() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
            assert_eq!(DType::from_code(d.code()), Some(d));
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<DType>(&json).unwrap(), d);
        }
        assert_eq!(DType::from_code(0), None);
        assert_eq!(DType::from_code(4), None);
        assert_eq!(DType::from_safetensors_name("I8"), None);
        assert_eq!(DType::from_safetensors_name("f16"), None);
        assert_eq!(DType::from_name("F16"), None);
        // The protocol never accepted another spelling; a daemon and a client agree on these.
        assert!(serde_json::from_str::<DType>("\"bf16\"").is_err());
        assert!(serde_json::from_str::<DType>("\"F16\"").is_err());
    }
}
