//! Restore one chunk section straight into a fetch's device buffer, in the client's layout.
//!
//! Three routes, cheapest first (the blueprint is the GPU section checks of `kvfetcher-bench gpu check`):
//! - `packed`: the payload is uploaded as is and one kernel unpacks and dequantizes it;
//! - `nvdec`: an HEVC section is decoded by NVDEC into device surfaces (its streams on as many
//!   sessions at once) and the kernel reads the codes out of them through the geometry's
//!   gather table;
//! - `cpu-decode`: anything else (zstd, no NVDEC, NVDEC refusing a stream) is decoded on the
//!   CPU; the codes are uploaded and dequantized by the kernel.
//! - `rans`: a transform-coded section (format v2) is entropy-decoded and inverse-transformed
//!   by the kernels of [`super::rans`], with the chunk's profile from the registry (uploaded
//!   once per device).
//!
//! The kernels compute `fma(code, scale, min)` in f32 and round once to the target type, the
//! same math as the CPU path when the chunk's dtype is the target's or f32. Sections the
//! kernels cannot reproduce bit for bit (exact mode, other dtype pairs, head sizes not a
//! multiple of 8) are refused by [`kernels_apply`]; the caller restores them on the CPU and
//! copies the placed bytes.

use std::sync::Arc;

use kvfetcher_codec::{
    decode_section, ChunkHeader, CodecRegistry, FormatError, Grouping, HevcParams, VariantKind,
};
use kvfetcher_kv::DType;
use kvfetcher_protocol::{KvShape, Paging, TargetLayout};

use super::cuda::{bytemuck_like::Pod, DeviceBuffer, Stream};
use super::devices::{GpuDevice, PooledStream};
use super::nvdec::{DeviceFrames, FrameFormat};
use super::pinned::{PinnedBuffer, PinnedPool};
use super::pool::MemoryPool;
use super::rans::{restore_transform_with, Scratch, TransformSection};
use super::restore::{CodeGeometry, Dequant, DeviceTarget, ParamUpload, TargetSpec};
use super::GpuError;

/// How a section reached the device buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Packed payload, unpacked by the kernel.
    Packed,
    /// Decoded by NVDEC, restored from the surfaces.
    Nvdec,
    /// Decoded on the CPU, restored by the kernel.
    CpuDecode,
    /// Transform-coded: rANS-decoded and inverse-transformed by the kernels.
    Rans,
}

fn invalid(m: impl Into<String>) -> GpuError {
    GpuError::InvalidArgument(m.into())
}

/// The kernels' description of one K or V tensor of a buffer in `layout`, for codes whose row
/// 0 is token `token_start`: paged buffers get the identity block table, since the fetch
/// buffer's blocks are in order. `TargetSpec::offset(row, col) * dtype size` plus the tensor's
/// base offset equals `TargetLayout::offset` (tested below).
pub(crate) fn target_spec(
    layout: &TargetLayout,
    shape: &KvShape,
    token_start: u32,
) -> Result<TargetSpec, GpuError> {
    if let Paging::Paged { block_tokens: 0 } = layout.paging {
        return Err(invalid("zero block size"));
    }
    let slots = layout.slots(shape);
    let paged = match layout.paging {
        Paging::Contiguous => None,
        Paging::Paged { block_tokens } => {
            let bt = block_tokens as usize;
            let blocks = i32::try_from(slots / bt).map_err(|_| invalid("too many blocks"))?;
            Some((bt, (0..blocks).collect()))
        }
    };
    Ok(TargetSpec {
        layout: layout.order,
        dtype: layout.dtype,
        heads: shape.kv_heads as usize,
        head_dim: shape.head_dim as usize,
        token_offset: token_start as usize,
        target_tokens: slots,
        paged,
    })
}

/// Whether the kernels restore section `index` of `header` into `layout` bit for bit like the
/// CPU path; `Err` says why not (the caller then restores on the CPU).
pub fn kernels_apply(
    header: &ChunkHeader,
    index: usize,
    layout: &TargetLayout,
) -> Result<(), String> {
    let s = header
        .sections
        .get(index)
        .ok_or_else(|| format!("no section {index}"))?;
    if header.exact {
        return Err("exact-mode chunk (byte planes)".into());
    }
    if header.transform.is_some() {
        // The kernels round to the chunk's dtype and then to the target's, as the CPU path
        // does, so every target dtype is exact.
        return super::rans::transform_supported(header, index);
    }
    // The CPU path rounds to the chunk's dtype, then converts; the kernel rounds once.
    let once = matches!(
        (header.dtype, layout.dtype),
        (DType::F32, _) | (DType::F16, DType::F16) | (DType::BF16, DType::BF16)
    );
    if !once {
        return Err(format!(
            "{:?} chunk into a {:?} buffer rounds twice on the CPU",
            header.dtype, layout.dtype
        ));
    }
    if header.head_dim == 0 || !header.head_dim.is_multiple_of(8) {
        return Err(format!(
            "head_dim {} is not a multiple of 8",
            header.head_dim
        ));
    }
    if s.shape != header.section_shape(s.layers(), s.shape.bits) || s.quant.len() != s.layers() {
        return Err("section shape does not match the header".into());
    }
    Ok(())
}

/// One kernel launch: tensors `first..first + count` of the section, with one grouping.
struct Launch {
    first: usize,
    count: usize,
    grouping: Grouping,
}

/// A section's stream and the scratch memory its queued work reads. Dropping it waits for
/// the stream before the scratch goes back to the device's pool, on every path, errors
/// included: fields drop in order, and the stream's drop synchronises it before `held` and
/// `targets` drop.
struct SectionWork<'d> {
    stream: PooledStream<'d>,
    pool: &'d Arc<MemoryPool>,
    pinned: &'d Arc<PinnedPool>,
    held: Vec<Arc<DeviceBuffer>>,
    staged: Vec<PinnedBuffer>,
    targets: Vec<DeviceTarget>,
}

impl<'d> SectionWork<'d> {
    fn new(dev: &'d GpuDevice) -> Result<SectionWork<'d>, GpuError> {
        Ok(SectionWork {
            stream: dev.stream()?,
            pool: dev.scratch(),
            pinned: dev.pinned(),
            held: Vec::new(),
            staged: Vec::new(),
            targets: Vec::new(),
        })
    }

    /// Pooled scratch of `bytes`, kept until the stream is done.
    fn alloc(&mut self, bytes: usize) -> Result<Arc<DeviceBuffer>, GpuError> {
        let b = Arc::new(self.pool.alloc(bytes)?);
        self.held.push(b.clone());
        Ok(b)
    }

    /// `data` in pooled scratch, copied in stream order, kept until the stream is done.
    fn upload<T: Pod>(&mut self, data: &[T]) -> Result<Arc<DeviceBuffer>, GpuError> {
        // SAFETY: T is Pod (plain bytes, no padding), so its slice is readable as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data))
        };
        self.upload_image(bytes.len(), &mut |image| image.copy_from_slice(bytes))
    }

    /// `len` bytes written by `fill` into pinned staging memory, then copied in stream order
    /// into pooled scratch with one DMA copy; both kept until the stream is done.
    fn upload_image(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Arc<DeviceBuffer>, GpuError> {
        let mut staging = self.pinned.take(len)?;
        fill(staging.as_mut_slice());
        let b = Arc::new(self.pool.alloc(len)?);
        // SAFETY: `staging` and `b` are held by self until its stream has been synchronised
        // (finish, or the stream's drop before the fields after it), and neither is written
        // meanwhile.
        unsafe { staging.copy_to_device_async(&b, &self.stream)? };
        self.staged.push(staging);
        self.held.push(b.clone());
        Ok(b)
    }

    /// Waits for the queued work; the caller then returns, dropping the scratch.
    fn finish(&self) -> Result<(), GpuError> {
        self.stream.synchronize()
    }

    /// Queues a copy of `out.len()` bytes of `src` behind the work already queued, waits for
    /// the stream and returns them in `out`.
    fn finish_and_read(&mut self, src: &DeviceBuffer, out: &mut [u8]) -> Result<(), GpuError> {
        if out.len() > src.len() {
            return Err(invalid("read-back beyond its buffer"));
        }
        let mut landing = self.pinned.take(out.len())?;
        // SAFETY: src holds out.len() bytes (checked) and is held by the caller's scratch;
        // landing is read only after the stream has been synchronised just below, and stays
        // alive until then.
        unsafe { landing.copy_from_device_async(0, src.ptr(), out.len(), &self.stream)? };
        self.finish()?;
        out.copy_from_slice(landing.as_slice());
        Ok(())
    }
}

/// Restores section `index` of `header` (its payload: `payload`) into `out`, the fetch buffer
/// of `shape` in `layout`, for the chunk whose first token is `token_start` of the buffer.
/// Tensor `t` of the section (layer `layer_start + t / 2`, K when `t` is even) goes to
/// `out + layout.offset(shape, layer, kv, 0, 0)`. Call [`kernels_apply`] first.
///
/// Scratch memory comes from the device's pool and every copy and kernel runs on one pooled
/// stream, synchronised before returning, so readiness events recorded afterwards are ordered
/// after these writes.
#[allow(clippy::too_many_arguments)]
pub fn restore_section_to_device(
    dev: &GpuDevice,
    header: &ChunkHeader,
    index: usize,
    payload: &[u8],
    registry: &CodecRegistry,
    layout: &TargetLayout,
    shape: &KvShape,
    token_start: u32,
    out: &DeviceBuffer,
    use_nvdec: bool,
) -> Result<Route, GpuError> {
    kernels_apply(header, index, layout).map_err(GpuError::Unsupported)?;
    let s = &header.sections[index];
    // Everything must fit before anything is launched.
    let buf_len = layout
        .checked_buffer_len(shape)
        .map_err(|e| invalid(format!("layout: {e}")))?;
    let first_layer = u32::from(s.layer_start);
    let fits = buf_len <= out.len()
        && first_layer as usize + s.layers() <= shape.num_layers as usize
        && token_start as u64 + u64::from(header.token_count) <= u64::from(shape.tokens)
        && u32::from(header.kv_heads) == shape.kv_heads
        && u32::from(header.head_dim) == shape.head_dim;
    if !fits {
        return Err(invalid(format!(
            "section {index} (layers {}..{}, tokens {token_start}+{}) does not fit {shape:?} in a {} byte buffer",
            s.layer_start,
            s.layer_end,
            header.token_count,
            out.len()
        )));
    }
    let g = CodeGeometry {
        tensors: 2 * s.layers(),
        rows: header.token_count as usize,
        cols: header.channels(),
    };
    let target = target_spec(layout, shape, token_start)?;
    let tensor_len = layout.tensor_len(shape);
    let layer_len = layout.layer_len(shape);
    let outs: Vec<(u64, usize)> = (0..g.tensors)
        .map(|t| {
            let base = (first_layer as usize + t / 2) * layer_len + (t % 2) * tensor_len;
            (out.ptr() + base as u64, tensor_len)
        })
        .collect();
    if header.transform.is_some() {
        // SAFETY: as for the DeviceTarget below: every pointer is `out` plus a tensor offset
        // whose tensor_len bytes end within out.len() (checked above), and restore_rans waits
        // for its stream before `work` and the target drop.
        return unsafe { restore_rans(dev, header, index, payload, registry, g, &target, &outs) };
    }
    let launches: Vec<Launch> = if header.key_grouping == header.value_grouping {
        vec![Launch {
            first: 0,
            count: g.tensors,
            grouping: header.key_grouping,
        }]
    } else {
        (0..g.tensors)
            .map(|t| Launch {
                first: t,
                count: 1,
                grouping: if t % 2 == 0 {
                    header.key_grouping
                } else {
                    header.value_grouping
                },
            })
            .collect()
    };
    let mut work = SectionWork::new(dev)?;
    for l in &launches {
        let (mut scales, mut mins) = (Vec::new(), Vec::new());
        for t in l.first..l.first + l.count {
            let q = &s.quant[t / 2];
            let p = if t % 2 == 0 { &q.key } else { &q.value };
            scales.extend_from_slice(&p.scale);
            mins.extend_from_slice(&p.min);
        }
        let lg = CodeGeometry {
            tensors: l.count,
            ..g
        };
        let dq = Dequant {
            grouping: l.grouping,
            scales,
            mins,
        };
        let upload = ParamUpload::Staged(work.pool, work.pinned, &work.stream);
        // SAFETY: every pointer is `out`'s base plus a tensor offset whose tensor_len bytes
        // end within buf_len <= out.len() (checked above: the section's layers and tokens
        // fit the shape); `out` is borrowed for this whole call, and `work` (which owns the
        // targets) waits for its stream before it drops, so the memory outlives every launch.
        let dt = unsafe {
            DeviceTarget::from_raw(upload, lg, &dq, &target, &outs[l.first..][..l.count])
        }?;
        work.targets.push(dt);
    }
    let per_tensor = g.rows * g.cols;
    let bits = s.shape.bits;
    let done = match header.variant {
        VariantKind::Packed => {
            s.verify(payload)
                .map_err(|e| GpuError::Decode(e.to_string()))?;
            let packed = work.upload(payload)?;
            for (l, dt) in launches.iter().zip(&work.targets) {
                // rows x cols is a multiple of 8, so each tensor starts on a byte.
                let at = l.first * per_tensor * usize::from(bits) / 8;
                dev.kernels()
                    .restore_packed_at(&packed, at, bits, dt, &work.stream)?;
            }
            work.finish()?;
            Some(Route::Packed)
        }
        VariantKind::Hevc if use_nvdec && dev.nvdec_sessions() > 0 => {
            s.verify(payload)
                .map_err(|e| GpuError::Decode(e.to_string()))?;
            match restore_nvdec(dev, s, payload, &launches, per_tensor, &mut work) {
                Ok(()) => Some(Route::Nvdec),
                Err(e) => {
                    tracing::debug!("nvdec route failed ({e}): decoding section on the CPU");
                    work.finish()?;
                    None
                }
            }
        }
        _ => None,
    };
    let route = match done {
        Some(route) => route,
        None => cpu_decode(
            dev, header, index, payload, registry, &launches, per_tensor, &mut work,
        )?,
    };
    Ok(route)
}

impl Scratch for SectionWork<'_> {
    fn alloc(&mut self, bytes: usize) -> Result<Arc<DeviceBuffer>, GpuError> {
        SectionWork::alloc(self, bytes)
    }

    fn upload_image(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Arc<DeviceBuffer>, GpuError> {
        SectionWork::upload_image(self, len, fill)
    }

    fn finish_and_read(&mut self, src: &DeviceBuffer, out: &mut [u8]) -> Result<(), GpuError> {
        SectionWork::finish_and_read(self, src, out)
    }

    fn stream(&self) -> &Stream {
        &self.stream
    }
}

/// The transform route: the profile from the registry (a missing one is the CPU path's
/// `ProfileMissing`), checked against the chunk as the CPU restore checks it, then the rans
/// kernels on one pooled stream.
///
/// # Safety
/// `outs` as for [`DeviceTarget::from_raw`]: live device memory of `dev` that outlives the call.
#[allow(clippy::too_many_arguments)]
unsafe fn restore_rans(
    dev: &GpuDevice,
    header: &ChunkHeader,
    index: usize,
    payload: &[u8],
    registry: &CodecRegistry,
    g: CodeGeometry,
    target: &TargetSpec,
    outs: &[(u64, usize)],
) -> Result<Route, GpuError> {
    let t = header
        .transform
        .as_ref()
        .ok_or_else(|| invalid("not a transform-coded chunk"))?;
    let profile = registry.profile(&t.profile).map_err(GpuError::Format)?;
    if profile.model != header.model {
        return Err(GpuError::Format(FormatError::ProfileMismatch(format!(
            "profile {} is for model {}, the chunk holds {}",
            t.profile, profile.model, header.model
        ))));
    }
    profile
        .check_shape(
            usize::from(header.num_layers),
            usize::from(header.kv_heads),
            usize::from(header.head_dim),
        )
        .map_err(GpuError::Format)?;
    header.sections[index]
        .verify(payload)
        .map_err(GpuError::Format)?;
    let dprofile = dev.profile(&t.profile, profile)?;
    let mut work = SectionWork::new(dev)?;
    let upload = ParamUpload::Staged(work.pool, work.pinned, &work.stream);
    // SAFETY: upheld by the caller (see this function's contract); `work` waits for its
    // stream before the target drops.
    let dt = unsafe { DeviceTarget::for_values(upload, g, target, outs) }?;
    let (args, geometry) = (dt.launch_args(), dt.geometry());
    work.targets.push(dt);
    let section = TransformSection {
        header,
        index,
        payload,
    };
    restore_transform_with(dev.kernels(), &dprofile, section, args, geometry, &mut work)?;
    work.finish()?;
    Ok(Route::Rans)
}

/// The NVDEC route.
fn restore_nvdec(
    dev: &GpuDevice,
    s: &kvfetcher_codec::SectionInfo,
    payload: &[u8],
    launches: &[Launch],
    per_tensor: usize,
    work: &mut SectionWork<'_>,
) -> Result<(), GpuError> {
    let p = HevcParams::from_bytes(&s.params).map_err(|e| GpuError::Decode(e.to_string()))?;
    let streams = p
        .split(payload)
        .map_err(|e| GpuError::Decode(e.to_string()))?;
    if p.geometry.shape != s.shape {
        return Err(GpuError::Decode(format!(
            "hevc parameters hold {:?}, the section {:?}",
            p.geometry.shape, s.shape
        )));
    }
    let hg = p.geometry;
    let fmt = FrameFormat::of_geometry(&hg);
    let per_frame = fmt.surface_bytes_per_frame();
    let surf = work.alloc(hg.frames * per_frame)?;
    let nvdec = dev
        .nvdec()
        .ok_or_else(|| GpuError::NoNvdec("no session".into()))?;
    // Stream k's frames follow those of the streams before it; the streams decode at once on
    // as many sessions (the pool hands each an idle one).
    let mut first = 0;
    let jobs: Vec<(&[u8], usize, usize)> = streams
        .iter()
        .zip(&p.streams)
        .map(|(&stream, info)| {
            first += info.frames;
            (stream, first - info.frames, info.frames)
        })
        .collect();
    if jobs.is_empty() {
        return Err(GpuError::Decode("hevc section without streams".into()));
    }
    let decoded = nvdec.each(&jobs, |session, &(stream, first, _)| {
        session.decode_to_device(stream, &surf, first * per_frame)
    })?;
    for (got, &(_, _, frames)) in decoded.iter().zip(&jobs) {
        if got.format != fmt || got.frames != frames {
            return Err(GpuError::Decode(format!(
                "decoded {} frames of {:?}, params say {frames} of {fmt:?}",
                got.frames, got.format
            )));
        }
    }
    let frames = DeviceFrames {
        format: fmt,
        frames: hg.frames,
        ptr: surf.ptr(),
    };
    let gather = dev.gather(&hg)?;
    for (l, dt) in launches.iter().zip(&work.targets) {
        dev.kernels().restore_frames_at(
            &frames,
            Some(gather.from_code(l.first * per_tensor)),
            dt,
            &work.stream,
        )?;
    }
    work.finish()?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cpu_decode(
    dev: &GpuDevice,
    header: &ChunkHeader,
    index: usize,
    payload: &[u8],
    registry: &CodecRegistry,
    launches: &[Launch],
    per_tensor: usize,
    work: &mut SectionWork<'_>,
) -> Result<Route, GpuError> {
    let plane = decode_section(header, index, payload, registry)
        .map_err(|e| GpuError::Decode(e.to_string()))?;
    let codes = work.upload(&plane.codes)?;
    for (l, dt) in launches.iter().zip(&work.targets) {
        dev.kernels()
            .restore_codes_at(&codes, l.first * per_tensor * 2, dt, &work.stream)?;
    }
    work.finish()?;
    Ok(Route::CpuDecode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfetcher_protocol::{MemoryKind, TokenOrder};

    /// `TargetSpec::offset` (times the element size, plus the tensor's base) is
    /// `TargetLayout::offset` for every order, paging and dtype, with codes starting inside
    /// the buffer (a later chunk): the kernels write exactly where the CPU path does.
    #[test]
    fn target_spec_offsets_match_the_layout() {
        let shape = KvShape {
            num_layers: 3,
            tokens: 37,
            kv_heads: 3,
            head_dim: 16,
        };
        let (heads, dim) = (shape.kv_heads as usize, shape.head_dim as usize);
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            for order in [TokenOrder::Nhd, TokenOrder::Hnd] {
                for paging in [
                    Paging::Contiguous,
                    Paging::Paged { block_tokens: 16 },
                    Paging::Paged { block_tokens: 5 },
                    Paging::Paged { block_tokens: 64 },
                ] {
                    let layout = TargetLayout {
                        dtype,
                        order,
                        paging,
                        memory: MemoryKind::Gpu(0),
                    };
                    for (token_start, rows) in [(0u32, 16usize), (16, 16), (32, 5)] {
                        let spec = target_spec(&layout, &shape, token_start).unwrap();
                        spec.validate(rows, heads * dim).unwrap();
                        let es = dtype.size();
                        assert_eq!(spec.elements() * es, layout.tensor_len(&shape));
                        for layer in 0..shape.num_layers {
                            for kv in 0..2u32 {
                                let base = layer as usize * layout.layer_len(&shape)
                                    + kv as usize * layout.tensor_len(&shape);
                                for row in 0..rows {
                                    for col in 0..heads * dim {
                                        let (h, d) = (col / dim, col % dim);
                                        let want = layout.offset(
                                            &shape,
                                            layer,
                                            kv,
                                            token_start + row as u32,
                                            h as u32,
                                        ) + d * es;
                                        let got = base + spec.offset(row, col) * es;
                                        assert_eq!(
                                            got, want,
                                            "{layout:?} start {token_start} row {row} col {col}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn zero_block_size_is_an_error() {
        let layout = TargetLayout {
            dtype: DType::F16,
            order: TokenOrder::Nhd,
            paging: Paging::Paged { block_tokens: 0 },
            memory: MemoryKind::Gpu(0),
        };
        let shape = KvShape {
            num_layers: 1,
            tokens: 4,
            kv_heads: 1,
            head_dim: 8,
        };
        assert!(target_spec(&layout, &shape, 0).is_err());
    }
}
