//! Fidelity measured through an engine: statistics over scored positions, from the logits two
//! runs of a real engine produced (one over the exact KV of a prefix, one over the decoded KV).
//!
//! For every scored position `p` the engine gives logits `z_r(p)` (reference) and `z_d(p)`
//! (decoded), and optionally the token that really followed. Reported:
//!
//! - `top1_agreement`: fraction of positions with `argmax z_r == argmax z_d`;
//! - `mean_kl`, `p99_kl`, `max_kl`: of `KL(softmax z_r || softmax z_d)` per position, in nats
//!   (`p99_kl` is the nearest-rank 99th percentile);
//! - `ppl_ref`, `ppl`: `exp` of the mean negative log-likelihood of the real next tokens under
//!   each run (positions without a known next token do not count).
//!
//! A position whose logits are not all finite counts as a disagreement with infinite KL, as in
//! [`crate::fidelity`]. Pure arithmetic: no model, no I/O.

use serde::Serialize;

use crate::fidelity::log_softmax;
use crate::model::sampler::argmax;

/// Collects positions one at a time; [`ScoreAccumulator::finish`] gives the statistics.
#[derive(Debug, Default, Clone)]
pub struct ScoreAccumulator {
    kls: Vec<f64>,
    agree: usize,
    nll_ref: f64,
    nll_dec: f64,
    targets: usize,
}

/// Statistics over every position added to a [`ScoreAccumulator`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScoredFidelity {
    /// Positions compared.
    pub positions: usize,
    /// Fraction of positions whose most likely next token agrees, in `[0, 1]`.
    pub top1_agreement: f64,
    /// Mean per-position KL(reference || decoded), nats.
    pub mean_kl: f64,
    /// 99th percentile (nearest rank) of the per-position KL, nats.
    pub p99_kl: f64,
    /// Largest per-position KL, nats.
    pub max_kl: f64,
    /// Perplexity of the real next tokens under the reference run.
    pub ppl_ref: f64,
    /// Perplexity of the real next tokens under the decoded run.
    pub ppl: f64,
}

impl ScoreAccumulator {
    /// Adds one position: both runs' logits (same length) and the token that followed, if known.
    pub fn add(&mut self, reference: &[f32], decoded: &[f32], next: Option<u32>) {
        assert_eq!(
            reference.len(),
            decoded.len(),
            "logit rows of one vocabulary"
        );
        if reference.iter().chain(decoded).any(|v| !v.is_finite()) {
            self.kls.push(f64::INFINITY);
            if next.is_some() {
                self.nll_dec = f64::INFINITY;
                self.targets += 1;
            }
            return;
        }
        let lr = log_softmax(reference);
        let ld = log_softmax(decoded);
        self.agree += usize::from(argmax(reference) == argmax(decoded));
        let kl: f64 = lr.iter().zip(&ld).map(|(a, b)| a.exp() * (a - b)).sum();
        self.kls.push(kl.max(0.0));
        if let Some(t) = next.map(|t| t as usize).filter(|&t| t < lr.len()) {
            self.nll_ref -= lr[t];
            self.nll_dec -= ld[t];
            self.targets += 1;
        }
    }

    /// Merges another accumulator's positions into this one.
    pub fn merge(&mut self, other: &ScoreAccumulator) {
        self.kls.extend_from_slice(&other.kls);
        self.agree += other.agree;
        self.nll_ref += other.nll_ref;
        self.nll_dec += other.nll_dec;
        self.targets += other.targets;
    }

    /// The statistics so far (NaN means for no positions).
    pub fn finish(&self) -> ScoredFidelity {
        let n = self.kls.len();
        let mut sorted = self.kls.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let i = ((q * n as f64).ceil() as usize).clamp(1, n.max(1)) - 1;
            sorted.get(i).copied().unwrap_or(f64::NAN)
        };
        let per = |v: f64, d: usize| if d == 0 { f64::NAN } else { v / d as f64 };
        ScoredFidelity {
            positions: n,
            top1_agreement: per(self.agree as f64, n),
            mean_kl: per(sorted.iter().sum(), n),
            p99_kl: rank(0.99),
            max_kl: sorted.last().copied().unwrap_or(f64::NAN),
            ppl_ref: per(self.nll_ref, self.targets).exp(),
            ppl: per(self.nll_dec, self.targets).exp(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_runs_agree_fully_with_zero_kl() {
        let mut acc = ScoreAccumulator::default();
        acc.add(&[1.0, 2.0, 0.5], &[1.0, 2.0, 0.5], Some(1));
        acc.add(&[0.0, 0.0, 3.0], &[0.0, 0.0, 3.0], None);
        let s = acc.finish();
        assert_eq!(s.positions, 2);
        assert_eq!(s.top1_agreement, 1.0);
        assert_eq!(s.mean_kl, 0.0);
        assert_eq!(s.max_kl, 0.0);
        assert!((s.ppl - s.ppl_ref).abs() < 1e-12);
        // One target: token 1 has probability e^2 / (e^1 + e^2 + e^0.5).
        let p = 2f64.exp() / (1f64.exp() + 2f64.exp() + 0.5f64.exp());
        assert!((s.ppl_ref - 1.0 / p).abs() < 1e-9);
    }

    #[test]
    fn kl_top1_percentile_and_perplexity_of_known_rows() {
        let mut acc = ScoreAccumulator::default();
        // ln 2 - ... : reference uniform over 2, decoded puts 0.8 / 0.2.
        let (r, d) = ([0.0f32, 0.0], [(0.8f32).ln(), (0.2f32).ln()]);
        acc.add(&r, &d, Some(1));
        for _ in 0..99 {
            acc.add(&r, &r, Some(0));
        }
        let s = acc.finish();
        let kl = 0.5 * (0.5f64 / 0.8).ln() + 0.5 * (0.5f64 / 0.2).ln();
        assert_eq!(s.positions, 100);
        // argmax ties go to the first index: the decoded row's 0.8 is index 0 too.
        assert_eq!(s.top1_agreement, 1.0);
        assert!((s.mean_kl - kl / 100.0).abs() < 1e-7);
        assert!((s.max_kl - kl).abs() < 1e-7);
        assert_eq!(
            s.p99_kl, 0.0,
            "the one large KL is above the 99th percentile of 100"
        );
        assert!((s.ppl_ref - 2.0).abs() < 1e-9);
        let nll = (-(0.2f64).ln() + 99.0 * 2f64.ln()) / 100.0;
        assert!((s.ppl - nll.exp()).abs() < 1e-6);
    }

    #[test]
    fn a_changed_argmax_and_non_finite_logits_count_against() {
        let mut acc = ScoreAccumulator::default();
        acc.add(&[2.0, 1.0], &[1.0, 2.0], None);
        let s = acc.finish();
        assert_eq!(s.top1_agreement, 0.0);
        assert!(s.mean_kl > 0.0);
        acc.add(&[2.0, 1.0], &[f32::NAN, 1.0], Some(0));
        let s = acc.finish();
        assert_eq!(s.positions, 2);
        assert!(s.mean_kl.is_infinite() && s.ppl.is_infinite());
    }

    #[test]
    fn merged_accumulators_equal_one_that_saw_everything() {
        let rows = [
            ([0.5f32, 1.0, -1.0], [0.4f32, 1.1, -0.9]),
            ([3.0, 0.0, 0.0], [2.0, 0.5, 0.0]),
        ];
        let (mut a, mut b, mut all) = Default::default();
        let parts: [&mut ScoreAccumulator; 2] = [&mut a, &mut b];
        for (acc, (r, d)) in parts.into_iter().zip(&rows) {
            acc.add(r, d, Some(2));
        }
        for (r, d) in &rows {
            ScoreAccumulator::add(&mut all, r, d, Some(2));
        }
        let mut merged: ScoreAccumulator = a;
        merged.merge(&b);
        assert_eq!(merged.finish(), ScoreAccumulator::finish(&all));
    }
}
