//! The CUDA driver (`libcuda.so.1`), loaded at run time: the client's only CUDA FFI.
//!
//! Only what a client of GPU buffers needs: open the daemon's IPC memory and event handles,
//! wait on those events (host or stream), and export a device buffer for a save. Every call
//! runs with the device's primary context pushed and popped again, so the calling (engine)
//! thread's current context is left as it was. Signatures follow `cuda.h` (CUDA 12/13, 64-bit),
//! as in `daemon/src/gpu/cuda_sys.rs`. A host without the driver gets
//! [`GpuError::Unavailable`] on first use; nothing is loaded for host-only clients.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Arc, OnceLock};

use libloading::Library;

use crate::error::GpuError;
use crate::protocol::GPU_IPC_HANDLE_LEN;

type CuResult = c_int;
type CuDevice = c_int;
type CuDevicePtr = u64;
type CuContext = *mut c_void;
type CuEvent = *mut c_void;
type CuStream = *mut c_void;

const CUDA_SUCCESS: CuResult = 0;
/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`.
const CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;
/// `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL`.
const CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: c_int = 9;

/// `CUipcMemHandle` / `CUipcEventHandle`: 64 opaque bytes, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CuIpcHandle {
    reserved: [u8; GPU_IPC_HANDLE_LEN],
}

/// The driver entry points, resolved once.
struct Api {
    cu_init: unsafe extern "C" fn(c_uint) -> CuResult,
    cu_device_get_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    cu_device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    cu_device_primary_ctx_retain: unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult,
    cu_device_primary_ctx_release: unsafe extern "C" fn(CuDevice) -> CuResult,
    cu_ctx_push_current: unsafe extern "C" fn(CuContext) -> CuResult,
    cu_ctx_pop_current: unsafe extern "C" fn(*mut CuContext) -> CuResult,
    cu_ipc_open_mem_handle: unsafe extern "C" fn(*mut CuDevicePtr, CuIpcHandle, c_uint) -> CuResult,
    cu_ipc_close_mem_handle: unsafe extern "C" fn(CuDevicePtr) -> CuResult,
    cu_ipc_open_event_handle: unsafe extern "C" fn(*mut CuEvent, CuIpcHandle) -> CuResult,
    cu_event_destroy: unsafe extern "C" fn(CuEvent) -> CuResult,
    cu_event_synchronize: unsafe extern "C" fn(CuEvent) -> CuResult,
    cu_stream_wait_event: unsafe extern "C" fn(CuStream, CuEvent, c_uint) -> CuResult,
    cu_ipc_get_mem_handle: unsafe extern "C" fn(*mut CuIpcHandle, CuDevicePtr) -> CuResult,
    cu_mem_get_address_range:
        unsafe extern "C" fn(*mut CuDevicePtr, *mut usize, CuDevicePtr) -> CuResult,
    cu_pointer_get_attribute: unsafe extern "C" fn(*mut c_void, c_int, CuDevicePtr) -> CuResult,
    cu_get_error_name: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    cu_get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    /// Keeps the library mapped while the pointers above are in use (forever: never unloaded).
    _lib: Library,
}

/// Resolves one symbol into a plain function pointer.
///
/// # Safety
/// `T` must be the C signature of `name`.
unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
    // SAFETY: the caller guarantees that T matches the symbol's C signature; the pointer is
    // only used while `lib` stays loaded (Api owns it and lives in a static).
    unsafe {
        lib.get::<T>(name.as_bytes())
            .map(|s| *s)
            .map_err(|e| format!("{name}: {e}"))
    }
}

impl Api {
    fn load() -> Result<Api, GpuError> {
        // SAFETY: loading the NVIDIA driver library runs its initialisers, which have no
        // preconditions on our side.
        let lib = unsafe { Library::new("libcuda.so.1") }.map_err(|e| {
            GpuError::Unavailable(format!(
                "libcuda.so.1 not found: GPU buffers need the NVIDIA driver ({e})"
            ))
        })?;
        let missing = |e: String| GpuError::Unavailable(format!("libcuda.so.1 is too old: {e}"));
        // SAFETY: every signature below is copied from cuda.h for the named (versioned) symbol.
        let api = unsafe {
            Api {
                cu_init: sym(&lib, "cuInit").map_err(missing)?,
                cu_device_get_count: sym(&lib, "cuDeviceGetCount").map_err(missing)?,
                cu_device_get: sym(&lib, "cuDeviceGet").map_err(missing)?,
                cu_device_primary_ctx_retain: sym(&lib, "cuDevicePrimaryCtxRetain")
                    .map_err(missing)?,
                cu_device_primary_ctx_release: sym(&lib, "cuDevicePrimaryCtxRelease_v2")
                    .map_err(missing)?,
                cu_ctx_push_current: sym(&lib, "cuCtxPushCurrent_v2").map_err(missing)?,
                cu_ctx_pop_current: sym(&lib, "cuCtxPopCurrent_v2").map_err(missing)?,
                cu_ipc_open_mem_handle: sym(&lib, "cuIpcOpenMemHandle_v2").map_err(missing)?,
                cu_ipc_close_mem_handle: sym(&lib, "cuIpcCloseMemHandle").map_err(missing)?,
                cu_ipc_open_event_handle: sym(&lib, "cuIpcOpenEventHandle").map_err(missing)?,
                cu_event_destroy: sym(&lib, "cuEventDestroy_v2").map_err(missing)?,
                cu_event_synchronize: sym(&lib, "cuEventSynchronize").map_err(missing)?,
                cu_stream_wait_event: sym(&lib, "cuStreamWaitEvent").map_err(missing)?,
                cu_ipc_get_mem_handle: sym(&lib, "cuIpcGetMemHandle").map_err(missing)?,
                cu_mem_get_address_range: sym(&lib, "cuMemGetAddressRange_v2").map_err(missing)?,
                cu_pointer_get_attribute: sym(&lib, "cuPointerGetAttribute").map_err(missing)?,
                cu_get_error_name: sym(&lib, "cuGetErrorName").map_err(missing)?,
                cu_get_error_string: sym(&lib, "cuGetErrorString").map_err(missing)?,
                _lib: lib,
            }
        };
        // SAFETY: cuInit takes flags by value (0 is the only valid value).
        let rc = unsafe { (api.cu_init)(0) };
        if rc != CUDA_SUCCESS {
            let e = api.error("cuInit", rc);
            return Err(GpuError::Unavailable(format!("no usable CUDA driver: {e}")));
        }
        Ok(api)
    }

    /// The error of a failed call, with the driver's name and text for `rc`.
    fn error(&self, call: &'static str, rc: CuResult) -> GpuError {
        let text = |f: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult| {
            let mut p: *const c_char = std::ptr::null();
            // SAFETY: `p` is a valid out pointer; on success the driver stores a pointer to a
            // static NUL-terminated string.
            let ok = unsafe { f(rc, &mut p) } == CUDA_SUCCESS && !p.is_null();
            if ok {
                // SAFETY: non-null static C string from the driver (see above).
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            } else {
                "unknown error".to_string()
            }
        };
        GpuError::Driver {
            call,
            code: rc,
            name: text(self.cu_get_error_name),
            text: text(self.cu_get_error_string),
        }
    }

    fn check(&self, call: &'static str, rc: CuResult) -> Result<(), GpuError> {
        if rc == CUDA_SUCCESS {
            Ok(())
        } else {
            Err(self.error(call, rc))
        }
    }
}

/// The driver, loaded and initialised on first use.
fn api() -> Result<&'static Api, GpuError> {
    static API: OnceLock<Result<Api, GpuError>> = OnceLock::new();
    API.get_or_init(Api::load).as_ref().map_err(Clone::clone)
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
        api.check("cuDeviceGetCount", unsafe {
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
        api.check("cuDeviceGet", unsafe {
            (api.cu_device_get)(&mut dev, ordinal as c_int)
        })?;
        let mut ctx: CuContext = std::ptr::null_mut();
        // SAFETY: valid out pointer and device; the reference is released in Drop.
        api.check("cuDevicePrimaryCtxRetain", unsafe {
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
        api.check("cuCtxPushCurrent", unsafe {
            (api.cu_ctx_push_current)(self.ctx)
        })?;
        let r = f(api);
        let mut popped: CuContext = std::ptr::null_mut();
        // SAFETY: pops the context pushed above (valid out pointer); the caller's current
        // context, if any, becomes current again.
        let rc = unsafe { (api.cu_ctx_pop_current)(&mut popped) };
        let r = r?;
        api.check("cuCtxPopCurrent", rc)?;
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
            api.check("cuIpcOpenMemHandle", unsafe {
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
            api.check("cuIpcOpenEventHandle", unsafe {
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
                    api.error("cuPointerGetAttribute", rc)
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
            api.check("cuIpcGetMemHandle", unsafe {
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
    api.check("cuMemGetAddressRange", unsafe {
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
            api.check("cuIpcCloseMemHandle", unsafe {
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
            api.check("cuEventSynchronize", unsafe {
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
            api.check("cuStreamWaitEvent", unsafe {
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
            api.check("cuEventDestroy", unsafe { (api.cu_event_destroy)(ev) })
        });
    }
}

/// Test-only driver calls that play the daemon's side (allocate, fill, export events).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    struct TestApi {
        cu_mem_alloc: unsafe extern "C" fn(*mut CuDevicePtr, usize) -> CuResult,
        cu_mem_free: unsafe extern "C" fn(CuDevicePtr) -> CuResult,
        cu_memcpy_htod: unsafe extern "C" fn(CuDevicePtr, *const c_void, usize) -> CuResult,
        cu_memcpy_dtoh: unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize) -> CuResult,
        cu_event_create: unsafe extern "C" fn(*mut CuEvent, c_uint) -> CuResult,
        cu_event_record: unsafe extern "C" fn(CuEvent, CuStream) -> CuResult,
        cu_ipc_get_event_handle: unsafe extern "C" fn(*mut CuIpcHandle, CuEvent) -> CuResult,
        _lib: Library,
    }

    fn test_api() -> &'static TestApi {
        static T: OnceLock<TestApi> = OnceLock::new();
        T.get_or_init(|| {
            // SAFETY: as in Api::load; the driver is known to load (callers checked api()).
            let lib = unsafe { Library::new("libcuda.so.1") }.unwrap();
            // SAFETY: signatures copied from cuda.h for the named symbols.
            unsafe {
                TestApi {
                    cu_mem_alloc: sym(&lib, "cuMemAlloc_v2").unwrap(),
                    cu_mem_free: sym(&lib, "cuMemFree_v2").unwrap(),
                    cu_memcpy_htod: sym(&lib, "cuMemcpyHtoD_v2").unwrap(),
                    cu_memcpy_dtoh: sym(&lib, "cuMemcpyDtoH_v2").unwrap(),
                    cu_event_create: sym(&lib, "cuEventCreate").unwrap(),
                    cu_event_record: sym(&lib, "cuEventRecord").unwrap(),
                    cu_ipc_get_event_handle: sym(&lib, "cuIpcGetEventHandle").unwrap(),
                    _lib: lib,
                }
            }
        })
    }

    impl Device {
        /// `cuMemAlloc` of `n` bytes (leaked unless [`Device::test_free`]d).
        pub(crate) fn test_alloc(&self, n: usize) -> u64 {
            let t = test_api();
            self.with(|api| {
                let mut p = 0;
                // SAFETY: valid out pointer.
                api.check("cuMemAlloc", unsafe { (t.cu_mem_alloc)(&mut p, n) })?;
                Ok(p)
            })
            .unwrap()
        }

        pub(crate) fn test_free(&self, p: u64) {
            let t = test_api();
            // SAFETY: `p` came from test_alloc.
            self.with(|api| api.check("cuMemFree", unsafe { (t.cu_mem_free)(p) }))
                .unwrap()
        }

        pub(crate) fn test_write(&self, p: u64, data: &[u8]) {
            let t = test_api();
            self.with(|api| {
                // SAFETY: `data` is readable for its length; `p` has room (test's choice).
                api.check("cuMemcpyHtoD", unsafe {
                    (t.cu_memcpy_htod)(p, data.as_ptr().cast(), data.len())
                })
            })
            .unwrap()
        }

        pub(crate) fn test_read(&self, p: u64, out: &mut [u8]) {
            let t = test_api();
            self.with(|api| {
                // SAFETY: `out` is writable for its length; `p` has that many bytes.
                api.check("cuMemcpyDtoH", unsafe {
                    (t.cu_memcpy_dtoh)(out.as_mut_ptr().cast(), p, out.len())
                })
            })
            .unwrap()
        }

        /// An interprocess event recorded on the legacy default stream now; its IPC handle.
        /// The event is leaked (the test process exits soon).
        pub(crate) fn test_recorded_event(&self) -> [u8; GPU_IPC_HANDLE_LEN] {
            let t = test_api();
            self.with(|api| {
                let mut ev: CuEvent = std::ptr::null_mut();
                // SAFETY: valid out pointer; DISABLE_TIMING | INTERPROCESS.
                api.check("cuEventCreate", unsafe {
                    (t.cu_event_create)(&mut ev, 2 | 4)
                })?;
                // SAFETY: live event, NULL stream.
                api.check("cuEventRecord", unsafe {
                    (t.cu_event_record)(ev, std::ptr::null_mut())
                })?;
                let mut h = CuIpcHandle {
                    reserved: [0; GPU_IPC_HANDLE_LEN],
                };
                // SAFETY: valid out pointer and live interprocess event.
                api.check("cuIpcGetEventHandle", unsafe {
                    (t.cu_ipc_get_event_handle)(&mut h, ev)
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
