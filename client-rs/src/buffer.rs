//! The client's view of a fetched buffer: the daemon's memfd mapped read-only, or its GPU
//! allocation opened over CUDA IPC; the slices and device addresses of its layers and tensors.
//! Also the answers that both clients interpret the same way, and the waits that follow a
//! layer's announcement (the same for the blocking and the async client).

use std::ffi::c_void;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;

use memmap2::{Mmap, MmapMut, MmapOptions};

use crate::gpu::{GpuMapping, GpuReply};
use crate::protocol::{BufferMemory, GpuSource, KvShape, MemoryKind, Message, TargetLayout};
use crate::ClientError;

/// The error of a host accessor on a GPU buffer.
const ON_GPU: &str = "buffer is in GPU memory: use device_ptr()";
/// The error of a GPU accessor on a host buffer.
const ON_HOST: &str = "buffer is in host memory: use bytes(), layer() or tensor()";

/// How a fetch maps a host buffer into the client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HostMapping {
    /// Shared and read-only (`MAP_SHARED`, `PROT_READ`): a write through the mapping faults.
    #[default]
    ReadOnly,
    /// Private and writable (`MAP_PRIVATE`, `PROT_READ | PROT_WRITE`): reads see the daemon's
    /// bytes without a copy; a write copies the page it touches into this process (the
    /// daemon's buffer is never changed). For frameworks whose tensors are always writable
    /// (PyTorch): a stray write then costs a page copy instead of a crash. Write only layers
    /// that are ready: a page copied earlier no longer sees the daemon's later writes.
    CopyOnWrite,
}

/// A host buffer's mapping.
#[derive(Debug)]
enum HostMap {
    ReadOnly(Mmap),
    /// `ptr` is `map.as_mut_ptr()`, taken once when the mapping was made.
    CopyOnWrite {
        map: MmapMut,
        ptr: usize,
    },
}

impl HostMap {
    fn bytes(&self) -> &[u8] {
        match self {
            HostMap::ReadOnly(m) => m,
            HostMap::CopyOnWrite { map, .. } => map,
        }
    }
}

/// Where the bytes of a fetched buffer are.
#[derive(Debug)]
enum Memory {
    /// The daemon's memfd, mapped into this process.
    Host(HostMap),
    /// The daemon's GPU allocation, opened here.
    Gpu(GpuMapping),
    /// Closed before the fetch is released.
    Closed,
}

/// A fetched buffer mapped into this process.
#[derive(Debug)]
pub(crate) struct MappedBuffer {
    pub(crate) fetch_id: u64,
    pub(crate) shape: KvShape,
    pub(crate) layout: TargetLayout,
    memory: Memory,
}

/// The fetch a `FetchBuffer` answer created, to release it if the client cannot use it.
pub(crate) fn announced_fetch(msg: &Message) -> Option<u64> {
    match msg {
        Message::FetchBuffer(b) => Some(b.fetch_id),
        _ => None,
    }
}

impl MappedBuffer {
    /// Maps the buffer a `FetchBuffer` answer announced for a fetch that asked for `requested`
    /// memory; any other answer is an error. Every field is checked before anything is mapped
    /// (and before the CUDA driver is loaded).
    pub(crate) fn from_reply(
        msg: Message,
        mut fds: Vec<OwnedFd>,
        requested: MemoryKind,
        host_mapping: HostMapping,
    ) -> Result<Self, ClientError> {
        let b = match msg {
            Message::FetchBuffer(b) => b,
            other => return Err(reply_error(other)),
        };
        let expect = b.layout.checked_buffer_len(&b.shape)?;
        if b.len != expect as u64 || expect == 0 {
            return Err(ClientError::Unexpected(format!(
                "buffer of {} bytes for a layout of {expect}",
                b.len
            )));
        }
        if b.layout.memory != requested {
            return Err(ClientError::Unexpected(format!(
                "buffer layout in {:?} memory, the fetch asked for {requested:?}",
                b.layout.memory
            )));
        }
        let memory = match (&b.memory, requested) {
            (BufferMemory::Host, MemoryKind::Host) => {
                let fd = fds
                    .pop()
                    .ok_or_else(|| ClientError::Unexpected("buffer without fd".into()))?;
                Memory::Host(map_memfd(fd, expect, host_mapping)?)
            }
            (
                BufferMemory::GpuIpc {
                    device,
                    mem_handle,
                    event_handles,
                },
                _,
            ) => {
                let reply =
                    GpuReply::check(requested, *device, mem_handle, event_handles, &b.shape)?;
                Memory::Gpu(GpuMapping::open(&reply, expect)?)
            }
            (BufferMemory::Host, MemoryKind::Gpu(_)) => {
                return Err(ClientError::Unexpected(
                    "host buffer for a fetch into GPU memory".into(),
                ))
            }
        };
        Ok(MappedBuffer {
            fetch_id: b.fetch_id,
            shape: b.shape,
            layout: b.layout,
            memory,
        })
    }

    /// Closes the mapping (before the fetch is released, so the daemon frees memory nobody
    /// maps any more). Later accessors fail.
    pub(crate) fn close(&mut self) {
        self.memory = Memory::Closed;
    }

    fn host(&self) -> Result<&[u8], ClientError> {
        match &self.memory {
            Memory::Host(m) => Ok(m.bytes()),
            Memory::Gpu(_) => Err(ClientError::WrongMemory(ON_GPU)),
            Memory::Closed => Err(ClientError::WrongMemory("buffer closed")),
        }
    }

    fn gpu(&self) -> Result<&GpuMapping, ClientError> {
        match &self.memory {
            Memory::Gpu(g) => Ok(g),
            Memory::Host(_) => Err(ClientError::WrongMemory(ON_HOST)),
            Memory::Closed => Err(ClientError::WrongMemory("buffer closed")),
        }
    }

    /// Fails with [`ClientError::WrongMemory`] unless the buffer is in host memory (checked
    /// before waiting, so a misuse does not block).
    pub(crate) fn check_host(&self) -> Result<(), ClientError> {
        self.host().map(|_| ())
    }

    /// The whole buffer (host memory only).
    pub(crate) fn bytes(&self) -> Result<&[u8], ClientError> {
        self.host()
    }

    /// The writable address of a host buffer mapped [`HostMapping::CopyOnWrite`].
    pub(crate) fn host_mut_ptr(&self) -> Result<*mut u8, ClientError> {
        match &self.memory {
            Memory::Host(HostMap::CopyOnWrite { ptr, .. }) => Ok(*ptr as *mut u8),
            Memory::Host(HostMap::ReadOnly(_)) => Err(ClientError::WrongMemory(
                "buffer is mapped read-only: fetch with HostMapping::CopyOnWrite",
            )),
            Memory::Gpu(_) => Err(ClientError::WrongMemory(ON_GPU)),
            Memory::Closed => Err(ClientError::WrongMemory("buffer closed")),
        }
    }

    /// Checks a layer index.
    pub(crate) fn check_layer(&self, layer: u32) -> Result<(), ClientError> {
        if layer >= self.shape.num_layers {
            return Err(ClientError::LayerOutOfRange {
                layer,
                layers: self.shape.num_layers,
            });
        }
        Ok(())
    }

    /// The offset and length of one layer (K then V).
    fn layer_range(&self, layer: u32) -> Result<(usize, usize), ClientError> {
        self.check_layer(layer)?;
        let n = self.layout.layer_len(&self.shape);
        Ok((layer as usize * n, n))
    }

    /// The bytes of one layer (K then V).
    pub(crate) fn layer(&self, layer: u32) -> Result<&[u8], ClientError> {
        let map = self.host()?;
        let (at, n) = self.layer_range(layer)?;
        Ok(&map[at..at + n])
    }

    /// The bytes of one tensor (`kv`: 0 = K, 1 = V) of one layer.
    pub(crate) fn tensor(&self, layer: u32, kv: u32) -> Result<&[u8], ClientError> {
        if kv > 1 {
            return Err(ClientError::InvalidArgument(format!(
                "kv must be 0 (K) or 1 (V), not {kv}"
            )));
        }
        let l = self.layer(layer)?;
        let n = self.layout.tensor_len(&self.shape);
        let at = kv as usize * n;
        Ok(&l[at..at + n])
    }

    /// The device address of the buffer's first byte in this process (GPU buffers only).
    pub(crate) fn device_ptr(&self) -> Option<u64> {
        self.gpu().ok().map(GpuMapping::ptr)
    }

    /// The CUDA ordinal of a GPU buffer.
    pub(crate) fn device(&self) -> Option<u32> {
        self.gpu().ok().map(GpuMapping::device)
    }

    /// The buffer's length in bytes.
    pub(crate) fn len(&self) -> usize {
        match &self.memory {
            Memory::Host(m) => m.bytes().len(),
            Memory::Gpu(g) => g.len(),
            Memory::Closed => 0,
        }
    }

    /// The device address of one layer (K then V; `layer_len` bytes). Does not wait.
    pub(crate) fn layer_device_ptr(&self, layer: u32) -> Result<u64, ClientError> {
        let g = self.gpu()?;
        let (at, _) = self.layer_range(layer)?;
        Ok(g.ptr() + at as u64)
    }

    /// What follows the announcement of `layer` before the host may read it: nothing for host
    /// memory, the layer's event for GPU memory.
    pub(crate) fn host_wait_announced(&self, layer: u32) -> Result<(), ClientError> {
        match &self.memory {
            Memory::Gpu(g) => g.host_wait(layer),
            _ => Ok(()),
        }
    }

    /// What follows the end of the fetch before the host may read the whole buffer: every
    /// layer's event for GPU memory.
    pub(crate) fn host_wait_done(&self) -> Result<(), ClientError> {
        (0..self.shape.num_layers).try_for_each(|l| self.host_wait_announced(l))
    }

    /// Checks that `layer` of a GPU buffer can be waited on with a stream (before waiting for
    /// its announcement).
    pub(crate) fn check_stream_wait(&self, layer: u32) -> Result<(), ClientError> {
        self.gpu()?;
        self.check_layer(layer)
    }

    /// After the announcement of `layer`: makes work queued on `stream` after this call wait
    /// for the layer's restore on the GPU.
    ///
    /// # Safety
    /// `stream` is NULL or a live `CUstream` of this process.
    pub(crate) unsafe fn stream_wait_announced(
        &self,
        layer: u32,
        stream: *mut c_void,
    ) -> Result<(), ClientError> {
        // SAFETY: forwarded caller guarantee.
        unsafe { self.gpu()?.stream_wait(layer, stream) }
    }
}

/// Maps `len` bytes of the daemon's memfd, read-only or copy-on-write.
fn map_memfd(fd: OwnedFd, len: usize, how: HostMapping) -> Result<HostMap, ClientError> {
    let file = File::from(fd);
    let size = file.metadata().map_err(ClientError::Memory)?.len();
    if size < len as u64 {
        return Err(ClientError::Unexpected(format!(
            "memfd of {size} bytes for a {len} byte buffer"
        )));
    }
    match how {
        // SAFETY: the mapping is read-only and shared. The daemon writes disjoint regions of
        // it before announcing them ready, and never shrinks the memfd while the handle is
        // alive (its size was checked above), so reads stay in bounds.
        HostMapping::ReadOnly => unsafe { MmapOptions::new().len(len).map(&file) }
            .map(HostMap::ReadOnly)
            .map_err(ClientError::Memory),
        HostMapping::CopyOnWrite => {
            // SAFETY: as above; the mapping is private, so writes through it stay in this
            // process (copied pages) and never reach the daemon's memfd.
            let mut map = unsafe { MmapOptions::new().len(len).map_copy(&file) }
                .map_err(ClientError::Memory)?;
            let ptr = map.as_mut_ptr() as usize;
            Ok(HostMap::CopyOnWrite { map, ptr })
        }
    }
}

/// The error an unexpected answer stands for: the daemon's error, or a protocol surprise.
pub(crate) fn reply_error(msg: Message) -> ClientError {
    match msg {
        Message::Error(e) => ClientError::Daemon {
            code: e.code,
            message: e.message,
        },
        Message::FetchFailed(f) => ClientError::Daemon {
            code: f.code,
            message: f.message,
        },
        Message::FetchDone(d) if d.tokens == 0 => ClientError::Daemon {
            code: crate::ErrorCode::NotFound,
            message: "no tokens available".into(),
        },
        other => ClientError::Unexpected(format!("{:?}", other.type_id())),
    }
}

/// Checks the arguments every save shares: one token id per token, `len` bytes for the layout.
fn check_save(
    token_ids: &[u32],
    layout: &TargetLayout,
    shape: &KvShape,
    len: usize,
) -> Result<(), ClientError> {
    if shape.tokens as usize != token_ids.len() {
        return Err(ClientError::InvalidArgument(format!(
            "shape has {} tokens but {} token ids were given",
            shape.tokens,
            token_ids.len()
        )));
    }
    let expect = layout.checked_buffer_len(shape)?;
    if len != expect {
        return Err(ClientError::InvalidArgument(format!(
            "data is {len} bytes, layout needs {expect}"
        )));
    }
    Ok(())
}

/// Checks a save's arguments and puts `data` in a sealed memfd for the daemon.
pub(crate) fn save_memfd(
    token_ids: &[u32],
    layout: &TargetLayout,
    shape: &KvShape,
    data: &[u8],
) -> Result<File, ClientError> {
    if layout.memory != MemoryKind::Host {
        return Err(ClientError::InvalidArgument(
            "a save from host memory needs a host layout (use save_gpu for GPU memory)".into(),
        ));
    }
    check_save(token_ids, layout, shape, data.len())?;
    let mut f = crate::memfd::create("kvfetcher-save", 0).map_err(ClientError::Memory)?;
    f.write_all(data).map_err(ClientError::Memory)?;
    crate::memfd::seal_readonly(&f).map_err(ClientError::Memory)?;
    Ok(f)
}

/// Checks a GPU save's arguments and exports `len` bytes at `device_ptr` for the daemon.
pub(crate) fn save_gpu_source(
    token_ids: &[u32],
    layout: &TargetLayout,
    shape: &KvShape,
    device_ptr: u64,
    len: usize,
) -> Result<GpuSource, ClientError> {
    check_save(token_ids, layout, shape, len)?;
    let (device, handle, offset) = crate::gpu::export(layout.memory, device_ptr, len)?;
    Ok(GpuSource {
        device,
        mem_handle: handle.to_vec(),
        offset,
        len: len as u64,
    })
}
