//! Restore: quantized codes -> dequantized KV written straight into the engine's layout.
//!
//! [`RestoreKernels`] runs the PTX kernels of `daemon/kernels/restore.cu` on codes in device
//! memory, on bit-packed codes (the `packed` variant, straight from a host-to-device copy), or on
//! NVDEC's decoded surfaces. [`restore_cpu`] is the bit-exact CPU reference of the same math:
//! `(code as f32).mul_add(scale, min)` rounded to nearest-even into f16/bf16, or kept as f32, as
//! `kvfetcher_codec::dequantize` defines it. [`TargetSpec::offset`] is the target layout math.

use std::ffi::c_void;
use std::sync::Arc;

use half::{bf16, f16};
use kvfetcher_codec::{Chroma, Grouping};
use kvfetcher_protocol::{DType, TokenOrder};

use super::cuda::{Cuda, DeviceBuffer, Module, Stream};
use super::nvdec::DeviceFrames;
use super::pinned::{PinnedBuffer, PinnedPool};
use super::pool::MemoryPool;
use super::GpuError;

/// The committed PTX of `daemon/kernels/restore.cu` (regenerate with `scripts/gen-ptx.sh`).
pub(crate) const RESTORE_PTX: &str = include_str!("../../kernels/restore.ptx");

/// Threads per block of every restore kernel (its `__launch_bounds__`).
const BLOCK: u32 = 256;

/// The kernels' code for an element type (`restore.cu`'s `DTYPE_*`).
fn dtype_code(d: DType) -> u32 {
    match d {
        DType::F16 => 0,
        DType::BF16 => 1,
        DType::F32 => 2,
    }
}

/// Where restored values go: one target tensor per code tensor, all with the same geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// Axis order.
    pub layout: TokenOrder,
    /// Element type.
    pub dtype: DType,
    /// KV heads.
    pub heads: usize,
    /// Channels per head (a multiple of 8).
    pub head_dim: usize,
    /// Target token of code row 0.
    pub token_offset: usize,
    /// Token capacity of each contiguous target tensor (ignored when paged).
    pub target_tokens: usize,
    /// Paged targets: tokens per block and the block table (logical block -> physical block).
    pub paged: Option<(usize, Vec<i32>)>,
}

impl TargetSpec {
    /// Element offset of code `(row, col)` in its target tensor.
    pub fn offset(&self, row: usize, col: usize) -> usize {
        let token = self.token_offset + row;
        let (head, d) = (col / self.head_dim, col % self.head_dim);
        match (&self.paged, self.layout) {
            (Some((bs, table)), TokenOrder::Nhd) => {
                let phys = table[token / bs] as usize;
                ((phys * bs + token % bs) * self.heads + head) * self.head_dim + d
            }
            (Some((bs, table)), TokenOrder::Hnd) => {
                let phys = table[token / bs] as usize;
                ((phys * self.heads + head) * bs + token % bs) * self.head_dim + d
            }
            (None, TokenOrder::Nhd) => (token * self.heads + head) * self.head_dim + d,
            (None, TokenOrder::Hnd) => (head * self.target_tokens + token) * self.head_dim + d,
        }
    }

    /// Elements each target tensor must hold.
    pub fn elements(&self) -> usize {
        match &self.paged {
            Some((bs, table)) => {
                let blocks = table
                    .iter()
                    .map(|&b| b.max(0) as usize + 1)
                    .max()
                    .unwrap_or(0);
                blocks * bs * self.heads * self.head_dim
            }
            None => self.target_tokens * self.heads * self.head_dim,
        }
    }

    /// Checks that `rows x cols` codes fit this target.
    pub fn validate(&self, rows: usize, cols: usize) -> Result<(), GpuError> {
        let bad = |m: String| Err(GpuError::InvalidArgument(m));
        if self.head_dim == 0
            || !self.head_dim.is_multiple_of(8)
            || cols != self.heads * self.head_dim
        {
            return bad(format!(
                "cols {cols} != heads {} x head_dim {} (a multiple of 8)",
                self.heads, self.head_dim
            ));
        }
        let last = self.token_offset + rows;
        match &self.paged {
            Some((bs, table)) => {
                if *bs == 0 || table.len() * bs < last || table.iter().any(|&b| b < 0) {
                    return bad("block table too short or negative".into());
                }
            }
            None => {
                if last > self.target_tokens {
                    return bad(format!(
                        "tokens up to {last} exceed the target's {}",
                        self.target_tokens
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Scales and mins of one section, `[tensors][groups]` each.
#[derive(Debug, Clone, PartialEq)]
pub struct Dequant {
    /// Grouping of the arrays.
    pub grouping: Grouping,
    /// Scales.
    pub scales: Vec<f32>,
    /// Mins.
    pub mins: Vec<f32>,
}

/// The geometry of the codes being restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeGeometry {
    /// Code tensors (layers x {K, V}).
    pub tensors: usize,
    /// Rows (tokens).
    pub rows: usize,
    /// Columns (kv_heads x head_dim).
    pub cols: usize,
}

impl CodeGeometry {
    /// Number of codes.
    pub fn len(&self) -> usize {
        self.tensors * self.rows * self.cols
    }

    /// Whether there are no codes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn group_of(grouping: Grouping, g: CodeGeometry, t: usize, row: usize, col: usize) -> usize {
    match grouping {
        Grouping::PerChannel => t * g.cols + col,
        Grouping::PerToken => t * g.rows + row,
    }
}

fn check_dequant(g: CodeGeometry, q: &Dequant) -> Result<(), GpuError> {
    let groups = match q.grouping {
        Grouping::PerChannel => g.tensors * g.cols,
        Grouping::PerToken => g.tensors * g.rows,
    };
    if q.scales.len() != groups || q.mins.len() != groups {
        return Err(GpuError::InvalidArgument(format!(
            "{} scales for {groups} groups",
            q.scales.len()
        )));
    }
    Ok(())
}

/// The CPU reference: writes every code of `codes` (`[tensors][rows][cols]`) into `outs[t]`
/// (raw little-endian bytes of `target.elements()` elements each).
pub fn restore_cpu(
    g: CodeGeometry,
    codes: &[u16],
    q: &Dequant,
    target: &TargetSpec,
    outs: &mut [Vec<u8>],
) -> Result<(), GpuError> {
    check_dequant(g, q)?;
    target.validate(g.rows, g.cols)?;
    if codes.len() != g.len() || outs.len() != g.tensors {
        return Err(GpuError::InvalidArgument(
            "codes or outputs do not match the geometry".into(),
        ));
    }
    let size = target.dtype.size();
    for (t, out) in outs.iter_mut().enumerate() {
        out.resize(target.elements() * size, 0);
        for row in 0..g.rows {
            for col in 0..g.cols {
                let code = codes[(t * g.rows + row) * g.cols + col];
                let k = group_of(q.grouping, g, t, row, col);
                let v = f32::from(code).mul_add(q.scales[k], q.mins[k]);
                let at = target.offset(row, col) * size;
                match target.dtype {
                    DType::F16 => out[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes()),
                    DType::BF16 => {
                        out[at..at + 2].copy_from_slice(&bf16::from_f32(v).to_le_bytes())
                    }
                    DType::F32 => out[at..at + 4].copy_from_slice(&v.to_le_bytes()),
                }
            }
        }
    }
    Ok(())
}

/// `FastDiv` of restore.cu: division by `d` as a multiply-high, an add and a shift, exact for
/// every 32-bit dividend (the kernels divide by launch constants in their inner loop).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FastDiv {
    d: u32,
    mul: u32,
    shift: u32,
    pad: u32,
}

impl FastDiv {
    /// The divider for `d` (at least 1).
    pub(crate) fn new(d: u32) -> FastDiv {
        let d = d.max(1);
        let shift = 32 - (d - 1).leading_zeros(); // ceil(log2 d)
        let mul = ((1u64 << 32) * ((1u64 << shift) - u64::from(d)) / u64::from(d) + 1) as u32;
        FastDiv {
            d,
            mul,
            shift,
            pad: 0,
        }
    }

    /// `n / d` computed as the kernels do (the tests' model of them).
    #[cfg(test)]
    fn div(&self, n: u32) -> u32 {
        let t = ((u64::from(n) * u64::from(self.mul)) >> 32) as u32;
        ((u64::from(t) + u64::from(n)) >> self.shift) as u32
    }
}

/// `RestoreTarget` of restore.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct RestoreTargetArgs {
    out_ptrs: u64,
    scales: u64,
    mins: u64,
    block_table: u64,
    tensors: u32,
    rows: u32,
    cols: u32,
    heads: u32,
    head_dim: u32,
    token_offset: u32,
    target_tokens: u32,
    block_size: u32,
    layout: u32,
    dtype: u32,
    grouping: u32,
    pad: u32,
    per_row: FastDiv,
    by_head_dim: FastDiv,
    by_block: FastDiv,
}

/// `FrameSource` of restore.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct FrameSourceArgs {
    gather: u64,
    width: u32,
    height: u32,
    chroma444: u32,
    bytes_per_sample: u32,
    shift: u32,
    gather_groups: u32,
    gather_direct: u32,
    pad: [u32; 3],
    per_entry: FastDiv,
    per_frame: FastDiv,
    per_chroma: FastDiv,
}

/// A target and its dequantization parameters, uploaded once and reused for every launch.
pub struct DeviceTarget {
    args: RestoreTargetArgs,
    geometry: CodeGeometry,
    /// Output pointers, scales, mins and block table in one allocation.
    _params: DeviceBuffer,
    /// The pinned memory they were copied from (a [`ParamUpload::Staged`] target), kept as
    /// long as the target since the copy runs in stream order.
    _staging: Option<PinnedBuffer>,
}

impl std::fmt::Debug for DeviceTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTarget")
            .field("geometry", &self.geometry)
            .finish()
    }
}

/// How a [`DeviceTarget`]'s parameter block reaches the device.
#[derive(Clone, Copy)]
pub enum ParamUpload<'a> {
    /// A fresh allocation, copied before the constructor returns.
    Now(&'a Arc<Cuda>),
    /// A pooled buffer, copied from pooled pinned memory in the order of the stream: launch
    /// on that stream, and drop the target only after those launches finished.
    Staged(&'a Arc<MemoryPool>, &'a Arc<PinnedPool>, &'a Stream),
}

impl ParamUpload<'_> {
    fn upload(self, bytes: &[u8]) -> Result<(DeviceBuffer, Option<PinnedBuffer>), GpuError> {
        match self {
            ParamUpload::Now(cuda) => Ok((cuda.upload(bytes)?, None)),
            ParamUpload::Staged(pool, pinned, stream) => {
                let mut staging = pinned.take(bytes.len())?;
                staging.as_mut_slice().copy_from_slice(bytes);
                let buf = pool.alloc(bytes.len())?;
                // SAFETY: both are kept by the DeviceTarget, which the caller drops only after
                // the stream's launches (and so this copy) finished; neither is written again.
                unsafe { staging.copy_to_device_async(&buf, stream)? };
                Ok((buf, Some(staging)))
            }
        }
    }
}

/// Appends `items` to `block` at a 256-byte boundary (the kernels load scales and mins 16
/// bytes at a time) and returns their offset.
fn append<T: Copy>(block: &mut Vec<u8>, items: &[T], to_le: impl Fn(T) -> [u8; 4]) -> usize {
    let at = block.len().next_multiple_of(256);
    block.resize(at, 0);
    for &i in items {
        block.extend_from_slice(&to_le(i));
    }
    at
}

impl DeviceTarget {
    /// Uploads the target description. `outs[t]` must hold `target.elements()` elements of
    /// `target.dtype` for every code tensor `t`.
    pub fn new(
        cuda: &Arc<Cuda>,
        g: CodeGeometry,
        q: &Dequant,
        target: &TargetSpec,
        outs: &[&DeviceBuffer],
    ) -> Result<DeviceTarget, GpuError> {
        let outs: Vec<(u64, usize)> = outs.iter().map(|o| (o.ptr(), o.len())).collect();
        // SAFETY: each pair is the base and length of a live DeviceBuffer; as before this
        // constructor existed, the caller keeps those buffers alive while it launches.
        unsafe { Self::from_raw(ParamUpload::Now(cuda), g, q, target, &outs) }
    }

    /// Like [`DeviceTarget::new`], for outputs that are regions of larger allocations (a
    /// fetch buffer holds every layer's K and V): `outs[t]` is `(device pointer, capacity in
    /// bytes)`. Each capacity must hold `target.elements()` elements and each pointer be
    /// 16-byte aligned (the kernels store 16 bytes at a time), else an error.
    ///
    /// # Safety
    /// Each pointer must be the start of at least `capacity` bytes of live device memory of
    /// the upload's device, and stay allocated until every launch using this target has
    /// finished.
    pub unsafe fn from_raw(
        upload: ParamUpload<'_>,
        g: CodeGeometry,
        q: &Dequant,
        target: &TargetSpec,
        outs: &[(u64, usize)],
    ) -> Result<DeviceTarget, GpuError> {
        check_dequant(g, q)?;
        // SAFETY: the caller upholds from_raw's contract, which is build's.
        unsafe { Self::build(upload, g, Some(q), target, outs) }
    }

    /// Like [`DeviceTarget::from_raw`] for kernels that compute the values themselves (the
    /// transform-coded route): no scales or mins are uploaded.
    ///
    /// # Safety
    /// As for [`DeviceTarget::from_raw`].
    pub unsafe fn for_values(
        upload: ParamUpload<'_>,
        g: CodeGeometry,
        target: &TargetSpec,
        outs: &[(u64, usize)],
    ) -> Result<DeviceTarget, GpuError> {
        // SAFETY: the caller upholds from_raw's contract, which is build's.
        unsafe { Self::build(upload, g, None, target, outs) }
    }

    /// The arguments the kernels take for this target.
    pub(crate) fn launch_args(&self) -> RestoreTargetArgs {
        self.args
    }

    /// The geometry this target was built for.
    pub fn geometry(&self) -> CodeGeometry {
        self.geometry
    }

    /// # Safety
    /// As for [`DeviceTarget::from_raw`]; `q` is checked by the caller when present.
    unsafe fn build(
        upload: ParamUpload<'_>,
        g: CodeGeometry,
        q: Option<&Dequant>,
        target: &TargetSpec,
        outs: &[(u64, usize)],
    ) -> Result<DeviceTarget, GpuError> {
        target.validate(g.rows, g.cols)?;
        let need = target
            .elements()
            .checked_mul(target.dtype.size())
            .ok_or_else(|| GpuError::InvalidArgument("target too large".into()))?;
        if outs.len() != g.tensors || outs.iter().any(|&(_, cap)| cap < need) {
            return Err(GpuError::InvalidArgument(format!(
                "need {} outputs of {need} bytes",
                g.tensors
            )));
        }
        if outs.iter().any(|&(p, _)| p == 0 || !p.is_multiple_of(16)) {
            return Err(GpuError::InvalidArgument(
                "output pointers must be 16-byte aligned".into(),
            ));
        }
        // The kernels index codes in 32 bits and launch one block row per tensor.
        if !g.cols.is_multiple_of(8) || u32::try_from(g.len()).is_err() || g.tensors > 65_535 {
            return Err(GpuError::InvalidArgument("geometry too large".into()));
        }
        let mut block: Vec<u8> = outs.iter().flat_map(|&(p, _)| p.to_le_bytes()).collect();
        // No scales and mins (null pointers) for the transform kernels, which read neither.
        let scales_mins = q.map(|q| {
            (
                append(&mut block, &q.scales, f32::to_le_bytes),
                append(&mut block, &q.mins, f32::to_le_bytes),
            )
        });
        let (table, block_size) = match &target.paged {
            Some((bs, t)) => (
                Some(append(&mut block, t, |b: i32| b.to_le_bytes())),
                *bs as u32,
            ),
            None => (None, 0),
        };
        let (params, staging) = upload.upload(&block)?;
        let at = |off: usize| params.ptr() + off as u64;
        let args = RestoreTargetArgs {
            out_ptrs: params.ptr(),
            scales: scales_mins.map_or(0, |(s, _)| at(s)),
            mins: scales_mins.map_or(0, |(_, m)| at(m)),
            block_table: table.map_or(0, at),
            tensors: g.tensors as u32,
            rows: g.rows as u32,
            cols: g.cols as u32,
            heads: target.heads as u32,
            head_dim: target.head_dim as u32,
            token_offset: target.token_offset as u32,
            target_tokens: target.target_tokens as u32,
            block_size,
            layout: match target.layout {
                TokenOrder::Nhd => 0,
                TokenOrder::Hnd => 1,
            },
            dtype: dtype_code(target.dtype),
            grouping: match q.map(|q| q.grouping) {
                Some(Grouping::PerChannel) | None => 0,
                Some(Grouping::PerToken) => 1,
            },
            pad: 0,
            per_row: FastDiv::new((g.cols / 8) as u32),
            by_head_dim: FastDiv::new(target.head_dim as u32),
            by_block: FastDiv::new(block_size),
        };
        Ok(DeviceTarget {
            args,
            geometry: g,
            _params: params,
            _staging: staging,
        })
    }
}

/// The loaded restore kernels of one device.
pub struct RestoreKernels {
    cuda: Arc<Cuda>,
    module: Module,
}

impl std::fmt::Debug for RestoreKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RestoreKernels")
    }
}

/// A gather table in device memory: the planar sample index of the first code of each aligned
/// run of `run` codes whose samples are consecutive (`run` 1: one index per code; else a
/// multiple of 8, see `gather::run_gather`).
#[derive(Debug)]
pub struct DeviceGather {
    table: DeviceBuffer,
    run: usize,
    /// Every entry a multiple of 8: runs of 4:4:4 samples start on 8-sample boundaries, so the
    /// kernel reads each group with one aligned load and needs no fallback.
    aligned: bool,
}

impl DeviceGather {
    /// Uploads `indices`, one per run of `run` codes (1, or a multiple of 8 below 2^32).
    pub fn upload(cuda: &Arc<Cuda>, indices: &[u32], run: usize) -> Result<Self, GpuError> {
        if run != 1 && (run == 0 || !run.is_multiple_of(8) || u32::try_from(run).is_err()) {
            return Err(GpuError::InvalidArgument(format!(
                "gather runs of {run} codes (1 or a multiple of 8)"
            )));
        }
        Ok(DeviceGather {
            table: cuda.upload(indices)?,
            run,
            aligned: indices.iter().all(|i| i.is_multiple_of(8)),
        })
    }

    /// The table read from code `first` on (a multiple of the run).
    pub fn from_code(&self, first: usize) -> GatherFrom<'_> {
        GatherFrom {
            table: &self.table,
            first,
            run: self.run,
            aligned: self.aligned,
        }
    }
}

/// A launch's view of a [`DeviceGather`]: its codes start at code `first` of the table.
#[derive(Debug, Clone, Copy)]
pub struct GatherFrom<'a> {
    table: &'a DeviceBuffer,
    first: usize,
    run: usize,
    aligned: bool,
}

impl GatherFrom<'_> {
    /// The device address of the entry of code `first`, checked to hold entries for `n` codes.
    fn device_ptr(&self, n: usize) -> Result<u64, GpuError> {
        if !self.first.is_multiple_of(self.run) || !n.is_multiple_of(self.run) {
            return Err(GpuError::InvalidArgument(format!(
                "gather of runs of {} codes used from code {} for {n} codes",
                self.run, self.first
            )));
        }
        let (first, n) = (self.first / self.run, n / self.run);
        let end = first.checked_add(n).and_then(|e| e.checked_mul(4));
        if end.is_none_or(|e| e > self.table.len()) {
            return Err(GpuError::InvalidArgument("gather table too small".into()));
        }
        Ok(self.table.ptr() + 4 * first as u64)
    }

    /// Groups of 8 codes per entry as the kernel takes it (0: one entry per code).
    fn groups_per_entry(&self) -> u32 {
        (self.run / 8) as u32
    }
}

/// Rows each thread of a kernel restores, as `restore.cu` has it: codes, packed codes and 4:4:4
/// surfaces without a gather table (`by_dtype`) take one row into f32 targets and two into
/// 16-bit ones; other surfaces take two. (A mismatch would only size the grid wrongly.)
fn rows_per_thread(by_dtype: bool, target: &DeviceTarget) -> usize {
    if by_dtype && target.args.dtype == dtype_code(DType::F32) {
        1
    } else {
        2
    }
}

/// The entry points `restore.cu` must define.
const KERNELS: [&str; 9] = [
    "kvf_restore_codes",
    "kvf_restore_packed",
    "kvf_restore_packed8",
    "kvf_restore_packed4",
    "kvf_restore_frames",
    "kvf_rans_build_luts",
    "kvf_rans_decode",
    "kvf_inverse_transform",
    "kvf_restore_sinks",
];

impl RestoreKernels {
    /// The loaded module (the transform route launches its kernels from it).
    pub(crate) fn module(&self) -> &Module {
        &self.module
    }

    /// The device's context.
    pub(crate) fn cuda(&self) -> &Arc<Cuda> {
        &self.cuda
    }

    /// Loads the committed PTX, or the file named by `KVFETCHER_RESTORE_PTX` when set.
    pub fn load(cuda: &Arc<Cuda>) -> Result<RestoreKernels, GpuError> {
        let ptx = match std::env::var_os("KVFETCHER_RESTORE_PTX") {
            Some(p) => std::fs::read_to_string(&p)
                .map_err(|e| GpuError::Kernels(format!("{}: {e}", p.to_string_lossy())))?,
            None => RESTORE_PTX.to_string(),
        };
        for entry in KERNELS {
            if !ptx.contains(&format!(".entry {entry}(")) {
                return Err(GpuError::Kernels(format!(
                    "ptx lacks {entry} (run scripts/gen-ptx.sh)"
                )));
            }
        }
        let module = cuda.load_module(&ptx)?;
        Ok(RestoreKernels {
            cuda: cuda.clone(),
            module,
        })
    }

    /// The launch grid for `target`: one block row per tensor (gridDim.y), and per tensor
    /// enough blocks for its work units of 8 columns x the kernel's rows per thread (see
    /// [`rows_per_thread`]), capped at 16 blocks per SM over all tensors (the kernels loop
    /// over what a smaller grid leaves).
    fn grid(&self, target: &DeviceTarget, by_dtype: bool) -> (u32, u32) {
        let g = target.geometry;
        let units = g.rows.div_ceil(rows_per_thread(by_dtype, target)) * (g.cols / 8);
        let cap = (self.cuda.info().multiprocessors.max(1) as usize * 16 / g.tensors.max(1)).max(1);
        (
            units.div_ceil(BLOCK as usize).clamp(1, cap) as u32,
            g.tensors as u32,
        )
    }

    /// Restores u16 codes (`[tensors][rows][cols]`) held in `codes`.
    pub fn restore_codes(
        &self,
        codes: &DeviceBuffer,
        target: &DeviceTarget,
        stream: &Stream,
    ) -> Result<(), GpuError> {
        self.restore_codes_at(codes, 0, target, stream)
    }

    /// Restores u16 codes held in `codes` from byte `offset` on (a multiple of 16: the kernel
    /// loads 8 codes at a time), e.g. one tensor of a section's codes.
    pub fn restore_codes_at(
        &self,
        codes: &DeviceBuffer,
        offset: usize,
        target: &DeviceTarget,
        stream: &Stream,
    ) -> Result<(), GpuError> {
        let n = target.geometry.len();
        if !offset.is_multiple_of(16) || offset > codes.len() || codes.len() - offset < n * 2 {
            return Err(GpuError::InvalidArgument(
                "code buffer too small or misaligned".into(),
            ));
        }
        let f = self.module.function("kvf_restore_codes")?;
        let mut ptr = codes.ptr() + offset as u64;
        let mut args = target.args;
        let mut params = [
            (&mut ptr as *mut u64).cast::<c_void>(),
            (&mut args as *mut RestoreTargetArgs).cast(),
        ];
        // SAFETY: the parameters are (const uint16_t*, RestoreTarget) as declared in restore.cu;
        // the code buffer holds n codes from a 16-byte aligned offset (checked) and
        // DeviceTarget validated every target range.
        unsafe {
            self.cuda
                .launch(&f, self.grid(target, true), BLOCK, stream, &mut params)
        }
    }

    /// Restores codes bit-packed LSB-first at `bits` (1..=16) held in `packed`.
    pub fn restore_packed(
        &self,
        packed: &DeviceBuffer,
        bits: u8,
        target: &DeviceTarget,
        stream: &Stream,
    ) -> Result<(), GpuError> {
        self.restore_packed_at(packed, 0, bits, target, stream)
    }

    /// Restores codes bit-packed at `bits` held in `packed` from byte `offset` on (the codes
    /// of one tensor of a packed section start at a byte boundary when rows x cols is a
    /// multiple of 8).
    pub fn restore_packed_at(
        &self,
        packed: &DeviceBuffer,
        offset: usize,
        bits: u8,
        target: &DeviceTarget,
        stream: &Stream,
    ) -> Result<(), GpuError> {
        let n = target.geometry.len();
        if !(1..=16).contains(&bits)
            || offset > packed.len()
            || packed.len() - offset < (n * bits as usize).div_ceil(8)
        {
            return Err(GpuError::InvalidArgument(
                "packed buffer too small or bad bit width".into(),
            ));
        }
        let mut ptr = packed.ptr() + offset as u64;
        // The 8- and 4-bit kernels read one aligned word per 8 codes.
        let f = self.module.function(match bits {
            8 if ptr.is_multiple_of(8) => "kvf_restore_packed8",
            4 if ptr.is_multiple_of(4) => "kvf_restore_packed4",
            _ => "kvf_restore_packed",
        })?;
        let mut len = (packed.len() - offset) as u64;
        let mut bits = u32::from(bits);
        let mut args = target.args;
        let mut params = [
            (&mut ptr as *mut u64).cast::<c_void>(),
            (&mut len as *mut u64).cast(),
            (&mut bits as *mut u32).cast(),
            (&mut args as *mut RestoreTargetArgs).cast(),
        ];
        // SAFETY: the parameters match (const uint8_t*, u64, unsigned, RestoreTarget); the
        // kernel reads below `len` bytes from ptr only, all inside the buffer (checked), and
        // DeviceTarget validated the target ranges.
        unsafe {
            self.cuda
                .launch(&f, self.grid(target, true), BLOCK, stream, &mut params)
        }
    }

    /// Restores codes straight from decoded surfaces. `gather` maps each code index to its
    /// planar sample index (Y, U, V planes per frame, as in `HostFrames`); `None` means code `i`
    /// is sample `i`.
    pub fn restore_frames(
        &self,
        frames: &DeviceFrames,
        gather: Option<&DeviceGather>,
        target: &DeviceTarget,
        stream: &Stream,
    ) -> Result<(), GpuError> {
        self.restore_frames_at(frames, gather.map(|g| g.from_code(0)), target, stream)
    }

    /// Like [`RestoreKernels::restore_frames`] with the gather table read from entry
    /// `gather.1` on (the entries of one tensor of a section), so the target's code 0 is the
    /// table's code `gather.1`.
    pub fn restore_frames_at(
        &self,
        frames: &DeviceFrames,
        gather: Option<GatherFrom<'_>>,
        target: &DeviceTarget,
        stream: &Stream,
    ) -> Result<(), GpuError> {
        let n = target.geometry.len();
        let fmt = frames.format;
        let spf = fmt.samples_per_frame();
        if frames.frames * spf < n && gather.is_none() {
            return Err(GpuError::InvalidArgument("fewer samples than codes".into()));
        }
        if u32::try_from(frames.frames * spf).is_err() {
            return Err(GpuError::InvalidArgument(
                "more than 2^32 samples in one launch".into(),
            ));
        }
        let luma = fmt.width * fmt.height;
        let gather_at = match gather {
            None => 0,
            Some(g) => g.device_ptr(n)?,
        };
        let f = self.module.function("kvf_restore_frames")?;
        let by_dtype = gather.is_none() && fmt.chroma == Chroma::Yuv444;
        let mut ptr = frames.ptr;
        let groups_per_entry = gather.map_or(0, |g| g.groups_per_entry());
        let mut src = FrameSourceArgs {
            gather: gather_at,
            width: fmt.width as u32,
            height: fmt.height as u32,
            chroma444: u32::from(fmt.chroma == Chroma::Yuv444),
            bytes_per_sample: fmt.surface_bytes_per_sample() as u32,
            shift: if fmt.bit_depth > 8 {
                16 - u32::from(fmt.bit_depth)
            } else {
                0
            },
            gather_groups: groups_per_entry,
            gather_direct: u32::from(
                groups_per_entry > 0
                    && gather.is_some_and(|g| g.aligned)
                    && fmt.chroma == Chroma::Yuv444
                    && frames.ptr.is_multiple_of(16),
            ),
            pad: [0; 3],
            per_entry: FastDiv::new(groups_per_entry),
            per_frame: FastDiv::new(spf as u32),
            per_chroma: FastDiv::new(((spf - luma) / 2) as u32),
        };
        let mut args = target.args;
        let mut params = [
            (&mut ptr as *mut u64).cast::<c_void>(),
            (&mut src as *mut FrameSourceArgs).cast(),
            (&mut args as *mut RestoreTargetArgs).cast(),
        ];
        // SAFETY: the parameters match (const uint8_t*, FrameSource, RestoreTarget); the frames
        // hold at least n samples (checked) or the caller's gather table (entries for n codes from
        // `first`, checked) indexes into them.
        unsafe {
            self.cuda
                .launch(&f, self.grid(target, by_dtype), BLOCK, stream, &mut params)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_match_the_cuda_structs() {
        assert_eq!(std::mem::size_of::<RestoreTargetArgs>(), 128);
        assert_eq!(std::mem::size_of::<FrameSourceArgs>(), 96);
    }

    /// The kernels' division equals `/` for every divisor they see and dividends across the
    /// whole 32-bit range (edges, powers of two, and a sweep).
    #[test]
    fn fast_division_is_exact() {
        let mut divisors: Vec<u32> = (1..=2048).collect();
        divisors.extend([
            3000,
            4096,
            6144,
            12_289,
            65_535,
            65_536,
            1 << 20,
            3 << 20,
            1_000_003,
        ]);
        divisors.extend([
            u32::MAX / 3,
            (1 << 31) - 1,
            1 << 31,
            (1 << 31) + 1,
            u32::MAX,
        ]);
        for &d in &divisors {
            let f = FastDiv::new(d);
            let mut ns: Vec<u32> = vec![0, 1, d - 1, d, d.wrapping_add(1), u32::MAX, u32::MAX - 1];
            ns.extend((0..64).map(|k| d.wrapping_mul(k)));
            ns.extend((0..64).map(|k| d.wrapping_mul(k).wrapping_sub(1)));
            let mut x = 0x9e37_79b9u32 ^ d;
            for _ in 0..2000 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                ns.push(x);
            }
            for n in ns {
                assert_eq!(f.div(n), n / d, "{n} / {d}");
            }
        }
    }

    #[test]
    fn offsets_cover_a_paged_hnd_target_once() {
        let t = TargetSpec {
            layout: TokenOrder::Hnd,
            dtype: DType::BF16,
            heads: 2,
            head_dim: 8,
            token_offset: 3,
            target_tokens: 0,
            paged: Some((4, vec![2, 0, 1])),
        };
        t.validate(9, 16).unwrap();
        let mut seen = std::collections::HashSet::new();
        for r in 0..9 {
            for c in 0..16 {
                assert!(seen.insert(t.offset(r, c)));
                assert!(t.offset(r, c) < t.elements());
            }
        }
        // token 3 -> block 0 -> physical 2, slot 3, head 0: ((2*2+0)*4+3)*8
        assert_eq!(t.offset(0, 0), 19 * 8);
        assert!(t.validate(10, 16).is_err());
    }

    #[test]
    fn cpu_restore_rounds_like_fma_then_rne() {
        let g = CodeGeometry {
            tensors: 1,
            rows: 1,
            cols: 8,
        };
        let q = Dequant {
            grouping: Grouping::PerToken,
            scales: vec![0.1],
            mins: vec![-0.3],
        };
        let t = TargetSpec {
            layout: TokenOrder::Nhd,
            dtype: DType::F32,
            heads: 1,
            head_dim: 8,
            token_offset: 0,
            target_tokens: 1,
            paged: None,
        };
        let codes: Vec<u16> = (0..8).collect();
        let mut outs = vec![Vec::new()];
        restore_cpu(g, &codes, &q, &t, &mut outs).unwrap();
        let got: Vec<f32> = outs[0]
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let want: Vec<f32> = codes
            .iter()
            .map(|&c| f32::from(c).mul_add(0.1, -0.3))
            .collect();
        assert_eq!(got, want);
    }
}
