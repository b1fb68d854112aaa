//! Transform-coding encode speed per stage, per CPU-second of one thread: `encode_cache` of a
//! whole KV (256-token chunks, one layer per section) and its steps taken apart (fp16 to f32,
//! the projection, quantization, the rANS coder).
//!
//! The KV is `KVF_BENCH_KV` (a `kvfetcher-bench kv capture` file of SmolLM2-135M, e.g. 2,048
//! tokens) with the profile `data/smollm2-135m-instruct-q4_1.kvfp` and the steps of target KL
//! 0.004; without it, 2,048 tokens synthesized from the profile (Laplace coefficients at each
//! component's deviation, inverse-transformed). Rates are MB/s of the fp16 KV per CPU-second
//! (from /proc/thread-self/stat), so a loaded machine changes them little. The SHA-256 of the
//! chunks it prints tells whether a change kept the encoder's output byte for byte.
//! Run: `cargo bench -p kvfetcher-codec --bench encode` (`KVF_BENCH_QUICK=1`: `encode_cache` only).

#![allow(missing_docs)]

use std::sync::Arc;

use kvfetcher_codec::rans::{
    encode_tensor, encode_values, histogram, FreqTable, DEFAULT_BLOCK_VALUES,
};
use kvfetcher_codec::{
    allocate_steps, context, encode_cache, forward_with, inverse, quantize_codes, quantize_level,
    CodecProfile, CodecRegistry, EncodeConfig, QuantConfig, RopeTable, TensorAt, TransformConfig,
    VariantKind,
};
use kvfetcher_kv::{DType, DTypeExt, KvCache, KvFile, LayerKv, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

const CHUNK: usize = 256;

/// Called per tensor of every chunk: layer, K or V, its fp16 bytes, first position, step.
type PerTensor<'a> = &'a mut dyn FnMut(usize, bool, &[u8], u32, f32);
/// One tensor's coefficients, levels, column contexts and step.
type Coded = (Vec<f32>, Vec<i32>, Vec<u8>, f32);

fn main() {
    let profile = Arc::new(
        CodecProfile::from_bytes(
            &std::fs::read(kvfetcher_testkit::data_file(
                "smollm2-135m-instruct-q4_1.kvfp",
            ))
            .expect("reads the profile"),
        )
        .expect("a profile"),
    );
    let cache = match std::env::var_os("KVF_BENCH_KV") {
        Some(path) => KvFile::read(path.as_ref()).expect("reads the KV").cache,
        None => synthetic(&profile, 2048),
    };
    let steps = allocate_steps(&profile, 0.004).expect("steps").steps;
    let cfg = EncodeConfig {
        quant: QuantConfig::Transform(Arc::new(TransformConfig {
            profile: profile.clone(),
            steps: steps.clone(),
        })),
        variant: VariantKind::Rans,
        chunk_tokens: CHUNK,
        ..EncodeConfig::default()
    };
    let reg = CodecRegistry::software().with_profile(profile.clone());
    let ids: Vec<u32> = (0..cache.tokens() as u32).collect();
    let model = profile.model;
    let mb = (cache.nbytes() / cache.dtype().size() * 2) as f64 / 1e6;
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let rate = |name: &str, f: &mut (dyn FnMut() + Send)| {
        let r = one.install(|| {
            f();
            let t0 = thread_cpu_seconds()?;
            let mut runs = 0;
            while thread_cpu_seconds()? - t0 < 2.0 {
                f();
                runs += 1;
            }
            Some(runs as f64 * mb / (thread_cpu_seconds()? - t0))
        });
        match r {
            Some(r) => eprintln!("encode {name}: {r:.0} MB/s of fp16 KV per CPU-second"),
            None => eprintln!("encode {name}: no CPU clock here"),
        }
    };
    let chunks = encode_cache(&cache, &model, &ids, &cfg, &reg).expect("encodes");
    let total: usize = chunks.iter().map(|(_, b)| b.len()).sum();
    let mut digest = Sha256::new();
    chunks.iter().for_each(|(_, b)| digest.update(b));
    eprintln!(
        "encode: {} tokens ({:?} RoPE), {mb:.1} MB fp16 -> {total} bytes ({:.2}x), sha256 {}",
        cache.tokens(),
        profile.rope.style,
        mb * 1e6 / total as f64,
        hex::encode(digest.finalize())
    );
    rate("encode_cache", &mut || {
        encode_cache(&cache, &model, &ids, &cfg, &reg).expect("encodes");
    });

    if std::env::var_os("KVF_BENCH_QUICK").is_some() {
        return;
    }
    // The steps of `encode_cache` one by one, on the same chunks and tensors.
    let channels = profile.channels();
    let sinks = usize::from(profile.sinks);
    let tensors = |f: PerTensor| {
        for start in (0..cache.tokens()).step_by(CHUNK) {
            let end = (start + CHUNK).min(cache.tokens());
            let first = start.max(sinks).min(end);
            for (layer, kv) in cache.layers().iter().enumerate() {
                for (is_key, t) in [(true, &kv.key), (false, &kv.value)] {
                    let bytes = &t.data()[first * channels * 2..end * channels * 2];
                    let step = if is_key {
                        steps[layer].0
                    } else {
                        steps[layer].1
                    };
                    f(layer, is_key, bytes, first as u32, step);
                }
            }
        }
    };
    let mut values = Vec::new();
    rate("fp16 to f32", &mut || {
        tensors(&mut |_, _, bytes, _, _| cache.dtype().decode_f32(bytes, &mut values));
    });
    let mut coeffs = Vec::new();
    let mut angles = RopeTable::default();
    let mut angles_at = u32::MAX;
    rate("fp16 to f32 + forward", &mut || {
        tensors(&mut |layer, is_key, bytes, first, _| {
            if angles_at != first {
                angles = RopeTable::new(&profile, first, CHUNK);
                angles_at = first;
            }
            cache.dtype().decode_f32(bytes, &mut values);
            let at = TensorAt {
                layer,
                is_key,
                first_position: first,
            };
            forward_with(&profile, at, &angles, &values, &mut coeffs);
        })
    });
    // Levels of every tensor, to time quantization and the coder apart.
    let mut all: Vec<Coded> = Vec::new();
    tensors(&mut |layer, is_key, bytes, first, step| {
        cache.dtype().decode_f32(bytes, &mut values);
        let at = TensorAt {
            layer,
            is_key,
            first_position: first,
        };
        forward_with(&profile, at, &RopeTable::default(), &values, &mut coeffs);
        let levels = coeffs.iter().map(|&y| quantize_level(y, step)).collect();
        let ctx = profile
            .component_std(layer, is_key)
            .iter()
            .map(|&sd| context(sd, step))
            .collect();
        all.push((coeffs.clone(), levels, ctx, step));
    });
    let mut levels = Vec::new();
    rate("quantize + zigzag", &mut || {
        for (y, _, _, step) in &all {
            levels.clear();
            quantize_codes(y, *step, &mut levels);
        }
    });
    rate("rans encode_tensor", &mut || {
        for (_, q, ctx, _) in &all {
            let n_ctx = ctx.iter().max().map_or(1, |&m| usize::from(m) + 1);
            encode_tensor(q, ctx, n_ctx, DEFAULT_BLOCK_VALUES).expect("encodes");
        }
    });
    let hists: Vec<_> = all
        .iter()
        .map(|(_, q, ctx, _)| {
            let n_ctx = ctx.iter().max().map_or(1, |&m| usize::from(m) + 1);
            histogram(q, ctx, n_ctx).expect("in range")
        })
        .collect();
    rate("rans histogram", &mut || {
        for (_, q, ctx, _) in &all {
            let n_ctx = ctx.iter().max().map_or(1, |&m| usize::from(m) + 1);
            histogram(q, ctx, n_ctx).expect("in range");
        }
    });
    rate("rans tables", &mut || {
        for h in &hists {
            let _: Vec<FreqTable> = h.iter().map(FreqTable::fit).collect();
        }
    });
    let tables: Vec<Vec<FreqTable>> = hists
        .iter()
        .map(|h| h.iter().map(FreqTable::fit).collect())
        .collect();
    eprintln!(
        "encode: {} tensors, {} tables",
        tables.len(),
        tables.iter().map(Vec::len).sum::<usize>()
    );
    rate("rans encode_values", &mut || {
        for ((_, q, ctx, _), t) in all.iter().zip(&tables) {
            encode_values(q, ctx, t, DEFAULT_BLOCK_VALUES).expect("encodes");
        }
    });
}

/// `tokens` of KV with the profile's statistics: per head, Laplace coefficients at each
/// component's calibration deviation, inverse-transformed (K with RoPE redone), as fp16.
fn synthetic(profile: &CodecProfile, tokens: usize) -> KvCache {
    let mut rng = StdRng::seed_from_u64(11);
    let channels = profile.channels();
    let mut tensor = |layer: usize, is_key: bool| {
        let std = profile.component_std(layer, is_key);
        let y: Vec<f32> = (0..tokens * channels)
            .map(|i| {
                let u: f32 = rng.gen_range(-0.5..0.5);
                let b = std[i % channels] / std::f32::consts::SQRT_2;
                -b * u.signum() * (1.0 - 2.0 * u.abs()).max(1e-30).ln()
            })
            .collect();
        let at = TensorAt {
            layer,
            is_key,
            first_position: 0,
        };
        let mut x = Vec::new();
        inverse(profile, at, &y, &mut x);
        Tensor::from_f32(DType::F16, [tokens, profile.kv_heads, profile.head_dim], &x)
            .expect("a tensor")
    };
    let layers = (0..profile.num_layers())
        .map(|l| LayerKv {
            key: tensor(l, true),
            value: tensor(l, false),
        })
        .collect();
    KvCache::new(layers, None).expect("a cache")
}

/// This thread's user + system CPU time in seconds (Linux: /proc/thread-self/stat, clock
/// ticks of 10 ms); None elsewhere.
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the parenthesized command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
