//! The variant traits: how a section's codes become bytes and back.
//!
//! Each variant (`hevc`, `packed`, `zstd`, and later ones such as an NVDEC-backed HEVC decoder)
//! implements [`SectionEncoder`] and/or [`SectionDecoder`], so callers never name a backend.

use crate::{CodePlane, PlaneShape};

/// Which encoding a section's payload uses. The number is the on-disk code: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum VariantKind {
    /// Lossless HEVC bitstream(s); decodable by NVDEC or a software decoder.
    Hevc = 1,
    /// Codes bit-packed at their width.
    Packed = 2,
    /// Codes entropy-coded with zstd.
    Zstd = 3,
    /// Transform-coded levels entropy-coded with interleaved rANS (format version 2).
    Rans = 4,
}

impl VariantKind {
    /// Parses the on-disk code.
    pub fn from_code(code: u8) -> Option<VariantKind> {
        match code {
            1 => Some(VariantKind::Hevc),
            2 => Some(VariantKind::Packed),
            3 => Some(VariantKind::Zstd),
            4 => Some(VariantKind::Rans),
            _ => None,
        }
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            VariantKind::Hevc => "hevc",
            VariantKind::Packed => "packed",
            VariantKind::Zstd => "zstd",
            VariantKind::Rans => "rans",
        }
    }
}

/// A section as a variant encoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedSection {
    /// Variant-specific parameters the decoder needs (layout, frame geometry, ...), stored in
    /// the chunk object beside the payload; empty for variants that need none.
    pub params: Vec<u8>,
    /// The encoded bytes.
    pub payload: Vec<u8>,
}

/// Why encoding or decoding a section failed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The codes do not fit their declared shape or bit width.
    #[error("invalid codes: {0}")]
    InvalidCodes(String),
    /// The variant cannot encode this shape or bit width.
    #[error("{variant} cannot encode this section: {reason}")]
    Unsupported {
        /// The variant.
        variant: &'static str,
        /// Why.
        reason: String,
    },
    /// The payload or its parameters are malformed or do not decode to the declared shape.
    #[error("corrupt {variant} section: {reason}")]
    Corrupt {
        /// The variant.
        variant: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// No encoder or decoder of this variant is registered or loadable here.
    #[error("no {variant} {role} available: {reason}")]
    Unavailable {
        /// The variant.
        variant: &'static str,
        /// `encoder` or `decoder`.
        role: &'static str,
        /// Why (for example: libx265 could not be loaded).
        reason: String,
    },
    /// A codec library (x265, libde265, NVDEC) is missing or failed.
    #[error("{library}: {reason}")]
    Library {
        /// The library.
        library: &'static str,
        /// What happened.
        reason: String,
    },
}

/// Encodes one section's codes.
pub trait SectionEncoder: Send + Sync {
    /// The variant this encoder produces.
    fn variant(&self) -> VariantKind;
    /// Encodes `plane`; the result decodes back to exactly `plane` unless [`Self::is_lossy`].
    fn encode(&self, plane: &CodePlane) -> Result<EncodedSection, CodecError>;
    /// Whether decoded codes only approximate the encoded ones (lossy HEVC): such an encoder
    /// must not code bit-exact mode's byte planes. False by default.
    fn is_lossy(&self) -> bool {
        false
    }
}

/// Decodes one section's codes.
pub trait SectionDecoder: Send + Sync {
    /// The variant this decoder reads.
    fn variant(&self) -> VariantKind;
    /// Decodes a payload that must hold exactly `shape`'s codes; anything else is an error.
    fn decode(
        &self,
        shape: PlaneShape,
        params: &[u8],
        payload: &[u8],
    ) -> Result<CodePlane, CodecError>;
}

/// The checks every variant without parameters (`packed`, `zstd`) makes before decoding: a code
/// width of 1..=16 bits and an empty parameter block.
pub(crate) fn check_plain_section(
    variant: &'static str,
    shape: PlaneShape,
    params: &[u8],
) -> Result<(), CodecError> {
    let corrupt = |reason: String| CodecError::Corrupt { variant, reason };
    if !(1..=16).contains(&shape.bits) {
        return Err(corrupt(format!("{} bits per code", shape.bits)));
    }
    if !params.is_empty() {
        return Err(corrupt(format!(
            "{} bytes of parameters, expected none",
            params.len()
        )));
    }
    Ok(())
}
