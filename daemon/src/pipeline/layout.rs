//! Restore into the engine's layout on the CPU, and the reverse for saves.
//!
//! [`place_tensor`] writes one K or V tensor of one layer, for a run of tokens, into a buffer
//! laid out as a [`TargetLayout`] says, converting the element type; it coalesces contiguous
//! rows so a contiguous NHD target takes one write per tensor. [`extract_cache`] reads a
//! client's buffer in a [`TargetLayout`] back into a [`KvCache`] for saving.
//!
//! Pure byte arithmetic on top of [`TargetLayout::offset`]: no I/O, no GPU.

use kvfetcher_kv::{DType, DTypeExt, KvCache, LayerKv, Tensor};
use kvfetcher_protocol::{KvShape, MemoryKind, TargetLayout};

/// Why KV could not be placed into or read out of a layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutIoError {
    /// The tensor does not match the buffer's shape or falls outside its tokens.
    #[error("tensor {got:?} at token {token_start} does not fit shape {shape:?}")]
    Mismatch {
        /// The tensor's `[tokens, heads, dim]`.
        got: [usize; 3],
        /// First token of the tensor in the buffer.
        token_start: u32,
        /// The buffer's shape.
        shape: KvShape,
    },
    /// The layout itself is invalid for this shape (zero block size, overflow).
    #[error("invalid layout: {0}")]
    Layout(String),
    /// A buffer's length is not what the layout needs.
    #[error("buffer is {got} bytes, layout needs {want}")]
    BufferLen {
        /// Bytes needed.
        want: usize,
        /// Bytes given.
        got: usize,
    },
    /// Saving reads host memory only.
    #[error("saving reads host buffers only, not {0:?}")]
    NotHost(MemoryKind),
    /// The tensors could not form a cache.
    #[error("inconsistent tensors: {0}")]
    Tensor(String),
}

/// Where placed bytes go: `write(offset, bytes)` into the destination buffer.
pub(crate) type Sink<'a, E> = dyn FnMut(usize, &[u8]) -> Result<(), E> + 'a;

/// `tensor`'s bytes in `dtype`, converted through `f32` only when the types differ.
fn convert(tensor: &Tensor, dtype: DType) -> Vec<u8> {
    if tensor.dtype() == dtype {
        return tensor.data().to_vec();
    }
    let mut out = Vec::with_capacity(tensor.tokens() * tensor.channels() * dtype.size());
    dtype.encode_f32(&tensor.to_f32(), &mut out);
    out
}

/// Writes `tensor` (`[tokens, heads, dim]`, any dtype) as K (`kv` 0) or V (`kv` 1) of `layer`,
/// tokens `token_start..`, into a buffer of `shape` in `layout`, through `write(offset, bytes)`.
///
/// Rows that are adjacent in the target are merged into one write.
pub(crate) fn place_tensor<E>(
    layout: &TargetLayout,
    shape: &KvShape,
    layer: u32,
    kv: u32,
    token_start: u32,
    tensor: &Tensor,
    write: &mut Sink<'_, E>,
) -> Result<(), E>
where
    E: From<LayoutIoError>,
{
    let [tokens, heads, dim] = tensor.shape();
    let fits = heads == shape.kv_heads as usize
        && dim == shape.head_dim as usize
        && layer < shape.num_layers
        && kv < 2
        && token_start as usize + tokens <= shape.tokens as usize;
    if !fits {
        return Err(LayoutIoError::Mismatch {
            got: tensor.shape(),
            token_start,
            shape: *shape,
        }
        .into());
    }
    let bytes = convert(tensor, layout.dtype);
    let row = dim * layout.dtype.size();
    // Source rows are in [token][head] order; in HND targets consecutive heads are far apart,
    // so walk head-major there to keep target runs long.
    let mut run: Option<(usize, usize, Vec<u8>)> = None; // (target offset, len, bytes)
    let mut flush = |run: &mut Option<(usize, usize, Vec<u8>)>| -> Result<(), E> {
        if let Some((off, _, buf)) = run.take() {
            write(off, &buf)?;
        }
        Ok(())
    };
    let head_major = matches!(layout.order, kvfetcher_protocol::TokenOrder::Hnd);
    let (outer, inner) = if head_major {
        (heads, tokens)
    } else {
        (tokens, heads)
    };
    for a in 0..outer {
        for b in 0..inner {
            let (t, h) = if head_major { (b, a) } else { (a, b) };
            let dst = layout.offset(shape, layer, kv, token_start + t as u32, h as u32);
            let src = &bytes[(t * heads + h) * row..][..row];
            match &mut run {
                Some((off, len, buf)) if *off + *len == dst => {
                    buf.extend_from_slice(src);
                    *len += row;
                }
                _ => {
                    flush(&mut run)?;
                    run = Some((dst, row, src.to_vec()));
                }
            }
        }
    }
    flush(&mut run)
}

/// Writes every layer of `cache` (tokens `token_start..`) into a buffer of `shape` in `layout`.
pub fn place_cache<E>(
    layout: &TargetLayout,
    shape: &KvShape,
    first_layer: u32,
    token_start: u32,
    layers: &[LayerKv],
    write: &mut Sink<'_, E>,
) -> Result<(), E>
where
    E: From<LayoutIoError>,
{
    for (i, l) in layers.iter().enumerate() {
        let layer = first_layer + i as u32;
        place_tensor(layout, shape, layer, 0, token_start, &l.key, write)?;
        place_tensor(layout, shape, layer, 1, token_start, &l.value, write)?;
    }
    Ok(())
}

/// Reads a host buffer of `shape` in `layout` into a cache of `[tokens, heads, dim]` tensors in
/// the layout's element type.
pub(crate) fn extract_cache(
    layout: &TargetLayout,
    shape: &KvShape,
    data: &[u8],
    token_ids: Option<Vec<u32>>,
) -> Result<KvCache, LayoutIoError> {
    if layout.memory != MemoryKind::Host {
        return Err(LayoutIoError::NotHost(layout.memory));
    }
    let want = layout
        .checked_buffer_len(shape)
        .map_err(|e| LayoutIoError::Layout(e.to_string()))?;
    if data.len() != want {
        return Err(LayoutIoError::BufferLen {
            want,
            got: data.len(),
        });
    }
    let (tokens, heads, dim) = (
        shape.tokens as usize,
        shape.kv_heads as usize,
        shape.head_dim as usize,
    );
    let row = dim * layout.dtype.size();
    let dtype = layout.dtype;
    let tensor = |layer: u32, kv: u32| -> Result<Tensor, LayoutIoError> {
        let mut out = Vec::with_capacity(tokens * heads * row);
        for t in 0..tokens {
            for h in 0..heads {
                let off = layout.offset(shape, layer, kv, t as u32, h as u32);
                out.extend_from_slice(&data[off..off + row]);
            }
        }
        Tensor::new(dtype, [tokens, heads, dim], out)
            .map_err(|e| LayoutIoError::Tensor(e.to_string()))
    };
    let layers = (0..shape.num_layers)
        .map(|l| {
            Ok(LayerKv {
                key: tensor(l, 0)?,
                value: tensor(l, 1)?,
            })
        })
        .collect::<Result<Vec<_>, LayoutIoError>>()?;
    KvCache::new(layers, token_ids).map_err(|e| LayoutIoError::Tensor(e.to_string()))
}

#[cfg(test)]
mod tests {

    use kvfetcher_kv::KvFile;
    use kvfetcher_protocol::{Paging, TokenOrder};

    use super::*;

    fn real_cache() -> KvCache {
        let path = kvfetcher_testkit::data_file("codelm-kv-a.safetensors");
        let file = KvFile::read(&path).expect("read codelm kv");
        file.cache.slice_tokens(0, 300).expect("slice")
    }

    fn layouts() -> Vec<TargetLayout> {
        let mut v = Vec::new();
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            for order in [TokenOrder::Nhd, TokenOrder::Hnd] {
                for paging in [Paging::Contiguous, Paging::Paged { block_tokens: 16 }] {
                    v.push(TargetLayout {
                        dtype,
                        order,
                        paging,
                        memory: MemoryKind::Host,
                    });
                }
            }
        }
        v
    }

    fn shape_of(c: &KvCache) -> KvShape {
        KvShape {
            num_layers: c.num_layers() as u32,
            tokens: c.tokens() as u32,
            kv_heads: c.kv_heads() as u32,
            head_dim: c.head_dim() as u32,
        }
    }

    /// Places a real cache in two token runs (as two chunks would) and reads it back.
    #[test]
    fn real_kv_round_trips_through_every_layout() {
        let cache = real_cache();
        let shape = shape_of(&cache);
        let split = 256;
        let first = cache.slice_tokens(0, split).unwrap();
        let second = cache.slice_tokens(split, cache.tokens()).unwrap();
        for layout in layouts() {
            let mut buf = vec![0u8; layout.buffer_len(&shape)];
            let mut writes = 0usize;
            let mut write = |off: usize, bytes: &[u8]| -> Result<(), LayoutIoError> {
                buf[off..off + bytes.len()].copy_from_slice(bytes);
                writes += 1;
                Ok(())
            };
            place_cache(
                &layout,
                &shape,
                0,
                split as u32,
                second.layers(),
                &mut write,
            )
            .unwrap();
            place_cache(&layout, &shape, 0, 0, first.layers(), &mut write).unwrap();
            if layout.order == TokenOrder::Nhd && layout.paging == Paging::Contiguous {
                // One write per tensor and chunk: rows were coalesced.
                assert_eq!(writes, 2 * 2 * cache.num_layers(), "{layout:?}");
            }
            let back = extract_cache(&layout, &shape, &buf, None).unwrap();
            for (a, b) in cache.layers().iter().zip(back.layers()) {
                for (x, y) in [(&a.key, &b.key), (&a.value, &b.value)] {
                    let want = Tensor::new(layout.dtype, x.shape(), convert(x, layout.dtype));
                    assert_eq!(y, &want.unwrap(), "{layout:?}");
                }
            }
            if layout.dtype == DType::F16 {
                assert_eq!(back, cache, "f16 source in an f16 layout is bit-exact");
            }
        }
    }

    #[test]
    fn paged_padding_stays_zero() {
        let cache = real_cache();
        let shape = shape_of(&cache);
        let layout = TargetLayout {
            dtype: DType::F16,
            order: TokenOrder::Hnd,
            paging: Paging::Paged { block_tokens: 256 },
            memory: MemoryKind::Host,
        };
        let mut buf = vec![0u8; layout.buffer_len(&shape)];
        let mut write = |off: usize, bytes: &[u8]| -> Result<(), LayoutIoError> {
            buf[off..off + bytes.len()].copy_from_slice(bytes);
            Ok(())
        };
        place_cache(&layout, &shape, 0, 0, cache.layers(), &mut write).unwrap();
        // Token 300..512 of the last block are padding; head 0 of layer 0's K tensor.
        let pad = layout.offset(&shape, 0, 0, 300, 0);
        let end = layout.offset(&shape, 0, 0, 511, 0) + 128 * 2;
        assert!(buf[pad..end].iter().all(|&b| b == 0));
        assert!(buf[..pad].iter().any(|&b| b != 0));
    }

    #[test]
    fn rejects_misfits() {
        let cache = real_cache();
        let shape = shape_of(&cache);
        let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
        let mut write = |_: usize, _: &[u8]| -> Result<(), LayoutIoError> { Ok(()) };
        let t = &cache.layers()[0].key;
        let err = place_tensor(&layout, &shape, 0, 0, 1, t, &mut write);
        assert!(matches!(err, Err(LayoutIoError::Mismatch { .. })));
        let err = place_tensor(&layout, &shape, shape.num_layers, 0, 0, t, &mut write);
        assert!(matches!(err, Err(LayoutIoError::Mismatch { .. })));
        let short = vec![0u8; 10];
        assert!(matches!(
            extract_cache(&layout, &shape, &short, None),
            Err(LayoutIoError::BufferLen { .. })
        ));
        let gpu = TargetLayout {
            memory: MemoryKind::Gpu(0),
            ..layout
        };
        assert!(matches!(
            extract_cache(&gpu, &shape, &short, None),
            Err(LayoutIoError::NotHost(_))
        ));
    }
}
