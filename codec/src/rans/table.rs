//! Static frequency tables: normalization from counts, the byte form, and the per-symbol
//! encoder constants and per-slot decoder entries derived from them.

use super::{RansError, ALPHABET, PROB_BITS, PROB_SCALE, RANS_L};

/// The quantized probabilities of one context: `freqs[s]` for the 256 symbols, summing to
/// exactly [`PROB_SCALE`] (4096). Symbol `s` occupies the slots `cum[s]..cum[s] + freqs[s]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreqTable {
    freqs: [u16; ALPHABET],
    cum: [u16; ALPHABET],
}

impl FreqTable {
    /// Builds a table from explicit frequencies; they must sum to exactly 4096.
    pub fn from_freqs(freqs: [u16; ALPHABET]) -> Result<FreqTable, RansError> {
        let sum: u32 = freqs.iter().map(|&f| u32::from(f)).sum();
        if sum != PROB_SCALE {
            return Err(RansError::BadTable {
                table: 0,
                reason: format!("frequencies sum to {sum}, not {PROB_SCALE}"),
            });
        }
        let mut cum = [0u16; ALPHABET];
        let mut acc = 0u16;
        for (c, &f) in cum.iter_mut().zip(&freqs) {
            *c = acc;
            acc += f; // <= 4096: the sum was checked
        }
        Ok(FreqTable { freqs, cum })
    }

    /// Normalizes a histogram to frequencies summing to 4096 with every nonzero count getting
    /// at least 1, minimizing the coded size `sum(count[s] * -log2(freq[s] / 4096))`: scale
    /// and round, then move single units greedily (the cost is convex per symbol, so the
    /// greedy exchange ends at the optimum). An all-zero histogram (an unused context) gives a
    /// valid dummy table with all 4096 slots on symbol 0.
    pub fn from_counts(counts: &[u64; ALPHABET]) -> FreqTable {
        let total: u128 = counts.iter().map(|&c| u128::from(c)).sum();
        let mut freqs = [0u16; ALPHABET];
        if total == 0 {
            freqs[0] = PROB_SCALE as u16;
            return FreqTable::from_freqs(freqs).expect("sums to 4096");
        }
        let scale = u128::from(PROB_SCALE);
        let mut sum: i64 = 0;
        for (f, &c) in freqs.iter_mut().zip(counts) {
            if c > 0 {
                let r = (u128::from(c) * scale + total / 2) / total;
                *f = r.clamp(1, scale) as u16;
                sum += i64::from(*f);
            }
        }
        // Marginal costs in bits of one unit more (gain) or less (loss) for symbol s.
        let gain = |c: u64, f: u16| -> f64 {
            c as f64 * ((f64::from(f) + 1.0).log2() - f64::from(f).log2())
        };
        let loss = |c: u64, f: u16| -> f64 {
            if f <= 1 {
                f64::INFINITY
            } else {
                c as f64 * (f64::from(f).log2() - (f64::from(f) - 1.0).log2())
            }
        };
        let best_gain = |freqs: &[u16; ALPHABET]| -> Option<(usize, f64)> {
            (0..ALPHABET)
                .filter(|&s| counts[s] > 0)
                .map(|s| (s, gain(counts[s], freqs[s])))
                .max_by(|a, b| a.1.total_cmp(&b.1))
        };
        let best_loss = |freqs: &[u16; ALPHABET]| -> Option<(usize, f64)> {
            (0..ALPHABET)
                .filter(|&s| counts[s] > 0 && freqs[s] > 1)
                .map(|s| (s, loss(counts[s], freqs[s])))
                .min_by(|a, b| a.1.total_cmp(&b.1))
        };
        while sum > i64::from(PROB_SCALE) {
            let (s, _) = best_loss(&freqs).expect("more than 4096 units, so one is above 1");
            freqs[s] -= 1;
            sum -= 1;
        }
        while sum < i64::from(PROB_SCALE) {
            let (s, _) = best_gain(&freqs).expect("a nonzero count exists");
            freqs[s] += 1;
            sum += 1;
        }
        // Exchange single units while that lowers the cost (bounded, it converges fast).
        for _ in 0..4 * ALPHABET {
            let (Some((up, g)), Some((down, l))) = (best_gain(&freqs), best_loss(&freqs)) else {
                break;
            };
            if up == down || g <= l * (1.0 + 1e-12) {
                break;
            }
            freqs[up] += 1;
            freqs[down] -= 1;
        }
        FreqTable::from_freqs(freqs).expect("sums to 4096")
    }

    /// The frequencies of the 256 symbols (sum 4096).
    pub fn freqs(&self) -> &[u16; ALPHABET] {
        &self.freqs
    }

    /// The cumulative frequencies: `cum[s] = freqs[..s].sum()`.
    pub fn cum(&self) -> &[u16; ALPHABET] {
        &self.cum
    }

    /// The coded size in bits of symbols with these counts under this table (ignoring the
    /// stream's fixed overhead and escape words); infinite if a counted symbol has frequency 0.
    pub fn cost_bits(&self, counts: &[u64; ALPHABET]) -> f64 {
        let mut bits = 0.0;
        for (&c, &f) in counts.iter().zip(&self.freqs) {
            if c > 0 {
                if f == 0 {
                    return f64::INFINITY;
                }
                bits += c as f64 * (f64::from(PROB_BITS) - f64::from(f).log2());
            }
        }
        bits
    }

    /// The 4096-entry slot -> symbol table a decoder looks symbols up in.
    pub fn slot_symbols(&self) -> Vec<u8> {
        let mut lut = Vec::with_capacity(PROB_SCALE as usize);
        for (s, &f) in self.freqs.iter().enumerate() {
            lut.extend(std::iter::repeat_n(s as u8, usize::from(f)));
        }
        lut
    }

    /// Appends the table's byte form: `top` (the largest symbol with a nonzero frequency),
    /// then `freqs[0..=top]` as canonical unsigned LEB128.
    pub fn write(&self, out: &mut Vec<u8>) {
        let top = self.freqs.iter().rposition(|&f| f > 0).unwrap_or(0);
        out.push(top as u8);
        for &f in &self.freqs[..=top] {
            let mut v = f;
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    out.push(byte);
                    break;
                }
                out.push(byte | 0x80);
            }
        }
    }

    /// Parses the byte form of table number `table` starting at `stream[pos]`; returns it and
    /// the position after it. `top` must name a nonzero frequency, each LEB128 must be
    /// canonical (at most 2 bytes, no redundant zero byte) and at most 4096, and the sum must
    /// be exactly 4096.
    pub(crate) fn read(
        stream: &[u8],
        mut pos: usize,
        table: usize,
    ) -> Result<(FreqTable, usize), RansError> {
        let truncated = |needed: usize| RansError::Truncated {
            needed,
            got: stream.len(),
        };
        let bad = |reason: String| RansError::BadTable { table, reason };
        let top = usize::from(*stream.get(pos).ok_or_else(|| truncated(pos + 1))?);
        pos += 1;
        let mut freqs = [0u16; ALPHABET];
        for f in &mut freqs[..=top] {
            let b0 = *stream.get(pos).ok_or_else(|| truncated(pos + 1))?;
            pos += 1;
            let mut v = u32::from(b0 & 0x7f);
            if b0 & 0x80 != 0 {
                let b1 = *stream.get(pos).ok_or_else(|| truncated(pos + 1))?;
                pos += 1;
                if b1 & 0x80 != 0 || b1 == 0 {
                    return Err(bad("non-canonical or overlong LEB128 frequency".into()));
                }
                v |= u32::from(b1) << 7;
            }
            if v > PROB_SCALE {
                return Err(bad(format!("frequency {v} above {PROB_SCALE}")));
            }
            *f = v as u16;
        }
        if freqs[top] == 0 {
            return Err(bad(format!("top symbol {top} has frequency 0")));
        }
        let table = FreqTable::from_freqs(freqs).map_err(|e| match e {
            RansError::BadTable { reason, .. } => RansError::BadTable { table, reason },
            other => other,
        })?;
        Ok((table, pos))
    }

    /// The encoder constants of every symbol (ryg_rans Rans64-style reciprocals).
    pub(crate) fn enc_symbols(&self) -> [EncSymbol; ALPHABET] {
        let mut out = [EncSymbol::default(); ALPHABET];
        for (s, e) in out.iter_mut().enumerate() {
            *e = EncSymbol::new(u32::from(self.cum[s]), u32::from(self.freqs[s]));
        }
        out
    }

    /// The decoder's packed per-slot entries: slot `k` holds `symbol | (freq - 1) << 8 |
    /// (k - cum) << 20` of the symbol owning it, so a state update needs one table read. Public
    /// for decoders outside the codec (the daemon's GPU decoder builds the same table on the
    /// device and tests its mirror against this one).
    pub fn dec_entries(&self) -> Box<[u32; PROB_SCALE as usize]> {
        let mut lut = Box::new([0u32; PROB_SCALE as usize]);
        for (s, (&f, &c)) in self.freqs.iter().zip(&self.cum).enumerate() {
            for k in 0..u32::from(f) {
                lut[(u32::from(c) + k) as usize] = DecEntry::pack(s as u8, u32::from(f), k);
            }
        }
        lut
    }
}

/// Packs a decoder slot entry into a u32: bits 0..8 the symbol, 8..20 `freq - 1`, 20..32
/// `slot - cum` (so the state update is `(freq) * (x >> 12) + (slot - cum)` with no further
/// table reads).
pub(crate) struct DecEntry;

impl DecEntry {
    #[inline]
    fn pack(sym: u8, freq: u32, bias: u32) -> u32 {
        u32::from(sym) | ((freq - 1) << 8) | (bias << 20)
    }
}

/// One symbol's encoder constants: `x_max` for renormalization and a reciprocal so that
/// `x / freq` needs no division (ryg_rans `Rans64EncSymbol`, exact for any x < 2^63).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EncSymbol {
    /// Renormalize (emit a word) while `x >= x_max`; 0 for a symbol with frequency 0.
    pub(crate) x_max: u64,
    pub(crate) rcp_freq: u64,
    pub(crate) bias: u32,
    pub(crate) cmpl_freq: u32,
    pub(crate) rcp_shift: u32,
}

impl EncSymbol {
    fn new(start: u32, freq: u32) -> EncSymbol {
        if freq == 0 {
            return EncSymbol::default();
        }
        let x_max = u64::from((RANS_L >> PROB_BITS) << 16) * u64::from(freq);
        let cmpl_freq = PROB_SCALE - freq;
        if freq < 2 {
            // q = mulhi(x, 2^64 - 1) = x - 1 for 1 <= x < 2^64; bias absorbs the -1.
            EncSymbol {
                x_max,
                rcp_freq: u64::MAX,
                bias: start + PROB_SCALE - 1,
                cmpl_freq,
                rcp_shift: 0,
            }
        } else {
            let mut shift = 0;
            while freq > (1u32 << shift) {
                shift += 1;
            }
            // ceil(2^(shift + 63) / freq) fits in 64 bits since freq > 2^(shift - 1).
            let rcp = (1u128 << (shift + 63)).div_ceil(u128::from(freq));
            EncSymbol {
                x_max,
                rcp_freq: rcp as u64,
                bias: start,
                cmpl_freq,
                rcp_shift: shift - 1,
            }
        }
    }

    /// `((x / freq) << 12) + (x % freq) + cum` for `x < 2^32` (after renormalization).
    #[inline(always)]
    pub(crate) fn put(&self, x: u32) -> u32 {
        let q = ((u128::from(x) * u128::from(self.rcp_freq)) >> 64) as u64 >> self.rcp_shift;
        (u64::from(x) + u64::from(self.bias) + q * u64::from(self.cmpl_freq)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reciprocal_matches_division() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for freq in 1..=PROB_SCALE {
            let start = PROB_SCALE - freq;
            let e = EncSymbol::new(start, freq);
            let x_max = u64::from(freq) << 20;
            let mut xs = vec![RANS_L, (x_max - 1).min(u64::from(u32::MAX)) as u32];
            xs.extend((0..64).map(|_| (RANS_L as u64 + next() % (x_max - RANS_L as u64)) as u32));
            for x in xs {
                if u64::from(x) >= x_max {
                    continue;
                }
                let want = ((x / freq) << PROB_BITS) + (x % freq) + start;
                assert_eq!(e.put(x), want, "freq {freq} x {x}");
            }
        }
    }

    #[test]
    fn normalization_keeps_rare_symbols_and_sums() {
        let mut counts = [0u64; ALPHABET];
        counts[0] = 1_000_000_000;
        for c in counts.iter_mut().skip(1) {
            *c = 1;
        }
        let t = FreqTable::from_counts(&counts);
        assert!(t.freqs().iter().all(|&f| f >= 1));
        assert_eq!(t.freqs().iter().map(|&f| u32::from(f)).sum::<u32>(), 4096);
        let t = FreqTable::from_counts(&[0; ALPHABET]);
        assert_eq!(t.freqs()[0], 4096);
        let mut one = [0u64; ALPHABET];
        one[7] = 5;
        assert_eq!(FreqTable::from_counts(&one).freqs()[7], 4096);
    }

    #[test]
    fn table_bytes_round_trip() {
        let mut counts = [0u64; ALPHABET];
        for (s, c) in counts.iter_mut().enumerate().take(40) {
            *c = 1000 / (s as u64 + 1);
        }
        let t = FreqTable::from_counts(&counts);
        let mut bytes = Vec::new();
        t.write(&mut bytes);
        let (back, used) = FreqTable::read(&bytes, 0, 0).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, t);
        assert_eq!(t.slot_symbols().len(), 4096);
    }
}
