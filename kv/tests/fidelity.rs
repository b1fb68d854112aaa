//! Fidelity of decoded KV on real stories260K KV: identical caches agree exactly, f16 rounding
//! barely moves predictions, heavy noise visibly breaks them, and mismatched caches are typed
//! errors.

use kvfetcher_kv::{
    fidelity, DType, Fidelity, KvCache, KvFile, LayerKv, Llama2Model, ModelError, Tensor,
};
use kvfetcher_testkit::data_file;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Positions compared: enough for a stable agreement figure, fast in a debug build.
const TOKENS: usize = 64;

/// Applies `f(values, rms)` to every K and V tensor, re-encoding as `dtype`.
fn map_cache(cache: &KvCache, dtype: DType, mut f: impl FnMut(&mut [f32], f32)) -> KvCache {
    let mut conv = |t: &Tensor| {
        let mut v = t.to_f32();
        let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        f(&mut v, rms);
        Tensor::from_f32(dtype, t.shape(), &v).unwrap()
    };
    let layers = cache
        .layers()
        .iter()
        .map(|l| LayerKv {
            key: conv(&l.key),
            value: conv(&l.value),
        })
        .collect();
    KvCache::new(layers, cache.token_ids().map(<[u32]>::to_vec)).unwrap()
}

/// Adds uniform noise of standard deviation `rel * rms` to every value.
fn noisy(cache: &KvCache, rel: f32, seed: u64) -> KvCache {
    let mut rng = StdRng::seed_from_u64(seed);
    let half_width = rel * 3f32.sqrt();
    map_cache(cache, DType::F32, |v, rms| {
        v.iter_mut()
            .for_each(|x| *x += rng.gen_range(-half_width..half_width) * rms)
    })
}

fn setup() -> (Llama2Model, Vec<u32>, KvCache) {
    let model = Llama2Model::load(&data_file("stories260K.bin")).unwrap();
    let g = model.generate(TOKENS, 42, 1.0).unwrap();
    (model, g.token_ids, g.cache)
}

#[test]
fn identical_caches_agree_exactly() {
    let (model, ids, cache) = setup();
    let f = fidelity(&model, &ids, &cache, &cache).unwrap();
    assert_eq!(
        f,
        Fidelity {
            positions: TOKENS,
            top1_agreement: 1.0,
            mean_kl: 0.0,
            max_kl: 0.0,
            max_logit_diff: 0.0
        }
    );
}

#[test]
fn rounding_and_noise_degrade_in_order() {
    let (model, ids, cache) = setup();
    let f16 = map_cache(&cache, DType::F16, |_, _| {});
    let small = noisy(&cache, 0.05, 1);
    let heavy = noisy(&cache, 1.0, 2);
    let [f16, small, heavy] =
        [&f16, &small, &heavy].map(|d| fidelity(&model, &ids, &cache, d).unwrap());
    eprintln!("f16 {f16:?}\nsmall {small:?}\nheavy {heavy:?}");
    assert!(f16.top1_agreement >= 0.98, "{f16:?}");
    assert!(f16.mean_kl > 0.0 && f16.mean_kl < 1e-4, "{f16:?}");
    assert!(small.mean_kl > f16.mean_kl && small.mean_kl < heavy.mean_kl);
    assert!(heavy.top1_agreement < 0.8, "{heavy:?}");
    assert!(heavy.mean_kl > 0.1, "{heavy:?}");
}

#[test]
fn non_finite_values_count_as_total_loss() {
    let (model, ids, cache) = setup();
    let mut first = true;
    let broken = map_cache(&cache, DType::F32, |v, _| {
        if std::mem::take(&mut first) {
            v[3] = f32::NAN;
        }
    });
    let f = fidelity(&model, &ids, &cache, &broken).unwrap();
    assert_eq!(f.top1_agreement, 0.0, "{f:?}");
    assert!(
        f.mean_kl.is_infinite() && f.max_logit_diff.is_infinite(),
        "{f:?}"
    );
}

#[test]
fn mismatched_inputs_are_typed_errors() {
    let (model, ids, cache) = setup();
    let short = cache.slice_tokens(0, TOKENS - 1).unwrap();
    let err = fidelity(&model, &ids, &cache, &short).unwrap_err();
    assert!(matches!(err, ModelError::CacheMismatch(_)), "{err}");
    let err = fidelity(&model, &ids[1..], &cache, &cache).unwrap_err();
    assert!(matches!(err, ModelError::CacheMismatch(_)), "{err}");
    let mut bad_ids = ids.clone();
    bad_ids[5] = 10_000;
    let err = fidelity(&model, &bad_ids, &cache, &cache).unwrap_err();
    assert!(
        matches!(err, ModelError::BadTokenId { position: 5, .. }),
        "{err}"
    );

    let codelm = data_file("codelm-kv-a.safetensors");
    let other = KvFile::read(&codelm)
        .unwrap()
        .cache
        .slice_tokens(0, TOKENS)
        .unwrap();
    let err = fidelity(&model, &ids, &other, &other).unwrap_err();
    assert!(matches!(err, ModelError::CacheMismatch(_)), "{err}");
}
