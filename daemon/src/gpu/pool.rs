//! Device memory kept for reuse by the section restores.
//!
//! Every restored section needs scratch memory: its decoded surfaces, its uploaded payload or
//! codes, its restore parameters. `cuMemFree` waits until the whole device is idle, so freeing
//! those per section made the decode threads queue behind each other's kernels and NVDEC
//! copies (the daemon's NVDEC route ran at half the bare decode loop's rate). Buffers from a
//! [`MemoryPool`] go back to it on drop instead, and the next section of a similar size takes
//! them again without a driver call.
//!
//! A pooled buffer must be dropped only after the work that uses it has finished (the same
//! rule as freeing it; `section_restore` synchronises its stream before its buffers drop).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::cuda::{bytemuck_like::Pod, Cuda, DeviceBuffer, Stream};
use super::GpuError;

/// Smallest allocation the pool makes.
const MIN_CAPACITY: usize = 4096;

/// The capacity a request of `bytes` is served with: four size classes per power of two, so
/// sections of similar sizes share buffers and at most 1/8 of a buffer is slack.
pub(super) fn capacity_for(bytes: usize) -> usize {
    let b = bytes.max(MIN_CAPACITY);
    let step = 1usize << (usize::BITS - b.leading_zeros()).saturating_sub(3);
    b.div_ceil(step) * step
}

/// Free device allocations of one context, by capacity, up to `max_kept` bytes in all.
pub struct MemoryPool {
    cuda: Arc<Cuda>,
    max_kept: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    free: HashMap<usize, Vec<u64>>,
    kept: usize,
}

impl std::fmt::Debug for MemoryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPool")
            .field("kept_bytes", &self.kept_bytes())
            .field("max_kept", &self.max_kept)
            .finish()
    }
}

impl MemoryPool {
    /// A pool of `cuda`'s memory that keeps at most `max_kept` free bytes; buffers given back
    /// beyond that are freed.
    pub fn new(cuda: Arc<Cuda>, max_kept: usize) -> Arc<MemoryPool> {
        Arc::new(MemoryPool {
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

    /// A buffer of `bytes` (its `len()`), from a kept allocation of the right size class when
    /// there is one, else from `cuMemAlloc`.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer, GpuError> {
        let capacity = capacity_for(bytes);
        let kept = {
            let mut st = self.state();
            let ptr = st.free.get_mut(&capacity).and_then(Vec::pop);
            if ptr.is_some() {
                st.kept -= capacity;
            }
            ptr
        };
        let ptr = match kept {
            Some(p) => p,
            None => self.cuda.alloc_raw(capacity)?,
        };
        Ok(DeviceBuffer::pooled(
            self.cuda.clone(),
            ptr,
            bytes,
            self.clone(),
            capacity,
        ))
    }

    /// A pooled buffer holding `data`, copied in `stream` order (see
    /// [`DeviceBuffer::write_async`]): launch the work that reads it on the same stream.
    pub fn upload_async<T: Pod>(
        self: &Arc<Self>,
        data: &[T],
        stream: &Stream,
    ) -> Result<DeviceBuffer, GpuError> {
        let buf = self.alloc(std::mem::size_of_val(data))?;
        buf.write_async(0, data, stream)?;
        Ok(buf)
    }

    /// Takes back an allocation of `capacity` bytes (called by `DeviceBuffer`'s drop).
    pub(super) fn give_back(&self, ptr: u64, capacity: usize) {
        {
            let mut st = self.state();
            if st.kept + capacity <= self.max_kept {
                st.kept += capacity;
                st.free.entry(capacity).or_default().push(ptr);
                return;
            }
        }
        self.cuda.free_raw(ptr);
    }
}

impl Drop for MemoryPool {
    fn drop(&mut self) {
        let st = std::mem::take(&mut *self.state());
        for ptr in st.free.into_values().flatten() {
            self.cuda.free_raw(ptr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_are_four_classes_per_octave() {
        assert_eq!(capacity_for(0), 4096);
        assert_eq!(capacity_for(4096), 4096);
        assert_eq!(capacity_for(4097), 5120);
        assert_eq!(capacity_for(7 * 1024 + 1), 8192);
        assert_eq!(capacity_for(10_000_000), 10_485_760);
        for b in [1usize, 4095, 4097, 65_537, 1 << 20, 4_718_593, 123_456_789] {
            let c = capacity_for(b);
            assert!(c >= b, "{b} -> {c}");
            assert!(c - b.max(MIN_CAPACITY) < c / 4, "{b} -> {c}");
            assert_eq!(capacity_for(c), c, "a class maps to itself");
        }
    }

    /// Needs a GPU: a dropped buffer is reused by the next request of its class, the pool
    /// keeps no more than its limit, and the data written in stream order is there.
    #[test]
    fn buffers_are_reused_within_the_limit() {
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
        let pool = MemoryPool::new(cuda.clone(), 3 << 20);
        let a = pool.alloc(1 << 20).unwrap();
        let ptr = a.ptr();
        assert_eq!(a.len(), 1 << 20);
        drop(a);
        assert_eq!(pool.kept_bytes(), 1 << 20);
        let b = pool.alloc((1 << 20) - 100).unwrap();
        assert_eq!(b.ptr(), ptr, "same class: the kept allocation");
        assert_eq!(pool.kept_bytes(), 0);
        let big = pool.alloc(4 << 20).unwrap();
        drop(big);
        assert_eq!(pool.kept_bytes(), 0, "over the limit: freed");
        let stream = cuda.stream().unwrap();
        let data: Vec<u32> = (0..5000).collect();
        let c = pool.upload_async(&data, &stream).unwrap();
        stream.synchronize().unwrap();
        let mut back = vec![0u32; data.len()];
        c.read(&mut back).unwrap();
        assert_eq!(back, data);
    }
}
