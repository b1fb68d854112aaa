//! Page-locked host memory for the section restores' uploads and read-backs.
//!
//! A copy from pageable memory is staged by the driver through buffers of its own, one copy
//! at a time per context: with many decode threads each uploading a section, those copies
//! queued behind each other and capped the transform route at about 8 GB/s of KV on an H200
//! whatever the thread count. A section instead writes everything it uploads into one
//! [`PinnedBuffer`] (a host `memcpy`, parallel across threads) and queues one DMA copy from
//! it. Buffers come from a [`PinnedPool`] per device, since `cuMemAllocHost` takes
//! milliseconds.
//!
//! The rule of every asynchronous copy holds: a pinned buffer must not be written, dropped or
//! given back while a copy queued from or into it may still run (`section_restore`
//! synchronises its stream before its buffers drop).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use super::cuda::{Cuda, DeviceBuffer, Stream};
use super::pool::capacity_for;
use super::GpuError;

/// Page-locked host memory of one context (`cuMemAllocHost`), given back to its pool (or
/// freed) on drop.
pub struct PinnedBuffer {
    pool: Arc<PinnedPool>,
    ptr: *mut u8,
    capacity: usize,
    len: usize,
}

// SAFETY: the buffer owns its allocation (no aliasing handle exists elsewhere); page-locked
// memory may be read and written from any thread.
unsafe impl Send for PinnedBuffer {}
// SAFETY: as above; shared references only read.
unsafe impl Sync for PinnedBuffer {}

impl std::fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedBuffer({} of {} bytes)", self.len, self.capacity)
    }
}

impl PinnedBuffer {
    /// Its bytes (zeroed when first allocated, else what the last user left).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr holds capacity >= len bytes owned by self, and &mut self is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Its bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as above, shared.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues a copy of the whole buffer to the start of `dst` on `stream`.
    ///
    /// # Safety
    /// Neither `self` nor `dst` may be written, dropped or reused until the stream has
    /// finished the copy.
    pub unsafe fn copy_to_device_async(
        &self,
        dst: &DeviceBuffer,
        stream: &Stream,
    ) -> Result<(), GpuError> {
        if self.len > dst.len() {
            return Err(GpuError::InvalidArgument(format!(
                "{} pinned bytes into a {} byte buffer",
                self.len,
                dst.len()
            )));
        }
        let cuda = &self.pool.cuda;
        cuda.bind()?;
        // SAFETY: len bytes are readable here and writable at dst (checked); the caller keeps
        // both alive and untouched until the stream is done; the stream is live.
        cuda.check("cuMemcpyHtoDAsync", unsafe {
            (cuda.api.cu_memcpy_htod_async)(
                dst.ptr(),
                self.ptr.cast::<c_void>(),
                self.len,
                stream.raw,
            )
        })
    }

    /// Queues a copy of `len` bytes at `src` (device) to `offset..offset + len` here.
    ///
    /// # Safety
    /// `src..src + len` is readable device memory of this context, and neither it nor `self`
    /// may be dropped, reused or read here until the stream has finished the copy.
    pub unsafe fn copy_from_device_async(
        &mut self,
        offset: usize,
        src: u64,
        len: usize,
        stream: &Stream,
    ) -> Result<(), GpuError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(GpuError::InvalidArgument(format!(
                "{len} bytes at {offset} of a {} byte pinned buffer",
                self.len
            )));
        }
        let cuda = &self.pool.cuda;
        cuda.bind()?;
        // SAFETY: the span lies in this buffer (checked) and src is readable for len bytes
        // (the caller's contract), both kept alive until the stream is done.
        cuda.check("cuMemcpyDtoHAsync", unsafe {
            (cuda.api.cu_memcpy_dtoh_async)(
                self.ptr.add(offset).cast::<c_void>(),
                src,
                len,
                stream.raw,
            )
        })
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        self.pool.give_back(self.ptr, self.capacity);
    }
}

/// Free page-locked allocations of one context, by capacity (the device pool's size
/// classes), up to `max_kept` bytes in all.
pub struct PinnedPool {
    cuda: Arc<Cuda>,
    max_kept: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    free: HashMap<usize, Vec<usize>>,
    kept: usize,
}

impl std::fmt::Debug for PinnedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedPool")
            .field("max_kept", &self.max_kept)
            .field("kept", &self.state().kept)
            .finish()
    }
}

impl PinnedPool {
    /// An empty pool for `cuda` keeping at most `max_kept` free bytes.
    pub fn new(cuda: Arc<Cuda>, max_kept: usize) -> Arc<PinnedPool> {
        Arc::new(PinnedPool {
            cuda,
            max_kept,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves the lists consistent: a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Free bytes held for reuse.
    pub fn kept_bytes(&self) -> usize {
        self.state().kept
    }

    /// A buffer of `len` bytes, from a kept allocation of its size class when there is one.
    pub fn take(self: &Arc<Self>, len: usize) -> Result<PinnedBuffer, GpuError> {
        let capacity = capacity_for(len);
        let kept = {
            let mut st = self.state();
            let ptr = st.free.get_mut(&capacity).and_then(Vec::pop);
            if ptr.is_some() {
                st.kept -= capacity;
            }
            ptr
        };
        let ptr = match kept {
            Some(p) => p as *mut u8,
            None => {
                self.cuda.bind()?;
                let mut p = std::ptr::null_mut();
                // SAFETY: writes one host pointer to capacity page-locked bytes.
                self.cuda.check("cuMemAllocHost", unsafe {
                    (self.cuda.api.cu_mem_alloc_host)(&mut p, capacity)
                })?;
                let p = p.cast::<u8>();
                // SAFETY: p holds capacity writable bytes; zeroed once so they are initialised.
                unsafe { std::ptr::write_bytes(p, 0, capacity) };
                p
            }
        };
        Ok(PinnedBuffer {
            pool: self.clone(),
            ptr,
            capacity,
            len,
        })
    }

    fn give_back(&self, ptr: *mut u8, capacity: usize) {
        {
            let mut st = self.state();
            if st.kept + capacity <= self.max_kept {
                st.kept += capacity;
                st.free.entry(capacity).or_default().push(ptr as usize);
                return;
            }
        }
        free_host(&self.cuda, ptr);
    }
}

fn free_host(cuda: &Cuda, ptr: *mut u8) {
    let _ = cuda.bind();
    // SAFETY: ptr came from cuMemAllocHost of this context and is freed once (it left the
    // pool's lists, or was never in them).
    unsafe { (cuda.api.cu_mem_free_host)(ptr.cast::<c_void>()) };
}

impl Drop for PinnedPool {
    fn drop(&mut self) {
        let st = std::mem::take(&mut *self.state());
        for ptr in st.free.into_values().flatten() {
            free_host(&self.cuda, ptr as *mut u8);
        }
    }
}

/// Where each part of a section's upload lies in its one pinned image: parts are appended at
/// 256-byte aligned offsets (the alignment `cuMemAlloc` gives), so a part's device address is
/// the image's plus its offset, aligned as if allocated alone.
#[derive(Debug, Default, Clone)]
pub struct ImageLayout {
    len: usize,
}

/// Alignment of every part of an [`ImageLayout`].
pub(super) const IMAGE_ALIGN: usize = 256;

impl ImageLayout {
    /// Reserves `bytes` (at least one word, as a lone allocation would) and returns its offset.
    pub fn push(&mut self, bytes: usize) -> usize {
        let at = self.len.next_multiple_of(IMAGE_ALIGN);
        self.len = at + bytes.max(4);
        at
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was reserved.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_parts_are_aligned_and_disjoint() {
        let mut l = ImageLayout::default();
        let a = l.push(1000);
        let b = l.push(0);
        let c = l.push(17);
        assert_eq!(a, 0);
        assert_eq!(b, 1024);
        assert_eq!(c, 1280);
        assert_eq!(l.len(), 1297);
        assert!([a, b, c].iter().all(|o| o % IMAGE_ALIGN == 0));
    }

    /// Needs a GPU: bytes staged in pinned memory reach the device and come back, and a
    /// buffer given back is reused by the next request of its class.
    #[test]
    fn pinned_round_trip_and_reuse() {
        let cuda = match Cuda::open(0) {
            Ok(c) => c,
            Err(e) => {
                kvfetcher_testkit::skip(
                    kvfetcher_testkit::Missing::Gpu,
                    format!("no CUDA device ({e})"),
                );
                return;
            }
        };
        let pool = PinnedPool::new(cuda.clone(), 1 << 20);
        let stream = cuda.stream().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut up = pool.take(data.len()).unwrap();
        up.as_mut_slice().copy_from_slice(&data);
        let dev = cuda.alloc(data.len()).unwrap();
        let mut back = pool.take(data.len()).unwrap();
        // SAFETY: every buffer outlives the synchronize below and is not touched before it.
        unsafe {
            up.copy_to_device_async(&dev, &stream).unwrap();
            back.copy_from_device_async(0, dev.ptr(), data.len(), &stream)
                .unwrap();
        }
        stream.synchronize().unwrap();
        assert_eq!(back.as_slice(), &data[..]);
        let ptr = up.ptr;
        drop(up);
        assert_eq!(pool.kept_bytes(), capacity_for(data.len()));
        let again = pool.take(data.len() - 10).unwrap();
        assert_eq!(again.ptr, ptr, "same class: the kept allocation");
        // SAFETY: a span past the buffer is refused before any copy is queued.
        let past = unsafe { back.copy_from_device_async(data.len() - 4, dev.ptr(), 8, &stream) };
        assert!(past.is_err());
    }
}
