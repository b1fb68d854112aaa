//! The target layout of restored KV: dtype, token order, paging and memory kind, and the byte
//! arithmetic every party (daemon, pipeline, clients) uses to find an element in a buffer.
//!
//! This is pure arithmetic: it allocates nothing and touches no memory.

use kvfetcher_types::DType;
use serde::{Deserialize, Serialize};

/// Order of the token and head axes inside one K or V tensor (dims are always innermost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenOrder {
    /// `[tokens, heads, dim]`.
    Nhd,
    /// `[heads, tokens, dim]`.
    Hnd,
}

/// Whether one K or V tensor is one run of tokens or a list of fixed-size blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Paging {
    /// One tensor covering all tokens.
    Contiguous,
    /// `ceil(tokens / block_tokens)` blocks, each laid out in the token order over
    /// `block_tokens` tokens; a partial last block is padded with zeros.
    Paged {
        /// Tokens per block (must be at least 1).
        block_tokens: u32,
    },
}

/// Where the restored buffer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryKind {
    /// Host memory shared through a memfd.
    Host,
    /// Memory of the GPU with this CUDA ordinal, shared through a CUDA IPC handle.
    Gpu(u32),
}

/// The shape of a restored KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvShape {
    /// Number of transformer layers.
    pub num_layers: u32,
    /// Number of tokens restored.
    pub tokens: u32,
    /// Number of KV heads.
    pub kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
}

/// How a client wants its KV laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TargetLayout {
    /// Element type.
    pub dtype: DType,
    /// Token/head order inside a tensor (or a block).
    pub order: TokenOrder,
    /// Contiguous or paged.
    pub paging: Paging,
    /// Host or GPU memory.
    pub memory: MemoryKind,
}

/// Why a layout cannot describe a buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A paged layout with zero tokens per block.
    #[error("block_tokens must be at least 1")]
    ZeroBlockTokens,
    /// The buffer would not fit in the address space.
    #[error("buffer size overflows")]
    Overflow,
}

impl TargetLayout {
    /// A contiguous host layout in `dtype` and `order`.
    pub fn host(dtype: DType, order: TokenOrder) -> Self {
        TargetLayout {
            dtype,
            order,
            paging: Paging::Contiguous,
            memory: MemoryKind::Host,
        }
    }

    /// Tokens per block: the block size when paged, all tokens (at least 1) when contiguous.
    fn block_tokens(&self, shape: &KvShape) -> usize {
        match self.paging {
            Paging::Contiguous => (shape.tokens as usize).max(1),
            Paging::Paged { block_tokens } => (block_tokens as usize).max(1),
        }
    }

    /// Number of token slots one tensor holds (tokens rounded up to whole blocks).
    pub fn slots(&self, shape: &KvShape) -> usize {
        match self.paging {
            Paging::Contiguous => shape.tokens as usize,
            Paging::Paged { .. } => {
                let bt = self.block_tokens(shape);
                (shape.tokens as usize).div_ceil(bt) * bt
            }
        }
    }

    /// Checks the layout against `shape` and returns the buffer length, without overflow.
    pub fn checked_buffer_len(&self, shape: &KvShape) -> Result<usize, LayoutError> {
        if let Paging::Paged { block_tokens: 0 } = self.paging {
            return Err(LayoutError::ZeroBlockTokens);
        }
        let slots = match self.paging {
            Paging::Contiguous => shape.tokens as u128,
            Paging::Paged { block_tokens } => {
                u128::from(shape.tokens.div_ceil(block_tokens)) * u128::from(block_tokens)
            }
        };
        [
            u128::from(shape.kv_heads),
            u128::from(shape.head_dim),
            self.dtype.size() as u128,
            2,
            u128::from(shape.num_layers),
        ]
        .into_iter()
        .try_fold(slots, u128::checked_mul)
        .and_then(|t| usize::try_from(t).ok())
        .filter(|&t| t <= isize::MAX as usize)
        .ok_or(LayoutError::Overflow)
    }

    /// Bytes of one K (or V) tensor of one layer, padding of a partial last block included.
    pub fn tensor_len(&self, shape: &KvShape) -> usize {
        self.slots(shape) * shape.kv_heads as usize * shape.head_dim as usize * self.dtype.size()
    }

    /// Bytes of one layer: its K tensor followed by its V tensor.
    pub fn layer_len(&self, shape: &KvShape) -> usize {
        2 * self.tensor_len(shape)
    }

    /// Bytes of the whole buffer: for each layer, K then V, each one tensor in `order` (paged:
    /// `ceil(tokens/block_tokens)` blocks of `[block_tokens, heads, dim]` for NHD or
    /// `[heads, block_tokens, dim]` for HND; a partial last block is padded with zeros).
    ///
    /// Call [`TargetLayout::checked_buffer_len`] first on untrusted input: this one assumes the
    /// layout is valid (a zero block size is treated as 1) and does not check for overflow.
    pub fn buffer_len(&self, shape: &KvShape) -> usize {
        shape.num_layers as usize * self.layer_len(shape)
    }

    /// Byte offset of element `(layer, kv: 0=K 1=V, token, head, dim 0)`; dims are contiguous in
    /// every layout. Arguments are not range-checked.
    pub fn offset(&self, shape: &KvShape, layer: u32, kv: u32, token: u32, head: u32) -> usize {
        let (heads, dim, es) = (
            shape.kv_heads as usize,
            shape.head_dim as usize,
            self.dtype.size(),
        );
        let (token, head) = (token as usize, head as usize);
        let bt = self.block_tokens(shape);
        let (block, t) = match self.paging {
            Paging::Contiguous => (0, token),
            Paging::Paged { .. } => (token / bt, token % bt),
        };
        let row = match (self.order, self.paging) {
            (TokenOrder::Nhd, _) => t * heads + head,
            (TokenOrder::Hnd, Paging::Contiguous) => head * shape.tokens as usize + t,
            (TokenOrder::Hnd, Paging::Paged { .. }) => head * bt + t,
        };
        let block_len = bt * heads * dim * es;
        layer as usize * self.layer_len(shape)
            + kv as usize * self.tensor_len(shape)
            + block * block_len
            + row * dim * es
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layout's JSON as the `Fetch` message carries it: the dtype keeps the spellings
    /// daemons and clients already exchange (`b_f16` included, see [`DType`]).
    #[test]
    fn layout_json_is_pinned() {
        let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
        assert_eq!(
            serde_json::to_string(&layout).unwrap(),
            r#"{"dtype":"f16","order":"nhd","paging":"contiguous","memory":"host"}"#
        );
        for (dtype, json) in [
            (DType::F16, "f16"),
            (DType::BF16, "b_f16"),
            (DType::F32, "f32"),
        ] {
            let layout = TargetLayout::host(dtype, TokenOrder::Hnd);
            let text = serde_json::to_string(&layout).unwrap();
            assert!(text.contains(&format!(r#""dtype":"{json}""#)), "{text}");
            assert_eq!(serde_json::from_str::<TargetLayout>(&text).unwrap(), layout);
        }
    }

    fn shape() -> KvShape {
        KvShape {
            num_layers: 3,
            tokens: 10,
            kv_heads: 2,
            head_dim: 4,
        }
    }

    /// Every (layer, kv, token, head) row gets a distinct, in-bounds, dim-contiguous slot.
    #[test]
    fn offsets_are_disjoint_and_in_bounds() {
        let s = shape();
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            for order in [TokenOrder::Nhd, TokenOrder::Hnd] {
                for paging in [
                    Paging::Contiguous,
                    Paging::Paged { block_tokens: 4 },
                    Paging::Paged { block_tokens: 16 },
                ] {
                    let l = TargetLayout {
                        dtype,
                        order,
                        paging,
                        memory: MemoryKind::Host,
                    };
                    let len = l.buffer_len(&s);
                    assert_eq!(l.checked_buffer_len(&s), Ok(len));
                    let row = s.head_dim as usize * dtype.size();
                    let mut seen = std::collections::HashSet::new();
                    for layer in 0..s.num_layers {
                        for kv in 0..2 {
                            for tok in 0..s.tokens {
                                for h in 0..s.kv_heads {
                                    let o = l.offset(&s, layer, kv, tok, h);
                                    assert_eq!(o % row, 0);
                                    assert!(o + row <= len, "{l:?} {o} {len}");
                                    assert!(seen.insert(o), "{l:?} dup {o}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn known_sizes_and_offsets() {
        let s = shape();
        let c = TargetLayout::host(DType::F16, TokenOrder::Nhd);
        assert_eq!(c.buffer_len(&s), 3 * 2 * 10 * 2 * 4 * 2);
        assert_eq!(c.offset(&s, 0, 0, 1, 0), 2 * 4 * 2);
        let h = TargetLayout::host(DType::F16, TokenOrder::Hnd);
        assert_eq!(h.offset(&s, 0, 0, 0, 1), 10 * 4 * 2);
        let p = TargetLayout {
            paging: Paging::Paged { block_tokens: 4 },
            ..h
        };
        // 10 tokens -> 3 blocks of 4: 12 slots per tensor.
        assert_eq!(p.tensor_len(&s), 12 * 2 * 4 * 2);
        // Token 5 is block 1, slot 1; head 1 in HND: row 1*4+1.
        assert_eq!(p.offset(&s, 0, 0, 5, 1), 4 * 2 * 4 * 2 + 5 * 4 * 2);
    }

    #[test]
    fn bad_layouts_are_errors() {
        let s = shape();
        let z = TargetLayout {
            paging: Paging::Paged { block_tokens: 0 },
            ..TargetLayout::host(DType::F32, TokenOrder::Nhd)
        };
        assert_eq!(z.checked_buffer_len(&s), Err(LayoutError::ZeroBlockTokens));
        let big = KvShape {
            num_layers: u32::MAX,
            tokens: u32::MAX,
            kv_heads: u32::MAX,
            head_dim: u32::MAX,
        };
        let l = TargetLayout::host(DType::F32, TokenOrder::Nhd);
        assert_eq!(l.checked_buffer_len(&big), Err(LayoutError::Overflow));
    }
}
