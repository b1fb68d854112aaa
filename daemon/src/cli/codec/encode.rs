//! `kvfetcher encode`: a KV safetensors file into chunk object files, one per chunk, each named
//! by its key in hex.
//!
//! The model fingerprint (the namespace of the keys) is, in order of preference: SHA-256 of
//! `--model-id`; the file's `model_sha256` metadata (the SHA-256 of the weights file, as
//! `kvfetcher-bench kv capture` records it, used as is); SHA-256 of the file's `model` metadata; or
//! SHA-256 of the file's safetensors header (its JSON bytes: shapes, dtypes and metadata).
//! Keys chain over the file's `token_ids` tensor; a file without one uses positions `0..n`
//! (with a warning): such keys name this file's KV, not a text.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use kvfetcher_codec::{
    allocate_steps, encode_cache, uniform_steps, CodecRegistry, EncodeConfig, Grouping,
    HevcEncoder, ModelFingerprint, QuantConfig, TransformConfig, VariantKind, ZstdCodec,
    DEFAULT_CHUNK_TOKENS, DEFAULT_PRESET, DEFAULT_TARGET_KL, DEFAULT_ZSTD_LEVEL,
};
use kvfetcher_kv::KvFile;

use super::bytes_16bit;

/// Arguments of `kvfetcher encode`.
#[derive(Debug, Args)]
pub struct EncodeArgs {
    /// The KV safetensors file (tensors `layers.{i}.key` / `layers.{i}.value`).
    #[arg(long)]
    pub input: PathBuf,
    /// Directory for the chunk objects (created if missing); each file is named by its key.
    #[arg(long)]
    pub out: PathBuf,
    /// Quantization bits for every layer (2..=12).
    #[arg(long, default_value_t = 8, conflicts_with = "exact")]
    pub bits: u8,
    /// Bit-exact mode: keep the original 16 (or 32) bits; decoding gives identical bytes.
    #[arg(long)]
    pub exact: bool,
    /// Per-layer bits overriding --bits, e.g. `0=6,1=6`.
    #[arg(long, value_delimiter = ',', value_parser = parse_layer_bits, conflicts_with = "exact")]
    pub layer_bits: Vec<(usize, u8)>,
    /// How K shares quantization parameters.
    #[arg(long, value_enum, default_value_t = GroupingArg::Channel)]
    pub key_grouping: GroupingArg,
    /// How V shares quantization parameters.
    #[arg(long, value_enum, default_value_t = GroupingArg::Channel)]
    pub value_grouping: GroupingArg,
    /// Variant of every section.
    #[arg(long, value_enum, default_value_t = VariantArg::Zstd)]
    pub variant: VariantArg,
    /// HEVC layout (rows, rows420, frames, frames420, frames:N); default: the encoder's.
    #[arg(long)]
    pub layout: Option<String>,
    /// x265 preset of the hevc variant.
    #[arg(long, default_value = DEFAULT_PRESET)]
    pub preset: String,
    /// Frames per HEVC stream (hevc only; 0: one stream per section). The streams of a section
    /// decode on several NVDEC engines at once, for 1.4-2.4% larger sections (docs/LAYOUT.md).
    #[arg(long, default_value_t = 0)]
    pub stream_frames: usize,
    /// Lossy HEVC: x265 constant QP 1..=51 on the quantized codes (hevc only; 0: lossless, the
    /// default). Higher QP: smaller objects, larger error in the decoded codes (judge it with
    /// `kvfetcher-bench fidelity --hevc-qp`). Needs 8-bit codes (or 10/12); NVDEC decodes the
    /// sections as it does lossless ones, without using SMs.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=51), conflicts_with = "exact")]
    pub hevc_qp: u8,
    /// zstd level of the zstd variant.
    #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL)]
    pub zstd_level: i32,
    /// Tokens per chunk (the last chunk may be shorter).
    #[arg(long, default_value_t = DEFAULT_CHUNK_TOKENS)]
    pub chunk_tokens: usize,
    /// A codec profile (`kvfetcher-bench profile`): transform coding with the rans variant
    /// (format version 2); the chunks are fingerprinted with the profile's model.
    #[arg(long, conflicts_with_all = ["exact", "layer_bits", "layout", "stream_frames"])]
    pub profile: Option<PathBuf>,
    /// With --profile: the mean KL of the next-token distribution (nats) the per-layer steps
    /// are chosen for (the default when neither this nor --step-scale is given:
    /// kvfetcher_codec::DEFAULT_TARGET_KL).
    #[arg(long, requires = "profile", conflicts_with = "step_scale")]
    pub target_kl: Option<f64>,
    /// With --profile: the same relative step everywhere, this times each tensor's RMS
    /// coefficient deviation (no allocation).
    #[arg(long, requires = "profile")]
    pub step_scale: Option<f32>,
    /// Layers per section (sections split further where per-layer bits differ).
    #[arg(long, default_value_t = 1)]
    pub layers_per_section: usize,
    /// Model name whose SHA-256 namespaces the keys (default: from the file, see `encode`'s doc).
    #[arg(long)]
    pub model_id: Option<String>,
}

/// Variants on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VariantArg {
    /// HEVC (NVDEC or libde265): lossless, or lossy with --hevc-qp.
    Hevc,
    /// Bit-packed codes.
    Packed,
    /// zstd-coded codes.
    Zstd,
}

impl From<VariantArg> for VariantKind {
    fn from(v: VariantArg) -> VariantKind {
        match v {
            VariantArg::Hevc => VariantKind::Hevc,
            VariantArg::Packed => VariantKind::Packed,
            VariantArg::Zstd => VariantKind::Zstd,
        }
    }
}

/// Quantization groupings on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupingArg {
    /// One (min, scale) per channel over the chunk's tokens.
    Channel,
    /// One (min, scale) per token over its channels.
    Token,
}

impl From<GroupingArg> for Grouping {
    fn from(g: GroupingArg) -> Grouping {
        match g {
            GroupingArg::Channel => Grouping::PerChannel,
            GroupingArg::Token => Grouping::PerToken,
        }
    }
}

/// Parses `LAYER=BITS`.
fn parse_layer_bits(s: &str) -> Result<(usize, u8), String> {
    let (l, b) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not LAYER=BITS"))?;
    let layer = l
        .trim()
        .parse()
        .map_err(|_| format!("bad layer {l:?} in {s:?}"))?;
    let bits = b
        .trim()
        .parse()
        .map_err(|_| format!("bad bits {b:?} in {s:?}"))?;
    Ok((layer, bits))
}

/// The software registry with `zstd` at `zstd_level`; for hevc, the standard one (libde265)
/// with an x265 encoder with `layout`, `preset`, `stream_frames` frames per stream and constant
/// QP `hevc_qp` (0: lossless); an error saying why when x265 cannot be loaded or the QP is out
/// of range.
pub fn registry_for(
    variant: VariantKind,
    layout: Option<&str>,
    preset: &str,
    stream_frames: Option<usize>,
    zstd_level: i32,
    hevc_qp: u8,
) -> anyhow::Result<CodecRegistry> {
    let zstd = Arc::new(ZstdCodec::new(zstd_level));
    if variant != VariantKind::Hevc {
        // Only hevc needs x265 and libde265 loaded (a few ms of a short encode otherwise).
        return Ok(CodecRegistry::software().with(VariantKind::Zstd, zstd));
    }
    let enc = HevcEncoder::new(layout)
        .context("hevc encoder")?
        .with_preset(preset)
        .with_stream_frames(stream_frames)
        .with_qp(hevc_qp)?;
    Ok(CodecRegistry::standard()
        .with(VariantKind::Zstd, zstd)
        .with(VariantKind::Hevc, Arc::new(enc)))
}

/// Where the model fingerprint of a file's keys comes from (see the module documentation).
pub(crate) fn fingerprint_for(
    model_id: Option<&str>,
    file: &KvFile,
    path: &Path,
) -> anyhow::Result<(ModelFingerprint, String)> {
    if let Some(name) = model_id {
        return Ok((
            ModelFingerprint::of_bytes(name.as_bytes()),
            format!("SHA-256 of --model-id {name:?}"),
        ));
    }
    if let Some(hex) = file.metadata.get("model_sha256") {
        if let Ok(fp) = ModelFingerprint::from_hex(hex) {
            return Ok((fp, "the file's model_sha256 metadata".into()));
        }
    }
    if let Some(name) = file.metadata.get("model") {
        return Ok((
            ModelFingerprint::of_bytes(name.as_bytes()),
            "SHA-256 of the file's model metadata".into(),
        ));
    }
    let header = safetensors_header(path)?;
    Ok((
        ModelFingerprint::of_bytes(&header),
        "SHA-256 of the file's safetensors header".into(),
    ))
}

/// The JSON header bytes of a safetensors file.
fn safetensors_header(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    let mut header = Vec::new();
    f.take(n).read_to_end(&mut header)?;
    if header.len() as u64 != n {
        bail!("{}: truncated safetensors header", path.display());
    }
    Ok(header)
}

/// The quantization of `args`.
fn quant_of(args: &EncodeArgs) -> QuantConfig {
    if args.exact {
        return QuantConfig::Exact;
    }
    QuantConfig::Bits {
        default_bits: args.bits,
        per_layer: args.layer_bits.clone(),
        key_grouping: args.key_grouping.into(),
        value_grouping: args.value_grouping.into(),
    }
}

/// The profile and steps of `encode --profile`; the chunks take the profile's model (a
/// different `--model-id` is an error: the profile would not restore them).
fn transform_of(
    args: &EncodeArgs,
    path: &Path,
    model: &mut ModelFingerprint,
    source: &mut String,
) -> anyhow::Result<TransformConfig> {
    let profile = super::load_profile(path)?;
    if args.model_id.is_some() && *model != profile.model {
        bail!(
            "--model-id gives fingerprint {model}, but profile {} is for model {}",
            path.display(),
            profile.model
        );
    }
    *model = profile.model;
    *source = format!("the profile {}", path.display());
    let steps = match args.step_scale {
        Some(s) if s.is_finite() && s > 0.0 => uniform_steps(&profile, s),
        Some(s) => bail!("--step-scale {s} must be positive"),
        None => {
            let target = args.target_kl.unwrap_or(DEFAULT_TARGET_KL);
            let a = allocate_steps(&profile, target)?;
            eprintln!(
                "steps for mean KL <= {target}: predicted KL {:.2e}, {:.2} bits per value",
                a.predicted_kl, a.bits_per_value
            );
            a.steps
        }
    };
    Ok(TransformConfig { profile, steps })
}

/// Runs `kvfetcher encode`: prints one line per chunk object written, then a summary.
pub(crate) fn run_encode(args: EncodeArgs) -> anyhow::Result<()> {
    let file = KvFile::read(&args.input).with_context(|| format!("{}", args.input.display()))?;
    let cache = &file.cache;
    let positions: Vec<u32>;
    let ids = match cache.token_ids() {
        Some(ids) => ids,
        None => {
            eprintln!(
                "warning: {} has no token_ids; keys chain over positions 0..{} and name this \
                 file's KV only",
                args.input.display(),
                cache.tokens()
            );
            positions = (0..cache.tokens() as u32).collect();
            &positions
        }
    };
    let (mut model, mut source) = fingerprint_for(args.model_id.as_deref(), &file, &args.input)?;
    let transform = match &args.profile {
        Some(path) => Some(transform_of(&args, path, &mut model, &mut source)?),
        None => None,
    };
    eprintln!("model fingerprint {model} ({source})");
    let variant = if transform.is_some() {
        VariantKind::Rans
    } else {
        VariantKind::from(args.variant)
    };
    if (args.layout.is_some() || args.stream_frames > 0 || args.hevc_qp > 0)
        && variant != VariantKind::Hevc
    {
        bail!("--layout, --stream-frames and --hevc-qp apply to the hevc variant only");
    }
    let registry = registry_for(
        variant,
        args.layout.as_deref(),
        &args.preset,
        Some(args.stream_frames),
        args.zstd_level,
        args.hevc_qp,
    )?;
    let cfg = EncodeConfig {
        quant: match transform {
            Some(t) => QuantConfig::Transform(Arc::new(t)),
            None => quant_of(&args),
        },
        variant,
        hevc_layout: None,
        hevc_stream_frames: None,
        chunk_tokens: args.chunk_tokens,
        layers_per_section: args.layers_per_section,
    };
    let spinner = super::spinner("encoding");
    let started = Instant::now();
    let chunks = encode_cache(cache, &model, ids, &cfg, &registry)?;
    let secs = started.elapsed().as_secs_f64();
    spinner.finish_and_clear();
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let mut total = 0u64;
    for (i, (key, bytes)) in chunks.iter().enumerate() {
        let path = args.out.join(key.to_hex());
        std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))?;
        let start = i * args.chunk_tokens;
        let end = (start + args.chunk_tokens).min(cache.tokens());
        println!("{key} tokens {start}..{end} {} bytes", bytes.len());
        total += bytes.len() as u64;
    }
    let raw = bytes_16bit(cache);
    println!(
        "{} chunks, {total} bytes in {}: {:.3}x smaller than the 16-bit KV ({raw} bytes); \
         encoded at {:.1} MB/s",
        chunks.len(),
        args.out.display(),
        raw as f64 / total.max(1) as f64,
        raw as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(())
}
