//! A fetch's host buffer: a memfd allocated once the backend knows the shape, mapped
//! read-write, filled by the backend's writes, and shared with the client by fd.
//!
//! The mapping's raw pointer lives here and nowhere else.

use std::fs::File;
use std::ops::Range;
use std::sync::OnceLock;

use kvfetcher_protocol::memfd;
use kvfetcher_protocol::{BufferMemory, KvShape, TargetLayout};
use memmap2::{MmapOptions, MmapRaw};

use super::{checked_buffer_len, checked_write_end, BufferError, Destination, Shared};

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
    fetch_id: u64,
    layout: TargetLayout,
    max_bytes: u64,
    alloc: OnceLock<Allocated>,
}

impl HostDestination {
    /// An unallocated buffer for fetch `fetch_id` in `layout`, at most `max_bytes`.
    pub(super) fn new(fetch_id: u64, layout: TargetLayout, max_bytes: u64) -> Self {
        HostDestination {
            fetch_id,
            layout,
            max_bytes,
            alloc: OnceLock::new(),
        }
    }

    /// The shape, length and a fresh fd of the memfd, once allocated.
    pub(super) fn shared(&self) -> Option<Shared> {
        let a = self.alloc.get()?;
        let fd = a.file.try_clone().ok()?;
        Some(Shared {
            shape: a.shape,
            len: a.map.len() as u64,
            memory: BufferMemory::Host,
            fds: vec![fd.into()],
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
}

impl Destination for HostDestination {
    fn allocate(&self, shape: &KvShape) -> Result<(), BufferError> {
        let len = checked_buffer_len(&self.layout, shape, self.max_bytes)?;
        let file = memfd::create(&format!("kvfetcher-fetch-{}", self.fetch_id), len as u64)?;
        let map = MmapOptions::new().len(len).map_raw(&file)?;
        self.alloc
            .set(Allocated {
                file,
                map,
                shape: *shape,
            })
            .map_err(|_| BufferError::Internal("buffer allocated twice".into()))
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), BufferError> {
        let a = self
            .alloc
            .get()
            .ok_or_else(|| BufferError::Internal("write before allocate".into()))?;
        let end = checked_write_end(offset, bytes.len(), a.map.len())?;
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

    /// Host bytes are in place when `write` returns: nothing to record.
    fn layers_written(&self, _layers: Range<u32>) {}
}
