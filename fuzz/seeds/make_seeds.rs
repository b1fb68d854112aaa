//! Writes a seed corpus for `parse_chunk`: small chunk objects encoded from real KV
//! (codelm-kv-a, sliced), one per variant and quantization mode.
//!
//! Usage: `make_seeds OUT_DIR [SAFETENSORS]` (default: ../data/codelm-kv-a.safetensors
//! relative to this crate).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kvfetcher_codec::{
    encode_cache, CodecRegistry, EncodeConfig, Grouping, ModelFingerprint, QuantConfig,
    TransformConfig, VariantKind,
};

include!("../common/seed_profile.rs");
use kvfetcher_kv::{KvCache, KvFile};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(out) = args.next().map(PathBuf::from) else {
        eprintln!("usage: make_seeds OUT_DIR [SAFETENSORS]");
        return ExitCode::from(2);
    };
    let src = args.next().map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/codelm-kv-a.safetensors")
    });
    match write_seeds(&out, &src) {
        Ok(n) => {
            eprintln!("wrote {n} seeds to {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("make_seeds: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_seeds(out: &Path, src: &Path) -> Result<usize, Box<dyn std::error::Error>> {
    let file = KvFile::read(src)?;
    // Two layers, 12 tokens, chunks of 8: a full and a partial chunk per config, ~10 KB each.
    let sliced = file.cache.slice_tokens(0, 12)?;
    let cache = KvCache::new(sliced.layers()[..2].to_vec(), None)?;
    let ids: Vec<u32> = (0..12).collect();
    let per_token = QuantConfig::Bits {
        default_bits: 6,
        per_layer: vec![(1, 3)],
        key_grouping: Grouping::PerChannel,
        value_grouping: Grouping::PerToken,
    };
    let configs = [
        ("packed-4", QuantConfig::bits(4), VariantKind::Packed),
        ("packed-12", QuantConfig::bits(12), VariantKind::Packed),
        ("packed-exact", QuantConfig::Exact, VariantKind::Packed),
        ("zstd-8", QuantConfig::bits(8), VariantKind::Zstd),
        ("zstd-10", QuantConfig::bits(10), VariantKind::Zstd),
        ("zstd-exact", QuantConfig::Exact, VariantKind::Zstd),
        ("zstd-mixed", per_token, VariantKind::Zstd),
    ];
    let profile = std::sync::Arc::new(seed_profile());
    let transform = |step: f32| {
        QuantConfig::Transform(std::sync::Arc::new(TransformConfig {
            profile: profile.clone(),
            steps: vec![(step, step); 2],
        }))
    };
    let configs = configs.into_iter().chain([
        ("rans-fine", transform(0.01), VariantKind::Rans),
        ("rans-coarse", transform(0.5), VariantKind::Rans),
    ]);
    std::fs::create_dir_all(out)?;
    // The profile itself seeds the `codec_profile` target, beside this corpus.
    if let Some(parent) = out.parent() {
        let dir = parent.join("codec_profile");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("seed.kvfp"), profile.to_bytes())?;
    }
    let reg = CodecRegistry::software();
    let mut n = 0;
    for (name, quant, variant) in configs {
        let cfg = EncodeConfig {
            quant,
            variant,
            chunk_tokens: 8,
            layers_per_section: 2,
            hevc_layout: None,
            hevc_stream_frames: None,
        };
        let chunks = encode_cache(
            &cache,
            &ModelFingerprint::of_bytes(b"seed"),
            &ids,
            &cfg,
            &reg,
        )?;
        for (i, (_, bytes)) in chunks.iter().enumerate() {
            std::fs::write(out.join(format!("{name}-{i}.kvc")), bytes)?;
            n += 1;
        }
    }
    Ok(n)
}
