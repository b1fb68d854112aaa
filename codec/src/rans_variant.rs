//! The `rans` section variant: a transform-coded section's 16-bit codes as sink rows stored raw
//! and, per tensor, an interleaved rANS stream of the zigzagged levels of the other rows.
//!
//! Parameters: `sink_rows: u16`, then per tensor the coder context of each column as runs
//! (`run: u16, context: u8`), so a section entropy-decodes without the profile (the GPU decoder
//! needs only these bytes). Payload: the sink rows' codes (tensor-major, u16 LE), then per tensor
//! `stream_len: u32` and the stream (`rans` module, docs/FORMAT.md).

use crate::rans::{decode_values, encode_tensor, DEFAULT_BLOCK_VALUES};
use crate::transform::CONTEXTS;
use crate::{
    CodePlane, CodecError, EncodedSection, PlaneShape, SectionDecoder, VariantKind,
    TRANSFORM_CODE_BITS,
};

const NAME: &str = "rans";

fn corrupt(reason: impl Into<String>) -> CodecError {
    CodecError::Corrupt {
        variant: NAME,
        reason: reason.into(),
    }
}

/// Encodes a transform-coded section: `plane` holds, per tensor, `sink_rows` rows of raw 16-bit
/// values and then zigzagged levels; `contexts[t]` is tensor `t`'s context per column.
pub(crate) fn encode_rans_section(
    plane: &CodePlane,
    sink_rows: usize,
    contexts: &[Vec<u8>],
) -> Result<EncodedSection, CodecError> {
    let shape = plane.shape;
    let invalid = |m: String| CodecError::InvalidCodes(m);
    if shape.bits != TRANSFORM_CODE_BITS || plane.codes.len() != shape.len() {
        return Err(invalid(format!("{shape:?} is not a transform-coded plane")));
    }
    if sink_rows > shape.rows || sink_rows > usize::from(u16::MAX) {
        return Err(invalid(format!(
            "{sink_rows} sink rows of {} rows",
            shape.rows
        )));
    }
    if contexts.len() != shape.tensors
        || contexts
            .iter()
            .any(|c| c.len() != shape.cols || c.iter().any(|&x| usize::from(x) >= CONTEXTS))
    {
        return Err(invalid(
            "one context per column and tensor is required".into(),
        ));
    }
    let mut params = (sink_rows as u16).to_le_bytes().to_vec();
    for ctx in contexts {
        for run in ctx.chunk_by(|a, b| a == b) {
            for part in run.chunks(usize::from(u16::MAX)) {
                params.extend_from_slice(&(part.len() as u16).to_le_bytes());
                params.push(part[0]);
            }
        }
    }
    let mut payload = Vec::new();
    let sink_len = sink_rows * shape.cols;
    for t in 0..shape.tensors {
        for c in &plane.tensor(t)[..sink_len] {
            payload.extend_from_slice(&c.to_le_bytes());
        }
    }
    let mut levels = Vec::new();
    for (t, ctx) in contexts.iter().enumerate() {
        levels.clear();
        levels.extend(plane.tensor(t)[sink_len..].iter().map(|&z| unzigzag(z)));
        // Tables only up to the highest context used: unused ones would cost bytes.
        let n_ctx = ctx.iter().max().map_or(1, |&m| usize::from(m) + 1);
        let stream = encode_tensor(&levels, ctx, n_ctx, DEFAULT_BLOCK_VALUES)?;
        payload.extend_from_slice(&(stream.len() as u32).to_le_bytes());
        payload.extend_from_slice(&stream);
    }
    Ok(EncodedSection { params, payload })
}

/// Parses a rans section's parameters: sink rows and each tensor's column contexts (checked
/// against `shape`: at most `shape.rows` sink rows, one context below [`CONTEXTS`] per column of
/// every tensor, no trailing bytes). Public for decoders outside the codec (the daemon's GPU
/// decoder reads the payload itself: sink rows, then per tensor `u32 len` and the stream).
pub fn parse_rans_params(
    shape: PlaneShape,
    params: &[u8],
) -> Result<(usize, Vec<Vec<u8>>), CodecError> {
    if params.len() < 2 {
        return Err(corrupt("parameters end before the sink count"));
    }
    let sink_rows = usize::from(u16::from_le_bytes([params[0], params[1]]));
    if sink_rows > shape.rows {
        return Err(corrupt(format!(
            "{sink_rows} sink rows of {} rows",
            shape.rows
        )));
    }
    let mut runs = params[2..].chunks(3);
    let mut contexts = Vec::with_capacity(shape.tensors.min(1 << 16));
    for t in 0..shape.tensors {
        let mut ctx = Vec::with_capacity(shape.cols);
        while ctx.len() < shape.cols {
            let run = runs
                .next()
                .filter(|r| r.len() == 3)
                .ok_or_else(|| corrupt(format!("tensor {t}'s contexts end early")))?;
            let (n, c) = (usize::from(u16::from_le_bytes([run[0], run[1]])), run[2]);
            if n == 0 || usize::from(c) >= CONTEXTS || ctx.len() + n > shape.cols {
                return Err(corrupt(format!("tensor {t} has a bad context run")));
            }
            ctx.resize(ctx.len() + n, c);
        }
        contexts.push(ctx);
    }
    if runs.next().is_some() {
        return Err(corrupt("bytes after the last context run"));
    }
    Ok((sink_rows, contexts))
}

/// Decodes rans sections (the entropy stage only: the profile is applied in restore).
#[derive(Debug, Clone, Copy, Default)]
pub struct RansCodec;

impl SectionDecoder for RansCodec {
    fn variant(&self) -> VariantKind {
        VariantKind::Rans
    }

    fn decode(
        &self,
        shape: PlaneShape,
        params: &[u8],
        payload: &[u8],
    ) -> Result<CodePlane, CodecError> {
        if shape.bits != TRANSFORM_CODE_BITS {
            return Err(corrupt(format!("{} bits per code", shape.bits)));
        }
        let (sink_rows, contexts) = parse_rans_params(shape, params)?;
        let sink_len = sink_rows * shape.cols;
        let raw_len = sink_len * shape.tensors * 2;
        if payload.len() < raw_len {
            return Err(corrupt("payload ends inside the sink rows"));
        }
        let mut codes = vec![0u16; shape.len()];
        let per_tensor = shape.rows * shape.cols;
        let (raw, mut rest) = payload.split_at(raw_len);
        for (t, tensor) in codes.chunks_exact_mut(per_tensor.max(1)).enumerate() {
            let src = &raw[t * sink_len * 2..(t + 1) * sink_len * 2];
            for (dst, b) in tensor[..sink_len].iter_mut().zip(src.chunks_exact(2)) {
                *dst = u16::from_le_bytes([b[0], b[1]]);
            }
        }
        let mut levels = vec![0i32; per_tensor - sink_len];
        for (t, ctx) in contexts.iter().enumerate() {
            if rest.len() < 4 {
                return Err(corrupt(format!("payload ends before tensor {t}'s stream")));
            }
            let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let stream = rest
                .get(4..4 + n)
                .ok_or_else(|| corrupt(format!("tensor {t}'s stream is truncated")))?;
            rest = &rest[4 + n..];
            decode_values(stream, ctx, &mut levels)?;
            let dst = &mut codes[t * per_tensor + sink_len..(t + 1) * per_tensor];
            for (d, &q) in dst.iter_mut().zip(&levels) {
                *d = zigzag(q);
            }
        }
        if !rest.is_empty() {
            return Err(corrupt(format!(
                "{} bytes after the last stream",
                rest.len()
            )));
        }
        Ok(CodePlane { shape, codes })
    }
}

/// A level's 16-bit code (the rANS stream's zigzag: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...);
/// levels are within -32768..=32767, so it fits.
pub(crate) fn zigzag(q: i32) -> u16 {
    crate::rans::zigzag(q) as u16
}

/// The inverse of [`zigzag`].
pub(crate) fn unzigzag(z: u16) -> i32 {
    crate::rans::unzigzag(u32::from(z))
}
