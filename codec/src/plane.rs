//! Quantized codes of one section, the unit every variant encodes.

/// The geometry of a [`CodePlane`]: `tensors` planes of `rows x cols` codes, each `< 2^bits`.
///
/// For a layer group, `tensors` is layers x {K, V} (x byte planes in bit-exact mode), `rows` is
/// tokens and `cols` is kv_heads x head_dim (channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlaneShape {
    /// Bits per code, 1..=16.
    pub bits: u8,
    /// Number of 2-D planes.
    pub tensors: usize,
    /// Rows per plane (tokens).
    pub rows: usize,
    /// Codes per row (channels).
    pub cols: usize,
}

impl PlaneShape {
    /// Number of codes.
    pub fn len(&self) -> usize {
        self.tensors * self.rows * self.cols
    }

    /// Whether the shape holds no codes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the codes bit-packed at `bits` (rounded up).
    pub fn packed_bytes(&self) -> usize {
        (self.len() * self.bits as usize).div_ceil(8)
    }
}

/// Codes laid out `[tensors][rows][cols]`, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodePlane {
    /// Geometry and bit width.
    pub shape: PlaneShape,
    /// `shape.len()` codes, each `< 2^shape.bits`.
    pub codes: Vec<u16>,
}

impl CodePlane {
    /// The codes of plane `t`.
    pub fn tensor(&self, t: usize) -> &[u16] {
        let n = self.shape.rows * self.shape.cols;
        &self.codes[t * n..(t + 1) * n]
    }

    /// Whether the codes fit the shape and the bit width.
    pub fn is_valid(&self) -> bool {
        let max = if self.shape.bits >= 16 {
            u16::MAX
        } else {
            (1u16 << self.shape.bits) - 1
        };
        self.codes.len() == self.shape.len()
            && (1..=16).contains(&self.shape.bits)
            && self.codes.iter().all(|&c| c <= max)
    }
}
