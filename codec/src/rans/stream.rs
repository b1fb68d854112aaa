//! The stream: its byte layout, the blocked 32-lane encoder and the CPU decoder.

use rayon::prelude::*;

use super::table::{EncSymbol, FreqTable, TableForm};
use super::{
    check_contexts, unzigzag, zigzag, RansError, ESCAPE, LANES, MAX_BLOCK_VALUES, MAX_TABLES,
    MAX_VALUE, MIN_VALUE, PROB_BITS, PROB_SCALE, RANS_L,
};

/// The bit of a stream's first byte (beside the table count) that says each table carries a
/// form byte ([`TableForm`]); streams without it (the first layout) list every table.
const TABLE_FORMS: u8 = 0x80;

/// Bytes of one block's header: 32 initial states and the word count.
const BLOCK_HEADER_LEN: usize = LANES * 4 + 4;

/// One block's entry in a [`StreamLayout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// The decoder's initial state of each lane (each in `[RANS_L, 2^32)`).
    pub states: [u32; LANES],
    /// The 16-bit words of the block.
    pub n_words: u32,
    /// Index (in words) of the block's first word from [`StreamLayout::words_offset`].
    pub word_offset: u64,
}

/// A parsed stream's header: what a decoder (the CPU one here, or a GPU kernel's host side)
/// needs besides the words themselves, all counts checked against the expected value count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLayout {
    /// One table per context.
    pub tables: Vec<FreqTable>,
    /// Values per block (the last block may hold fewer).
    pub block_values: usize,
    /// The blocks, in value order.
    pub blocks: Vec<BlockInfo>,
    /// Byte offset of block 0's first word in the stream.
    pub words_offset: usize,
    /// The values the stream holds.
    pub n_values: usize,
}

/// Reads little-endian fields, failing with `Truncated` instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], RansError> {
        let end = self.pos.saturating_add(N);
        let b = self.bytes.get(self.pos..end).ok_or(RansError::Truncated {
            needed: end,
            got: self.bytes.len(),
        })?;
        self.pos = end;
        Ok(b.try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8, RansError> {
        Ok(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, RansError> {
        Ok(u32::from_le_bytes(self.take::<4>()?))
    }
}

fn check_block_values(block_values: u64) -> Result<(), RansError> {
    if block_values < LANES as u64
        || block_values > MAX_BLOCK_VALUES as u64
        || !block_values.is_multiple_of(LANES as u64)
    {
        return Err(RansError::BadBlockValues(block_values));
    }
    Ok(())
}

impl StreamLayout {
    /// Parses and checks a stream's header for exactly `n_values` values: table sums, block
    /// size, block count (`ceil(n_values / block_values)`), states (`>= RANS_L`), word counts
    /// (at most two per value) and the total length (no truncation, no trailing bytes).
    /// Allocates only in proportion to `n_values` and the bytes present.
    pub fn parse(stream: &[u8], n_values: usize) -> Result<StreamLayout, RansError> {
        let mut r = Reader {
            bytes: stream,
            pos: 0,
        };
        let first = r.u8()?;
        let forms = first & TABLE_FORMS != 0;
        let n_tables = usize::from(first & !TABLE_FORMS);
        if !(1..=MAX_TABLES).contains(&n_tables) {
            return Err(RansError::BadTableCount(n_tables));
        }
        let mut tables = Vec::with_capacity(n_tables);
        for t in 0..n_tables {
            let (table, pos) = FreqTable::read(stream, r.pos, t, forms)?;
            r.pos = pos;
            tables.push(table);
        }
        if forms && tables.iter().all(|t| t.form() == TableForm::Listed) {
            // The encoder writes such tables in the first layout: one stream per content.
            return Err(RansError::BadTable {
                table: 0,
                reason: "table forms are flagged but every table is listed".into(),
            });
        }
        let block_values = r.u32()?;
        let n_blocks = r.u32()?;
        check_block_values(u64::from(block_values))?;
        let block_values = block_values as usize;
        let expected = n_values.div_ceil(block_values);
        if n_blocks as usize != expected {
            return Err(RansError::BadBlockCount {
                expected: expected as u64,
                got: u64::from(n_blocks),
            });
        }
        let need = r
            .pos
            .saturating_add(expected.saturating_mul(BLOCK_HEADER_LEN));
        if need > stream.len() {
            return Err(RansError::Truncated {
                needed: need,
                got: stream.len(),
            });
        }
        let mut blocks = Vec::with_capacity(expected);
        let mut total_words = 0u64;
        for block in 0..expected {
            let mut states = [0u32; LANES];
            for (lane, s) in states.iter_mut().enumerate() {
                *s = r.u32()?;
                if *s < RANS_L {
                    return Err(RansError::StateOutOfRange {
                        block,
                        lane,
                        state: *s,
                    });
                }
            }
            let n_words = r.u32()?;
            let block_len = block_values.min(n_values - block * block_values);
            if u64::from(n_words) > 2 * block_len as u64 {
                return Err(RansError::BadWordCount {
                    block,
                    n_words: u64::from(n_words),
                    n_values: block_len,
                });
            }
            blocks.push(BlockInfo {
                states,
                n_words,
                word_offset: total_words,
            });
            total_words += u64::from(n_words);
        }
        let words_offset = r.pos;
        let end = (words_offset as u64).saturating_add(2 * total_words);
        if end > stream.len() as u64 {
            return Err(RansError::Truncated {
                needed: usize::try_from(end).unwrap_or(usize::MAX),
                got: stream.len(),
            });
        }
        if end < stream.len() as u64 {
            return Err(RansError::TrailingBytes(stream.len() - end as usize));
        }
        Ok(StreamLayout {
            tables,
            block_values,
            blocks,
            words_offset,
            n_values,
        })
    }

    /// The bytes (u16 LE words) of block `block` in `stream`, the stream this was parsed from.
    ///
    /// # Panics
    ///
    /// If `block` is not below `blocks.len()` or `stream` is shorter than the parsed one.
    pub fn block_words<'a>(&self, stream: &'a [u8], block: usize) -> &'a [u8] {
        let b = &self.blocks[block];
        let start = self.words_offset + 2 * b.word_offset as usize;
        &stream[start..start + 2 * b.n_words as usize]
    }
}

/// One encoded block: the decoder's initial states and its words, in decoder order, at
/// `buf[start..]`.
struct EncodedBlock {
    states: [u32; LANES],
    buf: Vec<u16>,
    start: usize,
}

impl EncodedBlock {
    fn words(&self) -> &[u16] {
        &self.buf[self.start..]
    }
}

/// `column_ctx` repeated to `len + LANES` entries, so that the contexts of the (up to 32)
/// values of a step starting at column `c` are the plain slice `[c..c + 32]`.
fn repeated_contexts(column_ctx: &[u8]) -> Vec<u8> {
    column_ctx
        .iter()
        .copied()
        .cycle()
        .take(column_ctx.len() + LANES)
        .collect()
}

/// Encodes `values` with the given tables (one per context, 1..=64) into a complete stream.
/// Every value must be in -32768..=32767 and its symbol must have a nonzero frequency in its
/// context's table; `block_values` must be a multiple of 32 in 32..=2^20
/// ([`DEFAULT_BLOCK_VALUES`](super::DEFAULT_BLOCK_VALUES) is the usual choice). Blocks are
/// encoded in parallel (rayon).
pub fn encode_values(
    values: &[i32],
    column_ctx: &[u8],
    tables: &[FreqTable],
    block_values: usize,
) -> Result<Vec<u8>, RansError> {
    if !(1..=MAX_TABLES).contains(&tables.len()) {
        return Err(RansError::InvalidInput(format!(
            "{} tables, expected 1..={MAX_TABLES}",
            tables.len()
        )));
    }
    check_block_values(block_values as u64).map_err(|e| RansError::InvalidInput(e.to_string()))?;
    check_contexts(column_ctx, values.len(), tables.len())?;
    let n_blocks = u32::try_from(values.len().div_ceil(block_values))
        .map_err(|_| RansError::InvalidInput("more than 2^32 blocks".into()))?;
    let enc: Vec<EncSymbol> = tables.iter().flat_map(|t| t.enc_symbols()).collect();
    let ctx_rep = repeated_contexts(column_ctx);
    let blocks: Vec<EncodedBlock> = values
        .par_chunks(block_values)
        .enumerate()
        .map(|(b, chunk)| encode_block(chunk, b * block_values, &ctx_rep, column_ctx.len(), &enc))
        .collect::<Result<_, _>>()?;

    let total_words: usize = blocks.iter().map(|b| b.words().len()).sum();
    // Streams whose tables are all listed keep the first layout, byte for byte.
    let forms = tables.iter().any(|t| t.form() != TableForm::Listed);
    let table_bytes: usize = tables.iter().map(|t| t.byte_len(forms)).sum();
    let mut out =
        Vec::with_capacity(1 + table_bytes + 8 + blocks.len() * BLOCK_HEADER_LEN + 2 * total_words);
    out.push(tables.len() as u8 | if forms { TABLE_FORMS } else { 0 });
    for t in tables {
        t.write(&mut out, forms);
    }
    out.extend_from_slice(&(block_values as u32).to_le_bytes());
    out.extend_from_slice(&n_blocks.to_le_bytes());
    for b in &blocks {
        for s in b.states {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(&(b.words().len() as u32).to_le_bytes());
    }
    for b in &blocks {
        for &w in b.words() {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    Ok(out)
}

/// Encodes one block whose first value has global index `start`. `ctx_rep` is
/// [`repeated_contexts`] of a `column_ctx` of `ctx_len` entries; `enc` holds the encoder
/// constants of every (context, symbol), at `ctx * 256 + symbol`.
fn encode_block(
    vals: &[i32],
    start: usize,
    ctx_rep: &[u8],
    ctx_len: usize,
    enc: &[EncSymbol],
) -> Result<EncodedBlock, RansError> {
    // Forward pass: check values and resolve each one's (context, symbol) entry; the loops
    // are branch-free so they vectorize.
    if let Some(j) = vals
        .iter()
        .position(|q| !(MIN_VALUE..=MAX_VALUE).contains(q))
    {
        return Err(RansError::ValueOutOfRange {
            index: start + j,
            value: vals[j],
        });
    }
    let mut idx: Vec<u16> = Vec::with_capacity(vals.len());
    let mut ci = start % ctx_len;
    for step in vals.chunks(LANES) {
        let ctxs = &ctx_rep[ci..ci + step.len()];
        idx.extend(
            step.iter()
                .zip(ctxs)
                .map(|(&q, &ctx)| (u16::from(ctx) << 8) | zigzag(q).min(u32::from(ESCAPE)) as u16),
        );
        ci = (ci + LANES) % ctx_len;
    }
    let escapes = idx
        .iter()
        .filter(|&&k| k & 0xff == u16::from(ESCAPE))
        .count();

    // Backward pass, steps last to first, lanes descending: the exact reverse of decoding.
    // Words are written back to front, so `buf[w..]` is always in decoder order. At most one
    // renormalization word per value plus the escapes, plus one slot that the branch-free
    // renormalization may write and then not keep.
    let cap = vals.len() + escapes + 1;
    let mut buf = vec![0u16; cap];
    let mut w = cap;
    let mut x = [RANS_L; LANES];
    let steps = idx.chunks(LANES).zip(vals.chunks(LANES)).enumerate();
    for (step_no, (step_idx, step_vals)) in steps.rev() {
        if escapes > 0 {
            for (&k, &q) in step_idx.iter().zip(step_vals).rev() {
                if k & 0xff == u16::from(ESCAPE) {
                    w -= 1;
                    buf[w] = zigzag(q) as u16;
                }
            }
        }
        let xs = &mut x[..step_idx.len()];
        for (l, (&k, xl)) in step_idx.iter().zip(xs.iter_mut()).enumerate().rev() {
            let s = &enc[usize::from(k)];
            if s.freq == 0 {
                return Err(RansError::SymbolNotInTable {
                    index: start + step_no * LANES + l,
                    ctx: usize::from(k >> 8),
                    symbol: k as u8,
                });
            }
            let mut v = *xl;
            let renorm = s.must_renorm(v);
            buf[w - 1] = v as u16;
            w -= usize::from(renorm);
            if renorm {
                v >>= 16;
            }
            *xl = s.put(v);
        }
    }
    Ok(EncodedBlock {
        states: x,
        buf,
        start: w,
    })
}

/// Decodes a stream holding exactly `out.len()` values into `out`, with the same
/// `column_ctx` the encoder used. Every count in the stream must agree with `out.len()`;
/// each block must end with all lanes back at `RANS_L` having consumed exactly its words.
/// Blocks are decoded in parallel (rayon). On error `out` holds unspecified values.
pub fn decode_values(stream: &[u8], column_ctx: &[u8], out: &mut [i32]) -> Result<(), RansError> {
    let layout = StreamLayout::parse(stream, out.len())?;
    check_contexts(column_ctx, out.len(), layout.tables.len())?;
    let mut luts: Vec<u32> = Vec::with_capacity(layout.tables.len() * PROB_SCALE as usize);
    for t in &layout.tables {
        luts.extend(t.decode_entries());
    }
    let bv = layout.block_values;
    let ctx_rep = repeated_contexts(column_ctx);
    out.par_chunks_mut(bv)
        .zip(layout.blocks.par_iter())
        .enumerate()
        .try_for_each(|(b, (chunk, info))| {
            let words = layout.block_words(stream, b);
            let ctx = (&ctx_rep[..], column_ctx.len());
            decode_block(b, chunk, b * bv, ctx, &luts, info.states, words)
        })
}

/// Decodes one block whose first value has global index `start` from its initial states and
/// its words (u16 LE). `ctx` is [`repeated_contexts`] of `column_ctx` and `column_ctx.len()`;
/// `luts` holds the packed slot entries of every table at `ctx << 12 | slot`.
fn decode_block(
    block: usize,
    out: &mut [i32],
    start: usize,
    (ctx_rep, ctx_len): (&[u8], usize),
    luts: &[u32],
    states: [u32; LANES],
    word_bytes: &[u8],
) -> Result<(), RansError> {
    let words: Vec<u16> = word_bytes
        .chunks_exact(2)
        .map(|w| u16::from_le_bytes([w[0], w[1]]))
        .collect();
    let mut x = states;
    let mut pos = 0usize;
    let mut ci = start % ctx_len;
    let mut steps = out.chunks_exact_mut(LANES);
    for step in &mut steps {
        let ctxs = &ctx_rep[ci..ci + LANES];
        ci = (ci + LANES) % ctx_len;
        decode_step(block, step, &mut x, ctxs, luts, &words, &mut pos)?;
    }
    let rest = steps.into_remainder();
    if !rest.is_empty() {
        let n = rest.len();
        decode_step(
            block,
            rest,
            &mut x[..n],
            &ctx_rep[ci..ci + n],
            luts,
            &words,
            &mut pos,
        )?;
    }
    if pos != words.len() {
        return Err(RansError::Corrupt {
            block,
            reason: "word count does not match the words read",
        });
    }
    if x.iter().any(|&s| s != RANS_L) {
        return Err(RansError::Corrupt {
            block,
            reason: "final state is not 2^16",
        });
    }
    Ok(())
}

/// One step of [`decode_block`]: the lanes of `xs` decode `step` (one value each, contexts
/// `ctxs`), then renormalize, then read the escaped values, reading words at `*pos`.
#[inline(always)]
fn decode_step(
    block: usize,
    step: &mut [i32],
    xs: &mut [u32],
    ctxs: &[u8],
    luts: &[u32],
    words: &[u16],
    pos: &mut usize,
) -> Result<(), RansError> {
    let mut any_escape = false;
    for ((o, xl), &ctx) in step.iter_mut().zip(xs.iter_mut()).zip(ctxs) {
        let e = luts[(usize::from(ctx) << PROB_BITS) | (*xl & (PROB_SCALE - 1)) as usize];
        *xl = (((e >> 8) & 0xfff) + 1) * (*xl >> PROB_BITS) + (e >> 20);
        let sym = e & 0xff;
        any_escape |= sym == u32::from(ESCAPE);
        *o = unzigzag(sym);
    }
    // Branch-free renormalization: a read past the end yields 0 and is caught by the caller's
    // words-consumed check (pos only grows).
    let mut p = *pos;
    for xl in xs.iter_mut() {
        let renorm = *xl < RANS_L;
        let w = u32::from(words.get(p).copied().unwrap_or(0));
        *xl = if renorm { (*xl << 16) | w } else { *xl };
        p += usize::from(renorm);
    }
    if any_escape {
        // An escaped value decodes first as unzigzag(255) = -128, which no unescaped value is.
        let escaped = unzigzag(u32::from(ESCAPE));
        for o in step.iter_mut().filter(|o| **o == escaped) {
            let z = u32::from(*words.get(p).ok_or(RansError::Corrupt {
                block,
                reason: "word stream exhausted",
            })?);
            p += 1;
            if z < u32::from(ESCAPE) {
                return Err(RansError::Corrupt {
                    block,
                    reason: "escaped value below 255",
                });
            }
            *o = unzigzag(z);
        }
    }
    *pos = p;
    Ok(())
}
