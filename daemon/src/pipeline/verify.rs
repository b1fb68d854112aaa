//! What a fetched chunk header must say: the chunk the daemon asked for, nothing else. No I/O.
//!
//! The transport checks checksums and that the header carries the requested key, but a header
//! is written by whoever saved the object: chunk 1 relabelled with chunk 0's key passes those
//! checks, and a header claiming 65,536 tokens would size the client's buffer. The key chains
//! the model and every token id up to the chunk's end, so the daemon knows exactly which
//! model, token range and key each chunk of a request must have; a header that says otherwise
//! is a damaged (or forged) object, refused before anything is sized from it.

use kvfetcher_codec::{ChunkHeader, ChunkKey, ModelFingerprint};

/// The chunk the daemon asked for: position `index` of the chain of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expected {
    /// The chunk's key, from the request's token ids.
    pub(crate) key: ChunkKey,
    /// The request's model.
    pub(crate) model: ModelFingerprint,
    /// Index of the chunk's first token in the request.
    pub(crate) token_start: u32,
    /// Tokens of the request in this chunk: the chunk size, or fewer for the last one.
    pub(crate) token_count: u32,
}

impl Expected {
    /// Chunk `index` of a request of `tokens` tokens cut in chunks of `chunk_tokens`, whose
    /// key is `key`; `None` if the chunk lies beyond the request.
    pub(crate) fn chunk(
        key: ChunkKey,
        model: ModelFingerprint,
        index: usize,
        chunk_tokens: u32,
        tokens: usize,
    ) -> Option<Expected> {
        let start = (index as u64).checked_mul(u64::from(chunk_tokens))?;
        let left = (tokens as u64).checked_sub(start).filter(|&n| n > 0)?;
        Some(Expected {
            key,
            model,
            token_start: u32::try_from(start).ok()?,
            token_count: u32::try_from(left.min(u64::from(chunk_tokens))).ok()?,
        })
    }
}

/// The KV geometry every chunk of one fetch must share (the first chunk's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Layers.
    pub(crate) num_layers: u16,
    /// KV heads per layer.
    pub(crate) kv_heads: u16,
    /// Dimension of one head.
    pub(crate) head_dim: u16,
}

impl Geometry {
    /// The geometry `h` claims.
    pub(crate) fn of(h: &ChunkHeader) -> Geometry {
        Geometry {
            num_layers: h.num_layers,
            kv_heads: h.kv_heads,
            head_dim: h.head_dim,
        }
    }
}

/// How a fetched header differs from the chunk asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Mismatch {
    /// The header carries another chunk's key.
    #[error("header carries key {0}")]
    Key(ChunkKey),
    /// The header names another model.
    #[error("header names model {0}")]
    Model(ModelFingerprint),
    /// The header's token range is not the chunk's.
    #[error("header claims tokens {start}..+{count}, the chunk is {want_start}..+{want_count}")]
    Tokens {
        /// The header's first token.
        start: u32,
        /// The header's token count.
        count: u32,
        /// The chunk's first token.
        want_start: u32,
        /// The chunk's token count.
        want_count: u32,
    },
    /// The header's KV shape is not the first chunk's.
    #[error("header is {0:?}, the first chunk is {1:?}")]
    Geometry(Geometry, Geometry),
}

/// Checks `h` against the chunk asked for and, when given, the first chunk's geometry.
pub(crate) fn check_header(
    h: &ChunkHeader,
    want: &Expected,
    first: Option<Geometry>,
) -> Result<(), Mismatch> {
    if h.key != want.key {
        return Err(Mismatch::Key(h.key));
    }
    if h.model != want.model {
        return Err(Mismatch::Model(h.model));
    }
    if (h.token_start, h.token_count) != (want.token_start, want.token_count) {
        return Err(Mismatch::Tokens {
            start: h.token_start,
            count: h.token_count,
            want_start: want.token_start,
            want_count: want.token_count,
        });
    }
    match first {
        Some(g) if Geometry::of(h) != g => Err(Mismatch::Geometry(Geometry::of(h), g)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfetcher_codec::{Grouping, VariantKind};
    use kvfetcher_kv::DType;

    fn header(key: ChunkKey, start: u32, count: u32) -> ChunkHeader {
        ChunkHeader {
            key,
            model: ModelFingerprint::of_bytes(b"m"),
            token_start: start,
            token_count: count,
            num_layers: 2,
            kv_heads: 1,
            head_dim: 4,
            dtype: DType::F16,
            variant: VariantKind::Zstd,
            exact: false,
            key_grouping: Grouping::PerChannel,
            value_grouping: Grouping::PerChannel,
            sections: Vec::new(),
            transform: None,
        }
    }

    #[test]
    fn expected_chunks_cover_the_request() {
        let (k, m) = (ChunkKey([7; 32]), ModelFingerprint::of_bytes(b"m"));
        let e = |i| Expected::chunk(k, m, i, 256, 600).map(|e| (e.token_start, e.token_count));
        assert_eq!(e(0), Some((0, 256)));
        assert_eq!(e(2), Some((512, 88)));
        assert_eq!(e(3), None);
        assert_eq!(Expected::chunk(k, m, usize::MAX, 256, 600), None);
    }

    #[test]
    fn every_field_must_match() {
        let (k, m) = (ChunkKey([7; 32]), ModelFingerprint::of_bytes(b"m"));
        let want = Expected::chunk(k, m, 1, 256, 1024).unwrap();
        let good = header(k, 256, 256);
        let g = Geometry::of(&good);
        assert_eq!(check_header(&good, &want, None), Ok(()));
        assert_eq!(check_header(&good, &want, Some(g)), Ok(()));
        let other = ChunkKey([8; 32]);
        assert_eq!(
            check_header(&header(other, 256, 256), &want, None),
            Err(Mismatch::Key(other))
        );
        let mut h = good.clone();
        h.model = ModelFingerprint::of_bytes(b"other");
        assert!(matches!(
            check_header(&h, &want, None),
            Err(Mismatch::Model(_))
        ));
        // Chunk 0 relabelled, and an oversize claim.
        for (start, count) in [(0, 256), (256, 65536), (256, 255)] {
            assert!(matches!(
                check_header(&header(k, start, count), &want, None),
                Err(Mismatch::Tokens { .. })
            ));
        }
        let mut h = good.clone();
        h.kv_heads = 2;
        assert!(matches!(
            check_header(&h, &want, Some(g)),
            Err(Mismatch::Geometry(..))
        ));
    }
}
