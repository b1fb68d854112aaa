//! The KV files committed under data/: real stories260K KV written by `kvfetcher-bench kv capture`
//! and real all-MiniLM-L6-v2 K/V written by scripts/capture_minilm.py.

use kvfetcher_kv::{DType, KvFile, Llama2Model};
use kvfetcher_testkit::data_file;

#[test]
fn stories_kv_is_the_seed_42_capture() {
    let path = data_file("stories-kv.safetensors");
    let f = KvFile::read(&path).unwrap();
    let c = &f.cache;
    assert_eq!(
        (c.num_layers(), c.tokens(), c.kv_heads(), c.head_dim()),
        (5, 512, 4, 8)
    );
    assert_eq!(c.dtype(), DType::F16);
    assert_eq!(f.metadata["seed"], "42");
    assert_eq!(f.metadata["temperature"], "1");
    let model = data_file("stories260K.bin");
    let model = Llama2Model::load(&model).unwrap();
    assert_eq!(f.metadata["model_sha256"], model.fingerprint_hex());
    // Generation is causal, so a 64-token rerun must equal the file's first 64 rows.
    let rerun = model.generate(64, 42, 1.0).unwrap();
    assert_eq!(
        c.slice_tokens(0, 64).unwrap(),
        rerun.cache.to_dtype(DType::F16)
    );
}

#[test]
fn minilm_kv_holds_real_bert_activations() {
    let path = data_file("minilm-kv.safetensors");
    let f = KvFile::read(&path).unwrap();
    let c = &f.cache;
    assert_eq!(
        (c.num_layers(), c.tokens(), c.kv_heads(), c.head_dim()),
        (6, 512, 12, 32)
    );
    assert_eq!(c.dtype(), DType::F16);
    assert!(f.metadata["source"].contains("MiniLM"), "{:?}", f.metadata);
    let ids = c.token_ids().unwrap();
    // BERT WordPiece: [CLS] = 101 first, [SEP] = 102 last, real words in between.
    assert_eq!((ids[0], ids[ids.len() - 1]), (101, 102));
    assert!(ids[1..ids.len() - 1].iter().all(|&t| t > 102 && t < 30_522));
    for l in c.layers() {
        let (k, v) = (l.key.to_f32(), l.value.to_f32());
        assert!(k.iter().chain(&v).all(|x| x.is_finite()));
        let rms = |x: &[f32]| (x.iter().map(|a| a * a).sum::<f32>() / x.len() as f32).sqrt();
        assert!(rms(&k) > 0.1 && rms(&v) > 0.01, "{} {}", rms(&k), rms(&v));
        assert_ne!(k, v);
    }
}
