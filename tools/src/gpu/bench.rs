//! GPU benchmarks: NVDEC decode throughput against the number of sessions, and restore kernel
//! bandwidth against a device-to-device copy of the same bytes.
//!
//! Timings exclude decoder creation and module loading (each session decodes once before the
//! clock starts); restore timings use CUDA events and report the median of repeated launches.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fixture::{self, FIXTURE_FORMATS};
use kvfetcher_codec::{pack_codes, Chroma};
use kvfetcher_protocol::{DType, TokenOrder};

use kvfetcher::gpu::GpuError;
use kvfetcher::gpu::{
    CodeGeometry, Dequant, DeviceGather, DeviceTarget, RestoreKernels, TargetSpec,
};
use kvfetcher::gpu::{Cuda, DeviceBuffer, Stream};
use kvfetcher::gpu::{DeviceFrames, Nvdec, NvdecSession};

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
        let fx = FixtureStream::read(kv, fixtures, chroma, bits, None)?;
        for &n in sessions {
            let mut workers = open_sessions(cuda, &nvdec, n, &fx)?;
            let (decodes, secs) = decode_loop(
                cuda,
                &mut workers,
                &fx.stream,
                seconds,
                None,
                FrameHandling::Copy,
            )?;
            out.push(NvdecPoint {
                chroma,
                bits,
                sessions: n,
                in_gbps: (decodes * fx.stream.len()) as f64 / secs / 1e9,
                kv_out_gbps: (decodes * fx.kv_bytes) as f64 / secs / 1e9,
                ratio_vs_fp16: fx.kv_bytes as f64 / fx.stream.len() as f64,
            });
        }
    }
    Ok(out)
}

/// One raster fixture stream and the sizes its decode produces.
struct FixtureStream {
    /// The HEVC bitstream.
    stream: Vec<u8>,
    /// Device bytes its frames need (surface layout).
    frame_bytes: usize,
    /// Its codes as fp16/bf16 KV bytes.
    kv_bytes: usize,
}

impl FixtureStream {
    fn read(
        kv: &Path,
        fixtures: &Path,
        chroma: Chroma,
        bits: u8,
        qp: Option<u8>,
    ) -> Result<Self, GpuError> {
        let codes =
            fixture::kv_codes(kv, bits).map_err(|e| GpuError::InvalidArgument(e.to_string()))?;
        let path = fixture::fixture_path(fixtures, chroma, bits, qp);
        let stream = std::fs::read(&path)
            .map_err(|e| GpuError::InvalidArgument(format!("{}: {e}", path.display())))?;
        let fmt = fixture::fixture_format(chroma, bits);
        Ok(FixtureStream {
            stream,
            frame_bytes: fixture::frames_for(fmt, codes.codes.len())
                * fmt.surface_bytes_per_frame(),
            kv_bytes: codes.codes.len() * 2,
        })
    }
}

/// A session with its frame buffer and the frames one decode of the stream writes.
struct Worker {
    session: NvdecSession,
    buf: DeviceBuffer,
    frames: DeviceFrames,
}

/// Opens `n` sessions, each with its own frame buffer, and decodes the stream once on each so
/// decoder creation stays out of the timed loop.
fn open_sessions(
    cuda: &Arc<Cuda>,
    nvdec: &Nvdec,
    n: usize,
    fx: &FixtureStream,
) -> Result<Vec<Worker>, GpuError> {
    (0..n)
        .map(|_| {
            let mut session = nvdec.session()?;
            let buf = cuda.alloc(fx.frame_bytes)?;
            let frames = session.decode_to_device(&fx.stream, &buf, 0)?;
            Ok(Worker {
                session,
                buf,
                frames,
            })
        })
        .collect()
}

/// Decodes `stream` on every worker, one thread each, until `seconds` pass (at least once
/// each). With `pace` (compressed bytes per second per session) each session waits on its own
/// [`TokenBucket`] before every decode; the buckets start staggered so sessions do not decode
/// in lockstep bursts. Returns the decodes done and the seconds they took.
fn decode_loop(
    cuda: &Arc<Cuda>,
    workers: &mut [Worker],
    stream: &[u8],
    seconds: f64,
    pace: Option<f64>,
    handling: FrameHandling,
) -> Result<(usize, f64), GpuError> {
    let n = workers.len().max(1);
    let cost = stream.len() as f64;
    let start = Instant::now();
    let results: Vec<Result<usize, GpuError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter_mut()
            .enumerate()
            .map(|(i, w)| {
                scope.spawn(move || -> Result<usize, GpuError> {
                    cuda.bind()?;
                    let mut bucket = pace
                        .map(|rate| TokenBucket::new(rate, cost, cost * i as f64 / n as f64))
                        .transpose()?;
                    let mut done = 0;
                    loop {
                        let now = start.elapsed().as_secs_f64();
                        if now >= seconds && done > 0 {
                            break;
                        }
                        if let Some(b) = bucket.as_mut() {
                            let wait = b.take(now, cost);
                            if now + wait >= seconds && done > 0 {
                                break;
                            }
                            if wait > 0.0 {
                                std::thread::sleep(Duration::from_secs_f64(wait));
                            }
                        }
                        if handling == FrameHandling::Copy {
                            w.session.decode_to_device(stream, &w.buf, 0)?;
                        } else {
                            w.session
                                .decode_discard(stream, handling == FrameHandling::Map)?;
                        }
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
    Ok((decodes, secs))
}

/// Paces one decode session's compressed input: refills at `rate` bytes per second up to
/// `capacity` bytes and lets a decode of `cost` bytes start once the bucket covers it. The
/// bucket may go into debt; the debt is the wait. Times are seconds from a common origin, so
/// the arithmetic is testable without a clock.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: f64,
}

impl TokenBucket {
    /// A bucket holding `tokens` bytes at time 0. Starting at or below one decode's cost keeps
    /// the long-run rate at `rate`; `capacity` bounds the catch-up burst after a stall.
    pub fn new(rate: f64, capacity: f64, tokens: f64) -> Result<Self, GpuError> {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        if !ok(rate) || !ok(capacity) || !tokens.is_finite() {
            return Err(GpuError::InvalidArgument(format!(
                "token bucket rate {rate} B/s, capacity {capacity} B, tokens {tokens}"
            )));
        }
        Ok(TokenBucket {
            rate,
            capacity,
            tokens: tokens.min(capacity),
            last: 0.0,
        })
    }

    /// Takes `cost` bytes at time `now` and returns the seconds to wait before the work may
    /// start (0 when the bucket covered it).
    pub fn take(&mut self, now: f64, cost: f64) -> f64 {
        let dt = (now - self.last).max(0.0);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity) - cost;
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.rate
        }
    }
}

/// Compressed bytes per second for each of `sessions` sessions sharing a link of `gbit` Gbit/s.
pub fn session_rate(gbit: f64, sessions: usize) -> Result<f64, GpuError> {
    if !(gbit.is_finite() && gbit > 0.0) || sessions == 0 {
        return Err(GpuError::InvalidArgument(format!(
            "rate {gbit} Gbit/s over {sessions} sessions"
        )));
    }
    Ok(gbit * 1e9 / 8.0 / sessions as f64)
}

/// Parses a fixture stream name such as "444-8" (chroma-bits) into one of [`FIXTURE_FORMATS`].
pub fn parse_stream(name: &str) -> Result<(Chroma, u8), GpuError> {
    FIXTURE_FORMATS
        .into_iter()
        .find(|(c, b)| format!("{}-{b}", c.name()) == name)
        .ok_or_else(|| {
            let known: Vec<String> = FIXTURE_FORMATS
                .iter()
                .map(|(c, b)| format!("{}-{b}", c.name()))
                .collect();
            GpuError::InvalidArgument(format!(
                "stream {name:?}: expected one of {}",
                known.join(", ")
            ))
        })
}

/// What a load does with each decoded frame: the real path copies it out; the other two
/// isolate what NVDEC's decode and its post-processing (the map) cost a co-tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameHandling {
    /// Map, copy into device memory, unmap: what every real decode does.
    Copy,
    /// Map and unmap (NVDEC's post-processing into an output surface), no copy.
    Map,
    /// Never mapped: NVDEC's decode alone.
    None,
}

impl std::str::FromStr for FrameHandling {
    type Err = GpuError;

    fn from_str(s: &str) -> Result<Self, GpuError> {
        match s {
            "copy" => Ok(FrameHandling::Copy),
            "map" => Ok(FrameHandling::Map),
            "none" => Ok(FrameHandling::None),
            _ => Err(GpuError::InvalidArgument(format!(
                "frame handling {s:?}: expected copy, map or none"
            ))),
        }
    }
}

/// What to run as a background NVDEC load (`kvfetcher-bench gpu load`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSpec {
    /// Fixture stream format.
    pub chroma: Chroma,
    /// Fixture stream bit depth.
    pub bits: u8,
    /// The fixture's constant QP; `None` = the lossless fixture.
    pub qp: Option<u8>,
    /// Concurrent sessions; `None` = the card's NVDEC engine count.
    pub sessions: Option<usize>,
    /// How long to decode, seconds from when every decoder exists.
    pub seconds: f64,
    /// Total compressed input rate, Gbit/s, split evenly over sessions; `None` = flat out.
    pub rate_gbit: Option<f64>,
    /// What happens to each decoded frame.
    pub frames: FrameHandling,
}

/// What a background NVDEC load achieved.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// Sessions that ran.
    pub sessions: usize,
    /// Compressed bitstream consumed, GB/s.
    pub in_gbps: f64,
    /// Decoded surface bytes written to device memory, GB/s.
    pub out_gbps: f64,
    /// Frames decoded in total.
    pub frames: usize,
    /// Seconds the loop ran.
    pub seconds: f64,
}

/// Decodes a real-KV fixture stream on `spec.sessions` sessions for `spec.seconds`, flat out or
/// paced, as a second GPU tenant for interference measurements. `ready` is called with the
/// session count once every decoder exists, just before the timed loop starts.
pub fn nvdec_load(
    cuda: &Arc<Cuda>,
    kv: &Path,
    fixtures: &Path,
    spec: &LoadSpec,
    ready: &mut dyn FnMut(usize),
) -> Result<LoadReport, GpuError> {
    if !(spec.seconds.is_finite() && spec.seconds > 0.0) {
        return Err(GpuError::InvalidArgument(format!(
            "seconds {} (must be > 0)",
            spec.seconds
        )));
    }
    let nvdec = Nvdec::open(cuda.clone())?;
    let n = match spec.sessions {
        Some(0) => return Err(GpuError::InvalidArgument("0 sessions".into())),
        Some(n) => n,
        None => nvdec.engines()?,
    };
    let pace = spec.rate_gbit.map(|r| session_rate(r, n)).transpose()?;
    let fx = FixtureStream::read(kv, fixtures, spec.chroma, spec.bits, spec.qp)?;
    let mut workers = open_sessions(cuda, &nvdec, n, &fx)?;
    let frames = workers.first().map_or(0, |w| w.frames.frames);
    let surface =
        frames * fixture::fixture_format(spec.chroma, spec.bits).surface_bytes_per_frame();
    ready(n);
    let (decodes, secs) = decode_loop(
        cuda,
        &mut workers,
        &fx.stream,
        spec.seconds,
        pace,
        spec.frames,
    )?;
    Ok(LoadReport {
        sessions: n,
        in_gbps: (decodes * fx.stream.len()) as f64 / secs / 1e9,
        out_gbps: (decodes * surface) as f64 / secs / 1e9,
        frames: decodes * frames,
        seconds: secs,
    })
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
    /// Median milliseconds of that copy: the time to put the same KV bytes in place by
    /// copying them, the other way to compare (inputs smaller than the output count for
    /// less in `gbps`).
    pub copy_ms: f64,
    /// Median milliseconds of a memset of the output bytes: the card's write-only rate, the
    /// ceiling of a restore whose reads are few (packed codes into f32).
    pub fill_ms: f64,
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

/// The two references every restore of one output dtype is compared with.
#[derive(Debug, Clone, Copy)]
struct References {
    copy_gbps: f64,
    copy_ms: f64,
    fill_ms: f64,
}

fn point(name: String, bytes: usize, ms: f64, r: References) -> RestorePoint {
    let References {
        copy_gbps,
        copy_ms,
        fill_ms,
    } = r;
    RestorePoint {
        copy_ms,
        fill_ms,
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
    // The daemon's HEVC sections read their codes through the geometry's gather table: per row
    // of codes for the codec's layouts (per group of 8 codes or per code for layouts that break
    // rows). Identity tables cost the same traffic as real ones.
    let gathers = [("per-code", 1), ("per-group", 8), ("per-row", g.cols)]
        .into_iter()
        .map(|(how, run)| {
            let entries: Vec<u32> = (0..codes.len().div_ceil(run) as u32)
                .map(|e| e * run as u32)
                .collect();
            Ok((
                how,
                4 * entries.len(),
                DeviceGather::upload(cuda, &entries, run)?,
            ))
        })
        .collect::<Result<Vec<_>, GpuError>>()?;
    let mut out = Vec::new();
    for dtype in [DType::BF16, DType::F32] {
        let target = TargetSpec {
            layout: TokenOrder::Nhd,
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
        let fill_ms = time_ms(cuda, 20, &|s| {
            cuda.fill_u32(&dst, 0x3f80_0000, out_bytes, s)
        })?;
        let reference = References {
            copy_gbps,
            copy_ms,
            fill_ms,
        };
        let d = dtype.name();
        let ms = time_ms(cuda, 20, &|s| kernels.restore_codes(&dcodes, &dt, s))?;
        out.push(point(
            format!("codes u16 -> {d} NHD"),
            g.len() * 2 + out_bytes,
            ms,
            reference,
        ));
        for bits in [4u8, 8] {
            let packed = pack_codes(&codes, bits);
            let dp = cuda.upload(&packed)?;
            let ms = time_ms(cuda, 20, &|s| kernels.restore_packed(&dp, bits, &dt, s))?;
            out.push(point(
                format!("packed {bits}-bit -> {d} NHD"),
                packed.len() + out_bytes,
                ms,
                reference,
            ));
        }
        let ms = time_ms(cuda, 20, &|s| kernels.restore_frames(&frames, None, &dt, s))?;
        out.push(point(
            format!("frames 444 8-bit -> {d} NHD"),
            codes.len() + out_bytes,
            ms,
            reference,
        ));
        for (how, table_bytes, gather) in &gathers {
            let ms = time_ms(cuda, 20, &|s| {
                kernels.restore_frames(&frames, Some(gather), &dt, s)
            })?;
            out.push(point(
                format!("frames 444 8-bit, {how} gather -> {d} NHD"),
                codes.len() + table_bytes + out_bytes,
                ms,
                reference,
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bucket that starts empty admits one decode per cost/rate seconds, however long each
    /// decode takes (as long as it is shorter than that period).
    #[test]
    fn token_bucket_paces_to_the_rate() {
        let (rate, cost) = (1000.0, 100.0);
        let mut b = TokenBucket::new(rate, cost, 0.0).expect("bucket");
        let mut now = 0.0;
        let mut starts = Vec::new();
        for _ in 0..50 {
            now += b.take(now, cost);
            starts.push(now);
            now += 0.03; // the decode itself
        }
        for w in starts.windows(2) {
            assert!((w[1] - w[0] - 0.1).abs() < 1e-9, "{w:?}");
        }
        assert!((starts[0] - 0.1).abs() < 1e-12);
    }

    /// Work slower than the rate is never delayed, and an idle spell earns at most `capacity`.
    #[test]
    fn token_bucket_caps_the_burst_and_never_delays_slow_work() {
        let mut b = TokenBucket::new(1000.0, 100.0, 100.0).expect("bucket");
        assert_eq!(b.take(0.0, 100.0), 0.0);
        assert_eq!(b.take(0.2, 100.0), 0.0); // 0.2 s earned 200 B, capped at 100
        assert!((b.take(0.2, 100.0) - 0.1).abs() < 1e-12);
        // A clock that goes backwards earns nothing.
        let mut c = TokenBucket::new(1000.0, 100.0, 0.0).expect("bucket");
        assert!((c.take(1.0, 50.0) - 0.0).abs() < 1e-12);
        assert!((c.take(0.5, 100.0) - 0.05).abs() < 1e-12);
    }

    #[test]
    fn token_bucket_rejects_bad_rates() {
        for (r, c, t) in [
            (0.0, 1.0, 0.0),
            (-1.0, 1.0, 0.0),
            (f64::NAN, 1.0, 0.0),
            (1.0, 0.0, 0.0),
            (1.0, 1.0, f64::INFINITY),
        ] {
            assert!(matches!(
                TokenBucket::new(r, c, t),
                Err(GpuError::InvalidArgument(_))
            ));
        }
    }

    /// 10 Gbit/s over 8 sessions is 156.25 MB/s of bitstream each.
    #[test]
    fn session_rate_splits_the_link() {
        assert_eq!(session_rate(10.0, 8).expect("rate"), 156_250_000.0);
        assert_eq!(session_rate(10.0, 1).expect("rate"), 1.25e9);
        assert!(session_rate(10.0, 0).is_err());
        assert!(session_rate(0.0, 4).is_err());
        assert!(session_rate(f64::INFINITY, 4).is_err());
    }

    #[test]
    fn frame_handling_parses_its_three_names() {
        assert_eq!(
            "copy".parse::<FrameHandling>().ok(),
            Some(FrameHandling::Copy)
        );
        assert_eq!(
            "map".parse::<FrameHandling>().ok(),
            Some(FrameHandling::Map)
        );
        assert_eq!(
            "none".parse::<FrameHandling>().ok(),
            Some(FrameHandling::None)
        );
        assert!(matches!(
            "Copy".parse::<FrameHandling>(),
            Err(GpuError::InvalidArgument(m)) if m.contains("copy, map or none")
        ));
    }

    #[test]
    fn parse_stream_names_every_fixture() {
        for (c, b) in FIXTURE_FORMATS {
            assert_eq!(
                parse_stream(&format!("{}-{b}", c.name())).expect("name"),
                (c, b)
            );
        }
        assert!(matches!(
            parse_stream("444-9"),
            Err(GpuError::InvalidArgument(m)) if m.contains("444-8")
        ));
    }
}
