//! Interleaved static-table rANS for a tensor's quantized integer values.
//!
//! Values are zigzagged to symbols (0..255, 255 = escape with the raw zigzag value as one extra
//! 16-bit word) and coded with one static [`FreqTable`] per context; a value's context comes
//! from `column_ctx[index % column_ctx.len()]` (one entry per channel of a tokens x channels
//! tensor). The values are split into blocks, each coded by 32 interleaved lanes sharing one
//! 16-bit word stream, so a GPU decodes a block with one warp and blocks in parallel.
//! The byte format is fixed by docs/FORMAT.md, "rANS value streams"; a CUDA decoder implements
//! the same format, so any change here is a format change.

mod stream;
mod table;

pub use stream::{decode_values, encode_values, BlockInfo, StreamLayout};
pub use table::{FreqTable, TableForm};

use rayon::prelude::*;

use crate::CodecError;

/// Bits of probability precision: frequencies sum to `1 << PROB_BITS`.
pub const PROB_BITS: u32 = 12;
/// The sum of every table's frequencies (M = 4096).
pub const PROB_SCALE: u32 = 1 << PROB_BITS;
/// Interleaved lanes (states) per block: one GPU warp.
pub const LANES: usize = 32;
/// The lower bound of a normalized state; states live in `[RANS_L, 2^32)`.
pub const RANS_L: u32 = 1 << 16;
/// The symbol that escapes a value whose zigzag is 255 or more.
pub const ESCAPE: u8 = 255;
/// Symbols per table.
pub const ALPHABET: usize = 256;
/// The most tables (contexts) a stream may hold.
pub const MAX_TABLES: usize = 64;
/// The default number of values per block.
pub const DEFAULT_BLOCK_VALUES: usize = 32 * 1024;
/// The largest number of values per block.
pub const MAX_BLOCK_VALUES: usize = 1 << 20;
/// The smallest value that can be coded.
pub const MIN_VALUE: i32 = -32768;
/// The largest value that can be coded.
pub const MAX_VALUE: i32 = 32767;

/// Why a rANS stream could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RansError {
    /// The stream ends before a field does.
    #[error("rANS stream truncated: need {needed} bytes, got {got}")]
    Truncated {
        /// Bytes needed to read the next field.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// A frequency table is malformed (bad sum, bad LEB128, ...).
    #[error("rANS table {table} is invalid: {reason}")]
    BadTable {
        /// Which table.
        table: usize,
        /// What is wrong.
        reason: String,
    },
    /// The number of tables is outside 1..=64.
    #[error("rANS stream has {0} tables, expected 1..={MAX_TABLES}")]
    BadTableCount(usize),
    /// The block size is not a multiple of 32 in 32..=2^20.
    #[error("rANS block size {0} is not a multiple of 32 in 32..={MAX_BLOCK_VALUES}")]
    BadBlockValues(u64),
    /// The block count does not match the expected number of values.
    #[error("rANS stream has {got} blocks, expected {expected}")]
    BadBlockCount {
        /// ceil(n_values / block_values).
        expected: u64,
        /// The stream's count.
        got: u64,
    },
    /// A block's word count is impossible (more than two words per value).
    #[error("rANS block {block} claims {n_words} words for {n_values} values")]
    BadWordCount {
        /// Which block.
        block: usize,
        /// Its word count.
        n_words: u64,
        /// Its values.
        n_values: usize,
    },
    /// An initial state is below `RANS_L`.
    #[error("rANS block {block} lane {lane}: state {state:#x} below 2^16")]
    StateOutOfRange {
        /// Which block.
        block: usize,
        /// Which lane.
        lane: usize,
        /// The state.
        state: u32,
    },
    /// A context names no table, or `column_ctx` is empty while there are values.
    #[error("context {ctx} out of range: the stream has {n_tables} tables")]
    ContextOutOfRange {
        /// The context (`usize::MAX` for an empty `column_ctx`).
        ctx: usize,
        /// The tables available.
        n_tables: usize,
    },
    /// A value to encode is outside -32768..=32767.
    #[error("value {value} at index {index} is outside {MIN_VALUE}..={MAX_VALUE}")]
    ValueOutOfRange {
        /// The value's index.
        index: usize,
        /// The value.
        value: i32,
    },
    /// A value to encode has a symbol of frequency 0 in its context's table.
    #[error("value at index {index}: symbol {symbol} has frequency 0 in table {ctx}")]
    SymbolNotInTable {
        /// The value's index.
        index: usize,
        /// Its context.
        ctx: usize,
        /// Its symbol.
        symbol: u8,
    },
    /// An encoder argument is unusable (block size, table count).
    #[error("invalid rANS encoder input: {0}")]
    InvalidInput(String),
    /// A block failed decoding or its integrity check (final states, words consumed).
    #[error("corrupt rANS stream in block {block}: {reason}")]
    Corrupt {
        /// Which block.
        block: usize,
        /// What failed.
        reason: &'static str,
    },
    /// Bytes follow the last block's words.
    #[error("{0} trailing bytes after the rANS stream")]
    TrailingBytes(usize),
}

impl From<RansError> for CodecError {
    fn from(e: RansError) -> CodecError {
        match e {
            RansError::ValueOutOfRange { .. } | RansError::SymbolNotInTable { .. } => {
                CodecError::InvalidCodes(e.to_string())
            }
            RansError::InvalidInput(_) => CodecError::Unsupported {
                variant: "rans",
                reason: e.to_string(),
            },
            _ => CodecError::Corrupt {
                variant: "rans",
                reason: e.to_string(),
            },
        }
    }
}

/// Zigzag: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...
#[inline(always)]
pub(crate) fn zigzag(q: i32) -> u32 {
    ((q << 1) ^ (q >> 31)) as u32
}

/// The inverse of [`zigzag`].
#[inline(always)]
pub(crate) fn unzigzag(z: u32) -> i32 {
    ((z >> 1) as i32) ^ -((z & 1) as i32)
}

/// Checks that `column_ctx` can serve `n_values` values with `n_tables` contexts (entries no
/// value uses, beyond the first `n_values`, are not checked).
pub(crate) fn check_contexts(
    column_ctx: &[u8],
    n_values: usize,
    n_tables: usize,
) -> Result<(), RansError> {
    if n_values > 0 && column_ctx.is_empty() {
        return Err(RansError::ContextOutOfRange {
            ctx: usize::MAX,
            n_tables,
        });
    }
    let used = &column_ctx[..column_ctx.len().min(n_values)];
    match used.iter().find(|&&c| usize::from(c) >= n_tables) {
        Some(&c) => Err(RansError::ContextOutOfRange {
            ctx: usize::from(c),
            n_tables,
        }),
        None => Ok(()),
    }
}

/// Per-context symbol counts of `values` (`n_ctx` histograms), to build tables with
/// [`FreqTable::from_counts`]. Fails on a value outside -32768..=32767 or a context >= n_ctx.
/// Large inputs are counted in parallel (rayon).
pub fn histogram(
    values: &[i32],
    column_ctx: &[u8],
    n_ctx: usize,
) -> Result<Vec<[u64; ALPHABET]>, RansError> {
    check_contexts(column_ctx, values.len(), n_ctx)?;
    let mut hist = vec![[0u64; ALPHABET]; n_ctx];
    if values.is_empty() {
        return Ok(hist);
    }
    if let Some(index) = values
        .iter()
        .position(|q| !(MIN_VALUE..=MAX_VALUE).contains(q))
    {
        return Err(RansError::ValueOutOfRange {
            index,
            value: values[index],
        });
    }
    // Pieces of whole rows, so every piece starts at column 0.
    let rows_per_piece = (1usize << 16).div_ceil(column_ctx.len());
    let counts = values
        .par_chunks(rows_per_piece * column_ctx.len())
        .fold(
            || vec![0u64; n_ctx * ALPHABET],
            |mut counts, piece| {
                for row in piece.chunks(column_ctx.len()) {
                    for (&q, &ctx) in row.iter().zip(column_ctx) {
                        let sym = zigzag(q).min(u32::from(ESCAPE)) as usize;
                        counts[(usize::from(ctx) << 8) | sym] += 1;
                    }
                }
                counts
            },
        )
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            a
        })
        .unwrap_or_default();
    for (h, c) in hist.iter_mut().zip(counts.chunks_exact(ALPHABET)) {
        h.copy_from_slice(c);
    }
    Ok(hist)
}

/// Histogram, the cheapest table per context ([`FreqTable::fit`]) and [`encode_values`] in one
/// step: the whole stream (tables included) for `values`, with `n_ctx` (1..=64) contexts.
pub fn encode_tensor(
    values: &[i32],
    column_ctx: &[u8],
    n_ctx: usize,
    block_values: usize,
) -> Result<Vec<u8>, RansError> {
    if !(1..=MAX_TABLES).contains(&n_ctx) {
        return Err(RansError::InvalidInput(format!(
            "{n_ctx} contexts, expected 1..={MAX_TABLES}"
        )));
    }
    let tables: Vec<FreqTable> = histogram(values, column_ctx, n_ctx)?
        .iter()
        .map(FreqTable::fit)
        .collect();
    encode_values(values, column_ctx, &tables, block_values)
}

/// The empirical entropy in bits of `values` under per-context models: the sum over contexts
/// of `count * H(histogram)`, plus 16 bits per escaped value. The bound a stream's size is
/// compared with.
pub fn entropy_bits(values: &[i32], column_ctx: &[u8], n_ctx: usize) -> Result<f64, RansError> {
    let hist = histogram(values, column_ctx, n_ctx)?;
    let mut bits = 0.0;
    for h in &hist {
        let total: u64 = h.iter().sum();
        for &c in h.iter().filter(|&&c| c > 0) {
            bits -= c as f64 * (c as f64 / total as f64).log2();
        }
        bits += 16.0 * h[usize::from(ESCAPE)] as f64;
    }
    Ok(bits)
}
