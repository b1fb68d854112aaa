//! The frame geometry of an HEVC section and the mapping between codes and frame samples.
//!
//! Pure and FFI-free, so that every HEVC backend (x265 + libde265 here, NVDEC later) shares the
//! exact same mapping. Codes are stored unscaled as samples of the smallest bit depth that holds
//! them (8, 10 or 12).
//!
//! Both layouts cut each tensor (`rows x cols` codes) into *tiles* of `band_rows` rows and all
//! `cols` columns, and place tiles in *slots* of a fixed grid in every plane of a frame. Slots
//! are numbered plane by plane (Y, then U, then V), column-major within a plane, so the bands of
//! one tensor sit under each other. Samples outside every tile are padding: each repeats its left
//! neighbour (or the one above in the first column, or zero), which costs almost nothing to code.

use crate::hevc::layout::{Chroma, HevcLayout, LayoutSpec};
use crate::{CodePlane, CodecError, PlaneShape};

const MIN_SIDE: usize = HevcGeometry::MIN_SIDE;
const MAX_SIDE: usize = HevcGeometry::MAX_SIDE;
const MAX_BITS: u8 = HevcGeometry::MAX_BITS;
/// The most codes one section may hold (2^36, far above any chunk), so that sizes derived from a
/// shape never overflow.
const MAX_CODES: usize = 1 << 36;

/// The samples of one frame: three planes, row-major, each `plane_size(c)` of the geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Y, U, V samples, unshifted (values below `2^bit_depth`).
    pub planes: [Vec<u16>; 3],
}

/// Where and how a section's codes live in HEVC frames. Everything follows from the shape and
/// the [`LayoutSpec`] through [`HevcGeometry::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HevcGeometry {
    /// The codes' shape.
    pub shape: PlaneShape,
    /// The arrangement.
    pub layout: HevcLayout,
    /// The chroma format.
    pub chroma: Chroma,
    /// Bits per sample: 8, 10 or 12.
    pub bit_depth: u8,
    /// Rows (tokens) per tile; for [`HevcLayout::Frames`], tokens per frame.
    pub band_rows: usize,
    /// Tile slots across and down in each chroma plane (the luma plane has `subsampling` times
    /// as many in each direction).
    pub grid: (usize, usize),
    /// Luma width in samples.
    pub width: usize,
    /// Luma height in samples.
    pub height: usize,
    /// Number of frames.
    pub frames: usize,
}

fn unsupported(reason: String) -> CodecError {
    CodecError::Unsupported {
        variant: "hevc",
        reason,
    }
}

fn corrupt(reason: String) -> CodecError {
    CodecError::Corrupt {
        variant: "hevc",
        reason,
    }
}

impl HevcGeometry {
    /// The smallest frame side NVDEC decodes (HEVC, measured on H100/H200).
    pub const MIN_SIDE: usize = 144;
    /// The largest frame side NVDEC decodes (HEVC, measured on H100/H200).
    pub const MAX_SIDE: usize = 8192;
    /// The widest codes HEVC frames carry here: NVDEC decodes at most 12-bit HEVC.
    pub const MAX_BITS: u8 = 12;

    /// Lays out `shape` as `spec` says, within NVDEC's limits (frame sides 144..=8192, even for
    /// 4:2:0, at most 12 bits).
    pub fn new(shape: PlaneShape, spec: &LayoutSpec) -> Result<HevcGeometry, CodecError> {
        let total = shape
            .tensors
            .checked_mul(shape.rows)
            .and_then(|n| n.checked_mul(shape.cols));
        if total.is_none_or(|n| n > MAX_CODES) {
            return Err(unsupported(format!("{shape:?} holds too many codes")));
        }
        if shape.is_empty() {
            return Err(unsupported("empty section".into()));
        }
        if shape.bits == 0 || shape.bits > MAX_BITS {
            return Err(unsupported(format!(
                "{}-bit codes (hevc carries 1..={MAX_BITS})",
                shape.bits
            )));
        }
        let bit_depth = match shape.bits {
            0..=8 => 8,
            9..=10 => 10,
            _ => 12,
        };
        let m = spec.chroma.subsampling();
        // Sides of a chroma plane: the luma plane is `m` times as large in each direction.
        let (min0, max0) = (MIN_SIDE / m, MAX_SIDE / m);
        let (tensors, rows, cols) = (shape.tensors, shape.rows, shape.cols);
        if cols > max0 {
            return Err(unsupported(format!(
                "{cols} columns exceed a frame of {MAX_SIDE}"
            )));
        }
        let cells = m * m + 2;
        let bx = min0.div_ceil(cols).max(1);
        let (band_rows, by, frames) = match spec.layout {
            HevcLayout::Rows => {
                let bands = rows.div_ceil(max0);
                let band_rows = rows.div_ceil(bands);
                let tiles = tensors * bands;
                let by = tiles.div_ceil(cells * bx).min(max0 / band_rows).max(1);
                (band_rows, by, tiles.div_ceil(cells * bx * by))
            }
            HevcLayout::Frames => {
                let by = tensors.div_ceil(cells * bx);
                if by > max0 {
                    return Err(unsupported(format!("{tensors} tensors exceed one frame")));
                }
                let g = match spec.tokens_per_frame {
                    Some(g) => g,
                    None => min0.div_ceil(by).min(rows),
                };
                if g == 0 || g * by > max0 {
                    return Err(unsupported(format!(
                        "{g} tokens per frame x {by} tiles exceed a frame of {MAX_SIDE}"
                    )));
                }
                (g, by, rows.div_ceil(g))
            }
        };
        let w0 = (bx * cols).max(min0);
        let h0 = (by * band_rows).max(min0);
        Ok(HevcGeometry {
            shape,
            layout: spec.layout,
            chroma: spec.chroma,
            bit_depth,
            band_rows,
            grid: (bx, by),
            width: m * w0,
            height: m * h0,
            frames,
        })
    }

    /// The layout spec that rebuilds this geometry from its shape.
    pub fn spec(&self) -> LayoutSpec {
        LayoutSpec {
            layout: self.layout,
            chroma: self.chroma,
            tokens_per_frame: (self.layout == HevcLayout::Frames).then_some(self.band_rows),
        }
    }

    /// Tiles per tensor (bands of `band_rows` rows).
    pub fn bands(&self) -> usize {
        self.shape.rows.div_ceil(self.band_rows)
    }

    /// Width and height of plane `c` (0 = Y, 1 = U, 2 = V).
    pub fn plane_size(&self, c: usize) -> (usize, usize) {
        let m = if c == 0 { 1 } else { self.chroma.subsampling() };
        (self.width / m, self.height / m)
    }

    /// Samples in one frame, all planes.
    pub fn samples_per_frame(&self) -> usize {
        (0..3)
            .map(|c| self.plane_size(c).0 * self.plane_size(c).1)
            .sum()
    }

    /// Tile slots in one frame.
    pub fn slots_per_frame(&self) -> usize {
        let m = self.chroma.subsampling();
        (m * m + 2) * self.grid.0 * self.grid.1
    }

    /// Plane, x and y of slot `s`'s top-left sample.
    fn slot_origin(&self, s: usize) -> (usize, usize, usize) {
        let m = self.chroma.subsampling();
        let luma = m * m * self.grid.0 * self.grid.1;
        let (c, s, gy) = if s < luma {
            (0, s, m * self.grid.1)
        } else {
            let per = self.grid.0 * self.grid.1;
            (1 + (s - luma) / per, (s - luma) % per, self.grid.1)
        };
        (c, (s / gy) * self.shape.cols, (s % gy) * self.band_rows)
    }

    /// The tile (tensor, band) in slot `s` of frame `f`, if any.
    fn tile_at(&self, f: usize, s: usize) -> Option<(usize, usize)> {
        match self.layout {
            HevcLayout::Rows => {
                let i = f * self.slots_per_frame() + s;
                (i < self.shape.tensors * self.bands())
                    .then(|| (i / self.bands(), i % self.bands()))
            }
            HevcLayout::Frames => (s < self.shape.tensors).then_some((s, f)),
        }
    }

    /// Each tile of frame `f`: (plane, x, y, tensor, first row, rows).
    fn tiles(
        &self,
        f: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize, usize, usize)> + '_ {
        (0..self.slots_per_frame()).filter_map(move |s| {
            let (t, b) = self.tile_at(f, s)?;
            let r0 = b * self.band_rows;
            let n = self.band_rows.min(self.shape.rows.saturating_sub(r0));
            let (c, x, y) = self.slot_origin(s);
            (n > 0).then_some((c, x, y, t, r0, n))
        })
    }

    /// The samples of frame `f` for `plane`'s codes, padding included.
    pub fn frame_from_codes(&self, plane: &CodePlane, f: usize) -> Result<Frame, CodecError> {
        if plane.shape != self.shape || plane.codes.len() != self.shape.len() {
            return Err(CodecError::InvalidCodes(format!(
                "codes of shape {:?} for a geometry of {:?}",
                plane.shape, self.shape
            )));
        }
        if f >= self.frames {
            return Err(CodecError::InvalidCodes(format!(
                "frame {f} of {}",
                self.frames
            )));
        }
        let mut planes: [Vec<u16>; 3] = Default::default();
        let mut filled: [Vec<bool>; 3] = Default::default();
        for c in 0..3 {
            let (w, h) = self.plane_size(c);
            planes[c] = vec![0; w * h];
            filled[c] = vec![false; w * h];
        }
        let cols = self.shape.cols;
        for (c, x, y, t, r0, n) in self.tiles(f) {
            let w = self.plane_size(c).0;
            let src = plane.tensor(t);
            for r in 0..n {
                let at = (y + r) * w + x;
                planes[c][at..at + cols]
                    .copy_from_slice(&src[(r0 + r) * cols..(r0 + r + 1) * cols]);
                filled[c][at..at + cols].fill(true);
            }
        }
        for c in 0..3 {
            let (w, h) = self.plane_size(c);
            let (p, done) = (&mut planes[c], &filled[c]);
            for y in 0..h {
                for x in 0..w {
                    let i = y * w + x;
                    if !done[i] {
                        p[i] = if x > 0 {
                            p[i - 1]
                        } else if y > 0 {
                            p[i - w]
                        } else {
                            0
                        };
                    }
                }
            }
        }
        Ok(Frame { planes })
    }

    /// Writes the codes that frame `f` holds into `codes` (`shape.len()` long, laid out
    /// `[tensors][rows][cols]`). Samples of the wrong count or too large for the codes' bit width
    /// are [`CodecError::Corrupt`].
    pub fn codes_from_frame(
        &self,
        f: usize,
        frame: &Frame,
        codes: &mut [u16],
    ) -> Result<(), CodecError> {
        if codes.len() != self.shape.len() {
            return Err(corrupt(format!(
                "{} codes for a shape of {}",
                codes.len(),
                self.shape.len()
            )));
        }
        if f >= self.frames {
            return Err(corrupt(format!("frame {f} of {}", self.frames)));
        }
        for c in 0..3 {
            let (w, h) = self.plane_size(c);
            if frame.planes[c].len() != w * h {
                return Err(corrupt(format!(
                    "plane {c} of frame {f} has {} samples, not {w}x{h}",
                    frame.planes[c].len()
                )));
            }
        }
        let max = (1u32 << self.shape.bits) - 1;
        let (rows, cols) = (self.shape.rows, self.shape.cols);
        for (c, x, y, t, r0, n) in self.tiles(f) {
            let w = self.plane_size(c).0;
            for r in 0..n {
                let at = (y + r) * w + x;
                let src = &frame.planes[c][at..at + cols];
                if src.iter().any(|&v| u32::from(v) > max) {
                    return Err(corrupt(format!("sample above {max} in frame {f}")));
                }
                let dst = (t * rows + r0 + r) * cols;
                codes[dst..dst + cols].copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Every frame for `plane`'s codes.
    pub fn frames_from_codes(&self, plane: &CodePlane) -> Result<Vec<Frame>, CodecError> {
        (0..self.frames)
            .map(|f| self.frame_from_codes(plane, f))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(bits: u8, tensors: usize, rows: usize, cols: usize) -> PlaneShape {
        PlaneShape {
            bits,
            tensors,
            rows,
            cols,
        }
    }

    fn check(g: &HevcGeometry) {
        assert!(g.width >= MIN_SIDE && g.width <= MAX_SIDE, "{g:?}");
        assert!(g.height >= MIN_SIDE && g.height <= MAX_SIDE, "{g:?}");
        if g.chroma == Chroma::Yuv420 {
            assert_eq!((g.width % 2, g.height % 2), (0, 0));
        }
        // The mapping is a bijection: every code lands once, and comes back.
        let n = g.shape.len();
        let max = (1u32 << g.shape.bits) as usize;
        let codes: Vec<u16> = (0..n).map(|i| ((i * 7919) % max) as u16).collect();
        let plane = CodePlane {
            shape: g.shape,
            codes,
        };
        let mut back = vec![u16::MAX; n];
        for f in 0..g.frames {
            let frame = g.frame_from_codes(&plane, f).unwrap();
            g.codes_from_frame(f, &frame, &mut back).unwrap();
        }
        assert_eq!(back, plane.codes, "{g:?}");
    }

    #[test]
    fn every_layout_maps_codes_bijectively() {
        let shapes = [
            shape(4, 16, 256, 256),
            shape(8, 2, 50, 32),
            shape(12, 5, 300, 144),
            shape(2, 1, 1, 1),
            shape(6, 1, 8300, 16),
        ];
        for s in shapes {
            for name in ["rows", "rows420", "frames", "frames420", "frames:7"] {
                let g = HevcGeometry::new(s, &name.parse().unwrap()).unwrap();
                check(&g);
                assert_eq!(HevcGeometry::new(s, &g.spec()).unwrap(), g);
            }
        }
    }

    #[test]
    fn rejects_what_nvdec_cannot_take() {
        let spec = LayoutSpec::DEFAULT;
        assert!(HevcGeometry::new(shape(13, 1, 8, 8), &spec).is_err());
        assert!(HevcGeometry::new(shape(8, 1, 8, 9000), &spec).is_err());
        assert!(HevcGeometry::new(shape(8, 0, 8, 8), &spec).is_err());
        assert!(HevcGeometry::new(shape(8, usize::MAX, 8, 8), &spec).is_err());
        assert!(HevcGeometry::new(shape(8, 1 << 30, 1 << 30, 8), &spec).is_err());
        assert!(HevcGeometry::new(shape(8, 1, 8, 8), &"frames:9000".parse().unwrap()).is_err());
    }

    #[test]
    fn padding_repeats_edges() {
        let g = HevcGeometry::new(shape(8, 1, 2, 2), &LayoutSpec::DEFAULT).unwrap();
        let plane = CodePlane {
            shape: g.shape,
            codes: vec![1, 2, 3, 4],
        };
        let f = g.frame_from_codes(&plane, 0).unwrap();
        let w = g.width;
        assert_eq!(&f.planes[0][..4], &[1, 2, 2, 2]);
        assert_eq!(&f.planes[0][w..w + 4], &[3, 4, 4, 4]);
        assert_eq!(&f.planes[0][2 * w..2 * w + 3], &[3, 3, 3]);
    }
}
