//! `kvfetcher-bench codec`: size, speed and error of every variant, HEVC layout and bit width on
//! a real KV file, beside zstd -19 on the raw 16-bit input.
//!
//! Sizes count whole chunk objects (headers included). Ratios are against the input's 16-bit
//! size and against the `packed` variant at the same bits (exact mode: packed byte planes).
//! MB/s are MB (10^6 bytes) of 16-bit KV per second, whole cache, wall clock, all cores (rayon
//! over chunks and sections; x265 and libde265 run their own threads). Errors compare the
//! decoded values with the input's, as f32.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use kvfetcher_codec::{
    decode_chunk, encode_cache, CodecRegistry, EncodeConfig, LayoutSpec, ModelFingerprint,
    QuantConfig, VariantKind, DEFAULT_CHUNK_TOKENS, DEFAULT_PRESET, DEFAULT_ZSTD_LEVEL,
};
use kvfetcher_kv::{DTypeExt, KvCache, KvFile};
use rayon::prelude::*;
use serde::Serialize;

use kvfetcher::cli::{bytes_16bit, progress, GroupingArg};

/// zstd level of the raw 16-bit baseline: the strongest commonly used.
const RAW_ZSTD_LEVEL: i32 = 19;

/// Arguments of `kvfetcher-bench codec`.
#[derive(Debug, Args)]
pub struct BenchCodecArgs {
    /// The KV safetensors file.
    #[arg(long)]
    pub input: PathBuf,
    /// Use only the first N tokens (all by default).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Variants to measure.
    #[arg(long, value_delimiter = ',', default_value = "packed,zstd,hevc")]
    pub variants: Vec<kvfetcher::cli::VariantArg>,
    /// HEVC layouts to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "rows,rows420,frames,frames420"
    )]
    pub layouts: Vec<String>,
    /// Bit widths (2..=12) and/or `exact`.
    #[arg(long, value_delimiter = ',', default_value = "4,6,8,exact")]
    pub bits: Vec<BitsArg>,
    /// Tokens per chunk.
    #[arg(long, default_value_t = DEFAULT_CHUNK_TOKENS)]
    pub chunk_tokens: usize,
    /// Layers per section.
    #[arg(long, default_value_t = 1)]
    pub layers_per_section: usize,
    /// How K shares quantization parameters.
    #[arg(long, value_enum, default_value_t = GroupingArg::Channel)]
    pub key_grouping: GroupingArg,
    /// How V shares quantization parameters.
    #[arg(long, value_enum, default_value_t = GroupingArg::Channel)]
    pub value_grouping: GroupingArg,
    /// zstd level of the zstd variant.
    #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL)]
    pub zstd_level: i32,
    /// x265 preset of the hevc variant.
    #[arg(long, default_value = DEFAULT_PRESET)]
    pub preset: String,
    /// Print a JSON list instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A bit width or bit-exact mode, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitsArg {
    /// Quantized to this many bits.
    Bits(u8),
    /// Bit-exact.
    Exact,
}

impl std::str::FromStr for BitsArg {
    type Err = String;

    fn from_str(s: &str) -> Result<BitsArg, String> {
        if s == "exact" {
            return Ok(BitsArg::Exact);
        }
        s.parse()
            .map(BitsArg::Bits)
            .map_err(|_| format!("{s:?} is neither a bit width nor `exact`"))
    }
}

impl BitsArg {
    /// The quantization it stands for, K and V grouped as given.
    pub fn quant(self, key: GroupingArg, value: GroupingArg) -> QuantConfig {
        match self {
            BitsArg::Bits(b) => QuantConfig::Bits {
                default_bits: b,
                per_layer: Vec::new(),
                key_grouping: key.into(),
                value_grouping: value.into(),
            },
            BitsArg::Exact => QuantConfig::Exact,
        }
    }

    /// The bits reported: 16 for exact mode.
    pub fn reported(self) -> u8 {
        match self {
            BitsArg::Bits(b) => b,
            BitsArg::Exact => 16,
        }
    }
}

/// One row of `bench codec`.
#[derive(Debug, Clone, Serialize)]
pub struct CodecResult {
    /// `packed`, `zstd`, `hevc`, or `zstd-raw` (zstd -19 over the raw 16-bit input).
    pub variant: String,
    /// The HEVC layout; `null` for other variants.
    pub layout: Option<String>,
    /// Bits per value (16 for exact mode and the raw baseline).
    pub bits: u8,
    /// Bit-exact (decodes to the input's bytes).
    pub exact: bool,
    /// Bytes of all chunk objects.
    pub bytes: u64,
    /// The input's 16-bit size over `bytes`.
    pub ratio_vs_16bit: f64,
    /// The packed variant's size at the same bits over `bytes` (> 1: smaller than packed).
    pub ratio_vs_packed: f64,
    /// MB of 16-bit KV encoded per second.
    pub encode_mbps: f64,
    /// MB of 16-bit KV decoded per second.
    pub decode_mbps: f64,
    /// Largest absolute difference between decoded and input values.
    pub max_abs_err: f64,
    /// `||decoded - input|| / ||input||` over all values.
    pub rel_l2_err: f64,
}

/// A cache encoded and decoded once, with timings.
pub(crate) struct RoundTrip {
    /// Bytes of all chunk objects.
    pub(crate) bytes: u64,
    /// Seconds to encode the whole cache.
    pub(crate) encode_s: f64,
    /// Seconds to decode every chunk.
    pub(crate) decode_s: f64,
    /// The decoded cache (no token ids).
    pub(crate) decoded: KvCache,
}

/// Encodes `cache` with `cfg` and decodes every chunk again (chunks in parallel).
pub(crate) fn round_trip(
    cache: &KvCache,
    ids: &[u32],
    cfg: &EncodeConfig,
    registry: &CodecRegistry,
) -> anyhow::Result<RoundTrip> {
    let model = match &cfg.quant {
        // A transform-coded chunk must name the profile's model to be restored.
        QuantConfig::Transform(t) => t.profile.model,
        _ => ModelFingerprint::of_bytes(b"kvfetcher bench"),
    };
    let t = Instant::now();
    let chunks = encode_cache(cache, &model, ids, cfg, registry)?;
    let encode_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let parts = chunks
        .par_iter()
        .map(|(_, bytes)| decode_chunk(bytes, registry))
        .collect::<Result<Vec<_>, _>>()?;
    let decode_s = t.elapsed().as_secs_f64();
    Ok(RoundTrip {
        bytes: chunks.iter().map(|(_, b)| b.len() as u64).sum(),
        encode_s,
        decode_s,
        decoded: KvCache::concat_tokens(&parts)?,
    })
}

/// `(max_abs_err, rel_l2_err)` of `decoded` against `original`, over all K and V values.
pub(crate) fn errors(original: &KvCache, decoded: &KvCache) -> (f64, f64) {
    let e = error_sums(original, decoded);
    (e.max_abs, e.rel_l2())
}

/// Error sums of `decoded` against `original` over all K and V values; sums of several caches
/// add up to the error of all of them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ErrorSums {
    /// The largest absolute difference.
    pub(crate) max_abs: f64,
    /// Sum of squared differences.
    pub(crate) diff2: f64,
    /// Sum of squared original values.
    pub(crate) norm2: f64,
}

impl ErrorSums {
    /// `||decoded - original|| / ||original||` (the absolute norm for an all-zero original).
    pub(crate) fn rel_l2(&self) -> f64 {
        if self.norm2 > 0.0 {
            (self.diff2 / self.norm2).sqrt()
        } else {
            self.diff2.sqrt()
        }
    }

    /// Adds another cache's sums.
    pub(crate) fn add(&mut self, other: ErrorSums) {
        self.max_abs = self.max_abs.max(other.max_abs);
        self.diff2 += other.diff2;
        self.norm2 += other.norm2;
    }
}

/// The [`ErrorSums`] of one cache.
pub(crate) fn error_sums(original: &KvCache, decoded: &KvCache) -> ErrorSums {
    let mut e = ErrorSums::default();
    for (a, b) in original.layers().iter().zip(decoded.layers()) {
        for (x, y) in [(&a.key, &b.key), (&a.value, &b.value)] {
            for (p, q) in x.to_f32().iter().zip(y.to_f32()) {
                let (p, q) = (f64::from(*p), f64::from(q));
                e.max_abs = e.max_abs.max((p - q).abs());
                e.diff2 += (p - q) * (p - q);
                e.norm2 += p * p;
            }
        }
    }
    e
}

/// Runs `kvfetcher-bench codec`.
pub fn run(args: BenchCodecArgs) -> anyhow::Result<()> {
    let file = KvFile::read(&args.input).with_context(|| format!("{}", args.input.display()))?;
    let cache = match args.tokens {
        Some(n) if n == 0 || n > file.cache.tokens() => bail!(
            "--tokens {n} is outside 1..={} (the file's tokens)",
            file.cache.tokens()
        ),
        Some(n) => file.cache.slice_tokens(0, n)?,
        None => file.cache,
    };
    for l in &args.layouts {
        l.parse::<LayoutSpec>()?;
    }
    let variants: Vec<VariantKind> = args.variants.iter().map(|&v| v.into()).collect();
    let ids: Vec<u32> = (0..cache.tokens() as u32).collect();
    let raw16 = bytes_16bit(&cache);
    let mb = raw16 as f64 / 1e6;

    let mut configs: Vec<(VariantKind, Option<String>)> = Vec::new();
    for &v in &variants {
        if v == VariantKind::Hevc {
            configs.extend(args.layouts.iter().map(|l| (v, Some(l.clone()))));
        } else {
            configs.push((v, None));
        }
    }
    let bar = progress((configs.len() * args.bits.len() + 1) as u64, "bench codec");
    let mut results = Vec::new();
    for &bits in &args.bits {
        let quant = bits.quant(args.key_grouping, args.value_grouping);
        let cfg = |variant| EncodeConfig {
            quant: quant.clone(),
            variant,
            hevc_layout: None,
            hevc_stream_frames: None,
            chunk_tokens: args.chunk_tokens,
            layers_per_section: args.layers_per_section,
        };
        let software = CodecRegistry::software();
        let packed = round_trip(&cache, &ids, &cfg(VariantKind::Packed), &software)?.bytes;
        for (variant, layout) in &configs {
            let registry = kvfetcher::cli::registry_for(
                *variant,
                layout.as_deref(),
                &args.preset,
                None,
                args.zstd_level,
                0,
            )?;
            let rt = round_trip(&cache, &ids, &cfg(*variant), &registry).with_context(|| {
                format!(
                    "{} {} at {} bits",
                    variant.name(),
                    layout.as_deref().unwrap_or(""),
                    bits.reported()
                )
            })?;
            let (max_abs_err, rel_l2_err) = errors(&cache, &rt.decoded);
            results.push(CodecResult {
                variant: variant.name().into(),
                layout: layout.clone(),
                bits: bits.reported(),
                exact: bits == BitsArg::Exact,
                bytes: rt.bytes,
                ratio_vs_16bit: raw16 as f64 / rt.bytes as f64,
                ratio_vs_packed: packed as f64 / rt.bytes as f64,
                encode_mbps: mb / rt.encode_s.max(1e-9),
                decode_mbps: mb / rt.decode_s.max(1e-9),
                max_abs_err,
                rel_l2_err,
            });
            bar.inc(1);
        }
    }
    let packed_exact = round_trip(
        &cache,
        &ids,
        &EncodeConfig {
            quant: QuantConfig::Exact,
            variant: VariantKind::Packed,
            hevc_layout: None,
            hevc_stream_frames: None,
            chunk_tokens: args.chunk_tokens,
            layers_per_section: args.layers_per_section,
        },
        &CodecRegistry::software(),
    )?
    .bytes;
    results.push(raw_zstd(&cache, raw16, packed_exact)?);
    bar.finish_and_clear();

    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print_table(&results);
    }
    Ok(())
}

/// zstd at [`RAW_ZSTD_LEVEL`] over the raw 16-bit input (every tensor back to back, converted to
/// fp16 if the file holds another dtype), compressed and decompressed whole on one thread.
fn raw_zstd(cache: &KvCache, raw16: u64, packed_exact: u64) -> anyhow::Result<CodecResult> {
    let mut raw = Vec::with_capacity(raw16 as usize);
    let mut conv = Vec::new();
    for l in cache.layers() {
        for t in [&l.key, &l.value] {
            if t.dtype().size() == 2 {
                raw.extend_from_slice(t.data());
            } else {
                kvfetcher_kv::DType::F16.encode_f32(&t.to_f32(), &mut conv);
                raw.extend_from_slice(&conv);
            }
        }
    }
    let t = Instant::now();
    let packed = zstd::bulk::compress(&raw, RAW_ZSTD_LEVEL)?;
    let encode_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let back = zstd::bulk::decompress(&packed, raw.len())?;
    let decode_s = t.elapsed().as_secs_f64();
    if back != raw {
        bail!("zstd did not return the raw input");
    }
    let mb = raw16 as f64 / 1e6;
    Ok(CodecResult {
        variant: "zstd-raw".into(),
        layout: None,
        bits: 16,
        exact: true,
        bytes: packed.len() as u64,
        ratio_vs_16bit: raw16 as f64 / packed.len() as f64,
        ratio_vs_packed: packed_exact as f64 / packed.len() as f64,
        encode_mbps: mb / encode_s.max(1e-9),
        decode_mbps: mb / decode_s.max(1e-9),
        max_abs_err: 0.0,
        rel_l2_err: 0.0,
    })
}

/// Prints the results as a Markdown table (what docs/BENCHMARKS.md records).
fn print_table(results: &[CodecResult]) {
    println!(
        "| variant | layout | bits | bytes | vs 16-bit | vs packed | encode MB/s | decode MB/s | max abs err | rel L2 err |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let bits = if r.exact {
            "exact".to_string()
        } else {
            r.bits.to_string()
        };
        println!(
            "| {} | {} | {bits} | {} | {:.3}x | {:.3}x | {:.1} | {:.1} | {:.3e} | {:.3e} |",
            r.variant,
            r.layout.as_deref().unwrap_or("-"),
            r.bytes,
            r.ratio_vs_16bit,
            r.ratio_vs_packed,
            r.encode_mbps,
            r.decode_mbps,
            r.max_abs_err,
            r.rel_l2_err
        );
    }
}
