//! The CUDA driver (`libcuda.so.1`), loaded at run time: the client's safe layer over it.
//!
//! Only what a client of GPU buffers needs: open the daemon's IPC memory and event handles,
//! wait on those events (host or stream), and export a device buffer for a save. Every call
//! runs with the device's primary context pushed and popped again, so the calling (engine)
//! thread's current context is left as it was. The raw entry points are the shared
//! `kvfetcher-cuda-sys` table (the daemon uses the same one); this module is the client's safe
//! layer over it and the only caller of those pointers here. A host without the driver gets
//! [`GpuError::Unavailable`] on first use; nothing is loaded for host-only clients.

use std::ffi::{c_int, c_void};
use std::sync::{Arc, OnceLock};

use kvfetcher_cuda_sys::cuda::{
    CuContext, CuDevice, CuDevicePtr, CuEvent, CuIpcHandle, CuResult, CudaApi, CUDA_SUCCESS,
    CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
};
use kvfetcher_cuda_sys::LoadError;

use crate::error::GpuError;
use crate::protocol::GPU_IPC_HANDLE_LEN;

/// The driver's IPC handles are the protocol's handle bytes, passed through unchanged.
const _: () = assert!(std::mem::size_of::<CuIpcHandle>() == GPU_IPC_HANDLE_LEN);

/// The client's view of the shared driver table: loading and result checks as [`GpuError`]s.
type Api = CudaApi;

/// Loads the driver and initialises it; a host without one gets [`GpuError::Unavailable`].
fn load() -> Result<Api, GpuError> {
    let api = CudaApi::load().map_err(|e| {
        GpuError::Unavailable(match e {
            LoadError::Library { .. } => {
                format!("libcuda.so.1 not found: GPU buffers need the NVIDIA driver ({e})")
            }
            LoadError::Symbol { .. } => format!("libcuda.so.1 is too old: {e}"),
        })
    })?;
    // SAFETY: cuInit takes flags by value (0 is the only valid value).
    let rc = unsafe { (api.cu_init)(0) };
    if rc != CUDA_SUCCESS {
        let e = error(&api, "cuInit", rc);
        return Err(GpuError::Unavailable(format!("no usable CUDA driver: {e}")));
    }
    Ok(api)
}

/// The error of a failed call `call`, with the driver's name and text for `rc`.
fn error(api: &Api, call: &'static str, rc: CuResult) -> GpuError {
    GpuError::Driver {
        call,
        error: api.error(rc),
    }
}

/// `Ok` for success, else the [`GpuError::Driver`] of `call`.
fn check(api: &Api, call: &'static str, rc: CuResult) -> Result<(), GpuError> {
    api.check(rc)
        .map_err(|error| GpuError::Driver { call, error })
}

/// The driver, loaded and initialised on first use.
fn api() -> Result<&'static Api, GpuError> {
    static API: OnceLock<Result<Api, GpuError>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Whether the driver can be loaded and initialised here (for tests that need a GPU).
pub fn driver_available() -> Result<(), GpuError> {
    api().map(|_| ())
}

/// A CUDA device with its primary context retained (the context the CUDA runtime uses, so
/// memory opened here is usable by an engine built on the runtime).
pub(crate) struct Device {
    api: &'static Api,
    ordinal: u32,
    dev: CuDevice,
    ctx: CuContext,
}

// SAFETY: a CUcontext is a process-wide driver handle usable from any thread (the driver API is
// thread-safe); `Device` only reads it, and never makes it current without popping it again.
unsafe impl Send for Device {}
// SAFETY: as above; no method mutates the handle.
unsafe impl Sync for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({})", self.ordinal)
    }
}

impl Device {
    /// Retains the primary context of device `ordinal`.
    pub(crate) fn retain(ordinal: u32) -> Result<Arc<Device>, GpuError> {
        let api = api()?;
        let mut count: c_int = 0;
        // SAFETY: `count` is a valid out pointer.
        check(api, "cuDeviceGetCount", unsafe {
            (api.cu_device_get_count)(&mut count)
        })?;
        let count = u32::try_from(count).unwrap_or(0);
        if ordinal >= count {
            return Err(GpuError::NoDevice {
                device: ordinal,
                count,
            });
        }
        let mut dev: CuDevice = 0;
        // SAFETY: valid out pointer; the ordinal is below the device count (fits c_int).
        check(api, "cuDeviceGet", unsafe {
            (api.cu_device_get)(&mut dev, ordinal as c_int)
        })?;
        let mut ctx: CuContext = std::ptr::null_mut();
        // SAFETY: valid out pointer and device; the reference is released in Drop.
        check(api, "cuDevicePrimaryCtxRetain", unsafe {
            (api.cu_device_primary_ctx_retain)(&mut ctx, dev)
        })?;
        Ok(Arc::new(Device {
            api,
            ordinal,
            dev,
            ctx,
        }))
    }

    /// The CUDA ordinal.
    pub(crate) fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// Runs `f` with this device's primary context current, then restores the caller's.
    fn with<R>(&self, f: impl FnOnce(&Api) -> Result<R, GpuError>) -> Result<R, GpuError> {
        let api = self.api;
        // SAFETY: `ctx` is a retained primary context, alive until Drop.
        check(api, "cuCtxPushCurrent", unsafe {
            (api.cu_ctx_push_current)(self.ctx)
        })?;
        let r = f(api);
        let mut popped: CuContext = std::ptr::null_mut();
        // SAFETY: pops the context pushed above (valid out pointer); the caller's current
        // context, if any, becomes current again.
        let rc = unsafe { (api.cu_ctx_pop_current)(&mut popped) };
        let r = r?;
        check(api, "cuCtxPopCurrent", rc)?;
        Ok(r)
    }

    /// Opens the daemon's exported allocation; returns its address here and its size.
    pub(crate) fn open_mem(
        self: &Arc<Self>,
        handle: &[u8; GPU_IPC_HANDLE_LEN],
    ) -> Result<IpcMem, GpuError> {
        let h = CuIpcHandle { reserved: *handle };
        let ptr = self.with(|api| {
            let mut ptr: CuDevicePtr = 0;
            // SAFETY: valid out pointer; the handle is 64 bytes passed by value as cuda.h
            // declares; the flag is a defined constant.
            check(api, "cuIpcOpenMemHandle", unsafe {
                (api.cu_ipc_open_mem_handle)(&mut ptr, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
            })?;
            Ok(ptr)
        })?;
        // The size, where the driver reports it for an imported allocation.
        let size = match self.with(|api| address_range(api, ptr)) {
            Ok((base, size)) if base == ptr => Some(size),
            _ => None,
        };
        Ok(IpcMem {
            dev: self.clone(),
            ptr,
            size,
        })
    }

    /// Opens one of the daemon's interprocess events.
    pub(crate) fn open_event(
        self: &Arc<Self>,
        handle: &[u8; GPU_IPC_HANDLE_LEN],
    ) -> Result<IpcEvent, GpuError> {
        let h = CuIpcHandle { reserved: *handle };
        let ev = self.with(|api| {
            let mut ev: CuEvent = std::ptr::null_mut();
            // SAFETY: valid out pointer; the handle is passed by value as cuda.h declares.
            check(api, "cuIpcOpenEventHandle", unsafe {
                (api.cu_ipc_open_event_handle)(&mut ev, h)
            })?;
            Ok(ev)
        })?;
        Ok(IpcEvent {
            dev: self.clone(),
            ev,
        })
    }

    /// Exports the allocation holding `ptr..ptr + len` (device memory of this device) for the
    /// daemon: its IPC handle and the offset of `ptr` in it.
    pub(crate) fn export(
        &self,
        ptr: u64,
        len: usize,
    ) -> Result<([u8; GPU_IPC_HANDLE_LEN], u64), ExportError> {
        self.with(|api| {
            let mut ordinal: c_int = -1;
            // SAFETY: the attribute DEVICE_ORDINAL writes one int into `ordinal`. Unknown
            // pointers are reported as an error code, not dereferenced.
            let rc = unsafe {
                (api.cu_pointer_get_attribute)(
                    (&mut ordinal as *mut c_int).cast(),
                    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                    ptr,
                )
            };
            if rc != CUDA_SUCCESS {
                return Ok(Err(format!(
                    "{ptr:#x} is not CUDA device memory ({})",
                    error(api, "cuPointerGetAttribute", rc)
                )));
            }
            if ordinal != self.ordinal as c_int {
                return Ok(Err(format!(
                    "{ptr:#x} is memory of device {ordinal}, the layout names device {}",
                    self.ordinal
                )));
            }
            let (base, size) = address_range(api, ptr)?;
            let offset = ptr - base;
            if (len as u64) > (size as u64).saturating_sub(offset) {
                return Ok(Err(format!(
                    "{len} bytes at offset {offset} overrun the allocation of {size} bytes"
                )));
            }
            let mut h = CuIpcHandle {
                reserved: [0; GPU_IPC_HANDLE_LEN],
            };
            // SAFETY: valid out pointer; `base` is the start of a live allocation (above).
            check(api, "cuIpcGetMemHandle", unsafe {
                (api.cu_ipc_get_mem_handle)(&mut h, base)
            })?;
            Ok(Ok((h.reserved, offset)))
        })
        .map_err(ExportError::Gpu)?
        .map_err(ExportError::Argument)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: releases the reference retained in `retain`; nothing opened in the context
        // outlives this (IpcMem and IpcEvent hold an Arc<Device>).
        let _ = unsafe { (self.api.cu_device_primary_ctx_release)(self.dev) };
    }
}

/// Why an export failed: a bad pointer (the caller's mistake) or the driver.
#[derive(Debug)]
pub(crate) enum ExportError {
    /// The pointer is not device memory of that device, or `len` overruns its allocation.
    Argument(String),
    /// The driver failed.
    Gpu(GpuError),
}

/// `(base, size)` of the allocation containing `ptr`; the context must be current.
fn address_range(api: &Api, ptr: CuDevicePtr) -> Result<(CuDevicePtr, usize), GpuError> {
    let (mut base, mut size): (CuDevicePtr, usize) = (0, 0);
    // SAFETY: valid out pointers; unknown addresses are reported as an error code.
    check(api, "cuMemGetAddressRange", unsafe {
        (api.cu_mem_get_address_range)(&mut base, &mut size, ptr)
    })?;
    Ok((base, size))
}

/// The daemon's allocation opened in this process; closed on drop.
#[derive(Debug)]
pub(crate) struct IpcMem {
    dev: Arc<Device>,
    ptr: CuDevicePtr,
    size: Option<usize>,
}

impl IpcMem {
    /// The address of the allocation in this process.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The size of the opened allocation, if the driver reports it.
    pub(crate) fn size(&self) -> Option<usize> {
        self.size
    }
}

impl Drop for IpcMem {
    fn drop(&mut self) {
        let ptr = self.ptr;
        let _ = self.dev.with(|api| {
            // SAFETY: `ptr` came from cuIpcOpenMemHandle in this context and is closed once.
            check(api, "cuIpcCloseMemHandle", unsafe {
                (api.cu_ipc_close_mem_handle)(ptr)
            })
        });
    }
}

/// One of the daemon's interprocess events opened here; destroyed on drop.
#[derive(Debug)]
pub(crate) struct IpcEvent {
    dev: Arc<Device>,
    ev: CuEvent,
}

// SAFETY: a CUevent is a driver handle usable from any thread; the methods below only pass it
// to thread-safe driver calls, and Drop destroys it once.
unsafe impl Send for IpcEvent {}
// SAFETY: as above; no method mutates the handle.
unsafe impl Sync for IpcEvent {}

impl IpcEvent {
    /// Blocks the calling thread until the work recorded in the event is complete.
    pub(crate) fn synchronize(&self) -> Result<(), GpuError> {
        let ev = self.ev;
        self.dev.with(|api| {
            // SAFETY: `ev` is an event opened in this context, alive until Drop.
            check(api, "cuEventSynchronize", unsafe {
                (api.cu_event_synchronize)(ev)
            })
        })
    }

    /// Makes all work queued on `stream` after this call wait for the event.
    ///
    /// # Safety
    /// `stream` is NULL (the legacy default stream of the device's primary context) or a live
    /// `CUstream`/`cudaStream_t` of this process.
    pub(crate) unsafe fn stream_wait(&self, stream: *mut c_void) -> Result<(), GpuError> {
        let ev = self.ev;
        self.dev.with(|api| {
            // SAFETY: `ev` is alive until Drop; `stream` is NULL or a live stream per the
            // caller. The driver accepts an event from another context than the stream's.
            check(api, "cuStreamWaitEvent", unsafe {
                (api.cu_stream_wait_event)(stream, ev, 0)
            })
        })
    }
}

impl Drop for IpcEvent {
    fn drop(&mut self) {
        let ev = self.ev;
        let _ = self.dev.with(|api| {
            // SAFETY: `ev` came from cuIpcOpenEventHandle and is destroyed once.
            check(api, "cuEventDestroy", unsafe { (api.cu_event_destroy)(ev) })
        });
    }
}

/// Test-only driver calls that play the daemon's side (allocate, fill, export events).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    impl Device {
        /// `cuMemAlloc` of `n` bytes (leaked unless [`Device::test_free`]d).
        pub(crate) fn test_alloc(&self, n: usize) -> u64 {
            self.with(|api| {
                let mut p = 0;
                // SAFETY: valid out pointer.
                check(api, "cuMemAlloc", unsafe { (api.cu_mem_alloc)(&mut p, n) })?;
                Ok(p)
            })
            .unwrap()
        }

        pub(crate) fn test_free(&self, p: u64) {
            // SAFETY: `p` came from test_alloc.
            self.with(|api| check(api, "cuMemFree", unsafe { (api.cu_mem_free)(p) }))
                .unwrap()
        }

        pub(crate) fn test_write(&self, p: u64, data: &[u8]) {
            self.with(|api| {
                // SAFETY: `data` is readable for its length; `p` has room (test's choice).
                check(api, "cuMemcpyHtoD", unsafe {
                    (api.cu_memcpy_htod)(p, data.as_ptr().cast(), data.len())
                })
            })
            .unwrap()
        }

        pub(crate) fn test_read(&self, p: u64, out: &mut [u8]) {
            self.with(|api| {
                // SAFETY: `out` is writable for its length; `p` has that many bytes.
                check(api, "cuMemcpyDtoH", unsafe {
                    (api.cu_memcpy_dtoh)(out.as_mut_ptr().cast(), p, out.len())
                })
            })
            .unwrap()
        }

        /// An interprocess event recorded on the legacy default stream now; its IPC handle.
        /// The event is leaked (the test process exits soon).
        pub(crate) fn test_recorded_event(&self) -> [u8; GPU_IPC_HANDLE_LEN] {
            self.with(|api| {
                let mut ev: CuEvent = std::ptr::null_mut();
                // SAFETY: valid out pointer; DISABLE_TIMING | INTERPROCESS.
                check(api, "cuEventCreate", unsafe {
                    (api.cu_event_create)(&mut ev, 2 | 4)
                })?;
                // SAFETY: live event, NULL stream.
                check(api, "cuEventRecord", unsafe {
                    (api.cu_event_record)(ev, std::ptr::null_mut())
                })?;
                let mut h = CuIpcHandle {
                    reserved: [0; GPU_IPC_HANDLE_LEN],
                };
                // SAFETY: valid out pointer and live interprocess event.
                check(api, "cuIpcGetEventHandle", unsafe {
                    (api.cu_ipc_get_event_handle)(&mut h, ev)
                })?;
                Ok(h.reserved)
            })
            .unwrap()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_is_64_bytes() {
        assert_eq!(std::mem::size_of::<CuIpcHandle>(), 64);
    }

    #[test]
    fn no_driver_is_a_typed_error() {
        match driver_available() {
            Ok(()) => println!("skipped: a CUDA driver is present"),
            Err(e) => {
                assert!(matches!(e, GpuError::Unavailable(_)), "{e}");
                let e = Device::retain(0).unwrap_err();
                assert!(matches!(e, GpuError::Unavailable(_)), "{e}");
            }
        }
    }
}
