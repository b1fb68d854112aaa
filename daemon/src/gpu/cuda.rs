//! Safe wrappers over the CUDA driver: one device's primary context, device memory, streams,
//! events, and PTX modules.
//!
//! Every driver call goes through [`Cuda`]; its handles ([`DeviceBuffer`], [`Stream`], [`Event`],
//! [`Module`]) free themselves on drop. Not a general CUDA binding: only what the NVDEC decoder and
//! the restore kernels need. Raw FFI lives in the `kvfetcher-cuda-sys` crate.

use std::ffi::{c_void, CStr, CString};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use super::GpuError;
use kvfetcher_cuda_sys::cuda::{self as sys, CudaApi, CudaMemcpy2d};

/// What the driver says about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub multiprocessors: i32,
    /// Device memory in bytes.
    pub total_memory: usize,
    /// Driver API version, e.g. 13000.
    pub driver_version: i32,
}

/// How a host thread waits for the GPU (stream and event synchronisation, NVDEC frame maps).
///
/// The driver's default spins while a process has no more contexts than cores, so each decode
/// worker waiting on the GPU holds a core. A sidecar next to an engine that needs its cores
/// may prefer `Block`. On an H100 the fetch totals were within run-to-run noise of each other,
/// spinning slightly ahead (docs/BENCHMARKS.md, fifth round), hence the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostWait {
    /// The driver's choice (`CU_CTX_SCHED_AUTO`): spin here.
    #[default]
    Auto,
    /// Spin (`CU_CTX_SCHED_SPIN`): the lowest latency, one core per waiting thread.
    Spin,
    /// Spin, yielding the core between checks (`CU_CTX_SCHED_YIELD`).
    Yield,
    /// Sleep on an OS primitive until the GPU is done (`CU_CTX_SCHED_BLOCKING_SYNC`).
    Block,
}

impl HostWait {
    fn flags(self) -> std::ffi::c_uint {
        match self {
            HostWait::Auto => sys::CTX_SCHED_AUTO,
            HostWait::Spin => sys::CTX_SCHED_SPIN,
            HostWait::Yield => sys::CTX_SCHED_YIELD,
            HostWait::Block => sys::CTX_SCHED_BLOCKING_SYNC,
        }
    }
}

/// The wait mode devices opened from now on get (one setting per device and process: the
/// driver keeps it on the primary context, which every part of the process shares).
static HOST_WAIT: AtomicU8 = AtomicU8::new(HostWait::Auto as u8);

/// Sets how host threads wait for devices opened after this call (`[gpu] host_wait`).
pub fn set_host_wait(wait: HostWait) {
    HOST_WAIT.store(wait as u8, Ordering::Relaxed);
}

/// The mode [`set_host_wait`] last set ([`HostWait::Auto`] unless set).
pub fn host_wait() -> HostWait {
    [HostWait::Spin, HostWait::Yield, HostWait::Block]
        .into_iter()
        .find(|&w| w as u8 == HOST_WAIT.load(Ordering::Relaxed))
        .unwrap_or(HostWait::Auto)
}

/// One CUDA device's primary context and the loaded driver. Share it with `Arc`.
pub struct Cuda {
    pub(super) api: CudaApi,
    device: sys::CuDevice,
    ctx: sys::CuContext,
    info: DeviceInfo,
}

// SAFETY: the driver API is thread-safe; the context handle may be made current on any thread,
// which every method does before touching the device.
unsafe impl Send for Cuda {}
// SAFETY: as above; Cuda holds no interior state that the driver does not synchronise itself.
unsafe impl Sync for Cuda {}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda").field("info", &self.info).finish()
    }
}

impl Cuda {
    /// Loads the driver, initialises it and retains device `ordinal`'s primary context.
    pub fn open(ordinal: usize) -> Result<Arc<Cuda>, GpuError> {
        let api = CudaApi::load().map_err(|e| GpuError::NoDriver(e.to_string()))?;
        // SAFETY: cuInit takes flags 0 and has no other preconditions.
        let rc = unsafe { (api.cu_init)(0) };
        if rc != sys::CUDA_SUCCESS {
            return Err(GpuError::NoDriver(format!("cuInit returned {rc}")));
        }
        let mut count = 0;
        // SAFETY: writes one int through a valid pointer.
        check(&api, "cuDeviceGetCount", unsafe {
            (api.cu_device_get_count)(&mut count)
        })?;
        if ordinal >= count as usize {
            return Err(GpuError::NoDevice {
                ordinal,
                count: count as usize,
            });
        }
        let mut device = 0;
        // SAFETY: ordinal < count; writes one int.
        check(&api, "cuDeviceGet", unsafe {
            (api.cu_device_get)(&mut device, ordinal as i32)
        })?;
        let mut name = [0 as std::ffi::c_char; 256];
        // SAFETY: the buffer holds 256 chars and the driver writes a NUL-terminated name into it.
        check(&api, "cuDeviceGetName", unsafe {
            (api.cu_device_get_name)(name.as_mut_ptr(), 256, device)
        })?;
        // SAFETY: the driver NUL-terminated the name within the buffer.
        let name = unsafe { CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let attr = |a| -> Result<i32, GpuError> {
            let mut v = 0;
            // SAFETY: writes one int; `a` is a valid attribute id.
            check(&api, "cuDeviceGetAttribute", unsafe {
                (api.cu_device_get_attribute)(&mut v, a, device)
            })?;
            Ok(v)
        };
        let compute_capability = (attr(sys::ATTR_CC_MAJOR)?, attr(sys::ATTR_CC_MINOR)?);
        let multiprocessors = attr(sys::ATTR_MULTIPROCESSOR_COUNT)?;
        let _ = attr(sys::ATTR_PCI_BUS_ID)?;
        let mut total_memory = 0usize;
        // SAFETY: writes one size_t.
        check(&api, "cuDeviceTotalMem", unsafe {
            (api.cu_device_total_mem)(&mut total_memory, device)
        })?;
        let mut driver_version = 0;
        // SAFETY: writes one int.
        check(&api, "cuDriverGetVersion", unsafe {
            (api.cu_driver_get_version)(&mut driver_version)
        })?;
        // A chosen wait mode is set before the context is used (the _v2 call also applies to an
        // active primary context); `Auto` leaves the driver's setting. A refusal leaves it too.
        let wait = host_wait();
        if wait != HostWait::Auto {
            // SAFETY: a valid device and a documented flag value.
            let rc = unsafe { (api.cu_device_primary_ctx_set_flags)(device, wait.flags()) };
            if rc != sys::CUDA_SUCCESS {
                tracing::warn!(
                    rc,
                    ?wait,
                    "cuDevicePrimaryCtxSetFlags failed; the driver's wait"
                );
            }
        }
        let mut ctx = std::ptr::null_mut();
        // SAFETY: writes the primary context handle; released in Drop.
        check(&api, "cuDevicePrimaryCtxRetain", unsafe {
            (api.cu_device_primary_ctx_retain)(&mut ctx, device)
        })?;
        let info = DeviceInfo {
            ordinal,
            name,
            compute_capability,
            multiprocessors,
            total_memory,
            driver_version,
        };
        let cuda = Arc::new(Cuda {
            api,
            device,
            ctx,
            info,
        });
        cuda.bind()?;
        Ok(cuda)
    }

    /// The device's description.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Makes this device's context current on the calling thread (needed once per thread).
    pub fn bind(&self) -> Result<(), GpuError> {
        // SAFETY: ctx is a retained primary context, valid until Drop.
        self.check("cuCtxSetCurrent", unsafe {
            (self.api.cu_ctx_set_current)(self.ctx)
        })
    }

    /// Waits for the legacy default stream, where the synchronous copies run: a copy from
    /// pageable memory may return before its last DMA lands, and kernels on our non-blocking
    /// streams are not ordered after it.
    fn landed(&self) -> Result<(), GpuError> {
        // SAFETY: the null stream is the context's legacy default stream; the context is
        // current (bound by the caller).
        self.check("cuStreamSynchronize", unsafe {
            (self.api.cu_stream_synchronize)(std::ptr::null_mut())
        })
    }

    /// Waits for all work on the device's context.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: no arguments; the context is current.
        self.check("cuCtxSynchronize", unsafe {
            (self.api.cu_ctx_synchronize)()
        })
    }

    /// Turns a `CUresult` into a typed error carrying the driver's message.
    pub(crate) fn check(&self, call: &'static str, rc: sys::CuResult) -> Result<(), GpuError> {
        check(&self.api, call, rc)
    }

    /// Allocates `bytes` of device memory with `cuMemAlloc` (IPC-exportable).
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer, GpuError> {
        let ptr = self.alloc_raw(bytes)?;
        Ok(DeviceBuffer {
            cuda: self.clone(),
            ptr,
            bytes,
            owner: Owner::Driver,
        })
    }

    /// `cuMemAlloc` of `bytes` (at least 1); the caller frees it with [`Cuda::free_raw`].
    pub(super) fn alloc_raw(&self, bytes: usize) -> Result<u64, GpuError> {
        self.bind()?;
        let mut ptr = 0;
        // SAFETY: writes one device pointer.
        self.check("cuMemAlloc", unsafe {
            (self.api.cu_mem_alloc)(&mut ptr, bytes.max(1))
        })?;
        Ok(ptr)
    }

    /// `cuMemFree`: waits for the device to finish the work in flight, so hot paths reuse
    /// memory through a [`super::pool::MemoryPool`] instead.
    pub(super) fn free_raw(&self, ptr: u64) {
        let _ = self.bind();
        // SAFETY: the caller passes a pointer from alloc_raw, once.
        unsafe { (self.api.cu_mem_free)(ptr) };
    }

    /// Allocates a device buffer and copies `data` into it.
    pub fn upload<T: bytemuck_like::Pod>(
        self: &Arc<Self>,
        data: &[T],
    ) -> Result<DeviceBuffer, GpuError> {
        let buf = self.alloc(std::mem::size_of_val(data))?;
        buf.write(data)?;
        Ok(buf)
    }

    /// Creates a non-blocking stream.
    pub fn stream(self: &Arc<Self>) -> Result<Stream, GpuError> {
        self.bind()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: writes one stream handle; destroyed in Stream's Drop.
        self.check("cuStreamCreate", unsafe {
            (self.api.cu_stream_create)(&mut raw, sys::CU_STREAM_NON_BLOCKING)
        })?;
        Ok(Stream {
            cuda: self.clone(),
            raw,
        })
    }

    /// Creates an event; `timing` false gives a cheaper event that cannot be timed;
    /// `interprocess` makes it exportable (requires `timing` false).
    pub fn event(self: &Arc<Self>, timing: bool, interprocess: bool) -> Result<Event, GpuError> {
        self.bind()?;
        let mut flags = 0;
        if !timing {
            flags |= sys::CU_EVENT_DISABLE_TIMING;
        }
        if interprocess {
            flags |= sys::CU_EVENT_INTERPROCESS;
        }
        let mut raw = std::ptr::null_mut();
        // SAFETY: writes one event handle; destroyed in Event's Drop.
        self.check("cuEventCreate", unsafe {
            (self.api.cu_event_create)(&mut raw, flags)
        })?;
        Ok(Event {
            cuda: self.clone(),
            raw,
        })
    }

    /// JIT-loads a PTX module.
    pub fn load_module(self: &Arc<Self>, ptx: &str) -> Result<Module, GpuError> {
        self.bind()?;
        let text =
            CString::new(ptx).map_err(|_| GpuError::Kernels("ptx holds a nul byte".into()))?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: text is a NUL-terminated PTX image that outlives the call.
        self.check("cuModuleLoadData", unsafe {
            (self.api.cu_module_load_data)(&mut raw, text.as_ptr().cast())
        })?;
        Ok(Module {
            cuda: self.clone(),
            raw,
        })
    }

    /// Asynchronous device-to-device copy of `bytes` on `stream`.
    pub fn copy_dtod(
        &self,
        dst: &DeviceBuffer,
        src: &DeviceBuffer,
        bytes: usize,
        stream: &Stream,
    ) -> Result<(), GpuError> {
        if bytes > dst.bytes || bytes > src.bytes {
            return Err(GpuError::InvalidArgument(
                "copy larger than a buffer".into(),
            ));
        }
        // SAFETY: both ranges lie within live allocations (checked above).
        self.check("cuMemcpyDtoDAsync", unsafe {
            (self.api.cu_memcpy_dtod_async)(dst.ptr, src.ptr, bytes, stream.raw)
        })
    }

    /// Sets the first `bytes` (a multiple of 4) of `dst` to the 32-bit `value` on `stream`:
    /// the device's write-only bandwidth, for benchmarks.
    pub fn fill_u32(
        &self,
        dst: &DeviceBuffer,
        value: u32,
        bytes: usize,
        stream: &Stream,
    ) -> Result<(), GpuError> {
        if bytes > dst.bytes || !bytes.is_multiple_of(4) {
            return Err(GpuError::InvalidArgument(
                "fill larger than the buffer or not whole words".into(),
            ));
        }
        // SAFETY: the range lies within a live allocation (checked above).
        self.check("cuMemsetD32Async", unsafe {
            (self.api.cu_memset_d32_async)(dst.ptr, value, bytes / 4, stream.raw)
        })
    }

    /// Copies a pitched device region of `rows` rows of `row_bytes` into `dst` at `dst_offset`,
    /// tightly packed, on `stream`.
    pub(crate) fn copy_2d_to_device(
        &self,
        src: u64,
        src_pitch: usize,
        dst: u64,
        row_bytes: usize,
        rows: usize,
        stream: sys::CuStream,
    ) -> Result<(), GpuError> {
        let p = CudaMemcpy2d {
            src_x_in_bytes: 0,
            src_y: 0,
            src_memory_type: sys::CU_MEMORYTYPE_DEVICE,
            src_host: std::ptr::null(),
            src_device: src,
            src_array: std::ptr::null_mut(),
            src_pitch,
            dst_x_in_bytes: 0,
            dst_y: 0,
            dst_memory_type: sys::CU_MEMORYTYPE_DEVICE,
            dst_host: std::ptr::null_mut(),
            dst_device: dst,
            dst_array: std::ptr::null_mut(),
            dst_pitch: row_bytes,
            width_in_bytes: row_bytes,
            height: rows,
        };
        // SAFETY: the caller passes a mapped source of rows x src_pitch bytes and a destination
        // of rows x row_bytes bytes inside a live allocation.
        self.check("cuMemcpy2DAsync", unsafe {
            (self.api.cu_memcpy_2d_async)(&p, stream)
        })
    }

    /// Copies a pitched device region into host memory, tightly packed, on `stream`.
    pub(crate) fn copy_2d_to_host(
        &self,
        src: u64,
        src_pitch: usize,
        dst: &mut [u8],
        row_bytes: usize,
        rows: usize,
        stream: sys::CuStream,
    ) -> Result<(), GpuError> {
        if dst.len() < row_bytes * rows {
            return Err(GpuError::InvalidArgument("host buffer too small".into()));
        }
        let p = CudaMemcpy2d {
            src_x_in_bytes: 0,
            src_y: 0,
            src_memory_type: sys::CU_MEMORYTYPE_DEVICE,
            src_host: std::ptr::null(),
            src_device: src,
            src_array: std::ptr::null_mut(),
            src_pitch,
            dst_x_in_bytes: 0,
            dst_y: 0,
            dst_memory_type: sys::CU_MEMORYTYPE_HOST,
            dst_host: dst.as_mut_ptr().cast(),
            dst_device: 0,
            dst_array: std::ptr::null_mut(),
            dst_pitch: row_bytes,
            width_in_bytes: row_bytes,
            height: rows,
        };
        // SAFETY: dst holds rows x row_bytes bytes (checked); the caller passes a mapped source
        // and synchronises the stream before dst is read or dropped.
        self.check("cuMemcpy2DAsync", unsafe {
            (self.api.cu_memcpy_2d_async)(&p, stream)
        })
    }

    /// Launches `func` with `params` (one pointer per kernel argument, in order).
    ///
    /// # Safety
    /// Each pointer in `params` must point to a live value of exactly the type the kernel
    /// declares for that argument, and every device pointer among them must be valid for the
    /// accesses the kernel makes.
    pub(crate) unsafe fn launch(
        &self,
        func: &Function<'_>,
        grid: (u32, u32),
        block: u32,
        stream: &Stream,
        params: &mut [*mut c_void],
    ) -> Result<(), GpuError> {
        // SAFETY: upheld by the caller (argument types and pointer validity).
        self.check("cuLaunchKernel", unsafe {
            (self.api.cu_launch_kernel)(
                func.raw,
                grid.0,
                grid.1,
                1,
                block,
                1,
                1,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        // SAFETY: releases the primary context retained in open(); every handle holding an
        // Arc<Cuda> is gone by now.
        unsafe { (self.api.cu_device_primary_ctx_release)(self.device) };
    }
}

fn check(api: &CudaApi, call: &'static str, rc: sys::CuResult) -> Result<(), GpuError> {
    api.check(rc)
        .map_err(|error| GpuError::Cuda { call, error })
}

/// Plain-old-data element types that may be copied to and from device memory byte for byte.
pub(crate) mod bytemuck_like {
    /// A type with no padding and no invalid bit patterns.
    ///
    /// # Safety
    /// Implement only for such types.
    pub unsafe trait Pod: Copy + 'static {}
    // SAFETY: primitive numbers have no padding and accept every bit pattern.
    unsafe impl Pod for u8 {}
    // SAFETY: as above.
    unsafe impl Pod for u16 {}
    // SAFETY: as above.
    unsafe impl Pod for u32 {}
    // SAFETY: as above.
    unsafe impl Pod for u64 {}
    // SAFETY: as above.
    unsafe impl Pod for f32 {}
}

/// Device memory from `cuMemAlloc`, freed on drop (or given back to the pool it came from).
pub struct DeviceBuffer {
    cuda: Arc<Cuda>,
    ptr: u64,
    bytes: usize,
    owner: Owner,
}

/// Where a buffer's memory goes when it drops.
enum Owner {
    /// `cuMemFree`.
    Driver,
    /// Back to its pool, as an allocation of `capacity` bytes.
    Pool {
        pool: Arc<super::pool::MemoryPool>,
        capacity: usize,
    },
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl DeviceBuffer {
    /// A buffer of `bytes` over `capacity` bytes at `ptr` lent by `pool`, which takes the
    /// memory back when the buffer drops.
    pub(super) fn pooled(
        cuda: Arc<Cuda>,
        ptr: u64,
        bytes: usize,
        pool: Arc<super::pool::MemoryPool>,
        capacity: usize,
    ) -> DeviceBuffer {
        DeviceBuffer {
            cuda,
            ptr,
            bytes,
            owner: Owner::Pool { pool, capacity },
        }
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Copies `data` to the start of the buffer (synchronous).
    pub fn write<T: bytemuck_like::Pod>(&self, data: &[T]) -> Result<(), GpuError> {
        let n = std::mem::size_of_val(data);
        if n > self.bytes {
            return Err(GpuError::InvalidArgument(format!(
                "{n} bytes into a {} byte buffer",
                self.bytes
            )));
        }
        self.cuda.bind()?;
        // SAFETY: n bytes fit the allocation and `data` is n readable bytes.
        self.cuda.check("cuMemcpyHtoD", unsafe {
            (self.cuda.api.cu_memcpy_htod)(self.ptr, data.as_ptr().cast(), n)
        })?;
        self.cuda.landed()
    }

    /// The device address of byte `offset`, when `len` bytes from there fit the buffer.
    fn span_for_write(&self, offset: usize, len: usize) -> Result<u64, GpuError> {
        if offset.checked_add(len).is_none_or(|e| e > self.bytes) {
            return Err(GpuError::InvalidArgument(format!(
                "{len} bytes at {offset} into a {} byte buffer",
                self.bytes
            )));
        }
        Ok(self.ptr + offset as u64)
    }

    /// Queues a copy of `data` to byte `offset` of the buffer on `stream` (bounds-checked):
    /// work queued on `stream` afterwards sees the bytes. `data` may be freed on return (the
    /// driver stages pageable memory before returning).
    pub fn write_async<T: bytemuck_like::Pod>(
        &self,
        offset: usize,
        data: &[T],
        stream: &Stream,
    ) -> Result<(), GpuError> {
        let n = std::mem::size_of_val(data);
        let dst = self.span_for_write(offset, n)?;
        self.cuda.bind()?;
        // SAFETY: n bytes from offset lie in the allocation (checked); `data` is n readable
        // bytes of a Pod type, staged by the driver before the call returns; `stream` is live.
        self.cuda.check("cuMemcpyHtoDAsync", unsafe {
            (self.cuda.api.cu_memcpy_htod_async)(dst, data.as_ptr().cast(), n, stream.raw)
        })
    }

    /// Copies the start of the buffer into `out` (synchronous).
    pub fn read<T: bytemuck_like::Pod>(&self, out: &mut [T]) -> Result<(), GpuError> {
        let n = std::mem::size_of_val(out);
        if n > self.bytes {
            return Err(GpuError::InvalidArgument(format!(
                "{n} bytes from a {} byte buffer",
                self.bytes
            )));
        }
        self.cuda.bind()?;
        // SAFETY: n bytes lie in the allocation; `out` is n writable bytes of a Pod type.
        self.cuda.check("cuMemcpyDtoH", unsafe {
            (self.cuda.api.cu_memcpy_dtoh)(out.as_mut_ptr().cast(), self.ptr, n)
        })
    }

    /// Copies `data` to byte `offset` of the buffer (synchronous, bounds-checked).
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), GpuError> {
        let dst = self.span_for_write(offset, data.len())?;
        self.cuda.bind()?;
        // SAFETY: offset..offset+len lies in the allocation (checked); `data` is len readable
        // bytes.
        self.cuda.check("cuMemcpyHtoD", unsafe {
            (self.cuda.api.cu_memcpy_htod)(dst, data.as_ptr().cast(), data.len())
        })?;
        self.cuda.landed()
    }

    /// Copies bytes from `offset` of the buffer into `out` (synchronous, bounds-checked).
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), GpuError> {
        if offset.checked_add(out.len()).is_none_or(|e| e > self.bytes) {
            return Err(GpuError::InvalidArgument(format!(
                "{} bytes at {offset} from a {} byte buffer",
                out.len(),
                self.bytes
            )));
        }
        self.cuda.bind()?;
        // SAFETY: offset..offset+len lies in the allocation (checked); `out` is len writable
        // bytes.
        self.cuda.check("cuMemcpyDtoH", unsafe {
            (self.cuda.api.cu_memcpy_dtoh)(
                out.as_mut_ptr().cast(),
                self.ptr + offset as u64,
                out.len(),
            )
        })
    }

    /// Sets every byte to `value` (synchronous).
    pub fn fill(&self, value: u8) -> Result<(), GpuError> {
        self.cuda.bind()?;
        // SAFETY: the range is the whole allocation.
        self.cuda.check("cuMemsetD8", unsafe {
            (self.cuda.api.cu_memset_d8)(self.ptr, value, self.bytes)
        })
    }

    /// The CUDA IPC handle of this allocation (64 opaque bytes another process can open).
    pub fn ipc_handle(&self) -> Result<[u8; 64], GpuError> {
        let mut h = sys::CuIpcHandle { reserved: [0; 64] };
        self.cuda.bind()?;
        // SAFETY: ptr is the base of a cuMemAlloc allocation; writes 64 bytes.
        self.cuda.check("cuIpcGetMemHandle", unsafe {
            (self.cuda.api.cu_ipc_get_mem_handle)(&mut h, self.ptr)
        })?;
        Ok(h.reserved)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        match &self.owner {
            // ptr came from alloc_raw and is freed once.
            Owner::Driver => self.cuda.free_raw(self.ptr),
            Owner::Pool { pool, capacity } => pool.give_back(self.ptr, *capacity),
        }
    }
}

/// A CUDA stream, destroyed on drop.
pub struct Stream {
    cuda: Arc<Cuda>,
    pub(crate) raw: sys::CuStream,
}

// SAFETY: stream handles may be used from any thread with the context current.
unsafe impl Send for Stream {}
// SAFETY: as above; the driver serialises use of a stream.
unsafe impl Sync for Stream {}

impl Stream {
    /// Blocks until all work queued on the stream has finished.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.cuda.bind()?;
        // SAFETY: raw is a live stream.
        self.cuda.check("cuStreamSynchronize", unsafe {
            (self.cuda.api.cu_stream_synchronize)(self.raw)
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.cuda.bind();
        // SAFETY: raw is a live stream, destroyed once.
        unsafe { (self.cuda.api.cu_stream_destroy)(self.raw) };
    }
}

/// A CUDA event, destroyed on drop.
pub struct Event {
    cuda: Arc<Cuda>,
    raw: sys::CuEvent,
}

// SAFETY: event handles may be used from any thread with the context current.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Event {
    /// Records the event on `stream`.
    pub fn record(&self, stream: &Stream) -> Result<(), GpuError> {
        // SAFETY: both handles are live.
        self.cuda.check("cuEventRecord", unsafe {
            (self.cuda.api.cu_event_record)(self.raw, stream.raw)
        })
    }

    /// Blocks until the event has completed.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        // SAFETY: raw is a live event.
        self.cuda.check("cuEventSynchronize", unsafe {
            (self.cuda.api.cu_event_synchronize)(self.raw)
        })
    }

    /// Milliseconds between `start` and this event (both recorded and completed, timing on).
    pub fn elapsed_ms_since(&self, start: &Event) -> Result<f32, GpuError> {
        let mut ms = 0f32;
        // SAFETY: both are live events; writes one float.
        self.cuda.check("cuEventElapsedTime", unsafe {
            (self.cuda.api.cu_event_elapsed_time)(&mut ms, start.raw, self.raw)
        })?;
        Ok(ms)
    }

    /// The CUDA IPC handle of an interprocess event.
    pub fn ipc_handle(&self) -> Result<[u8; 64], GpuError> {
        let mut h = sys::CuIpcHandle { reserved: [0; 64] };
        // SAFETY: raw is a live event; writes 64 bytes.
        self.cuda.check("cuIpcGetEventHandle", unsafe {
            (self.cuda.api.cu_ipc_get_event_handle)(&mut h, self.raw)
        })?;
        Ok(h.reserved)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: raw is a live event, destroyed once.
        unsafe { (self.cuda.api.cu_event_destroy)(self.raw) };
    }
}

/// A loaded PTX module, unloaded on drop.
pub struct Module {
    cuda: Arc<Cuda>,
    raw: sys::CuModule,
}

// SAFETY: module handles are usable from any thread with the context current.
unsafe impl Send for Module {}
// SAFETY: as above; function lookups do not mutate the module.
unsafe impl Sync for Module {}

impl Module {
    /// Looks up a kernel by its (extern "C") name.
    pub fn function(&self, name: &str) -> Result<Function<'_>, GpuError> {
        let cname = CString::new(name).map_err(|_| GpuError::Kernels("bad kernel name".into()))?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: the module is live and cname NUL-terminated.
        self.cuda.check("cuModuleGetFunction", unsafe {
            (self.cuda.api.cu_module_get_function)(&mut raw, self.raw, cname.as_ptr())
        })?;
        Ok(Function {
            raw,
            _module: std::marker::PhantomData,
        })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        let _ = self.cuda.bind();
        // SAFETY: raw is a live module, unloaded once.
        unsafe { (self.cuda.api.cu_module_unload)(self.raw) };
    }
}

/// A kernel of a [`Module`].
#[derive(Clone, Copy)]
pub struct Function<'m> {
    raw: sys::CuFunction,
    _module: std::marker::PhantomData<&'m Module>,
}

// SAFETY: function handles are immutable and usable from any thread.
unsafe impl Send for Function<'_> {}
// SAFETY: as above.
unsafe impl Sync for Function<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_a_driver_is_a_typed_error() {
        match Cuda::open(0) {
            Ok(c) => println!("driver present: {:?}", c.info()),
            Err(GpuError::NoDriver(m)) => kvfetcher_testkit::skip(
                kvfetcher_testkit::Missing::Gpu,
                format!("no CUDA driver ({m})"),
            ),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    #[test]
    fn the_wait_mode_set_is_the_one_devices_get() {
        for wait in [
            HostWait::Spin,
            HostWait::Yield,
            HostWait::Block,
            HostWait::Auto,
        ] {
            set_host_wait(wait);
            assert_eq!(host_wait(), wait);
        }
        assert_eq!(HostWait::Block.flags(), 4);
        assert_eq!(HostWait::Auto.flags(), 0);
    }
}
