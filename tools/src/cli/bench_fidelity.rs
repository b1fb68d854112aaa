//! `kvfetcher-bench fidelity`: how much each codec setting changes a model's predictions.
//!
//! With `--gguf` (the real measure) the model runs in llama.cpp through the engine: for each text
//! and each split, the KV of a prefix is captured, the continuation is scored once over the
//! exact prefix KV and once per setting over the prefix KV after a round trip through real chunk
//! objects (sizes with headers), and every continuation position's next-token distribution is
//! compared ([`kvfetcher_kv::ScoreAccumulator`]). With `--model` a llama2.c toy does the same
//! over KV it samples itself ([`kvfetcher_kv::fidelity`]): a labelled toy row, not a claim.
//! Every lossless variant returns the quantized codes bit-exactly, so the variant changes the
//! ratio only; lossy HEVC rows (`--hevc-qp`) code the quantized codes with x265 at a constant QP,
//! so they change both.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use clap::Args;
use kvfetcher_client::model_id::model_id_from_file;
use std::sync::Arc;

use kvfetcher_codec::{
    allocate_steps, uniform_steps, CodecProfile, CodecRegistry, EncodeConfig, HevcEncoder,
    QuantConfig, TransformConfig, VariantKind, DEFAULT_CHUNK_TOKENS, DEFAULT_PRESET,
    DEFAULT_ZSTD_LEVEL,
};
use kvfetcher_kv::{fidelity, KvCache, Llama2Model, ScoreAccumulator, ScoredFidelity};
use serde::Serialize;

use super::engine::Engine;

use super::bench_codec::{error_sums, errors, round_trip, BitsArg, ErrorSums};
use super::kv::DTypeArg;
use kvfetcher::cli::{progress, GroupingArg};

/// Arguments of `kvfetcher-bench fidelity`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["model", "gguf"]))]
pub struct BenchFidelityArgs {
    /// A GGUF model, run in llama.cpp through the engine (`make engine`): the real measure.
    #[arg(long, requires = "text")]
    pub gguf: Option<PathBuf>,
    /// Reference texts (with --gguf; give several, e.g. prose and code).
    #[arg(long)]
    pub text: Vec<PathBuf>,
    /// Prefix lengths whose KV is reused (with --gguf): each text is split at each of them.
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    pub prefix: Vec<usize>,
    /// Continuation tokens scored after each prefix (with --gguf).
    #[arg(long, default_value_t = 256)]
    pub continuation: usize,
    /// Greedy tokens generated after each continuation, compared until the first divergence
    /// (with --gguf).
    #[arg(long, default_value_t = 32)]
    pub gen: usize,
    /// The engine binary (default $KVF_LLAMA or build/llama/bin/kvf-llama).
    #[arg(long)]
    pub engine: Option<PathBuf>,
    /// Weights the engine computes with (with --gguf): `f32`, the model's weights dequantized
    /// (the model's own response to KV error), or `as-is` (the file's quantized kernels, whose
    /// 8-bit activation rounding puts a floor under any lossy row).
    #[arg(long, value_enum, default_value_t = Weights::F32)]
    pub weights: Weights,
    /// Engine CPU threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// A llama2.c checkpoint (e.g. data/stories260K.bin): the toy measure.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Positions captured and compared with --model (1..=the model's seq_len).
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
    #[arg(long, value_enum, default_value_t = kvfetcher::cli::VariantArg::Zstd)]
    pub variant: kvfetcher::cli::VariantArg,
    /// Tokens per chunk (quantization ranges are per chunk).
    #[arg(long, default_value_t = DEFAULT_CHUNK_TOKENS)]
    pub chunk_tokens: usize,
    /// How K shares quantization parameters.
    #[arg(long, value_enum, default_value_t = GroupingArg::Channel)]
    pub key_grouping: GroupingArg,
    /// How V shares quantization parameters.
    #[arg(long, value_enum, default_value_t = GroupingArg::Channel)]
    pub value_grouping: GroupingArg,
    /// Codec profiles (`kvfetcher-bench profile`) to measure transform coding (the rans
    /// variant) with, each at every `--target-kl` and `--step-scale` (with --gguf).
    #[arg(long)]
    pub profile: Vec<PathBuf>,
    /// Fidelity targets (mean KL, nats) the profiles allocate steps for.
    #[arg(long, value_delimiter = ',')]
    pub target_kl: Vec<f64>,
    /// Uniform steps instead: this many times each tensor's RMS coefficient deviation.
    #[arg(long, value_delimiter = ',')]
    pub step_scale: Vec<f32>,
    /// Lossy HEVC rows (with --gguf): x265 constant QPs (1..=51) on the quantized codes, one
    /// row per QP and `--hevc-bits`, decoded by libde265 (NVDEC decodes the same codes).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u8).range(1..=51))]
    pub hevc_qp: Vec<u8>,
    /// Code widths of the lossy HEVC rows: 8 (or 10, 12: lossy sections need codes as wide as
    /// their samples; a narrower width at QP q is 8 bits at about QP q + 6 x (8 - width)).
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub hevc_bits: Vec<u8>,
    /// HEVC layout of the lossy rows (rows, rows420, frames, frames420, frames:N; default: the
    /// encoder's).
    #[arg(long)]
    pub hevc_layout: Option<String>,
    /// x265 preset of the lossy rows.
    #[arg(long, default_value = DEFAULT_PRESET)]
    pub hevc_preset: String,
    /// Extra x265 options of the lossy rows, `name=value` as on x265's command line without the
    /// dashes (e.g. `keyint=1` for all-intra).
    #[arg(long, value_parser = parse_x265_option)]
    pub hevc_option: Vec<(String, String)>,
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

/// The weights `bench fidelity --gguf` runs the model with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Weights {
    /// Every weight dequantized to f32 (same values).
    F32,
    /// The GGUF file as it is.
    AsIs,
}

/// One row of `bench fidelity --gguf`: a codec setting measured through the engine.
#[derive(Debug, Clone, Serialize)]
pub struct EngineFidelityRow {
    /// The setting: `exact` or the bit width (`8b`), with the variant and grouping.
    pub setting: String,
    /// Bits per value (16 for exact mode).
    pub bits: u8,
    /// Bit-exact mode.
    pub exact: bool,
    /// The prefixes' 16-bit KV size over their chunk objects' size (headers included).
    pub ratio_vs_16bit: f64,
    /// `||decoded - exact|| / ||exact||` over every reused prefix.
    pub rel_l2_err: f64,
    /// Over every continuation position: top-1 agreement, KL, perplexities (flattened).
    #[serde(flatten)]
    pub fidelity: ScoredFidelity,
    /// Greedy tokens after each continuation equal to the exact run's, until the first
    /// divergence: the mean over splits.
    pub greedy_match_tokens: f64,
    /// Greedy tokens generated per split (the most `greedy_match_tokens` can be).
    pub greedy_tokens: usize,
}

/// The output of `bench fidelity --gguf --json`.
#[derive(Debug, Serialize)]
pub struct EngineFidelityReport {
    /// The GGUF file name.
    pub model: String,
    /// The model's content id (`sha256:...`).
    pub model_id: String,
    /// The weights the engine computed with.
    pub weights: Weights,
    /// Texts and splits measured: `file@prefix+continuation`.
    pub splits: Vec<String>,
    /// One row per setting.
    pub results: Vec<EngineFidelityRow>,
}

/// Runs `kvfetcher-bench fidelity`.
pub fn run(args: BenchFidelityArgs) -> anyhow::Result<()> {
    if let Some(gguf) = args.gguf.clone() {
        let report = run_engine(&args, &gguf)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_engine_table(&report);
        }
        return Ok(());
    }
    let model_path = args
        .model
        .as_deref()
        .context("--model or --gguf is required")?;
    let model = Llama2Model::load(model_path)?;
    let generation = model.generate(args.tokens, args.seed, args.temperature)?;
    let original = generation.cache.to_dtype(args.dtype.into());
    let ids = &generation.token_ids;
    let raw16 = kvfetcher::cli::bytes_16bit(&original);
    let variant = VariantKind::from(args.variant);
    let registry =
        kvfetcher::cli::registry_for(variant, None, DEFAULT_PRESET, None, DEFAULT_ZSTD_LEVEL, 0)?;
    let bar = progress(args.bits.len() as u64, "fidelity");
    let mut results = Vec::new();
    for &bits in &args.bits {
        let cfg = encode_config(&args, bits);
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
    println!(
        "toy model {} (llama2.c, not a real model):",
        model_path.display()
    );
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

/// Parses an x265 `name=value` option.
fn parse_x265_option(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    Ok((k.trim().into(), v.trim().into()))
}

/// The lossy HEVC rows: one per `--hevc-bits` and `--hevc-qp`, each with its own x265 encoder
/// (software registry plus libde265 to decode).
fn hevc_lossy_settings(args: &BenchFidelityArgs) -> anyhow::Result<Vec<Setting>> {
    let mut out = Vec::new();
    for &bits in &args.hevc_bits {
        for &qp in &args.hevc_qp {
            let mut enc = HevcEncoder::new(args.hevc_layout.as_deref())
                .context("lossy hevc rows need x265")?
                .with_preset(&args.hevc_preset);
            for (k, v) in &args.hevc_option {
                enc = enc.with_option(k, v);
            }
            let enc = enc.with_qp(qp)?;
            let registry = CodecRegistry::standard().with(VariantKind::Hevc, Arc::new(enc));
            let options: String = args
                .hevc_option
                .iter()
                .map(|(k, v)| format!(" {k}={v}"))
                .collect();
            out.push(Setting {
                label: format!(
                    "hevc qp{qp} {bits}b {}{options} k:{:?} v:{:?}",
                    args.hevc_layout.as_deref().unwrap_or("frames"),
                    args.key_grouping,
                    args.value_grouping
                )
                .to_lowercase(),
                cfg: EncodeConfig {
                    variant: VariantKind::Hevc,
                    ..encode_config(args, BitsArg::Bits(bits))
                },
                registry,
                bits,
                exact: false,
            });
        }
    }
    Ok(out)
}

/// The codec setting of one row: `bits` with the arguments' variant, grouping and chunking.
fn encode_config(args: &BenchFidelityArgs, bits: BitsArg) -> EncodeConfig {
    EncodeConfig {
        quant: bits.quant(args.key_grouping, args.value_grouping),
        variant: VariantKind::from(args.variant),
        hevc_layout: None,
        hevc_stream_frames: None,
        chunk_tokens: args.chunk_tokens,
        layers_per_section: 1,
    }
}

/// One codec setting of `bench fidelity --gguf`: a row of the report.
struct Setting {
    label: String,
    cfg: EncodeConfig,
    registry: CodecRegistry,
    bits: u8,
    exact: bool,
}

/// The transform-coding rows of one profile: one per `--target-kl` and per `--step-scale`.
fn transform_settings(
    args: &BenchFidelityArgs,
    path: &Path,
    info: &super::engine::ModelInfo,
    registry: &CodecRegistry,
) -> anyhow::Result<Vec<Setting>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let profile =
        Arc::new(CodecProfile::from_bytes(&bytes).with_context(|| format!("{}", path.display()))?);
    profile.check_shape(info.n_layer, info.kv_heads, info.head_dim)?;
    ensure!(
        !args.target_kl.is_empty() || !args.step_scale.is_empty(),
        "--profile needs --target-kl and/or --step-scale"
    );
    let name = path
        .file_stem()
        .map_or_else(String::new, |f| f.to_string_lossy().into());
    let registry = registry.clone().with_profile(profile.clone());
    let mut out = Vec::new();
    let mut push = |label: String, steps: Vec<(f32, f32)>| {
        out.push(Setting {
            label,
            cfg: EncodeConfig {
                quant: QuantConfig::Transform(Arc::new(TransformConfig {
                    profile: profile.clone(),
                    steps,
                })),
                variant: VariantKind::Rans,
                hevc_layout: None,
                hevc_stream_frames: None,
                chunk_tokens: args.chunk_tokens,
                layers_per_section: 1,
            },
            registry: registry.clone(),
            bits: kvfetcher_codec::TRANSFORM_CODE_BITS,
            exact: false,
        })
    };
    for &target in &args.target_kl {
        let a = allocate_steps(&profile, target)?;
        push(
            format!(
                "rans {name} kl<={target} (predicted {:.1e}, {:.2} b/v)",
                a.predicted_kl, a.bits_per_value
            ),
            a.steps,
        );
    }
    for &scale in &args.step_scale {
        push(
            format!("rans {name} step {scale}"),
            uniform_steps(&profile, scale),
        );
    }
    Ok(out)
}

/// A text's exact run over one split: what every setting is compared with.
struct Split {
    label: String,
    ids: Vec<u32>,
    prefix: KvCache,
    logits: Vec<f32>,
    generated: Vec<u32>,
}

/// `bench fidelity --gguf`: captures, reference runs, then every setting over every split.
pub fn run_engine(args: &BenchFidelityArgs, gguf: &Path) -> anyhow::Result<EngineFidelityReport> {
    ensure!(!args.text.is_empty(), "--gguf needs at least one --text");
    ensure!(
        !args.prefix.is_empty() && args.prefix.iter().all(|&p| p > 0),
        "--prefix needs lengths of at least 1"
    );
    ensure!(args.continuation > 0, "--continuation must be at least 1");
    let scratch = tempfile::tempdir()?;
    let mut engine = Engine::locate(args.engine.as_deref(), gguf, args.threads)?;
    if args.weights == Weights::F32 {
        eprintln!("fidelity: dequantizing the weights to f32 (--weights f32)");
        engine = engine.dequantized(&scratch.path().join("model-f32.gguf"))?;
    }
    let info = engine.info()?;
    let longest = args.prefix.iter().max().copied().unwrap_or(0) + args.continuation;
    let mut splits = Vec::new();
    for text in &args.text {
        let cap = engine.capture(text, longest, false, scratch.path())?;
        let n = cap.token_ids.len();
        let name = text
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into());
        for &p in &args.prefix {
            if p + args.continuation > n {
                eprintln!(
                    "fidelity: {name} has {n} tokens, too few for prefix {p} + {}",
                    args.continuation
                );
                continue;
            }
            let ids = cap.token_ids[..p + args.continuation].to_vec();
            let prefix = cap.cache.slice_tokens(0, p)?;
            let exact = engine.score(&ids, &prefix, args.gen, info.n_vocab, scratch.path())?;
            eprintln!(
                "fidelity: reference run {name}@{p}+{} done",
                args.continuation
            );
            splits.push(Split {
                label: format!("{name}@{p}+{}", args.continuation),
                ids,
                prefix,
                logits: exact.logits,
                generated: exact.generated,
            });
        }
    }
    ensure!(
        !splits.is_empty(),
        "no text is long enough for any --prefix + --continuation"
    );

    let variant = VariantKind::from(args.variant);
    let registry =
        kvfetcher::cli::registry_for(variant, None, DEFAULT_PRESET, None, DEFAULT_ZSTD_LEVEL, 0)?;
    let mut settings: Vec<Setting> = args
        .bits
        .iter()
        .map(|&bits| Setting {
            label: match bits {
                BitsArg::Exact => format!("exact {:?}", args.variant).to_lowercase(),
                BitsArg::Bits(b) => format!(
                    "{b}b {:?} k:{:?} v:{:?}",
                    args.variant, args.key_grouping, args.value_grouping
                )
                .to_lowercase(),
            },
            cfg: encode_config(args, bits),
            registry: registry.clone(),
            bits: bits.reported(),
            exact: bits == BitsArg::Exact,
        })
        .collect();
    for path in &args.profile {
        settings.extend(transform_settings(args, path, &info, &registry)?);
    }
    settings.extend(hevc_lossy_settings(args)?);
    let mut results = Vec::new();
    for (i, setting) in settings.iter().enumerate() {
        let (cfg, registry) = (&setting.cfg, &setting.registry);
        let (mut raw16, mut bytes, mut err) = (0u64, 0u64, ErrorSums::default());
        let (mut acc, mut greedy) = (ScoreAccumulator::default(), 0usize);
        for s in &splits {
            let p = s.prefix.tokens();
            let rt = round_trip(&s.prefix, &s.ids[..p], cfg, registry)
                .with_context(|| format!("{} on {}", setting.label, s.label))?;
            raw16 += kvfetcher::cli::bytes_16bit(&s.prefix);
            bytes += rt.bytes;
            err.add(error_sums(&s.prefix, &rt.decoded));
            let decoded =
                engine.score(&s.ids, &rt.decoded, args.gen, info.n_vocab, scratch.path())?;
            let v = info.n_vocab;
            for (row, (r, d)) in s
                .logits
                .chunks_exact(v)
                .zip(decoded.logits.chunks_exact(v))
                .enumerate()
            {
                acc.add(r, d, s.ids.get(p + row + 1).copied());
            }
            greedy += s
                .generated
                .iter()
                .zip(&decoded.generated)
                .take_while(|(a, b)| a == b)
                .count();
        }
        eprintln!(
            "fidelity: setting {}/{} ({}) done",
            i + 1,
            settings.len(),
            setting.label
        );
        results.push(EngineFidelityRow {
            setting: setting.label.clone(),
            bits: setting.bits,
            exact: setting.exact,
            ratio_vs_16bit: raw16 as f64 / bytes as f64,
            rel_l2_err: err.rel_l2(),
            fidelity: acc.finish(),
            greedy_match_tokens: greedy as f64 / splits.len() as f64,
            greedy_tokens: args.gen,
        });
    }
    Ok(EngineFidelityReport {
        model: gguf
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into()),
        model_id: model_id_from_file(gguf)?,
        weights: args.weights,
        splits: splits.into_iter().map(|s| s.label).collect(),
        results,
    })
}

fn print_engine_table(r: &EngineFidelityReport) {
    println!(
        "model {} ({}), weights {:?}, splits: {}",
        r.model,
        r.model_id,
        r.weights,
        r.splits.join(", ")
    );
    println!("| setting | size vs 16-bit | top-1 agreement | mean KL | p99 KL | ppl (ref) | greedy match | positions |");
    println!("|---|---|---|---|---|---|---|---|");
    for x in &r.results {
        println!(
            "| {} | {:.2}x | {:.4} | {:.2e} | {:.2e} | {:.2} ({:.2}) | {:.1}/{} | {} |",
            x.setting,
            x.ratio_vs_16bit,
            x.fidelity.top1_agreement,
            x.fidelity.mean_kl,
            x.fidelity.p99_kl,
            x.fidelity.ppl,
            x.fidelity.ppl_ref,
            x.greedy_match_tokens,
            x.greedy_tokens,
            x.fidelity.positions
        );
    }
}
