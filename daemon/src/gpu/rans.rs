//! Transform-coded sections (format v2, the `rans` variant) restored on the GPU.
//!
//! The host parses the section with the codec's own parsers ([`parse_rans_params`],
//! [`StreamLayout::parse`]) into a [`RansPlan`]: frequency tables, one entry per rANS block and
//! the blocks' initial states. On the section's stream it then uploads the plan and the payload,
//! builds the 4096-slot symbol tables on the device (`kvf_rans_build_luts`), decodes every
//! block with one warp (`kvf_rans_decode`, into int16 levels in scratch) and runs the inverse
//! transform (`kvf_inverse_transform`) and the sink copy (`kvf_restore_sinks`) into the
//! engine's layout. The decoder checks every block (final states, words consumed, escapes) and
//! raises a flag in device memory; the writing kernels read that flag first and write nothing
//! when it is set, and the host turns it into [`GpuError::Format`] (a corrupt section, as the
//! CPU path reports it). So a corrupt stream never leaves garbage in the engine's buffer.
//!
//! The arithmetic follows `kvfetcher_codec::restore_section` operation for operation (`y =
//! level as f32 * step`, `mul_add` over components in ascending order skipping `y == 0`, RoPE
//! with the host's f32 cos/sin table, RNE to the chunk's dtype then to the target's), so the
//! result equals the CPU restore bit for bit. A profile's bases and means are uploaded once per
//! device ([`DeviceProfile`], cached by the device).

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use kvfetcher_codec::rans::{StreamLayout, LANES, PROB_SCALE};
use kvfetcher_codec::{
    parse_rans_params, ChunkHeader, CodecError, CodecProfile, FormatError, PlaneShape, Rope,
    RopeStyle, TRANSFORM_CODE_BITS,
};
use kvfetcher_kv::DType;

use super::cuda::{bytemuck_like::Pod, Cuda, DeviceBuffer, Stream};
use super::pinned::ImageLayout;
use super::restore::{CodeGeometry, DeviceTarget, RestoreKernels, RestoreTargetArgs};
use super::GpuError;

/// Threads per block of the transform-route kernels (their `__launch_bounds__`).
const BLOCK: u32 = 256;
/// rANS blocks decoded per thread block (one warp each).
const WARPS: usize = BLOCK as usize / 32;
/// Largest head dimension the inverse-transform kernel's shared tile holds.
pub(crate) const MAX_GPU_HEAD_DIM: usize = 1024;

fn corrupt(reason: impl Into<String>) -> GpuError {
    GpuError::Format(FormatError::Codec(CodecError::Corrupt {
        variant: "rans",
        reason: reason.into(),
    }))
}

/// One rANS block for the decoder: `RansBlock` of restore.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RansBlockArgs {
    /// Byte offset of the block's first word in the payload.
    pub words: u64,
    /// Element index of its first value in the level scratch.
    pub out: u64,
    /// Its 16-bit words.
    pub n_words: u32,
    /// Its values.
    pub n_values: u32,
    /// Entry index of its tensor's table 0 in the slot tables.
    pub lut: u32,
    /// Index of its tensor's column 0 in the context array.
    pub ctx: u32,
    /// Column of its first value.
    pub first_col: u32,
    /// Padding.
    pub pad: u32,
}

// SAFETY: repr(C), only integers, no padding (40 bytes, checked by a test).
unsafe impl Pod for RansBlockArgs {}

/// A transform-coded section parsed for the GPU decoder: everything but the payload itself.
#[derive(Debug, Clone, PartialEq)]
pub struct RansPlan {
    /// Leading rows stored raw (their codes are the first bytes of the payload).
    pub sink_rows: usize,
    /// Rows coded by the streams (`shape.rows - sink_rows`).
    pub rows: usize,
    /// Columns (kv_heads x head_dim).
    pub cols: usize,
    /// Code tensors (layers x {K, V}).
    pub tensors: usize,
    /// Every tensor's tables in order, each symbol as `freq | cum << 16`, 256 per table.
    pub freq_cum: Vec<u32>,
    /// Every block of every tensor, in order.
    pub blocks: Vec<RansBlockArgs>,
    /// The 32 initial states of each block.
    pub states: Vec<u32>,
    /// Each tensor's context per column, `[tensors][cols]`.
    pub contexts: Vec<u8>,
}

impl RansPlan {
    /// Parses section parameters and payload of `shape` (checked like the CPU decoder does:
    /// counts, table sums, states, word counts, contexts within each stream's tables, no
    /// truncation and no trailing bytes). The words themselves are checked by the kernel.
    pub fn parse(shape: PlaneShape, params: &[u8], payload: &[u8]) -> Result<RansPlan, GpuError> {
        let codec = |e: CodecError| GpuError::Format(FormatError::Codec(e));
        if shape.bits != TRANSFORM_CODE_BITS {
            return Err(corrupt(format!("{} bits per code", shape.bits)));
        }
        let (sink_rows, contexts) = parse_rans_params(shape, params).map_err(codec)?;
        let (tensors, cols) = (shape.tensors, shape.cols);
        let rows = shape.rows - sink_rows;
        let n_values = rows * cols;
        let raw_len = sink_rows * cols * tensors * 2;
        if payload.len() < raw_len {
            return Err(corrupt("payload ends inside the sink rows"));
        }
        if u32::try_from(n_values).is_err() {
            return Err(GpuError::InvalidArgument(format!(
                "{n_values} values per tensor (the kernels count in 32 bits)"
            )));
        }
        let mut plan = RansPlan {
            sink_rows,
            rows,
            cols,
            tensors,
            freq_cum: Vec::new(),
            blocks: Vec::new(),
            states: Vec::new(),
            contexts: contexts.concat(),
        };
        let mut at = raw_len;
        for (t, ctx) in contexts.iter().enumerate() {
            let len = payload
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| corrupt(format!("payload ends before tensor {t}'s stream")))?;
            let start = at + 4;
            let stream = payload
                .get(start..start + len)
                .ok_or_else(|| corrupt(format!("tensor {t}'s stream is truncated")))?;
            at = start + len;
            let layout = StreamLayout::parse(stream, n_values).map_err(|e| codec(e.into()))?;
            if n_values > 0 && ctx.iter().any(|&c| usize::from(c) >= layout.tables.len()) {
                return Err(corrupt(format!(
                    "tensor {t} names a context beyond its {} tables",
                    layout.tables.len()
                )));
            }
            let lut = plan.freq_cum.len() / 256 * PROB_SCALE as usize;
            let lut = u32::try_from(lut + layout.tables.len() * PROB_SCALE as usize)
                .map(|_| lut as u32)
                .map_err(|_| GpuError::InvalidArgument("too many rANS tables".into()))?;
            for table in &layout.tables {
                plan.freq_cum.extend(
                    table
                        .freqs()
                        .iter()
                        .zip(table.cum())
                        .map(|(&f, &c)| u32::from(f) | u32::from(c) << 16),
                );
            }
            for (b, info) in layout.blocks.iter().enumerate() {
                let first = b * layout.block_values;
                plan.blocks.push(RansBlockArgs {
                    words: (start + layout.words_offset) as u64 + 2 * info.word_offset,
                    out: (t * n_values + first) as u64,
                    n_words: info.n_words,
                    n_values: layout.block_values.min(n_values - first) as u32,
                    lut,
                    ctx: (t * cols) as u32,
                    first_col: (first % cols.max(1)) as u32,
                    pad: 0,
                });
                plan.states.extend_from_slice(&info.states);
            }
        }
        if at != payload.len() {
            return Err(corrupt(format!(
                "{} bytes after the last stream",
                payload.len() - at
            )));
        }
        Ok(plan)
    }

    /// Frequency tables in the plan.
    pub fn tables(&self) -> usize {
        self.freq_cum.len() / 256
    }

    /// Levels the streams hold (`tensors x rows x cols`).
    pub fn levels(&self) -> usize {
        self.tensors * self.rows * self.cols
    }
}

/// The decoder's slot table of one frequency table given as `freq | cum << 16` per symbol:
/// the Rust mirror of `kvf_rans_build_luts` (same search), equal to the codec's
/// `FreqTable::decode_entries` (tested).
#[cfg(test)]
fn lut_entries(freq_cum: &[u32]) -> Vec<u32> {
    (0..PROB_SCALE)
        .map(|slot| {
            let (mut lo, mut hi) = (0usize, 255usize);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if freq_cum[mid] >> 16 <= slot {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            let (f, c) = (freq_cum[lo] & 0xffff, freq_cum[lo] >> 16);
            lo as u32 | (f.wrapping_sub(1) << 8) | (slot.wrapping_sub(c) << 20)
        })
        .collect()
}

/// The cos and sin tables (`[rows][pairs]`) of `rows` consecutive positions from `first`, from
/// [`Rope::angles`] (f64, rounded to f32), exactly what the CPU's inverse uses.
pub(crate) fn rope_tables(rope: &Rope, first: u32, rows: usize) -> (Vec<f32>, Vec<f32>) {
    let pairs = rope.pairs();
    let (mut cos, mut sin) = (
        Vec::with_capacity(rows * pairs),
        Vec::with_capacity(rows * pairs),
    );
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for r in 0..rows {
        rope.angles(first.wrapping_add(r as u32), &mut c, &mut s);
        cos.extend_from_slice(&c);
        sin.extend_from_slice(&s);
    }
    (cos, sin)
}

/// Rows per thread block of the inverse transform for `head_dim`: 256 threads of 4 x 4
/// outputs, `head_dim / 4` threads across a head (`tile_rows` of restore.cu).
pub(crate) fn tile_rows(head_dim: usize) -> usize {
    4 * (BLOCK as usize / (head_dim / 4).max(1))
}

/// A profile's bases and means as the inverse-transform kernel reads them: tensor `2 * layer
/// + {0: K, 1: V}`, then head; bases `head_dim x head_dim` (row k = component k), means
/// `head_dim`.
pub(crate) fn profile_arrays(profile: &CodecProfile) -> (Vec<f32>, Vec<f32>) {
    let (mut bases, mut means) = (Vec::new(), Vec::new());
    for layer in &profile.layers {
        for t in [&layer.key, &layer.value] {
            for h in &t.heads {
                bases.extend_from_slice(&h.basis);
                means.extend_from_slice(&h.mean);
            }
        }
    }
    (bases, means)
}

/// Positions the cached RoPE table of a [`DeviceProfile`] covers at most (64 MB for 64 pairs);
/// sections beyond get a table of their own.
const MAX_CACHED_POSITIONS: u32 = 1 << 17;

/// cos and sin of positions `0..positions`, `[positions][pairs]` each, in device memory.
struct RopeTable {
    positions: u32,
    cos: DeviceBuffer,
    sin: DeviceBuffer,
}

/// A profile's bases and means in device memory (a few MB), uploaded once per device, and its
/// RoPE cos/sin table by position (computed on the host in f64 like the CPU's, grown on
/// demand: a section's own table would cost the host ~rows x pairs transcendentals).
pub struct DeviceProfile {
    cuda: Arc<Cuda>,
    bases: DeviceBuffer,
    means: DeviceBuffer,
    layers: usize,
    heads: usize,
    head_dim: usize,
    rope: Rope,
    rope_table: Mutex<Option<Arc<RopeTable>>>,
}

impl std::fmt::Debug for DeviceProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceProfile")
            .field("layers", &self.layers)
            .field("heads", &self.heads)
            .field("head_dim", &self.head_dim)
            .finish()
    }
}

impl DeviceProfile {
    /// Uploads `profile` (checked to be complete: every head of every tensor has its basis).
    pub fn upload(cuda: &Arc<Cuda>, profile: &CodecProfile) -> Result<DeviceProfile, GpuError> {
        let d = profile.head_dim;
        let (bases, means) = profile_arrays(profile);
        let heads = profile.layers.len() * 2 * profile.kv_heads;
        if bases.len() != heads * d * d || means.len() != heads * d {
            return Err(GpuError::InvalidArgument(
                "profile bases or means do not match its shape".into(),
            ));
        }
        Ok(DeviceProfile {
            cuda: cuda.clone(),
            rope_table: Mutex::new(None),
            bases: cuda.upload(&bases)?,
            means: cuda.upload(&means)?,
            layers: profile.layers.len(),
            heads: profile.kv_heads,
            head_dim: d,
            rope: profile.rope,
        })
    }
}

impl DeviceProfile {
    /// The cached table covering positions `..end` (grown to the next power of two, at least
    /// 4096), or `None` beyond [`MAX_CACHED_POSITIONS`].
    fn rope_table(&self, end: u32) -> Result<Option<Arc<RopeTable>>, GpuError> {
        if end > MAX_CACHED_POSITIONS {
            return Ok(None);
        }
        let mut cached = self.rope_table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cached.as_ref().filter(|t| t.positions >= end) {
            return Ok(Some(t.clone()));
        }
        let positions = end.next_power_of_two().clamp(4096, MAX_CACHED_POSITIONS);
        let (cos, sin) = rope_tables(&self.rope, 0, positions as usize);
        let t = Arc::new(RopeTable {
            positions,
            cos: self.cuda.upload(&cos)?,
            sin: self.cuda.upload(&sin)?,
        });
        *cached = Some(t.clone());
        Ok(Some(t))
    }
}

/// `RansDecode` of restore.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RansDecodeArgs {
    blocks: u64,
    states: u64,
    luts: u64,
    freq_cum: u64,
    contexts: u64,
    words: u64,
    levels: u64,
    err: u64,
    n_blocks: u32,
    cols: u32,
}

/// `TransformArgs` of restore.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct TransformArgs {
    levels: u64,
    steps: u64,
    bases: u64,
    means: u64,
    cos: u64,
    sin: u64,
    err: u64,
    rows: u32,
    sink_rows: u32,
    cols: u32,
    heads: u32,
    head_dim: u32,
    tensor0: u32,
    rope_style: u32,
    rope_dims: u32,
    chunk_dtype: u32,
    tile_rows: u32,
    rope_first: u32,
    pad: u32,
}

/// The kernels' code of a chunk dtype (the transform route takes 16-bit chunks only).
fn chunk_dtype_code(d: DType) -> Option<u32> {
    match d {
        DType::F16 => Some(0),
        DType::BF16 => Some(1),
        _ => None,
    }
}

/// Why the GPU transform route cannot restore section `index` of `header` (the caller then
/// restores on the CPU); `Ok` when it can.
pub(crate) fn transform_supported(header: &ChunkHeader, index: usize) -> Result<(), String> {
    let s = header
        .sections
        .get(index)
        .ok_or_else(|| format!("no section {index}"))?;
    if chunk_dtype_code(header.dtype).is_none() {
        return Err(format!("{:?} transform-coded chunk", header.dtype));
    }
    let d = usize::from(header.head_dim);
    if d == 0 || !d.is_multiple_of(8) || d > MAX_GPU_HEAD_DIM {
        return Err(format!(
            "head_dim {d} is not a multiple of 8 up to {MAX_GPU_HEAD_DIM}"
        ));
    }
    if s.shape != header.section_shape(s.layers(), TRANSFORM_CODE_BITS) {
        return Err("section shape does not match the header".into());
    }
    Ok(())
}

/// Launches a kernel of the restore module.
///
/// # Safety
/// As for `Cuda::launch`: `params` point to live values of exactly the kernel's argument
/// types, and every device pointer among them is valid for the kernel's accesses.
unsafe fn launch(
    kernels: &RestoreKernels,
    name: &str,
    grid: (u32, u32),
    stream: &Stream,
    params: &mut [*mut c_void],
) -> Result<(), GpuError> {
    let f = kernels.module().function(name)?;
    // SAFETY: upheld by the caller.
    unsafe { kernels.cuda().launch(&f, grid, BLOCK, stream, params) }
}

/// Device memory for one section: fresh or pooled allocations, held until the caller has
/// synchronised the stream (dropping this earlier could free memory queued work reads).
pub trait Scratch {
    /// `bytes` of device memory, kept alive as long as `self` (or the returned Arc).
    fn alloc(&mut self, bytes: usize) -> Result<Arc<DeviceBuffer>, GpuError>;
    /// `len` bytes written by `fill`, copied into device memory in the order of the section's
    /// stream (the daemon's: from pinned staging memory, one DMA copy).
    fn upload_image(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Arc<DeviceBuffer>, GpuError>;
    /// Waits for the stream's queued work and reads the first `out.len()` bytes of `src`.
    fn finish_and_read(&mut self, src: &DeviceBuffer, out: &mut [u8]) -> Result<(), GpuError>;
    /// The section's stream.
    fn stream(&self) -> &Stream;
}

/// A [`Scratch`] of fresh allocations and synchronous uploads on a stream of its own, for
/// checks and benchmarks (the daemon's sections use pooled memory instead). Fields drop in
/// order: the stream waits for its work before the memory goes.
pub struct OwnedScratch {
    stream: Stream,
    cuda: Arc<Cuda>,
    held: Vec<Arc<DeviceBuffer>>,
}

impl OwnedScratch {
    /// An empty scratch with a new stream of `cuda`.
    pub fn new(cuda: &Arc<Cuda>) -> Result<OwnedScratch, GpuError> {
        Ok(OwnedScratch {
            stream: cuda.stream()?,
            cuda: cuda.clone(),
            held: Vec::new(),
        })
    }
}

impl Scratch for OwnedScratch {
    fn alloc(&mut self, bytes: usize) -> Result<Arc<DeviceBuffer>, GpuError> {
        let b = Arc::new(self.cuda.alloc(bytes.max(16))?);
        self.held.push(b.clone());
        Ok(b)
    }

    fn upload_image(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Arc<DeviceBuffer>, GpuError> {
        let mut image = vec![0u8; len];
        fill(&mut image);
        let b = Arc::new(self.cuda.upload(&image)?);
        self.held.push(b.clone());
        Ok(b)
    }

    fn finish_and_read(&mut self, src: &DeviceBuffer, out: &mut [u8]) -> Result<(), GpuError> {
        self.stream.synchronize()?;
        src.read(out)
    }

    fn stream(&self) -> &Stream {
        &self.stream
    }
}

/// The bytes of a Pod slice.
fn bytes_of<T: Pod>(data: &[T]) -> &[u8] {
    // SAFETY: T is Pod (plain bytes, no padding), so its slice is readable as bytes.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

/// The parts of a section's upload image, in one pinned buffer and one device buffer.
struct Image<'a> {
    layout: ImageLayout,
    parts: Vec<(usize, &'a [u8])>,
}

impl<'a> Image<'a> {
    fn new() -> Image<'a> {
        Image {
            layout: ImageLayout::default(),
            parts: Vec::new(),
        }
    }

    /// Appends `data`; returns its offset in the image.
    fn push<T: Pod>(&mut self, data: &'a [T]) -> usize {
        let bytes = bytes_of(data);
        let at = self.layout.push(bytes.len());
        self.parts.push((at, bytes));
        at
    }

    /// Uploads the image through `scratch` (gaps zeroed).
    fn upload(&self, scratch: &mut dyn Scratch) -> Result<Arc<DeviceBuffer>, GpuError> {
        let parts = &self.parts;
        scratch.upload_image(self.layout.len(), &mut |image: &mut [u8]| {
            let mut end = 0;
            for &(at, bytes) in parts {
                image[end..at].fill(0);
                image[at..at + bytes.len()].copy_from_slice(bytes);
                end = at + bytes.len();
            }
            image[end..].fill(0);
        })
    }
}

/// What the section restore needs besides the payload.
#[derive(Debug, Clone, Copy)]
pub struct TransformSection<'a> {
    /// The chunk's header (dtype, token start, the transform block with the steps).
    pub header: &'a ChunkHeader,
    /// Which section.
    pub index: usize,
    /// Its payload (crc already checked).
    pub payload: &'a [u8],
}

/// Restores a transform-coded section into `target` (built with [`DeviceTarget::for_values`]
/// over the section's `2 x layers` tensors and `token_count` rows) on the scratch's stream,
/// with `profile` (the chunk's, checked by the caller against the header's model). Queues
/// everything, waits for the stream and returns a [`GpuError::Format`] if the decoder flagged
/// the streams (the engine's buffer is then untouched by this section). On an error before
/// that wait, work may still be queued: the scratch must wait for its stream before it frees
/// memory (both implementations here do).
pub fn restore_transform_section(
    kernels: &RestoreKernels,
    profile: &DeviceProfile,
    section: TransformSection<'_>,
    target: &DeviceTarget,
    scratch: &mut dyn Scratch,
) -> Result<(), GpuError> {
    let (args, geometry) = (target.launch_args(), target.geometry());
    restore_transform_with(kernels, profile, section, args, geometry, scratch)
}

/// [`restore_transform_section`] with the target's launch arguments and geometry (the
/// caller keeps the target alive until the stream is done).
pub(crate) fn restore_transform_with(
    kernels: &RestoreKernels,
    profile: &DeviceProfile,
    section: TransformSection<'_>,
    mut targs: RestoreTargetArgs,
    g: CodeGeometry,
    scratch: &mut dyn Scratch,
) -> Result<(), GpuError> {
    let TransformSection {
        header,
        index,
        payload,
    } = section;
    transform_supported(header, index).map_err(GpuError::Unsupported)?;
    let t = header
        .transform
        .as_ref()
        .ok_or_else(|| GpuError::InvalidArgument("not a transform-coded chunk".into()))?;
    let s = &header.sections[index];
    let chunk_dtype = chunk_dtype_code(header.dtype).unwrap_or(0);
    let (d, heads) = (usize::from(header.head_dim), usize::from(header.kv_heads));
    if profile.head_dim != d
        || profile.heads != heads
        || profile.layers != usize::from(header.num_layers)
    {
        return Err(GpuError::Format(FormatError::ProfileMismatch(format!(
            "device profile of {} layers x {} heads x {}, chunk of {} x {heads} x {d}",
            profile.layers, profile.heads, profile.head_dim, header.num_layers
        ))));
    }
    if g.tensors != s.shape.tensors || g.rows != s.shape.rows || g.cols != s.shape.cols {
        return Err(GpuError::InvalidArgument(format!(
            "target of {g:?} for a section of {:?}",
            s.shape
        )));
    }
    let plan = RansPlan::parse(s.shape, &s.params, payload)?;
    if plan.sink_rows != usize::from(t.sink_tokens) {
        return Err(GpuError::Format(FormatError::Inconsistent(format!(
            "section {index} has {} sink rows, the header {}",
            plan.sink_rows, t.sink_tokens
        ))));
    }
    let steps: Vec<f32> = (0..plan.tensors)
        .map(|i| {
            let layer = usize::from(s.layer_start) + i / 2;
            t.steps
                .get(layer)
                .map(|&(k, v)| if i % 2 == 0 { k } else { v })
        })
        .collect::<Option<_>>()
        .ok_or_else(|| GpuError::Format(FormatError::Inconsistent("missing steps".into())))?;
    let first_position = header.token_start.wrapping_add(plan.sink_rows as u32);
    let rope_on = profile.rope.style != RopeStyle::None && plan.rows > 0;
    // The profile's cached table by position, or (far positions) one for this section.
    let end = first_position.checked_add(plan.rows as u32);
    let cached = match end {
        Some(end) if rope_on => profile.rope_table(end)?,
        _ => None,
    };
    let (cos, sin) = if rope_on && cached.is_none() {
        rope_tables(&profile.rope, first_position, plan.rows)
    } else {
        (Vec::new(), Vec::new())
    };
    if rope_on && usize::from(profile.rope.dims) > d {
        return Err(GpuError::Format(FormatError::ProfileMismatch(
            "rope dims beyond the head".into(),
        )));
    }

    // Everything the kernels read, in one image: one pinned copy and one DMA per section.
    // The error flag goes first (read back below), the payload next (256-byte aligned, as the
    // sinks kernel's 8-byte loads need).
    let err_init = [0u32, u32::MAX];
    let decode = plan.levels() > 0;
    let mut image = Image::new();
    let at_err = image.push(&err_init);
    let at_words = image.push(payload);
    let mut at = [0usize; 7];
    if decode {
        at = [
            image.push(&plan.freq_cum),
            image.push(&plan.blocks),
            image.push(&plan.states),
            image.push(&plan.contexts),
            image.push(&steps),
            image.push(&cos),
            image.push(&sin),
        ];
    }
    let up = image.upload(scratch)?;
    let dev = |offset: usize| up.ptr() + offset as u64;
    let (err_ptr, words_ptr) = (dev(at_err), dev(at_words));
    if decode {
        let [at_fc, at_blocks, at_states, at_contexts, at_steps, at_cos, at_sin] = at;
        let luts = scratch.alloc(plan.tables() * PROB_SCALE as usize)?;
        let levels = scratch.alloc(plan.levels() * 2)?;
        let (cos_ptr, sin_ptr, rope_first) = match &cached {
            Some(t) => (t.cos.ptr(), t.sin.ptr(), first_position),
            None => (dev(at_cos), dev(at_sin), 0),
        };
        let stream = scratch.stream();

        let (mut fc_ptr, mut lut_ptr, mut n_tables) =
            (dev(at_fc), luts.ptr(), plan.tables() as u32);
        let mut params = [
            (&mut fc_ptr as *mut u64).cast::<c_void>(),
            (&mut lut_ptr as *mut u64).cast(),
            (&mut n_tables as *mut u32).cast(),
        ];
        // SAFETY: (const unsigned*, uint8_t*, unsigned) as declared; freq_cum holds 256
        // entries per table and luts 4096 bytes per table (both sized from plan.tables()).
        unsafe {
            launch(
                kernels,
                "kvf_rans_build_luts",
                (plan.tables().clamp(1, 65_535) as u32, 1),
                stream,
                &mut params,
            )?;
        }
        let mut dargs = RansDecodeArgs {
            blocks: dev(at_blocks),
            states: dev(at_states),
            luts: luts.ptr(),
            freq_cum: dev(at_fc),
            contexts: dev(at_contexts),
            words: words_ptr,
            levels: levels.ptr(),
            err: err_ptr,
            n_blocks: plan.blocks.len() as u32,
            cols: plan.cols as u32,
        };
        let mut params = [(&mut dargs as *mut RansDecodeArgs).cast::<c_void>()];
        let grid = plan.blocks.len().div_ceil(WARPS).clamp(1, 1 << 20) as u32;
        // SAFETY: RansDecode by value as declared. The plan was parsed from this payload:
        // every block's words lie within it (StreamLayout checked the lengths and the kernel
        // never reads beyond n_words), `out + n_values` is within the levels scratch, `lut`
        // + context * 4096 + slot is within the symbol tables and `lut / 16 + context * 256
        // + symbol` within freq_cum (contexts were checked against each stream's table count)
        // and `ctx + col` within the contexts.
        unsafe { launch(kernels, "kvf_rans_decode", (grid, 1), stream, &mut params)? };

        let tile = tile_rows(d);
        let mut xargs = TransformArgs {
            levels: levels.ptr(),
            steps: dev(at_steps),
            bases: profile.bases.ptr(),
            means: profile.means.ptr(),
            cos: cos_ptr,
            sin: sin_ptr,
            err: err_ptr,
            rows: plan.rows as u32,
            sink_rows: plan.sink_rows as u32,
            cols: plan.cols as u32,
            heads: heads as u32,
            head_dim: d as u32,
            tensor0: 2 * u32::from(s.layer_start),
            rope_style: match profile.rope.style {
                RopeStyle::None => 0,
                RopeStyle::Adjacent => 1,
                RopeStyle::Halves => 2,
            },
            rope_dims: if rope_on {
                u32::from(profile.rope.dims)
            } else {
                0
            },
            chunk_dtype,
            tile_rows: tile as u32,
            rope_first,
            pad: 0,
        };
        let grid = (
            u32::try_from(plan.rows.div_ceil(tile) * heads)
                .map_err(|_| GpuError::InvalidArgument("too many row tiles".into()))?,
            plan.tensors as u32,
        );
        let mut params = [
            (&mut xargs as *mut TransformArgs).cast::<c_void>(),
            (&mut targs as *mut RestoreTargetArgs).cast(),
        ];
        // SAFETY: (TransformArgs, RestoreTarget) by value as declared. Levels hold tensors x
        // rows x cols values; steps one per tensor; the profile's layer range covers the
        // section (its shape was checked against the header, and the header's sections lie
        // within its layers); cos/sin hold pairs entries for table rows rope_first..rope_first + rows (the cached table covers ..end, a section table rows); the target was validated for
        // token_count rows (sink_rows + rows) of cols columns by DeviceTarget.
        unsafe { launch(kernels, "kvf_inverse_transform", grid, stream, &mut params)? };
    }
    let stream = scratch.stream();
    if plan.sink_rows > 0 {
        let (mut raw, mut sinks, mut cd, mut err_ptr) =
            (words_ptr, plan.sink_rows as u32, chunk_dtype, err_ptr);
        let groups = plan.sink_rows * plan.cols / 4;
        let mut params = [
            (&mut raw as *mut u64).cast::<c_void>(),
            (&mut sinks as *mut u32).cast(),
            (&mut cd as *mut u32).cast(),
            (&mut err_ptr as *mut u64).cast(),
            (&mut targs as *mut RestoreTargetArgs).cast(),
        ];
        let grid = (
            groups.div_ceil(BLOCK as usize).clamp(1, 1024) as u32,
            plan.tensors as u32,
        );
        // SAFETY: (const uint16_t*, unsigned, unsigned, const unsigned*, RestoreTarget) as
        // declared; the payload starts with tensors x sink_rows x cols raw values (checked by
        // the plan) at a pooled, 256-byte aligned address, and the target was validated for
        // every row.
        unsafe { launch(kernels, "kvf_restore_sinks", grid, stream, &mut params)? };
    }
    let mut flag_bytes = [0u8; 8];
    scratch.finish_and_read(&up, &mut flag_bytes)?;
    let flag: [u32; 2] = std::array::from_fn(|i| {
        u32::from_ne_bytes(flag_bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"))
    });
    if flag[0] != 0 {
        return Err(corrupt(format!(
            "section {index}: rANS block {} failed its check ({})",
            flag[1],
            decode_error_reason(flag[0])
        )));
    }
    Ok(())
}

/// The decoder's error bits in words (restore.cu's `KVF_RANS_*`).
pub(crate) fn decode_error_reason(bits: u32) -> String {
    let names = [
        (1, "word stream exhausted"),
        (2, "escaped value below 255"),
        (4, "final state is not 2^16"),
        (8, "words left over"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|&(_, n)| n)
        .collect();
    if v.is_empty() {
        format!("error bits {bits:#x}")
    } else {
        v.join(", ")
    }
}

/// The chunk lanes per block (re-exported for the kernels' warp size assumption).
const _: () = assert!(LANES == 32);

#[cfg(test)]
mod tests {
    use super::*;
    use kvfetcher_codec::rans::FreqTable;
    use kvfetcher_codec::SectionDecoder;

    #[test]
    fn args_match_the_cuda_structs() {
        assert_eq!(std::mem::size_of::<RansBlockArgs>(), 40);
        assert_eq!(std::mem::size_of::<RansDecodeArgs>(), 72);
        assert_eq!(std::mem::size_of::<TransformArgs>(), 104);
    }

    /// The device table build (mirrored) equals the CPU decoder's entries for skewed tables,
    /// tables with frequency-0 symbols between others, a one-symbol table and a flat one.
    #[test]
    fn lut_build_matches_the_cpu_decoder_tables() {
        let mut cases: Vec<[u64; 256]> = Vec::new();
        let mut c = [0u64; 256];
        for (s, v) in c.iter_mut().enumerate().take(60) {
            *v = if s % 3 == 1 {
                0
            } else {
                10_000 / (s as u64 + 1)
            };
        }
        c[255] = 7;
        cases.push(c);
        let mut one = [0u64; 256];
        one[9] = 3;
        cases.push(one);
        cases.push([1; 256]);
        cases.push([0; 256]);
        let mut last = [0u64; 256];
        last[255] = 1;
        last[0] = 1;
        cases.push(last);
        for counts in &cases {
            let t = FreqTable::from_counts(counts);
            let fc: Vec<u32> = t
                .freqs()
                .iter()
                .zip(t.cum())
                .map(|(&f, &c)| u32::from(f) | u32::from(c) << 16)
                .collect();
            assert_eq!(lut_entries(&fc), t.decode_entries());
        }
    }

    #[test]
    fn rope_tables_are_the_cpu_angles() {
        let rope = Rope {
            style: RopeStyle::Halves,
            dims: 8,
            base: 10000.0,
            freq_scale: 1.0,
        };
        let (cos, sin) = rope_tables(&rope, 100, 3);
        assert_eq!(cos.len(), 12);
        let (mut c, mut s) = (Vec::new(), Vec::new());
        rope.angles(102, &mut c, &mut s);
        assert_eq!(&cos[8..], &c[..]);
        assert_eq!(&sin[8..], &s[..]);
        assert_eq!(rope_tables(&Rope::NONE, 0, 5).0.len(), 0);
    }

    #[test]
    fn tiles_fit_the_shared_memory() {
        for d in (8..=MAX_GPU_HEAD_DIM).step_by(8) {
            let tm = tile_rows(d);
            assert!(tm >= 4 && tm.is_multiple_of(4), "{d}");
            // The kernel's shared tile: head_dim x (tile_rows + 4) floats, at most 8192.
            assert!(d * (tm + 4) <= 8192, "{d}: {tm}");
            // Every thread that has a row group has all four rows inside the tile.
            assert!((BLOCK as usize / (d / 4)) * 4 == tm);
        }
        assert_eq!(tile_rows(128), 32);
    }

    /// `kvf_rans_decode` in Rust over a plan: the warp's ballot ranks as a running count in
    /// lane order. Returns the levels or the error bits.
    fn emulate_decode(plan: &RansPlan, payload: &[u8]) -> Result<Vec<i16>, u32> {
        let luts: Vec<u32> = plan.freq_cum.chunks(256).flat_map(lut_entries).collect();
        let mut levels = vec![0i16; plan.levels()];
        let word = |at: u64, i: u32| {
            let p = (at + 2 * u64::from(i)) as usize;
            u32::from(u16::from_le_bytes([payload[p], payload[p + 1]]))
        };
        for (b, blk) in plan.blocks.iter().enumerate() {
            let mut x: Vec<u32> = plan.states[b * 32..b * 32 + 32].to_vec();
            let mut col: Vec<usize> = (0..32)
                .map(|l| (blk.first_col as usize + l) % plan.cols)
                .collect();
            let mut pos = 0u32;
            for base in (0..blk.n_values).step_by(32) {
                let mut sym = [0u32; 32];
                let active = |l: usize| base + (l as u32) < blk.n_values;
                for l in (0..32).filter(|&l| active(l)) {
                    let ctx = u32::from(plan.contexts[blk.ctx as usize + col[l]]);
                    let e = luts[(blk.lut + (ctx << 12) + (x[l] & 4095)) as usize];
                    x[l] = ((e >> 8) & 0xfff).wrapping_add(1) * (x[l] >> 12) + (e >> 20);
                    sym[l] = e & 0xff;
                }
                let need: Vec<usize> = (0..32).filter(|&l| active(l) && x[l] < 1 << 16).collect();
                if pos + need.len() as u32 > blk.n_words {
                    return Err(1);
                }
                for (rank, &l) in need.iter().enumerate() {
                    x[l] = (x[l] << 16) | word(blk.words, pos + rank as u32);
                }
                pos += need.len() as u32;
                let esc: Vec<usize> = (0..32).filter(|&l| active(l) && sym[l] == 255).collect();
                if pos + esc.len() as u32 > blk.n_words {
                    return Err(1);
                }
                for (rank, &l) in esc.iter().enumerate() {
                    sym[l] = word(blk.words, pos + rank as u32);
                    if sym[l] < 255 {
                        return Err(2);
                    }
                }
                pos += esc.len() as u32;
                for l in (0..32).filter(|&l| active(l)) {
                    let z = sym[l];
                    let q = ((z >> 1) as i32) ^ -((z & 1) as i32);
                    levels[(blk.out + u64::from(base) + l as u64) as usize] = q as i16;
                    col[l] = (col[l] + 32) % plan.cols;
                }
            }
            if x.iter().any(|&s| s != 1 << 16) {
                return Err(4);
            }
            if pos != blk.n_words {
                return Err(8);
            }
        }
        Ok(levels)
    }

    /// A rans section built with the codec's public encoder: 3 tensors, 2 sink rows, varied
    /// contexts per column, levels with escapes, several blocks per tensor.
    fn section() -> (PlaneShape, Vec<u8>, Vec<u8>, Vec<Vec<i32>>) {
        let (tensors, rows, cols, sinks) = (3usize, 70usize, 24usize, 2usize);
        let shape = PlaneShape {
            bits: TRANSFORM_CODE_BITS,
            tensors,
            rows,
            cols,
        };
        let mut params = (sinks as u16).to_le_bytes().to_vec();
        let mut payload: Vec<u8> = (0..tensors * sinks * cols * 2).map(|i| i as u8).collect();
        let mut seed = 0x2545_f491u32;
        let mut all = Vec::new();
        for t in 0..tensors {
            let ctx: Vec<u8> = (0..cols).map(|c| ((c / 5 + t) % 4) as u8).collect();
            for c in &ctx {
                params.extend_from_slice(&1u16.to_le_bytes());
                params.push(*c);
            }
            let levels: Vec<i32> = (0..(rows - sinks) * cols)
                .map(|i| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    let spread = 1 + 3 * i32::from(ctx[i % cols]);
                    match seed % 97 {
                        0 => 300 + (seed % 20_000) as i32,
                        1 => -32768,
                        _ => (seed % (2 * spread as u32 + 1)) as i32 - spread,
                    }
                })
                .collect();
            let stream = kvfetcher_codec::rans::encode_tensor(&levels, &ctx, 4, 256).unwrap();
            payload.extend_from_slice(&(stream.len() as u32).to_le_bytes());
            payload.extend_from_slice(&stream);
            all.push(levels);
        }
        (shape, params, payload, all)
    }

    #[test]
    fn plan_and_decoder_mirror_give_the_encoded_levels() {
        let (shape, params, payload, levels) = section();
        let plan = RansPlan::parse(shape, &params, &payload).unwrap();
        assert_eq!((plan.sink_rows, plan.rows, plan.tensors), (2, 68, 3));
        assert_eq!(plan.blocks.len(), 3 * (68 * 24usize).div_ceil(256));
        assert_eq!(plan.states.len(), 32 * plan.blocks.len());
        let got = emulate_decode(&plan, &payload).unwrap();
        let want: Vec<i16> = levels.concat().iter().map(|&q| q as i16).collect();
        assert_eq!(got, want);
        // The codec's own decoder agrees on the same bytes.
        let plane = kvfetcher_codec::RansCodec
            .decode(shape, &params, &payload)
            .unwrap();
        assert_eq!(plane.codes.len(), shape.len());
    }

    #[test]
    fn corrupt_words_are_flagged_and_bad_layouts_refused() {
        let (shape, params, payload, _) = section();
        let plan = RansPlan::parse(shape, &params, &payload).unwrap();
        // Flip one byte inside the words of every block in turn (a sample): the mirror flags it
        // or, where a flip happens to decode, the CPU decoder also accepts the bytes.
        let mut flagged = 0;
        for blk in plan.blocks.iter().filter(|b| b.n_words > 0).step_by(3) {
            let mut bad = payload.clone();
            let at = blk.words as usize + blk.n_words as usize;
            bad[at] ^= 0x5a;
            let cpu = kvfetcher_codec::RansCodec.decode(shape, &params, &bad);
            match emulate_decode(&plan, &bad) {
                Err(bits) => {
                    flagged += 1;
                    assert!(!decode_error_reason(bits).is_empty());
                    assert!(cpu.is_err(), "the CPU accepts what the GPU flags");
                }
                Ok(_) => assert!(cpu.is_ok(), "the GPU accepts what the CPU refuses"),
            }
        }
        assert!(flagged > 0);
        assert!(RansPlan::parse(shape, &params, &payload[..payload.len() - 1]).is_err());
        let mut longer = payload.clone();
        longer.push(0);
        assert!(RansPlan::parse(shape, &params, &longer).is_err());
        assert!(RansPlan::parse(shape, &params[..params.len() - 3], &payload).is_err());
    }

    #[test]
    fn error_bits_read_as_words() {
        assert_eq!(
            decode_error_reason(5),
            "word stream exhausted, final state is not 2^16"
        );
        assert_eq!(decode_error_reason(16), "error bits 0x10");
    }
}
