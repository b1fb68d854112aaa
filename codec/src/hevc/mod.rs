//! The `hevc` variant: codes laid out in frames and coded with HEVC, lossless or (at a constant
//! QP) lossy, so NVDEC (or a software decoder) can decode them.
//!
//! - `layout` and `geometry`: the pure mapping between codes and frames, shared by every
//!   backend (an NVDEC decoder reuses it with its own decoder).
//! - `params`: the parameters stored beside a section's payload.
//! - `encoder` (x265) and `decoder` (libde265): the CPU backends, each library loaded at run
//!   time through its raw bindings (`x265_sys`, `de265_sys`) and safe wrapper (`x265`, `de265`).

mod de265;
mod de265_sys;
mod decoder;
mod encoder;
mod geometry;
mod layout;
mod params;
mod x265;
mod x265_sys;

pub use decoder::HevcDecoder;
pub use encoder::{HevcEncoder, DEFAULT_PRESET};
pub use geometry::{Frame, HevcGeometry};
pub use layout::{Chroma, HevcLayout, LayoutSpec};
pub use params::{codes_crc32c, extract_streams, HevcParams, StreamInfo, MAX_QP as HEVC_MAX_QP};
