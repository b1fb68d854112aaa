//! Fidelity of a decoded KV cache: does the model still predict the same next tokens when its
//! attention reads the decoded K/V instead of the original?
//!
//! Definition. For every position `p` in `0..tokens`, the model runs token `token_ids[p]` at
//! position `p`; at every layer, attention reads K and V rows `0..=p` from the given cache (the
//! position's own K/V included) instead of recomputing them. This is done once with `original`
//! and once with `decoded`, giving logits `z_o(p)` and `z_d(p)` and distributions
//! `P = softmax(z)`. Then:
//!
//! - `top1_agreement` = fraction of positions where `argmax z_o(p) == argmax z_d(p)`;
//! - `mean_kl` = mean over positions of `KL(P_o(p) || P_d(p)) = sum_i P_o,i (ln P_o,i - ln P_d,i)`
//!   in nats, computed in `f64` from log-softmax;
//! - `max_kl` = the largest of those per-position KLs;
//! - `max_logit_diff` = `max_p max_i |z_o,i(p) - z_d,i(p)|`.
//!
//! A position whose logits are not all finite (a cache holding NaN or infinity) counts as a
//! disagreement with infinite KL and logit difference, so `mean_kl`, `max_kl` and
//! `max_logit_diff` become infinite (JSON `null`).
//!
//! Both caches are read as `f32` whatever their dtype. Not a perplexity measure: no reference
//! text beyond `token_ids` is involved.

use crate::model::forward::{KvAccess, KvRows};
use crate::model::sampler::argmax;
use crate::{KvCache, Llama2Model, ModelError};

/// How closely a decoded KV cache reproduces the original's next-token predictions.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Fidelity {
    /// Positions compared (all of them: `tokens`).
    pub positions: usize,
    /// Fraction of positions whose most likely next token agrees, in `[0, 1]`.
    pub top1_agreement: f64,
    /// Mean `KL(P_original || P_decoded)` per position, in nats.
    pub mean_kl: f64,
    /// Largest per-position KL, in nats.
    pub max_kl: f64,
    /// Largest absolute difference of any logit at any position.
    pub max_logit_diff: f32,
}

/// Compares next-token predictions with `original` and `decoded` K/V at every position; see the
/// module documentation for the exact definitions.
pub fn fidelity(
    model: &Llama2Model,
    token_ids: &[u32],
    original: &KvCache,
    decoded: &KvCache,
) -> Result<Fidelity, ModelError> {
    let orig = rows_for(model, "original", original)?;
    let dec = rows_for(model, "decoded", decoded)?;
    if original.tokens() != decoded.tokens() {
        return Err(ModelError::CacheMismatch(format!(
            "original has {} tokens, decoded {}",
            original.tokens(),
            decoded.tokens()
        )));
    }
    if token_ids.len() != original.tokens() {
        return Err(ModelError::CacheMismatch(format!(
            "{} token ids for {} cached tokens",
            token_ids.len(),
            original.tokens()
        )));
    }
    model.check_tokens(token_ids.len())?;
    model.check_ids(token_ids)?;

    let mut forward = model.forward();
    let (mut agree, mut kl_sum, mut max_kl, mut max_diff) = (0usize, 0.0f64, 0.0f64, 0.0f32);
    for (pos, &id) in token_ids.iter().enumerate() {
        let zo = forward
            .step(id as usize, pos, KvAccess::Replay(&orig))
            .to_vec();
        let zd = forward.step(id as usize, pos, KvAccess::Replay(&dec));
        if zo.iter().chain(zd).any(|v| !v.is_finite()) {
            // A cache with NaN or infinite values predicts nothing: count the worst case
            // rather than let NaN comparisons hide it.
            kl_sum = f64::INFINITY;
            max_kl = f64::INFINITY;
            max_diff = f32::INFINITY;
            continue;
        }
        agree += usize::from(argmax(&zo) == argmax(zd));
        let kl = kl_divergence(&zo, zd);
        kl_sum += kl;
        max_kl = max_kl.max(kl);
        for (a, b) in zo.iter().zip(zd) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    let n = token_ids.len() as f64;
    Ok(Fidelity {
        positions: token_ids.len(),
        top1_agreement: agree as f64 / n,
        mean_kl: kl_sum / n,
        max_kl,
        max_logit_diff: max_diff,
    })
}

/// Checks a cache's shape against the model and unpacks it to `f32` rows.
fn rows_for(model: &Llama2Model, name: &str, cache: &KvCache) -> Result<Vec<KvRows>, ModelError> {
    let cfg = model.config();
    let got = (cache.num_layers(), cache.kv_heads(), cache.head_dim());
    let want = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim());
    if got != want {
        return Err(ModelError::CacheMismatch(format!(
            "{name} has (layers, kv_heads, head_dim) {got:?}, the model needs {want:?}"
        )));
    }
    Ok(cache
        .layers()
        .iter()
        .map(|l| KvRows {
            key: l.key.to_f32(),
            value: l.value.to_f32(),
        })
        .collect())
}

/// `KL(softmax(p) || softmax(q))` in nats, from logits, in `f64`.
fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    let lp = log_softmax(p);
    let lq = log_softmax(q);
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

/// `log(softmax(z))` in `f64`.
pub(crate) fn log_softmax(z: &[f32]) -> Vec<f64> {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    z.iter().map(|&v| v as f64 - lse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaying_the_recorded_cache_reproduces_generation_logits() {
        let path = kvfetcher_testkit::data_file("stories260K.bin");
        let model = Llama2Model::load(&path).unwrap();
        let g = model.generate(24, 5, 1.0).unwrap();
        let rows = rows_for(&model, "original", &g.cache).unwrap();
        let mut forward = model.forward();
        for pos in [0, 7, 23] {
            let replayed = forward
                .step(g.token_ids[pos] as usize, pos, KvAccess::Replay(&rows))
                .to_vec();
            let prefill = model.next_token_logits(&g.token_ids[..=pos]).unwrap();
            assert_eq!(replayed, prefill, "position {pos}");
        }
    }

    #[test]
    fn kl_of_known_distributions() {
        assert_eq!(kl_divergence(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 0.0);
        // P = (1/2, 1/2), Q = (1/(1+e), e/(1+e)): KL = ln(1+e) - ln 2 - 1/2.
        let e = std::f64::consts::E;
        let want = (1.0 + e).ln() - 2f64.ln() - 0.5;
        assert!((kl_divergence(&[0.0, 0.0], &[0.0, 1.0]) - want).abs() < 1e-7);
    }
}
