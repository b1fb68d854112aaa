//! Codec profiles: the per-model transform that decorrelates K and V before quantization.
//!
//! A profile holds, per layer and KV head, the mean and an orthonormal basis of K (with RoPE
//! undone, where K's rank is far lower) and of V, fitted by PCA on the model's own KV over
//! calibration text; each component's standard deviation (for rate and step allocation); how
//! many leading tokens of a sequence (attention sinks) are kept exact; the model's RoPE
//! parameters; and per-tensor KL sensitivities measured through the engine. Chunks coded with a
//! profile name its id (the SHA-256 of its bytes), so a missing or different profile is a typed
//! error, never a wrong restore. Byte layout in docs/FORMAT.md.

use crate::{FormatError, ModelFingerprint, ProfileId};

/// The first four bytes of a serialized profile.
pub const PROFILE_MAGIC: [u8; 4] = *b"KVFP";
/// The profile format version this build writes and reads.
pub const PROFILE_VERSION: u16 = 1;
/// Largest head dimension a profile may hold (its basis is `head_dim^2` floats per head).
pub(crate) const MAX_PROFILE_HEAD_DIM: usize = 1024;
/// Largest serialized profile.
pub(crate) const MAX_PROFILE_LEN: usize = 1 << 30;
/// Bytes before the per-layer data.
const FIXED_LEN: usize = 60;

/// Which channels RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// No rotary embedding (or K is not to be unrotated): the transform sees K as cached.
    None,
    /// Pairs `(2i, 2i+1)`: llama.cpp's `LLAMA_ROPE_TYPE_NORM`.
    Adjacent,
    /// Pairs `(i, i + dims/2)`: llama.cpp's `LLAMA_ROPE_TYPE_NEOX` (GPT-NeoX, Qwen, HF layout).
    Halves,
}

impl RopeStyle {
    fn code(self) -> u8 {
        match self {
            RopeStyle::None => 0,
            RopeStyle::Adjacent => 1,
            RopeStyle::Halves => 2,
        }
    }

    fn from_code(c: u8) -> Option<RopeStyle> {
        match c {
            0 => Some(RopeStyle::None),
            1 => Some(RopeStyle::Adjacent),
            2 => Some(RopeStyle::Halves),
            _ => None,
        }
    }
}

/// The model's rotary position embedding, as far as undoing and redoing it on K needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Which channels rotate together.
    pub style: RopeStyle,
    /// Rotated channels per head (even, at most the head dimension; the rest pass through).
    pub dims: u16,
    /// Frequency base (`rope.freq_base`, 10000 in the original).
    pub base: f32,
    /// Linear position scale (1 without scaling).
    pub freq_scale: f32,
}

impl Rope {
    /// No rotation.
    pub const NONE: Rope = Rope {
        style: RopeStyle::None,
        dims: 0,
        base: 10000.0,
        freq_scale: 1.0,
    };

    /// Pairs rotated per head.
    pub fn pairs(&self) -> usize {
        match self.style {
            RopeStyle::None => 0,
            _ => usize::from(self.dims) / 2,
        }
    }

    /// Channels of pair `i`.
    fn pair(&self, i: usize) -> (usize, usize) {
        match self.style {
            RopeStyle::Halves => (i, i + usize::from(self.dims) / 2),
            _ => (2 * i, 2 * i + 1),
        }
    }

    /// `cos` and `sin` of every pair's angle at `position`, computed in f64 and rounded to f32
    /// (a GPU restore uploads the same table, so both sides rotate identically).
    pub fn angles(&self, position: u32, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        cos.clear();
        sin.clear();
        let dims = f64::from(self.dims);
        for i in 0..self.pairs() {
            let theta = f64::from(position)
                * f64::from(self.freq_scale)
                * f64::from(self.base).powf(-2.0 * i as f64 / dims);
            cos.push(theta.cos() as f32);
            sin.push(theta.sin() as f32);
        }
    }

    /// Rotates one head's channels by minus the angles (undoes RoPE).
    pub fn unrotate(&self, head: &mut [f32], cos: &[f32], sin: &[f32]) {
        for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
            let (a, b) = self.pair(i);
            let (x, y) = (head[a], head[b]);
            head[a] = x * c + y * s;
            head[b] = y * c - x * s;
        }
    }

    /// Rotates one head's channels by the angles (redoes RoPE): `a' = x*c - y*s`,
    /// `b' = y*c + x*s`, each product rounded, then the sum (no fused multiply-add, which is a
    /// slow library call on CPUs built without FMA; a GPU restore uses `__fmul_rn`/`__fadd_rn`
    /// to round the same way).
    pub fn rotate(&self, head: &mut [f32], cos: &[f32], sin: &[f32]) {
        for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
            let (a, b) = self.pair(i);
            let (x, y) = (head[a], head[b]);
            head[a] = x * c - y * s;
            head[b] = y * c + x * s;
        }
    }
}

/// One head's transform: `coefficient[k] = sum_j basis[k][j] * (x[j] - mean[j])`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadBasis {
    /// Per channel mean.
    pub mean: Vec<f32>,
    /// Per component standard deviation on the calibration KV.
    pub std: Vec<f32>,
    /// Orthonormal rows, row `k` is component `k` (`head_dim x head_dim`, row-major), by
    /// decreasing variance.
    pub basis: Vec<f32>,
}

/// The transform of one K or V tensor of a layer.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorProfile {
    /// One transform per KV head.
    pub heads: Vec<HeadBasis>,
    /// Mean KL of the next-token distribution per unit of mean squared coefficient error in
    /// this tensor alone, measured through the engine (0: not measured).
    pub sensitivity: f32,
    /// Measured rate and distortion of this tensor's coefficients at a ladder of steps, by
    /// decreasing step (from the calibration KV; drives [`crate::allocate_steps`]).
    pub curve: Vec<RatePoint>,
}

/// One quantizer step's cost and error on the calibration KV.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatePoint {
    /// The step.
    pub step: f32,
    /// Entropy of the coded symbols, bits per value (with the coder's contexts).
    pub bits: f32,
    /// Mean squared error per value.
    pub mse: f32,
}

/// Most points of one rate curve.
pub(crate) const MAX_CURVE_POINTS: usize = 256;

/// The K and V transforms of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerProfile {
    /// K (with RoPE undone first).
    pub key: TensorProfile,
    /// V.
    pub value: TensorProfile,
}

impl LayerProfile {
    /// K (`half == 0`) or V.
    pub fn tensor(&self, is_key: bool) -> &TensorProfile {
        if is_key {
            &self.key
        } else {
            &self.value
        }
    }
}

/// A model's codec profile (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct CodecProfile {
    /// The model it was calibrated on.
    pub model: ModelFingerprint,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Leading tokens of every sequence stored exactly.
    pub sinks: u16,
    /// The model's rotary embedding on K.
    pub rope: Rope,
    /// One entry per layer.
    pub layers: Vec<LayerProfile>,
}

impl CodecProfile {
    /// Layers covered.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Channels per token and layer.
    pub fn channels(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Per channel (head-major) standard deviation of one tensor's coefficients.
    pub fn component_std(&self, layer: usize, is_key: bool) -> Vec<f32> {
        self.layers[layer]
            .tensor(is_key)
            .heads
            .iter()
            .flat_map(|h| h.std.iter().copied())
            .collect()
    }

    /// The profile's id: the SHA-256 of its bytes.
    pub fn id(&self) -> ProfileId {
        ProfileId::of_bytes(&self.to_bytes())
    }

    /// The model fingerprint in serialized profile bytes, read without parsing the rest
    /// (`None` unless they start with the profile magic and hold the fingerprint): what a store
    /// indexes a profile object under, without buffering it.
    pub fn model_in_bytes(bytes: &[u8]) -> Option<ModelFingerprint> {
        if bytes.get(..4)? != PROFILE_MAGIC {
            return None;
        }
        Some(ModelFingerprint(bytes.get(8..40)?.try_into().ok()?))
    }

    /// Checks that a cache of `layers x kv_heads x head_dim` can be coded with this profile.
    pub fn check_shape(
        &self,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<(), FormatError> {
        if (layers, kv_heads, head_dim) != (self.num_layers(), self.kv_heads, self.head_dim) {
            return Err(FormatError::ProfileMismatch(format!(
                "profile {} is for {} layers x {} heads x {} dims, the KV has {layers} x {kv_heads} x {head_dim}",
                self.id(),
                self.num_layers(),
                self.kv_heads,
                self.head_dim
            )));
        }
        Ok(())
    }

    /// Serializes the profile (layout in docs/FORMAT.md), crc32c last.
    pub fn to_bytes(&self) -> Vec<u8> {
        let d = self.head_dim;
        let mut out = Vec::with_capacity(
            FIXED_LEN
                + self.layers.len() * 2 * (4 + 2 + 12 * 64 + self.kv_heads * (2 * d + d * d) * 4)
                + 4,
        );
        out.extend_from_slice(&PROFILE_MAGIC);
        out.extend_from_slice(&PROFILE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.model.0);
        out.extend_from_slice(&(self.layers.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.kv_heads as u16).to_le_bytes());
        out.extend_from_slice(&(self.head_dim as u16).to_le_bytes());
        out.extend_from_slice(&self.sinks.to_le_bytes());
        out.push(self.rope.style.code());
        out.push(0);
        out.extend_from_slice(&self.rope.dims.to_le_bytes());
        out.extend_from_slice(&self.rope.base.to_le_bytes());
        out.extend_from_slice(&self.rope.freq_scale.to_le_bytes());
        debug_assert_eq!(out.len(), FIXED_LEN);
        for layer in &self.layers {
            for t in [&layer.key, &layer.value] {
                out.extend_from_slice(&t.sensitivity.to_le_bytes());
                out.extend_from_slice(&(t.curve.len() as u16).to_le_bytes());
                for p in &t.curve {
                    for v in [p.step, p.bits, p.mse] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
                for h in &t.heads {
                    for v in h.mean.iter().chain(&h.std).chain(&h.basis) {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses and checks a serialized profile: length, crc, limits, finite values, orthonormal
    /// bases. Any defect is a [`FormatError`], never a profile that restores wrongly.
    pub fn from_bytes(bytes: &[u8]) -> Result<CodecProfile, FormatError> {
        let bad = |m: String| FormatError::BadProfile(m);
        if bytes.len() < FIXED_LEN + 4 {
            return Err(bad(format!(
                "{} bytes is shorter than a profile",
                bytes.len()
            )));
        }
        if bytes.len() > MAX_PROFILE_LEN {
            return Err(FormatError::TooLarge {
                what: "profile length",
                value: bytes.len() as u64,
                max: MAX_PROFILE_LEN as u64,
            });
        }
        if bytes[..4] != PROFILE_MAGIC {
            return Err(bad("not a codec profile (bad magic)".into()));
        }
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let f32_at = |i: usize| f32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let version = u16_at(4);
        if version != PROFILE_VERSION {
            return Err(bad(format!(
                "profile version {version}; this build reads {PROFILE_VERSION}"
            )));
        }
        if u16_at(6) != 0 || bytes[49] != 0 {
            return Err(bad("reserved profile bytes are not zero".into()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(FormatError::Checksum {
                what: "profile".into(),
            });
        }
        let model = ModelFingerprint(bytes[8..40].try_into().expect("32 bytes"));
        let (layers, kv_heads, head_dim) = (
            usize::from(u16_at(40)),
            usize::from(u16_at(42)),
            usize::from(u16_at(44)),
        );
        let sinks = u16_at(46);
        let style = RopeStyle::from_code(bytes[48])
            .ok_or_else(|| bad(format!("unknown RoPE style {}", bytes[48])))?;
        let rope = Rope {
            style,
            dims: u16_at(50),
            base: f32_at(52),
            freq_scale: f32_at(56),
        };
        if layers == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(bad("layers, kv heads and head dim must be nonzero".into()));
        }
        if layers > crate::MAX_LAYERS
            || kv_heads > crate::MAX_KV_HEADS
            || head_dim > MAX_PROFILE_HEAD_DIM
        {
            return Err(bad(format!(
                "{layers} layers x {kv_heads} heads x {head_dim} dims exceed the limits"
            )));
        }
        if style != RopeStyle::None
            && (rope.dims == 0
                || !rope.dims.is_multiple_of(2)
                || usize::from(rope.dims) > head_dim
                || !(rope.base.is_finite() && rope.base > 1.0)
                || !(rope.freq_scale.is_finite() && rope.freq_scale > 0.0))
        {
            return Err(bad(format!("bad RoPE parameters {rope:?}")));
        }
        let mut r = Cursor {
            body,
            pos: FIXED_LEN,
        };
        let mut out_layers = Vec::with_capacity(layers);
        for l in 0..layers {
            let mut tensors = Vec::with_capacity(2);
            for name in ["K", "V"] {
                let at = |m: &str| bad(format!("layer {l} {name}: {m}"));
                let sensitivity = r.f32s(1).map_err(|m| at(&m))?[0];
                if !(sensitivity.is_finite() && sensitivity >= 0.0) {
                    return Err(at("bad sensitivity"));
                }
                let n = usize::from(r.u16().map_err(|m| at(&m))?);
                if n > MAX_CURVE_POINTS {
                    return Err(at(&format!("{n} rate points, at most {MAX_CURVE_POINTS}")));
                }
                let raw = r.f32s(3 * n).map_err(|m| at(&m))?;
                let curve: Vec<RatePoint> = raw
                    .chunks_exact(3)
                    .map(|p| RatePoint {
                        step: p[0],
                        bits: p[1],
                        mse: p[2],
                    })
                    .collect();
                let valid = |p: &RatePoint| {
                    p.step.is_finite()
                        && p.step > 0.0
                        && p.bits.is_finite()
                        && p.bits >= 0.0
                        && p.mse.is_finite()
                        && p.mse >= 0.0
                };
                if !curve.iter().all(valid) || curve.windows(2).any(|w| w[1].step >= w[0].step) {
                    return Err(at("rate points are not finite with decreasing steps"));
                }
                let mut heads = Vec::with_capacity(kv_heads);
                for h in 0..kv_heads {
                    let head = HeadBasis {
                        mean: r.f32s(head_dim).map_err(|m| at(&m))?,
                        std: r.f32s(head_dim).map_err(|m| at(&m))?,
                        basis: r.f32s(head_dim * head_dim).map_err(|m| at(&m))?,
                    };
                    head.check(head_dim)
                        .map_err(|m| at(&format!("head {h}: {m}")))?;
                    heads.push(head);
                }
                tensors.push(TensorProfile {
                    heads,
                    sensitivity,
                    curve,
                });
            }
            let value = tensors.pop().expect("two tensors");
            let key = tensors.pop().expect("two tensors");
            out_layers.push(LayerProfile { key, value });
        }
        if r.pos != body.len() {
            return Err(bad(format!(
                "{} bytes after the last layer",
                body.len() - r.pos
            )));
        }
        Ok(CodecProfile {
            model,
            kv_heads,
            head_dim,
            sinks,
            rope,
            layers: out_layers,
        })
    }
}

/// Reads a profile body with bounds checks.
struct Cursor<'a> {
    body: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.body.len())
            .ok_or_else(|| "the profile ends early".to_string())?;
        let s = &self.body[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn f32s(&mut self, n: usize) -> Result<Vec<f32>, String> {
        let raw = self.take(n.checked_mul(4).ok_or("count overflows")?)?;
        Ok(raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect())
    }
}

impl HeadBasis {
    /// Finite values, non-negative deviations, orthonormal rows (to 1e-3).
    fn check(&self, d: usize) -> Result<(), String> {
        if !self
            .mean
            .iter()
            .chain(&self.std)
            .chain(&self.basis)
            .all(|v| v.is_finite())
        {
            return Err("non-finite value".into());
        }
        if self.std.iter().any(|&s| s < 0.0) {
            return Err("negative standard deviation".into());
        }
        for i in 0..d {
            let ri = &self.basis[i * d..(i + 1) * d];
            for j in i..d {
                let rj = &self.basis[j * d..(j + 1) * d];
                let dot = f64::from(crate::transform::dot::<false>(ri, rj));
                let want = if i == j { 1.0 } else { 0.0 };
                if (dot - want).abs() > 1e-3 {
                    return Err(format!("basis rows {i} and {j} are not orthonormal"));
                }
            }
        }
        Ok(())
    }

    /// The identity transform with the given mean and deviations.
    pub fn identity(mean: Vec<f32>, std: Vec<f32>) -> HeadBasis {
        let d = mean.len();
        let mut basis = vec![0.0; d * d];
        for i in 0..d {
            basis[i * d + i] = 1.0;
        }
        HeadBasis { mean, std, basis }
    }
}
