//! Raw bindings to libde265 (`libde265.so.0`, 1.0.x), loaded at run time so that hosts without
//! it still start.
//!
//! Hand-written from `/usr/include/libde265/de265.h` (1.0.11); only the functions the software
//! decoder calls. Nothing outside `hevc::de265` uses these.

use std::ffi::{c_int, c_void};

use libloading::Library;

/// Opaque `de265_decoder_context`.
#[repr(C)]
pub(crate) struct Context {
    _private: [u8; 0],
}

/// Opaque `struct de265_image`.
#[repr(C)]
pub(crate) struct Image {
    _private: [u8; 0],
}

/// `de265_error` (a C enum, int-sized).
pub(crate) type Error = c_int;
/// `DE265_OK`.
pub(crate) const OK: Error = 0;
/// `DE265_ERROR_IMAGE_BUFFER_FULL`: take pictures out, then decode on.
pub(crate) const ERROR_IMAGE_BUFFER_FULL: Error = 9;
/// `DE265_ERROR_WAITING_FOR_INPUT_DATA`: everything pushed is decoded.
pub(crate) const ERROR_WAITING_FOR_INPUT_DATA: Error = 13;
/// Warnings are numbered from here (`DE265_WARNING_NO_WPP_CANNOT_USE_MULTITHREADING`).
pub(crate) const FIRST_WARNING: Error = 1000;
/// `DE265_WARNING_NO_WPP_CANNOT_USE_MULTITHREADING`: harmless.
pub(crate) const WARNING_NO_WPP: Error = 1000;
/// `DE265_WARNING_NUMBER_OF_THREADS_LIMITED_TO_MAXIMUM`: harmless.
pub(crate) const WARNING_THREADS_LIMITED: Error = 1022;
/// `de265_chroma_420`.
pub(crate) const CHROMA_420: c_int = 1;
/// `de265_chroma_444`.
pub(crate) const CHROMA_444: c_int = 3;
/// `DE265_DECODER_PARAM_BOOL_SEI_CHECK_HASH`.
pub(crate) const PARAM_SEI_CHECK_HASH: c_int = 0;

/// The libde265 functions the decoder calls, resolved from one open library.
pub(crate) struct Fns {
    pub(crate) new_decoder: unsafe extern "C" fn() -> *mut Context,
    pub(crate) start_worker_threads: unsafe extern "C" fn(*mut Context, c_int) -> Error,
    pub(crate) free_decoder: unsafe extern "C" fn(*mut Context) -> Error,
    pub(crate) push_data:
        unsafe extern "C" fn(*mut Context, *const c_void, c_int, i64, *mut c_void) -> Error,
    pub(crate) flush_data: unsafe extern "C" fn(*mut Context) -> Error,
    pub(crate) decode: unsafe extern "C" fn(*mut Context, *mut c_int) -> Error,
    pub(crate) reset: unsafe extern "C" fn(*mut Context),
    pub(crate) peek_next_picture: unsafe extern "C" fn(*mut Context) -> *const Image,
    pub(crate) release_next_picture: unsafe extern "C" fn(*mut Context),
    pub(crate) get_warning: unsafe extern "C" fn(*mut Context) -> Error,
    pub(crate) set_parameter_bool: unsafe extern "C" fn(*mut Context, c_int, c_int),
    pub(crate) get_image_width: unsafe extern "C" fn(*const Image, c_int) -> c_int,
    pub(crate) get_image_height: unsafe extern "C" fn(*const Image, c_int) -> c_int,
    pub(crate) get_chroma_format: unsafe extern "C" fn(*const Image) -> c_int,
    pub(crate) get_bits_per_pixel: unsafe extern "C" fn(*const Image, c_int) -> c_int,
    pub(crate) get_image_plane: unsafe extern "C" fn(*const Image, c_int, *mut c_int) -> *const u8,
    /// Keeps every pointer above valid.
    _lib: Library,
}

impl Fns {
    /// Opens `name` and resolves every function.
    pub(crate) fn load(name: &str) -> Result<Fns, libloading::Error> {
        // SAFETY: loading libde265 runs only its ELF initializers, which have no preconditions.
        let lib = unsafe { Library::new(name) }?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the field's type is the function's signature in de265.h 1.0.11, and
                // `_lib` keeps the library open as long as the pointer is held.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }?
            };
        }
        Ok(Fns {
            new_decoder: sym!("de265_new_decoder"),
            start_worker_threads: sym!("de265_start_worker_threads"),
            free_decoder: sym!("de265_free_decoder"),
            push_data: sym!("de265_push_data"),
            flush_data: sym!("de265_flush_data"),
            decode: sym!("de265_decode"),
            reset: sym!("de265_reset"),
            peek_next_picture: sym!("de265_peek_next_picture"),
            release_next_picture: sym!("de265_release_next_picture"),
            get_warning: sym!("de265_get_warning"),
            set_parameter_bool: sym!("de265_set_parameter_bool"),
            get_image_width: sym!("de265_get_image_width"),
            get_image_height: sym!("de265_get_image_height"),
            get_chroma_format: sym!("de265_get_chroma_format"),
            get_bits_per_pixel: sym!("de265_get_bits_per_pixel"),
            get_image_plane: sym!("de265_get_image_plane"),
            _lib: lib,
        })
    }
}
