//! `kvfetcher-bench profile`: calibrates a codec profile for a GGUF model through the engine.
//!
//! The model's own KV is captured over calibration texts, a per-layer, per-head transform is
//! fitted to it (`kvfetcher_codec::calibrate`, K with RoPE undone using the model's RoPE
//! metadata), and each K and V tensor's KL sensitivity is measured by coding that tensor alone
//! and scoring a continuation in the engine. Every shape and RoPE parameter comes from the
//! model's metadata. Use texts other than the ones fidelity is judged on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context};
use clap::Args;
use kvfetcher_client::model_id::model_id_from_file;
use kvfetcher_codec::{
    allocate_steps, calibrate, dequantize_level, forward, inverse, quantize_level, BasisKind,
    Calibration, CodecProfile, CodecRegistry, EncodeConfig, QuantConfig, Rope, RopeStyle, TensorAt,
    TransformConfig, VariantKind,
};
use kvfetcher_kv::{KvCache, LayerKv, ScoreAccumulator, Tensor};

use super::engine::{Engine, ModelInfo, Scored};
use kvfetcher::cli::progress;

/// Arguments of `kvfetcher-bench profile`.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// The GGUF model (run in llama.cpp through the engine, `make engine`).
    #[arg(long)]
    pub gguf: PathBuf,
    /// Calibration texts (not the texts fidelity is judged on).
    #[arg(long, required = true)]
    pub text: Vec<PathBuf>,
    /// Tokens captured per calibration text.
    #[arg(long, default_value_t = 1024)]
    pub tokens: usize,
    /// Leading tokens of every sequence kept exact (attention sinks). 1 measured better than 4
    /// on SmolLM2 (docs/BENCHMARKS.md): the first token is the sink, the next three cost raw
    /// bytes for no fidelity.
    #[arg(long, default_value_t = 1)]
    pub sinks: u16,
    /// The transform: principal components per head, or the channels as they are.
    #[arg(long, value_enum, default_value_t = BasisArg::Pca)]
    pub basis: BasisArg,
    /// Leave RoPE on K (fit the transform to K as cached).
    #[arg(long)]
    pub keep_rope: bool,
    /// Tokens of a calibration text whose KV is perturbed to measure sensitivities (of the
    /// first text, or of every text with --sensitivity-all-texts) and the joint KL scale (of
    /// every text).
    #[arg(long, default_value_t = 256)]
    pub probe_prefix: usize,
    /// Continuation tokens scored per sensitivity probe.
    #[arg(long, default_value_t = 128)]
    pub probe_continuation: usize,
    /// Bits per value the probe codes each tensor at (its rate curve's nearest step).
    #[arg(long, default_value_t = 3.0)]
    pub probe_bits: f32,
    /// The target the sensitivities are scaled at: the probe split is coded whole with steps
    /// for this mean KL and the sensitivities are scaled by measured over predicted KL (twice),
    /// since errors in every layer at once add up to more than the sum of single-tensor probes.
    #[arg(long, default_value_t = 0.01)]
    pub fit_kl: f64,
    /// Measure each tensor's sensitivity as the mean over a split of every calibration text,
    /// not on the first text's alone: twice the probes for two texts; on SmolLM2 it gave about
    /// 1% more at mean KL 2-3e-4 and the same near 0.01 (docs/BENCHMARKS.md).
    #[arg(long)]
    pub sensitivity_all_texts: bool,
    /// Skip the sensitivity probes (the profile then cannot drive `--target-kl`).
    #[arg(long)]
    pub no_sensitivity: bool,
    /// The engine binary (default $KVF_LLAMA or build/llama/bin/kvf-llama).
    #[arg(long)]
    pub engine: Option<PathBuf>,
    /// Engine CPU threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Where to write the profile.
    #[arg(long)]
    pub out: PathBuf,
}

/// The `--basis` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BasisArg {
    /// Principal components of each head, by decreasing variance.
    Pca,
    /// No decorrelation (mean removed only).
    Identity,
}

/// Runs `kvfetcher-bench profile`.
pub fn run(args: ProfileArgs) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let engine = Engine::locate(args.engine.as_deref(), &args.gguf, args.threads)?;
    eprintln!("profile: dequantizing the weights to f32");
    let engine = engine.dequantized(&scratch.path().join("model-f32.gguf"))?;
    let info = engine.info()?;
    // The daemon finds a model's profile by the file part of its model id (`sha256:...`).
    let model = kvfetcher::pipeline::profile_model(&model_id_from_file(&args.gguf)?);
    let rope = if args.keep_rope {
        Rope::NONE
    } else {
        rope_of(&info)?
    };
    let mut samples = Vec::new();
    for text in &args.text {
        let cap = engine.capture(text, args.tokens, false, scratch.path())?;
        eprintln!(
            "profile: captured {} tokens of {}",
            cap.token_ids.len(),
            text.display()
        );
        samples.push((cap.token_ids, cap.cache));
    }
    let caches: Vec<KvCache> = samples.iter().map(|(_, c)| c.clone()).collect();
    let cfg = Calibration {
        rope,
        sinks: args.sinks,
        basis: match args.basis {
            BasisArg::Pca => BasisKind::Pca,
            BasisArg::Identity => BasisKind::Identity,
        },
    };
    let mut profile = calibrate(model, &caches, &cfg)?;
    eprintln!("profile: fitted {} layers ({rope:?})", profile.num_layers());
    if !args.no_sensitivity {
        // Sensitivities on the first text's split (or every text's); the joint scale over a
        // split of every calibration text long enough for one (texts react differently: one
        // text's scale under-predicts others').
        let mut probes = Vec::new();
        for (i, (ids, cache)) in samples.iter().enumerate() {
            match Probe::new(&engine, &info, ids, cache, &profile, &args, scratch.path()) {
                Ok(p) => probes.push(p),
                Err(e) if i == 0 => return Err(e),
                Err(e) => eprintln!("profile: text {} has no joint probe: {e}", i + 1),
            }
        }
        let sensitivity_probes = if args.sensitivity_all_texts {
            &probes[..]
        } else {
            &probes[..1]
        };
        measure_sensitivities(&mut profile, sensitivity_probes, args.probe_bits)?;
        for round in 1..=2 {
            let (predicted, measured) = fit_kl_scale(&mut profile, &probes, args.fit_kl)?;
            eprintln!(
                "profile: joint probe {round}: predicted KL {predicted:.2e}, measured \
                 {measured:.2e}; sensitivities scaled by {:.2}",
                measured / predicted
            );
        }
    }
    let bytes = profile.to_bytes();
    std::fs::write(&args.out, &bytes).with_context(|| format!("{}", args.out.display()))?;
    println!(
        "profile {} ({} bytes, {} layers, sinks {}, {:?}) written to {}",
        profile.id(),
        bytes.len(),
        profile.num_layers(),
        profile.sinks,
        args.basis,
        args.out.display()
    );
    Ok(())
}

/// The model's RoPE from the engine's report (llama.cpp's rope type and GGUF metadata).
pub fn rope_of(info: &ModelInfo) -> anyhow::Result<Rope> {
    let meta = |suffix: &str| {
        info.fields
            .iter()
            .find(|(k, _)| k.starts_with("meta.") && k.ends_with(suffix))
            .map(|(_, v)| v.clone())
    };
    let style = match info.fields.get("rope_type").map(String::as_str) {
        Some("-1") => return Ok(Rope::NONE),
        Some("0") => RopeStyle::Adjacent,
        Some("2") => RopeStyle::Halves,
        Some(t) => bail!(
            "rope type {t} (multi-section or vision RoPE) is not undone by the codec; \
             calibrate with --keep-rope"
        ),
        None => bail!("the engine did not report the model's rope type"),
    };
    if let Some(kind) = meta(".rope.scaling.type").filter(|k| k != "none" && k != "linear") {
        bail!("RoPE scaling {kind:?} is not undone by the codec; calibrate with --keep-rope");
    }
    let dims = match meta(".rope.dimension_count") {
        Some(d) => d.parse().context("bad rope.dimension_count")?,
        None => u16::try_from(info.head_dim)?,
    };
    let base = match meta(".rope.freq_base") {
        Some(b) => b.parse().context("bad rope.freq_base")?,
        None => 10000.0,
    };
    let freq_scale = match meta(".rope.scaling.factor") {
        Some(f) => 1.0 / f.parse::<f32>().context("bad rope.scaling.factor")?,
        None => 1.0,
    };
    Ok(Rope {
        style,
        dims,
        base,
        freq_scale,
    })
}

/// Codes one tensor of `cache` (K or V of `layer`) at `step` with `profile`, others exact;
/// returns the perturbed cache and the coded tensor's mean squared error per value.
pub fn perturb_one(
    profile: &CodecProfile,
    cache: &KvCache,
    layer: usize,
    is_key: bool,
    step: f32,
) -> anyhow::Result<(KvCache, f64)> {
    let sinks = usize::from(profile.sinks).min(cache.tokens());
    let channels = profile.channels();
    let kv = &cache.layers()[layer];
    let t = if is_key { &kv.key } else { &kv.value };
    let values = t.to_f32();
    let at = TensorAt {
        layer,
        is_key,
        first_position: sinks as u32,
    };
    let mut coeffs = Vec::new();
    forward(profile, at, &values[sinks * channels..], &mut coeffs);
    let mut sq = 0f64;
    for y in &mut coeffs {
        let q = dequantize_level(quantize_level(*y, step), step);
        sq += f64::from(*y - q).powi(2);
        *y = q;
    }
    let mut restored = Vec::new();
    inverse(profile, at, &coeffs, &mut restored);
    let mut all = values[..sinks * channels].to_vec();
    all.extend_from_slice(&restored);
    let tensor = Tensor::from_f32(t.dtype(), t.shape(), &all)?;
    let mut layers = cache.layers().to_vec();
    layers[layer] = if is_key {
        LayerKv {
            key: tensor,
            value: kv.value.clone(),
        }
    } else {
        LayerKv {
            key: kv.key.clone(),
            value: tensor,
        }
    };
    let n = coeffs.len().max(1) as f64;
    Ok((KvCache::new(layers, None)?, sq / n))
}

/// A split sensitivities and the KL scale are measured on: a calibration text's first
/// `--probe-prefix` tokens reused, the next `--probe-continuation` scored, and the scores of the
/// exact prefix (computed once, compared with every perturbed run).
struct Probe<'a> {
    engine: &'a Engine,
    vocab: usize,
    scratch: &'a Path,
    ids: Vec<u32>,
    prefix: KvCache,
    exact: Scored,
}

impl<'a> Probe<'a> {
    fn new(
        engine: &'a Engine,
        info: &ModelInfo,
        ids: &[u32],
        cache: &KvCache,
        profile: &CodecProfile,
        args: &ProfileArgs,
        scratch: &'a Path,
    ) -> anyhow::Result<Probe<'a>> {
        let p = args.probe_prefix;
        ensure!(
            p > usize::from(profile.sinks) && p + args.probe_continuation <= ids.len(),
            "the text has {} tokens, too few for a probe of {p} + {}",
            ids.len(),
            args.probe_continuation
        );
        let ids = ids[..p + args.probe_continuation].to_vec();
        let prefix = cache.slice_tokens(0, p)?;
        let exact = engine.score(&ids, &prefix, 1, info.n_vocab, scratch)?;
        Ok(Probe {
            engine,
            vocab: info.n_vocab,
            scratch,
            ids,
            prefix,
            exact,
        })
    }

    /// Mean KL of the continuation's next-token distributions over `prefix` (a changed copy
    /// of the probe's) against the exact prefix's, over every scored position.
    fn mean_kl(&self, prefix: &KvCache) -> anyhow::Result<f64> {
        let scored = self
            .engine
            .score(&self.ids, prefix, 1, self.vocab, self.scratch)?;
        let mut acc = ScoreAccumulator::default();
        for (r, d) in self
            .exact
            .logits
            .chunks_exact(self.vocab)
            .zip(scored.logits.chunks_exact(self.vocab))
        {
            acc.add(r, d, None);
        }
        Ok(acc.finish().mean_kl)
    }
}

/// Codes each probe split whole (real chunk objects) with steps for `fit_kl`, scores it and
/// scales every sensitivity by measured over predicted KL, the measured KL being the mean over
/// the probes (each scores the same number of positions); returns both KLs.
fn fit_kl_scale(
    profile: &mut CodecProfile,
    probes: &[Probe<'_>],
    fit_kl: f64,
) -> anyhow::Result<(f64, f64)> {
    let shared = Arc::new(profile.clone());
    let a = allocate_steps(&shared, fit_kl)?;
    let cfg = EncodeConfig {
        quant: QuantConfig::Transform(Arc::new(TransformConfig {
            profile: shared.clone(),
            steps: a.steps,
        })),
        variant: VariantKind::Rans,
        ..EncodeConfig::default()
    };
    let registry = CodecRegistry::software().with_profile(shared);
    let mut measured = 0.0;
    for (i, probe) in probes.iter().enumerate() {
        let p = probe.prefix.tokens();
        let rt = super::bench_codec::round_trip(&probe.prefix, &probe.ids[..p], &cfg, &registry)?;
        let kl = probe.mean_kl(&rt.decoded)?;
        eprintln!(
            "profile: joint probe on text {}: measured KL {kl:.2e}",
            i + 1
        );
        measured += kl / probes.len() as f64;
    }
    ensure!(
        measured > 0.0 && a.predicted_kl > 0.0,
        "the joint probe changed nothing (KL {measured}); use a larger --fit-kl"
    );
    let scale = (measured / a.predicted_kl) as f32;
    for l in &mut profile.layers {
        for t in [&mut l.key, &mut l.value] {
            t.sensitivity = (t.sensitivity * scale).max(f32::MIN_POSITIVE);
        }
    }
    Ok((a.predicted_kl, measured))
}

/// Sets every tensor's sensitivity: KL per unit MSE when that tensor alone is coded at the
/// step of its rate curve nearest `probe_bits` bits per value, the mean over `probes`.
fn measure_sensitivities(
    profile: &mut CodecProfile,
    probes: &[Probe<'_>],
    probe_bits: f32,
) -> anyhow::Result<()> {
    let tensors = profile.num_layers() * 2;
    let bar = progress((tensors * probes.len()) as u64, "sensitivity");
    let shared = Arc::new(profile.clone());
    for i in 0..tensors {
        let (layer, is_key) = (i / 2, i % 2 == 0);
        let curve = &shared.layers[layer].tensor(is_key).curve;
        let step = curve
            .iter()
            .min_by(|a, b| {
                (a.bits - probe_bits)
                    .abs()
                    .total_cmp(&(b.bits - probe_bits).abs())
            })
            .context("the profile has no rate curve")?
            .step;
        let mut sensitivity = 0.0;
        for probe in probes {
            let (perturbed, mse) = perturb_one(&shared, &probe.prefix, layer, is_key, step)?;
            let kl = probe.mean_kl(&perturbed)?;
            if mse > 0.0 {
                sensitivity += kl / mse / probes.len() as f64;
            }
            bar.inc(1);
        }
        let t = &mut profile.layers[layer];
        let t = if is_key { &mut t.key } else { &mut t.value };
        // A tensor whose error the model does not notice still gets a tiny positive weight.
        t.sensitivity = (sensitivity as f32).max(f32::MIN_POSITIVE);
    }
    bar.finish_and_clear();
    Ok(())
}
