//! [`HevcDecoder`]: the `hevc` variant's software decoder, libde265.

use std::sync::{Arc, Mutex};

use crate::hevc::de265::{De265, Decoder};
use crate::hevc::params::{codes_crc32c, HevcParams};
use crate::{CodePlane, CodecError, PlaneShape, SectionDecoder, VariantKind};

/// Decodes `hevc` sections with libde265 (loaded at run time).
///
/// Decoder contexts, each with its worker threads, are kept in a pool and reused, so threads are
/// started once per concurrent caller, not once per section.
pub struct HevcDecoder {
    lib: Arc<De265>,
    threads: usize,
    pool: Mutex<Vec<Decoder>>,
}

impl std::fmt::Debug for HevcDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HevcDecoder")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl HevcDecoder {
    /// A decoder whose contexts use one worker thread per core. Fails with
    /// [`CodecError::Library`] when libde265 cannot be loaded.
    pub fn new() -> Result<HevcDecoder, CodecError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        HevcDecoder::with_threads(threads)
    }

    /// A decoder whose contexts use `threads` worker threads (0: decode on the caller's thread).
    pub fn with_threads(threads: usize) -> Result<HevcDecoder, CodecError> {
        let lib = De265::load()?;
        let first = Decoder::new(lib.clone(), threads)?;
        Ok(HevcDecoder {
            lib,
            threads,
            pool: Mutex::new(vec![first]),
        })
    }

    fn take(&self) -> Result<Decoder, CodecError> {
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match pooled {
            Some(d) => Ok(d),
            None => Decoder::new(self.lib.clone(), self.threads),
        }
    }

    fn give(&self, d: Decoder) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(d);
    }
}

impl SectionDecoder for HevcDecoder {
    fn variant(&self) -> VariantKind {
        VariantKind::Hevc
    }

    fn decode(
        &self,
        shape: PlaneShape,
        params: &[u8],
        payload: &[u8],
    ) -> Result<CodePlane, CodecError> {
        let p = HevcParams::from_bytes(params)?;
        let g = p.geometry;
        if g.shape != shape {
            return Err(CodecError::Corrupt {
                variant: "hevc",
                reason: format!("section holds {:?}, expected {shape:?}", g.shape),
            });
        }
        let streams = p.split(payload)?;
        let mut codes = vec![0u16; shape.len()];
        let mut first = 0;
        for (stream, info) in streams.iter().zip(&p.streams) {
            let mut dec = self.take()?;
            let result = dec.decode(&g, stream, info.frames, &mut |i, frame| {
                g.codes_from_frame(first + i, frame, &mut codes)
            });
            // A context that saw an error is dropped rather than reused.
            if result.is_ok() {
                self.give(dec);
            }
            result?;
            first += info.frames;
        }
        // A lossy section's codes are not the encoder's, so only a lossless one has a checksum.
        if !p.is_lossy() && codes_crc32c(&codes) != p.crc32c {
            return Err(CodecError::Corrupt {
                variant: "hevc",
                reason: "codes fail their checksum".into(),
            });
        }
        Ok(CodePlane { shape, codes })
    }
}
