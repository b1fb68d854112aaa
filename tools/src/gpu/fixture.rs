//! Test fixtures for the GPU path: real KV quantized to codes, laid into HEVC frames in raster
//! order and encoded with the `x265` command-line tool: losslessly, or at a constant QP for the
//! interference benchmark's lossy NVDEC tenant.
//!
//! The raster layout (code `i` is planar sample `i`: frame by frame, Y then U then V, padded with
//! zeros) exists only to prove NVDEC and the restore kernels on real KV without the HEVC
//! variant's geometry; chunk objects use `kvfetcher_codec`'s layouts. Encoding runs where x265 is
//! installed (the development machine); the GPU host only decodes.

use std::path::{Path, PathBuf};
use std::process::Command;

use kvfetcher_codec::{quantize, Chroma, Grouping};
use kvfetcher_kv::KvFile;

use kvfetcher::gpu::FrameFormat;
use kvfetcher::gpu::{CodeGeometry, Dequant};

/// Frame width and height of the fixtures: a size every NVDEC accepts (>= 144) and that
/// x265 needs no padding for (a multiple of 8).
pub const FIXTURE_SIZE: usize = 512;

/// The (chroma, bit depth) pairs NVDEC decodes losslessly (DESIGN.md section 2).
pub const FIXTURE_FORMATS: [(Chroma, u8); 6] = [
    (Chroma::Yuv420, 8),
    (Chroma::Yuv420, 10),
    (Chroma::Yuv420, 12),
    (Chroma::Yuv444, 8),
    (Chroma::Yuv444, 10),
    (Chroma::Yuv444, 12),
];

/// Why building or reading fixtures failed.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// The KV file could not be read.
    #[error("kv file: {0}")]
    Kv(String),
    /// Quantization rejected the values.
    #[error("quantize: {0}")]
    Quantize(String),
    /// Reading or writing a fixture file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// x265 is missing or failed.
    #[error("x265: {0}")]
    X265(String),
}

/// Real KV as codes: all layers' K and V quantized per channel at one bit width.
#[derive(Debug, Clone)]
pub struct KvCodes {
    /// Geometry: tensors = layers x {K, V}, rows = tokens, cols = kv_heads x head_dim.
    pub geometry: CodeGeometry,
    /// KV heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Bits per code.
    pub bits: u8,
    /// Codes `[tensors][rows][cols]`.
    pub codes: Vec<u16>,
    /// Scales and mins, per channel.
    pub dequant: Dequant,
}

/// Reads a safetensors KV file and quantizes every K and V tensor at `bits`.
pub fn kv_codes(path: &Path, bits: u8) -> Result<KvCodes, FixtureError> {
    let file = KvFile::read(path).map_err(|e| FixtureError::Kv(e.to_string()))?;
    let cache = &file.cache;
    let (rows, heads, head_dim) = (cache.tokens(), cache.kv_heads(), cache.head_dim());
    let cols = heads * head_dim;
    let mut codes = Vec::new();
    let (mut scales, mut mins) = (Vec::new(), Vec::new());
    for layer in cache.layers() {
        for t in [&layer.key, &layer.value] {
            let p = quantize(
                &t.to_f32(),
                rows,
                cols,
                bits,
                Grouping::PerChannel,
                &mut codes,
            )
            .map_err(|e| FixtureError::Quantize(e.to_string()))?;
            scales.extend(p.scale);
            mins.extend(p.min);
        }
    }
    Ok(KvCodes {
        geometry: CodeGeometry {
            tensors: 2 * cache.num_layers(),
            rows,
            cols,
        },
        heads,
        head_dim,
        bits,
        codes,
        dequant: Dequant {
            grouping: Grouping::PerChannel,
            scales,
            mins,
        },
    })
}

/// The fixture frame format for `chroma` and `bits`.
pub fn fixture_format(chroma: Chroma, bits: u8) -> FrameFormat {
    FrameFormat {
        width: FIXTURE_SIZE,
        height: FIXTURE_SIZE,
        chroma,
        bit_depth: bits,
    }
}

/// Frames needed to hold `codes` codes in raster order.
pub fn frames_for(format: FrameFormat, codes: usize) -> usize {
    codes.div_ceil(format.samples_per_frame())
}

/// The file name of one fixture stream: lossless (`qp` None) or lossy at that QP.
pub fn fixture_path(dir: &Path, chroma: Chroma, bits: u8, qp: Option<u8>) -> PathBuf {
    let lossy = qp.map(|q| format!("-qp{q}")).unwrap_or_default();
    dir.join(format!("kv-{}-{bits}{lossy}.hevc", chroma.name()))
}

/// The constant QPs x265 takes for a lossy fixture (0 would still be lossy: lossless is
/// `qp` None).
pub const FIXTURE_QPS: std::ops::RangeInclusive<u8> = 1..=51;

/// Encodes `codes` laid out in raster order as a lossless HEVC stream with the x265 tool.
pub fn encode_raster(codes: &[u16], format: FrameFormat, out: &Path) -> Result<(), FixtureError> {
    encode_raster_at(codes, format, None, out)
}

/// [`encode_raster`], lossless (`qp` None) or at a constant QP in [`FIXTURE_QPS`].
pub fn encode_raster_at(
    codes: &[u16],
    format: FrameFormat,
    qp: Option<u8>,
    out: &Path,
) -> Result<(), FixtureError> {
    if let Some(q) = qp.filter(|q| !FIXTURE_QPS.contains(q)) {
        return Err(FixtureError::X265(format!("QP {q} is outside 1..=51")));
    }
    let frames = frames_for(format, codes.len());
    let total = frames * format.samples_per_frame();
    let yuv = out.with_extension("yuv");
    let mut bytes = Vec::with_capacity(total * 2);
    for i in 0..total {
        let s = codes.get(i).copied().unwrap_or(0);
        if format.bit_depth > 8 {
            bytes.extend_from_slice(&s.to_le_bytes());
        } else {
            bytes.push(s as u8);
        }
    }
    std::fs::write(&yuv, &bytes).map_err(|source| FixtureError::Io {
        path: yuv.display().to_string(),
        source,
    })?;
    let csp = match format.chroma {
        Chroma::Yuv420 => "i420",
        Chroma::Yuv444 => "i444",
    };
    let depth = format.bit_depth.to_string();
    let quality = match qp {
        None => vec!["--lossless".to_string()],
        Some(q) => vec!["--qp".to_string(), q.to_string()],
    };
    let status = Command::new("x265")
        .args(["--input"])
        .arg(&yuv)
        .args([
            "--input-res",
            &format!("{}x{}", format.width, format.height),
        ])
        .args([
            "--input-csp",
            csp,
            "--input-depth",
            &depth,
            "--output-depth",
            &depth,
        ])
        .args(["--fps", "25"])
        .args(&quality)
        .args(["--preset", "fast", "--log-level", "error", "--output"])
        .arg(out)
        .status()
        .map_err(|e| FixtureError::X265(e.to_string()));
    let _ = std::fs::remove_file(&yuv);
    match status? {
        s if s.success() => Ok(()),
        s => Err(FixtureError::X265(format!("exited with {s}"))),
    }
}

/// Writes every fixture stream of [`FIXTURE_FORMATS`] for the KV file `kv` into `dir`,
/// lossless (`qp` None) or at a constant QP.
pub fn write_fixtures(kv: &Path, dir: &Path, qp: Option<u8>) -> Result<Vec<PathBuf>, FixtureError> {
    std::fs::create_dir_all(dir).map_err(|source| FixtureError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut written = Vec::new();
    for (chroma, bits) in FIXTURE_FORMATS {
        let codes = kv_codes(kv, bits)?;
        let path = fixture_path(dir, chroma, bits, qp);
        encode_raster_at(&codes.codes, fixture_format(chroma, bits), qp, &path)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lossy_fixtures_are_named_by_their_qp() {
        let dir = Path::new("/fx");
        assert_eq!(
            fixture_path(dir, Chroma::Yuv444, 8, None),
            Path::new("/fx/kv-444-8.hevc")
        );
        assert_eq!(
            fixture_path(dir, Chroma::Yuv420, 10, Some(14)),
            Path::new("/fx/kv-420-10-qp14.hevc")
        );
    }

    #[test]
    fn a_qp_outside_x265s_range_is_refused_before_x265_runs() {
        let fmt = fixture_format(Chroma::Yuv444, 8);
        let out = std::env::temp_dir().join("kvf-fixture-never-written.hevc");
        for qp in [0, 52, 255] {
            let e = encode_raster_at(&[0; 16], fmt, Some(qp), &out).unwrap_err();
            assert!(e.to_string().contains(&format!("QP {qp}")), "{e}");
        }
        assert!(!out.exists());
    }
}
