//! The HEVC section decoder backed by NVDEC, with a software fallback.
//!
//! [`NvdecHevcDecoder`] implements [`SectionDecoder`] for [`VariantKind::Hevc`]: it splits a
//! section into its HEVC streams, decodes them on a pool of NVDEC sessions (one per engine,
//! decoders created once and reused) and maps the frames back to codes. How codes sit in frames
//! belongs to the HEVC variant, so it comes in through [`HevcFrameLayout`]; this module holds no
//! layout math. [`hevc_section_decoder`] picks NVDEC when the host has it and the software
//! decoder otherwise, logging the choice once.

use std::sync::{Arc, OnceLock};

use kvfetcher_codec::{
    codes_crc32c, CodePlane, CodecError, CodecRegistry, Frame, HevcParams, PlaneShape,
    SectionDecoder, VariantKind,
};

use super::cuda::Cuda;
use super::devices::GpuDevices;
use super::nvdec::{HostFrames, SessionPool};
use super::GpuError;

/// The HEVC variant's layout, as the NVDEC decoder needs it.
pub trait HevcFrameLayout: Send + Sync {
    /// The Annex-B streams of a section, in order.
    fn streams<'p>(
        &self,
        shape: PlaneShape,
        params: &[u8],
        payload: &'p [u8],
    ) -> Result<Vec<&'p [u8]>, CodecError>;
    /// The codes held by the decoded frames of every stream (planar, right-aligned samples).
    fn codes_from_frames(
        &self,
        shape: PlaneShape,
        params: &[u8],
        frames: &[HostFrames],
    ) -> Result<CodePlane, CodecError>;
}

/// NVDEC-backed [`SectionDecoder`] for HEVC sections.
pub struct NvdecHevcDecoder<L> {
    pool: Arc<SessionPool>,
    layout: L,
}

impl<L> std::fmt::Debug for NvdecHevcDecoder<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvdecHevcDecoder")
            .field("sessions", &self.pool.len())
            .finish()
    }
}

fn library(e: GpuError) -> CodecError {
    CodecError::Library {
        library: "nvdec",
        reason: e.to_string(),
    }
}

impl<L: HevcFrameLayout> NvdecHevcDecoder<L> {
    /// Opens `sessions` decode sessions (`None`: one per NVDEC engine) on `cuda`'s device.
    pub fn new(cuda: Arc<Cuda>, layout: L, sessions: Option<usize>) -> Result<Self, GpuError> {
        let pool = SessionPool::open(cuda, |engines| sessions.unwrap_or(engines))?;
        Ok(Self::from_pool(Arc::new(pool), layout))
    }

    /// Decodes on `pool`'s sessions, shared with whoever else decodes on that device.
    pub fn from_pool(pool: Arc<SessionPool>, layout: L) -> Self {
        NvdecHevcDecoder { pool, layout }
    }
}

impl<L: HevcFrameLayout> SectionDecoder for NvdecHevcDecoder<L> {
    fn variant(&self) -> VariantKind {
        VariantKind::Hevc
    }

    fn decode(
        &self,
        shape: PlaneShape,
        params: &[u8],
        payload: &[u8],
    ) -> Result<CodePlane, CodecError> {
        let streams = self.layout.streams(shape, params, payload)?;
        // Streams of one section decode in parallel across the sessions.
        let frames = self
            .pool
            .each(&streams, |session, s| session.decode_to_host(s))
            .map_err(library)?;
        self.layout.codes_from_frames(shape, params, &frames)
    }
}

/// The HEVC section decoder for this host: NVDEC on device `ordinal` when a driver and NVDEC are
/// present, else `software`, with one log line saying which and why.
pub fn hevc_section_decoder<L: HevcFrameLayout + 'static>(
    ordinal: usize,
    layout: L,
    software: Box<dyn SectionDecoder>,
) -> Box<dyn SectionDecoder> {
    match Cuda::open(ordinal).and_then(|cuda| NvdecHevcDecoder::new(cuda, layout, None)) {
        Ok(d) => {
            tracing::info!(sessions = d.pool.len(), "hevc sections decode on nvdec");
            Box::new(d)
        }
        Err(e) => {
            tracing::warn!("nvdec unavailable ({e}): hevc sections decode in software");
            software
        }
    }
}

/// The daemon's HEVC section decoder for host fetches: NVDEC through the sessions of GPU
/// `ordinal` of `gpus` (the ones its GPU fetches use, so the card gets no second pool), chosen on
/// the first section, not at start-up; `fallback`'s HEVC decoder (libde265, or its reason for
/// having none) when that GPU cannot be opened or has no NVDEC. The choice is logged once.
pub struct DeviceHevcDecoder {
    gpus: Arc<GpuDevices>,
    ordinal: usize,
    fallback: CodecRegistry,
    nvdec: OnceLock<Option<NvdecHevcDecoder<CodecHevcLayout>>>,
}

impl DeviceHevcDecoder {
    /// Decodes on GPU `ordinal` of `gpus` when it has NVDEC, else with `fallback`.
    pub fn new(gpus: Arc<GpuDevices>, ordinal: usize, fallback: CodecRegistry) -> Self {
        DeviceHevcDecoder {
            gpus,
            ordinal,
            fallback,
            nvdec: OnceLock::new(),
        }
    }

    fn nvdec(&self) -> Option<&NvdecHevcDecoder<CodecHevcLayout>> {
        let gpu = self.ordinal;
        self.nvdec
            .get_or_init(|| match self.gpus.device(gpu) {
                Ok(dev) => match dev.nvdec() {
                    Some(pool) => {
                        tracing::info!(gpu, "hevc sections of host fetches decode on nvdec");
                        Some(NvdecHevcDecoder::from_pool(pool.clone(), CodecHevcLayout))
                    }
                    None => {
                        tracing::info!(gpu, "no nvdec: hevc sections decode in software");
                        None
                    }
                },
                Err(e) => {
                    tracing::info!(
                        gpu,
                        "gpu unavailable ({e}): hevc sections decode in software"
                    );
                    None
                }
            })
            .as_ref()
    }
}

impl SectionDecoder for DeviceHevcDecoder {
    fn variant(&self) -> VariantKind {
        VariantKind::Hevc
    }

    fn decode(
        &self,
        shape: PlaneShape,
        params: &[u8],
        payload: &[u8],
    ) -> Result<CodePlane, CodecError> {
        match self.nvdec() {
            Some(d) => d.decode(shape, params, payload),
            None => self
                .fallback
                .decoder(VariantKind::Hevc)?
                .decode(shape, params, payload),
        }
    }
}

/// The codec's own HEVC layout (`kvfetcher_codec::HevcParams` / `HevcGeometry`), so NVDEC
/// decodes exactly the sections `kvfetcher_codec::HevcEncoder` writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CodecHevcLayout;

fn corrupt(reason: String) -> CodecError {
    CodecError::Corrupt {
        variant: "hevc",
        reason,
    }
}

impl HevcFrameLayout for CodecHevcLayout {
    fn streams<'p>(
        &self,
        shape: PlaneShape,
        params: &[u8],
        payload: &'p [u8],
    ) -> Result<Vec<&'p [u8]>, CodecError> {
        let p = HevcParams::from_bytes(params)?;
        if p.geometry.shape != shape {
            return Err(corrupt(format!(
                "section holds {:?}, expected {shape:?}",
                p.geometry.shape
            )));
        }
        p.split(payload)
    }

    fn codes_from_frames(
        &self,
        shape: PlaneShape,
        params: &[u8],
        frames: &[HostFrames],
    ) -> Result<CodePlane, CodecError> {
        let p = HevcParams::from_bytes(params)?;
        let g = p.geometry;
        if frames.len() != p.streams.len() {
            return Err(corrupt(format!(
                "{} decoded streams, {} expected",
                frames.len(),
                p.streams.len()
            )));
        }
        let sizes: Vec<(usize, usize)> = (0..3).map(|c| g.plane_size(c)).collect();
        let mut codes = vec![0u16; shape.len()];
        let mut first = 0;
        for (decoded, info) in frames.iter().zip(&p.streams) {
            let fmt = decoded.format;
            let (cw, ch) = fmt.chroma_size();
            let dims = [(fmt.width, fmt.height), (cw, ch), (cw, ch)];
            if decoded.frames != info.frames || (0..3).any(|c| sizes[c] != dims[c]) {
                return Err(corrupt(format!(
                    "nvdec gave {} frames of {fmt:?}",
                    decoded.frames
                )));
            }
            let spf = fmt.samples_per_frame();
            for (i, s) in decoded.samples.chunks_exact(spf).enumerate() {
                let (y, rest) = s.split_at(fmt.width * fmt.height);
                let (u, v) = rest.split_at(cw * ch);
                let frame = Frame {
                    planes: [y.to_vec(), u.to_vec(), v.to_vec()],
                };
                g.codes_from_frame(first + i, &frame, &mut codes)?;
            }
            first += info.frames;
        }
        // Lossy sections carry no codes checksum (their payload's is checked before decoding).
        if !p.is_lossy() && codes_crc32c(&codes) != p.crc32c {
            return Err(corrupt("codes fail their checksum".into()));
        }
        Ok(CodePlane { shape, codes })
    }
}
