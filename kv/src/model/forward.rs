//! One decoding step of the llama2.c transformer (Karpathy's run.c `forward`): RMSNorm, RoPE,
//! grouped-query attention over a KV cache, SwiGLU feed-forward, and the classifier.
//!
//! The step either records the position's K (after RoPE) and V into the cache before attending
//! (generation), or only reads K/V that someone else supplied (fidelity replay). No sampling and
//! no file I/O here.

use super::config::Llama2Config;
use super::weights::Weights;

/// RMSNorm's epsilon, as in run.c.
const RMS_EPS: f32 = 1e-5;

/// RoPE's base frequency, as in run.c.
const ROPE_THETA: f32 = 10_000.0;

/// One layer's K and V rows in `f32`, `[tokens, kv_dim]` each, row-major.
#[derive(Debug, Clone, Default)]
pub(crate) struct KvRows {
    /// Keys after RoPE.
    pub(crate) key: Vec<f32>,
    /// Values.
    pub(crate) value: Vec<f32>,
}

/// How a step uses the per-layer KV rows.
pub(crate) enum KvAccess<'a> {
    /// Compute this position's K and V, write them at row `pos`, then attend over rows `0..=pos`.
    Record(&'a mut [KvRows]),
    /// Attend over rows `0..=pos` as given; this position's own K and V are not computed.
    Replay(&'a [KvRows]),
}

/// Scratch buffers for one step, reused across steps.
pub(crate) struct Forward<'w> {
    cfg: Llama2Config,
    w: &'w Weights,
    x: Vec<f32>,
    xb: Vec<f32>,
    xb2: Vec<f32>,
    hb: Vec<f32>,
    hb2: Vec<f32>,
    q: Vec<f32>,
    att: Vec<f32>,
    logits: Vec<f32>,
}

impl<'w> Forward<'w> {
    /// Allocates scratch space for a model.
    pub(crate) fn new(cfg: Llama2Config, w: &'w Weights) -> Forward<'w> {
        Forward {
            cfg,
            w,
            x: vec![0.0; cfg.dim],
            xb: vec![0.0; cfg.dim],
            xb2: vec![0.0; cfg.dim],
            hb: vec![0.0; cfg.hidden_dim],
            hb2: vec![0.0; cfg.hidden_dim],
            q: vec![0.0; cfg.dim],
            att: vec![0.0; cfg.seq_len],
            logits: vec![0.0; cfg.vocab_size],
        }
    }

    /// Runs `token` at position `pos` and returns the next-token logits.
    ///
    /// The caller guarantees `token < vocab_size`, `pos < seq_len`, one `KvRows` per layer, and
    /// rows holding at least `pos + 1` tokens of `kv_dim` values.
    pub(crate) fn step(&mut self, token: usize, pos: usize, mut kv: KvAccess<'_>) -> &[f32] {
        let cfg = self.cfg;
        let (dim, kv_dim, head) = (cfg.dim, cfg.kv_dim(), cfg.head_dim());
        let kv_mul = cfg.n_heads / cfg.n_kv_heads;
        let w = self.w;
        self.x
            .copy_from_slice(&w.token_embedding[token * dim..(token + 1) * dim]);

        for (l, lw) in w.layers.iter().enumerate() {
            rmsnorm(&mut self.xb, &self.x, &lw.rms_att);
            matmul(&mut self.q, &self.xb, &lw.wq);
            rope(&mut self.q, pos, head);
            let rows: &KvRows = match &mut kv {
                KvAccess::Record(rows) => {
                    let r = &mut rows[l];
                    let at = pos * kv_dim..(pos + 1) * kv_dim;
                    matmul(&mut r.key[at.clone()], &self.xb, &lw.wk);
                    matmul(&mut r.value[at.clone()], &self.xb, &lw.wv);
                    rope(&mut r.key[at], pos, head);
                    &rows[l]
                }
                KvAccess::Replay(rows) => &rows[l],
            };

            // Grouped-query attention: query head h reads KV head h / kv_mul.
            for h in 0..cfg.n_heads {
                let q = &self.q[h * head..(h + 1) * head];
                let kv_off = (h / kv_mul) * head;
                let att = &mut self.att[..=pos];
                let scale = 1.0 / (head as f32).sqrt();
                for (t, a) in att.iter_mut().enumerate() {
                    let k = &rows.key[t * kv_dim + kv_off..t * kv_dim + kv_off + head];
                    *a = dot(q, k) * scale;
                }
                softmax(att);
                let out = &mut self.xb[h * head..(h + 1) * head];
                out.fill(0.0);
                for (t, &a) in att.iter().enumerate() {
                    let v = &rows.value[t * kv_dim + kv_off..t * kv_dim + kv_off + head];
                    out.iter_mut().zip(v).for_each(|(o, v)| *o += a * v);
                }
            }
            matmul(&mut self.xb2, &self.xb, &lw.wo);
            self.x.iter_mut().zip(&self.xb2).for_each(|(x, d)| *x += d);

            // SwiGLU feed-forward: w2(silu(w1 x) * w3 x).
            rmsnorm(&mut self.xb, &self.x, &lw.rms_ffn);
            matmul(&mut self.hb, &self.xb, &lw.w1);
            matmul(&mut self.hb2, &self.xb, &lw.w3);
            self.hb
                .iter_mut()
                .zip(&self.hb2)
                .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            matmul(&mut self.xb, &self.hb, &lw.w2);
            self.x.iter_mut().zip(&self.xb).for_each(|(x, d)| *x += d);
        }

        rmsnorm(&mut self.xb, &self.x, &w.rms_final);
        matmul(&mut self.logits, &self.xb, w.classifier());
        &self.logits
    }
}

/// `out = weight * x / sqrt(mean(x^2) + eps)`.
fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32]) {
    let ss = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + RMS_EPS;
    let inv = 1.0 / ss.sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(weight) {
        *o = g * (inv * v);
    }
}

/// `out = W x` for row-major `W` of shape `[out.len(), x.len()]`.
fn matmul(out: &mut [f32], x: &[f32], w: &[f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(x.len())) {
        *o = dot(row, x);
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// Rotates each head's consecutive pairs `(v[i], v[i+1])` by `pos * theta^(-(i % head) / head)`.
fn rope(v: &mut [f32], pos: usize, head: usize) {
    for (i, pair) in v.chunks_exact_mut(2).enumerate() {
        let freq = 1.0 / ROPE_THETA.powf(((2 * i) % head) as f32 / head as f32);
        let (sin, cos) = (pos as f32 * freq).sin_cos();
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * cos - b * sin;
        pair[1] = a * sin + b * cos;
    }
}

/// In-place softmax, shifted by the maximum for stability.
pub(crate) fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let orig: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
        let mut v = orig.clone();
        rope(&mut v, 0, 8);
        assert_eq!(v, orig);
        rope(&mut v, 37, 8);
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((norm(&v) - norm(&orig)).abs() < 1e-3);
        assert_ne!(v, orig);
    }

    #[test]
    fn softmax_and_rmsnorm() {
        let mut x = [1.0f32, 2.0, 3.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[1] > x[0]);
        let mut out = [0.0f32; 2];
        rmsnorm(&mut out, &[3.0, 4.0], &[1.0, 2.0]);
        let inv = 1.0 / (12.5f32 + RMS_EPS).sqrt();
        assert!((out[0] - 3.0 * inv).abs() < 1e-6 && (out[1] - 8.0 * inv).abs() < 1e-6);
    }
}
