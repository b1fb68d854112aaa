//! The llama2.c checkpoint header: seven little-endian `i32` values, and the number of `f32`
//! weights that must follow them.
//!
//! Parsing only; the weights themselves are laid out in `weights.rs`.

use crate::ModelError;

/// Bytes of the header: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len.
pub(crate) const HEADER_BYTES: usize = 7 * 4;

/// The largest value accepted for any header field: far above any llama2.c checkpoint, and low
/// enough that the weight count computed from the header cannot overflow.
const MAX_FIELD: i32 = 1 << 20;

/// The shape of a llama2.c model, as read from its checkpoint header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Llama2Config {
    /// Width of the residual stream.
    pub dim: usize,
    /// Width of the SwiGLU feed-forward hidden layer.
    pub hidden_dim: usize,
    /// Transformer layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// The longest sequence the model was built for (RoPE tables and the KV cache stop here).
    pub seq_len: usize,
    /// Whether the classifier reuses the token embedding (a positive vocab_size in the header).
    pub shared_classifier: bool,
}

impl Llama2Config {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// Values per token of one layer's K (or V): `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim()
    }

    /// Parses and checks the header at the start of a checkpoint.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Llama2Config, ModelError> {
        let header = bytes.get(..HEADER_BYTES).ok_or_else(|| {
            ModelError::BadHeader(format!(
                "file is {} bytes, shorter than the {HEADER_BYTES}-byte header",
                bytes.len()
            ))
        })?;
        let f: Vec<i32> = header
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let names = [
            "dim",
            "hidden_dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "seq_len",
        ];
        for (name, &v) in names.iter().zip(&f) {
            if v == 0 || v.unsigned_abs() > MAX_FIELD as u32 || (v < 0 && *name != "vocab_size") {
                return Err(ModelError::BadHeader(format!(
                    "{name} is {v}, need 1..={MAX_FIELD}"
                )));
            }
        }
        let field = |i: usize| f[i].unsigned_abs() as usize;
        let cfg = Llama2Config {
            dim: field(0),
            hidden_dim: field(1),
            n_layers: field(2),
            n_heads: field(3),
            n_kv_heads: field(4),
            vocab_size: field(5),
            seq_len: field(6),
            shared_classifier: f[5] > 0,
        };
        if cfg.head_dim() * cfg.n_heads != cfg.dim {
            return Err(ModelError::BadHeader(format!(
                "dim {} is not a multiple of n_heads {}",
                cfg.dim, cfg.n_heads
            )));
        }
        if (cfg.n_heads / cfg.n_kv_heads) * cfg.n_kv_heads != cfg.n_heads {
            return Err(ModelError::BadHeader(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                cfg.n_heads, cfg.n_kv_heads
            )));
        }
        if cfg.head_dim() & 1 == 1 {
            return Err(ModelError::BadHeader(format!(
                "head_dim {} is odd; RoPE rotates pairs",
                cfg.head_dim()
            )));
        }
        Ok(cfg)
    }

    /// The number of `f32` values that follow the header, in run.c's order (including the two
    /// legacy RoPE tables of `seq_len * head_dim / 2` values each, which are skipped).
    pub(crate) fn weight_floats(&self) -> u64 {
        let [dim, hidden, layers, vocab, seq, head, kv] = [
            self.dim,
            self.hidden_dim,
            self.n_layers,
            self.vocab_size,
            self.seq_len,
            self.head_dim(),
            self.kv_dim(),
        ]
        .map(|v| v as u64);
        let per_layer = dim // rms_att
            + dim * dim // wq
            + 2 * dim * kv // wk, wv
            + dim * dim // wo
            + dim // rms_ffn
            + 3 * dim * hidden; // w1, w2, w3
        let classifier = if self.shared_classifier {
            0
        } else {
            vocab * dim
        };
        vocab * dim + layers * per_layer + dim + seq * head + classifier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(fields: [i32; 7]) -> Vec<u8> {
        fields.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn parses_stories260k_shape() {
        let cfg = Llama2Config::parse(&header([64, 172, 5, 8, 4, 512, 512])).unwrap();
        assert_eq!((cfg.head_dim(), cfg.kv_dim()), (8, 32));
        assert!(cfg.shared_classifier);
        // The real file is 1_056_540 bytes: 28 header bytes and 264_128 floats.
        assert_eq!(cfg.weight_floats(), 264_128);
        let unshared = Llama2Config::parse(&header([64, 172, 5, 8, 4, -512, 512])).unwrap();
        assert!(!unshared.shared_classifier);
        assert_eq!(unshared.weight_floats(), 264_128 + 512 * 64);
    }

    #[test]
    fn rejects_bad_headers() {
        for bad in [
            [0, 172, 5, 8, 4, 512, 512],
            [64, 172, -5, 8, 4, 512, 512],
            [64, 172, 5, 7, 4, 512, 512],
            [64, 172, 5, 8, 3, 512, 512],
            [72, 172, 5, 8, 4, 512, 512],
            [64, 172, 5, 8, 4, 512, i32::MAX],
        ] {
            let err = Llama2Config::parse(&header(bad)).unwrap_err();
            assert!(matches!(err, ModelError::BadHeader(_)), "{bad:?}: {err}");
        }
        assert!(matches!(
            Llama2Config::parse(&[0; 27]),
            Err(ModelError::BadHeader(_))
        ));
    }
}
