//! What the store and its clients check about stored objects, on top of the codec's format:
//! for chunk objects a whole object's checksums, a header's key, and single sections as they
//! arrive; for codec profile objects (magic `KVFP`) that their bytes hash to their key.
//!
//! The store treats objects as opaque bytes except for these checks; the chunk format itself
//! (parsing, checksums) lives in `kvfetcher-codec` and is only called from here.

use kvfetcher_codec::{
    ChunkHeader, ChunkKey, ChunkView, CodecProfile, FormatError, ModelFingerprint, ProfileId,
    PROFILE_MAGIC,
};

/// Why bytes are not a valid chunk object (or section).
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The chunk format refused the bytes: bad magic, bad checksum, wrong length.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A requested section index is not in the header.
    #[error("section {index} does not exist (object has {count})")]
    NoSection {
        /// The index asked for.
        index: usize,
        /// Sections the object has.
        count: usize,
    },
    /// A chunk's header names another key than it is stored under.
    #[error("object carries key {found}, not {expected}")]
    WrongKey {
        /// The key in its header.
        found: ChunkKey,
        /// The key it is stored under.
        expected: ChunkKey,
    },
    /// A profile object's bytes hash to another key than it is stored or put under.
    #[error("profile object hashes to key {found}, not {expected}")]
    ProfileKey {
        /// The key its bytes give.
        found: ChunkKey,
        /// The key it is stored or put under.
        expected: ChunkKey,
    },
    /// Bytes starting with the profile magic are too short to name a model.
    #[error("profile object of {0} bytes is too short")]
    ProfileShort(usize),
}

impl ObjectError {
    /// True when the error means "bytes damaged" rather than "not an object at all":
    /// a stored object failing this way is corrupt.
    pub fn is_checksum(&self) -> bool {
        matches!(self, ObjectError::Format(FormatError::Checksum { .. }))
    }
}

/// What a verified object says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key in its header.
    pub key: ChunkKey,
    /// The model index it is listed under: a chunk's model; for a profile object the
    /// profile's model's `ModelFingerprint::profile_index`.
    pub model: ModelFingerprint,
    /// Bytes of its header.
    pub header_len: usize,
}

/// Parses a whole object and checks its header and every section checksum.
pub fn verify_object(bytes: &[u8]) -> Result<ObjectInfo, ObjectError> {
    let view = ChunkView::parse(bytes)?;
    view.verify()?;
    let h = view.header();
    Ok(ObjectInfo {
        key: h.key,
        model: h.model,
        header_len: view.header_len(),
    })
}

/// True when `bytes` start like a codec profile object (magic `KVFP`) rather than a chunk.
pub fn is_profile_object(bytes: &[u8]) -> bool {
    bytes.starts_with(&PROFILE_MAGIC)
}

/// Checks a whole codec profile object stored (or to be stored) under `key`: its bytes must
/// hash to `key` (`ProfileId::of_bytes(bytes).object_key()`) and name a model, which is what
/// the store indexes it under. The profile itself is parsed by whoever uses it (the daemon),
/// not by the store. `header_len` of the answer is 0: a profile has no sections.
pub fn verify_profile_object(key: &ChunkKey, bytes: &[u8]) -> Result<ObjectInfo, ObjectError> {
    let model =
        CodecProfile::model_in_bytes(bytes).ok_or(ObjectError::ProfileShort(bytes.len()))?;
    let found = ProfileId::of_bytes(bytes).object_key();
    if found != *key {
        return Err(ObjectError::ProfileKey {
            found,
            expected: *key,
        });
    }
    Ok(ObjectInfo {
        key: found,
        model: model.profile_index(),
        header_len: 0,
    })
}

/// Checks a stored object of either kind under `key`: a profile object by
/// [`verify_profile_object`], a chunk by [`verify_object`] and its header's key.
pub fn verify_stored(key: &ChunkKey, bytes: &[u8]) -> Result<ObjectInfo, ObjectError> {
    if is_profile_object(bytes) {
        return verify_profile_object(key, bytes);
    }
    let info = verify_object(bytes)?;
    if info.key != *key {
        return Err(ObjectError::WrongKey {
            found: info.key,
            expected: *key,
        });
    }
    Ok(info)
}

/// A parsed header, used to locate and check sections one at a time.
#[derive(Debug, Clone)]
pub struct SectionCheck {
    header: ChunkHeader,
    header_len: usize,
}

impl SectionCheck {
    /// Parses a header from the start of an object (checks the header's own checksum).
    pub fn from_header(bytes: &[u8]) -> Result<SectionCheck, ObjectError> {
        let (header, header_len) = ChunkHeader::parse_prefix(bytes)?;
        Ok(SectionCheck { header, header_len })
    }

    /// The parsed header.
    pub fn header(&self) -> &ChunkHeader {
        &self.header
    }

    /// The key in the header.
    pub fn key(&self) -> ChunkKey {
        self.header.key
    }

    /// Bytes of the header.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Total bytes of the object the header describes.
    pub fn object_len(&self) -> u64 {
        self.header.object_len()
    }

    /// Number of sections.
    pub fn sections(&self) -> usize {
        self.header.sections.len()
    }

    /// Length of section `index`, if it exists.
    pub fn section_len(&self, index: usize) -> Option<u64> {
        self.header.sections.get(index).map(|s| s.len)
    }

    /// `(offset, len)` of section `index` inside the object.
    pub fn span(&self, index: usize) -> Result<(u64, u64), ObjectError> {
        self.header
            .sections
            .get(index)
            .map(|s| (s.offset, s.len))
            .ok_or(ObjectError::NoSection {
                index,
                count: self.header.sections.len(),
            })
    }

    /// Checks one section's bytes against its length and crc32c.
    pub fn verify(&self, index: usize, bytes: &[u8]) -> Result<(), ObjectError> {
        let info = self
            .header
            .sections
            .get(index)
            .ok_or(ObjectError::NoSection {
                index,
                count: self.header.sections.len(),
            })?;
        info.verify(bytes)?;
        Ok(())
    }
}
