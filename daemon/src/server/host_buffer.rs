//! A fetch's host destination: a memfd the server allocates once the backend knows the shape,
//! maps read-write, fills from the backend's writes, and shares with the client by fd.
//!
//! The mapping's raw pointer lives here and nowhere else.

use std::fs::File;
use std::ops::Range;
use std::sync::OnceLock;

use kvfetcher_protocol::memfd;
use kvfetcher_protocol::{BufferMemory, FetchBuffer, KvShape, LayersReady, Message, TargetLayout};
use memmap2::{MmapOptions, MmapRaw};

use super::outbox::Outbox;
use super::{Destination, ServeError};

/// The allocated part of a [`HostDestination`].
#[derive(Debug)]
struct Allocated {
    file: File,
    map: MmapRaw,
    shape: KvShape,
}

/// A memfd-backed [`Destination`] for one fetch of one client.
#[derive(Debug)]
pub(crate) struct HostDestination {
    req: u64,
    fetch_id: u64,
    layout: TargetLayout,
    max_bytes: u64,
    out: Outbox,
    alloc: OnceLock<Allocated>,
}

impl HostDestination {
    /// A destination for fetch `fetch_id` (request `req`) whose announcements go to `out`.
    pub(crate) fn new(
        req: u64,
        fetch_id: u64,
        layout: TargetLayout,
        max_bytes: u64,
        out: Outbox,
    ) -> Self {
        HostDestination {
            req,
            fetch_id,
            layout,
            max_bytes,
            out,
            alloc: OnceLock::new(),
        }
    }

    /// The `FetchBuffer` message and a fresh fd of the memfd, once allocated.
    pub(crate) fn buffer_message(&self, req: u64) -> Option<(Message, File)> {
        let a = self.alloc.get()?;
        let fd = a.file.try_clone().ok()?;
        let msg = Message::FetchBuffer(FetchBuffer {
            req,
            fetch_id: self.fetch_id,
            shape: a.shape,
            layout: self.layout,
            len: a.map.len() as u64,
            memory: BufferMemory::Host,
        });
        Some((msg, fd))
    }

    /// Whether `allocate` succeeded.
    pub(crate) fn is_allocated(&self) -> bool {
        self.alloc.get().is_some()
    }
}

impl Destination for HostDestination {
    fn allocate(&self, shape: &KvShape) -> Result<(), ServeError> {
        let len = super::error::checked_buffer_len(&self.layout, shape, self.max_bytes)?;
        let file = memfd::create(&format!("kvfetcher-fetch-{}", self.fetch_id), len as u64)?;
        let map = MmapOptions::new().len(len).map_raw(&file)?;
        self.alloc
            .set(Allocated {
                file,
                map,
                shape: *shape,
            })
            .map_err(|_| ServeError::Internal("destination allocated twice".into()))?;
        let (msg, fd) = self
            .buffer_message(self.req)
            .ok_or_else(|| ServeError::Internal("cannot share the buffer".into()))?;
        self.out.send(msg, vec![fd.into()]);
        Ok(())
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), ServeError> {
        let a = self
            .alloc
            .get()
            .ok_or_else(|| ServeError::Internal("write before allocate".into()))?;
        let end = super::error::checked_write_end(offset, bytes.len(), a.map.len())?;
        debug_assert!(end <= a.map.len());
        // SAFETY: `offset..end` lies inside the live mapping (checked above); the mapping is
        // shared read-write and outlives `self`'s borrow; `bytes` cannot alias it (it is a Rust
        // slice the caller owns, not a view of this mapping, which hands out no slices); callers
        // write disjoint ranges (the `Destination` contract), so no two copies race.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                a.map.as_mut_ptr().add(offset),
                bytes.len(),
            );
        }
        Ok(())
    }

    fn layers_ready(&self, layers: Range<u32>) {
        let Some(a) = self.alloc.get() else { return };
        let end = layers.end.min(a.shape.num_layers);
        if layers.start >= end {
            return;
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
}
