//! The node's GPUs as the daemon serves them: each device is opened on first use (driver,
//! primary context, restore kernels, NVDEC sessions, a few streams) and kept for the daemon's
//! life, so any ordinal `0..N` works with its own sessions and memory.
//!
//! Nothing is loaded at start: a host without a driver pays nothing until a client asks for
//! GPU memory, and then gets a [`DeviceError`] the server reports as `gpu_unsupported`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kvfetcher_codec::{CodecProfile, HevcGeometry, ProfileId};

use super::cuda::{set_host_wait, Cuda, HostWait, Stream};
use super::gather::device_gather;
use super::nvdec::SessionPool;
use super::pinned::PinnedPool;
use super::pool::MemoryPool;
use super::rans::DeviceProfile;
use super::restore::{DeviceGather, RestoreKernels};
use super::GpuError;
use crate::metrics::Metrics;

/// Streams kept for reuse per device (one per decode thread); more may exist while busy.
const KEPT_STREAMS: usize = 32;
/// Free scratch memory kept per device for section restores (see `pool`).
const KEPT_SCRATCH_BYTES: usize = 1 << 30;
/// Free page-locked host memory kept per device for section uploads (see `pinned`).
const KEPT_PINNED_BYTES: usize = 256 << 20;
/// Gather tables kept per device (one per HEVC section geometry; a node serves few).
const KEPT_GATHERS: usize = 64;
/// Codec profiles kept in device memory (a few MB each); the cache is cleared when full.
const KEPT_PROFILES: usize = 8;

/// What the daemon's `[gpu]` configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuOptions {
    /// False: every GPU request is refused ("disabled in config").
    pub enabled: bool,
    /// NVDEC sessions per device; 0 means one per NVDEC engine.
    pub nvdec_sessions: usize,
    /// How host threads wait for the GPU (for the whole process; see [`HostWait`]).
    pub host_wait: HostWait,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            enabled: true,
            nvdec_sessions: 0,
            host_wait: HostWait::default(),
        }
    }
}

/// Why a device cannot serve a request; the server sends the message with `gpu_unsupported`.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `[gpu] enabled = false`.
    #[error("gpu support is disabled in config")]
    Disabled,
    /// No driver on this host.
    #[error("no CUDA driver: libcuda.so.1 not found ({0})")]
    NoDriver(String),
    /// The ordinal is beyond the host's devices.
    #[error("gpu:{ordinal} requested, host has {count} GPU{}", plural(.count))]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },
    /// The device exists but could not be set up.
    #[error("gpu:{ordinal}: {source}")]
    Open {
        /// The ordinal.
        ordinal: usize,
        /// What failed.
        source: GpuError,
    },
}

/// The node's GPUs, opened lazily per ordinal. One per daemon, shared by all connections.
pub struct GpuDevices {
    opts: GpuOptions,
    metrics: Arc<Metrics>,
    open: Mutex<HashMap<usize, Arc<GpuDevice>>>,
    /// Serialises opening, so two first requests for a device open it once.
    opening: Mutex<()>,
}

impl std::fmt::Debug for GpuDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevices")
            .field("opts", &self.opts)
            .field("open", &lock(&self.open).keys().collect::<Vec<_>>())
            .finish()
    }
}

fn plural(n: &usize) -> &'static str {
    if *n == 1 {
        ""
    } else {
        "s"
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves the data consistent: a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GpuDevices {
    /// The node's GPUs under `opts`; GPU buffer bytes and restore routes are counted in
    /// `metrics`. Sets the process's [`HostWait`] for every device opened afterwards.
    pub fn new(opts: GpuOptions, metrics: Arc<Metrics>) -> GpuDevices {
        set_host_wait(opts.host_wait);
        GpuDevices {
            opts,
            metrics,
            open: Mutex::new(HashMap::new()),
            opening: Mutex::new(()),
        }
    }

    /// The metrics GPU destinations and restores update.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether GPU requests are served at all.
    pub fn enabled(&self) -> bool {
        self.opts.enabled
    }

    /// Device `ordinal`, opened on first use. Blocks while opening (driver load, context,
    /// kernel JIT): call it off the async runtime's hot path, or accept one slow first request.
    pub fn device(&self, ordinal: usize) -> Result<Arc<GpuDevice>, DeviceError> {
        if !self.opts.enabled {
            return Err(DeviceError::Disabled);
        }
        if let Some(d) = lock(&self.open).get(&ordinal) {
            return Ok(d.clone());
        }
        let _opening = lock(&self.opening);
        if let Some(d) = lock(&self.open).get(&ordinal) {
            return Ok(d.clone());
        }
        let d = Arc::new(GpuDevice::open(ordinal, &self.opts, self.metrics.clone())?);
        lock(&self.open).insert(ordinal, d.clone());
        Ok(d)
    }

    /// The devices opened so far.
    pub fn opened(&self) -> Vec<Arc<GpuDevice>> {
        let mut v: Vec<_> = lock(&self.open).values().cloned().collect();
        v.sort_by_key(|d| d.ordinal());
        v
    }
}

/// One opened GPU: its context, restore kernels, NVDEC sessions (if the host has NVDEC),
/// scratch memory, streams and cached gather tables.
pub struct GpuDevice {
    cuda: Arc<Cuda>,
    kernels: RestoreKernels,
    nvdec: Option<Arc<SessionPool>>,
    scratch: Arc<MemoryPool>,
    pinned: Arc<PinnedPool>,
    streams: Mutex<Vec<Stream>>,
    /// Keyed by geometry alone: a section's other parameters (stream sizes, checksum) differ
    /// from section to section, the table does not.
    gathers: Mutex<HashMap<HevcGeometry, Arc<DeviceGather>>>,
    /// Held while a missing table is built, so concurrent sections build it once.
    building: Mutex<()>,
    /// Codec profiles' bases and means, by the id chunks name them with.
    profiles: Mutex<HashMap<ProfileId, Arc<DeviceProfile>>>,
    /// Held while a missing profile is uploaded.
    uploading: Mutex<()>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice")
            .field("info", self.cuda.info())
            .field("nvdec_sessions", &self.nvdec_sessions())
            .finish()
    }
}

impl GpuDevice {
    fn open(
        ordinal: usize,
        opts: &GpuOptions,
        metrics: Arc<Metrics>,
    ) -> Result<GpuDevice, DeviceError> {
        let cuda = Cuda::open(ordinal).map_err(|e| match e {
            GpuError::NoDriver(m) => DeviceError::NoDriver(m),
            GpuError::NoDevice { ordinal, count } => DeviceError::NoDevice { ordinal, count },
            source => DeviceError::Open { ordinal, source },
        })?;
        let open_err = |source| DeviceError::Open { ordinal, source };
        let kernels = RestoreKernels::load(&cuda).map_err(open_err)?;
        let nvdec = match open_nvdec(&cuda, opts.nvdec_sessions) {
            Ok(pool) => Some(Arc::new(pool)),
            Err(e) => {
                tracing::warn!(
                    gpu = ordinal,
                    "nvdec unavailable ({e}): hevc sections decode on the CPU, restore on the GPU"
                );
                None
            }
        };
        let info = cuda.info();
        tracing::info!(
            gpu = ordinal,
            name = %info.name,
            memory_gib = format!("{:.1}", info.total_memory as f64 / (1u64 << 30) as f64),
            compute_capability = ?info.compute_capability,
            nvdec_sessions = nvdec.as_ref().map_or(0, |p| p.len()),
            "gpu opened"
        );
        Ok(GpuDevice {
            scratch: MemoryPool::new(cuda.clone(), KEPT_SCRATCH_BYTES),
            pinned: PinnedPool::new(cuda.clone(), KEPT_PINNED_BYTES),
            cuda,
            kernels,
            nvdec,
            streams: Mutex::new(Vec::new()),
            gathers: Mutex::new(HashMap::new()),
            building: Mutex::new(()),
            profiles: Mutex::new(HashMap::new()),
            uploading: Mutex::new(()),
            metrics,
        })
    }

    /// The CUDA ordinal.
    pub fn ordinal(&self) -> usize {
        self.cuda.info().ordinal
    }

    /// The device's context.
    pub fn cuda(&self) -> &Arc<Cuda> {
        &self.cuda
    }

    /// The loaded restore kernels.
    pub fn kernels(&self) -> &RestoreKernels {
        &self.kernels
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// NVDEC sessions (0 when the host has no NVDEC).
    pub fn nvdec_sessions(&self) -> usize {
        self.nvdec.as_ref().map_or(0, |p| p.len())
    }

    /// The device's NVDEC sessions, `None` when the host has no NVDEC.
    pub fn nvdec(&self) -> Option<&Arc<SessionPool>> {
        self.nvdec.as_ref()
    }

    /// Scratch memory for section restores (surfaces, payloads, parameters), reused.
    pub fn scratch(&self) -> &Arc<MemoryPool> {
        &self.scratch
    }

    /// The device's page-locked staging memory for uploads and read-backs.
    pub fn pinned(&self) -> &Arc<PinnedPool> {
        &self.pinned
    }

    /// A stream from the pool, returned to it when the guard drops.
    pub fn stream(&self) -> Result<PooledStream<'_>, GpuError> {
        let stream = match lock(&self.streams).pop() {
            Some(s) => s,
            None => self.cuda.stream()?,
        };
        Ok(PooledStream {
            dev: self,
            stream: Some(stream),
        })
    }

    /// The gather table (code index -> planar sample index) of an HEVC section geometry,
    /// uploaded once per geometry and reused.
    pub fn gather(&self, geometry: &HevcGeometry) -> Result<Arc<DeviceGather>, GpuError> {
        if let Some(g) = lock(&self.gathers).get(geometry) {
            return Ok(g.clone());
        }
        let _building = lock(&self.building);
        if let Some(g) = lock(&self.gathers).get(geometry) {
            return Ok(g.clone());
        }
        let table = Arc::new(device_gather(&self.cuda, geometry)?);
        let mut cache = lock(&self.gathers);
        if cache.len() >= KEPT_GATHERS {
            cache.clear();
        }
        cache.insert(*geometry, table.clone());
        Ok(table)
    }
}

impl GpuDevice {
    /// The device copy of `profile`, whose id is `id` (the chunk's; the registry resolved it
    /// to `profile`), uploaded on first use and kept.
    pub fn profile(
        &self,
        id: &ProfileId,
        profile: &CodecProfile,
    ) -> Result<Arc<DeviceProfile>, GpuError> {
        if let Some(p) = lock(&self.profiles).get(id) {
            return Ok(p.clone());
        }
        let _uploading = lock(&self.uploading);
        if let Some(p) = lock(&self.profiles).get(id) {
            return Ok(p.clone());
        }
        let p = Arc::new(DeviceProfile::upload(&self.cuda, profile)?);
        let mut cache = lock(&self.profiles);
        if cache.len() >= KEPT_PROFILES {
            cache.clear();
        }
        cache.insert(*id, p.clone());
        Ok(p)
    }
}

fn open_nvdec(cuda: &Arc<Cuda>, wanted: usize) -> Result<SessionPool, GpuError> {
    SessionPool::open(cuda.clone(), |engines| {
        if wanted == 0 {
            engines
        } else {
            wanted.min(engines * 4)
        }
    })
}

/// A stream borrowed from a [`GpuDevice`]'s pool. Dropping it waits for the work queued on it
/// (so memory that work reads may be reused once the guard is gone).
pub struct PooledStream<'a> {
    dev: &'a GpuDevice,
    stream: Option<Stream>,
}

impl std::ops::Deref for PooledStream<'_> {
    type Target = Stream;

    fn deref(&self) -> &Stream {
        // Only Drop takes the stream out.
        self.stream.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for PooledStream<'_> {
    fn drop(&mut self) {
        let Some(s) = self.stream.take() else { return };
        // A stream with failed work is not reused (its error may be sticky).
        if s.synchronize().is_ok() {
            let mut pool = lock(&self.dev.streams);
            if pool.len() < KEPT_STREAMS {
                pool.push(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_and_driverless_hosts_give_clear_errors() {
        let off = GpuDevices::new(
            GpuOptions {
                enabled: false,
                ..GpuOptions::default()
            },
            Metrics::new(),
        );
        let e = off.device(0).unwrap_err();
        assert!(e.to_string().contains("disabled in config"), "{e}");
        let on = GpuDevices::new(GpuOptions::default(), Metrics::new());
        match on.device(0) {
            Ok(d) => {
                println!("driver present: {d:?}");
                let n = on.opened().len();
                assert_eq!(n, 1);
                match on.device(4096) {
                    Err(e @ DeviceError::NoDevice { .. }) => {
                        assert!(e.to_string().starts_with("gpu:4096 requested, host has"))
                    }
                    other => panic!("gpu:4096 gave {other:?}"),
                }
            }
            Err(e @ DeviceError::NoDriver(_)) => {
                assert!(
                    e.to_string().starts_with("no CUDA driver: libcuda.so.1"),
                    "{e}"
                );
                kvfetcher_testkit::skip(
                    kvfetcher_testkit::Missing::Gpu,
                    format!("no CUDA driver ({e})"),
                );
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
        let e = DeviceError::NoDevice {
            ordinal: 3,
            count: 1,
        };
        assert_eq!(e.to_string(), "gpu:3 requested, host has 1 GPU");
    }
}
