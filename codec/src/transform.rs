//! A profile's transform applied to one K or V tensor of a chunk, and its inverse.
//!
//! Forward (encode): per token and head, K is unrotated by RoPE at the token's position, the
//! mean is removed and the head is projected on the basis. Inverse (restore): the sum over
//! components in ascending order with `mul_add`, the mean added, RoPE redone with the same f32
//! cos/sin table; a GPU restore that follows the same order gives the same values.

use crate::profile::RopeStyle;
use crate::CodecProfile;

/// Which tensor of which layer, and where its rows start in the sequence.
#[derive(Debug, Clone, Copy)]
pub struct TensorAt {
    /// Layer index.
    pub layer: usize,
    /// K (true) or V.
    pub is_key: bool,
    /// Sequence position of the first row.
    pub first_position: u32,
}

/// `values` (`tokens x channels`) into coefficients (same shape, head-major components).
pub fn forward(profile: &CodecProfile, at: TensorAt, values: &[f32], out: &mut Vec<f32>) {
    let (d, channels) = (profile.head_dim, profile.channels());
    let tensor = profile.layers[at.layer].tensor(at.is_key);
    let rope = at.is_key && profile.rope.style != RopeStyle::None;
    out.clear();
    out.resize(values.len(), 0.0);
    let (mut cos, mut sin, mut head) = (Vec::new(), Vec::new(), vec![0f32; d]);
    for (t, (row, dst)) in values
        .chunks_exact(channels)
        .zip(out.chunks_exact_mut(channels))
        .enumerate()
    {
        if rope {
            profile
                .rope
                .angles(at.first_position + t as u32, &mut cos, &mut sin);
        }
        for (h, basis) in tensor.heads.iter().enumerate() {
            head.copy_from_slice(&row[h * d..(h + 1) * d]);
            if rope {
                profile.rope.unrotate(&mut head, &cos, &sin);
            }
            for (x, m) in head.iter_mut().zip(&basis.mean) {
                *x -= m;
            }
            for (k, y) in dst[h * d..(h + 1) * d].iter_mut().enumerate() {
                let b = &basis.basis[k * d..(k + 1) * d];
                *y = b
                    .iter()
                    .zip(&head)
                    .fold(0.0f32, |acc, (w, x)| w.mul_add(*x, acc));
            }
        }
    }
}

/// Coefficients back to values (the inverse of [`forward`]).
pub fn inverse(profile: &CodecProfile, at: TensorAt, coefficients: &[f32], out: &mut Vec<f32>) {
    let (d, channels) = (profile.head_dim, profile.channels());
    let tensor = profile.layers[at.layer].tensor(at.is_key);
    let rope = at.is_key && profile.rope.style != RopeStyle::None;
    out.clear();
    out.resize(coefficients.len(), 0.0);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for (t, (row, dst)) in coefficients
        .chunks_exact(channels)
        .zip(out.chunks_exact_mut(channels))
        .enumerate()
    {
        if rope {
            profile
                .rope
                .angles(at.first_position + t as u32, &mut cos, &mut sin);
        }
        for (h, basis) in tensor.heads.iter().enumerate() {
            let head = &mut dst[h * d..(h + 1) * d];
            head.copy_from_slice(&basis.mean);
            for (k, &y) in row[h * d..(h + 1) * d].iter().enumerate() {
                if y == 0.0 {
                    continue;
                }
                let b = &basis.basis[k * d..(k + 1) * d];
                for (x, w) in head.iter_mut().zip(b) {
                    *x = w.mul_add(y, *x);
                }
            }
            if rope {
                profile.rope.rotate(head, &cos, &sin);
            }
        }
    }
}

/// Coder contexts per stream: components are grouped by their deviation over the step.
pub const CONTEXTS: usize = 32;

/// The coder context of a component with calibration deviation `std` at `step`: half-octave
/// buckets of `std / step` from 1/16 (context 0, and anything smaller) up to context 31.
pub fn context(std: f32, step: f32) -> u8 {
    let r = std / step;
    if r.is_nan() || r <= 0.0 {
        return 0;
    }
    if r.is_infinite() {
        return (CONTEXTS - 1) as u8;
    }
    ((2.0 * r.log2()).floor() + 8.0).clamp(0.0, (CONTEXTS - 1) as f32) as u8
}

/// Largest magnitude of a quantized coefficient (the rANS stream's escape range).
pub const MAX_LEVEL: i32 = 32767;

/// A coefficient's quantization level at `step` (round to nearest, clamped).
pub fn quantize_level(y: f32, step: f32) -> i32 {
    (y / step)
        .round()
        .clamp(-(MAX_LEVEL as f32), MAX_LEVEL as f32) as i32
}

/// A level's coefficient: one f32 product, as the GPU computes it.
pub fn dequantize_level(q: i32, step: f32) -> f32 {
    q as f32 * step
}
