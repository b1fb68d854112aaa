//! GPU self-tests on real KV: NVDEC output against the codes that were encoded, and every
//! restore kernel against [`restore_cpu`] to the bit.
//!
//! Runs on a GPU host (`kvfetcher-bench gpu check`); returns one [`CheckRow`] per comparison so the
//! caller can print a table. A mismatch is a failed row, not an error.

use std::path::Path;
use std::sync::Arc;

use super::fixture::{self, KvCodes, FIXTURE_FORMATS};
use kvfetcher_codec::pack_codes;
use kvfetcher_protocol::{DType, TokenOrder};

use kvfetcher::gpu::GpuError;
use kvfetcher::gpu::Nvdec;
use kvfetcher::gpu::{restore_cpu, DeviceTarget, RestoreKernels, TargetSpec};
use kvfetcher::gpu::{Cuda, DeviceBuffer};

/// One comparison's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRow {
    /// What was compared, e.g. "nvdec 444 10-bit".
    pub name: String,
    /// Whether the outputs were identical.
    pub exact: bool,
    /// How many values were compared.
    pub values: usize,
    /// The first mismatch, if any.
    pub detail: String,
}

/// Every target the restore checks cover: {NHD, HND} x {contiguous, paged} x {f16, bf16, f32}.
pub fn targets(codes: &KvCodes) -> Vec<TargetSpec> {
    targets_for(codes.geometry.rows, codes.heads, codes.head_dim)
}

/// [`targets`] for `rows` tokens of `heads` x `head_dim`: contiguous targets start at token 5,
/// paged ones use a scrambled block table.
pub fn targets_for(rows: usize, heads: usize, head_dim: usize) -> Vec<TargetSpec> {
    let block = 16;
    let blocks = rows.div_ceil(block) + 1;
    // A scrambled block table (a permutation of 1..=blocks, block 0 unused) as a paged engine has.
    let table: Vec<i32> = (0..blocks - 1)
        .map(|b| (1 + (b * 37) % (blocks - 1)) as i32)
        .collect();
    let mut out = Vec::new();
    for layout in [TokenOrder::Nhd, TokenOrder::Hnd] {
        for paged in [false, true] {
            for dtype in [DType::F16, DType::BF16, DType::F32] {
                out.push(TargetSpec {
                    layout,
                    dtype,
                    heads,
                    head_dim,
                    token_offset: if paged { 0 } else { 5 },
                    target_tokens: rows + 7,
                    paged: paged.then(|| (block, table.clone())),
                });
            }
        }
    }
    out
}

/// A short name for a target.
pub fn target_name(t: &TargetSpec) -> String {
    format!(
        "{}-{}-{}",
        if t.layout == TokenOrder::Nhd {
            "NHD"
        } else {
            "HND"
        },
        if t.paged.is_some() { "paged" } else { "contig" },
        t.dtype.name()
    )
}

/// Poison byte written into every target before a restore: unwritten elements then differ.
pub(crate) const POISON: u8 = 0xA5;

/// Restores through `run` into fresh poisoned device targets and compares with the CPU.
fn compare_restore(
    cuda: &Arc<Cuda>,
    codes: &KvCodes,
    target: &TargetSpec,
    run: &dyn Fn(&DeviceTarget) -> Result<(), GpuError>,
) -> Result<(bool, usize, String), GpuError> {
    let g = codes.geometry;
    let bytes = target.elements() * target.dtype.size();
    let outs: Vec<DeviceBuffer> = (0..g.tensors)
        .map(|_| cuda.alloc(bytes))
        .collect::<Result<_, _>>()?;
    for o in &outs {
        o.fill(POISON)?;
    }
    let refs: Vec<&DeviceBuffer> = outs.iter().collect();
    let dt = DeviceTarget::new(cuda, g, &codes.dequant, target, &refs)?;
    run(&dt)?;
    cuda.synchronize()?;
    let mut want: Vec<Vec<u8>> = (0..g.tensors).map(|_| vec![POISON; bytes]).collect();
    restore_cpu(g, &codes.codes, &codes.dequant, target, &mut want)?;
    let mut got = vec![0u8; bytes];
    for (t, o) in outs.iter().enumerate() {
        o.read(&mut got)?;
        if let Some(i) = got.iter().zip(&want[t]).position(|(a, b)| a != b) {
            return Ok((
                false,
                g.len(),
                format!("tensor {t} byte {i}: gpu {} cpu {}", got[i], want[t][i]),
            ));
        }
    }
    Ok((true, g.len(), String::new()))
}

/// Runs every check: NVDEC against the encoded codes (all fixture formats), restore from
/// decoded surfaces, restore from u16 codes and from packed codes, against the CPU.
pub fn run_checks(cuda: &Arc<Cuda>, kv: &Path, fixtures: &Path) -> Result<Vec<CheckRow>, GpuError> {
    let kernels = RestoreKernels::load(cuda)?;
    let stream = cuda.stream()?;
    let mut rows = Vec::new();
    let load =
        |bits| fixture::kv_codes(kv, bits).map_err(|e| GpuError::InvalidArgument(e.to_string()));
    let nvdec = Nvdec::open(cuda.clone());
    for (chroma, bits) in FIXTURE_FORMATS {
        let codes = load(bits)?;
        let path = fixture::fixture_path(fixtures, chroma, bits, None);
        let stream_bytes = std::fs::read(&path)
            .map_err(|e| GpuError::InvalidArgument(format!("{}: {e}", path.display())))?;
        let label = format!("{} {bits}-bit", chroma.name());
        let nvdec = match &nvdec {
            Ok(n) => n,
            Err(e) => {
                rows.push(CheckRow {
                    name: format!("nvdec {label}"),
                    exact: false,
                    values: 0,
                    detail: e.to_string(),
                });
                continue;
            }
        };
        let mut session = nvdec.session()?;
        // Host output: every sample equals the code encoded there, padding equals zero.
        let host = session.decode_to_host(&stream_bytes)?;
        let fmt = fixture::fixture_format(chroma, bits);
        let frames = fixture::frames_for(fmt, codes.codes.len());
        let mut detail = String::new();
        if host.format != fmt || host.frames != frames {
            detail = format!(
                "decoded {:?} x{} frames, want {:?} x{frames}",
                host.format, host.frames, fmt
            );
        } else if let Some(i) = (0..host.samples.len())
            .find(|&i| host.samples[i] != codes.codes.get(i).copied().unwrap_or(0))
        {
            detail = format!(
                "sample {i}: nvdec {} want {}",
                host.samples[i],
                codes.codes.get(i).copied().unwrap_or(0)
            );
        }
        rows.push(CheckRow {
            name: format!("nvdec {label}"),
            exact: detail.is_empty(),
            values: host.samples.len(),
            detail,
        });
        // Device output -> restore kernel straight from the surfaces.
        let surf = cuda.alloc(frames * fmt.surface_bytes_per_frame())?;
        let dev = session.decode_to_device(&stream_bytes, &surf, 0)?;
        for target in targets(&codes)
            .iter()
            .filter(|t| t.dtype == DType::BF16 || bits == 8)
        {
            let (exact, values, detail) = compare_restore(cuda, &codes, target, &|dt| {
                kernels.restore_frames(&dev, None, dt, &stream)
            })?;
            rows.push(CheckRow {
                name: format!("restore frames {label} {}", target_name(target)),
                exact,
                values,
                detail,
            });
        }
    }
    // u16 codes and packed codes, every target.
    for bits in [4u8, 5, 8, 12] {
        let codes = load(bits)?;
        let dcodes = cuda.upload(&codes.codes)?;
        let packed = pack_codes(&codes.codes, bits);
        let dpacked = cuda.upload(&packed)?;
        for target in targets(&codes) {
            let (exact, values, detail) = compare_restore(cuda, &codes, &target, &|dt| {
                kernels.restore_codes(&dcodes, dt, &stream)
            })?;
            rows.push(CheckRow {
                name: format!("restore codes {bits}-bit {}", target_name(&target)),
                exact,
                values,
                detail,
            });
            let (exact, values, detail) = compare_restore(cuda, &codes, &target, &|dt| {
                kernels.restore_packed(&dpacked, bits, dt, &stream)
            })?;
            rows.push(CheckRow {
                name: format!("restore packed {bits}-bit {}", target_name(&target)),
                exact,
                values,
                detail,
            });
        }
    }
    Ok(rows)
}
