//! A llama2.c model (Karpathy's `run.c` format) that generates tokens and records the real KV
//! cache they produce: every layer's K (after RoPE) and V at every position.
//!
//! CPU only, single threaded, `f32` throughout; meant for small checkpoints such as
//! stories260K, not for serving.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::model::config::Llama2Config;
use crate::model::forward::{Forward, KvAccess, KvRows};
use crate::model::sampler::Sampler;
use crate::model::weights::Weights;
use crate::{DType, KvCache, LayerKv, Tensor, TensorError};

/// llama2.c's beginning-of-sequence token: generation starts from it.
pub const BOS_TOKEN: u32 = 1;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The checkpoint could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The 7-value header is missing or describes an impossible model.
    #[error("bad model header: {0}")]
    BadHeader(String),
    /// The file length does not match the weights the header calls for.
    #[error("model file is {got} bytes, its header needs {want}")]
    SizeMismatch {
        /// Bytes the header implies.
        want: u64,
        /// Bytes in the file.
        got: u64,
    },
    /// A token count of zero or beyond the model's `seq_len`.
    #[error("{requested} tokens requested, the model takes 1..={max}")]
    BadTokenCount {
        /// Tokens asked for.
        requested: usize,
        /// The model's `seq_len`.
        max: usize,
    },
    /// A sampling temperature that is negative or not finite.
    #[error("temperature {0} is not a finite value >= 0")]
    BadTemperature(f32),
    /// A token id outside the vocabulary.
    #[error("token id {id} at position {position} is outside the vocabulary of {vocab}")]
    BadTokenId {
        /// The id.
        id: u32,
        /// Where it appeared.
        position: usize,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A KV cache or token list that does not fit this model.
    #[error("kv cache does not fit the model: {0}")]
    CacheMismatch(String),
    /// Building the output cache failed.
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

/// Tokens generated from BOS and the KV cache they produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The token at every position, starting with [`BOS_TOKEN`]; one per cache row.
    pub token_ids: Vec<u32>,
    /// K (after RoPE) and V of every layer, `[tokens, n_kv_heads, head_dim]` in `f32`, with
    /// `token_ids` recorded. Convert the dtype as needed.
    pub cache: KvCache,
}

/// A loaded llama2.c checkpoint.
#[derive(Debug, Clone)]
pub struct Llama2Model {
    config: Llama2Config,
    weights: Weights,
    sha256: [u8; 32],
}

impl Llama2Model {
    /// Reads and validates a llama2.c checkpoint file.
    pub fn load(path: &Path) -> Result<Llama2Model, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Llama2Model::from_bytes(&bytes)
    }

    /// Parses a checkpoint held in memory: header, exact length, then weights.
    pub fn from_bytes(bytes: &[u8]) -> Result<Llama2Model, ModelError> {
        let config = Llama2Config::parse(bytes)?;
        let weights = Weights::parse(&config, bytes)?;
        Ok(Llama2Model {
            config,
            weights,
            sha256: Sha256::digest(bytes).into(),
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &Llama2Config {
        &self.config
    }

    /// SHA-256 of the checkpoint file: names the model when namespacing KV produced by it.
    pub fn fingerprint_bytes(&self) -> [u8; 32] {
        self.sha256
    }

    /// [`Llama2Model::fingerprint_bytes`] as lowercase hex.
    pub fn fingerprint_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// Generates `tokens` positions starting from [`BOS_TOKEN`] and records their KV cache.
    ///
    /// Position 0 holds BOS; position `p + 1` holds the token sampled from position `p`'s logits
    /// (see [`Llama2Model::generate_with_progress`] for the sampler). Generation does not stop
    /// at a sampled BOS: the cache always has exactly `tokens` rows.
    pub fn generate(
        &self,
        tokens: usize,
        seed: u64,
        temperature: f32,
    ) -> Result<Generation, ModelError> {
        self.generate_with_progress(tokens, seed, temperature, |_| {})
    }

    /// [`Llama2Model::generate`], calling `progress(done)` after each position.
    ///
    /// Sampling follows llama2.c's `run.c` without top-p: `softmax(logits / temperature)` and a
    /// xorshift64* generator seeded with `seed` (0 is replaced by a fixed non-zero constant);
    /// temperature 0 picks the argmax. The same seed gives the same tokens on every platform.
    pub fn generate_with_progress(
        &self,
        tokens: usize,
        seed: u64,
        temperature: f32,
        mut progress: impl FnMut(usize),
    ) -> Result<Generation, ModelError> {
        self.check_tokens(tokens)?;
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(ModelError::BadTemperature(temperature));
        }
        let kv_dim = self.config.kv_dim();
        let mut rows = vec![
            KvRows {
                key: vec![0.0; tokens * kv_dim],
                value: vec![0.0; tokens * kv_dim],
            };
            self.config.n_layers
        ];
        let mut forward = Forward::new(self.config, &self.weights);
        let mut sampler = Sampler::new(seed);
        let mut token_ids = vec![BOS_TOKEN];
        for pos in 0..tokens {
            let token = token_ids[pos] as usize;
            let logits = forward.step(token, pos, KvAccess::Record(&mut rows));
            if pos + 1 < tokens {
                token_ids.push(sampler.sample(logits, temperature) as u32);
            }
            progress(pos + 1);
        }
        let cache = self.rows_to_cache(rows, tokens, token_ids.clone())?;
        Ok(Generation { token_ids, cache })
    }

    /// The logits for the token after `token_ids`, recomputing every position's K/V (a prefill).
    pub fn next_token_logits(&self, token_ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.check_tokens(token_ids.len())?;
        self.check_ids(token_ids)?;
        let kv_dim = self.config.kv_dim();
        let n = token_ids.len();
        let mut rows = vec![
            KvRows {
                key: vec![0.0; n * kv_dim],
                value: vec![0.0; n * kv_dim],
            };
            self.config.n_layers
        ];
        let mut forward = Forward::new(self.config, &self.weights);
        let mut logits = Vec::new();
        for (pos, &id) in token_ids.iter().enumerate() {
            logits = forward
                .step(id as usize, pos, KvAccess::Record(&mut rows))
                .to_vec();
        }
        Ok(logits)
    }

    /// A fresh forward-step runner (scratch buffers) over this model's weights.
    pub(crate) fn forward(&self) -> Forward<'_> {
        Forward::new(self.config, &self.weights)
    }

    /// Checks a token count against `1..=seq_len`.
    pub(crate) fn check_tokens(&self, tokens: usize) -> Result<(), ModelError> {
        if tokens == 0 || tokens > self.config.seq_len {
            return Err(ModelError::BadTokenCount {
                requested: tokens,
                max: self.config.seq_len,
            });
        }
        Ok(())
    }

    /// Checks that every id is inside the vocabulary.
    pub(crate) fn check_ids(&self, token_ids: &[u32]) -> Result<(), ModelError> {
        let vocab = self.config.vocab_size;
        match token_ids.iter().position(|&id| id as usize >= vocab) {
            Some(position) => Err(ModelError::BadTokenId {
                id: token_ids[position],
                position,
                vocab,
            }),
            None => Ok(()),
        }
    }

    fn rows_to_cache(
        &self,
        rows: Vec<KvRows>,
        tokens: usize,
        token_ids: Vec<u32>,
    ) -> Result<KvCache, ModelError> {
        let shape = [tokens, self.config.n_kv_heads, self.config.head_dim()];
        let layers = rows
            .into_iter()
            .map(|r| {
                Ok(LayerKv {
                    key: Tensor::from_f32(DType::F32, shape, &r.key)?,
                    value: Tensor::from_f32(DType::F32, shape, &r.value)?,
                })
            })
            .collect::<Result<Vec<_>, TensorError>>()?;
        Ok(KvCache::new(layers, Some(token_ids))?)
    }
}
