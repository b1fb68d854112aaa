//! Checks a put's object as its bytes arrive, so the server can write each piece to storage and
//! forget it instead of holding the whole object in memory until the end.
//!
//! Sans I/O: feed the pieces in order ([`UploadCheck::feed`]), then [`UploadCheck::finish`].
//! It holds only the header (until it parses) and a running crc32c of the current section; the
//! checks are the same as `verify_object` on the whole object (header crc and fields, the
//! header's key, every section's length and crc32c, exact total length). A codec profile
//! object (magic `KVFP`) is checked as `verify_profile_object` does: a running SHA-256 of its
//! bytes must give the put's key.

use kvfetcher_codec::{CodecProfile, FormatError, ProfileId, PROFILE_MAGIC};
use sha2::{Digest, Sha256};

use crate::transport::{ObjectError, ObjectInfo, SectionCheck};

/// Bytes of a profile object's start kept: magic, version, reserved and model fingerprint.
const PROFILE_HEAD: usize = 40;

/// Why an upload is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UploadError {
    /// More bytes arrived than the put declared.
    #[error("upload longer than the declared {declared} bytes")]
    Longer {
        /// The declared length.
        declared: u64,
    },
    /// The stream ended before the declared length.
    #[error("upload of {got} bytes, declared {declared}")]
    Shorter {
        /// Bytes received.
        got: u64,
        /// The declared length.
        declared: u64,
    },
    /// The bytes are not a valid chunk object (bad header, bad section checksum).
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// The header names another key than the put.
    #[error("object carries key {found}, not {expected}")]
    WrongKey {
        /// The key in the header.
        found: kvfetcher_codec::ChunkKey,
        /// The key of the put.
        expected: kvfetcher_codec::ChunkKey,
    },
    /// The header describes an object of another length than the put declared.
    #[error("header describes {described} bytes, the put declared {declared}")]
    LengthMismatch {
        /// The object length in the header.
        described: u64,
        /// The declared length.
        declared: u64,
    },
}

impl UploadError {
    /// True when the client broke the put's framing (lengths), rather than sending a bad object.
    pub(crate) fn is_framing(&self) -> bool {
        matches!(
            self,
            UploadError::Longer { .. } | UploadError::Shorter { .. }
        )
    }
}

/// Where the check is inside the object.
struct Sections {
    check: SectionCheck,
    /// The section being received.
    index: usize,
    /// Bytes of it received so far.
    pos: u64,
    /// Their running crc32c.
    crc: u32,
}

/// A profile object being received: a running hash, and its first bytes (for its model).
struct ProfileUpload {
    hash: Sha256,
    head: Vec<u8>,
}

/// An upload being checked; see the module doc for the order of calls.
pub(crate) struct UploadCheck {
    key: kvfetcher_codec::ChunkKey,
    declared: u64,
    received: u64,
    /// The header's bytes until it parses (then empty).
    head: Vec<u8>,
    sections: Option<Sections>,
    /// Set once the first bytes showed a profile object.
    profile: Option<ProfileUpload>,
    /// Most bytes `head` held at once: what this check kept of the upload in memory.
    peak_held: usize,
}

impl UploadCheck {
    /// A check of the object `key`, declared `declared` bytes long.
    pub(crate) fn new(key: kvfetcher_codec::ChunkKey, declared: u64) -> UploadCheck {
        UploadCheck {
            key,
            declared,
            received: 0,
            head: Vec::new(),
            sections: None,
            profile: None,
            peak_held: 0,
        }
    }

    /// Most bytes of the upload this check held at once (the header, while it was incomplete).
    pub(crate) fn peak_held(&self) -> usize {
        self.peak_held
    }

    /// Checks the next piece. An error is final: the upload must be discarded.
    pub(crate) fn feed(&mut self, piece: &[u8]) -> Result<(), UploadError> {
        let total = self.received.saturating_add(piece.len() as u64);
        if total > self.declared {
            return Err(UploadError::Longer {
                declared: self.declared,
            });
        }
        self.received = total;
        let mut rest = piece;
        if self.sections.is_none() && self.profile.is_none() && self.head.len() < 4 {
            // The magic tells a profile object from a chunk.
            let take = (4 - self.head.len()).min(rest.len());
            self.head.extend_from_slice(&rest[..take]);
            self.peak_held = self.peak_held.max(self.head.len());
            rest = &rest[take..];
            if self.head.len() < 4 {
                return Ok(());
            }
            if self.head[..] == PROFILE_MAGIC {
                let mut hash = Sha256::new();
                hash.update(&self.head);
                self.profile = Some(ProfileUpload {
                    hash,
                    head: std::mem::take(&mut self.head),
                });
            }
        }
        if let Some(p) = &mut self.profile {
            p.hash.update(rest);
            let take = PROFILE_HEAD.saturating_sub(p.head.len()).min(rest.len());
            p.head.extend_from_slice(&rest[..take]);
            return Ok(());
        }
        if self.sections.is_none() {
            rest = self.feed_header(rest)?;
            if self.sections.is_none() {
                return Ok(());
            }
        }
        if let Some(s) = &mut self.sections {
            feed_sections(s, rest)?;
        }
        Ok(())
    }

    /// Buffers header bytes (only as many as the header needs) and parses it once whole;
    /// returns the rest of `piece`.
    fn feed_header<'a>(&mut self, mut piece: &'a [u8]) -> Result<&'a [u8], UploadError> {
        loop {
            let needed = match SectionCheck::from_header(&self.head) {
                Ok(check) => {
                    self.start_sections(check)?;
                    return Ok(piece);
                }
                Err(ObjectError::Format(FormatError::Truncated { needed, .. }))
                    if needed > self.head.len() =>
                {
                    needed
                }
                Err(e) => return Err(e.into()),
            };
            if piece.is_empty() {
                return Ok(piece);
            }
            let take = (needed - self.head.len()).min(piece.len());
            // `needed` is at most the format's header limit: reserve it exactly, so the buffer
            // holds no more than the header (no doubling).
            self.head.reserve_exact(needed - self.head.len());
            self.head.extend_from_slice(&piece[..take]);
            self.peak_held = self.peak_held.max(self.head.len());
            piece = &piece[take..];
        }
    }

    fn start_sections(&mut self, check: SectionCheck) -> Result<(), UploadError> {
        if check.key() != self.key {
            return Err(UploadError::WrongKey {
                found: check.key(),
                expected: self.key,
            });
        }
        if check.object_len() != self.declared {
            return Err(UploadError::LengthMismatch {
                described: check.object_len(),
                declared: self.declared,
            });
        }
        self.head = Vec::new();
        self.sections = Some(Sections {
            check,
            index: 0,
            pos: 0,
            crc: 0,
        });
        Ok(())
    }

    /// Ends the check once the stream ended: the object's key, model and header length when
    /// every byte arrived and checked.
    pub(crate) fn finish(self) -> Result<ObjectInfo, UploadError> {
        if self.received < self.declared {
            return Err(UploadError::Shorter {
                got: self.received,
                declared: self.declared,
            });
        }
        if let Some(p) = self.profile {
            let model = CodecProfile::model_in_bytes(&p.head)
                .ok_or(ObjectError::ProfileShort(self.received as usize))?;
            let found = ProfileId(p.hash.finalize().into()).object_key();
            if found != self.key {
                return Err(ObjectError::ProfileKey {
                    found,
                    expected: self.key,
                }
                .into());
            }
            return Ok(ObjectInfo {
                key: found,
                model: model.profile_index(),
                header_len: 0,
            });
        }
        let Some(mut s) = self.sections else {
            // Every declared byte arrived but the header never parsed: it is cut short.
            return Err(UploadError::Object(ObjectError::Format(
                FormatError::Truncated {
                    needed: self.head.len() + 1,
                    got: self.head.len(),
                },
            )));
        };
        // Sections of zero bytes at the end need no bytes to complete.
        feed_sections(&mut s, &[])?;
        if s.index < s.check.sections() {
            return Err(UploadError::Shorter {
                got: self.received,
                declared: self.declared,
            });
        }
        let h = s.check.header();
        Ok(ObjectInfo {
            key: h.key,
            model: h.model,
            header_len: s.check.header_len(),
        })
    }
}

/// Runs `piece` through the section crcs, in order (sections follow the header back to back:
/// the header's validation checks that).
fn feed_sections(s: &mut Sections, mut piece: &[u8]) -> Result<(), UploadError> {
    while s.index < s.check.sections() {
        let info = &s.check.header().sections[s.index];
        let take = usize::try_from(info.len - s.pos)
            .unwrap_or(usize::MAX)
            .min(piece.len());
        s.crc = crc32c::crc32c_append(s.crc, &piece[..take]);
        s.pos += take as u64;
        piece = &piece[take..];
        if s.pos < info.len {
            return Ok(());
        }
        if s.crc != info.crc32c {
            return Err(ObjectError::Format(FormatError::Checksum {
                what: format!("section of layers {}..{}", info.layer_start, info.layer_end),
            })
            .into());
        }
        s.index += 1;
        s.pos = 0;
        s.crc = 0;
    }
    if !piece.is_empty() {
        return Err(ObjectError::Format(FormatError::Inconsistent(format!(
            "{} bytes after the object's end",
            piece.len()
        )))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::verify_object;
    use kvfetcher_codec::ChunkKey;

    /// A real chunk object of synthetic KV (4 layers, 2 per section, 64 tokens), encoded by
    /// the codec.
    fn object() -> (ChunkKey, Vec<u8>) {
        use kvfetcher_codec::{encode_cache, CodecRegistry, EncodeConfig, ModelFingerprint};
        use kvfetcher_kv::{DType, KvCache, LayerKv, Tensor};
        let tokens = 64;
        let tensor = |seed: u32| {
            let data: Vec<u8> = (0..tokens * 2 * 16)
                .flat_map(|i| {
                    let x = ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000;
                    half::f16::from_f32(x as f32 / 1000.0 - 1.0).to_le_bytes()
                })
                .collect();
            Tensor::new(DType::F16, [tokens, 2, 16], data).unwrap()
        };
        let layers = (0..4)
            .map(|l| LayerKv {
                key: tensor(l * 2),
                value: tensor(l * 2 + 1),
            })
            .collect();
        let cache = KvCache::new(layers, None).unwrap();
        let ids: Vec<u32> = (0..tokens as u32).collect();
        let cfg = EncodeConfig {
            layers_per_section: 2,
            ..EncodeConfig::default()
        };
        let model = ModelFingerprint([3; 32]);
        let mut chunks =
            encode_cache(&cache, &model, &ids, &cfg, &CodecRegistry::software()).unwrap();
        chunks.remove(0)
    }

    /// Feeds `bytes` in pieces of `piece` bytes: the most the check held, and its verdict.
    fn check_in_pieces(
        key: ChunkKey,
        bytes: &[u8],
        piece: usize,
    ) -> (usize, Result<ObjectInfo, UploadError>) {
        let mut c = UploadCheck::new(key, bytes.len() as u64);
        for p in bytes.chunks(piece) {
            if let Err(e) = c.feed(p) {
                return (c.peak_held(), Err(e));
            }
        }
        (c.peak_held(), c.finish())
    }

    #[test]
    fn a_good_object_in_any_pieces_checks_and_holds_only_its_header() {
        let (key, bytes) = object();
        let whole = verify_object(&bytes).unwrap();
        for piece in [1, 7, 1000, 4096, bytes.len()] {
            let (held, r) = check_in_pieces(key, &bytes, piece);
            assert_eq!(r.unwrap(), whole, "pieces of {piece}");
            assert!(
                held <= whole.header_len,
                "held {held} > header {} (pieces of {piece})",
                whole.header_len
            );
        }
    }

    #[test]
    fn profile_objects_check_by_their_hash_in_any_pieces() {
        use crate::transport::verify_profile_object;
        let mut bytes = PROFILE_MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0, 0, 0]);
        bytes.extend_from_slice(&[7; 32]);
        bytes.extend((0..500u32).map(|i| (i * 31) as u8));
        let key = ProfileId::of_bytes(&bytes).object_key();
        let whole = verify_profile_object(&key, &bytes).unwrap();
        assert_eq!(
            whole.model,
            kvfetcher_codec::ModelFingerprint([7; 32]).profile_index()
        );
        for piece in [1, 3, 5, 41, bytes.len()] {
            let (held, r) = check_in_pieces(key, &bytes, piece);
            assert_eq!(r.unwrap(), whole, "pieces of {piece}");
            assert!(held <= 4, "held {held}");
        }
        let mut bad = bytes.clone();
        bad[300] ^= 1;
        let (_, r) = check_in_pieces(key, &bad, 64);
        assert!(
            matches!(r, Err(UploadError::Object(ObjectError::ProfileKey { .. }))),
            "{r:?}"
        );
        let (_, r) = check_in_pieces(ProfileId::of_bytes(b"KVFP").object_key(), b"KVFP", 2);
        assert!(
            matches!(r, Err(UploadError::Object(ObjectError::ProfileShort(4)))),
            "{r:?}"
        );
    }

    #[test]
    fn damage_lengths_and_keys_are_refused() {
        let (key, bytes) = object();
        let header_len = verify_object(&bytes).unwrap().header_len;
        // A flipped bit in the last section, in the header, in the first section.
        for at in [bytes.len() - 1, 20, header_len + 3] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            let (_, r) = check_in_pieces(key, &bad, 333);
            assert!(matches!(r, Err(UploadError::Object(_))), "byte {at}: {r:?}");
        }
        // Cut short: the stream ends early.
        let mut c = UploadCheck::new(key, bytes.len() as u64);
        c.feed(&bytes[..bytes.len() - 10]).unwrap();
        assert!(matches!(c.finish(), Err(UploadError::Shorter { .. })));
        // Longer than declared.
        let mut c = UploadCheck::new(key, 10);
        assert!(matches!(
            c.feed(&bytes[..11]),
            Err(UploadError::Longer { .. })
        ));
        // Declared (and sent) more than the object: extra bytes after the end.
        let mut long = bytes.clone();
        long.extend_from_slice(b"tail");
        let (_, r) = check_in_pieces(key, &long, 500);
        assert!(
            matches!(r, Err(UploadError::LengthMismatch { .. })),
            "{r:?}"
        );
        // Another key.
        let (_, r) = check_in_pieces(ChunkKey([9; 32]), &bytes, 500);
        assert!(matches!(r, Err(UploadError::WrongKey { .. })), "{r:?}");
        // Not an object at all; and a header that never completes.
        let (_, r) = check_in_pieces(key, b"GET / HTTP/1.1\r\n\r\n", 4);
        assert!(matches!(r, Err(UploadError::Object(_))), "{r:?}");
        let (_, r) = check_in_pieces(key, &bytes[..50], 8);
        assert!(matches!(r, Err(UploadError::Object(_))), "{r:?}");
    }
}
