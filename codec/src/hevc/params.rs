//! The parameters stored beside an HEVC section's payload: geometry, stream table, checksum.
//!
//! Format (little-endian): magic `KVH1` (lossless) or `KVH2` (lossy, followed by u8 x265 QP
//! 1..=51); u8 layout, u8 chroma, u8 bit depth, u8 code bits; u32 tensors, rows, cols, band
//! rows, grid x, grid y, width, height, frames; u32 CRC-32C of the codes (0 in a lossy
//! section: its decoded codes differ from the encoder's by design); u32 stream count, then per
//! stream u32 frames and u32 bytes. The payload is the streams' Annex-B bytes back to back.
//! Decoding rebuilds the geometry from the shape and layout and rejects parameters that disagree
//! with it, so no stored size is trusted blindly. Lossless sections are written as `KVH1`
//! exactly as before lossy sections existed, so old objects and new lossless ones are the same.

use crate::hevc::geometry::HevcGeometry;
use crate::hevc::layout::{Chroma, HevcLayout, LayoutSpec};
use crate::{CodecError, PlaneShape};

const MAGIC: &[u8; 4] = b"KVH1";
/// The magic of a lossy section's parameters (`KVH1`'s fields after a QP byte).
const MAGIC_LOSSY: &[u8; 4] = b"KVH2";
/// The largest QP of 8-bit HEVC (x265 and the standard: 0..=51).
pub const MAX_QP: u8 = 51;

/// One independently decodable HEVC bitstream of a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamInfo {
    /// Frames it holds (consecutive, after those of the streams before it).
    pub frames: usize,
    /// Its bytes in the payload (after those of the streams before it).
    pub bytes: usize,
}

/// Everything a decoder needs besides the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HevcParams {
    /// Frame geometry and layout.
    pub geometry: HevcGeometry,
    /// CRC-32C of the codes ([`codes_crc32c`]), checked after decoding; 0 and unchecked in a
    /// lossy section ([`HevcParams::qp`] > 0).
    pub crc32c: u32,
    /// x265's constant QP: 0 for lossless sections (decoded codes equal the encoded ones),
    /// 1..=[`MAX_QP`] for lossy ones (decoded codes are close to them; every conforming decoder,
    /// libde265 and NVDEC alike, gives the same ones).
    pub qp: u8,
    /// The bitstreams, in payload order.
    pub streams: Vec<StreamInfo>,
}

/// CRC-32C of codes taken as little-endian u16s: what [`HevcParams::crc32c`] holds.
pub fn codes_crc32c(codes: &[u16]) -> u32 {
    let mut crc = 0;
    let mut buf = [0u8; 8192];
    for chunk in codes.chunks(buf.len() / 2) {
        for (i, c) in chunk.iter().enumerate() {
            buf[2 * i..2 * i + 2].copy_from_slice(&c.to_le_bytes());
        }
        crc = crc32c::crc32c_append(crc, &buf[..2 * chunk.len()]);
    }
    crc
}

fn lossy_unsupported(reason: String) -> CodecError {
    CodecError::Unsupported {
        variant: "hevc",
        reason,
    }
}

fn corrupt(reason: impl Into<String>) -> CodecError {
    CodecError::Corrupt {
        variant: "hevc",
        reason: reason.into(),
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], CodecError> {
        if self.0.len() < n {
            return Err(corrupt("hevc parameters are truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<usize, CodecError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

fn put_u32(out: &mut Vec<u8>, v: usize) -> Result<(), CodecError> {
    let v = u32::try_from(v).map_err(|_| CodecError::Unsupported {
        variant: "hevc",
        reason: format!("{v} exceeds u32"),
    })?;
    out.extend_from_slice(&v.to_le_bytes());
    Ok(())
}

impl HevcParams {
    /// Serializes the parameters.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        let g = &self.geometry;
        let mut out = Vec::with_capacity(64 + 8 * self.streams.len());
        if self.qp == 0 {
            out.extend_from_slice(MAGIC);
        } else {
            self.check_lossy()?;
            out.extend_from_slice(MAGIC_LOSSY);
            out.push(self.qp);
        }
        out.extend_from_slice(&[g.layout.code(), g.chroma.code(), g.bit_depth, g.shape.bits]);
        for v in [
            g.shape.tensors,
            g.shape.rows,
            g.shape.cols,
            g.band_rows,
            g.grid.0,
            g.grid.1,
            g.width,
            g.height,
            g.frames,
        ] {
            put_u32(&mut out, v)?;
        }
        out.extend_from_slice(&self.crc32c.to_le_bytes());
        put_u32(&mut out, self.streams.len())?;
        for s in &self.streams {
            put_u32(&mut out, s.frames)?;
            put_u32(&mut out, s.bytes)?;
        }
        Ok(out)
    }

    /// Parses and checks parameters: the geometry must be the one its shape and layout give,
    /// and the streams must cover every frame.
    pub fn from_bytes(params: &[u8]) -> Result<HevcParams, CodecError> {
        let mut r = Reader(params);
        let magic = r.take(4)?;
        let lossy = magic == MAGIC_LOSSY;
        let qp = if magic == MAGIC {
            0
        } else if lossy {
            r.u8()?
        } else {
            return Err(corrupt("not hevc parameters (bad magic)"));
        };
        let layout =
            HevcLayout::from_code(r.u8()?).ok_or_else(|| corrupt("unknown hevc layout"))?;
        let chroma = Chroma::from_code(r.u8()?).ok_or_else(|| corrupt("unknown chroma format"))?;
        let bit_depth = r.u8()?;
        let bits = r.u8()?;
        let shape = PlaneShape {
            bits,
            tensors: r.u32()?,
            rows: r.u32()?,
            cols: r.u32()?,
        };
        let band_rows = r.u32()?;
        let stored = [r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?];
        let spec = LayoutSpec {
            layout,
            chroma,
            tokens_per_frame: (layout == HevcLayout::Frames).then_some(band_rows),
        };
        let geometry = HevcGeometry::new(shape, &spec).map_err(|e| corrupt(e.to_string()))?;
        let g = &geometry;
        if g.bit_depth != bit_depth
            || g.band_rows != band_rows
            || [g.grid.0, g.grid.1, g.width, g.height, g.frames] != stored
        {
            return Err(corrupt("hevc geometry disagrees with its shape and layout"));
        }
        let b = r.take(4)?;
        let crc32c = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let n = r.u32()?;
        if n == 0 || n > g.frames {
            return Err(corrupt(format!("{n} streams for {} frames", g.frames)));
        }
        let streams = (0..n)
            .map(|_| {
                Ok(StreamInfo {
                    frames: r.u32()?,
                    bytes: r.u32()?,
                })
            })
            .collect::<Result<Vec<_>, CodecError>>()?;
        if !r.0.is_empty() {
            return Err(corrupt("trailing bytes after hevc parameters"));
        }
        if streams.iter().map(|s| s.frames).sum::<usize>() != g.frames
            || streams.iter().any(|s| s.frames == 0 || s.bytes == 0)
        {
            return Err(corrupt("hevc streams do not cover the frames"));
        }
        let p = HevcParams {
            geometry,
            crc32c,
            qp,
            streams,
        };
        if lossy {
            p.check_lossy().map_err(|e| corrupt(e.to_string()))?;
        }
        Ok(p)
    }

    /// Whether decoded codes may differ from the encoded ones (QP > 0): the codes' checksum is
    /// then not checked, only the payload's (in the chunk's section table).
    pub fn is_lossy(&self) -> bool {
        self.qp > 0
    }

    /// The rules of a lossy section: QP 1..=51, codes as wide as their samples (8, 10 or 12
    /// bits, so every sample a decoder can output is a valid code and no decoder needs to
    /// clamp: NVDEC's restore kernels and libde265 then give the same codes), no checksum.
    fn check_lossy(&self) -> Result<(), CodecError> {
        let g = &self.geometry;
        if self.qp == 0 || self.qp > MAX_QP {
            return Err(lossy_unsupported(format!(
                "qp {} (lossy: 1..={MAX_QP})",
                self.qp
            )));
        }
        if g.shape.bits != g.bit_depth {
            return Err(lossy_unsupported(format!(
                "{}-bit codes in {}-bit samples (lossy needs 8, 10 or 12-bit codes)",
                g.shape.bits, g.bit_depth
            )));
        }
        if self.crc32c != 0 {
            return Err(lossy_unsupported(
                "a lossy section with a codes checksum".into(),
            ));
        }
        Ok(())
    }

    /// Splits `payload` into its streams, checking that their sizes add up.
    pub fn split<'a>(&self, payload: &'a [u8]) -> Result<Vec<&'a [u8]>, CodecError> {
        let total: usize = self.streams.iter().map(|s| s.bytes).sum();
        if total != payload.len() {
            return Err(corrupt(format!(
                "payload has {} bytes, its streams {total}",
                payload.len()
            )));
        }
        let mut at = 0;
        Ok(self
            .streams
            .iter()
            .map(|s| {
                at += s.bytes;
                &payload[at - s.bytes..at]
            })
            .collect())
    }
}

/// The raw Annex-B HEVC bitstream(s) of a section, e.g. to write out and play or probe.
pub fn extract_streams(params: &[u8], payload: &[u8]) -> Result<Vec<Vec<u8>>, CodecError> {
    let p = HevcParams::from_bytes(params)?;
    Ok(p.split(payload)?.into_iter().map(<[u8]>::to_vec).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip_and_reject_tampering() {
        let shape = PlaneShape {
            bits: 4,
            tensors: 4,
            rows: 64,
            cols: 256,
        };
        let geometry = HevcGeometry::new(shape, &"frames".parse().unwrap()).unwrap();
        let p = HevcParams {
            geometry,
            crc32c: 7,
            qp: 0,
            streams: vec![StreamInfo {
                frames: geometry.frames,
                bytes: 10,
            }],
        };
        let bytes = p.to_bytes().unwrap();
        assert_eq!(HevcParams::from_bytes(&bytes).unwrap(), p);
        // Every byte but the checksum (44..48) and the stream's byte count (56..60) is checked
        // here; those two are checked against the codes and the payload.
        for i in (0..44).chain(48..56) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                HevcParams::from_bytes(&bad).is_err(),
                "flip at {i} accepted"
            );
        }
        assert!(HevcParams::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(p.split(&[0; 9]).is_err());
        assert_eq!(p.split(&[0; 10]).unwrap().len(), 1);
    }

    #[test]
    fn lossy_params_round_trip_and_reject_what_decoders_could_not_agree_on() {
        let shape = PlaneShape {
            bits: 8,
            tensors: 4,
            rows: 64,
            cols: 256,
        };
        let geometry = HevcGeometry::new(shape, &"frames".parse().unwrap()).unwrap();
        let p = HevcParams {
            geometry,
            crc32c: 0,
            qp: 12,
            streams: vec![StreamInfo {
                frames: geometry.frames,
                bytes: 10,
            }],
        };
        let bytes = p.to_bytes().unwrap();
        assert_eq!(&bytes[..5], b"KVH2\x0c");
        let back = HevcParams::from_bytes(&bytes).unwrap();
        assert_eq!(back, p);
        assert!(back.is_lossy());
        // The lossless form of the same section is the old format byte for byte: KVH1, no QP.
        let lossless = HevcParams { qp: 0, ..p.clone() }.to_bytes().unwrap();
        assert_eq!(&lossless[..4], b"KVH1");
        assert_eq!(&lossless[4..], &bytes[5..]);
        // Every byte but the stream's byte count (57..61) is checked here, the (zero) codes
        // checksum included.
        for i in (0..57).chain(61..bytes.len()) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                HevcParams::from_bytes(&bad).is_err(),
                "flip at {i} accepted"
            );
        }
        // QP 0 or above 51 under the lossy magic, and a nonzero checksum, are corrupt.
        for qp in [0u8, 52, 255] {
            let mut bad = bytes.clone();
            bad[4] = qp;
            assert!(HevcParams::from_bytes(&bad).is_err(), "qp {qp} accepted");
        }
        let mut bad = bytes.clone();
        bad[45] = 1;
        assert!(HevcParams::from_bytes(&bad).is_err(), "checksum accepted");
        // Codes narrower than their samples cannot be lossy (a decoder would have to clamp).
        let narrow =
            HevcGeometry::new(PlaneShape { bits: 6, ..shape }, &"frames".parse().unwrap()).unwrap();
        let q = HevcParams {
            geometry: narrow,
            ..p.clone()
        };
        assert!(matches!(q.to_bytes(), Err(CodecError::Unsupported { .. })));
        let mut forged = q.clone();
        forged.qp = 0;
        let mut forged = forged.to_bytes().unwrap();
        forged.splice(0..4, b"KVH2\x0c".iter().copied());
        assert!(matches!(
            HevcParams::from_bytes(&forged),
            Err(CodecError::Corrupt { .. })
        ));
    }

    #[test]
    fn crc_sees_every_code() {
        assert_ne!(codes_crc32c(&[1, 2, 3]), codes_crc32c(&[1, 2, 4]));
        assert_ne!(codes_crc32c(&[0x100]), codes_crc32c(&[0x1]));
    }
}
