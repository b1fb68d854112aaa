//! The codec core: turns a KV cache into self-describing chunk objects and back.
//!
//! Pipeline: [`KvCache`](kvfetcher_kv::KvCache) -> quantized [`CodePlane`]s (one per layer
//! group) -> a variant's [`SectionEncoder`] -> sections of a chunk object. Decoding runs the
//! same steps backwards. Every variant returns the quantized codes bit-exactly.
//!
//! [`rans`] is an interleaved static-table rANS coder for a tensor's quantized values (a building
//! block for variants; its stream format is fixed by docs/FORMAT.md and shared with a CUDA decoder).
//!
//! No I/O beyond the optional dynamically loaded codec libraries (x265, libde265).

mod chunk;
mod error;
mod format;
mod hevc;
mod key;
mod packed;
mod plane;
mod quant;
pub mod rans;
mod registry;
mod variant;
mod zstd_variant;

pub use plane::{CodePlane, PlaneShape};
pub use variant::{CodecError, EncodedSection, SectionDecoder, SectionEncoder, VariantKind};

pub use chunk::{
    decode_chunk, decode_section, encode_cache, layer_groups, restore_section, EncodeConfig,
};
pub use error::FormatError;
pub use format::{
    ChunkHeader, ChunkView, SectionInfo, FIXED_HEADER_LEN, FORMAT_VERSION, MAGIC, MAX_CHANNELS,
    MAX_CHUNK_CODES, MAX_CHUNK_TOKENS, MAX_HEADER_LEN, MAX_HEAD_DIM, MAX_KV_HEADS, MAX_LAYERS,
    MAX_OBJECT_LEN, MAX_SECTION_PARAMS, SECTION_ENTRY_LEN,
};
pub use hevc::{
    codes_crc32c, extract_streams, Chroma, Frame, HevcDecoder, HevcEncoder, HevcGeometry,
    HevcLayout, HevcParams, LayoutSpec, StreamInfo, DEFAULT_PRESET,
};
pub use key::{chunk_keys, ChunkKey, ModelFingerprint, DEFAULT_CHUNK_TOKENS};
pub use packed::{pack_codes, PackedCodec};
pub use quant::{
    dequantize, quantize, GroupParams, Grouping, LayerQuant, QuantConfig, MAX_BITS, MIN_BITS,
};
pub use rans::RansError;
pub use registry::{hevc_encoder, CodecRegistry};
pub use zstd_variant::{ZstdCodec, DEFAULT_ZSTD_LEVEL};
