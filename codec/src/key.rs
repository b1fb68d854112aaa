//! Content addresses of chunks: model fingerprints and chained chunk keys.
//!
//! A chunk's key depends on the model and on every token id from the start of the sequence up to
//! the end of the chunk, so equal prefixes give equal keys on every node. Pure functions, no I/O.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::FormatError;

/// Tokens per chunk unless configured otherwise (LMCache's chunk_size, the unit of fetching).
pub const DEFAULT_CHUNK_TOKENS: usize = 256;

macro_rules! digest_type {
    ($name:ident, $what:literal) => {
        impl $name {
            /// The 64 lowercase hex digits of the digest.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// Parses 64 hex digits (either case).
            pub fn from_hex(s: &str) -> Result<$name, FormatError> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|e| {
                    FormatError::InvalidInput(format!(
                        concat!($what, " {:?} is not 64 hex digits: {}"),
                        s, e
                    ))
                })?;
                Ok($name(out))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.to_hex())
            }
        }

        impl std::str::FromStr for $name {
            type Err = FormatError;
            fn from_str(s: &str) -> Result<$name, FormatError> {
                $name::from_hex(s)
            }
        }
    };
}

/// The SHA-256 key of one chunk object (see [`chunk_keys`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(pub [u8; 32]);

/// Identifies the model whose KV a chunk holds: the SHA-256 of its weights file or of a name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelFingerprint(pub [u8; 32]);

/// Identifies a codec profile: the SHA-256 of its serialized bytes (see `CodecProfile::id`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProfileId(pub [u8; 32]);

digest_type!(ChunkKey, "chunk key");
digest_type!(ModelFingerprint, "model fingerprint");
digest_type!(ProfileId, "profile id");

impl ModelFingerprint {
    /// The SHA-256 of `bytes` (a model file's contents, or a model name).
    pub fn of_bytes(bytes: &[u8]) -> ModelFingerprint {
        ModelFingerprint(Sha256::digest(bytes).into())
    }
}

/// Domain tag of [`ProfileId::object_key`], so a profile object's store key can never be a
/// chunk key (those hash a model fingerprint and token ids).
const PROFILE_OBJECT_TAG: &[u8] = b"kvfetcher profile object v1\0";

/// Domain tag of [`ModelFingerprint::profile_index`].
const PROFILE_INDEX_TAG: &[u8] = b"kvfetcher profiles of model v1\0";

impl ProfileId {
    /// The id of profile bytes `bytes`: their SHA-256.
    pub fn of_bytes(bytes: &[u8]) -> ProfileId {
        ProfileId(Sha256::digest(bytes).into())
    }

    /// The key the store holds this profile's bytes under:
    /// `SHA-256("kvfetcher profile object v1\0" || id)`. Chunk keys and profile keys share the
    /// store's key space; the tag keeps them apart, and a store checks a profile object by
    /// hashing it (its key follows from its bytes alone).
    pub fn object_key(&self) -> ChunkKey {
        let mut h = Sha256::new();
        h.update(PROFILE_OBJECT_TAG);
        h.update(self.0);
        ChunkKey(h.finalize().into())
    }
}

impl ModelFingerprint {
    /// The store index ("model") a profile object for this model is listed under:
    /// `SHA-256("kvfetcher profiles of model v1\0" || fingerprint)`, so listing it gives the
    /// model's profile objects and nothing else (a listing of the model itself gives chunks).
    pub fn profile_index(&self) -> ModelFingerprint {
        let mut h = Sha256::new();
        h.update(PROFILE_INDEX_TAG);
        h.update(self.0);
        ModelFingerprint(h.finalize().into())
    }
}

/// The keys of the chunks of `token_ids`, in order: `key_0 = SHA-256(fingerprint || ids_0)`,
/// `key_i = SHA-256(key_{i-1} || ids_i)`, where `ids_i` are the ids of chunk `i` as u32
/// little-endian. One key per `chunk_tokens` tokens; the last chunk may be partial.
/// `chunk_tokens == 0` gives no keys.
pub fn chunk_keys(
    model: &ModelFingerprint,
    token_ids: &[u32],
    chunk_tokens: usize,
) -> Vec<ChunkKey> {
    if chunk_tokens == 0 {
        return Vec::new();
    }
    let mut prev = model.0;
    token_ids
        .chunks(chunk_tokens)
        .map(|ids| {
            let mut h = Sha256::new();
            h.update(prev);
            for id in ids {
                h.update(id.to_le_bytes());
            }
            prev = h.finalize().into();
            ChunkKey(prev)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_keys_are_fixed_and_apart_from_ids_and_models() {
        let id = ProfileId::of_bytes(b"KVFP profile bytes");
        assert_eq!(id, ProfileId(Sha256::digest(b"KVFP profile bytes").into()));
        let key = id.object_key();
        assert_eq!(key, id.object_key());
        assert_ne!(key.0, id.0);
        assert_ne!(key, ProfileId::of_bytes(b"other").object_key());
        let m = ModelFingerprint::of_bytes(b"sha256:ab12");
        assert_ne!(m.profile_index(), m);
        assert_ne!(m.profile_index().0, ProfileId(m.0).object_key().0);
    }

    #[test]
    fn keys_chain_and_depend_on_model_and_prefix() {
        let m = ModelFingerprint::of_bytes(b"model-a");
        let ids: Vec<u32> = (0..600).collect();
        let keys = chunk_keys(&m, &ids, 256);
        assert_eq!(keys.len(), 3);
        // Manual derivation of the first two keys.
        let mut h = Sha256::new();
        h.update(m.0);
        ids[..256].iter().for_each(|i| h.update(i.to_le_bytes()));
        let k0: [u8; 32] = h.finalize().into();
        assert_eq!(keys[0].0, k0);
        let mut h = Sha256::new();
        h.update(k0);
        ids[256..512].iter().for_each(|i| h.update(i.to_le_bytes()));
        assert_eq!(keys[1].0, <[u8; 32]>::from(h.finalize()));
        // A shared prefix gives shared keys; a change later changes only later keys.
        let mut other = ids.clone();
        other[300] = 9999;
        let k2 = chunk_keys(&m, &other, 256);
        assert_eq!(k2[0], keys[0]);
        assert_ne!(k2[1], keys[1]);
        assert_ne!(k2[2], keys[2]);
        let other_model = chunk_keys(&ModelFingerprint::of_bytes(b"model-b"), &ids, 256);
        assert_ne!(other_model[0], keys[0]);
        assert!(chunk_keys(&m, &ids, 0).is_empty());
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let k = chunk_keys(&ModelFingerprint::of_bytes(b"x"), &[1, 2, 3], 256)[0];
        let s = k.to_string();
        assert_eq!(s.len(), 64);
        assert!(s
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(ChunkKey::from_hex(&s).unwrap(), k);
        assert_eq!(ChunkKey::from_hex(&s.to_uppercase()).unwrap(), k);
        assert!(ChunkKey::from_hex(&s[..63]).is_err());
        assert!(ChunkKey::from_hex(&format!("{}g", &s[..63])).is_err());
        // SHA-256("abc"), the FIPS 180-2 test vector.
        assert_eq!(
            ModelFingerprint::of_bytes(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
