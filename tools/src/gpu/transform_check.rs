//! The GPU transform route (rANS decode + inverse transform) against the codec's CPU restore,
//! bit for bit, on real KV: transform-coded chunks of the check's KV file with a profile
//! calibrated on other tokens of the same file, at several steps, with and without sinks,
//! into every target the restore checks use; the daemon's own section route
//! (`restore_section_to_device`, profile from the registry) against the fetch's CPU placement;
//! and corrupt streams, which must be flagged with the engine's buffer left untouched.

use std::path::Path;
use std::sync::Arc;

use half::{bf16, f16};
use kvfetcher_codec::{
    calibrate, decode_section, encode_cache, restore_section, uniform_steps, BasisKind,
    Calibration, ChunkHeader, ChunkView, CodecProfile, CodecRegistry, EncodeConfig,
    ModelFingerprint, QuantConfig, Rope, RopeStyle, TransformConfig, VariantKind,
};
use kvfetcher_kv::{DType, DTypeExt, KvCache, KvFile};
use kvfetcher_protocol::{KvShape, MemoryKind, Paging, TargetLayout, TokenOrder};

use kvfetcher::gpu::{kernels_apply, restore_section_to_device, Route};
use kvfetcher::gpu::{
    restore_transform_section, DeviceProfile, OwnedScratch, RansPlan, TransformSection,
};
use kvfetcher::gpu::{CodeGeometry, DeviceTarget, ParamUpload, RestoreKernels, TargetSpec};
use kvfetcher::gpu::{Cuda, DeviceBuffer};
use kvfetcher::gpu::{GpuDevices, GpuError, GpuOptions};
use kvfetcher::pipeline::{place_cache, LayoutIoError};
use kvfetcher::Metrics;

use super::check::{target_name, targets_for, CheckRow, POISON};

/// Tokens coded (two chunks of 128: the second starts at token 128, so positions and the
/// target's token offset are exercised); calibration uses the tokens after them.
const CODED_TOKENS: usize = 256;
const CHUNK_TOKENS: usize = 128;
/// Relative steps (times each tensor's RMS coefficient deviation): coarse to fine.
const STEPS: [f32; 3] = [0.3, 0.1, 0.03];
/// Sinks: none, and a few (the first chunk's leading rows are stored raw).
const SINKS: [u16; 2] = [0, 4];

fn invalid(e: impl std::fmt::Display) -> GpuError {
    GpuError::InvalidArgument(e.to_string())
}

/// The model's fingerprint for the check's chunks.
fn model() -> ModelFingerprint {
    ModelFingerprint::of_bytes(b"kvfetcher gpu transform check")
}

/// The coded KV and a profile calibrated on the tokens after it.
pub fn transform_inputs(kv: &Path, sinks: u16) -> Result<(KvCache, CodecProfile), GpuError> {
    let file = KvFile::read(kv).map_err(invalid)?;
    let cache = &file.cache;
    if cache.tokens() < CODED_TOKENS + 256 {
        return Err(invalid(format!(
            "{} has {} tokens, the check needs {}",
            kv.display(),
            cache.tokens(),
            CODED_TOKENS + 256
        )));
    }
    let coded = cache.slice_tokens(0, CODED_TOKENS).map_err(invalid)?;
    let cal = cache
        .slice_tokens(CODED_TOKENS, cache.tokens())
        .map_err(invalid)?;
    let cfg = Calibration {
        rope: Rope {
            style: RopeStyle::Halves,
            dims: cache.head_dim() as u16,
            base: 10000.0,
            freq_scale: 1.0,
        },
        sinks,
        basis: BasisKind::Pca,
    };
    let profile = calibrate(model(), &[cal], &cfg).map_err(invalid)?;
    Ok((coded, profile))
}

/// Encodes `cache` transform-coded with `profile` at `relative` steps: the chunk objects.
pub fn transform_chunks(
    cache: &KvCache,
    profile: &Arc<CodecProfile>,
    relative: f32,
    chunk_tokens: usize,
    layers_per_section: usize,
) -> Result<(CodecRegistry, Vec<Vec<u8>>), GpuError> {
    let registry = CodecRegistry::software().with_profile(profile.clone());
    let cfg = EncodeConfig {
        quant: QuantConfig::Transform(Arc::new(TransformConfig {
            profile: profile.clone(),
            steps: uniform_steps(profile, relative),
        })),
        variant: VariantKind::Rans,
        chunk_tokens,
        layers_per_section,
        ..EncodeConfig::default()
    };
    let ids: Vec<u32> = (0..cache.tokens() as u32).collect();
    let chunks = encode_cache(cache, &model(), &ids, &cfg, &registry).map_err(invalid)?;
    Ok((registry, chunks.into_iter().map(|(_, o)| o).collect()))
}

/// One tensor (`[tokens][cols]` of `dtype`) placed into `target` as the CPU path places it:
/// each value to f32, then rounded to the target's dtype.
fn place(dtype: DType, data: &[u8], cols: usize, target: &TargetSpec, out: &mut [u8]) {
    let mut values = Vec::new();
    dtype.decode_f32(data, &mut values);
    let size = target.dtype.size();
    for (i, &v) in values.iter().enumerate() {
        let at = target.offset(i / cols, i % cols) * size;
        match target.dtype {
            DType::F16 => out[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes()),
            DType::BF16 => out[at..at + 2].copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
            DType::F32 => out[at..at + 4].copy_from_slice(&v.to_le_bytes()),
        }
    }
}

fn first_diff(t: usize, got: &[u8], want: &[u8], elem: usize) -> Option<String> {
    got.iter().zip(want).position(|(a, b)| a != b).map(|i| {
        let e = i / elem * elem;
        format!(
            "tensor {t} element {}: gpu {:02x?} cpu {:02x?}",
            i / elem,
            &got[e..e + elem],
            &want[e..e + elem]
        )
    })
}

fn row(name: String, values: usize, detail: String) -> CheckRow {
    CheckRow {
        name,
        exact: detail.is_empty(),
        values,
        detail,
    }
}

/// The route's result and the target bytes per tensor after it.
type GpuRestore = (Result<(), GpuError>, Vec<Vec<u8>>);

/// Restores section `index` of `header` (its payload: `payload`) through the kernels into fresh
/// poisoned targets: the route's result and the target bytes per tensor afterwards (poison
/// where nothing was written).
fn gpu_restore(
    cuda: &Arc<Cuda>,
    kernels: &RestoreKernels,
    profile: &DeviceProfile,
    header: &ChunkHeader,
    index: usize,
    payload: &[u8],
    target: &TargetSpec,
) -> Result<GpuRestore, GpuError> {
    let s = &header.sections[index];
    let g = CodeGeometry {
        tensors: s.shape.tensors,
        rows: s.shape.rows,
        cols: s.shape.cols,
    };
    let bytes = target.elements() * target.dtype.size();
    let outs: Vec<DeviceBuffer> = (0..g.tensors)
        .map(|_| cuda.alloc(bytes))
        .collect::<Result<_, _>>()?;
    for o in &outs {
        o.fill(POISON)?;
    }
    let raw: Vec<(u64, usize)> = outs.iter().map(|o| (o.ptr(), o.len())).collect();
    // SAFETY: each pair is a live allocation of `outs`, alive until after the restore below,
    // which synchronises its stream before returning.
    let dt = unsafe { DeviceTarget::for_values(ParamUpload::Now(cuda), g, target, &raw) }?;
    let mut scratch = OwnedScratch::new(cuda)?;
    let section = TransformSection {
        header,
        index,
        payload,
    };
    let result = restore_transform_section(kernels, profile, section, &dt, &mut scratch);
    let mut got = Vec::new();
    for o in &outs {
        let mut b = vec![0u8; bytes];
        o.read(&mut b)?;
        got.push(b);
    }
    Ok((result, got))
}

/// Every transform check (see the module doc).
pub fn run_transform_checks(cuda: &Arc<Cuda>, kv: &Path) -> Result<Vec<CheckRow>, GpuError> {
    let kernels = RestoreKernels::load(cuda)?;
    let mut rows = Vec::new();
    for sinks in SINKS {
        let (cache, profile) = transform_inputs(kv, sinks)?;
        let profile = Arc::new(profile);
        let dprofile = DeviceProfile::upload(cuda, &profile)?;
        for relative in STEPS {
            let (registry, objects) =
                transform_chunks(&cache, &profile, relative, CHUNK_TOKENS, 2)?;
            for (c, object) in objects.iter().enumerate() {
                let view = ChunkView::parse(object).map_err(invalid)?;
                let header = view.header();
                let (heads, d) = (usize::from(header.kv_heads), usize::from(header.head_dim));
                for (i, s) in header.sections.iter().enumerate() {
                    let payload = view.section_bytes(i);
                    let plane = decode_section(header, i, payload, &registry).map_err(invalid)?;
                    let layers = restore_section(header, i, &plane, &registry).map_err(invalid)?;
                    let label = format!(
                        "transform step {relative} sinks {sinks} chunk {c} s{i} ({} sink rows)",
                        header.transform.as_ref().map_or(0, |t| t.sink_tokens)
                    );
                    for target in targets_for(s.shape.rows, heads, d) {
                        let mut want: Vec<Vec<u8>> = Vec::new();
                        for l in &layers {
                            for t in [&l.key, &l.value] {
                                let mut b = vec![POISON; target.elements() * target.dtype.size()];
                                place(header.dtype, t.data(), s.shape.cols, &target, &mut b);
                                want.push(b);
                            }
                        }
                        let name = format!("{label} {}", target_name(&target));
                        let detail = match gpu_restore(
                            cuda, &kernels, &dprofile, header, i, payload, &target,
                        )? {
                            (Err(e), _) => format!("gpu route failed: {e}"),
                            (Ok(()), got) => got
                                .iter()
                                .zip(&want)
                                .enumerate()
                                .find_map(|(t, (g, w))| first_diff(t, g, w, target.dtype.size()))
                                .unwrap_or_default(),
                        };
                        rows.push(row(name, s.shape.len(), detail));
                    }
                }
            }
        }
        // The daemon's route, profile from the registry, placed like a fetch.
        rows.extend(daemon_route_rows(&cache, &profile, sinks)?);
        rows.extend(corrupt_rows(
            cuda, &kernels, &cache, &profile, &dprofile, sinks,
        )?);
    }
    Ok(rows)
}

/// `restore_section_to_device` (the fetch's GPU route) against `place_cache` (its CPU route),
/// for a whole two-chunk sequence in each contiguous and paged layout, f16 and bf16.
fn daemon_route_rows(
    cache: &KvCache,
    profile: &Arc<CodecProfile>,
    sinks: u16,
) -> Result<Vec<CheckRow>, GpuError> {
    let gpus = GpuDevices::new(GpuOptions::default(), Metrics::new());
    let dev = gpus.device(0).map_err(invalid)?;
    let (registry, objects) = transform_chunks(cache, profile, STEPS[1], CHUNK_TOKENS, 1)?;
    let shape = KvShape {
        num_layers: cache.num_layers() as u32,
        tokens: cache.tokens() as u32,
        kv_heads: cache.kv_heads() as u32,
        head_dim: cache.head_dim() as u32,
    };
    let mut rows = Vec::new();
    for order in [TokenOrder::Nhd, TokenOrder::Hnd] {
        for paging in [Paging::Contiguous, Paging::Paged { block_tokens: 16 }] {
            for dtype in [DType::F16, DType::BF16] {
                let layout = TargetLayout {
                    dtype,
                    order,
                    paging,
                    memory: MemoryKind::Gpu(0),
                };
                let len = layout.checked_buffer_len(&shape).map_err(invalid)?;
                let out = dev.cuda().alloc(len)?;
                out.fill(POISON)?;
                let mut want = vec![POISON; len];
                let mut detail = String::new();
                let mut token_start = 0u32;
                for object in &objects {
                    let view = ChunkView::parse(object).map_err(invalid)?;
                    let header = view.header();
                    for i in 0..header.sections.len() {
                        let payload = view.section_bytes(i);
                        if let Err(why) = kernels_apply(header, i, &layout) {
                            detail = format!("kernels_apply refused: {why}");
                            continue;
                        }
                        match restore_section_to_device(
                            &dev,
                            header,
                            i,
                            payload,
                            &registry,
                            &layout,
                            &shape,
                            token_start,
                            &out,
                            true,
                        ) {
                            Ok(Route::Rans) => {}
                            Ok(r) => detail = format!("route {r:?}, not rans"),
                            Err(e) => detail = format!("gpu route failed: {e}"),
                        }
                        let plane =
                            decode_section(header, i, payload, &registry).map_err(invalid)?;
                        let layers =
                            restore_section(header, i, &plane, &registry).map_err(invalid)?;
                        let first = u32::from(header.sections[i].layer_start);
                        place_cache(&layout, &shape, first, token_start, &layers, &mut |o, b| {
                            want[o..o + b.len()].copy_from_slice(b);
                            Ok::<(), LayoutIoError>(())
                        })
                        .map_err(invalid)?;
                    }
                    token_start += header.token_count;
                }
                let mut got = vec![0u8; len];
                out.read(&mut got)?;
                if detail.is_empty() {
                    detail = first_diff(0, &got, &want, dtype.size()).unwrap_or_default();
                }
                rows.push(row(
                    format!(
                        "transform daemon route sinks {sinks} {order:?}-{}-{}",
                        match paging {
                            Paging::Contiguous => "contig",
                            _ => "paged",
                        },
                        dtype.name()
                    ),
                    len / dtype.size(),
                    detail,
                ));
            }
        }
    }
    // A registry without the profile: the typed error the CPU path gives.
    let view = ChunkView::parse(&objects[0]).map_err(invalid)?;
    let layout = TargetLayout {
        dtype: DType::F16,
        order: TokenOrder::Nhd,
        paging: Paging::Contiguous,
        memory: MemoryKind::Gpu(0),
    };
    let out = dev
        .cuda()
        .alloc(layout.checked_buffer_len(&shape).map_err(invalid)?)?;
    let r = restore_section_to_device(
        &dev,
        view.header(),
        0,
        view.section_bytes(0),
        &CodecRegistry::software(),
        &layout,
        &shape,
        0,
        &out,
        true,
    );
    let detail = match r {
        Err(GpuError::Format(kvfetcher_codec::FormatError::ProfileMissing(_))) => String::new(),
        other => format!("want ProfileMissing, got {other:?}"),
    };
    rows.push(row(
        format!("transform daemon route sinks {sinks} missing profile refused"),
        0,
        detail,
    ));
    Ok(rows)
}

/// Flips a byte in a block's words (crc fixed up so the decoder sees it) for a sample of
/// blocks: each must be flagged, the engine's buffer left as it was (poison), unless the flip
/// happens to decode on the CPU too (then the GPU must equal the CPU).
fn corrupt_rows(
    cuda: &Arc<Cuda>,
    kernels: &RestoreKernels,
    cache: &KvCache,
    profile: &Arc<CodecProfile>,
    dprofile: &DeviceProfile,
    sinks: u16,
) -> Result<Vec<CheckRow>, GpuError> {
    let (registry, objects) = transform_chunks(cache, profile, STEPS[1], CHUNK_TOKENS, 2)?;
    let object = &objects[0];
    let view = ChunkView::parse(object).map_err(invalid)?;
    let header = view.header();
    let s = &header.sections[0];
    let payload = view.section_bytes(0);
    let plan = RansPlan::parse(s.shape, &s.params, payload)?;
    let target = &targets_for(
        s.shape.rows,
        usize::from(header.kv_heads),
        usize::from(header.head_dim),
    )[0];
    let (mut flagged, mut tried, mut detail) = (0, 0, String::new());
    // A block without words has no byte to flip.
    let with_words: Vec<_> = plan.blocks.iter().filter(|b| b.n_words > 0).collect();
    for blk in with_words
        .iter()
        .step_by(with_words.len().div_ceil(6).max(1))
    {
        let mut bad = payload.to_vec();
        let at = blk.words as usize + blk.n_words as usize;
        bad[at] ^= 0x5a;
        let mut h = header.clone();
        h.sections[0].crc32c = crc32c::crc32c(&bad);
        tried += 1;
        let cpu = decode_section(&h, 0, &bad, &registry);
        let (r, got) = gpu_restore(cuda, kernels, dprofile, &h, 0, &bad, target)?;
        match (r, cpu) {
            (Err(GpuError::Format(_)), Err(_)) => {
                flagged += 1;
                if got.iter().flatten().any(|&x| x != POISON) {
                    detail = "flagged, but the target was written".into();
                }
            }
            (Ok(()), Ok(_)) => {}
            (Err(e), Ok(_)) => detail = format!("gpu refused what the cpu decodes: {e}"),
            (Ok(()), Err(e)) => detail = format!("gpu accepted what the cpu refuses: {e}"),
            (Err(e), Err(_)) => detail = format!("wrong error type: {e}"),
        }
    }
    if flagged == 0 && detail.is_empty() {
        detail = format!("none of {tried} corrupt streams was flagged");
    }
    Ok(vec![row(
        format!(
            "transform corrupt words sinks {sinks} ({flagged}/{tried} flagged, target untouched)"
        ),
        tried,
        detail,
    )])
}
