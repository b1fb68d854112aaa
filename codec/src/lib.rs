//! The codec core: turns a KV cache into self-describing chunk objects and back.
//!
//! Pipeline: [`KvCache`](kvfetcher_kv::KvCache) -> quantized [`CodePlane`]s (one per layer
//! group) -> a variant's [`SectionEncoder`] -> sections of a chunk object. Decoding runs the
//! same steps backwards. Every variant returns the quantized codes bit-exactly.
//!
//! No I/O beyond the optional dynamically loaded codec libraries (x265, libde265).

mod plane;
mod variant;

pub use plane::{CodePlane, PlaneShape};
pub use variant::{CodecError, EncodedSection, SectionDecoder, SectionEncoder, VariantKind};
