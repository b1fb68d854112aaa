//! NVDEC (`libnvcuvid.so.1`): types, constants and the entry points of the HEVC decoder.
//!
//! Hand-written from the Video Codec SDK headers `cuviddec.h` and `nvcuvid.h` (64-bit layouts;
//! FFmpeg's nv-codec-headers `dynlink_cuviddec.h` / `dynlink_nvcuvid.h` carry the same
//! definitions). Only what the daemon's HEVC decoder needs. `CUVIDPICPARAMS` stays opaque: the
//! parser fills it and the caller hands its pointer back to `cuvidDecodePicture`. Names of
//! types, constants and fields follow the headers one to one; their documentation is theirs.
#![allow(missing_docs)]

use std::ffi::{c_int, c_short, c_uint, c_ulong, c_void};

use libloading::Library;

use crate::cuda::{CuResult, CuStream};
use crate::{open, sym, LoadError};

/// `CUvideodecoder`.
pub type CuVideoDecoder = *mut c_void;
/// `CUvideoparser`.
pub type CuVideoParser = *mut c_void;
/// `CUvideoctxlock`.
pub type CuVideoCtxLock = *mut c_void;

/// `cudaVideoCodec_HEVC`.
pub const CODEC_HEVC: c_int = 8;
/// `cudaVideoChromaFormat_420`.
pub const CHROMA_420: c_int = 1;
/// `cudaVideoChromaFormat_444`.
pub const CHROMA_444: c_int = 3;
/// `cudaVideoSurfaceFormat_NV12`.
pub const SURFACE_NV12: c_int = 0;
/// `cudaVideoSurfaceFormat_P016`.
pub const SURFACE_P016: c_int = 1;
/// `cudaVideoSurfaceFormat_YUV444`.
pub const SURFACE_YUV444: c_int = 2;
/// `cudaVideoSurfaceFormat_YUV444_16Bit`.
pub const SURFACE_YUV444_16BIT: c_int = 3;
/// `cudaVideoDeinterlaceMode_Weave`.
pub const DEINTERLACE_WEAVE: c_int = 0;
/// `cudaVideoCreate_PreferCUVID`: the dedicated video engines.
pub const CREATE_PREFER_CUVID: c_ulong = 4;
/// `CUVID_PKT_ENDOFSTREAM`.
pub const PKT_ENDOFSTREAM: c_ulong = 0x01;

/// `CUVIDDECODECAPS` (SDK 11+ field names inside the SDK 9 reserved space; 88 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CuvidDecodeCaps {
    pub codec_type: c_int,
    pub chroma_format: c_int,
    pub bit_depth_minus8: c_uint,
    pub reserved1: [c_uint; 3],
    pub is_supported: u8,
    pub num_nvdecs: u8,
    pub output_format_mask: u16,
    pub max_width: c_uint,
    pub max_height: c_uint,
    pub max_mb_count: c_uint,
    pub min_width: u16,
    pub min_height: u16,
    pub histogram: [u8; 4],
    pub reserved3: [c_uint; 10],
}

/// A rectangle of `short`s (`display_area`, `target_rect` of `CUVIDDECODECREATEINFO`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ShortRect {
    pub left: c_short,
    pub top: c_short,
    pub right: c_short,
    pub bottom: c_short,
}

/// `CUVIDDECODECREATEINFO` (176 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CuvidDecodeCreateInfo {
    pub width: c_ulong,
    pub height: c_ulong,
    pub num_decode_surfaces: c_ulong,
    pub codec_type: c_int,
    pub chroma_format: c_int,
    pub creation_flags: c_ulong,
    pub bit_depth_minus8: c_ulong,
    pub intra_decode_only: c_ulong,
    pub max_width: c_ulong,
    pub max_height: c_ulong,
    pub reserved1: c_ulong,
    pub display_area: ShortRect,
    pub output_format: c_int,
    pub deinterlace_mode: c_int,
    pub target_width: c_ulong,
    pub target_height: c_ulong,
    pub num_output_surfaces: c_ulong,
    pub vid_lock: CuVideoCtxLock,
    pub target_rect: ShortRect,
    pub enable_histogram: c_ulong,
    pub reserved2: [c_ulong; 4],
}

/// An `int` rectangle (`display_area` of `CUVIDEOFORMAT`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IntRect {
    pub left: c_int,
    pub top: c_int,
    pub right: c_int,
    pub bottom: c_int,
}

/// `CUVIDEOFORMAT` (64 bytes), filled by the parser's sequence callback.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CuVideoFormat {
    pub codec: c_int,
    pub frame_rate: [c_uint; 2],
    pub progressive_sequence: u8,
    pub bit_depth_luma_minus8: u8,
    pub bit_depth_chroma_minus8: u8,
    pub min_num_decode_surfaces: u8,
    pub coded_width: c_uint,
    pub coded_height: c_uint,
    pub display_area: IntRect,
    pub chroma_format: c_int,
    pub bitrate: c_uint,
    pub display_aspect_ratio: [c_int; 2],
    pub video_signal_description: [u8; 4],
    pub seqhdr_data_length: c_uint,
}

/// `CUVIDPICPARAMS`: opaque here, only passed through.
#[repr(C)]
pub struct CuvidPicParams {
    _opaque: [u8; 0],
}

/// `CUVIDPARSERDISPINFO` (24 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CuvidParserDispInfo {
    pub picture_index: c_int,
    pub progressive_frame: c_int,
    pub top_field_first: c_int,
    pub repeat_first_field: c_int,
    pub timestamp: i64,
}

/// `PFNVIDSEQUENCECALLBACK`.
pub type SequenceCallback = unsafe extern "C" fn(*mut c_void, *mut CuVideoFormat) -> c_int;
/// `PFNVIDDECODECALLBACK`.
pub type DecodeCallback = unsafe extern "C" fn(*mut c_void, *mut CuvidPicParams) -> c_int;
/// `PFNVIDDISPLAYCALLBACK`.
pub type DisplayCallback = unsafe extern "C" fn(*mut c_void, *mut CuvidParserDispInfo) -> c_int;

/// `CUVIDPARSERPARAMS` (136 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CuvidParserParams {
    pub codec_type: c_int,
    pub max_num_decode_surfaces: c_uint,
    pub clock_rate: c_uint,
    pub error_threshold: c_uint,
    pub max_display_delay: c_uint,
    /// `bAnnexb : 1` and `uReserved : 31` in newer SDKs; zero means the default.
    pub flags: c_uint,
    pub reserved1: [c_uint; 4],
    pub user_data: *mut c_void,
    pub sequence_callback: Option<SequenceCallback>,
    pub decode_picture: Option<DecodeCallback>,
    pub display_picture: Option<DisplayCallback>,
    pub reserved2: [*mut c_void; 7],
    pub ext_video_info: *mut c_void,
}

/// `CUVIDSOURCEDATAPACKET` (32 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CuvidSourceDataPacket {
    pub flags: c_ulong,
    pub payload_size: c_ulong,
    pub payload: *const u8,
    pub timestamp: i64,
}

/// `CUVIDPROCPARAMS` (264 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CuvidProcParams {
    pub progressive_frame: c_int,
    pub second_field: c_int,
    pub top_field_first: c_int,
    pub unpaired_field: c_int,
    pub reserved_flags: c_uint,
    pub reserved_zero: c_uint,
    pub raw_input_dptr: u64,
    pub raw_input_pitch: c_uint,
    pub raw_input_format: c_uint,
    pub raw_output_dptr: u64,
    pub raw_output_pitch: c_uint,
    pub reserved1: c_uint,
    pub output_stream: CuStream,
    pub reserved: [c_uint; 46],
    pub reserved2: [*mut c_void; 2],
}

/// The file name of the NVDEC library.
pub const LIBNVCUVID: &str = "libnvcuvid.so.1";

/// The NVDEC entry points, resolved from `libnvcuvid.so.1` by [`NvcuvidApi::load`]. Every
/// pointer is `unsafe` to call: arguments must satisfy the SDK headers' contract.
pub struct NvcuvidApi {
    pub get_decoder_caps: unsafe extern "C" fn(*mut CuvidDecodeCaps) -> CuResult,
    pub create_decoder:
        unsafe extern "C" fn(*mut CuVideoDecoder, *mut CuvidDecodeCreateInfo) -> CuResult,
    pub destroy_decoder: unsafe extern "C" fn(CuVideoDecoder) -> CuResult,
    pub decode_picture: unsafe extern "C" fn(CuVideoDecoder, *mut CuvidPicParams) -> CuResult,
    pub map_video_frame: unsafe extern "C" fn(
        CuVideoDecoder,
        c_int,
        *mut u64,
        *mut c_uint,
        *mut CuvidProcParams,
    ) -> CuResult,
    pub unmap_video_frame: unsafe extern "C" fn(CuVideoDecoder, u64) -> CuResult,
    pub create_video_parser:
        unsafe extern "C" fn(*mut CuVideoParser, *mut CuvidParserParams) -> CuResult,
    pub parse_video_data:
        unsafe extern "C" fn(CuVideoParser, *mut CuvidSourceDataPacket) -> CuResult,
    pub destroy_video_parser: unsafe extern "C" fn(CuVideoParser) -> CuResult,
    /// Keeps the library mapped while the pointers above are in use.
    _lib: Library,
}

impl NvcuvidApi {
    /// Loads `libnvcuvid.so.1` and resolves every entry point.
    pub fn load() -> Result<NvcuvidApi, LoadError> {
        let lib = open(LIBNVCUVID)?;
        // SAFETY: every signature below is copied from cuviddec.h / nvcuvid.h (64-bit); the
        // table owns `lib`, so the pointers live as long as it does.
        unsafe {
            Ok(NvcuvidApi {
                get_decoder_caps: sym(&lib, LIBNVCUVID, "cuvidGetDecoderCaps")?,
                create_decoder: sym(&lib, LIBNVCUVID, "cuvidCreateDecoder")?,
                destroy_decoder: sym(&lib, LIBNVCUVID, "cuvidDestroyDecoder")?,
                decode_picture: sym(&lib, LIBNVCUVID, "cuvidDecodePicture")?,
                map_video_frame: sym(&lib, LIBNVCUVID, "cuvidMapVideoFrame64")?,
                unmap_video_frame: sym(&lib, LIBNVCUVID, "cuvidUnmapVideoFrame64")?,
                create_video_parser: sym(&lib, LIBNVCUVID, "cuvidCreateVideoParser")?,
                parse_video_data: sym(&lib, LIBNVCUVID, "cuvidParseVideoData")?,
                destroy_video_parser: sym(&lib, LIBNVCUVID, "cuvidDestroyVideoParser")?,
                _lib: lib,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use super::*;

    #[test]
    fn struct_sizes_match_the_sdk_headers() {
        assert_eq!(size_of::<CuvidDecodeCaps>(), 88);
        assert_eq!(size_of::<CuvidDecodeCreateInfo>(), 176);
        assert_eq!(size_of::<CuVideoFormat>(), 64);
        assert_eq!(size_of::<CuvidParserParams>(), 136);
        assert_eq!(size_of::<CuvidSourceDataPacket>(), 32);
        assert_eq!(size_of::<CuvidParserDispInfo>(), 24);
        assert_eq!(size_of::<CuvidProcParams>(), 264);
    }

    #[test]
    fn field_offsets_match_the_sdk_headers() {
        assert_eq!(
            std::mem::offset_of!(CuvidDecodeCreateInfo, display_area),
            80
        );
        assert_eq!(
            std::mem::offset_of!(CuvidDecodeCreateInfo, output_format),
            88
        );
        assert_eq!(std::mem::offset_of!(CuvidDecodeCreateInfo, vid_lock), 120);
        assert_eq!(std::mem::offset_of!(CuvidParserParams, user_data), 40);
        assert_eq!(std::mem::offset_of!(CuvidProcParams, output_stream), 56);
        assert_eq!(std::mem::offset_of!(CuVideoFormat, chroma_format), 40);
        assert_eq!(std::mem::offset_of!(CuvidDecodeCaps, num_nvdecs), 25);
    }
}
