//! Fetch buffers: the memory a fetch restores into and a client maps. A host fetch gets a
//! sealed-size memfd ([`host`]), a `gpu:N` fetch device memory exported over CUDA IPC with one
//! event per layer ([`gpu`]); a GPU save's source is imported here too ([`Buffers::read_gpu_save`]).
//!
//! This module is the only way the server reaches the GPUs. It writes no protocol messages: the
//! pipeline writes into a [`Destination`] and reports events, and the connection shares the
//! buffer ([`FetchBuffer::shared`]) and tells the client.

mod gpu;
mod host;

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use kvfetcher_protocol::{BufferMemory, GpuSource, KvShape, MemoryKind, TargetLayout};

use crate::gpu::{DeviceBuffer, GpuDevice, GpuError};
pub(crate) use crate::gpu::{GpuDevices, GpuOptions};
use crate::metrics::Metrics;
use gpu::GpuDestination;
use host::HostDestination;

/// Why a buffer could not be made, written or read.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// The request does not fit (empty, too large, out of bounds, a bad GPU source).
    #[error("{0}")]
    Invalid(String),
    /// GPU memory was asked for and this host cannot provide it (no driver, no such device...).
    #[error("{0}")]
    GpuUnsupported(String),
    /// The device is out of memory; retrying later may work.
    #[error("{0}")]
    Exhausted(String),
    /// A GPU call failed on memory that exists.
    #[error("{what}: {source}")]
    Gpu {
        /// What was being done.
        what: &'static str,
        /// The driver's error.
        source: GpuError,
    },
    /// Creating or mapping host memory failed.
    #[error("host memory: {0}")]
    Io(#[from] std::io::Error),
    /// A broken invariant (allocated twice, written before allocation).
    #[error("{0}")]
    Internal(String),
}

/// Where a fetch writes: a buffer allocated once the shape is known. Thread-safe; callers
/// write disjoint ranges.
pub trait Destination: Send + Sync {
    /// Called once, before any write, with the shape of what will be restored.
    fn allocate(&self, shape: &KvShape) -> Result<(), BufferError>;
    /// Copies `bytes` to `offset` of the allocated buffer (bounds-checked).
    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), BufferError>;
    /// Layers `layers` are complete for all tokens: device memory records their events here,
    /// after every write to them, so a client that waits on them sees the bytes.
    fn layers_written(&self, layers: Range<u32>);
    /// The device memory behind this destination, once allocated, when it is GPU memory: the
    /// pipeline then restores sections there with the GPU kernels instead of calling `write`.
    /// Host destinations return `None`.
    fn device(&self) -> Option<DeviceRegion<'_>> {
        None
    }
}

/// A destination's device memory: the whole fetch buffer (laid out as the fetch's layout says
/// for the allocated shape) on `device`. Borrowed from the destination, so it stays allocated
/// while the borrow lives.
#[derive(Debug, Clone, Copy)]
pub struct DeviceRegion<'a> {
    /// The GPU.
    pub device: &'a Arc<GpuDevice>,
    /// The fetch buffer (offset 0 is the buffer's byte 0).
    pub buffer: &'a DeviceBuffer,
}

/// How a client maps an allocated buffer.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The restored shape.
    pub shape: KvShape,
    /// Bytes of the buffer.
    pub len: u64,
    /// Host memory (the fd below) or the CUDA IPC handles.
    pub memory: BufferMemory,
    /// The memfd of a host buffer (a fresh fd each time); none for device memory.
    pub fds: Vec<OwnedFd>,
}

/// One fetch's buffer, host or device memory.
#[derive(Debug, Clone)]
pub(crate) enum FetchBuffer {
    /// A memfd shared by fd.
    Host(Arc<HostDestination>),
    /// Device memory shared by CUDA IPC handles.
    Gpu(Arc<GpuDestination>),
}

impl FetchBuffer {
    /// What the client needs to map the buffer, once allocated.
    pub(crate) fn shared(&self) -> Option<Shared> {
        match self {
            FetchBuffer::Host(d) => d.shared(),
            FetchBuffer::Gpu(d) => d.shared(),
        }
    }

    /// The layout the buffer is in.
    pub(crate) fn layout(&self) -> TargetLayout {
        match self {
            FetchBuffer::Host(d) => d.layout(),
            FetchBuffer::Gpu(d) => d.layout(),
        }
    }

    /// The restored shape, once the buffer is allocated.
    pub(crate) fn shape(&self) -> Option<KvShape> {
        match self {
            FetchBuffer::Host(d) => d.shape(),
            FetchBuffer::Gpu(d) => d.shape(),
        }
    }

    /// The destination the pipeline writes to.
    pub(crate) fn destination(&self) -> Arc<dyn Destination> {
        match self {
            FetchBuffer::Host(d) => d.clone(),
            FetchBuffer::Gpu(d) => d.clone(),
        }
    }
}

/// The node's fetch buffers: makes them where a layout asks (the one place a fetch's memory
/// is chosen) and reads GPU save sources.
pub(crate) struct Buffers {
    gpus: Arc<GpuDevices>,
    max_bytes: u64,
}

impl Buffers {
    /// Buffers on `gpus` (opened on first use), none larger than `max_bytes`.
    pub(crate) fn new(gpus: Arc<GpuDevices>, max_bytes: u64) -> Self {
        Buffers { gpus, max_bytes }
    }

    /// The daemon's metrics (shared with the GPUs).
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        self.gpus.metrics()
    }

    /// An unallocated buffer for fetch `fetch_id` in `layout`: host memory, or device memory
    /// on the GPU the layout names (refused when this host cannot open it).
    pub(crate) fn for_fetch(
        &self,
        fetch_id: u64,
        layout: TargetLayout,
    ) -> Result<FetchBuffer, BufferError> {
        Ok(match layout.memory {
            MemoryKind::Host => FetchBuffer::Host(Arc::new(HostDestination::new(
                fetch_id,
                layout,
                self.max_bytes,
            ))),
            MemoryKind::Gpu(n) => FetchBuffer::Gpu(Arc::new(GpuDestination::new(
                fetch_id,
                layout,
                self.max_bytes,
                self.device(n)?,
            ))),
        })
    }

    /// The `len` bytes a GPU save names in the client's memory on `gpu:device`, copied to the
    /// host. The client must have finished writing them before sending the request.
    pub(crate) async fn read_gpu_save(
        &self,
        device: u32,
        src: &GpuSource,
        len: usize,
    ) -> Result<Vec<u8>, BufferError> {
        let invalid = |m: String| Err(BufferError::Invalid(m));
        if src.device != device {
            return invalid(format!(
                "gpu source is on gpu:{}, layout says gpu:{device}",
                src.device
            ));
        }
        let Ok(handle) = <[u8; 64]>::try_from(src.mem_handle.as_slice()) else {
            return invalid(format!(
                "mem_handle is {} bytes, a cuda ipc handle is 64",
                src.mem_handle.len()
            ));
        };
        if src.len != len as u64 {
            return invalid(format!(
                "gpu source is {} bytes, layout needs {len}",
                src.len
            ));
        }
        let Some(end) = usize::try_from(src.offset)
            .ok()
            .and_then(|o| o.checked_add(len))
        else {
            return invalid("gpu source offset overflows".into());
        };
        let offset = end - len;
        let device = self.device(device)?;
        tokio::task::spawn_blocking(move || gpu::read_imported(&device, handle, offset, end))
            .await
            .map_err(|e| BufferError::Internal(e.to_string()))?
    }

    /// Device `n`, opened on first use. Opening loads the driver and JITs the kernels once per
    /// device, so on a multi-threaded runtime it runs in place of a worker rather than stalling
    /// one.
    fn device(&self, n: u32) -> Result<Arc<GpuDevice>, BufferError> {
        let open = || {
            self.gpus
                .device(n as usize)
                .map_err(|e| BufferError::GpuUnsupported(e.to_string()))
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(open),
            _ => open(),
        }
    }
}

/// The buffer length of `layout` for `shape`, refused when it is empty or above `max_bytes`:
/// the checks every destination makes before allocating.
fn checked_buffer_len(
    layout: &TargetLayout,
    shape: &KvShape,
    max_bytes: u64,
) -> Result<usize, BufferError> {
    let len = layout
        .checked_buffer_len(shape)
        .map_err(|e| BufferError::Invalid(e.to_string()))?;
    if len == 0 {
        return Err(BufferError::Invalid("empty shape".into()));
    }
    if len as u64 > max_bytes {
        return Err(BufferError::Invalid(format!(
            "buffer of {len} bytes exceeds the limit of {max_bytes}"
        )));
    }
    Ok(len)
}

/// The end of a write of `len` bytes at `offset` into a buffer of `buf_len` bytes, refused
/// when it does not fit: the bounds check of every destination's `write`.
fn checked_write_end(offset: usize, len: usize, buf_len: usize) -> Result<usize, BufferError> {
    offset
        .checked_add(len)
        .filter(|&e| e <= buf_len)
        .ok_or_else(|| {
            BufferError::Invalid(format!(
                "write of {len} bytes at {offset} outside a {buf_len} byte buffer"
            ))
        })
}
