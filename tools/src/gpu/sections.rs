//! NVDEC on the codec's own HEVC sections: fixtures written by `kvfetcher_codec::HevcEncoder`
//! (every layout and bit width, lossless, and lossy at a few QPs) and checks that NVDEC, through [`CodecHevcLayout`], gives the
//! codes libde265 gives, and that the restore kernels (from codes and straight from the decoded
//! surfaces) give what `kvfetcher_codec::restore_section` gives, to the bit.
//!
//! Fixtures are chunk objects (`sec-<layout>-<bits>[-qp<N>].kvc`) plus the libde265 codes of
//! each section (`sec-<layout>-<bits>[-qp<N>].codes.zst`, u16 little-endian, sections in order). The gather
//! table for the surface restore is the daemon's (`kvfetcher::gpu::gather_table`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvfetcher_codec::{
    decode_section, encode_cache, restore_section, ChunkHeader, ChunkView, CodePlane,
    CodecRegistry, EncodeConfig, Grouping, HevcEncoder, HevcParams, ModelFingerprint, QuantConfig,
    SectionDecoder, VariantKind,
};
use kvfetcher_kv::KvFile;
use kvfetcher_protocol::TokenOrder;

use kvfetcher::gpu::GpuError;
use kvfetcher::gpu::{gather_table, run_gather};
use kvfetcher::gpu::{CodecHevcLayout, NvdecHevcDecoder};
use kvfetcher::gpu::{Cuda, DeviceBuffer};
use kvfetcher::gpu::{FrameFormat, Nvdec};

use super::check::CheckRow;
use kvfetcher::gpu::{
    CodeGeometry, Dequant, DeviceGather, DeviceTarget, RestoreKernels, TargetSpec,
};

/// The codec layouts covered.
pub const SECTION_LAYOUTS: [&str; 4] = ["rows", "rows420", "frames", "frames420"];
/// The code widths covered.
pub const SECTION_BITS: [u8; 4] = [4, 8, 10, 12];
/// Tokens of the real-KV slice (the first chunk of the KV file).
pub const SECTION_TOKENS: usize = 128;
/// Layers per section.
pub const SECTION_LAYERS: usize = 2;

fn invalid(e: impl std::fmt::Display) -> GpuError {
    GpuError::InvalidArgument(e.to_string())
}

fn io(path: &Path, e: std::io::Error) -> GpuError {
    GpuError::InvalidArgument(format!("{}: {e}", path.display()))
}

/// Lossy HEVC fixtures (layout, bits, x265 QP): NVDEC must give libde265's codes for these
/// too (both are conforming decoders), so lossy sections restore the same on GPU and CPU.
pub const SECTION_LOSSY: [(&str, u8, u8); 4] = [
    ("rows", 8, 24),
    ("rows420", 8, 12),
    ("frames", 10, 30),
    ("frames420", 12, 36),
];

/// Every fixture: (layout, bits, qp), qp 0 for the lossless ones.
fn section_specs() -> Vec<(&'static str, u8, u8)> {
    SECTION_LAYOUTS
        .iter()
        .flat_map(|&l| SECTION_BITS.iter().map(move |&b| (l, b, 0)))
        .chain(SECTION_LOSSY)
        .collect()
}

/// The chunk object and codes file of one (layout, bits, qp) fixture.
pub fn section_paths(dir: &Path, layout: &str, bits: u8, qp: u8) -> (PathBuf, PathBuf) {
    let name = if qp == 0 {
        format!("sec-{layout}-{bits}")
    } else {
        format!("sec-{layout}-{bits}-qp{qp}")
    };
    (
        dir.join(format!("{name}.kvc")),
        dir.join(format!("{name}.codes.zst")),
    )
}

/// Encodes the first [`SECTION_TOKENS`] tokens of `kv` with the codec's HEVC encoder for every
/// layout and bit width (and the lossy [`SECTION_LOSSY`] settings), decodes each section with
/// libde265 and writes both into `dir`. Needs libx265 and libde265 (the development host).
pub fn write_section_fixtures(kv: &Path, dir: &Path) -> Result<Vec<PathBuf>, GpuError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let file = KvFile::read(kv).map_err(invalid)?;
    let cache = file
        .cache
        .slice_tokens(0, SECTION_TOKENS.min(file.cache.tokens()))
        .map_err(invalid)?;
    let ids: Vec<u32> = (0..cache.tokens() as u32).collect();
    let model = ModelFingerprint::of_bytes(b"kvfetcher gpu section fixtures");
    let mut written = Vec::new();
    for (layout, bits, qp) in section_specs() {
        let encoder = HevcEncoder::new(Some(layout))
            .and_then(|e| e.with_qp(qp))
            .map_err(invalid)?;
        let registry = CodecRegistry::standard().with(VariantKind::Hevc, Arc::new(encoder));
        let cfg = EncodeConfig {
            quant: QuantConfig::bits(bits),
            variant: VariantKind::Hevc,
            hevc_layout: None,
            hevc_stream_frames: None,
            chunk_tokens: cache.tokens(),
            layers_per_section: SECTION_LAYERS,
        };
        let chunks = encode_cache(&cache, &model, &ids, &cfg, &registry).map_err(invalid)?;
        let (_, object) = chunks
            .into_iter()
            .next()
            .ok_or_else(|| invalid("no chunk encoded"))?;
        let view = ChunkView::parse(&object).map_err(invalid)?;
        let header = view.header();
        let mut codes = Vec::new();
        for i in 0..header.sections.len() {
            let plane =
                decode_section(header, i, view.section_bytes(i), &registry).map_err(invalid)?;
            codes.extend(plane.codes.iter().flat_map(|c| c.to_le_bytes()));
        }
        let (obj_path, codes_path) = section_paths(dir, layout, bits, qp);
        std::fs::write(&obj_path, &object).map_err(|e| io(&obj_path, e))?;
        let z = zstd::encode_all(&codes[..], 3).map_err(|e| io(&codes_path, e))?;
        std::fs::write(&codes_path, z).map_err(|e| io(&codes_path, e))?;
        written.push(obj_path);
        written.push(codes_path);
    }
    Ok(written)
}

/// The restore inputs of section `i`: geometry, scales/mins (per channel only) and the NHD
/// contiguous target that `restore_section`'s tensors are laid out in.
fn section_target(
    header: &ChunkHeader,
    i: usize,
) -> Result<(CodeGeometry, Dequant, TargetSpec), GpuError> {
    let s = &header.sections[i];
    if header.key_grouping != Grouping::PerChannel || header.value_grouping != Grouping::PerChannel
    {
        return Err(invalid("only per-channel fixtures are checked"));
    }
    let tokens = header.token_count as usize;
    let (heads, head_dim) = (usize::from(header.kv_heads), usize::from(header.head_dim));
    let (mut scales, mut mins) = (Vec::new(), Vec::new());
    for q in &s.quant {
        for p in [&q.key, &q.value] {
            scales.extend_from_slice(&p.scale);
            mins.extend_from_slice(&p.min);
        }
    }
    let geometry = CodeGeometry {
        tensors: 2 * s.layers(),
        rows: tokens,
        cols: heads * head_dim,
    };
    let target = TargetSpec {
        layout: TokenOrder::Nhd,
        dtype: header.dtype,
        heads,
        head_dim,
        token_offset: 0,
        target_tokens: tokens,
        paged: None,
    };
    Ok((
        geometry,
        Dequant {
            grouping: Grouping::PerChannel,
            scales,
            mins,
        },
        target,
    ))
}

fn first_diff(got: &[u16], want: &[u16]) -> String {
    if got.len() != want.len() {
        return format!("{} codes, want {}", got.len(), want.len());
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => format!("code {i}: nvdec {} want {}", got[i], want[i]),
        None => String::new(),
    }
}

/// Runs `run` into fresh poisoned targets and compares every tensor with `want` (K, V per
/// layer, as `restore_section` returns them).
fn compare_with(
    cuda: &Arc<Cuda>,
    g: CodeGeometry,
    dequant: &Dequant,
    target: &TargetSpec,
    want: &[&[u8]],
    run: &dyn Fn(&DeviceTarget) -> Result<(), GpuError>,
) -> Result<String, GpuError> {
    let bytes = target.elements() * target.dtype.size();
    let outs: Vec<DeviceBuffer> = (0..g.tensors)
        .map(|_| cuda.alloc(bytes))
        .collect::<Result<_, _>>()?;
    for o in &outs {
        o.fill(0xA5)?;
    }
    let refs: Vec<&DeviceBuffer> = outs.iter().collect();
    let dt = DeviceTarget::new(cuda, g, dequant, target, &refs)?;
    run(&dt)?;
    cuda.synchronize()?;
    let mut got = vec![0u8; bytes];
    for (t, o) in outs.iter().enumerate() {
        o.read(&mut got)?;
        if got.len() != want[t].len() {
            return Ok(format!(
                "tensor {t}: {} bytes, want {}",
                got.len(),
                want[t].len()
            ));
        }
        if let Some(i) = got.iter().zip(want[t]).position(|(a, b)| a != b) {
            return Ok(format!(
                "tensor {t} byte {i}: gpu {} cpu {}",
                got[i], want[t][i]
            ));
        }
    }
    Ok(String::new())
}

fn row(name: String, values: usize, detail: String) -> CheckRow {
    CheckRow {
        name,
        exact: detail.is_empty(),
        values,
        detail,
    }
}

/// Checks every section fixture in `dir`: NVDEC codes against libde265's, then the restore
/// kernels (from NVDEC's codes, and from the surfaces through the gather table) against
/// `restore_section`.
pub fn run_section_checks(cuda: &Arc<Cuda>, dir: &Path) -> Result<Vec<CheckRow>, GpuError> {
    let kernels = RestoreKernels::load(cuda)?;
    let stream = cuda.stream()?;
    let decoder = NvdecHevcDecoder::new(cuda.clone(), CodecHevcLayout, Some(1))?;
    let nvdec = Nvdec::open(cuda.clone())?;
    let mut session = nvdec.session()?;
    let mut rows = Vec::new();
    for (layout, bits, qp) in section_specs() {
        let (obj_path, codes_path) = section_paths(dir, layout, bits, qp);
        let object = std::fs::read(&obj_path).map_err(|e| io(&obj_path, e))?;
        let z = std::fs::read(&codes_path).map_err(|e| io(&codes_path, e))?;
        let raw = zstd::decode_all(&z[..]).map_err(|e| io(&codes_path, e))?;
        let cpu_codes: Vec<u16> = raw
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let view = ChunkView::parse(&object).map_err(invalid)?;
        view.verify().map_err(invalid)?;
        let header = view.header();
        let mut at = 0;
        for (i, s) in header.sections.iter().enumerate() {
            let label = if qp == 0 {
                format!("section {layout} {bits}-bit s{i}")
            } else {
                format!("section {layout} {bits}-bit qp{qp} s{i}")
            };
            let n = s.shape.len();
            let want_codes = cpu_codes
                .get(at..at + n)
                .ok_or_else(|| invalid("codes file too short"))?;
            at += n;
            let payload = view.section_bytes(i);
            // 1. NVDEC through the codec's layout adapter vs libde265.
            let plane = match decoder.decode(s.shape, &s.params, payload) {
                Ok(p) => p,
                Err(e) => {
                    rows.push(row(format!("nvdec {label}"), 0, e.to_string()));
                    continue;
                }
            };
            rows.push(row(
                format!("nvdec {label}"),
                n,
                first_diff(&plane.codes, want_codes),
            ));
            // 2. restore from NVDEC's codes vs the codec's CPU restore of libde265's codes.
            let cpu_plane = CodePlane {
                shape: s.shape,
                codes: want_codes.to_vec(),
            };
            let layers = restore_section(header, i, &cpu_plane, &CodecRegistry::software())
                .map_err(invalid)?;
            let want: Vec<&[u8]> = layers
                .iter()
                .flat_map(|l| [l.key.data(), l.value.data()])
                .collect();
            let (g, dequant, target) = section_target(header, i)?;
            let dcodes = cuda.upload(&plane.codes)?;
            let detail = compare_with(cuda, g, &dequant, &target, &want, &|dt| {
                kernels.restore_codes(&dcodes, dt, &stream)
            })?;
            rows.push(row(format!("restore codes {label}"), n, detail));
            // 3. restore straight from NVDEC surfaces through the codec's gather table.
            let p = HevcParams::from_bytes(&s.params).map_err(invalid)?;
            let streams = p.split(payload).map_err(invalid)?;
            if streams.len() != 1 {
                rows.push(row(
                    format!("restore surfaces {label}"),
                    0,
                    format!("{} streams (one expected)", streams.len()),
                ));
                continue;
            }
            let hg = p.geometry;
            let fmt = FrameFormat::of_geometry(&hg);
            let surf = cuda.alloc(hg.frames * fmt.surface_bytes_per_frame())?;
            let dev = session.decode_to_device(streams[0], &surf, 0)?;
            // The per-code table and the per-group and per-row ones (the daemon uses the
            // coarsest the layout allows).
            let table = gather_table(&hg)?;
            let mut gathers = vec![("per-code gather", DeviceGather::upload(cuda, &table, 1)?)];
            for (how, run) in [("per-group gather", 8), ("per-row gather", hg.shape.cols)] {
                if let Some(runs) = run_gather(&table, run) {
                    gathers.push((how, DeviceGather::upload(cuda, &runs, run)?));
                }
            }
            for (how, gather) in &gathers {
                let detail = compare_with(cuda, g, &dequant, &target, &want, &|dt| {
                    kernels.restore_frames(&dev, Some(gather), dt, &stream)
                })?;
                rows.push(row(format!("restore surfaces {label} ({how})"), n, detail));
            }
        }
    }
    Ok(rows)
}
