//! Raw bindings to libx265 (build 199, x265 3.5), loaded at run time: x265 is GPL and optional,
//! so it is never linked.
//!
//! Hand-written from `/usr/include/x265.h` (X265_BUILD 199, X265_MAJOR_VERSION 1). Only the
//! prefix of each struct up to the last field used is replicated; every struct is allocated by
//! the library itself (`param_alloc`, `picture_alloc`), so a shorter Rust view is sound. Nothing
//! outside `hevc::x265` calls these.

use std::ffi::{c_char, c_int, c_void};

/// The build number the struct layouts below were copied from.
pub(crate) const X265_BUILD: c_int = 199;
/// The entry point exported by libx265 build 199.
pub(crate) const API_GET_SYMBOL: &[u8] = b"x265_api_get_199\0";
/// `X265_MAJOR_VERSION` of that header.
pub(crate) const X265_MAJOR_VERSION: c_int = 1;
/// `X265_CSP_I420`.
pub(crate) const CSP_I420: c_int = 1;
/// `X265_CSP_I444`.
pub(crate) const CSP_I444: c_int = 3;

/// Opaque `x265_param`.
#[repr(C)]
pub(crate) struct Param {
    _private: [u8; 0],
}

/// Opaque `x265_encoder`.
#[repr(C)]
pub(crate) struct Encoder {
    _private: [u8; 0],
}

/// `x265_nal`.
#[repr(C)]
pub(crate) struct Nal {
    /// NalUnitType.
    pub(crate) kind: u32,
    /// Size of `payload` in bytes.
    pub(crate) size_bytes: u32,
    /// The NAL unit with its Annex-B start code.
    pub(crate) payload: *mut u8,
}

/// The leading fields of `x265_picture` (the library allocates the whole struct).
#[repr(C)]
pub(crate) struct Picture {
    pub(crate) pts: i64,
    pub(crate) dts: i64,
    pub(crate) user_data: *mut c_void,
    pub(crate) planes: [*mut c_void; 3],
    /// Bytes between row starts.
    pub(crate) stride: [c_int; 3],
    /// Bit depth of the input samples (> 8 means 16-bit samples).
    pub(crate) bit_depth: c_int,
    pub(crate) slice_type: c_int,
    pub(crate) poc: c_int,
    pub(crate) color_space: c_int,
    pub(crate) force_qp: c_int,
}

type Unused = Option<unsafe extern "C" fn()>;

/// `x265_api`, up to `encoder_close`.
#[repr(C)]
pub(crate) struct Api {
    pub(crate) api_major_version: c_int,
    pub(crate) api_build_number: c_int,
    pub(crate) sizeof_param: c_int,
    pub(crate) sizeof_picture: c_int,
    pub(crate) sizeof_analysis_data: c_int,
    pub(crate) sizeof_zone: c_int,
    pub(crate) sizeof_stats: c_int,
    pub(crate) bit_depth: c_int,
    pub(crate) version_str: *const c_char,
    pub(crate) build_info_str: *const c_char,
    pub(crate) param_alloc: Option<unsafe extern "C" fn() -> *mut Param>,
    pub(crate) param_free: Option<unsafe extern "C" fn(*mut Param)>,
    pub(crate) param_default: Unused,
    pub(crate) param_parse:
        Option<unsafe extern "C" fn(*mut Param, *const c_char, *const c_char) -> c_int>,
    pub(crate) param_apply_profile: Unused,
    pub(crate) param_default_preset:
        Option<unsafe extern "C" fn(*mut Param, *const c_char, *const c_char) -> c_int>,
    pub(crate) picture_alloc: Option<unsafe extern "C" fn() -> *mut Picture>,
    pub(crate) picture_free: Option<unsafe extern "C" fn(*mut Picture)>,
    pub(crate) picture_init: Option<unsafe extern "C" fn(*mut Param, *mut Picture)>,
    pub(crate) encoder_open: Option<unsafe extern "C" fn(*mut Param) -> *mut Encoder>,
    pub(crate) encoder_parameters: Unused,
    pub(crate) encoder_reconfig: Unused,
    pub(crate) encoder_reconfig_zone: Unused,
    pub(crate) encoder_headers:
        Option<unsafe extern "C" fn(*mut Encoder, *mut *mut Nal, *mut u32) -> c_int>,
    pub(crate) encoder_encode: Option<
        unsafe extern "C" fn(
            *mut Encoder,
            *mut *mut Nal,
            *mut u32,
            *mut Picture,
            *mut Picture,
        ) -> c_int,
    >,
    pub(crate) encoder_get_stats: Unused,
    pub(crate) encoder_log: Unused,
    pub(crate) encoder_close: Option<unsafe extern "C" fn(*mut Encoder)>,
}

/// `x265_api_get_199`: the API table for an internal bit depth (0 = the library's default);
/// null when the library has no build for that depth.
pub(crate) type ApiGet = unsafe extern "C" fn(bit_depth: c_int) -> *const Api;
