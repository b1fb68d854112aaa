//! A profile's transform applied to one K or V tensor of a chunk, and its inverse.
//!
//! Forward (encode): per token and head, K is unrotated by RoPE at the token's position, the
//! mean is removed and the head is projected on the basis. Inverse (restore): starting from the
//! mean, `x[j] = x[j] + basis[k][j] * y[k]` (product rounded, then the sum: no fused
//! multiply-add) for components k in ascending order, then RoPE redone with the same f32 cos/sin
//! table; a GPU restore that rounds the same way (`__fmul_rn`, `__fadd_rn`) in the same order
//! gives the same values.

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

/// RoPE's cos/sin for the rows of a chunk: computed once and shared by every K tensor.
#[derive(Debug, Clone, Default)]
pub struct RopeTable {
    first_position: u32,
    pairs: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// The angles of `rows` positions from `first_position` (empty without RoPE).
    pub fn new(profile: &CodecProfile, first_position: u32, rows: usize) -> RopeTable {
        let pairs = profile.rope.pairs();
        let mut t = RopeTable {
            first_position,
            pairs,
            cos: Vec::with_capacity(rows * pairs),
            sin: Vec::with_capacity(rows * pairs),
        };
        let (mut c, mut s) = (Vec::new(), Vec::new());
        for r in 0..rows {
            profile
                .rope
                .angles(first_position + r as u32, &mut c, &mut s);
            t.cos.extend_from_slice(&c);
            t.sin.extend_from_slice(&s);
        }
        t
    }

    /// cos and sin of row `r` of a tensor starting at `first_position`, if the table covers it.
    fn row(&self, first_position: u32, r: usize) -> Option<(&[f32], &[f32])> {
        let i = (first_position.checked_sub(self.first_position)? as usize).checked_add(r)?;
        let range = i * self.pairs..(i + 1) * self.pairs;
        Some((self.cos.get(range.clone())?, self.sin.get(range)?))
    }
}

/// `values` (`tokens x channels`) into coefficients (same shape, head-major components).
pub fn forward(profile: &CodecProfile, at: TensorAt, values: &[f32], out: &mut Vec<f32>) {
    let rows = values.len() / profile.channels().max(1);
    let table = RopeTable::new(profile, at.first_position, rows);
    forward_with(profile, at, &table, values, out);
}

/// [`forward`] with a precomputed angle table covering the rows (else angles are computed).
pub fn forward_with(
    profile: &CodecProfile,
    at: TensorAt,
    table: &RopeTable,
    values: &[f32],
    out: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        unsafe { forward_avx2(profile, at, table, values, out) };
        return;
    }
    forward_body::<false>(profile, at, table, values, out);
}

/// [`forward_body`] compiled for AVX2 and FMA (8-wide, fused dot products).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(
    profile: &CodecProfile,
    at: TensorAt,
    table: &RopeTable,
    values: &[f32],
    out: &mut Vec<f32>,
) {
    forward_body::<true>(profile, at, table, values, out);
}

/// The angles of row `t`: from the table, or computed into `cos`/`sin` when it lacks them.
fn angles_of<'a>(
    profile: &CodecProfile,
    table: &'a RopeTable,
    first_position: u32,
    t: usize,
    cos: &'a mut Vec<f32>,
    sin: &'a mut Vec<f32>,
) -> (&'a [f32], &'a [f32]) {
    match table.row(first_position, t) {
        Some(a) => a,
        None => {
            profile.rope.angles(first_position + t as u32, cos, sin);
            (&cos[..], &sin[..])
        }
    }
}

/// Tokens per tile of the blocked projection: they share each load of the basis.
const TILE_ROWS: usize = 4;
/// Components per tile: `dot`'s eight partial sums, so each component keeps its rounding.
const TILE_COLS: usize = 8;

/// The projection: blocked ([`forward_blocked`]) for the usual head dimensions, else one
/// [`dot`] per component ([`forward_rows`]); both give the same coefficients.
#[inline(always)]
fn forward_body<const FMA: bool>(
    profile: &CodecProfile,
    at: TensorAt,
    table: &RopeTable,
    values: &[f32],
    out: &mut Vec<f32>,
) {
    match profile.head_dim {
        64 => forward_blocked::<FMA, 64>(profile, at, table, values, out),
        128 => forward_blocked::<FMA, 128>(profile, at, table, values, out),
        _ => forward_rows::<FMA>(profile, at, table, values, out),
    }
}

/// The projection for head dimension `D`, blocked: per head, the basis transposed once into
/// slabs of [`TILE_COLS`] components, then tiles of [`TILE_ROWS`] tokens x [`TILE_COLS`]
/// components whose sums are kept in eight partial sums added in order, exactly as [`dot`]
/// rounds them (so the coefficients equal [`forward_rows`]'s).
#[inline(always)]
fn forward_blocked<const FMA: bool, const D: usize>(
    profile: &CodecProfile,
    at: TensorAt,
    table: &RopeTable,
    values: &[f32],
    out: &mut Vec<f32>,
) {
    let channels = profile.channels();
    let tensor = profile.layers[at.layer].tensor(at.is_key);
    let rope = at.is_key && profile.rope.style != RopeStyle::None;
    out.clear();
    out.resize(values.len(), 0.0);
    let rows = values.len() / channels.max(1);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    let mut slabs = vec![[[0f32; TILE_COLS]; D]; D / TILE_COLS];
    let mut heads = [[0f32; D]; TILE_ROWS];
    for (h, basis) in tensor.heads.iter().enumerate() {
        transpose_into_slabs(&basis.basis, &mut slabs);
        for t0 in (0..rows).step_by(TILE_ROWS) {
            let n = TILE_ROWS.min(rows - t0);
            // A short last tile computes its first row again in the unused places.
            for (r, x) in heads.iter_mut().enumerate() {
                let t = t0 + if r < n { r } else { 0 };
                let angles = rope
                    .then(|| angles_of(profile, table, at.first_position, t, &mut cos, &mut sin));
                center(
                    profile,
                    &values[t * channels + h * D..][..D],
                    angles,
                    &basis.mean,
                    x,
                );
            }
            let dst = &mut out[t0 * channels + h * D..];
            for (kb, slab) in slabs.iter().enumerate() {
                let y = tile::<FMA, D>(&heads, slab);
                for (r, y) in y.iter().take(n).enumerate() {
                    dst[r * channels + kb * TILE_COLS..][..TILE_COLS].copy_from_slice(y);
                }
            }
        }
    }
}

/// `basis` (`D x D`, row k = component k) transposed into slabs of [`TILE_COLS`] components:
/// `slabs[kb][j][l]` is component `kb * 8 + l`'s weight of channel `j`.
#[inline(always)]
fn transpose_into_slabs<const D: usize>(basis: &[f32], slabs: &mut [[[f32; TILE_COLS]; D]]) {
    for (k, row) in basis.chunks_exact(D).enumerate() {
        for (s, &w) in slabs[k / TILE_COLS].iter_mut().zip(row) {
            s[k % TILE_COLS] = w;
        }
    }
}

/// One head of one token as the projection takes it: RoPE undone (when `angles`), mean
/// removed, with the roundings of [`forward_rows`].
#[inline(always)]
fn center(
    profile: &CodecProfile,
    src: &[f32],
    angles: Option<(&[f32], &[f32])>,
    mean: &[f32],
    x: &mut [f32],
) {
    x.copy_from_slice(src);
    if let Some((c, s)) = angles {
        profile.rope.unrotate(x, c, s);
    }
    for (x, m) in x.iter_mut().zip(mean) {
        *x -= m;
    }
}

/// [`TILE_COLS`] components of [`TILE_ROWS`] centered heads on one slab of the transposed
/// basis (`slab[j][l]`): for each, the eight partial sums of [`dot`] (channels `j = i (mod 8)`
/// in ascending order, fused where `FMA`), then their sum in order.
#[inline(always)]
fn tile<const FMA: bool, const D: usize>(
    heads: &[[f32; D]; TILE_ROWS],
    slab: &[[f32; TILE_COLS]; D],
) -> [[f32; TILE_COLS]; TILE_ROWS] {
    let mut sum = [[-0.0f32; TILE_COLS]; TILE_ROWS];
    for i in 0..TILE_COLS {
        let mut part = [[0f32; TILE_COLS]; TILE_ROWS];
        for m in 0..D / TILE_COLS {
            let j = m * TILE_COLS + i;
            let b = &slab[j];
            for (p, x) in part.iter_mut().zip(heads) {
                let x = x[j];
                for (p, &b) in p.iter_mut().zip(b) {
                    *p = if FMA { b.mul_add(x, *p) } else { *p + b * x };
                }
            }
        }
        for (s, p) in sum.iter_mut().zip(&part) {
            for (s, p) in s.iter_mut().zip(p) {
                *s += p;
            }
        }
    }
    sum
}

/// The projection one token and head at a time, one [`dot`] per component: the reference the
/// blocked [`forward_body`] matches, and its path for head dimensions not a multiple of 8.
#[inline(always)]
fn forward_rows<const FMA: bool>(
    profile: &CodecProfile,
    at: TensorAt,
    table: &RopeTable,
    values: &[f32],
    out: &mut Vec<f32>,
) {
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
        let angles =
            rope.then(|| angles_of(profile, table, at.first_position, t, &mut cos, &mut sin));
        for (h, basis) in tensor.heads.iter().enumerate() {
            head.copy_from_slice(&row[h * d..(h + 1) * d]);
            if let Some((c, s)) = angles {
                profile.rope.unrotate(&mut head, c, s);
            }
            for (x, m) in head.iter_mut().zip(&basis.mean) {
                *x -= m;
            }
            for (k, y) in dst[h * d..(h + 1) * d].iter_mut().enumerate() {
                *y = dot::<FMA>(&basis.basis[k * d..(k + 1) * d], &head);
            }
        }
    }
}

/// Coefficients back to values (the inverse of [`forward`]).
pub fn inverse(profile: &CodecProfile, at: TensorAt, coefficients: &[f32], out: &mut Vec<f32>) {
    let rows = coefficients.len() / profile.channels().max(1);
    let table = RopeTable::new(profile, at.first_position, rows);
    inverse_with(profile, at, &table, coefficients, out);
}

/// [`inverse`] with a precomputed angle table covering the rows (else angles are computed).
pub fn inverse_with(
    profile: &CodecProfile,
    at: TensorAt,
    table: &RopeTable,
    coefficients: &[f32],
    out: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above. Rust never fuses a multiply and an
        // add on its own, so the wider code computes exactly the same values.
        unsafe { inverse_avx2(profile, at, table, coefficients, out) };
        return;
    }
    inverse_body(profile, at, table, coefficients, out);
}

/// [`inverse_body`] compiled for AVX2 (8-wide; the same roundings).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn inverse_avx2(
    profile: &CodecProfile,
    at: TensorAt,
    table: &RopeTable,
    coefficients: &[f32],
    out: &mut Vec<f32>,
) {
    inverse_body(profile, at, table, coefficients, out);
}

#[inline(always)]
fn inverse_body(
    profile: &CodecProfile,
    at: TensorAt,
    table: &RopeTable,
    coefficients: &[f32],
    out: &mut Vec<f32>,
) {
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
        let angles =
            rope.then(|| angles_of(profile, table, at.first_position, t, &mut cos, &mut sin));
        for (h, basis) in tensor.heads.iter().enumerate() {
            let head = &mut dst[h * d..(h + 1) * d];
            head.copy_from_slice(&basis.mean);
            for (k, &y) in row[h * d..(h + 1) * d].iter().enumerate() {
                if y == 0.0 {
                    continue;
                }
                let b = &basis.basis[k * d..(k + 1) * d];
                for (x, w) in head.iter_mut().zip(b) {
                    *x += w * y;
                }
            }
            if let Some((c, s)) = angles {
                profile.rope.rotate(head, c, s);
            }
        }
    }
}

/// A dot product in eight independent sums (so it vectorizes), fused where `FMA` (encode-side
/// only, where the order and rounding need not match anything). Also checks a profile's bases.
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = if FMA {
                x[i].mul_add(y[i], acc[i])
            } else {
                acc[i] + x[i] * y[i]
            };
        }
    }
    acc.iter().sum::<f32>() + tail
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

/// A coefficient's quantization level at `step`: rounded to nearest (half to even), clamped to
/// `±MAX_LEVEL`; NaN gives 0. Branch-free, so slices of it vectorize ([`quantize_codes`]).
#[inline(always)]
pub fn quantize_level(y: f32, step: f32) -> i32 {
    // Adding 1.5 * 2^23 rounds |v| <= 2^22 half to even and leaves v + 2^22 in the low bits of
    // the sum, so the level is read from its bits: no library call on CPUs without SSE4.1's
    // round instruction, no float-to-int conversion. Encode-side only.
    const MAGIC: f32 = 12_582_912.0;
    const MAX: f32 = MAX_LEVEL as f32;
    let v = y / step;
    let v = if v.is_nan() { 0.0 } else { v.clamp(-MAX, MAX) };
    (v + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
}

/// [`quantize_level`] of every coefficient at `step`, zigzagged to the rANS section's 16-bit
/// codes (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...) and appended to `out`. Branch-free, 8 values
/// at a time where AVX2 is there: the same division, clamp and rounding, so the same codes.
pub fn quantize_codes(coefficients: &[f32], step: f32, out: &mut Vec<u16>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { quantize_codes_avx2(coefficients, step, out) };
        return;
    }
    quantize_codes_body(coefficients, step, out);
}

/// [`quantize_codes_body`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_codes_avx2(coefficients: &[f32], step: f32, out: &mut Vec<u16>) {
    quantize_codes_body(coefficients, step, out);
}

#[inline(always)]
fn quantize_codes_body(coefficients: &[f32], step: f32, out: &mut Vec<u16>) {
    out.extend(
        coefficients
            .iter()
            .map(|&y| crate::rans_variant::zigzag(quantize_level(y, step))),
    );
}

/// A level's coefficient: one f32 product, as the GPU computes it.
pub fn dequantize_level(q: i32, step: f32) -> f32 {
    q as f32 * step
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{HeadBasis, LayerProfile, Rope, TensorProfile};
    use crate::ModelFingerprint;

    /// A profile with random (not orthonormal) bases: the projection does not care.
    fn random_profile(kv_heads: usize, d: usize, rope: Rope, seed: u64) -> CodecProfile {
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut tensor = || TensorProfile {
            heads: (0..kv_heads)
                .map(|_| HeadBasis {
                    mean: (0..d).map(|_| next()).collect(),
                    std: vec![1.0; d],
                    basis: (0..d * d).map(|_| next()).collect(),
                })
                .collect(),
            sensitivity: 0.0,
            curve: Vec::new(),
        };
        let layers = vec![LayerProfile {
            key: tensor(),
            value: tensor(),
        }];
        CodecProfile {
            model: ModelFingerprint::of_bytes(b"t"),
            kv_heads,
            head_dim: d,
            sinks: 0,
            rope,
            layers,
        }
    }

    /// `dot` (eight partial sums and a tail) agrees with a plain sum at every length, the tail
    /// included.
    #[test]
    fn dot_matches_a_plain_dot_product_at_every_length() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
            assert!(
                (f64::from(dot::<false>(&a, &b)) - plain).abs() < 1e-5,
                "n = {n}"
            );
        }
    }

    /// The blocked projection (head dims 64 and 128) gives exactly the per-row dot products,
    /// fused or not, with and without RoPE, for row counts that leave a short last tile and
    /// with an angle table that covers only some rows; and the dispatched `forward` is one of
    /// the two.
    #[test]
    fn blocked_projection_equals_rows() {
        for (d, style, dims) in [
            (64, RopeStyle::Adjacent, 64),
            (64, RopeStyle::Halves, 48),
            (128, RopeStyle::Halves, 128),
            (128, RopeStyle::None, 0),
            (24, RopeStyle::Adjacent, 24),
        ] {
            let rope = Rope {
                style,
                dims,
                base: 10000.0,
                freq_scale: 1.0,
            };
            let p = random_profile(3, d, rope, d as u64 + u64::from(dims));
            let mut v = 0x9e37_79b9_u32;
            for rows in [1, 6, 9] {
                let values: Vec<f32> = (0..rows * p.channels())
                    .map(|_| {
                        v = v.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        (v >> 8) as f32 / (1 << 20) as f32 - 8.0
                    })
                    .collect();
                for is_key in [true, false] {
                    let at = TensorAt {
                        layer: 0,
                        is_key,
                        first_position: 100,
                    };
                    let table = RopeTable::new(&p, 102, 3);
                    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
                    forward_body::<true>(&p, at, &table, &values, &mut a);
                    forward_rows::<true>(&p, at, &table, &values, &mut b);
                    assert_eq!(a, b, "fused, d {d}, {rows} rows, key {is_key}");
                    forward_body::<false>(&p, at, &table, &values, &mut a);
                    forward_rows::<false>(&p, at, &table, &values, &mut c);
                    assert_eq!(a, c, "unfused, d {d}, {rows} rows, key {is_key}");
                    forward_with(&p, at, &table, &values, &mut a);
                    assert!(a == b || a == c, "dispatched, d {d}");
                }
            }
        }
    }
}
