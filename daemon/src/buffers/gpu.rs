//! A fetch's GPU buffer: device memory allocated (`cuMemAlloc`, for this fetch alone) once the
//! shape is known, zeroed, and shared with the client as a CUDA IPC handle, with one
//! interprocess event per layer; and the import of a GPU save's source.
//!
//! Ordering contract with the client: `layers_written` records event `l` of every layer in
//! the range on this buffer's stream, after every write to those layers (sections restored by
//! the kernels synchronise their own stream; bytes copied by [`Destination::write`] are waited
//! for here), and the pipeline reports `LayersReady` only after it returns. The client then
//! `cuStreamWaitEvent`s.
//! The memory and events live as long as the destination: the registry's handle and every
//! in-flight section hold it, so a release or a disconnect frees them after the last section.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use kvfetcher_protocol::{BufferMemory, KvShape, TargetLayout};

use super::{
    checked_buffer_len, checked_write_end, BufferError, Destination, DeviceRegion, Shared,
};
use crate::gpu::{DeviceBuffer, Event, GpuDevice, GpuError, ImportedBuffer, Stream};

/// The allocated part of a [`GpuDestination`].
struct Allocated {
    shape: KvShape,
    mem_handle: [u8; 64],
    event_handles: Vec<Vec<u8>>,
    events: Vec<Event>,
    stream: Stream,
    buffer: DeviceBuffer,
    device: Arc<GpuDevice>,
}

impl Drop for Allocated {
    fn drop(&mut self) {
        self.device
            .metrics()
            .gpu_buffer_bytes
            .add(-(self.buffer.len() as i64));
    }
}

/// A device-memory [`Destination`] for one fetch of one client.
pub(crate) struct GpuDestination {
    fetch_id: u64,
    layout: TargetLayout,
    max_bytes: u64,
    device: Arc<GpuDevice>,
    alloc: OnceLock<Allocated>,
}

impl std::fmt::Debug for GpuDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDestination")
            .field("fetch_id", &self.fetch_id)
            .field("device", &self.device.ordinal())
            .field("allocated", &self.alloc.get().map(|a| a.buffer.len()))
            .finish()
    }
}

fn gpu_failed(what: &'static str, e: GpuError) -> BufferError {
    if e.is_out_of_memory() {
        BufferError::Exhausted(format!("{what}: out of device memory ({e})"))
    } else {
        BufferError::Gpu { what, source: e }
    }
}

impl GpuDestination {
    /// An unallocated buffer on `device` for fetch `fetch_id` in `layout`, at most `max_bytes`.
    pub(super) fn new(
        fetch_id: u64,
        layout: TargetLayout,
        max_bytes: u64,
        device: Arc<GpuDevice>,
    ) -> Self {
        GpuDestination {
            fetch_id,
            layout,
            max_bytes,
            device,
            alloc: OnceLock::new(),
        }
    }

    /// The shape, length and IPC handles of the buffer (no fd travels), once allocated.
    pub(super) fn shared(&self) -> Option<Shared> {
        let a = self.alloc.get()?;
        Some(Shared {
            shape: a.shape,
            len: a.buffer.len() as u64,
            memory: BufferMemory::GpuIpc {
                device: self.device.ordinal() as u32,
                mem_handle: a.mem_handle.to_vec(),
                event_handles: a.event_handles.clone(),
            },
            fds: vec![],
        })
    }

    /// The layout the buffer is in.
    pub(super) fn layout(&self) -> TargetLayout {
        self.layout
    }

    /// The allocated shape, once `allocate` succeeded.
    pub(super) fn shape(&self) -> Option<KvShape> {
        self.alloc.get().map(|a| a.shape)
    }

    fn make(&self, shape: &KvShape, len: usize) -> Result<Allocated, GpuError> {
        let cuda = self.device.cuda();
        let buffer = cuda.alloc(len)?;
        // Paged padding and anything not restored reads as zeros, as in host buffers.
        buffer.fill(0)?;
        let events = (0..shape.num_layers)
            .map(|_| cuda.event(false, true))
            .collect::<Result<Vec<_>, _>>()?;
        let event_handles = events
            .iter()
            .map(|e| e.ipc_handle().map(|h| h.to_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        let mem_handle = buffer.ipc_handle()?;
        let stream = cuda.stream()?;
        self.device
            .metrics()
            .gpu_buffer_bytes
            .add(buffer.len() as i64);
        Ok(Allocated {
            shape: *shape,
            mem_handle,
            event_handles,
            events,
            stream,
            buffer,
            device: self.device.clone(),
        })
    }
}

impl Destination for GpuDestination {
    fn allocate(&self, shape: &KvShape) -> Result<(), BufferError> {
        let len = checked_buffer_len(&self.layout, shape, self.max_bytes)?;
        if self.shape().is_some() {
            return Err(BufferError::Internal("buffer allocated twice".into()));
        }
        let a = self
            .make(shape, len)
            .map_err(|e| gpu_failed("allocating the gpu buffer", e))?;
        self.alloc
            .set(a)
            .map_err(|_| BufferError::Internal("buffer allocated twice".into()))
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), BufferError> {
        let a = self
            .alloc
            .get()
            .ok_or_else(|| BufferError::Internal("write before allocate".into()))?;
        checked_write_end(offset, bytes.len(), a.buffer.len())?;
        // Synchronous: the bytes have landed when it returns (`DeviceBuffer::write_at`), so
        // the layer events recorded later cover them.
        a.buffer
            .write_at(offset, bytes)
            .map_err(|e| gpu_failed("writing the gpu buffer", e))
    }

    fn layers_written(&self, layers: Range<u32>) {
        let Some(a) = self.alloc.get() else { return };
        let end = layers.end.min(a.shape.num_layers);
        if layers.start >= end {
            return;
        }
        let bound = self.device.cuda().bind();
        for l in layers.start..end {
            if let Err(e) = bound.as_ref().map_err(|e| e.to_string()).and_then(|()| {
                a.events[l as usize]
                    .record(&a.stream)
                    .map_err(|e| e.to_string())
            }) {
                tracing::warn!(
                    fetch_id = self.fetch_id,
                    layer = l,
                    "recording a layer event failed: {e}"
                );
            }
        }
    }

    fn device(&self) -> Option<DeviceRegion<'_>> {
        let a = self.alloc.get()?;
        Some(DeviceRegion {
            device: &self.device,
            buffer: &a.buffer,
        })
    }
}

/// Copies `offset..end` of the client allocation behind CUDA IPC `handle` on `device` to the
/// host, after checking the range against the allocation's real size.
pub(super) fn read_imported(
    device: &GpuDevice,
    handle: [u8; 64],
    offset: usize,
    end: usize,
) -> Result<Vec<u8>, BufferError> {
    let unreadable = |e: GpuError| BufferError::Invalid(format!("cannot read the gpu source: {e}"));
    let imported = ImportedBuffer::open(device.cuda(), handle, end).map_err(unreadable)?;
    // Check the range against the real allocation before allocating the copy.
    let real = imported.allocation_len().map_err(unreadable)?;
    if end > real {
        return Err(BufferError::Invalid(format!(
            "gpu source range ends at {end}, the allocation holds {real} bytes"
        )));
    }
    let mut v = vec![0u8; end - offset];
    imported.read_at(offset, &mut v).map_err(unreadable)?;
    Ok(v)
}
