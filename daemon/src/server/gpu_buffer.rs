//! A fetch's GPU destination: device memory the server allocates (`cuMemAlloc`, for this fetch
//! alone) once the shape is known, zeroes, and shares with the client as a CUDA IPC handle,
//! with one interprocess event per layer.
//!
//! Ordering contract with the client: before `LayersReady { start, end }` is queued, event `l`
//! of every layer in `start..end` has been recorded on this destination's stream, after every
//! write to those layers (sections restored by the kernels synchronise their own stream; bytes
//! copied by [`Destination::write`] are waited for here). The client then `cuStreamWaitEvent`s.
//! The memory and events live as long as the destination: the registry's handle and every
//! in-flight section hold it, so a release or a disconnect frees them after the last section.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use kvfetcher_protocol::{BufferMemory, FetchBuffer, KvShape, LayersReady, Message, TargetLayout};

use super::backend::DeviceRegion;
use super::outbox::Outbox;
use super::{Destination, ServeError};
use crate::gpu::{DeviceBuffer, Event, GpuDevice, GpuError, Stream};

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
    req: u64,
    fetch_id: u64,
    layout: TargetLayout,
    max_bytes: u64,
    out: Outbox,
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

fn gpu_failed(what: &str, e: GpuError) -> ServeError {
    match &e {
        GpuError::Cuda { code: 2, .. } => {
            ServeError::Unavailable(format!("{what}: out of device memory ({e})"))
        }
        _ => ServeError::Internal(format!("{what}: {e}")),
    }
}

impl GpuDestination {
    /// A destination on `device` for fetch `fetch_id` (request `req`) whose announcements go
    /// to `out`.
    pub(crate) fn new(
        req: u64,
        fetch_id: u64,
        layout: TargetLayout,
        max_bytes: u64,
        out: Outbox,
        device: Arc<GpuDevice>,
    ) -> Self {
        GpuDestination {
            req,
            fetch_id,
            layout,
            max_bytes,
            out,
            device,
            alloc: OnceLock::new(),
        }
    }

    /// The `FetchBuffer` message (no fd travels: the handles are in it), once allocated.
    pub(crate) fn buffer_message(&self, req: u64) -> Option<Message> {
        let a = self.alloc.get()?;
        Some(Message::FetchBuffer(FetchBuffer {
            req,
            fetch_id: self.fetch_id,
            shape: a.shape,
            layout: self.layout,
            len: a.buffer.len() as u64,
            memory: BufferMemory::GpuIpc {
                device: self.device.ordinal() as u32,
                mem_handle: a.mem_handle.to_vec(),
                event_handles: a.event_handles.clone(),
            },
        }))
    }

    /// Whether `allocate` succeeded.
    pub(crate) fn is_allocated(&self) -> bool {
        self.alloc.get().is_some()
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
    fn allocate(&self, shape: &KvShape) -> Result<(), ServeError> {
        let len = super::error::checked_buffer_len(&self.layout, shape, self.max_bytes)?;
        if self.is_allocated() {
            return Err(ServeError::Internal("destination allocated twice".into()));
        }
        let a = self
            .make(shape, len)
            .map_err(|e| gpu_failed("allocating the gpu buffer", e))?;
        self.alloc
            .set(a)
            .map_err(|_| ServeError::Internal("destination allocated twice".into()))?;
        let msg = self
            .buffer_message(self.req)
            .ok_or_else(|| ServeError::Internal("cannot share the buffer".into()))?;
        self.out.send(msg, vec![]);
        Ok(())
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), ServeError> {
        let a = self
            .alloc
            .get()
            .ok_or_else(|| ServeError::Internal("write before allocate".into()))?;
        super::error::checked_write_end(offset, bytes.len(), a.buffer.len())?;
        // Synchronous: the bytes have landed when it returns (`DeviceBuffer::write_at`), so
        // the layer events recorded later cover them.
        a.buffer
            .write_at(offset, bytes)
            .map_err(|e| gpu_failed("writing the gpu buffer", e))
    }

    fn layers_ready(&self, layers: Range<u32>) {
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
        self.out.send(
            Message::LayersReady(LayersReady {
                fetch_id: self.fetch_id,
                start: layers.start,
                end,
            }),
            vec![],
        );
    }

    fn device(&self) -> Option<DeviceRegion<'_>> {
        let a = self.alloc.get()?;
        Some(DeviceRegion {
            device: &self.device,
            buffer: &a.buffer,
        })
    }
}
