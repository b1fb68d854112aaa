//! GPU benchmarks: NVDEC decode throughput against the number of sessions, and restore kernel
//! bandwidth against a device-to-device copy of the same bytes.
//!
//! Timings exclude decoder creation and module loading (each session decodes once before the
//! clock starts); restore timings use CUDA events and report the median of repeated launches.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cuda::{Cuda, DeviceBuffer, Stream};
use super::fixture::{self, FIXTURE_FORMATS};
use super::nvdec::{Chroma, DeviceFrames, Nvdec};
use super::restore::{
    pack_codes, CodeGeometry, Dequant, DeviceTarget, KvDtype, KvLayout, RestoreKernels, TargetSpec,
};
use super::GpuError;

/// One NVDEC throughput point.
#[derive(Debug, Clone, PartialEq)]
pub struct NvdecPoint {
    /// Stream chroma format.
    pub chroma: Chroma,
    /// Stream bit depth.
    pub bits: u8,
    /// Concurrent sessions (one thread each).
    pub sessions: usize,
    /// Compressed bitstream consumed, GB/s.
    pub in_gbps: f64,
    /// KV out as fp16/bf16 (codes x 2 bytes), GB/s.
    pub kv_out_gbps: f64,
    /// fp16 KV bytes over bitstream bytes.
    pub ratio_vs_fp16: f64,
}

/// Decodes each fixture stream with each count of concurrent sessions for about `seconds`.
pub fn bench_nvdec(
    cuda: &Arc<Cuda>,
    kv: &Path,
    fixtures: &Path,
    sessions: &[usize],
    seconds: f64,
) -> Result<Vec<NvdecPoint>, GpuError> {
    let nvdec = Nvdec::open(cuda.clone())?;
    let mut out = Vec::new();
    for (chroma, bits) in FIXTURE_FORMATS {
        let codes =
            fixture::kv_codes(kv, bits).map_err(|e| GpuError::InvalidArgument(e.to_string()))?;
        let path = fixture::fixture_path(fixtures, chroma, bits);
        let stream = std::fs::read(&path)
            .map_err(|e| GpuError::InvalidArgument(format!("{}: {e}", path.display())))?;
        let fmt = fixture::fixture_format(chroma, bits);
        let frame_bytes =
            fixture::frames_for(fmt, codes.codes.len()) * fmt.surface_bytes_per_frame();
        let kv_bytes = codes.codes.len() * 2;
        for &n in sessions {
            let mut workers = Vec::new();
            for _ in 0..n {
                let mut s = nvdec.session()?;
                let buf = cuda.alloc(frame_bytes)?;
                s.decode_to_device(&stream, &buf, 0)?; // creates the decoder: not timed
                workers.push((s, buf));
            }
            let deadline = Duration::from_secs_f64(seconds);
            let start = Instant::now();
            let results: Vec<Result<usize, GpuError>> = std::thread::scope(|scope| {
                let handles: Vec<_> = workers
                    .iter_mut()
                    .map(|(s, buf)| {
                        let stream = &stream;
                        scope.spawn(move || -> Result<usize, GpuError> {
                            cuda.bind()?;
                            let mut done = 0;
                            while start.elapsed() < deadline || done == 0 {
                                s.decode_to_device(stream, buf, 0)?;
                                done += 1;
                            }
                            Ok(done)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(GpuError::Decode("worker panicked".into())))
                    })
                    .collect()
            });
            let secs = start.elapsed().as_secs_f64();
            let mut decodes = 0;
            for r in results {
                decodes += r?;
            }
            out.push(NvdecPoint {
                chroma,
                bits,
                sessions: n,
                in_gbps: (decodes * stream.len()) as f64 / secs / 1e9,
                kv_out_gbps: (decodes * kv_bytes) as f64 / secs / 1e9,
                ratio_vs_fp16: kv_bytes as f64 / stream.len() as f64,
            });
        }
    }
    Ok(out)
}

/// One restore bandwidth measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct RestorePoint {
    /// What ran, e.g. "codes u16 -> bf16 NHD".
    pub name: String,
    /// Bytes read plus bytes written per launch.
    pub bytes: usize,
    /// Median milliseconds per launch.
    pub ms: f64,
    /// (read + written) GB/s.
    pub gbps: f64,
    /// Device-to-device copy GB/s (read + written) of the same output bytes.
    pub copy_gbps: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `f` with events: 3 warm-up launches, then the median of `reps`.
fn time_ms(
    cuda: &Arc<Cuda>,
    reps: usize,
    f: &dyn Fn(&Stream) -> Result<(), GpuError>,
) -> Result<f64, GpuError> {
    let stream = cuda.stream()?;
    let (a, b) = (cuda.event(true, false)?, cuda.event(true, false)?);
    for _ in 0..3 {
        f(&stream)?;
    }
    stream.synchronize()?;
    let mut ms = Vec::new();
    for _ in 0..reps {
        a.record(&stream)?;
        f(&stream)?;
        b.record(&stream)?;
        b.synchronize()?;
        ms.push(f64::from(b.elapsed_ms_since(&a)?));
    }
    Ok(median(ms))
}

fn point(name: String, bytes: usize, ms: f64, copy_gbps: f64) -> RestorePoint {
    RestorePoint {
        name,
        bytes,
        ms,
        gbps: bytes as f64 / ms / 1e6,
        copy_gbps,
    }
}

/// Restore bandwidth on real 8-bit KV codes replicated `copies` times (to fill the GPU), into
/// contiguous NHD targets, against a device-to-device copy of the output bytes.
pub fn bench_restore(
    cuda: &Arc<Cuda>,
    kv: &Path,
    copies: usize,
) -> Result<Vec<RestorePoint>, GpuError> {
    let kernels = RestoreKernels::load(cuda)?;
    let base = fixture::kv_codes(kv, 8).map_err(|e| GpuError::InvalidArgument(e.to_string()))?;
    let copies = copies.max(1);
    let g = CodeGeometry {
        tensors: base.geometry.tensors * copies,
        ..base.geometry
    };
    let codes: Vec<u16> = (0..copies)
        .flat_map(|_| base.codes.iter().copied())
        .collect();
    let dq = Dequant {
        grouping: base.dequant.grouping,
        scales: (0..copies)
            .flat_map(|_| base.dequant.scales.iter().copied())
            .collect(),
        mins: (0..copies)
            .flat_map(|_| base.dequant.mins.iter().copied())
            .collect(),
    };
    let dcodes = cuda.upload(&codes)?;
    let fmt = fixture::fixture_format(Chroma::Yuv444, 8);
    let nframes = fixture::frames_for(fmt, codes.len());
    let mut surf: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
    surf.resize(nframes * fmt.samples_per_frame(), 0);
    let dsurf = cuda.upload(&surf)?;
    let frames = DeviceFrames {
        format: fmt,
        frames: nframes,
        ptr: dsurf.ptr(),
    };
    let mut out = Vec::new();
    for dtype in [KvDtype::Bf16, KvDtype::F32] {
        let target = TargetSpec {
            layout: KvLayout::Nhd,
            dtype,
            heads: base.heads,
            head_dim: base.head_dim,
            token_offset: 0,
            target_tokens: g.rows,
            paged: None,
        };
        let tbytes = target.elements() * dtype.size();
        let outs: Vec<DeviceBuffer> = (0..g.tensors)
            .map(|_| cuda.alloc(tbytes))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&DeviceBuffer> = outs.iter().collect();
        let dt = DeviceTarget::new(cuda, g, &dq, &target, &refs)?;
        let out_bytes = g.len() * dtype.size();
        let src = cuda.alloc(out_bytes)?;
        src.fill(1)?;
        let dst = cuda.alloc(out_bytes)?;
        let copy_ms = time_ms(cuda, 20, &|s| cuda.copy_dtod(&dst, &src, out_bytes, s))?;
        let copy_gbps = 2.0 * out_bytes as f64 / copy_ms / 1e6;
        let d = dtype.name();
        let ms = time_ms(cuda, 20, &|s| kernels.restore_codes(&dcodes, &dt, s))?;
        out.push(point(
            format!("codes u16 -> {d} NHD"),
            g.len() * 2 + out_bytes,
            ms,
            copy_gbps,
        ));
        for bits in [4u8, 8] {
            let packed = pack_codes(&codes, bits);
            let dp = cuda.upload(&packed)?;
            let ms = time_ms(cuda, 20, &|s| kernels.restore_packed(&dp, bits, &dt, s))?;
            out.push(point(
                format!("packed {bits}-bit -> {d} NHD"),
                packed.len() + out_bytes,
                ms,
                copy_gbps,
            ));
        }
        let ms = time_ms(cuda, 20, &|s| kernels.restore_frames(&frames, None, &dt, s))?;
        out.push(point(
            format!("frames 444 8-bit -> {d} NHD"),
            codes.len() + out_bytes,
            ms,
            copy_gbps,
        ));
    }
    Ok(out)
}
