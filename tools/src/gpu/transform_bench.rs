//! Benchmark of the transform-coded (rANS) GPU route: a fetch-sized batch (8k tokens of a
//! 32-layer model with 8 KV heads of 128, fp16) restored section by section through the
//! daemon's own route (`restore_section_to_device`: pooled streams, the device's profile cache)
//! from many threads at once, as a fetch's sections are; next to a device-to-device copy of the
//! same bytes. The KV is synthetic (a few latent factors per head plus noise, so PCA has
//! something to find) with a profile calibrated on other synthetic tokens; 1k tokens are coded
//! and restored at 8 token offsets (the work per section does not depend on the values).
//! [`transform_load`] runs the same restores for a while, flat out or paced to a link rate:
//! the rans tenant of `scripts/gpu-interference.py`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfetcher_codec::{
    calibrate, BasisKind, Calibration, ChunkView, CodecProfile, Rope, RopeStyle,
};
use kvfetcher_kv::{DType, KvCache, LayerKv, Tensor};
use kvfetcher_protocol::{KvShape, MemoryKind, Paging, TargetLayout, TokenOrder};

use kvfetcher::gpu::{restore_section_to_device, Route};
use kvfetcher::gpu::{GpuDevices, GpuError, GpuOptions};
use kvfetcher::Metrics;

use super::transform_check::transform_chunks;

/// The batch's model shape and size.
#[derive(Debug, Clone, Copy)]
pub struct TransformBenchSpec {
    /// Layers.
    pub layers: usize,
    /// KV heads.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Tokens restored (a multiple of `coded_tokens`).
    pub tokens: usize,
    /// Tokens actually coded (restored `tokens / coded_tokens` times at successive offsets).
    pub coded_tokens: usize,
    /// Host threads restoring sections at once.
    pub threads: usize,
    /// Relative quantizer step.
    pub relative_step: f32,
    /// Layers per section.
    pub layers_per_section: usize,
}

impl Default for TransformBenchSpec {
    fn default() -> Self {
        TransformBenchSpec {
            layers: 32,
            heads: 8,
            head_dim: 128,
            tokens: 8192,
            coded_tokens: 1024,
            threads: 32,
            relative_step: 0.1,
            layers_per_section: 1,
        }
    }
}

/// One result row.
#[derive(Debug, Clone)]
pub struct TransformBenchPoint {
    /// What ran.
    pub name: String,
    /// fp16 KV bytes restored.
    pub bytes: usize,
    /// Compressed payload bytes read.
    pub payload_bytes: usize,
    /// Wall time of the restore.
    pub ms: f64,
    /// KV GB/s restored.
    pub gbps: f64,
    /// A device-to-device copy of the same bytes, GB/s.
    pub copy_gbps: f64,
}

/// Synthetic KV: per head, 8 latent factors per token times fixed random directions, plus
/// noise; K a bit larger than V.
fn synthetic(spec: &TransformBenchSpec, tokens: usize, seed: u64) -> Result<KvCache, GpuError> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let (h, d) = (spec.heads, spec.head_dim);
    let factors = 8;
    let mut layers = Vec::with_capacity(spec.layers);
    for _ in 0..spec.layers {
        let mut kv = Vec::with_capacity(2);
        for scale in [2.0f32, 1.0] {
            let dirs: Vec<f32> = (0..h * factors * d).map(|_| next()).collect();
            let mut values = vec![0f32; tokens * h * d];
            for t in 0..tokens {
                for hh in 0..h {
                    let z: Vec<f32> = (0..factors).map(|_| next()).collect();
                    let row = &mut values[(t * h + hh) * d..(t * h + hh + 1) * d];
                    for (j, v) in row.iter_mut().enumerate() {
                        let mut x = 0.05 * next();
                        for (f, zf) in z.iter().enumerate() {
                            x += zf * dirs[(hh * factors + f) * d + j];
                        }
                        *v = scale * x;
                    }
                }
            }
            kv.push(
                Tensor::from_f32(DType::F16, [tokens, h, d], &values)
                    .map_err(|e| GpuError::InvalidArgument(e.to_string()))?,
            );
        }
        let value = kv.pop().expect("two");
        let key = kv.pop().expect("two");
        layers.push(LayerKv { key, value });
    }
    KvCache::new(layers, None).map_err(|e| GpuError::InvalidArgument(e.to_string()))
}

/// A fetch-sized batch of transform-coded sections, coded and ready to restore on device 0.
struct Batch {
    /// Owns the device's context and pools for the batch's lifetime.
    _gpus: GpuDevices,
    dev: Arc<kvfetcher::gpu::GpuDevice>,
    registry: kvfetcher_codec::CodecRegistry,
    objects: Vec<Vec<u8>>,
    /// (chunk, section, token offset, payload bytes) per section restore.
    jobs: Vec<(usize, usize, u32, usize)>,
    shape: KvShape,
    layout: TargetLayout,
    out: kvfetcher::gpu::DeviceBuffer,
    len: usize,
}

impl Batch {
    fn new(spec: &TransformBenchSpec) -> Result<Batch, GpuError> {
        let invalid = |e: String| GpuError::InvalidArgument(e);
        if spec.coded_tokens == 0 || !spec.tokens.is_multiple_of(spec.coded_tokens) {
            return Err(invalid("tokens must be a multiple of coded_tokens".into()));
        }
        let gpus = GpuDevices::new(GpuOptions::default(), Metrics::new());
        let dev = gpus.device(0).map_err(|e| invalid(e.to_string()))?;
        let cal = synthetic(spec, 512, 0x9e37_79b9_7f4a_7c15)?;
        let coded = synthetic(spec, spec.coded_tokens, 0x1234_5678_9abc_def1)?;
        let profile: Arc<CodecProfile> = Arc::new(
            calibrate(
                kvfetcher_codec::ModelFingerprint::of_bytes(b"kvfetcher gpu transform check"),
                &[cal],
                &Calibration {
                    rope: Rope {
                        style: RopeStyle::Halves,
                        dims: spec.head_dim as u16,
                        base: 10000.0,
                        freq_scale: 1.0,
                    },
                    sinks: 4,
                    basis: BasisKind::Pca,
                },
            )
            .map_err(|e| invalid(e.to_string()))?,
        );
        let (registry, objects) = transform_chunks(
            &coded,
            &profile,
            spec.relative_step,
            kvfetcher_codec::DEFAULT_CHUNK_TOKENS,
            spec.layers_per_section,
        )?;
        let shape = KvShape {
            num_layers: spec.layers as u32,
            tokens: spec.tokens as u32,
            kv_heads: spec.heads as u32,
            head_dim: spec.head_dim as u32,
        };
        let layout = TargetLayout {
            dtype: DType::F16,
            order: TokenOrder::Nhd,
            paging: Paging::Contiguous,
            memory: MemoryKind::Gpu(0),
        };
        let len = layout
            .checked_buffer_len(&shape)
            .map_err(|e| invalid(e.to_string()))?;
        let out = dev.cuda().alloc(len)?;
        let mut jobs = Vec::new();
        for copy in 0..spec.tokens / spec.coded_tokens {
            let mut start = (copy * spec.coded_tokens) as u32;
            for (c, o) in objects.iter().enumerate() {
                let v = ChunkView::parse(o).map_err(|e| invalid(e.to_string()))?;
                for i in 0..v.header().sections.len() {
                    jobs.push((c, i, start, v.section_bytes(i).len()));
                }
                start += v.header().token_count;
            }
        }
        Ok(Batch {
            _gpus: gpus,
            dev,
            registry,
            objects,
            jobs,
            shape,
            layout,
            out,
            len,
        })
    }

    fn payload_bytes(&self) -> usize {
        self.jobs.iter().map(|j| j.3).sum()
    }

    /// Restores job `k` (modulo the batch) through the daemon's route.
    fn restore(&self, views: &[ChunkView<'_>], k: usize) -> Result<(), GpuError> {
        let (c, i, start, _) = self.jobs[k % self.jobs.len()];
        let v = &views[c];
        let route = restore_section_to_device(
            &self.dev,
            v.header(),
            i,
            v.section_bytes(i),
            &self.registry,
            &self.layout,
            &self.shape,
            start,
            &self.out,
            true,
        )?;
        match route {
            Route::Rans => Ok(()),
            r => Err(GpuError::InvalidArgument(format!("route {r:?}"))),
        }
    }

    fn views(&self) -> Result<Vec<ChunkView<'_>>, GpuError> {
        self.objects
            .iter()
            .map(|o| ChunkView::parse(o).map_err(|e| GpuError::InvalidArgument(e.to_string())))
            .collect()
    }

    /// Runs `threads` workers, each taking the next job until `more(k)` says stop; returns
    /// the restores done.
    fn drive(
        &self,
        threads: usize,
        more: &(dyn Fn(usize) -> bool + Sync),
    ) -> Result<usize, GpuError> {
        let views = self.views()?;
        let (next, done) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    s.spawn(|| -> Result<(), GpuError> {
                        loop {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            if !more(k) {
                                return Ok(());
                            }
                            self.restore(&views, k)?;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(GpuError::InvalidArgument("panic".into())))
            })
        })?;
        Ok(done.load(Ordering::Relaxed))
    }
}

/// Runs the benchmark on device 0.
pub fn bench_transform(spec: &TransformBenchSpec) -> Result<Vec<TransformBenchPoint>, GpuError> {
    let b = Batch::new(spec)?;
    let jobs = b.jobs.len();
    let run = |threads: usize| -> Result<f64, GpuError> {
        let t0 = Instant::now();
        b.drive(threads, &|k| k < jobs)?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    // Warm-up (profile upload, pools, JIT), then the timed runs.
    run(spec.threads)?;
    let len = b.len;
    let src = b.dev.cuda().alloc(len)?;
    let stream = b.dev.cuda().stream()?;
    b.dev.cuda().copy_dtod(&b.out, &src, len, &stream)?;
    stream.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..3 {
        b.dev.cuda().copy_dtod(&b.out, &src, len, &stream)?;
    }
    stream.synchronize()?;
    let copy_ms = t0.elapsed().as_secs_f64() * 1e3 / 3.0;
    let copy_gbps = len as f64 / copy_ms / 1e6;
    let mut points = Vec::new();
    for threads in [spec.threads / 2, spec.threads, spec.threads * 2] {
        let threads = threads.max(1);
        let ms = (0..3)
            .map(|_| run(threads))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .fold(f64::INFINITY, f64::min);
        points.push(TransformBenchPoint {
            name: format!(
                "rans {}L {}x{} {} tok, {} sections, {threads} threads",
                spec.layers, spec.heads, spec.head_dim, spec.tokens, jobs
            ),
            bytes: len,
            payload_bytes: b.payload_bytes(),
            ms,
            gbps: len as f64 / ms / 1e6,
            copy_gbps,
        });
    }
    Ok(points)
}

/// What [`transform_load`] achieved.
#[derive(Debug, Clone, Copy)]
pub struct TransformLoad {
    /// Sections restored.
    pub sections: usize,
    /// Compressed payload consumed, GB/s.
    pub in_gbps: f64,
    /// fp16 KV written, GB/s.
    pub out_gbps: f64,
}

/// Restores the batch's sections round and round for `seconds` on `spec.threads` threads,
/// flat out or with the payload paced to `rate_gbit` Gbit/s (a section starts once the link
/// would have delivered it); `ready` is called after the warm-up, when the timed window starts.
pub fn transform_load(
    spec: &TransformBenchSpec,
    seconds: f64,
    rate_gbit: Option<f64>,
    ready: &mut dyn FnMut(usize),
) -> Result<TransformLoad, GpuError> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(seconds) || rate_gbit.is_some_and(|r| !positive(r)) {
        return Err(GpuError::InvalidArgument(
            "seconds and the rate must be positive".into(),
        ));
    }
    let b = Batch::new(spec)?;
    let jobs = b.jobs.len();
    b.drive(spec.threads, &|k| k < jobs)?;
    ready(jobs);
    let window = Duration::from_secs_f64(seconds);
    // Payload bytes before job k (over whole rounds of the batch), for pacing.
    let prefix: Vec<usize> = b
        .jobs
        .iter()
        .scan(0, |sum, j| {
            let at = *sum;
            *sum += j.3;
            Some(at)
        })
        .collect();
    let round = b.payload_bytes();
    let before = |k: usize| k / jobs * round + prefix[k % jobs];
    let t0 = Instant::now();
    let done = b.drive(spec.threads, &|k| {
        if let Some(r) = rate_gbit {
            let due = Duration::from_secs_f64(before(k) as f64 * 8.0 / (r * 1e9));
            if due >= window {
                return false;
            }
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        t0.elapsed() < window
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let section_kv = b.len as f64 / jobs as f64;
    Ok(TransformLoad {
        sections: done,
        in_gbps: before(done) as f64 / secs / 1e9,
        out_gbps: done as f64 * section_kv / secs / 1e9,
    })
}
