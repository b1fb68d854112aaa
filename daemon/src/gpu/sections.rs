//! NVDEC on the codec's own HEVC sections: fixtures written by `kvfetcher_codec::HevcEncoder`
//! (every layout and bit width) and checks that NVDEC, through [`CodecHevcLayout`], gives the
//! codes libde265 gives, and that the restore kernels (from codes and straight from the decoded
//! surfaces) give what `kvfetcher_codec::restore_section` gives, to the bit.
//!
//! Fixtures are chunk objects (`sec-<layout>-<bits>.kvc`) plus the libde265 codes of each
//! section (`sec-<layout>-<bits>.codes.zst`, u16 little-endian, sections in order). The gather
//! table for the surface restore comes from `HevcGeometry::codes_from_frame` fed with sample
//! indices, so this module holds no layout math.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvfetcher_codec::{
    decode_section, encode_cache, restore_section, ChunkHeader, ChunkView, CodePlane,
    CodecRegistry, EncodeConfig, Frame, Grouping, HevcGeometry, HevcParams, ModelFingerprint,
    QuantConfig, SectionDecoder, VariantKind,
};
use kvfetcher_kv::{DType, KvFile};

use super::check::CheckRow;
use super::cuda::{Cuda, DeviceBuffer};
use super::hevc_backend::{CodecHevcLayout, NvdecHevcDecoder};
use super::nvdec::{FrameFormat, Nvdec};
use super::restore::{
    CodeGeometry, Dequant, DeviceGather, DeviceTarget, KvDtype, KvLayout, QuantGrouping,
    RestoreKernels, TargetSpec,
};
use super::GpuError;

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

/// The chunk object and codes file of one (layout, bits) fixture.
pub fn section_paths(dir: &Path, layout: &str, bits: u8) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("sec-{layout}-{bits}.kvc")),
        dir.join(format!("sec-{layout}-{bits}.codes.zst")),
    )
}

/// Encodes the first [`SECTION_TOKENS`] tokens of `kv` with the codec's HEVC encoder for every
/// layout and bit width, decodes each section with libde265 and writes both into `dir`.
/// Needs libx265 and libde265 (the development host).
pub fn write_section_fixtures(kv: &Path, dir: &Path) -> Result<Vec<PathBuf>, GpuError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let file = KvFile::read(kv).map_err(invalid)?;
    let cache = file
        .cache
        .slice_tokens(0, SECTION_TOKENS.min(file.cache.tokens()))
        .map_err(invalid)?;
    let ids: Vec<u32> = (0..cache.tokens() as u32).collect();
    let model = ModelFingerprint::of_bytes(b"kvfetcher gpu section fixtures");
    let registry = CodecRegistry::standard();
    let mut written = Vec::new();
    for layout in SECTION_LAYOUTS {
        for bits in SECTION_BITS {
            let cfg = EncodeConfig {
                quant: QuantConfig::bits(bits),
                variant: VariantKind::Hevc,
                hevc_layout: Some(layout.into()),
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
            let (obj_path, codes_path) = section_paths(dir, layout, bits);
            std::fs::write(&obj_path, &object).map_err(|e| io(&obj_path, e))?;
            let z = zstd::encode_all(&codes[..], 3).map_err(|e| io(&codes_path, e))?;
            std::fs::write(&codes_path, z).map_err(|e| io(&codes_path, e))?;
            written.push(obj_path);
            written.push(codes_path);
        }
    }
    Ok(written)
}

/// The code-index -> planar-sample-index table of a geometry (samples numbered as in
/// `HostFrames`: frame by frame, Y then U then V). Built by feeding
/// [`HevcGeometry::codes_from_frame`] frames whose samples carry their own index, `bits` bits at
/// a time, so the mapping is the codec's own.
pub fn gather_table(g: &HevcGeometry) -> Result<Vec<u32>, GpuError> {
    let bits = u32::from(g.shape.bits);
    let spf = g.samples_per_frame();
    let total = g.frames * spf;
    let digits = (usize::BITS - total.leading_zeros()).div_ceil(bits).max(1);
    let mask = (1usize << bits) - 1;
    let sizes: Vec<usize> = (0..3)
        .map(|c| {
            let (w, h) = g.plane_size(c);
            w * h
        })
        .collect();
    let mut table = vec![0u32; g.shape.len()];
    let mut seen = vec![false; g.shape.len()];
    let mut tmp = vec![u16::MAX; g.shape.len()];
    for f in 0..g.frames {
        for d in 0..digits {
            let shift = d * bits;
            let mut next = f * spf;
            let planes = [0, 1, 2].map(|c| {
                (0..sizes[c])
                    .map(|_| {
                        let v = ((next >> shift) & mask) as u16;
                        next += 1;
                        v
                    })
                    .collect::<Vec<u16>>()
            });
            tmp.fill(u16::MAX);
            g.codes_from_frame(f, &Frame { planes }, &mut tmp)
                .map_err(invalid)?;
            for (i, &v) in tmp.iter().enumerate() {
                if v != u16::MAX {
                    table[i] |= u32::from(v) << shift;
                    seen[i] = true;
                }
            }
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(invalid(format!("code {i} lies in no frame")));
    }
    Ok(table)
}

/// The run form of a gather `table`: the first sample index of each aligned run of `run` codes
/// (a multiple of 8), when every run's samples are consecutive. The codec's layouts keep each
/// row of codes in one piece, so a table per row (`run` = columns) is 1/cols of the per-code
/// one: the threads of a row share one cached entry and read their samples with one load per 8.
pub fn run_gather(table: &[u32], run: usize) -> Option<Vec<u32>> {
    if run == 0 || !run.is_multiple_of(8) || !table.len().is_multiple_of(run) {
        return None;
    }
    let consecutive = |c: &[u32]| (1..run).all(|j| c[0].checked_add(j as u32) == Some(c[j]));
    table
        .chunks_exact(run)
        .map(|c| consecutive(c).then_some(c[0]))
        .collect()
}

/// The codec's gather table for `g` on the device: per row of codes, per group of 8 codes, or
/// per code, the first form the layout allows.
pub fn device_gather(cuda: &Arc<Cuda>, g: &HevcGeometry) -> Result<DeviceGather, GpuError> {
    let table = gather_table(g)?;
    for run in [g.shape.cols, 8] {
        if let Some(runs) = run_gather(&table, run) {
            return DeviceGather::upload(cuda, &runs, run);
        }
    }
    DeviceGather::upload(cuda, &table, 1)
}

fn kv_dtype(d: DType) -> Result<KvDtype, GpuError> {
    match d {
        DType::F16 => Ok(KvDtype::F16),
        DType::BF16 => Ok(KvDtype::Bf16),
        DType::F32 => Ok(KvDtype::F32),
        #[allow(unreachable_patterns)]
        other => Err(invalid(format!("dtype {other:?}"))),
    }
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
        layout: KvLayout::Nhd,
        dtype: kv_dtype(header.dtype)?,
        heads,
        head_dim,
        token_offset: 0,
        target_tokens: tokens,
        paged: None,
    };
    Ok((
        geometry,
        Dequant {
            grouping: QuantGrouping::PerChannel,
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
    for layout in SECTION_LAYOUTS {
        for bits in SECTION_BITS {
            let (obj_path, codes_path) = section_paths(dir, layout, bits);
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
                let label = format!("section {layout} {bits}-bit s{i}");
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
                let layers = restore_section(header, i, &cpu_plane).map_err(invalid)?;
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
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfetcher_codec::{LayoutSpec, PlaneShape};

    /// The gather table picks, for every code, the sample the codec's own frames put it in.
    /// A section's geometry in `layout`: 4 tensors of 128 x 256 codes of `bits` bits.
    fn geometry(layout: &str, bits: u8) -> HevcGeometry {
        let shape = PlaneShape {
            tensors: 4,
            rows: 128,
            cols: 256,
            bits,
        };
        let spec: LayoutSpec = layout.parse().expect("layout");
        HevcGeometry::new(shape, &spec).expect("geometry")
    }

    #[test]
    fn gather_table_inverts_the_codec_layout() {
        for layout in SECTION_LAYOUTS {
            let g = geometry(layout, 4);
            let shape = g.shape;
            let codes: Vec<u16> = (0..shape.len()).map(|i| ((i * 7) % 16) as u16).collect();
            let plane = CodePlane { shape, codes };
            let samples: Vec<u16> = g
                .frames_from_codes(&plane)
                .expect("frames")
                .into_iter()
                .flat_map(|f| f.planes.into_iter().flatten())
                .collect();
            let table = gather_table(&g).expect("table");
            for (i, &s) in table.iter().enumerate() {
                assert_eq!(samples[s as usize], plane.codes[i], "{layout} code {i}");
            }
        }
    }

    /// The codec's layouts keep each row of codes in consecutive samples, so the daemon reads
    /// one table entry per row; a table that breaks a run falls back to a finer form.
    #[test]
    fn codec_layouts_gather_per_row_and_per_group() {
        for layout in SECTION_LAYOUTS {
            let g = geometry(layout, 8);
            let table = gather_table(&g).expect("table");
            for run in [8, g.shape.cols] {
                let runs =
                    run_gather(&table, run).unwrap_or_else(|| panic!("{layout}: no runs of {run}"));
                assert_eq!(runs.len() * run, table.len());
                for (i, &s) in table.iter().enumerate() {
                    assert_eq!(runs[i / run] + (i % run) as u32, s, "{layout} code {i}");
                }
            }
        }
        let identity: Vec<u32> = (0..64).collect();
        assert_eq!(
            run_gather(&identity, 8),
            Some((0..8).map(|g| 8 * g).collect())
        );
        assert_eq!(run_gather(&identity, 32), Some(vec![0, 32]));
        let mut broken = identity.clone();
        broken.swap(9, 10);
        assert_eq!(run_gather(&broken, 8), None);
        assert_eq!(run_gather(&broken, 64), None);
        let mut seam = identity.clone();
        seam[32..].iter_mut().for_each(|s| *s += 100);
        assert_eq!(run_gather(&seam, 32), Some(vec![0, 132]));
        assert_eq!(run_gather(&seam, 64), None, "a run that jumps");
        assert_eq!(run_gather(&identity[..12], 8), None, "not whole runs");
        assert_eq!(
            run_gather(&identity, 12),
            None,
            "runs are whole groups of 8"
        );
        assert_eq!(run_gather(&identity, 0), None);
        assert_eq!(
            run_gather(&[u32::MAX - 3; 8], 8),
            None,
            "overflow is no run"
        );
    }
}
