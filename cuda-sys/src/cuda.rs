//! The CUDA driver API (`libcuda.so.1`): types, constants and the entry points, as one table.
//!
//! Hand-written from `cuda.h` (CUDA 12/13 driver API, 64-bit): the union of what the client
//! (IPC handles, events, pointer attributes) and the daemon (devices, memory, streams, PTX
//! modules, IPC) call, under the `_v2` names where `cuda.h` maps the plain name to one. Names of
//! types, constants and fields follow the header one to one; its documentation is theirs.
#![allow(missing_docs)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use libloading::Library;

use crate::{open, sym, LoadError};

/// `CUresult`: 0 is success.
pub type CuResult = c_int;
/// `CUdevice`: an ordinal.
pub type CuDevice = c_int;
/// `CUdeviceptr`: a 64-bit device address.
pub type CuDevicePtr = u64;
/// `CUcontext`.
pub type CuContext = *mut c_void;
/// `CUmodule`.
pub type CuModule = *mut c_void;
/// `CUfunction`.
pub type CuFunction = *mut c_void;
/// `CUstream`.
pub type CuStream = *mut c_void;
/// `CUevent`.
pub type CuEvent = *mut c_void;

/// `CU_CTX_SCHED_AUTO`, `_SPIN`, `_YIELD`, `_BLOCKING_SYNC`: how a host thread waits for the GPU.
pub const CTX_SCHED_AUTO: c_uint = 0;
pub const CTX_SCHED_SPIN: c_uint = 1;
pub const CTX_SCHED_YIELD: c_uint = 2;
pub const CTX_SCHED_BLOCKING_SYNC: c_uint = 4;
/// `CUDA_SUCCESS`.
pub const CUDA_SUCCESS: CuResult = 0;
/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
pub const ATTR_MULTIPROCESSOR_COUNT: c_int = 16;
/// `CU_DEVICE_ATTRIBUTE_PCI_BUS_ID`.
pub const ATTR_PCI_BUS_ID: c_int = 33;
/// `CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR`.
pub const ATTR_CC_MAJOR: c_int = 75;
/// `CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR`.
pub const ATTR_CC_MINOR: c_int = 76;
/// `CU_EVENT_DISABLE_TIMING`.
pub const CU_EVENT_DISABLE_TIMING: c_uint = 2;
/// `CU_EVENT_INTERPROCESS`.
pub const CU_EVENT_INTERPROCESS: c_uint = 4;
/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`.
pub const CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;
/// `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL`.
pub const CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: c_int = 9;
/// `CU_STREAM_NON_BLOCKING`.
pub const CU_STREAM_NON_BLOCKING: c_uint = 1;
/// `CU_MEMORYTYPE_HOST`.
pub const CU_MEMORYTYPE_HOST: c_uint = 1;
/// `CU_MEMORYTYPE_DEVICE`.
pub const CU_MEMORYTYPE_DEVICE: c_uint = 2;

/// `CUDA_MEMCPY2D` (the `_v2` layout, 128 bytes on 64-bit hosts).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CudaMemcpy2d {
    pub src_x_in_bytes: usize,
    pub src_y: usize,
    pub src_memory_type: c_uint,
    pub src_host: *const c_void,
    pub src_device: CuDevicePtr,
    pub src_array: *mut c_void,
    pub src_pitch: usize,
    pub dst_x_in_bytes: usize,
    pub dst_y: usize,
    pub dst_memory_type: c_uint,
    pub dst_host: *mut c_void,
    pub dst_device: CuDevicePtr,
    pub dst_array: *mut c_void,
    pub dst_pitch: usize,
    pub width_in_bytes: usize,
    pub height: usize,
}

/// `CUipcMemHandle` / `CUipcEventHandle`: 64 opaque bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CuIpcHandle {
    pub reserved: [u8; 64],
}

/// The file name of the CUDA driver library.
pub const LIBCUDA: &str = "libcuda.so.1";

/// The driver entry points, resolved from `libcuda.so.1` by [`CudaApi::load`]. Every pointer
/// is `unsafe` to call: arguments must satisfy `cuda.h`'s contract for that entry point.
pub struct CudaApi {
    pub cu_init: unsafe extern "C" fn(c_uint) -> CuResult,
    pub cu_driver_get_version: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub cu_device_get_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub cu_device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    pub cu_device_get_name: unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult,
    pub cu_device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult,
    pub cu_device_total_mem: unsafe extern "C" fn(*mut usize, CuDevice) -> CuResult,
    pub cu_device_primary_ctx_retain: unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult,
    pub cu_device_primary_ctx_release: unsafe extern "C" fn(CuDevice) -> CuResult,
    pub cu_device_primary_ctx_set_flags: unsafe extern "C" fn(CuDevice, c_uint) -> CuResult,
    pub cu_ctx_set_current: unsafe extern "C" fn(CuContext) -> CuResult,
    pub cu_ctx_push_current: unsafe extern "C" fn(CuContext) -> CuResult,
    pub cu_ctx_pop_current: unsafe extern "C" fn(*mut CuContext) -> CuResult,
    pub cu_ctx_synchronize: unsafe extern "C" fn() -> CuResult,
    pub cu_mem_alloc: unsafe extern "C" fn(*mut CuDevicePtr, usize) -> CuResult,
    pub cu_mem_free: unsafe extern "C" fn(CuDevicePtr) -> CuResult,
    pub cu_mem_alloc_host: unsafe extern "C" fn(*mut *mut c_void, usize) -> CuResult,
    pub cu_mem_free_host: unsafe extern "C" fn(*mut c_void) -> CuResult,
    pub cu_memset_d8: unsafe extern "C" fn(CuDevicePtr, u8, usize) -> CuResult,
    pub cu_memset_d32_async: unsafe extern "C" fn(CuDevicePtr, u32, usize, CuStream) -> CuResult,
    pub cu_memcpy_htod: unsafe extern "C" fn(CuDevicePtr, *const c_void, usize) -> CuResult,
    pub cu_memcpy_htod_async:
        unsafe extern "C" fn(CuDevicePtr, *const c_void, usize, CuStream) -> CuResult,
    pub cu_memcpy_dtoh: unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize) -> CuResult,
    pub cu_mem_get_address_range:
        unsafe extern "C" fn(*mut CuDevicePtr, *mut usize, CuDevicePtr) -> CuResult,
    pub cu_memcpy_dtod_async:
        unsafe extern "C" fn(CuDevicePtr, CuDevicePtr, usize, CuStream) -> CuResult,
    pub cu_memcpy_2d_async: unsafe extern "C" fn(*const CudaMemcpy2d, CuStream) -> CuResult,
    pub cu_module_load_data: unsafe extern "C" fn(*mut CuModule, *const c_void) -> CuResult,
    pub cu_module_unload: unsafe extern "C" fn(CuModule) -> CuResult,
    pub cu_module_get_function:
        unsafe extern "C" fn(*mut CuFunction, CuModule, *const c_char) -> CuResult,
    #[allow(clippy::type_complexity)]
    pub cu_launch_kernel: unsafe extern "C" fn(
        CuFunction,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        CuStream,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    pub cu_stream_create: unsafe extern "C" fn(*mut CuStream, c_uint) -> CuResult,
    pub cu_stream_synchronize: unsafe extern "C" fn(CuStream) -> CuResult,
    pub cu_stream_destroy: unsafe extern "C" fn(CuStream) -> CuResult,
    pub cu_event_create: unsafe extern "C" fn(*mut CuEvent, c_uint) -> CuResult,
    pub cu_event_record: unsafe extern "C" fn(CuEvent, CuStream) -> CuResult,
    pub cu_event_synchronize: unsafe extern "C" fn(CuEvent) -> CuResult,
    pub cu_event_destroy: unsafe extern "C" fn(CuEvent) -> CuResult,
    pub cu_event_elapsed_time: unsafe extern "C" fn(*mut f32, CuEvent, CuEvent) -> CuResult,
    pub cu_ipc_get_mem_handle: unsafe extern "C" fn(*mut CuIpcHandle, CuDevicePtr) -> CuResult,
    pub cu_ipc_get_event_handle: unsafe extern "C" fn(*mut CuIpcHandle, CuEvent) -> CuResult,
    pub cu_ipc_open_mem_handle:
        unsafe extern "C" fn(*mut CuDevicePtr, CuIpcHandle, c_uint) -> CuResult,
    pub cu_ipc_close_mem_handle: unsafe extern "C" fn(CuDevicePtr) -> CuResult,
    pub cu_ipc_open_event_handle: unsafe extern "C" fn(*mut CuEvent, CuIpcHandle) -> CuResult,
    pub cu_stream_wait_event: unsafe extern "C" fn(CuStream, CuEvent, c_uint) -> CuResult,
    pub cu_memcpy_dtoh_async:
        unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize, CuStream) -> CuResult,
    pub cu_mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult,
    pub cu_pointer_get_attribute: unsafe extern "C" fn(*mut c_void, c_int, CuDevicePtr) -> CuResult,
    pub cu_get_error_name: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    pub cu_get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    /// Keeps the library mapped while the pointers above are in use.
    _lib: Library,
}

impl CudaApi {
    /// Loads `libcuda.so.1` and resolves every entry point. Does not call `cuInit`.
    pub fn load() -> Result<CudaApi, LoadError> {
        let lib = open(LIBCUDA)?;
        // SAFETY: every signature below is copied from cuda.h for the named (versioned)
        // symbol; the table owns `lib`, so the pointers live as long as it does.
        unsafe {
            Ok(CudaApi {
                cu_init: sym(&lib, LIBCUDA, "cuInit")?,
                cu_driver_get_version: sym(&lib, LIBCUDA, "cuDriverGetVersion")?,
                cu_device_get_count: sym(&lib, LIBCUDA, "cuDeviceGetCount")?,
                cu_device_get: sym(&lib, LIBCUDA, "cuDeviceGet")?,
                cu_device_get_name: sym(&lib, LIBCUDA, "cuDeviceGetName")?,
                cu_device_get_attribute: sym(&lib, LIBCUDA, "cuDeviceGetAttribute")?,
                cu_device_total_mem: sym(&lib, LIBCUDA, "cuDeviceTotalMem_v2")?,
                cu_device_primary_ctx_retain: sym(&lib, LIBCUDA, "cuDevicePrimaryCtxRetain")?,
                cu_device_primary_ctx_release: sym(&lib, LIBCUDA, "cuDevicePrimaryCtxRelease_v2")?,
                cu_device_primary_ctx_set_flags: sym(
                    &lib,
                    LIBCUDA,
                    "cuDevicePrimaryCtxSetFlags_v2",
                )?,
                cu_ctx_set_current: sym(&lib, LIBCUDA, "cuCtxSetCurrent")?,
                cu_ctx_push_current: sym(&lib, LIBCUDA, "cuCtxPushCurrent_v2")?,
                cu_ctx_pop_current: sym(&lib, LIBCUDA, "cuCtxPopCurrent_v2")?,
                cu_ctx_synchronize: sym(&lib, LIBCUDA, "cuCtxSynchronize")?,
                cu_mem_alloc: sym(&lib, LIBCUDA, "cuMemAlloc_v2")?,
                cu_mem_free: sym(&lib, LIBCUDA, "cuMemFree_v2")?,
                cu_mem_alloc_host: sym(&lib, LIBCUDA, "cuMemAllocHost_v2")?,
                cu_mem_free_host: sym(&lib, LIBCUDA, "cuMemFreeHost")?,
                cu_memset_d8: sym(&lib, LIBCUDA, "cuMemsetD8_v2")?,
                cu_memset_d32_async: sym(&lib, LIBCUDA, "cuMemsetD32Async")?,
                cu_memcpy_htod: sym(&lib, LIBCUDA, "cuMemcpyHtoD_v2")?,
                cu_memcpy_htod_async: sym(&lib, LIBCUDA, "cuMemcpyHtoDAsync_v2")?,
                cu_memcpy_dtoh: sym(&lib, LIBCUDA, "cuMemcpyDtoH_v2")?,
                cu_mem_get_address_range: sym(&lib, LIBCUDA, "cuMemGetAddressRange_v2")?,
                cu_memcpy_dtod_async: sym(&lib, LIBCUDA, "cuMemcpyDtoDAsync_v2")?,
                cu_memcpy_2d_async: sym(&lib, LIBCUDA, "cuMemcpy2DAsync_v2")?,
                cu_module_load_data: sym(&lib, LIBCUDA, "cuModuleLoadData")?,
                cu_module_unload: sym(&lib, LIBCUDA, "cuModuleUnload")?,
                cu_module_get_function: sym(&lib, LIBCUDA, "cuModuleGetFunction")?,
                cu_launch_kernel: sym(&lib, LIBCUDA, "cuLaunchKernel")?,
                cu_stream_create: sym(&lib, LIBCUDA, "cuStreamCreate")?,
                cu_stream_synchronize: sym(&lib, LIBCUDA, "cuStreamSynchronize")?,
                cu_stream_destroy: sym(&lib, LIBCUDA, "cuStreamDestroy_v2")?,
                cu_event_create: sym(&lib, LIBCUDA, "cuEventCreate")?,
                cu_event_record: sym(&lib, LIBCUDA, "cuEventRecord")?,
                cu_event_synchronize: sym(&lib, LIBCUDA, "cuEventSynchronize")?,
                cu_event_destroy: sym(&lib, LIBCUDA, "cuEventDestroy_v2")?,
                cu_event_elapsed_time: sym(&lib, LIBCUDA, "cuEventElapsedTime")?,
                cu_ipc_get_mem_handle: sym(&lib, LIBCUDA, "cuIpcGetMemHandle")?,
                cu_ipc_get_event_handle: sym(&lib, LIBCUDA, "cuIpcGetEventHandle")?,
                cu_ipc_open_mem_handle: sym(&lib, LIBCUDA, "cuIpcOpenMemHandle_v2")?,
                cu_ipc_close_mem_handle: sym(&lib, LIBCUDA, "cuIpcCloseMemHandle")?,
                cu_ipc_open_event_handle: sym(&lib, LIBCUDA, "cuIpcOpenEventHandle")?,
                cu_stream_wait_event: sym(&lib, LIBCUDA, "cuStreamWaitEvent")?,
                cu_memcpy_dtoh_async: sym(&lib, LIBCUDA, "cuMemcpyDtoHAsync_v2")?,
                cu_mem_get_info: sym(&lib, LIBCUDA, "cuMemGetInfo_v2")?,
                cu_pointer_get_attribute: sym(&lib, LIBCUDA, "cuPointerGetAttribute")?,
                cu_get_error_name: sym(&lib, LIBCUDA, "cuGetErrorName")?,
                cu_get_error_string: sym(&lib, LIBCUDA, "cuGetErrorString")?,
                _lib: lib,
            })
        }
    }

    /// The error for result `rc`, with the driver's name and description of it.
    pub fn error(&self, rc: CuResult) -> CudaError {
        let text = |f: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult| {
            let mut p: *const c_char = std::ptr::null();
            // SAFETY: `p` is a valid out pointer; on success the driver stores a pointer to a
            // static NUL-terminated string (or leaves it null).
            let ok = unsafe { f(rc, &mut p) } == CUDA_SUCCESS && !p.is_null();
            if ok {
                // SAFETY: a non-null static C string from the driver (see above).
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            } else {
                "unknown error".to_string()
            }
        };
        CudaError {
            code: rc,
            name: text(self.cu_get_error_name),
            text: text(self.cu_get_error_string),
        }
    }

    /// `Ok` for `CUDA_SUCCESS`, else the [`CudaError`] of `rc`.
    pub fn check(&self, rc: CuResult) -> Result<(), CudaError> {
        if rc == CUDA_SUCCESS {
            Ok(())
        } else {
            Err(self.error(rc))
        }
    }
}

/// A failed driver call's `CUresult`, named and described by the driver: the one driver-result
/// type that the client's and the daemon's GPU errors both carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name} ({code}): {text}")]
pub struct CudaError {
    /// The `CUresult`, e.g. 2 for `CUDA_ERROR_OUT_OF_MEMORY`.
    pub code: CuResult,
    /// Its name (`cuGetErrorName`), e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
    pub name: String,
    /// Its description (`cuGetErrorString`).
    pub text: String,
}

impl CudaError {
    /// `CUDA_ERROR_OUT_OF_MEMORY`.
    pub const OUT_OF_MEMORY: CuResult = 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_cuda_h() {
        assert_eq!(std::mem::size_of::<CudaMemcpy2d>(), 128);
        assert_eq!(std::mem::size_of::<CuIpcHandle>(), 64);
    }

    #[test]
    fn a_missing_driver_is_a_load_error() {
        match CudaApi::load() {
            Ok(_) => println!("skipped: a CUDA driver is present"),
            Err(e) => assert!(
                matches!(
                    e,
                    LoadError::Library {
                        library: LIBCUDA,
                        ..
                    }
                ),
                "{e:?}"
            ),
        }
    }
}
