//! Static frequency tables: normalization from counts, the byte form, and the per-symbol
//! encoder constants and per-slot decoder entries derived from them.

use super::{RansError, ALPHABET, PROB_BITS, PROB_SCALE, RANS_L};

/// The quantized probabilities of one context: `freqs[s]` for the 256 symbols, summing to
/// exactly [`PROB_SCALE`] (4096). Symbol `s` occupies the slots `cum[s]..cum[s] + freqs[s]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreqTable {
    freqs: [u16; ALPHABET],
    cum: [u16; ALPHABET],
    form: TableForm,
}

/// How a table travels in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableForm {
    /// Every frequency up to the top symbol, listed.
    Listed,
    /// A two-sided geometric distribution over the zigzagged values, `P(q) ~ theta^|q|` with
    /// `theta = param / 256` (1..=255), rebuilt by the decoder with integer arithmetic
    /// ([`FreqTable::geometric`]): two bytes instead of one or two per symbol, for the
    /// Laplacian-like levels of transform coefficients.
    Geometric(u8),
}

/// `-log2(f / 4096)` for `f` in 0..=4096 (index 0 unused), so costing a table takes no
/// logarithms.
fn cost_lut() -> &'static [f64; PROB_SCALE as usize + 1] {
    static LUT: std::sync::OnceLock<[f64; PROB_SCALE as usize + 1]> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let mut lut = [0f64; PROB_SCALE as usize + 1];
        for (f, c) in lut.iter_mut().enumerate().skip(1) {
            *c = f64::from(PROB_BITS) - (f as f64).log2();
        }
        lut
    })
}

/// The coded size in bits of symbols with `counts` under frequencies `freqs` (same length);
/// infinite if a counted symbol has frequency 0.
fn coded_bits(counts: &[u64], freqs: &[u16]) -> f64 {
    let lut = cost_lut();
    let mut bits = 0.0;
    for (&c, &f) in counts.iter().zip(freqs) {
        if c > 0 {
            if f == 0 {
                return f64::INFINITY;
            }
            bits += c as f64 * lut[usize::from(f)];
        }
    }
    bits
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
        Ok(FreqTable {
            freqs,
            cum,
            form: TableForm::Listed,
        })
    }

    /// The table of [`TableForm::Geometric`]: symbols `0..=top` (zigzag `z` is the value of
    /// magnitude `(z + 1) / 2`) weighted `w(z) = 2^32 (param / 256)^((z + 1) / 2)`, each
    /// multiplication truncated, and given `1 + floor(w(z) (4095 - top) / sum(w))` slots; the
    /// slots left over go to symbol 0. Integer arithmetic only, so every machine rebuilds the
    /// same table.
    pub fn geometric(top: u8, param: u8) -> FreqTable {
        let mut table = FreqTable::from_freqs(geometric_freqs(top, param)).expect("sums to 4096");
        table.form = TableForm::Geometric(param);
        table
    }

    /// The table that codes symbols with these counts in the fewest bits, its own bytes in a
    /// stream included: the listed [`FreqTable::from_counts`] or the best
    /// [`TableForm::Geometric`] one (searched from the parameter that matches the counts' mean
    /// magnitude).
    pub fn fit(counts: &[u64; ALPHABET]) -> FreqTable {
        let top = counts.iter().rposition(|&c| c > 0).unwrap_or(0);
        let coded = |freqs: &[u16; ALPHABET]| coded_bits(&counts[..=top], &freqs[..=top]);
        // Maximum likelihood for the untruncated distribution: mean |q| = 2t / (1 - t^2).
        let (mut n, mut abs) = (0f64, 0f64);
        for (z, &c) in counts.iter().enumerate() {
            n += c as f64;
            abs += c as f64 * z.div_ceil(2) as f64;
        }
        let m = if n > 0.0 { abs / n } else { 0.0 };
        let theta = if m > 0.0 {
            ((1.0 + m * m).sqrt() - 1.0) / m
        } else {
            0.0
        };
        // Two bytes for the table plus the symbols, per parameter.
        let geo_bits = |p: i32| 16.0 + coded(&geometric_freqs(top as u8, p as u8));
        let mut p = ((theta * 256.0).round() as i32).clamp(1, 255);
        let mut best_bits = geo_bits(p);
        // Walk downhill one step at a time (the cost is near-unimodal in the parameter).
        for dir in [1, -1] {
            loop {
                let q = p + dir;
                if !(1..=255).contains(&q) {
                    break;
                }
                let b = geo_bits(q);
                if b >= best_bits {
                    break;
                }
                (p, best_bits) = (q, b);
            }
        }
        let best = FreqTable::geometric(top as u8, p as u8);
        // A listed table costs at least the empirical entropy plus a byte per symbol and two:
        // normalizing one (the slow part) is only worth it when that bound beats the best
        // geometric table.
        let entropy: f64 = counts[..=top]
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| c as f64 * (n / c as f64).log2())
            .sum();
        if best_bits <= entropy + 8.0 * (top + 3) as f64 {
            return best;
        }
        let listed = FreqTable::from_counts(counts);
        if coded(&listed.freqs) + 8.0 * listed.byte_len(true) as f64 <= best_bits {
            listed
        } else {
            best
        }
    }

    /// How this table travels in a stream.
    pub fn form(&self) -> TableForm {
        self.form
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
        coded_bits(counts, &self.freqs)
    }

    /// The 4096-entry slot -> symbol table a decoder looks symbols up in.
    pub fn slot_symbols(&self) -> Vec<u8> {
        let mut lut = Vec::with_capacity(PROB_SCALE as usize);
        for (s, &f) in self.freqs.iter().enumerate() {
            lut.extend(std::iter::repeat_n(s as u8, usize::from(f)));
        }
        lut
    }

    /// The largest symbol with a nonzero frequency.
    fn top(&self) -> usize {
        self.freqs.iter().rposition(|&f| f > 0).unwrap_or(0)
    }

    /// Bytes of [`FreqTable::write`]'s output.
    pub(crate) fn byte_len(&self, forms: bool) -> usize {
        match self.form {
            TableForm::Geometric(_) => 2,
            TableForm::Listed => {
                let listed: usize = self.freqs[..=self.top()]
                    .iter()
                    .map(|&f| if f < 0x80 { 1 } else { 2 })
                    .sum();
                1 + usize::from(forms) + listed
            }
        }
    }

    /// Appends the table's byte form: `top` (the largest symbol with a nonzero frequency),
    /// then, in a stream with table forms, a parameter byte (0: listed, else
    /// [`TableForm::Geometric`]'s), then for a listed table `freqs[0..=top]` as canonical
    /// unsigned LEB128. Without forms (the first stream layout) a table must be listed.
    pub(crate) fn write(&self, out: &mut Vec<u8>, forms: bool) {
        let top = self.top();
        out.push(top as u8);
        if forms {
            match self.form {
                TableForm::Geometric(param) => {
                    out.push(param);
                    return;
                }
                TableForm::Listed => out.push(0),
            }
        }
        debug_assert_eq!(self.form, TableForm::Listed, "a stream without forms");
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

    /// Parses the byte form of table number `table` starting at `stream[pos]` (`forms`: with
    /// the parameter byte); returns it and the position after it. A geometric table is valid
    /// for any top and parameter; a listed one's `top` must name a nonzero frequency, each
    /// LEB128 must be canonical (at most 2 bytes, no redundant zero byte) and at most 4096, and
    /// the sum must be exactly 4096.
    pub(crate) fn read(
        stream: &[u8],
        mut pos: usize,
        table: usize,
        forms: bool,
    ) -> Result<(FreqTable, usize), RansError> {
        let truncated = |needed: usize| RansError::Truncated {
            needed,
            got: stream.len(),
        };
        let bad = |reason: String| RansError::BadTable { table, reason };
        let top = usize::from(*stream.get(pos).ok_or_else(|| truncated(pos + 1))?);
        pos += 1;
        if forms {
            let param = *stream.get(pos).ok_or_else(|| truncated(pos + 1))?;
            pos += 1;
            if param != 0 {
                return Ok((FreqTable::geometric(top as u8, param), pos));
            }
        }
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

    /// The 4096 packed slot entries the CPU decoder uses (a GPU decoder may use the same):
    /// for slot `x & 4095`, bits 0..8 hold the symbol, bits 8..20 `freq - 1` and bits 20..32
    /// `slot - cum`, so the state update is `x = (freq) * (x >> 12) + (slot - cum)` with one
    /// table read.
    pub fn decode_entries(&self) -> Vec<u32> {
        let mut lut = Vec::with_capacity(PROB_SCALE as usize);
        for (s, &f) in self.freqs.iter().enumerate() {
            let f = u32::from(f);
            lut.extend((0..f).map(|k| s as u32 | ((f - 1) << 8) | (k << 20)));
        }
        lut
    }
}

/// The frequencies of [`FreqTable::geometric`] (symbols above `top` get 0).
fn geometric_freqs(top: u8, param: u8) -> [u16; ALPHABET] {
    let n = usize::from(top) + 1;
    let param = u64::from(param);
    let mut weights = [0u64; ALPHABET];
    let mut w = 1u64 << 32;
    for (z, wz) in weights[..n].iter_mut().enumerate() {
        if z % 2 == 1 {
            w = (w * param) >> 8;
        }
        *wz = w;
    }
    let total: u64 = weights[..n].iter().sum(); // >= 2^32 (symbol 0), <= 2^40
    let spare = u64::from(PROB_SCALE) - n as u64;
    let mut freqs = [0u16; ALPHABET];
    for (f, &wz) in freqs[..n].iter_mut().zip(&weights[..n]) {
        *f = (1 + wz * spare / total) as u16; // wz * spare < 2^44
    }
    let sum: u32 = freqs[..n].iter().map(|&f| u32::from(f)).sum();
    freqs[0] += (PROB_SCALE - sum) as u16; // sum <= n + spare = 4096
    freqs
}

/// One symbol's encoder constants (16 bytes): its frequency, for the renormalization test,
/// and a reciprocal so that `x / freq` needs no division (ryg_rans `Rans64EncSymbol`, exact for
/// any `x < 2^63`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EncSymbol {
    rcp_freq: u64,
    bias: u32,
    /// The frequency; 0 marks a symbol that cannot be encoded.
    pub(crate) freq: u16,
    rcp_shift: u8,
}

// x_max = ((L >> PROB_BITS) << 16) * freq must be freq << 20 for `must_renorm`.
const _: () = assert!((RANS_L >> PROB_BITS) << 16 == 1 << 20);

impl EncSymbol {
    fn new(start: u32, freq: u32) -> EncSymbol {
        if freq == 0 {
            return EncSymbol::default();
        }
        if freq < 2 {
            // q = mulhi(x, 2^64 - 1) = x - 1 for 1 <= x < 2^64; bias absorbs the -1.
            EncSymbol {
                rcp_freq: u64::MAX,
                bias: start + PROB_SCALE - 1,
                freq: freq as u16,
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
                rcp_freq: rcp as u64,
                bias: start,
                freq: freq as u16,
                rcp_shift: (shift - 1) as u8,
            }
        }
    }

    /// `4096 - freq`, recomputed (one subtraction) rather than stored.
    #[inline(always)]
    fn cmpl(&self) -> u64 {
        u64::from(PROB_SCALE) - u64::from(self.freq)
    }

    /// Whether state `x` must emit a word before coding this symbol:
    /// `x >= x_max = ((L >> 12) << 16) * freq = freq << 20`.
    #[inline(always)]
    pub(crate) fn must_renorm(&self, x: u32) -> bool {
        (x >> 20) >= u32::from(self.freq)
    }

    /// `((x / freq) << 12) + (x % freq) + cum` for `x < 2^32` (after renormalization).
    #[inline(always)]
    pub(crate) fn put(&self, x: u32) -> u32 {
        let q = ((u128::from(x) * u128::from(self.rcp_freq)) >> 64) as u64 >> self.rcp_shift;
        (u64::from(x) + u64::from(self.bias) + q * self.cmpl()) as u32
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
            assert!(!e.must_renorm((x_max - 1).min(u64::from(u32::MAX)) as u32));
            if x_max <= u64::from(u32::MAX) {
                assert!(e.must_renorm(x_max as u32));
            }
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
        t.write(&mut bytes, false);
        let (back, used) = FreqTable::read(&bytes, 0, 0, false).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, t);
        assert_eq!(t.slot_symbols().len(), 4096);
    }

    #[test]
    fn byte_len_is_what_write_writes() {
        let mut counts = [0u64; ALPHABET];
        for (s, c) in counts.iter_mut().enumerate().take(200) {
            *c = 100_000 >> (s / 8);
        }
        for t in [
            FreqTable::from_counts(&counts),
            FreqTable::geometric(9, 77),
            FreqTable::fit(&counts),
        ] {
            for forms in [false, true] {
                if !forms && t.form() != TableForm::Listed {
                    continue;
                }
                let mut bytes = Vec::new();
                t.write(&mut bytes, forms);
                assert_eq!(bytes.len(), t.byte_len(forms));
                let (back, used) = FreqTable::read(&bytes, 0, 0, forms).unwrap();
                assert_eq!((back, used), (t.clone(), bytes.len()));
            }
        }
    }
}
