//! One layer's K and V tensors, and the whole KV cache of a sequence.

use crate::{DType, DTypeExt};

/// Why a tensor or cache is not well formed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    /// The byte length does not match shape x dtype.
    #[error("tensor data is {got} bytes, shape {shape:?} of {dtype:?} needs {want}")]
    SizeMismatch {
        /// The tensor's shape.
        shape: [usize; 3],
        /// Its element type.
        dtype: DType,
        /// Bytes needed.
        want: usize,
        /// Bytes given.
        got: usize,
    },
    /// Layers disagree on shape or dtype, or K and V disagree.
    #[error("inconsistent cache: {0}")]
    Inconsistent(String),
    /// A token range outside the cache.
    #[error("token range {start}..{end} outside 0..{tokens}")]
    OutOfRange {
        /// Range start.
        start: usize,
        /// Range end.
        end: usize,
        /// Tokens in the cache.
        tokens: usize,
    },
}

/// A dense `[tokens, kv_heads, head_dim]` tensor in little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: [usize; 3],
    data: Vec<u8>,
}

impl Tensor {
    /// Wraps bytes, checking that their length matches the shape.
    pub fn new(dtype: DType, shape: [usize; 3], data: Vec<u8>) -> Result<Self, TensorError> {
        let want = shape.iter().product::<usize>() * dtype.size();
        if data.len() != want {
            return Err(TensorError::SizeMismatch {
                shape,
                dtype,
                want,
                got: data.len(),
            });
        }
        Ok(Tensor { dtype, shape, data })
    }

    /// Builds a tensor from `f32` values rounded to `dtype`.
    pub fn from_f32(dtype: DType, shape: [usize; 3], values: &[f32]) -> Result<Self, TensorError> {
        let mut data = Vec::new();
        dtype.encode_f32(values, &mut data);
        Tensor::new(dtype, shape, data)
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `[tokens, kv_heads, head_dim]`.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Number of tokens (rows).
    pub fn tokens(&self) -> usize {
        self.shape[0]
    }

    /// Values per token: kv_heads x head_dim.
    pub fn channels(&self) -> usize {
        self.shape[1] * self.shape[2]
    }

    /// Raw little-endian bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Consumes the tensor, giving back its bytes.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }

    /// All values as `f32`, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::new();
        self.dtype.decode_f32(&self.data, &mut out);
        out
    }

    /// The same values re-encoded as `dtype` (round to nearest even).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        Tensor::from_f32(dtype, self.shape, &self.to_f32())
            .expect("the shape is unchanged, so the byte length matches")
    }

    /// The rows `start..end` as a new tensor.
    pub fn slice_tokens(&self, start: usize, end: usize) -> Result<Tensor, TensorError> {
        if start > end || end > self.tokens() {
            return Err(TensorError::OutOfRange {
                start,
                end,
                tokens: self.tokens(),
            });
        }
        let row = self.channels() * self.dtype.size();
        Ok(Tensor {
            dtype: self.dtype,
            shape: [end - start, self.shape[1], self.shape[2]],
            data: self.data[start * row..end * row].to_vec(),
        })
    }

    /// Concatenates tensors of equal dtype and channel shape along tokens.
    pub fn concat_tokens(parts: &[Tensor]) -> Result<Tensor, TensorError> {
        let first = parts
            .first()
            .ok_or_else(|| TensorError::Inconsistent("nothing to concatenate".into()))?;
        let mut data = Vec::new();
        let mut tokens = 0;
        for p in parts {
            if p.dtype != first.dtype || p.shape[1..] != first.shape[1..] {
                return Err(TensorError::Inconsistent(format!(
                    "cannot concatenate {:?} {:?} with {:?} {:?}",
                    p.dtype, p.shape, first.dtype, first.shape
                )));
            }
            tokens += p.shape[0];
            data.extend_from_slice(&p.data);
        }
        Tensor::new(first.dtype, [tokens, first.shape[1], first.shape[2]], data)
    }
}

/// K (after RoPE) and V of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerKv {
    /// Keys, `[tokens, kv_heads, head_dim]`.
    pub key: Tensor,
    /// Values, same shape and dtype as `key`.
    pub value: Tensor,
}

/// The KV cache of one sequence: every layer's K and V, plus the token ids when known.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    token_ids: Option<Vec<u32>>,
}

impl KvCache {
    /// Checks that all layers share tokens, heads, head_dim and dtype.
    pub fn new(layers: Vec<LayerKv>, token_ids: Option<Vec<u32>>) -> Result<Self, TensorError> {
        let first = layers
            .first()
            .ok_or_else(|| TensorError::Inconsistent("a cache needs at least one layer".into()))?;
        let (shape, dtype) = (first.key.shape(), first.key.dtype());
        for (i, l) in layers.iter().enumerate() {
            for (name, t) in [("key", &l.key), ("value", &l.value)] {
                if t.shape() != shape || t.dtype() != dtype {
                    return Err(TensorError::Inconsistent(format!(
                        "layer {i} {name} is {:?} {:?}, layer 0 key is {:?} {:?}",
                        t.dtype(),
                        t.shape(),
                        dtype,
                        shape
                    )));
                }
            }
        }
        if let Some(ids) = &token_ids {
            if ids.len() != shape[0] {
                return Err(TensorError::Inconsistent(format!(
                    "{} token ids for {} tokens",
                    ids.len(),
                    shape[0]
                )));
            }
        }
        Ok(KvCache { layers, token_ids })
    }

    /// The layers in order.
    pub fn layers(&self) -> &[LayerKv] {
        &self.layers
    }

    /// Token ids, when the source recorded them.
    pub fn token_ids(&self) -> Option<&[u32]> {
        self.token_ids.as_deref()
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.layers[0].key.tokens()
    }

    /// KV heads per layer.
    pub fn kv_heads(&self) -> usize {
        self.layers[0].key.shape()[1]
    }

    /// Dimension of one head.
    pub fn head_dim(&self) -> usize {
        self.layers[0].key.shape()[2]
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.layers[0].key.dtype()
    }

    /// Bytes of all K and V tensors.
    pub fn nbytes(&self) -> usize {
        self.layers.len() * 2 * self.layers[0].key.data().len()
    }

    /// Every tensor re-encoded as `dtype` (round to nearest even), token ids kept.
    pub fn to_dtype(&self, dtype: DType) -> KvCache {
        let layers = self
            .layers
            .iter()
            .map(|l| LayerKv {
                key: l.key.to_dtype(dtype),
                value: l.value.to_dtype(dtype),
            })
            .collect();
        KvCache {
            layers,
            token_ids: self.token_ids.clone(),
        }
    }

    /// The tokens `start..end` of every layer.
    pub fn slice_tokens(&self, start: usize, end: usize) -> Result<KvCache, TensorError> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerKv {
                    key: l.key.slice_tokens(start, end)?,
                    value: l.value.slice_tokens(start, end)?,
                })
            })
            .collect::<Result<Vec<_>, TensorError>>()?;
        let ids = self.token_ids.as_ref().map(|ids| ids[start..end].to_vec());
        KvCache::new(layers, ids)
    }

    /// Concatenates caches along tokens (layers, heads and dtype must agree).
    pub fn concat_tokens(parts: &[KvCache]) -> Result<KvCache, TensorError> {
        let first = parts
            .first()
            .ok_or_else(|| TensorError::Inconsistent("nothing to concatenate".into()))?;
        if parts.iter().any(|p| p.num_layers() != first.num_layers()) {
            return Err(TensorError::Inconsistent("layer counts differ".into()));
        }
        let layers = (0..first.num_layers())
            .map(|i| {
                let keys: Vec<Tensor> = parts.iter().map(|p| p.layers[i].key.clone()).collect();
                let values: Vec<Tensor> = parts.iter().map(|p| p.layers[i].value.clone()).collect();
                Ok(LayerKv {
                    key: Tensor::concat_tokens(&keys)?,
                    value: Tensor::concat_tokens(&values)?,
                })
            })
            .collect::<Result<Vec<_>, TensorError>>()?;
        let ids = parts
            .iter()
            .map(|p| p.token_ids.clone())
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        KvCache::new(layers, ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(tokens: usize, base: f32) -> Tensor {
        let vals: Vec<f32> = (0..tokens * 6).map(|i| base + i as f32).collect();
        Tensor::from_f32(DType::F16, [tokens, 2, 3], &vals).unwrap()
    }

    #[test]
    fn rejects_wrong_sizes() {
        let err = Tensor::new(DType::F16, [2, 2, 2], vec![0; 15]).unwrap_err();
        assert!(matches!(
            err,
            TensorError::SizeMismatch {
                want: 16,
                got: 15,
                ..
            }
        ));
    }

    #[test]
    fn slice_and_concat_round_trip() {
        let cache = KvCache::new(
            vec![LayerKv {
                key: tensor(5, 0.0),
                value: tensor(5, 100.0),
            }],
            Some(vec![1, 2, 3, 4, 5]),
        )
        .unwrap();
        let a = cache.slice_tokens(0, 2).unwrap();
        let b = cache.slice_tokens(2, 5).unwrap();
        assert_eq!(a.tokens(), 2);
        assert_eq!(KvCache::concat_tokens(&[a, b]).unwrap(), cache);
        assert!(cache.slice_tokens(3, 9).is_err());
    }

    #[test]
    fn to_dtype_rounds_and_keeps_ids() {
        let cache = KvCache::new(
            vec![LayerKv {
                key: tensor(2, 0.5),
                value: tensor(2, 1.0 / 3.0),
            }],
            Some(vec![4, 5]),
        )
        .unwrap();
        let f32s = cache.to_dtype(DType::F32);
        assert_eq!(f32s.dtype(), DType::F32);
        assert_eq!(f32s.token_ids(), Some(&[4, 5][..]));
        assert_eq!(
            f32s.layers()[0].key.to_f32(),
            cache.layers()[0].key.to_f32()
        );
        assert_eq!(f32s.to_dtype(DType::F16), cache);
    }

    #[test]
    fn rejects_inconsistent_layers() {
        let err = KvCache::new(
            vec![LayerKv {
                key: tensor(5, 0.0),
                value: tensor(4, 0.0),
            }],
            None,
        )
        .unwrap_err();
        assert!(matches!(err, TensorError::Inconsistent(_)));
        let err = KvCache::new(
            vec![LayerKv {
                key: tensor(5, 0.0),
                value: tensor(5, 0.0),
            }],
            Some(vec![1]),
        )
        .unwrap_err();
        assert!(matches!(err, TensorError::Inconsistent(_)));
    }
}
