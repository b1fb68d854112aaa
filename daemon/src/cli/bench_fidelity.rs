//! `kvfetcher bench fidelity`: how much each bit width changes a model's next-token predictions.
//!
//! Captures a KV cache with a llama2.c model (sampled with a fixed seed), stores it in the chosen
//! dtype (the "original"), encodes and decodes it through the codec at each bit width, and
//! compares the model's predictions over the original and the decoded KV with
//! [`kvfetcher_kv::fidelity`] (top-1 agreement and KL divergence at every position). Every variant
//! returns the quantized codes bit-exactly, so the variant does not change these numbers.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kvfetcher_codec::{
    EncodeConfig, VariantKind, DEFAULT_CHUNK_TOKENS, DEFAULT_PRESET, DEFAULT_ZSTD_LEVEL,
};
use kvfetcher_kv::{fidelity, Llama2Model};
use serde::Serialize;

use super::bench_codec::{errors, round_trip, BitsArg};
use super::codec::{progress, GroupingArg};
use super::kv::DTypeArg;

/// Arguments of `kvfetcher bench fidelity`.
#[derive(Debug, Args)]
pub struct BenchFidelityArgs {
    /// The llama2.c checkpoint (e.g. ../shared/data/stories260K.bin).
    #[arg(long)]
    pub model: PathBuf,
    /// Positions captured and compared (1..=the model's seq_len).
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    /// Sampler seed of the capture.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Sampling temperature of the capture.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Element type the KV is stored in (the reference the decoded KV is compared with).
    #[arg(long, value_enum, default_value_t = DTypeArg::F16)]
    pub dtype: DTypeArg,
    /// Bit widths (2..=12) and/or `exact`.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4,5,6,7,8,exact")]
    pub bits: Vec<BitsArg>,
    /// Variant used for the round trip.
    #[arg(long, value_enum, default_value_t = super::codec::VariantArg::Zstd)]
    pub variant: super::codec::VariantArg,
    /// Tokens per chunk (quantization ranges are per chunk).
    #[arg(long, default_value_t = DEFAULT_CHUNK_TOKENS)]
    pub chunk_tokens: usize,
    /// How K shares quantization parameters.
    #[arg(long, value_enum, default_value_t = GroupingArg::Channel)]
    pub key_grouping: GroupingArg,
    /// How V shares quantization parameters.
    #[arg(long, value_enum, default_value_t = GroupingArg::Channel)]
    pub value_grouping: GroupingArg,
    /// Print a JSON list instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One row of `bench fidelity`.
#[derive(Debug, Clone, Serialize)]
pub struct FidelityResult {
    /// Bits per value (16 for exact mode).
    pub bits: u8,
    /// Bit-exact mode.
    pub exact: bool,
    /// The KV's 16-bit size over the chunk objects' size.
    pub ratio_vs_16bit: f64,
    /// `||decoded - original|| / ||original||`.
    pub rel_l2_err: f64,
    /// Positions compared.
    pub positions: usize,
    /// Fraction of positions whose most likely next token is unchanged.
    pub top1_agreement: f64,
    /// Mean KL(original || decoded) of the next-token distribution, nats.
    pub mean_kl: f64,
    /// Largest per-position KL, nats.
    pub max_kl: f64,
    /// Largest absolute logit difference.
    pub max_logit_diff: f32,
}

/// Runs `kvfetcher bench fidelity`.
pub fn run(args: BenchFidelityArgs) -> anyhow::Result<()> {
    let model = Llama2Model::load(&args.model)?;
    let generation = model.generate(args.tokens, args.seed, args.temperature)?;
    let original = generation.cache.to_dtype(args.dtype.into());
    let ids = &generation.token_ids;
    let raw16 = super::codec::bytes_16bit(&original);
    let variant = VariantKind::from(args.variant);
    let registry =
        super::codec::registry_for(variant, None, DEFAULT_PRESET, None, DEFAULT_ZSTD_LEVEL)?;
    let bar = progress(args.bits.len() as u64, "fidelity");
    let mut results = Vec::new();
    for &bits in &args.bits {
        let cfg = EncodeConfig {
            quant: bits.quant(args.key_grouping, args.value_grouping),
            variant,
            hevc_layout: None,
            hevc_stream_frames: None,
            chunk_tokens: args.chunk_tokens,
            layers_per_section: 1,
        };
        let rt = round_trip(&original, ids, &cfg, &registry)
            .with_context(|| format!("{} bits", bits.reported()))?;
        let f = fidelity(&model, ids, &original, &rt.decoded)?;
        let (_, rel_l2_err) = errors(&original, &rt.decoded);
        results.push(FidelityResult {
            bits: bits.reported(),
            exact: bits == BitsArg::Exact,
            ratio_vs_16bit: raw16 as f64 / rt.bytes as f64,
            rel_l2_err,
            positions: f.positions,
            top1_agreement: f.top1_agreement,
            mean_kl: f.mean_kl,
            max_kl: f.max_kl,
            max_logit_diff: f.max_logit_diff,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    println!("| bits | size vs 16-bit | rel L2 err | top-1 agreement | mean KL (nats) | max KL (nats) | max logit diff |");
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        let bits = if r.exact {
            "exact".into()
        } else {
            r.bits.to_string()
        };
        println!(
            "| {bits} | {:.2}x | {:.2e} | {:.4} | {:.3e} | {:.3e} | {:.3e} |",
            r.ratio_vs_16bit, r.rel_l2_err, r.top1_agreement, r.mean_kl, r.max_kl, r.max_logit_diff
        );
    }
    Ok(())
}
