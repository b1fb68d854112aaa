//! Raw bindings to the CUDA driver API (`libcuda.so.1`), loaded at run time.
//!
//! Hand-written from `cuda.h` (CUDA 12/13 driver API, 64-bit): only the entry points and types
//! KVFetcher uses. This is the only module that holds raw CUDA driver pointers; the safe layer is
//! [`super::cuda`]. Not a general binding: add entry points as they are needed.

use std::ffi::{c_char, c_int, c_uint, c_void};

use libloading::Library;

/// `CUresult`: 0 is success.
pub(crate) type CuResult = c_int;
/// `CUdevice`: an ordinal.
pub(crate) type CuDevice = c_int;
/// `CUdeviceptr`: a 64-bit device address.
pub(crate) type CuDevicePtr = u64;
/// `CUcontext`.
pub(crate) type CuContext = *mut c_void;
/// `CUmodule`.
pub(crate) type CuModule = *mut c_void;
/// `CUfunction`.
pub(crate) type CuFunction = *mut c_void;
/// `CUstream`.
pub(crate) type CuStream = *mut c_void;
/// `CUevent`.
pub(crate) type CuEvent = *mut c_void;

/// `CU_CTX_SCHED_AUTO`, `_SPIN`, `_YIELD`, `_BLOCKING_SYNC`: how a host thread waits for the GPU.
pub(crate) const CTX_SCHED_AUTO: c_uint = 0;
pub(crate) const CTX_SCHED_SPIN: c_uint = 1;
pub(crate) const CTX_SCHED_YIELD: c_uint = 2;
pub(crate) const CTX_SCHED_BLOCKING_SYNC: c_uint = 4;
/// `CUDA_SUCCESS`.
pub(crate) const CUDA_SUCCESS: CuResult = 0;
/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
pub(crate) const ATTR_MULTIPROCESSOR_COUNT: c_int = 16;
/// `CU_DEVICE_ATTRIBUTE_PCI_BUS_ID`.
pub(crate) const ATTR_PCI_BUS_ID: c_int = 33;
/// `CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR`.
pub(crate) const ATTR_CC_MAJOR: c_int = 75;
/// `CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR`.
pub(crate) const ATTR_CC_MINOR: c_int = 76;
/// `CU_EVENT_DISABLE_TIMING`.
pub(crate) const CU_EVENT_DISABLE_TIMING: c_uint = 2;
/// `CU_EVENT_INTERPROCESS`.
pub(crate) const CU_EVENT_INTERPROCESS: c_uint = 4;
/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`.
pub(crate) const CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;
/// `CU_STREAM_NON_BLOCKING`.
pub(crate) const CU_STREAM_NON_BLOCKING: c_uint = 1;
/// `CU_MEMORYTYPE_HOST`.
pub(crate) const CU_MEMORYTYPE_HOST: c_uint = 1;
/// `CU_MEMORYTYPE_DEVICE`.
pub(crate) const CU_MEMORYTYPE_DEVICE: c_uint = 2;

/// `CUDA_MEMCPY2D` (the `_v2` layout, 128 bytes on 64-bit hosts).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct CudaMemcpy2d {
    pub(crate) src_x_in_bytes: usize,
    pub(crate) src_y: usize,
    pub(crate) src_memory_type: c_uint,
    pub(crate) src_host: *const c_void,
    pub(crate) src_device: CuDevicePtr,
    pub(crate) src_array: *mut c_void,
    pub(crate) src_pitch: usize,
    pub(crate) dst_x_in_bytes: usize,
    pub(crate) dst_y: usize,
    pub(crate) dst_memory_type: c_uint,
    pub(crate) dst_host: *mut c_void,
    pub(crate) dst_device: CuDevicePtr,
    pub(crate) dst_array: *mut c_void,
    pub(crate) dst_pitch: usize,
    pub(crate) width_in_bytes: usize,
    pub(crate) height: usize,
}

/// `CUipcMemHandle` / `CUipcEventHandle`: 64 opaque bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CuIpcHandle {
    pub(crate) reserved: [u8; 64],
}

/// The driver entry points, resolved once from `libcuda.so.1`.
pub(crate) struct CudaApi {
    pub(crate) cu_init: unsafe extern "C" fn(c_uint) -> CuResult,
    pub(crate) cu_driver_get_version: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub(crate) cu_device_get_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub(crate) cu_device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    pub(crate) cu_device_get_name: unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult,
    pub(crate) cu_device_get_attribute:
        unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult,
    pub(crate) cu_device_total_mem: unsafe extern "C" fn(*mut usize, CuDevice) -> CuResult,
    pub(crate) cu_device_primary_ctx_retain:
        unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult,
    pub(crate) cu_device_primary_ctx_release: unsafe extern "C" fn(CuDevice) -> CuResult,
    pub(crate) cu_device_primary_ctx_set_flags: unsafe extern "C" fn(CuDevice, c_uint) -> CuResult,
    pub(crate) cu_ctx_set_current: unsafe extern "C" fn(CuContext) -> CuResult,
    pub(crate) cu_ctx_synchronize: unsafe extern "C" fn() -> CuResult,
    pub(crate) cu_mem_alloc: unsafe extern "C" fn(*mut CuDevicePtr, usize) -> CuResult,
    pub(crate) cu_mem_free: unsafe extern "C" fn(CuDevicePtr) -> CuResult,
    pub(crate) cu_memset_d8: unsafe extern "C" fn(CuDevicePtr, u8, usize) -> CuResult,
    pub(crate) cu_memset_d32_async:
        unsafe extern "C" fn(CuDevicePtr, u32, usize, CuStream) -> CuResult,
    pub(crate) cu_memcpy_htod: unsafe extern "C" fn(CuDevicePtr, *const c_void, usize) -> CuResult,
    pub(crate) cu_memcpy_htod_async:
        unsafe extern "C" fn(CuDevicePtr, *const c_void, usize, CuStream) -> CuResult,
    pub(crate) cu_memcpy_dtoh: unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize) -> CuResult,
    pub(crate) cu_mem_get_address_range:
        unsafe extern "C" fn(*mut CuDevicePtr, *mut usize, CuDevicePtr) -> CuResult,
    pub(crate) cu_memcpy_dtod_async:
        unsafe extern "C" fn(CuDevicePtr, CuDevicePtr, usize, CuStream) -> CuResult,
    pub(crate) cu_memcpy_2d_async: unsafe extern "C" fn(*const CudaMemcpy2d, CuStream) -> CuResult,
    pub(crate) cu_module_load_data: unsafe extern "C" fn(*mut CuModule, *const c_void) -> CuResult,
    pub(crate) cu_module_unload: unsafe extern "C" fn(CuModule) -> CuResult,
    pub(crate) cu_module_get_function:
        unsafe extern "C" fn(*mut CuFunction, CuModule, *const c_char) -> CuResult,
    #[allow(clippy::type_complexity)]
    pub(crate) cu_launch_kernel: unsafe extern "C" fn(
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
    pub(crate) cu_stream_create: unsafe extern "C" fn(*mut CuStream, c_uint) -> CuResult,
    pub(crate) cu_stream_synchronize: unsafe extern "C" fn(CuStream) -> CuResult,
    pub(crate) cu_stream_destroy: unsafe extern "C" fn(CuStream) -> CuResult,
    pub(crate) cu_event_create: unsafe extern "C" fn(*mut CuEvent, c_uint) -> CuResult,
    pub(crate) cu_event_record: unsafe extern "C" fn(CuEvent, CuStream) -> CuResult,
    pub(crate) cu_event_synchronize: unsafe extern "C" fn(CuEvent) -> CuResult,
    pub(crate) cu_event_destroy: unsafe extern "C" fn(CuEvent) -> CuResult,
    pub(crate) cu_event_elapsed_time: unsafe extern "C" fn(*mut f32, CuEvent, CuEvent) -> CuResult,
    pub(crate) cu_ipc_get_mem_handle:
        unsafe extern "C" fn(*mut CuIpcHandle, CuDevicePtr) -> CuResult,
    pub(crate) cu_ipc_get_event_handle: unsafe extern "C" fn(*mut CuIpcHandle, CuEvent) -> CuResult,
    pub(crate) cu_ipc_open_mem_handle:
        unsafe extern "C" fn(*mut CuDevicePtr, CuIpcHandle, c_uint) -> CuResult,
    pub(crate) cu_ipc_close_mem_handle: unsafe extern "C" fn(CuDevicePtr) -> CuResult,
    pub(crate) cu_ipc_open_event_handle:
        unsafe extern "C" fn(*mut CuEvent, CuIpcHandle) -> CuResult,
    pub(crate) cu_stream_wait_event: unsafe extern "C" fn(CuStream, CuEvent, c_uint) -> CuResult,
    pub(crate) cu_memcpy_dtoh_async:
        unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize, CuStream) -> CuResult,
    pub(crate) cu_mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult,
    pub(crate) cu_get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    /// Keeps the library mapped while the pointers above are in use.
    _lib: Library,
}

/// Resolves one symbol into a plain function pointer.
///
/// # Safety
/// `T` must be the C signature of `name`.
unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
    // SAFETY: the caller guarantees that T matches the symbol's C signature; the pointer is only
    // used while `lib` stays loaded (CudaApi owns it).
    unsafe {
        lib.get::<T>(name.as_bytes())
            .map(|s| *s)
            .map_err(|e| format!("{name}: {e}"))
    }
}

impl CudaApi {
    /// Loads `libcuda.so.1` and resolves every entry point.
    pub(crate) fn load() -> Result<CudaApi, String> {
        // SAFETY: loading the NVIDIA driver library runs its initialisers, which have no
        // preconditions on our side.
        let lib = unsafe { Library::new("libcuda.so.1") }.map_err(|e| e.to_string())?;
        // SAFETY: every signature below is copied from cuda.h for the named (versioned) symbol.
        unsafe {
            Ok(CudaApi {
                cu_init: sym(&lib, "cuInit")?,
                cu_driver_get_version: sym(&lib, "cuDriverGetVersion")?,
                cu_device_get_count: sym(&lib, "cuDeviceGetCount")?,
                cu_device_get: sym(&lib, "cuDeviceGet")?,
                cu_device_get_name: sym(&lib, "cuDeviceGetName")?,
                cu_device_get_attribute: sym(&lib, "cuDeviceGetAttribute")?,
                cu_device_total_mem: sym(&lib, "cuDeviceTotalMem_v2")?,
                cu_device_primary_ctx_retain: sym(&lib, "cuDevicePrimaryCtxRetain")?,
                cu_device_primary_ctx_release: sym(&lib, "cuDevicePrimaryCtxRelease_v2")?,
                cu_device_primary_ctx_set_flags: sym(&lib, "cuDevicePrimaryCtxSetFlags_v2")?,
                cu_ctx_set_current: sym(&lib, "cuCtxSetCurrent")?,
                cu_ctx_synchronize: sym(&lib, "cuCtxSynchronize")?,
                cu_mem_alloc: sym(&lib, "cuMemAlloc_v2")?,
                cu_mem_free: sym(&lib, "cuMemFree_v2")?,
                cu_memset_d8: sym(&lib, "cuMemsetD8_v2")?,
                cu_memset_d32_async: sym(&lib, "cuMemsetD32Async")?,
                cu_memcpy_htod: sym(&lib, "cuMemcpyHtoD_v2")?,
                cu_memcpy_htod_async: sym(&lib, "cuMemcpyHtoDAsync_v2")?,
                cu_memcpy_dtoh: sym(&lib, "cuMemcpyDtoH_v2")?,
                cu_mem_get_address_range: sym(&lib, "cuMemGetAddressRange_v2")?,
                cu_memcpy_dtod_async: sym(&lib, "cuMemcpyDtoDAsync_v2")?,
                cu_memcpy_2d_async: sym(&lib, "cuMemcpy2DAsync_v2")?,
                cu_module_load_data: sym(&lib, "cuModuleLoadData")?,
                cu_module_unload: sym(&lib, "cuModuleUnload")?,
                cu_module_get_function: sym(&lib, "cuModuleGetFunction")?,
                cu_launch_kernel: sym(&lib, "cuLaunchKernel")?,
                cu_stream_create: sym(&lib, "cuStreamCreate")?,
                cu_stream_synchronize: sym(&lib, "cuStreamSynchronize")?,
                cu_stream_destroy: sym(&lib, "cuStreamDestroy_v2")?,
                cu_event_create: sym(&lib, "cuEventCreate")?,
                cu_event_record: sym(&lib, "cuEventRecord")?,
                cu_event_synchronize: sym(&lib, "cuEventSynchronize")?,
                cu_event_destroy: sym(&lib, "cuEventDestroy_v2")?,
                cu_event_elapsed_time: sym(&lib, "cuEventElapsedTime")?,
                cu_ipc_get_mem_handle: sym(&lib, "cuIpcGetMemHandle")?,
                cu_ipc_get_event_handle: sym(&lib, "cuIpcGetEventHandle")?,
                cu_ipc_open_mem_handle: sym(&lib, "cuIpcOpenMemHandle_v2")?,
                cu_ipc_close_mem_handle: sym(&lib, "cuIpcCloseMemHandle")?,
                cu_ipc_open_event_handle: sym(&lib, "cuIpcOpenEventHandle")?,
                cu_stream_wait_event: sym(&lib, "cuStreamWaitEvent")?,
                cu_memcpy_dtoh_async: sym(&lib, "cuMemcpyDtoHAsync_v2")?,
                cu_mem_get_info: sym(&lib, "cuMemGetInfo_v2")?,
                cu_get_error_string: sym(&lib, "cuGetErrorString")?,
                _lib: lib,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_cuda_h() {
        assert_eq!(std::mem::size_of::<CudaMemcpy2d>(), 128);
        assert_eq!(std::mem::size_of::<CuIpcHandle>(), 64);
    }
}
