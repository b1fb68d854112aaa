//! A safe wrapper over libx265 for lossless (or constant-QP lossy) encoding of whole frame
//! sequences.
//!
//! The library is opened at run time (it is GPL and optional): [`X265::load`] fails with
//! [`CodecError::Library`] when it is absent. The only user is the HEVC encoder.

use std::ffi::{c_char, c_int, CStr, CString};
use std::ptr;

use libloading::Library;

use crate::hevc::geometry::{Frame, HevcGeometry};
use crate::hevc::layout::Chroma;
use crate::hevc::x265_sys as sys;
use crate::CodecError;

/// Library names tried in order: the versioned soname whose layout `x265_sys` copies first.
const LIBRARY_NAMES: [&str; 2] = ["libx265.so.199", "libx265.so"];

fn lib_err(reason: impl Into<String>) -> CodecError {
    CodecError::Library {
        library: "x265",
        reason: reason.into(),
    }
}

/// A loaded libx265.
pub(crate) struct X265 {
    get: sys::ApiGet,
    /// Keeps `get` and every table it returns valid.
    _lib: Library,
}

impl std::fmt::Debug for X265 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("X265")
    }
}

/// The functions of one `x265_api` table that the encoder calls, all present.
#[derive(Clone, Copy)]
struct Fns {
    param_alloc: unsafe extern "C" fn() -> *mut sys::Param,
    param_free: unsafe extern "C" fn(*mut sys::Param),
    param_parse: unsafe extern "C" fn(*mut sys::Param, *const c_char, *const c_char) -> c_int,
    param_default_preset:
        unsafe extern "C" fn(*mut sys::Param, *const c_char, *const c_char) -> c_int,
    picture_alloc: unsafe extern "C" fn() -> *mut sys::Picture,
    picture_free: unsafe extern "C" fn(*mut sys::Picture),
    picture_init: unsafe extern "C" fn(*mut sys::Param, *mut sys::Picture),
    encoder_open: unsafe extern "C" fn(*mut sys::Param) -> *mut sys::Encoder,
    encoder_headers: unsafe extern "C" fn(*mut sys::Encoder, *mut *mut sys::Nal, *mut u32) -> c_int,
    encoder_encode: unsafe extern "C" fn(
        *mut sys::Encoder,
        *mut *mut sys::Nal,
        *mut u32,
        *mut sys::Picture,
        *mut sys::Picture,
    ) -> c_int,
    encoder_close: unsafe extern "C" fn(*mut sys::Encoder),
}

impl Fns {
    fn of(api: &sys::Api) -> Option<Fns> {
        Some(Fns {
            param_alloc: api.param_alloc?,
            param_free: api.param_free?,
            param_parse: api.param_parse?,
            param_default_preset: api.param_default_preset?,
            picture_alloc: api.picture_alloc?,
            picture_free: api.picture_free?,
            picture_init: api.picture_init?,
            encoder_open: api.encoder_open?,
            encoder_headers: api.encoder_headers?,
            encoder_encode: api.encoder_encode?,
            encoder_close: api.encoder_close?,
        })
    }
}

/// Frees an `x265_param` on drop.
struct ParamGuard(Fns, *mut sys::Param);

impl Drop for ParamGuard {
    fn drop(&mut self) {
        if !self.1.is_null() {
            // SAFETY: the pointer came from this API's `param_alloc` and is freed once.
            unsafe { (self.0.param_free)(self.1) }
        }
    }
}

/// Closes an `x265_encoder` on drop.
struct EncoderGuard(Fns, *mut sys::Encoder);

impl Drop for EncoderGuard {
    fn drop(&mut self) {
        if !self.1.is_null() {
            // SAFETY: the pointer came from this API's `encoder_open` and is closed once.
            unsafe { (self.0.encoder_close)(self.1) }
        }
    }
}

/// Frees an `x265_picture` on drop.
struct PictureGuard(Fns, *mut sys::Picture);

impl Drop for PictureGuard {
    fn drop(&mut self) {
        if !self.1.is_null() {
            // SAFETY: the pointer came from this API's `picture_alloc` and is freed once.
            unsafe { (self.0.picture_free)(self.1) }
        }
    }
}

/// Appends the Annex-B bytes of `n` NAL units at `nals`.
///
/// # Safety
/// `nals` must point to `n` valid `x265_nal`s whose payloads are valid for their sizes.
unsafe fn append_nals(out: &mut Vec<u8>, nals: *const sys::Nal, n: u32) {
    for i in 0..n as usize {
        // SAFETY: the caller guarantees `n` valid NAL records and payloads.
        let nal = unsafe { &*nals.add(i) };
        // SAFETY: as above.
        out.extend_from_slice(unsafe {
            std::slice::from_raw_parts(nal.payload, nal.size_bytes as usize)
        });
    }
}

impl X265 {
    /// Opens libx265 and finds its API entry point.
    pub(crate) fn load() -> Result<X265, CodecError> {
        let mut errors = Vec::new();
        for name in LIBRARY_NAMES {
            // SAFETY: loading libx265 runs only its ELF initializers, which have no preconditions.
            match unsafe { Library::new(name) } {
                Ok(lib) => {
                    // SAFETY: the symbol has the signature `x265_api_get_199` has in x265.h.
                    let get = unsafe { lib.get::<sys::ApiGet>(sys::API_GET_SYMBOL) }
                        .map(|s| *s)
                        .map_err(|e| lib_err(format!("{name}: {e}")))?;
                    return Ok(X265 { get, _lib: lib });
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(lib_err(format!(
            "cannot load libx265 ({})",
            errors.join("; ")
        )))
    }

    /// The API table for `bit_depth`, checked against the layouts `x265_sys` copies.
    fn api(&self, bit_depth: u8) -> Result<(&sys::Api, Fns), CodecError> {
        // SAFETY: `get` is `x265_api_get_199`, callable with any depth; it returns null or a
        // pointer to a static table that lives as long as the library, which `self` keeps open.
        let api = unsafe { (self.get)(c_int::from(bit_depth)).as_ref() }
            .ok_or_else(|| lib_err(format!("libx265 has no {bit_depth}-bit build")))?;
        if api.api_major_version != sys::X265_MAJOR_VERSION
            || api.api_build_number != sys::X265_BUILD
        {
            return Err(lib_err(format!(
                "api version {}.{} (expected {}.{})",
                api.api_major_version,
                api.api_build_number,
                sys::X265_MAJOR_VERSION,
                sys::X265_BUILD
            )));
        }
        if (api.sizeof_picture as usize) < std::mem::size_of::<sys::Picture>()
            || api.bit_depth != c_int::from(bit_depth)
        {
            return Err(lib_err("unexpected x265_api layout"));
        }
        let fns = Fns::of(api).ok_or_else(|| lib_err("x265_api lacks a function"))?;
        Ok((api, fns))
    }

    /// Checks that an encoder for `bit_depth` can be had.
    pub(crate) fn probe(&self, bit_depth: u8) -> Result<(), CodecError> {
        self.api(bit_depth).map(|_| ())
    }

    /// Encodes `frames` (all of `geometry`'s size) into one Annex-B stream: losslessly when `qp`
    /// is 0, else at that constant QP for every frame and block.
    ///
    /// `options` are extra `x265 --name value` settings, applied after the preset and before the
    /// settings losslessness (or the constant QP) and the geometry need.
    pub(crate) fn encode(
        &self,
        geometry: &HevcGeometry,
        preset: &str,
        qp: u8,
        options: &[(String, String)],
        frames: impl Iterator<Item = Result<Frame, CodecError>>,
    ) -> Result<Vec<u8>, CodecError> {
        let (_, f) = self.api(geometry.bit_depth)?;
        let call = |name: &str| lib_err(format!("{name} failed"));
        let (csp, csp_name) = match geometry.chroma {
            Chroma::Yuv420 => (sys::CSP_I420, "i420"),
            Chroma::Yuv444 => (sys::CSP_I444, "i444"),
        };
        // SAFETY: `param_alloc` has no preconditions.
        let param = ParamGuard(f, unsafe { (f.param_alloc)() });
        if param.1.is_null() {
            return Err(call("x265_param_alloc"));
        }
        let preset_c = CString::new(preset).map_err(|_| lib_err("bad preset name"))?;
        // SAFETY: `param.1` is a live param; the preset is a NUL-terminated string, tune is null.
        if unsafe { (f.param_default_preset)(param.1, preset_c.as_ptr(), ptr::null()) } != 0 {
            return Err(lib_err(format!("unknown preset {preset:?}")));
        }
        // Lossy: one QP everywhere (no I/P/B offsets, no adaptive quantization, no cu-tree) and
        // no psycho-visual tuning, which trades squared error for perceived detail: the codes'
        // error is what the model sees.
        let rate: Vec<(&str, String)> = if qp == 0 {
            vec![("lossless", "1".into())]
        } else {
            vec![
                ("lossless", "0".into()),
                ("qp", qp.to_string()),
                ("ipratio", "1".into()),
                ("pbratio", "1".into()),
                ("aq-mode", "0".into()),
                ("cutree", "0".into()),
                ("psy-rd", "0".into()),
                ("psy-rdoq", "0".into()),
            ]
        };
        let fixed: [(&str, String); 8] = [
            (
                "input-res",
                format!("{}x{}", geometry.width, geometry.height),
            ),
            ("input-csp", csp_name.into()),
            ("fps", "25".into()),
            ("log-level", "none".into()),
            ("info", "0".into()),
            ("annexb", "1".into()),
            ("hash", "0".into()),
            ("repeat-headers", "0".into()),
        ];
        let all = options
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .chain(rate.iter().chain(&fixed).map(|(k, v)| (*k, v.clone())));
        for (name, value) in all {
            let (n, v) = (
                CString::new(name).map_err(|_| lib_err("bad option name"))?,
                CString::new(value.as_str()).map_err(|_| lib_err("bad option value"))?,
            );
            // SAFETY: a live param and two NUL-terminated strings.
            if unsafe { (f.param_parse)(param.1, n.as_ptr(), v.as_ptr()) } != 0 {
                return Err(lib_err(format!("bad option {name}={value}")));
            }
        }
        // SAFETY: a live, fully set param; x265 copies what it needs.
        let enc = EncoderGuard(f, unsafe { (f.encoder_open)(param.1) });
        if enc.1.is_null() {
            return Err(call("x265_encoder_open"));
        }
        let mut out = Vec::new();
        let (mut nals, mut n): (*mut sys::Nal, u32) = (ptr::null_mut(), 0);
        // SAFETY: a live encoder and two out-pointers.
        if unsafe { (f.encoder_headers)(enc.1, &mut nals, &mut n) } < 0 {
            return Err(call("x265_encoder_headers"));
        }
        // SAFETY: x265 returned `n` NALs valid until the next call on this encoder.
        unsafe { append_nals(&mut out, nals, n) };
        // SAFETY: `picture_alloc` has no preconditions.
        let pic = PictureGuard(f, unsafe { (f.picture_alloc)() });
        if pic.1.is_null() {
            return Err(call("x265_picture_alloc"));
        }
        let mut bytes8: [Vec<u8>; 3] = Default::default();
        let encode = f.encoder_encode;
        for (i, frame) in frames.enumerate() {
            let mut frame = frame?;
            // SAFETY: a live param and a picture allocated by the same API.
            unsafe { (f.picture_init)(param.1, pic.1) };
            // SAFETY: `pic.1` is a live picture; `Picture` is a prefix of `x265_picture`.
            let p = unsafe { &mut *pic.1 };
            p.pts = i as i64;
            p.bit_depth = c_int::from(geometry.bit_depth);
            p.color_space = csp;
            for (c, (samples, bytes)) in frame.planes.iter_mut().zip(&mut bytes8).enumerate() {
                let (w, h) = geometry.plane_size(c);
                if samples.len() != w * h {
                    return Err(CodecError::InvalidCodes("frame of the wrong size".into()));
                }
                if geometry.bit_depth == 8 {
                    bytes.clear();
                    bytes.extend(samples.iter().map(|&v| v as u8));
                    p.planes[c] = bytes.as_mut_ptr().cast();
                    p.stride[c] = w as c_int;
                } else {
                    p.planes[c] = samples.as_mut_ptr().cast();
                    p.stride[c] = (2 * w) as c_int;
                }
            }
            // SAFETY: a live encoder; the picture's planes point to `w*h` samples of the declared
            // depth with the declared strides, alive for the call (x265 copies them).
            if unsafe { encode(enc.1, &mut nals, &mut n, pic.1, ptr::null_mut()) } < 0 {
                return Err(call("x265_encoder_encode"));
            }
            // SAFETY: x265 returned `n` NALs valid until the next call on this encoder.
            unsafe { append_nals(&mut out, nals, n) };
        }
        loop {
            // SAFETY: a live encoder; a null picture flushes.
            let r = unsafe { encode(enc.1, &mut nals, &mut n, ptr::null_mut(), ptr::null_mut()) };
            if r < 0 {
                return Err(call("x265_encoder_encode (flush)"));
            }
            // SAFETY: x265 returned `n` NALs valid until the next call on this encoder.
            unsafe { append_nals(&mut out, nals, n) };
            if r == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// The library's version string, for reports.
    pub(crate) fn version(&self) -> String {
        match self.api(8) {
            Ok((api, _)) if !api.version_str.is_null() => {
                // SAFETY: `version_str` is a static NUL-terminated string of the library.
                unsafe { CStr::from_ptr(api.version_str) }
                    .to_string_lossy()
                    .into_owned()
            }
            _ => "unknown".into(),
        }
    }
}
