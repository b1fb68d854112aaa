//! Fuzzes the byte arithmetic of restored buffers (`TargetLayout` in
//! `kvfetcher_protocol`): the daemon sizes a client's buffer with
//! `checked_buffer_len` and writes every element at `offset`.
//!
//! Input: a shape (four u16s), dtype, order and paging bytes, then element coordinates. For a
//! layout that checks: `buffer_len` agrees, every element's head vector lies inside the buffer,
//! and (for small shapes, enumerated whole) no two elements overlap.

#![no_main]

use kvfetcher_protocol::{DType, KvShape, MemoryKind, Paging, TargetLayout, TokenOrder};
use libfuzzer_sys::fuzz_target;

/// Elements enumerated whole to check that none overlap.
const ENUMERATE: u64 = 1 << 14;

fn u16_at(d: &[u8], i: usize) -> u32 {
    u32::from(u16::from_le_bytes([
        d.get(i).copied().unwrap_or(0),
        d.get(i + 1).copied().unwrap_or(0),
    ]))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 11 {
        return;
    }
    let shape = KvShape {
        num_layers: u16_at(data, 0) % 256,
        tokens: u16_at(data, 2),
        kv_heads: u16_at(data, 4) % 256,
        head_dim: u16_at(data, 6) % 1024,
    };
    let dtype = [DType::F16, DType::BF16, DType::F32][usize::from(data[8] % 3)];
    let order = if data[9] & 1 == 0 {
        TokenOrder::Nhd
    } else {
        TokenOrder::Hnd
    };
    let paging = match data[10] {
        0 => Paging::Contiguous,
        b => Paging::Paged {
            block_tokens: u32::from(b - 1),
        },
    };
    let layout = TargetLayout {
        dtype,
        order,
        paging,
        memory: MemoryKind::Host,
    };
    let Ok(len) = layout.checked_buffer_len(&shape) else {
        return;
    };
    assert_eq!(len, layout.buffer_len(&shape));
    let (layers, tokens, heads) = (shape.num_layers, shape.tokens, shape.kv_heads);
    if layers == 0 || tokens == 0 || heads == 0 || shape.head_dim == 0 {
        return;
    }
    let vector = shape.head_dim as usize * dtype.size();
    let inside = |l: u32, kv: u32, t: u32, h: u32| {
        let off = layout.offset(&shape, l, kv, t, h);
        assert!(
            off + vector <= len,
            "element ({l}, {kv}, {t}, {h}) at {off}+{vector} outside {len} bytes"
        );
        off
    };
    inside(0, 0, 0, 0);
    inside(layers - 1, 1, tokens - 1, heads - 1);
    for c in data[11..].chunks_exact(8) {
        inside(
            u16_at(c, 0) % layers,
            u32::from(c[2] & 1),
            u16_at(c, 4) % tokens,
            u32::from(c[6]) % heads,
        );
    }
    let count = u64::from(layers) * 2 * u64::from(tokens) * u64::from(heads);
    if count <= ENUMERATE {
        let mut offsets = Vec::with_capacity(count as usize);
        for l in 0..layers {
            for kv in 0..2 {
                for t in 0..tokens {
                    for h in 0..heads {
                        offsets.push(inside(l, kv, t, h));
                    }
                }
            }
        }
        offsets.sort_unstable();
        for w in offsets.windows(2) {
            assert!(
                w[0] + vector <= w[1],
                "elements overlap at {} and {}",
                w[0],
                w[1]
            );
        }
    }
});
