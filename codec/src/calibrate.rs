//! Fitting a [`CodecProfile`] to a model's own KV: per layer and head, the mean and a PCA basis of
//! K (RoPE undone first) and of V over calibration sequences, sinks excluded. KL sensitivities
//! are not measured here (that needs the model); the tools set them through the engine.

use kvfetcher_kv::KvCache;
use rayon::prelude::*;

use crate::profile::{HeadBasis, LayerProfile, RatePoint, Rope, TensorProfile};
use crate::rans::entropy_bits;
use crate::transform::{context, dequantize_level, forward, quantize_level, TensorAt, CONTEXTS};
use crate::{CodecProfile, FormatError, ModelFingerprint};

/// Points of each tensor's rate curve: steps from 4 deviations down by quarter octaves.
pub const CURVE_POINTS: usize = 49;

/// Which basis a profile's heads get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BasisKind {
    /// Principal components of the calibration KV, by decreasing variance.
    #[default]
    Pca,
    /// Channels as they are (mean removed): the entropy coder without a transform.
    Identity,
}

/// What [`calibrate`] fits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// The model's RoPE, undone on K before the statistics ([`Rope::NONE`]: K as cached).
    pub rope: Rope,
    /// Leading tokens kept exact (and left out of the statistics).
    pub sinks: u16,
    /// PCA or identity.
    pub basis: BasisKind,
}

/// Fits a profile to `samples`, each a sequence's KV from position 0.
pub fn calibrate(
    model: ModelFingerprint,
    samples: &[KvCache],
    cfg: &Calibration,
) -> Result<CodecProfile, FormatError> {
    let invalid = |m: String| FormatError::InvalidInput(m);
    let first = samples
        .first()
        .ok_or_else(|| invalid("calibration needs at least one KV sample".into()))?;
    let (layers, heads, d) = (first.num_layers(), first.kv_heads(), first.head_dim());
    if samples
        .iter()
        .any(|s| (s.num_layers(), s.kv_heads(), s.head_dim()) != (layers, heads, d))
    {
        return Err(invalid("calibration samples differ in shape".into()));
    }
    if d > crate::profile::MAX_PROFILE_HEAD_DIM || usize::from(cfg.rope.dims) > d {
        return Err(invalid(format!(
            "head dim {d} (RoPE dims {}) is outside what a profile holds",
            cfg.rope.dims
        )));
    }
    let sinks = usize::from(cfg.sinks);
    let counted: usize = samples
        .iter()
        .map(|s| s.tokens().saturating_sub(sinks))
        .sum();
    if counted < 2 * d {
        return Err(invalid(format!(
            "{counted} calibration tokens after {sinks} sinks; need at least {}",
            2 * d
        )));
    }
    let layers_out = (0..layers)
        .into_par_iter()
        .map(|l| {
            let fit = |is_key: bool| {
                let mut stats = vec![Moments::new(d); heads];
                let (mut cos, mut sin, mut row) = (Vec::new(), Vec::new(), vec![0f32; d]);
                for s in samples {
                    let layer = &s.layers()[l];
                    let values = if is_key {
                        layer.key.to_f32()
                    } else {
                        layer.value.to_f32()
                    };
                    for (t, token) in values.chunks_exact(heads * d).enumerate().skip(sinks) {
                        if is_key {
                            cfg.rope.angles(t as u32, &mut cos, &mut sin);
                        }
                        for (h, st) in stats.iter_mut().enumerate() {
                            row.copy_from_slice(&token[h * d..(h + 1) * d]);
                            if is_key {
                                cfg.rope.unrotate(&mut row, &cos, &sin);
                            }
                            st.add(&row);
                        }
                    }
                }
                TensorProfile {
                    heads: stats.iter().map(|m| m.basis(cfg.basis)).collect(),
                    sensitivity: 0.0,
                    curve: Vec::new(),
                }
            };
            LayerProfile {
                key: fit(true),
                value: fit(false),
            }
        })
        .collect();
    let mut profile = CodecProfile {
        model,
        kv_heads: heads,
        head_dim: d,
        sinks: cfg.sinks,
        rope: cfg.rope,
        layers: layers_out,
    };
    let curves: Vec<[Vec<RatePoint>; 2]> = (0..layers)
        .into_par_iter()
        .map(|l| [true, false].map(|k| rate_curve(&profile, samples, l, k)))
        .collect();
    for (layer, [k, v]) in profile.layers.iter_mut().zip(curves) {
        layer.key.curve = k;
        layer.value.curve = v;
    }
    Ok(profile)
}

/// Rate (context-modelled entropy, escapes at 16 raw bits) and error of one tensor's
/// coefficients over the calibration tokens, at [`CURVE_POINTS`] steps.
fn rate_curve(
    profile: &CodecProfile,
    samples: &[KvCache],
    layer: usize,
    is_key: bool,
) -> Vec<RatePoint> {
    let sinks = usize::from(profile.sinks);
    let channels = profile.channels();
    let (mut coeffs, mut tmp) = (Vec::new(), Vec::new());
    for s in samples {
        let t = &s.layers()[layer];
        let values = if is_key {
            t.key.to_f32()
        } else {
            t.value.to_f32()
        };
        let at = TensorAt {
            layer,
            is_key,
            first_position: 0,
        };
        forward(profile, at, &values, &mut tmp);
        coeffs.extend_from_slice(&tmp[sinks.min(s.tokens()) * channels..]);
    }
    let std = profile.component_std(layer, is_key);
    let rms = (std.iter().map(|s| f64::from(s * s)).sum::<f64>() / std.len() as f64).sqrt();
    let rms = if rms > 0.0 { rms } else { 1.0 };
    let n = coeffs.len().max(1) as f64;
    let mut levels = Vec::with_capacity(coeffs.len());
    (0..CURVE_POINTS)
        .map(|j| {
            let step = (rms * 2f64.powf(2.0 - j as f64 / 4.0)) as f32;
            let ctx: Vec<u8> = std.iter().map(|&s| context(s, step)).collect();
            let mut sq = 0f64;
            levels.clear();
            levels.extend(coeffs.iter().map(|&y| {
                let q = quantize_level(y, step);
                let e = f64::from(y) - f64::from(dequantize_level(q, step));
                sq += e * e;
                q
            }));
            // The coder's own cost model: per-context entropy, 16 raw bits per escape.
            let bits = entropy_bits(&levels, &ctx, CONTEXTS)
                .expect("levels are clamped to the coder's range and contexts are below CONTEXTS");
            RatePoint {
                step,
                bits: (bits / n) as f32,
                mse: (sq / n) as f32,
            }
        })
        .collect()
}

/// Running first and second moments of one head's vectors, in f64.
#[derive(Clone)]
struct Moments {
    n: f64,
    sum: Vec<f64>,
    outer: Vec<f64>,
}

impl Moments {
    fn new(d: usize) -> Moments {
        Moments {
            n: 0.0,
            sum: vec![0.0; d],
            outer: vec![0.0; d * d],
        }
    }

    fn add(&mut self, x: &[f32]) {
        let d = x.len();
        self.n += 1.0;
        for (i, &xi) in x.iter().enumerate() {
            let xi = f64::from(xi);
            self.sum[i] += xi;
            let row = &mut self.outer[i * d..(i + 1) * d];
            for (o, &xj) in row.iter_mut().zip(x) {
                *o += xi * f64::from(xj);
            }
        }
    }

    /// Mean, and the covariance's eigenvectors (or the identity) with their deviations.
    fn basis(&self, kind: BasisKind) -> HeadBasis {
        let d = self.sum.len();
        let mean: Vec<f64> = self.sum.iter().map(|s| s / self.n).collect();
        let mut cov = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                cov[i * d + j] = self.outer[i * d + j] / self.n - mean[i] * mean[j];
            }
        }
        let mean32 = mean.iter().map(|&m| m as f32).collect();
        match kind {
            BasisKind::Identity => {
                let std = (0..d)
                    .map(|i| cov[i * d + i].max(0.0).sqrt() as f32)
                    .collect();
                HeadBasis::identity(mean32, std)
            }
            BasisKind::Pca => {
                let (values, vectors) = symmetric_eigen(cov, d);
                let mut order: Vec<usize> = (0..d).collect();
                order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
                let mut basis = Vec::with_capacity(d * d);
                for &k in &order {
                    basis.extend((0..d).map(|j| vectors[j * d + k] as f32));
                }
                let std = order
                    .iter()
                    .map(|&k| values[k].max(0.0).sqrt() as f32)
                    .collect();
                HeadBasis {
                    mean: mean32,
                    std,
                    basis,
                }
            }
        }
    }
}

/// Eigenvalues and eigenvectors (columns of the returned row-major matrix) of a symmetric
/// `d x d` matrix, by cyclic Jacobi rotations: simple and accurate for the small heads of KV.
fn symmetric_eigen(mut a: Vec<f64>, d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..64 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j] * a[i * d + j])
            .sum::<f64>()
            .sqrt();
        if off <= 1e-14 * norm.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() <= f64::MIN_POSITIVE {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_diagonalizes_a_known_matrix() {
        // [[2,1],[1,2]] has eigenvalues 1 and 3 with vectors (1,-1)/sqrt2 and (1,1)/sqrt2.
        let (vals, vecs) = symmetric_eigen(vec![2.0, 1.0, 1.0, 2.0], 2);
        let mut sorted = vals.clone();
        sorted.sort_by(f64::total_cmp);
        assert!((sorted[0] - 1.0).abs() < 1e-12 && (sorted[1] - 3.0).abs() < 1e-12);
        let k = if vals[0] > vals[1] { 0 } else { 1 };
        assert!((vecs[k].abs() - 0.5f64.sqrt()).abs() < 1e-12);
        assert!(
            (vecs[2 + k] - vecs[k]).abs() < 1e-12,
            "largest vector is (1,1)/sqrt2"
        );
    }

    #[test]
    fn jacobi_reconstructs_a_random_covariance() {
        let d = 16;
        let mut x = 0x1234_5678u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let b: Vec<f64> = (0..d * d).map(|_| rnd()).collect();
        let mut a = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                a[i * d + j] = (0..d).map(|k| b[i * d + k] * b[j * d + k]).sum();
            }
        }
        let (vals, v) = symmetric_eigen(a.clone(), d);
        for i in 0..d {
            for j in 0..d {
                let r: f64 = (0..d).map(|k| v[i * d + k] * vals[k] * v[j * d + k]).sum();
                assert!(
                    (r - a[i * d + j]).abs() < 1e-9,
                    "({i},{j}) {r} vs {}",
                    a[i * d + j]
                );
            }
        }
    }
}
