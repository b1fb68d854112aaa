//! Asymmetric uniform quantization of one K or V tensor of a chunk, and its exact inverse.
//!
//! Values are `[tokens][channels]` f32. A *group* (one channel over the chunk's tokens, or one
//! token over its channels) gets `min` and `scale = (max - min) / (2^bits - 1)`; codes are
//! `round((x - min) / scale)`. Dequantization is `(code as f32).mul_add(scale, min)`, rounded to
//! the tensor's dtype afterwards: the GPU restore kernel computes the same `fmaf`, so CPU and GPU
//! restores agree to the bit. Not here: bit-exact mode (byte planes, see `chunk`).

use std::sync::Arc;

use crate::{CodecProfile, FormatError};

/// The smallest bit width the quantizer accepts.
pub const MIN_BITS: u8 = 2;
/// The largest bit width: 12 bits is the deepest HEVC profile NVDEC decodes.
pub const MAX_BITS: u8 = 12;

/// Which values share one `(min, scale)` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Grouping {
    /// One pair per channel, over the chunk's tokens (K has per-channel outliers).
    #[default]
    PerChannel,
    /// One pair per token, over its channels.
    PerToken,
}

impl Grouping {
    /// The on-disk code.
    pub fn code(self) -> u8 {
        match self {
            Grouping::PerChannel => 0,
            Grouping::PerToken => 1,
        }
    }

    /// Inverse of [`Grouping::code`].
    pub fn from_code(code: u8) -> Option<Grouping> {
        match code {
            0 => Some(Grouping::PerChannel),
            1 => Some(Grouping::PerToken),
            _ => None,
        }
    }

    /// Number of groups of a `tokens x channels` tensor.
    pub fn groups(self, tokens: usize, channels: usize) -> usize {
        match self {
            Grouping::PerChannel => channels,
            Grouping::PerToken => tokens,
        }
    }

    /// The group of value `(token, channel)`.
    fn group_of(self, token: usize, channel: usize) -> usize {
        match self {
            Grouping::PerChannel => channel,
            Grouping::PerToken => token,
        }
    }
}

/// How a chunk's values become codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantConfig {
    /// Bit-exact: codes are the byte planes of the raw values; decoding gives the original bytes.
    Exact,
    /// Lossy asymmetric uniform quantization.
    Bits {
        /// Bits for layers not in `per_layer`, `2..=12`.
        default_bits: u8,
        /// `(layer, bits)` overrides, `2..=12` each.
        per_layer: Vec<(usize, u8)>,
        /// Grouping of K.
        key_grouping: Grouping,
        /// Grouping of V.
        value_grouping: Grouping,
    },
    /// Transform coding with a codec profile (the `rans` variant, format version 2).
    Transform(Arc<TransformConfig>),
}

/// A transform-coded chunk's profile and allocation.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformConfig {
    /// The profile (transform, sinks, RoPE).
    pub profile: Arc<CodecProfile>,
    /// Per layer, the K and V steps (see [`crate::allocate_steps`]).
    pub steps: Vec<(f32, f32)>,
}

// Steps are checked finite and positive before use, so equality is an equivalence.
impl Eq for TransformConfig {}

impl Default for QuantConfig {
    /// 8 bits everywhere, K and V per channel.
    fn default() -> Self {
        QuantConfig::Bits {
            default_bits: 8,
            per_layer: Vec::new(),
            key_grouping: Grouping::PerChannel,
            value_grouping: Grouping::PerChannel,
        }
    }
}

impl QuantConfig {
    /// `bits` bits for every layer, K and V per channel.
    pub fn bits(bits: u8) -> QuantConfig {
        QuantConfig::Bits {
            default_bits: bits,
            per_layer: Vec::new(),
            key_grouping: Grouping::PerChannel,
            value_grouping: Grouping::PerChannel,
        }
    }

    /// The code width of `layer` (8 in exact mode: one byte plane per code).
    pub fn bits_for(&self, layer: usize) -> u8 {
        match self {
            QuantConfig::Exact => 8,
            QuantConfig::Transform(_) => crate::TRANSFORM_CODE_BITS,
            QuantConfig::Bits {
                default_bits,
                per_layer,
                ..
            } => per_layer
                .iter()
                .rev()
                .find(|(l, _)| *l == layer)
                .map_or(*default_bits, |(_, b)| *b),
        }
    }

    /// Checks bit widths and that overrides name existing layers.
    pub fn validate(&self, num_layers: usize) -> Result<(), FormatError> {
        if let QuantConfig::Transform(t) = self {
            if t.steps.len() != num_layers
                || t.steps
                    .iter()
                    .any(|&(k, v)| !(k.is_finite() && k > 0.0 && v.is_finite() && v > 0.0))
            {
                return Err(FormatError::InvalidInput(format!(
                    "{} positive (K, V) steps are needed, one per layer",
                    num_layers
                )));
            }
            return Ok(());
        }
        let QuantConfig::Bits {
            default_bits,
            per_layer,
            ..
        } = self
        else {
            return Ok(());
        };
        let check = |b: u8| {
            if (MIN_BITS..=MAX_BITS).contains(&b) {
                Ok(())
            } else {
                Err(FormatError::InvalidInput(format!(
                    "{b} bits is outside {MIN_BITS}..={MAX_BITS}"
                )))
            }
        };
        check(*default_bits)?;
        for &(layer, b) in per_layer {
            check(b)?;
            if layer >= num_layers {
                return Err(FormatError::InvalidInput(format!(
                    "bits set for layer {layer}, the cache has {num_layers} layers"
                )));
            }
        }
        Ok(())
    }
}

/// The `(min, scale)` pairs of one tensor's groups.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GroupParams {
    /// Minimum per group.
    pub min: Vec<f32>,
    /// Step per group (`0` for a constant group).
    pub scale: Vec<f32>,
}

impl GroupParams {
    /// Number of groups.
    pub fn len(&self) -> usize {
        self.min.len()
    }

    /// Whether there are no groups.
    pub fn is_empty(&self) -> bool {
        self.min.is_empty()
    }
}

/// Quantization parameters of one layer in a chunk.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerQuant {
    /// K's groups.
    pub key: GroupParams,
    /// V's groups.
    pub value: GroupParams,
}

/// Quantizes `values` (`tokens x channels`, row-major) to `bits`-bit codes, appending them to
/// `codes`. Non-finite values, or a range too wide for f32, are an error.
pub fn quantize(
    values: &[f32],
    tokens: usize,
    channels: usize,
    bits: u8,
    grouping: Grouping,
    codes: &mut Vec<u16>,
) -> Result<GroupParams, FormatError> {
    if !(MIN_BITS..=MAX_BITS).contains(&bits) {
        return Err(FormatError::InvalidInput(format!(
            "{bits} bits is outside {MIN_BITS}..={MAX_BITS}"
        )));
    }
    if values.len() != tokens * channels {
        return Err(FormatError::InvalidInput(format!(
            "{} values for {tokens} tokens x {channels} channels",
            values.len()
        )));
    }
    let groups = grouping.groups(tokens, channels);
    let mut lo = vec![f32::INFINITY; groups];
    let mut hi = vec![f32::NEG_INFINITY; groups];
    for (t, row) in values.chunks_exact(channels.max(1)).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            if !x.is_finite() {
                return Err(FormatError::InvalidInput(format!(
                    "non-finite value {x} at token {t}"
                )));
            }
            let g = grouping.group_of(t, c);
            lo[g] = lo[g].min(x);
            hi[g] = hi[g].max(x);
        }
    }
    let levels = ((1u32 << bits) - 1) as f32;
    let mut scale = Vec::with_capacity(groups);
    for (l, h) in lo.iter_mut().zip(&mut hi) {
        if *l > *h {
            // An empty group (no tokens): any parameters dequantize nothing.
            (*l, *h) = (0.0, 0.0);
        }
        let s = (*h - *l) / levels;
        if !s.is_finite() {
            return Err(FormatError::InvalidInput(format!(
                "value range {l}..{h} is too wide to quantize"
            )));
        }
        scale.push(s);
    }
    let inv: Vec<f32> = scale
        .iter()
        .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
        .collect();
    codes.reserve(values.len());
    for (t, row) in values.chunks_exact(channels.max(1)).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            let g = grouping.group_of(t, c);
            let q = ((x - lo[g]) * inv[g]).round().clamp(0.0, levels);
            codes.push(q as u16);
        }
    }
    Ok(GroupParams { min: lo, scale })
}

/// Dequantizes codes (`tokens x channels`) to f32 as `(code as f32).mul_add(scale, min)`,
/// replacing `out`'s contents. The caller guarantees `params` has the grouping's group count.
pub fn dequantize(
    codes: &[u16],
    tokens: usize,
    channels: usize,
    grouping: Grouping,
    params: &GroupParams,
    out: &mut Vec<f32>,
) -> Result<(), FormatError> {
    let groups = grouping.groups(tokens, channels);
    if codes.len() != tokens * channels
        || params.min.len() != groups
        || params.scale.len() != groups
    {
        return Err(FormatError::Inconsistent(format!(
            "{} codes and {} groups for {tokens} tokens x {channels} channels",
            codes.len(),
            params.min.len()
        )));
    }
    out.clear();
    out.reserve(codes.len());
    for (t, row) in codes.chunks_exact(channels.max(1)).enumerate() {
        out.extend(row.iter().enumerate().map(|(c, &q)| {
            let g = grouping.group_of(t, c);
            (q as f32).mul_add(params.scale[g], params.min[g])
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizes_within_half_a_step_and_hits_the_ends() {
        let vals: Vec<f32> = (0..64)
            .map(|i| ((i * 37) % 101) as f32 * 0.173 - 4.0)
            .collect();
        for grouping in [Grouping::PerChannel, Grouping::PerToken] {
            for bits in [2u8, 4, 8, 12] {
                let mut codes = Vec::new();
                let p = quantize(&vals, 8, 8, bits, grouping, &mut codes).unwrap();
                assert!(codes.iter().all(|&c| u32::from(c) < (1 << bits)));
                let mut back = Vec::new();
                dequantize(&codes, 8, 8, grouping, &p, &mut back).unwrap();
                for (i, (a, b)) in vals.iter().zip(&back).enumerate() {
                    let g = grouping.group_of(i / 8, i % 8);
                    assert!(
                        (a - b).abs() <= p.scale[g] * 0.5 + 1e-5,
                        "{a} vs {b} at {bits} bits"
                    );
                }
            }
        }
    }

    #[test]
    fn constant_groups_give_no_nan() {
        let vals = vec![1.5f32; 12];
        let mut codes = Vec::new();
        let p = quantize(&vals, 3, 4, 4, Grouping::PerChannel, &mut codes).unwrap();
        assert!(p.scale.iter().all(|&s| s == 0.0));
        let mut back = Vec::new();
        dequantize(&codes, 3, 4, Grouping::PerChannel, &p, &mut back).unwrap();
        assert_eq!(back, vals);
    }

    #[test]
    fn rejects_non_finite_and_bad_bits() {
        let mut codes = Vec::new();
        assert!(quantize(&[f32::NAN, 1.0], 1, 2, 8, Grouping::PerChannel, &mut codes).is_err());
        assert!(quantize(
            &[f32::MAX, f32::MIN],
            2,
            1,
            8,
            Grouping::PerChannel,
            &mut codes
        )
        .is_err());
        assert!(quantize(&[1.0], 1, 1, 13, Grouping::PerChannel, &mut codes).is_err());
        assert!(QuantConfig::bits(1).validate(4).is_err());
        let per_layer = QuantConfig::Bits {
            default_bits: 8,
            per_layer: vec![(4, 6)],
            key_grouping: Grouping::PerChannel,
            value_grouping: Grouping::PerToken,
        };
        assert!(per_layer.validate(4).is_err());
        assert!(per_layer.validate(5).is_ok());
        assert_eq!((per_layer.bits_for(4), per_layer.bits_for(0)), (6, 8));
    }
}
