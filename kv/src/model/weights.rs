//! The weights of a llama2.c checkpoint, split per layer from run.c's layout: every tensor of
//! one kind for all layers, then the next kind.
//!
//! Layout only; the arithmetic that uses them is in `forward.rs`.

use super::config::{Llama2Config, HEADER_BYTES};
use crate::ModelError;

/// One transformer layer's weights, row-major `[out, in]` matrices as run.c's `matmul` expects.
#[derive(Debug, Clone)]
pub(crate) struct LayerWeights {
    /// RMSNorm gain before attention, `[dim]`.
    pub(crate) rms_att: Vec<f32>,
    /// Query projection, `[dim, dim]`.
    pub(crate) wq: Vec<f32>,
    /// Key projection, `[kv_dim, dim]`.
    pub(crate) wk: Vec<f32>,
    /// Value projection, `[kv_dim, dim]`.
    pub(crate) wv: Vec<f32>,
    /// Attention output projection, `[dim, dim]`.
    pub(crate) wo: Vec<f32>,
    /// RMSNorm gain before the feed-forward block, `[dim]`.
    pub(crate) rms_ffn: Vec<f32>,
    /// Gate projection, `[hidden_dim, dim]`.
    pub(crate) w1: Vec<f32>,
    /// Down projection, `[dim, hidden_dim]`.
    pub(crate) w2: Vec<f32>,
    /// Up projection, `[hidden_dim, dim]`.
    pub(crate) w3: Vec<f32>,
}

/// All weights of a model.
#[derive(Debug, Clone)]
pub(crate) struct Weights {
    /// Token embedding, `[vocab, dim]`.
    pub(crate) token_embedding: Vec<f32>,
    /// The layers in order.
    pub(crate) layers: Vec<LayerWeights>,
    /// Final RMSNorm gain, `[dim]`.
    pub(crate) rms_final: Vec<f32>,
    /// Separate classifier `[vocab, dim]`, or `None` when it shares the token embedding.
    pub(crate) classifier: Option<Vec<f32>>,
}

impl Weights {
    /// Splits the checkpoint's bytes (header included) into weights; the caller has checked
    /// that the length is exactly `HEADER_BYTES + 4 * cfg.weight_floats()`.
    pub(crate) fn parse(cfg: &Llama2Config, bytes: &[u8]) -> Result<Weights, ModelError> {
        let want = HEADER_BYTES as u64 + 4 * cfg.weight_floats();
        if bytes.len() as u64 != want {
            return Err(ModelError::SizeMismatch {
                want,
                got: bytes.len() as u64,
            });
        }
        let mut r = Reader {
            bytes: &bytes[HEADER_BYTES..],
        };
        let (dim, hidden, kv, n) = (cfg.dim, cfg.hidden_dim, cfg.kv_dim(), cfg.n_layers);
        let token_embedding = r.take(cfg.vocab_size * dim);
        // run.c's order: rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, each for all layers.
        let sizes = [
            dim,
            dim * dim,
            kv * dim,
            kv * dim,
            dim * dim,
            dim,
            hidden * dim,
            dim * hidden,
            hidden * dim,
        ];
        let mut kinds = sizes.map(|size| r.per_layer(n, size));
        let rms_final = r.take(dim);
        // The legacy freq_cis_real and freq_cis_imag tables: RoPE is recomputed instead.
        r.take(cfg.seq_len * cfg.head_dim());
        let classifier = (!cfg.shared_classifier).then(|| r.take(cfg.vocab_size * dim));
        let layers = (0..n)
            .map(|l| {
                let mut next = |kind: usize| std::mem::take(&mut kinds[kind][l]);
                LayerWeights {
                    rms_att: next(0),
                    wq: next(1),
                    wk: next(2),
                    wv: next(3),
                    wo: next(4),
                    rms_ffn: next(5),
                    w1: next(6),
                    w2: next(7),
                    w3: next(8),
                }
            })
            .collect();
        Ok(Weights {
            token_embedding,
            layers,
            rms_final,
            classifier,
        })
    }

    /// The classifier matrix `[vocab, dim]`.
    pub(crate) fn classifier(&self) -> &[f32] {
        self.classifier.as_deref().unwrap_or(&self.token_embedding)
    }
}

/// Reads consecutive little-endian `f32` runs; lengths were validated up front.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Vec<f32> {
        let (head, rest) = self.bytes.split_at(n * 4);
        self.bytes = rest;
        head.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn per_layer(&mut self, layers: usize, n: usize) -> Vec<Vec<f32>> {
        (0..layers).map(|_| self.take(n)).collect()
    }
}
