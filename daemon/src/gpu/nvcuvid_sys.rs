//! Raw bindings to NVDEC (`libnvcuvid.so.1`), loaded at run time.
//!
//! Hand-written from the Video Codec SDK headers `cuviddec.h` and `nvcuvid.h` (64-bit layouts;
//! FFmpeg's nv-codec-headers `dynlink_cuviddec.h` / `dynlink_nvcuvid.h` carry the same
//! definitions). Only what the HEVC decoder needs. `CUVIDPICPARAMS` stays opaque: the parser
//! fills it and we hand its pointer back to `cuvidDecodePicture`. The safe layer is
//! [`super::nvdec`]; nothing else touches these.

use std::ffi::{c_int, c_short, c_uint, c_ulong, c_void};

use libloading::Library;

use super::cuda_sys::{CuResult, CuStream};

/// `CUvideodecoder`.
pub(crate) type CuVideoDecoder = *mut c_void;
/// `CUvideoparser`.
pub(crate) type CuVideoParser = *mut c_void;
/// `CUvideoctxlock`.
pub(crate) type CuVideoCtxLock = *mut c_void;

/// `cudaVideoCodec_HEVC`.
pub(crate) const CODEC_HEVC: c_int = 8;
/// `cudaVideoChromaFormat_420`.
pub(crate) const CHROMA_420: c_int = 1;
/// `cudaVideoChromaFormat_444`.
pub(crate) const CHROMA_444: c_int = 3;
/// `cudaVideoSurfaceFormat_NV12`.
pub(crate) const SURFACE_NV12: c_int = 0;
/// `cudaVideoSurfaceFormat_P016`.
pub(crate) const SURFACE_P016: c_int = 1;
/// `cudaVideoSurfaceFormat_YUV444`.
pub(crate) const SURFACE_YUV444: c_int = 2;
/// `cudaVideoSurfaceFormat_YUV444_16Bit`.
pub(crate) const SURFACE_YUV444_16BIT: c_int = 3;
/// `cudaVideoDeinterlaceMode_Weave`.
pub(crate) const DEINTERLACE_WEAVE: c_int = 0;
/// `cudaVideoCreate_PreferCUVID`: the dedicated video engines.
pub(crate) const CREATE_PREFER_CUVID: c_ulong = 4;
/// `CUVID_PKT_ENDOFSTREAM`.
pub(crate) const PKT_ENDOFSTREAM: c_ulong = 0x01;

/// `CUVIDDECODECAPS` (SDK 11+ field names inside the SDK 9 reserved space; 88 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CuvidDecodeCaps {
    pub(crate) codec_type: c_int,
    pub(crate) chroma_format: c_int,
    pub(crate) bit_depth_minus8: c_uint,
    pub(crate) reserved1: [c_uint; 3],
    pub(crate) is_supported: u8,
    pub(crate) num_nvdecs: u8,
    pub(crate) output_format_mask: u16,
    pub(crate) max_width: c_uint,
    pub(crate) max_height: c_uint,
    pub(crate) max_mb_count: c_uint,
    pub(crate) min_width: u16,
    pub(crate) min_height: u16,
    pub(crate) histogram: [u8; 4],
    pub(crate) reserved3: [c_uint; 10],
}

/// A rectangle of `short`s (`display_area`, `target_rect` of `CUVIDDECODECREATEINFO`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ShortRect {
    pub(crate) left: c_short,
    pub(crate) top: c_short,
    pub(crate) right: c_short,
    pub(crate) bottom: c_short,
}

/// `CUVIDDECODECREATEINFO` (176 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct CuvidDecodeCreateInfo {
    pub(crate) width: c_ulong,
    pub(crate) height: c_ulong,
    pub(crate) num_decode_surfaces: c_ulong,
    pub(crate) codec_type: c_int,
    pub(crate) chroma_format: c_int,
    pub(crate) creation_flags: c_ulong,
    pub(crate) bit_depth_minus8: c_ulong,
    pub(crate) intra_decode_only: c_ulong,
    pub(crate) max_width: c_ulong,
    pub(crate) max_height: c_ulong,
    pub(crate) reserved1: c_ulong,
    pub(crate) display_area: ShortRect,
    pub(crate) output_format: c_int,
    pub(crate) deinterlace_mode: c_int,
    pub(crate) target_width: c_ulong,
    pub(crate) target_height: c_ulong,
    pub(crate) num_output_surfaces: c_ulong,
    pub(crate) vid_lock: CuVideoCtxLock,
    pub(crate) target_rect: ShortRect,
    pub(crate) enable_histogram: c_ulong,
    pub(crate) reserved2: [c_ulong; 4],
}

/// An `int` rectangle (`display_area` of `CUVIDEOFORMAT`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IntRect {
    pub(crate) left: c_int,
    pub(crate) top: c_int,
    pub(crate) right: c_int,
    pub(crate) bottom: c_int,
}

/// `CUVIDEOFORMAT` (64 bytes), filled by the parser's sequence callback.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CuVideoFormat {
    pub(crate) codec: c_int,
    pub(crate) frame_rate: [c_uint; 2],
    pub(crate) progressive_sequence: u8,
    pub(crate) bit_depth_luma_minus8: u8,
    pub(crate) bit_depth_chroma_minus8: u8,
    pub(crate) min_num_decode_surfaces: u8,
    pub(crate) coded_width: c_uint,
    pub(crate) coded_height: c_uint,
    pub(crate) display_area: IntRect,
    pub(crate) chroma_format: c_int,
    pub(crate) bitrate: c_uint,
    pub(crate) display_aspect_ratio: [c_int; 2],
    pub(crate) video_signal_description: [u8; 4],
    pub(crate) seqhdr_data_length: c_uint,
}

/// `CUVIDPICPARAMS`: opaque here, only passed through.
#[repr(C)]
pub(crate) struct CuvidPicParams {
    _opaque: [u8; 0],
}

/// `CUVIDPARSERDISPINFO` (24 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CuvidParserDispInfo {
    pub(crate) picture_index: c_int,
    pub(crate) progressive_frame: c_int,
    pub(crate) top_field_first: c_int,
    pub(crate) repeat_first_field: c_int,
    pub(crate) timestamp: i64,
}

/// `PFNVIDSEQUENCECALLBACK`.
pub(crate) type SequenceCallback = unsafe extern "C" fn(*mut c_void, *mut CuVideoFormat) -> c_int;
/// `PFNVIDDECODECALLBACK`.
pub(crate) type DecodeCallback = unsafe extern "C" fn(*mut c_void, *mut CuvidPicParams) -> c_int;
/// `PFNVIDDISPLAYCALLBACK`.
pub(crate) type DisplayCallback =
    unsafe extern "C" fn(*mut c_void, *mut CuvidParserDispInfo) -> c_int;

/// `CUVIDPARSERPARAMS` (136 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct CuvidParserParams {
    pub(crate) codec_type: c_int,
    pub(crate) max_num_decode_surfaces: c_uint,
    pub(crate) clock_rate: c_uint,
    pub(crate) error_threshold: c_uint,
    pub(crate) max_display_delay: c_uint,
    /// `bAnnexb : 1` and `uReserved : 31` in newer SDKs; zero means the default.
    pub(crate) flags: c_uint,
    pub(crate) reserved1: [c_uint; 4],
    pub(crate) user_data: *mut c_void,
    pub(crate) sequence_callback: Option<SequenceCallback>,
    pub(crate) decode_picture: Option<DecodeCallback>,
    pub(crate) display_picture: Option<DisplayCallback>,
    pub(crate) reserved2: [*mut c_void; 7],
    pub(crate) ext_video_info: *mut c_void,
}

/// `CUVIDSOURCEDATAPACKET` (32 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct CuvidSourceDataPacket {
    pub(crate) flags: c_ulong,
    pub(crate) payload_size: c_ulong,
    pub(crate) payload: *const u8,
    pub(crate) timestamp: i64,
}

/// `CUVIDPROCPARAMS` (264 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct CuvidProcParams {
    pub(crate) progressive_frame: c_int,
    pub(crate) second_field: c_int,
    pub(crate) top_field_first: c_int,
    pub(crate) unpaired_field: c_int,
    pub(crate) reserved_flags: c_uint,
    pub(crate) reserved_zero: c_uint,
    pub(crate) raw_input_dptr: u64,
    pub(crate) raw_input_pitch: c_uint,
    pub(crate) raw_input_format: c_uint,
    pub(crate) raw_output_dptr: u64,
    pub(crate) raw_output_pitch: c_uint,
    pub(crate) reserved1: c_uint,
    pub(crate) output_stream: CuStream,
    pub(crate) reserved: [c_uint; 46],
    pub(crate) reserved2: [*mut c_void; 2],
}

/// The NVDEC entry points, resolved once from `libnvcuvid.so.1`.
pub(crate) struct NvcuvidApi {
    pub(crate) get_decoder_caps: unsafe extern "C" fn(*mut CuvidDecodeCaps) -> CuResult,
    pub(crate) create_decoder:
        unsafe extern "C" fn(*mut CuVideoDecoder, *mut CuvidDecodeCreateInfo) -> CuResult,
    pub(crate) destroy_decoder: unsafe extern "C" fn(CuVideoDecoder) -> CuResult,
    pub(crate) decode_picture:
        unsafe extern "C" fn(CuVideoDecoder, *mut CuvidPicParams) -> CuResult,
    pub(crate) map_video_frame: unsafe extern "C" fn(
        CuVideoDecoder,
        c_int,
        *mut u64,
        *mut c_uint,
        *mut CuvidProcParams,
    ) -> CuResult,
    pub(crate) unmap_video_frame: unsafe extern "C" fn(CuVideoDecoder, u64) -> CuResult,
    pub(crate) create_video_parser:
        unsafe extern "C" fn(*mut CuVideoParser, *mut CuvidParserParams) -> CuResult,
    pub(crate) parse_video_data:
        unsafe extern "C" fn(CuVideoParser, *mut CuvidSourceDataPacket) -> CuResult,
    pub(crate) destroy_video_parser: unsafe extern "C" fn(CuVideoParser) -> CuResult,
    /// Keeps the library mapped while the pointers above are in use.
    _lib: Library,
}

/// Resolves one symbol into a plain function pointer.
///
/// # Safety
/// `T` must be the C signature of `name`.
unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
    // SAFETY: the caller guarantees that T matches the symbol's C signature; NvcuvidApi keeps
    // the library loaded while the pointer lives.
    unsafe {
        lib.get::<T>(name.as_bytes())
            .map(|s| *s)
            .map_err(|e| format!("{name}: {e}"))
    }
}

impl NvcuvidApi {
    /// Loads `libnvcuvid.so.1` and resolves every entry point.
    pub(crate) fn load() -> Result<NvcuvidApi, String> {
        // SAFETY: loading the NVIDIA video library runs its initialisers, which have no
        // preconditions on our side.
        let lib = unsafe { Library::new("libnvcuvid.so.1") }.map_err(|e| e.to_string())?;
        // SAFETY: every signature below is copied from cuviddec.h / nvcuvid.h (64-bit).
        unsafe {
            Ok(NvcuvidApi {
                get_decoder_caps: sym(&lib, "cuvidGetDecoderCaps")?,
                create_decoder: sym(&lib, "cuvidCreateDecoder")?,
                destroy_decoder: sym(&lib, "cuvidDestroyDecoder")?,
                decode_picture: sym(&lib, "cuvidDecodePicture")?,
                map_video_frame: sym(&lib, "cuvidMapVideoFrame64")?,
                unmap_video_frame: sym(&lib, "cuvidUnmapVideoFrame64")?,
                create_video_parser: sym(&lib, "cuvidCreateVideoParser")?,
                parse_video_data: sym(&lib, "cuvidParseVideoData")?,
                destroy_video_parser: sym(&lib, "cuvidDestroyVideoParser")?,
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
