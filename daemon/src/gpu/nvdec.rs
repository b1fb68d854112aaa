//! NVDEC HEVC decoding: capability queries, decode sessions and the decoded-frame formats.
//!
//! A [`NvdecSession`] owns one hardware decoder, created on the first stream and reused for every
//! later stream of the same format (creation costs ~0.25 s, DESIGN.md section 2). Each call
//! decodes one complete Annex-B HEVC stream and puts its frames either in host memory
//! ([`HostFrames`], samples right-aligned, planar Y/U/V, for equality checks and CPU restore) or in
//! a device buffer ([`DeviceFrames`], the decoder's own surface layout, for the restore kernels).
//! This module does not know how codes are laid out in frames: that is the HEVC variant's job.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::cuda::{Cuda, DeviceBuffer, Stream};
use super::GpuError;
use kvfetcher_codec::Chroma;
use kvfetcher_cuda_sys::nvcuvid::{self as sys, NvcuvidApi};

/// NVDEC's code for a chroma format.
fn raw_chroma(c: Chroma) -> c_int {
    match c {
        Chroma::Yuv420 => sys::CHROMA_420,
        Chroma::Yuv444 => sys::CHROMA_444,
    }
}

/// The geometry of a decoded stream's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameFormat {
    /// Luma width in samples (display area).
    pub width: usize,
    /// Luma height in samples (display area).
    pub height: usize,
    /// Chroma subsampling.
    pub chroma: Chroma,
    /// Bits per sample, 8..=12.
    pub bit_depth: u8,
}

impl FrameFormat {
    /// The surface format NVDEC produces for a codec HEVC section of geometry `g`.
    pub fn of_geometry(g: &kvfetcher_codec::HevcGeometry) -> FrameFormat {
        FrameFormat {
            width: g.width,
            height: g.height,
            chroma: g.chroma,
            bit_depth: g.bit_depth,
        }
    }

    /// Width and height of each chroma plane.
    pub fn chroma_size(&self) -> (usize, usize) {
        match self.chroma {
            Chroma::Yuv420 => (self.width / 2, self.height / 2),
            Chroma::Yuv444 => (self.width, self.height),
        }
    }

    /// Samples per frame over all three planes.
    pub fn samples_per_frame(&self) -> usize {
        let (cw, ch) = self.chroma_size();
        self.width * self.height + 2 * cw * ch
    }

    /// Bytes per sample on the decoder's output surface (1 for 8-bit, 2 otherwise).
    pub fn surface_bytes_per_sample(&self) -> usize {
        if self.bit_depth > 8 {
            2
        } else {
            1
        }
    }

    /// Bytes of one frame in the packed surface layout of [`DeviceFrames`].
    pub fn surface_bytes_per_frame(&self) -> usize {
        self.samples_per_frame() * self.surface_bytes_per_sample()
    }

    fn surface_format(&self) -> c_int {
        match (self.chroma, self.bit_depth > 8) {
            (Chroma::Yuv420, false) => sys::SURFACE_NV12,
            (Chroma::Yuv420, true) => sys::SURFACE_P016,
            (Chroma::Yuv444, false) => sys::SURFACE_YUV444,
            (Chroma::Yuv444, true) => sys::SURFACE_YUV444_16BIT,
        }
    }
}

/// Decoded frames in host memory: per frame the Y plane, then U, then V, row-major, each sample
/// right-aligned (`0..2^bit_depth`), exactly what a software decoder returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFrames {
    /// Frame geometry.
    pub format: FrameFormat,
    /// Number of frames, in display order.
    pub frames: usize,
    /// `frames * format.samples_per_frame()` samples.
    pub samples: Vec<u16>,
}

/// Decoded frames left in device memory, in the decoder's surface layout, packed without pitch:
/// per frame the Y plane (`width x height`), then for 4:2:0 one interleaved UV plane
/// (`width x height/2` samples, U and V alternating), for 4:4:4 the U plane then the V plane.
/// Samples are 1 byte (8-bit) or 2 bytes little-endian with the value in the top `bit_depth`
/// bits (MSB-aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceFrames {
    /// Frame geometry.
    pub format: FrameFormat,
    /// Number of frames written, in display order.
    pub frames: usize,
    /// Device address of the first frame.
    pub ptr: u64,
}

/// What `cuvidGetDecoderCaps` reports for HEVC at one chroma format and bit depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HevcCaps {
    /// Chroma format asked about.
    pub chroma: Chroma,
    /// Bit depth asked about.
    pub bit_depth: u8,
    /// Whether NVDEC decodes it.
    pub supported: bool,
    /// NVDEC engines on the card.
    pub engines: u32,
    /// Smallest coded width and height.
    pub min_size: (u32, u32),
    /// Largest coded width and height.
    pub max_size: (u32, u32),
}

/// The NVDEC library bound to one device.
pub struct Nvdec {
    cuda: Arc<Cuda>,
    api: Arc<NvcuvidApi>,
}

impl std::fmt::Debug for Nvdec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvdec")
            .field("device", &self.cuda.info().name)
            .finish()
    }
}

impl Nvdec {
    /// Loads `libnvcuvid.so.1` for `cuda`'s device.
    pub fn open(cuda: Arc<Cuda>) -> Result<Nvdec, GpuError> {
        let api = NvcuvidApi::load().map_err(|e| GpuError::NoNvdec(e.to_string()))?;
        Ok(Nvdec {
            cuda,
            api: Arc::new(api),
        })
    }

    /// The device.
    pub fn cuda(&self) -> &Arc<Cuda> {
        &self.cuda
    }

    /// HEVC capabilities at `chroma` and `bit_depth`.
    pub fn hevc_caps(&self, chroma: Chroma, bit_depth: u8) -> Result<HevcCaps, GpuError> {
        self.cuda.bind()?;
        let mut caps = sys::CuvidDecodeCaps {
            codec_type: sys::CODEC_HEVC,
            chroma_format: raw_chroma(chroma),
            bit_depth_minus8: u32::from(bit_depth.saturating_sub(8)),
            ..Default::default()
        };
        // SAFETY: caps is a valid CUVIDDECODECAPS with its IN fields set; the context is current.
        self.cuda.check("cuvidGetDecoderCaps", unsafe {
            (self.api.get_decoder_caps)(&mut caps)
        })?;
        Ok(HevcCaps {
            chroma,
            bit_depth,
            supported: caps.is_supported != 0,
            engines: u32::from(caps.num_nvdecs),
            min_size: (u32::from(caps.min_width), u32::from(caps.min_height)),
            max_size: (caps.max_width, caps.max_height),
        })
    }

    /// NVDEC engines on the card (at least 1 when HEVC 4:2:0 8-bit is supported).
    pub fn engines(&self) -> Result<usize, GpuError> {
        let caps = self.hevc_caps(Chroma::Yuv420, 8)?;
        if !caps.supported {
            return Err(GpuError::Unsupported("hevc 4:2:0 8-bit".into()));
        }
        Ok(caps.engines.max(1) as usize)
    }

    /// A new decode session (its hardware decoder is created on the first stream).
    pub fn session(&self) -> Result<NvdecSession, GpuError> {
        Ok(NvdecSession {
            cuda: self.cuda.clone(),
            api: self.api.clone(),
            stream: self.cuda.stream()?,
            decoder: None,
        })
    }
}

/// Decode sessions of one device shared by everything that decodes there (GPU fetches and the
/// HEVC section decoder of host fetches), so a device never has more sessions than asked for.
/// A caller takes any idle session, or waits for the first one freed: no session idles while
/// someone waits.
pub struct SessionPool {
    idle: Mutex<Vec<NvdecSession>>,
    freed: Condvar,
    total: usize,
    /// Sessions whose decode panicked; they are not used again.
    lost: AtomicUsize,
    _nvdec: Nvdec,
}

impl std::fmt::Debug for SessionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPool")
            .field("sessions", &self.total)
            .finish()
    }
}

impl SessionPool {
    /// Opens NVDEC on `cuda`'s device with `sessions(engines)` sessions (at least one), where
    /// `engines` is the card's NVDEC engine count.
    pub fn open(
        cuda: Arc<Cuda>,
        sessions: impl FnOnce(usize) -> usize,
    ) -> Result<SessionPool, GpuError> {
        let nvdec = Nvdec::open(cuda)?;
        let n = sessions(nvdec.engines()?).max(1);
        let idle = (0..n)
            .map(|_| nvdec.session())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SessionPool {
            idle: Mutex::new(idle),
            freed: Condvar::new(),
            total: n,
            lost: AtomicUsize::new(0),
            _nvdec: nvdec,
        })
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether the pool has no session (never: `open` makes at least one).
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<NvdecSession>> {
        // The list is consistent at every unlock: a poisoned lock is still usable.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on an idle session, waiting for one when all are busy. A session whose
    /// decode panicked is not used again; when none is left, an error.
    pub fn with<R>(&self, f: impl FnOnce(&mut NvdecSession) -> R) -> Result<R, GpuError> {
        let session = {
            let mut idle = self.idle();
            loop {
                if let Some(s) = idle.pop() {
                    break s;
                }
                if self.lost.load(Ordering::Relaxed) >= self.total {
                    return Err(GpuError::Decode("every decode session panicked".into()));
                }
                idle = self.freed.wait(idle).unwrap_or_else(|p| p.into_inner());
            }
        };
        let mut lent = Lent {
            pool: self,
            session: Some(session),
        };
        match lent.session.as_mut() {
            Some(s) => Ok(f(s)),
            None => Err(GpuError::Decode("no session".into())),
        }
    }
}

impl SessionPool {
    /// Runs `f` on every job at once, each on an idle session of its own (a scoped thread per
    /// job after the first, which runs here), and returns the results in job order: the
    /// streams of one section decode on several engines.
    pub fn each<J: Sync, R: Send>(
        &self,
        jobs: &[J],
        f: impl Fn(&mut NvdecSession, &J) -> Result<R, GpuError> + Sync,
    ) -> Result<Vec<R>, GpuError> {
        let Some((first, rest)) = jobs.split_first() else {
            return Ok(Vec::new());
        };
        let run = |job: &J| self.with(|session| f(session, job))?;
        std::thread::scope(|scope| {
            let others: Vec<_> = rest
                .iter()
                .map(|job| scope.spawn(move || run(job)))
                .collect();
            let mut out = vec![run(first)];
            out.extend(others.into_iter().map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(GpuError::Decode("decode thread panicked".into())))
            }));
            out.into_iter().collect()
        })
    }
}

/// A session out of its pool; it goes back when this drops, unless its user panicked.
struct Lent<'p> {
    pool: &'p SessionPool,
    session: Option<NvdecSession>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.pool.lost.fetch_add(1, Ordering::Relaxed);
            self.pool.freed.notify_all();
        } else if let Some(s) = self.session.take() {
            self.pool.idle().push(s);
            self.pool.freed.notify_one();
        }
    }
}

/// A created hardware decoder and the format it was created for.
struct Decoder {
    api: Arc<NvcuvidApi>,
    raw: sys::CuVideoDecoder,
    key: DecoderKey,
    surfaces: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DecoderKey {
    coded: (u32, u32),
    display: (i32, i32, i32, i32),
    format: FrameFormat,
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: raw is a live decoder, destroyed once.
        unsafe { (self.api.destroy_decoder)(self.raw) };
    }
}

/// One NVDEC decode session: a stream and a hardware decoder reused across streams of one format.
/// Use it from one thread at a time.
pub struct NvdecSession {
    cuda: Arc<Cuda>,
    api: Arc<NvcuvidApi>,
    stream: Stream,
    decoder: Option<Decoder>,
}

// SAFETY: the decoder and stream handles may be used from any thread with the context current
// (every call binds it); &mut self serialises use.
unsafe impl Send for NvdecSession {}

impl std::fmt::Debug for NvdecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvdecSession")
            .field("format", &self.decoder.as_ref().map(|d| d.key))
            .finish()
    }
}

/// Where the display callback puts each frame.
enum Sink<'a> {
    Host(&'a mut Vec<u16>),
    Device {
        ptr: u64,
        capacity: usize,
        used: usize,
    },
    /// Frames are decoded and then dropped: mapped (post-processed) and unmapped when `map`,
    /// never touched otherwise. Only for measuring what each step costs a co-tenant.
    Discard {
        map: bool,
    },
}

/// State shared with the parser callbacks during one `parse` call.
struct ParseState<'a> {
    session: &'a mut NvdecSession,
    sink: Sink<'a>,
    format: Option<FrameFormat>,
    frames: usize,
    error: Option<GpuError>,
    staging: Vec<u8>,
}

impl NvdecSession {
    /// Decodes one complete HEVC stream into host memory.
    pub fn decode_to_host(&mut self, bitstream: &[u8]) -> Result<HostFrames, GpuError> {
        let mut samples = Vec::new();
        let (format, frames) = self.parse(bitstream, Sink::Host(&mut samples))?;
        Ok(HostFrames {
            format,
            frames,
            samples,
        })
    }

    /// Decodes one complete HEVC stream into `out` at byte `offset`, frames packed in the surface
    /// layout of [`DeviceFrames`]. Fails if the frames do not fit.
    pub fn decode_to_device(
        &mut self,
        bitstream: &[u8],
        out: &DeviceBuffer,
        offset: usize,
    ) -> Result<DeviceFrames, GpuError> {
        if offset > out.len() {
            return Err(GpuError::InvalidArgument("offset past the buffer".into()));
        }
        let ptr = out.ptr() + offset as u64;
        let sink = Sink::Device {
            ptr,
            capacity: out.len() - offset,
            used: 0,
        };
        let (format, frames) = self.parse(bitstream, sink)?;
        Ok(DeviceFrames {
            format,
            frames,
            ptr,
        })
    }

    /// Decodes one complete HEVC stream and drops its frames (mapped and unmapped when `map`):
    /// the NVDEC work of a decode without its output, for measuring what each step costs.
    /// Returns the number of frames.
    pub fn decode_discard(&mut self, bitstream: &[u8], map: bool) -> Result<usize, GpuError> {
        Ok(self.parse(bitstream, Sink::Discard { map })?.1)
    }

    fn parse(
        &mut self,
        bitstream: &[u8],
        sink: Sink<'_>,
    ) -> Result<(FrameFormat, usize), GpuError> {
        if bitstream.is_empty() {
            return Err(GpuError::Decode("empty bitstream".into()));
        }
        self.cuda.bind()?;
        let api = self.api.clone();
        let cuda = self.cuda.clone();
        let mut state = ParseState {
            session: self,
            sink,
            format: None,
            frames: 0,
            error: None,
            staging: Vec::new(),
        };
        let mut params = sys::CuvidParserParams {
            codec_type: sys::CODEC_HEVC,
            max_num_decode_surfaces: 1,
            clock_rate: 0,
            error_threshold: 0,
            max_display_delay: 2,
            flags: 0,
            reserved1: [0; 4],
            user_data: (&mut state as *mut ParseState<'_>).cast(),
            sequence_callback: Some(on_sequence),
            decode_picture: Some(on_decode),
            display_picture: Some(on_display),
            reserved2: [std::ptr::null_mut(); 7],
            ext_video_info: std::ptr::null_mut(),
        };
        let mut parser: sys::CuVideoParser = std::ptr::null_mut();
        // SAFETY: params is fully initialised; user_data points to `state`, which outlives the
        // parser (destroyed below before `state` goes out of scope).
        cuda.check("cuvidCreateVideoParser", unsafe {
            (api.create_video_parser)(&mut parser, &mut params)
        })?;
        let mut packet = sys::CuvidSourceDataPacket {
            flags: 0,
            payload_size: bitstream.len() as _,
            payload: bitstream.as_ptr(),
            timestamp: 0,
        };
        // SAFETY: the packet points to `bitstream`, alive for the call; callbacks run inside it.
        let rc1 = unsafe { (api.parse_video_data)(parser, &mut packet) };
        let mut eos = sys::CuvidSourceDataPacket {
            flags: sys::PKT_ENDOFSTREAM,
            payload_size: 0,
            payload: std::ptr::null(),
            timestamp: 0,
        };
        // SAFETY: an end-of-stream packet with no payload flushes the remaining frames.
        let rc2 = unsafe { (api.parse_video_data)(parser, &mut eos) };
        // SAFETY: parser is live and destroyed once; no callback runs after this.
        unsafe { (api.destroy_video_parser)(parser) };
        if let Some(e) = state.error.take() {
            return Err(e);
        }
        cuda.check("cuvidParseVideoData", rc1)?;
        cuda.check("cuvidParseVideoData", rc2)?;
        let format = state
            .format
            .ok_or_else(|| GpuError::Decode("no sequence header".into()))?;
        if state.frames == 0 {
            return Err(GpuError::Decode("no frames".into()));
        }
        Ok((format, state.frames))
    }
}

/// Recovers the parse state from the callback's user pointer.
///
/// # Safety
/// `user` must be the `user_data` set in `NvdecSession::parse`, during that call.
unsafe fn state<'s, 'a>(user: *mut c_void) -> &'s mut ParseState<'a> {
    // SAFETY: upheld by the caller; the parser calls back synchronously from parse_video_data.
    unsafe { &mut *user.cast::<ParseState<'a>>() }
}

unsafe extern "C" fn on_sequence(user: *mut c_void, fmt: *mut sys::CuVideoFormat) -> c_int {
    // SAFETY: called by the parser with our user_data and a valid format during parse().
    let (st, fmt) = unsafe { (state(user), &*fmt) };
    match sequence(st, fmt) {
        Ok(n) => n as c_int,
        Err(e) => {
            st.error.get_or_insert(e);
            0
        }
    }
}

fn sequence(st: &mut ParseState<'_>, fmt: &sys::CuVideoFormat) -> Result<u32, GpuError> {
    let chroma = match fmt.chroma_format {
        sys::CHROMA_420 => Chroma::Yuv420,
        sys::CHROMA_444 => Chroma::Yuv444,
        other => return Err(GpuError::Unsupported(format!("chroma format {other}"))),
    };
    if fmt.bit_depth_luma_minus8 != fmt.bit_depth_chroma_minus8 {
        return Err(GpuError::Unsupported(
            "luma and chroma bit depths differ".into(),
        ));
    }
    let d = fmt.display_area;
    let format = FrameFormat {
        width: (d.right - d.left).max(0) as usize,
        height: (d.bottom - d.top).max(0) as usize,
        chroma,
        bit_depth: 8 + fmt.bit_depth_luma_minus8,
    };
    if format.width == 0 || format.height == 0 || format.bit_depth > 12 {
        return Err(GpuError::Unsupported(format!("{format:?}")));
    }
    if st.format.is_some_and(|f| f != format) {
        return Err(GpuError::Decode("format changed inside one stream".into()));
    }
    st.format = Some(format);
    let key = DecoderKey {
        coded: (fmt.coded_width, fmt.coded_height),
        display: (d.left, d.top, d.right, d.bottom),
        format,
    };
    let needed = u32::from(fmt.min_num_decode_surfaces).max(1);
    let session = &mut *st.session;
    if let Some(dec) = &session.decoder {
        if dec.key == key && dec.surfaces >= needed {
            return Ok(dec.surfaces);
        }
    }
    session.decoder = None;
    let surfaces = needed + 4;
    let mut info = sys::CuvidDecodeCreateInfo {
        width: fmt.coded_width as _,
        height: fmt.coded_height as _,
        num_decode_surfaces: surfaces as _,
        codec_type: sys::CODEC_HEVC,
        chroma_format: raw_chroma(chroma),
        creation_flags: sys::CREATE_PREFER_CUVID,
        bit_depth_minus8: fmt.bit_depth_luma_minus8 as _,
        intra_decode_only: 0,
        max_width: fmt.coded_width as _,
        max_height: fmt.coded_height as _,
        reserved1: 0,
        display_area: sys::ShortRect {
            left: d.left as i16,
            top: d.top as i16,
            right: d.right as i16,
            bottom: d.bottom as i16,
        },
        output_format: format.surface_format(),
        deinterlace_mode: sys::DEINTERLACE_WEAVE,
        target_width: format.width as _,
        target_height: format.height as _,
        num_output_surfaces: 2,
        vid_lock: std::ptr::null_mut(),
        target_rect: sys::ShortRect::default(),
        enable_histogram: 0,
        reserved2: [0; 4],
    };
    let mut raw: sys::CuVideoDecoder = std::ptr::null_mut();
    // SAFETY: info is fully initialised; the context is current (bound in parse()).
    let rc = unsafe { (session.api.create_decoder)(&mut raw, &mut info) };
    session.cuda.check("cuvidCreateDecoder", rc)?;
    session.decoder = Some(Decoder {
        api: session.api.clone(),
        raw,
        key,
        surfaces,
    });
    Ok(surfaces)
}

unsafe extern "C" fn on_decode(user: *mut c_void, pic: *mut sys::CuvidPicParams) -> c_int {
    // SAFETY: called by the parser with our user_data during parse().
    let st = unsafe { state(user) };
    let Some(dec) = &st.session.decoder else {
        st.error
            .get_or_insert(GpuError::Decode("picture before sequence header".into()));
        return 0;
    };
    // SAFETY: pic is the parser's filled CUVIDPICPARAMS for this decoder, valid for the call.
    let rc = unsafe { (st.session.api.decode_picture)(dec.raw, pic) };
    match st.session.cuda.check("cuvidDecodePicture", rc) {
        Ok(()) => 1,
        Err(e) => {
            st.error.get_or_insert(e);
            0
        }
    }
}

unsafe extern "C" fn on_display(user: *mut c_void, disp: *mut sys::CuvidParserDispInfo) -> c_int {
    // SAFETY: called by the parser with our user_data during parse().
    let st = unsafe { state(user) };
    if disp.is_null() {
        return 1;
    }
    // SAFETY: non-null display info from the parser, valid for the call.
    let disp = unsafe { *disp };
    match display(st, &disp) {
        Ok(()) => 1,
        Err(e) => {
            st.error.get_or_insert(e);
            0
        }
    }
}

fn display(st: &mut ParseState<'_>, disp: &sys::CuvidParserDispInfo) -> Result<(), GpuError> {
    if let Sink::Discard { map: false } = st.sink {
        st.frames += 1;
        return Ok(());
    }
    let format = st
        .format
        .ok_or_else(|| GpuError::Decode("frame before sequence header".into()))?;
    let session = &mut *st.session;
    let dec = session
        .decoder
        .as_ref()
        .ok_or_else(|| GpuError::Decode("no decoder".into()))?;
    let mut proc = sys::CuvidProcParams {
        progressive_frame: disp.progressive_frame,
        second_field: 0,
        top_field_first: disp.top_field_first,
        unpaired_field: i32::from(disp.repeat_first_field < 0),
        reserved_flags: 0,
        reserved_zero: 0,
        raw_input_dptr: 0,
        raw_input_pitch: 0,
        raw_input_format: 0,
        raw_output_dptr: 0,
        raw_output_pitch: 0,
        reserved1: 0,
        output_stream: session.stream.raw,
        reserved: [0; 46],
        reserved2: [std::ptr::null_mut(); 2],
    };
    let mut src = 0u64;
    let mut pitch = 0u32;
    // SAFETY: maps a decoded picture of this decoder; unmapped below on every path.
    let rc = unsafe {
        (session.api.map_video_frame)(dec.raw, disp.picture_index, &mut src, &mut pitch, &mut proc)
    };
    session.cuda.check("cuvidMapVideoFrame", rc)?;
    let copied = copy_frame(st, format, src, pitch as usize);
    let session = &mut *st.session;
    let synced = session.stream.synchronize();
    let dec = session
        .decoder
        .as_ref()
        .ok_or_else(|| GpuError::Decode("no decoder".into()))?;
    // SAFETY: src was mapped above by this decoder and is unmapped once, after the copies finished.
    let rc = unsafe { (session.api.unmap_video_frame)(dec.raw, src) };
    copied?;
    synced?;
    session.cuda.check("cuvidUnmapVideoFrame", rc)?;
    if let Sink::Host(out) = &mut st.sink {
        unpack_host_frame(&st.staging, format, out);
    }
    st.frames += 1;
    Ok(())
}

/// The planes of a mapped surface: (byte offset from the mapping, rows, bytes per row).
fn surface_planes(format: FrameFormat, pitch: usize) -> Vec<(usize, usize, usize)> {
    let bps = format.surface_bytes_per_sample();
    let row = format.width * bps;
    let chroma_base = pitch * ((format.height + 1) & !1);
    match format.chroma {
        Chroma::Yuv420 => vec![
            (0, format.height, row),
            (chroma_base, format.height / 2, row),
        ],
        Chroma::Yuv444 => vec![
            (0, format.height, row),
            (chroma_base, format.height, row),
            (2 * chroma_base, format.height, row),
        ],
    }
}

fn copy_frame(
    st: &mut ParseState<'_>,
    format: FrameFormat,
    src: u64,
    pitch: usize,
) -> Result<(), GpuError> {
    let planes = surface_planes(format, pitch);
    let frame_bytes = format.surface_bytes_per_frame();
    let stream = st.session.stream.raw;
    let cuda = st.session.cuda.clone();
    match &mut st.sink {
        Sink::Device {
            ptr,
            capacity,
            used,
        } => {
            if *used + frame_bytes > *capacity {
                return Err(GpuError::InvalidArgument(format!(
                    "decoded frames exceed the {capacity} byte output buffer"
                )));
            }
            let mut dst = *ptr + *used as u64;
            for (off, rows, row) in planes {
                cuda.copy_2d_to_device(src + off as u64, pitch, dst, row, rows, stream)?;
                dst += (row * rows) as u64;
            }
            *used += frame_bytes;
        }
        Sink::Discard { .. } => {}
        Sink::Host(_) => {
            st.staging.resize(frame_bytes, 0);
            let mut at = 0;
            for (off, rows, row) in planes {
                cuda.copy_2d_to_host(
                    src + off as u64,
                    pitch,
                    &mut st.staging[at..],
                    row,
                    rows,
                    stream,
                )?;
                at += row * rows;
            }
        }
    }
    Ok(())
}

/// Converts one packed surface frame (see [`DeviceFrames`]) to planar right-aligned samples.
pub(crate) fn unpack_host_frame(surface: &[u8], format: FrameFormat, out: &mut Vec<u16>) {
    let shift = 16 - u32::from(format.bit_depth);
    let sample = |i: usize| -> u16 {
        if format.bit_depth > 8 {
            u16::from_le_bytes([surface[2 * i], surface[2 * i + 1]]) >> shift
        } else {
            u16::from(surface[i])
        }
    };
    let luma = format.width * format.height;
    out.extend((0..luma).map(sample));
    match format.chroma {
        Chroma::Yuv444 => out.extend((luma..3 * luma).map(sample)),
        Chroma::Yuv420 => {
            let (cw, ch) = format.chroma_size();
            let n = cw * ch;
            out.extend((0..n).map(|i| sample(luma + 2 * i)));
            out.extend((0..n).map(|i| sample(luma + 2 * i + 1)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_deinterleaves_p016_and_right_aligns() {
        let format = FrameFormat {
            width: 2,
            height: 2,
            chroma: Chroma::Yuv420,
            bit_depth: 10,
        };
        // Y = 1,2,3,4 ; UV = (5,6) MSB-aligned in 16-bit words.
        let vals = [1u16, 2, 3, 4, 5, 6];
        let surface: Vec<u8> = vals.iter().flat_map(|v| (v << 6).to_le_bytes()).collect();
        let mut out = Vec::new();
        unpack_host_frame(&surface, format, &mut out);
        assert_eq!(out, vec![1, 2, 3, 4, 5, 6]);
        let format = FrameFormat {
            width: 2,
            height: 2,
            chroma: Chroma::Yuv420,
            bit_depth: 8,
        };
        let mut out = Vec::new();
        unpack_host_frame(&[9, 8, 7, 6, 1, 2], format, &mut out);
        assert_eq!(out, vec![9, 8, 7, 6, 1, 2]);
    }

    #[test]
    fn surface_sizes() {
        let f = FrameFormat {
            width: 512,
            height: 512,
            chroma: Chroma::Yuv420,
            bit_depth: 12,
        };
        assert_eq!(f.samples_per_frame(), 512 * 512 * 3 / 2);
        assert_eq!(f.surface_bytes_per_frame(), 512 * 512 * 3);
        let planes = surface_planes(f, 1024);
        assert_eq!(planes[1], (1024 * 512, 256, 1024));
    }
}
