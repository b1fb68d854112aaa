//! CUDA IPC: the importing side of device buffers and interprocess events another process
//! exported, and device memory accounting.
//!
//! Exporting is on the owners ([`DeviceBuffer::ipc_handle`](super::DeviceBuffer::ipc_handle),
//! [`Event::ipc_handle`](super::Event::ipc_handle) of an event made with
//! `Cuda::event(false, true)`). An engine process opens the 64-byte handles here:
//! [`ImportedBuffer`] (`cuIpcOpenMemHandle` with lazy peer access, closed on drop) and
//! [`ImportedEvent`] (`cuIpcOpenEventHandle`), whose [`ImportedEvent::wait_on`] orders the
//! importer's stream after the exporter's work without any host synchronisation.

use std::sync::Arc;

use super::cuda::{Cuda, Stream};
use super::GpuError;
use kvfetcher_cuda_sys::cuda::{self as sys, CuIpcHandle};

/// Free and total device memory in bytes (`cuMemGetInfo`, device-wide).
pub fn mem_info(cuda: &Cuda) -> Result<(usize, usize), GpuError> {
    cuda.bind()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: writes two size_t values through valid pointers; the context is current.
    cuda.check("cuMemGetInfo", unsafe {
        (cuda.api.cu_mem_get_info)(&mut free, &mut total)
    })?;
    Ok((free, total))
}

/// Device memory of another process, mapped from its IPC handle; unmapped on drop.
pub struct ImportedBuffer {
    cuda: Arc<Cuda>,
    ptr: u64,
    bytes: usize,
}

impl std::fmt::Debug for ImportedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImportedBuffer({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl ImportedBuffer {
    /// Opens `handle` (from `DeviceBuffer::ipc_handle` in another process) whose allocation
    /// is at least `bytes` long.
    pub fn open(cuda: &Arc<Cuda>, handle: [u8; 64], bytes: usize) -> Result<Self, GpuError> {
        cuda.bind()?;
        let mut ptr = 0;
        // SAFETY: writes one device pointer; the handle is passed by value as 64 bytes, as
        // cuda.h declares; the mapping is closed once in Drop.
        cuda.check("cuIpcOpenMemHandle", unsafe {
            (cuda.api.cu_ipc_open_mem_handle)(
                &mut ptr,
                CuIpcHandle { reserved: handle },
                sys::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS,
            )
        })?;
        Ok(ImportedBuffer {
            cuda: cuda.clone(),
            ptr,
            bytes,
        })
    }

    /// The mapped device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes, as declared when opened.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Bytes of the underlying allocation from [`ImportedBuffer::ptr`] on, as the driver
    /// knows it (`cuMemGetAddressRange`): the exporter's real size, whatever was declared.
    pub fn allocation_len(&self) -> Result<usize, GpuError> {
        self.cuda.bind()?;
        let (mut base, mut size) = (0u64, 0usize);
        // SAFETY: writes one device pointer and one size_t; ptr is a live mapping.
        self.cuda.check("cuMemGetAddressRange", unsafe {
            (self.cuda.api.cu_mem_get_address_range)(&mut base, &mut size, self.ptr)
        })?;
        Ok((base as usize + size).saturating_sub(self.ptr as usize))
    }

    /// Copies `out.len()` bytes from byte `offset` of the mapping into `out` (synchronous).
    /// The range must lie within both the declared length and the real allocation.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), GpuError> {
        let end = offset.checked_add(out.len());
        if end.is_none_or(|e| e > self.bytes || e > self.allocation_len().unwrap_or(0)) {
            return Err(GpuError::InvalidArgument(format!(
                "{} bytes at {offset} outside the imported allocation",
                out.len()
            )));
        }
        // SAFETY: offset..offset+len lies inside the mapped allocation (checked against the
        // driver's own range above); `out` is len writable bytes.
        self.cuda.check("cuMemcpyDtoH", unsafe {
            (self.cuda.api.cu_memcpy_dtoh)(
                out.as_mut_ptr().cast(),
                self.ptr + offset as u64,
                out.len(),
            )
        })
    }

    /// Queues a copy of the start of the buffer into `out` on `stream`, after the work already
    /// queued there (such as [`ImportedEvent::wait_on`]).
    ///
    /// # Safety
    /// `out` must stay alive and unread until `stream` has been synchronised.
    pub unsafe fn copy_to_host_async(
        &self,
        out: &mut [u8],
        stream: &Stream,
    ) -> Result<(), GpuError> {
        if out.len() > self.bytes {
            return Err(GpuError::InvalidArgument(format!(
                "{} bytes from a {} byte buffer",
                out.len(),
                self.bytes
            )));
        }
        self.cuda.bind()?;
        // SAFETY: the range lies in the mapping (checked); the caller keeps `out` alive until
        // the stream is synchronised.
        self.cuda.check("cuMemcpyDtoHAsync", unsafe {
            (self.cuda.api.cu_memcpy_dtoh_async)(
                out.as_mut_ptr().cast(),
                self.ptr,
                out.len(),
                stream.raw,
            )
        })
    }
}

impl Drop for ImportedBuffer {
    fn drop(&mut self) {
        let _ = self.cuda.bind();
        // SAFETY: ptr came from cuIpcOpenMemHandle and is closed once.
        unsafe { (self.cuda.api.cu_ipc_close_mem_handle)(self.ptr) };
    }
}

/// An interprocess event of another process, opened from its IPC handle; destroyed on drop.
pub struct ImportedEvent {
    cuda: Arc<Cuda>,
    raw: sys::CuEvent,
}

// SAFETY: event handles may be used from any thread with the context current.
unsafe impl Send for ImportedEvent {}

impl std::fmt::Debug for ImportedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImportedEvent")
    }
}

impl ImportedEvent {
    /// Opens `handle` (from `Event::ipc_handle` of an interprocess event in another process).
    pub fn open(cuda: &Arc<Cuda>, handle: [u8; 64]) -> Result<Self, GpuError> {
        cuda.bind()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: writes one event handle; destroyed once in Drop.
        cuda.check("cuIpcOpenEventHandle", unsafe {
            (cuda.api.cu_ipc_open_event_handle)(&mut raw, CuIpcHandle { reserved: handle })
        })?;
        Ok(ImportedEvent {
            cuda: cuda.clone(),
            raw,
        })
    }

    /// Makes later work on `stream` wait for the exporter's most recent record of the event
    /// (device-side; the host does not block).
    pub fn wait_on(&self, stream: &Stream) -> Result<(), GpuError> {
        self.cuda.bind()?;
        // SAFETY: both handles are live; flags 0.
        self.cuda.check("cuStreamWaitEvent", unsafe {
            (self.cuda.api.cu_stream_wait_event)(stream.raw, self.raw, 0)
        })
    }
}

impl Drop for ImportedEvent {
    fn drop(&mut self) {
        let _ = self.cuda.bind();
        // SAFETY: raw is a live event opened from a handle, destroyed once.
        unsafe { (self.cuda.api.cu_event_destroy)(self.raw) };
    }
}
