//! [`HevcEncoder`]: the `hevc` variant's encoder, x265 in lossless mode.

use std::sync::Arc;

use crate::hevc::geometry::HevcGeometry;
use crate::hevc::layout::LayoutSpec;
use crate::hevc::params::{codes_crc32c, HevcParams, StreamInfo};
use crate::hevc::x265::X265;
use crate::{CodePlane, CodecError, EncodedSection, SectionEncoder, VariantKind};

/// The x265 preset used unless [`HevcEncoder::with_preset`] says otherwise. Measured on
/// codelm-kv-a (docs/LAYOUT.md): for tokens along frames, `medium` is 8% smaller than `fast`
/// and faster presets (whose inter search finds little); for tokens as rows `slow` gained 0.02%
/// over `medium`.
pub const DEFAULT_PRESET: &str = "medium";

/// Encodes sections losslessly with x265 (loaded at run time, never linked: it is GPL).
///
/// x265 runs its own worker pool (frame threads and wavefront rows) over all cores.
#[derive(Debug, Clone)]
pub struct HevcEncoder {
    x265: Arc<X265>,
    spec: LayoutSpec,
    preset: String,
    options: Vec<(String, String)>,
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
        let frames = (0..geometry.frames).map(|f| geometry.frame_from_codes(plane, f));
        let payload = self
            .x265
            .encode(&geometry, &self.preset, &self.options, frames)?;
        let params = HevcParams {
            geometry,
            crc32c: codes_crc32c(&plane.codes),
            streams: vec![StreamInfo {
                frames: geometry.frames,
                bytes: payload.len(),
            }],
        };
        Ok(EncodedSection {
            params: params.to_bytes()?,
            payload,
        })
    }
}
