//! Choosing each layer's K and V steps for a fidelity target, from a profile's measurements.
//!
//! The model: the engine-level mean KL is the sum over tensors of `sensitivity x MSE(step)`
//! (additive for small errors), and a tensor costs its measured bits per value at that step.
//! Minimizing bits subject to the predicted KL is a Lagrangian problem solved per tensor over the
//! rate curve's steps, with a bisection on the multiplier.

use crate::profile::{RatePoint, TensorProfile};
use crate::{CodecProfile, FormatError};

/// The steps chosen for a target and what the profile predicts for them.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    /// Per layer, the K and V steps.
    pub steps: Vec<(f32, f32)>,
    /// Predicted mean KL (nats).
    pub predicted_kl: f64,
    /// Predicted bits per value, averaged over every K and V value.
    pub bits_per_value: f64,
}

/// The default fidelity target: mean KL of the next-token distribution, nats, as a profile
/// predicts it on its calibration text. Text the profile has not seen reacts more (measured
/// 1.2-2x on SmolLM2, docs/BENCHMARKS.md), so the default is half of the KL 0.01 it is meant to
/// keep: on SmolLM2 it measured 7.1e-3 to 9.9e-3 at 5.4-5.5x smaller than fp16.
pub const DEFAULT_TARGET_KL: f64 = 0.005;

/// The fewest predicted bits whose predicted mean KL is at most `target_kl`; the finest steps
/// of every curve when even they do not reach it.
pub fn allocate_steps(profile: &CodecProfile, target_kl: f64) -> Result<Allocation, FormatError> {
    if !(target_kl.is_finite() && target_kl > 0.0) {
        return Err(FormatError::InvalidInput(format!(
            "target KL {target_kl} must be positive"
        )));
    }
    let tensors: Vec<&TensorProfile> = profile
        .layers
        .iter()
        .flat_map(|l| [&l.key, &l.value])
        .collect();
    if let Some(i) = tensors
        .iter()
        .position(|t| t.curve.is_empty() || t.sensitivity <= 0.0)
    {
        return Err(FormatError::BadProfile(format!(
            "layer {} {} has no rate curve or sensitivity: calibrate the profile through the \
             engine (kvfetcher-bench profile)",
            i / 2,
            if i % 2 == 0 { "K" } else { "V" }
        )));
    }
    let choose = |lambda: f64| -> Vec<&RatePoint> {
        tensors
            .iter()
            .map(|t| {
                let s = f64::from(t.sensitivity);
                t.curve
                    .iter()
                    .min_by(|a, b| {
                        let ca = f64::from(a.bits) + lambda * s * f64::from(a.mse);
                        let cb = f64::from(b.bits) + lambda * s * f64::from(b.mse);
                        ca.total_cmp(&cb)
                    })
                    .expect("nonempty curve")
            })
            .collect()
    };
    let kl = |pts: &[&RatePoint]| -> f64 {
        pts.iter()
            .zip(&tensors)
            .map(|(p, t)| f64::from(t.sensitivity) * f64::from(p.mse))
            .sum()
    };
    // KL falls as lambda grows; find the smallest lambda that meets the target.
    let (mut lo, mut hi) = (-30.0f64, 60.0f64);
    if kl(&choose(hi.exp2())) > target_kl {
        lo = hi;
    } else {
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if kl(&choose(mid.exp2())) <= target_kl {
                hi = mid;
            } else {
                lo = mid;
            }
        }
    }
    let pts = choose(hi.max(lo).exp2());
    let steps = pts
        .chunks_exact(2)
        .map(|p| (p[0].step, p[1].step))
        .collect();
    let bits = pts.iter().map(|p| f64::from(p.bits)).sum::<f64>() / pts.len() as f64;
    Ok(Allocation {
        steps,
        predicted_kl: kl(&pts),
        bits_per_value: bits,
    })
}

/// Every tensor at `relative` times its coefficients' RMS deviation: equal relative precision,
/// no allocation (for comparisons, and where a profile has no sensitivities).
pub fn uniform_steps(profile: &CodecProfile, relative: f32) -> Vec<(f32, f32)> {
    (0..profile.num_layers())
        .map(|l| {
            let step = |k: bool| {
                let std = profile.component_std(l, k);
                let rms = (std.iter().map(|s| s * s).sum::<f32>() / std.len() as f32).sqrt();
                (relative * rms).max(f32::MIN_POSITIVE)
            };
            (step(true), step(false))
        })
        .collect()
}
