//! A safe wrapper over libde265: one reusable decoder context that turns an Annex-B stream into
//! checked frames.
//!
//! The library is opened at run time; [`De265::load`] fails with [`CodecError::Library`] when it
//! is absent. Every decoded picture is checked against the section's geometry (size, chroma,
//! bit depth), and any decoding error or warning about the stream is [`CodecError::Corrupt`].

use std::ffi::c_int;
use std::ptr;
use std::sync::Arc;

use crate::hevc::de265_sys as sys;
use crate::hevc::geometry::{Frame, HevcGeometry};
use crate::hevc::layout::Chroma;
use crate::CodecError;

/// Library names tried in order.
const LIBRARY_NAMES: [&str; 2] = ["libde265.so.0", "libde265.so"];

fn corrupt(reason: impl Into<String>) -> CodecError {
    CodecError::Corrupt {
        variant: "hevc",
        reason: reason.into(),
    }
}

fn lib_err(reason: impl Into<String>) -> CodecError {
    CodecError::Library {
        library: "libde265",
        reason: reason.into(),
    }
}

/// A loaded libde265.
pub(crate) struct De265 {
    fns: sys::Fns,
}

impl De265 {
    /// Opens libde265 and resolves its functions.
    pub(crate) fn load() -> Result<Arc<De265>, CodecError> {
        let mut errors = Vec::new();
        for name in LIBRARY_NAMES {
            match sys::Fns::load(name) {
                Ok(fns) => return Ok(Arc::new(De265 { fns })),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        Err(lib_err(format!(
            "cannot load libde265 ({})",
            errors.join("; ")
        )))
    }
}

/// One decoder context with its worker threads, reused across streams.
pub(crate) struct Decoder {
    lib: Arc<De265>,
    ctx: *mut sys::Context,
}

// SAFETY: a libde265 context may move between threads; `Decoder` gives `&mut` access only, so
// one thread at a time uses it.
unsafe impl Send for Decoder {}

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from `de265_new_decoder` and is freed once.
        unsafe { (self.lib.fns.free_decoder)(self.ctx) };
    }
}

impl Decoder {
    /// A new context running `threads` worker threads (0: decode on the calling thread).
    pub(crate) fn new(lib: Arc<De265>, threads: usize) -> Result<Decoder, CodecError> {
        let f = &lib.fns;
        // SAFETY: no preconditions.
        let ctx = unsafe { (f.new_decoder)() };
        if ctx.is_null() {
            return Err(lib_err("de265_new_decoder failed"));
        }
        let dec = Decoder { lib, ctx };
        let f = &dec.lib.fns;
        // SAFETY: a live context; parameter 0 is the SEI hash check, a bool.
        unsafe { (f.set_parameter_bool)(dec.ctx, sys::PARAM_SEI_CHECK_HASH, 0) };
        if threads > 0 {
            let n = c_int::try_from(threads).unwrap_or(c_int::MAX);
            // SAFETY: a live context with no threads yet.
            let err = unsafe { (f.start_worker_threads)(dec.ctx, n) };
            if err != sys::OK && err < sys::FIRST_WARNING {
                return Err(lib_err(format!(
                    "de265_start_worker_threads failed ({err})"
                )));
            }
        }
        Ok(dec)
    }

    /// Decodes one stream that holds `frames` frames of `geometry`, passing each frame in
    /// display order to `sink` with its index within the stream.
    pub(crate) fn decode(
        &mut self,
        geometry: &HevcGeometry,
        stream: &[u8],
        frames: usize,
        sink: &mut dyn FnMut(usize, &Frame) -> Result<(), CodecError>,
    ) -> Result<(), CodecError> {
        let f = &self.lib.fns;
        let len = c_int::try_from(stream.len()).map_err(|_| corrupt("stream over 2 GiB"))?;
        // SAFETY: a live context with no pending input (new or reset).
        unsafe { (f.reset)(self.ctx) };
        // SAFETY: `stream` is valid for `len` bytes; libde265 copies it.
        let err =
            unsafe { (f.push_data)(self.ctx, stream.as_ptr().cast(), len, 0, ptr::null_mut()) };
        if err != sys::OK {
            return Err(lib_err(format!("de265_push_data failed ({err})")));
        }
        // SAFETY: a live context.
        unsafe { (f.flush_data)(self.ctx) };
        let mut seen = 0;
        let mut frame = Frame {
            planes: Default::default(),
        };
        loop {
            let mut more: c_int = 0;
            // SAFETY: a live context and an out-pointer.
            let err = unsafe { (f.decode)(self.ctx, &mut more) };
            self.drain(geometry, frames, &mut seen, &mut frame, sink)?;
            self.check_warnings()?;
            match err {
                sys::OK | sys::ERROR_IMAGE_BUFFER_FULL => {}
                sys::ERROR_WAITING_FOR_INPUT_DATA => break,
                e => return Err(corrupt(format!("libde265 error {e}"))),
            }
            if more == 0 {
                break;
            }
        }
        self.drain(geometry, frames, &mut seen, &mut frame, sink)?;
        self.check_warnings()?;
        if seen != frames {
            return Err(corrupt(format!(
                "stream decoded to {seen} frames, expected {frames}"
            )));
        }
        Ok(())
    }

    /// Fails on any warning other than the harmless threading ones.
    fn check_warnings(&self) -> Result<(), CodecError> {
        loop {
            // SAFETY: a live context.
            let w = unsafe { (self.lib.fns.get_warning)(self.ctx) };
            match w {
                sys::OK => return Ok(()),
                sys::WARNING_NO_WPP | sys::WARNING_THREADS_LIMITED => {}
                w => return Err(corrupt(format!("libde265 warning {w}"))),
            }
        }
    }

    /// Takes every finished picture out, checks it and hands it to `sink`.
    fn drain(
        &self,
        geometry: &HevcGeometry,
        frames: usize,
        seen: &mut usize,
        frame: &mut Frame,
        sink: &mut dyn FnMut(usize, &Frame) -> Result<(), CodecError>,
    ) -> Result<(), CodecError> {
        let f = &self.lib.fns;
        loop {
            // SAFETY: a live context; the image stays valid until released below.
            let img = unsafe { (f.peek_next_picture)(self.ctx) };
            if img.is_null() {
                return Ok(());
            }
            let copied = copy_image(f, img, geometry, frame);
            // SAFETY: a picture is pending (peeked above); `img` is not used after this.
            unsafe { (f.release_next_picture)(self.ctx) };
            copied?;
            if *seen >= frames {
                return Err(corrupt(format!("stream holds more than {frames} frames")));
            }
            sink(*seen, frame)?;
            *seen += 1;
        }
    }
}

/// Copies a decoded picture into `frame` after checking it against `geometry`.
fn copy_image(
    f: &sys::Fns,
    img: *const sys::Image,
    geometry: &HevcGeometry,
    frame: &mut Frame,
) -> Result<(), CodecError> {
    let want = match geometry.chroma {
        Chroma::Yuv420 => sys::CHROMA_420,
        Chroma::Yuv444 => sys::CHROMA_444,
    };
    // SAFETY: `img` is a live picture of the context (peeked, not yet released).
    let chroma = unsafe { (f.get_chroma_format)(img) };
    if chroma != want {
        return Err(corrupt(format!(
            "picture has chroma format {chroma}, expected {want}"
        )));
    }
    let bytes = if geometry.bit_depth > 8 { 2 } else { 1 };
    for c in 0..3 {
        let (w, h) = geometry.plane_size(c);
        let ci = c as c_int;
        // SAFETY: as above; channel 0..3 exists for 4:2:0 and 4:4:4 pictures.
        let (pw, ph, bits) = unsafe {
            (
                (f.get_image_width)(img, ci),
                (f.get_image_height)(img, ci),
                (f.get_bits_per_pixel)(img, ci),
            )
        };
        if (pw as usize, ph as usize) != (w, h) || pw <= 0 || ph <= 0 {
            return Err(corrupt(format!("plane {c} is {pw}x{ph}, expected {w}x{h}")));
        }
        if bits != c_int::from(geometry.bit_depth) {
            return Err(corrupt(format!(
                "plane {c} has {bits} bits, expected {}",
                geometry.bit_depth
            )));
        }
        let mut stride: c_int = 0;
        // SAFETY: as above; `stride` receives the row pitch in bytes.
        let data = unsafe { (f.get_image_plane)(img, ci, &mut stride) };
        if data.is_null() || (stride as usize) < w * bytes || stride <= 0 {
            return Err(corrupt(format!("plane {c} has no usable samples")));
        }
        let out = &mut frame.planes[c];
        out.clear();
        out.reserve(w * h);
        for y in 0..h {
            // SAFETY: libde265 holds `h` rows of `stride` bytes, each starting with `w` samples
            // of `bytes` bytes (checked above).
            let row =
                unsafe { std::slice::from_raw_parts(data.add(y * stride as usize), w * bytes) };
            if bytes == 1 {
                out.extend(row.iter().map(|&v| u16::from(v)));
            } else {
                out.extend(
                    row.chunks_exact(2)
                        .map(|b| u16::from_ne_bytes([b[0], b[1]])),
                );
            }
        }
    }
    Ok(())
}
