//! [`HevcEncoder`]: the `hevc` variant's encoder, x265 in lossless mode or, with
//! [`HevcEncoder::with_qp`], at a constant QP (lossy).

use std::sync::Arc;

use crate::hevc::geometry::HevcGeometry;
use crate::hevc::layout::LayoutSpec;
use crate::hevc::params::{codes_crc32c, HevcParams, StreamInfo, MAX_QP};
use crate::hevc::x265::X265;
use crate::{CodePlane, CodecError, EncodedSection, SectionEncoder, VariantKind};

/// The x265 preset used unless [`HevcEncoder::with_preset`] says otherwise. Measured on
/// codelm-kv-a (docs/LAYOUT.md): for tokens along frames, `medium` is 8% smaller than `fast`
/// and faster presets (whose inter search finds little); for tokens as rows `slow` gained 0.02%
/// over `medium`.
pub const DEFAULT_PRESET: &str = "medium";

/// Encodes sections with x265 (loaded at run time, never linked: it is GPL): losslessly by
/// default, lossily at a constant QP with [`HevcEncoder::with_qp`].
///
/// x265 runs its own worker pool (frame threads and wavefront rows) over all cores.
#[derive(Debug, Clone)]
pub struct HevcEncoder {
    x265: Arc<X265>,
    spec: LayoutSpec,
    preset: String,
    options: Vec<(String, String)>,
    /// Frames per stream; `None`: every section is one stream.
    stream_frames: Option<usize>,
    /// x265 constant QP; 0: lossless.
    qp: u8,
}

impl HevcEncoder {
    /// An encoder for `layout` (a [`LayoutSpec`] name such as `rows` or `frames:16`; `None` is
    /// [`LayoutSpec::DEFAULT`]). Fails with [`CodecError::Library`] when libx265 cannot be
    /// loaded, and [`CodecError::Unsupported`] for an unknown layout.
    pub fn new(layout: Option<&str>) -> Result<HevcEncoder, CodecError> {
        let spec = match layout {
            Some(name) => name.parse()?,
            None => LayoutSpec::DEFAULT,
        };
        let x265 = X265::load()?;
        x265.probe(8)?;
        Ok(HevcEncoder {
            x265: Arc::new(x265),
            spec,
            preset: DEFAULT_PRESET.into(),
            options: Vec::new(),
            stream_frames: None,
            qp: 0,
        })
    }

    /// Uses x265 preset `preset` (`ultrafast` .. `placebo`).
    pub fn with_preset(mut self, preset: &str) -> HevcEncoder {
        self.preset = preset.into();
        self
    }

    /// Adds an x265 option (`name`, `value`) as on its command line without the dashes, e.g.
    /// (`keyint`, `1`). Options that losslessness or the geometry need cannot be overridden.
    pub fn with_option(mut self, name: &str, value: &str) -> HevcEncoder {
        self.options.push((name.into(), value.into()));
        self
    }

    /// Cuts each section into independent streams of at most `frames` frames (`None` or 0: one
    /// stream). The daemon decodes the streams of a section on several NVDEC engines at once;
    /// each stream starts without the previous frames to predict from and repeats the parameter
    /// sets, so sections grow 1.4-2.4% (docs/LAYOUT.md).
    pub fn with_stream_frames(mut self, frames: Option<usize>) -> HevcEncoder {
        self.stream_frames = frames.filter(|&n| n > 0);
        self
    }

    /// Codes lossily at x265 constant QP `qp` (1..=51; 0: lossless, the default, whose sections
    /// are byte for byte those of an encoder without this call). The quantized codes then come
    /// back approximately (error growing with QP), at a fraction of the lossless size; NVDEC
    /// and libde265 decode them to the same codes. Lossy sections need codes as wide as their
    /// samples (8, 10 or 12 bits; narrower codes at QP q are 8-bit codes at a higher QP with
    /// extra rounding): other widths fail to encode with [`CodecError::Unsupported`], as does a
    /// QP above 51.
    pub fn with_qp(mut self, qp: u8) -> Result<HevcEncoder, CodecError> {
        if qp > MAX_QP {
            return Err(CodecError::Unsupported {
                variant: "hevc",
                reason: format!("qp {qp} (0: lossless, lossy 1..={MAX_QP})"),
            });
        }
        self.qp = qp;
        Ok(self)
    }

    /// The constant QP of lossy sections; 0: lossless.
    pub fn qp(&self) -> u8 {
        self.qp
    }

    /// The layout this encoder writes.
    pub fn layout(&self) -> LayoutSpec {
        self.spec
    }

    /// The x265 version string.
    pub fn library_version(&self) -> String {
        self.x265.version()
    }
}

impl SectionEncoder for HevcEncoder {
    fn variant(&self) -> VariantKind {
        VariantKind::Hevc
    }

    fn is_lossy(&self) -> bool {
        self.qp > 0
    }

    fn encode(&self, plane: &CodePlane) -> Result<EncodedSection, CodecError> {
        if !plane.is_valid() {
            return Err(CodecError::InvalidCodes(format!(
                "{} codes of up to {} bits do not fit {:?}",
                plane.codes.len(),
                plane.shape.bits,
                plane.shape
            )));
        }
        let geometry = HevcGeometry::new(plane.shape, &self.spec)?;
        if self.qp > 0 && geometry.bit_depth != plane.shape.bits {
            return Err(CodecError::Unsupported {
                variant: "hevc",
                reason: format!(
                    "lossy hevc (qp {}) codes 8, 10 or 12-bit codes, not {}-bit",
                    self.qp, plane.shape.bits
                ),
            });
        }
        let per_stream = self.stream_frames.unwrap_or(geometry.frames).max(1);
        let mut payload = Vec::new();
        let mut streams = Vec::new();
        for first in (0..geometry.frames).step_by(per_stream) {
            let last = (first + per_stream).min(geometry.frames);
            let frames = (first..last).map(|f| geometry.frame_from_codes(plane, f));
            let stream =
                self.x265
                    .encode(&geometry, &self.preset, self.qp, &self.options, frames)?;
            streams.push(StreamInfo {
                frames: last - first,
                bytes: stream.len(),
            });
            payload.extend_from_slice(&stream);
        }
        let params = HevcParams {
            geometry,
            crc32c: if self.qp == 0 {
                codes_crc32c(&plane.codes)
            } else {
                0
            },
            qp: self.qp,
            streams,
        };
        Ok(EncodedSection {
            params: params.to_bytes()?,
            payload,
        })
    }
}
