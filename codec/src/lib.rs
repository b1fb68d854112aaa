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

mod allocate;
mod calibrate;
mod chunk;
mod error;
mod format;
mod hevc;
mod key;
mod packed;
mod plane;
mod profile;
mod quant;
pub mod rans;
mod rans_variant;
mod registry;
mod transform;
mod variant;
mod zstd_variant;

pub use plane::{CodePlane, PlaneShape};
pub use variant::{CodecError, EncodedSection, SectionDecoder, SectionEncoder, VariantKind};

pub use allocate::{allocate_steps, uniform_steps, Allocation, DEFAULT_TARGET_KL};
pub use calibrate::{calibrate, BasisKind, Calibration, CURVE_POINTS};
pub use chunk::{
    decode_chunk, decode_section, encode_cache, layer_groups, restore_section, EncodeConfig,
};
pub use error::FormatError;
pub use format::{
    ChunkHeader, ChunkView, SectionInfo, TransformInfo, FIXED_HEADER_LEN, FORMAT_VERSION, MAGIC,
    MAX_CHANNELS, MAX_CHUNK_CODES, MAX_CHUNK_TOKENS, MAX_HEADER_LEN, MAX_HEAD_DIM, MAX_KV_HEADS,
    MAX_LAYERS, MAX_OBJECT_LEN, MAX_SECTION_PARAMS, SECTION_ENTRY_LEN, TRANSFORM_CODE_BITS,
};
pub use hevc::{
    codes_crc32c, extract_streams, Chroma, Frame, HevcDecoder, HevcEncoder, HevcGeometry,
    HevcLayout, HevcParams, LayoutSpec, StreamInfo, DEFAULT_PRESET, HEVC_MAX_QP,
};
pub use key::{chunk_keys, ChunkKey, ModelFingerprint, ProfileId, DEFAULT_CHUNK_TOKENS};
pub use packed::{pack_codes, PackedCodec};
pub use profile::{
    CodecProfile, HeadBasis, LayerProfile, RatePoint, Rope, RopeStyle, TensorProfile,
    PROFILE_MAGIC, PROFILE_VERSION,
};
pub use quant::{
    dequantize, quantize, GroupParams, Grouping, LayerQuant, QuantConfig, TransformConfig,
    MAX_BITS, MIN_BITS,
};
pub use rans::RansError;
pub use rans_variant::{parse_rans_params, RansCodec};
pub use registry::{hevc_encoder, CodecRegistry};
pub use transform::{
    context, dequantize_level, forward, forward_with, inverse, inverse_with, quantize_codes,
    quantize_level, RopeTable, TensorAt, CONTEXTS, MAX_LEVEL,
};
pub use zstd_variant::{ZstdCodec, DEFAULT_ZSTD_LEVEL};
