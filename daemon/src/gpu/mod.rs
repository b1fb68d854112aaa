//! The GPU path: NVDEC decoding and the restore kernels, on NVIDIA GPUs found at run time.
//!
//! Layers, bottom up: the `kvfetcher-cuda-sys` crate (raw bindings of `libcuda.so.1` and
//! `libnvcuvid.so.1`, loaded with libloading, shared with the client), `cuda` and `nvdec`
//! (the daemon's safe wrappers, the only callers of those raw pointers here), `restore` (the
//! PTX kernels and their bit-exact CPU reference), `ipc` (importing CUDA IPC handles),
//! `devices` (the node's GPUs as the daemon serves them, re-exported here, with their `pool`
//! of scratch memory and `pinned` staging memory) and
//! `section_restore` (a fetched section straight into a client's device buffer, with the
//! `gather` table of the HEVC surface route; the pipeline's only). Fixtures, self-checks and
//! benchmarks of this path live in the `kvfetcher-tools` crate.
//! Everything builds and its non-GPU tests pass on hosts without a driver: loading fails with
//! [`GpuError::NoDriver`] / [`GpuError::NoNvdec`].

mod cuda;
mod devices;
mod error;
mod gather;
mod hevc_backend;
mod ipc;
mod nvdec;
mod pinned;
mod pool;
mod rans;
mod restore;
pub(crate) mod section_restore;

pub use cuda::{
    host_wait, set_host_wait, Cuda, DeviceBuffer, DeviceInfo, Event, HostWait, Module, Stream,
};
pub use devices::{DeviceError, GpuDevice, GpuDevices, GpuOptions};
pub use error::GpuError;
pub use gather::{gather_table, run_gather};
pub use hevc_backend::{
    hevc_section_decoder, CodecHevcLayout, DeviceHevcDecoder, HevcFrameLayout, NvdecHevcDecoder,
};
pub use ipc::{mem_info, ImportedBuffer, ImportedEvent};
pub use nvdec::{
    DeviceFrames, FrameFormat, HevcCaps, HostFrames, Nvdec, NvdecSession, SessionPool,
};
pub use pinned::{ImageLayout, PinnedBuffer, PinnedPool};
pub use pool::MemoryPool;
pub use rans::{
    restore_transform_section, DeviceProfile, OwnedScratch, RansPlan, TransformSection,
};
pub use restore::{
    restore_cpu, CodeGeometry, Dequant, DeviceGather, DeviceTarget, GatherFrom, ParamUpload,
    RestoreKernels, TargetSpec,
};
pub use section_restore::{kernels_apply, restore_section_to_device, Route};
