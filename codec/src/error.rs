//! The error of every chunk-level operation: parsing, verifying, encoding and decoding objects.

use crate::CodecError;

/// Why a chunk object could not be parsed, verified, encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The bytes end before the object (or its header) does; `needed` is the length required.
    #[error("truncated: need {needed} bytes, got {got}")]
    Truncated {
        /// Bytes needed to go on (for a header prefix: the whole header's length once known).
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// The bytes do not start with the chunk magic.
    #[error("not a chunk object (bad magic)")]
    BadMagic,
    /// The object uses a format version this build cannot read.
    #[error("unsupported chunk format version {0}")]
    UnsupportedVersion(u16),
    /// A crc32c did not match: the header or a section is corrupt.
    #[error("checksum mismatch in {what}")]
    Checksum {
        /// Which part: `header` or `section N`.
        what: String,
    },
    /// Fields contradict each other or hold impossible values.
    #[error("inconsistent chunk: {0}")]
    Inconsistent(String),
    /// A count or size exceeds the format's limits.
    #[error("{what} is {value}, above the limit {max}")]
    TooLarge {
        /// Which count or size.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The largest accepted.
        max: u64,
    },
    /// A section's variant failed to encode or decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The chunk was coded with a codec profile this process does not hold.
    #[error("the chunk needs codec profile {0}, which is not loaded (fetch it from the store or pass --profile)")]
    ProfileMissing(crate::ProfileId),
    /// A codec profile does not fit the KV or chunk it is used with.
    #[error("codec profile mismatch: {0}")]
    ProfileMismatch(String),
    /// A codec profile's bytes are malformed or inconsistent.
    #[error("bad codec profile: {0}")]
    BadProfile(String),
    /// The cache, token ids or configuration given to the encoder are not usable.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}
